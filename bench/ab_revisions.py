"""Before/after: the core skull-strip and the single-file CLI of two git revisions, side by side in one run.

    python bench/ab_revisions.py BEFORE [AFTER] [--heads ID ...] [--repeats N]

Each revision is checked out into a temporary git worktree and run with ``PYTHONPATH`` pointing at it, in
this venv (same TensorFlow, numpy, scipy). Measurements alternate between the two revisions so that
machine load hits both alike. Printed: per head, the warm core time (``Skullstripper.mask``, best of N in
one process per revision) and the ``skullstrip -i HEAD -m MASK`` process wall time (median of N), with
the after/before ratios. With ``--participants N``, also the BIDS app's participant level on a dataset of N heads
(``--n-cpus 2``, N4, QC and reports included; fresh output and work folders each time), median of N runs.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_benchmark import DATASET_HEADS, build_bids

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_HEADS = ["ds000011-sub-13", "ds000011-sub-14", "fstrain-09", "colin27"]

CORE_PROBE = r"""
import json, sys, time
import nibabel as nib, numpy as np
try:
    from bids_skullstrip.model.predictor import Skullstripper
    skullstrip_array = Skullstripper().mask
except ImportError:  # revisions before the predictor object
    from bids_skullstrip.skullstrip import skullstrip_array
from bids_skullstrip.model.inference import load_model
load_model()
out = {}
for path in sys.argv[2:]:
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    skullstrip_array(data, img.affine)  # first call: tracing and kernel set-up, not counted
    times = []
    for _ in range(int(sys.argv[1])):
        t = time.perf_counter()
        skullstrip_array(data, img.affine)
        times.append(time.perf_counter() - t)
    out[path] = min(times)
print(json.dumps(out))
"""


def run_core(tree, heads, repeats):
    env = dict(os.environ, PYTHONPATH=str(tree), TF_CPP_MIN_LOG_LEVEL="3")
    res = subprocess.run([sys.executable, "-c", CORE_PROBE, str(repeats), *heads], env=env, cwd=tree,
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_cli(tree, head, out):
    env = dict(os.environ, PYTHONPATH=str(tree), TF_CPP_MIN_LOG_LEVEL="3")
    t = time.perf_counter()
    cli = "single_file" if (Path(tree) / "bids_skullstrip" / "cli" / "single_file.py").exists() else "skullstrip"
    subprocess.run([sys.executable, "-m", f"bids_skullstrip.cli.{cli}", "-i", head, "-m", str(out)],
                   env=env, cwd=tree, capture_output=True, check=True)
    return time.perf_counter() - t


def run_participants(tree, bids, out):
    env = dict(os.environ, PYTHONPATH=str(tree), TF_CPP_MIN_LOG_LEVEL="3")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bids_skullstrip.cli.run", str(bids), str(out / "out"), "participant",
                    "--n-cpus", "2", "--skip-bids-validation", "-w", str(out / "work")],
                   env=env, cwd=tree, capture_output=True, check=True)
    return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after", nargs="?", default="HEAD")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--heads", nargs="+", default=DEFAULT_HEADS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--participants", type=int, default=0, help="also the participant level on this many heads")
    args = p.parse_args(argv)
    heads = [str(args.data / "heads" / h / "T1w.nii.gz") for h in args.heads]
    with tempfile.TemporaryDirectory(prefix="ab_revisions_") as tmp:
        trees = {}
        for label, rev in (("before", args.before), ("after", args.after)):
            trees[label] = Path(tmp) / label
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(trees[label]), rev],
                           check=True, capture_output=True)
        try:
            core = {label: {} for label in trees}
            cli = {label: [] for label in trees}
            app = {label: [] for label in trees}
            if args.participants:
                bids = build_bids(Path(tmp) / "bids", [args.data / "heads" / h / "T1w.nii.gz" for h in DATASET_HEADS],
                                  args.participants)
            for i in range(args.repeats):
                for label, tree in trees.items():
                    cli[label].append(run_cli(tree, heads[0], Path(tmp) / f"{label}_{i}.nii.gz"))
                    if args.participants:
                        app[label].append(run_participants(tree, bids, Path(tmp) / f"{label}_app_{i}"))
                        shutil.rmtree(Path(tmp) / f"{label}_app_{i}")
            for label, tree in trees.items():
                core[label] = run_core(tree, heads, args.repeats)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    print(f"before = {args.before}, after = {args.after}; load average {os.getloadavg()[0]:.2f}\n")
    print("| measure | before (s) | after (s) | after / before |\n|---|---|---|---|")
    for name, path in zip(args.heads, heads):
        b, a = core["before"][path], core["after"][path]
        print(f"| core, {name} (warm, best of {args.repeats}) | {b:.2f} | {a:.2f} | {a / b:.2f} |")
    b, a = statistics.median(core["before"].values()), statistics.median(core["after"].values())
    print(f"| core, median over the heads | {b:.2f} | {a:.2f} | {a / b:.2f} |")
    b, a = statistics.median(cli["before"]), statistics.median(cli["after"])
    print(f"| `skullstrip` CLI wall, {args.heads[0]} (median of {args.repeats}) | {b:.2f} | {a:.2f} | {a / b:.2f} |")
    if args.participants:
        b, a = statistics.median(app["before"]), statistics.median(app["after"])
        print(f"| participant level, {args.participants} heads, --n-cpus 2 (median of {args.repeats}) | {b:.2f} | "
              f"{a:.2f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
