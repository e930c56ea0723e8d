"""Which structural images to process: pybids queries per contrast (``--contrasts``), label and filter
handling, the BIDS validator.

Every problem is a ``DiscoveryError`` with a one-line message naming the dataset and the problem.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .execution import die_with_parent

# The structural (non-parametric anat) suffixes the app strips; ``--contrasts all`` means every one of them.
# A contrast-enhanced T1w is a T1w with a ``ce-`` entity, not a suffix of its own.
CONTRASTS = ("T1w", "T2w", "FLAIR", "PDw", "T2starw")
DEFAULT_CONTRASTS = ("T1w",)
# BIDS's deprecated names of two of them (``skullstrip`` takes them; the app asks for the file to be renamed)
DEPRECATED_SUFFIXES = {"PD": "PDw", "T2star": "T2starw"}
# The other anatomical suffixes, which the app does not strip (said when ``--contrasts all`` leaves them)
OTHER_ANAT_SUFFIXES = ("FLASH", "inplaneT1", "inplaneT2", "PDT2", "angio", "UNIT1", "MP2RAGE", "T1map")
# ``part-`` images that are not magnitude images: a phase map in radians is no head to strip
NOT_MAGNITUDE = re.compile(r"_part-(phase|real|imag)_")
ANAT_QUERY = {"datatype": "anat", "extension": [".nii", ".nii.gz"]}


def check_suffix(suffix):
    """``suffix`` if the app strips images of it, else a ValueError naming the ones it strips."""
    if suffix not in CONTRASTS:
        raise ValueError(f"contrast {suffix or repr(suffix)}: unknown (one of {', '.join(CONTRASTS)})")
    return suffix


def contrast_of(path, given=None):
    """The contrast of an image: ``given`` (``--contrast``), else the structural BIDS suffix its file name ends
    with (``sub-01_FLAIR.nii.gz``, ``flair.nii``, ``t2_flair.nii``: FLAIR; the common ``T1``, ``T2``, ``PD`` and
    ``T2star`` too), else T1w. Known suffixes are matched in any case.
    (A split of the name, not pybids: importing it would cost ``skullstrip`` half a second per file.)"""
    if given is not None:  # an empty one too: it is refused, not taken for none (red-team 12)
        return KNOWN_NAMES.get(given.lower(), given)
    return KNOWN_NAMES.get(_last_word(path), "T1w")


KNOWN_NAMES = {c.lower(): c for c in CONTRASTS} | {"t1": "T1w", "t2": "T2w", "pd": "PDw", "t2star": "T2starw"}


def _name(path):
    """The lower-case name of a file without its .nii[.gz]."""
    return re.sub(r"\.nii(\.gz)?$", "", Path(path).name, flags=re.IGNORECASE).lower()


def _last_word(path):
    return _name(path).rsplit("_", 1)[-1]


def contrast_named(path):
    """Whether the name of ``path`` ends with a contrast ``contrast_of`` knows (else it takes the image for T1w)."""
    return _last_word(path) in KNOWN_NAMES


def contrasts_inside_name(path):
    """The contrasts other than T1w that the name of ``path`` holds as a word but does not end with
    (``p01_FLAIR_axial.nii.gz``): the image was probably meant as one of them."""
    words = re.split(r"[_\-.]", _name(path))[:-1]
    return list(dict.fromkeys(KNOWN_NAMES[w] for w in words if KNOWN_NAMES.get(w, "T1w") != "T1w"))


class DiscoveryError(ValueError):
    """The dataset or the selection of images is unusable (phrased for the user, one line)."""


@dataclass(frozen=True)
class StructuralInput:
    path: Path  # absolute path of the raw image
    relpath: str  # path relative to the dataset root, POSIX (for BIDS URIs)
    subject: str
    session: str | None
    suffix: str = "T1w"  # the BIDS suffix: the contrast (T1w, T2w, FLAIR, PDw, ...)

    @classmethod
    def from_path(cls, path, bids_dir=None):
        """The input a raw structural file of the dataset ``bids_dir`` is (without ``bids_dir``: where its BIDS
        name says it lies)."""
        from bids.layout import parse_file_entities

        path = Path(path)
        entities = parse_file_entities(f"/{path.name}")  # the patterns anchor sub- at a folder boundary
        session = entities.get("session")
        if bids_dir is None:
            relpath = Path(f"sub-{entities['subject']}", *([f"ses-{session}"] if session else []), "anat", path.name)
        else:
            relpath = path.relative_to(bids_dir)
        return cls(path=path, relpath=relpath.as_posix(), subject=entities["subject"], session=session,
                   suffix=entities.get("suffix", "T1w"))

    @property
    def stem(self):
        """File name without ``_<suffix>.nii[.gz]``: all entities, e.g. ``sub-01_ses-1_acq-mp_run-1``."""
        return self.path.name[: self.path.name.rindex(f"_{self.suffix}.nii")]

    @property
    def name(self):
        """File name without the extension, e.g. ``sub-01_ce-gadolinium_T1w``: unique within its folder."""
        return f"{self.stem}_{self.suffix}"

    @property
    def anat_dir(self):
        """Folder of the outputs, relative to the output root (mirrors the raw dataset)."""
        return Path(self.relpath).parent

    @property
    def source_uri(self):
        return f"bids:raw:{self.relpath}"


def strip_prefix(label, prefix):
    label = str(label).strip()
    return label[len(prefix):] if label.startswith(prefix) else label


# Entities a filter may not set: the key of the filter chooses the contrast, and the images are NIfTI files of anat/
FIXED_ENTITIES = ("suffix", "datatype", "extension")


def _filter_entities():
    """{name: True} for the entities a filter may set (pybids' names: ``acquisition``), and {short: name} for the
    names in file names (``acq``), which a filter does not take."""
    from bids.layout.models import Config

    known = Config.load("bids").entities
    short = {m.group(1): name for name, entity in known.items()
             if (m := re.search(r"([A-Za-z]+)-\(", entity.pattern or "")) and m.group(1) != name}
    return {**{name: True for name in known}, **short}


def load_bids_filters(path):
    """fMRIPrep-style filter file, one key per contrast: ``{"t1w": {"acquisition": "mprage"}, "flair": {...}}``;
    returns {suffix: filters} for the keys it has (a key is the suffix, in any case). As in fMRIPrep, ``null``
    means "the entity is absent" (``{"t1w": {"ceagent": null}}``: no contrast-enhanced T1w) and ``"*"`` "any
    value". Keys of other kinds of images (an fMRIPrep filter file's ``bold``, ``fmap``) are ignored with a
    warning; ``subject`` and ``session`` narrow ``--participant-label`` and ``--session-label``."""
    from bids.layout import Query

    path = Path(path)
    try:
        filters = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DiscoveryError(f"{path}: cannot read the BIDS filter file ({' '.join(str(exc).split())})") from None
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise DiscoveryError(f'{path}: a BIDS filter file is a JSON object like {{"t1w": {{"session": "1"}}}}')
    by_key = {}
    for key in filters:
        by_key.setdefault(key.lower(), []).append(key)
    twice = [" and ".join(map(repr, keys)) for keys in by_key.values() if len(keys) > 1]
    if twice:
        raise DiscoveryError(f"{path}: keys {twice[0]} name the same contrast; give one")
    other = sorted(k for k in filters if k.lower() not in {c.lower() for c in CONTRASTS})
    if other:
        logging.getLogger("bids_skullstrip").warning(
            "%s: filters for %s ignored: not a structural contrast bids_skullstrip strips (keys: %s)", path,
            ", ".join(map(repr, other)), ", ".join(c.lower() for c in CONTRASTS))
    special = {None: Query.NONE, "*": Query.ANY}
    entities = _filter_entities()
    selected = {}
    for contrast in CONTRASTS:
        if contrast.lower() not in by_key:
            continue
        key = by_key[contrast.lower()][0]
        fixed = [k for k in filters[key] if k in FIXED_ENTITIES]
        if fixed:
            raise DiscoveryError(f"{path}: the filter {key!r} sets {fixed[0]!r}; the key chooses the contrast "
                                 "(and --contrasts which keys apply): leave it out")
        unknown = [k for k in filters[key] if entities.get(k) is not True]
        if unknown:  # pybids' own error named the dataset, and advice (invalid_filters) no option follows
            long = entities.get(unknown[0]) if isinstance(entities.get(unknown[0]), str) else None
            raise DiscoveryError(f"{path}: the filter {key!r} sets {unknown[0]!r}, not a BIDS entity pybids knows"
                                 + (f"; its name in a filter is {long!r}" if long else ""))
        selected[contrast] = {k: special.get(v, v) if not isinstance(v, (list, dict)) else v
                              for k, v in filters[key].items()}
    return selected


def _narrowed(selection, filters):
    """The pybids query of a contrast: ``selection`` (participants, sessions) narrowed by the contrast's
    ``filters``; None when the two leave nothing (a filter's subject or session not among those selected)."""
    from bids.layout import Query

    query = dict(ANAT_QUERY, **selection)
    for key, value in filters.items():
        if key in ("subject", "session") and isinstance(value, (str, int, list)):  # "ses-1" as "1", as the options
            prefix = {"subject": "sub-", "session": "ses-"}[key]
            value = ([strip_prefix(v, prefix) if isinstance(v, (str, int)) else v for v in value]
                     if isinstance(value, list) else strip_prefix(value, prefix))
        if key not in selection:
            query[key] = value
        elif value is not Query.ANY:
            prefix = {"subject": "sub-", "session": "ses-"}[key]
            wanted = {strip_prefix(v, prefix) for v in (value if isinstance(value, list) else [value])
                      if isinstance(v, (str, int))}
            query[key] = [v for v in selection[key] if v in wanted]
            if not query[key]:
                return None
    return query


def _dataset_description(path):
    """The dataset's description as a dict, or a DiscoveryError saying in one line what is wrong with the file
    (pybids' own message ends in an example file's text, and says "Name missing" of a JSON list)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DiscoveryError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        raise DiscoveryError(f"{path}: starts with a byte-order mark (BOM), which JSON files of a BIDS dataset must "
                             "not have: save it as UTF-8 without BOM")
    try:
        description = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise DiscoveryError(f"{path}: not UTF-8 text") from None
    except ValueError as exc:
        raise DiscoveryError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(description, dict):
        raise DiscoveryError(f"{path}: a JSON {type(description).__name__}, where a JSON object with the dataset's "
                             "Name and BIDSVersion is expected")
    return description


def _layout(bids_dir, database_dir=None):
    from bids import BIDSLayout, BIDSLayoutIndexer

    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise DiscoveryError(f"{bids_dir}: BIDS dataset folder not found")
    if not (bids_dir / "dataset_description.json").is_file():
        raise DiscoveryError(f"{bids_dir}: not a BIDS dataset (no dataset_description.json)")
    description = _dataset_description(bids_dir / "dataset_description.json")
    if str(description.get("DatasetType", "raw")).lower() == "derivative":
        # Its images carry desc-/space- entities (fMRIPrep's desc-preproc, space-MNI...): the outputs'
        # names would not be valid BIDS, and their masks exist already.
        raise DiscoveryError(f"{bids_dir}: a BIDS-Derivatives dataset (DatasetType \"derivative\"); "
                             "bids_skullstrip processes the raw images: give it the raw dataset")
    if database_dir is not None:
        indexed = _indexed_dataset(Path(database_dir))
        if indexed is not None and not same_folder(indexed, bids_dir):  # pybids: a ValueError later, status 1
            raise DiscoveryError(f"{database_dir}: the pybids database of another dataset ({indexed}); give "
                                 f"{bids_dir} a --bids-database-dir of its own, or delete this one to index it again")
    try:
        # The query needs file names only: without the sidecars' metadata, indexing is faster and a broken
        # sidecar of an image that is not selected cannot stop the run (the validator judges the selected).
        options = {"derivatives": False, "indexer": BIDSLayoutIndexer(validate=False, index_metadata=False)}
        if database_dir is not None:  # pybids indexes once into it, later runs read it back
            options["database_path"] = str(database_dir)
        return BIDSLayout(str(bids_dir), **options)
    except Exception as exc:  # pybids raises many types for broken datasets
        raise DiscoveryError(f"{bids_dir}: pybids cannot index the dataset ({' '.join(str(exc).split())[:200]})") from None


def _indexed_dataset(database_dir):
    """The dataset folder a pybids database (``--bids-database-dir``) indexes, or None (none there yet, or not
    one pybids wrote: pybids says what is wrong with it)."""
    database = database_dir / "layout_index.sqlite"
    if not database.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)) as connection:
            row = connection.execute("SELECT root FROM layout_info").fetchone()
    except sqlite3.Error:
        return None
    return Path(row[0]) if row and row[0] else None


def same_folder(a, b):
    """Whether ``a`` and ``b`` are one folder (links, bind mounts); False where either is gone."""
    try:
        return Path(a).samefile(b)
    except OSError:
        return False


def collect_images(bids_dir, *, contrasts=DEFAULT_CONTRASTS, participant_labels=None, session_labels=None,
                   bids_filters=None, database_dir=None):
    """The structural images of the suffixes ``contrasts`` to process, sorted (``StructuralInput``); raises
    DiscoveryError for unknown labels or no images. ``bids_filters``: {suffix: pybids filters}, as
    ``load_bids_filters`` gives them."""
    bids_dir = Path(bids_dir).resolve()
    layout = _layout(bids_dir, database_dir)
    # a participant whose only image is a folder named as one has no file for pybids: it is one all the same
    folders = _folders_named_as_images(bids_dir, contrasts, None, bids_filters)
    subjects = sorted(set(layout.get_subjects()) | {StructuralInput.from_path(f, bids_dir).subject for f in folders})
    if not subjects:
        raise DiscoveryError(f"{bids_dir}: the dataset has no participants (no sub-* folders)")
    wanted = sorted({strip_prefix(p, "sub-") for p in participant_labels or []}) or subjects
    if any(not label.strip() for label in wanted):
        raise DiscoveryError(f"{bids_dir}: an empty participant label was given (available: {', '.join(subjects)})")
    unknown = [s for s in wanted if s not in subjects]
    if unknown:
        raise DiscoveryError(f"{bids_dir}: participant label(s) not found: {', '.join(unknown)} "
                             f"(available: {', '.join(subjects)})")
    selection = {"subject": wanted}
    if session_labels:
        sessions = sorted({strip_prefix(s, "ses-") for s in session_labels})
        known = set(layout.get_sessions(subject=wanted))
        missing = [s for s in sessions if s not in known]
        if missing:
            raise DiscoveryError(f"{bids_dir}: session label(s) not found for the selected participants: "
                                 f"{', '.join(missing)} (available: {', '.join(sorted(known)) or 'none'})")
        selection["session"] = sessions
    files, emptied = [], []
    for suffix in contrasts:
        query = _narrowed(selection, (bids_filters or {}).get(suffix, {}))
        try:
            found = [] if query is None else layout.get(return_type="file", **query, suffix=suffix)
        except Exception as exc:
            raise DiscoveryError(f"{bids_dir}: invalid BIDS query for {suffix} "
                                 f"({' '.join(str(exc).split())[:200]})") from None
        files += found
        if (bids_filters or {}).get(suffix) and not found:
            emptied.append(suffix)
    log = logging.getLogger("bids_skullstrip")
    unused = [c for c in (bids_filters or {}) if c not in contrasts]
    if unused:
        log.warning("%s: the filter file's %s not used: not among --contrasts (%s)", bids_dir,
                    ", ".join(repr(c.lower()) for c in unused), " ".join(contrasts))
    files += [str(f) for f in _folders_named_as_images(bids_dir, contrasts, selection, bids_filters)]
    # one image per name: the same image as .nii and .nii.gz is one input (``twin_of`` fails it in the run)
    by_name = {re.sub(r"\.nii(\.gz)?$", "", f): f for f in sorted(set(files))}
    parts = sorted(f for f in by_name.values() if NOT_MAGNITUDE.search(Path(f).name))
    found = [StructuralInput.from_path(f, bids_dir) for f in sorted(by_name.values()) if f not in parts]
    skipped = _skipped_names(layout, contrasts, selection) + (
        [f"{len(parts)} image(s) skipped: part-phase, part-real and part-imag images are not magnitude images "
         f"({_listed(parts)})"] if parts else [])
    if not found:
        names = "/".join(contrasts)
        pattern = contrasts[0] if len(contrasts) == 1 else "{" + ",".join(contrasts) + "}"
        raise DiscoveryError(f"{bids_dir}: no {names} images (sub-*/[ses-*/]anat/*_{pattern}.nii[.gz]) for "
                             f"participant(s) {', '.join(wanted)}{_in_sessions(selection)}"
                             + (" with the given filters" if bids_filters else "")
                             + (f" ({'; '.join(skipped)})" if skipped
                                else _what_else_is_there(layout, contrasts, selection)))
    for line in skipped:
        log.warning("%s: %s", bids_dir, line)
    without = [s for s in wanted if participant_labels and not any(image.subject == s for image in found)]
    if without:  # asked for by label: a participant the selection leaves empty is said, not dropped in silence
        log.warning("%s: participant(s) %s: no %s image%s%s; not processed%s", bids_dir, ", ".join(without),
                    "/".join(contrasts), _in_sessions(selection), " matches the filters" if bids_filters else "",
                    _what_else_is_there(layout, contrasts, {**selection, "subject": without}))
    absent = [c for c in contrasts if c not in emptied and not any(image.suffix == c for image in found)]
    if absent and set(contrasts) != set(CONTRASTS):  # asked for by name (``all`` takes whatever there is)
        log.warning("%s: no %s image for participant(s) %s%s: %s not processed", bids_dir, "/".join(absent),
                    ", ".join(wanted), _in_sessions(selection),
                    "that contrast is" if len(absent) == 1 else "those contrasts are")
    for suffix in emptied:
        log.warning("%s: no %s image matches the filter file's %r selection %s for participant(s) %s", bids_dir,
                    suffix, suffix.lower(), json.dumps((bids_filters or {})[suffix], default=str), ", ".join(wanted))
    return found


def _in_sessions(selection):
    return f" in session(s) {', '.join(selection['session'])}" if "session" in selection else ""


def _listed(paths, at_most=3):
    names = [Path(p).name for p in paths]
    return ", ".join(names[:at_most]) + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


def _folders_named_as_images(bids_dir, contrasts, selection, bids_filters):
    """Folders named as images of the chosen contrasts (``sub-01_T1w.nii.gz/``) of the selected participants and
    sessions (``selection`` None: of all): pybids indexes files only and skipped them in silence; as inputs they
    fail in one line each (``is a directory``). With a filter file for a contrast, its folders are left to the
    validator."""
    found = []
    for suffix in contrasts:
        if (bids_filters or {}).get(suffix):
            continue
        for path in sorted(bids_dir.glob(f"sub-*/**/anat/*_{suffix}.nii*")):
            if not (path.is_dir() and re.search(r"\.nii(\.gz)?$", path.name)):
                continue
            image = StructuralInput.from_path(path, bids_dir)
            if selection is None or (image.subject in selection["subject"]
                                     and image.session in selection.get("session", [image.session])):
                found.append(path)
    return found


def _skipped_names(layout, contrasts, selection):
    """The anatomical images of the selection that a chosen contrast would want but are not named for it, one
    line per kind: a suffix in another case (``_flair``: BIDS and pybids do not take it for FLAIR), a deprecated
    suffix (``_PD`` for PDw), and, with every contrast chosen, the suffixes the app does not strip."""
    wanted = {c.lower(): c for c in contrasts}
    counts = Counter(f.entities.get("suffix") for f in layout.get(**dict(ANAT_QUERY, **selection)))
    lines = []
    odd = sorted((s, n) for s, n in counts.items() if s and s not in CONTRASTS and s.lower() in wanted)
    if odd:
        lines.append(f"{', '.join(f'{n} named *_{s}' for s, n in odd)} image(s) skipped: BIDS suffixes are "
                     f"case-sensitive; rename them {', '.join(f'*_{wanted[s.lower()]}' for s, _ in odd)}")
    old = sorted((s, n) for s, n in counts.items() if DEPRECATED_SUFFIXES.get(s) in contrasts)
    if old:
        lines.append(f"{', '.join(f'{n} named *_{s}' for s, n in old)} image(s) skipped: a deprecated BIDS suffix; "
                     f"rename them {', '.join(f'*_{DEPRECATED_SUFFIXES[s]}' for s, _ in old)}")
    if tuple(contrasts) == CONTRASTS:
        other = [(s, counts[s]) for s in OTHER_ANAT_SUFFIXES if counts.get(s)]
        if other:
            lines.append(f"{', '.join(f'{n} {s}' for s, n in other)} image(s) not stripped (bids_skullstrip strips "
                         f"{', '.join(CONTRASTS)})")
    return lines


def _what_else_is_there(layout, contrasts, selection):
    """The hint for a selection that found nothing: the other contrasts the participants do have (a dataset of
    FLAIR and T2w run with the default ``--contrasts T1w``), else their MP2RAGE-family images, which are not
    stripped."""
    counts = Counter(f.entities.get("suffix") for f in layout.get(**dict(ANAT_QUERY, **selection))
                     if not NOT_MAGNITUDE.search(f.filename))
    present = [s for s in CONTRASTS if s not in contrasts and counts.get(s)]
    if present:
        listed = ", ".join(f"{counts[s]} {s}" for s in present)
        return f" (it has {listed} image(s): strip them with --contrasts {' '.join(present)} or all)"
    unit1 = sum(counts.get(s, 0) for s in ("UNIT1", "MP2RAGE", "T1map"))
    return (f" (it has {unit1} UNIT1/MP2RAGE/T1map image(s); bids_skullstrip processes {', '.join(CONTRASTS)})"
            if unit1 else "")


def missing_content(image):
    """Why the content of ``image`` cannot be read although its name is in the dataset, or None.

    A DataLad dataset after ``datalad clone`` without ``datalad get`` has every file as a symbolic link
    into ``.git/annex/objects`` that dangles until its content is fetched; the images that are present
    are processed and each missing one is reported on its own. A file the pybids database of an earlier run
    (``--bids-database-dir``) still lists may be gone too."""
    path = image.path
    if path.is_dir():
        return f"{image.relpath}: a folder named as an image, not an image file"
    if not path.is_symlink() and not path.exists():
        return (f"{image.relpath}: file not found (listed by the pybids database of an earlier run? delete the "
                "--bids-database-dir folder to index the dataset again)")
    if not path.is_symlink() or path.exists():
        return None
    target = os.readlink(path)
    if ".git/annex/objects" in Path(target).as_posix():
        return f"{image.relpath}: git-annex content not present: run `datalad get {image.relpath}` in the dataset"
    return f"{image.relpath}: broken symbolic link (its target {target} does not exist)"


def twin_of(image):
    """Why ``image`` cannot be processed because the same image name is there twice (``.nii`` and ``.nii.gz``:
    which one is meant is not for this app to guess, and both would get the same output names), or None."""
    name = image.path.name
    other = name[:-3] if name.endswith(".gz") else f"{name}.gz"
    if os.path.lexists(image.path.with_name(other)):
        return f"{image.relpath}: the image is there twice, as {name} and {other}: remove one"
    return None


def misplaced(image):
    """Why ``image`` cannot be processed because its folder is not the one its name says
    (``sub-01/anat/sub-01_ses-1_T1w.nii.gz``, ``sub-01/ses-1/anat/sub-01_T1w.nii.gz``; only
    ``--skip-bids-validation`` lets it through), or None. Its outputs mirror its folder, while the reports, the group
    level and reruns find them by their names: a good mask was "missing", and every rerun left it so (red-team 19)."""
    where = StructuralInput.from_path(image.path).anat_dir
    if where == image.anat_dir:
        return None
    return (f"{image.relpath}: its name puts it in {where.as_posix()}/, not in {image.anat_dir.as_posix()}/: move "
            "it there or rename it")


# Validator issues about an image's own content: the app reads every image itself and fails an unreadable one on
# its own, in one line, while the others are processed; the validator cannot read DataLad's annexed images at all.
JUDGED_BY_THE_APP = ("NIFTI_HEADER_UNREADABLE", "EMPTY_FILE")


def _read_by_run(issue, reads):
    """Does a validator issue concern what the run reads: the selected images and their sidecars (also
    the ones they inherit from the top level), and ``dataset_description.json`` as a JSON object? Issues of
    an image's content (``JUDGED_BY_THE_APP``) do not stop the run.

    Other files at the top level (stray files, ``participants.tsv``) are not read; a field of
    ``dataset_description.json`` in the wrong format (a string where the schema wants a list) does not
    matter either: only its ``DatasetType`` and ``Authors`` are used, and both are checked where used. An
    issue of the whole dataset (no location) stops the run."""
    location = (issue.get("location") or "").lstrip("/")
    if not location:
        return True
    if issue.get("code") in JUDGED_BY_THE_APP:
        return False
    if location == "dataset_description.json":
        return issue.get("code") != "JSON_SCHEMA_VALIDATION_ERROR"
    stems = {r[: r.rindex(".nii")] for r in reads}  # e.g. sub-01/anat/sub-01_FLAIR
    folder, _, name = location.rpartition("/")
    if location.endswith(".json") and not folder.endswith("anat"):
        # a sidecar at the top, subject or session level: inherited by the images of its suffix below it
        return any(stem.startswith(f"{folder}/" if folder else "") and stem.rsplit("_", 1)[-1] ==
                   name[:-5].rsplit("_", 1)[-1] for stem in stems)
    return location.split(".", 1)[0] in stems


def validator_issues(bids_dir):
    """Every issue (errors and warnings, as dicts) the BIDS validator (bids-validator-deno, offline) reports."""
    beside_python = Path(sys.executable).with_name("bids-validator-deno")  # venv not on PATH
    exe = shutil.which("bids-validator-deno") or (str(beside_python) if beside_python.exists() else None)
    if exe is None:
        raise DiscoveryError("bids-validator-deno not found: install it (pip install bids-validator-deno) "
                             "or pass --skip-bids-validation")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        try:
            # dies with the run even when the run is SIGKILLed (it ran on to the end, re-parented: red-team 15)
            proc = subprocess.run([exe, "--format", "json", "--outfile", str(report), str(bids_dir)],
                                  capture_output=True, text=True, errors="replace", timeout=VALIDATOR_TIMEOUT_S,
                                  preexec_fn=die_with_parent)
        except subprocess.TimeoutExpired:
            raise ValidatorFailed(f"it did not finish in {VALIDATOR_TIMEOUT_S // 60} minutes") from None
        try:
            return json.loads(report.read_text())["issues"]["issues"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValidatorFailed(f"exit {proc.returncode}: {_first_error(proc.stderr or proc.stdout)}") from None


VALIDATOR_TIMEOUT_S = 1800


class ValidatorFailed(DiscoveryError):
    """The BIDS validator crashed or gave no report (out of memory under ``ulimit -v``, a file name that is not
    UTF-8): it judged nothing, so the run goes on without it, saying so."""


def _first_error(text):
    """The line of a crash's output that says what went wrong, without colour codes: the first one naming an
    error, else the last one."""
    lines = [" ".join(line.split()) for line in re.sub(r"\x1b\[[0-9;]*m", "", text or "").splitlines()]
    lines = [line for line in lines if line.strip("# =")]
    said = next((line for line in lines if re.search(r"error|fatal|panic|out of memory", line, re.IGNORECASE)),
                lines[-1] if lines else "no output")
    return said[:200]


def validate_dataset(bids_dir, *, reads=None):
    """Run the BIDS validator as fMRIPrep does, scoped to what the run reads (``reads``: the selected images'
    relpaths; None: everything). Returns (error messages, number of errors ignored because they concern
    files the run does not read (other participants, other modalities, stray top-level files) or the content of
    an image it reads, which it judges itself (``_read_by_run``))."""
    errors = [i for i in validator_issues(bids_dir) if i.get("severity") == "error"]
    kept = [i for i in errors if reads is None or _read_by_run(i, reads)]
    return [_issue_text(i) for i in kept], len(errors) - len(kept)


def _issue_text(issue):
    """A validator issue in one line: its code, the key or value it is about (``subCode``), where, and the first
    line of its message (some carry the specification's whole field description)."""
    sub = f" ({issue['subCode']})" if issue.get("subCode") else ""
    message = " ".join((issue.get("issueMessage") or "").strip().split("\n", 1)[0].split())
    message = message if len(message) <= 160 else message[:157] + "..."
    return f"{issue.get('code')}{sub}: {issue.get('location') or ''} {message}".strip()
