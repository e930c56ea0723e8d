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


def _nan_measures():
    keys = list(LIMITS) + ["n_extra_components", "brain_voxels", "extent_major_mm", "extent_minor_mm"]
    return {k: float("nan") for k in keys}


def _strides(voxel_mm):
    return tuple(max(1, int(round(TARGET_MM / float(v)))) for v in voxel_mm)


def qc_measures(t1w, probability, mask, voxel_mm):
    """Reference-free QC measures of one brain mask (dict of floats; NaN where undefined).

    ``t1w`` (float), ``probability`` (float [0, 1]) and ``mask`` (uint8/bool) are 3D arrays on the same
    native grid; ``voxel_mm`` the voxel sizes in millimetres.
    """
    voxel_mm = np.asarray(voxel_mm, dtype=float)[:3]
    mask = np.asarray(mask) > 0
    out = _nan_measures()
    n_mask = int(np.count_nonzero(mask))
    out["brain_voxels"] = float(n_mask)
    out["brain_volume_ml"] = n_mask * float(np.prod(voxel_mm)) / 1000.0
    if n_mask == 0:
        return out

    # Field-of-view edge: mask voxels on the six faces of the image, relative to the mask size.
    on_faces = (mask[0].sum() + mask[-1].sum() + mask[:, 0].sum() + mask[:, -1].sum()
                + mask[:, :, 0].sum() + mask[:, :, -1].sum())
    out["fov_edge_fraction"] = float(on_faces) / n_mask

    # Crop to the mask bounding box + margin, subsample to ~TARGET_MM.
    idx = np.nonzero(mask.any(axis=(1, 2))), np.nonzero(mask.any(axis=(0, 2))), np.nonzero(mask.any(axis=(0, 1)))
    margin = np.ceil(MARGIN_MM / voxel_mm).astype(int)
    step = _strides(voxel_mm)
    box = tuple(slice(max(0, int(i[0][0]) - m), min(n, int(i[0][-1]) + m + 1), s)
                for i, m, n, s in zip(idx, margin, mask.shape, step))
    m = mask[box]
    p = np.asarray(probability[box], dtype=np.float32)
    img = np.asarray(t1w[box], dtype=np.float32)
    vox = voxel_mm * np.asarray(step)
    vox_ml = float(np.prod(vox)) / 1000.0
    nm = int(m.sum())
    if nm == 0:
        return out

    # Probability map: uncertain band, agreement with the mask.
    uncertain = (p > 0.1) & (p < 0.9)
    out["uncertain_fraction"] = float(uncertain.sum()) / nm
    # Components of p > 0.5 beyond the largest: search the whole probability map (coarsely) so that
    # far-away blobs outside the mask box count too.
    pfull = np.asarray(probability[tuple(slice(None, None, s) for s in step)]) > 0.5
    labels, n = ndi.label(pfull)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:] * vox_ml
        sizes = np.sort(sizes)[::-1][1:]
        extra = sizes[sizes >= MIN_COMPONENT_ML]
        out["n_extra_components"] = float(extra.size)
        out["extra_components_ml"] = float(extra.sum())
    else:
        out["n_extra_components"] = 0.0
        out["extra_components_ml"] = 0.0
    out["prob_mask_disagreement"] = float(np.count_nonzero((p > 0.5) != m)) / nm

    # Boundary rims from distance maps (anisotropic spacing respected).
    d_in = ndi.distance_transform_edt(m, sampling=vox)
    d_out = ndi.distance_transform_edt(~m, sampling=vox)
    inner = m & (d_in <= RIM_MM)
    outer = (~m) & (d_out <= RIM_MM)
    core = d_in > 2 * RIM_MM
    if core.sum() < 50:
        core = m
    ref = float(np.median(img[core]))
    lo, hi = np.percentile(img[core], [5, 95])
    scale = abs(ref) if ref != 0 else (float(np.ptp(img)) or 1.0)
    if inner.any() and outer.any():
        out["boundary_contrast"] = (float(np.median(img[inner])) - float(np.median(img[outer]))) / scale
        out["outside_brainlike_fraction"] = float(np.mean((img[outer] >= lo) & (img[outer] <= hi)))
    # Dark voxels inside the mask: darker than 30 % of the brain-core median (CSF, skull, background).
    out["dark_fraction"] = float(np.mean(img[m] < 0.3 * ref))

    # Noise: robust std of voxel-to-neighbour differences in the core, relative to the core median.
    if core.sum() > 100:
        full_core = _core_full_res(mask, d_in > 2 * RIM_MM, box, step)
        out["noise_ratio"] = _noise_ratio(t1w, full_core, ref)

    # Shape: sphericity from the voxel-face surface area (corrected for the staircase), PCA extents.
    area = _surface_area(m, vox) * (2.0 / 3.0)
    volume = nm * float(np.prod(vox))
    out["sphericity"] = float(math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area) if area > 0 else float("nan")
    coords = np.argwhere(m) * vox
    if len(coords) > 10:
        ev = np.sort(np.linalg.eigvalsh(np.cov(coords[:: max(1, len(coords) // 20000)].T)))
        out["extent_major_mm"] = float(4 * math.sqrt(max(ev[-1], 0)))
        out["extent_minor_mm"] = float(4 * math.sqrt(max(ev[0], 0)))
    return out


def _core_full_res(mask, core_small, box, step):
    """Bounding slices (full resolution) of a small central cube of the brain core."""
    pts = np.argwhere(core_small)
    c = np.median(pts, axis=0)
    centre = [int(b.start + ci * s) for b, ci, s in zip(box, c, step)]
    return centre


def _noise_ratio(t1w, centre, ref):
    """Noise estimate in a 24^3-voxel cube at the brain centre: MAD of Laplacian-like differences."""
    sl = tuple(slice(max(0, c - 12), c + 12) for c in centre)
    cube = np.asarray(t1w[sl], dtype=np.float32)
    if min(cube.shape) < 4 or ref == 0:
        return float("nan")
    # second differences along each axis remove smooth anatomy and keep white-ish noise
    d = []
    for ax in range(3):
        x = np.moveaxis(cube, ax, 0)
        d.append((x[2:] - 2 * x[1:-1] + x[:-2]).ravel())
    d = np.concatenate(d)
    sigma = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(6.0)
    return sigma / abs(ref)


def _surface_area(m, vox):
    area = 0.0
    for ax in range(3):
        face = float(np.prod(np.delete(vox, ax)))
        diff = np.diff(m.astype(np.int8), axis=ax, prepend=0, append=0)
        area += np.count_nonzero(diff) * face
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
