"""From a probability map to a clean brain mask: threshold, largest component, holes, border."""

import math

import numpy as np
from scipy import ndimage as ndi

# A border grows or shrinks the mask by a few millimetres (a margin of CSF, a tighter mask); beyond this it is the
# head or nothing.
MAX_BORDER_MM = 20.0


def check_threshold(threshold):
    """``threshold`` as a float in (0, 1), or None (the calibrated one); a ValueError naming it otherwise."""
    if threshold is None:
        return None
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold {threshold!r}: not a number") from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"threshold {threshold}: must be between 0 and 1")
    return value


def check_border(border_mm):
    """``border_mm`` as a float within +-MAX_BORDER_MM; a ValueError naming it otherwise."""
    try:
        value = float(border_mm)
    except (TypeError, ValueError):
        raise ValueError(f"border {border_mm!r}: not a number (mm)") from None
    if not (math.isfinite(value) and abs(value) <= MAX_BORDER_MM):
        raise ValueError(f"border {border_mm}: must be between -{MAX_BORDER_MM:g} and {MAX_BORDER_MM:g} mm")
    return value


def largest_component(mask):
    labels, n = ndi.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def fill_holes(mask):
    """``ndi.binary_fill_holes`` in one labelling pass instead of iterated dilations (about twice as fast): the
    background components that do not touch the edge of the array are holes."""
    background, _ = ndi.label(~mask)
    edge_labels = np.concatenate([np.unique(np.take(background, i, axis=a)) for a in range(3) for i in (0, -1)])
    outside = np.zeros(background.max() + 1, bool)
    outside[edge_labels] = True
    outside[0] = False
    return ~outside[background]


def apply_border(mask, border_mm, voxel_mm):
    """Grow (border_mm > 0) or shrink (< 0) the mask by a distance in millimetres."""
    if border_mm == 0:
        return mask
    if border_mm > 0:
        distance = ndi.distance_transform_edt(~mask, sampling=voxel_mm)
        return mask | (distance <= border_mm)
    distance = ndi.distance_transform_edt(mask, sampling=voxel_mm)
    return distance > -border_mm


def clean_mask(prob, *, threshold=0.5, border_mm=0.0, voxel_mm=(1.0, 1.0, 1.0)):
    """Binary mask (bool) from a probability map."""
    mask = prob >= threshold
    if not mask.any():
        return mask
    return with_border(fill_holes(largest_component(mask)), border_mm, voxel_mm)


def with_border(mask, border_mm, voxel_mm):
    """A clean ``mask`` grown (``border_mm`` > 0) or shrunk (< 0), its largest component, holes filled."""
    if not border_mm or not mask.any():
        return mask
    return fill_holes(largest_component(apply_border(mask, border_mm, voxel_mm)))
