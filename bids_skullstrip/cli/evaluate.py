"""``bids_skullstrip-eval``: Dice, IoU, HD95 and volume difference against reference masks.

Either runs the bundled (or given) model on every labelled head, or scores masks that already exist
(``--predictions``: a bids_skullstrip output folder or a folder of ``<name>.nii.gz`` masks).
"""

import argparse
import csv
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from ..nifti import InputError
from ..postproc import check_threshold
from ..metrics import score_heads
from ..training.data import check_pair, find_labelled_heads

COLUMNS = ["name", "dice", "iou", "hd95_mm", "volume_ml", "reference_volume_ml", "volume_diff_pct", "seconds"]


def build_parser():
    p = argparse.ArgumentParser(prog="bids_skullstrip-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="labelled heads (shared heads/ layout, NFBS-like folder or BIDS dataset)")
    p.add_argument("--split", help="only this split of a heads/ + splits.json layout (e.g. val; contrasts: the "
                                   "FLAIR/T2w/T1w images, scored inside their field of view)")
    p.add_argument("--predictions", help="score existing masks from this folder instead of running the model")
    p.add_argument("--weights", help="model weights for every head (default: the bundled ones of each head's contrast)")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability threshold (default: the one in the model.json beside the weights)")
    p.add_argument("--csv", help="write the per-image table here")
    return p


def _find_prediction(folder, name):
    for pattern in (f"{name}_desc-brain_mask.nii*", f"{name}.nii*", f"{name}/*mask*.nii*"):
        hits = sorted(Path(folder).rglob(pattern))
        if hits:
            return hits[0]
    raise InputError(f"{folder}: no predicted mask for {name}")


def evaluate(heads, *, predictions=None, weights=None, threshold=None):
    if predictions is not None:
        return score_heads(heads, lambda head, data, affine: _Saved(_find_prediction(predictions, head.name)))
    from ..model.card import ModelCard
    from ..model.predictor import Skullstripper

    strippers = {}  # by contrast: ``weights`` for every head, else the bundled networks of the head's contrast

    def mask_of(head, data, affine):
        if head.contrast not in strippers:
            strippers[head.contrast] = Skullstripper(weights or ModelCard.bundled_for(head.contrast),
                                                     threshold=threshold)
        return strippers[head.contrast].mask(data, affine)
    return score_heads(heads, mask_of)


class _Saved:
    """A mask that exists already, as ``score_heads`` takes a result."""

    def __init__(self, path):
        self.mask = np.asarray(nib.load(str(path)).dataobj) > 0


def format_table(rows):
    lines = [f"{'name':<24} {'Dice':>7} {'IoU':>7} {'HD95 mm':>8} {'vol ml':>8} {'ref ml':>8} {'dVol %':>7}"]
    for r in rows:
        lines.append(f"{r['name']:<24} {r['dice']:7.4f} {r['iou']:7.4f} {r['hd95_mm']:8.2f} "
                     f"{r['volume_ml']:8.1f} {r['reference_volume_ml']:8.1f} {r['volume_diff_pct']:7.2f}")
    dice = np.array([r["dice"] for r in rows])
    hd = np.array([r["hd95_mm"] for r in rows])
    lines.append(f"{'median':<24} {np.median(dice):7.4f} {'':>7} {np.median(hd):8.2f}")
    lines.append(f"{'worst':<24} {dice.min():7.4f} {'':>7} {hd.max():8.2f}")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_threshold(args.threshold)
        if args.weights and Path(args.weights).is_file() and str(args.weights).endswith(".h5"):
            from .train import check_weights_file

            check_weights_file(args.weights, "--weights")
        if not Path(args.data).is_dir():
            raise InputError(f"{args.data}: data folder not found")
        heads = find_labelled_heads(args.data, split=args.split)
        if not heads:
            raise InputError(f"{args.data}: no image/mask pairs found")
        for head in heads:  # a reference that is no brain mask of its image scores nothing (Dice 0.46, exit 0)
            check_pair(head)
        if args.csv and not Path(args.csv).resolve().parent.is_dir():
            raise InputError(f"--csv {args.csv}: folder not found")
        if args.predictions and not Path(args.predictions).is_dir():
            raise InputError(f"--predictions {args.predictions}: folder not found")
        rows = evaluate(heads, predictions=args.predictions, weights=args.weights, threshold=args.threshold)
    except (InputError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"bids_skullstrip-eval: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
