"""The one place that knows BIDS-Derivatives names, sidecars and ``dataset_description.json``: the paths
of the outputs of a raw T1w (``derivative_path``), and back, the raw T1w of an output (``source_of``) and the
outputs in a folder (``find_outputs``, pybids on the output dataset).

Every file is written atomically (temporary sibling + rename). The per-image metrics JSON is written
last, so its presence marks an image as finished (``is_finished``).
"""

import json
import os
import re
from pathlib import Path

from . import __version__
from .nifti import atomic_write_text, tmp_sibling

CODE_URL = "https://github.com/bids-skullstrip/bids-skullstrip"
BIDS_VERSION = "1.10.0"

# kind -> file name suffix after the source stem (everything before _T1w)
SUFFIXES = {
    "mask": "_desc-brain_mask.nii.gz",
    "preproc": "_desc-preproc_T1w.nii.gz",
    "brain": "_desc-brain_T1w.nii.gz",
    "probseg": "_label-brain_probseg.nii.gz",
    "metrics": "_desc-brain_metrics.json",
}
# figure -> file name suffix: the mask over the T1w, and the skull-stripped T1w on the same layout
FIGURE_SUFFIXES = {"mask": "_desc-brain_mask.svg", "brain": "_desc-brain_T1w.svg"}
BIDSIGNORE = ["*.html", "figures", "*_metrics.json", "group_T1w.tsv", "logs"]  # "figures/" is not enough for the validator


def derivative_path(output_dir, t1w, kind):
    """``<out>/sub-X/[ses-Y/]anat/<stem><suffix>`` for an output ``kind`` of the T1w input ``t1w``."""
    return Path(output_dir) / t1w.anat_dir / f"{t1w.stem}{SUFFIXES[kind]}"


def figure_path(output_dir, t1w, kind="mask"):
    return Path(output_dir) / f"sub-{t1w.subject}" / "figures" / f"{t1w.stem}{FIGURE_SUFFIXES[kind]}"


def parse_name(name):
    """The BIDS entities of a file name, pybids' keys (subject, session, acquisition, run...)."""
    from bids.layout import parse_file_entities

    return parse_file_entities(f"/{Path(name).name}")  # the patterns anchor sub- at a folder boundary


def source_of(output_file):
    """The raw T1w input (``discovery.T1wInput``, located by its name) that an output file was made from."""
    from .discovery import T1wInput

    name = Path(output_file).name
    suffix = next((s for s in (*SUFFIXES.values(), *FIGURE_SUFFIXES.values(), ".json") if name.endswith(s)), None)
    if suffix is None or "sub-" not in name:
        raise ValueError(f"{output_file}: not a bids_skullstrip output name")
    return T1wInput.from_path(name[: -len(suffix)] + "_T1w.nii.gz")


def find_outputs(output_dir, kind, participant=None):
    """The output files of ``kind`` (a key of ``SUFFIXES``) in ``output_dir``, sorted: pybids' query of the
    output dataset by the entities of the name ``derivative_path`` gives them."""
    from bids import BIDSLayout, BIDSLayoutIndexer

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    query = {k: v for k, v in parse_name(f"sub-x{SUFFIXES[kind]}").items() if k != "subject"}
    # only the participant's own folder is indexed: a report per participant then reads one folder, not
    # the whole output dataset each time
    ignore = [re.compile(r"/\.")]  # hidden: a temporary file of a write in progress (pybids' own default)
    if participant is not None:
        ignore.append(re.compile(r"^/(?!sub-" + re.escape(str(participant)) + r"(/|$))"))
    if participant is not None:
        query["subject"] = str(participant)
    layout = BIDSLayout(output_dir, validate=False, config=["bids", "derivatives"], is_derivative=True,
                        indexer=BIDSLayoutIndexer(validate=False, index_metadata=False, ignore=ignore))
    return sorted(Path(f) for f in layout.get(return_type="file", datatype="anat", **query))


def required_kinds(save_probseg):
    return [k for k in SUFFIXES if k != "probseg" or save_probseg]


FAILURES_DIR = "logs/failed"  # <out>/logs/failed/<stem>.json: images whose last run failed (for the group level)


def failure_path(output_dir, t1w):
    return Path(output_dir) / FAILURES_DIR / f"{t1w.stem}.json"


def record_failure(output_dir, t1w, message):
    """Keep a failed image's error where the group level finds it (until the image succeeds)."""
    path = failure_path(output_dir, t1w)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"bids_name": t1w.stem, "source": t1w.source_uri, "error": message},
                                       indent=1) + "\n")


def recorded_failures(output_dir):
    """{bids_name: error} of the images whose last run failed."""
    found = {}
    for path in sorted((Path(output_dir) / FAILURES_DIR).glob("*.json")):
        try:
            found[path.name[: -len(".json")]] = str(json.loads(path.read_text())["error"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def clear_failure(output_dir, t1w):
    failure_path(output_dir, t1w).unlink(missing_ok=True)


def is_finished(output_dir, t1w, *, save_probseg=False):
    return all(derivative_path(output_dir, t1w, k).is_file() for k in required_kinds(save_probseg))


def run_settings(*, threshold, border_mm):
    """Everything that shapes an image's outputs; recorded in its metrics JSON, compared on a rerun."""
    from .model.inference import model_card

    card = model_card()
    return {"threshold": float(threshold), "border_mm": float(border_mm), "model_sha256": card.get("sha256"),
            "locator_sha256": (card.get("locator") or {}).get("sha256"), "software_version": __version__}


def read_metrics(output_dir, t1w):
    """The metrics JSON of ``t1w``'s outputs as a dict; {} where it is missing or unreadable."""
    try:
        metrics = json.loads(derivative_path(output_dir, t1w, "metrics").read_text())
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def qc_flags(output_dir, t1w):
    """The QC flags recorded in the metrics JSON of ``t1w``'s outputs ([] where there are none)."""
    flags = read_metrics(output_dir, t1w).get("flags")
    return [str(f) for f in flags] if isinstance(flags, list) else []


def changed_settings(output_dir, t1w, settings):
    """The settings the finished outputs of ``t1w`` were made with that differ from ``settings``, as
    ``{name: (recorded, now)}`` (outputs of a version that recorded nothing count as all different)."""
    recorded = read_metrics(output_dir, t1w).get("settings")
    recorded = recorded if isinstance(recorded, dict) else {}
    return {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}


def sidecar(kind, t1w, *, threshold=None, border_mm=None):
    """The JSON sidecar of a NIfTI output."""
    raw = t1w.source_uri
    mask_uri = f"bids::{(t1w.anat_dir / (t1w.stem + SUFFIXES['mask'])).as_posix()}"
    if kind == "mask":
        return {"Type": "Brain", "Sources": [raw], "SpatialReference": raw,
                "Description": "Brain mask from the bundled networks (locator + segmenter U-Nets): "
                               "probability >= Threshold, largest "
                               "component, holes filled, grown/shrunk by BorderMM.",
                "Threshold": threshold, "BorderMM": border_mm}
    if kind == "preproc":
        return {"SkullStripped": False, "Sources": [raw],
                "Description": "N4 bias-field corrected T1w (ANTs N4, field estimated at low resolution "
                               "inside the brain mask), on the native grid."}
    if kind == "brain":
        preproc_uri = f"bids::{(t1w.anat_dir / (t1w.stem + SUFFIXES['preproc'])).as_posix()}"
        return {"SkullStripped": True, "Sources": [preproc_uri, mask_uri],
                "Description": "N4 bias-field corrected T1w multiplied by the brain mask."}
    if kind == "probseg":
        return {"Sources": [raw], "SpatialReference": raw,
                "Description": "Brain probability from the bundled networks (locator + segmenter U-Nets), "
                               "native grid."}
    raise KeyError(kind)


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
        "Name": "bids_skullstrip: brain masks and skull-stripped T1w images",
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

Brain masks (`*_desc-brain_mask.nii.gz`), skull-stripped (`*_desc-brain_T1w.nii.gz`) and N4 bias-corrected
(`*_desc-preproc_T1w.nii.gz`) T1-weighted images of the raw dataset named in `dataset_description.json`
(`DatasetLinks.raw`), on the exact voxel grid of each raw image, with QC measures (`*_desc-brain_metrics.json`)
and reports (`sub-<label>.html`, `group_T1w.html`). `logs/CITATION.md` describes the methods, with software
versions and references.
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
    _create_once(output_dir / ".bidsignore", "\n".join(BIDSIGNORE) + "\n")
    _create_once(output_dir / "README.md", README_TEXT)
