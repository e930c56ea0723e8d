"""The core path, free of nipype and files: native volume -> brain probability -> brain mask."""

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from . import geometry
from .model.inference import predict_probability
from .postproc import clean_mask, largest_component


@dataclass
class SkullstripResult:
    mask: np.ndarray  # uint8 {0, 1}, native grid
    probability: np.ndarray  # float32 [0, 1], native grid
    timings: dict = field(default_factory=dict)


def voxel_sizes(affine):
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))


def skullstrip_array(data, affine, *, threshold=0.5, border_mm=0.0, model=None, flip_tta=False):
    """Skull-strip a 3D volume given with its voxel-to-world affine; outputs are on the same grid."""
    timings = {}
    t = time.perf_counter()
    volume, grid = geometry.to_model_grid(data, affine)
    timings["conform"] = time.perf_counter() - t

    t = time.perf_counter()
    prob = predict_probability(volume, model=model, flip_tta=flip_tta)
    timings["inference"] = time.perf_counter() - t

    t = time.perf_counter()
    # Keep only the main brain blob (with a safety rim) before going back to the finer native grid.
    core = largest_component(prob >= threshold)
    support = ndi.binary_dilation(core, iterations=2) if core.any() else prob >= 0.05
    prob = np.where(support, prob, 0.0).astype(np.float32)
    shape = tuple(int(s) for s in data.shape[:3])
    native_mm = voxel_sizes(affine)
    pad = 2 + int(np.ceil(max(border_mm, 0.0) / native_mm.min()))
    block = geometry.native_block_of(support, grid, affine, shape, pad=pad)
    native_prob = np.zeros(shape, np.float32)
    mask = np.zeros(shape, np.uint8)
    if block is not None:
        native_prob[block] = geometry.to_native_grid(prob, grid, affine, shape, block=block)
        mask[block] = clean_mask(native_prob[block], threshold=threshold, border_mm=border_mm,
                                 voxel_mm=native_mm)
    timings["postprocess"] = time.perf_counter() - t
    return SkullstripResult(mask=mask, probability=native_prob, timings=timings)
