"""The nipype graph, built and inspected without running it."""

from pathlib import Path

from bids_skullstrip.discovery import collect_t1w
from bids_skullstrip.workflows.base import NODE_MEMORY, init_bids_skullstrip_wf, node_name

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample_bids"


def _edges(wf):
    """{(source node, destination node): [(output, input), ...]} over the flattened graph."""
    graph = wf._create_flat_graph()
    return {(u.fullname, v.fullname): data["connect"] for u, v, data in graph.edges(data=True)}


def test_graph_has_one_branch_per_t1w_wired_to_one_sink(tmp_path):
    t1ws = collect_t1w(SAMPLE)
    wf = init_bids_skullstrip_wf(t1w_inputs=t1ws, output_dir=tmp_path / "out", work_dir=tmp_path / "work",
                                 threshold=0.5, border_mm=1.0, save_probseg=True, omp_nthreads=2)
    edges = _edges(wf)
    nodes = {n.fullname: n for n in wf._create_flat_graph().nodes()}
    assert len(nodes) == len(t1ws) * (len(NODE_MEMORY) + 1)  # the five declared nodes and the report merge
    for t1w in t1ws:
        prefix = f"bids_skullstrip_wf.sub_{node_name(t1w.subject)}_wf.{node_name(t1w.stem)}_wf."
        strip, n4, ds = nodes[prefix + "skullstrip"], nodes[prefix + "n4"], nodes[prefix + "ds"]
        assert strip.inputs.in_file == str(t1w.path) and strip.inputs.threshold == 0.5
        assert strip.inputs.border_mm == 1.0 and strip.n_procs == 2 and strip.mem_gb >= NODE_MEMORY["skullstrip"][0]
        assert ds.inputs.bids_relpath == t1w.relpath and ds.inputs.save_probseg
        assert set(edges[(strip.fullname, n4.fullname)]) == {("out_t1w", "in_file"), ("out_mask", "mask_file")}
        sink_inputs = {i for (src, dst), pairs in edges.items() if dst == ds.fullname for _, i in pairs}
        assert sink_inputs == {"in_mask", "in_probseg", "in_preproc", "in_brain", "in_metrics", "in_figure"}
        # every image's branch stays its own: nothing crosses between branches
        assert all(src.startswith(prefix) == dst.startswith(prefix) for src, dst in edges)
        assert "--mem=" in strip.plugin_args["sbatch_args"]
