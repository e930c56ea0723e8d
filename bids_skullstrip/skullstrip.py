"""The core path, free of nipype and files: native volume -> brain probability -> brain mask."""

import time
from dataclasses import dataclass, field

import numpy as np
from nibabel.affines import voxel_sizes
from scipy import ndimage as ndi

from . import geometry
from .model.inference import BrainNetworks, default_threshold, load_model, predict_probability
from .postproc import clean_mask, largest_component


# An image that is exactly zero outside a brain-sized region is already skull-stripped (a head with a zero
# background, e.g. FreeSurfer's T1.mgz, keeps its scalp and skull: well above 2200 ml).
STRIPPED_ZERO_FRACTION = 0.3
STRIPPED_VOLUME_ML = (500.0, 2200.0)
LOCATOR_THRESHOLD = 0.5  # the locator's brain: p >= this, largest component (its box is all that is used)


@dataclass
class SkullstripResult:
    mask: np.ndarray  # uint8 {0, 1}, native grid
    probability: np.ndarray  # float32 [0, 1], native grid
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)


def looks_skull_stripped(data, voxel_mm):
    nonzero = int(np.count_nonzero(data))
    volume_ml = nonzero * float(np.prod(voxel_mm)) / 1000.0
    return (1.0 - nonzero / data.size > STRIPPED_ZERO_FRACTION
            and STRIPPED_VOLUME_ML[0] <= volume_ml <= STRIPPED_VOLUME_ML[1])


def locate_brain(data, affine, locator):
    """World (min, max) corners of the brain the locator finds in the whole field of view, or None."""
    volume, grid = geometry.to_model_grid(data, affine, voxel_mm=geometry.LOCATOR_VOXEL_MM)
    found = largest_component(predict_probability(volume, locator) >= LOCATOR_THRESHOLD)
    return geometry.grid_box(found, grid)


def skullstrip_array(data, affine, *, threshold=None, border_mm=0.0, model=None):
    """Skull-strip a 3D volume given with its voxel-to-world affine; outputs are on the same grid.

    ``model``: the two networks (default: the bundled ones); ``threshold`` defaults to the one
    calibrated for the bundled weights (their model card).
    """
    if threshold is None:
        threshold = default_threshold()
    timings = {}
    if looks_skull_stripped(data, voxel_sizes(affine)):
        t = time.perf_counter()
        # the brain is the non-zero region (as a 0/1 map: largest part, holes filled, optional border)
        mask = clean_mask(data != 0, threshold=0.5, border_mm=border_mm, voxel_mm=voxel_sizes(affine))
        mask = mask.astype(np.uint8)
        timings["postprocess"] = time.perf_counter() - t
        return SkullstripResult(mask=mask, probability=mask.astype(np.float32), timings=timings,
                                warnings=["the image looks already skull-stripped (zero outside a brain-sized "
                                          "region): the mask is its non-zero region, the network was not run"])
    networks = BrainNetworks.of(load_model() if model is None else model)
    warnings = []
    t = time.perf_counter()
    box = locate_brain(data, affine, networks.locator)
    timings["locate"] = time.perf_counter() - t

    t = time.perf_counter()
    if box is None:
        warnings.append("the locator found no brain in the field of view: the whole head was segmented")
        volume, grid = geometry.to_model_grid(data, affine)
    else:
        volume, grid = geometry.to_model_grid(data, affine, geometry.brain_box_grid(*box))
    timings["conform"] = time.perf_counter() - t

    t = time.perf_counter()
    prob = predict_probability(volume, networks.segmenter)
    timings["inference"] = time.perf_counter() - t

    t = time.perf_counter()
    # Keep only the main brain blob (with a safety rim) before going back to the finer native grid.
    core = largest_component(prob >= threshold)
    support = ndi.binary_dilation(core, iterations=2) if core.any() else prob >= 0.05
    prob = np.where(support, prob, 0.0).astype(np.float32)
    timings["post_model_grid"] = time.perf_counter() - t

    t = time.perf_counter()
    shape = tuple(int(s) for s in data.shape[:3])
    native_mm = voxel_sizes(affine)
    pad = 2 + int(np.ceil(max(border_mm, 0.0) / native_mm.min()))
    block = geometry.native_block_of(support, grid, affine, shape, pad=pad)
    native_prob = np.zeros(shape, np.float32)
    mask = np.zeros(shape, np.uint8)
    if block is not None:
        native_prob[block] = geometry.to_native_grid(prob, grid, affine, shape, block=block)
    timings["to_native"] = time.perf_counter() - t

    t = time.perf_counter()
    if block is not None:
        mask[block] = clean_mask(native_prob[block], threshold=threshold, border_mm=border_mm,
                                 voxel_mm=native_mm)
    timings["post_native"] = time.perf_counter() - t
    timings["postprocess"] = timings["post_model_grid"] + timings["post_native"]
    return SkullstripResult(mask=mask, probability=native_prob, timings=timings, warnings=warnings)
