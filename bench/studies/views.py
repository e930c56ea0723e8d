#!/usr/bin/env python
"""Do two views of the segmenter pay for their second pass? One view (the box as it is) against the shipped two,
on every head of val, wild and contrasts (and train), in one run, the two alternating per head.

    python bench/studies/views.py [--splits val wild contrasts train]

Per split: median and worst Dice against the reference masks (``mask_silver`` of heads/, ``mask_ref`` inside
``fov`` of contrasts/), and the median core seconds (``Skullstripper.mask``) of each; the model card's "Two views"
table quotes it.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bids_skullstrip.metrics import dice  # noqa: E402
from bids_skullstrip.model.predictor import Skullstripper, View  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def heads(splits):
    ids = json.loads((DATA / "splits.json").read_text())
    for split in splits:
        if split == "contrasts":
            for folder in sorted((DATA / "contrasts").iterdir()):
                yield split, folder.name, folder / "image.nii.gz", folder / "mask_ref.nii.gz", folder / "fov.nii.gz"
        else:
            for head in ids[split]:
                folder = DATA / "heads" / head
                yield split, head, folder / "T1w.nii.gz", folder / "mask_silver.nii.gz", None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", nargs="+", default=["val", "wild", "contrasts", "train"])
    opts = p.parse_args(argv)
    two = Skullstripper()
    one = Skullstripper(views=(View(),))
    scores = {}
    for split, name, image, reference, fov in heads(opts.splits):
        img = nib.load(str(image))
        data = np.asarray(img.dataobj, np.float32)
        ref = np.asarray(nib.load(str(reference)).dataobj) > 0
        inside = np.asarray(nib.load(str(fov)).dataobj) > 0 if fov else np.ones(ref.shape, bool)
        row = {}
        for label, stripper in (("one", one), ("two", two)):
            t = time.perf_counter()
            mask = stripper.mask(data, img.affine).mask > 0
            row[label] = (dice(mask & inside, ref & inside), time.perf_counter() - t)
        scores.setdefault(split, []).append(row)
        print(f"{split} {name}: one view {row['one'][0]:.5f} ({row['one'][1]:.2f} s), "
              f"two {row['two'][0]:.5f} ({row['two'][1]:.2f} s)", flush=True)
    print("\n| split | heads | one view: median / worst Dice | two views: median / worst Dice | "
          "heads better with two | core s one / two (median) |")
    print("|---|---|---|---|---|---|")
    for split, rows in scores.items():
        cells = []
        for label in ("one", "two"):
            d = [r[label][0] for r in rows]
            cells.append(f"{statistics.median(d):.5f} / {min(d):.5f}")
        better = sum(r["two"][0] > r["one"][0] for r in rows)
        t1, t2 = (statistics.median(r[k][1] for r in rows) for k in ("one", "two"))
        print(f"| {split} | {len(rows)} | {cells[0]} | {cells[1]} | {better} | {t1:.2f} / {t2:.2f} ({t1 / t2:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
