"""Group report, one per contrast: <out>/group_<suffix>.tsv (one row per image, MRIQC convention) and
<out>/group_<suffix>.html (distributions, sortable table with thumbnails and links to the participant reports,
flagged images first): ``group_T1w.*`` for the T1w images (contrast-enhanced ones included, with their
``ce_id``), ``group_FLAIR.*`` for the FLAIR images, and so on. Each contrast is its own group: its measures
are compared among images of that contrast only."""

import csv
import datetime
import io
import logging
import math
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .. import qc as qcmod  # noqa: E402
from ..nifti import atomic_file, atomic_write_text  # noqa: E402
from .. import outputs  # noqa: E402
from .common import (  # noqa: E402
    ReportError, environment, load_record, rel_url, slug)

FIG_DIR = "figures"  # <out>/figures/ (ignored by .bidsignore's "figures/")
SKIP_COLUMNS = ("brain_voxels",)
# what shaped each image's outputs (the metrics JSON's "settings"): a column each; a warning when they differ
SETTINGS = ("threshold", "border_mm", "model_sha256", "software_version")

log = logging.getLogger("bids_skullstrip")


def _failed_records(output_dir, processed):
    """Rows for the images whose last participant run failed (``outputs.record_failure``): failed, not flagged
    (a flag judges a mask, and there is none). One with earlier outputs (``processed``, its rows) is failed too, as
    the participant level said (the image is there twice now, its content is missing): that row, with its error."""
    rows = []
    for image, error in outputs.recorded_failures(output_dir):
        if image.name in processed:
            processed[image.name].update(_status="failed", _error=error, flags=[], notes=[])
            continue
        rows.append({"bids_name": image.stem, "_name": image.name, "_suffix": image.suffix, "_image": image,
                     "_participant": image.subject, "_session": image.session, "_status": "failed",
                     "_error": error, "qc": {}, "flags": [], "notes": [], "_runtime_total": None,
                     "_figure": None})
    return rows


RULE_TEXTS = tuple(text for _, _, _, text in qcmod.LIMITS.values())


def _records(output_dir, participants=None):
    """{suffix: records} of ``participants`` (all where None), each contrast's flagged (and noted) by the group
    rule among its own images."""
    records = [load_record(p, output_dir) for p in outputs.find_outputs(output_dir, "metrics")]
    for r in records:
        r["_status"] = "processed"
    records += _failed_records(output_dir, {r["_name"]: r for r in records})
    if participants:
        unknown = sorted(set(participants) - {r["_participant"] for r in records})
        if unknown and len(unknown) < len(participants):  # as the participant level: not a report short of them
            raise ReportError(f"{output_dir}: participant label(s) with no processed image: {', '.join(unknown)} "
                              f"(the output folder has {', '.join(sorted({r['_participant'] for r in records}))})")
        records = [r for r in records if r["_participant"] in participants]
    if not records:
        whose = f" of participant(s) {', '.join(sorted(participants))}" if participants else ""
        raise ReportError(
            f"{output_dir}: no per-image metrics{whose} found (sub-*/[ses-*/]anat/*_desc-brain_metrics.json); "
            "run the participant level first")
    by_suffix = {}
    for suffix in sorted({r["_suffix"] for r in records}):
        processed = [r for r in records if r["_suffix"] == suffix and r["_status"] == "processed"]
        rows = [r["qc"] for r in processed]
        for r, flags, notes in zip(processed, qcmod.flag_group(rows, suffix), qcmod.note_group(rows, suffix)):
            if r["_error"]:  # an unreadable metrics file (no measures), a missing mask
                flags = [r["_error"], *(flags if r["qc"] else [])]
            # recomputed flags (current rules + group outliers) first, then any other stored flag: not one of a rule
            # on the measures, which the current rules of the image's contrast judge again
            r["flags"] = flags + [f for f in r["flags"] if f not in flags and not f.startswith(RULE_TEXTS)]
            r["notes"] = notes + [n for n in r["notes"] if n not in notes]
        rows = [r for r in records if r["_suffix"] == suffix]
        rows.sort(key=lambda r: (r["_status"] != "failed", -len(r["flags"]), r["bids_name"]))
        by_suffix[suffix] = rows
    return by_suffix


def flagged_images(output_dir, participants=None):
    """[(image name, its flags)] of the processed images that the group reports of ``output_dir`` flag (the group
    rule included), of ``participants`` only where given: what ``--fail-on-flag`` fails on at the group level."""
    return [(r["_name"], r["flags"]) for records in _records(output_dir, _labels(participants)).values()
            for r in records if r["_status"] == "processed" and r["flags"]]


def _labels(participants):
    """``--participant-label``'s labels without ``sub-`` (empty: every participant)."""
    from ..discovery import strip_prefix

    return {strip_prefix(p, "sub-") for p in participants or ()}


def _setting(r, key):
    settings = r.get("settings")
    return settings.get(key) if isinstance(settings, dict) else None


def mixed_settings(records):
    """{setting: Counter of its values} for the settings that differ between the processed images (those whose
    metrics JSON records them: an unreadable one is named on its own)."""
    processed = [r for r in records if r["_status"] == "processed" and isinstance(r.get("settings"), dict)]
    counts = {key: Counter(_tsv_value(_setting(r, key)) for r in processed) for key in SETTINGS}
    return {key: c for key, c in counts.items() if len(c) > 1}


ENTITY_COLUMNS = (("acquisition", "acq_id"), ("ceagent", "ce_id"), ("reconstruction", "rec_id"), ("run", "run_id"),
                  ("echo", "echo_id"), ("inv", "inv_id"), ("part", "part_id"), ("chunk", "chunk_id"),
                  ("suffix", "suffix"))  # the suffix too: the tables of every contrast can be joined


def _measure_keys(records):
    keys = []
    for r in records:
        for k in r["qc"]:
            if k not in keys and k not in SKIP_COLUMNS and k != "brain_volume_ml":
                keys.append(k)
    return keys


def _tsv_value(v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_tsv(records, path):
    keys = _measure_keys(records)
    # participant_id / session_id (and the other entities) join participants.tsv and sessions.tsv
    header = (["bids_name", "participant_id", "session_id"] + [c for _, c in ENTITY_COLUMNS]
              + ["status", "brain_volume_ml", "brain_voxels", "size_x", "size_y", "size_z",
                 "spacing_x", "spacing_y", "spacing_z", "orientation", "runtime_s", *SETTINGS] + keys
              + ["n_flags", "flags", "notes", "error"])
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(header)
    for r in records:
        shape = list(r.get("shape") or [None] * 3)[:3] + [None] * 3
        vox = list(r.get("voxel_size_mm") or [None] * 3)[:3] + [None] * 3
        vol = r.get("brain_volume_ml", r["qc"].get("brain_volume_ml"))
        ent = outputs.parse_name(r["_image"].path.name)
        row = ([r["bids_name"], f"sub-{r['_participant']}", f"ses-{r['_session']}" if r["_session"] else None]
               + [ent.get(e) for e, _ in ENTITY_COLUMNS] + [r["_status"]]
               + [vol, r.get("brain_voxels", r["qc"].get("brain_voxels"))] + shape[:3] + vox[:3]
               + [r.get("orientation"), r["_runtime_total"]] + [_setting(r, k) for k in SETTINGS]
               + [r["qc"].get(k) for k in keys]
               + [len(r["flags"])] + ["; ".join(f.replace("\t", " ") for f in r[k]) for k in ("flags", "notes")]
               + [r["_error"] if r["_status"] == "failed" else None])
        w.writerow([_tsv_value(v) for v in row])
    return atomic_write_text(path, buf.getvalue())


def plot_distributions(records, out_file):
    """One strip plot per measure (brain volume first); flagged images red; absolute limits dashed; the
    group median a solid line. Plain tick labels (no offset notation), few enough not to overlap."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    keys = ["brain_volume_ml"] + [k for k in _measure_keys(records) if k != "n_extra_components"]
    ncols = 4
    nrows = int(math.ceil(len(keys) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 1.25 * nrows + 0.2), squeeze=False)
    rng = np.random.default_rng(0)
    records = [r for r in records if r["_status"] == "processed"]
    flagged = np.array([bool(r["flags"]) for r in records], dtype=bool)
    for ax, key in zip(axes.ravel(), keys):
        vals = np.array([r["qc"].get(key) if r["qc"].get(key) is not None else np.nan for r in records], float)
        ok = np.isfinite(vals)
        jitter = rng.uniform(-0.3, 0.3, len(vals))
        ax.scatter(vals[ok & ~flagged], jitter[ok & ~flagged], s=12, color="#1f5f99", alpha=0.75, lw=0)
        ax.scatter(vals[ok & flagged], jitter[ok & flagged], s=16, color="#d62728", alpha=0.9, lw=0)
        low, high, unit, _ = qcmod.LIMITS.get(key) or qcmod.NOTE_LIMITS.get(key) or (None, None, "", "")
        for lim in (low, high):
            if lim is not None:
                ax.axvline(lim, color="#888", ls="--", lw=0.8)
        if ok.any():
            lo, hi = np.nanmin(vals), np.nanmax(vals)
            for lim in (low, high):
                if lim is not None:
                    lo, hi = min(lo, lim), max(hi, lim)
            pad = 0.08 * (hi - lo) if hi > lo else (abs(hi) * 0.1 or 1)
            ax.set_xlim(lo - pad, hi + pad)
            ax.axvline(np.nanmedian(vals), color="#1f5f99", lw=0.8, alpha=0.5)
        ax.set_ylim(-0.5, 0.5)
        ax.set_yticks([])
        shown = key[: -len(unit) - 1] if unit and key.endswith("_" + unit) else key
        ax.set_title(shown.replace("_", " ") + (f" ({unit})" if unit else ""), fontsize=8.5, loc="left")
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        formatter = ScalarFormatter(useOffset=False)
        formatter.set_scientific(False)
        ax.xaxis.set_major_formatter(formatter)
        for s in ("top", "right", "left"):
            ax.spines[s].set_visible(False)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    fig.tight_layout(h_pad=0.6)
    out_file = Path(out_file)
    try:
        with atomic_file(out_file) as tmp, matplotlib.rc_context({"svg.fonttype": "none",
                                                                   "svg.hashsalt": "bids_skullstrip"}):
            fig.savefig(tmp, format="svg", metadata={"Date": None})
    finally:
        plt.close(fig)
    return out_file


def _thumbnail(r, output_dir, fig_dir):
    """Thumbnail PNG from the preprocessed image + mask (cached: redone when the mask is newer)."""
    from .reportlets import plot_thumbnail

    image, mask = (outputs.derivative_path(output_dir, r["_image"], kind) for kind in ("preproc", "mask"))
    if not (image.exists() and mask.exists()):
        return None
    out = fig_dir / f"{r['_name']}_thumb.png"
    try:
        if not out.exists() or out.stat().st_mtime < max(mask.stat().st_mtime, image.stat().st_mtime):
            plot_thumbnail(image, mask, out)
    except Exception:  # a broken image must not stop the group report; the mosaic is used instead
        return None
    return out


GONE_NOTE = "no longer in the dataset: removed or renamed since the participant level ran it"


def write_group_report(output_dir, *, participants=None, thumbnails=True, dataset=None):
    """Write ``group_<suffix>.tsv`` and ``group_<suffix>.html`` in ``output_dir`` for every contrast that has
    images there (of ``participants`` only, labels with or without ``sub-``, where given); return their paths,
    (tsv, html) per contrast in turn. Settings that differ between the images are logged as a warning. ``dataset``:
    the images the dataset has (``discovery.StructuralInput``), where known: a row of another gets a note
    (``GONE_NOTE``), and each contrast's report says what it lacks of the dataset and holds that it no longer has.

    Raises ReportError when no per-image metrics JSON exists.
    """
    from ..discovery import CONTRASTS

    output_dir = Path(output_dir)
    wanted = _labels(participants)
    written = []
    found = _records(output_dir, wanted)
    names = None if dataset is None else {t.name for t in dataset}
    selected = [t for t in dataset or () if not wanted or t.subject in wanted]  # the dataset's images reported on
    for r in (r for records in found.values() for r in records):
        if names is not None and r["_name"] not in names and GONE_NOTE not in r["notes"]:
            r["notes"].append(GONE_NOTE)
    for suffix, records in found.items():
        written += _write_contrast(output_dir, suffix, records, thumbnails=thumbnails, selection=sorted(wanted))
        if dataset is not None:
            _say_out_of_step(suffix, records, selected)
    for suffix, images in _contrasts_without_outputs(selected, found).items():
        log.info("group_%s: none: none of the dataset's %d %s image(s) is in the output folder (not processed yet, or "
                 "not asked for: the participant level's --contrasts); first: %s", suffix, len(images), suffix,
                 images[0].relpath)
    if wanted:
        log.warning("the group reports hold participant(s) %s only (--participant-label): the others' images are "
                    "not in them; run the group level without it for the whole dataset", ", ".join(sorted(wanted)))
        earlier = [f"group_{c}" for c in CONTRASTS if c not in found and (output_dir / f"group_{c}.html").is_file()]
        if earlier:  # of contrasts these participants have no image of: not theirs, left as an earlier run wrote them
            log.warning("%s: not rewritten (participant(s) %s have no such image): as an earlier group run wrote them",
                        ", ".join(earlier), ", ".join(sorted(wanted)))
    else:  # the whole folder: a contrast whose outputs are all gone keeps no report of them
        for suffix in (c for c in CONTRASTS if c not in found):
            stale = [p for p in (output_dir / f"group_{suffix}.tsv", output_dir / f"group_{suffix}.html",
                                 output_dir / FIG_DIR / f"group_{suffix}_distributions.svg") if p.is_file()]
            for path in stale:
                path.unlink()
            if stale:
                log.warning("removed the group report of %s (%s): no %s outputs are left", suffix,
                            ", ".join(p.name for p in stale), suffix)
    return written


def _contrasts_without_outputs(images, found):
    """{suffix: its images} of the contrasts of ``images`` that have no report in ``found``: a contrast of none was
    left out in silence (red-team 18)."""
    absent = {}
    for image in images:
        if image.suffix not in found:
            absent.setdefault(image.suffix, []).append(image)
    return dict(sorted(absent.items()))


def _say_out_of_step(suffix, records, dataset):
    """One line if the report of ``suffix`` lacks images of the dataset (a run stopped half-way, or still going on),
    one if it holds images the dataset no longer has (removed or renamed since they were processed): how many, and
    the first."""
    reported = {r["_name"] for r in records}
    missing = [t for t in dataset if t.suffix == suffix and t.name not in reported]
    if missing:
        log.warning("group_%s: %d %s image(s) of the dataset are not in it: not processed (yet), or left out by the "
                    "participant level's selection; first: %s", suffix, len(missing), suffix, missing[0].relpath)
    gone = sorted(r["_name"] for r in records if GONE_NOTE in r["notes"])
    if gone:
        log.warning("group_%s: %d image(s) in it are no longer in the dataset (removed or renamed since the "
                    "participant level ran them); first: %s", suffix, len(gone), gone[0])


def _write_contrast(output_dir, suffix, records, *, thumbnails, selection=()):
    fig_dir = output_dir / FIG_DIR
    name = f"group_{suffix}"
    tsv_path = write_tsv(records, output_dir / f"{name}.tsv")
    dist = plot_distributions(records, fig_dir / f"{name}_distributions.svg")
    for r in records:
        thumb = _thumbnail(r, output_dir, fig_dir) if thumbnails and r["_status"] == "processed" else None
        thumb = thumb or r["_figure"]
        r["_thumb_url"] = rel_url(thumb, output_dir) if thumb else None
        # the image's section of its participant's report; a failed image is listed under that report's errors;
        # no link while the report is not written yet (the group level run during a participant run)
        report = f"sub-{r['_participant']}.html"
        anchor = "errors" if r["_status"] == "failed" else slug(r["_name"])
        r["_report_url"] = f"{report}#{anchor}" if (output_dir / report).is_file() else None
    for r in records:
        if r["_status"] == "processed" and r["_error"]:
            log.warning("%s: %s (flagged)", name, r["_error"])
    mixed = mixed_settings(records)
    for key, counts in mixed.items():
        log.warning("%s: the %s images were not all processed with the same %s: %s", name, suffix, key,
                    ", ".join(f"{v} ({n})" for v, n in counts.most_common()))
    html = environment().get_template("group.html").render(
        rows=records,
        contrast=suffix,
        limits=qcmod.limits_for(suffix),
        measure_keys=_measure_keys(records),
        settings=SETTINGS,
        mixed={key: ", ".join(f"{v} ({n} image{'s' if n > 1 else ''})" for v, n in c.most_common())
               for key, c in mixed.items()},
        n_flagged=sum(1 for r in records if r["flags"]),
        n_noted=sum(1 for r in records if r["notes"]),
        n_failed=sum(1 for r in records if r["_status"] == "failed"),
        n_participants=len({r["_participant"] for r in records}),
        selection=selection,
        group_z=sum(r["_status"] == "processed" for r in records) >= qcmod.GROUP_MIN_IMAGES,
        min_group=qcmod.GROUP_MIN_IMAGES,
        dist_url=rel_url(dist, output_dir),
        tsv_name=tsv_path.name,
        generated=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    )
    html_path = atomic_write_text(output_dir / f"{name}.html", html)
    n_processed = sum(r["_status"] == "processed" for r in records)
    log.info("%s: %d image(s): %d processed (%d flagged by QC), %d failed", name, len(records), n_processed,
             sum(1 for r in records if r["flags"] and r["_status"] == "processed"), len(records) - n_processed)
    return [Path(tsv_path), Path(html_path)]
