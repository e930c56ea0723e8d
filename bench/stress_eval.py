"""How the model holds up when an unseen head is acquired differently: each held-out head (val and wild by
default; never trained on) is changed the way other scanners and protocols change it, and its silver mask
with it, and the mask of the changed image is scored against the changed silver mask. A script that prints
numbers, not a test.

    python bench/stress_eval.py                          # the bundled weights, val + wild, every change (~40 min)
    python bench/stress_eval.py --changes 3mm gamma0.6 --splits val
    python bench/stress_eval.py --weights work/train/final/unet.weights.h5 --json stress.json

The changes (``CHANGES``): coarser and anisotropic voxels (the image averaged over each new voxel as an
acquisition would, the silver mask resampled linearly and cut at 0.5), contrast curves, a strong smooth bias
field, Rician noise, and a field of view that cuts the top of the head. The row ``none`` is the same heads as
they are; each other row also gives the largest drop of one head's Dice from its ``none`` value.
"""

import argparse
import json
import sys
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
from bids_skullstrip.model.predictor import Skullstripper  # noqa: E402
from bids_skullstrip.training.data import find_labelled_heads  # noqa: E402
from model_eval import summary  # noqa: E402
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


def thick_axial(thickness_mm):
    """In-plane voxels as they are, slices ``thickness_mm`` thick along the axis closest to superior."""
    def change(data, affine, mask, rng):
        vox = voxel_sizes(affine).copy()
        vox[world_axis(affine, "S")[0]] = thickness_mm
        return _regridded(data, affine, mask, vox)
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


CHANGES = {
    "none": lambda data, affine, mask, rng: (data, affine, mask),
    "3mm": regrid((3.0, 3.0, 3.0)),
    "0.94x0.94x1.5mm": regrid((0.94, 0.94, 1.5)),
    "thick5mm": thick_axial(5.0),
    "gamma0.6": contrast(0.6),
    "gamma1.6": contrast(1.6),
    "bias0.5": bias(0.5),
    "noise5%": rician(0.05),
    "croptop15mm": crop_top(15.0),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--weights", help="segmenter weights (their locator and model.json beside them)")
    p.add_argument("--splits", nargs="+", default=["val", "wild"])
    p.add_argument("--changes", nargs="+", default=list(CHANGES), choices=list(CHANGES))
    p.add_argument("--json", help="write every number here")
    args = p.parse_args(argv)
    stripper = Skullstripper(args.weights)
    heads = [h for split in args.splits for h in find_labelled_heads(args.data, split=split)]
    changes = ["none"] + [c for c in args.changes if c != "none"]
    rows = {}
    for name in changes:
        rows[name] = score_heads(heads, lambda head, data, affine: stripper.mask(data, affine), change=CHANGES[name],
                                 qc=True, seed=SEED)
        print(f"{name}: done", file=sys.stderr, flush=True)
    clean = {r["name"]: r["dice"] for r in rows["none"]}
    print(f"{len(heads)} heads ({', '.join(args.splits)}), threshold {stripper.threshold}\n")
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
    for name in changes:
        for r in rows[name]:
            if r["flags"]:
                print(f"{name} {r['name']}: QC flags {'; '.join(r['flags'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"weights": args.weights or "bundled", "rows": rows}, indent=1,
                                              default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
