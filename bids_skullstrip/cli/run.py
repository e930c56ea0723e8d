"""``bids_skullstrip``: the BIDS App. ``participant`` skull-strips T1w images, ``group`` writes the group report.

The command line (``cli.parser``) becomes one ``config.RunConfig``; the participant level builds the nipype
graph (``workflows.base``) for the images that are not finished and runs it (``execution``).
"""

import logging
import os
import signal
import sys
import threading
import time

from .. import __version__
from ..config import RunConfig, UsageError, check_writable
from .parser import build_parser

log = logging.getLogger("bids_skullstrip")


def select_images(config):
    """The images of the selection, after the BIDS validator has judged the files the run reads."""
    from ..discovery import DiscoveryError, collect_images, load_bids_filters, validate_dataset

    filters = load_bids_filters(config.bids_filter_file) if config.bids_filter_file else None
    t1ws = collect_images(config.bids_dir, contrasts=config.contrasts,
                          participant_labels=config.participant_label or None,
                          session_labels=config.session_label or None, bids_filters=filters,
                          database_dir=config.bids_database_dir)
    if not config.skip_bids_validation:
        errors, ignored = validate_dataset(config.bids_dir, reads=[t.relpath for t in t1ws])
        if ignored:
            log.info("BIDS validator: %d error(s) in files this run does not read were ignored", ignored)
        if errors:
            raise DiscoveryError(f"{config.bids_dir}: the BIDS validator found {len(errors)} error(s) in what this "
                                 f"run reads, first: {errors[0]} (fix them or pass --skip-bids-validation)")
    return t1ws


def run_participant(config):
    from .. import outputs
    from ..reports.boilerplate import write_boilerplate
    from ..reports.participant import write_participant_report

    output_dir = config.output_dir
    if config.boilerplate_only:
        check_writable(output_dir, "output folder")
        written = write_boilerplate(output_dir, threshold=config.threshold, border_mm=config.border_mm)
        log.info("methods text: %s", ", ".join(map(str, written)))
        return 0
    t1ws = select_images(config)
    if config.reports_only:
        for subject in sorted({t.subject for t in t1ws}):
            log.info("report: %s", write_participant_report(output_dir, subject))
        return 0
    check_writable(output_dir, "output folder")
    check_writable(config.work_dir, "work directory")
    outputs.init_output_dir(output_dir, config.bids_dir)

    todo, failures = plan(config, t1ws)
    finished = len(t1ws) - len(todo) - len(failures)
    if todo:
        failures += run_workflow(config, todo)

    failed = {t for t, _ in failures}
    for t1w, message in failures:
        outputs.record_failure(output_dir, t1w, message)
    for t1w in t1ws:
        if t1w not in failed:
            outputs.clear_failure(output_dir, t1w)
    write_boilerplate(output_dir, threshold=config.threshold, border_mm=config.border_mm)  # of what they hold

    reports = {}
    for subject in sorted({t.subject for t in t1ws}):
        errors = [f for t, f in failures if t.subject == subject]
        reports[subject] = write_participant_report(output_dir, subject, errors=errors)
        log.info("report: %s", reports[subject])
    flagged = [(t, flags) for t in t1ws if t not in failed and (flags := outputs.qc_flags(output_dir, t))]
    log.info("summary: %d image(s): %d processed in this run, %d already finished, %d failed, %d flagged by QC",
             len(t1ws), sum(t not in failed for t in todo), finished, len(failures), len(flagged))
    for t1w, flags in flagged:
        log.warning("  flagged by QC: %s: %s (open %s)", t1w.relpath, "; ".join(flags), reports[t1w.subject])
    if failures:
        log.error("%d of %d image(s) failed:", len(failures), len(t1ws))
        for _, message in failures:
            log.error("  %s", message)
        return 1
    if flagged and config.fail_on_flag:
        log.error("%d image(s) flagged by QC (--fail-on-flag): exit status 3", len(flagged))
        return 3
    log.info("done: outputs in %s", output_dir)
    return 0


def plan(config, t1ws):
    """(the images to process, (image, message) for those that cannot be): finished images are skipped unless
    their outputs were made with other settings (or ``--overwrite``)."""
    from .. import outputs
    from ..discovery import missing_content

    failures = [(t, problem) for t in t1ws if (problem := missing_content(t))]
    absent = {t for t, _ in failures}
    settings = outputs.run_settings(threshold=config.threshold, border_mm=config.border_mm)
    done = [t for t in t1ws if t not in absent and not config.overwrite
            and outputs.is_finished(config.output_dir, t, save_probseg=config.save_probseg)]
    stale = {t: changed for t in done if (changed := outputs.changed_settings(config.output_dir, t, settings))}
    todo = [t for t in t1ws if t not in absent and (t not in done or t in stale)]
    finished = len(done) - len(stale)
    log.info("bids_skullstrip %s: %d image(s) of %d participant(s); %d already finished%s", __version__,
             len(t1ws), len({t.subject for t in t1ws}), finished, " (use --overwrite to redo them)" if finished else "")
    for t1w, changed in stale.items():
        log.info("  redoing %s: its outputs were made with other settings (%s)", t1w.relpath,
                 ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
    return todo, failures


def run_workflow(config, todo):
    """Build and run the graph for ``todo``; returns (T1w, one-line message) for each image that failed."""
    from .. import execution, outputs
    from ..workflows.base import init_bids_skullstrip_wf

    execution.configure_nipype(config.work_dir, verbose=config.verbose,
                               stop_on_first_crash=config.stop_on_first_crash)
    plugin, plugin_args = execution.plugin_settings(config)
    omp = config.omp_nthreads or (config.n_cpus if len(todo) == 1 else 1)
    if plugin == "MultiProc":
        omp = min(omp, plugin_args["n_procs"])
    execution.check_memory(todo, plugin, plugin_args)
    wf = init_bids_skullstrip_wf(inputs=todo, output_dir=config.output_dir, bids_dir=config.bids_dir,
                                 work_dir=config.work_dir, threshold=config.threshold, border_mm=config.border_mm,
                                 save_probseg=config.save_probseg, omp_nthreads=omp)
    log.info("running %d image(s) with nipype's %s plugin (work directory %s)", len(todo), plugin, config.work_dir)
    started = time.time()
    stop = threading.Event()
    progress = threading.Thread(target=_report_progress, args=(stop, config, todo, started), daemon=True)
    progress.start()
    try:
        wf.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as exc:
        log.debug("nipype: %s", exc)
    finally:
        stop.set()
        progress.join()
    log.info("workflow finished in %.0f s", time.time() - started)
    failed = [t for t in todo if not outputs.is_finished(config.output_dir, t, save_probseg=config.save_probseg)]
    return [(t, execution.failure_of(t, config.work_dir, since=started - 1)) for t in failed]


def _report_progress(stop, config, todo, started, every_s=5.0):
    """One console line each time more images are finished: done of total, elapsed time."""
    from .. import outputs

    shown, stopped = 0, False
    while not stopped:
        stopped = stop.wait(every_s)
        done = sum(outputs.is_finished(config.output_dir, t, save_probseg=config.save_probseg) for t in todo)
        if done > shown:
            shown = done
            log.info("progress: %d of %d image(s) finished, %s elapsed", done, len(todo),
                     time.strftime("%H:%M:%S", time.gmtime(time.time() - started)))


def run_group(config):
    from ..reports.group import write_group_report

    if not config.output_dir.is_dir():
        raise UsageError(f"{config.output_dir}: output folder not found; run the participant level first")
    paths = write_group_report(config.output_dir)
    log.info("group report: %s", ", ".join(str(p) for p in paths))
    return 0


class Interrupted(BaseException):
    """SIGTERM (what SLURM sends at a job's time limit or on preemption), raised in the main thread.

    A BaseException, so that no ``except Exception`` of nipype's or ours swallows it on its way out."""


def _interrupt_in(main_pid):
    def interrupt(signum, frame):
        if os.getpid() != main_pid:  # a nipype worker forked from the main process: stop, quietly
            os._exit(128 + signum)
        raise Interrupted(signal.Signals(signum).name)
    return interrupt


def main(argv=None):
    opts = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt_in(os.getpid()))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    log.setLevel(logging.DEBUG if opts.verbose else logging.INFO)
    logging.getLogger("bidsschematools").setLevel(logging.WARNING)  # "No schema path specified..."
    from ..discovery import DiscoveryError
    from ..nifti import InputError
    from ..reports.common import ReportError

    try:
        config = RunConfig.from_args(opts)
        return run_participant(config) if config.analysis_level == "participant" else run_group(config)
    except (UsageError, DiscoveryError, InputError, ReportError) as exc:
        print(f"bids_skullstrip: error: {exc}", file=sys.stderr)
        # 1 means that images failed; a run that could not start processed none
        return 1 if isinstance(exc, ReportError) else 2
    except (KeyboardInterrupt, Interrupted) as exc:
        what = str(exc) if isinstance(exc, Interrupted) else "SIGINT"
        print(f"bids_skullstrip: interrupted ({what}): the images finished so far are kept and no output was left "
              "half-written; rerun the same command to resume", file=sys.stderr)
        sys.stderr.flush()
        # Leave at once: a clean interpreter exit would wait for nipype's worker processes, which the same
        # signal is stopping (SLURM signals every process of the job) or which end when their parent is gone.
        os._exit(130 if what == "SIGINT" else 143)
    except Exception as exc:  # noqa: BLE001 - one line for users, the traceback with -v
        if opts.verbose:
            raise
        print(f"bids_skullstrip: error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
              "(rerun with -v for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
