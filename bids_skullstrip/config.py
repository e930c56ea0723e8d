"""What one run of the BIDS App is asked to do: the command line, checked and resolved once."""

import hashlib
import json
import math
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path


class UsageError(ValueError):
    """A problem with the command line or the folders it names (one line, for the user)."""


def _option(check, value):
    """``check(value)`` (``postproc.check_threshold``, ``check_border``), its ValueError as a UsageError naming
    the option."""
    try:
        return check(value)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None


def resolve_threshold(value):
    """``value`` as a probability threshold; None stays None: each image gets the threshold calibrated for the
    networks of its contrast (``ModelCard.bundled_for``)."""
    from .postproc import check_threshold

    return _option(check_threshold, value)


def resolve_border(value):
    from .postproc import check_border

    return _option(check_border, value)


def resolve_contrasts(values):
    """``--contrasts`` as BIDS suffixes, in ``discovery.CONTRASTS`` order (``all``: every one; any case)."""
    from .discovery import CONTRASTS, DEFAULT_CONTRASTS, DEPRECATED_SUFFIXES

    if not values:
        return DEFAULT_CONTRASTS
    known = {c.lower(): c for c in CONTRASTS}
    unknown = [str(v) for v in values if str(v).lower() not in known and str(v).lower() != "all"]
    if unknown:
        renamed = [DEPRECATED_SUFFIXES[v] for v in unknown if v in DEPRECATED_SUFFIXES]
        enhanced = any(v.lower().startswith("ce-") for v in unknown)  # "ce-gadolinium_T1w" (red-team 19)
        raise UsageError(f"--contrasts {' '.join(unknown)}: unknown contrast (one of {', '.join(CONTRASTS)} or all)"
                         + (f"; BIDS's name for it is {', '.join(renamed)}" if renamed else "")
                         + ("; a contrast-enhanced T1w is a T1w: --contrasts T1w strips it, and a --bids-filter-file "
                            '{"t1w": {"ceagent": "gadolinium"}} strips it alone' if enhanced else ""))
    if any(str(v).lower() == "all" for v in values):
        return CONTRASTS
    wanted = {known[str(v).lower()] for v in values}
    return tuple(c for c in CONTRASTS if c in wanted)


def check_folders(bids_dir, output_dir):
    bids_dir, output_dir = Path(bids_dir).resolve(), Path(output_dir).resolve()
    if not bids_dir.is_dir():
        raise UsageError(f"{bids_dir}: BIDS dataset folder not found")
    if output_dir == bids_dir:
        raise UsageError(f"{output_dir}: the output folder must not be the input dataset itself")
    if output_dir.is_relative_to(bids_dir) and not output_dir.is_relative_to(bids_dir / "derivatives"):
        raise UsageError(f"{output_dir}: the output folder is inside the input dataset; use a folder outside "
                         f"it or under {bids_dir / 'derivatives'}")
    if output_dir == bids_dir / "derivatives":  # every pipeline's folder goes inside it
        raise UsageError(f"{output_dir}: the output folder is the dataset's derivatives folder itself; use a folder "
                         f"of its own under it, e.g. {output_dir / 'bids_skullstrip'}")
    if bids_dir.is_relative_to(output_dir):
        raise UsageError(f"{output_dir}: the output folder contains the input dataset")
    other = other_dataset(output_dir)
    if other:
        raise UsageError(f"{output_dir}: the output folder is {other}, whose files this run would replace or mix "
                         f"with its own; use a folder of its own (e.g. {bids_dir / 'derivatives' / 'bids_skullstrip'})")
    from .discovery import same_folder

    raw = linked_raw_dataset(output_dir)
    if raw is not None and raw.is_dir() and not same_folder(raw, bids_dir):  # red-team 19: mixed in silence
        raise UsageError(f"{output_dir}: the output folder holds the outputs of another raw dataset, {raw} (its "
                         f"dataset_description.json's DatasetLinks.raw); use a folder of its own for {bids_dir}")
    return bids_dir, output_dir


def linked_raw_dataset(folder):
    """The raw dataset the outputs in ``folder`` were made from (``DatasetLinks.raw`` of its
    dataset_description.json, a ``file:`` URI), or None where it names none."""
    try:
        description = json.loads((folder / "dataset_description.json").read_text(encoding="utf-8-sig"))
        uri = urllib.parse.urlparse(description["DatasetLinks"]["raw"])
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return None
    return Path(urllib.parse.unquote(uri.path)) if uri.scheme == "file" and uri.path else None


def other_dataset(folder):
    """What ``folder`` holds where it is a dataset that bids_skullstrip did not make (its dataset_description.json
    does not name bids_skullstrip in GeneratedBy: a raw dataset, another pipeline's derivatives), else None. An
    output folder of fMRIPrep has masks and preprocessed T1w images under this app's names (red-team 18: written
    over, and taken for this app's own earlier outputs)."""
    described = folder / "dataset_description.json"
    if not described.is_file():
        return None
    try:
        description = json.loads(described.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"a dataset whose dataset_description.json does not read ({' '.join(str(exc).split())[:120]})"
    if not isinstance(description, dict):
        return "a dataset whose dataset_description.json is not a JSON object"
    generated = description.get("GeneratedBy")
    names = [str(g.get("Name")) for g in generated if isinstance(g, dict)] if isinstance(generated, list) else []
    if "bids_skullstrip" in names:
        return None
    if str(description.get("DatasetType", "raw")).lower() != "derivative":
        return f"a raw BIDS dataset ({description.get('Name', 'no Name')!s:.60})"
    return f"the derivatives of {', '.join(names) or 'another pipeline'}"


def check_writable(*folders):
    """Create each (folder, what) and check that it takes a file; on the first that does not, a UsageError naming
    it, and the folders this call created are removed again (a run that cannot start leaves nothing behind)."""
    created = []
    try:
        for folder, what in folders:
            if folder.exists() and not folder.is_dir():
                raise UsageError(f"{folder}: the {what} is a file, not a folder")
            missing = [p for p in (folder, *folder.parents) if not p.exists()]
            try:
                folder.mkdir(parents=True, exist_ok=True)
                created += missing
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-write-check-"):
                    pass
            except OSError as exc:
                raise UsageError(f"{folder}: the {what} is not writable ({exc.strerror or exc})") from None
    except UsageError:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass
        raise


def default_work_dir(output_dir):
    digest = hashlib.sha1(str(output_dir).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"bids_skullstrip_work_{digest}"


@dataclass(frozen=True)
class RunConfig:
    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    threshold: float | None  # None: each image's networks' calibrated threshold
    border_mm: float = 0.0
    save_probseg: bool = False
    contrasts: tuple = ("T1w",)
    participant_label: tuple = ()
    session_label: tuple = ()
    bids_filter_file: Path | None = None
    skip_bids_validation: bool = False
    bids_database_dir: Path | None = None
    n_cpus: int = 1
    omp_nthreads: int | None = None
    mem_gb: float | None = None
    plugin: str = "MultiProc"
    plugin_args: dict | None = None
    plugin_file: Path | None = None
    overwrite: bool = False
    clean_workdir: bool = False
    fail_on_flag: bool = False
    stop_on_first_crash: bool = False
    boilerplate_only: bool = False
    reports_only: bool = False
    verbose: int = 0

    @classmethod
    def from_args(cls, opts):
        """The parsed command line (``cli.parser``), its folders checked and every default resolved."""
        bids_dir, output_dir = check_folders(opts.bids_dir, opts.output_dir)
        work_dir = Path(opts.work_dir or default_work_dir(output_dir)).resolve()
        if work_dir.is_relative_to(bids_dir):  # the input is only read (as fMRIPrep: no work folder inside it)
            raise UsageError(f"{work_dir}: the work directory is inside the input dataset; use a folder outside it")
        if work_dir == output_dir:  # nipype's folders among the derivatives, "remove it" meaning the outputs
            raise UsageError(f"{work_dir}: the work directory is the output folder; use another folder (-w)")
        if work_dir.is_relative_to(output_dir):  # nipype's files make the derivatives fail the BIDS validator
            raise UsageError(f"{work_dir}: the work directory is inside the output folder, which would then hold "
                             "nipype's files among the derivatives; use a folder outside it (-w)")
        database_dir = opts.bids_database_dir and Path(opts.bids_database_dir).resolve()
        if database_dir and database_dir.is_relative_to(bids_dir):  # pybids wrote its index into the input
            raise UsageError(f"{database_dir}: the --bids-database-dir is inside the input dataset; use a folder "
                             "outside it")
        if database_dir and database_dir.is_relative_to(output_dir):  # the derivatives then fail the validator
            raise UsageError(f"{database_dir}: the --bids-database-dir is inside the output folder, which would then "
                             "hold pybids' index among the derivatives; use a folder outside it")
        if opts.n_cpus < 1:
            raise UsageError(f"--n-cpus {opts.n_cpus}: must be at least 1")
        if opts.omp_nthreads is not None and opts.omp_nthreads < 0:
            raise UsageError(f"--omp-nthreads {opts.omp_nthreads}: must be 0 (automatic) or more")
        for option, value, unit in (("--mem-gb", opts.mem_gb, "GB"), ("--mem", opts.mem_mb, "MB")):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UsageError(f"{option} {value:g}: must be a positive number of {unit}")
        if opts.mem_gb is not None and opts.mem_mb is not None:  # the MB were dropped in silence (red-team 19)
            raise UsageError(f"--mem-gb {opts.mem_gb:g} and --mem {opts.mem_mb:g}: give the memory once")
        mem_gb = opts.mem_gb or (opts.mem_mb / 1024.0 if opts.mem_mb else None)
        return cls(bids_dir=bids_dir, output_dir=output_dir, analysis_level=opts.analysis_level,
                   work_dir=work_dir,
                   threshold=resolve_threshold(opts.threshold), border_mm=resolve_border(opts.border),
                   save_probseg=opts.save_probseg, contrasts=resolve_contrasts(opts.contrasts),
                   participant_label=tuple(opts.participant_label or ()),
                   session_label=tuple(opts.session_label or ()), bids_filter_file=opts.bids_filter_file,
                   skip_bids_validation=opts.skip_bids_validation, bids_database_dir=database_dir,
                   n_cpus=opts.n_cpus, omp_nthreads=opts.omp_nthreads, mem_gb=mem_gb, plugin=opts.plugin,
                   plugin_args=opts.plugin_args, plugin_file=opts.plugin_file, overwrite=opts.overwrite,
                   clean_workdir=opts.clean_workdir,
                   fail_on_flag=opts.fail_on_flag, stop_on_first_crash=opts.stop_on_first_crash,
                   boilerplate_only=opts.boilerplate_only, reports_only=opts.reports_only,
                   verbose=opts.verbose)
