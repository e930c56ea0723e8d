"""``bids_skullstrip-train``: train the two networks (locator, then segmenter) from scratch or fine-tune them on
labelled heads."""

import argparse
import logging
import sys
from pathlib import Path

from ..geometry import MODEL_VOXEL_MM
from ..training.augment import COMPOSITE_SIZE
from ..training.data import find_brains, find_labelled_heads


def build_parser():
    p = argparse.ArgumentParser(prog="bids_skullstrip-train", description=__doc__)
    p.add_argument("data", help="labelled heads: the shared heads/ + splits.json layout, an NFBS-like folder "
                                "(*_T1w + *_brainmask) or a BIDS dataset with desc-brain_mask files")
    p.add_argument("out_dir", help="checkpoints, history.csv, train.log and final/ weights go here; "
                                   "rerunning with the same out_dir resumes")
    p.add_argument("--val-data", help="held-out labelled heads (default: the 'val' split of DATA if it has one)")
    p.add_argument("--steps", type=int, default=4000, help="segmenter steps")
    p.add_argument("--locator-steps", type=int, default=2000,
                   help="locator steps (trained first; it sees whole fields of view at 4 mm)")
    p.add_argument("--seed", type=int, default=20261125)
    p.add_argument("--patch-size", type=int, nargs=3, default=(80, 96, 80),
                   help="the segmenter's brain-centred box, in its voxels (--voxel-mm)")
    p.add_argument("--voxel-mm", type=float, default=MODEL_VOXEL_MM,
                   help="the segmenter's isotropic voxel size (mm); the inference of the exported weights uses it")
    p.add_argument("--synth-prob", type=float, default=0.25)
    p.add_argument("--composite-prob", type=float, default=0.2,
                   help="share of patches whose brain is replaced by one of DATA/brains/*.nii.gz (if any)")
    p.add_argument("--composite-size", type=float, nargs=2, default=COMPOSITE_SIZE, metavar=("LO", "HI"),
                   help="a composited brain's size relative to the head's brain (per axis); below 1 it looks "
                        "atrophic, with a wide CSF space under the skull")
    p.add_argument("--frozen-bn-fraction", type=float, default=0.3,
                   help="the last part of the schedule trains with BatchNorm statistics frozen; the exported "
                        "weights are the mean of the weights over that part")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--refine-steps", type=int,
                   help="steps of the segmenter's second, lower-rate cycle, run after its first (default: 2500 "
                        "when training from scratch, 0 when fine-tuning, which is itself a second cycle)")
    p.add_argument("--refine-lr", type=float, default=3e-4, help="peak learning rate of the second cycle")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--validate-every", type=int, default=1000)
    p.add_argument("--until", type=int, metavar="STEP",
                   help="stop the segmenter's run at STEP (the LR schedule still spans --steps; rerun to continue)")
    p.add_argument("--init-weights", type=Path, metavar="H5",
                   help="start from these weights (e.g. an export-step<N>/unet.weights.h5, with its "
                        "locator.weights.h5 beside it) instead of at random")
    p.add_argument("--fine-tune", action="store_true",
                   help="start from the bundled weights (use a lower --lr, e.g. 2e-4, and fewer --steps)")
    p.add_argument("--hard-head-fraction", type=float, default=0.0, metavar="F",
                   help="fine-tuning: draw this share of the segmenter's patches from heads in proportion to "
                        "their error (1 - Dice) under the starting weights, the rest uniformly (default 0)")
    p.add_argument("--leave-out", nargs="+", default=[], metavar="SOURCE",
                   help="train without the heads whose id starts with SOURCE (and validate without them): a "
                        "leave-one-source-out run, to be tested on that source")
    p.add_argument("--threads", type=int, help="TensorFlow intra-op threads")
    p.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="the arithmetic of training (auto: mixed bfloat16 where the CPU has it in hardware, "
                        "Intel AMX or AVX512-BF16; float32 elsewhere); the exported weights are float32 either way")
    p.add_argument("--average", nargs="+", type=Path, metavar="H5",
                   help="train nothing: export the weight-space mean of these exports of one lineage (e.g. "
                        "fine-tunes of the bundled weights with other seeds; their locators beside them), its "
                        "threshold calibrated and its validation run like any export's")
    p.add_argument("--shares", nargs="+", type=float, metavar="W",
                   help="with --average: each export's share of the mean (default: even)")
    p.add_argument("--export-only", action="store_true",
                   help="export the latest checkpoint of OUT_DIR to OUT_DIR/export-step<N>/ and stop")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(), logging.FileHandler(out / "train.log")]
    log = logging.getLogger("bids_skullstrip")
    log.setLevel(logging.INFO)
    log.propagate = False  # TensorFlow gives the root logger a handler of its own
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    try:
        return _train(args, out)
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()


def _train(args, out):
    has_splits = (Path(args.data) / "splits.json").exists()
    train_heads = find_labelled_heads(args.data, split="train" if has_splits else None)
    if args.val_data:
        val_heads = find_labelled_heads(args.val_data)
    else:
        val_heads = find_labelled_heads(args.data, split="val") if has_splits else []
    if args.leave_out:
        left_out = tuple(args.leave_out)
        kept = [h for h in train_heads if not h.name.startswith(left_out)]
        if len(kept) == len(train_heads):
            print(f"bids_skullstrip-train: error: --leave-out {' '.join(left_out)}: no training head of "
                  f"{args.data} has an id starting so", file=sys.stderr)
            return 2
        train_heads = kept
        val_heads = [h for h in val_heads if not h.name.startswith(left_out)]
    if not train_heads:
        print(f"bids_skullstrip-train: error: no image/mask pairs found in {args.data}", file=sys.stderr)
        return 2
    if args.average:
        return _average(args, train_heads, val_heads, out)
    init = args.init_weights
    if args.fine_tune:
        from ..model.inference import WEIGHTS_FILE
        init = WEIGHTS_FILE
    if args.hard_head_fraction and not init:
        print("bids_skullstrip-train: error: --hard-head-fraction needs starting weights (--fine-tune or "
              "--init-weights): the heads are weighted by those weights' errors", file=sys.stderr)
        return 2
    refine_steps = args.refine_steps if args.refine_steps is not None else (0 if init else 2500)
    from ..training.train import train

    final = train(train_heads, val_heads, out, brains=find_brains(args.data), steps=args.steps,
                  locator_steps=args.locator_steps, refine_steps=refine_steps, refine_lr=args.refine_lr,
                  seed=args.seed, patch_size=tuple(args.patch_size), voxel_mm=args.voxel_mm,
                  synth_prob=args.synth_prob,
                  composite_prob=args.composite_prob, composite_size=args.composite_size,
                  frozen_bn_fraction=args.frozen_bn_fraction, peak_lr=args.lr,
                  checkpoint_every=args.checkpoint_every, validate_every=args.validate_every,
                  init_weights=init, threads=args.threads, export_only=args.export_only,
                  until=args.until, left_out=args.leave_out, precision=args.precision,
                  hard_head_fraction=args.hard_head_fraction)
    print(f"weights written to {final}")
    return 0


def _average(args, train_heads, val_heads, out):
    from ..training.train import average_exports

    for export in args.average:
        if not export.is_file():
            print(f"bids_skullstrip-train: error: --average {export}: no such weights file", file=sys.stderr)
            return 2
    try:
        final = average_exports(args.average, train_heads, val_heads, out, shares=args.shares)
    except (ValueError, FileNotFoundError) as err:
        print(f"bids_skullstrip-train: error: --average: {err}", file=sys.stderr)
        return 2
    print(f"weights written to {final.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
