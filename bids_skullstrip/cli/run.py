"""``bids_skullstrip``: the BIDS App. ``participant`` skull-strips T1w images, ``group`` writes the group report.

The command line (``cli.parser``) becomes one ``config.RunConfig``, which ``runner.Run`` carries out; here each
error becomes one line and an exit status.
"""

import logging
import sys
import tempfile

from ..config import RunConfig, UsageError
from ..runner import FAILED, USAGE, Interrupted, Run, handle_stop_signals, stop_now
from .parser import build_parser

log = logging.getLogger("bids_skullstrip")


def _quiet_libraries():
    logging.getLogger("bidsschematools").setLevel(logging.WARNING)  # "No schema path specified..."
    logging.getLogger("matplotlib").setLevel(logging.ERROR)  # "Matplotlib is building the font cache..."


def main(argv=None):
    handle_stop_signals()  # before anything slow (nipype's import): a signal in the first second is not lost
    try:
        return _main(argv)
    except (KeyboardInterrupt, Interrupted) as exc:  # before the run began: nothing was written
        stop_now(str(exc) if isinstance(exc, Interrupted) else "SIGINT")


def _main(argv):
    opts = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.raiseExceptions = False  # a log file on a full disk: no "--- Logging error ---" traceback on the console
    log.setLevel(logging.DEBUG if opts.verbose else logging.INFO)
    _quiet_libraries()
    from ..discovery import DiscoveryError
    from ..nifti import InputError
    from ..reports.common import ReportError

    try:
        tempfile.gettempdir()  # nipype, pybids and matplotlib write there, at both levels
    except FileNotFoundError:
        print("bids_skullstrip: error: no writable temporary folder (TMPDIR, /tmp, /var/tmp): set TMPDIR to a "
              "writable folder, or give the container one (--tmpfs /tmp)", file=sys.stderr)
        return USAGE
    try:
        return Run(RunConfig.from_args(opts))()
    except (UsageError, DiscoveryError, InputError, ReportError) as exc:
        # a run that could not start (nothing processed): 2, as a usage error
        print(f"bids_skullstrip: error: {exc}", file=sys.stderr)
        return USAGE
    except Exception as exc:  # noqa: BLE001 - one line for users, the traceback with -v
        if opts.verbose:
            raise
        print(f"bids_skullstrip: error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
              "(rerun with -v for details)", file=sys.stderr)
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
