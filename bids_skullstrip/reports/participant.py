"""Participant report: <out>/sub-<label>.html, one section per image of every contrast (summary, mosaic, QC
measures + flags)."""

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

from .. import outputs
from .. import qc as qcmod
from ..discovery import strip_prefix
from ..model.inference import model_card
from ..nifti import atomic_write_text
from .common import (
    environment,
    load_record,
    rel_url,
    slug,
)


def _out_keys(measures, contrast):
    """Measures outside their absolute limits, of a flag or of a note (highlighted in the table)."""
    keys = set()
    for key, (low, high, _, _) in {**qcmod.limits_for(contrast), **qcmod.NOTE_LIMITS}.items():
        v = measures.get(key)
        if v is None:
            continue
        if (low is not None and v < low) or (high is not None and v > high):
            keys.add(key)
    return keys


def metrics_by_participant(output_dir, labels):
    """{label: its images' metrics JSON files} for each of ``labels``, from one query of the output dataset (one
    query per participant indexed the folder again each time: 0.1-0.2 s a participant)."""
    found = {label: [] for label in labels}
    for path in outputs.find_outputs(output_dir, "metrics", participant=list(found)):
        found.setdefault(outputs.source_of(path).subject, []).append(path)
    return found


def participant_records(output_dir, label, metrics=None):
    """The records of participant ``label``'s images, from its ``metrics`` files (default: found here)."""
    output_dir = Path(output_dir)
    records = []
    if metrics is None:
        metrics = outputs.find_outputs(output_dir, "metrics", participant=label)
    for path in metrics:
        r = load_record(path, output_dir)
        r["_anchor"] = slug(r["_name"])
        r["_limits"] = qcmod.limits_for(r["_suffix"])
        r["_out_keys"] = _out_keys(r["qc"], r["_suffix"])
        r["_figure_url"] = rel_url(r["_figure"], output_dir) if r["_figure"] else None
        r["_brain_figure_url"] = rel_url(r["_brain_figure"], output_dir) if r["_brain_figure"] else None
        r["_anat_rel"] = rel_url(r["_anat_dir"], output_dir) + "/"
        records.append(r)
    return records


def run_about(records=()):
    """The command line, the networks that made the report's masks (per contrast, as their metrics JSON record
    them; the bundled T1w ones before any) and the environment, for the report's "About this run"."""
    used = {}
    for r in records:
        model, settings = (r.get(k) if isinstance(r.get(k), dict) else {} for k in ("model", "settings"))
        if model:
            key = (model.get("name") or "?", str(model.get("sha256") or "")[:12])
            thresholds = used.setdefault(key, {}).setdefault(r["_suffix"], [])
            if settings.get("threshold", "?") not in thresholds:
                thresholds.append(settings.get("threshold", "?"))
    if not used:
        card = model_card()
        used = {(card.get("name", "?"), str(card.get("sha256", ""))[:12]): {"T1w": [card.get("threshold", "?")]}}

    def networks(name, sha, thresholds):
        if len(thresholds) == 1:
            return f"{name} (sha256 {sha}, threshold {thresholds[0]})"
        return (f"{name} (sha256 {sha}, thresholds {', '.join(map(str, thresholds))}: "
                "they differ between images, each image's settings name its own)")

    suffixes_of = {}
    for (name, sha), per_suffix in used.items():
        for suffix, thresholds in per_suffix.items():
            suffixes_of.setdefault((name, sha, tuple(thresholds)), []).append(suffix)
    lines = [f"{', '.join(suffixes)}: {networks(*key)}" for key, suffixes in suffixes_of.items()]
    container = os.environ.get("BIDS_SKULLSTRIP_CONTAINER")
    return {"command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "model": "; ".join(lines),
            "environment": f"Python {platform.python_version()} on {platform.platform()}"
                           + (f", container {container}" if container else "")}


def reported_participants(output_dir):
    """The labels of the participants with a report or an image's outputs in ``output_dir``."""
    output_dir = Path(output_dir)
    labels = {m.group(1) for p in output_dir.glob("sub-*.html")
              if p.is_file() and (m := re.fullmatch(r"sub-([a-zA-Z0-9]+)\.html", p.name))}
    return labels | {outputs.source_of(p).subject for p in outputs.find_outputs(output_dir, "metrics")}


def participant_report_path(output_dir, participant_label):
    return Path(output_dir) / f"sub-{strip_prefix(participant_label, 'sub-')}.html"


def write_participant_report(output_dir, participant_label, *, errors=(), metrics=None):
    """Write ``<output_dir>/sub-<label>.html`` from the metrics JSON files and figures; return its path.

    ``errors`` are participant-level error messages (e.g. a crashed node) shown at the top; ``metrics`` the
    participant's metrics files where already found (``metrics_by_participant``). Missing or broken metrics files
    do not stop the report: they are reported in it.
    """
    output_dir = Path(output_dir)
    label = strip_prefix(participant_label, "sub-")
    records = participant_records(output_dir, label, metrics)
    shown = {f.name for r in records for f in (r["_figure"], r["_brain_figure"]) if f}
    fig_dir = output_dir / f"sub-{label}" / "figures"
    others = []
    if fig_dir.is_dir():
        for f in sorted(fig_dir.iterdir()):
            if f.suffix.lower() in (".svg", ".png") and f.name not in shown and not f.name.startswith("."):
                if str(outputs.parse_name(f.name).get("subject", label)) == label:
                    others.append({"name": f.name, "url": rel_url(f, output_dir)})
    html = environment().get_template("participant.html").render(
        about=run_about(records),
        label=label,
        records=records,
        n_flagged=sum(1 for r in records if r["flags"]),
        errors=[str(e) for e in errors],
        other_figures=others,
        generated=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    )
    return atomic_write_text(participant_report_path(output_dir, label), html)


