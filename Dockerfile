# bids_skullstrip BIDS App image.
#
#   docker build -t bids_skullstrip .
#   podman build --pull=never --runtime runc --network host -t bids_skullstrip .   (this project's machines)
#   docker run --rm --read-only --tmpfs /tmp --user "$(id -u):$(id -g)" --network none \
#       -v /data/bids:/bids:ro -v /data/out:/out bids_skullstrip /bids /out participant
#
# Two stages: the builder makes a venv in /opt/venv from pinned wheels (no compiler is needed: every
# dependency ships manylinux wheels); the runtime stage is the slim base + python3 + that venv.
# Nothing writes to the image at run time: caches go to /tmp (a tmpfs with `podman --read-only`,
# `docker run --tmpfs /tmp`, the host's /tmp or a session dir with Apptainer), and the nipype work
# directory is `-w` (see docs/container.md).

ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

# --------------------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first (a cached layer as long as the lock file does not change).
COPY docker/requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir -r /tmp/requirements.lock

# No TensorFlow: the image runs the networks' ONNX export in OpenVINO (training is `pip install .[train]`).
# Dropped: the packages' own test suites. Everything is byte-compiled now, since the image is read-only at run time.
RUN find /opt/venv/lib/python3*/site-packages -depth -type d -name tests -exec rm -rf {} + \
 && python -m compileall -q -j 0 /opt/venv/lib/python3*/site-packages >/dev/null \
 && python -c "import openvino, ants, nipype, bids, nibabel, matplotlib, scipy, jinja2, psutil, pandas, sklearn" \
 && bids-validator-deno --version >/dev/null

# --------------------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}
# python3 only (the venv's interpreter); no compilers, no apt lists, no pip cache.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
 && mkdir -p /bids /out
# The dependencies (a large layer that stays cached while docker/requirements.lock is unchanged) ...
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# ... then the package itself, without deps (all pinned above), built with the pinned setuptools
# (.dockerignore lets only the package, setup.cfg, pyproject.toml, README and LICENSE in).
COPY . /tmp/src
RUN pip install --no-cache-dir --no-deps --no-build-isolation --disable-pip-version-check /tmp/src \
 && rm -rf /tmp/src \
 && python -c "import bids_skullstrip"

# Run-time environment for a read-only image, any uid, no network and no writable $HOME:
# every cache/config location is explicit and under /tmp (never $HOME).
ENV VIRTUAL_ENV=/opt/venv \
    BIDS_SKULLSTRIP_CONTAINER=docker \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONNOUSERSITE=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    MPLBACKEND=Agg \
    NUMBA_CACHE_DIR=/tmp/.cache/numba \
    NIPYPE_NO_ET=1 \
    NO_ET=1 \
    NIPYPE_CONFIG_DIR=/tmp/.nipype \
    DENO_DIR=/tmp/.cache/deno \
    DENO_NO_UPDATE_CHECK=1 \
    DENO_NO_PROMPT=1
ARG VERSION=0.4.0
ARG BUILD_DATE=unknown
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="bids_skullstrip" \
      org.opencontainers.image.description="BIDS App: skull-stripping of structural MRI (T1w, T2w, FLAIR, PD) with bundled CPU-friendly 3D U-Nets" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/bids-skullstrip/bids-skullstrip" \
      org.opencontainers.image.url="https://github.com/bids-skullstrip/bids-skullstrip" \
      org.opencontainers.image.documentation="https://github.com/bids-skullstrip/bids-skullstrip/blob/main/docs/container.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"
WORKDIR /tmp
ENTRYPOINT ["/opt/venv/bin/bids_skullstrip"]
CMD ["--help"]
