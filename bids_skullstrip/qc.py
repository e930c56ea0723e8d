"""Reference-free QC of a brain mask: measures that predict a failed mask, and failure flags.

Everything here is pure numpy/scipy on native-grid arrays, so it runs inside the workflow (one call per
image) and in the group step (on the measures stored in the per-image metrics JSON).

The measures are computed on the bounding box of the mask (plus a margin), resampled by integer strides to
~2 mm voxels, so they cost well under a second on a 256^3 head and mean the same thing at any resolution.
"""

import math

import numpy as np
from scipy import ndimage as ndi

TARGET_MM = 2.0  # analysis grid spacing (integer-stride subsampling towards this)
RIM_MM = 4.0  # width of the inner / outer boundary rims
MARGIN_MM = 12.0  # bounding-box margin around the mask
MIN_COMPONENT_ML = 1.0  # extra components of p > 0.5 smaller than this are ignored

# Absolute rules: measure -> (low, high, unit, text). A measure outside [low, high] raises a flag.
# Thresholds are set from the good masks of 29 real heads and the corruption experiment of
# bench/qc_flags.py (see docs/qc.md for the numbers).
LIMITS = {
    "brain_volume_ml": (800.0, 2200.0, "ml", "brain volume"),
    "fov_edge_fraction": (None, 0.002, "", "mask touches the field-of-view edge: fraction on border faces"),
    "extra_components_ml": (None, 20.0, "ml", "extra components of p>0.5 beyond the largest"),
    "uncertain_fraction": (None, 0.30, "", "uncertain voxels (0.1<p<0.9) relative to mask size"),
    "prob_mask_disagreement": (None, 0.10, "", "mask and p>0.5 disagree on a fraction of the mask"),
    "boundary_contrast": (0.15, None, "", "intensity contrast across the mask boundary"),
    "dark_fraction": (None, 0.12, "", "fraction of mask voxels that are dark (CSF/background-like)"),
    "outside_brainlike_fraction": (None, 0.45, "", "fraction of the outer rim with brain-like intensity"),
    "sphericity": (0.55, None, "", "mask sphericity"),
    "noise_ratio": (None, 0.25, "", "noise relative to brain intensity"),
}

GROUP_MEASURES = (
    "brain_volume_ml",
    "uncertain_fraction",
    "boundary_contrast",
    "dark_fraction",
    "outside_brainlike_fraction",
    "sphericity",
    "noise_ratio",
)
GROUP_MIN_IMAGES = 8
GROUP_Z = 3.5


MEASURE_KEYS = (
    "brain_volume_ml", "brain_voxels", "fov_edge_fraction", "uncertain_fraction", "prob_mask_disagreement",
    "n_extra_components", "extra_components_ml", "boundary_contrast", "dark_fraction",
    "outside_brainlike_fraction", "noise_ratio", "sphericity", "extent_major_mm", "extent_minor_mm",
    "extent_ratio",
)


def _strides(voxel_mm):
    return tuple(max(1, int(round(TARGET_MM / float(v)))) for v in voxel_mm)


def _box_mean(m, half):
    """Mean of a boolean array over a (2h+1)-box per axis (separable, fast; outside the array counts 0)."""
    return ndi.uniform_filter(m.astype(np.float32), size=[2 * int(h) + 1 for h in half], mode="constant")


def _bbox(m):
    out = []
    for ax in range(3):
        idx = np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != ax)))
        out.append((int(idx[0]), int(idx[-1]) + 1))
    return out


def _axis_medians(m):
    """Per-axis median coordinate of the True voxels (from the projections: cheap)."""
    out = []
    for ax in range(3):
        counts = m.sum(axis=tuple(a for a in range(3) if a != ax))
        c = np.cumsum(counts)
        out.append(int(np.searchsorted(c, c[-1] / 2.0)))
    return out


def qc_measures(t1w, probability, mask, voxel_mm):
    """Reference-free QC measures of one brain mask (dict of floats; NaN where undefined).

    ``t1w`` (float), ``probability`` (float [0, 1]) and ``mask`` (uint8/bool) are 3D arrays on the same
    native grid; ``voxel_mm`` the voxel sizes in millimetres. See docs/qc.md for what each measure means.
    """
    voxel_mm = np.asarray(voxel_mm, dtype=float)[:3]
    mask = np.asarray(mask) > 0
    out = {k: float("nan") for k in MEASURE_KEYS}
    n_mask = int(np.count_nonzero(mask))
    out["brain_voxels"] = float(n_mask)
    out["brain_volume_ml"] = n_mask * float(np.prod(voxel_mm)) / 1000.0
    if n_mask == 0:
        return out

    # Field-of-view edge: mask voxels on the six faces of the image, relative to the mask size.
    on_faces = sum(int(np.count_nonzero(f)) for f in (mask[0], mask[-1], mask[:, 0], mask[:, -1],
                                                       mask[:, :, 0], mask[:, :, -1]))
    out["fov_edge_fraction"] = on_faces / n_mask

    # Analysis grid: mask bounding box + margin, subsampled by integer strides towards TARGET_MM.
    step = _strides(voxel_mm)
    vox = voxel_mm * np.asarray(step)
    margin = np.ceil(MARGIN_MM / voxel_mm).astype(int)
    box = tuple(slice(max(0, a - mg), min(n, b + mg), s)
                for (a, b), mg, n, s in zip(_bbox(mask), margin, mask.shape, step))
    m = mask[box]
    nm = int(np.count_nonzero(m))
    if nm == 0:  # a mask thinner than the stride
        return out
    p = np.asarray(probability[box], dtype=np.float32)
    img = np.asarray(t1w[box], dtype=np.float32)
    vox_ml = float(np.prod(vox)) / 1000.0

    # Probability map: the uncertain band, agreement with the final mask, blobs outside the brain.
    out["uncertain_fraction"] = float(np.count_nonzero((p > 0.1) & (p < 0.9))) / nm
    out["prob_mask_disagreement"] = float(np.count_nonzero((p > 0.5) != m)) / nm
    coarse = np.asarray(probability[tuple(slice(None, None, s) for s in step)]) > 0.5
    n_extra, extra_ml = 0, 0.0
    if coarse.any():
        sub = coarse[tuple(slice(a, b) for a, b in _bbox(coarse))]
        labels, n = ndi.label(sub)
        if n > 1:
            sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1][1:] * vox_ml
            extra = sizes[sizes >= MIN_COMPONENT_ML]
            n_extra, extra_ml = int(extra.size), float(extra.sum())
    out["n_extra_components"] = float(n_extra)
    out["extra_components_ml"] = extra_ml

    # Boundary rims (RIM_MM inside / outside the mask edge) and the brain core (> 2 RIM_MM inside).
    rim_half = np.maximum(1, np.round(RIM_MM / vox)).astype(int)
    near = _box_mean(m, rim_half)
    inner = m & (near < 1 - 1e-3)
    outer = ~m & (near > 1e-3)
    core = _box_mean(m, 2 * rim_half) > 1 - 1e-3
    if np.count_nonzero(core) < 50:
        core = m
    core_vals = img[core]
    ref = float(np.median(core_vals))
    lo, hi = np.percentile(core_vals, [5, 95])
    scale = abs(ref) if ref != 0 else (float(np.ptp(img)) or 1.0)
    if inner.any() and outer.any():
        outer_vals = img[outer]
        out["boundary_contrast"] = (float(np.median(img[inner])) - float(np.median(outer_vals))) / scale
        out["outside_brainlike_fraction"] = float(np.mean((outer_vals >= lo) & (outer_vals <= hi)))
    # Dark voxels in the mask: darker than 30 % of the brain-core median (CSF, skull, background).
    out["dark_fraction"] = float(np.mean(img[m] < 0.3 * ref))

    # Noise at full resolution in a small cube at the centre of the brain core.
    centre = [b.start + c * s for b, c, s in zip(box, _axis_medians(core), step)]
    out["noise_ratio"] = _noise_ratio(t1w, centre, ref)

    # Shape: sphericity (voxel-face area, corrected by 2/3 for the staircase), principal extents.
    area = _surface_area(m, vox) * (2.0 / 3.0)
    volume = nm * float(np.prod(vox))
    out["sphericity"] = float(math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area) if area > 0 else float("nan")
    coords = np.argwhere(m)
    coords = coords[:: max(1, len(coords) // 20000)] * vox
    if len(coords) > 10:
        ev = np.sort(np.linalg.eigvalsh(np.cov(coords.T)))
        # 4 sigma = full length of a uniform rod of the same variance (x sqrt(12) = 3.46); ~ the brain length
        out["extent_major_mm"] = float(4 * math.sqrt(max(ev[-1], 0)))
        out["extent_minor_mm"] = float(4 * math.sqrt(max(ev[0], 0)))
        if ev[-1] > 0:
            out["extent_ratio"] = float(math.sqrt(max(ev[0], 0) / ev[-1]))
    return out


def _noise_ratio(t1w, centre, ref, half=12):
    """Noise in a (2 half)^3-voxel cube: robust std of second differences (anatomy is smooth at that
    scale), relative to the brain-core median."""
    sl = tuple(slice(max(0, c - half), c + half) for c in centre)
    cube = np.asarray(t1w[sl], dtype=np.float32)
    if min(cube.shape) < 4 or ref == 0:
        return float("nan")
    d = np.concatenate([np.diff(cube, n=2, axis=ax).ravel() for ax in range(3)])
    sigma = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(6.0)
    return sigma / abs(ref)


def _surface_area(m, vox):
    area = 0.0
    for ax in range(3):
        face = float(np.prod(np.delete(vox, ax)))
        area += np.count_nonzero(np.diff(m, axis=ax, prepend=False, append=False)) * face
    return area


def _fmt(v):
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.1f}"
    return f"{v:.3f}"


def flag_image(measures):
    """Absolute rules on one image's measures -> list of short readable flags (empty = no doubt)."""
    flags = []
    if not measures:
        return ["no QC measures"]
    vox = measures.get("brain_voxels")
    if vox is not None and vox == 0:
        return ["empty brain mask"]
    for key, (low, high, unit, text) in LIMITS.items():
        v = measures.get(key)
        if v is None or not np.isfinite(v):
            continue
        u = f" {unit}" if unit else ""
        if key == "brain_volume_ml":
            if v < low or v > high:
                flags.append(f"brain volume {v:.0f} ml outside {low:.0f}-{high:.0f} ml")
            continue
        if low is not None and v < low:
            flags.append(f"{text} {_fmt(v)}{u} below {_fmt(low)}{u}")
        elif high is not None and v > high:
            flags.append(f"{text} {_fmt(v)}{u} above {_fmt(high)}{u}")
    return flags


def robust_z(values):
    """(x - median) / (1.4826 MAD) with NaN kept; zeros where the MAD vanishes."""
    x = np.asarray(values, dtype=float)
    ok = np.isfinite(x)
    z = np.full_like(x, np.nan)
    if ok.sum() == 0:
        return z
    med = np.median(x[ok])
    mad = 1.4826 * np.median(np.abs(x[ok] - med))
    if mad <= 1e-12:
        z[ok] = 0.0
        return z
    z[ok] = (x[ok] - med) / mad
    return z


def flag_group(rows):
    """Flags for a group: each row's absolute flags plus robust z-score outliers (|z| > 3.5).

    ``rows`` is a sequence of dicts of measures (e.g. the ``qc`` dicts of the metrics JSON files, or rows that
    contain those keys). Returns one list of flags per row, in order. z-score flags are added only when there
    are at least 8 images.
    """
    rows = list(rows)
    out = [flag_image(r) for r in rows]
    if len(rows) < GROUP_MIN_IMAGES:
        return out
    for key in GROUP_MEASURES:
        vals = [_as_float(r.get(key)) for r in rows]
        z = robust_z(vals)
        for i, zi in enumerate(z):
            if np.isfinite(zi) and abs(zi) > GROUP_Z:
                out[i].append(f"{key.replace('_', ' ')} {_fmt(vals[i])} is a group outlier (z = {zi:+.1f})")
    return out


def _as_float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")
