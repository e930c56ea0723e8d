#!/usr/bin/env python3
"""Print the pinned runtime dependency closure of bids_skullstrip, as installed in this venv.

    python docker/pin_runtime_deps.py > docker/requirements.lock

Walks `Requires-Dist` from the installed `bids_skullstrip` distribution (its own extras, e.g.
`test`, excluded; extras that a dependency requests, `foo[bar]`, followed; environment markers
evaluated for this interpreter) and pins every reached distribution to the
version installed here, so the image gets exactly what the development venv tests.
"""
import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HEADER = """\
# Pinned runtime dependencies of the bids_skullstrip image (Python 3.11, linux x86_64).
# The full closure of setup.cfg's install_requires at the versions of the development venv;
# regenerate with:  python docker/pin_runtime_deps.py > docker/requirements.lock"""


def main() -> int:
    seen: dict[str, tuple[str, str]] = {}
    walked: set[tuple[str, str]] = set()  # (distribution, extra) pairs already expanded; "" = no extra
    # (requirement, extra of the requiring distribution that it was listed under)
    stack = [(Requirement(r), "") for r in distribution("bids_skullstrip").requires or []]
    missing = []
    while stack:
        req, parent_extra = stack.pop()
        if req.marker and not req.marker.evaluate({"extra": parent_extra}):
            continue
        key = canonicalize_name(req.name)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            missing.append(str(req))
            continue
        seen[key] = (dist.metadata["Name"], dist.version)
        # A dependency's own requirements, plus those of every extra it is requested with
        # (e.g. `foo[bar]` also pulls in what foo lists under `extra == "bar"`).
        for extra in ("", *sorted(canonicalize_name(e) for e in req.extras)):
            if (key, extra) in walked:
                continue
            walked.add((key, extra))
            stack.extend((Requirement(r), extra) for r in dist.requires or [])
    if missing:
        print("not installed here: " + ", ".join(missing), file=sys.stderr)
        return 1
    print(HEADER)
    for key in sorted(seen):
        name, version = seen[key]
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
