"""Scaling out through nipype's SLURM plugin, against a real (single-node) SLURM cluster.

Starts the shared cluster (``../shared/slurm/start-slurm.sh``: slurmctld + slurmd + munge on this
machine; idempotent) -- or uses one that already answers ``sinfo`` (e.g. a CI runner that set one up)
-- then runs the participant level on ``data/sample_bids`` twice:

* ``--plugin SLURM --plugin-args '{"sbatch_args": ...}'`` with ``LOGNAME`` removed from the
  environment (nipype's SLURM plugin needs it; the app must cope, as in containers and CI);
* the default MultiProc plugin;

and checks that the SLURM run really went through SLURM (new completed jobs in the job completion
log) and that both runs wrote the same files with identical masks.

Skipped when no cluster can be had, except when ``$CI`` is set: then it fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _ci import unavailable

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample_bids"
SHARED_SLURM = Path(__file__).resolve().parents[1].parent / "shared" / "slurm"
JOBCOMP = Path(os.environ.get("SLURM_JOBCOMP_LOG", "/var/log/slurm/jobcomp.log"))
SBATCH_ARGS = os.environ.get("BIDS_SKULLSTRIP_TEST_SBATCH_ARGS", "-t 60")


def _node_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return res.returncode == 0 and any(s.strip("*~#!%$@^-") in {"idle", "mixed", "allocated", "completing"}
                                       for s in res.stdout.split())


@pytest.fixture(scope="module")
def slurm_cluster():
    script = SHARED_SLURM / "start-slurm.sh"
    if script.is_file() and os.geteuid() == 0:
        res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            pytest.fail(f"start-slurm.sh failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    if not _node_up():
        why = ("no SLURM node answers sinfo and " +
               (f"{script} is missing" if not script.is_file() else "start-slurm.sh needs root"))
        unavailable("SLURM", why)
    if not JOBCOMP.exists():
        unavailable("SLURM", f"SLURM job completion log {JOBCOMP} not found (JobCompType=jobcomp/filetxt expected)")
    return JOBCOMP


def _app() -> list[str]:
    exe = Path(sys.executable).with_name("bids_skullstrip")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "bids_skullstrip.cli.run"]


def _run_participant(out: Path, work: Path, extra: list[str], env: dict, cwd: Path):
    cmd = [*_app(), str(SAMPLE), str(out), "participant", "-w", str(work), *extra]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=3600)
    took = time.monotonic() - t0
    assert res.returncode == 0, (f"{' '.join(cmd)} exited {res.returncode} after {took:.0f} s\n"
                                 f"--- stdout\n{res.stdout[-6000:]}\n--- stderr\n{res.stderr[-6000:]}")
    return took


def _jobcomp_entries(log: Path) -> list[str]:
    return log.read_text(errors="replace").splitlines()


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_slurm_plugin_matches_multiproc(slurm_cluster, tmp_path):
    jobcomp = slurm_cluster
    # Fast polling (nipype's default is 2 s between squeue calls): nipype reads ./nipype.cfg.
    cfgdir = tmp_path / "cfg"
    cfgdir.mkdir()
    (cfgdir / "nipype.cfg").write_text("[execution]\npoll_sleep_duration = 0.5\n")

    env = dict(os.environ)
    env.pop("LOGNAME", None)                 # the app must set it for nipype's SLURM plugin
    env["NIPYPE_NO_ET"] = "1"
    before = len(_jobcomp_entries(jobcomp))

    out_slurm, out_mp = tmp_path / "out_slurm", tmp_path / "out_multiproc"
    t_slurm = _run_participant(out_slurm, tmp_path / "work_slurm",
                               ["--plugin", "SLURM", "--plugin-args", json.dumps({"sbatch_args": SBATCH_ARGS})],
                               env, cfgdir)
    new = _jobcomp_entries(jobcomp)[before:]
    t_mp = _run_participant(out_mp, tmp_path / "work_multiproc", [], env, cfgdir)
    print(f"participant level on {SAMPLE.name}: SLURM plugin {t_slurm:.0f} s ({len(new)} jobs), "
          f"MultiProc {t_mp:.0f} s")

    # -- it really went through SLURM: completed jobs, submitted from this run's work directory
    inputs = sorted(p for p in SAMPLE.rglob("*_T1w.nii*") if p.name.endswith((".nii", ".nii.gz")))
    states = [re.search(r"JobState=(\S+)", line) for line in new]
    assert len(new) >= len(inputs), f"expected >= {len(inputs)} SLURM jobs, jobcomp.log gained {len(new)}"
    assert all(s and s.group(1) == "COMPLETED" for s in states), "\n".join(new)

    # -- same files, identical masks
    ignore = re.compile(r"(^|/)(logs/|.*\.html$|figures/)")  # timings, logs and pictures may differ
    f_slurm, f_mp = _files(out_slurm), _files(out_mp)
    assert f_slurm == f_mp, f"only SLURM: {sorted(f_slurm - f_mp)}; only MultiProc: {sorted(f_mp - f_slurm)}"
    masks = sorted(f for f in f_slurm if f.endswith("_mask.nii.gz") and not ignore.search(f))
    assert len(masks) == len(inputs), masks
    for rel in masks:
        a, b = nib.load(out_slurm / rel), nib.load(out_mp / rel)
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)), f"{rel} differs"
        assert np.array_equal(a.affine, b.affine), rel
