"""Scaling out through nipype's SLURM plugin, against a real (single-node) SLURM cluster.

Starts the shared cluster (``../shared/slurm/start-slurm.sh``: slurmctld + slurmd + munge on this
machine; idempotent) -- or uses one that already answers ``sinfo`` (e.g. a CI runner that set one up)
-- then runs the participant level on ``data/sample_bids`` twice:

* ``--plugin SLURM --plugin-args '{"sbatch_args": ...}'`` with ``LOGNAME`` removed from the
  environment (nipype's SLURM plugin needs it; the app must cope, as in containers and CI);
* the default MultiProc plugin;

and checks that the SLURM run really went through SLURM (new completed jobs in the job completion
log) and that both runs wrote the same files with identical masks.

A second run kills one image's job with SIGKILL (as the OOM killer would) and checks the one line that reports
it, the other image finished and the rerun.

Skipped when no cluster can be had, except when ``$CI`` is set: then it fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
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
                               ["--plugin", "SLURM",
                                "--plugin-args", json.dumps({"sbatch_args": SBATCH_ARGS, "max_jobs": 2})],
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

    # -- images one after another: with two jobs in the queue at most, every job of the image started first was
    # submitted (job ids grow with submission) before the first job of the image started last (nipype's own
    # order submits all N4 jobs first)
    jobs = {}  # image workflow: its job ids
    for line in new:
        jobid, name = re.search(r"JobId=(\d+)", line), re.search(r"Name=([^.\s]+)\.([^.\s]+)", line)
        image = name.group(2).removeprefix("ds_")  # an image's outputs are written by its ds_<image> workflow
        jobs.setdefault(image, []).append(int(jobid.group(1)))
    by_start = sorted(jobs.values(), key=min)
    assert len(by_start) == len(inputs) and max(by_start[0]) < min(by_start[-1]), jobs

    # -- same files, identical masks
    ignore = re.compile(r"(^|/)(logs/|.*\.html$|figures/)")  # timings, logs and pictures may differ
    run_log = re.compile(r"^logs/run-")  # named by the run's id
    f_slurm = {f for f in _files(out_slurm) if not run_log.match(f)}
    f_mp = {f for f in _files(out_mp) if not run_log.match(f)}
    assert f_slurm == f_mp, f"only SLURM: {sorted(f_slurm - f_mp)}; only MultiProc: {sorted(f_mp - f_slurm)}"
    masks = sorted(f for f in f_slurm if f.endswith("_mask.nii.gz") and not ignore.search(f))
    assert len(masks) == len(inputs), masks
    for rel in masks:
        a, b = nib.load(out_slurm / rel), nib.load(out_mp / rel)
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)), f"{rel} differs"
        assert np.array_equal(a.affine, b.affine), rel


def _job_process(pattern: re.Pattern, timeout_s: float):
    """The Python process of the SLURM job whose nipype script matches ``pattern``, and its job id."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if cmdline and "python" in Path(cmdline[0]).name and pattern.search(cmdline[-1]):
                try:
                    return proc, proc.environ()["SLURM_JOB_ID"]
                except (psutil.Error, KeyError):
                    continue
        time.sleep(0.2)
    return None, None


def test_a_job_killed_by_signal_9_fails_its_image_in_one_line_and_the_others_finish(slurm_cluster, tmp_path):
    """The Python process of one image's skull-strip job is SIGKILLed while it runs, as the kernel's OOM killer
    does (memory cannot be exceeded for real here: the test cluster has no cgroups and does not enforce
    ``--mem``). The job ends FAILED with exit code 137:0. The run reports that image in one line naming the job and
    signal 9 as most likely out of memory, records it in logs/failed/, finishes the other image and exits 1; a rerun
    processes only the failed image."""
    cfgdir = tmp_path / "cfg"
    cfgdir.mkdir()
    (cfgdir / "nipype.cfg").write_text("[execution]\npoll_sleep_duration = 0.5\n")
    env = {**os.environ, "NIPYPE_NO_ET": "1"}
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [*_app(), str(SAMPLE), str(out), "participant", "-w", str(work), "--participant-label", "02", "03",
           "--plugin", "SLURM", "--plugin-args", json.dumps({"sbatch_args": SBATCH_ARGS})]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cfgdir)
    try:
        proc, jobid = _job_process(re.compile(r"sub_02_T1w_wf_skullstrip\.py$"), timeout_s=300)
        assert proc is not None, "sub-02's skullstrip job was not seen running"
        time.sleep(1.0)  # into its work
        proc.kill()
        console, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1, f"exit status {run.returncode}\n{console[-6000:]}"
    lines = [line for line in console.splitlines() if "sub-02_T1w.nii.gz:" in line and "SLURM job" in line]
    assert len(lines) >= 1, console[-6000:]
    line = lines[-1]
    assert (f"the SLURM job {jobid} running its skullstrip step was killed by signal 9" in line
            and "exit code 137:0" in line and "most likely out of memory" in line
            and "raise the job's --mem in --plugin-args sbatch_args" in line), line
    print(line)
    assert "Traceback" not in console and "results file does not exist" not in console, console[-6000:]
    failed = {p.name: json.loads(p.read_text())["error"] for p in (out / "logs" / "failed").glob("*.json")}
    assert len(failed) == 1 and "sub-02" in next(iter(failed)), failed
    assert f"SLURM job {jobid} running its skullstrip step was killed by signal 9" in next(iter(failed.values()))
    assert list(out.glob("sub-03/anat/sub-03_run-1_*desc-brain_mask.nii.gz")), "sub-03 did not finish"
    assert not list(out.glob("sub-02/anat/*_mask.nii.gz")), "sub-02 has a mask despite its killed job"

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cfgdir, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-6000:] + rerun.stderr[-6000:]
    assert "1 processed in this run, 1 already finished, 0 failed" in rerun.stdout + rerun.stderr


@pytest.mark.parametrize("record, output, expected", [
    # what a cgroup-enforcing cluster reports for a job its OOM killer ended
    ({"JobState": "OUT_OF_MEMORY", "ExitCode": "0:125", "MinMemoryNode": "1126M"},
     "slurmstepd: error: Detected 1 oom_kill event in StepId=7.batch. Some of the step tasks have been OOM Killed.",
     "was killed for using more memory than it asked for (job state OUT_OF_MEMORY, exit code 0:125): raise the "
     "job's --mem in --plugin-args sbatch_args (it asked for 1126M)"),
    ({"JobState": "FAILED", "ExitCode": "0:9"}, "", "was killed by signal 9 (job state FAILED, exit code 0:9), "
     "most likely out of memory"),
    ({"JobState": "CANCELLED", "ExitCode": "0:15"}, "", "was cancelled (job state CANCELLED, exit code 0:15;"),
    ({"JobState": "TIMEOUT", "ExitCode": "0:0"}, "", "reached its time limit (job state TIMEOUT, exit code 0:0): "
     "raise --time"),
    ({"JobState": "FAILED", "ExitCode": "139:0"}, "", "was killed by signal 11 (SIGSEGV; job state FAILED, exit "
     "code 139:0): a crash in native code"),
    ({"StdOut": "/w/batch/slurm-7.out"}, "", "ended without a result (SLURM no longer knows the job): see its output "
     "/w/batch/slurm-7.out"),
])
def test_job_fate_says_how_a_job_ended_without_a_result(record, output, expected):
    """The states a cluster with cgroups and accounting reports, which the test cluster cannot produce."""
    from bids_skullstrip.slurm import job_fate

    line = job_fate(7, "skullstrip", record, output)
    assert line.startswith("the SLURM job 7 running its skullstrip step ") and expected in line, line


def test_a_cancellation_scancel_refuses_is_said(tmp_path, monkeypatch):
    """A run stopped while its controller did not answer said "cancelled the run's SLURM jobs: ..." although scancel
    had failed and the jobs ran on (red-team 11): the ids to cancel by hand, and why. No cluster: a scancel that
    fails as one without a controller does."""
    from bids_skullstrip import slurm

    fake = tmp_path / "scancel"
    fake.write_text("#!/bin/sh\necho 'scancel: error: Unable to contact slurm controller (connect failure)' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(slurm, "SUBMITTED", {1187, 1186})
    assert slurm.cancel_submitted_jobs() == (
        [1186, 1187], "scancel: error: Unable to contact slurm controller (connect failure)")
    assert not slurm.SUBMITTED
    monkeypatch.setattr(slurm, "SUBMITTED", {5})
    fake.write_text("#!/bin/sh\nexit 0\n")
    assert slurm.cancel_submitted_jobs() == ([5], None)


def test_sbatch_arguments_sbatch_refuses_are_one_line_before_anything_is_made(slurm_cluster, tmp_path):
    """A partition that does not exist: nipype's failed sbatch call was an IndexError (status 1) after the output
    folder was made; now sbatch is asked first (``--test-only``, no job submitted)."""
    out = tmp_path / "out"
    res = subprocess.run([*_app(), str(SAMPLE), str(out), "participant", "-w", str(tmp_path / "work"),
                          "--plugin", "SLURM", "--plugin-args", json.dumps({"sbatch_args": "-p nosuchpartition"})],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "sbatch refuses sbatch_args '-p nosuchpartition'" in lines[0], res.stderr
    assert "invalid partition" in lines[0].lower() and not out.exists()


def _queued(name_part: str) -> list[str]:
    res = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, timeout=30)
    return [line for line in res.stdout.splitlines() if name_part in line]


def test_sigterm_to_a_slurm_run_cancels_its_jobs(slurm_cluster, tmp_path):
    """A run stopped while its jobs are queued or running (SIGTERM: a time limit of the job that drives the run)
    cancels them: they ran on after the run was gone, writing into its work folder."""
    cfgdir = tmp_path / "cfg"
    cfgdir.mkdir()
    (cfgdir / "nipype.cfg").write_text("[execution]\npoll_sleep_duration = 0.5\n")
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [*_app(), str(SAMPLE), str(out), "participant", "-w", str(work), "--participant-label", "02", "03",
           "--plugin", "SLURM", "--plugin-args", json.dumps({"sbatch_args": SBATCH_ARGS})]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cfgdir,
                           env={**os.environ, "NIPYPE_NO_ET": "1"})
    try:
        deadline = time.monotonic() + 300
        while not _queued("sub_0") and time.monotonic() < deadline:  # nipype names the jobs after the nodes
            time.sleep(0.2)
        assert _queued("sub_0"), "no job of the run was seen in the queue"
        run.send_signal(signal.SIGTERM)
        console, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 143, console[-3000:]
    assert "cancelled the run's SLURM jobs" in console, console[-3000:]
    deadline = time.monotonic() + 30
    while _queued("sub_0") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _queued("sub_0") == [], _queued("sub_0")
