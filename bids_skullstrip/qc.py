"""Reference-free QC of a brain mask: measures that predict a failed mask, and failure flags.

Everything here is pure numpy/scipy on native-grid arrays, so it runs inside the workflow (one call per
image) and in the group step (on the measures stored in the per-image metrics JSON).

The measures are computed on the bounding box of the mask (plus a margin), resampled by integer strides to
~2 mm voxels, so they cost well under a second on a 256^3 head and mean the same thing at any resolution.
They use the image, the probability map and the mask only (no reference mask, no orientation): intensities
are read relative to the brain core of the image itself. docs/qc.md explains each measure and its limit.

Two kinds of finding: a **flag** says "this mask probably failed" (``flag_image``, ``flag_group``); a **note**
says "this image is unusual" (``note_image``, ``note_group``: the field of view cuts the brain, the image is
noisier or darker inside the brain than its group) and does not count as a failure.
"""

import math

import numpy as np
from scipy import ndimage as ndi
from scipy.stats import median_abs_deviation

from .geometry import voxel_box
from .intensity import HEAVY_NOISE_SMOOTHING_MM, as_the_networks_read_it

TARGET_MM = 2.0  # analysis grid spacing (integer-stride subsampling towards this)
RIM_MM = 4.0  # width of the inner / outer boundary rims and of the shells of the edge profile
TISSUE_FRACTION = 0.5  # brain-core voxels darker than this fraction of its median are CSF (T1: CSF < 0.4 of WM)
MIN_COMPONENT_ML = 1.0  # extra components of p > 0.5 smaller than this are ignored
# Edge profile: the mask surface displaced by each of these offsets (mm; < 0 = inwards), and the contrast
# between the RIM_MM shell inside and the RIM_MM shell outside the displaced surface.
EDGE_OFFSETS_MM = tuple(float(g) for g in range(-12, 9, 2))
MARGIN_MM = max(EDGE_OFFSETS_MM) + RIM_MM + 4.0  # bounding-box margin around the mask
TAIL_SECTION = 0.2  # the mask's tail begins where its cross-section falls under this share of its largest
EDGE_SEARCH_MAX_MM = 6.0  # the brain edge is searched at offsets up to this (the scalp/air edge is further)

# Absolute rules: measure -> (low, high, unit, text). A measure outside [low, high] raises a flag.
# Calibrated on the silver masks of the 29 real heads of ../shared/data/heads and on the bundled model's
# own masks of the same heads (no false alarm on either), and checked against the corruptions of
# bench/qc_flags.py; docs/qc.md gives the numbers and the reason for each limit.
LIMITS = {
    "brain_volume_ml": (350.0, 2300.0, "ml", "brain volume"),
    "extra_components_ml": (None, 10.0, "ml", "blobs of p>0.5 outside the brain"),
    "uncertain_fraction": (None, 0.45, "", "uncertain voxels (0.1<p<0.9) relative to the mask size"),
    "prob_mask_disagreement": (None, 0.10, "", "mask and p>0.5 disagree on a fraction of the mask"),
    "dark_fraction": (None, 0.25, "", "dark (CSF/skull/background-like) fraction of the mask"),
    "edge_offset_mm": (-6.0, 0.5, "mm", "image's brain edge relative to the mask surface"),
    "edge_offset_spread_mm": (None, 15.0, "mm", "brain edge vs mask surface differs between sides of the mask by"),
    "outside_brainlike_fraction": (None, 0.50, "", "brain-like intensity just outside the mask"),
    "outside_brainlike_max": (None, 0.75, "", "brain-like intensity just outside the mask, worst side"),
    "extent_major_mm": (None, 185.0, "mm", "longest mask extent"),
    "extent_ratio": (0.58, None, "", "shortest / longest mask extent"),
    "sphericity": (0.70, None, "", "mask sphericity"),
    "tail_fraction": (None, 0.04, "", "share of the mask in a narrow tail beyond the brain's bulk"),
    "view_disagreement": (None, 0.05, "", "the network's two views of the brain disagree on a fraction of it"),
}

# Where CSF is brighter than the brain (T2w, PD, T2*w), a good mask is wrapped in a rim of bright CSF and then the
# dark skull: the partial volume of cortex and that CSF falls in the brain-like band, and the strongest edge outside
# the cortex is the CSF's outer one (the edge profile's peak, 0.5-1.5 mm beyond a good mask on 3D T2w images; a
# T1w's cortex -> dark CSF edge lies 2 mm inside it). For these contrasts the three rules that read that rim accept
# what good masks show (docs/qc.md, "Bright CSF": 3D T2w/PD paintings of the held-out heads, and the real T2w images
# of ../shared/data/contrasts, whose eroded and shifted masks are still caught). The same rim makes a mask grown
# into the skull read less far inside than a T1w's does: T2w and PD masks 5 mm too large read -3.3 to -5.1 mm,
# inside the T1w's -6.0, where no good mask of these contrasts read below -1.7 mm (docs/qc.md, "The lower end").
BRIGHT_CSF_CONTRASTS = ("T2w", "PDw", "T2starw")
BRIGHT_CSF_LIMITS = {
    "edge_offset_mm": (-3.0, 2.0, "mm", LIMITS["edge_offset_mm"][3]),
    "outside_brainlike_fraction": (None, 0.65, "", LIMITS["outside_brainlike_fraction"][3]),
    "outside_brainlike_max": (None, 0.85, "", LIMITS["outside_brainlike_max"][3]),
}


def limits_for(contrast="T1w"):
    """The absolute rules (``LIMITS``' shape) for the masks of images of BIDS suffix ``contrast``."""
    return {**LIMITS, **BRIGHT_CSF_LIMITS} if contrast in BRIGHT_CSF_CONTRASTS else LIMITS


# Absolute rules that describe the image, not the mask: outside [low, high] they add a note, never a flag.
# A brain cut by the field of view is the image's problem: the 2D clinical scans of ../shared/data/contrasts
# (3-4 mm slices) reach 0.014 (T2w) and 0.055 (T1w) with good masks, vrd-seg3d-mr (implanted grid) 0.044.
# Noise too: the bundled networks' masks of the held-out heads stay good (Dice >= 0.95) up to a noise ratio of 0.32,
# and every mask they fail on at more noise (from 0.34) is flagged by the mask's own measures (volume, extent,
# uncertainty), while a noise flag above 0.15 fired on the good ones (20 of 27 heads with 5 % Rician noise;
# bench/stress_eval.py, docs/qc.md).
# A brain smaller than an adult's (800 ml) is a child's as often as a mask cut short, which the mask's own measures
# (extent, edge, brain-like band) flag: a note down to about a newborn's brain (350 ml), a flag below it.
NOTE_LIMITS = {
    "brain_volume_ml": (800.0, None, "ml", "brain volume"),
    "fov_edge_fraction": (None, 0.02, "", "brain on the field-of-view edge (fraction of the mask's surface)"),
    "noise_ratio": (None, 0.15, "", "noise relative to brain intensity"),
}
NOTE_HINTS = {("brain_volume_ml", "low"): "small for an adult: a child's brain, or a mask cut short? look at it",
              ("fov_edge_fraction", "high"): "the image's field of view cuts the brain",
              ("noise_ratio", "high"): "a noisy image: look at the mask"}

# A hint added to a flag: (measure, "low" | "high") -> text.
HINTS = {
    ("brain_volume_ml", "low"): "mask too small or brain cut?",
    ("brain_volume_ml", "high"): "mask too large?",
    ("edge_offset_mm", "low"): "mask too large?",
    ("edge_offset_spread_mm", "high"): "mask shifted, flipped or not this head's?",
    ("outside_brainlike_fraction", "high"): "brain left outside the mask?",
    ("outside_brainlike_max", "high"): "brain left outside the mask?",
    ("extent_major_mm", "high"): "mask too large?",
    ("extent_ratio", "low"): "part of the brain cut off?",
    ("tail_fraction", "high"): "mask too large: a narrow part of it runs on beyond the brain (into the neck?)",
    ("view_disagreement", "high"): "the network is unsure of this image (unlike the heads it knows: a stripped "
                                   "brain on a background that is not 0? a wrong voxel size?)",
}
# A mask that is too large (by volume or length) also looks elongated, misshapen and surrounded by tissue as
# bright as brain (the neck, the face): for such a mask these flags get the hint that names the cause.
TOO_LARGE = (("brain_volume_ml", "high"), ("extent_major_mm", "high"))
TOO_LARGE_HINT = "mask too large: it runs beyond the brain (into the neck or face?)"
# ... unless it keeps a brain's proportions and compactness (a mask into the neck is elongated): then a brain
# larger than brains are, which is what voxel sizes too large in the header make of a good mask (x1.25-2: extent
# ratio 0.71-0.75, sphericity 0.84-0.89, as the same head's 0.71 and 0.90)
BRAIN_SHAPED = {"extent_ratio": 0.65, "sphericity": 0.80}
SCALED_HINT = "a brain-shaped mask larger than brains are: are the voxel sizes in the header right?"
EXPLAINED_BY_TOO_LARGE = {("extent_ratio", "low"), ("sphericity", "low"), ("outside_brainlike_fraction", "high"),
                          ("outside_brainlike_max", "high"), ("brain_volume_ml", "high"),
                          ("extent_major_mm", "high")}
# A brain the field of view cuts (the ``fov_edge_fraction`` note: a slab, a stack stopping short of the vertex) is
# flatter than a whole brain, and so is its good mask: the extent ratio of 72 good masks of FLAIR, T2w and T1w
# images cut at the vertex or below, or slabs of 11-80 mm, was 0.28-0.57 (red-team 13: 65 false alarms). There it is
# a note. A failed mask of such an image keeps its other flags (volume, length, the networks' views, the edge).
# So is a slab whose brain ends in its brainstem, a temporal lobe or a pole, where it holds little of the rest: the
# tails of 20 of 300 slabs (20-100 mm, every axis) of 5 heads' good masks were 0.040-0.151, with 0.36-0.57 of the
# mask's surface on the faces of the field of view; none of 150 stacks cut 10-50 mm short of either end had a tail
# above the limit. A stack cut at the vertex (0.03) with a leak into the neck is not explained.
# Finding -> the share of the mask's surface the field of view must cut to explain it.
EXPLAINED_BY_FOV_CUT = {("extent_ratio", "low"): NOTE_LIMITS["fov_edge_fraction"][1], ("tail_fraction", "high"): 0.25}
# ... where the mask is flat across the cut (its shortest principal axis within about 45 degrees of the normal of the
# faces that cut it): half a brain dropped beside the cut (flat left-right under a cut at the vertex) was a note,
# blaming the field of view (red-team 18: Dice 0.65, 5 of 5 on T1w, FLAIR and T2w images cut at the vertex).
FOV_CUT_ALIGNED = 0.7
FOV_CUT_HINTS = {("extent_ratio", "low"): "flatter than a brain: the image's field of view cuts it",
                 ("tail_fraction", "high"): "a brain's narrow end, where the image's field of view cuts the rest"}

# What each measure means (shown in the reports next to the value).
MEASURE_HELP = {
    "brain_volume_ml": "volume of the brain mask",
    "brain_voxels": "number of voxels in the mask",
    "fov_edge_fraction": "area of the mask on the faces of the image / the mask's surface area (brain cut by the "
                         "field of view?)",
    "resolution_mm": "largest voxel edge (the slice thickness of a 2D scan): what the edge measures can resolve",
    "uncertain_fraction": "voxels with 0.1<p<0.9 relative to the mask size (the model hesitates)",
    "prob_mask_disagreement": "voxels where p>0.5 and the final mask disagree, relative to the mask size",
    "n_extra_components": "number of blobs of p>0.5 (>= 1 ml) outside the main brain component",
    "extra_components_ml": "volume of blobs of p>0.5 outside the main brain component",
    "boundary_contrast": "(inner rim - outer rim) median intensity / brain median (4 mm rims)",
    "dark_fraction": "mask voxels darker than 30% of the brain median (CSF, skull, background)",
    "outside_brainlike_fraction": "voxels within 4 mm outside the mask with brain-like intensity",
    "outside_brainlike_max": "the same on the worst of 6 sides of the mask (brain left outside on one side?)",
    "edge_offset_mm": "where the image's brain edge is, relative to the mask surface (< 0: inside); "
                      "about -2 for a good mask, > 0 for a mask too small, << 0 for a mask too large",
    "edge_offset_spread_mm": "largest difference of that edge offset between 6 sides of the mask "
                             "(shifted, flipped or wrong mask)",
    "edge_contrast": "contrast of the image's brain edge (peak of the edge profile) / brain median",
    "noise_ratio": "noise std / brain median intensity at the brain centre",
    "sphericity": "compactness of the mask (1 = sphere)",
    "tail_fraction": "share of the mask beyond where its cross-section, away from the largest one along an image "
                     "axis, falls under a fifth of it (a brain: the end of its brainstem; a leak into the neck: its "
                     "column)",
    "extent_major_mm": "longest extent of the mask (principal axis)",
    "extent_minor_mm": "shortest extent of the mask (principal axis)",
    "extent_ratio": "shortest / longest extent (a brain is about 0.7; a cut-off part makes it flatter)",
    "fov_cut_alignment": "|cosine| between the mask's shortest principal axis and the normal of the faces of the "
                         "image that cut it (1: flat across the cut, as a cut makes it; 0 where none cuts it)",
    "view_disagreement": "voxels in the brain of one of the network's two views (the brain box, and its mirror "
                         "image) and not of the other, over those in either (1.5-3.9 % on real heads)",
}

# Group rule: robust z-scores of these measures within the images of one run. Value: (the smallest spread, in
# the measure's unit, taken as meaningful, so that near-identical values do not turn a tiny difference into a
# huge z; which side is suspicious: +1 high only, -1 low only, 0 both).
GROUP_MEASURES = {
    "brain_volume_ml": (25.0, 0),
    "uncertain_fraction": (0.01, +1),
    "boundary_contrast": (0.02, -1),
    "outside_brainlike_fraction": (0.02, +1),
    "outside_brainlike_max": (0.02, +1),
    "edge_offset_mm": (0.25, 0),
    "edge_offset_spread_mm": (0.5, +1),
    "extent_ratio": (0.01, 0),
    "sphericity": (0.005, 0),
}
# Group outliers of these say the image is unusual (noisier, more CSF: the atrophic heads of 92- and
# 95-year-olds), not that its mask failed: a note.
GROUP_NOTE_MEASURES = {
    "dark_fraction": (0.005, +1),
    "noise_ratio": (0.003, +1),
}
# Measures that a coarse voxel blurs: an image's own spread is at least this share of its resolution_mm
# (the 2D scans' per-side edge offsets differ by up to one slice thickness with good masks; on the 52
# heads of ../shared/data 0.5x for the spread left 2 false alarms, 1.0x none).
RESOLUTION_SCALED = {"edge_offset_mm": 0.25, "edge_offset_spread_mm": 1.0}
GROUP_MIN_IMAGES = 8
GROUP_Z = 4.0

MEASURE_KEYS = (
    "brain_volume_ml", "brain_voxels", "resolution_mm", "fov_edge_fraction", "uncertain_fraction", "prob_mask_disagreement",
    "n_extra_components", "extra_components_ml", "boundary_contrast", "dark_fraction",
    "outside_brainlike_fraction", "outside_brainlike_max", "edge_offset_mm", "edge_offset_spread_mm",
    "edge_contrast", "noise_ratio", "sphericity", "extent_major_mm", "extent_minor_mm", "extent_ratio",
    "view_disagreement", "fov_cut_alignment", "tail_fraction",
)


def _strides(voxel_mm):
    return tuple(max(1, int(round(TARGET_MM / float(v)))) for v in voxel_mm)


def _bbox(m):
    """[(start, stop)] per axis of the True voxels of ``m`` (which has some)."""
    lo, hi = voxel_box(m)
    return [(int(a), int(b) + 1) for a, b in zip(lo, hi)]


def _axis_medians(m):
    """Per-axis median coordinate of the True voxels (from the projections: cheap)."""
    out = []
    for ax in range(3):
        counts = m.sum(axis=tuple(a for a in range(3) if a != ax))
        c = np.cumsum(counts)
        out.append(int(np.searchsorted(c, c[-1] / 2.0)))
    return out


def qc_measures(t1w, probability, mask, voxel_mm, *, view_disagreement=None, read=None,
                noise_smoothing_mm=HEAVY_NOISE_SMOOTHING_MM):
    """Reference-free QC measures of one brain mask (dict of floats; NaN where undefined).

    ``t1w`` (float), ``probability`` (float [0, 1]) and ``mask`` (uint8/bool) are 3D arrays on the same
    native grid; ``voxel_mm`` the voxel sizes in millimetres; ``view_disagreement`` the predictor's
    (``Prediction.view_disagreement``), where known; ``read``: ``t1w`` as the networks read it
    (``intensity.as_the_networks_read_it``, ``Prediction.read``), where known, else read here with the networks'
    ``noise_smoothing_mm`` (``Prediction.noise_smoothing_mm``). See docs/qc.md for what each
    measure means.
    """
    voxel_mm = np.asarray(voxel_mm, dtype=float)[:3]
    mask = np.asarray(mask) > 0
    out = {k: float("nan") for k in MEASURE_KEYS}
    if view_disagreement is not None:
        out["view_disagreement"] = float(view_disagreement)
    n_mask = int(np.count_nonzero(mask))
    out["brain_voxels"] = float(n_mask)
    out["brain_volume_ml"] = n_mask * float(np.prod(voxel_mm)) / 1000.0
    out["resolution_mm"] = float(np.max(voxel_mm))
    if n_mask == 0:
        return out

    # Field-of-view edge: the mask's area on the six faces of the image, relative to its surface area (both in
    # mm^2, so that thick slices do not weigh more than thin ones).
    per_axis = [sum(int(np.count_nonzero(np.take(mask, i, axis=ax))) for i in (0, -1))
                * float(np.prod(np.delete(voxel_mm, ax))) for ax in range(3)]
    on_faces = sum(per_axis)
    if on_faces:  # the surface at full resolution, on the mask's box (voxel faces, 2/3 for the staircase)
        surface = _surface_area(mask[tuple(slice(a, b) for a, b in _bbox(mask))], voxel_mm) * (2.0 / 3.0)
        out["fov_edge_fraction"] = on_faces / surface
    else:
        out["fov_edge_fraction"] = 0.0

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
    if read is None:
        read = as_the_networks_read_it(np.asarray(t1w, dtype=np.float32), voxel_mm,
                                       noise_smoothing_mm=noise_smoothing_mm)[0]
    img = read[box]
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

    # Signed distance to the mask surface (mm; < 0 inside), rims and the brain core.
    d_in = ndi.distance_transform_edt(m, sampling=vox)
    d_out = ndi.distance_transform_edt(~m, sampling=vox)
    sd = np.where(m, 1e-3 - d_in, d_out)
    del d_out
    inner = m & (sd > -RIM_MM)
    outer = ~m & (sd <= RIM_MM)
    core = d_in > 2 * RIM_MM
    del d_in
    if np.count_nonzero(core) < 50:
        core = m
    core_vals = img[core]
    ref = float(np.median(core_vals))
    # Brain-like = the 5th-95th percentiles of the core's tissue, without its CSF: the enlarged ventricles of
    # an atrophic brain would stretch them down to CSF intensity, and CSF outside the mask would look like brain.
    tissue = core_vals[core_vals >= TISSUE_FRACTION * ref]
    lo, hi = np.percentile(tissue if tissue.size >= 50 else core_vals, [5, 95])
    scale = abs(ref) if ref != 0 else (float(np.ptp(img)) or 1.0)
    if inner.any() and outer.any():
        outer_vals = img[outer]
        out["boundary_contrast"] = (float(np.median(img[inner])) - float(np.median(outer_vals))) / scale
        out["outside_brainlike_fraction"] = float(np.mean((outer_vals >= lo) & (outer_vals <= hi)))
    # Dark voxels in the mask: darker than 30 % of the brain-core median (CSF, skull, background).
    out["dark_fraction"] = float(np.mean(img[m] < 0.3 * ref))
    out.update(_edge_measures(img / scale, sd, m, vox, lo / scale, hi / scale,
                              at_view_edge=_at_view_edge(box, mask.shape, vox)))

    # Noise at full resolution in a small cube at the centre of the brain core.
    centre = [b.start + c * s for b, c, s in zip(box, _axis_medians(core), step)]
    out["noise_ratio"] = _noise_ratio(t1w, centre, ref)

    # Shape: sphericity (voxel-face area, corrected by 2/3 for the staircase), principal extents.
    area = _surface_area(m, vox) * (2.0 / 3.0)
    volume = nm * float(np.prod(vox))
    out["sphericity"] = float(math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area) if area > 0 else float("nan")
    out["tail_fraction"] = _tail_fraction(m)
    coords = np.argwhere(m)
    coords = coords[:: max(1, len(coords) // 20000)] * vox
    if len(coords) > 10:
        ev, axes = np.linalg.eigh(np.cov(coords.T))  # ascending; the voxel axes are the image's
        out["fov_cut_alignment"] = float(abs(axes[int(np.argmax(per_axis)), 0])) if on_faces else 0.0
        # 4 sigma = full length of a uniform rod of the same variance (x sqrt(12) = 3.46); ~ the brain length
        out["extent_major_mm"] = float(4 * math.sqrt(max(ev[-1], 0)))
        out["extent_minor_mm"] = float(4 * math.sqrt(max(ev[0], 0)))
        if ev[-1] > 0:
            out["extent_ratio"] = float(math.sqrt(max(ev[0], 0) / ev[-1]))
    return out


def _tail_fraction(m):
    """The largest share of ``m`` beyond the point where, walking along an image axis away from its largest
    cross-section, the cross-section first falls under TAIL_SECTION of that one. A brain narrows once, to the end
    of its brainstem (1-2 % of a good mask); a mask that runs on into the neck keeps the neck's width there.
    Along all six directions, so that it holds whatever the header says is down."""
    largest = 0
    for ax in range(3):
        section = m.sum(axis=tuple(a for a in range(3) if a != ax))
        for profile in (section, section[::-1]):
            peak = int(np.argmax(profile))
            beyond = profile[peak:]
            narrow = np.flatnonzero(beyond < TAIL_SECTION * profile[peak])
            if narrow.size:
                largest = max(largest, int(beyond[narrow[0]:].sum()))
    return largest / max(int(np.count_nonzero(m)), 1)


def _at_view_edge(box, shape, vox):
    """The voxels of the analysis grid (``box``, slices of the image with steps) within RIM_MM of a face of the
    image's field of view: a rim there is cut short, and the brain may go on beyond the face."""
    near = np.zeros(tuple(len(range(*b.indices(n))) for b, n in zip(box, shape)), bool)
    for ax, (b, n) in enumerate(zip(box, shape)):
        k = int(math.ceil(RIM_MM / vox[ax]))
        index = [slice(None)] * 3
        if b.start == 0:
            index[ax] = slice(0, k)
            near[tuple(index)] = True
        if b.stop >= n:
            index[ax] = slice(near.shape[ax] - k, None)
            near[tuple(index)] = True
    return near


def _edge_measures(img, sd, m, vox, lo, hi, at_view_edge=None):
    """Edge profile of the image across the mask surface, overall and on 6 sides of the mask.

    ``img`` is scaled to the brain-core median; ``sd`` the signed distance to the mask surface (mm).
    Shells of RIM_MM / 2 thickness by signed distance, split into 6 sectors by the direction from the mask
    centre (dominant voxel axis, in mm), give mean intensities; the edge profile at offset g is the mean of
    the RIM_MM inside minus the RIM_MM outside the surface displaced by g. Its peak (``_edge_peak``) is the
    image's brain edge (cortex -> CSF/skull); the peak's offset says where the brain ends relative to the
    mask surface, overall and per side.
    """
    half = RIM_MM / 2.0
    g_min, g_max = min(EDGE_OFFSETS_MM), max(EDGE_OFFSETS_MM)
    j_lo = int(math.floor((g_min - RIM_MM) / half))
    n_sh = int(math.ceil((g_max + RIM_MM) / half)) - j_lo
    band = (sd > j_lo * half) & (sd <= (j_lo + n_sh) * half)
    shell = np.clip(np.ceil(sd[band] / half).astype(np.int64) - 1 - j_lo, 0, n_sh - 1)
    pos = np.argwhere(band).astype(np.float32)
    pts = np.argwhere(m[::2, ::2, ::2])
    centre = pts.mean(axis=0) * 2 if len(pts) else np.argwhere(m).mean(axis=0)
    d = (pos - centre) * vox
    ax = np.abs(d).argmax(axis=1)
    sector = ax * 2 + (d[np.arange(len(d)), ax] > 0)
    del pos, d, ax
    vals = img[band].astype(np.float64)
    key = sector * n_sh + shell
    # Voxels brighter than the brain's brightest tissue (``hi``) are neither brain nor its dark surround: enhancing
    # dura and vessels of a post-contrast image, fat. Left in, a bright ring just outside the brain made its outer
    # edge the profile's peak (+6 mm on good masks of painted post-gadolinium heads: red-team 18) and hid the
    # cortex -> CSF edge behind it.
    in_profile = vals <= hi
    sums = np.bincount(key[in_profile], weights=vals[in_profile], minlength=6 * n_sh).reshape(6, n_sh)
    counts = np.bincount(key[in_profile], minlength=6 * n_sh).reshape(6, n_sh).astype(float)
    out = {}
    profile = _edge_profile(sums.sum(axis=0), counts.sum(axis=0), j_lo, half)
    out["edge_contrast"], out["edge_offset_mm"] = _edge_peak(profile)
    offsets = np.array([_edge_peak(_edge_profile(sums[s], counts[s], j_lo, half))[1] for s in range(6)])
    if np.isfinite(offsets).sum() >= 2:
        out["edge_offset_spread_mm"] = float(np.nanmax(offsets) - np.nanmin(offsets))
    # Brain-like intensity in the outer rim, per sector: the worst side. Not at a face of the field of view that
    # cuts the brain: there the rim is a few voxels beside the cut, brain-like, and the side facing the cut was
    # "brain left outside" on good masks (red-team 13: 5 images cut at the vertex or in slabs, worst side 0.91-1.0).
    outer = (sd > 0) & (sd <= RIM_MM)
    if at_view_edge is not None:
        outer &= ~at_view_edge
    in_outer = outer[band]
    brainlike = (vals >= lo) & (vals <= hi)
    n_out = np.bincount(sector[in_outer], minlength=6)
    n_bl = np.bincount(sector[in_outer & brainlike], minlength=6)
    ok = n_out >= 20
    if ok.any():
        out["outside_brainlike_max"] = float(np.max(n_bl[ok] / n_out[ok]))
    return out


def _edge_profile(sums, counts, j_lo, half):
    """Contrast (inner shell mean - outer shell mean) of the surface displaced by each EDGE_OFFSETS_MM."""
    out = []
    k = int(round(RIM_MM / half))  # shells per rim
    for g in EDGE_OFFSETS_MM:
        j0 = int(round(g / half)) - j_lo  # first shell outside the displaced surface
        ci, co = counts[j0 - k:j0].sum(), counts[j0:j0 + k].sum()
        if j0 - k < 0 or j0 + k > len(counts) or ci < 20 or co < 20:
            out.append(float("nan"))
        else:
            out.append(sums[j0 - k:j0].sum() / ci - sums[j0:j0 + k].sum() / co)
    return np.array(out)


def _edge_peak(profile):
    """(height, offset in mm) of the brain edge in an edge profile: the highest local maximum at an offset
    <= EDGE_SEARCH_MAX_MM (further out, the scalp/air edge can be stronger than the brain edge), refined by
    a parabola through its neighbours; the highest point of the profile if there is no such maximum."""
    c = np.asarray(profile, dtype=float)
    ok = np.isfinite(c)
    if not ok.any():
        return float("nan"), float("nan")
    g = np.asarray(EDGE_OFFSETS_MM)
    n = len(c)

    def neighbours(k):
        return (c[k - 1] if k > 0 and ok[k - 1] else -np.inf, c[k + 1] if k + 1 < n and ok[k + 1] else -np.inf)

    peaks = [k for k in range(n) if ok[k] and g[k] <= EDGE_SEARCH_MAX_MM and c[k] >= max(neighbours(k))]
    k = max(peaks, key=lambda i: c[i]) if peaks else int(np.nanargmax(c))
    # the parabola's points: the nearest defined offsets on either side, up to two steps away (on an analysis
    # grid coarser than the shells, e.g. 2.4 mm voxels of a 1.2 mm image, the shells next to the surface are
    # empty: refining over the immediate neighbours only left the edge at exactly 0.0)
    lo = next((i for i in (k - 1, k - 2) if i >= 0 and ok[i]), None)
    hi = next((i for i in (k + 1, k + 2) if i < n and ok[i]), None)
    offset = g[k]
    if lo is not None and hi is not None:
        (x0, y0), (x1, y1), (x2, y2) = (g[lo], c[lo]), (g[k], c[k]), (g[hi], c[hi])
        num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
        den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
        if den > 0:  # a maximum (y1 above the chord), its vertex between the two points
            offset = float(np.clip(x1 - 0.5 * num / den, x0, x2))
    return float(c[k]), float(offset)


def _noise_ratio(t1w, centre, ref, half=12):
    """Noise in a (2 half)^3-voxel cube: robust std of second differences (anatomy is smooth at that
    scale), relative to the brain-core median."""
    sl = tuple(slice(max(0, c - half), c + half) for c in centre)
    cube = np.asarray(t1w[sl], dtype=np.float32)
    if min(cube.shape) < 4 or ref == 0:
        return float("nan")
    d = np.concatenate([np.diff(cube, n=2, axis=ax).ravel() for ax in range(3)])
    sigma = float(median_abs_deviation(d, scale="normal")) / math.sqrt(6.0)
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
    return f"{v:.3g}"


def accepted_range(key, limits=None):
    """The accepted range of a measure, e.g. "350 to 2300 ml", ">= 0.58" ("" for a measure without limits), by
    ``limits`` (default: the flags' rule, else the notes')."""
    rule = (limits or {}).get(key) or LIMITS.get(key) or NOTE_LIMITS.get(key)
    if rule is None:
        return ""
    low, high, unit, _ = rule
    u = f" {unit}" if unit else ""
    if low is not None and high is not None:
        return f"{_fmt(low)} to {_fmt(high)}{u}"
    return f"{'>=' if low is not None else '<='} {_fmt(low if low is not None else high)}{u}"


def _outside(measures, limits):
    """{measure: (value, "low" | "high")} of the measures outside their ``limits``."""
    outside = {}
    for key, (low, high, _, _) in limits.items():
        v = _as_float(measures.get(key))
        if np.isfinite(v):
            side = "low" if low is not None and v < low else "high" if high is not None and v > high else None
            if side:
                outside[key] = (v, side)
    return outside


def _finding(key, v, side, limits, hint):
    unit, text = limits[key][2:]
    u = f" {unit}" if unit else ""
    value = f"{v:+.1f}" if key == "edge_offset_mm" else _fmt(v)
    return f"{text}: {value}{u} (accepted {accepted_range(key, limits)})" + (f" - {hint}" if hint else "")


def flag_image(measures, contrast="T1w"):
    """Absolute rules on one image's measures -> list of short readable flags (empty = no doubt); ``contrast``:
    the image's BIDS suffix (``limits_for``)."""
    if not measures:
        return ["no QC measures"]
    vox = measures.get("brain_voxels")
    if vox is not None and vox == 0:
        return ["empty brain mask"]
    limits = limits_for(contrast)
    outside = {key: found for key, found in _outside(measures, limits).items()
               if (key, found[1]) not in _explained_by_fov_cut(measures)}
    too_large = any(outside.get(key, (None, None))[1] == side for key, side in TOO_LARGE)
    brain_shaped = all(_as_float(measures.get(key)) >= low for key, low in BRAIN_SHAPED.items())
    large_hint = SCALED_HINT if brain_shaped else TOO_LARGE_HINT
    return [_finding(key, v, side, limits,
                     large_hint if too_large and (key, side) in EXPLAINED_BY_TOO_LARGE else HINTS.get((key, side)))
            for key, (v, side) in outside.items()]


def _explained_by_fov_cut(measures):
    """The (measure, side) findings that a brain cut by the field of view explains, where it is cut."""
    cut = _as_float(measures.get("fov_edge_fraction"))
    alignment = _as_float(measures.get("fov_cut_alignment"))
    across = alignment >= FOV_CUT_ALIGNED or math.isnan(alignment)  # NaN: a record from before the measure
    return {finding for finding, least in EXPLAINED_BY_FOV_CUT.items() if across and cut > least}


def note_image(measures, contrast="T1w"):
    """Absolute rules that describe the image (``NOTE_LIMITS``) -> list of notes: unusual, not failed (a measure
    that a flag's rule judges as well is noted only while no flag is raised on it), and the findings a field of
    view that cuts the brain explains."""
    measures, limits = measures or {}, limits_for(contrast)
    flagged = _outside(measures, limits)
    notes = [_finding(key, v, side, NOTE_LIMITS, NOTE_HINTS.get((key, side)))
             for key, (v, side) in _outside(measures, NOTE_LIMITS).items() if key not in flagged]
    cut = _explained_by_fov_cut(measures)
    return notes + [_finding(key, v, side, limits, FOV_CUT_HINTS[key, side]) for key, (v, side) in flagged.items()
                    if (key, side) in cut]


def robust_z(values, min_scale=0.0):
    """(x - median) / max(MAD scaled to a normal's sigma, min_scale) with NaN kept; zeros where that scale
    vanishes."""
    x = np.asarray(values, dtype=float)
    ok = np.isfinite(x)
    z = np.full_like(x, np.nan)
    if ok.sum() == 0:
        return z
    med = np.median(x[ok])
    scale = max(float(median_abs_deviation(x[ok], scale="normal")), float(min_scale))
    if scale <= 1e-12:
        z[ok] = 0.0
        return z
    z[ok] = (x[ok] - med) / scale
    return z


def _group_outliers(rows, measures):
    """Per row, the group-outlier texts of ``measures`` (GROUP_MEASURES' shape) among ``rows`` (none below
    GROUP_MIN_IMAGES rows). Measures of RESOLUTION_SCALED take at least that share of each image's own
    resolution_mm as their spread: a 4 mm slice does not make a 4 mm difference an outlier."""
    out = [[] for _ in rows]
    if len(rows) < GROUP_MIN_IMAGES:
        return out
    resolution = np.array([_as_float(r.get("resolution_mm")) for r in rows])
    for key, (min_scale, side) in measures.items():
        vals = np.array([_as_float(r.get(key)) for r in rows])
        z = robust_z(vals, min_scale)
        if key in RESOLUTION_SCALED:
            ok = np.isfinite(vals)
            if ok.any():
                scale = max(float(median_abs_deviation(vals[ok], scale="normal")), min_scale)
                floor = np.where(np.isfinite(resolution), RESOLUTION_SCALED[key] * resolution, 0.0)
                z = (vals - np.median(vals[ok])) / np.maximum(scale, floor)
        for i, zi in enumerate(z):
            if np.isfinite(zi) and (abs(zi) if side == 0 else side * zi) > GROUP_Z:
                out[i].append(f"{key.replace('_', ' ')} {_fmt(vals[i])} is a group outlier (z = {zi:+.1f})")
    return out


def flag_group(rows, contrast="T1w"):
    """Flags for a group: each row's absolute flags plus robust z-score outliers (|z| > GROUP_Z) of the
    measures that say a mask failed (GROUP_MEASURES).

    ``rows`` is a sequence of dicts of measures (e.g. the ``qc`` dicts of the metrics JSON files, or rows that
    contain those keys). Returns one list of flags per row, in order. z-score flags are added only when there
    are at least GROUP_MIN_IMAGES images. ``contrast``: the images' BIDS suffix (a group is one contrast).
    """
    rows = list(rows)
    flags = []
    for r, z in zip(rows, _group_outliers(rows, GROUP_MEASURES)):
        explained = _cut_outliers(r, z)
        flags.append(flag_image(r, contrast) + [t for t in z if t not in explained])
    return flags


def _cut_outliers(measures, texts):
    """Of an image's group-outlier ``texts``, those that a field of view cutting its brain explains (a note)."""
    explained = [(f"{key.replace('_', ' ')} ", "(z = -" if side == "low" else "(z = +")
                 for key, side in _explained_by_fov_cut(measures)]
    return [t for t in texts if any(t.startswith(name) and sign in t for name, sign in explained)]


def note_group(rows, contrast="T1w"):
    """Notes for a group: each row's absolute notes plus the group outliers of the measures that describe the
    image (GROUP_NOTE_MEASURES): "this image is unusual", not "this mask failed"; and the group outliers a field of
    view cutting the brain explains."""
    rows = list(rows)
    return [note_image(r, contrast) + z + _cut_outliers(r, flagging)
            for r, z, flagging in zip(rows, _group_outliers(rows, GROUP_NOTE_MEASURES),
                                      _group_outliers(rows, GROUP_MEASURES))]


def _as_float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")
