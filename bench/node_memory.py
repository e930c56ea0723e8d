#!/usr/bin/env python
"""Peak memory of every node of the participant workflow, for images of four sizes, beside what the node
declares to MultiProc (``workflows.base.node_memory_gb``).

    python bench/node_memory.py [--sizes 2mm 1mm 0.7mm clinical] [--keep DIR]

Each size runs the real workflow on one image, in its own nipype run with one MultiProc worker (so the worker
first loads TensorFlow and the model, and every later node of the image runs in a process that holds them, as
in a real run), with nipype's resource monitor sampling every 0.1 s. The images: the sample dataset's 2 mm
(2x2x3 mm) and 1 mm heads, and the 1 mm head resampled (scipy.ndimage.zoom, cubic) to 0.7 mm and to a
512x512x200 clinical grid. Everything is written to a temporary folder.
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLE = REPO / "data" / "sample_bids"
HEAD_2MM = SAMPLE / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
HEAD_1MM = SAMPLE / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz"
NODES = ("skullstrip", "n4", "qc", "mosaic", "ds")


def resampled(src, shape, path):
    from scipy.ndimage import zoom

    img = nib.load(src)
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    factors = [n / s for n, s in zip(shape, data.shape)]
    out = zoom(data, factors, order=3, prefilter=False).clip(0).astype(np.int16)
    affine = img.affine @ np.diag([1 / f for f in factors] + [1.0])
    nib.save(nib.Nifti1Image(out, affine), path)
    return path


def make_image(size, folder):
    label = size.replace(".", "p")
    path = folder / "bids" / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
    path.parent.mkdir(parents=True)
    if size == "2mm":
        shutil.copyfile(HEAD_2MM, path)
    elif size == "1mm":
        shutil.copyfile(HEAD_1MM, path)
    elif size == "0.7mm":
        resampled(HEAD_1MM, [round(n / 0.7) for n in nib.load(HEAD_1MM).shape], path)
    elif size == "clinical":
        resampled(HEAD_1MM, (512, 512, 200), path)
    (folder / "bids" / "dataset_description.json").write_text('{"Name": "memory", "BIDSVersion": "1.10.0"}')
    return label, path


def measure(size, folder):
    from nipype import config as nconfig
    from nipype.utils.filemanip import loadpkl

    from bids_skullstrip import execution
    from bids_skullstrip.discovery import collect_images
    from bids_skullstrip.multiproc import ImageFirstMultiProcPlugin
    from bids_skullstrip.workflows.base import _voxels, init_bids_skullstrip_wf, node_memory_gb

    label, path = make_image(size, folder)
    work = folder / "work"
    work.mkdir()
    execution.configure_nipype(work)
    nconfig.update_config({"monitoring": {"enabled": "true", "sample_frequency": "0.1"}})
    nconfig.enable_resource_monitor()
    [t1w] = collect_images(folder / "bids", participant_labels=[label])
    wf = init_bids_skullstrip_wf(inputs=[t1w], output_dir=folder / "out", bids_dir=folder / "bids",
                                 work_dir=work, threshold=0.5, omp_nthreads=1)
    os.chdir(folder)  # the resource monitor writes its samples into the workers' working directory
    started = time.time()
    wf.run(plugin=ImageFirstMultiProcPlugin({"n_procs": 1, "memory_gb": 64, "raise_insufficient": False}))
    took = time.time() - started
    n_voxels = _voxels(path)
    peaks = {}
    for node in NODES:
        [result] = work.glob(f"bids_skullstrip_wf/*/*/{node}/result_{node}.pklz")
        peaks[node] = loadpkl(result).runtime.mem_peak_gb
    return {"size": size, "shape": nib.load(path).shape, "voxels_m": n_voxels / 1e6, "seconds": took,
            "peak": peaks, "declared": {n: node_memory_gb(n, n_voxels) for n in NODES}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["2mm", "1mm", "0.7mm", "clinical"])
    parser.add_argument("--keep", type=Path, help="keep the images and work folders there")
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        folder = Path(tempfile.mkdtemp(prefix=f"node_memory_{size}_", dir=args.keep))
        try:
            rows.append(measure(size, folder))
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        row = rows[-1]
        print(f"{row['size']}: shape {row['shape']} ({row['voxels_m']:.1f} M voxels), {row['seconds']:.0f} s; "
              + ", ".join(f"{n} {row['peak'][n]:.2f} GB (declared {row['declared'][n]:.2f})" for n in NODES),
              flush=True)
    print("\n| image | shape | voxels | " + " | ".join(f"{n} peak / declared (GB)" for n in NODES) + " |")
    print("|---|---|---|" + "---|" * len(NODES))
    for row in rows:
        print(f"| {row['size']} | {'x'.join(map(str, row['shape']))} | {row['voxels_m']:.1f} M | "
              + " | ".join(f"{row['peak'][n]:.2f} / {row['declared'][n]:.2f}" for n in NODES) + " |")
    return 0 if all(math.isfinite(r["peak"]["skullstrip"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
