"""What the tests that need a service (container engine, SLURM) do when it is missing."""

import os

import pytest

IN_CI = bool(os.environ.get("CI"))


def unavailable(what, reason):
    """Skip on a developer machine; fail in CI, where the ``what`` test must run."""
    if IN_CI:
        pytest.fail(f"CI is set but the {what} test cannot run: {reason}")
    pytest.skip(reason)


def needs(path, what="this test's data"):
    """A mark that skips the test on a developer machine without ``path``; in CI the test runs anyway, so
    data that should be there and is not fails it instead of skipping it silently."""
    from pathlib import Path

    return pytest.mark.skipif(not IN_CI and not Path(path).exists(), reason=f"{what} not found: {path}")


def skip_unless_present(path, what="this test's data"):
    """Inside a test or fixture: the same rule as ``needs``."""
    from pathlib import Path

    if not Path(path).exists():
        unavailable(what, f"{path} not found")
