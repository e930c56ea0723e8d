"""``bids_skullstrip-train``: make the two networks (locator, then segmenter) on labelled heads.

``bids_skullstrip-train DATA OUT`` runs the whole recipe that made the bundled T1w networks
(``training.recipe.RECIPE``; ``--recipe any-contrast`` the any-contrast ones, ``--recipe all`` both sets into
``OUT/weights/`` and ``OUT/weights_any_contrast/``, ``--recipe FILE.json`` another), resumable: rerun the same
command to continue. Any of ``--fine-tune``, ``--init-weights``, ``--steps`` and the
other step options runs that one step instead, ``--average`` one mean."""

import argparse
import logging
import sys
from pathlib import Path

from ..geometry import MODEL_VOXEL_MM
from ..training.augment import COMPOSITE_SIZE
from ..training.data import find_brains, find_labelled_heads


# Options of one step (``train.train`` keyword arguments): given, they replace the recipe by that one step.
STEP_OPTIONS = ("steps", "locator_steps", "seed", "synth_prob", "labels_prob", "thick_prob", "thickness_mm",
                "fine_bias_prob", "mass_prob", "enhance_prob", "composite_prob", "composite_size",
                "frozen_bn_fraction", "peak_lr", "until", "hard_head_fraction", "init_weights", "fine_tune")


def build_parser():
    p = argparse.ArgumentParser(prog="bids_skullstrip-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("data", help="labelled heads: the shared heads/ + splits.json layout, an NFBS-like folder "
                                "(*_T1w + *_brainmask) or a BIDS dataset with desc-brain_mask files")
    p.add_argument("out_dir", help="checkpoints, history.csv, train.log and final/ weights go here; "
                                   "rerunning with the same out_dir resumes")
    p.add_argument("--recipe", metavar="NAME|JSON",
                   help="the steps to run: 't1w' (the bundled T1w networks' recipe, the default), 'any-contrast' "
                        "(the bundled any-contrast networks'), 'all' (both sets, shipped into OUT/weights and "
                        "OUT/weights_any_contrast, the package's folders of those names) or a JSON list of "
                        "training.recipe.Step fields")
    p.add_argument("--val-data", help="held-out labelled heads (default: the 'val' split of DATA if it has one)")
    p.add_argument("--steps", type=int, help="segmenter steps (one step: default 4000)")
    p.add_argument("--locator-steps", type=int,
                   help="locator steps (trained first; it sees whole fields of view at 4 mm; default 2000)")
    p.add_argument("--seed", type=int, help="the data stream's seed (default 20261125)")
    p.add_argument("--patch-size", type=int, nargs=3, default=(80, 96, 80),
                   help="the segmenter's brain-centred box, in its voxels (--voxel-mm)")
    p.add_argument("--voxel-mm", type=float, default=MODEL_VOXEL_MM,
                   help="the segmenter's isotropic voxel size (mm); the inference of the exported weights uses it")
    p.add_argument("--synth-prob", type=float, help="share of patches repainted from intensity quantiles (0.25)")
    p.add_argument("--labels-prob", type=float,
                   help="share of patches painted from the head's tissue label map with random intensities per "
                        "class (any contrast: T2w, FLAIR, PD, post-contrast or none); the rest are real T1w")
    p.add_argument("--thick-prob", type=float, help="share of patches acquired in thick 2D slices (0.3)")
    p.add_argument("--thickness-mm", type=float, nargs=2, metavar=("LO", "HI"),
                   help="their slice thickness (default: 1.25-3 voxels of each network's grid)")
    p.add_argument("--fine-bias-prob", type=float,
                   help="share of patches given a second bias field ~16 mm fine (clinical 2D images; default 0)")
    p.add_argument("--mass-prob", type=float,
                   help="share of patches given a tumour-, cyst- or cavity-like mass inside the brain, labelled "
                        "brain (default 0)")
    p.add_argument("--enhance-prob", type=float,
                   help="share of patches given enhancing dura and sinuses next to the brain (post-contrast T1w), "
                        "labelled not brain (default 0)")
    p.add_argument("--composite-prob", type=float,
                   help="share of patches whose brain is replaced by one of DATA/brains/*.nii.gz (if any)")
    p.add_argument("--composite-size", type=float, nargs=2, metavar=("LO", "HI"),
                   help="a composited brain's size relative to the head's brain (per axis); below 1 it looks "
                        f"atrophic, with a wide CSF space under the skull (default {COMPOSITE_SIZE})")
    p.add_argument("--frozen-bn-fraction", type=float,
                   help="the last part of the schedule trains with BatchNorm statistics frozen; the exported "
                        "weights are the mean of the weights over that part (0.3)")
    p.add_argument("--lr", type=float, dest="peak_lr", help="peak learning rate (1e-3)")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--validate-every", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None, help="TensorFlow intra-op threads")
    p.add_argument("--until", type=int, metavar="STEP",
                   help="stop the segmenter's run at STEP (the LR schedule still spans --steps; rerun to continue)")
    p.add_argument("--init-weights", type=Path, metavar="H5",
                   help="start from these weights (e.g. an export-step<N>/unet.weights.h5, with its "
                        "locator.weights.h5 beside it) instead of at random")
    p.add_argument("--fine-tune", action="store_true",
                   help="start from the bundled weights (use a lower --lr, e.g. 2e-4, and fewer --steps)")
    p.add_argument("--hard-head-fraction", type=float, metavar="F",
                   help="fine-tuning: draw this share of the segmenter's patches from heads in proportion to "
                        "their error (1 - Dice) under the starting weights, the rest uniformly (default 0)")
    p.add_argument("--leave-out", nargs="+", default=(), metavar="SOURCE",
                   help="train without the heads whose id starts with SOURCE (and validate without them): a "
                        "leave-one-source-out run, to be tested on that source")
    p.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="the arithmetic of training (auto: mixed bfloat16 where the CPU has Intel AMX; float32 "
                        "elsewhere, where it is faster, AVX512-BF16 without AMX included); the exported weights are "
                        "float32 either way")
    p.add_argument("--average", nargs="+", type=Path, metavar="H5",
                   help="train nothing: export the weight-space mean of these exports of one lineage (e.g. "
                        "fine-tunes of the bundled weights with other seeds; their locators beside them), its "
                        "threshold calibrated and its validation run like any export's")
    p.add_argument("--shares", nargs="+", type=float, default=None, metavar="W",
                   help="with --average: each export's share of the mean (default: even)")
    p.add_argument("--export-only", action="store_true", default=False,
                   help="export the latest checkpoint of OUT_DIR to OUT_DIR/export-step<N>/ and stop")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:  # every argument judged before anything is made or loaded
        _check(args)
        recipe = _recipe(args)
    except (ValueError, FileNotFoundError) as err:
        return _error(str(err))
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
        return _train(args, out, recipe)
    except KeyboardInterrupt:
        print(f"bids_skullstrip-train: interrupted; rerun the same command to resume from the last checkpoint ({out})",
              file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a quota: the checkpoints written so far stay, a rerun resumes
        name = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return _error(f"{name}{exc.strerror or exc} (in {out}; rerun the same command to resume once it is fixed)")
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()


def _check(args):
    """A ValueError naming the first argument that cannot be right."""
    for folder, option in ((args.data, "data folder"), (getattr(args, "val_data", None), "--val-data")):
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"{option} {folder}: folder not found")
    from ..training.recipe import check_options

    given = {k: v for k, v in vars(args).items() if k in STEP_OPTIONS and k not in ("init_weights", "fine_tune")}
    check_options(given, lambda key: "--lr" if key == "peak_lr" else f"--{key.replace('_', '-')}")
    for name in ("checkpoint_every", "validate_every"):
        if getattr(args, name, 1) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be 1 or more")
    for option, files in (("--init-weights", [getattr(args, "init_weights", None)]),
                          ("--average", getattr(args, "average", None) or [])):
        for path in files:
            check_weights_file(path, option)


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def check_weights_file(path, option):
    """A ValueError where ``path`` (given to ``option``) is there but is no Keras weights file (HDF5): h5py's own
    error names no file ("file signature not found")."""
    if path is not None and Path(path).is_file():
        with open(path, "rb") as fh:
            if fh.read(8) != HDF5_SIGNATURE:
                raise ValueError(f"{option} {path}: not a Keras weights file (*.weights.h5, HDF5)")


def _train(args, out, recipe):
    has_splits = (Path(args.data) / "splits.json").exists()
    train_heads = find_labelled_heads(args.data, split="train" if has_splits else None)
    if getattr(args, "val_data", None):
        val_heads = find_labelled_heads(args.val_data)
    else:
        val_heads = find_labelled_heads(args.data, split="val") if has_splits else []
    if args.leave_out:
        left_out = tuple(args.leave_out)
        kept = [h for h in train_heads if not h.name.startswith(left_out)]
        if len(kept) == len(train_heads):
            return _error(f"--leave-out {' '.join(left_out)}: no training head of {args.data} has an id starting so")
        train_heads = kept
        val_heads = [h for h in val_heads if not h.name.startswith(left_out)]
    if not train_heads:
        return _error(f"no image/mask pairs found in {args.data}")
    from ..training import recipe as recipes

    try:
        shipped = recipes.run_recipe(recipe, train_heads, val_heads, out, brains=find_brains(args.data),
                                   patch_size=tuple(args.patch_size), voxel_mm=args.voxel_mm,
                                   checkpoint_every=args.checkpoint_every, validate_every=args.validate_every,
                                   threads=args.threads, export_only=args.export_only,
                                   left_out=tuple(args.leave_out), precision=args.precision)
    except (ValueError, FileNotFoundError) as err:  # a bad recipe, or exports that cannot be averaged
        return _error(str(err))
    stopped = "--export-only" if getattr(args, "export_only", False) else "--until"
    for folder in shipped:
        print(f"weights written to {folder}")
    if not shipped:
        print(f"stopped before the end ({stopped}); rerun without {stopped} to continue ({out})")
    return 0


def _recipe(args):
    """The steps to run: ``--average`` or the step options make one step; else ``--recipe`` or the bundled one."""
    from ..training.recipe import BUNDLED, RECIPE, RECIPES, Step, load_recipe

    if getattr(args, "average", None):
        missing = [str(e) for e in args.average if not e.is_file()]
        if missing:
            raise ValueError(f"--average {missing[0]}: no such weights file")
        return (Step("mean", average=tuple(map(str, args.average)),
                     shares=None if args.shares is None else tuple(args.shares)),)
    given = {k: v for k, v in vars(args).items() if k in STEP_OPTIONS}
    if given and getattr(args, "recipe", None) is not None:
        raise ValueError(f"--recipe {args.recipe} and {', '.join('--' + k.replace('_', '-') for k in given)}: a recipe "
                         "gives its steps' options itself; give one or the other")
    if not given:
        recipe = getattr(args, "recipe", None)
        if recipe is not None and recipe not in RECIPES and not Path(recipe).is_file():
            raise ValueError(f"--recipe {recipe}: neither {' nor '.join(RECIPES)} nor a JSON file")
        return RECIPE if recipe is None else RECIPES.get(recipe) or load_recipe(recipe)
    init = BUNDLED if given.pop("fine_tune", False) else given.pop("init_weights", None)
    if given.get("hard_head_fraction") and not init:
        raise ValueError("--hard-head-fraction needs starting weights (--fine-tune or --init-weights): the heads "
                         "are weighted by those weights' errors")
    for key in ("composite_size", "thickness_mm"):
        if key in given:
            given[key] = tuple(given[key])
    return (Step("fine-tune" if init else "scratch", init=None if init is None else str(init), options=given),)


def _error(message):
    print(f"bids_skullstrip-train: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
