"""Time deepbet stage by stage, in deepbet's own venv (this file must not import bids_skullstrip).

Run by ``bench/run_benchmark.py`` with ``--competitor-python``:

    <competitor-python> bench/deepbet_worker.py job.json result.json

``job.json``: {"items": [{"input": ".../T1w.nii.gz", "mask": ".../mask.nii.gz"}, ...], "warmup": true,
"warmup_index": 0}

Stages mirror the app's: ``load`` (read + reorient to canonical), ``core`` (deepbet's ``run_model``:
bounding-box net at 128^3, crop, resample to 256^3, main net, back to the native grid; then its
``postprocess``: largest component + void filling) and ``write`` (back to the input orientation + save).
"""

import json
import resource
import sys
import time

T0 = time.perf_counter()


def main(job_path, result_path):
    job = json.loads(open(job_path).read())
    t = time.perf_counter()
    import nibabel as nib
    import numpy as np
    import torch
    from deepbet.bet import BrainExtraction
    from deepbet.utils import reoriented_nifti

    out = {"import_s": time.perf_counter() - t, "torch_threads": torch.get_num_threads(),
           "torch_version": torch.__version__}
    import deepbet  # noqa: F401
    try:
        from importlib.metadata import version
        out["deepbet_version"] = version("deepbet")
    except Exception:  # pragma: no cover - metadata is informational only
        out["deepbet_version"] = "?"

    t = time.perf_counter()
    bet = BrainExtraction(no_gpu=True)
    out["model_load_s"] = time.perf_counter() - t

    def one(item):
        rec = {}
        t = time.perf_counter()
        img = nib.load(item["input"])
        x = nib.as_closest_canonical(img).get_fdata(dtype=np.float32)
        x = x[..., 0] if len(img.shape) == 4 else x
        rec["load"] = time.perf_counter() - t

        t = time.perf_counter()
        prob = bet.run_model(x.copy())
        rec["inference"] = time.perf_counter() - t  # includes deepbet's own resampling in and out
        t = time.perf_counter()
        mask = bet.postprocess(prob > 0.5, 0)
        rec["postprocess"] = time.perf_counter() - t
        rec["core"] = rec["inference"] + rec["postprocess"]

        t = time.perf_counter()
        mimg = reoriented_nifti(mask, img.affine, img.header)
        mimg.header.set_data_dtype(np.uint8)
        mimg.to_filename(item["mask"])
        rec["write"] = time.perf_counter() - t
        rec["total"] = rec["load"] + rec["core"] + rec["write"]
        return rec

    items = job["items"]
    if job.get("warmup") and items:
        # first call: kernel selection, allocator growth (its mask goes to a scratch file)
        cold = dict(items[job.get("warmup_index", 0)])
        cold["mask"] = cold["mask"].replace(".nii", "_cold.nii")
        out["cold"] = one(cold)
    out["items"] = [one(item) for item in items]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out["process_s"] = time.perf_counter() - T0
    with open(result_path, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
