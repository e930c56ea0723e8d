"""Running the nipype graph: the plugin and its resources, nipype's configuration, and which image failed why."""

import getpass
import json
import logging
import math
import os
import re
from pathlib import Path, PurePosixPath

from .config import UsageError

SCHEDULER_PLUGINS = ("SLURM", "SLURMGraph", "SGE", "SGEGraph", "PBS", "LSF")


def plugin_settings(config):
    """(plugin name, plugin arguments) from ``--nipype-plugin-file`` or ``--plugin``/``--plugin-args``."""
    if config.plugin_file:
        try:
            text = config.plugin_file.read_text()
            try:
                settings = json.loads(text)
            except ValueError:
                import yaml

                settings = yaml.safe_load(text)
        except Exception as exc:
            raise UsageError(f"{config.plugin_file}: cannot read the plugin file ({' '.join(str(exc).split())})") from None
        if not isinstance(settings, dict) or "plugin" not in settings:
            raise UsageError(f"{config.plugin_file}: a plugin file needs a `plugin:` key (and optional `plugin_args:`)")
        plugin, args = settings["plugin"], settings.get("plugin_args") or {}
        given = f"{config.plugin_file}: plugin_args"
    else:
        plugin, args, given = config.plugin, config.plugin_args or {}, "--plugin-args"
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise UsageError(f"{given} {json.dumps(args)}: plugin arguments are a JSON object, e.g. "
                         '{"sbatch_args": "-p short -t 30"}')
    args = dict(args)
    if not isinstance(args.get("sbatch_args", ""), str):
        raise UsageError(f"{given}: sbatch_args {json.dumps(args['sbatch_args'])} must be a string of sbatch options")
    from nipype.pipeline import plugins

    if not hasattr(plugins, f"{plugin}Plugin"):
        known = sorted(name[:-len("Plugin")] for name in dir(plugins) if name.endswith("Plugin") and name != "Plugin")
        raise UsageError(f"--plugin {plugin}: not a nipype plugin (one of {', '.join(known)})")
    if plugin == "MultiProc":
        args.setdefault("n_procs", config.n_cpus)
        # nipype's own default is 90 % of the machine's memory, which in a container started with
        # `--memory 3g` (or a SLURM job's cgroup) is far more than the process may use: an OOM kill.
        args.setdefault("memory_gb", config.mem_gb or 0.9 * available_memory_gb())
        _check_multiproc_args(args, given)
        limit = cgroup_memory_limit_gb()
        if limit is not None and float(args["memory_gb"]) > limit:  # taken as said, but the kernel will not
            logging.getLogger("bids_skullstrip").warning(
                "warning: the run may use %.2f GB (--mem-gb, --mem or plugin_args memory_gb), more than the %.2f GB "
                "its container or job is limited to: its workers may be killed for memory", float(args["memory_gb"]),
                limit)
        args.setdefault("raise_insufficient", False)
    if plugin in SCHEDULER_PLUGINS:
        # nipype's SLURM plugin reads LOGNAME, which containers and CI shells often do not set.
        os.environ.setdefault("LOGNAME", _login_name())
    if plugin in ("SLURM", "SLURMGraph"):  # before anything is made: nipype's failed sbatch is an IndexError
        from .slurm import sbatch_refuses

        refused = sbatch_refuses(args.get("sbatch_args", ""))
        if refused:
            raise UsageError(f"{given}: sbatch refuses sbatch_args {args.get('sbatch_args', '')!r}: {refused}")
    return plugin, args


def _check_multiproc_args(args, given):
    """A UsageError naming ``given`` where MultiProc's arguments cannot run (red-team 10b: a ValueError or a
    TypeError, status 1, some after the output folder was made)."""
    import multiprocessing

    n_procs, memory_gb = args["n_procs"], args["memory_gb"]
    if isinstance(n_procs, bool) or not isinstance(n_procs, int) or n_procs < 1:
        raise UsageError(f"{given}: n_procs {json.dumps(n_procs)} must be a whole number of processes, 1 or more")
    if isinstance(memory_gb, bool) or not isinstance(memory_gb, (int, float)) or not 0 < memory_gb < float("inf"):
        raise UsageError(f"{given}: memory_gb {json.dumps(memory_gb)} must be a number of GB above 0")
    methods = multiprocessing.get_all_start_methods()
    if args.get("mp_context", methods[0]) not in methods:
        raise UsageError(f"{given}: mp_context {json.dumps(args['mp_context'])} must be one of {', '.join(methods)}")


def plugin(name, args):
    """What ``Workflow.run`` gets as its plugin: for ``MultiProc``, this app's ``ImageFirstMultiProcPlugin``
    (images finish one after another; a lost worker fails its image, not the run); for ``SLURM``, its
    ``SlurmPlugin`` (a job killed for memory fails its image with one line saying so)."""
    if name == "SLURM":
        from .slurm import SlurmPlugin

        return SlurmPlugin(plugin_args=args)
    if name != "MultiProc":
        return name
    from .multiproc import ImageFirstMultiProcPlugin

    return ImageFirstMultiProcPlugin(plugin_args=args)


CGROUP_ROOT, PROC_CGROUP = Path("/sys/fs/cgroup"), Path("/proc/self/cgroup")


def _cgroup_folders(controller, root=CGROUP_ROOT, proc_cgroup=PROC_CGROUP):
    """(cgroup version, folder) of this process's cgroup and of each one above it, for ``controller``
    ("memory", "cpu"), the closest first. A container sees its own cgroup as the root; a SLURM job step, a systemd
    slice or Apptainer without a cgroup namespace sees the whole tree, and its cgroup is the path that
    ``/proc/self/cgroup`` gives (a limit can be set at any level: the tightest holds)."""
    root, found = Path(root), []
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            _, controllers, path = line.split(":", 2)
        except ValueError:
            continue
        if controllers == "":
            version, base = 2, root
        elif controller in controllers.split(","):
            version, base = 1, root / controller
        else:
            continue
        parts = PurePosixPath(path.strip()).parts[1:]
        found += [(version, base.joinpath(*parts[:i])) for i in range(len(parts), 0, -1)]
    return found + [(2, root), (1, root / controller)]


def _read(path):
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def cgroup_memory_limit_gb(root=CGROUP_ROOT, proc_cgroup=PROC_CGROUP):
    """The memory limit of this process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``; the tightest
    of its own and those above it), GB; None where there is none."""
    limits = []
    for version, folder in _cgroup_folders("memory", root, proc_cgroup):
        text = _read(folder / ("memory.max" if version == 2 else "memory.limit_in_bytes"))
        if text.isdigit() and int(text) < 2**60:  # v1 writes a huge number for "no limit", v2 "max"
            limits.append(int(text) / 2**30)
    return min(limits, default=None)


def cgroup_memory_free_gb(root=CGROUP_ROOT, proc_cgroup=PROC_CGROUP):
    """What this process's cgroup may still take before its memory limit (the least of any limited cgroup it is
    in: limit less usage, v2 ``memory.current``, v1 ``memory.usage_in_bytes``), GB; None where none is limited."""
    free = []
    for version, folder in _cgroup_folders("memory", root, proc_cgroup):
        limit, used = (_read(folder / name) for name in (("memory.max", "memory.current") if version == 2 else
                                                            ("memory.limit_in_bytes", "memory.usage_in_bytes")))
        if limit.isdigit() and int(limit) < 2**60 and used.isdigit():
            free.append(max(0, int(limit) - int(used)) / 2**30)
    return min(free, default=None)


def cgroup_cpu_limit(root=CGROUP_ROOT, proc_cgroup=PROC_CGROUP):
    """The CPU quota of this process's cgroup in CPUs (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``: ``--cpus`` of docker and podman), the tightest; None where there is none."""
    limits = []
    for version, folder in _cgroup_folders("cpu", root, proc_cgroup):
        if version == 2:
            quota, _, period = _read(folder / "cpu.max").partition(" ")
        else:
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if quota.isdigit() and period.isdigit() and int(period) > 0:  # "max" / -1: no quota
            limits.append(int(quota) / int(period))
    return min(limits, default=None)


def available_cpus():
    """The CPUs this process may use: those it may run on (its affinity: ``taskset``, a cpuset such as a SLURM
    job's or ``--cpuset-cpus``), no more than its cgroup's quota rounded up (``--cpus 1.5``: 2)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


MEMORY_FILE_SYSTEMS = ("tmpfs", "ramfs")


def in_memory(folder):
    """Whether ``folder`` lies on a file system held in memory (tmpfs: a container's /tmp under ``--read-only``,
    /dev/shm, /tmp on many machines): its files take the memory of the run (of its cgroup, in a container)."""
    import psutil

    path, mounted = Path(folder).resolve(), None
    for mount in psutil.disk_partitions(all=True):  # the last of those mounted on one place is the one seen
        if path.is_relative_to(mount.mountpoint) and (
                mounted is None or len(Path(mount.mountpoint).parts) >= len(Path(mounted.mountpoint).parts)):
            mounted = mount
    return mounted is not None and mounted.fstype in MEMORY_FILE_SYSTEMS


def available_memory_gb():
    import psutil

    total = psutil.virtual_memory().total / 2**30
    limit = cgroup_memory_limit_gb()
    return min(total, limit) if limit else total


def workers_within_memory(todo, plugin_args, *, work_in_memory=False):
    """How many MultiProc workers fit in the memory the run may use: each worker, once it ran an image,
    holds the network and needs up to the image's largest node (MultiProc's scheduler counts only the node
    running, not what an idle worker holds), and with ``work_in_memory`` the image's node folders too. One
    clear line before anything runs when one image does not fit (MultiProc would start it anyway, alone, and
    the kernel would kill it)."""
    from .workflows.base import image_memory_gb

    limit = float(plugin_args["memory_gb"])
    need, t1w = max(((image_memory_gb(t, work_in_memory=work_in_memory), t) for t in todo),
                    key=lambda pair: pair[0])
    if need > limit:
        raise UsageError(f"{t1w.relpath}: needs about {need:.2f} GB of memory and the run may use {limit:.2f} GB "
                         "(--mem-gb, --mem, else 90 % of what the machine, container or job has): give the run "
                         f"more memory (a container or job of at least {need / 0.9:.2f} GB)")
    return min(int(plugin_args["n_procs"]), int(limit // need)), need


def _login_name():
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid without a passwd entry, as with `docker run --user 1000`
        return f"uid{os.getuid()}"


def _log_nipype_to(log_file, verbose):
    """nipype's messages go to ``log_file``; on the console only with -vv."""
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils", "nipype.filemanip"):
        nlog = logging.getLogger(name)
        nlog.setLevel(logging.INFO)
        nlog.handlers = [handler]
        nlog.propagate = verbose >= 2


def configure_nipype(work_dir, *, verbose=0, stop_on_first_crash=False):
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
    _log_nipype_to(work_dir / "nipype.log", verbose)


# what nipype appends to a crash file of a node that wrote no result (as when its worker was lost)
NIPYPE_NO_RESULT_NOTE = "When creating this crashfile, the results file corresponding"


def crash_message(crash_file):
    """The last line of a nipype crash file's traceback, without the exception's type."""
    return traceback_message(Path(crash_file).read_text(errors="replace")) or \
        f"unknown error (its crash file {crash_file} holds no traceback)"


# nipype's worker reads a node's result file while it handles the node's error: where the error kept that file from
# being written (a full work directory), the FileNotFoundError naming it is the traceback's last line
CHAINED = "During handling of the above exception, another exception occurred:"
NO_RESULT_FILE = re.compile(r"FileNotFoundError: .*result_[\w-]+\.pklz$")


def traceback_message(text):
    """The last line of a node's traceback as nipype reports it, without the exception's type ("" if none); the
    error nipype was handling when it found no result file, where that is how the traceback ends."""
    parts = text.split(NIPYPE_NO_RESULT_NOTE)[0].split(CHAINED)
    while len(parts) > 1 and NO_RESULT_FILE.search(parts[-1].strip()):
        parts.pop()
    lines = [line.strip() for line in parts[-1].splitlines() if line.strip()]
    tb = [line for line in lines if not line.startswith(("Node", "Working directory", "Node inputs"))]
    message = tb[-1] if tb else ""
    for marker in ("InputError: ", "Error: ", "Exception: "):
        if marker in message:
            return message.split(marker, 1)[1]
    return message


def failure_of(t1w, work_dir, since, *, stopped_early=False, stopped_by=None):
    """Why ``t1w`` failed: the message of the first crash file written since ``since`` in its own crash folder
    (the nodes after the one that failed do not run). Without one: the error whose crash file could not be written
    (``multiproc.UNRECORDED``), not run when ``stopped_early`` (``--stop-on-first-crash`` and another image failed)
    or the run was ``stopped_by`` an error of its own, else nipype's log says why."""
    from .multiproc import UNRECORDED
    from .workflows.base import crash_dir

    folder = crash_dir(work_dir, t1w)
    crashes = sorted((p for p in folder.glob("crash-*.txt") if p.stat().st_mtime >= since),
                     key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if str(folder) in UNRECORDED:  # its crash file could not be written (it may be there, empty)
        return f"{t1w.relpath}: {UNRECORDED[str(folder)]}"
    if not crashes and stopped_early:
        return f"{t1w.relpath}: not processed: the run stopped at the first failure (--stop-on-first-crash)"
    if not crashes and stopped_by:
        return f"{t1w.relpath}: not processed: the run stopped on {stopped_by}"
    if not crashes:
        return f"{t1w.relpath}: processing failed without a crash file (see {Path(work_dir) / 'nipype.log'})"
    message = with_address_space_hint(crash_message(crashes[0]))
    # named by its place in the dataset, as every other failure line (the image's reader names its absolute path)
    return message.replace(str(t1w.path), t1w.relpath) if str(t1w.path) in message else f"{t1w.relpath}: {message}"


# What running out of address space looks like from inside a node: numpy's and C++'s allocation errors (and the
# network's output that could not be allocated, OpenVINO's "can't alloc"), a shared library that cannot be mapped, a
# thread that cannot start
OUT_OF_ADDRESS_SPACE = ("Unable to allocate", "Failed to allocate", "MemoryError", "bad_alloc", "can't alloc",
                        "failed to map segment", "Cannot allocate memory", "Resource temporarily unavailable")


# A worker maps far more address space than it uses (1.4 GB at its peak for a 1 mm head in `skullstrip`; the
# app's workers load ANTs and nipype too)
ADDRESS_SPACE_NEED_GB = 4.0
ADDRESS_SPACE_ADVICE = (f"a process maps more than it uses; raise it to at least {ADDRESS_SPACE_NEED_GB:g} GB or "
                        "remove it")


def die_with_parent():
    """Linux: this process gets SIGKILL when the one that started it dies, even when that one is SIGKILLed (what is
    started from it afterwards, with exec too). Elsewhere nothing."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def address_space_limit_gb():
    """This process's address-space limit (``ulimit -v``, ``prlimit --as``), GB; None where there is none. The
    memory budget of the run (the machine, the cgroup) does not see it."""
    import resource

    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if limit == resource.RLIM_INFINITY else limit / 2**30


def with_address_space_hint(message):
    """``message``, and where it looks like an allocation that failed under an address-space limit, the limit
    and what to do."""
    limit = address_space_limit_gb()
    if limit is None or not any(s in message for s in OUT_OF_ADDRESS_SPACE):
        return message
    return (f"{message} (out of memory under an address-space limit of {limit:.1f} GB, `ulimit -v`: "
            f"{ADDRESS_SPACE_ADVICE})")
