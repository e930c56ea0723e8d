"""The nipype graph: one branch per structural image (T1w, T2w, FLAIR, ...), grouped by participant.

    init_t1w_wf:    skullstrip (validate + networks) -> n4 (bias field inside the mask) -> qc, mosaic
    init_ds_t1w_wf: ds (BIDS-Derivatives names, sidecars, the metrics JSON last)
"""

import math
import re
from itertools import groupby
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.bids import DerivativesSink
from ..interfaces.reports import MaskMosaic, QCMetrics
from ..interfaces.brainmask import SkullStrip
from ..interfaces.n4 import N4BiasFieldCorrection
from ..model.card import ModelCard
from ..nifti import load_header

# Memory of each node: a fixed part + bytes per native voxel, from the peaks bench/node_memory.py measured
# (2 mm, 1 mm, 0.7 mm, 512x512x200; docs/hpc.md) with TensorFlow, rounded up: OpenVINO's are 0.4-0.5 GB lower,
# and these hold for either. A MultiProc worker that ran an image keeps the interpreter, the runtime
# and the model for every node it runs later.
NODE_MEMORY = {  # name: (GB, bytes per voxel)
    "skullstrip": (0.85, 22),
    "n4": (1.0, 15),
    "qc": (1.0, 6),
    "mosaic": (1.0, 10),
    "ds": (1.0, 6),
}


# What an image's node folders hold until it is finished: four float32 volumes and a uint8 mask on its grid (the
# image and its probability, its N4-corrected and skull-stripped images), 17 bytes a voxel
WORK_BYTES_PER_VOXEL = 17


def node_name(text):
    """A nipype-safe node/workflow name from BIDS text (entities keep their meaning: - and . become _)."""
    return re.sub(r"\W", "_", text)


def _voxels(path):
    try:
        shape = load_header(path).shape
    except Exception:  # unreadable: the skullstrip node will report it; size the nodes for a 1 mm head
        return 256**3
    return math.prod(int(s) for s in shape[:3])


def node_memory_gb(name, n_voxels):
    fixed, per_voxel = NODE_MEMORY[name]
    return round(fixed + per_voxel * n_voxels / 1e9, 2)


def image_memory_gb(image, *, work_in_memory=False):
    """The most memory one node of ``image``'s branch declares: what the run must be allowed at least; with
    ``work_in_memory`` (a work directory on tmpfs) also what its node folders hold until it is finished."""
    n_voxels = _voxels(image.path)
    work = WORK_BYTES_PER_VOXEL * n_voxels / 1e9 if work_in_memory else 0.0
    return round(max(node_memory_gb(name, n_voxels) for name in NODE_MEMORY) + work, 2)


def _node(interface, name, n_voxels, n_procs=1):
    """A node that declares what it uses: to MultiProc's scheduler (``n_procs``, ``mem_gb``) and, as
    ``sbatch`` arguments, to the SLURM plugins (added to the user's ``--plugin-args``)."""
    mem_gb = node_memory_gb(name, n_voxels)
    node = pe.Node(interface, name=name, n_procs=n_procs, mem_gb=mem_gb)
    node.plugin_args = {"sbatch_args": f"--mem={math.ceil(mem_gb * 1024)}M --cpus-per-task={n_procs}"}
    return node


def init_t1w_wf(*, threshold=None, border_mm=0.0, weights=None, contrast="T1w", omp_nthreads=1, n_voxels=256**3,
                name="t1w_wf"):
    """Skull-strip one image: brain mask, probability, N4-corrected and skull-stripped images, QC, mosaic.

    Any NIfTI file name will do: BIDS entities, where the name has them, only title the figure.

    Parameters
    ----------
    threshold : float, optional
        Brain probability threshold (default: the one calibrated for the weights).
    border_mm : float
        Grow (> 0) or shrink (< 0) the mask by this distance.
    weights : str or Path, optional
        The networks: a folder with ``model.json`` and the weights files, or a model card file; default: the
        bundled ones for ``contrast``. The QC record names them by checksum.
    contrast : str
        The image's BIDS suffix (``T1w``, ``T2w``, ``FLAIR``, ...): which bundled networks strip it
        (``ModelCard.bundled_for``).
    omp_nthreads : int
        Threads of the network and of N4.
    n_voxels : int
        Voxels of the image: sizes the memory each node declares to the scheduler.
    name : str
        The workflow's name.

    Inputs
    ------
    t1w
        The image (NIfTI, 3D, any orientation and voxel size).

    Outputs
    -------
    mask
        Brain mask, uint8 {0, 1}, on the input's exact grid.
    probseg
        Brain probability, float32, on the input's grid (independent of the threshold).
    preproc
        The image corrected for intensity non-uniformity (N4), float32.
    brain
        ``preproc`` times the mask.
    figure, brain_figure
        SVG mosaics: the mask's contour over ``preproc``, and ``brain``.
    geometry, warnings, runtime_s, n4_runtime_s
        The input's shape, voxel size and orientation; doubts about the input and the result (one line
        each, naming the file); seconds per stage.
    qc
        Brain volume, QC measures and flags, the software version and the model (as in the metrics JSON).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=T1W_OUTPUTS), name="outputnode")
    skullstrip = _node(SkullStrip(border_mm=border_mm, num_threads=omp_nthreads), "skullstrip", n_voxels,
                       omp_nthreads)
    if threshold is not None:
        skullstrip.inputs.threshold = threshold
    n4 = _node(N4BiasFieldCorrection(num_threads=omp_nthreads), "n4", n_voxels, omp_nthreads)
    qc = _node(QCMetrics(contrast=contrast), "qc", n_voxels)
    # the nodes get the card file: a bad path fails here, in one line, and nipype's cache (which hashes a file by
    # its time stamp) is redone when weights are exported again in place
    card = ModelCard.bundled_for(contrast) if weights is None else ModelCard.load(weights)
    skullstrip.inputs.weights = qc.inputs.weights = str(card.path)
    mosaic = _node(MaskMosaic(), "mosaic", n_voxels)
    wf.connect([
        (inputnode, skullstrip, [("t1w", "in_file")]),
        (inputnode, mosaic, [("t1w", "source_file")]),
        (skullstrip, n4, [("out_t1w", "in_file"), ("out_mask", "mask_file")]),
        (n4, qc, [("out_file", "in_t1w")]),
        (skullstrip, qc, [("out_probseg", "in_probseg"), ("out_mask", "in_mask"), ("out_qc_mask", "in_qc_mask"),
                          ("model_measures", "model_measures"), ("noise_smoothing_mm", "noise_smoothing_mm")]),
        (n4, mosaic, [("out_file", "in_t1w")]),
        (skullstrip, mosaic, [("out_mask", "in_mask"), ("out_probseg", "in_probseg")]),
        (skullstrip, outputnode, [("out_mask", "mask"), ("out_probseg", "probseg"), ("geometry", "geometry"),
                                  ("warnings", "warnings"), ("runtime_s", "runtime_s")]),
        (n4, outputnode, [("out_file", "preproc"), ("out_brain", "brain"), ("runtime_s", "n4_runtime_s")]),
        (qc, outputnode, [("qc", "qc")]),
        (mosaic, outputnode, [("out_figure", "figure"), ("out_brain_figure", "brain_figure")]),
    ])
    return wf


T1W_OUTPUTS = ["mask", "probseg", "preproc", "brain", "figure", "brain_figure", "geometry", "warnings", "runtime_s",
               "n4_runtime_s", "qc"]


def init_ds_t1w_wf(*, output_dir, bids_dir, threshold, border_mm=0.0, save_probseg=False, n_voxels=256**3,
                   run_id="", name="ds_t1w_wf"):
    """Write what ``init_t1w_wf`` made of ``source_file`` (a raw image of any contrast) as BIDS-Derivatives
    under ``output_dir``, named by ``outputs.OUTPUTS``.

    Parameters
    ----------
    output_dir, bids_dir : str or Path
        The derivatives dataset to write into, and the raw dataset ``source_file`` belongs to.
    threshold, border_mm : float
        The settings the mask was made with: written into the sidecars and the recorded settings.
    save_probseg : bool
        Also write the brain probability map.
    n_voxels : int
        Voxels of the image: sizes the memory the sink declares.
    run_id : str
        The run writing the outputs, recorded in the metrics JSON (a run tells the images it finished by it).
    name : str
        The workflow's name.

    Inputs
    ------
    source_file
        The raw image, inside ``bids_dir`` (its BIDS name gives the outputs' names).
    mask, probseg, preproc, brain, figure, brain_figure, geometry, warnings, runtime_s, n4_runtime_s, qc
        The outputs of ``init_t1w_wf``.

    Outputs
    -------
    out_files
        Every file written (the metrics JSON last: its presence marks the image as finished).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["source_file", *T1W_OUTPUTS]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_files"]), name="outputnode")
    ds = _node(DerivativesSink(output_dir=str(output_dir), bids_dir=str(bids_dir), save_probseg=save_probseg,
                               threshold=threshold, border_mm=border_mm, run_id=run_id), "ds", n_voxels)
    wf.connect([
        (inputnode, ds, [(field, field) for field in ["source_file", *T1W_OUTPUTS]]),
        (ds, outputnode, [("out_files", "out_files")]),
    ])
    return wf


def crash_dir(work_dir, image):
    """Where the crash files of ``image``'s nodes go: one folder per image, under one per participant."""
    return Path(work_dir) / "crashes" / f"sub-{image.subject}" / image.name


def init_bids_skullstrip_wf(*, inputs, output_dir, bids_dir, work_dir, threshold, border_mm=0.0,
                            save_probseg=False, omp_nthreads=1, run_id="", name="bids_skullstrip_wf"):
    """The participant level: a sub-workflow per participant holding, per structural image
    (``discovery.StructuralInput``, any contrast), an ``init_t1w_wf`` and its ``init_ds_t1w_wf``; each image's
    crash files go to ``crash_dir``.

    Parameters
    ----------
    inputs : list of discovery.StructuralInput
        The images to process (``discovery.collect_images``).
    output_dir, bids_dir, work_dir : str or Path
        The derivatives dataset, the raw dataset and nipype's work folder.
    threshold, border_mm, save_probseg, omp_nthreads, run_id
        As for ``init_t1w_wf`` and ``init_ds_t1w_wf`` (``threshold`` None: each image's networks' own).

    The workflow has no input or output node: every image's path is set on its branch, and what it makes is
    written under ``output_dir``.
    """
    wf = pe.Workflow(name=name, base_dir=str(work_dir))
    for subject, items in groupby(sorted(inputs, key=lambda t: (t.subject, t.relpath)), key=lambda t: t.subject):
        sub_wf = pe.Workflow(name=f"sub_{node_name(subject)}_wf")
        for image in items:
            n_voxels = _voxels(image.path)
            image_threshold = ModelCard.bundled_for(image.suffix).threshold if threshold is None else threshold
            image_wf = init_t1w_wf(threshold=image_threshold, border_mm=border_mm, contrast=image.suffix,
                                   omp_nthreads=omp_nthreads, n_voxels=n_voxels, name=f"{node_name(image.name)}_wf")
            image_wf.inputs.inputnode.t1w = str(image.path)
            ds_wf = init_ds_t1w_wf(output_dir=output_dir, bids_dir=bids_dir, threshold=image_threshold,
                                   border_mm=border_mm, save_probseg=save_probseg, n_voxels=n_voxels,
                                   run_id=run_id, name=f"ds_{node_name(image.name)}_wf")
            sub_wf.connect([
                (image_wf, ds_wf, [("inputnode.t1w", "inputnode.source_file")]
                 + [(f"outputnode.{field}", f"inputnode.{field}") for field in T1W_OUTPUTS]),
            ])
            # nipype takes a node's crash folder from the node's own config, not from its workflow's
            for node in (*image_wf._graph.nodes(), *ds_wf._graph.nodes()):
                node.config = {"execution": {"crashdump_dir": str(crash_dir(work_dir, image))}}
        wf.add_nodes([sub_wf])
    return wf
