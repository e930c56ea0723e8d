"""Finding and loading labelled heads (image + brain mask) for training and evaluation."""

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from scipy import ndimage as ndi

from ..geometry import MODEL_VOXEL_MM, antialias, block_reduce


@dataclass
class LabelledHead:
    name: str
    image: Path
    mask: Path
    fov: Path = None  # where the reference is defined (score inside it); None: everywhere
    contrast: str = "T1w"


def _contrast_images(root):
    """The shared layout's ``contrasts/<id>/``: real FLAIR/T2w/T1w images (validation only), each with the
    reference carried from its session's T1w and the field of view where that reference is defined."""
    folders = sorted(p for p in Path(root, "contrasts").iterdir() if (p / "image.nii.gz").exists())
    return [LabelledHead(p.name, p / "image.nii.gz", p / "mask_ref.nii.gz", p / "fov.nii.gz",
                         json.loads((p / "meta.json").read_text())["contrast"]) for p in folders]


def find_labelled_heads(root, *, split=None):
    """Image/mask pairs under ``root`` in any of the layouts users have.

    - this project's shared layout: ``heads/<id>/T1w.nii.gz`` + ``mask_silver.nii.gz`` (``splits.json``
      selects ``split``; ``split="contrasts"`` gives its ``contrasts/<id>/`` images, with their field of view);
    - NFBS-like folders: ``*_T1w.nii[.gz]`` beside ``*_brainmask.nii[.gz]`` (or ``*_mask``);
    - BIDS derivatives: ``*_T1w.nii[.gz]`` with ``*_desc-brain_mask.nii[.gz]`` of the same entities.
    """
    root = Path(root)
    heads_dir = root / "heads"
    if split == "contrasts" and (root / "contrasts").is_dir():
        return _contrast_images(root)
    if heads_dir.is_dir():
        names = sorted(p.name for p in heads_dir.iterdir() if (p / "T1w.nii.gz").exists())
        if split is not None:
            splits = json.loads((root / "splits.json").read_text())
            if split not in splits:
                known = sorted(splits) + (["contrasts"] if (root / "contrasts").is_dir() else [])
                raise ValueError(f"{root}: no split {split!r} (splits.json has {', '.join(known)})")
            names = splits[split]
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


# Tissue classes of a head's label map (``tissue_labels``): three inside the brain mask, five outside it.
TISSUES = ("background", "csf", "gray", "white", "dark_near_brain", "dark", "muscle", "skin", "fat")
NEAR_BRAIN_MM = 6.0


def _kmeans_1d(values, k, iterations=20):
    """The ``k`` sorted cluster centres of 1D ``values`` (Lloyd's algorithm from quantiles; deterministic)."""
    sample = np.sort(values[:: max(1, values.size // 200000)])
    centres = np.quantile(sample, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        which = np.digitize(sample, (centres[1:] + centres[:-1]) / 2)
        centres = np.array([sample[which == j].mean() if np.any(which == j) else centres[j] for j in range(k)])
    return np.sort(centres)


def tissue_labels(image, mask, affine):
    """A head's tissue label map (uint8, ``TISSUES``), derived from its T1w intensities and brain mask: inside the
    mask three intensity clusters (CSF, gray, white matter); in the rest of the head four (the darkest split into
    what lies within ``NEAR_BRAIN_MM`` of the brain, CSF, dura and bone that other contrasts paint differently,
    and the rest); outside the head background. The classes only need to be shapes that other contrasts paint
    differently, not anatomy; training paints them at random (``augment.synthesize_from_labels``)."""
    smooth = ndi.gaussian_filter(image, 0.5)
    brain = mask > 0.5
    head = ndi.binary_fill_holes(ndi.binary_closing(smooth > 0.1 * np.percentile(smooth, 99), iterations=2))
    head |= brain
    labels = np.zeros(image.shape, np.uint8)
    centres = _kmeans_1d(smooth[brain], 3)
    labels[brain] = 1 + np.digitize(smooth[brain], (centres[1:] + centres[:-1]) / 2)
    rest = head & ~brain
    if rest.any():
        centres = _kmeans_1d(smooth[rest], 4)
        cluster = np.digitize(smooth[rest], (centres[1:] + centres[:-1]) / 2)
        near = (ndi.distance_transform_edt(~brain, sampling=voxel_sizes(affine)) <= NEAR_BRAIN_MM)[rest]
        labels[rest] = np.where(cluster == 0, np.where(near, 4, 5), 5 + cluster)
    return labels


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
    labels: np.ndarray = None  # tissue label map on the grid of ``image`` (``tissue_labels``), if asked for

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
    def load(cls, head: LabelledHead, voxel_mm=MODEL_VOXEL_MM, *, labels_cache=None):
        """``labels_cache``: a folder; also derive the head's tissue label map (once: kept there)."""
        data, affine = _load_3d(head.image)
        mask = (np.asarray(nib.load(str(head.mask)).dataobj) > 0).astype(np.float32)
        loaded = cls._from_arrays(head.name, data, mask, affine, voxel_mm)
        if labels_cache is not None:
            cached = Path(labels_cache) / f"{head.name}_{voxel_mm:g}mm_labels.npy"
            if cached.exists():
                loaded.labels = np.load(cached)
            else:
                loaded.labels = tissue_labels(loaded.image, loaded.mask, loaded.affine)
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.save(cached, loaded.labels)
        return loaded

    @classmethod
    def load_brain(cls, path, voxel_mm=MODEL_VOXEL_MM):
        """A real skull-stripped brain: its mask is its non-zero voxels."""
        data, affine = _load_3d(path)
        return cls._from_arrays(Path(path).name, data, (data > 0).astype(np.float32), affine, voxel_mm)
