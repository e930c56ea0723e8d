"""The nipype graph, built and inspected without running it."""

from pathlib import Path

from bids_skullstrip.discovery import collect_images
from bids_skullstrip.workflows.base import (
    NODE_MEMORY,
    T1W_OUTPUTS,
    crash_dir,
    init_bids_skullstrip_wf,
    init_ds_t1w_wf,
    init_t1w_wf,
    node_name,
)

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample_bids"


def _edges(wf):
    """{(source node, destination node): [(output, input), ...]} over the flattened graph."""
    graph = wf._create_flat_graph()
    return {(u.fullname, v.fullname): data["connect"] for u, v, data in graph.edges(data=True)}


def test_t1w_workflow_is_embeddable_through_its_input_and_output_nodes():
    wf = init_t1w_wf(threshold=0.4, border_mm=2.0, omp_nthreads=3, name="anat_wf")
    inputs, outputs = wf.get_node("inputnode"), wf.get_node("outputnode")
    assert inputs.inputs.copyable_trait_names() == ["t1w"]
    assert sorted(outputs.inputs.copyable_trait_names()) == sorted(T1W_OUTPUTS)
    strip = wf.get_node("skullstrip")
    assert (strip.inputs.threshold, strip.inputs.border_mm, strip.n_procs) == (0.4, 2.0, 3)
    edges = {(u.name, v.name): data["connect"] for u, v, data in wf._graph.edges(data=True)}
    assert edges[("inputnode", "skullstrip")] == [("t1w", "in_file")]
    fed = {field for (_, node), pairs in edges.items() if node == "outputnode" for _, field in pairs}
    assert fed == set(T1W_OUTPUTS)  # every output is connected

    ds_wf = init_ds_t1w_wf(output_dir="/out", bids_dir="/bids", threshold=0.4)
    assert sorted(ds_wf.get_node("inputnode").inputs.copyable_trait_names()) == sorted(["source_file", *T1W_OUTPUTS])


def test_graph_has_one_branch_per_t1w_wired_to_one_sink(tmp_path):
    t1ws = collect_images(SAMPLE)
    wf = init_bids_skullstrip_wf(inputs=t1ws, output_dir=tmp_path / "out", bids_dir=SAMPLE,
                                 work_dir=tmp_path / "work", threshold=0.5, border_mm=1.0, save_probseg=True,
                                 omp_nthreads=2)
    edges = _edges(wf)
    nodes = {n.fullname: n for n in wf._create_flat_graph().nodes()}
    # per image: the five declared nodes, the input and output nodes of both workflows
    assert len(nodes) == len(t1ws) * (len(NODE_MEMORY) + 4)
    for t1w in t1ws:
        sub = f"bids_skullstrip_wf.sub_{node_name(t1w.subject)}_wf."
        prefix, ds_prefix = f"{sub}{node_name(t1w.name)}_wf.", f"{sub}ds_{node_name(t1w.name)}_wf."
        inputnode, strip, n4 = nodes[prefix + "inputnode"], nodes[prefix + "skullstrip"], nodes[prefix + "n4"]
        ds = nodes[ds_prefix + "ds"]
        assert inputnode.inputs.t1w == str(t1w.path) and strip.inputs.threshold == 0.5
        assert strip.inputs.border_mm == 1.0 and strip.n_procs == 2 and strip.mem_gb >= NODE_MEMORY["skullstrip"][0]
        assert ds.inputs.save_probseg and ds.inputs.bids_dir == str(SAMPLE) and ds.inputs.threshold == 0.5
        assert set(edges[(strip.fullname, n4.fullname)]) == {("out_t1w", "in_file"), ("out_mask", "mask_file")}
        sink_inputs = {i for (src, dst), pairs in edges.items() if dst == ds_prefix + "inputnode" for _, i in pairs}
        assert sink_inputs == {"source_file", *T1W_OUTPUTS}
        # every image's branch stays its own: nothing crosses between branches
        mine = (prefix, ds_prefix)
        assert all(src.startswith(mine) == dst.startswith(mine) for src, dst in edges)
        assert "--mem=" in strip.plugin_args["sbatch_args"]
        # each image's crash files go to a folder of its own, under its participant's
        assert {nodes[n].config["execution"]["crashdump_dir"] for n in nodes if n.startswith(mine)} == {
            str(crash_dir(tmp_path / "work", t1w))}


def test_the_sink_always_runs_and_one_stopped_half_way_leaves_its_image_unfinished(tmp_path):
    """The sink's files are outside nipype's cache: it runs again whenever its node does (outputs deleted,
    --overwrite). Redoing an image first removes its metrics JSON (the "finished" mark), so a sink that stops
    half-way leaves an image to redo, not new files under the old record."""
    import json

    import pytest

    from bids_skullstrip import outputs
    from bids_skullstrip.discovery import StructuralInput
    from bids_skullstrip.interfaces.bids import DerivativesSink

    assert DerivativesSink.always_run
    source = SAMPLE / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    image, out = StructuralInput.from_path(source, SAMPLE), tmp_path / "out"
    metrics = outputs.derivative_path(out, image, "metrics")
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"settings": {"threshold": 0.55}}))  # finished before, with other settings
    broken = tmp_path / "mask.nii.gz"
    broken.write_bytes(b"not an image")
    sink = DerivativesSink(output_dir=str(out), bids_dir=str(SAMPLE), source_file=str(source), threshold=0.7,
                           border_mm=0.0, geometry={}, warnings=[], runtime_s={}, n4_runtime_s={}, qc={},
                           **{kind: str(broken) for kind in ("mask", "preproc", "brain", "probseg", "figure",
                                                             "brain_figure")})
    with pytest.raises(Exception):
        sink.run(cwd=str(tmp_path))
    assert not metrics.exists()
