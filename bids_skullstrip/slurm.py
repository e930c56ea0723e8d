"""nipype's SLURM plugin, made to say why a node's job ended without a result.

When a node's job is killed (out of memory, a signal, ``scancel``, its time limit), nipype's ``SLURMPlugin`` waits
for the result file, then fails the node with ``Job id (N) finished or terminated, but results file does not
exist``, whatever happened. Here the job's fate is asked of the cluster the way a user can: ``scontrol show job``
while the controller still knows the job (``MinJobAge``, 300 s by default), else ``sacct`` where accounting
exists, and the job's own output (``slurmstepd`` writes there when it killed a step for memory). The node fails
with one line naming the job, its state and exit code, and what to change; the other images go on.

The run's ``sbatch_args`` also come after each node's own ``--mem``/``--cpus-per-task`` (nipype puts them first),
so that a ``--mem`` given there, as that line advises, wins.
"""

import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

from nipype.pipeline.plugins.base import _graph_to_lil_matrix
from nipype.pipeline.plugins.slurm import SLURMPlugin

from .multiproc import image_of, signal_cause


def sbatch_refuses(sbatch_args):
    """What sbatch says against ``sbatch_args`` (a partition that does not exist, an unknown option), asked with
    ``--test-only`` (no job is submitted); "" when it takes them, or when there is no sbatch to ask."""
    if not shutil.which("sbatch"):
        return ""
    try:
        res = subprocess.run(["sbatch", "--test-only", *shlex.split(sbatch_args), "--wrap", "true"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return "" if res.returncode == 0 else " ".join((res.stderr or res.stdout).split())[:300]


# The jobs the run's plugins submitted and have not seen end: cancelled when the run is stopped (SIGTERM, Ctrl-C),
# which otherwise leaves them queued, to run after the run is gone.
SUBMITTED = set()


def cancel_submitted_jobs():
    """``scancel`` every job of this run that is still queued or running; returns (their ids, why scancel failed:
    None when it did not)."""
    jobs, failed = sorted(SUBMITTED), None
    if jobs:
        try:
            res = subprocess.run(["scancel", *map(str, jobs)], capture_output=True, text=True, timeout=60)
            if res.returncode:
                failed = " ".join((res.stderr or res.stdout or f"status {res.returncode}").split())[:200]
        except (OSError, subprocess.TimeoutExpired) as exc:  # no scancel here, or a controller that does not answer
            failed = " ".join(str(exc).split())[:200]
    SUBMITTED.clear()
    return jobs, failed


def _ask(cmd):
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no such command (no accounting client), or a slow controller
        return ""
    return res.stdout if res.returncode == 0 else ""


def job_record(jobid):
    """What the cluster still knows of a job: ``JobState``, ``ExitCode`` (status:signal), ``MinMemoryNode``,
    ``StdOut`` where known; {} when nothing does."""
    fields = dict(re.findall(r"(\w+)=(\S*)", _ask(["scontrol", "show", "job", "-o", str(jobid)])))
    if fields.get("JobState"):
        return fields
    rows = [row.split("|") for row in _ask(["sacct", "-j", str(jobid), "-X", "-n", "-P",
                                             "-o", "State,ExitCode,ReqMem"]).splitlines()]
    for row in rows:
        if len(row) == 3 and row[0].strip():
            return {"JobState": row[0].split()[0], "ExitCode": row[1], "MinMemoryNode": row[2]}  # "CANCELLED by 0"
    return {}


def job_fate(jobid, node_name, record, output=""):
    """One line: how the job ended, from ``job_record``'s fields and the text of its output, and what to try."""
    job = f"the SLURM job {jobid} running its {node_name} step"
    state, code = record.get("JobState", ""), record.get("ExitCode", "")
    status, _, sig = code.partition(":")
    signum = int(sig) if sig.isdigit() and int(sig) else None
    if signum is None and status.isdigit() and int(status) > 128:  # the batch shell reports its child's signal so
        signum = int(status) - 128
    seen = f"job state {state}, exit code {code}" if state else "SLURM no longer knows the job"
    asked = f" (it asked for {record['MinMemoryNode']})" if record.get("MinMemoryNode") else ""
    more_mem = f"raise the job's --mem in --plugin-args sbatch_args{asked}"
    if state == "OUT_OF_MEMORY" or "oom_kill" in output or "OOM Killed" in output:
        return f"{job} was killed for using more memory than it asked for ({seen}): {more_mem}"
    if state == "TIMEOUT":
        return f"{job} reached its time limit ({seen}): raise --time in --plugin-args sbatch_args"
    if state.startswith("CANCELLED"):
        return f"{job} was cancelled ({seen}; scancel, or the cluster's administrators): rerun to redo the image"
    if signum == signal.SIGKILL:
        return f"{job} was killed by signal 9 ({seen}), most likely out of memory: {more_mem}"
    if signum:
        name, cause = signal_cause(signum)
        return f"{job} was killed by signal {signum} ({name}; {seen}): {cause}"
    where = f": see its output {record['StdOut']}" if record.get("StdOut") else ""
    return f"{job} ended without a result ({seen}){where}"


class SlurmPlugin(SLURMPlugin):
    """``SLURM`` that reports a job that ended without a result by its fate, in one line, and submits the ready
    jobs of the image started first first: with nipype's ``max_jobs`` capping the jobs in the queue, the images
    finish one after another instead of all at the end."""

    def __init__(self, plugin_args=None):
        super().__init__(plugin_args=plugin_args)
        self._jobs = {}  # job id: (node name, nipype's default output file of the job)

    def _generate_dependency_list(self, graph):
        super()._generate_dependency_list(graph)
        # nipype submits ready jobs in the order of self.procs (any order is valid: readiness is counted in
        # depidx): the graph's topological order is all N4s first, so order it by image, then as it was
        rank = {}
        for node in self.procs:
            rank.setdefault(image_of(node), len(rank))
        self.procs = [node for _, _, node in sorted((rank[image_of(n)], i, n) for i, n in enumerate(self.procs))]
        self.depidx = _graph_to_lil_matrix(graph, nodelist=self.procs)
        self.refidx = self.depidx.astype(int)

    def _submit_batchtask(self, scriptfile, node):
        if self._sbatch_args and node.plugin_args.get("sbatch_args") and not node.plugin_args.get("overwrite"):
            node.plugin_args = {**node.plugin_args, "overwrite": True,
                                "sbatch_args": f"{node.plugin_args['sbatch_args']} {self._sbatch_args}"}
        jobid = super()._submit_batchtask(scriptfile, node)
        self._jobs[jobid] = (node.name, Path(scriptfile).parent / f"slurm-{jobid}.out")
        SUBMITTED.add(jobid)
        return jobid

    def _get_result(self, taskid):
        result = super()._get_result(taskid)
        # nipype's mark of a job that ended without writing its result file (a real result names its host)
        if result and result.get("hostname") == "unknown":
            node_name, default_output = self._jobs[taskid]
            record = job_record(taskid)
            output = Path(record.get("StdOut") or default_output)
            text = output.read_text(errors="replace") if output.is_file() else ""
            record["StdOut"] = str(output) if output.is_file() else ""
            result["traceback"] = [job_fate(taskid, node_name, record, text)]
        return result

    def _clear_task(self, taskid):
        super()._clear_task(taskid)
        self._jobs.pop(taskid, None)
        SUBMITTED.discard(taskid)
