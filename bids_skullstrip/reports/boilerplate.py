"""The methods text users paste into a paper (fMRIPrep's CITATION files): what was done, with which versions
and references; written to ``<out>/logs/CITATION.md`` and ``.html`` after every participant run.

It describes what the outputs hold (each image's contrast, threshold, border and model, from its metrics JSON),
not the last command line, and says so when images of one contrast were not all made the same way. The model's
part comes from its ``ModelCard``, so it cannot drift from the weights.
"""

import importlib.metadata
import json
from collections import Counter
from pathlib import Path

from .. import __version__, geometry
from ..model.card import BUNDLED_DIRS, ModelCard
from ..nifti import atomic_write_text

REFERENCES = {
    "bids_skullstrip": f"bids_skullstrip {__version__}: skull-stripping of structural MRI as a BIDS App. "
                       "https://github.com/bids-skullstrip/bids-skullstrip (see CITATION.cff)",
    "n4": "Tustison NJ, Avants BB, Cook PA, et al. N4ITK: improved N3 bias correction. IEEE Trans Med Imaging "
          "29(6):1310-1320, 2010. doi:10.1109/TMI.2010.2046908",
    "unet": "Çiçek Ö, Abdulkadir A, Lienkamp SS, Brox T, Ronneberger O. 3D U-Net: learning dense volumetric "
            "segmentation from sparse annotation. MICCAI 2016. doi:10.1007/978-3-319-46723-8_49",
    "nipype": "Gorgolewski K, Burns CD, Madison C, et al. Nipype: a flexible, lightweight and extensible "
              "neuroimaging data processing framework in Python. Front Neuroinform 5:13, 2011. "
              "doi:10.3389/fninf.2011.00013",
    "pybids": "Yarkoni T, Markiewicz CJ, de la Vega A, et al. PyBIDS: Python tools for BIDS datasets. "
              "J Open Source Softw 4(40):1294, 2019. doi:10.21105/joss.01294",
    "ants": "Avants BB, Tustison NJ, Song G, et al. A reproducible evaluation of ANTs similarity metric "
            "performance in brain image registration. NeuroImage 54(3):2033-2044, 2011. "
            "doi:10.1016/j.neuroimage.2010.09.025",
}


def _version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def recorded_settings(output_dir):
    """{raw file name: (suffix, threshold, border_mm, model sha256)} of every image whose outputs are in
    ``output_dir``, read from its metrics JSON (the model that made the mask, as the QC recorded it)."""
    from ..outputs import find_outputs

    found = {}
    for path in find_outputs(output_dir, "metrics"):
        try:
            metrics = json.loads(path.read_text())
            settings, model = metrics.get("settings") or {}, metrics.get("model") or {}
            found[Path(metrics.get("source") or path.name).name] = (  # unique across contrasts
                str(metrics.get("suffix") or "T1w"), float(settings["threshold"]),
                float(settings.get("border_mm", 0.0)), model.get("sha256") or settings.get("model_sha256"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # an unreadable record: the group report names it
    return found


def _border(border_mm):
    return (f", then grown by {border_mm:g} mm" if border_mm > 0 else
            f", then shrunk by {-border_mm:g} mm" if border_mm < 0 else "")


def _model_text(sha256):
    """The networks that made the masks, from their model card where it is at hand (the bundled ones)."""
    card = next((c for c in map(ModelCard.load, BUNDLED_DIRS) if c.sha256 == sha256), None)
    if card is None:
        return (f"3D U-Nets [unet] whose weights (sha256 `{sha256}`) are not the ones bundled with this version; "
                "their model card describes them")
    seg, loc = card.architecture, card.locator_architecture
    box = "x".join(f"{mm:g}" for mm in geometry.BRAIN_BOX_MM)
    views = [" ".join(filter(None, ["mirrored left-right" if v.get("mirror") else "",
                                    f"on a lattice shifted by {v['shift_mm']:g} mm" if v.get("shift_mm") else ""]))
             or "as it is" for v in card.views]
    painted = (", also painted with random contrasts from their tissue label maps"
               if card.painted_contrasts else "")
    return (f"two 3D U-Nets [unet] trained by the bids_skullstrip project on public {', '.join(card.contrasts)} "
            f"heads{painted} ({card.name}; weights sha256 `{card.sha256}`, locator sha256 `{card.locator_sha256}`). The "
            f"*locator* ({loc.get('levels', 4)} levels, {loc.get('base_filters', '?')} base filters) found the brain on "
            f"a {card.locator_voxel_mm:g} mm grid covering the image's whole field of view; the *segmenter* "
            f"({seg.get('levels', 4)} levels, {seg.get('base_filters', '?')} base filters) then estimated the brain "
            f"probability on a {card.voxel_mm:g} mm grid of at least {box} mm centred on that brain, so that the "
            f"neck, face and shoulders stayed outside its view"
            + (f", averaging the probabilities of {len(views)} views of it ({'; '.join(views)})" if len(views) > 1
               else ""))


def _listed(items):
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def _suffixes(names):
    return _listed(sorted(names))


def methods_markdown(*, threshold, border_mm, recorded=None, contrasts=("T1w",)):
    """The methods text for images made with ``recorded`` settings ({name: (suffix, threshold, border_mm,
    sha256)}); with none recorded yet, for the settings of this run (``threshold``, None for the calibrated one,
    ``border_mm``, the bundled networks of each of its ``contrasts``)."""
    if not recorded:
        cards = {contrast: ModelCard.bundled_for(contrast) for contrast in contrasts}
        recorded = {contrast: (contrast, card.threshold if threshold is None else float(threshold), float(border_mm),
                               card.sha256) for contrast, card in cards.items()}
    groups = Counter(recorded.values())
    # the contrasts each model stripped, and each contrast's threshold (that of most of its images; the others are
    # listed below): most images first
    models, thresholded = {}, {}
    for suffix, t, b, sha in sorted(groups, key=groups.get, reverse=True):
        if suffix not in models.setdefault(sha, []):
            models[sha].append(suffix)
        if all(suffix not in suffixes for suffixes in thresholded.values()):
            thresholded.setdefault((sha, t), []).append(suffix)
    if len(models) == 1:
        [(sha, suffixes)] = models.items()
        stripped = f"Each image was skull-stripped by {_model_text(sha)}."
    else:
        (sha, first), *others = models.items()
        stripped = (f"The {_suffixes(first)} images were skull-stripped by {_model_text(sha)}"
                    + "".join(f"; the {_suffixes(m)} images by {_model_text(s)}" for s, m in others) + ".")
    per_suffix = Counter(suffix for suffix, _ in {(suffix, t) for suffix, t, _, _ in groups})
    thresholds = ("the thresholds listed below" if max(per_suffix.values()) > 1 else  # a contrast's images differ
                  f"{next(iter(thresholded))[1]:g}" if len({t for _, t in thresholded}) == 1 else  # one, if equal
                  _listed([f"{t:g} ({_suffixes(suffixes)})" for (_, t), suffixes in thresholded.items()]))
    borders = {b for _, _, b, _ in groups}
    border = _border(next(iter(borders))) if len(borders) == 1 else ", then grown or shrunk by the border listed below"
    text = f"""# Methods: brain extraction with bids_skullstrip {__version__}

Brain masks were computed with *bids_skullstrip* {__version__} [bids_skullstrip], which is based on *Nipype*
{_version("nipype")} [nipype] and finds the images of the dataset with *PyBIDS* {_version("pybids")} [pybids].
{stripped} The probability was mapped back onto the native
grid, thresholded at {thresholds}, reduced to its largest connected component and hole-filled{border}.
Each image was corrected for intensity non-uniformity with N4 [n4] as implemented in ANTsPy
{_version("antspyx")} (ANTs [ants]), estimated inside the brain mask, and multiplied by the mask to give the
skull-stripped image. Masks and images keep the exact voxel grid of the input.
"""
    if len({suffix for suffix, *_ in groups}) < len(groups) or len(borders) > 1:
        lines = []
        for (suffix, t, b, sha), n in sorted(groups.items(), key=lambda item: -item[1]):
            names = sorted(name for name, value in recorded.items() if value == (suffix, t, b, sha))
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            lines.append(f"- {n} image(s) thresholded at {t:g}, border {b:g} mm, model sha256 `{str(sha)[:12]}`: "
                         f"{shown}")
        text += ("\n**The images were not all processed with the same settings** (as their metrics files "
                 "record them):\n\n" + "\n".join(lines) + "\n")
    return text + "\n## References\n" + "\n".join(f"- [{key}] {text}" for key, text in REFERENCES.items()) + "\n"


def _html_page(markdown_text):
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").render(markdown_text)
    return f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Methods</title></head><body>\n{body}</body></html>\n'


def write_boilerplate(output_dir, *, threshold, border_mm, contrasts=("T1w",)):
    """Write ``<out>/logs/CITATION.md`` and ``CITATION.html`` (atomically: job arrays write them at once) from
    what the outputs in ``output_dir`` hold; ``threshold``, ``border_mm`` and ``contrasts`` describe a folder
    without any yet."""
    logs = Path(output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    text = methods_markdown(threshold=threshold, border_mm=border_mm, recorded=recorded_settings(output_dir),
                            contrasts=contrasts)
    return (atomic_write_text(logs / "CITATION.md", text),
            atomic_write_text(logs / "CITATION.html", _html_page(text)))
