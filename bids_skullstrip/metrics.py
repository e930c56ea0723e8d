"""Agreement between a predicted and a reference brain mask."""

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi


def dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def iou(a, b):
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def _surface(mask):
    return mask & ~ndi.binary_erosion(mask)


def hausdorff95(a, b, voxel_mm):
    """95th percentile of the symmetric surface distances, in millimetres."""
    a, b = a.astype(bool), b.astype(bool)
    if not a.any() or not b.any():
        return float("inf")
    sa, sb = _surface(a), _surface(b)
    to_b = ndi.distance_transform_edt(~sb, sampling=voxel_mm)[sa]
    to_a = ndi.distance_transform_edt(~sa, sampling=voxel_mm)[sb]
    return float(np.percentile(np.concatenate([to_b, to_a]), 95))


def compare_masks(predicted, reference, voxel_mm):
    voxel_ml = float(np.prod(voxel_mm)) / 1000.0
    vol_p, vol_r = predicted.astype(bool).sum() * voxel_ml, reference.astype(bool).sum() * voxel_ml
    return {
        "dice": float(dice(predicted, reference)),
        "iou": float(iou(predicted, reference)),
        "hd95_mm": hausdorff95(predicted, reference, voxel_mm),
        "volume_ml": float(vol_p),
        "reference_volume_ml": float(vol_r),
        "volume_diff_pct": float(100.0 * (vol_p - vol_r) / vol_r) if vol_r else float("nan"),
    }


def score_heads(heads, mask_of, *, change=None, qc=False, masks_dir=None, seed=0, contrast=None):
    """Score the mask of each labelled head (``training.data.LabelledHead``) against its reference: one row per
    head with ``compare_masks``'s numbers, the head's name, source and contrast, the seconds ``mask_of`` took
    and its warnings. The one scorer of ``bids_skullstrip-eval``, training validation, bench/model_eval.py and
    bench/stress_eval.py.

    ``mask_of(head, data, affine)`` returns a ``predictor.SkullstripResult`` (or anything with ``.mask``).
    ``change(data, affine, reference, rng)`` first changes the image and its reference (an acquisition change,
    bench/stress_eval.py; ``rng`` seeded by ``seed`` + the head's index). A head with a field of view (``fov``)
    is scored inside it only. ``qc``: add the mask's QC measures and flags (needs ``.probability``).
    ``contrast``: the BIDS suffix of the images as changed (a T1w head painted as a T2w), default each head's own.
    ``masks_dir``: save each mask there as ``<name>.nii.gz``."""
    import time

    import nibabel as nib
    from nibabel.affines import voxel_sizes

    from .nifti import load_image

    rows = []
    for i, head in enumerate(heads):
        img, data = load_image(head.image)
        affine = img.affine
        reference = np.asarray(nib.load(str(head.mask)).dataobj) > 0
        if change is not None:
            data, affine, reference = change(data, affine, reference, np.random.default_rng(seed + i))
        t = time.perf_counter()
        result = mask_of(head, data, affine)
        seconds = time.perf_counter() - t
        mask = np.asarray(result.mask) > 0
        if masks_dir:
            nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(Path(masks_dir) / f"{head.name}.nii.gz"))
        vox = voxel_sizes(affine)
        inside = True if head.fov is None else np.asarray(nib.load(str(head.fov)).dataobj) > 0
        row = {"name": head.name, "source": source_of(head.name), "contrast": contrast or head.contrast,
               **compare_masks(mask & inside, reference & inside, vox), "seconds": seconds,
               "warnings": list(getattr(result, "warnings", []))}
        if qc:
            from .qc import flag_image, qc_measures

            row["qc"] = qc_measures(data, result.probability, np.asarray(result.mask), vox,
                                    read=getattr(result, "read", None))
            row["flags"] = flag_image(row["qc"], row["contrast"])
        rows.append(row)
    return rows


def source_of(name):
    """The source a head comes from: its id without the subject part."""
    for prefix in ("fstrain", "ds000011", "nichart-demo", "openms"):
        if name.startswith(prefix):
            return prefix
    return name
