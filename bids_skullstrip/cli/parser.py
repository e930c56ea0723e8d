"""The command line of the BIDS App (the names fMRIPrep users know are accepted too)."""

import argparse
import json
from pathlib import Path

from .. import __version__
from ..execution import available_cpus

DESCRIPTION = "bids_skullstrip: the BIDS App. `participant` skull-strips structural images (T1w by default), `group` writes the group report."


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show and the help text does not already say it."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(prog="bids_skullstrip", description=DESCRIPTION, formatter_class=_HelpFormatter)
    p.add_argument("bids_dir", type=Path, help="the input BIDS dataset")
    p.add_argument("output_dir", type=Path, help="where the BIDS-Derivatives go")
    p.add_argument("analysis_level", choices=["participant", "group"])
    p.add_argument("--version", action="version", version=f"bids_skullstrip {__version__}")
    g = p.add_argument_group("selecting images")
    g.add_argument("--participant-label", "--participant_label", nargs="+", action="extend", metavar="LABEL",
                   help="participants to process (with or without sub-); default: all")
    g.add_argument("--session-label", "--session_label", nargs="+", action="extend", metavar="LABEL",
                   help="sessions (with or without ses-); default: all")
    g.add_argument("--contrasts", nargs="+", action="extend", metavar="SUFFIX", default=None,
                   help="the structural images to skull-strip, by BIDS suffix: T1w, T2w, FLAIR, PDw, T2starw, or all "
                        "(a contrast-enhanced T1w is a T1w with a ce- entity); default: T1w")
    g.add_argument("--bids-filter-file", type=Path, metavar="FILE",
                   help='JSON with pybids filters per contrast (keys: the suffix, in any case), e.g. '
                        '{"t1w": {"acquisition": "mprage"}, "flair": {"session": "1"}}')
    g.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                   help="do not run the BIDS validator on the input dataset")
    g.add_argument("--bids-database-dir", type=Path, metavar="DIR",
                   help="pybids database of the input, built on the first run and reused (large datasets)")
    g = p.add_argument_group("model")
    g.add_argument("--threshold", type=float, default=None,
                   help="brain probability threshold (0-1); default: the one calibrated for the networks of each "
                        "image's contrast")
    g.add_argument("--border", type=float, default=0.0, metavar="MM",
                   help="grow (>0) or shrink (<0) the mask by this distance in mm (at most 20)")
    g.add_argument("--save-probseg", action="store_true", help="also write the brain probability map")
    g.add_argument("--fail-on-flag", action="store_true",
                   help="exit with status 3 when QC flags an image (and none failed; at the group level, when "
                        "the group report flags one, its group rule included); by default flagged images are "
                        "listed and the status is 0")
    g = p.add_argument_group("execution")
    g.add_argument("--n-cpus", "--nprocs", "--n_cpus", "--nthreads", dest="n_cpus", type=int,
                   default=available_cpus(), help="CPUs the run may use (MultiProc); default: those this process may "
                                                  "run on (its CPU affinity, within its cgroup's CPU quota)")
    g.add_argument("--omp-nthreads", "--omp_nthreads", dest="omp_nthreads", type=int, default=None,
                   help="threads per image for the network and N4 (default: 1, or --n-cpus when there is one image)")
    g.add_argument("--mem-gb", "--mem_gb", dest="mem_gb", type=float, default=None,
                   help="memory the run may use (MultiProc), GB; default: what the machine has")
    g.add_argument("--mem", "--mem-mb", "--mem_mb", dest="mem_mb", type=float, default=None, metavar="MB",
                   help="the same in MB, as fMRIPrep spells it")
    g.add_argument("--stop-on-first-crash", action="store_true",
                   help="stop at the first image that fails instead of finishing the others")
    g.add_argument("--boilerplate-only", action="store_true",
                   help="write the methods text (logs/CITATION.md, .html) and exit")
    g.add_argument("--reports-only", action="store_true",
                   help="rewrite the participant reports from the outputs already there and exit")
    g.add_argument("-w", "--work-dir", type=Path, default=None,
                   help="nipype work directory, reused to resume; on a cluster, put it on shared scratch "
                        "(default: a folder in the temp dir)")
    g.add_argument("--clean-workdir", action="store_true",
                   help="remove what the run put in the work directory when every image finished")
    g.add_argument("--overwrite", action="store_true", help="redo images whose outputs already exist")
    g.add_argument("--plugin", default="MultiProc",
                   help="nipype execution plugin: MultiProc, Linear, SLURM, SLURMGraph, SGE, ...")
    g.add_argument("--plugin-args", type=json.loads, default=None, metavar="JSON",
                   help='plugin arguments as JSON, e.g. \'{"sbatch_args": "-p short -t 30"}\'')
    g.add_argument("--nipype-plugin-file", "--use-plugin", dest="plugin_file", type=Path, metavar="FILE",
                   help="YAML/JSON file with `plugin:` and `plugin_args:` (as in fMRIPrep)")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: nipype's too)")
    return p
