"""nipype's MultiProc plugin, made to finish images one after another and to survive a lost worker.

nipype's ``MultiProcPlugin`` runs nodes in a ``concurrent.futures.ProcessPoolExecutor``. Three things it does
not do for a run over many images:

* **Depth first.** It submits ready jobs in topological order: every image's networks first, every image's
  writing last, so no output exists until the very end of a long run. Here ready jobs of the image started
  first go first, so images finish one after another while every worker stays busy. Nodes are grouped into
  images by their crash folder (``workflows.base.crash_dir``: one per image).
* **A lost worker.** When the kernel kills a worker (out of memory) or it dies in native code, the executor
  breaks: every task in flight fails with ``BrokenProcessPool``, the other workers are terminated, nipype's
  callback logs tracebacks and its loop waits for results that never come (nipy/nipype#2548, #2700). Here
  the job the dead worker held fails with one line (signal, likely cause, memory, what to try), written as
  its crash file; the jobs the other workers held are resubmitted to a new pool, and the run goes on.
* **Idle workers.** Its loop sleeps a fixed poll between looks at the jobs and collects garbage before each submit;
  here a job's end wakes the loop and the collection skips what was alive when the run began (the participant
  level of 10 heads: 19.5 → 13.7 s with the faster gzip of ``nifti.save``; docs/benchmarks.md).

Workers ignore SIGINT (the main process stops them: ``runner.stop_workers``) and die with the main process
(``PR_SET_PDEATHSIG``), so no worker outlives an interrupted or killed run.
"""

import contextlib
import faulthandler
import gc
import logging
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from traceback import format_exception

import psutil
from nipype.pipeline.plugins import base as nipype_plugin_base
from nipype.pipeline.plugins.multiproc import MultiProcPlugin, process_initializer, run_node

from .execution import die_with_parent

log = logging.getLogger("nipype.workflow")

_started = None  # in a worker: the queue on which it says which task it runs
# image (``image_of``) -> why its step failed, where its crash file could not be written (a full work directory)
UNRECORDED = {}


def _init_worker(cwd, started):
    global _started
    process_initializer(cwd)
    _started = started
    logging.raiseExceptions = False  # a log file on a full disk: no "--- Logging error ---" traceback on the console
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the main process decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # die at once, even inside a long native call
    # nipype turns Python's fault handler on: a worker dying in native code printed 40 lines of stack and module
    # names to the console (red-team 10b), above the one line the run says of it
    faulthandler.disable()
    die_with_parent()


def _run_node(node, updatehash, taskid):
    _started.put((taskid, os.getpid()))
    return run_node(node, updatehash, taskid)


def signal_cause(sig):
    """(name, likely cause) of a process's death by signal ``sig``, for one other than SIGKILL."""
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = "unknown signal"
    native = sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL)
    return name, "a crash in native code" if native else "stopped from outside"


def death_message(exitcode, node_name, *, held_gb, pool_gb, memory_gb, n_procs, image_gb=None):
    """One line: how a worker ended (``exitcode`` as ``multiprocessing`` gives it) and what to try.
    ``held_gb``: its memory when last seen (None if never), ``pool_gb``: all workers' then, ``image_gb``: what one
    image needs (the least any advice may leave the run)."""
    step = f"while running its {node_name} step"
    if exitcode is None or exitcode >= 0:
        return f"the worker process exited unexpectedly (status {exitcode}) {step}"
    sig = -exitcode
    name, cause = signal_cause(sig)
    if sig != signal.SIGKILL:
        return f"the worker process was killed by signal {sig} ({name}) {step}: {cause}"
    from .execution import cgroup_memory_free_gb

    # what the process may still get: the machine's free memory, but no more than its container or job has left
    free = min(psutil.virtual_memory().available / 2**30, cgroup_memory_free_gb() or float("inf"))
    seen = ", ".join(([f"it held {held_gb:.1f} GB"] if held_gb else [])
                     + ([f"the run's workers {pool_gb:.1f} GB"] if pool_gb else []))
    fewer = f"--n-cpus {max(1, n_procs // 2)} or " if n_procs > 1 else ""
    if image_gb and free >= 2 * n_procs * image_gb and (pool_gb or 0.0) <= 0.5 * memory_gb:
        # memory was not short as far as the run can tell: --mem advice would mislead (red-team 10b)
        seen = f"{seen} when last seen, " if seen else ""
        return (f"the worker process was killed by signal {sig} ({name}) {step}, by someone (kill -9, a scheduler) "
                f"or by the kernel for memory, which did not look short ({seen}{free:.1f} GB free now, an image needs "
                f"about {image_gb:.2f} GB): rerun to redo it; if it happens again, try {fewer}--mem below "
                f"{int(memory_gb * 1024)} (MB)")
    mem_mb = int(min(memory_gb, free) * 1024 * 0.8)
    if image_gb and mem_mb < image_gb * 1024:  # a --mem below one image's need: the run would refuse to start
        advice = (f"give the run more memory (an image needs about {image_gb:.2f} GB"
                  + ("; --n-cpus 1 runs one image at a time)" if n_procs > 1 else ")"))
    else:
        advice = f"try {fewer}--mem {mem_mb} (MB), or give the run more memory"
    return (f"the worker process was killed by signal {sig} ({name}) {step}, most likely out of memory "
            f"({seen + ' when last seen; ' if seen else ''}the run may use {memory_gb:.1f} GB, {free:.1f} GB free "
            f"now): {advice}")


def image_of(node):
    """The image a node works for: its image's crash-file folder (each image's workflow sets one), else the
    node's place in the graph."""
    return node.config.get("execution", {}).get("crashdump_dir") or node._hierarchy


class ImageFirstMultiProcPlugin(MultiProcPlugin):
    """``MultiProc`` that finishes images one after another and survives the loss of a worker."""

    poll_s = 0.2  # the longest the scheduling loop sleeps when no job ends

    def __init__(self, plugin_args=None):
        super().__init__(plugin_args=plugin_args)
        self.pool.shutdown()  # nipype's pool has not started a process yet: ours replaces it
        self._nodes = {}  # taskid: (node, updatehash), to resubmit it
        self._pool_of = {}  # taskid: the pool (its number) it was submitted to
        self._worker_of = {}  # taskid: pid of the worker that took it
        self._rss_gb = {}  # pid: memory it held when last seen (sampled each second)
        self._sampled = 0.0
        self._exitcodes = {}  # pid: exit code, of the workers of broken pools
        self._exitcodes_pool = {}  # pid: the broken pool it belonged to
        self._image_rank = {}  # image: order in which its first job started
        self._pools = 0
        self._job_ended = threading.Event()  # set by each job's callback: wakes the scheduling loop
        self._new_pool()

    def _report_crash(self, node, result=None):
        try:
            return super()._report_crash(node, result=result)
        except OSError as exc:  # a full or vanished work directory: that image fails in one line, the others go on
            from .execution import traceback_message

            cause = traceback_message("".join((result or {}).get("traceback") or [])) or "no traceback"
            UNRECORDED[image_of(node)] = (f"its {node.name} step failed ({cause}) and so did writing its crash file: "
                                          f"{exc.strerror or exc} (is the work directory full?)")
            return None

    def _new_pool(self):
        import multiprocessing as mp

        context = mp.get_context(self.plugin_args.get("mp_context"))
        self._started = context.SimpleQueue()
        self.pool = ProcessPoolExecutor(max_workers=self.processors, mp_context=context,
                                        initializer=_init_worker, initargs=(self._cwd, self._started))
        self._pools += 1

    def run(self, graph, config, updatehash=False):
        # nipype's loop looks at its jobs, then sleeps a fixed poll: a job that ended waited for the sleep to end
        # before its successor started (0.1-0.3 s at each of an image's four steps; the two workers of a 10-head
        # run were idle a fifth of it). Here the job's callback ends the sleep; the poll only bounds how late a
        # lost worker is seen
        config = {**config, "execution": {**config["execution"], "poll_sleep_duration": self.poll_s}}
        nipype_sleep = nipype_plugin_base.sleep
        nipype_plugin_base.sleep = self._sleep_until_a_job_ends
        # nipype collects garbage before each submit: 47 ms each over the objects of the graph, pybids and the
        # plan, 2.4 s of CPU in a 10-head run taken from the workers' two cores. What is alive now is not
        # garbage: frozen, the collections look at the run's new objects only
        gc.freeze()
        try:
            return super().run(graph, config, updatehash=updatehash)
        finally:
            gc.unfreeze()
            nipype_plugin_base.sleep = nipype_sleep

    def _sleep_until_a_job_ends(self, seconds):
        if self.proc_done.all() and not self.proc_pending.any():  # nipype's loop sleeps once more at its end
            return
        if self._job_ended.wait(seconds):
            self._job_ended.clear()

    def _sort_jobs(self, jobids, scheduler=None):
        unstarted = len(self._image_rank)
        return sorted(jobids, key=lambda j: (self._image_rank.get(image_of(self.procs[j]), unstarted), j))

    def _submit_job(self, node, updatehash=False):
        self._image_rank.setdefault(image_of(node), len(self._image_rank))
        self._taskid += 1
        if getattr(node.interface, "terminal_output", "") == "stream":
            node.interface.terminal_output = "allatonce"
        self._nodes[self._taskid] = (node, updatehash)
        self._submit(self._taskid)
        return self._taskid

    def _submit(self, taskid):
        node, updatehash = self._nodes[taskid]
        try:
            future = self.pool.submit(_run_node, node, updatehash, taskid)
        except BrokenProcessPool:
            # a worker died between two jobs (an idle worker holds its loaded networks: the OOM killer's choice as
            # much as a busy one), so the pool refuses new work; nipype's loop let that end the run, failing every
            # image not yet finished with no word why (red-team 15). Nothing the dead worker held is lost: the jobs
            # in flight are run again by _get_result, this one goes to the new pool
            self._replace_broken_pool()
            future = self.pool.submit(_run_node, node, updatehash, taskid)
        future.add_done_callback(self._async_callback)
        self._task_obj[taskid] = future
        self._pool_of[taskid] = self._pools

    def _async_callback(self, future):
        if future.exception() is None:  # failures are handled in _get_result, without nipype's traceback
            super()._async_callback(future)
        self._job_ended.set()

    def _task_finished_cb(self, jobid, cached=False):
        super()._task_finished_cb(jobid, cached=cached)
        if self.plugin_args.get("prune_finished_images"):
            self._prune(image_of(self.procs[jobid]))

    def _prune(self, image):
        """Remove the node folders of ``image`` once every node of it is done: a work directory held in memory
        (tmpfs) would otherwise keep every finished image's intermediate files (17 bytes a voxel: 0.3 GB for a
        1 mm head) in the memory the run's workers need."""
        mine = [i for i, proc in enumerate(self.procs) if image_of(proc) == image]
        if all(self.proc_done[i] and not self.proc_pending[i] for i in mine):
            folders = [Path(self.procs[i].output_dir()) for i in mine]
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
            for parent in {folder.parent for folder in folders}:  # the image's workflow folders, now empty
                with contextlib.suppress(OSError):
                    parent.rmdir()

    def _clear_task(self, taskid):
        super()._clear_task(taskid)
        for held in (self._nodes, self._pool_of, self._worker_of):
            held.pop(taskid, None)

    def _watch_workers(self):
        while not self._started.empty():
            taskid, pid = self._started.get()
            self._worker_of[taskid] = pid
        if time.monotonic() - self._sampled < 1.0:
            return
        self._sampled = time.monotonic()
        for worker in psutil.Process().children():
            try:
                rss = worker.memory_info().rss
            except psutil.Error:
                continue
            if rss:  # a worker that just died (a zombie) shows 0: keep what it held before
                self._rss_gb[worker.pid] = rss / 2**30

    def _get_result(self, taskid):
        if taskid in self._taskresult:
            return self._taskresult[taskid]
        self._watch_workers()
        future = self._task_obj[taskid]
        if not future.done() or future.exception() is None:  # running, or its callback is on its way
            return None
        if not isinstance(future.exception(), BrokenProcessPool):  # e.g. a result that cannot be pickled
            return {"result": None, "traceback": format_exception(future.exception()), "taskid": taskid}
        if self._pool_of[taskid] == self._pools:
            self._replace_broken_pool()
        pid = self._worker_of.get(taskid)
        code = self._exitcodes.get(pid)
        if code is None or code == -signal.SIGTERM:  # its worker was stopped by the executor: run it again
            self._worker_of.pop(taskid, None)
            self._submit(taskid)
            return None
        node, _ = self._nodes[taskid]
        pool_gb = sum(self._rss_gb.get(worker, 0.0) for worker, code in self._exitcodes.items()
                      if self._exitcodes_pool.get(worker) == self._pool_of[taskid])
        image_gb = max(proc.mem_gb for proc in self.procs if image_of(proc) == image_of(node))
        message = death_message(code, node.name, held_gb=self._rss_gb.get(pid), pool_gb=pool_gb,
                                memory_gb=self.memory_gb, n_procs=self.processors, image_gb=image_gb)
        return {"result": None, "traceback": [message], "taskid": taskid}

    def _replace_broken_pool(self):
        """A worker died: the executor failed every task in flight and terminated the other workers (SIGTERM).
        Keep each worker's exit code and start a new pool."""
        self._watch_workers()
        # the executor's own record of its processes (pid: multiprocessing.Process), kept until shutdown
        processes = dict(getattr(self.pool, "_processes", None) or {})
        self.pool.shutdown(wait=True)
        self._exitcodes.update({pid: p.exitcode for pid, p in processes.items()})
        self._exitcodes_pool.update({pid: self._pools for pid in processes})
        log.warning("[MultiProc] a worker was lost (exit codes %s, GB held when last seen %s); a new pool runs the "
                    "rest", self._exitcodes, {pid: round(self._rss_gb.get(pid, 0), 2) for pid in processes})
        self._new_pool()
