"""What the participant and group reports share: reading the per-image metrics JSON files,
number formatting, the jinja2 environment."""

import json
import math
import re
from pathlib import Path
from urllib.parse import quote

import jinja2

from .. import __version__
from .. import outputs
from .. import qc as qcmod

TEMPLATES = Path(__file__).parent / "templates"

# Descriptions shown next to the QC measures (they and the thresholds live in bids_skullstrip.qc).
MEASURE_HELP = qcmod.MEASURE_HELP


class ReportError(RuntimeError):
    """A report cannot be written (phrased for the user)."""


def runtime_total(runtime):
    if isinstance(runtime, dict):
        vals = [float(v) for v in runtime.values() if _is_number(v)]
        return sum(vals) if vals else None
    return float(runtime) if _is_number(runtime) else None


def _is_number(v):
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _strings(value):
    """A list of messages from what a metrics JSON holds there (a list, one string, or junk)."""
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value] if isinstance(value, list) else []


def load_record(path, output_dir):
    """One metrics JSON as a dict, with derived fields (prefixed ``_``) for the templates.

    Never raises on content problems: a broken file yields a record with an ``_error``.
    """
    path = Path(path)
    output_dir = Path(output_dir)
    image = outputs.source_of(path)
    rec = {}
    error = None
    try:
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        error = (f"{path.name}: unreadable metrics file ({str(exc).splitlines()[0][:150]}): rerun the participant "
                 "level with --overwrite for it")
        rec = {}
    mask = outputs.derivative_path(output_dir, image, "mask")
    if error is None and not mask.is_file():  # its metrics alone made it a finished image (red-team 18)
        error = (f"{mask.name}: the mask is missing (deleted, or not copied with the other outputs?): a rerun of the "
                 "participant level redoes the image")
    rec["bids_name"] = image.stem  # the file's name says which image it is, whatever its content says
    rec["_name"], rec["_suffix"] = image.name, image.suffix
    rec["_participant"], rec["_session"] = image.subject, image.session
    rec["_metrics_path"] = path
    rec["_error"] = error
    rec["_anat_dir"] = path.parent
    qc = rec.get("qc") if isinstance(rec.get("qc"), dict) else {}
    rec["qc"] = {k: (float(v) if _is_number(v) else None) for k, v in qc.items()}
    rec["flags"] = _strings(rec.get("flags"))
    rec["notes"] = _strings(rec.get("notes"))
    rec["warnings"] = _strings(rec.get("warnings"))
    rec["_runtime_total"] = runtime_total(rec.get("runtime_s"))
    figure, brain_figure = (outputs.figure_path(output_dir, image, kind) for kind in outputs.FIGURES)
    rec["_figure"] = figure if figure.exists() else None
    rec["_brain_figure"] = brain_figure if brain_figure.exists() else None
    rec["_image"] = image
    model = rec.get("model")
    if isinstance(model, dict):
        sha = str(model.get("sha256") or "")
        rec["_model"] = f"{model.get('name', '?')} (sha256 {sha[:12]}…)" if sha else str(model.get("name", "?"))
    else:
        rec["_model"] = str(model) if model else "n/a"
    return rec


def rel_url(path, start):
    """Relative URL (quoted) of ``path`` from directory ``start``, for file:// use."""
    rel = Path(path).resolve().relative_to(Path(start).resolve())
    return "/".join(quote(p) for p in rel.parts)


def fmt(v, digits=3):
    """Compact human number; 'n/a' for missing."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        a = abs(v)
        if a >= 100 or v == int(v) and a < 1e6:
            return f"{v:.0f}" if a >= 100 else f"{v:g}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.{digits}f}"
    if isinstance(v, (list, tuple)):
        return " × ".join(fmt(x) for x in v)
    return str(v)


def environment():
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.globals.update(version=__version__, measure_help=MEASURE_HELP, limit_text=qcmod.accepted_range)
    return env


def slug(text):
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-") or "x"


