"""The methods text users paste into a paper (fMRIPrep's CITATION files): what was done, with which versions
and references; written to ``<out>/logs/CITATION.md`` and ``.html`` by every participant run."""

import importlib.metadata
from pathlib import Path

from .. import __version__
from ..nifti import atomic_write_text
from ..model.inference import model_card

REFERENCES = {
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


def methods_markdown(*, threshold, border_mm):
    card = model_card()
    border = (f", then grown by {border_mm:g} mm" if border_mm > 0 else
              f", then shrunk by {-border_mm:g} mm" if border_mm < 0 else "")
    return f"""# Methods: brain extraction with bids_skullstrip {__version__}

Brain masks were computed with *bids_skullstrip* {__version__}, which is based on *Nipype*
{_version("nipype")} [nipype] and finds the T1-weighted (T1w) images of the dataset with *PyBIDS*
{_version("pybids")} [pybids]. Each T1w image was resampled onto a 4 mm grid covering its whole field of view,
where a small 3D U-Net [unet] (the *locator*) found the brain; a second 3D U-Net (the *segmenter*) then
estimated the brain probability on a 2 mm grid centred on that brain, so that the neck, face and shoulders
stayed outside its view. Both networks were trained by the bids_skullstrip project on public T1w heads
(model sha256 `{str(card.get("sha256", "unknown"))[:12]}`). The probability was mapped back onto the native
grid, thresholded at {threshold:g}, reduced to its largest connected component and hole-filled{border}. The
T1w image was corrected for intensity non-uniformity with N4 [n4] as implemented in ANTsPy
{_version("antspyx")} (ANTs [ants]), estimated inside the brain mask, and multiplied by the mask to give the
skull-stripped image. Masks and images keep the exact voxel grid of the input.

## References
""" + "\n".join(f"- [{key}] {text}" for key, text in REFERENCES.items()) + "\n"


def _html_page(markdown_text):
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").render(markdown_text)
    return f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Methods</title></head><body>\n{body}</body></html>\n'


def write_boilerplate(output_dir, *, threshold, border_mm):
    """Write ``<out>/logs/CITATION.md`` and ``CITATION.html`` (atomically: job arrays write them at once)."""
    logs = Path(output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    text = methods_markdown(threshold=threshold, border_mm=border_mm)
    return (atomic_write_text(logs / "CITATION.md", text),
            atomic_write_text(logs / "CITATION.html", _html_page(text)))
