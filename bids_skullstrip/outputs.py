"""The one place that knows BIDS-Derivatives names, sidecars and ``dataset_description.json``.

``OUTPUTS`` describes every output kind as data (entities, suffix, extension, data type, sidecar fields); the
names of a raw image's outputs (``derivative_path``, ``figure_path``), the way back from an output to its raw
image (``source_of``), the pybids query of an output dataset (``find_outputs``), the sidecars and the group
tables are all derived from it.

Names follow the nipreps convention for anatomical derivatives: the T1w is the implicit anatomical reference,
so its outputs carry no ``space-`` (``sub-01_desc-brain_mask.nii.gz``); an output of another contrast whose
suffix is not the contrast's own (mask, probseg, metrics) names the image it lies on with ``space-<suffix>``
(``sub-01_space-FLAIR_desc-brain_mask.nii.gz``, as NiBabies names the masks of a T2w reference), and its
sidecar's ``SpatialReference`` points at that image. Outputs that keep the contrast's suffix need no more
(``sub-01_desc-preproc_FLAIR.nii.gz``). Every entity of the source (``ses-``, ``acq-``, ``ce-``, ``rec-``,
``run-``) is kept, so no two inputs share an output name.

Every file is written atomically (temporary sibling + rename). The per-image metrics JSON is written
last, so its presence marks an image as finished (``is_finished``).
"""

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .nifti import atomic_write_text, load_header, tmp_sibling

CODE_URL = "https://github.com/bids-skullstrip/bids-skullstrip"
BIDS_VERSION = "1.10.0"
REFERENCE_SUFFIX = "T1w"  # the implicit anatomical reference: its outputs' names carry no space-


@dataclass(frozen=True)
class Ref:
    """A sidecar value filled per image: ``raw`` (the source's BIDS URI), another output kind (its URI),
    ``threshold`` or ``border_mm`` (the run's settings)."""
    name: str


@dataclass(frozen=True)
class OutputKind:
    entities: tuple  # (entity, value) pairs after the source's own (and after space-, where there is one)
    suffix: str | None  # None: the source's suffix (the image itself, processed)
    extension: str
    dtype: type | None = None  # data type of an image output (None: not an image)
    required: bool = True  # False: only with --save-probseg
    sidecar: dict = field(default_factory=dict)  # sidecar fields, Ref values filled per image


OUTPUTS = {
    "mask": OutputKind((("desc", "brain"),), "mask", ".nii.gz", np.uint8, sidecar={
        "Type": "Brain", "Sources": [Ref("raw")], "SpatialReference": Ref("raw"),
        "Description": "Brain mask from the bundled networks (locator + segmenter U-Nets): probability >= "
                       "Threshold, largest component, holes filled, grown/shrunk by BorderMM.",
        "Threshold": Ref("threshold"), "BorderMM": Ref("border_mm")}),
    "preproc": OutputKind((("desc", "preproc"),), None, ".nii.gz", np.float32, sidecar={
        "SkullStripped": False, "Sources": [Ref("raw")],
        "Description": "N4 bias-field corrected {contrast} (ANTs N4, field estimated at low resolution inside "
                       "the brain mask), on the native grid."}),
    "brain": OutputKind((("desc", "brain"),), None, ".nii.gz", np.float32, sidecar={
        "SkullStripped": True, "Sources": [Ref("preproc"), Ref("mask")],
        "Description": "N4 bias-field corrected {contrast} multiplied by the brain mask."}),
    "probseg": OutputKind((("label", "brain"),), "probseg", ".nii.gz", np.float32, required=False, sidecar={
        "Sources": [Ref("raw")], "SpatialReference": Ref("raw"),
        "Description": "Brain probability from the bundled networks (locator + segmenter U-Nets), native grid."}),
    "metrics": OutputKind((("desc", "brain"),), "metrics", ".json"),
}
FIGURES = ("mask", "brain")  # reportlets, named as these outputs with .svg: the mask over the image, the stripped image
FIGURE_EXTENSION = ".svg"
LOCKS_DIR = "logs/locks"  # <out>/logs/locks/<source name>.lock: held by the run writing that image (ImageLocks)
FAILURES_DIR = "logs/failed"  # <out>/logs/failed/<source name>.json: images whose last run failed (group rows)
# "figures/" is not enough for the validator; group_<suffix>.tsv are the group tables
BIDSIGNORE = ["*.html", "figures", "*_metrics.json", "group_*.tsv", "logs"]


def _tail(kind, suffix, extension=None):
    """What follows the source's entities in the name of output ``kind`` of a ``suffix`` image (``space-`` aside)."""
    spec = OUTPUTS[kind]
    return "".join(f"_{k}-{v}" for k, v in spec.entities) + f"_{spec.suffix or suffix}" + (extension or spec.extension)


def _space(kind, suffix):
    """The ``space-`` entity of output ``kind`` of a ``suffix`` image: the image it lies on, where the kind's suffix
    does not say it ("" for the T1w)."""
    return f"_space-{suffix}" if OUTPUTS[kind].suffix is not None and suffix != REFERENCE_SUFFIX else ""


# a source's entities that BIDS orders after space- (an anatomical image may be in chunks): space- goes before them
# (a chunk-1 FLAIR's mask was sub-01_chunk-1_space-FLAIR_..., a validator error: red-team 18)
_AFTER_SPACE = re.compile(r"_(?:split|recording|chunk)-[a-zA-Z0-9]+")


def output_name(stem, kind, suffix, extension=None):
    """The file name of output ``kind`` of the raw image named ``stem`` (its name without suffix and extension)."""
    after = _AFTER_SPACE.search(stem)
    cut = after.start() if after else len(stem)
    return stem[:cut] + _space(kind, suffix) + stem[cut:] + _tail(kind, suffix, extension)


def derivative_path(output_dir, image, kind):
    """``<out>/sub-X/[ses-Y/]anat/<name>`` of output ``kind`` of the raw image ``image`` (a StructuralInput)."""
    return Path(output_dir) / image.anat_dir / output_name(image.stem, kind, image.suffix)


NAME_MAX = 255  # bytes of one file name on every file system the app writes to


def name_too_long(image):
    """Why ``image`` cannot be processed because an output's file name would be longer than file systems allow
    (its entities make a legal but long name), or None."""
    names = [derivative_path("", image, kind).name for kind in OUTPUTS]
    names += [figure_path("", image, kind).name for kind in FIGURES] + [failure_path("", image).name]
    longest = max(names, key=lambda name: len(name.encode()))
    if len(longest.encode()) > NAME_MAX:
        return (f"{image.relpath}: its output {longest[:40]}... would have a file name of {len(longest.encode())} "
                f"bytes, more than the {NAME_MAX} file systems allow: shorten its entities (acq-, rec-, ...)")
    return None


def not_writable(output_dir, image):
    """Why the outputs of ``image`` cannot be written where they go (its folders, made by an earlier run of
    another user, or on a read-only mount), or None."""
    for folder in (Path(output_dir) / image.anat_dir, figure_path(output_dir, image).parent):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            return (f"{image.relpath}: its output folder {folder} is not writable by this user (made by another "
                    "user's run, or a read-only mount?): give write access to it, or use another output folder")
    return None


def figure_path(output_dir, image, kind="mask"):
    """``<out>/sub-X/figures/<name>.svg``: the reportlet named as output ``kind`` (one of ``FIGURES``)."""
    return Path(output_dir) / f"sub-{image.subject}" / "figures" / output_name(image.stem, kind, image.suffix,
                                                                               FIGURE_EXTENSION)


def image_files(output_dir, image):
    """Every file a run writes for ``image``: its outputs, their sidecars and its figures."""
    paths = [derivative_path(output_dir, image, kind) for kind in OUTPUTS]
    paths += [sidecar_path(p) for p in paths if p.name.endswith(".nii.gz")]
    return paths + [figure_path(output_dir, image, kind) for kind in FIGURES]


def parse_name(name):
    """The BIDS entities of a file name, pybids' keys (subject, session, acquisition, run...)."""
    from bids.layout import parse_file_entities

    return parse_file_entities(f"/{Path(name).name}")  # the patterns anchor sub- at a folder boundary


def source_of(output_file):
    """The raw image (``discovery.StructuralInput``, located by its name) an output file was made from: the
    output's own suffix where the kind keeps it, its ``space-`` otherwise (none: the T1w)."""
    from .discovery import CONTRASTS, StructuralInput

    name = Path(output_file).name
    entities = parse_name(name)
    for kind, spec in OUTPUTS.items():
        suffix = entities.get("suffix") if spec.suffix is None else entities.get("space", REFERENCE_SUFFIX)
        if suffix not in CONTRASTS:
            continue
        space = _space(kind, suffix)
        for extension in (spec.extension, FIGURE_EXTENSION, ".json"):
            tail = _tail(kind, suffix, extension)
            stem = name[: -len(tail)]
            if name.endswith(tail) and name.startswith("sub-") and stem and (not space or space in stem):
                stem = stem.replace(space, "", 1)
                if output_name(stem, kind, suffix, extension) == name:
                    return StructuralInput.from_path(f"{stem}_{suffix}.nii.gz")
    raise ValueError(f"{output_file}: not a bids_skullstrip output name")


def find_outputs(output_dir, kind, participant=None, suffix=None):
    """The output files of ``kind`` (a key of ``OUTPUTS``) in ``output_dir``, sorted: pybids' query of the
    output dataset by the entities ``OUTPUTS`` gives them; only those of ``suffix`` images where given, and of
    ``participant`` (a label, or several) where given."""
    import re

    from bids import BIDSLayout, BIDSLayoutIndexer
    from bids.layout import Query

    from .discovery import CONTRASTS

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    spec = OUTPUTS[kind]
    query = {"datatype": "anat", "extension": spec.extension, **dict(spec.entities),
             "suffix": spec.suffix or (suffix or list(CONTRASTS))}
    if spec.suffix is not None and suffix is not None:
        query["space"] = Query.NONE if suffix == REFERENCE_SUFFIX else suffix
    # only the participant's own folder is indexed: a report per participant then reads one folder, not
    # the whole output dataset each time
    ignore = [re.compile(r"/\.")]  # hidden: a temporary file of a write in progress (pybids' own default)
    if participant is not None:
        labels = [str(participant)] if isinstance(participant, str) else [str(p) for p in participant]
        if not labels:
            return []
        ignore.append(re.compile(r"^/(?!sub-(?:" + "|".join(map(re.escape, labels)) + r")(/|$))"))
        query["subject"] = labels
    layout = BIDSLayout(output_dir, validate=False, config=["bids", "derivatives"], is_derivative=True,
                        indexer=BIDSLayoutIndexer(validate=False, index_metadata=False, ignore=ignore))
    return sorted(Path(f) for f in layout.get(return_type="file", **query))


def required_kinds(save_probseg):
    return [k for k, spec in OUTPUTS.items() if spec.required or save_probseg]


class ImageLocks:
    """The images a run is writing, each held by an advisory lock (``flock``) on ``<folder>/<source name>.lock`` for
    as long as the run lives, so that a second run (a relaunched job, overlapping labels of a job array, the same
    work directory given twice) leaves them to it. The kernel releases a lock when its process dies, however it
    dies: a killed run never leaves an image locked. A file system without ``flock`` locks nothing (as before)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.held = {}  # image: file descriptor

    def claim(self, image):
        """Lock ``image``: None, or who holds it ("pid N on HOST since T")."""
        import fcntl
        import socket
        import time

        path = self.folder / f"{image.name}.lock"
        while True:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was removed by the last holder of its last lock, just now
                continue
            except OSError:  # no room for a lock file (a full disk): the image's own writes will say so
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                return holder or "another run"
            except OSError:  # no flock here (Lustre without -o flock)
                os.close(fd)
                return None
            try:  # its last holder may have removed the file between our open and our lock: lock the one there
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        with contextlib.suppress(OSError):  # who holds it, for the other run's message (a full disk: the lock only)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode())
        self.held[image] = fd
        return None

    def release(self, image=None):
        """Unlock ``image`` (default: every image this object holds)."""
        for held in [image] if image is not None else list(self.held):
            fd = self.held.pop(held, None)
            if fd is not None:
                try:
                    (self.folder / f"{held.name}.lock").unlink(missing_ok=True)
                finally:
                    os.close(fd)
        with contextlib.suppress(OSError):  # the last lock of any run: no empty folder left behind
            self.folder.rmdir()

    def others(self):
        """Who holds the locks of this folder that this object does not: the runs busy with images there."""
        import fcntl

        holders = []
        for path in sorted(self.folder.glob("*.lock")):
            if any(path.name == f"{image.name}.lock" for image in self.held):
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:  # released and removed just now
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holders.append(os.pread(fd, 200, 0).decode(errors="replace").strip() or "another run")
            except OSError:  # no flock here: nothing is known to be held
                pass
            finally:
                os.close(fd)
        return holders


def locks_of(output_dir, work_dir):
    """The run's locks of its images: in the output folder (any run writing them) and in the work directory (any
    run using its nodes' folders for them, into whichever output folder)."""
    return ImageLocks(Path(output_dir) / LOCKS_DIR), ImageLocks(Path(work_dir) / ".locks")


def failure_path(output_dir, image):
    return Path(output_dir) / FAILURES_DIR / f"{image.name}.json"


def record_failure(output_dir, image, message):
    """Keep a failed image's error where the group level finds it (until the image succeeds)."""
    path = failure_path(output_dir, image)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"bids_name": image.stem, "source": image.source_uri, "error": message},
                                       indent=1) + "\n")


def recorded_failures(output_dir):
    """[(StructuralInput, error)] of the images whose last run failed. The image's ``path`` is its ``source``
    relative to the dataset, as recorded. A record not named as its image's (``failure_path``: 0.1.0's
    ``<stem>.json``, which no success removes) or not an image's is skipped."""
    from .discovery import StructuralInput

    found = []
    for path in sorted((Path(output_dir) / FAILURES_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            image = StructuralInput.from_path(str(record["source"]).removeprefix("bids:raw:"))
            if path.name == failure_path(output_dir, image).name:
                found.append((image, str(record["error"])))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return found


def clear_failure(output_dir, image):
    failure_path(output_dir, image).unlink(missing_ok=True)


def is_finished(output_dir, image, *, save_probseg=False):
    return missing_kind(output_dir, image, save_probseg=save_probseg) is None


def missing_kind(output_dir, image, *, save_probseg=False):
    """The first output of ``image`` that is not there (the metrics JSON, written last, marks it finished)."""
    return next((k for k in required_kinds(save_probseg) if not derivative_path(output_dir, image, k).is_file()),
                None)


def source_identity(image):
    """The raw file of ``image`` (links followed) as its metrics JSON records it: size, modification time, sha256."""
    stat = os.stat(image.path)
    return {"size_bytes": stat.st_size, "modified_ns": stat.st_mtime_ns, "sha256": _sha256(image.path)}


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def replaced_source(output_dir, image):
    """Why the finished outputs of ``image`` were made from another file, or None: the raw file's size or time
    differs from the one its metrics JSON records and so do its bytes (re-converted, defaced, another dataset's
    image of the same name: red-team 18, kept as finished with the old head's mask). A copy of the same bytes is
    the same image; outputs of a version that recorded no source file are not judged."""
    recorded = read_metrics(output_dir, image).get("source_file")
    try:
        stat = os.stat(image.path)
        if not isinstance(recorded, dict) or (recorded.get("size_bytes"), recorded.get("modified_ns")) == (
                stat.st_size, stat.st_mtime_ns) or recorded.get("sha256") == _sha256(image.path):
            return None
    except OSError:  # the raw image itself is judged when it is read
        return None
    return "the raw image is not the file its outputs were made from (changed or replaced since: another sha256)"


def damaged(output_dir, image, *, save_probseg=False):
    """Why the finished outputs of ``image`` cannot be trusted, or None: made from another raw file
    (``replaced_source``), a metrics file or sidecar that is not a JSON object, a NIfTI whose header does not read or
    whose grid is not the raw image's (outputs damaged or replaced after the run; the files are written atomically,
    so a run itself leaves none of these). Reads the headers and the JSON only: a NIfTI cut short after its header
    is not seen."""
    import nibabel as nib

    replaced = replaced_source(output_dir, image)
    if replaced:
        return replaced
    try:
        shape = load_header(image.path).shape[:3]
    except Exception:  # the raw image itself is judged when it is read
        return None
    for kind in required_kinds(save_probseg):
        path = derivative_path(output_dir, image, kind)
        jsons = [path] if path.suffix == ".json" else [sidecar_path(path)] if OUTPUTS[kind].sidecar else []
        for json_file in jsons:
            try:
                ok = isinstance(json.loads(json_file.read_text()), dict)
            except (OSError, ValueError):
                ok = False
            if not ok:
                return f"{json_file.name} is missing or not a JSON object"
        if path.suffix != ".json":
            try:
                found = nib.load(str(path)).shape[:3]
            except Exception:
                return f"{path.name} does not read as a NIfTI image"
            if tuple(found) != tuple(shape):
                return f"{path.name} has the shape {'x'.join(map(str, found))}, not the raw image's"
    return None


def unmark_finished(output_dir, image):
    """Remove the metrics JSON, written last, that marks ``image`` as finished: before its outputs are redone, so
    that a run stopped or failing half-way leaves it to redo, never old and new files under one record."""
    derivative_path(output_dir, image, "metrics").unlink(missing_ok=True)


def run_settings(image, *, threshold, border_mm):
    """Everything that shapes ``image``'s outputs (its contrast's bundled networks; ``threshold`` None: theirs);
    recorded in its metrics JSON, compared on a rerun."""
    from .model.card import ModelCard

    card = ModelCard.bundled_for(image.suffix)
    return {"threshold": float(card.threshold if threshold is None else threshold), "border_mm": float(border_mm),
            "model_sha256": card.sha256, "locator_sha256": card.locator_sha256, "software_version": __version__}


def read_metrics(output_dir, image):
    """The metrics JSON of ``image``'s outputs as a dict; {} where it is missing or unreadable."""
    try:
        metrics = json.loads(derivative_path(output_dir, image, "metrics").read_text())
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def qc_flags(output_dir, image):
    """The QC flags recorded in the metrics JSON of ``image``'s outputs ([] where there are none)."""
    flags = read_metrics(output_dir, image).get("flags")
    return [str(f) for f in flags] if isinstance(flags, list) else []


def recorded_warnings(output_dir, image):
    """The warnings recorded in the metrics JSON of ``image``'s outputs (doubts about the input and the result: a
    slab of a field of view, no brain found, a skull-stripped input), without the path of the file they name."""
    found = read_metrics(output_dir, image).get("warnings")
    return [re.sub(r"^.*?\.nii(\.gz)?: ", "", str(w)) for w in found] if isinstance(found, list) else []


def changed_settings(output_dir, image, settings):
    """The settings the finished outputs of ``image`` were made with that differ from ``settings``, as
    ``{name: (recorded, now)}`` (outputs of a version that recorded nothing count as all different)."""
    recorded = read_metrics(output_dir, image).get("settings")
    recorded = recorded if isinstance(recorded, dict) else {}
    return {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}


def sidecar(kind, image, *, threshold=None, border_mm=None):
    """The JSON sidecar of a NIfTI output: ``OUTPUTS[kind].sidecar`` filled for ``image`` and the settings."""
    def uri(k):
        return f"bids::{derivative_path('', image, k).as_posix()}"

    refs = {"raw": image.source_uri, "threshold": threshold, "border_mm": border_mm}

    def fill(value):
        if isinstance(value, Ref):
            return refs[value.name] if value.name in refs else uri(value.name)
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value.format(contrast=image.suffix) if isinstance(value, str) else value

    return {k: fill(v) for k, v in OUTPUTS[kind].sidecar.items()}


def sidecar_path(nifti_path):
    name = Path(nifti_path).name
    return Path(nifti_path).with_name(name[: name.rindex(".nii")] + ".json")


def write_sidecar(nifti_path, content):
    atomic_write_text(sidecar_path(nifti_path), json.dumps(content, indent=2) + "\n")


def container_info():
    kind = os.environ.get("BIDS_SKULLSTRIP_CONTAINER")
    if not kind:
        return None
    return {"Type": kind, "Tag": os.environ.get("BIDS_SKULLSTRIP_IMAGE_TAG", f"bids_skullstrip:{__version__}")}


def _raw_authors(bids_dir):
    """The raw dataset's Authors: derivatives of their data keep their names (and the validator's
    TOO_FEW_AUTHORS warning away where they list two or more)."""
    try:
        authors = json.loads((Path(bids_dir) / "dataset_description.json").read_text()).get("Authors")
    except (OSError, ValueError, AttributeError):
        return []
    return [str(a) for a in authors] if isinstance(authors, list) else []


def dataset_description(bids_dir):
    generated_by = {"Name": "bids_skullstrip", "Version": __version__, "CodeURL": CODE_URL}
    container = container_info()
    if container:
        generated_by["Container"] = container
    raw_uri = Path(bids_dir).resolve().as_uri()
    description = {
        "Name": "bids_skullstrip: brain masks and skull-stripped structural images",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [{"URL": raw_uri}],
        "DatasetLinks": {"raw": raw_uri},
    }
    authors = _raw_authors(bids_dir)
    if authors:
        description["Authors"] = authors
    return description


README_TEXT = """# bids_skullstrip derivatives

Brain masks (`*_desc-brain_mask.nii.gz`), skull-stripped (`*_desc-brain_<suffix>.nii.gz`) and N4 bias-corrected
(`*_desc-preproc_<suffix>.nii.gz`) structural images (T1w, and T2w, FLAIR, PDw... where asked for) of the raw
dataset named in `dataset_description.json` (`DatasetLinks.raw`), on the exact voxel grid of each raw image,
with QC measures (`*_desc-brain_metrics.json`) and reports (`sub-<label>.html`, `group_<suffix>.html`).
Outputs of a T1w carry no `space-` entity; a mask, probability map or metrics file of another contrast names
the image it lies on with `space-<suffix>` (`sub-01_space-FLAIR_desc-brain_mask.nii.gz`).
`logs/CITATION.md` describes the methods, with software versions and references.
"""


def _create_once(path, text):
    """Create ``path`` with ``text`` unless it exists; atomic and race-free between processes."""
    if path.exists():
        return False
    tmp = tmp_sibling(path)
    try:
        tmp.write_text(text)
        os.link(tmp, path)  # fails if another run created the file first: nobody sees a partial file
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def init_output_dir(output_dir, bids_dir):
    """``dataset_description.json`` and ``.bidsignore``, written once even with concurrent runs."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _create_once(output_dir / "dataset_description.json",
                 json.dumps(dataset_description(bids_dir), indent=2) + "\n")
    if not _create_once(output_dir / ".bidsignore", "\n".join(BIDSIGNORE) + "\n"):
        # an output folder of an earlier version ignores group_T1w.tsv only: the other contrasts' tables would
        # be validator warnings. Its own lines are kept, the missing ones added (the same text from any run).
        ignored = (output_dir / ".bidsignore").read_text().splitlines()
        missing = [line for line in BIDSIGNORE if line not in ignored]
        if missing:
            atomic_write_text(output_dir / ".bidsignore", "\n".join(ignored + missing) + "\n")
    _create_once(output_dir / "README.md", README_TEXT)
