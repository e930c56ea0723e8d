"""How the model holds up when an unseen head is acquired differently: each held-out head (val and wild by
default; never trained on) is changed the way other scanners and protocols change it, and its silver mask
with it, and the mask of the changed image is scored against the changed silver mask. A script that prints
numbers, not a test.

    python bench/stress_eval.py                          # the bundled weights, val + wild, every change (~40 min)
    python bench/stress_eval.py --changes 3mm gamma0.6 --splits val
    python bench/stress_eval.py --weights work/train/final/unet.weights.h5 --json stress.json
    python bench/stress_eval.py --splits contrasts wild --changes mass-bright mass-dark mass-ring   # ~12 min
    python bench/stress_eval.py --changes paint-T2w paint-FLAIR paint-PDw     # T1w heads as 2D T2w/FLAIR/PDw
    python bench/stress_eval.py --changes paint-T2w-skull paint-PDw-skull     # ... with a dark skull
    python bench/stress_eval.py --changes paint-T2w-3d paint-FLAIR-3d paint-PDw-3d   # ... as 3D images, dark skull
    python bench/stress_eval.py --changes flip-AP LPS-as-RAS flip-SI flip-LR          # headers that lie, ~15 min
    python bench/stress_eval.py --changes swap-AP-SI                  # ... about which axis is which, ~15 min
    python bench/stress_eval.py --changes thick5mm-coronal thick5mm-sagittal head0.8 head0.7   # ~12 min

The changes (``CHANGES``): coarser and anisotropic voxels (the image averaged over each new voxel as an
acquisition would, the silver mask resampled linearly and cut at 0.5; thick slices axial, coronal or sagittal),
a smaller head (a child's size, by the header), contrast curves, a strong smooth bias
field, Rician noise, a field of view that cuts the top of the head (also as a 2D stack of 4 mm slices whose last
slice is full of brain, as clinical axial stacks planned to the vertex are), enhancing dura and sinuses (post-contrast
T1w), and a tumour-like mass at the cortex (bright, dark, or a dark core in a bright rim; 22 mm in radius,
centred 12 mm under the brain's surface, inside the brain only: the reference stays the same, and the share of
the mass each mask keeps is printed), and the head painted as a 2D T2w, FLAIR or PDw image from its tissue label
map (stripped by those contrasts' networks: the only PDw measurement ../shared/data allows), and headers that lie
about an axis's sign (the voxels flipped, the affine kept; a left-right flip cannot be seen and is the control) or
about which axis is which (two voxel axes swapped). The
row ``none`` is the same heads as they are; each other row also gives the largest drop of one head's Dice from its
``none`` value.

Heads are stripped as the app strips them (``ModelCard.bundled_for`` their contrast), so
``--splits contrasts`` measures the any-contrast networks on FLAIR and T2w (scored inside each ``fov``).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from nibabel.processing import resample_from_to
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bids_skullstrip.metrics import score_heads  # noqa: E402
from bids_skullstrip.model.card import T1W_SUFFIXES  # noqa: E402
from bids_skullstrip.training.augment import ball_distance, enhancing_shell, synthesize_from_labels  # noqa: E402
from bids_skullstrip.training.data import TISSUES, find_labelled_heads, tissue_labels  # noqa: E402
from model_eval import add_data_and_weights_arguments, strippers, summary  # noqa: E402
from qc_flags import world_axis  # noqa: E402

SEED = 20261203


def _regridded(data, affine, mask, voxel_mm):
    """``data`` acquired on axis-aligned voxels of ``voxel_mm`` over the same field of view (each new voxel the
    mean of the old ones it covers, approximated by a Gaussian of the new voxel's width), and ``mask`` on it."""
    old = voxel_sizes(affine)
    new = np.asarray(voxel_mm, float)
    sigma_mm = np.sqrt(np.clip(new ** 2 - old ** 2, 0, None)) / 2.355
    data = ndi.gaussian_filter(data, sigma_mm / old)
    shape = np.maximum(1, np.round(np.asarray(data.shape[:3]) * old / new)).astype(int)
    target_affine = affine.copy()
    target_affine[:3, :3] = affine[:3, :3] / old * new
    # the first new voxel covers the old voxels from the corner of the field of view: its centre is here
    target_affine[:3, 3] = nib.affines.apply_affine(affine, (new / old - 1) / 2)
    target = (tuple(shape), target_affine)
    image = resample_from_to(nib.Nifti1Image(data, affine), target, order=1)
    reference = resample_from_to(nib.Nifti1Image(mask.astype(np.float32), affine), target, order=1)
    return np.asarray(image.dataobj, np.float32), target_affine, np.asarray(reference.dataobj) >= 0.5


def regrid(voxel_mm):
    return lambda data, affine, mask, rng: _regridded(data, affine, mask, voxel_mm)


def thick_axial(thickness_mm, across="S"):
    """In-plane voxels as they are, slices ``thickness_mm`` thick along the axis closest to world ``across``
    (superior: an axial stack; anterior: coronal; right: sagittal)."""
    def change(data, affine, mask, rng):
        vox = voxel_sizes(affine).copy()
        vox[world_axis(affine, across)[0]] = thickness_mm
        return _regridded(data, affine, mask, vox)
    return change


def smaller_head(factor):
    """The whole head ``factor`` times its size (the voxels and the mask as they are, the affine's voxel sizes
    scaled about the brain's centre): a brain of ``factor``³ its volume, as a child's is (0.8: about half, a
    two-year-old's; 0.7: a third, a newborn's, but with an adult's contrast and folding)."""
    def change(data, affine, mask, rng):
        centre = nib.affines.apply_affine(affine, np.argwhere(mask).mean(axis=0))
        scaled = affine.copy()
        scaled[:3, :3] *= factor
        scaled[:3, 3] = centre + factor * (affine[:3, 3] - centre)
        return data, scaled, mask
    return change


def contrast(gamma):
    """Intensities through a power curve (scanner and sequence contrast differences)."""
    def change(data, affine, mask, rng):
        top = float(data.max())
        return top * (np.clip(data, 0, None) / top) ** gamma, affine, mask
    return change


def bias(strength):
    """A smooth multiplicative field, exp(+-strength) at the corners: a receive coil far from uniform."""
    def change(data, affine, mask, rng):
        axes = [np.linspace(-1, 1, n) for n in data.shape]
        g = np.meshgrid(*axes, indexing="ij")
        w = rng.normal(size=5)
        field = w[0] * g[0] + w[1] * g[1] + w[2] * g[2] + w[3] * g[0] * g[2] + w[4] * (g[1] ** 2 - 0.33)
        field *= strength / np.abs(field).max()
        return (data * np.exp(field)).astype(np.float32), affine, mask
    return change


def rician(fraction):
    """Rician noise of ``fraction`` of the head's 99th percentile (a low-SNR, fast or 1.5 T scan)."""
    def change(data, affine, mask, rng):
        sigma = fraction * float(np.percentile(data, 99))
        real = data + rng.normal(0, sigma, data.shape)
        imag = rng.normal(0, sigma, data.shape)
        return np.hypot(real, imag).astype(np.float32), affine, mask
    return change


def crop_top(mm):
    """The field of view ends ``mm`` below the top of the brain (a slab placed too low)."""
    def change(data, affine, mask, rng):
        axis, sign = world_axis(affine, "S")
        up = sign > 0
        rows = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        step = int(round(mm / voxel_sizes(affine)[axis]))
        keep = [slice(None)] * 3
        keep[axis] = slice(0, rows.max() + 1 - step) if up else slice(rows.min() + step, None)
        keep = tuple(keep)
        start = np.array([s.start or 0 for s in keep])
        moved = affine.copy()
        moved[:3, 3] = nib.affines.apply_affine(affine, start)
        return np.ascontiguousarray(data[keep]), moved, mask[keep]
    return change


def stack_to_vertex(thickness_mm, below_mm):
    """A clinical 2D stack that ends inside the brain: ``thickness_mm`` axial slices, the last one ``below_mm``
    under the top of the brain (``crop_top``, then ``thick_axial``), so that brain fills the edge slice."""
    crop, slices = crop_top(below_mm), thick_axial(thickness_mm)
    return lambda data, affine, mask, rng: slices(*crop(data, affine, mask, rng), rng)


MASS_RADIUS_MM = 22.0
MASS_DEPTH_MM = 12.0


def header_flip(*codes):
    """The header lies about axes: the voxels are mirrored along the voxel axes closest to world ``codes`` while
    the affine stays (a converter that got their signs wrong; R and A both: DICOM's LPS written as RAS); the silver
    mask is mirrored with them."""
    def change(data, affine, mask, rng):
        axes = tuple(world_axis(affine, code)[0] for code in codes)
        return np.ascontiguousarray(np.flip(data, axes)), affine, np.ascontiguousarray(np.flip(mask, axes))
    return change


def header_swap(first, second):
    """The header lies about which axis is which: the voxel axes closest to world ``first`` and ``second`` are
    swapped while the affine stays (a coronal stack called axial); the silver mask is swapped with them."""
    def change(data, affine, mask, rng):
        order = [0, 1, 2]
        a, b = world_axis(affine, first)[0], world_axis(affine, second)[0]
        order[a], order[b] = b, a
        return np.ascontiguousarray(np.transpose(data, order)), affine, np.ascontiguousarray(np.transpose(mask, order))
    return change


def mass_region(affine, mask, rng):
    """Where ``mass`` puts its mass: a ball of ``MASS_RADIUS_MM`` around a point ``MASS_DEPTH_MM`` under the
    surface of ``mask``, inside ``mask`` (the same for the same ``rng`` state), and every voxel's distance (mm)
    from its centre."""
    vox = voxel_sizes(affine)
    depth = ndi.distance_transform_edt(mask, sampling=vox)
    centres = np.argwhere(np.abs(depth - MASS_DEPTH_MM) < 1.0)
    distance = ball_distance(mask.shape, centres[rng.integers(len(centres))], vox)
    return mask & (distance < MASS_RADIUS_MM), distance


def mass(kind):
    """A tumour-like mass (``mass_region``) relative to the brain's median intensity: ``bright`` (1.8×: oedema
    in FLAIR/T2w, enhancement), ``dark`` (0.3×: necrosis, a cyst, a resection cavity) or ``ring`` (a 0.3× core
    in a 2× rim 7 mm thick: an enhancing glioblastoma). The reference is unchanged: the mass is brain."""
    def change(data, affine, mask, rng):
        region, distance = mass_region(affine, mask, rng)
        level = float(np.median(data[mask]))
        data = data.astype(np.float32, copy=True)
        texture = 1.0 + 0.05 * rng.standard_normal(int(region.sum()))
        if kind == "ring":
            data[region] = np.where(distance[region] < MASS_RADIUS_MM - 7.0, 0.3, 2.0) * level * texture
        else:
            data[region] = {"bright": 1.8, "dark": 0.3}[kind] * level * texture
        return data, affine, mask
    return change


def gadolinium(level):
    """Post-contrast T1w: the dura and the sinuses next to the brain (``augment.enhancing_shell`` of the
    reference) brightened to ``level`` × the brain's median; the reference is unchanged."""
    def change(data, affine, mask, rng):
        shell = enhancing_shell(rng, data, mask, voxel_sizes(affine))
        data = data.astype(np.float32, copy=True)
        data[shell] = level * float(np.median(data[mask])) * (1.0 + 0.1 * rng.standard_normal(int(shell.sum())))
        return data, affine, mask
    return change


def painted(contrast, thickness_mm=4.0, skull_mm=None):
    """The head as a clinical 2D ``contrast`` image: painted within ``augment.CONTRAST_PRIORS[contrast]`` from its
    tissue label map (``data.tissue_labels``: the training's way of making other contrasts, here on heads it never
    painted) and acquired in ``thickness_mm`` axial slices (None: on its own grid, as a 3D research acquisition).
    For T1w heads (val, wild); stripped by the networks of ``contrast``. ../shared/data has no real PD image and
    no 3D T2w or FLAIR: this is the measurement there is, synthetic.

    The label map's dark class near the brain holds CSF, dura and bone alike, so T2w and PDw paint a shell of
    CSF-bright tissue up to ``data.NEAR_BRAIN_MM`` around the brain, which no real T2w or PD image has.
    ``skull_mm``: beyond that distance from the brain that class is painted as the dark class (bone and dura are
    dark in every contrast), leaving the CSF next to the brain bright."""
    slices = thick_axial(thickness_mm) if thickness_mm else (lambda data, affine, mask, rng: (data, affine, mask))

    def change(data, affine, mask, rng):
        labels = tissue_labels(data, mask.astype(np.float32), affine)
        if skull_mm is not None:
            beyond = ndi.distance_transform_edt(~mask.astype(bool), sampling=voxel_sizes(affine)) > skull_mm
            labels[(labels == TISSUES.index("dark_near_brain")) & beyond] = TISSUES.index("dark")
        return slices(1000.0 * synthesize_from_labels(rng, labels, contrast=contrast), affine, mask, rng)
    return change


SKULL_MM = 2.0
PAINTED = {**{f"paint-{c}": c for c in ("T2w", "FLAIR", "PDw")}, **{f"paint-{c}-skull": c for c in ("T2w", "PDw")},
           **{f"paint-{c}-3d": c for c in ("T2w", "FLAIR", "PDw")}}
CHANGES = {
    "none": lambda data, affine, mask, rng: (data, affine, mask),
    "3mm": regrid((3.0, 3.0, 3.0)),
    "0.94x0.94x1.5mm": regrid((0.94, 0.94, 1.5)),
    "thick5mm": thick_axial(5.0),
    "thick5mm-coronal": thick_axial(5.0, across="A"),
    "thick5mm-sagittal": thick_axial(5.0, across="R"),
    "head0.8": smaller_head(0.8),
    "head0.7": smaller_head(0.7),
    "gamma0.6": contrast(0.6),
    "gamma1.6": contrast(1.6),
    "bias0.5": bias(0.5),
    "noise5%": rician(0.05),
    "croptop15mm": crop_top(15.0),
    "stack4mm-top6mm": stack_to_vertex(4.0, 6.0),
    "mass-bright": mass("bright"),
    "mass-dark": mass("dark"),
    "mass-ring": mass("ring"),
    "gadolinium": gadolinium(1.4),
    "flip-LR": header_flip("R"),
    "flip-AP": header_flip("A"),
    "flip-SI": header_flip("S"),
    "LPS-as-RAS": header_flip("R", "A"),
    "swap-AP-SI": header_swap("A", "S"),
    **{name: painted(c, thickness_mm=None if name.endswith("-3d") else 4.0,
                     skull_mm=SKULL_MM if name.endswith(("-skull", "-3d")) else None) for name, c in PAINTED.items()},
}


def mass_kept(heads, masks_dir):
    """Per head, the share of the mass of ``mass`` (the same region: the same seed) inside its saved mask."""
    shares = {}
    for i, head in enumerate(heads):
        reference = nib.load(str(head.mask))
        region, _ = mass_region(reference.affine, np.asarray(reference.dataobj) > 0, np.random.default_rng(SEED + i))
        mask = np.asarray(nib.load(str(Path(masks_dir) / f"{head.name}.nii.gz")).dataobj) > 0
        shares[head.name] = float((mask & region).sum() / region.sum())
    return shares


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_and_weights_arguments(p)
    p.add_argument("--splits", nargs="+", default=["val", "wild"])
    p.add_argument("--changes", nargs="+", default=list(CHANGES), choices=list(CHANGES))
    p.add_argument("--json", help="write every number here")
    args = p.parse_args(argv)
    stripper, other = strippers(args)

    def networks(contrast):
        return stripper if contrast in T1W_SUFFIXES else other

    def mask_of_change(name):  # a painted head is stripped as an image of its painted contrast
        return lambda head, data, affine: networks(PAINTED.get(name, head.contrast)).mask(data, affine)

    heads = [h for split in args.splits for h in find_labelled_heads(args.data, split=split)]
    changes = ["none"] + [c for c in args.changes if c != "none"]
    rows, kept = {}, {}
    for name in changes:
        if name.startswith("mass-"):  # the masks are kept (for the share of the mass in them) only here
            with tempfile.TemporaryDirectory() as masks_dir:
                rows[name] = score_heads(heads, mask_of_change(name), change=CHANGES[name], qc=True, seed=SEED,
                                         masks_dir=masks_dir, contrast=PAINTED.get(name))
                kept[name] = mass_kept(heads, masks_dir)
        else:
            rows[name] = score_heads(heads, mask_of_change(name), change=CHANGES[name], qc=True, seed=SEED,
                                     contrast=PAINTED.get(name))
        print(f"{name}: done", file=sys.stderr, flush=True)
    clean = {r["name"]: r["dice"] for r in rows["none"]}
    contrasts = {h.contrast for h in heads} | {PAINTED[c] for c in changes if c in PAINTED}
    thresholds = sorted((c, networks(c).threshold) for c in contrasts)
    print(f"{len(heads)} heads ({', '.join(args.splits)}), threshold "
          f"{', '.join(f'{t} ({c})' for c, t in thresholds)}\n")
    print("| change | median Dice | worst Dice (head) | largest drop from `none` (head) | max HD95 mm | "
          "volume diff min / max | QC-flagged |\n|---|---|---|---|---|---|---|")
    for name in changes:
        s = summary(rows[name])
        drops = [(clean[r["name"]] - r["dice"], r["name"]) for r in rows[name]]
        drop, dropped = max(drops)
        vols = [r["volume_diff_pct"] for r in rows[name]]
        print(f"| {name} | {s['median_dice']:.4f} | {s['worst_dice']:.4f} ({s['worst_head']}) | "
              f"{drop:+.4f} ({dropped}) | {s['max_hd95_mm']:.1f} | {min(vols):+.1f} / {max(vols):+.1f} % | "
              f"{s['flagged']} |")
    if kept:
        print("\n| mass | share kept in the mask: median | worst (head) |\n|---|---|---|")
        for name, shares in kept.items():
            worst = min(shares, key=shares.get)
            print(f"| {name} | {np.median(list(shares.values())):.3f} | {shares[worst]:.3f} ({worst}) |")
    for name in changes:
        for r in rows[name]:
            if r["flags"]:
                print(f"{name} {r['name']}: QC flags {'; '.join(r['flags'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"weights": args.weights or "bundled",
                                               "contrast_weights": args.contrast_weights, "rows": rows,
                                               "mass_kept": kept}, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
