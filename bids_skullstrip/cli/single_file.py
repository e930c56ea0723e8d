"""``skullstrip``: skull-strip one T1w image file (the way mri_synthstrip and deepbet-cli are used).

    skullstrip -i T1w.nii.gz -m mask.nii.gz [-o brain.nii.gz] [-p probseg.nii.gz] [--threshold T] [--border MM]
"""

import argparse
import contextlib
import os
import sys
import threading
import time
import warnings
from pathlib import Path

from .. import __version__


def build_parser():
    p = argparse.ArgumentParser(prog="skullstrip", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--input", required=True, type=Path, help="T1w image (NIfTI, any orientation)")
    p.add_argument("-m", "--mask", type=Path, help="output brain mask (uint8, same grid as the input)")
    p.add_argument("-o", "--output", type=Path, help="output skull-stripped image")
    p.add_argument("-p", "--probseg", type=Path, help="output brain probability map (float32)")
    p.add_argument("--threshold", type=float, default=None,
                   help="brain probability threshold (0-1); default: the one calibrated for the bundled model")
    p.add_argument("--border", type=float, default=0.0, metavar="MM",
                   help="grow (>0) or shrink (<0) the mask by this distance in mm")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads")
    p.add_argument("--version", action="version", version=f"skullstrip {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="print stage timings")
    return p


def _check_options(opts):
    """Every option checked; returns the threshold to use."""
    outs = [p for p in (opts.mask, opts.output, opts.probseg) if p is not None]
    if not outs:
        raise ValueError("nothing to write: give at least one of -m/--mask, -o/--output, -p/--probseg")
    resolved = [p.resolve() for p in outs]
    if len(set(resolved)) < len(resolved):
        raise ValueError("two outputs have the same file name")
    for p in resolved:
        if opts.input.exists() and p == opts.input.resolve():
            raise ValueError(f"{p}: an output would overwrite the input")
        if not p.name.endswith((".nii", ".nii.gz")):
            raise ValueError(f"{p}: output names must end in .nii or .nii.gz")
        if not p.parent.is_dir():
            raise ValueError(f"{p.parent}: output folder not found")
        if not os.access(p.parent, os.W_OK):
            raise ValueError(f"{p.parent}: output folder is not writable")
    from ..config import resolve_threshold

    return resolve_threshold(opts.threshold)


def _brain_image(img, data, mask):
    """The input with the skull removed: the input's integer type when it has no scaling, else float32."""
    import numpy as np

    from ..nifti import like

    dtype = np.dtype(img.get_data_dtype())
    slope, inter = img.header.get_slope_inter()
    if dtype.kind in "iu" and slope in (None, 1.0) and inter in (None, 0.0):
        return like(img, np.where(mask > 0, np.rint(data), 0), dtype)
    return like(img, data * mask, np.float32)


def _quietly(function, *args):
    """Run a warm-up in a thread; a failure shows up again, with its message, when the main thread
    needs the same thing."""
    try:
        function(*args)
    except Exception:  # noqa: BLE001 - reported by the main thread's own attempt
        pass


@contextlib.contextmanager
def _stderr_of_our_own():
    """Python's stderr on a copy of file descriptor 2: the warm-up thread points fd 2 at /dev/null while
    TensorFlow prints its native start-up notices, and this CLI's messages must not go there too."""
    sys.stderr.flush()
    saved = sys.stderr
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding=saved.encoding, errors="backslashreplace")
    try:
        yield
    finally:
        sys.stderr.close()
        sys.stderr = saved


def main(argv=None):
    opts = build_parser().parse_args(argv)
    with _stderr_of_our_own():
        return _skullstrip(opts)


def _skullstrip(opts):
    t_start = time.perf_counter()
    try:
        threshold = _check_options(opts)
        import numpy as np
        from nibabel.affines import voxel_sizes

        from ..nifti import InputError, atomic_save, geometry_warnings, like, load_t1w

        from ..model.inference import prepare_network
        from ..model.predictor import Skullstripper
        from ..qc import flag_image

        warm_up = threading.Thread(target=_quietly, args=(prepare_network, max(1, opts.threads)), daemon=True)
        warm_up.start()
        try:
            with warnings.catch_warnings(record=True) as caught:  # printed below, one line each
                warnings.simplefilter("always")
                img, data = load_t1w(opts.input)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        doubts = [str(w.message) for w in caught] + [f"{opts.input}: {m}" for m in geometry_warnings(img)]
        warm_up.join()  # so that "core" below is the skull-strip itself, as in the benchmark

        t_core = time.perf_counter()
        result = Skullstripper().mask(data, img.affine, threshold=threshold, border_mm=opts.border)
        core_s = time.perf_counter() - t_core
        if opts.mask:
            atomic_save(like(img, result.mask, np.uint8), opts.mask)
        if opts.probseg:
            atomic_save(like(img, result.probability, np.float32), opts.probseg)
        if opts.output:
            atomic_save(_brain_image(img, data, result.mask), opts.output)
    except (ValueError, OSError) as exc:
        print(f"skullstrip: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    if opts.verbose:
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
        print(f"core {core_s:.2f} s ({stages}); total {time.perf_counter() - t_start:.2f} s; "
              f"brain {int(result.mask.sum())} voxels")
    doubts += [f"{opts.input}: {w}" for w in result.warnings]
    if result.mask.any():  # the BIDS app's QC measures all; here the one that needs nothing but the mask
        volume_ml = float(result.mask.sum()) * float(np.prod(voxel_sizes(img.affine))) / 1000.0
        doubts += [f"{opts.input}: {flag}" for flag in flag_image({"brain_volume_ml": volume_ml})]
    for doubt in dict.fromkeys(doubts):
        print(f"skullstrip: warning: {' '.join(doubt.split())}", file=sys.stderr)
    if not result.mask.any():
        print(f"skullstrip: warning: {opts.input}: no brain found (empty mask)", file=sys.stderr)
    return 0


def run():
    """Console entry point. Exits without the interpreter's teardown, which costs about a second once
    TensorFlow is loaded; every output is already complete (written, closed and renamed)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
