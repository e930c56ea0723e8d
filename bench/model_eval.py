"""The model card's evaluation: every split of ../shared/data, per source, worst case first, with QC flags and
the stability checks of a rotated and a reoriented copy. A script that prints numbers, not a test.

    python bench/model_eval.py                                  # the bundled weights, ~6 min on 2 cores
    python bench/model_eval.py --weights work/train/final/unet.weights.h5 --json eval.json
    python bench/model_eval.py --splits contrasts --contrast-weights work/rc/final  # candidate any-contrast nets
    python bench/model_eval.py --splits val wild --stability-heads   # fewer splits, no stability copies
    python bench/model_eval.py --splits contrasts --stability-heads  # FLAIR/T2w/2D T1w, scored inside fov
    python bench/model_eval.py --masks work/masks/HEAD            # also save every mask (bit-for-bit diffs)
    python bench/model_eval.py --views 0                         # other segmenter views: one pass, the box as it is
    python bench/model_eval.py --views 0 0m 1 1m                 # ... four: shifts in mm, "m" mirrored left-right
    python bench/model_eval.py --splits contrasts --peer /work/peer-venv/bin/deepbet-cli  # deepbet beside ours

The "before" tables of docs/model_card.md come from this script run in a worktree of the earlier revision.
Each head is stripped as the app strips it: T1w heads by the bundled T1w networks, other contrasts by the bundled
any-contrast ones (``ModelCard.bundled_for``); ``--weights`` replaces both, ``--contrast-weights`` the second.

Per head: Dice, HD95 and volume difference against the silver mask, and the QC flags of the mask
(``qc.flag_image``). The ``contrasts`` split (real 2D FLAIR, T2w and T1w; validation only) is scored inside each
image's ``fov.nii.gz`` and summarised per contrast. Stability: a wide-field head (``--stability-heads``) with its affine rotated 12 degrees
about the left-right axis, and the same head reoriented to LPI in its voxels; Dice of each copy's mask to
the original's, voxel for voxel (for the rotated copy the data and the grid are unchanged, only the world
moved; for LPI the mask is reoriented back).

``--peer``: deepbet-cli (bench/README.md installs it in a venv of its own) run on every head of the same splits,
its masks scored by the same scorer, and the medians and worst cases printed beside ours.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bids_skullstrip.metrics import dice, score_heads  # noqa: E402
from bids_skullstrip.model.card import T1W_SUFFIXES, ModelCard  # noqa: E402
from bids_skullstrip.model.predictor import Skullstripper, View  # noqa: E402
from bids_skullstrip.training.data import find_labelled_heads  # noqa: E402

SPLITS = ("train", "val", "wild", "contrasts")


def parse_view(text):
    """``1m`` -> View(shift_mm=1.0, mirror=True)."""
    mirror = text.endswith("m")
    return View(shift_mm=float(text[:-1] if mirror else text), mirror=mirror)


def _rotated(affine, degrees):
    a = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[1:3, 1:3] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return rot @ affine


def stability(head, stripper):
    img = nib.load(str(head.image))
    data = np.asarray(img.dataobj, dtype=np.float32)
    original = stripper.mask(data, img.affine).mask
    rotated = stripper.mask(data, _rotated(img.affine, 12.0)).mask
    orientation = nib.orientations
    native, lpi_codes = orientation.io_orientation(img.affine), orientation.axcodes2ornt("LPI")
    lpi = img.as_reoriented(orientation.ornt_transform(native, lpi_codes))
    lpi_mask = stripper.mask(np.asarray(lpi.dataobj, dtype=np.float32), lpi.affine).mask
    back = orientation.apply_orientation(lpi_mask, orientation.ornt_transform(lpi_codes, native))
    return {"name": head.name, "rotated_12deg_dice": float(dice(rotated, original)),
            "lpi_dice": float(dice(back, original))}


def summary(rows):
    d = np.array([r["dice"] for r in rows])
    worst = rows[int(np.argmin(d))]
    return {"n": len(rows), "median_dice": float(np.median(d)), "worst_dice": float(d.min()),
            "worst_head": worst["name"], "max_hd95_mm": float(max(r["hd95_mm"] for r in rows)),
            "max_volume_diff_pct": float(max(r["volume_diff_pct"] for r in rows)),
            "flagged": sum(bool(r.get("flags")) for r in rows)}


def per_contrast(rows):
    """{contrast: summary}, worst median first; the volume ratio is the mask's volume over the reference's
    (inside the field of view where there is one)."""
    table = {}
    for contrast in sorted({r["contrast"] for r in rows}):
        subset = [r for r in rows if r["contrast"] == contrast]
        table[contrast] = dict(summary(subset), max_volume_ratio=1.0 + max(r["volume_diff_pct"] for r in subset) / 100)
    return dict(sorted(table.items(), key=lambda item: item[1]["median_dice"]))


def peer_masks(cli, folder):
    """``score_heads``'s ``mask_of`` for deepbet-cli: one process per head (as a user runs it), CPU only."""
    def mask_of(head, data, affine):
        mask = Path(folder) / f"{head.name}_mask.nii.gz"
        brain = mask.with_name(f"{head.name}_brain.nii.gz")
        subprocess.run([str(cli), "-i", str(head.image), "-m", str(mask), "-o", str(brain), "--no_gpu"], check=True,
                       capture_output=True)
        return SimpleNamespace(mask=np.asarray(nib.load(str(mask)).dataobj) > 0)
    return mask_of


def print_beside_peer(results):
    print(f"\n## beside {results['peer']['command']} (median / worst Dice, worst image)")
    print("| split or contrast | n | ours | peer |\n|---|---|---|---|")
    ours, peer = results["splits"], results["peer"]["splits"]
    groups = [(split, summary(ours[split]), summary(peer[split])) for split in ours]
    if "contrasts" in ours:
        theirs = per_contrast(peer["contrasts"])
        groups += [(f"contrasts {c}", s, theirs[c]) for c, s in per_contrast(ours["contrasts"]).items()]
    for label, a, b in groups:
        print(f"| {label} | {a['n']} | {a['median_dice']:.4f} / {a['worst_dice']:.4f} ({a['worst_head']}) | "
              f"{b['median_dice']:.4f} / {b['worst_dice']:.4f} ({b['worst_head']}) |")


def print_report(results):
    for split, rows in results["splits"].items():
        print(f"\n## {split}: worst first")
        print("| head | Dice | HD95 mm | vol diff % | QC flags |\n|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: r["dice"]):
            print(f"| {r['name']} | {r['dice']:.4f} | {r['hd95_mm']:.2f} | {r['volume_diff_pct']:+.1f} | "
                  f"{'; '.join(r['flags']) or '-'} |")
        s = summary(rows)
        print(f"\n{split}: n {s['n']}, median {s['median_dice']:.4f}, worst {s['worst_dice']:.4f} "
              f"({s['worst_head']}), max HD95 {s['max_hd95_mm']:.2f} mm, max vol diff "
              f"{s['max_volume_diff_pct']:+.1f} %, flagged {s['flagged']}")
    print("\n## per source (median / worst Dice)")
    print("| source | split | n | median | worst |\n|---|---|---|---|---|")
    for split, rows in results["splits"].items():
        for source in sorted({r["source"] for r in rows}):
            d = [r["dice"] for r in rows if r["source"] == source]
            print(f"| {source} | {split} | {len(d)} | {np.median(d):.4f} | {min(d):.4f} |")
    if "contrasts" in results["splits"]:
        print("\n## contrasts, per contrast (worst median first)")
        print("| contrast | n | median Dice | worst Dice (image) | max volume ratio |\n|---|---|---|---|---|")
        for contrast, s in per_contrast(results["splits"]["contrasts"]).items():
            print(f"| {contrast} | {s['n']} | {s['median_dice']:.4f} | {s['worst_dice']:.4f} ({s['worst_head']}) | "
                  f"{s['max_volume_ratio']:.3f} |")
    if results.get("stability"):
        print("\n## stability (Dice to the original's mask)")
        for r in results["stability"]:
            print(f"{r['name']}: rotated 12 deg {r['rotated_12deg_dice']:.4f}, LPI copy {r['lpi_dice']:.4f}")


def add_data_and_weights_arguments(p):
    """``--data``, ``--weights`` and ``--contrast-weights``, as every model script takes them."""
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--weights", help="segmenter weights (their locator and model.json beside them) for every head")
    p.add_argument("--contrast-weights", help="the same for the heads whose contrast is not T1w (default: the "
                                              "bundled any-contrast networks)")


def strippers(args, **options):
    """(the T1w images' ``Skullstripper``, the other contrasts') as the app routes them, or ``--weights`` for both."""
    return (Skullstripper(args.weights or ModelCard.bundled_for("T1w"), **options),
            Skullstripper(args.weights or args.contrast_weights or ModelCard.bundled_for("FLAIR"), **options))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_and_weights_arguments(p)
    p.add_argument("--splits", nargs="+", default=list(SPLITS))
    p.add_argument("--stability-heads", nargs="*", default=["nichart-trio-mprage", "xa30-tfl-2mm"])
    p.add_argument("--json", help="write every number here")
    p.add_argument("--masks", metavar="DIR", help="save every mask here as <head>.nii.gz (to compare revisions "
                                                   "voxel for voxel)")
    p.add_argument("--peer", type=Path, metavar="DEEPBET_CLI",
                   help="also score deepbet-cli's masks of the same heads (its own venv) and print them beside ours")
    p.add_argument("--views", nargs="+", type=parse_view, metavar="SHIFT_MM[m]",
                   help="the segmenter's views instead of the predictor's (0 1m): the lattice shift in mm, 'm' for "
                        "mirrored left-right")
    args = p.parse_args(argv)
    if args.masks:
        Path(args.masks).mkdir(parents=True, exist_ok=True)
    options = {"views": args.views} if args.views else {}
    stripper, other = strippers(args, **options)

    def mask_of(head, data, affine):
        return (stripper if head.contrast in T1W_SUFFIXES else other).mask(data, affine)

    results = {"weights": args.weights or "bundled", "contrast_weights": args.contrast_weights,
               "threshold": stripper.threshold, "contrast_threshold": other.threshold,
               "model_sha256": {"T1w": stripper.card.sha256, "other": other.card.sha256},
               "views": [vars(v) for v in stripper.views], "splits": {}}
    for split in args.splits:
        results["splits"][split] = score_heads(find_labelled_heads(args.data, split=split), mask_of, qc=True,
                                               masks_dir=args.masks)
    heads = {h.name: h for h in find_labelled_heads(args.data)}
    results["stability"] = [stability(heads[n], stripper) for n in args.stability_heads]
    results["summary"] = {split: summary(rows) for split, rows in results["splits"].items()}
    if "contrasts" in results["splits"]:
        results["summary"]["per_contrast"] = per_contrast(results["splits"]["contrasts"])
    if args.peer:
        with tempfile.TemporaryDirectory() as folder:
            results["peer"] = {"command": args.peer.name, "splits": {
                split: score_heads(find_labelled_heads(args.data, split=split), peer_masks(args.peer, folder))
                for split in args.splits}}
    print_report(results)
    if args.peer:
        print_beside_peer(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
