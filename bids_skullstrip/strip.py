"""Skull-strip one image file: the one path from a NIfTI file to written outputs, shared by the ``skullstrip``
command, the workflow's ``SkullStrip`` node and the benchmark's worker.

    from bids_skullstrip import skullstrip_file
    result = skullstrip_file("T1w.nii.gz", mask="mask.nii.gz", brain="brain.nii.gz")
    result.warnings, result.volume_ml, result.qc_flags()
"""

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes

from .intensity import HEAVY_NOISE_SMOOTHING_MM
from .nifti import atomic_file, geometry_warnings, like, load_image, save
from .postproc import check_border, check_threshold

OUTPUT_KINDS = ("mask", "brain", "probseg")


@dataclass
class FileResult:
    """What ``skullstrip_file`` made of one file."""
    image: nib.Nifti1Image  # the input as loaded (its header and grid are every output's)
    data: np.ndarray  # the input's volume, validated: float32, 3D, NaN/Inf set to 0
    mask: np.ndarray  # uint8 {0, 1}, the input's grid
    probability: np.ndarray  # float32 [0, 1], the input's grid
    threshold: float
    border_mm: float
    contrast: str = "T1w"  # the BIDS suffix it was stripped as (its networks, its QC limits)
    warnings: list = field(default_factory=list)  # one line each, naming the file
    timings: dict = field(default_factory=dict)  # seconds: load, each stage of the core, write
    core_s: float = 0.0  # seconds of the core (array in, mask and probability out)
    written: dict = field(default_factory=dict)  # kind -> Path
    view_disagreement: float | None = None  # of the networks' two views (a QC measure; None: one view, or none run)
    mask_before_border: np.ndarray | None = None  # with a border: the mask before it, which QC judges
    read: np.ndarray | None = None  # the volume as the networks read it: QC reads it so, without reading it again
    noise_smoothing_mm: float = HEAVY_NOISE_SMOOTHING_MM  # how a very noisy volume was read (another image of it, too)

    @property
    def volume_ml(self):
        return float(np.count_nonzero(self.mask)) * float(np.prod(voxel_sizes(self.image.affine))) / 1000.0

    def qc_measures(self):
        """The QC measures of the mask (``bids_skullstrip.qc``; with a border, of the mask before it), on this image as
        it is (no bias correction)."""
        from .qc import qc_measures

        judged = self.mask if self.mask_before_border is None else self.mask_before_border
        return qc_measures(self.data, self.probability, judged, voxel_sizes(self.image.affine),
                           view_disagreement=self.view_disagreement, read=self.read)

    def qc_flags(self):
        """The QC flags of the mask ("this mask probably failed"), one short line each; [] when none."""
        return self.qc_findings()[0]

    def qc_findings(self):
        """(flags, notes) of the QC: the flags of ``qc_flags`` and the notes ("this image is unusual": a field of
        view that cuts the brain, a noisy image), one short line each, from one computation of the measures."""
        from .qc import flag_image, note_image

        if not self.mask.any():
            return ["empty brain mask"], []
        measures = self.qc_measures()
        return flag_image(measures, self.contrast), note_image(measures, self.contrast)


def check_outputs(in_file, **outputs):
    """Every requested output path (``mask=``, ``brain=``, ``probseg=``), checked before any work: a ValueError
    naming the path and the problem; returns {kind: Path} of those given."""
    unknown = set(outputs) - set(OUTPUT_KINDS)
    if unknown:
        raise TypeError(f"unknown output kind(s): {', '.join(sorted(unknown))} (known: {', '.join(OUTPUT_KINDS)})")
    given = {kind: Path(p) for kind, p in outputs.items() if p is not None}
    resolved = [p.resolve() for p in given.values()]
    twice = next((p for p in resolved if resolved.count(p) > 1), None)
    if twice is not None:
        raise ValueError(f"{twice}: two outputs have the same file name")
    in_file = Path(in_file)
    for p in resolved:
        if in_file.exists() and p == in_file.resolve():
            raise ValueError(f"{p}: an output would overwrite the input")
        if p.is_dir():  # first: `-m out/` is a folder given where a file name was wanted, whatever its name
            raise ValueError(f"{p}: a folder is there; an output must be a file name")
        if not p.name.endswith((".nii", ".nii.gz")):
            raise ValueError(f"{p}: output names must end in .nii or .nii.gz")
        if not p.parent.is_dir():
            raise ValueError(f"{p.parent}: output folder not found")
        if not os.access(p.parent, os.W_OK):
            raise ValueError(f"{p.parent}: output folder is not writable")
    return given


def brain_image(img, data, mask):
    """The input with the skull removed: the input's integer type when it has no scaling, else float32."""
    dtype = np.dtype(img.get_data_dtype())
    # nibabel moves the header's scaling onto the data proxy when it loads a file (the header then says none)
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    if dtype.kind in "iu" and slope == 1.0 and inter == 0.0:
        if dtype.itemsize > 2 and float(np.abs(data).max(initial=0.0)) >= 2 ** 24:
            # beyond the integers float32 holds exactly (an int32 image of values up to 2e9 came back changed by
            # up to 64 in every voxel): the stored integers, read again
            return like(img, np.where(mask > 0, np.asanyarray(img.dataobj).reshape(data.shape), 0), dtype)
        return like(img, np.where(mask > 0, np.rint(data), 0), dtype)
    return like(img, data * mask, np.float32)


def check_contrast(in_file, contrast=None):
    """The contrast ``in_file`` is stripped as (``discovery.contrast_of``), or a ValueError for an unknown one."""
    from .discovery import check_suffix, contrast_of

    return check_suffix(contrast_of(in_file, contrast))


def skullstrip_file(in_file, *, mask=None, brain=None, probseg=None, weights=None, threshold=None, border_mm=0.0,
                    contrast=None, stripper=None):
    """Skull-strip one image file and write the outputs asked for, on the input's exact grid.

    Parameters
    ----------
    in_file : str or Path
        A 3D NIfTI image (any orientation and voxel size).
    mask, brain, probseg : str or Path, optional
        Where to write the brain mask (uint8), the skull-stripped image and the brain probability (float32).
        Each is written atomically: a file either is complete or is not there.
    weights : str or Path, optional
        The networks to use (a folder with ``model.json``, or a model card file); default: the bundled ones for
        ``contrast``.
    contrast : str, optional
        The image's BIDS suffix (``T1w``, ``FLAIR``, ...); default: the one its file name ends with, else T1w
        (``discovery.contrast_of``). T1w images get the bundled T1w networks, others the any-contrast ones.
    threshold : float, optional
        Brain probability threshold; default: the one calibrated for the weights.
    border_mm : float
        Grow (> 0) or shrink (< 0) the mask by this distance.
    stripper : Skullstripper, optional
        A predictor already set up (instead of ``weights``), to strip many files with one.

    Returns
    -------
    FileResult
        The arrays, the warnings (one line each, naming the file), the timings and the files written.

    Raises
    ------
    ValueError
        One line naming the file and the problem (``nifti.InputError`` for an unusable input), before
        anything is written.
    """
    from .model.card import ModelCard
    from .model.predictor import Skullstripper

    outputs = check_outputs(in_file, mask=mask, brain=brain, probseg=probseg)
    check_threshold(threshold)
    check_border(border_mm)
    contrast = check_contrast(in_file, contrast)
    stripper = stripper or Skullstripper(weights or ModelCard.bundled_for(contrast))
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # collected, each names the file
        warnings.simplefilter("always")
        img, data = load_image(in_file)
    doubts = [str(w.message) for w in caught] + [f"{in_file}: {m}" for m in geometry_warnings(img)]
    timings = {"load": time.perf_counter() - t}

    t = time.perf_counter()
    result = stripper.mask(data, img.affine, threshold=threshold, border_mm=border_mm)
    core_s = time.perf_counter() - t
    timings.update(result.timings)
    doubts += [f"{in_file}: {w}" for w in result.warnings]
    if not result.mask.any():
        doubts.append(f"{in_file}: no brain found (empty mask); is this a head?")

    t = time.perf_counter()
    images = {"mask": lambda: like(img, result.mask, np.uint8),
              "probseg": lambda: like(img, result.probability, np.float32),
              "brain": lambda: brain_image(img, data, result.mask)}
    path = None
    try:
        # all the outputs asked for, or none: each is written beside its final name and the names are given only
        # once every one is complete (a full disk leaves the files that were there as they were)
        with contextlib.ExitStack() as renames:
            for kind, path in outputs.items():
                save(images[kind](), renames.enter_context(atomic_file(path)))
    except OSError as exc:
        raise OSError(exc.errno, f"{path}: {exc.strerror or exc}") from None
    timings["write"] = time.perf_counter() - t
    return FileResult(image=img, data=data, mask=result.mask, probability=result.probability,
                      threshold=stripper.threshold if threshold is None else float(threshold),
                      border_mm=float(border_mm), contrast=contrast, warnings=list(dict.fromkeys(doubts)),
                      timings=timings, core_s=core_s, written=outputs, view_disagreement=result.view_disagreement,
                      mask_before_border=result.mask_before_border, read=result.read,
                      noise_smoothing_mm=result.noise_smoothing_mm)
