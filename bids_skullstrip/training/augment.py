"""Turning a few real heads into an endless stream of varied training patches.

Every patch is drawn from one seeded generator, so the stream is reproducible and resumable.
Spatial: rotation, anisotropic scaling, left-right flip, smooth elastic warp, random field of view.
Acquisition: thick slices, bias field, Rician noise, gamma, intensity scaling. Synthesis: real
skull-stripped brains composited into the real head shells (new brain shapes and textures), the
head's tissue classes repainted with random intensities (contrast-agnostic shapes, after SynthStrip),
tumour-like masses inside the brain (still brain), and enhancing dura next to it (not brain).
"""

import functools

import numpy as np
from scipy import ndimage as ndi

from ..geometry import MODEL_VOXEL_MM
from ..model.inference import normalize

# A composited brain's size relative to the space it is put in, per axis (the shipped weights' range).
COMPOSITE_SIZE = (1 / 1.05, 1 / 0.93)


def _rotation(rng, max_deg):
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    return rot


@functools.lru_cache(maxsize=None)
def _upsampling(size, coarse):
    """The (size, coarse) matrix of ``ndi.zoom(..., order=3, mode="nearest")`` along one axis."""
    return np.stack([ndi.zoom(np.eye(coarse)[k], size / coarse, order=3, mode="nearest")[:size]
                     for k in range(coarse)], axis=1)


def _smooth_field(rng, shape, coarse, amplitude):
    """Gaussian noise on a coarse³ grid, cubic-spline upsampled to ``shape``. A 3D zoom of it is linear and
    separable, so it is one small matrix per axis: the same field (to 1e-14) at a tenth of the time, which
    was half of the time spent making a training patch."""
    field = rng.normal(0.0, amplitude, (coarse,) * 3)
    return np.einsum("ia,jb,kc,abc->ijk", *(_upsampling(n, coarse) for n in shape), field, optimize=True)


def _patch_centre(head, rng, stage):
    """Where the patch is centred (world mm): on the whole head for the locator, which sees the whole field
    of view at inference; on the brain's box for the segmenter, off by what the locator may miss (a few
    mm), and for 15 % of patches by much more (a locator fooled by a neck or a cropped top)."""
    if stage == "locator":
        return head.head_extent.mean(0) + rng.normal(0.0, 15.0, 3)
    miss = 15.0 if rng.random() < 0.15 else 4.0
    return head.brain_extent.mean(0) + rng.normal(0.0, miss, 3)


def _sample_world(head, rng, size, voxel_mm, stage):
    """World coordinates (3, N) of a randomly posed patch of ``voxel_mm`` voxels."""
    max_deg = 45.0 if rng.random() < 0.15 else 20.0
    world_from_patch = _rotation(rng, max_deg) @ np.diag(rng.uniform(0.85, 1.15, 3)) * voxel_mm
    if rng.random() < 0.5:
        world_from_patch = np.diag([-1.0, 1.0, 1.0]) @ world_from_patch
    centre = _patch_centre(head, rng, stage)
    grid = np.indices(size, dtype=np.float32).reshape(3, -1) - ((np.array(size) - 1) / 2)[:, None]
    world = world_from_patch @ grid + centre[:, None]
    if rng.random() < 0.5:
        world = world + np.stack([_smooth_field(rng, size, 5, 2.0).ravel() for _ in range(3)])
    return world


def _sample(volumes, affine, world, size):
    """``volumes`` (on the grid of ``affine``) at the world points, and those points' voxel coordinates."""
    native_from_world = np.linalg.inv(affine)
    coords = (native_from_world[:3, :3] @ world + native_from_world[:3, 3:]).reshape(3, *size).astype(np.float32)
    return [ndi.map_coordinates(v, coords, order=1, mode="constant", cval=0.0, prefilter=False)
            for v in volumes], coords


def _composite_brain(rng, head, brain, world, size, image, label, *, size_range=COMPOSITE_SIZE):
    """Put a real brain where the head's brain is: its extent scaled onto ``size_range`` times the head's
    brain extent (per axis, the inverse drawn uniformly), its intensities onto the head's brain intensities,
    and the head's uncovered brain space filled like CSF. A brain smaller than the space it is put in looks
    like an atrophic one: a wide CSF space under the skull, labelled not-brain."""
    head_size = np.diff(head.brain_extent, axis=0)[0]
    brain_size = np.diff(brain.brain_extent, axis=0)[0]
    scale = brain_size / head_size * rng.uniform(1 / size_range[1], 1 / size_range[0], 3)
    brain_world = brain.brain_centre[:, None] + scale[:, None] * (world - head.brain_centre[:, None])
    (new_image, new_mask), _ = _sample((brain.image, brain.mask), brain.affine, brain_world, size)
    new_image *= head.brain_median / brain.brain_median * rng.uniform(0.85, 1.15)
    csf = head.brain_median * rng.uniform(0.1, 0.4) * (1.0 + 0.1 * rng.standard_normal(size))
    shell = image * (1.0 - label) + csf * label
    return (new_image + (1.0 - new_mask) * shell).astype(np.float32), new_mask


def _crop_field_of_view(rng, coords, native_shape):
    """Zero a slab along one native axis: cropped tops, no neck, partial coverage."""
    axis = rng.integers(3)
    n = native_shape[axis]
    if rng.random() < 0.5:
        return coords[axis] > rng.uniform(0.55, 0.95) * n
    return coords[axis] < rng.uniform(0.05, 0.45) * n


def _synthetic_contrast(rng, image, label):
    """Repaint tissue classes (from intensity quantiles inside and outside the brain) at random."""
    smooth = ndi.gaussian_filter(image, 1.0)
    positive = smooth[smooth > 0]
    if positive.size < 100:
        return image
    background = smooth < 0.1 * np.percentile(positive, 98)
    brain = label > 0.5
    classes = np.zeros(image.shape, np.int8)
    for region, offset in ((brain, 1), (~brain & ~background, 4)):
        values = smooth[region]
        if values.size == 0:
            continue
        edges = np.percentile(values, rng.uniform([20, 50], [45, 80]))
        classes[region] = offset + np.digitize(values, edges)
    means = rng.uniform(0.0, 1.0, 7)
    means[0] = rng.uniform(0.0, 0.1)
    stds = rng.uniform(0.0, 0.08, 7)
    out = means[classes] + stds[classes] * rng.standard_normal(image.shape)
    return ndi.gaussian_filter(out, rng.uniform(0.3, 1.2)).astype(np.float32)


# Mean intensity ranges per tissue class (data.TISSUES: background, CSF, gray, white, dark near the brain, dark,
# muscle, skin, fat) of the structural contrasts users strip, after the orderings of the physics: T2w and PD make
# CSF bright, FLAIR dark with gray over white, and gadolinium lights up dura, sinuses and vessels next to the brain.
CONTRAST_PRIORS = {
    "T1w": ((0, .05), (.05, .3), (.35, .55), (.6, .85), (.05, .3), (0, .15), (.25, .45), (.45, .75), (.75, 1)),
    "T2w": ((0, .05), (.75, 1), (.45, .65), (.3, .45), (.6, 1), (0, .15), (.15, .35), (.35, .65), (.5, .9)),
    "FLAIR": ((0, .05), (.02, .2), (.5, .75), (.35, .55), (.02, .25), (0, .12), (.15, .35), (.35, .65), (.45, .9)),
    "PDw": ((0, .05), (.6, .9), (.6, .8), (.45, .6), (.5, .85), (0, .15), (.3, .5), (.5, .8), (.7, 1)),
    "ce-T1w": ((0, .05), (.05, .3), (.35, .55), (.6, .85), (.4, 1), (0, .15), (.25, .45), (.45, .75), (.75, 1)),
}
WHITE = 3


def synthesize_from_labels(rng, labels, *, prior_prob=0.5, contrast=None):
    """An image painted from a tissue label map (after SynthStrip): each class a random mean (drawn within one of
    ``CONTRAST_PRIORS`` with ``prior_prob``, else anywhere in [0, 1]; within ``contrast``'s if given) with its own
    noise and smooth texture, lesion-like blobs in the white matter for some, then blurred by a partial-volume
    kernel. The label map is on the patch grid; background stays near zero."""
    n = int(labels.max()) + 1
    if contrast is not None or rng.random() < prior_prob:
        contrast = contrast or list(CONTRAST_PRIORS)[rng.integers(len(CONTRAST_PRIORS))]
        ranges = np.array(CONTRAST_PRIORS[contrast], float)
        ranges = np.vstack([ranges, np.tile(ranges[-1], (max(0, n - len(ranges)), 1))])
        means = rng.uniform(ranges[:, 0], ranges[:, 1])
    else:
        means = rng.uniform(0.0, 1.0, max(n, len(CONTRAST_PRIORS["T1w"])))
        means[0] = rng.uniform(0.0, 0.1)
    stds = rng.uniform(0.0, 0.06, means.size)
    stds[0] = rng.uniform(0.0, 0.02)
    image = means[labels] + stds[labels] * rng.standard_normal(labels.shape)
    image *= np.exp(_smooth_field(rng, labels.shape, 6, 0.1))  # texture within a class
    if rng.random() < 0.3:  # white-matter lesions (MS, small-vessel disease): brighter or darker than the white
        white = labels == WHITE
        blobs = white & (_smooth_field(rng, labels.shape, 10, 1.0) > rng.uniform(1.5, 2.5))
        image[blobs] = rng.uniform(0.0, 1.0)
    return ndi.gaussian_filter(np.clip(image, 0, None), rng.uniform(0.4, 1.0)).astype(np.float32)


def ball_distance(shape, centre, voxel_mm, stretch=(1.0, 1.0, 1.0)):
    """The distance in mm (each axis divided by ``stretch``) of every voxel of ``shape`` from voxel ``centre``."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return np.sqrt(sum(((g - c) * v / k) ** 2 for g, c, v, k in zip(grids, centre, np.broadcast_to(voxel_mm, 3),
                                                                     stretch)))


def enhancing_shell(rng, image, brain, voxel_mm):
    """Where gadolinium lights up the dura and the sinuses: 0.5-3 mm outside ``brain``, darker than the brain,
    in patches (a smooth random field decides where: enhancement is not even)."""
    vox = np.broadcast_to(voxel_mm, 3)
    outside = ndi.distance_transform_edt(~brain, sampling=vox)
    patches = ndi.gaussian_filter(rng.standard_normal(image.shape), 8.0 / vox) > 0
    return (outside > 0.5) & (outside < 3.0) & (image < np.median(image[brain])) & patches


def _enhance(rng, image, label, voxel_mm):
    """A post-contrast T1w: ``enhancing_shell`` brightened to 1.1-1.6 times the brain's median, labelled not
    brain (the dura is outside the brain mask, however bright)."""
    brain = label > 0.5
    if brain.sum() < 1000 or brain.all():
        return image
    shell = enhancing_shell(rng, image, brain, voxel_mm)
    image = image.copy()
    image[shell] = rng.uniform(1.1, 1.6) * np.median(image[brain]) * (1.0 + 0.1 * rng.standard_normal(shell.sum()))
    return image


def _mass(rng, image, label, voxel_mm):
    """A tumour-, cyst- or cavity-like mass inside the brain, labelled brain: a ball 8-25 mm in radius (each axis
    stretched 0.7-1.3 times) centred under the brain's surface by less than its radius, so that it reaches the
    cortex, cut to the brain, painted 0.05-2 times the brain's median intensity or as a dark core in a bright
    rim 3-8 mm thick (an enhancing glioblastoma), with soft edges. At the cortex a network taught only healthy
    brains takes a dark mass for CSF and a bright one for scalp; deeper ones are filled as holes anyway."""
    brain = label > 0.5
    if brain.sum() < 1000:
        return image
    depth = ndi.distance_transform_edt(brain) * voxel_mm
    radius = rng.uniform(8.0, 25.0)
    centres = np.argwhere(np.abs(depth - rng.uniform(2.0, radius)) < voxel_mm)
    if len(centres) == 0:
        return image
    distance = ball_distance(image.shape, centres[rng.integers(len(centres))], voxel_mm, rng.uniform(0.7, 1.3, 3))
    region = brain & (distance < radius)
    level = float(np.median(image[brain]))
    if rng.random() < 0.3:
        rim = rng.uniform(3.0, 8.0)
        value = np.where(distance < radius - rim, rng.uniform(0.05, 0.6), rng.uniform(1.2, 2.0)) * level
    else:
        value = np.full(image.shape, rng.uniform(0.05, 2.0) * level, np.float32)
    value = value * (1.0 + 0.05 * rng.standard_normal(image.shape))
    weight = ndi.gaussian_filter(region.astype(np.float32), rng.uniform(0.3, 1.0), truncate=2.0)
    return (image * (1.0 - weight) + value * weight).astype(np.float32)


def _thick_slices(rng, image, voxel_mm, thickness_mm=None):
    """A 2D acquisition: slices ``thickness_mm`` thick (sharp in-plane) along one axis of the patch; by default
    1.25-3 voxels (2.5-6 mm on the 2 mm grid, 5-12 mm on the 4 mm one)."""
    axis = rng.integers(3)
    low, high = (1.25 * voxel_mm, 3.0 * voxel_mm) if thickness_mm is None else thickness_mm
    factor = max(1.0, rng.uniform(low, high) / voxel_mm)
    image = ndi.gaussian_filter1d(image, factor / 2.355, axis=axis)
    zoom = [1.0] * 3
    zoom[axis] = 1.0 / factor
    coarse = ndi.zoom(image, zoom, order=1)
    back = [s / c for s, c in zip(image.shape, coarse.shape)]
    return ndi.zoom(coarse, back, order=1)[: image.shape[0], : image.shape[1], : image.shape[2]]


def training_patch(head, rng, *, size=(80, 96, 80), stage="segmenter", voxel_mm=MODEL_VOXEL_MM, synth_prob=0.25,
                   brains=(), composite_prob=0.2, composite_size=COMPOSITE_SIZE, labels_prob=0.0,
                   thick_prob=0.3, thickness_mm=None, fine_bias_prob=0.0, mass_prob=0.0,
                   enhance_prob=0.0):
    """One (image, label) pair, float32 (size) each: image and soft brain label.

    The patch is what the network sees at inference: the whole field of view for the ``locator`` stage,
    the brain-centred box for the ``segmenter``; normalised over the whole patch, as inference does.
    ``labels_prob``: the share of patches painted from the head's tissue label map (``synthesize_from_labels``;
    ``head.labels`` must be loaded) instead of the head's own T1w intensities; ``synth_prob``: of the others, the
    share repainted from intensity quantiles of the patch. ``thick_prob``: the share acquired in 2D slices of
    ``thickness_mm`` (``_thick_slices``). ``fine_bias_prob``: the share given a second, finer bias field (10 control
    points across the patch, ~16 mm apart on the 2 mm grid): the non-uniformity of clinical 2D FLAIR and T2w images
    within a lobe, finer than the 4-point field every patch may get (a frontal pole darker than the rest of the
    cortex). ``mass_prob``: the share given a tumour-like mass inside the brain (``_mass``); ``enhance_prob``: the
    share given enhancing dura and sinuses next to it (``_enhance``: post-contrast T1w)."""
    world = _sample_world(head, rng, size, voxel_mm, stage)
    (image, label), coords = _sample((head.image, head.mask), head.affine, world, size)
    from_labels = rng.random() < labels_prob
    if from_labels:
        labels = ndi.map_coordinates(head.labels, coords, order=0, mode="constant", cval=0)
        image = synthesize_from_labels(rng, labels)
    elif brains and rng.random() < composite_prob:
        image, label = _composite_brain(rng, head, brains[rng.integers(len(brains))], world, size, image, label,
                                        size_range=composite_size)
    if mass_prob and rng.random() < mass_prob:  # drawn only when asked, as fine_bias_prob
        image = _mass(rng, image, label, voxel_mm)
    if enhance_prob and rng.random() < enhance_prob:
        image = _enhance(rng, image, label, voxel_mm)
    if rng.random() < 0.3:
        outside = _crop_field_of_view(rng, coords, head.image.shape)
        image[outside] = 0.0
        label[outside] = 0.0
    scale = np.percentile(image, 99.5) or 1.0
    image = image / scale
    if not from_labels and rng.random() < synth_prob:
        image = _synthetic_contrast(rng, image, label)
    if rng.random() < 0.7:
        image = image * np.exp(_smooth_field(rng, size, 4, rng.uniform(0.1, 0.4)))
    if fine_bias_prob and rng.random() < fine_bias_prob:  # drawn only when asked: older recipes' streams stay
        image = image * np.exp(_smooth_field(rng, size, 10, rng.uniform(0.05, 0.2)))
    if rng.random() < thick_prob:
        image = _thick_slices(rng, image, voxel_mm, thickness_mm)
    if rng.random() < 0.6:
        sigma = rng.uniform(0.005, 0.06)
        image = np.sqrt((image + rng.normal(0, sigma, size)) ** 2 + rng.normal(0, sigma, size) ** 2)
    image = normalize(image.astype(np.float32), hi_scale=rng.uniform(0.85, 1.15))
    if rng.random() < 0.5:
        image = image ** np.exp(rng.normal(0.0, 0.25))
    return image.astype(np.float32), np.clip(label, 0.0, 1.0).astype(np.float32)
