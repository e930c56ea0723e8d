"""What the networks and the QC measures assume of an image's intensities: that air is about 0 and dark, and that
the noise is moderate; ``as_the_networks_read_it`` makes a volume so."""

import numpy as np

# The networks learned air as the darkest intensity of a head, about 0. A constant added to every voxel (a background
# that is not ~0, as some converters' and scanners' scalings leave it) made the whole field of view look like head:
# masks of 2000-6000 ml at an offset of a quarter of the brain's intensity. Such a background is a plateau: most of
# the voxels on the faces of the field of view (air around the head) share one value, the darkest of the image. It
# is recognised as that (at least 40 % of the face voxels within BACKGROUND_OFFSET_FRACTION of the 98th percentile
# of one another, at the image's dark end, above that fraction of it; none of the 69 images of ../shared/data and
# data/sample_bids, nor a brain cropped without air around it, whose faces are tissue) and taken off before the
# networks and the QC measures (the outputs keep the input as it is). A background below 0 (an image z-scored, or
# shifted to signed integers: air at -0.9 or -1024) is such a plateau too: the networks coped with it, but QC read
# the whole brain as dark, and flagged good masks.
BACKGROUND_OFFSET_FRACTION = 0.05


def sampled(data):
    """(about 5e4 voxels of ``data``: every ``step``-th along each axis, ``step``): enough for its percentiles."""
    step = max(1, int(round((data.size / 5e4) ** (1 / 3))))
    return data[::step, ::step, ::step], step


def background_offset(data):
    """The intensity of a background that is not about 0 (an air plateau on the faces of the field of view, farther
    from 0 than ``BACKGROUND_OFFSET_FRACTION`` of the 98th percentile of the positive voxels), else 0; from about
    5e4 voxels."""
    sample, _ = sampled(data)
    faces = np.concatenate([face.ravel() for face in field_of_view_faces(sample)])
    p10, level, p40 = (float(v) for v in np.percentile(faces, [10, 25, 40]))
    positive = sample[sample > 0]
    if level == 0 or not positive.size:  # most heads: air at 0
        return 0.0
    tolerance = BACKGROUND_OFFSET_FRACTION * float(np.percentile(positive, 98))
    plateau = p40 - p10 <= tolerance and level - float(np.percentile(sample, 1)) <= tolerance
    return level if plateau and abs(level) > tolerance else 0.0


# An MP2RAGE uniform image (UNI) has no dark air: its background is noise spread over the whole intensity range,
# about as bright as tissue on average. Averaged onto the networks' 2 mm grid it becomes a grey fog around the head,
# and the networks drew a brain of 2-7 litres into it (Dice 0.00-0.69 on real heads given such a background). That
# background is recognised on the faces of the field of view, where it is the air: white (``_air``), bright (a
# median of the local mean above NOISY_BACKGROUND_LEVEL of the 99th percentile: 0.26-0.59 for MP2RAGE-like air at
# 0.4-1 times the range, at most 0.024 on the 69 images of ../shared/data; fainter noisy air is better smoothed,
# ``heavy_noise``: its zeroing was patchy and lost 0.015-0.026 of Dice on air at 0.17), rough (neighbours differing
# by NOISY_BACKGROUND_ROUGHNESS of that mean; tissue cut by the field of view is smooth) and rougher than the brain by
# NOISY_BACKGROUND_CONTRAST (Rician noise over a whole image, a fast or low-field scan, makes air as rough as tissue,
# not rougher). The noisy voxels connected to the faces are then set to 0 before the networks (the outputs keep the
# input as it is). A strong receive field (7 T) raises the 99th percentile: air of noise at a third of the brain's
# median was below that level (0.14-0.20), taken for a noisy image's and smoothed, its fog stayed, and the masks
# were drawn into it (red-team 16: Dice 0.00-0.91, 7 of 112 images). Air down to FAINT_NOISY_BACKGROUND_LEVEL is
# zeroed too where it is rougher than the brain by FAINT_NOISY_BACKGROUND_CONTRAST (those images: 3.3-9.8 times;
# noise added to the air of real heads, which the networks cope with unzeroed and lost up to 0.024 of Dice zeroed
# patchily: 1.3-2.9 times; Rician noise over a whole image 0.9).
NOISY_BACKGROUND_LEVEL = 0.2
NOISY_BACKGROUND_ROUGHNESS = 0.3
NOISY_BACKGROUND_CONTRAST = 2.0  # a noisy image's air is not (0.7-1.1 times the brain's), nor pure noise's (1.3)
FAINT_NOISY_BACKGROUND_LEVEL = 0.1
FAINT_NOISY_BACKGROUND_CONTRAST = 3.0
NOISY_BACKGROUND_WINDOW = 3  # voxels: the local mean and roughness are box averages of this size
NOISE_WHITENESS = 1.15  # at most this much more different 3 voxels apart than 1 (or 6 than 3): noise, not tissue


def _roughness(data, axes):
    """The mean absolute difference of each voxel with its neighbours along ``axes``."""
    rough = np.zeros_like(data)
    for axis in axes:
        step = np.abs(np.diff(data, axis=axis))
        rough[tuple(slice(0, -1) if a == axis else slice(None) for a in range(data.ndim))] += step
        rough[tuple(slice(1, None) if a == axis else slice(None) for a in range(data.ndim))] += step
    return rough / (2 * len(axes))


def _box_roughness(plane):
    """The roughness of a 2D ``plane`` averaged over ``NOISY_BACKGROUND_WINDOW`` squared voxels: the spread of
    a single voxel's would put a tenth of pure noise's as low as tissue's."""
    from scipy import ndimage as ndi

    return ndi.uniform_filter(_roughness(plane, (0, 1)), NOISY_BACKGROUND_WINDOW)


def _tissue_roughness(data, top, slices=16):
    """How rough the image's tissue is: the 10th percentile of the box roughness of the bright voxels (a box mean
    above a third of ``top``) of the central half of the field of view, where a head's brain is (on ``slices``
    slices); None where none is bright. Bright noise is rougher: the low percentile is the tissue's."""
    from scipy import ndimage as ndi

    axis = int(np.argmin(data.shape))
    size = data.shape[axis]
    picked = np.unique(np.linspace(size // 4, max(size // 4, 3 * size // 4 - 1), slices).astype(int))
    centre = tuple(slice(s // 4, max(s // 4 + 1, 3 * s // 4)) for a, s in enumerate(data.shape) if a != axis)
    rough = []
    for i in picked:
        plane = data[tuple(i if a == axis else slice(None) for a in range(3))]
        bright = ndi.uniform_filter(plane, NOISY_BACKGROUND_WINDOW) >= top / 3
        rough.append(_box_roughness(plane)[centre][bright[centre]])
    rough = np.concatenate(rough)
    return float(np.percentile(rough, 10)) if rough.size else None


def field_of_view_faces(data):
    """The six faces of a volume, as views (``np.take`` copies the volume's way through memory: 0.9 s for 256³)."""
    return [data[tuple(i if a == axis else slice(None) for a in range(3))] for axis in range(3) for i in (0, -1)]


def _lag_difference(faces, lag):
    """The median absolute difference of voxels ``lag`` apart, in plane, over ``faces``."""
    steps = [np.abs(np.diff(f[::lag], axis=0)).ravel() for f in faces]
    steps += [np.abs(np.diff(f[:, ::lag], axis=1)).ravel() for f in faces]
    return float(np.median(np.concatenate(steps)))


def _air(data):
    """(level, roughness, top): the median local mean and box roughness of the faces of the field of view (the
    air's) and the 99th percentile of the positive voxels of about 5e4 of them; level 0 where the faces are dark, not
    noise or the volume too thin. Noise is white: voxels 3 apart differ as much as neighbours (1.00-1.01 times, for
    Rician and MP2RAGE-like air), unlike tissue, whose neighbours are alike (1.27-3.0 times: the faces of a field of
    view cut inside the brain, which were taken for noisy air). Noise interpolated by the scanner (zero-filled
    k-space, GE's ZIP, Siemens' interpolation: 1.63-1.70 times) is white at 3 voxels and more: voxels 6 apart
    differ as much as those 3 apart (0.93-1.04 times; tissue cut inside the brain 1.29-1.75, red-team 10a)."""
    from scipy import ndimage as ndi

    if min(data.shape) < 7:
        return 0.0, 0.0, 1.0
    faces = field_of_view_faces(data)
    level = float(np.median(np.concatenate([ndi.uniform_filter(f, 3).ravel() for f in faces])))
    neighbours = _lag_difference(faces, 1)
    if level <= 0 or neighbours <= 0:
        return 0.0, 0.0, 1.0
    apart = _lag_difference(faces, 3)
    if apart > NOISE_WHITENESS * neighbours and _lag_difference(faces, 6) > NOISE_WHITENESS * apart:
        return 0.0, 0.0, 1.0
    sample, _ = sampled(data)
    positive = sample[sample > 0]
    if not positive.size:  # noise on the faces only (red-team 10a: an IndexError)
        return 0.0, 0.0, 1.0
    rough = float(np.median(np.concatenate([_box_roughness(f).ravel() for f in faces])))
    return level, rough, float(np.percentile(positive, 99))


# Rician noise over a whole image (a fast or low-field scan) also makes the air bright and rough, but no rougher than
# the brain. Up to a noise of 12 % of the 99th percentile the networks cope (Dice 0.966-0.985 on three real heads);
# from 15 % on they did not (0.00-0.62: masks of 3-8 litres, flagged). Smoothed by a Gaussian of
# HEAVY_NOISE_SMOOTHING_MM first (its air then a plateau, which ``background_offset`` takes off), the same images give
# 0.970-0.982 up to 25 %. The air's level tells such an image: 0.100-0.150 of the 99th percentile at 8-12 %,
# 0.177-0.305 at 15-25 %, at most 0.024 on the 69 images of ../shared/data; its roughness tells it from a constant
# background (``background_offset``'s).
HEAVY_NOISE_LEVEL = 0.17
HEAVY_NOISE_AT_MOST = 0.45  # air as bright as most of the image (0.59: a volume of noise without a head) is left
HEAVY_NOISE_SMOOTHING_MM = 2.0
# Wider, for the images the networks are unsure of once smoothed (``predictor.NOISY_CHECK``): 5 mm slices under noise
# of 25 % leave 2 mm too little to average across slices
WIDER_NOISE_SMOOTHING_MM = 3.0


def heavy_noise(data, air=None):
    """The air's level relative to the 99th percentile where it says the image is too noisy for the networks as it
    is (bright above ``HEAVY_NOISE_LEVEL``, below ``HEAVY_NOISE_AT_MOST``, and rough: Rician noise of about 15 to
    40 %), else None. An MP2RAGE image's air goes first (``noisy_background``). ``air``: ``_air(data)``, if known."""
    level, rough, top = air or _air(data)
    bright = HEAVY_NOISE_LEVEL * top <= level < HEAVY_NOISE_AT_MOST * top
    return level / top if bright and rough >= NOISY_BACKGROUND_ROUGHNESS * level else None


def noisy_background(data, air=None):
    """The voxels of a background of noise as bright as tissue (an MP2RAGE uniform image's air), connected to the
    faces of the field of view, as a boolean volume; None where the faces are not such noise."""
    from scipy import ndimage as ndi

    level, rough, top = air or _air(data)
    if level < FAINT_NOISY_BACKGROUND_LEVEL * top or rough < NOISY_BACKGROUND_ROUGHNESS * level:  # most heads
        return None
    tissue = _tissue_roughness(data, top)
    contrast = NOISY_BACKGROUND_CONTRAST if level >= NOISY_BACKGROUND_LEVEL * top else FAINT_NOISY_BACKGROUND_CONTRAST
    if tissue is None or rough < contrast * tissue:  # noise everywhere (a noisy image), not in air
        return None
    mean = ndi.uniform_filter(data, NOISY_BACKGROUND_WINDOW)
    roughness = ndi.uniform_filter(_roughness(data, (0, 1, 2)), NOISY_BACKGROUND_WINDOW)
    noisy = (mean >= 0.5 * level) & (roughness >= NOISY_BACKGROUND_ROUGHNESS * mean) & (
        roughness >= NOISY_BACKGROUND_CONTRAST * tissue)
    labels, _ = ndi.label(noisy)
    touching = np.unique(np.concatenate([face.ravel() for face in field_of_view_faces(labels)]))
    # the box reaches a voxel past the noise onto the head: eroded by as much (the faces' voxels stay noise)
    return ndi.binary_erosion(np.isin(labels, touching[touching > 0]), iterations=NOISY_BACKGROUND_WINDOW // 2 + 1,
                              border_value=1)


# A frame of padding around the image (outer planes of one value each: the zeros a conform or a crop pads with, a
# converter's -32768 or -1024, a bright border) hid the air from the tests above, which read the faces of the field
# of view: an MP2RAGE or very noisy image padded by one plane of zeros got masks of 3.2-3.5 litres (red-team 10a:
# Dice 0.61-0.65), a frame of -32768 moved every voxel up by 32768 as a "background", a bright one hid the head from
# the locator. The tests read the image inside its frame, and the networks see the frame as air (0).
FRAME_KEEP_VOXELS = 8  # the least an axis keeps


def inside_frame(data):
    """(slices of ``data`` inside its frame, the frame's values): the frame is the outer planes that each hold one
    value only."""
    start, stop, values = [0, 0, 0], list(data.shape), set()

    def plane(axis, index):
        return data[tuple(index if a == axis else slice(start[a], stop[a]) for a in range(3))]

    def constant(p):
        return p.min() == p.max()

    if not any(constant(plane(axis, i)) for axis in range(3) for i in (0, data.shape[axis] - 1)):
        return tuple(slice(0, n) for n in data.shape), values  # most images: no frame, at the cost of six planes
    nonzero = data != 0  # zeros first, at once: a conform pads with tens of planes of them
    for axis in range(3):
        found = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis)))
        if found.size and found[-1] + 1 - found[0] >= FRAME_KEEP_VOXELS and found[-1] + 1 - found[0] < data.shape[axis]:
            start[axis], stop[axis] = int(found[0]), int(found[-1]) + 1
            values.add(0.0)
    peeled = True
    while peeled:
        peeled = False
        for axis in range(3):
            for side in (0, 1):
                while stop[axis] - start[axis] > FRAME_KEEP_VOXELS:
                    index = start[axis] if side == 0 else stop[axis] - 1
                    outer = plane(axis, index)
                    if not constant(outer):
                        break
                    values.add(float(outer.flat[0]))
                    start[axis], stop[axis] = (index + 1, stop[axis]) if side == 0 else (start[axis], index)
                    peeled = True
    return tuple(slice(a, b) for a, b in zip(start, stop)), values


def as_the_networks_read_it(data, voxel_mm, *, noise_smoothing_mm=HEAVY_NOISE_SMOOTHING_MM):
    """(volume, warnings): ``data`` (float32, 3D; voxel sizes ``voxel_mm``) as the networks and the QC's intensity
    measures read it: a frame of padding set to 0 (``inside_frame``), and inside it an MP2RAGE image's noisy air set
    to 0 (``noisy_background``), a very noisy image smoothed (``heavy_noise``; a Gaussian of ``noise_smoothing_mm``),
    a background that is not about 0 taken off (``background_offset``); each said in a warning. The outputs keep the
    input as it is."""
    box, frame = inside_frame(data)
    if frame and frame <= {float(np.median(np.concatenate([f.ravel() for f in field_of_view_faces(data[box])])))}:
        frame = set()  # the air inside is that value too (air of 0, or a constant): the image's own air, no padding
    if not frame:
        return _inside_read(data, voxel_mm, noise_smoothing_mm)
    inside, warnings = _inside_read(data[box], voxel_mm, noise_smoothing_mm)
    if frame != {0.0}:
        said = ", ".join(f"{v:.6g}" for v in sorted(frame))
        warnings.insert(0, f"the image has a frame of padding (outer planes of one value: {said}): the networks "
                           "read it as air (0)")
    read = np.zeros_like(data)
    read[box] = inside
    return read, warnings


def _inside_read(data, voxel_mm, noise_smoothing_mm):
    """``as_the_networks_read_it`` of a volume without a frame."""
    from scipy import ndimage as ndi

    warnings, air = [], _air(data)  # the faces' statistics, once for both tests
    background = noisy_background(data, air)
    if background is not None:
        data = np.where(background, np.float32(0), data)
        warnings.append(f"the background is noise as bright as tissue (an MP2RAGE uniform image?): its "
                        f"{100 * np.count_nonzero(background) / background.size:.0f} % of the field of view was set "
                        "to 0 before the networks")
        air = _air(data)  # the air is 0 now
    noise = heavy_noise(data, air)
    if noise is not None:
        data = ndi.gaussian_filter(data, noise_smoothing_mm / np.asarray(voxel_mm, float)).astype(np.float32)
        warnings.append(f"the image is very noisy (its air at {100 * noise:.0f} % of the brightest tissue): it was "
                        f"smoothed (Gaussian, {noise_smoothing_mm:g} mm) before the networks")
    offset = background_offset(data)
    if offset:
        data = data - np.float32(offset)
        warnings.append(f"the background is not about 0 (air at intensity {offset:.4g}): every voxel was moved by "
                        f"{-offset:+.4g} before the networks")
    return data, warnings
