"""The nipype graph: one branch per T1w image, grouped by participant.

    skullstrip (validate + U-Net) -> n4 (bias field inside the mask, skull-stripped image) -> qc, mosaic -> ds
"""

import math
import re
from itertools import groupby

import nibabel as nib
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.bids import DerivativesSink
from ..interfaces.reports import MaskMosaic, QCMetrics
from ..interfaces.skullstrip import N4BiasFieldCorrection, SkullStrip

# Memory of each node: a fixed part (interpreter, libraries, the model) + bytes per native voxel.
NODE_MEMORY = {  # name: (GB, bytes per voxel)
    "skullstrip": (1.0, 40),
    "n4": (0.4, 24),
    "qc": (0.3, 28),
    "mosaic": (0.3, 16),
    "ds": (0.2, 12),
}


def node_name(text):
    """A nipype-safe node/workflow name from BIDS text (entities keep their meaning: - and . become _)."""
    return re.sub(r"\W", "_", text)


def _voxels(path):
    try:
        shape = nib.load(str(path)).shape
    except Exception:  # unreadable: the skullstrip node will report it; size the nodes for a 1 mm head
        return 256**3
    return math.prod(int(s) for s in shape[:3])


def node_memory_gb(name, n_voxels):
    fixed, per_voxel = NODE_MEMORY[name]
    return round(fixed + per_voxel * n_voxels / 1e9, 2)


def image_memory_gb(t1w):
    """The most memory one node of ``t1w``'s branch declares: what the run must be allowed at least."""
    n_voxels = _voxels(t1w.path)
    return max(node_memory_gb(name, n_voxels) for name in NODE_MEMORY)


def _node(interface, name, n_voxels, n_procs=1):
    """A node that declares what it uses: to MultiProc's scheduler (``n_procs``, ``mem_gb``) and, as
    ``sbatch`` arguments, to the SLURM plugins (added to the user's ``--plugin-args``)."""
    mem_gb = node_memory_gb(name, n_voxels)
    node = pe.Node(interface, name=name, n_procs=n_procs, mem_gb=mem_gb)
    node.plugin_args = {"sbatch_args": f"--mem={math.ceil(mem_gb * 1024)}M --cpus-per-task={n_procs}"}
    return node


def init_t1w_wf(*, t1w, output_dir, threshold, border_mm=0.0, save_probseg=False, omp_nthreads=1,
                name=None):
    """Skull-strip one T1w image (a ``discovery.T1wInput``) and write its derivatives."""
    wf = pe.Workflow(name=name or f"{node_name(t1w.stem)}_wf")
    n_voxels = _voxels(t1w.path)

    skullstrip = _node(SkullStrip(in_file=str(t1w.path), threshold=threshold, border_mm=border_mm,
                                  num_threads=omp_nthreads), "skullstrip", n_voxels, omp_nthreads)
    n4 = _node(N4BiasFieldCorrection(num_threads=omp_nthreads), "n4", n_voxels, omp_nthreads)
    reports = pe.Node(niu.Merge(2), name="reports", run_without_submitting=True)
    qc = _node(QCMetrics(bids_name=t1w.stem, source_uri=t1w.source_uri), "qc", n_voxels)
    mosaic = _node(MaskMosaic(title=t1w.stem), "mosaic", n_voxels)
    ds = _node(DerivativesSink(output_dir=str(output_dir), source_file=str(t1w.path),
                               bids_relpath=t1w.relpath, subject=t1w.subject, session=t1w.session or "",
                               save_probseg=save_probseg, threshold=threshold, border_mm=border_mm),
               "ds", n_voxels)

    wf.connect([
        (skullstrip, n4, [("out_t1w", "in_file"), ("out_mask", "mask_file")]),
        (skullstrip, reports, [("out_report", "in1")]),
        (n4, reports, [("out_report", "in2")]),
        (reports, qc, [("out", "in_reports")]),
        (n4, qc, [("out_file", "in_t1w")]),
        (skullstrip, qc, [("out_probseg", "in_probseg"), ("out_mask", "in_mask")]),
        (n4, mosaic, [("out_file", "in_t1w")]),
        (skullstrip, mosaic, [("out_mask", "in_mask"), ("out_probseg", "in_probseg")]),
        (skullstrip, ds, [("out_mask", "in_mask"), ("out_probseg", "in_probseg")]),
        (n4, ds, [("out_file", "in_preproc"), ("out_brain", "in_brain")]),
        (qc, ds, [("out_metrics", "in_metrics")]),
        (mosaic, ds, [("out_figure", "in_figure")]),
    ])
    return wf


def init_bids_skullstrip_wf(*, t1w_inputs, output_dir, work_dir, threshold, border_mm=0.0,
                            save_probseg=False, omp_nthreads=1, name="bids_skullstrip_wf"):
    """The participant level: a sub-workflow per participant holding one ``init_t1w_wf`` per T1w."""
    wf = pe.Workflow(name=name, base_dir=str(work_dir))
    for subject, items in groupby(sorted(t1w_inputs, key=lambda t: (t.subject, t.relpath)),
                                  key=lambda t: t.subject):
        sub_wf = pe.Workflow(name=f"sub_{node_name(subject)}_wf")
        sub_wf.add_nodes([
            init_t1w_wf(t1w=t1w, output_dir=output_dir, threshold=threshold, border_mm=border_mm,
                        save_probseg=save_probseg, omp_nthreads=omp_nthreads)
            for t1w in items
        ])
        wf.add_nodes([sub_wf])
    return wf
