"""The predictor, free of nipype and files: a native 3D volume and its affine in, a brain probability map
and a brain mask on the same grid out.

    stripper = Skullstripper()                      # the bundled networks and their calibrated threshold
    prediction = stripper.probability(data, affine)  # threshold-independent
    result = stripper.mask(data, affine, threshold=0.5, border_mm=1.0, prediction=prediction)
"""

import itertools
import time
from dataclasses import dataclass, field, replace

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from scipy import ndimage as ndi

from .. import geometry
from ..intensity import (HEAVY_NOISE_SMOOTHING_MM, WIDER_NOISE_SMOOTHING_MM, as_the_networks_read_it,
                         field_of_view_faces, sampled)
from ..nifti import HEAD_FOV_MM
from ..postproc import check_border, check_threshold, clean_mask, largest_component, with_border
from .card import ModelCard
from .inference import BrainNetworks, load_networks, predict_probability

# An image that is exactly zero outside a brain-sized region may be skull-stripped already; so may a head whose
# air was zeroed (clinical stacks, FreeSurfer's T1.mgz) and whose non-zero region is brain-sized because it is
# small (a child) or cut by few slices. The networks tell them apart: on 36 stripped brains their brain covers
# 0.78-0.89 of the non-zero region (they cut its edge: the region itself is the mask), on 45 real heads with zero
# air, whole and cut to 1300-2300 ml, 0.38-0.61 (their brain is the mask).
STRIPPED_ZERO_FRACTION = 0.3
STRIPPED_VOLUME_ML = (500.0, 2200.0)
STRIPPED_BRAIN_COVER = 0.7
# A stripped brain's background is not always constant: faint noise added around it, or the ringing of a spline or
# sinc resampling (a stripped brain registered to a template: values of -20 to +13 % of the brain's about its edge).
# The networks then cut 7-10 % of its edge (Dice 0.90-0.93, flagged by QC only). Its region is then the voxels above
# a floor, STRIPPED_FLOOR of the 99th percentile or, where the noise is higher, STRIPPED_NOISE_MARGIN times the
# faces' 99th percentile of |value|, if that is at most STRIPPED_FLOOR_AT_MOST (the faces are background, not tissue
# or bright air): one component with nothing above the floor farther than STRIPPED_HALO_VOXELS from it (a head has
# its scalp there, and its whole head is the component: more than a brain), then the tests of a constant background.
STRIPPED_FLOOR = 0.03
STRIPPED_FLOOR_AT_MOST = 0.15
STRIPPED_HALO_VOXELS = 3
STRIPPED_NOISE_MARGIN = 1.5  # 3.9 sigma of Gaussian noise
# A header whose superior-inferior axis is flipped shows the networks an upside-down head, and their two views
# disagree: on 65 real images (52 T1w heads, 13 clinical 2D stacks) the voxels in one view's brain and not the
# other's are 1.5-3.9 % of the two views' brain upright and 2.9-20 % turned over, always 1.34-6.3 times more than
# the same image upright. Above UPSIDE_DOWN_CHECK the image is also run turned over, and where the views agree
# UPSIDE_DOWN_RATIO times better so, and as well as on an upright head (UPSIDE_DOWN_AGREED: pure noise agrees
# better one way by chance, but not that well), the brain is upside down in the header: the mask is made on the
# image turned over (0.2.0 gave such heads masks of Dice 0.57-0.91, mostly unflagged). A header whose front-back
# axis is flipped (alone, or with the left-right one: DICOM's LPS written as RAS, a 180-degree turn) shows a head
# facing backwards, and the same test holds: on the 27 held-out T1w heads the views disagree on 2.7-10.5 % of such a
# head's brain and on 1.8-3.5 % turned front to back (at most 0.77 times; the same heads upright: 1.34-4.7 times
# more turned), where the masks were Dice 0.77-0.97 without a flag. So each of these header flips is tried.
UPSIDE_DOWN_CHECK = 0.025
UPSIDE_DOWN_RATIO = 0.85
UPSIDE_DOWN_AGREED = 0.045
# (world axis whose voxel axis is flipped, what the warning says of the head, of the header, how it was turned)
HEADER_FLIPS = (("S", "upside down", "superior-inferior", "turned over"),
                ("A", "facing backwards", "front-back", "turned front to back"))
# A head pitched far from how heads lie in a scanner (chin to chest, an elderly patient's kyphosis: 25-40 degrees)
# shows the networks an unfamiliar head: an elderly head with the neck in view got masks into the face and orbits
# (Dice 0.74-0.90), and the views disagree (4.3-12 %). Above TILT_CHECK (the 65 real images: at most 3.9 %) the head
# is also seen pitched by +-TILT_DEGREES (its affine turned about the left-right axis through the centre of the field
# of view: the probability still comes back on the image's own voxels), and where one way helps some (views agreeing
# better than TILT_HELPS times) by TILT_FURTHER_DEGREES that way; where the views agree TILT_RATIO times better so
# and as well as on a head that lies as usual, the mask is made on it (Dice 0.96-0.98). The real images agree no
# better than 0.875 times either way; the pitched heads 0.2-0.48 times (0.44 at 45 degrees for one pitched 40);
# images that are not pitched but unusual (a field of view cut inside the brain, enhancing dura) 0.72-0.73 times,
# where turning lost 0.005-0.011 of Dice.
TILT_CHECK = 0.04
TILT_DEGREES = 30.0
TILT_FURTHER_DEGREES = 45.0
TILT_RATIO = 0.6
TILT_HELPS = 0.85
# A head rolled about its front-back axis (lying on its side, or a header with the left-right and superior-inferior
# axes swapped) is not pitched: at 90 degrees masks of 150-1230 ml too much, Dice 0.69-0.95 (red-team 18). Where the
# views still disagree above TILT_CHECK after the pitch check, the head is also seen turned by each of TURNS,
# and the same test as for a pitch picks it; the first turn whose views agree as on a usual head ends the search. So
# is a head pitched a quarter turn (a header with the front-back and superior-inferior axes swapped), which the pitch
# check's 30-45 degrees do not reach, one turned a quarter turn about its superior-inferior axis (facing left or
# right: a header with the left-right and front-back axes swapped) and one turned over and facing backwards.
TURNS = ((1, -90.0), (1, 90.0), (1, -45.0), (1, 45.0), (0, -90.0), (0, 90.0), (2, -90.0), (2, 90.0), (0, 180.0))
# A header whose front-back and superior-inferior axes are swapped (a coronal stack called axial; an image stored
# L-S-A whose header lost its qform and sform) is not a turn but a mirror: seen pitched a quarter turn, 0.971 and
# 0.966 on two such heads, 0.985 and 0.966 seen as a mirror of it (a half turn about a diagonal, up to the left-right
# mirror the networks cannot see). After TURNS every other way a cube can lie on its faces is tried (AXIS_TURNS), in
# the same search.
# A very noisy image is smoothed before the networks (``intensity.heavy_noise``, 2 mm). In 5 mm slices under noise of
# 25 % of the 99th percentile that is too little: 2 of 8 held-out heads got masks of 2-3.7 times the brain (Dice
# 0.42, 0.65; flagged) and their views disagreed on 15 and 53 % of it, the 6 others' on 2.4-3.2 %. Where the views of
# a smoothed image disagree on more than NOISY_CHECK (QC's limit), it is also read smoothed by
# ``intensity.WIDER_NOISE_SMOOTHING_MM``, and where the views agree NOISY_RATIO times better so, and as well as on a
# usual head (UPSIDE_DOWN_AGREED), the mask is made on it: those 2 heads 0.972 each (views 3.2-3.3 %). Wider
# smoothing costs the others Dice (0.003-0.016) and, on 10 small noisy low-field heads above the check, more
# (0.03-0.13), but never brought their views into agreement: all 10 kept the 2 mm masks.
NOISY_CHECK = 0.05
NOISY_RATIO = 0.6
# A volume of noise without a head (a broken conversion, a wrong file) has no structure: its neighbouring voxels are
# uncorrelated (lag-1 autocorrelation 0.00), where the 65 real images of ../shared/data are correlated 0.86 or more,
# and 0.28 or more drowned in Rician noise of 25 % of their 99th percentile. Below STRUCTURELESS it is said, and it is
# neither read smoothed wider nor seen turned: no way of looking at noise finds a head in it (it took 11 passes).
STRUCTURELESS = 0.1
STRUCTURELESS_LINES = 4  # every 4th line along the two other axes: 1/16 of the voxels, 4-18 ms a head
LOCATOR_THRESHOLD = 0.5  # the locator's brain: p >= this, largest component (its box is all that is used)
# The segmenter's main brain blob (p >= this, largest component, 2 voxels of rim) is all that goes back to
# the finer native grid; a fixed level, so that the probability map is the same whatever the threshold.
SUPPORT_THRESHOLD = 0.5


@dataclass(frozen=True)
class View:
    """One look of the segmenter at the brain box: its lattice moved by ``shift_mm`` along each axis,
    and mirrored left-right or not."""
    shift_mm: float = 0.0
    mirror: bool = False

    def of(self, grid):
        """``grid`` moved by this view's shift."""
        if not self.shift_mm:
            return grid
        moved = grid.affine.copy()
        moved[:3, 3] += self.shift_mm
        return geometry.ModelGrid(grid.shape, moved)


def default_views(voxel_mm=geometry.MODEL_VOXEL_MM):
    """The segmenter's probability is the mean of two views: the box as it is, and mirrored left-right on a
    lattice moved by half a voxel, so that the network's voxel edges and any left-right habit of its own
    average out (2 mm, bench/model_eval.py against --views 0: median Dice +0.0008 train, +0.0015 val, +0.0016
    wild, no split's worst worse; the cost is one more segmenter pass)."""
    return View(), View(shift_mm=voxel_mm / 2, mirror=True)


STRIPPED = "the image looks already skull-stripped (a constant or faint background outside a brain-sized region that " \
           "the networks find filled with brain): the mask is that region"


@dataclass
class Prediction:
    """The brain probability of a volume on its native grid, and where it can be non-zero (``block``)."""
    probability: np.ndarray  # float32 [0, 1], native grid
    block: tuple  # native slices holding every non-zero probability (None: there is none)
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    stripped_input: bool = False  # the input looked skull-stripped: the probability is its non-zero region
    # voxels in one view's brain (p >= 0.5) and not in another's, over those in any view's (None: one view)
    view_disagreement: float | None = None
    read: np.ndarray | None = None  # the volume as the networks read it (``as_the_networks_read_it``), for QC
    noise_smoothing_mm: float = HEAVY_NOISE_SMOOTHING_MM  # the width a very noisy volume was read with
    seen_as: str | None = None  # of ``warnings``, the one on how the head was seen (flipped back, pitched, turned)

    def seen_otherwise(self, other, timings, said, probability=None, block=None):
        """``other`` (a pass on the head flipped back, pitched or turned; ``probability`` and ``block`` where they
        are not its own) in place of this prediction, ``said`` telling how: a sentence of an earlier search that
        ``other`` replaces goes with it (a pitched head flipped front to back agrees better, but better still
        pitched back as it is)."""
        kept = [w for w in self.warnings if w != self.seen_as]
        return Prediction(other.probability if probability is None else probability,
                          other.block if probability is None else block, timings, [*kept, *other.warnings, said],
                          view_disagreement=other.view_disagreement, seen_as=said)


@dataclass
class SkullstripResult:
    mask: np.ndarray  # uint8 {0, 1}, native grid
    probability: np.ndarray  # float32 [0, 1], native grid
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    view_disagreement: float | None = None  # the Prediction's: a QC measure
    # with a border: the mask before it (uint8), which QC judges (the border is the user's choice, not the networks')
    mask_before_border: np.ndarray | None = None
    read: np.ndarray | None = None  # the volume as the networks read it, for QC (``Prediction.read``)
    noise_smoothing_mm: float = HEAVY_NOISE_SMOOTHING_MM  # ``Prediction.noise_smoothing_mm``: QC reads the image so


def _summed_timings(prediction, others):
    """``prediction``'s stage timings plus those of the ``others`` passes: a pass tried and not used took its time
    all the same."""
    timings = dict(prediction.timings)
    for other in others:
        for stage, seconds in other.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
    return timings


def checked_volume(data, affine):
    """(float32 3D volume with NaN/inf set to 0, 4x4 affine, warnings) of what a caller passed, or a ValueError /
    TypeError in one line naming the problem (``load_image`` does this and more for files)."""
    data = np.asarray(data)
    if data.dtype.kind not in "iuf":
        raise TypeError(f"data of type {data.dtype}: a 3D volume of real numbers is needed")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 1:
        raise ValueError(f"data of shape {data.shape}: a 3D volume is needed")
    try:
        affine = np.asarray(affine, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"affine {affine!r}: a 4x4 voxel-to-world matrix is needed") from None
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"affine of shape {affine.shape}: a finite, invertible 4x4 voxel-to-world matrix is needed")
    floats, data, warnings = data.dtype.kind == "f", data.astype(np.float32, copy=False), []
    with np.errstate(over="ignore"):  # finite values near float32's limit overflow the sum: the full check decides
        suspect = floats and not np.isfinite(data.sum())  # one pass without a temporary; NaN and inf make it so
    if suspect:
        finite = np.isfinite(data)
        if not finite.all():
            warnings.append(f"{data.size - int(finite.sum())} NaN/infinite voxels set to 0")
            data = np.where(finite, data, np.float32(0))
    return data, affine, warnings


def stripped_region(data, voxel_mm):
    """The brain-sized region outside which ``data`` is background (``may_be_skull_stripped``), else None: a constant
    background (``_above_constant_background``) or a faint one (``_above_faint_background``)."""
    region = _above_constant_background(data)
    if region is None:
        region = _above_faint_background(data, voxel_mm)
    return region if region is not None and may_be_skull_stripped(region, voxel_mm) else None


def _above_constant_background(data):
    """The voxels above the image's constant background: its lowest value, where that is about 0 (0, or the 1 or 0.01
    some tools write outside a brain: at most 1 % of the brightest voxel) and fills more than
    ``STRIPPED_ZERO_FRACTION`` of the field of view, else None."""
    lowest = data.min()
    if lowest != 0 and abs(lowest) > 0.01 * abs(data.max()):
        return None
    region = data != lowest
    return region if 1.0 - np.count_nonzero(region) / data.size > STRIPPED_ZERO_FRACTION else None


def _above_faint_background(data, voxel_mm):
    """The one brain-sized component of the voxels above a faint background (noise or a resampling's ringing,
    ``STRIPPED_FLOOR``), with nothing above it farther away, else None."""
    sample, step = sampled(data)
    positive = sample[sample > 0]
    if min(data.shape) < 2 * STRIPPED_HALO_VOXELS or not positive.size:
        return None
    top = float(np.percentile(positive, 99))
    faces = np.concatenate([np.abs(face).ravel() for face in field_of_view_faces(data)])
    floor = max(STRIPPED_FLOOR * top, STRIPPED_NOISE_MARGIN * float(np.percentile(faces, 99)))
    # a first look at a sample: most heads stop here (their tissue above the floor is more than a brain and the
    # ringing it may have within the halo)
    sampled_ml = np.count_nonzero(sample > floor) * step ** 3 * float(np.prod(voxel_mm)) / 1000.0
    brain_sized = 0.9 * STRIPPED_VOLUME_ML[0] <= sampled_ml <= 1.25 * STRIPPED_VOLUME_ML[1]
    if floor > STRIPPED_FLOOR_AT_MOST * top or not brain_sized:
        return None
    above = data > floor
    region = largest_component(above)
    apart = above & ~ndi.binary_dilation(region, iterations=STRIPPED_HALO_VOXELS)
    if np.count_nonzero(apart) > 0.01 * np.count_nonzero(region):
        return None
    return region if 1.0 - np.count_nonzero(region) / data.size > STRIPPED_ZERO_FRACTION else None


def neighbour_correlation(data):
    """The lowest, over the three axes, of the correlation of each voxel of ``data`` with the next one along the axis
    (on every ``STRUCTURELESS_LINES``-th line): about 0 for noise, 0.86-0.96 for real images."""
    step = STRUCTURELESS_LINES
    correlations = []
    for axis in range(3):
        lines = np.moveaxis(data, axis, -1)[::step, ::step].astype(np.float64)
        lines -= lines.mean()
        variance = float(np.mean(lines * lines))
        if lines.shape[-1] < 2 or variance == 0.0:
            continue
        correlations.append(float(np.mean(lines[..., 1:] * lines[..., :-1])) / variance)
    return min(correlations, default=1.0)


def may_be_skull_stripped(region, voxel_mm):
    """Background outside a brain-sized ``region``: a stripped brain, or a small head whose air was zeroed
    (``is_skull_stripped`` tells them apart)."""
    volume_ml = int(np.count_nonzero(region)) * float(np.prod(voxel_mm)) / 1000.0
    return STRIPPED_VOLUME_ML[0] <= volume_ml <= STRIPPED_VOLUME_ML[1]


def is_skull_stripped(region, probability):
    """Whether the networks' brain (``probability`` >= 0.5) fills ``region`` as a stripped brain's does, rather than
    the inside of a head's."""
    return float(np.count_nonzero((probability >= 0.5) & region)) >= STRIPPED_BRAIN_COVER * np.count_nonzero(region)


def _pitched(affine, centre, degrees, about=0):
    """``affine`` turned by ``degrees`` about the world's left-right axis (``about`` 0; 1: the front-back axis, 2: the
    superior-inferior one) through ``centre`` (mm): the same voxels, seen as a head pitched nose up (> 0) or down (or
    rolled, or turned to face left or right)."""
    t = np.deg2rad(degrees)
    turn, plane = np.eye(3), [a for a in range(3) if a != about]
    turn[np.ix_(plane, plane)] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return _turned(affine, centre, turn)


def _turned(affine, centre, turn):
    """``affine`` turned by the 3x3 rotation ``turn`` (world) about ``centre`` (mm)."""
    rotation, move = np.eye(4), np.eye(4)
    rotation[:3, :3] = turn
    move[:3, 3] = centre
    return move @ rotation @ np.linalg.inv(move) @ affine


def _axis_turns():
    """The turns of a cube onto itself (3x3 signed permutations of determinant 1) that neither ``TURNS`` nor
    ``HEADER_FLIPS`` (each a half turn with the left-right mirror) make: the other ways a header can swap and flip
    its axes, up to the left-right mirror."""
    made = [np.eye(3), np.diag([-1.0, 1.0, -1.0]), np.diag([-1.0, -1.0, 1.0]),
            *(_pitched(np.eye(4), np.zeros(3), degrees, about)[:3, :3] for about, degrees in TURNS)]
    turns = []
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            turn = np.zeros((3, 3))
            turn[range(3), order] = signs
            if np.linalg.det(turn) > 0 and not any(np.allclose(turn, m) for m in made):
                turns.append(turn)
    return tuple(turns)


AXIS_TURNS = _axis_turns()


def locate_brain(data, affine, locator):
    """World (min, max) corners of the brain the locator finds in the whole field of view, or None (``data``:
    a native volume, or its ``geometry.RasVolume``)."""
    volume, grid = geometry.to_model_grid(data, affine, voxel_mm=geometry.LOCATOR_VOXEL_MM)
    found = largest_component(predict_probability(volume, locator) >= LOCATOR_THRESHOLD)
    return geometry.grid_box(found, grid)


class Skullstripper:
    """Brain probability and mask of a volume on its own grid.

    Parameters
    ----------
    weights : str, Path or ModelCard, optional
        The networks to use: a folder holding ``model.json`` and the weights files, a model card file, or a
        ``ModelCard``; default: the bundled ones. Loaded on first use, once per process.
    networks : BrainNetworks or callable, optional
        Stand-ins for the networks (any callables batch volume -> batch probability), used by tests.
    threshold, voxel_mm, views : optional
        The probability threshold, the segmenter's voxel size and its ``View`` s of the brain box (their
        probabilities averaged); by default what the model card records (stand-ins: the bundled threshold,
        2 mm, two views).
    """

    def __init__(self, weights=None, *, networks=None, threshold=None, voxel_mm=None, views=None):
        self.card = None if networks is not None else (
            weights if isinstance(weights, ModelCard) else ModelCard.load(weights))
        self.voxel_mm = float(voxel_mm or (self.card.voxel_mm if self.card else geometry.MODEL_VOXEL_MM))
        recorded = tuple(View(**v) for v in self.card.views) if self.card else ()
        self.views = tuple(views or recorded or default_views(self.voxel_mm))
        self._networks = BrainNetworks.of(networks) if networks is not None else None
        calibrated = (self.card or ModelCard.load()).threshold
        self.threshold = calibrated if threshold is None else check_threshold(threshold)

    def __getstate__(self):
        """Without the loaded networks (a compiled network cannot be pickled): they load again on first use, so
        that a used Skullstripper can go to a process pool."""
        state = dict(self.__dict__)
        if self.card is not None:
            state["_networks"] = None
        return state

    @property
    def networks(self):
        if self._networks is None:
            self._networks = load_networks(self.card)
        return self._networks

    def probability(self, data, affine):
        """The brain probability of ``data`` (3D, native grid, voxel-to-world ``affine``) as a ``Prediction``."""
        raw, affine, warnings = checked_volume(data, affine)
        shape = tuple(int(s) for s in raw.shape)
        data, said = as_the_networks_read_it(raw, voxel_sizes(affine))
        width = HEAVY_NOISE_SMOOTHING_MM
        smoothed = {}  # shared by every pass over ``data`` (``geometry.RasVolume.of``)
        correlation = neighbour_correlation(raw)
        if correlation < STRUCTURELESS:
            warnings.append(f"neighbouring voxels are uncorrelated ({correlation:.2f}; real images 0.86 or more): the "
                            "image looks like noise without a head; its mask means nothing")
        looking = self.card is not None and correlation >= STRUCTURELESS  # not stand-ins, not noise
        prediction = self._predict(data, affine, shape, [*warnings, *said], smoothed)
        if looking and (prediction.view_disagreement or 0.0) > NOISY_CHECK:
            wider, said_wider = as_the_networks_read_it(raw, voxel_sizes(affine),
                                                        noise_smoothing_mm=WIDER_NOISE_SMOOTHING_MM)
            if said_wider != said:  # smoothed for noise: the width is said
                smoothed_wider = {}
                other = self._predict(wider, affine, shape, [*warnings, *said_wider], smoothed_wider)
                prediction, kept = self._less_noisy(prediction, other)
                if kept:
                    data, smoothed, width = wider, smoothed_wider, WIDER_NOISE_SMOOTHING_MM
        region = stripped_region(data, voxel_sizes(affine))

        def as_stripped(seen):
            return Prediction(region.astype(np.float32), tuple(slice(0, s) for s in shape), seen.timings,
                              warnings=[*warnings, STRIPPED], stripped_input=True, read=data,
                              noise_smoothing_mm=width)

        # A stripped brain's mask is its region however it lies. The networks' views disagree on such a brain (7-16 %
        # on the tests' ones), and seeing it turned over, pitched and rolled first took 10 passes, not 1 (22 s, not 2)
        if region is not None and is_skull_stripped(region, prediction.probability):
            return as_stripped(prediction)
        # Nor does turning make a field of view that is not a head's size (voxel sizes in cm: 2 m) look like a head:
        # its 10 passes took 107 s, not 11
        extent = float(np.max(np.asarray(shape) * voxel_sizes(affine)))
        searching = looking and HEAD_FOV_MM[0] <= extent <= HEAD_FOV_MM[1]
        if searching and (prediction.view_disagreement or 0.0) > UPSIDE_DOWN_CHECK:
            prediction = self._flipped_back(data, affine, shape, prediction)
        if searching and (prediction.view_disagreement or 0.0) > TILT_CHECK:
            prediction = self._less_pitched(data, affine, shape, prediction, smoothed)
        if searching and (prediction.view_disagreement or 0.0) > TILT_CHECK:
            prediction = self._less_turned(data, affine, shape, prediction, smoothed)
        if region is not None and is_skull_stripped(region, prediction.probability):
            return as_stripped(prediction)
        return replace(prediction, read=data, noise_smoothing_mm=width)

    @staticmethod
    def _less_noisy(prediction, other):
        """(the prediction to keep, whether it is ``other``): ``other`` (the image smoothed wider) where the networks'
        views agree far better on it than on ``prediction``."""
        timings = _summed_timings(prediction, [other])
        if (other.view_disagreement is None or other.view_disagreement > UPSIDE_DOWN_AGREED
                or other.view_disagreement >= NOISY_RATIO * prediction.view_disagreement):
            return replace(prediction, timings=timings), False
        said = (f"smoothed by {WIDER_NOISE_SMOOTHING_MM:g} mm, not {HEAVY_NOISE_SMOOTHING_MM:g} mm: the networks' views "
                f"disagreed on {100 * prediction.view_disagreement:.1f} % of the brain at {HEAVY_NOISE_SMOOTHING_MM:g} "
                f"mm, on {100 * other.view_disagreement:.1f} % at {WIDER_NOISE_SMOOTHING_MM:g} mm")
        return replace(other, timings=timings, warnings=[*other.warnings, said]), True

    def _flipped_back(self, data, affine, shape, prediction):
        """``prediction``, or that of ``data`` flipped along the voxel axis of one of ``HEADER_FLIPS`` where the
        networks' views agree far better on it (the header's axis is flipped)."""
        tried = []
        for code, head, axis_name, how in HEADER_FLIPS:
            axis = int(np.argmax(np.abs(affine["RAS".index(code), :3])))
            flipped = self._predict(np.ascontiguousarray(np.flip(data, axis)), affine, shape, [])
            tried.append((np.inf if flipped.view_disagreement is None else flipped.view_disagreement, axis, head,
                          axis_name, how, flipped))
        disagreement, axis, head, axis_name, how, flipped = min(tried, key=lambda t: t[0])
        timings = _summed_timings(prediction, [t[-1] for t in tried])
        if disagreement > UPSIDE_DOWN_AGREED or disagreement >= UPSIDE_DOWN_RATIO * prediction.view_disagreement:
            return replace(prediction, timings=timings)
        block = None if flipped.block is None else tuple(
            slice(shape[a] - b.stop, shape[a] - b.start) if a == axis else b for a, b in enumerate(flipped.block))
        said = (f"the head is {head} in this image's header (its {axis_name} axis flipped?): the networks' views "
                f"disagree on {100 * prediction.view_disagreement:.1f} % of the brain as the header has it and on "
                f"{100 * disagreement:.1f} % with the image {how}, on which the mask was made; check the header")
        return prediction.seen_otherwise(flipped, timings, said, np.ascontiguousarray(np.flip(flipped.probability,
                                                                                           axis)), block)

    def _less_pitched(self, data, affine, shape, prediction, smoothed=None):
        """``prediction``, or that of the head seen pitched by +-``TILT_DEGREES`` (then, where one way helps some,
        by ``TILT_FURTHER_DEGREES`` that way) where the networks' views agree far better on it."""
        centre = (affine @ np.r_[(np.asarray(shape, float) - 1) / 2, 1.0])[:3]

        def seen(degrees):
            pitched = self._predict(data, _pitched(affine, centre, degrees), shape, [], smoothed)
            return (np.inf if pitched.view_disagreement is None else pitched.view_disagreement), degrees, pitched

        tried = [seen(-TILT_DEGREES), seen(TILT_DEGREES)]
        closest, degrees, _ = min(tried, key=lambda t: t[0])
        if TILT_RATIO * prediction.view_disagreement <= closest < TILT_HELPS * prediction.view_disagreement:
            tried.append(seen(np.sign(degrees) * TILT_FURTHER_DEGREES))
        disagreement, degrees, best = min(tried, key=lambda t: t[0])
        timings = _summed_timings(prediction, [p for _, _, p in tried])
        if disagreement > UPSIDE_DOWN_AGREED or disagreement >= TILT_RATIO * prediction.view_disagreement:
            return replace(prediction, timings=timings)
        said = (f"the networks' views agree far better with the head seen turned {abs(degrees):g} degrees "
                f"{'nose down' if degrees < 0 else 'nose up'} (they disagree on {100 * disagreement:.1f} % of the "
                f"brain, against {100 * prediction.view_disagreement:.1f} % without this turn): the mask was made so; "
                "is the head pitched far from the usual (chin to chest)?")
        return prediction.seen_otherwise(best, timings, said)

    def _less_turned(self, data, affine, shape, prediction, smoothed=None):
        """``prediction``, or that of the head seen turned by one of ``TURNS`` (rolled: lying on its side, or a header
        whose left-right and superior-inferior axes are swapped; pitched a quarter turn or turned over; facing left
        or right), or by one of ``AXIS_TURNS``, where the networks' views agree far better on it."""
        centre = (affine @ np.r_[(np.asarray(shape, float) - 1) / 2, 1.0])[:3]
        turns = [(_pitched(affine, centre, degrees, about), (about, degrees)) for about, degrees in TURNS]
        turns += [(_turned(affine, centre, turn), None) for turn in AXIS_TURNS]
        tried = []
        for turned_affine, turn in turns:
            turned = self._predict(data, turned_affine, shape, [], smoothed)
            tried.append((np.inf if turned.view_disagreement is None else turned.view_disagreement, len(tried),
                          turned_affine, turn, turned))
            # Views that agree as well as on a head that starts no search at all: no other turn can do better by
            # enough to matter (red-team 18's turned heads: 2.2 % on the right turn, 5.2-15 % on every other)
            if tried[-1][0] <= min(UPSIDE_DOWN_CHECK, TILT_RATIO * prediction.view_disagreement):
                break
        disagreement, _, turned_affine, turn, best = min(tried, key=lambda t: t[:2])
        timings = _summed_timings(prediction, [t[-1] for t in tried])
        if disagreement > UPSIDE_DOWN_AGREED or disagreement >= TILT_RATIO * prediction.view_disagreement:
            return replace(prediction, timings=timings)
        against = (f"(they disagree on {100 * disagreement:.1f} % of the brain, against "
                   f"{100 * prediction.view_disagreement:.1f} % without this turn): the mask was made so")
        if turn is None:
            said = (f"the networks' views agree far better with the image's axes read as "
                    f"{'-'.join(nib.aff2axcodes(turned_affine))}, not {'-'.join(nib.aff2axcodes(affine))} as its "
                    f"header has them {against}; are the header's axes swapped? (left and right cannot be told apart)")
            return prediction.seen_otherwise(best, timings, said)
        about, degrees = turn
        how, axis, question = {
            1: ("rolled", "front-back", "lying on its side, or are the header's left-right and superior-inferior axes "
                "swapped"),
            0: ("pitched", "left-right", "upside down and facing backwards, or are the header's front-back and "
                "superior-inferior axes both flipped" if abs(degrees) == 180 else "facing up or down, or are the "
                "header's front-back and superior-inferior axes swapped"),
            2: ("turned", "superior-inferior", "facing left or right, or are the header's left-right and front-back "
                "axes swapped")}[about]
        said = (f"the networks' views agree far better with the head seen {how} {abs(degrees):g} degrees about its "
                f"{axis} axis {against}; is the head {question}?")
        return prediction.seen_otherwise(best, timings, said)

    def _predict(self, data, affine, shape, warnings, smoothed=None):
        networks, timings = self.networks, {}
        t = time.perf_counter()
        ras = geometry.RasVolume.of(data, affine, smoothed=smoothed)  # shared by the locator and every view
        box = locate_brain(ras, affine, networks.locator)
        timings["locate"] = time.perf_counter() - t

        if box is None:
            warnings.append("the locator found no brain in the field of view: the whole head was segmented")
            grid = geometry.model_grid_for(ras.data, ras.affine, voxel_mm=self.voxel_mm)
        else:
            grid = geometry.brain_box_grid(*box, voxel_mm=self.voxel_mm)
        native, votes, blocks = np.zeros(shape, np.float32), np.zeros(shape, np.uint8), []
        for view in self.views:
            block, view_native = self._segment(ras, affine, shape, view.of(grid), view.mirror, networks.segmenter,
                                               timings)
            if block is not None:
                native[block] += view_native / len(self.views)
                votes[block] += view_native >= 0.5
                blocks.append(block)
        block = tuple(slice(min(b[a].start for b in blocks), max(b[a].stop for b in blocks))
                      for a in range(3)) if blocks else None
        disagreement = None
        if block is not None and len(self.views) > 1:
            voted = votes[block]
            any_view = int(np.count_nonzero(voted))
            disagreement = float(np.count_nonzero(voted < len(self.views)) - (voted.size - any_view)) / any_view \
                if any_view else None
        return Prediction(native, block, timings, warnings, view_disagreement=disagreement)

    @staticmethod
    def _segment(ras, affine, shape, grid, mirror, segmenter, timings):
        """One view's probability on the native grid (``shape``, ``affine``): (native block, its values), (None,
        None) if empty."""
        def timed(stage, started):
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started

        t = time.perf_counter()
        volume, grid = geometry.to_model_grid(ras, grid=grid)
        timed("conform", t)

        t = time.perf_counter()
        flip = (lambda v: np.ascontiguousarray(v[::-1])) if mirror else (lambda v: v)  # axis 0 is left-right
        prob = flip(predict_probability(flip(volume), segmenter))
        timed("inference", t)

        t = time.perf_counter()
        core = largest_component(prob >= SUPPORT_THRESHOLD)
        support = ndi.binary_dilation(core, iterations=2) if core.any() else prob >= 0.05
        prob = np.where(support, prob, 0.0).astype(np.float32)
        timed("post_model_grid", t)

        t = time.perf_counter()
        block = geometry.native_block_of(support, grid, affine, shape)
        values = None if block is None else geometry.to_native_grid(prob, grid, affine, shape, block=block)
        timed("to_native", t)
        return block, values

    def mask(self, data, affine, *, threshold=None, border_mm=0.0, prediction=None):
        """The brain mask of ``data`` (p >= ``threshold``, largest component, holes filled, grown or shrunk by
        ``border_mm``) with its probability, as a ``SkullstripResult``; ``prediction``: the ``probability()``
        of the same volume, if the caller has it already."""
        threshold = self.threshold if threshold is None else check_threshold(threshold)
        border_mm = check_border(border_mm)
        prediction = prediction or self.probability(data, affine)
        affine = np.asarray(affine, dtype=float)
        timings = dict(prediction.timings)
        t = time.perf_counter()
        shape, voxel_mm = prediction.probability.shape, voxel_sizes(affine)
        mask, before_border = np.zeros(shape, np.uint8), None
        # an already skull-stripped image's probability is 0/1: any threshold gives its non-zero region
        level = 0.5 if prediction.stripped_input else threshold
        found = None if prediction.block is None else geometry.voxel_box(
            prediction.probability[prediction.block] >= level)
        if found is not None:
            # the mask is cleaned in the box of the voxels above the threshold, grown by the border and one voxel
            # of background: its components, holes and border are those of the whole grid
            grow = int(np.ceil(max(border_mm, 0.0) / voxel_mm.min())) + 1
            block = tuple(slice(max(0, s.start + lo - grow), min(n, s.start + hi + 1 + grow))
                          for s, lo, hi, n in zip(prediction.block, *found, shape))
            core = clean_mask(prediction.probability[block], threshold=level, voxel_mm=voxel_mm)
            mask[block] = with_border(core, border_mm, voxel_mm)
            if border_mm:
                before_border = np.zeros(shape, np.uint8)
                before_border[block] = core
        timings["post_native"] = time.perf_counter() - t
        timings["postprocess"] = timings.get("post_model_grid", 0.0) + timings["post_native"]
        return SkullstripResult(mask, prediction.probability, timings, list(prediction.warnings),
                                prediction.view_disagreement, before_border, prediction.read,
                                prediction.noise_smoothing_mm)
