"""One run of the BIDS App: select -> plan -> run -> record -> report, with its progress line, interrupts and
exit status. The command line (``cli.run``) only parses, builds the ``config.RunConfig`` and calls ``Run``.
"""

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path

import psutil

from . import __version__
from .config import UsageError, check_writable

log = logging.getLogger("bids_skullstrip")

# exit status: every image processed / an image failed / the run could not start / --fail-on-flag and a QC flag
OK, FAILED, USAGE, FLAGGED = 0, 1, 2, 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
# An exception raised by a signal handler while a finalizer or a weakref callback runs (SQLAlchemy's, pybids') is
# printed as "Exception ignored" and dropped, and the run went on (seen once in CI with SIGTERM): if the process is
# still here this long after the signal, a timer stops it the same way.
STOP_GRACE_S = 3.0
_STOPPING = threading.Lock()
# A second signal while the first one's stop is under way (a double Ctrl-C, `kill` sent twice) raised in the middle
# of that stop: the run ended with a traceback, or with status 0 and not a word (red-team 10b). It is ignored now.
_SIGNALLED = threading.Event()
# What a stop does once the workers are gone (``Run.tidy_after_stop``): remove the temporary files of the images the
# run holds (a worker stopped while it wrote one left it in the output folder until the next run), then release
# their locks. Set once they are claimed, when what it calls is imported: the stop imports nothing.
_TIDY_ON_STOP = []
# How the stop message says to resume: "the same command" redoes with --overwrite the images this run already
# redid (red-team 15); set once the run knows its options
_RESUME_ADVICE = "rerun the same command to resume"
SCHEDULER_JOB_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")  # SLURM, PBS/Torque, LSF, SGE
NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm")


class Interrupted(BaseException):
    """SIGTERM, SIGHUP or Ctrl-C (what schedulers send at a job's time limit or on preemption, what a closed
    terminal sends), raised in the main thread. A BaseException, so that no ``except Exception`` swallows it."""


def _interrupt_in(main_pid):
    def interrupt(signum, frame):
        if os.getpid() != main_pid:  # a process forked from this one before its own handlers were set: stop
            os._exit(128 + signum)
        if _SIGNALLED.is_set():  # the first signal's stop is under way (or its watchdog's, if it was dropped)
            return
        _SIGNALLED.set()
        name = signal.Signals(signum).name
        watchdog = threading.Timer(STOP_GRACE_S, stop_now, args=(name,))
        watchdog.daemon = True
        watchdog.start()
        raise Interrupted(name)
    return interrupt


def handle_stop_signals():
    """From now on SIGTERM, SIGHUP and Ctrl-C raise ``Interrupted`` in the main thread. Set first thing: a
    container's main process (PID 1) ignores a signal it has no handler for, so a ``podman stop`` in the first
    second of a run was lost (the run went on, or was SIGKILLed 10 s later without a word)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _interrupt_in(os.getpid()))


def stop_workers(timeout=5.0):
    """Terminate every process this one started (the pool's workers, the validator, whatever they started); SIGKILL
    those still there after ``timeout`` seconds."""
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)


def stop_now(name):
    """Stop every worker and job of the run, say how to resume and leave at once (128 + the signal's number); the
    first caller does it (the unwound main thread, or the watchdog of a signal whose exception was dropped); a
    second waits for it to end the process, never returning to a caller that would go on or exit 0."""
    if not _STOPPING.acquire(blocking=False):
        while True:
            time.sleep(60)
    stop_workers()
    # the SLURM plugin's module, if the run got as far as importing it: importing it here, where the signal may
    # have cut an import short (nipype's, in the first second), failed with a traceback (red-team 11)
    slurm = sys.modules.get(f"{__package__}.slurm")
    jobs, failed = slurm.cancel_submitted_jobs() if hasattr(slurm, "cancel_submitted_jobs") else ([], None)
    if jobs and failed:
        log.warning("warning: the run's SLURM jobs could not be cancelled (scancel: %s): cancel them by hand: "
                    "scancel %s", failed, " ".join(map(str, jobs)))
    elif jobs:
        log.info("cancelled the run's SLURM jobs: %s", " ".join(map(str, jobs)))
    for tidy in _TIDY_ON_STOP:
        with contextlib.suppress(Exception):
            tidy()
    message = (f"interrupted ({name}): the images finished so far are kept and no output was left half-written; "
               f"{_RESUME_ADVICE}")
    for handler in log.handlers:  # the run's log file; the console gets the message once, on stderr
        handler.handle(log.makeRecord(log.name, logging.WARNING, __file__, 0, message, None, None))
    print(f"bids_skullstrip: {message}", file=sys.stderr)
    sys.stderr.flush()
    # leave at once: a clean interpreter exit would wait for nipype's threads
    os._exit(128 + signal.Signals[name].value)


def participant_errors(output_dir, failures=()):
    """{participant: error messages} of every image failed in ``output_dir`` (recorded by earlier runs, of every
    contrast) and of ``failures``, this run's (image, message), whether or not their records could be written."""
    from . import outputs

    errors, seen = {}, set()
    for image, message in [*failures, *outputs.recorded_failures(output_dir)]:
        if image.name not in seen:
            seen.add(image.name)
            errors.setdefault(image.subject, []).append(message)
    return errors


def select_images(config):
    """The images of the selection, after the BIDS validator has judged the files the run reads."""
    from .discovery import (DiscoveryError, ValidatorFailed, collect_images, load_bids_filters, missing_content,
                            validate_dataset)

    filters = load_bids_filters(config.bids_filter_file) if config.bids_filter_file else None
    t1ws = collect_images(config.bids_dir, contrasts=config.contrasts,
                          participant_labels=config.participant_label or None,
                          session_labels=config.session_label or None, bids_filters=filters,
                          database_dir=config.bids_database_dir)
    if not config.skip_bids_validation:
        # an image whose content is missing (not fetched, gone) fails on its own in the run, with how to get it
        present = [t.relpath for t in t1ws if not missing_content(t)]
        try:
            errors, ignored = validate_dataset(config.bids_dir, reads=present)
        except ValidatorFailed as exc:
            log.warning("warning: the BIDS validator could not run (%s): the dataset was not validated; each image "
                        "is still checked as it is read (--skip-bids-validation skips the validator)", exc)
            return t1ws
        if ignored:
            log.info("BIDS validator: %d error(s) ignored: in files this run does not read, or of an image's content, "
                     "which the run reads and judges itself", ignored)
        if errors:
            raise DiscoveryError(f"{config.bids_dir}: the BIDS validator found {len(errors)} error(s) in what this "
                                 f"run reads, first: {errors[0]} (fix them or pass --skip-bids-validation)")
    return t1ws


def folder_size(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())


def node_local(folder):
    """Whether ``folder`` is on this machine's own disk (a temporary folder), not on storage a job on another
    node sees."""
    local = [Path(p) for p in (*NODE_LOCAL, tempfile.gettempdir(), os.environ.get("SLURM_TMPDIR") or "/tmp")]
    return any(Path(folder).is_relative_to(p) for p in local)


class Run:
    """One run: the configuration, resolved once (plugin, its arguments) and written to ``<out>/logs/``."""

    def __init__(self, config):
        from . import execution

        self.config = config
        self.plugin, self.plugin_args = execution.plugin_settings(config)
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}_{uuid.uuid4().hex[:8]}"
        self.unwritten = []  # what written_or_said could not write
        self.work_dir_made = False  # whether this run made its work directory

    def __call__(self):
        """The exit status of the run. SIGTERM, SIGHUP and Ctrl-C stop every worker of the run, say how to
        resume and leave at once (128 + the signal's number)."""
        handle_stop_signals()
        try:
            return self.participant() if self.config.analysis_level == "participant" else self.group()
        except (KeyboardInterrupt, Interrupted) as exc:
            stop_now(str(exc) if isinstance(exc, Interrupted) else "SIGINT")

    # ------------------------------------------------------------------------------------------- participant
    def participant(self):
        from . import outputs
        from .reports.boilerplate import write_boilerplate
        from .reports.participant import metrics_by_participant, write_participant_report

        config, output_dir = self.config, self.config.output_dir
        if config.boilerplate_only:
            check_writable((output_dir, "output folder"))
            written = write_boilerplate(output_dir, threshold=config.threshold, border_mm=config.border_mm,
                                        contrasts=config.contrasts)
            log.info("methods text: %s", ", ".join(map(str, written)))
            return OK
        if config.reports_only:  # from the output folder alone, of every contrast in it
            return self.reports_only()
        t1ws = select_images(config)
        self.check_memory(t1ws)
        self.work_dir_made = not config.work_dir.exists()
        check_writable((output_dir, "output folder"), (config.work_dir, "work directory"),
                       (output_dir / "logs", "output folder's logs folder"))  # an earlier run's, by another user?
        self.warn_if_made_from_a_dataset_not_here()
        outputs.init_output_dir(output_dir, config.bids_dir)
        self.write_log_and_config()
        self.remove_stale_temporaries()
        self.warn_if_work_dir_is_node_local()
        self.warn_if_address_space_is_limited()

        todo, failures = self.plan(t1ws)
        finished = len(t1ws) - len(todo) - len(failures)
        locks = outputs.locks_of(output_dir, config.work_dir)
        todo, busy = self.claim(todo, locks)
        self.remove_temporaries_of_claimed(todo, locks[0])
        _TIDY_ON_STOP.append(lambda: self.tidy_after_stop(todo, locks))
        if config.overwrite:
            global _RESUME_ADVICE
            _RESUME_ADVICE = ("rerun to resume: without --overwrite a rerun skips every image with complete outputs of "
                              "these settings (this run's and earlier ones), with it every image is redone again")
        try:
            if todo:
                failures += self.process(todo)
                # a worker killed while it wrote an image left its temporary file; no one writes them now
                self.remove_temporaries_of_claimed(todo, locks[0])
        finally:
            if not _SIGNALLED.is_set():  # a stop holds them while it stops the workers and removes their temporaries
                for lock in locks:
                    lock.release()

        failed, left_to_others = {t for t, _ in failures}, {t for t, _ in busy}
        # what is written after the images (failure records, methods text, reports) may meet a full disk too: said
        # in one line each, and the summary and every image's line still come
        with self.written_or_said("the failure records (logs/failed)"):
            for t1w, message in failures:
                outputs.record_failure(output_dir, t1w, message)
            for t1w in t1ws:
                if t1w not in failed | left_to_others:  # those are the other run's to record
                    outputs.clear_failure(output_dir, t1w)
            self.forget_failures_of_removed_images(
                {t.subject for t in t1ws} if config.participant_label else None, {t.name for t, _ in failures})
        failed |= left_to_others  # and their reports' errors and flags too
        with self.written_or_said("the methods text (logs/CITATION.md)"):
            write_boilerplate(output_dir, threshold=config.threshold, border_mm=config.border_mm,  # of what they hold
                              contrasts=config.contrasts)

        reports, errors = {}, participant_errors(output_dir, failures)
        subjects = sorted({t.subject for t in t1ws})
        metrics = metrics_by_participant(output_dir, subjects)
        for subject in subjects:
            with self.written_or_said(f"the report of sub-{subject}"):
                reports[subject] = write_participant_report(output_dir, subject, errors=errors.get(subject, []),
                                                            metrics=metrics[subject])
                log.info("report: %s", reports[subject])
        flagged = [(t, flags) for t in t1ws if t not in failed and (flags := outputs.qc_flags(output_dir, t))]
        left = f", {len(busy)} left to another run processing them" if busy else ""
        log.info("summary: %d image(s): %d processed in this run, %d already finished, %d failed%s, %d flagged by QC",
                 len(t1ws), sum(t not in failed for t in todo), finished, len(failures), left, len(flagged))
        for t1w, flags in flagged:
            log.warning("  flagged by QC: %s: %s (open %s)", t1w.relpath, "; ".join(flags),
                        reports.get(t1w.subject, "its participant report"))
        for t1w in (t for t in todo if t not in failed):  # said once, by the run that made the outputs
            for line in outputs.recorded_warnings(output_dir, t1w):
                log.warning("  warning: %s: %s", t1w.relpath, line)
        self.report_work_dir(clean=config.clean_workdir and not failures and not busy)
        if busy:
            log.error("%d of %d image(s) left to another run:", len(busy), len(t1ws))
            for _, message in busy:
                log.error("  %s", message)
        if failures:
            log.error("%d of %d image(s) failed:", len(failures), len(t1ws))
            for _, message in failures:
                log.error("  %s", message)
        if failures or busy or self.unwritten:
            return FAILED
        if flagged and config.fail_on_flag:
            log.error("%d image(s) flagged by QC (--fail-on-flag): exit status 3", len(flagged))
            return FLAGGED
        log.info("done: outputs in %s", output_dir)
        return OK

    @contextlib.contextmanager
    def written_or_said(self, what):
        """Write ``what`` in the block; an OSError (a full disk, a folder gone) is one error line, and the run goes
        on to say what became of each image (its exit status is 1 then)."""
        try:
            yield
        except OSError as exc:
            self.unwritten.append(what)
            log.error("error: could not write %s: %s", what, " ".join(str(exc).split()))

    @staticmethod
    def claim(todo, locks):
        """(the images of ``todo`` this run may write, (image, message) for those another run is writing: in the
        same output folder, or with the same work directory)."""
        claimed, busy = [], []
        for t1w in todo:
            holder = None
            for lock, shared in zip(locks, ("output folder", "work directory")):
                holder = lock.claim(t1w)
                if holder:
                    busy.append((t1w, f"{t1w.relpath}: not processed: another run with the same {shared} is "
                                      f"processing it ({holder}); rerun once it has finished"))
                    for mine in locks:
                        mine.release(t1w)
                    break
            if not holder:
                claimed.append(t1w)
        return claimed, busy

    def remove_temporaries_of_claimed(self, images, lock):
        """The temporary files an interrupted writer left of the images this run now holds the lock of: gone,
        wherever it ran (another node, an earlier container, whose host names ``remove_stale_temporaries`` cannot
        judge for 10 minutes)."""
        from .nifti import remove_temporaries_of
        from .outputs import image_files

        removed = sum(remove_temporaries_of(image_files(self.config.output_dir, t)) for t in images if t in lock.held)
        if removed:
            log.info("removed %d temporary file(s) an interrupted writer left of the images it was writing", removed)

    def say_ignored(self, who):
        """One warning naming the options given that ``who`` (the group level, --reports-only: both report every
        image the participant level made, from the output folder) does not use."""
        config = self.config
        ignored = [option for option, given in (
            ("--session-label", config.session_label), ("--contrasts", config.contrasts != ("T1w",)),
            ("--threshold", config.threshold is not None), ("--border", config.border_mm),
            ("--save-probseg", config.save_probseg), ("--bids-filter-file", config.bids_filter_file),
            ("--overwrite", config.overwrite),
            ("--reports-only", config.reports_only and config.analysis_level == "group"),
            ("--boilerplate-only", config.boilerplate_only)) if given]
        if ignored:
            log.warning("warning: %s uses only --participant-label of the selection options: %s ignored (it reports "
                        "every image the participant level made)", who, ", ".join(ignored))

    def tidy_after_stop(self, todo, locks):
        """Once a stop has stopped the workers: the temporary files they were writing removed, then the images'
        locks released (their files gone, as a run that ends leaves them)."""
        self.remove_temporaries_of_claimed(todo, locks[0])
        for lock in locks:
            lock.release()

    def reports_only(self):
        """Rewrite the reports of the participants (of ``--participant-label``, or all) with images processed or
        failed in the output folder, of every contrast, or with a report there (whose images a stopped redo
        un-marked: it showed them as processed). A label with none of these gets no report (it would only say that
        nothing was found): a warning while others have reports (a long run still going on), an error (2) when
        none has."""
        from .discovery import strip_prefix
        from .reports.participant import (metrics_by_participant, participant_report_path, reported_participants,
                                          write_participant_report)

        output_dir = self.config.output_dir
        if not output_dir.is_dir():  # not made, empty, by a run that reports on it
            raise UsageError(f"{output_dir}: output folder not found; run the participant level first")
        check_writable((output_dir, "output folder"))
        self.say_ignored("--reports-only")
        errors = participant_errors(output_dir)
        present = reported_participants(output_dir) | set(errors)
        labels = sorted({strip_prefix(p, "sub-") for p in self.config.participant_label} or present)
        if any(not label.strip() for label in labels):
            raise UsageError(f"an empty participant label was given (the output folder has "
                             f"{', '.join(sorted(present)) or 'none'})")
        written, unrun = [], []
        metrics = metrics_by_participant(output_dir, labels)
        for subject in labels:
            if subject in present or participant_report_path(output_dir, subject).is_file():
                written.append(write_participant_report(output_dir, subject, errors=errors.get(subject, []),
                                                        metrics=metrics[subject]))
                log.info("report: %s", written[-1])
            else:
                unrun.append(subject)
        if unrun:
            (log.warning if written else log.error)(
                "%s: no report for participant(s) %s: none of their images was processed into this folder (it has %s); "
                "run the participant level without --reports-only first", output_dir, " ".join(unrun),
                ", ".join(sorted(present)) or "none")
        elif not written:
            log.error("%s: no report written: no image was processed into this folder; run the participant level "
                      "without --reports-only first", output_dir)
        return OK if written else USAGE

    def forget_failures_of_removed_images(self, subjects, failed_now):
        """The failure records of images no longer in the dataset (removed, renamed), of ``subjects`` (None: of
        every participant): gone, so that their reports and the group level count the dataset as it is. Not those
        of ``failed_now``, the images this run failed (a file a stale pybids database still lists)."""
        from . import outputs

        for image, _ in outputs.recorded_failures(self.config.output_dir):
            if (subjects is None or image.subject in subjects) and image.name not in failed_now \
                    and not os.path.lexists(self.config.bids_dir / image.path):
                outputs.clear_failure(self.config.output_dir, image)
                log.info("forgot the failure of %s: it is no longer in the dataset", image.path.as_posix())

    def plan(self, t1ws):
        """(the images to process, (image, message) for those that cannot be): finished images are skipped
        unless their outputs were made with other settings (or ``--overwrite``)."""
        from . import outputs
        from .discovery import misplaced, missing_content, twin_of

        config = self.config
        # misplaced: also the one of two images of one file name in two folders that is not where its name says,
        # which shared the lock, figures and failure record of that name: "left to another run", the run itself
        # (red-team 18)
        failures = [(t, problem) for t in t1ws
                    if (problem := missing_content(t) or twin_of(t) or misplaced(t) or outputs.name_too_long(t)
                        or outputs.not_writable(config.output_dir, t))]
        absent = {t for t, _ in failures}
        done = [t for t in t1ws if t not in absent and not config.overwrite
                and outputs.is_finished(config.output_dir, t, save_probseg=config.save_probseg)]
        broken = {t: problem for t in done
                  if (problem := outputs.damaged(config.output_dir, t, save_probseg=config.save_probseg))}
        stale = {t: changed for t in done if t not in broken and (changed := outputs.changed_settings(
            config.output_dir, t, outputs.run_settings(t, threshold=config.threshold, border_mm=config.border_mm)))}
        # begun before (an output of it is there) and not finished: a run stopped half-way, an output deleted (the
        # mask too: red-team 18), or one asked for now (--save-probseg)
        begun = {t: missing for t in t1ws if t not in absent and t not in done
                 and any(outputs.derivative_path(config.output_dir, t, kind).is_file() for kind in outputs.OUTPUTS)
                 and (missing := outputs.missing_kind(config.output_dir, t, save_probseg=config.save_probseg))}
        todo = [t for t in t1ws if t not in absent and (t not in done or t in stale or t in broken)]
        finished = len(done) - len(stale) - len(broken)
        log.info("bids_skullstrip %s: %d image(s) of %d participant(s); %d already finished%s", __version__,
                 len(t1ws), len({t.subject for t in t1ws}), finished,
                 " (use --overwrite to redo them)" if finished else "")
        for t1w, problem in broken.items():
            log.info("  redoing %s: %s", t1w.relpath, problem)
        for t1w, missing in begun.items():
            log.info("  redoing %s: its %s output is missing", t1w.relpath, missing)
        for t1w, changed in stale.items():
            log.info("  redoing %s: its outputs were made with other settings (%s)", t1w.relpath,
                     ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
        # the sink removes it with the image's other outputs: a map the new mask is not made from (red-team 15)
        dropped = [t for t in todo if not config.save_probseg
                   and outputs.derivative_path(config.output_dir, t, "probseg").is_file()]
        if dropped:
            log.info("  the probability map of %d image(s) to redo (%s) goes once each is redone: not asked for "
                     "(--save-probseg), it would disagree with the new mask", len(dropped),
                     ", ".join(t.relpath for t in dropped[:3]) + (", ..." if len(dropped) > 3 else ""))
        return todo, failures

    def omp_nthreads(self, n_images, workers):
        """Threads per image: ``--omp-nthreads``, else all CPUs for an image that runs alone, else 1."""
        alone = n_images == 1 or workers == 1
        omp = self.config.omp_nthreads or (self.config.n_cpus if alone else 1)
        return min(omp, self.config.n_cpus) if self.plugin == "MultiProc" else omp

    def check_memory(self, images):
        """One line (2) before anything is made where an image still to do needs more memory than the run may use
        (``plugin_args_for`` says it again for the images the plan keeps)."""
        from . import execution, outputs

        config = self.config
        unfinished = [t for t in images if not outputs.name_too_long(t) and (  # that one fails alone, in the plan
            config.overwrite or not outputs.is_finished(config.output_dir, t, save_probseg=config.save_probseg))]
        if self.plugin == "MultiProc" and unfinished:
            execution.workers_within_memory(unfinished, self.plugin_args,
                                            work_in_memory=execution.in_memory(config.work_dir))

    def plugin_args_for(self, todo):
        """The plugin's arguments for ``todo``: MultiProc runs as many images at once as its memory allows."""
        from . import execution

        if self.plugin != "MultiProc":
            return self.plugin_args
        in_memory = execution.in_memory(self.config.work_dir)
        workers, need = execution.workers_within_memory(todo, self.plugin_args, work_in_memory=in_memory)
        if in_memory:
            log.info("the work directory %s is in memory (tmpfs): an image's intermediate files count against the "
                     "run's memory and are removed once it is finished (-w on disk keeps them)", self.config.work_dir)
        if workers < self.plugin_args["n_procs"]:
            log.info("memory: %d image(s) at a time (an image needs up to %.2f GB, the run may use %.2f GB)",
                     workers, need, self.plugin_args["memory_gb"])
        return {**self.plugin_args, "n_procs": workers, "prune_finished_images": in_memory}

    def process(self, todo):
        """Build and run the graph for ``todo``; returns (T1w, one-line message) for each image that failed."""
        from . import execution, outputs
        from .multiproc import UNRECORDED
        from .workflows.base import init_bids_skullstrip_wf

        config = self.config
        execution.configure_nipype(config.work_dir, verbose=config.verbose,
                                   stop_on_first_crash=config.stop_on_first_crash)
        plugin_args = self.plugin_args_for(todo)
        omp_nthreads = self.omp_nthreads(len(todo), plugin_args.get("n_procs"))
        wf = init_bids_skullstrip_wf(inputs=todo, output_dir=config.output_dir, bids_dir=config.bids_dir,
                                     work_dir=config.work_dir, threshold=config.threshold,
                                     border_mm=config.border_mm, save_probseg=config.save_probseg,
                                     omp_nthreads=omp_nthreads, run_id=self.run_id)
        # an image redone keeps its earlier outputs, and is finished, until its sink begins (which un-marks it) or
        # the run ends without redoing it: a run stopped early left every image of an --overwrite or a change of
        # settings to redo (red-team 10b)
        log.info("running %d image(s) with nipype's %s plugin, %d thread(s) per image (work directory %s)", len(todo),
                 self.plugin, omp_nthreads, config.work_dir)
        started = time.time()
        UNRECORDED.clear()
        stop = threading.Event()
        progress = threading.Thread(target=self.report_progress, args=(stop, todo, started), daemon=True)
        progress.start()
        stopped_by = None
        try:
            wf.run(plugin=execution.plugin(self.plugin, plugin_args), plugin_args=plugin_args)
        except BrokenProcessPool as exc:  # MultiProc's pool lost beyond repair: the images not done fail saying so,
            # not "without a crash file" (red-team 15)
            stopped_by = f"a broken process pool ({' '.join(str(exc).split())[:200] or 'no message'})"
            log.error("the workflow stopped: %s", stopped_by)
        except RuntimeError as exc:  # nipype re-raises the first failed node's error: its crash file says why
            log.debug("nipype: %s", exc)
        except OSError as exc:  # nipype's own files (a full or vanished work directory): the images not done fail
            stopped_by = " ".join(str(exc).split())
            log.error("the workflow stopped: %s (work directory %s)", stopped_by, config.work_dir)
        finally:
            stop.set()
            progress.join()
        log.info("workflow finished in %.0f s", time.time() - started)
        failed = [t for t in todo if not self.finished_here(t)]
        for t1w in failed:  # earlier outputs of an image this run failed to redo are not finished: a rerun redoes it
            outputs.unmark_finished(config.output_dir, t1w)
        stopped_early = config.stop_on_first_crash and bool(failed)
        return [(t, execution.failure_of(t, config.work_dir, since=started - 1, stopped_early=stopped_early,
                                         stopped_by=stopped_by)) for t in failed]

    def finished_here(self, image):
        """Whether this run finished ``image``: its outputs complete, their metrics JSON written by this run."""
        from . import outputs

        return (outputs.is_finished(self.config.output_dir, image, save_probseg=self.config.save_probseg)
                and outputs.read_metrics(self.config.output_dir, image).get("run_id") == self.run_id)

    def report_progress(self, stop, todo, started, every_s=2.0):
        """One console line each time more images are finished: done of total, elapsed time."""
        shown, stopped = 0, False
        while not stopped:
            stopped = stop.wait(every_s)
            done = sum(self.finished_here(t) for t in todo)
            if done > shown:
                shown = done
                log.info("progress: %d of %d image(s) finished, %s elapsed", done, len(todo),
                         time.strftime("%H:%M:%S", time.gmtime(time.time() - started)))

    # ------------------------------------------------------------------------------------------- logs, work dir
    def write_log_and_config(self):
        """``<out>/logs/run-<id>.log`` (what the console shows) and ``run-<id>_config.json`` (the configuration
        as resolved: every default filled in, the plugin and its arguments)."""
        logs = self.config.output_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        from .model.card import ModelCard
        from .nifti import atomic_write_text

        resolved = {key: (str(value) if isinstance(value, Path) else value)
                    for key, value in asdict(self.config).items()}
        # the networks of each contrast asked for, and (without --threshold) their calibrated thresholds
        cards = {contrast: ModelCard.bundled_for(contrast) for contrast in self.config.contrasts}
        # per contrast either way, so that a run with --threshold and one without read alike
        resolved["threshold"] = {contrast: card.threshold if self.config.threshold is None else self.config.threshold
                                 for contrast, card in cards.items()}
        resolved.update(version=__version__, run_id=self.run_id, command=sys.argv, plugin=self.plugin,
                        plugin_args=self.plugin_args, model_sha256={c: card.sha256 for c, card in cards.items()})
        atomic_write_text(logs / f"run-{self.run_id}_config.json", json.dumps(resolved, indent=2, default=str) + "\n")
        handler = logging.FileHandler(logs / f"run-{self.run_id}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)

    def warn_if_made_from_a_dataset_not_here(self):
        """The outputs there were made from a raw dataset this machine does not have (a container's /bids, or one
        moved since): the same dataset or another, which ``config.check_folders`` refuses where it is here."""
        from .config import linked_raw_dataset

        raw = linked_raw_dataset(self.config.output_dir)
        if raw is not None and not raw.exists():
            log.warning("warning: %s: its outputs are of %s (DatasetLinks.raw of its dataset_description.json), "
                        "which is not on this machine (a container's /bids, or a dataset moved since?); if %s is "
                        "another dataset, use an output folder of its own", self.config.output_dir, raw,
                        self.config.bids_dir)

    def remove_stale_temporaries(self):
        from .nifti import remove_stale_temporaries

        removed = remove_stale_temporaries(self.config.output_dir)
        if removed:
            log.info("removed %d temporary file(s) an interrupted run left in %s", removed, self.config.output_dir)

    @staticmethod
    def warn_if_address_space_is_limited():
        from .execution import ADDRESS_SPACE_ADVICE, ADDRESS_SPACE_NEED_GB, address_space_limit_gb

        limit = address_space_limit_gb()
        if limit is not None and limit < ADDRESS_SPACE_NEED_GB:
            log.warning("warning: the address space of each process is limited to %.1f GB (`ulimit -v`): images may "
                        "fail for want of memory; %s", limit, ADDRESS_SPACE_ADVICE)

    def warn_if_work_dir_is_node_local(self):
        job = next((v for v in SCHEDULER_JOB_VARIABLES if os.environ.get(v)), None)
        if job and node_local(self.config.work_dir):
            log.warning("warning: the work directory %s is on this node's own disk (%s is set): a job on another "
                        "node starts the images that were half-way again; put -w on shared scratch to resume "
                        "them there", self.config.work_dir, job)

    def report_work_dir(self, *, clean):
        """Say where the work directory is and how large; with ``--clean-workdir`` (and no failure) remove what
        this app put there."""
        work = self.config.work_dir
        if not work.is_dir():
            return
        if self.work_dir_made and not any(work.iterdir()):  # made for a run with nothing to do: not left behind
            work.rmdir()
            return
        if clean:
            from .outputs import ImageLocks

            others = ImageLocks(work / ".locks").others()
            if others:  # its nodes' folders are in use (red-team 10b: a job of the same array lost its results)
                log.info("work directory %s kept (--clean-workdir): another run is using it (%s)", work, others[0])
                return
            for name in ("bids_skullstrip_wf", "crashes", ".nipype", "nipype.log"):
                path = work / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            if not any(work.iterdir()):
                work.rmdir()
                log.info("work directory %s removed (--clean-workdir)", work)
            else:
                log.info("work directory %s: what this app put there was removed (--clean-workdir); the folder is "
                         "kept, it holds other files", work)
            return
        from .execution import in_memory

        if in_memory(work):
            log.info("work directory: %s (%.0f MB, in memory: lost when this machine or container stops; -w on disk "
                     "lets a rerun resume the images that were half-way)", work, folder_size(work) / 1e6)
            return
        log.info("work directory: %s (%.0f MB; it lets a rerun resume: remove it when the outputs are complete, "
                 "or pass --clean-workdir)", work, folder_size(work) / 1e6)

    # ------------------------------------------------------------------------------------------- group
    def group(self):
        from .reports.group import write_group_report

        if not self.config.output_dir.is_dir():
            raise UsageError(f"{self.config.output_dir}: output folder not found; run the participant level first")
        check_writable((self.config.output_dir, "output folder"))  # the group tables and reports go there
        self.remove_stale_temporaries()
        self.say_ignored("the group level")
        images = self.dataset_images()
        try:
            paths = write_group_report(self.config.output_dir, participants=self.config.participant_label,
                                       dataset=images)
        except OSError as exc:  # a full disk, a quota: one line (was: "error: OSError: ..." naming no file)
            log.error("error: the group report could not be written in %s: %s", self.config.output_dir,
                      " ".join(str(exc).split()))
            return FAILED
        log.info("group report: %s", ", ".join(str(p) for p in paths))
        from .outputs import LOCKS_DIR, ImageLocks

        busy = ImageLocks(self.config.output_dir / LOCKS_DIR).others()
        if busy:  # the participant level is still running: its images are "not processed (yet)" (red-team 15)
            log.warning("warning: another run is at work in %s (%s): the group report shows the images it has not "
                        "finished as they were before it; run the group level again once it ends",
                        self.config.output_dir, ", ".join(sorted(set(busy))))
        if self.config.fail_on_flag:  # was accepted here and ignored: exit 0 over a flagged image
            from .reports.group import flagged_images

            flagged = flagged_images(self.config.output_dir, self.config.participant_label)
            for name, flags in flagged:
                log.warning("  flagged by QC: %s: %s", name, "; ".join(flags))
            if flagged:
                log.error("%d image(s) flagged by QC in the group report (--fail-on-flag): exit status 3",
                          len(flagged))
                return FLAGGED
        return OK

    def dataset_images(self):
        """The images of every contrast and participant in the dataset (a label it no longer has is one whose
        images are all gone), or None where it cannot be read (the report stands on the outputs alone)."""
        from .discovery import CONTRASTS, collect_images

        level = log.level
        log.setLevel(logging.ERROR)  # what discovery says of the dataset is the participant level's to say
        try:
            return collect_images(self.config.bids_dir, contrasts=CONTRASTS)
        except Exception:  # noqa: BLE001
            return None
        finally:
            log.setLevel(level)
