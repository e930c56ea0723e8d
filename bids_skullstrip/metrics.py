"""Agreement between a predicted and a reference brain mask."""

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
