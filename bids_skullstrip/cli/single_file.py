"""``skullstrip``: skull-strip one T1w image file (the way mri_synthstrip and deepbet-cli are used).

    skullstrip -i T1w.nii.gz -m mask.nii.gz [-o brain.nii.gz] [-p probseg.nii.gz] [--threshold T] [--border MM]
               [--weights DIR] [--fail-on-flag]
"""

import argparse
import contextlib
import os
import sys
import threading
import time
from pathlib import Path

from .. import __version__


EXIT_FLAGGED = 3


def build_parser():
    p = argparse.ArgumentParser(prog="skullstrip", description=__doc__.splitlines()[0],
                                epilog="Exit status: 0 done (QC flags, if any, printed as warnings); 1 an error "
                                       "(one line, nothing written); 3 with --fail-on-flag when QC flagged the mask "
                                       "(the outputs are written).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--input", required=True, type=Path, help="T1w image (NIfTI, any orientation)")
    p.add_argument("-m", "--mask", type=Path, help="output brain mask (uint8, same grid as the input)")
    p.add_argument("-o", "--output", type=Path, help="output skull-stripped image")
    p.add_argument("-p", "--probseg", type=Path, help="output brain probability map (float32)")
    p.add_argument("--threshold", type=float, default=None,
                   help="brain probability threshold (0-1); default: the one calibrated for the weights")
    p.add_argument("--border", type=float, default=0.0, metavar="MM",
                   help="grow (>0) or shrink (<0) the mask by this distance in mm")
    p.add_argument("--weights", type=Path, default=None,
                   help="the networks: a folder with model.json and the weights files, or its model card; "
                        "default: the bundled ones")
    p.add_argument("--fail-on-flag", action="store_true",
                   help="exit with status 3 when QC flags the mask (the flags are printed as warnings either way)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads")
    p.add_argument("--version", action="version", version=f"skullstrip {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="print stage timings")
    return p


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
        if not (opts.mask or opts.output or opts.probseg):
            raise ValueError("nothing to write: give at least one of -m/--mask, -o/--output, -p/--probseg")
        from ..strip import check_outputs, check_threshold, skullstrip_file

        # every check before the slow start (TensorFlow), and again inside skullstrip_file (cheap)
        check_outputs(opts.input, mask=opts.mask, brain=opts.output, probseg=opts.probseg)
        check_threshold(opts.threshold)
        from ..model.card import ModelCard
        from ..model.inference import prepare_network
        from ..model.predictor import Skullstripper

        card = ModelCard.load(opts.weights)
        warm_up = threading.Thread(target=_quietly, args=(prepare_network, max(1, opts.threads), card), daemon=True)
        warm_up.start()
        result = skullstrip_file(opts.input, mask=opts.mask, brain=opts.output, probseg=opts.probseg,
                                 threshold=opts.threshold, border_mm=opts.border, stripper=Skullstripper(card),
                                 warm_up=warm_up)
        t = time.perf_counter()
        flags = result.qc_flags()
        qc_s = time.perf_counter() - t
    except (ValueError, OSError) as exc:
        print(f"skullstrip: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    if opts.verbose:
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
        print(f"core {result.core_s:.2f} s ({stages}); QC {qc_s:.2f} s; total {time.perf_counter() - t_start:.2f} s; "
              f"brain {int(result.mask.sum())} voxels")
    doubts = result.warnings + [f"{opts.input}: QC: {flag}" for flag in flags if flag != "empty brain mask"]
    for doubt in dict.fromkeys(doubts):
        print(f"skullstrip: warning: {' '.join(doubt.split())}", file=sys.stderr)
    return EXIT_FLAGGED if flags and opts.fail_on_flag else 0


def run():
    """Console entry point. Exits without the interpreter's teardown, which costs about a second once
    TensorFlow is loaded; every output is already complete (written, closed and renamed)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
