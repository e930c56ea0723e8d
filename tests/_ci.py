"""What the tests that need a service (container engine, SLURM) do when it is missing."""

import os

import pytest

IN_CI = bool(os.environ.get("CI"))


def unavailable(what, reason):
    """Skip on a developer machine; fail in CI, where the ``what`` test must run."""
    if IN_CI:
        pytest.fail(f"CI is set but the {what} test cannot run: {reason}")
    pytest.skip(reason)
