"""How long one training patch takes to make, for one or two git revisions side by side in one run.

    python bench/training_patches.py [BEFORE] [--patches N] [--rounds R]

The patch stream runs in a thread beside TensorFlow on the same two cores, so every second it spends is taken
from the training step. Each revision runs in its own process, in a temporary git worktree of it (the working
tree when no revision is given), rounds alternating between them so that machine load hits
both alike. The same seeded patches of four training heads with the composited brains, segmenter (2 mm,
80 x 96 x 80) and locator (4 mm, 64³) stage. Printed: the median seconds per patch of each, and the ratio.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

PROBE = r"""
import json, sys, time
import numpy as np
from bids_skullstrip.training.augment import training_patch
from bids_skullstrip.training.data import TrainingHead, find_brains, find_labelled_heads
data, n = sys.argv[1], int(sys.argv[2])
out = {}
for stage, voxel, size in (("segmenter", 2.0, (80, 96, 80)), ("locator", 4.0, (64, 64, 64))):
    heads = [TrainingHead.load(h, voxel) for h in find_labelled_heads(data, split="train")[::6]]
    brains = [TrainingHead.load_brain(b, voxel) for b in find_brains(data)[:4]]
    times = []
    for i in range(n):
        t = time.perf_counter()
        training_patch(heads[i % len(heads)], np.random.default_rng([7, i]), size=size, stage=stage,
                       voxel_mm=voxel, brains=brains)
        times.append(time.perf_counter() - t)
    out[stage] = times
print(json.dumps(out))
print(__import__("bids_skullstrip").__file__, file=sys.stderr)
"""


def _measure(tree, patches):
    # cwd: ``python -c`` puts it first on sys.path, before the editable install's finder (PYTHONPATH is not)
    run = subprocess.run([sys.executable, "-c", PROBE, str(DATA), str(patches)], cwd=tree, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    imported = run.stderr.strip().splitlines()[-1]
    if not imported.startswith(str(tree)):
        raise SystemExit(f"{tree}: the probe imported {imported}, not this tree's code")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", nargs="?", help="a git revision to compare the working tree with")
    p.add_argument("--patches", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"working tree": REPO}
        if args.before:
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", f"{tmp}/before", args.before],
                           check=True, capture_output=True)
            trees = {args.before: Path(tmp, "before"), **trees}
        try:
            times = {name: {"segmenter": [], "locator": []} for name in trees}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    for stage, t in _measure(tree, args.patches).items():
                        times[name][stage] += t
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", f"{tmp}/before"],
                               check=True, capture_output=True)
    medians = {name: {stage: statistics.median(t) for stage, t in stages.items()} for name, stages in times.items()}
    for stage in ("segmenter", "locator"):
        row = ", ".join(f"{name} {m[stage]:.3f} s" for name, m in medians.items())
        ratio = ""
        if args.before:
            ratio = f" (ratio {medians['working tree'][stage] / medians[args.before][stage]:.2f}x)"
        print(f"{stage} patch, median of {args.patches * args.rounds}: {row}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
