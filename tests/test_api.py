"""bids_skullstrip as a library: the per-image workflow embedded in someone else's pipeline, on any file name."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_skullstrip.model.card import ModelCard, ModelCardError
from bids_skullstrip.workflows.base import init_t1w_wf

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample_bids"
SMALL_HEAD = SAMPLE / "sub-02" / "anat" / "sub-02_T1w.nii.gz"  # a real head, 2 mm: the fastest sample


def _run_embedded(t1w, work_dir, **options):
    """``init_t1w_wf`` inside a parent workflow, fed by the parent's own node, run with the Linear plugin;
    returns the mask, figure and QC record the parent's next node received."""
    parent = pe.Workflow(name="my_pipeline", base_dir=str(work_dir))
    parent.config["execution"]["crashdump_dir"] = str(work_dir)  # a failure leaves its crash file there, not in cwd
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


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """Both networks in the project's own architecture, exported by the training command's own code, far too
    small to learn anything: every weight zero but the output's bias, so each answers "brain" (p = 0.98)
    wherever it looks: the locator's brain is the whole field of view, and so is the mask. Returns the folder."""
    from bids_skullstrip.model.unet import build_unet
    from bids_skullstrip.training.train import export_weights, stages

    folder = tmp_path_factory.mktemp("tiny") / "weights"
    stage_list = stages(base_filters=2, levels=2, locator_base_filters=2)
    models = {}
    for stage in stage_list:
        model = models[stage.name] = build_unet(**stage.architecture)
        model.set_weights([np.zeros(w.shape, np.float32) for w in model.weights])
        model.get_layer("brain").bias.assign([4.0])
    locator, segmenter = stage_list
    card = {"name": "tiny test networks", "architecture": segmenter.architecture, "voxel_mm": segmenter.voxel_mm,
            "locator": {"architecture": locator.architecture, "voxel_mm": locator.voxel_mm,
                        "file": locator.weights_file},
            "threshold": 0.3, "contrasts": ["T1w", "T2w"]}
    export_weights(models, folder, card, stage_list)
    return folder


def test_the_model_card_is_read_once_whichever_way_it_is_named(tiny_weights):
    card = ModelCard.load(tiny_weights)
    assert ModelCard.load(tiny_weights / "model.json") is card is ModelCard.load(str(tiny_weights / "unet.weights.h5"))
    assert ModelCard.load() is not card and ModelCard.load().bundled and not card.bundled
    assert (card.threshold, card.voxel_mm, card.locator_voxel_mm, card.contrasts) == (0.3, 2.0, 4.0, ("T1w", "T2w"))
    assert card.architecture == {"base_filters": 2, "levels": 2}
    assert len(card.sha256) == 64 and card.sha256 != ModelCard.load().sha256
    assert ModelCard.load().contrasts == ("T1w",)  # a card that does not say: trained on T1w heads


def test_each_contrast_gets_its_bundled_networks():
    """T1w images (any entities) the T1w networks; every other suffix the any-contrast ones, whose lineage painted
    the training heads with random contrasts."""
    t1w, other = ModelCard.bundled_for("T1w"), ModelCard.bundled_for("FLAIR")
    assert t1w is ModelCard.load() and t1w.bundled and other.bundled and t1w.sha256 != other.sha256
    assert all(ModelCard.bundled_for(s) is other for s in ("T2w", "PDw", "T2starw"))
    for unknown in ("T3w", "t1w", "MP2RAGE"):  # a typo or a suffix the app does not strip: said, not any-contrast
        with pytest.raises(ValueError, match=f"^contrast {unknown}: unknown"):
            ModelCard.bundled_for(unknown)
    assert other.painted_contrasts and not t1w.painted_contrasts
    assert other.path.parent.name == "weights_any_contrast" and other.segmenter_file.is_file()


def test_a_files_contrast_comes_from_the_option_else_its_bids_suffix_else_t1w():
    from bids_skullstrip.discovery import contrast_of

    names = {"sub-01_FLAIR.nii.gz": "FLAIR", "flair.nii": "FLAIR", "sub-01.v2_acq-tse_T2w.NII.GZ": "T2w",
             "sub-01_ce-gadolinium_T1w.nii.gz": "T1w", "t1.nii.gz": "T1w", "brain_mask.nii.gz": "T1w",
             "/data/sub-01_FLAIR/head.nii": "T1w", "x_pdw.nii.gz": "PDw", "T2.nii.gz": "T2w", "t2_flair.nii": "FLAIR",
             "patient3_pd.nii.gz": "PDw", "t1_post.nii.gz": "T1w", "head.nii.gz": "T1w"}
    assert {name: contrast_of(name) for name in names} == names
    assert (contrast_of("head.nii", "flair"), contrast_of("x_FLAIR.nii", "T1w"), contrast_of("h.nii", "MP2RAGE")) == (
        "FLAIR", "T1w", "MP2RAGE")


def test_weights_that_are_not_there_are_one_line_naming_the_path(tmp_path):
    with pytest.raises(ModelCardError, match=f"^{tmp_path / 'nowhere'}: no model weights there") as caught:
        ModelCard.load(tmp_path / "nowhere")
    assert "\n" not in str(caught.value)


def test_a_truncated_weights_file_is_one_line_naming_it(tmp_path):
    """A copy cut short (a full disk, an interrupted transfer): h5py's message named no file."""
    import shutil as sh

    from bids_skullstrip import Skullstripper
    from bids_skullstrip.model.card import WEIGHTS_DIR

    folder = tmp_path / "weights"
    sh.copytree(WEIGHTS_DIR, folder)
    (folder / "unet.onnx").unlink()  # no export: the Keras weights themselves are read
    weights = folder / "unet.weights.h5"
    weights.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(ModelCardError, match=f"^{weights}: unreadable weights file \\(.*truncated") as caught:
        Skullstripper(weights=folder).mask(np.ones((20, 20, 20), np.float32), np.eye(4))
    assert "\n" not in str(caught.value)


def test_a_weights_file_named_is_the_one_that_runs_or_one_line(tmp_path, caplog):
    """``weights=<folder>/other.weights.h5`` ran the folder's own network (its ONNX export), and a file that is
    not there was accepted: the bundled weights ran, silently."""
    import logging
    import shutil as sh

    from bids_skullstrip import Skullstripper
    from bids_skullstrip.model.card import ANY_CONTRAST_WEIGHTS_DIR, WEIGHTS_DIR

    folder = tmp_path / "weights"
    sh.copytree(WEIGHTS_DIR, folder)
    sh.copyfile(ANY_CONTRAST_WEIGHTS_DIR / "unet.weights.h5", folder / "other.weights.h5")
    with pytest.raises(ModelCardError, match=f"^{folder / 'nope.weights.h5'}: no such weights file"):
        Skullstripper(weights=folder / "nope.weights.h5")
    img = nib.load(SMALL_HEAD)
    data = np.asarray(img.dataobj, np.float32)
    own = Skullstripper(weights=folder).mask(data, img.affine).probability
    with caplog.at_level(logging.WARNING):
        other = Skullstripper(weights=folder / "other.weights.h5").mask(data, img.affine).probability
    assert not np.array_equal(own, other)  # the other segmenter ran (in TensorFlow: it has no export)
    assert any("other.weights.h5: no ONNX export matching model.json" in m for m in caplog.messages)


def test_the_whole_graph_runs_with_the_weights_given_as_an_input(tmp_path, tiny_weights):
    t1w = tmp_path / "head.nii.gz"
    shutil.copyfile(SMALL_HEAD, t1w)
    mask_file, _, qc = _run_embedded(t1w, tmp_path / "work", weights=tiny_weights)

    card, src, mask = ModelCard.load(tiny_weights), nib.load(t1w), nib.load(mask_file)
    assert mask.shape == src.shape and np.array_equal(mask.affine, src.affine)
    assert qc["model"]["sha256"] == card.sha256 and qc["model"]["name"] == "tiny test networks"
    # the tiny networks' mask is the whole field of view (190x192x207 mm), no brain's
    assert np.asarray(mask.dataobj).mean() > 0.99 and qc["brain_volume_ml"] > 7000


def test_importing_the_package_is_cheap_and_its_names_load_on_first_use():
    code = ("import sys, bids_skullstrip as b; heavy = [m for m in ('numpy', 'nipype', 'tensorflow') if m in sys.modules];"
            "names = [getattr(b, n) for n in b.__all__]; print(heavy, len(names), 'tensorflow' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["[]", "8", "False"]  # nothing heavy at import; TensorFlow only when it runs


def _python_blocks(markdown):
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_the_readme_python_example_runs_on_a_real_head(tmp_path, monkeypatch):
    (block,) = _python_blocks((REPO / "README.md").read_text())
    shutil.copyfile(SMALL_HEAD, tmp_path / "T1w.nii.gz")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)

    src = nib.load(tmp_path / "T1w.nii.gz")
    written = nib.load(tmp_path / "T1w_mask.nii.gz")
    assert written.shape == src.shape and np.array_equal(written.affine, src.affine)
    assert np.array_equal(np.asarray(written.dataobj), scope["out"].mask)  # file and array: the same mask
    assert 900 < scope["result"].volume_ml < 1900 and scope["result"].qc_flags() == []
    assert nib.load(tmp_path / "T1w_brain.nii.gz").get_data_dtype() == src.get_data_dtype()
    assert scope["wf"].get_node("skullstrip") is not None


def test_skullstrip_file_checks_everything_before_writing_anything(tmp_path):
    from bids_skullstrip import skullstrip_file
    from bids_skullstrip.nifti import InputError

    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match=f"^{bad}: "):
        skullstrip_file(bad, mask=tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match="must be between 0 and 1"):
        skullstrip_file(SMALL_HEAD, mask=tmp_path / "m.nii.gz", threshold=1.5)
    with pytest.raises(ValueError, match="output names must end in .nii or .nii.gz"):
        skullstrip_file(SMALL_HEAD, mask=tmp_path / "m.nrrd")
    with pytest.raises(ValueError, match="output folder not found"):
        skullstrip_file(SMALL_HEAD, brain=tmp_path / "nowhere" / "b.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.nii.gz"]


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    """A volume of pure noise the size of a head: the networks still draw a "brain" in it."""
    path = tmp_path_factory.mktemp("noise") / "noise.nii.gz"
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.normal(100, 30, (160, 192, 160)).astype(np.float32), np.diag([1.2] * 3 + [1])), path)
    return path


def _skullstrip(*args):
    exe = Path(sys.executable).with_name("skullstrip")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_skullstrip_runs_the_qc_and_fail_on_flag_exits_3(tmp_path, noise):
    res = _skullstrip("-i", noise, "-m", tmp_path / "m.nii.gz", "--threads", "2", "--fail-on-flag")
    assert res.returncode == 3, res.stderr
    qc_lines = [line for line in res.stderr.splitlines() if line.startswith(f"skullstrip: warning: {noise}: QC: ")]
    notes = [line for line in res.stderr.splitlines() if line.startswith(f"skullstrip: note: {noise}: QC: ")]
    said = [line for line in res.stderr.splitlines() if line.startswith(f"skullstrip: warning: {noise}: neighbouring "
                                                                        "voxels are uncorrelated")]
    assert len(said) == 1 and "looks like noise without a head" in said[0], res.stderr
    assert len(qc_lines) >= 3 and len(qc_lines) + len(notes) + 1 == len(res.stderr.strip().splitlines()), res.stderr
    # the noise describes the image: a note, not one of the flags that make the status 3
    assert any("noise relative to brain intensity" in line for line in notes), res.stderr
    assert not any("noise relative" in line for line in qc_lines), res.stderr
    assert nib.load(tmp_path / "m.nii.gz").shape == (160, 192, 160)  # the outputs are written all the same
    # without --fail-on-flag flags are warnings and the status is 0: test_skullstrip_takes_the_weights


def test_skullstrip_takes_the_weights(tmp_path, tiny_weights):
    res = _skullstrip("-i", SMALL_HEAD, "-m", tmp_path / "m.nii.gz", "--weights", tiny_weights, "--threads", "2")
    assert res.returncode == 0 and "brain volume" in res.stderr, res.stderr  # the tiny networks' whole-FOV mask
    assert np.asarray(nib.load(tmp_path / "m.nii.gz").dataobj).mean() > 0.99
    res = _skullstrip("-i", SMALL_HEAD, "-m", tmp_path / "m.nii.gz", "--weights", tmp_path / "none")
    assert res.returncode == 1 and res.stderr.strip() == (
        f"skullstrip: error: {tmp_path / 'none'}: no model weights there (a folder with model.json and the weights "
        "files, or its model card, is expected)")


def _record(output_dir, t1w, threshold, border_mm, sha256):
    from bids_skullstrip import outputs

    path = outputs.derivative_path(output_dir, t1w, "metrics")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"source": t1w.source_uri, "bids_name": t1w.stem, "suffix": t1w.suffix,
                                "model": {"sha256": sha256},
                                "settings": {"threshold": threshold, "border_mm": border_mm, "model_sha256": sha256}}))


def test_the_methods_text_says_what_the_outputs_hold_and_when_they_differ(tmp_path):
    from bids_skullstrip import __version__, outputs
    from bids_skullstrip.discovery import collect_images
    from bids_skullstrip.reports.boilerplate import write_boilerplate

    card, out = ModelCard.load(), tmp_path / "out"
    outputs.init_output_dir(out, SAMPLE)
    md, _ = write_boilerplate(out, threshold=0.42, border_mm=0.0)  # nothing made yet: the run's own settings
    first = md.read_text()
    assert "thresholded at 0.42" in first and "not all processed with the same settings" not in first
    # cites the software and its weights, built from the model card
    assert f"bids_skullstrip* {__version__} [bids_skullstrip]" in first and card.sha256 in first
    assert card.locator_sha256 in first and f"{card.locator_voxel_mm:g} mm grid" in first
    assert f"on a {card.voxel_mm:g} mm grid" in first and "public T1w heads" in first

    # three images at 0.7 (an earlier run for everyone), one redone at the default afterwards
    t1ws = collect_images(SAMPLE)
    for t1w in t1ws[:3]:
        _record(out, t1w, 0.7, 0.0, card.sha256)
    _record(out, t1ws[3], 0.55, 2.0, card.sha256)
    text = write_boilerplate(out, threshold=0.55, border_mm=0.0)[0].read_text()
    # nor a threshold of its own where a contrast's images differ (0.2.0: the most common one, or the first of a tie)
    assert "thresholded at the thresholds listed below, reduced" in text and "0.55" not in text.split("**")[0]
    assert "**The images were not all processed with the same settings**" in text
    assert f"- 3 image(s) thresholded at 0.7, border 0 mm, model sha256 `{card.sha256[:12]}`" in text
    assert "- 1 image(s) thresholded at 0.55, border 2 mm" in text and t1ws[3].path.name in text  # the raw file
    # the main text gives no border of its own where they differ (0.2.0: "then grown by 2 mm", of one image of 4)
    assert "hole-filled, then grown or shrunk by the border listed below." in text and "grown by 2" not in text
    assert "Each image was corrected for intensity non-uniformity" in text


def test_the_methods_text_gives_each_contrasts_threshold(tmp_path):
    """One network set strips FLAIR, T2w and PDw: a threshold given for FLAIR and T2w in a later run leaves PDw's
    as it was, and the text says which contrast got which."""
    from bids_skullstrip import outputs
    from bids_skullstrip.discovery import StructuralInput
    from bids_skullstrip.reports.boilerplate import write_boilerplate

    out = tmp_path / "out"
    outputs.init_output_dir(out, SAMPLE)
    any_contrast = ModelCard.bundled_for("FLAIR").sha256
    for suffix, threshold, sha in (("T1w", 0.55, ModelCard.load().sha256), ("FLAIR", 0.7, any_contrast),
                                   ("T2w", 0.7, any_contrast), ("PDw", 0.6, any_contrast)):
        _record(out, StructuralInput.from_path(SAMPLE / "sub-01" / "anat" / f"sub-01_{suffix}.nii.gz"), threshold,
                0.0, sha)
    text = write_boilerplate(out, threshold=None, border_mm=0.0)[0].read_text()
    said = re.search(r"thresholded at (.*?), reduced", text).group(1)
    assert sorted(re.split(r", | and (?=\d)", said)) == ["0.55 (T1w)", "0.6 (PDw)", "0.7 (FLAIR and T2w)"], said


def test_the_methods_text_names_weights_that_are_not_the_bundled_ones(tmp_path):
    from bids_skullstrip import outputs
    from bids_skullstrip.discovery import collect_images
    from bids_skullstrip.reports.boilerplate import write_boilerplate

    out = tmp_path / "out"
    outputs.init_output_dir(out, SAMPLE)
    for t1w in collect_images(SAMPLE):
        _record(out, t1w, 0.5, 0.0, "ab" * 32)
    text = write_boilerplate(out, threshold=0.55, border_mm=0.0)[0].read_text()
    assert f"weights (sha256 `{'ab' * 32}`) are not the ones bundled" in text and "thresholded at 0.5," in text


def test_licence_citation_and_changelog_agree_with_the_package():
    import configparser

    import yaml

    from bids_skullstrip import __version__

    licence = (REPO / "LICENSE").read_text()
    assert licence.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in licence
    assert "END OF TERMS AND CONDITIONS" in licence and len(licence) > 11000  # the whole text, not a stub
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert {"message", "title", "authors"} <= set(cff) and all("name" in a or "family-names" in a for a in cff["authors"])
    assert cff["license"] == setup["metadata"]["license"] == "Apache-2.0"
    assert str(cff["version"]) == __version__ and cff["repository-code"] == setup["metadata"]["url"]
    assert re.search(rf"^## \[{re.escape(__version__)}\] - \d{{4}}-\d\d-\d\d$", (REPO / "CHANGELOG.md").read_text(), re.M)


def test_the_readme_accuracy_table_quotes_the_model_card():
    """The README's numbers are the model card's, measured here: none typed in by hand."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**Accuracy**"):readme.index("**Requirements**")]
    numbers = re.findall(r"\b0\.9\d{2,4}\b", section)
    card = (REPO / "docs" / "model_card.md").read_text()
    assert len(numbers) >= 8 and [n for n in numbers if n not in card] == []
    for tool in ("deepbet", "ROBEX", "HD-BET", "SynthStrip"):
        assert tool in section
    assert "foramen magnum" in readme and "docker build -t bids_skullstrip ." in readme


def _section(doc, title):
    """The names a numpydoc section lists (its unindented lines, split at commas), up to the next section."""
    import inspect

    lines = inspect.cleandoc(doc).splitlines() + [""]
    names = []
    for i in range(lines.index(title) + 2, len(lines) - 1):  # after the title and its underline
        if set(lines[i + 1]) == {"-"}:
            break
        if lines[i] and not lines[i].startswith(" "):
            names += [n.strip().split(" :")[0] for n in lines[i].split(",")]
    return names


def test_the_workflow_factories_document_every_input_and_output():
    from bids_skullstrip.workflows.base import T1W_OUTPUTS, init_ds_t1w_wf

    wf = init_t1w_wf()
    assert set(_section(init_t1w_wf.__doc__, "Inputs")) == set(wf.get_node("inputnode").inputs.copyable_trait_names())
    assert set(_section(init_t1w_wf.__doc__, "Outputs")) == set(T1W_OUTPUTS)
    ds = init_ds_t1w_wf(output_dir="/out", bids_dir="/bids", threshold=0.5)
    assert set(_section(init_ds_t1w_wf.__doc__, "Inputs")) == set(ds.get_node("inputnode").inputs.copyable_trait_names())
    assert _section(init_ds_t1w_wf.__doc__, "Outputs") == ["out_files"]


def test_the_group_report_explains_each_measure_in_itself(tmp_path):
    """pip and container users have no docs/: what a measure means is text of the report, not only a tooltip."""
    import html

    from bids_skullstrip import outputs, qc
    from bids_skullstrip.discovery import collect_images
    from bids_skullstrip.reports.group import write_group_report

    out = tmp_path / "out"
    outputs.init_output_dir(out, SAMPLE)
    measures = {"brain_volume_ml": 1200.0, "dark_fraction": 0.1, "noise_ratio": 0.05, "edge_offset_mm": -2.0}
    for image in collect_images(SAMPLE):
        path = outputs.derivative_path(out, image, "metrics")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"bids_name": image.name, "qc": measures, "flags": []}))
        outputs.derivative_path(out, image, "mask").touch()  # a finished image has its mask
    (report,) = [p for p in write_group_report(out, thumbnails=False) if str(p).endswith(".html")]
    text = re.sub(r'title="[^"]*"', "", html.unescape(Path(report).read_text()))  # tooltips do not count
    for key in ("dark_fraction", "noise_ratio", "edge_offset_mm"):
        assert qc.MEASURE_HELP[key] in text, key
    assert qc.accepted_range("noise_ratio") in text


def test_weights_that_are_not_there_stop_the_graph_being_built(tmp_path):
    with pytest.raises(ModelCardError, match=f"^{tmp_path / 'nowhere'}: no model weights there"):
        init_t1w_wf(weights=tmp_path / "nowhere")


@pytest.mark.parametrize("call, error, message", [
    (lambda s, d, a: s.mask("T1w.nii.gz", a), TypeError, "a 3D volume of real numbers is needed"),
    (lambda s, d, a: s.mask(d[..., None].repeat(2, -1), a), ValueError, "a 3D volume is needed"),
    (lambda s, d, a: s.mask(d[..., 0], a), ValueError, "a 3D volume is needed"),
    (lambda s, d, a: s.mask(d > 0, a), TypeError, "of type bool"),
    (lambda s, d, a: s.mask(d, np.full((4, 4), np.nan)), ValueError, "invertible 4x4"),
    (lambda s, d, a: s.mask(d, a[:3, :3]), ValueError, "4x4"),
    (lambda s, d, a: s.mask(d, None), ValueError, "4x4"),
    (lambda s, d, a: s.mask(d, a, threshold=1), ValueError, "threshold 1: must be between 0 and 1"),
    (lambda s, d, a: s.mask(d, a, threshold="a"), ValueError, "threshold 'a': not a number"),
    (lambda s, d, a: s.mask(d, a, border_mm=-500), ValueError, "border -500: must be between -20 and 20 mm"),
    (lambda s, d, a: s.mask(d, a, border_mm=float("inf")), ValueError, "border inf: must be between -20 and 20 mm"),
])
def test_the_array_api_says_what_is_wrong_in_one_line(call, error, message):
    """Wrong arguments to ``Skullstripper`` get a one-line error naming the problem, before the networks run
    (a red-team pass met numpy's and TensorFlow's own errors, and silent empty or whole-field masks)."""
    from bids_skullstrip import Skullstripper

    img = nib.load(SMALL_HEAD)
    with pytest.raises(error, match=re.escape(message)) as caught:
        call(Skullstripper(), np.asarray(img.dataobj), img.affine)
    assert "\n" not in str(caught.value)


def test_one_skullstripper_serves_several_threads_and_pickles_after_use():
    """From a thread pool every call but one raised OpenVINO's "Infer Request is busy" (the compiled network's own
    request serves one call at a time); a used Skullstripper could not be pickled ("cannot pickle
    'CompiledModel' object") for a process pool."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    from bids_skullstrip import Skullstripper

    img = nib.load(SMALL_HEAD)
    data = np.asarray(img.dataobj, np.float32)
    stripper = Skullstripper()
    serial = stripper.mask(data, img.affine)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda shift: stripper.mask(np.roll(data, shift, axis=0), img.affine), range(4)))
    for shift, result in enumerate(results):  # each the mask of a call of its own
        assert np.array_equal(result.mask, stripper.mask(np.roll(data, shift, axis=0), img.affine).mask), shift
    again = pickle.loads(pickle.dumps(stripper))
    assert np.array_equal(again.mask(data, img.affine).mask, serial.mask)


def test_intensities_near_float32s_limit_give_the_same_mask_and_no_numpy_warning():
    """A float image scaled by 1e36: the NaN check's one-pass sum overflowed and numpy printed "RuntimeWarning:
    overflow encountered in reduce" on the console of every run."""
    import warnings

    from bids_skullstrip import Skullstripper

    img = nib.load(SMALL_HEAD)
    data = np.asarray(img.dataobj, np.float32)
    stripper = Skullstripper()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        huge = stripper.mask(data * np.float32(1e36 / data.max()), img.affine)
    assert huge.warnings == [] and np.array_equal(huge.mask, stripper.mask(data, img.affine).mask)


def test_a_few_nan_voxels_in_an_array_are_set_to_0_with_a_warning():
    """10 NaN voxels of 629,280 emptied the mask, and the warning blamed the locator."""
    from bids_skullstrip import Skullstripper

    img = nib.load(SMALL_HEAD)
    data = np.asarray(img.dataobj, np.float32)
    stripper = Skullstripper()
    clean = stripper.mask(data, img.affine)
    holed = data.copy()
    holed.flat[np.random.default_rng(0).choice(data.size, 10, replace=False)] = np.nan
    result = stripper.mask(holed, img.affine)
    assert result.warnings == ["10 NaN/infinite voxels set to 0"]
    assert (result.mask != clean.mask).sum() < 0.001 * clean.mask.sum()
    with pytest.raises(ValueError, match="threshold 2: must be between 0 and 1"):
        Skullstripper(threshold=2)


def test_skullstrip_file_refuses_an_unknown_contrast(tmp_path):
    """``contrast="T3w"`` fell back to the any-contrast networks silently (the command line says so since 0.2.0)."""
    from bids_skullstrip import skullstrip_file

    with pytest.raises(ValueError, match=r"contrast T3w: unknown \(one of T1w, T2w, FLAIR, PDw, T2starw\)"):
        skullstrip_file(SMALL_HEAD, mask=tmp_path / "m.nii.gz", contrast="T3w")
    assert list(tmp_path.iterdir()) == []
