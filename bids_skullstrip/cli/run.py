"""``bids_skullstrip``: the BIDS App. ``participant`` skull-strips T1w images, ``group`` writes the group report."""

import argparse
import getpass
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from .. import __version__

log = logging.getLogger("bids_skullstrip")


class UsageError(ValueError):
    """A problem with the command line or the folders it names (one line, for the user)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show and the help text does not already say it."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(prog="bids_skullstrip", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("bids_dir", type=Path, help="the input BIDS dataset")
    p.add_argument("output_dir", type=Path, help="where the BIDS-Derivatives go")
    p.add_argument("analysis_level", choices=["participant", "group"])
    p.add_argument("--version", action="version", version=f"bids_skullstrip {__version__}")
    g = p.add_argument_group("selecting images")
    g.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                   help="participants to process (with or without sub-); default: all")
    g.add_argument("--session-label", "--session_label", nargs="+", metavar="LABEL",
                   help="sessions (with or without ses-); default: all")
    g.add_argument("--bids-filter-file", type=Path, metavar="FILE",
                   help='JSON with pybids filters for the T1w query, e.g. {"t1w": {"acquisition": "mprage"}}')
    g.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                   help="do not run the BIDS validator on the input dataset")
    g.add_argument("--bids-database-dir", type=Path, metavar="DIR",
                   help="pybids database of the input, built on the first run and reused (large datasets)")
    g = p.add_argument_group("model")
    g.add_argument("--threshold", type=float, default=None,
                   help="brain probability threshold (0-1); default: the one calibrated for the bundled model")
    g.add_argument("--border", type=float, default=0.0, metavar="MM",
                   help="grow (>0) or shrink (<0) the mask by this distance in mm")
    g.add_argument("--save-probseg", action="store_true", help="also write the brain probability map")
    g.add_argument("--fail-on-flag", action="store_true",
                   help="exit with status 3 when QC flags an image (and none failed); by default flagged "
                        "images are listed and the status is 0")
    g = p.add_argument_group("execution")
    g.add_argument("--n-cpus", "--nprocs", "--n_cpus", "--nthreads", dest="n_cpus", type=int,
                   default=os.cpu_count() or 1, help="CPUs the run may use (MultiProc)")
    g.add_argument("--omp-nthreads", "--omp_nthreads", dest="omp_nthreads", type=int, default=None,
                   help="threads per image for the network and N4 (default: 1, or --n-cpus when there is one image)")
    g.add_argument("--mem-gb", "--mem_gb", dest="mem_gb", type=float, default=None,
                   help="memory the run may use (MultiProc), GB; default: what the machine has")
    g.add_argument("--mem", "--mem-mb", "--mem_mb", dest="mem_mb", type=float, default=None, metavar="MB",
                   help="the same in MB, as fMRIPrep spells it")
    g.add_argument("--stop-on-first-crash", action="store_true",
                   help="stop at the first image that fails instead of finishing the others")
    g.add_argument("--boilerplate-only", action="store_true",
                   help="write the methods text (logs/CITATION.md, .html) and exit")
    g.add_argument("--reports-only", action="store_true",
                   help="rewrite the participant reports from the outputs already there and exit")
    g.add_argument("-w", "--work-dir", type=Path, default=None,
                   help="nipype work directory, reused to resume (default: a folder in the temp dir)")
    g.add_argument("--overwrite", action="store_true", help="redo images whose outputs already exist")
    g.add_argument("--plugin", default="MultiProc",
                   help="nipype execution plugin: MultiProc, Linear, SLURM, SLURMGraph, SGE, ...")
    g.add_argument("--plugin-args", type=json.loads, default=None, metavar="JSON",
                   help='plugin arguments as JSON, e.g. \'{"sbatch_args": "-p short -t 30"}\'')
    g.add_argument("--nipype-plugin-file", "--use-plugin", dest="plugin_file", type=Path, metavar="FILE",
                   help="YAML/JSON file with `plugin:` and `plugin_args:` (as in fMRIPrep)")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: nipype's too)")
    return p


# ------------------------------------------------------------------------------------------------ checks
def _is_within(path, folder):
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def check_folders(bids_dir, output_dir):
    bids_dir, output_dir = bids_dir.resolve(), output_dir.resolve()
    if not bids_dir.is_dir():
        raise UsageError(f"{bids_dir}: BIDS dataset folder not found")
    if output_dir == bids_dir:
        raise UsageError(f"{output_dir}: the output folder must not be the input dataset itself")
    if _is_within(output_dir, bids_dir) and not _is_within(output_dir, bids_dir / "derivatives"):
        raise UsageError(f"{output_dir}: the output folder is inside the input dataset; use a folder outside "
                         f"it or under {bids_dir / 'derivatives'}")
    if _is_within(bids_dir, output_dir):
        raise UsageError(f"{output_dir}: the output folder contains the input dataset")
    return bids_dir, output_dir


def check_writable(folder, what):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-write-check-"):
            pass
    except OSError as exc:
        raise UsageError(f"{folder}: the {what} is not writable ({exc.strerror or exc})") from None


def _plugin_settings(opts):
    if opts.plugin_file:
        try:
            text = opts.plugin_file.read_text()
            try:
                settings = json.loads(text)
            except ValueError:
                import yaml

                settings = yaml.safe_load(text)
        except Exception as exc:
            raise UsageError(f"{opts.plugin_file}: cannot read the plugin file ({' '.join(str(exc).split())})") from None
        if not isinstance(settings, dict) or "plugin" not in settings:
            raise UsageError(f"{opts.plugin_file}: a plugin file needs a `plugin:` key (and optional `plugin_args:`)")
        plugin, args = settings["plugin"], dict(settings.get("plugin_args") or {})
    else:
        plugin, args = opts.plugin, dict(opts.plugin_args or {})
    if plugin == "MultiProc":
        args.setdefault("n_procs", opts.n_cpus)
        mem_gb = opts.mem_gb or (opts.mem_mb / 1024.0 if opts.mem_mb else None)
        # nipype's own default is 90 % of the machine's memory, which in a container started with
        # `--memory 3g` (or a SLURM job's cgroup) is far more than the process may use: an OOM kill.
        args.setdefault("memory_gb", mem_gb or 0.9 * available_memory_gb())
        args.setdefault("raise_insufficient", False)
    if plugin in ("SLURM", "SLURMGraph", "SGE", "SGEGraph", "PBS", "LSF"):
        # nipype's SLURM plugin reads LOGNAME, which containers and CI shells often do not set.
        os.environ.setdefault("LOGNAME", _login_name())
    return plugin, args


def cgroup_memory_limit_gb(root=Path("/sys/fs/cgroup")):
    """The memory limit of this process's cgroup (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``), GB;
    None where there is none."""
    for name in ("memory.max", "memory/memory.limit_in_bytes"):
        try:
            text = (Path(root) / name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # v1 writes a huge number for "no limit", v2 "max"
            return int(text) / 2**30
    return None


def available_memory_gb():
    import psutil

    total = psutil.virtual_memory().total / 2**30
    limit = cgroup_memory_limit_gb()
    return min(total, limit) if limit else total


def check_memory(todo, plugin, plugin_args):
    """One clear line before anything runs when an image needs more memory than the run may use (MultiProc
    would start it anyway, alone, and the kernel would kill it without a word)."""
    if plugin != "MultiProc":
        return
    from ..workflows.base import image_memory_gb

    limit = float(plugin_args["memory_gb"])
    need, t1w = max(((image_memory_gb(t), t) for t in todo), key=lambda pair: pair[0])
    if need > limit:
        raise UsageError(f"{t1w.relpath}: needs about {need:.1f} GB of memory and the run may use {limit:.1f} GB "
                         "(--mem-gb, --mem or the container's memory limit); give the run more memory")


def _login_name():
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid without a passwd entry, as with `docker run --user 1000`
        return f"uid{os.getuid()}"


# ------------------------------------------------------------------------------------------------ logging
def _setup_logging(verbose, log_file):
    """nipype's messages go to ``log_file``; on the console only with -vv."""
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils", "nipype.filemanip"):
        nlog = logging.getLogger(name)
        nlog.setLevel(logging.INFO)
        nlog.handlers = [handler]
        nlog.propagate = verbose >= 2


def _configure_nipype(work_dir, verbose, stop_on_first_crash=False):
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    os.environ.setdefault("NIPYPE_CONFIG_DIR", str(work_dir / ".nipype"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from nipype import config, logging as nlogging

    config.update_config({
        "execution": {
            "crashdump_dir": str(work_dir / "crashes"),
            "crashfile_format": "txt",
            "stop_on_first_crash": str(bool(stop_on_first_crash)).lower(),
            "remove_unnecessary_outputs": "true",
            "check_version": "false",
            "create_report": "false",
        },
        "logging": {"log_to_file": "false"},
        "monitoring": {"enabled": "false"},
    })
    nlogging.update_logging(config)
    _setup_logging(verbose, work_dir / "nipype.log")


# ------------------------------------------------------------------------------------------------ levels
def default_work_dir(output_dir):
    digest = hashlib.sha1(str(output_dir).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"bids_skullstrip_work_{digest}"


def _crash_messages(crash_dir, since):
    """{node full name: last line of its traceback} for crash files written since ``since``."""
    found = {}
    if not crash_dir.is_dir():
        return found
    for crash in sorted(crash_dir.glob("crash-*.txt")):
        if crash.stat().st_mtime < since:
            continue
        text = crash.read_text(errors="replace")
        node = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Node:")), "")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        tb = [line for line in lines if not line.startswith(("Node", "Working directory", "Node inputs"))]
        message = tb[-1] if tb else "unknown error"
        for marker in ("InputError: ", "Error: ", "Exception: "):
            if marker in message:
                message = message.split(marker, 1)[1]
                break
        found[node] = message
    return found


def _failure_for(t1w, crashes, node_name):
    key = f"{node_name(t1w.stem)}_wf."
    for node, message in crashes.items():
        if key in node:
            return f"{t1w.relpath}: {message}" if str(t1w.path) not in message else message
    return f"{t1w.relpath}: processing failed (see the crash files in the work directory)"


def run_participant(opts):
    from ..discovery import DiscoveryError, collect_t1w, load_bids_filters, missing_content, validate_dataset
    from .. import outputs

    from ..model.inference import default_threshold

    bids_dir, output_dir = check_folders(opts.bids_dir, opts.output_dir)
    if opts.threshold is None:
        opts.threshold = default_threshold()
    if not 0.0 < opts.threshold < 1.0:
        raise UsageError(f"--threshold {opts.threshold}: must be between 0 and 1")
    if opts.n_cpus < 1:
        raise UsageError(f"--n-cpus {opts.n_cpus}: must be at least 1")
    if opts.boilerplate_only:
        from ..reports.boilerplate import write_boilerplate

        check_writable(output_dir, "output folder")
        log.info("methods text: %s", ", ".join(map(str, write_boilerplate(output_dir, threshold=opts.threshold,
                                                                             border_mm=opts.border))))
        return 0
    filters = load_bids_filters(opts.bids_filter_file) if opts.bids_filter_file else None
    t1ws = collect_t1w(bids_dir, participant_labels=opts.participant_label, session_labels=opts.session_label,
                       bids_filters=filters, database_dir=opts.bids_database_dir)
    if not opts.skip_bids_validation:
        errors, ignored = validate_dataset(bids_dir, reads=[t.relpath for t in t1ws])
        if ignored:
            log.info("BIDS validator: %d error(s) in files this run does not read were ignored", ignored)
        if errors:
            raise DiscoveryError(f"{bids_dir}: the BIDS validator found {len(errors)} error(s) in what this run "
                                 f"reads, first: {errors[0]} (fix them or pass --skip-bids-validation)")
    if opts.reports_only:
        from ..reports.participant import write_participant_report

        for subject in sorted({t.subject for t in t1ws}):
            log.info("report: %s", write_participant_report(output_dir, subject))
        return 0
    check_writable(output_dir, "output folder")
    work_dir = (opts.work_dir or default_work_dir(output_dir)).resolve()
    check_writable(work_dir, "work directory")
    outputs.init_output_dir(output_dir, bids_dir)
    from ..reports.boilerplate import write_boilerplate

    write_boilerplate(output_dir, threshold=opts.threshold, border_mm=opts.border)

    failures = [(t, problem) for t in t1ws if (problem := missing_content(t))]
    absent = {t for t, _ in failures}
    settings = outputs.run_settings(threshold=opts.threshold, border_mm=opts.border)
    done = [t for t in t1ws if t not in absent and not opts.overwrite
            and outputs.is_finished(output_dir, t, save_probseg=opts.save_probseg)]
    stale = {t: outputs.changed_settings(output_dir, t, settings) for t in done}
    stale = {t: changed for t, changed in stale.items() if changed}
    todo = [t for t in t1ws if t not in absent and (t not in done or t in stale)]
    subjects = sorted({t.subject for t in t1ws})
    finished = len(t1ws) - len(todo) - len(absent)
    log.info("bids_skullstrip %s: %d T1w image(s) of %d participant(s); %d already finished%s",
             __version__, len(t1ws), len(subjects), finished, " (use --overwrite to redo them)" if finished else "")
    for t1w, changed in stale.items():
        log.info("  redoing %s: its outputs were made with other settings (%s)", t1w.relpath,
                 ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
    if todo:
        failures += _run_workflow(opts, todo, output_dir, work_dir)

    failed = {t for t, _ in failures}
    for t1w, message in failures:
        outputs.record_failure(output_dir, t1w, message)
    for t1w in t1ws:
        if t1w not in failed:
            outputs.clear_failure(output_dir, t1w)

    from ..reports.participant import write_participant_report

    reports = {}
    for subject in subjects:
        errors = [f for t, f in failures if t.subject == subject]
        reports[subject] = write_participant_report(output_dir, subject, errors=errors)
        log.info("report: %s", reports[subject])
    flagged = _flagged(output_dir, [t for t in t1ws if t not in failed])
    log.info("summary: %d image(s): %d processed in this run, %d already finished, %d failed, %d flagged by QC",
             len(t1ws), sum(t not in failed for t in todo), finished, len(failures), len(flagged))
    for t1w, flags in flagged:
        log.warning("  flagged by QC: %s: %s (open %s)", t1w.relpath, "; ".join(flags), reports[t1w.subject])
    if failures:
        log.error("%d of %d image(s) failed:", len(failures), len(t1ws))
        for _, message in failures:
            log.error("  %s", message)
        return 1
    if flagged and opts.fail_on_flag:
        log.error("%d image(s) flagged by QC (--fail-on-flag): exit status 3", len(flagged))
        return 3
    log.info("done: outputs in %s", output_dir)
    return 0


def _flagged(output_dir, t1ws):
    """(T1w, its QC flags) for the finished images that QC flagged, from their metrics JSON."""
    from .. import outputs

    found = [(t1w, outputs.read_metrics(output_dir, t1w).get("flags")) for t1w in t1ws]
    return [(t1w, [str(f) for f in flags]) for t1w, flags in found if isinstance(flags, list) and flags]


def _run_workflow(opts, todo, output_dir, work_dir):
    _configure_nipype(work_dir, opts.verbose, opts.stop_on_first_crash)
    plugin, plugin_args = _plugin_settings(opts)
    from .. import outputs
    from ..workflows.base import init_bids_skullstrip_wf, node_name

    n_images = len(todo)
    omp = opts.omp_nthreads or (opts.n_cpus if n_images == 1 else 1)
    if plugin == "MultiProc":
        omp = min(omp, plugin_args["n_procs"])
    check_memory(todo, plugin, plugin_args)
    wf = init_bids_skullstrip_wf(t1w_inputs=todo, output_dir=output_dir, work_dir=work_dir,
                                 threshold=opts.threshold, border_mm=opts.border,
                                 save_probseg=opts.save_probseg, omp_nthreads=omp)
    log.info("running %d image(s) with nipype's %s plugin (work directory %s)", n_images, plugin, work_dir)
    started = time.time()
    stop = threading.Event()
    progress = threading.Thread(target=_report_progress, args=(stop, output_dir, todo, opts.save_probseg, started),
                                daemon=True)
    progress.start()
    try:
        wf.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as exc:
        log.debug("nipype: %s", exc)
    finally:
        stop.set()
        progress.join()
    log.info("workflow finished in %.0f s", time.time() - started)
    failed = [t for t in todo if not outputs.is_finished(output_dir, t, save_probseg=opts.save_probseg)]
    crashes = _crash_messages(work_dir / "crashes", started - 1)
    return [(t, _failure_for(t, crashes, node_name)) for t in failed]


def _report_progress(stop, output_dir, todo, save_probseg, started, every_s=5.0):
    """One console line each time more images are finished: done of total, elapsed time."""
    from .. import outputs

    shown, stopped = 0, False
    while not stopped:
        stopped = stop.wait(every_s)
        done = sum(outputs.is_finished(output_dir, t, save_probseg=save_probseg) for t in todo)
        if done > shown:
            shown = done
            log.info("progress: %d of %d image(s) finished, %s elapsed", done, len(todo),
                     time.strftime("%H:%M:%S", time.gmtime(time.time() - started)))


def run_group(opts):
    from ..reports.group import write_group_report

    _, output_dir = check_folders(opts.bids_dir, opts.output_dir)
    if not output_dir.is_dir():
        raise UsageError(f"{output_dir}: output folder not found; run the participant level first")
    paths = write_group_report(output_dir)
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
    from ..io import InputError
    from ..reports.common import ReportError

    try:
        if opts.analysis_level == "participant":
            return run_participant(opts)
        return run_group(opts)
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
