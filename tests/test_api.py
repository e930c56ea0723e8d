"""bids_skullstrip as a library: the per-image workflow embedded in someone else's pipeline, on any file name."""

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_skullstrip.workflows.base import init_t1w_wf

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample_bids"
SMALL_HEAD = SAMPLE / "sub-02" / "anat" / "sub-02_T1w.nii.gz"  # a real head, 2 mm: the fastest sample


def _run_embedded(t1w, work_dir, **options):
    """``init_t1w_wf`` inside a parent workflow, fed by the parent's own node, run with the Linear plugin;
    returns the mask, figure and QC record the parent's next node received."""
    parent = pe.Workflow(name="my_pipeline", base_dir=str(work_dir))
    source = pe.Node(niu.IdentityInterface(fields=["anat"]), name="source")
    source.inputs.anat = str(t1w)
    collect = pe.Node(niu.Merge(3), name="collect")  # not an identity node: nipype keeps it in the graph
    anat_wf = init_t1w_wf(name="brain_extraction_wf", **options)
    parent.connect([
        (source, anat_wf, [("anat", "inputnode.t1w")]),
        (anat_wf, collect, [("outputnode.mask", "in1"), ("outputnode.figure", "in2"), ("outputnode.qc", "in3")]),
    ])
    graph = parent.run(plugin="Linear")
    (node,) = [n for n in graph.nodes() if n.name == "collect"]
    return node.result.outputs.out


def test_the_workflow_runs_on_a_non_bids_file_name_with_spaces_inside_another_pipeline(tmp_path):
    t1w = tmp_path / "scans" / "my head scan.nii.gz"
    t1w.parent.mkdir()
    shutil.copyfile(SMALL_HEAD, t1w)
    mask_file, figure, qc = _run_embedded(t1w, tmp_path / "work", threshold=0.55)

    src, mask = nib.load(t1w), nib.load(mask_file)
    assert mask.shape == src.shape and np.array_equal(mask.affine, src.affine)
    assert (int(mask.header["qform_code"]), int(mask.header["sform_code"])) == (
        int(src.header["qform_code"]), int(src.header["sform_code"]))
    assert mask.get_data_dtype() == np.uint8
    assert 900 < qc["brain_volume_ml"] < 1900  # a real brain, not an empty or whole-head mask
    # the figure's title falls back to the file name where there are no BIDS entities
    assert "my head scan" in Path(figure).read_text()
