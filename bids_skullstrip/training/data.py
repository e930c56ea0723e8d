"""Finding and loading labelled heads (image + brain mask) for training and evaluation."""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from scipy import ndimage as ndi

from ..geometry import MODEL_VOXEL_MM, antialias, block_reduce
from ..nifti import spatial_shape

log = logging.getLogger("bids_skullstrip")


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
    - NFBS-like folders: ``<stem>_T1w.nii[.gz]`` beside ``<stem>_brainmask``, ``<stem>_T1w_brainmask`` (NFBS) or
      ``<stem>_mask`` (.nii or .nii.gz);
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
    if split is not None:
        raise ValueError(f"{root}: splits are only defined for the heads/ + splits.json layout")
    pairs, unlabelled = [], []
    for image in sorted(root.rglob("*_T1w.nii*")):
        if "desc-brain_T1w" in image.name or "desc-preproc" in image.name:
            continue
        stem = image.name.split("_T1w.nii")[0]
        beside = [image.with_name(f"{stem}_{label}{ext}") for label in MASK_NAMES for ext in (".nii.gz", ".nii")]
        derived = sorted(root.rglob(f"{stem}_desc-brain_mask.nii*"))  # BIDS derivatives, anywhere under root
        found = [c for c in beside if c.exists()] or derived
        if len(found) > 1:
            raise ValueError(f"{image}: {len(found)} brain masks could be its own ({', '.join(map(str, found[:3]))}): "
                             "keep one")
        if found:
            pairs.append(LabelledHead(stem, image, found[0]))
        else:
            unlabelled.append(image)
    if unlabelled and pairs:
        log.warning("%d image(s) without a brain mask skipped: %s (a mask is named <image stem>_%s)", len(unlabelled),
                    ", ".join(str(p) for p in unlabelled[:3]) + (" ..." if len(unlabelled) > 3 else ""),
                    "/_".join(MASK_NAMES))
    if unlabelled and not pairs:
        raise ValueError(f"{root}: {len(unlabelled)} *_T1w image(s) but no brain mask beside any (looked for "
                         f"<stem>_{', <stem>_'.join(MASK_NAMES)}, .nii or .nii.gz, e.g. for {unlabelled[0].name})")
    names = [h.name for h in pairs]
    if len(set(names)) < len(names):  # sub-01 of two sites: each its own name (its tissue labels are cached by it)
        pairs = [LabelledHead("_".join(h.image.relative_to(root).parent.parts + (h.name,)), h.image, h.mask)
                 for h in pairs]
    return pairs


# The names of a brain mask beside ``<stem>_T1w.nii[.gz]``: NFBS's ``<stem>_T1w_brainmask`` among them
MASK_NAMES = ("brainmask", "T1w_brainmask", "mask", "desc-brain_mask")


def check_pair(head):
    """A ValueError naming the file and the problem where ``head``'s mask cannot be its image's brain mask: another
    grid, not binary, empty or covering most of the field of view (inverted?); or where the image is not one 3D
    volume. Read as training reads them (``mask > 0``), such masks trained networks that were silently wrong."""
    img, msk = nib.load(str(head.image)), nib.load(str(head.mask))
    shape, mshape = _volume_shape(img, head.image), _volume_shape(msk, head.mask)
    if shape != mshape:
        raise ValueError(f"{head.mask}: shape {'x'.join(map(str, mshape))} differs from its image's "
                         f"{'x'.join(map(str, shape))} ({head.image}): resample it onto the image's grid")
    if not np.allclose(img.affine, msk.affine, atol=1e-3):
        raise ValueError(f"{head.mask}: its voxel-to-world affine differs from its image's ({head.image}): "
                         "resample it onto the image's grid")
    values = np.unique(np.asarray(msk.dataobj))
    if values.size > 2 or values.min() < 0 or (values.size == 2 and values.min() != 0):
        shown = ", ".join(f"{v:g}" for v in values[:4]) + (", ..." if values.size > 4 else "")
        raise ValueError(f"{head.mask}: not a binary brain mask (values {shown}): 0 outside the brain, one value "
                         "inside")
    inside = np.count_nonzero(np.asarray(msk.dataobj)) / float(np.prod(shape))
    if inside == 0 or inside > 0.5:
        raise ValueError(f"{head.mask}: " + ("empty" if inside == 0 else
                         f"covers {100 * inside:.0f} % of the field of view: inverted?"))


def _volume_shape(img, path):
    shape = spatial_shape(img.shape)
    if shape is None:
        raise ValueError(f"{path}: image of shape {'x'.join(map(str, img.shape))}: one 3D volume is needed")
    return shape


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
    data = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
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
        """``labels_cache``: a folder; also derive the head's tissue label map (once: kept there). A ValueError
        naming the file where the pair cannot be trained on (``check_pair``)."""
        check_pair(head)
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
