"""The container image, run the way users and HPC sites run it.

Builds the image from the top-level ``Dockerfile`` (or reuses ``$BIDS_SKULLSTRIP_IMAGE`` when that image
exists), then runs the BIDS App ``participant`` and ``group`` levels on ``data/sample_bids``:

* ``--read-only`` root filesystem, ``--user 1000:1000`` (a uid the image does not know),
  ``--network none``, ``HOME`` pointing at a directory that does not exist,
* the BIDS dataset bind-mounted read-only, the output directory bind-mounted writable,

and checks every expected derivative: masks are uint8 {0, 1} on exactly the input grid, images keep
the input geometry, ``dataset_description.json`` records the container.

Engine: podman (these machines, see ../shared/containers/README.md) or docker (GitHub runners);
``$BIDS_SKULLSTRIP_ENGINE`` forces one. Without a usable engine the test is skipped, except when
``$CI`` is set: then it fails, so CI can never pass without having run it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _ci import unavailable

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample_bids"
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
DEFAULT_TAG = "localhost/bids_skullstrip:test"
USER = os.environ.get("BIDS_SKULLSTRIP_TEST_USER", "1000:1000")


def _run(cmd, timeout=600, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def _engine() -> str:
    forced = os.environ.get("BIDS_SKULLSTRIP_ENGINE")
    candidates = [forced] if forced else ["podman", "docker"]
    tried = []
    for name in candidates:
        if not shutil.which(name):
            tried.append(f"{name}: not installed")
            continue
        res = _run([name, "info"], timeout=120)
        if res.returncode == 0:
            return name
        tried.append(f"{name}: `{name} info` failed ({(res.stderr or res.stdout).strip().splitlines()[-1:]})")
    unavailable("container", "no usable container engine (" + "; ".join(tried) + ")")


def _runtime_args(engine: str) -> list[str]:
    # crun cannot handle these VMs' hybrid cgroups: use runc (../shared/containers/README.md).
    if engine == "podman" and shutil.which("runc"):
        return ["--runtime", "runc"]
    return []


def _image_exists(engine: str, image: str) -> bool:
    if engine == "podman":
        return _run([engine, "image", "exists", image]).returncode == 0
    return _run([engine, "image", "inspect", image]).returncode == 0


@pytest.fixture(scope="module")
def engine() -> str:
    return _engine()


@pytest.fixture(scope="module")
def image(engine) -> str:
    """The image under test: $BIDS_SKULLSTRIP_IMAGE if it exists, else built now from the Dockerfile."""
    tag = os.environ.get("BIDS_SKULLSTRIP_IMAGE") or DEFAULT_TAG
    if os.environ.get("BIDS_SKULLSTRIP_IMAGE") and _image_exists(engine, tag):
        return tag
    if engine == "podman":
        if not _image_exists(engine, BASE_IMAGE):
            unavailable("container", f"base image {BASE_IMAGE} missing: run `bash ../shared/containers/make-base.sh`")
        cmd = [engine, "build", "--pull=never", *_runtime_args(engine), "--network", "host", "-t", tag, REPO]
    else:
        cmd = [engine, "build", "-t", tag, REPO]
    t0 = time.monotonic()
    res = _run(cmd, timeout=3600)
    assert res.returncode == 0, f"image build failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    print(f"built {tag} with {engine} in {time.monotonic() - t0:.0f} s")
    return tag


def _container(engine, image, args, *, out: Path | None = None, timeout=1800, writable_tmp=True, status=0):
    """`<engine> run` as users do on a locked-down host: read-only, unknown uid, no network, no HOME."""
    cmd = [engine, "run", "--rm", *_runtime_args(engine), "--network", "none", "--read-only",
           "--user", USER, "-e", "HOME=/home/nobody"]
    if engine == "docker" and writable_tmp:
        cmd += ["--tmpfs", "/tmp"]      # podman --read-only mounts a tmpfs on /tmp by itself
    if engine == "podman" and not writable_tmp:
        cmd += ["--read-only-tmpfs=false"]
    cmd += ["-v", f"{SAMPLE}:/bids:ro"]
    if out is not None:
        cmd += ["-v", f"{out}:/out"]
    cmd += [image, *args]
    t0 = time.monotonic()
    res = _run(cmd, timeout=timeout)
    took = time.monotonic() - t0
    assert res.returncode == status, (f"{' '.join(map(str, cmd))} exited {res.returncode} after {took:.0f} s\n"
                                 f"--- stdout\n{res.stdout[-6000:]}\n--- stderr\n{res.stderr[-6000:]}")
    return res, took


def _t1w_inputs() -> list[Path]:
    files = sorted(p for p in SAMPLE.rglob("*_T1w.nii*") if p.name.endswith((".nii", ".nii.gz")))
    assert files, f"no T1w images in {SAMPLE}"
    return files


def _stem(t1w: Path) -> str:
    name = t1w.name
    return name[: name.index("_T1w.nii")]


def _generated_by_container(desc: dict):
    for entry in desc.get("GeneratedBy", []):
        if isinstance(entry, dict) and entry.get("Container"):
            return entry["Container"]
    return None


def test_image_metadata(engine, image):
    fmt = "{{json .Config.Labels}}" if engine == "docker" else "{{json .Labels}}"
    res = _run([engine, "image", "inspect", "--format", fmt, image])
    assert res.returncode == 0, res.stderr
    labels = json.loads(res.stdout)
    for key in ("title", "version", "source", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"missing OCI label {key}: {labels}"
    res, _ = _container(engine, image, ["--version"])
    import bids_skullstrip

    assert bids_skullstrip.__version__ in res.stdout + res.stderr


def test_no_writable_temporary_folder_is_one_line(engine, image, tmp_path):
    """docker's --read-only without --tmpfs /tmp: both levels failed with "FileNotFoundError: No usable temporary
    directory found in [...]" (1), even with -w given."""
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    for level in ("participant", "group"):
        res, _ = _container(engine, image, ["/bids", "/out", level], out=out, writable_tmp=False, status=2)
        assert res.stderr.strip().splitlines() == [
            "bids_skullstrip: error: no writable temporary folder (TMPDIR, /tmp, /var/tmp): set TMPDIR to a writable "
            "folder, or give the container one (--tmpfs /tmp)"], res.stderr
    assert not any(out.iterdir())


def test_participant_then_group_read_only(engine, image, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # written by uid 1000, whoever runs the test
    inputs = _t1w_inputs()

    _, t_part = _container(engine, image, ["/bids", "/out", "participant"], out=out)
    _, t_group = _container(engine, image, ["/bids", "/out", "group"], out=out)
    print(f"container participant level: {t_part:.0f} s, group level: {t_group:.0f} s ({len(inputs)} T1w)")

    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc.get("DatasetType") == "derivative", desc
    container = _generated_by_container(desc)
    assert container and container.get("Type") == "docker", f"no Container in GeneratedBy: {desc}"

    assert (out / "group_T1w.tsv").is_file() and (out / "group_T1w.html").is_file()
    group_rows = (out / "group_T1w.tsv").read_text().strip().splitlines()
    assert len(group_rows) == 1 + len(inputs), group_rows

    subjects = sorted({p.relative_to(SAMPLE).parts[0] for p in inputs})
    for sub in subjects:
        assert (out / f"{sub}.html").is_file(), f"participant report {sub}.html missing"

    for t1w in inputs:
        rel = t1w.relative_to(SAMPLE).parent          # sub-XX/[ses-YY/]anat
        stem = _stem(t1w)
        anat = out / rel
        sub = rel.parts[0]
        expected = [
            anat / f"{stem}_desc-brain_mask.nii.gz", anat / f"{stem}_desc-brain_mask.json",
            anat / f"{stem}_desc-preproc_T1w.nii.gz", anat / f"{stem}_desc-preproc_T1w.json",
            anat / f"{stem}_desc-brain_T1w.nii.gz", anat / f"{stem}_desc-brain_T1w.json",
            anat / f"{stem}_desc-brain_metrics.json",
            out / sub / "figures" / f"{stem}_desc-brain_mask.svg",
            out / sub / "figures" / f"{stem}_desc-brain_T1w.svg",
        ]
        missing = [str(p.relative_to(out)) for p in expected if not p.is_file()]
        assert not missing, f"missing derivatives for {t1w.name}: {missing}"

        src = nib.load(t1w)
        for img_path in (p for p in expected if p.name.endswith(".nii.gz")):
            img = nib.load(img_path)
            assert img.shape[:3] == src.shape[:3], (img_path.name, img.shape, src.shape)
            np.testing.assert_allclose(img.affine, src.affine, rtol=0, atol=1e-6, err_msg=img_path.name)
            np.testing.assert_allclose(img.header.get_zooms()[:3], src.header.get_zooms()[:3], rtol=0, atol=1e-6)
        mask_img = nib.load(anat / f"{stem}_desc-brain_mask.nii.gz")
        assert mask_img.get_data_dtype() == np.uint8, mask_img.get_data_dtype()
        mask = np.asanyarray(mask_img.dataobj)
        assert set(np.unique(mask)) <= {0, 1}
        frac = mask.mean()
        assert 0.01 < frac < 0.9, f"{t1w.name}: implausible brain fraction {frac:.3f}"
        metrics = json.loads((anat / f"{stem}_desc-brain_metrics.json").read_text())
        assert metrics.get("brain_voxels") == int(mask.sum()), metrics.get("brain_voxels")

    # Nothing but derivatives and reports lands in /out when the app runs with its default work directory
    # (the work dir must not be inside the read-only image nor litter the output dataset).
    # figures/ holds the group report's pictures (bids_skullstrip.reports.group.FIG_DIR, in .bidsignore);
    # README.md is the derivative dataset's own (the validator warns without one).
    stray = [p.name for p in out.iterdir()
             if not (p.name.startswith("sub-")
                     or p.name in {"dataset_description.json", ".bidsignore", "README.md", "logs", "figures"}
                     or p.name.startswith("group_"))]
    assert not stray, f"unexpected entries in the output directory: {stray}"
