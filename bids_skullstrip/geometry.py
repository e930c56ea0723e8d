"""Moving images between their native grid and the model's grid.

The model sees every image on an axis-aligned RAS grid of ``MODEL_VOXEL_MM`` isotropic voxels that
covers the head. Any native orientation, obliquity or voxel size is handled by one affine resampling
each way, so outputs land back on exactly the native voxel grid.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

MODEL_VOXEL_MM = 2.0
GRID_MULTIPLE = 8  # the U-Net pools three times
MAX_GRID_VOXELS = 160  # per axis: 320 mm, more than any head; bounds memory on huge fields of view
HEAD_MARGIN_MM = 12.0


@dataclass(frozen=True)
class ModelGrid:
    shape: tuple
    affine: np.ndarray  # model voxel -> world (mm)


def _extent(profile, min_count):
    idx = np.flatnonzero(profile >= min_count)
    return (int(idx[0]), int(idx[-1])) if idx.size else (0, len(profile) - 1)


def head_bounding_box(data, affine):
    """World-space (min, max) corners of the head.

    Computed from per-axis profiles of above-threshold voxels over the whole image, so a permuted or
    flipped copy of the same image gives the same box: the model grid depends on the world, not on
    the voxel order.
    """
    top = float(data.max())
    if not top > 0:
        raise ValueError("image has no positive voxels")
    # 98th percentile of the positive voxels from a histogram of the whole image: fast, and
    # independent of the voxel order
    bins = 2048
    counts = np.bincount(np.clip(data * ((bins - 1) / top), 0, bins - 1).astype(np.int32, copy=False).ravel(),
                         minlength=bins)
    counts[0] -= np.count_nonzero(data <= 0)
    cumulative = np.cumsum(counts)
    fg = data > 0.1 * top * (1 + np.searchsorted(cumulative, 0.98 * cumulative[-1])) / (bins - 1)
    corners_idx = []
    for axis in range(3):
        profile = np.count_nonzero(fg, axis=tuple(a for a in range(3) if a != axis))
        # slices with a few stray voxels (noise, ghosts) do not extend the head
        corners_idx.append(_extent(profile, max(1, 0.002 * profile.max())))
    lo, hi = np.array([c[0] for c in corners_idx]), np.array([c[1] for c in corners_idx])
    corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    world = (affine @ corners.T).T[:, :3]
    # micrometre rounding: the same head in another voxel order gives bit-identical corners, so the
    # lattice snapping in model_grid_for cannot fall on different sides of a rounding boundary
    return np.round(world.min(0), 3), np.round(world.max(0), 3)


def model_grid_for(data, affine, *, voxel_mm=MODEL_VOXEL_MM):
    """The RAS grid of ``voxel_mm`` voxels covering the head in ``data``, on a world lattice of
    ``voxel_mm`` (so sub-voxel differences in the head box do not move the grid)."""
    lo, hi = head_bounding_box(data, affine)
    lo, hi = lo - HEAD_MARGIN_MM, hi + HEAD_MARGIN_MM
    n = np.ceil((hi - lo) / voxel_mm).astype(int)
    n = np.minimum(n, MAX_GRID_VOXELS)
    n = (np.ceil(n / GRID_MULTIPLE) * GRID_MULTIPLE).astype(int)
    centre = (lo + hi) / 2
    grid_affine = np.eye(4)
    grid_affine[:3, :3] = np.diag([voxel_mm] * 3)
    grid_affine[:3, 3] = np.round((centre - voxel_mm * (n - 1) / 2) / voxel_mm) * voxel_mm
    return ModelGrid(tuple(int(v) for v in n), grid_affine)


def _voxel_mm(affine):
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))


def block_reduce(data, affine, voxel_mm):
    """Means over blocks of k native voxels per axis, with the affine of the coarser grid, down to about
    half of ``voxel_mm``: the cheap first part of anti-aliasing a fine image (a 0.5 mm head has 8x fewer
    voxels at 1 mm). It stops at half so that what the model sees from there on is what it saw in
    training (``antialias`` + linear sampling of a ~1 mm image). Returns (data, affine)."""
    k = np.clip(np.floor(voxel_mm / (2.0 * _voxel_mm(affine))), 1, data.shape[:3]).astype(int)
    if np.all(k == 1):
        return data, affine
    n = np.array(data.shape[:3]) // k
    blocks = data[: n[0] * k[0], : n[1] * k[1], : n[2] * k[2]].reshape(n[0], k[0], n[1], k[1], n[2], k[2])
    scale = np.diag([*k.astype(float), 1.0])
    scale[:3, 3] = (k - 1) / 2.0
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32), affine @ scale


def antialias(data, affine, voxel_mm):
    """Gaussian smoothing before sampling at ``voxel_mm``: sigma = (zoom - 1) / 2 voxels."""
    sigma = np.maximum(voxel_mm / _voxel_mm(affine) - 1.0, 0.0) * 0.5
    if np.all(sigma < 0.25):
        return data
    return ndi.gaussian_filter(data, sigma, mode="nearest")


def to_model_grid(data, affine, grid=None, *, voxel_mm=MODEL_VOXEL_MM):
    """Resample a native 3D volume onto the model grid (``grid``, or the one covering the head at
    ``voxel_mm``). Returns (volume float32, grid)."""
    if grid is not None:
        voxel_mm = float(grid.affine[0, 0])
    data, affine = block_reduce(np.asarray(data, dtype=np.float32), affine, voxel_mm)
    if grid is None:
        grid = model_grid_for(data, affine, voxel_mm=voxel_mm)
    smoothed = antialias(data, affine, voxel_mm)
    vox = np.linalg.inv(affine) @ grid.affine
    out = ndi.affine_transform(smoothed, vox[:3, :3], vox[:3, 3], output_shape=grid.shape,
                               order=1, mode="constant", cval=0.0, prefilter=False)
    return out.astype(np.float32, copy=False), grid


def native_block_of(support, grid, native_affine, native_shape, *, pad=2):
    """Slices of the native grid that contain the model-grid region ``support`` (boolean)."""
    if not support.any():
        return None
    idx = np.argwhere(support)
    lo, hi = idx.min(0) - 1, idx.max(0) + 1
    corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    native = (np.linalg.inv(native_affine) @ grid.affine @ corners.T).T[:, :3]
    start = np.clip(np.floor(native.min(0)).astype(int) - pad, 0, native_shape)
    stop = np.clip(np.ceil(native.max(0)).astype(int) + pad + 1, 0, native_shape)
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def to_native_grid(volume, grid, native_affine, native_shape, *, block=None, order=1, mode="constant"):
    """Resample a model-grid volume back onto the native grid (or a block of it).

    ``mode="nearest"`` extends smooth fields (e.g. a bias field) beyond the model grid.
    """
    if block is None:
        block = tuple(slice(0, s) for s in native_shape)
    offset = np.eye(4)
    offset[:3, 3] = [s.start for s in block]
    vox = np.linalg.inv(grid.affine) @ native_affine @ offset
    out_shape = tuple(s.stop - s.start for s in block)
    return ndi.affine_transform(np.asarray(volume, dtype=np.float32), vox[:3, :3], vox[:3, 3],
                                output_shape=out_shape, order=order, mode=mode, cval=0.0,
                                prefilter=False)
