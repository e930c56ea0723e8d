"""``skullstrip``: skull-strip one structural image file (the way mri_synthstrip and deepbet-cli are used).

    skullstrip -i T1w.nii.gz -m mask.nii.gz [-o brain.nii.gz] [-p probseg.nii.gz] [--threshold T] [--border MM]
               [--contrast SUFFIX] [--weights DIR] [--fail-on-flag]
"""

import argparse
import signal
import sys
import time
from pathlib import Path

from .. import __version__
from ..execution import available_cpus


EXIT_ERROR, EXIT_USAGE, EXIT_FLAGGED = 1, 2, 3


def _fail(message, status):
    print(f"skullstrip: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where there is one: an option whose default is None says in its help what happens."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(prog="skullstrip", description=__doc__.splitlines()[0],
                                epilog="Exit status: 0 done (QC flags, if any, printed as warnings); 1 an error "
                                       "(one line, nothing written); 2 a usage error (nothing to write, a threshold "
                                       "outside 0-1, an unknown --contrast; nothing read or written); 3 with "
                                       "--fail-on-flag when QC flagged the mask (the outputs are written); 130, "
                                       "143, 129 stopped by Ctrl-C, SIGTERM, SIGHUP (one line; the outputs written "
                                       "so far are complete, no other is left half-written).",
                                formatter_class=_HelpFormatter)
    p.add_argument("-i", "--input", required=True, type=Path,
                   help="structural image: T1w, T2w, FLAIR, PDw, ... (NIfTI, any orientation)")
    p.add_argument("-m", "--mask", type=Path, help="output brain mask (uint8, same grid as the input)")
    p.add_argument("-o", "--output", type=Path, help="output skull-stripped image")
    p.add_argument("-p", "--probseg", type=Path, help="output brain probability map (float32)")
    p.add_argument("--threshold", type=float, default=None,
                   help="brain probability threshold (0-1); default: the one calibrated for the weights")
    p.add_argument("--border", type=float, default=0.0, metavar="MM",
                   help="grow (>0) or shrink (<0) the mask by this distance in mm (at most 20)")
    p.add_argument("--contrast", metavar="SUFFIX", default=None,
                   help="the image's contrast as a BIDS suffix (T1w, T2w, FLAIR, PDw, ...): T1w images get the "
                        "bundled T1w networks, any other the any-contrast ones; default: the last part of the "
                        "file name (sub-01_FLAIR.nii.gz, t2_flair.nii, T2.nii.gz, pd.nii), else T1w")
    p.add_argument("--weights", type=Path, default=None,
                   help="the networks: a folder with model.json and the weights files, or its model card; "
                        "default: the bundled ones for the contrast")
    p.add_argument("--fail-on-flag", action="store_true",
                   help="exit with status 3 when QC flags the mask (the flags are printed as warnings either way)")
    p.add_argument("--threads", type=int, default=available_cpus(),
                   help="CPU threads; default: the CPUs this process may run on (affinity, cgroup quota)")
    p.add_argument("--version", action="version", version=f"skullstrip {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="print stage timings")
    return p


def main(argv=None):
    opts = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    if not (opts.mask or opts.output or opts.probseg):
        return _fail("nothing to write: give at least one of -m/--mask, -o/--output, -p/--probseg", EXIT_USAGE)
    from ..postproc import check_border, check_threshold
    from ..discovery import contrast_named, contrasts_inside_name
    from ..strip import check_contrast, check_outputs, skullstrip_file

    try:
        check_threshold(opts.threshold)
        check_border(opts.border)
        contrast = check_contrast(opts.input, opts.contrast)
    except ValueError as exc:
        return _fail(f"--{exc}", EXIT_USAGE)
    try:
        # every check before the networks load, and again inside skullstrip_file (cheap)
        check_outputs(opts.input, mask=opts.mask, brain=opts.output, probseg=opts.probseg)
        from ..model.card import ModelCard
        from ..model.inference import set_threads
        from ..model.predictor import Skullstripper

        set_threads(max(1, opts.threads))
        stripper = Skullstripper(opts.weights or ModelCard.bundled_for(contrast))
        stripper.networks  # loaded before the core's clock starts, so that it times the skull-strip itself
        result = skullstrip_file(opts.input, mask=opts.mask, brain=opts.output, probseg=opts.probseg,
                                 threshold=opts.threshold, border_mm=opts.border, contrast=contrast,
                                 stripper=stripper)
        t = time.perf_counter()
        flags, notes = result.qc_findings()
        qc_s = time.perf_counter() - t
    except (ValueError, OSError) as exc:
        return _fail(exc, EXIT_ERROR)
    except (MemoryError, RuntimeError, ImportError) as exc:  # out of memory: numpy, OpenVINO's native code, a
        # library that cannot be mapped (`ulimit -v`)
        from ..execution import with_address_space_hint

        said = [line for line in str(exc).splitlines() if line.strip()]  # OpenVINO's last line says what failed
        return _fail(with_address_space_hint(f"{opts.input}: {type(exc).__name__}: "
                                             f"{said[-1] if said else 'no message'}"), EXIT_ERROR)
    if opts.verbose:
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
        print(f"core {result.core_s:.2f} s ({stages}); QC {qc_s:.2f} s; total {time.perf_counter() - t_start:.2f} s; "
              f"brain {int(result.mask.sum())} voxels")
        named = "given" if opts.contrast else "from the file name" if contrast_named(opts.input) else "the default"
        print(f"stripped as {contrast} ({named}) by the networks {stripper.card.sha256[:12]}, threshold "
              f"{result.threshold:g}")
    doubts = result.warnings + [f"{opts.input}: QC: {flag}" for flag in flags if flag != "empty brain mask"]
    for doubt in dict.fromkeys(doubts):
        print(f"skullstrip: warning: {' '.join(doubt.split())}", file=sys.stderr)
    meant = [] if opts.contrast or contrast_named(opts.input) else contrasts_inside_name(opts.input)
    if meant:
        print(f"skullstrip: note: {opts.input}: its name holds {' and '.join(meant)} but does not end with it: "
              f"stripped as T1w (give --contrast {meant[0]} to strip it as {meant[0]})", file=sys.stderr)
    for note in notes:
        print(f"skullstrip: note: {opts.input}: QC: {' '.join(note.split())}", file=sys.stderr)
    return EXIT_FLAGGED if flags and opts.fail_on_flag else 0


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _stop(signum, frame):
    for other in _STOP_SIGNALS:  # a second signal would interrupt the first one's unwinding (red-team 17)
        signal.signal(other, signal.SIG_IGN)
    raise KeyboardInterrupt(signum)


def run():
    """Console entry point. SIGTERM and SIGHUP (a scheduler's stop, a closed terminal) stop it as Ctrl-C does: the
    interrupt unwinds the output being written, whose temporary file goes with it (they left a 0-byte
    ``.tmp-*`` beside the outputs, and Ctrl-C a traceback: red-team 15)."""
    for signum in _STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # started in the background: Ctrl-C is not ours
            signal.signal(signum, _stop)
    try:
        status = main()
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args else signal.SIGINT
        print(f"skullstrip: interrupted ({signal.Signals(signum).name}): the outputs written so far are complete, "
              "no other was left half-written", file=sys.stderr)
        status = 128 + signum
    sys.exit(status)


if __name__ == "__main__":
    run()
