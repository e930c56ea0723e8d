"""Finding and loading labelled heads (image + brain mask) for training and evaluation."""

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..geometry import MODEL_VOXEL_MM, antialias, block_reduce


@dataclass
class LabelledHead:
    name: str
    image: Path
    mask: Path


def find_labelled_heads(root, *, split=None):
    """Image/mask pairs under ``root`` in any of the layouts users have.

    - this project's shared layout: ``heads/<id>/T1w.nii.gz`` + ``mask_silver.nii.gz`` (``splits.json``
      selects ``split``);
    - NFBS-like folders: ``*_T1w.nii[.gz]`` beside ``*_brainmask.nii[.gz]`` (or ``*_mask``);
    - BIDS derivatives: ``*_T1w.nii[.gz]`` with ``*_desc-brain_mask.nii[.gz]`` of the same entities.
    """
    root = Path(root)
    heads_dir = root / "heads"
    if heads_dir.is_dir():
        names = sorted(p.name for p in heads_dir.iterdir() if (p / "T1w.nii.gz").exists())
        if split is not None:
            names = json.loads((root / "splits.json").read_text())[split]
        return [LabelledHead(n, heads_dir / n / "T1w.nii.gz", heads_dir / n / "mask_silver.nii.gz")
                for n in names]
    pairs = []
    for image in sorted(root.rglob("*_T1w.nii*")):
        if "desc-brain_T1w" in image.name or "desc-preproc" in image.name:
            continue
        stem = image.name.split("_T1w.nii")[0]
        suffix = image.name[len(stem) + len("_T1w"):]
        candidates = [image.with_name(f"{stem}_{label}{suffix}")
                      for label in ("brainmask", "mask", "desc-brain_mask")]
        candidates += sorted(root.rglob(f"{stem}_desc-brain_mask.nii*"))
        mask = next((c for c in candidates if c.exists()), None)
        if mask is not None:
            pairs.append(LabelledHead(stem, image, mask))
    if split is not None:
        raise ValueError(f"{root}: splits are only defined for the heads/ + splits.json layout")
    return pairs


def find_brains(root):
    """Skull-stripped brains (``brains/*.nii[.gz]`` of the shared layout) for compositing into heads."""
    return sorted(Path(root, "brains").glob("*.nii*"))


def _world_extent(mask, affine):
    idx = np.argwhere(mask > 0)
    world = nib.affines.apply_affine(affine, idx[:: max(1, len(idx) // 20000)])
    return world.mean(0), np.stack([world.min(0), world.max(0)])


def _load_3d(path):
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    return (data[..., 0] if data.ndim == 4 else data), img.affine


@dataclass
class TrainingHead:
    """A head (or a skull-stripped brain) held in memory, reduced and smoothed for sampling onto a grid
    of ``voxel_mm`` the way inference does it (``geometry.to_model_grid``)."""
    name: str
    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    brain_centre: np.ndarray  # world mm
    brain_extent: np.ndarray  # world mm, (min, max) of the brain along each axis
    head_extent: np.ndarray  # world mm, (min, max) of the non-background voxels
    brain_median: float  # median intensity inside the brain

    @classmethod
    def _from_arrays(cls, name, data, mask, affine, voxel_mm):
        centre, extent = _world_extent(mask, affine)
        _, head_extent = _world_extent(data > 0.1 * np.percentile(data, 99), affine)
        brain_median = float(np.median(data[mask > 0]))
        data, reduced = block_reduce(data, affine, voxel_mm)
        mask, _ = block_reduce(mask, affine, voxel_mm)
        return cls(name, antialias(data, reduced, voxel_mm), antialias(mask, reduced, voxel_mm), reduced, centre,
                   extent, head_extent, brain_median)

    @classmethod
    def load(cls, head: LabelledHead, voxel_mm=MODEL_VOXEL_MM):
        data, affine = _load_3d(head.image)
        mask = (np.asarray(nib.load(str(head.mask)).dataobj) > 0).astype(np.float32)
        return cls._from_arrays(head.name, data, mask, affine, voxel_mm)

    @classmethod
    def load_brain(cls, path, voxel_mm=MODEL_VOXEL_MM):
        """A real skull-stripped brain: its mask is its non-zero voxels."""
        data, affine = _load_3d(path)
        return cls._from_arrays(Path(path).name, data, (data > 0).astype(np.float32), affine, voxel_mm)
