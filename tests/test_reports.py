"""Reports as a user sees them: a small output directory built from real heads, participant and group reports
written, then opened in headless Chromium (screenshot, every image loads, no console errors)."""

import base64
import csv
import html as htmlmod
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _ci import needs, skip_unless_present
from PIL import Image
from scipy import ndimage as ndi

from bids_skullstrip import qc
from bids_skullstrip.nifti import atomic_save, atomic_write_text, like
from bids_skullstrip.reports.common import ReportError
from bids_skullstrip.reports.group import write_group_report
from bids_skullstrip.reports.participant import write_participant_report
from bids_skullstrip.reports.reportlets import plot_mask_mosaic

HEADS = Path(__file__).parents[1].parent / "shared" / "data" / "heads"
CHROMIUM = shutil.which("chromium")
needs_heads = needs(HEADS / "ds000011-sub-13", "the shared heads")
needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="headless browser check needs the Debian package `chromium`")

# (participant, session, head, corruption): small real heads; one broken mask that must be flagged.
SPECS = [
    ("01", None, "ds000011-sub-13", None),
    ("02", "1", "xa30-tfl-2mm", None),
    ("02", "2", "niivue-t1-2mm", None),
    ("03", None, "ds000011-sub-14", "shift"),
]


def _make_image(out, sub, ses, head, corruption):
    img = nib.load(str(HEADS / head / "T1w.nii.gz"))
    t1 = img.get_fdata(dtype=np.float32)
    mask = np.asarray(nib.load(str(HEADS / head / "mask_silver.nii.gz")).dataobj) > 0
    vox = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    if corruption == "shift":  # 16 mm along the second voxel axis
        mask = np.roll(mask, int(round(16 / vox[1])), axis=1)
    prob = ndi.gaussian_filter(mask.astype(np.float32), sigma=1.5 / vox)
    stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    anat = out / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    atomic_save(like(img, t1, np.float32), anat / f"{stem}_desc-preproc_T1w.nii.gz")
    atomic_save(like(img, mask, np.uint8), anat / f"{stem}_desc-brain_mask.nii.gz")
    atomic_save(like(img, prob, np.float32), anat / f"{stem}_label-brain_probseg.nii.gz")
    measures = qc.qc_measures(t1, prob, mask.astype(np.uint8), vox)
    metrics = {
        "source": f"bids:raw:sub-{sub}/" + (f"ses-{ses}/" if ses else "") + f"anat/{stem}_T1w.nii.gz",
        "bids_name": stem,
        "shape": list(t1.shape),
        "voxel_size_mm": [round(float(v), 4) for v in vox],
        "orientation": "".join(nib.aff2axcodes(img.affine)),
        "brain_volume_ml": measures["brain_volume_ml"],
        "brain_voxels": int(mask.sum()),
        "runtime_s": {"n4": 3.2, "conform": 0.4, "inference": 11.5, "postprocess": 0.8},
        "software_version": "0.1.0",
        "model": {"name": "unet3d-2mm", "sha256": "0" * 64},
        "warnings": ["qform and sform disagree; the sform was used"] if sub == "02" and ses == "2" else [],
        "qc": measures,
        "flags": qc.flag_image(measures),
    }
    atomic_write_text(anat / f"{stem}_desc-brain_metrics.json", json.dumps(metrics, indent=1))
    plot_mask_mosaic(anat / f"{stem}_desc-preproc_T1w.nii.gz", anat / f"{stem}_desc-brain_mask.nii.gz",
                     anat / f"{stem}_label-brain_probseg.nii.gz",
                     out / f"sub-{sub}" / "figures" / f"{stem}_desc-brain_mask.svg",
                     brain_file=out / f"sub-{sub}" / "figures" / f"{stem}_desc-brain_T1w.svg")
    return stem, metrics


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    skip_unless_present(HEADS / "ds000011-sub-13", "the shared heads")
    out = tmp_path_factory.mktemp("derivatives") / "bids_skullstrip"
    out.mkdir()
    info = {}
    for spec in SPECS:
        stem, metrics = _make_image(out, *spec)
        info[stem] = metrics
    for sub in sorted({s[0] for s in SPECS}):
        errors = ["t1w_wf.n4: ANTs N4 failed: example error"] if sub == "03" else ()
        write_participant_report(out, sub, errors=errors)
    write_group_report(out)
    return out, info


# ------------------------------------------------------------------------------------------ content checks

@needs_heads
def test_figures_are_small_svg(outdir):
    out, _ = outdir
    figs = sorted(out.glob("sub-*/figures/*_desc-brain_mask.svg"))
    assert len(figs) == len(SPECS)
    for f in figs:
        text = f.read_text()
        assert text.startswith("<svg") and text.rstrip().endswith("</svg>")
        assert f.stat().st_size < 300_000, f"{f.name}: {f.stat().st_size} bytes"
        assert text.count("<image") == 18 and 'stroke="#ff3b30"' in text


def _panel_rasters(svg_text):
    """The palette indices of every panel raster embedded in a mosaic SVG."""
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
            for data in re.findall(r'href="data:image/png;base64,([^"]+)"', svg_text)]


@needs_heads
def test_before_after_figures_share_the_layout_and_the_after_is_the_brain_alone(outdir):
    from bids_skullstrip.reports.reportlets import GRAY_LEVELS

    out, _ = outdir
    for before in sorted(out.glob("sub-*/figures/*_desc-brain_mask.svg")):
        after = before.with_name(before.name.replace("_desc-brain_mask.svg", "_desc-brain_T1w.svg"))
        a, b = before.read_text(), after.read_text()
        assert a.splitlines()[0] == b.splitlines()[0]  # same viewBox and size: one lies exactly over the other
        assert "stroke=" not in b and after.stat().st_size < 300_000
        pairs = list(zip(_panel_rasters(a), _panel_rasters(b)))
        assert len(pairs) == 18
        for head, brain in pairs:
            assert head.shape == brain.shape
            inside = brain > 0
            # the brain's pixels are the head's (without the band's tint), everything else is black
            assert np.array_equal(brain[inside], head[inside] % GRAY_LEVELS)
            assert (brain == 0).mean() > (head == 0).mean()
        assert sum((brain == 0).mean() - (head == 0).mean() for head, brain in pairs) / 18 > 0.05


@needs_heads
def test_participant_report_content(outdir):
    out, info = outdir
    page = (out / "sub-02.html").read_text()
    for stem in ("sub-02_ses-1", "sub-02_ses-2"):
        assert f'src="sub-02/figures/{stem}_desc-brain_mask.svg"' in page
        assert f'class="after" src="sub-02/figures/{stem}_desc-brain_T1w.svg"' in page  # the before/after view
        assert info[stem]["source"] in page
    assert "qform and sform disagree" in page
    assert "unet3d-2mm" in page and "LAS" in page and "RAS" in page
    assert "https://" not in page and "http://" not in page  # no CDN, nothing remote
    bad = (out / "sub-03.html").read_text()
    assert "N4 failed" in bad
    assert "QC flags" in bad  # the shifted mask is flagged


@needs_heads
def test_group_tsv_one_row_per_image(outdir):
    out, info = outdir
    lines = (out / "group_T1w.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    assert header[0] == "bids_name" and len(rows) == len(SPECS)
    assert {r["bids_name"] for r in rows} == set(info)
    for col in ("brain_volume_ml", "size_x", "spacing_z", "uncertain_fraction", "boundary_contrast", "flags"):
        assert col in header
    assert rows[0]["bids_name"] == "sub-03" and int(rows[0]["n_flags"]) > 0  # flagged first
    assert all(int(r["n_flags"]) == 0 for r in rows[1:])
    vol = {r["bids_name"]: float(r["brain_volume_ml"]) for r in rows}
    assert vol["sub-01"] == pytest.approx(info["sub-01"]["brain_volume_ml"], rel=1e-4)


def test_group_report_without_metrics_is_a_clear_error(tmp_path):
    (tmp_path / "sub-01" / "anat").mkdir(parents=True)
    with pytest.raises(ReportError, match="no per-image metrics"):
        write_group_report(tmp_path)


def test_participant_report_survives_broken_metrics(tmp_path):
    anat = tmp_path / "sub-09" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-09_desc-brain_metrics.json").write_text("{not json")
    page = write_participant_report(tmp_path, "sub-09", errors=["crashed"]).read_text()
    assert "unreadable metrics file" in page and "crashed" in page


# ------------------------------------------------------------------------------------------ browser checks

PROBE = """<script>
window.__errs = [];
window.addEventListener("error", function (e) {
  window.__errs.push(e.message ? "js: " + e.message : "resource: " + (e.target && (e.target.src || e.target.href)));
}, true);
(function () { var ce = console.error; console.error = function () {
  window.__errs.push("console: " + Array.prototype.join.call(arguments, " ")); ce.apply(console, arguments); }; })();
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  imgs.forEach(function (i) { i.loading = "eager"; });
  Promise.all(imgs.map(function (i) {
    return (i.complete && i.naturalWidth > 0) ? 0 : new Promise(function (r) {
      i.addEventListener("load", r); i.addEventListener("error", r); setTimeout(r, 4000); });
  })).then(function () {
    var res = {n: imgs.length, errors: window.__errs,
               bad: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                        .map(function (i) { return i.getAttribute("src"); })};
    var th = Array.prototype.filter.call(document.querySelectorAll("th"), function (t) {
      return t.textContent.indexOf("brain volume") === 0; })[0];
    if (th) { th.click(); var row = document.querySelector("#group-table tbody tr");
              res.sorted_first = row.cells[1].textContent.trim(); }
    document.body.setAttribute("data-probe", JSON.stringify(res));
  });
});
</script>"""

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


def _chromium(args, tmp_path):
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def probe(page, tmp_path):
    """Open a copy of ``page`` (same folder, so relative links hold) with a probe script; return its result."""
    page = Path(page)
    probe_page = page.with_name(f".probe-{page.name}")
    text = page.read_text()
    probe_page.write_text(text.replace("<head>", "<head>\n" + PROBE, 1))
    try:
        res = _chromium(["--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", "--dump-dom",
                         probe_page.as_uri()], tmp_path)
    finally:
        probe_page.unlink()
    m = re.search(r'data-probe="([^"]*)"', res.stdout)
    assert m, f"probe did not finish: {res.stderr[-2000:]}"
    result = json.loads(htmlmod.unescape(m.group(1)))
    result["console"] = [line for line in res.stderr.splitlines()
                         if "CONSOLE" in line or "Uncaught" in line]
    return result


def screenshot(page, png, tmp_path):
    res = _chromium(["--hide-scrollbars", "--window-size=1400,2000", f"--screenshot={png}", Path(page).as_uri()],
                    tmp_path)
    assert Path(png).exists() and Path(png).stat().st_size > 10_000, res.stderr[-2000:]


def _shots_dir(tmp_path):
    # kept for people to look at (pytest keeps the last 3 runs' tmp folders)
    return tmp_path


@needs_heads
@needs_chromium
@pytest.mark.parametrize("page", ["sub-01.html", "sub-02.html", "sub-03.html", "group_T1w.html"])
def test_report_renders_in_chromium(outdir, page, tmp_path):
    out, _ = outdir
    result = probe(out / page, tmp_path)
    assert result["n"] >= 1
    assert result["bad"] == [], f"images that did not load: {result['bad']}"
    assert result["errors"] == [], f"page errors: {result['errors']}"
    assert result["console"] == [], f"console output: {result['console']}"
    if page == "group_T1w.html":
        assert result["n"] == len(SPECS) + 1  # thumbnails + distributions
        # one click on "brain volume" sorts descending: the largest brain first
        vols = {s: json.loads(p.read_text())["brain_volume_ml"]
                for p in out.glob("sub-*/**/anat/*_metrics.json") for s in [p.name.split("_desc")[0]]}
        assert result["sorted_first"] == max(vols, key=vols.get)
    shot = _shots_dir(tmp_path) / f"{page}.png"
    screenshot(out / page, shot, tmp_path)


@needs_heads
@needs_chromium
def test_browser_check_can_fail(outdir, tmp_path):
    """The probe must notice a missing figure and a script error (otherwise the checks above prove nothing)."""
    out, _ = outdir
    page = out / "sub-01.html"
    broken = out / "broken-sub-01.html"
    broken.write_text(page.read_text().replace("_desc-brain_mask.svg", "_desc-missing.svg")
                      .replace("</body>", "<script>undefinedFunction();</script></body>"))
    try:
        result = probe(broken, tmp_path)
    finally:
        broken.unlink()
    assert result["bad"], "a missing figure went unnoticed"
    assert any("undefinedFunction" in e for e in result["errors"]), result


def test_outputs_of_one_participant_are_found_in_its_folder_only(tmp_path):
    from bids_skullstrip.outputs import find_outputs

    for sub in ("01", "010", "02"):
        anat = tmp_path / f"sub-{sub}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-{sub}_desc-brain_metrics.json").write_text("{}")
    (tmp_path / "sub-01" / "anat" / ".tmp-1-ab-sub-01_desc-brain_metrics.json").write_text("")  # a write in progress
    assert [p.name for p in find_outputs(tmp_path, "metrics", participant="01")] == ["sub-01_desc-brain_metrics.json"]
    assert len(find_outputs(tmp_path, "metrics")) == 3
    # several participants' reports from one query of the folder
    from bids_skullstrip.reports.participant import metrics_by_participant

    found = metrics_by_participant(tmp_path, ["01", "02", "03"])
    assert {label: [p.name for p in paths] for label, paths in found.items()} == {
        "01": ["sub-01_desc-brain_metrics.json"], "02": ["sub-02_desc-brain_metrics.json"], "03": []}
    assert find_outputs(tmp_path, "metrics", participant=[]) == []


def test_output_names_of_every_contrast_come_from_one_spec(tmp_path):
    from bids_skullstrip import outputs
    from bids_skullstrip.discovery import StructuralInput

    sources = [f"sub-01_ses-1_{rest}.nii.gz" for rest in
               ("T1w", "ce-gadolinium_T1w", "acq-2d_run-1_T1w", "T2w", "FLAIR", "rec-norm_PDw", "T2starw",
                "chunk-1_FLAIR", "run-2_chunk-2_T1w")]
    images = [StructuralInput.from_path(name) for name in sources]
    # the T1w's names are the ones users rely on, unchanged
    t1w = {kind: outputs.derivative_path("", images[0], kind).as_posix() for kind in outputs.OUTPUTS}
    assert t1w == {kind: f"sub-01/ses-1/anat/sub-01_ses-1_{tail}" for kind, tail in (
        ("mask", "desc-brain_mask.nii.gz"), ("preproc", "desc-preproc_T1w.nii.gz"),
        ("brain", "desc-brain_T1w.nii.gz"), ("probseg", "label-brain_probseg.nii.gz"),
        ("metrics", "desc-brain_metrics.json"))}
    flair = images[4]
    assert outputs.derivative_path("", flair, "mask").name == "sub-01_ses-1_space-FLAIR_desc-brain_mask.nii.gz"
    assert outputs.derivative_path("", flair, "brain").name == "sub-01_ses-1_desc-brain_FLAIR.nii.gz"
    assert outputs.figure_path("", flair).name == "sub-01_ses-1_space-FLAIR_desc-brain_mask.svg"
    assert outputs.sidecar("mask", flair)["SpatialReference"] == "bids:raw:sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz"
    assert outputs.sidecar("brain", flair)["Sources"] == [
        "bids::sub-01/ses-1/anat/sub-01_ses-1_desc-preproc_FLAIR.nii.gz",
        "bids::sub-01/ses-1/anat/sub-01_ses-1_space-FLAIR_desc-brain_mask.nii.gz"]
    # BIDS orders space- before chunk- (it came after: a validator error, red-team 18)
    assert outputs.derivative_path("", images[7], "probseg").name == \
        "sub-01_ses-1_space-FLAIR_chunk-1_label-brain_probseg.nii.gz"
    assert outputs.derivative_path("", images[8], "mask").name == "sub-01_ses-1_run-2_chunk-2_desc-brain_mask.nii.gz"
    # no two images share a name; every name (sidecars and figures too) leads back to its image
    names = {}
    for image in images:
        paths = [outputs.derivative_path(tmp_path, image, kind) for kind in outputs.OUTPUTS]
        paths += [outputs.sidecar_path(p) for p in paths if p.name.endswith(".nii.gz")]
        paths += [outputs.figure_path(tmp_path, image, kind) for kind in outputs.FIGURES]
        for path in paths:
            assert path not in names, (path.name, names.get(path), image.name)
            names[path] = image.name
            assert outputs.source_of(path).relpath == image.relpath, path.name
    # the readers find each contrast's outputs by the same spec
    for path in names:
        if path.parent.name == "anat":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
    for image in images:
        assert outputs.find_outputs(tmp_path, "mask", suffix=image.suffix) == sorted(
            outputs.derivative_path(tmp_path, i, "mask") for i in images if i.suffix == image.suffix)
    assert len(outputs.find_outputs(tmp_path, "metrics")) == len(images)


def _metrics(out, name, *, threshold=0.55, qc_measures=None):
    """A metrics JSON as the participant level writes it (only what the group level reads)."""
    from bids_skullstrip import outputs
    from bids_skullstrip.discovery import StructuralInput

    image = StructuralInput.from_path(name)
    path = outputs.derivative_path(out, image, "metrics")
    path.parent.mkdir(parents=True, exist_ok=True)
    measures = qc_measures or {"brain_volume_ml": 1400.0, "edge_offset_mm": -2.0, "noise_ratio": 0.05}
    flags = qc.flag_image(measures, image.suffix)
    path.write_text(json.dumps({"source": image.source_uri, "qc": measures, "flags": flags,
                                "settings": {"threshold": threshold, "border_mm": 0.0, "model_sha256": "ab" * 32,
                                             "software_version": "0.1.0"}}))
    outputs.derivative_path(out, image, "mask").touch()  # a finished image has its mask
    return image


def test_group_level_when_every_image_failed(tmp_path):
    """No crash (was: TypeError: ufunc 'invert' not supported), an HTML report, failed images not flagged."""
    from bids_skullstrip import outputs
    from bids_skullstrip.discovery import StructuralInput

    for name in ("sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz"):
        outputs.record_failure(tmp_path, StructuralInput.from_path(name), f"{name}: not a readable NIfTI")
    tsv, html = write_group_report(tmp_path)
    with tsv.open() as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [(r["status"], r["n_flags"], r["flags"]) for r in rows] == [("failed", "0", "")] * 2
    assert "not a readable NIfTI" in rows[0]["error"]
    page = html.read_text()
    assert "0 flagged · 2 failed" in page and "2 of 2 images failed" in page and "No mask is flagged" in page
    # no participant report yet (a participant run still going): no link to it; then a link to its errors
    assert 'href="sub-01.html' not in page
    (tmp_path / "sub-01.html").write_text("<html></html>")
    assert 'href="sub-01.html#errors"' in write_group_report(tmp_path)[1].read_text()


def test_group_report_shows_each_images_settings_and_warns_when_they_differ(tmp_path, caplog):
    for i, threshold in enumerate((0.7, 0.7, 0.55), 1):
        _metrics(tmp_path, f"sub-0{i}_T1w.nii.gz", threshold=threshold)
    with caplog.at_level("WARNING", logger="bids_skullstrip"):
        tsv, html = write_group_report(tmp_path, thumbnails=False)
    with tsv.open() as fh:
        rows = {r["participant_id"]: r for r in csv.DictReader(fh, delimiter="\t")}
    assert [rows[f"sub-0{i}"]["threshold"] for i in (1, 2, 3)] == ["0.7", "0.7", "0.55"]
    assert {r["model_sha256"] for r in rows.values()} == {"ab" * 32} and rows["sub-01"]["border_mm"] == "0"
    assert "not all processed with the same settings" in html.read_text()
    assert "threshold: 0.7 (2 images), 0.55 (1 image)" in html.read_text()
    assert any("not all processed with the same threshold: 0.7 (2), 0.55 (1)" in m for m in caplog.messages)
    # the same settings everywhere: no warning
    _metrics(tmp_path, "sub-03_T1w.nii.gz", threshold=0.7)
    assert "not all processed" not in write_group_report(tmp_path, thumbnails=False)[1].read_text()
    # an unreadable metrics file is named, not counted as a setting of its own ("n/a")
    (tmp_path / "sub-04" / "anat").mkdir(parents=True)
    (tmp_path / "sub-04" / "anat" / "sub-04_desc-brain_metrics.json").write_text('{"settings": {"thresh')
    caplog.clear()
    with caplog.at_level("WARNING", logger="bids_skullstrip"):
        html = write_group_report(tmp_path, thumbnails=False)[1].read_text()
    assert "not all processed" not in html and not any("not all processed" in m for m in caplog.messages)
    named = [m for m in caplog.messages if "sub-04_desc-brain_metrics.json: unreadable metrics file" in m]
    assert named, caplog.messages


def test_group_report_of_some_participants_only(tmp_path):
    for i in (1, 2, 3):
        _metrics(tmp_path, f"sub-0{i}_T1w.nii.gz")
    _metrics(tmp_path, "sub-02_FLAIR.nii.gz")
    paths = write_group_report(tmp_path, participants=["sub-02"], thumbnails=False)
    assert sorted(p.name for p in paths) == ["group_FLAIR.html", "group_FLAIR.tsv", "group_T1w.html", "group_T1w.tsv"]
    for tsv in (tmp_path / "group_T1w.tsv", tmp_path / "group_FLAIR.tsv"):
        with tsv.open() as fh:
            assert [r["participant_id"] for r in csv.DictReader(fh, delimiter="\t")] == ["sub-02"]
    with pytest.raises(ReportError, match="participant"):
        write_group_report(tmp_path, participants=["09"])
    # the FLAIR outputs deleted: the group level of the whole folder removes their report (0.2.0 left it, describing
    # images that are gone); of some participants, it leaves the others' reports alone
    next(tmp_path.glob("sub-02/anat/*FLAIR*metrics.json")).unlink()
    write_group_report(tmp_path, participants=["sub-01"], thumbnails=False)
    assert (tmp_path / "group_FLAIR.tsv").is_file()
    assert sorted(p.name for p in write_group_report(tmp_path, thumbnails=False)) == ["group_T1w.html", "group_T1w.tsv"]
    assert not (tmp_path / "group_FLAIR.tsv").exists() and not (tmp_path / "group_FLAIR.html").exists()


def test_each_contrast_is_judged_and_shown_by_its_own_limits(tmp_path):
    """A bright CSF rim (edge offset +1.2 mm, brain-like band 0.55) is a flag on a T1w and how a good T2w looks:
    the group level flags the one and not the other, and each report shows the range its image was judged by."""
    from bids_skullstrip import outputs

    rim = {"brain_volume_ml": 1400.0, "brain_voxels": 1.4e6, "edge_offset_mm": 1.2, "outside_brainlike_fraction": 0.55}
    _metrics(tmp_path, "sub-01_T1w.nii.gz", qc_measures=rim)
    _metrics(tmp_path, "sub-01_T2w.nii.gz", qc_measures=rim)
    older = _metrics(tmp_path, "sub-02_T2w.nii.gz", qc_measures=rim)  # judged by 0.2.0, by the T1w limits
    path = outputs.derivative_path(tmp_path, older, "metrics")
    path.write_text(json.dumps({**json.loads(path.read_text()), "flags": qc.flag_image(rim, "T1w")}))
    write_group_report(tmp_path, thumbnails=False)
    for suffix, flags, shown in (("T1w", ["2"], "-6.0 to 0.5 mm"), ("T2w", ["0", "0"], "-3.0 to 2.0 mm")):
        with (tmp_path / f"group_{suffix}.tsv").open() as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        assert [r["n_flags"] for r in rows] == flags, (suffix, [r["flags"] for r in rows])
        assert shown in (tmp_path / f"group_{suffix}.html").read_text()
    page = htmlmod.unescape(write_participant_report(tmp_path, "01").read_text())
    # the T1w: its table's range and its flag's; the T2w: its table's range, no flag
    assert page.count("-6.0 to 0.5 mm") == 2 and page.count("-3.0 to 2.0 mm") == 1


def test_group_axes_read_plainly_when_values_cluster(tmp_path):
    """Clustered values gave offset tick labels ('1e−6+3.246e−1') and ticks that overlapped."""
    from bids_skullstrip.reports.group import plot_distributions

    rows = [{"_status": "processed", "flags": [], "qc": {"brain_volume_ml": 1400.0 + i,
                                                          "edge_contrast": 0.3246 + 1e-6 * i}} for i in range(9)]
    svg = plot_distributions(rows, tmp_path / "d.svg").read_text()
    labels = re.findall(r">([^<>]{1,40})</text>", svg)
    assert not any(re.search(r"e[−-]\d", t) for t in labels), labels
    ticks = [t for t in labels if t.startswith("0.3246")]
    assert 2 <= len(ticks) <= 5, labels


def test_thumbnail_cuts_through_the_middle_of_the_brain():
    from bids_skullstrip.reports.reportlets import _cuts

    mask = np.zeros((40, 50, 60), bool)
    mask[10:31, 5:46, 20:41] = True
    assert [_cuts(mask, axis, 1, n)[0] for axis, n in enumerate(mask.shape)] == [20, 25, 30]


def test_an_earlier_output_folder_learns_to_ignore_every_contrasts_group_table(tmp_path):
    from bids_skullstrip import outputs

    (tmp_path / ".bidsignore").write_text("*.html\nfigures\n*_metrics.json\ngroup_T1w.tsv\nlogs\nmy_notes.txt\n")
    outputs.init_output_dir(tmp_path, Path(__file__).parents[1] / "data" / "sample_bids")
    lines = (tmp_path / ".bidsignore").read_text().splitlines()
    assert "group_*.tsv" in lines and "my_notes.txt" in lines and len(lines) == len(set(lines))
    outputs.init_output_dir(tmp_path, Path(__file__).parents[1] / "data" / "sample_bids")
    assert (tmp_path / ".bidsignore").read_text().splitlines() == lines


def test_group_table_names_each_images_entities(tmp_path):
    """Multi-echo and multi-part images of one contrast differed only by bids_name in the TSV (0.2.0); chunks did,
    and joined, the tables of two contrasts did not say which row was whose (red-team 12)."""
    for name in ("sub-01_echo-1_part-mag_T2starw.nii.gz", "sub-01_echo-2_part-mag_T2starw.nii.gz",
                 "sub-01_inv-2_run-1_T1w.nii.gz", "sub-01_chunk-2_T1w.nii.gz"):
        _metrics(tmp_path, name)
    write_group_report(tmp_path, thumbnails=False)
    with (tmp_path / "group_T2starw.tsv").open() as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [(r["echo_id"], r["part_id"]) for r in rows] == [("1", "mag"), ("2", "mag")]
    with (tmp_path / "group_T1w.tsv").open() as fh:
        chunk, row = sorted(csv.DictReader(fh, delimiter="\t"), key=lambda r: r["bids_name"])
    assert (row["inv_id"], row["run_id"], row["echo_id"], row["suffix"]) == ("2", "1", "n/a", "T1w")
    assert (chunk["chunk_id"], chunk["inv_id"]) == ("2", "n/a")
    assert {r["suffix"] for r in rows} == {"T2starw"}


def test_about_this_run_names_each_contrasts_networks_once_with_every_threshold_used():
    """Images of one contrast stripped at two thresholds (a rerun of some with --threshold): the report's model line
    names the contrast once, with both thresholds, not once per threshold as if two networks had made them."""
    from bids_skullstrip.reports.participant import run_about

    def record(suffix, sha, threshold):
        return {"_suffix": suffix, "model": {"name": f"net {sha}", "sha256": sha * 64},
                "settings": {"threshold": threshold}}

    about = run_about([record("T1w", "a", 0.55), record("T1w", "a", 0.7), record("FLAIR", "b", 0.6),
                       record("T2w", "b", 0.6), record("T1w", "a", 0.55)])
    lines = about["model"].split("; ")
    assert lines == [f"T1w: net a (sha256 {'a' * 12}, thresholds 0.55, 0.7: they differ between images, each "
                     "image's settings name its own)",
                     f"FLAIR, T2w: net b (sha256 {'b' * 12}, threshold 0.6)"], lines


def test_failure_records_that_are_not_an_images_are_skipped(tmp_path):
    """A failure record 0.1.0 named ``<stem>.json`` (no success removes it: the image failed for good, red-team 14)
    or whose source is not an image's name (it stopped every run with "ValueError: substring not found") is not
    read as a failure."""
    from bids_skullstrip import outputs

    failed = tmp_path / outputs.FAILURES_DIR
    failed.mkdir(parents=True)
    records = {"sub-01.json": "sub-01/anat/sub-01_T1w.nii.gz", "weird.json": "sub-01/anat/sub-01.nii.gz",
               "sub-02_T1w.json": "sub-02/anat/sub-02_T1w.nii.gz"}
    for name, source in records.items():
        (failed / name).write_text(json.dumps({"source": f"bids:raw:{source}", "error": f"{name} failed"}))
    assert [(image.name, error) for image, error in outputs.recorded_failures(tmp_path)] == [
        ("sub-02_T1w", "sub-02_T1w.json failed")]


def test_reported_participants_are_those_of_reports_and_outputs_named_so(tmp_path):
    from bids_skullstrip.reports.participant import reported_participants

    for name in ("sub-01.html", "sub-01_old.html", "sub-.html", "sub-a b.html"):
        (tmp_path / name).write_text("")
    (tmp_path / "sub-dir.html").mkdir()
    assert reported_participants(tmp_path) == {"01"}
