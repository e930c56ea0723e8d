"""Bad input, interrupted and concurrent runs, through the real command-line programs.

Every bad case must give a one-line error naming the file and the problem, a non-zero exit status, no
traceback, no partial output and an untouched input; one bad image must not stop the others.
"""

import contextlib
import datetime
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
from scipy import ndimage as ndi
from _ci import needs, unavailable

from bids_skullstrip.nifti import geometry_warnings, load_image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample_bids"
SMALL_HEAD = SAMPLE / "sub-02" / "anat" / "sub-02_T1w.nii.gz"  # real ITK head, 2x2x3 mm: fast


def _exe(name, module):
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


def app(*args, timeout=1200, **kw):
    return subprocess.run([*_exe("bids_skullstrip", "bids_skullstrip.cli.run"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, **kw)


def app_patched(patch, *args, tmp_path, timeout=600):
    """The app in a fresh interpreter after ``patch`` (Python source, run first: it wraps a function of the app so
    that a fault happens at a chosen moment)."""
    script = tmp_path / "patched_app.py"
    script.write_text(f"import os, signal, sys\n{textwrap.dedent(patch)}\n"
                      "from bids_skullstrip.cli import run\nsys.exit(run.main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def skullstrip(*args):
    return subprocess.run([*_exe("skullstrip", "bids_skullstrip.cli.single_file"), *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def make_dataset(root, images):
    """A BIDS dataset with one T1w per participant: {label: writer(path)}."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "robustness", "BIDSVersion": "1.10.0"}))
    paths = {}
    for label, write in images.items():
        path = root / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
        path.parent.mkdir(parents=True)
        write(path)
        paths[label] = path
    return paths


def copy_head(path):
    shutil.copyfile(SMALL_HEAD, path)


def folder_and_a_t2w(path):
    path.mkdir()
    copy_head(path.with_name(path.name.replace("_T1w", "_T2w")))


def nifti(data, affine=None):
    def write(path):
        nib.save(nib.Nifti1Image(np.asarray(data), np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), path)
    return write


def truncated(path):
    raw = SMALL_HEAD.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])


def not_nifti(path):
    path.write_bytes(gzip.compress(b"this is a text file, not an image\n"))


def nan_image(path):
    nifti(np.full((40, 40, 40), np.nan, np.float32))(path)


def twins(path):
    """The image twice: as .nii.gz and as .nii."""
    copy_head(path)
    nib.save(nib.load(SMALL_HEAD), path.with_suffix(""))


def with_raw_header(**fields):
    """The head with header fields set in its bytes as written (nibabel would fix or refuse them)."""
    def write(path):
        head = nib.load(SMALL_HEAD)
        raw = bytearray(nib.Nifti1Image(np.asanyarray(head.dataobj), head.affine, head.header).to_bytes())
        header = np.ndarray((), dtype=nib.nifti1.header_dtype, buffer=raw)
        for name, value in fields.items():
            if name == "pixdim1":
                header["pixdim"][1] = value
            else:
                header[name] = value
        path.write_bytes(gzip.compress(bytes(raw)))
    return write


def snapshot(folder):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in Path(folder).rglob("*") if p.is_file()}


def assert_one_line_errors(res):
    text = res.stdout + res.stderr
    assert "Traceback" not in text, text[-3000:]


# ------------------------------------------------------------------------------- one bad image among good ones
@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    paths = make_dataset(root / "bids", {
        "01": copy_head,
        "02": truncated,
        "03": not_nifti,
        "04": nifti(rng.random((64, 64), dtype=np.float32) * 100),  # 2D
        "05": nifti(np.zeros((40, 40, 40), np.int16)),  # all zero
        "06": nan_image,
        "07": nifti(rng.random((30, 30, 30, 3), dtype=np.float32) * 100),  # 4D time series
        "08": twins,
        "09": folder_and_a_t2w,  # a folder named as the T1w image: pybids skipped it in silence
        "10": Path.mkdir,  # the same, the participant's only entry: pybids does not see the participant at all
        "11": with_raw_header(pixdim1=-1.0, qform_code=99),  # fixed by nibabel: processed, said once by name
        "12": with_raw_header(vox_offset=0),  # read from its header's first byte, a mask 16 mm off (red-team 18)
    })
    before = snapshot(root / "bids")
    out = root / "out"
    res = app(root / "bids", out, "participant", "-w", root / "work", "--skip-bids-validation", "--n-cpus", "2")
    return {"res": res, "out": out, "paths": paths, "before": before, "bids": root / "bids"}


EXPECTED_PROBLEM = {
    "02": "truncated or corrupt",
    "03": "not a readable NIfTI",
    "04": "not a 3D volume",
    "05": "constant",
    "06": "NaN",
    "07": "volumes",
    "08": "the image is there twice, as sub-08_T1w.nii.gz and sub-08_T1w.nii: remove one",
    "09": "a folder named as an image, not an image file",
    "10": "a folder named as an image, not an image file",
    "12": "not a readable NIfTI image (vox_offset 0: the voxels of a single-file NIfTI start at byte 352 or later",
}


@pytest.mark.parametrize("relpath, says", [
    ("sub-01/anat/sub-01_ses-1_T1w.nii.gz", "its name puts it in sub-01/ses-1/anat/, not in sub-01/anat/"),
    ("sub-01/ses-1/anat/sub-01_T1w.nii.gz", "its name puts it in sub-01/anat/, not in sub-01/ses-1/anat/"),
    ("sub-01/ses-2/anat/sub-01_ses-1_FLAIR.nii.gz",
     "its name puts it in sub-01/ses-1/anat/, not in sub-01/ses-2/anat/"),
    ("sub-02/anat/sub-01_T1w.nii.gz", "its name puts it in sub-01/anat/, not in sub-02/anat/"),
    ("sub-01/ses-1/anat/sub-01_ses-1_acq-mp_ce-gadolinium_T1w.nii.gz", None),
    ("sub-01/anat/sub-01_run-1_T2w.nii", None),
])
def test_an_image_in_a_folder_its_name_does_not_say_fails_alone(relpath, says, tmp_path):
    """Its outputs went where it lies and every reader looked where its name says: a good mask "missing" in the
    reports and the group table, and each rerun "already finished" (red-team 19; --skip-bids-validation)."""
    from bids_skullstrip.discovery import StructuralInput, misplaced

    image = StructuralInput.from_path(tmp_path / relpath, tmp_path)
    problem = misplaced(image)
    assert problem == (None if says is None else f"{relpath}: {says}: move it there or rename it")


def test_bad_images_fail_alone_with_one_line_each(mixed_run):
    res = mixed_run["res"]
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert_one_line_errors(res)
    text = res.stdout + res.stderr
    for label, problem in EXPECTED_PROBLEM.items():
        lines = [line for line in text.splitlines() if f"sub-{label}_T1w.nii.gz" in line and problem in line]
        assert lines, f"no one-line error for sub-{label} ({problem!r}) in:\n{text[-3000:]}"
        # by its place in the dataset, as the others (red-team 15: some gave the absolute path)
        assert all(str(mixed_run["bids"]) not in line for line in lines), lines
    assert f"{len(EXPECTED_PROBLEM)} of 12 image(s) failed" in text


def test_header_fields_nibabel_fixes_are_said_once_by_the_file_s_name(mixed_run):
    """nibabel's own lines (``pixdim[1,2,3] should be positive...``) reached the console six times per image, naming
    no file (red-team 18): now only the app's warning, which names it."""
    text = mixed_run["res"].stdout + mixed_run["res"].stderr
    for fix in ("pixdim[1,2,3] should be positive", "qform_code 99 not valid"):
        lines = [line for line in text.splitlines() if fix in line]
        assert len(lines) == 1 and "sub-11/anat/sub-11_T1w.nii.gz: invalid header field fixed on load" in lines[0], \
            text[-3000:]
    assert (mixed_run["out"] / "sub-11" / "anat" / "sub-11_desc-brain_mask.nii.gz").is_file()


def test_good_image_finished_bad_ones_left_no_output(mixed_run):
    out = mixed_run["out"]
    assert (out / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz").is_file()
    assert (out / "sub-01" / "anat" / "sub-01_desc-brain_metrics.json").is_file()
    for label in EXPECTED_PROBLEM:
        anat = out / f"sub-{label}" / "anat"
        assert not anat.exists() or not any(anat.iterdir()), sorted(anat.iterdir())
    assert not list(out.rglob(".tmp-*"))


def test_inputs_untouched(mixed_run):
    assert snapshot(mixed_run["bids"]) == mixed_run["before"]


def test_participant_report_lists_the_failure(mixed_run):
    html = (mixed_run["out"] / "sub-02.html").read_text()
    assert "truncated or corrupt" in html


def test_group_report_keeps_the_failed_images_and_joins_participants_tsv(mixed_run):
    import csv

    res = app(mixed_run["bids"], mixed_run["out"], "group")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    with (mixed_run["out"] / "group_T1w.tsv").open() as fh:
        rows = {r["participant_id"]: r for r in csv.DictReader(fh, delimiter="\t")}
    assert set(rows) == {f"sub-{i:02d}" for i in range(1, 13)}
    assert rows["sub-01"]["status"] == "processed" and rows["sub-01"]["session_id"] == "n/a"
    assert rows["sub-11"]["status"] == "processed"
    for label, problem in EXPECTED_PROBLEM.items():
        row = rows[f"sub-{label}"]
        assert row["status"] == "failed" and problem in row["error"] and row["n_flags"] == "0", row
    html = (mixed_run["out"] / "group_T1w.html").read_text()
    assert all(f"sub-{label}_T1w" in html or f"sub-{label}" in html for label in EXPECTED_PROBLEM)


# ------------------------------------------------------------------------------- usage errors (no workflow)
@pytest.fixture
def small_dataset(tmp_path):
    make_dataset(tmp_path / "bids", {"01": copy_head})
    return tmp_path / "bids"


@pytest.mark.parametrize("case, expected_rc, expected", [
    ("same_dir", 2, "must not be the input dataset"),
    ("inside", 2, "inside the input dataset"),
    ("work_inside", 2, "the work directory is inside the input dataset; use a folder outside it"),
    ("work_is_output", 2, "the work directory is the output folder; use another folder (-w)"),  # taken (red-team 10b)
    # taken, and the derivatives failed the validator (NOT_INCLUDED; red-team 18)
    ("work_inside_output", 2, "the work directory is inside the output folder, which would then hold nipype's files"),
    ("output_is_derivatives", 2, "the output folder is the dataset's derivatives folder itself; use a folder of its "
                                 "own under it"),  # written straight into derivatives/ (red-team 18)
    # fMRIPrep's mask and preprocessed T1w were replaced, and taken for this app's own earlier outputs (red-team 18)
    ("output_of_another_pipeline", 2, "the output folder is the derivatives of fMRIPrep, whose files this run would "
                                      "replace or mix with its own"),
    ("output_a_raw_dataset", 2, "the output folder is a raw BIDS dataset (other), whose files this run would"),
    ("border_inf", 2, "--border inf: must be between -20 and 20 mm"),  # every image failed, the outputs made
    ("plugin_args_list", 2, '--plugin-args ["-p ci"]: plugin arguments are a JSON object'),  # a ValueError, 1
    # a ValueError or a TypeError (1), some once the output folder was made (red-team 10b)
    ("plugin_args_no_procs", 2, "--plugin-args: n_procs 0 must be a whole number of processes, 1 or more"),
    ("plugin_args_memory_text", 2, '--plugin-args: memory_gb "lots" must be a number of GB above 0'),
    ("plugin_args_mp_context", 2, '--plugin-args: mp_context "bogus" must be one of fork, spawn'),
    ("unknown_label", 2, "participant label(s) not found: 99"),
    ("empty_label", 2, "an empty participant label was given (available: 01)"),  # was "not found:  (available"
    # pybids' messages ended in "Example contents of 'dataset_description.json':)"; a list "Name missing"
    ("description_not_json", 2, "dataset_description.json: not valid JSON (Expecting property name enclosed in "
                                "double quotes at line 1, column 2)"),
    ("description_a_list", 2, "dataset_description.json: a JSON list, where a JSON object with the dataset's Name"),
    ("description_with_bom", 2, "dataset_description.json: starts with a byte-order mark (BOM)"),
    ("not_writable", 2, "not writable"),
    ("work_not_writable", 2, "the work directory is not writable"),
    ("output_is_a_file", 2, "the output folder is a file, not a folder"),
    ("no_description", 2, "not a BIDS dataset"),
    ("missing_dir", 2, "BIDS dataset folder not found"),
    ("empty", 2, "no participants"),
    ("bad_filter", 2, "cannot read the BIDS filter file"),
    ("filter_matches_nothing", 2, "no T1w images"),
    # pybids' message named the dataset and advised invalid_filters='allow', which no option sets (red-team 18)
    ("filter_short_entity", 2, "f.json: the filter 't1w' sets 'acq', not a BIDS entity pybids knows; its name in a "
                               "filter is 'acquisition'"),
    ("derivative_dataset", 2, "a BIDS-Derivatives dataset"),
    ("unit1_only", 2, "UNIT1/MP2RAGE/T1map image(s); bids_skullstrip processes T1w"),
    ("flair_only", 2, "no T1w images (sub-*/[ses-*/]anat/*_T1w.nii[.gz]) for participant(s) 01 (it has 1 FLAIR "
                      "image(s): strip them with --contrasts FLAIR or all)"),
    ("other_contrasts_absent", 2, "no T2w/FLAIR images (sub-*/[ses-*/]anat/*_{T2w,FLAIR}.nii[.gz]) for participant(s) "
                                  "01 (it has 1 T1w image(s): strip them with --contrasts T1w or all)"),
    ("unknown_plugin", 2, "--plugin Foo: not a nipype plugin (one of"),
    # a ValueError (1) once the output folder was made; 0 ignored; -1 said after the folder was made
    ("mem_nan", 2, "--mem-gb nan: must be a positive number of GB"),
    ("mem_inf", 2, "--mem-gb inf: must be a positive number of GB"),
    ("mem_zero", 2, "--mem-gb 0: must be a positive number of GB"),
    ("mem_mb_negative", 2, "--mem -1: must be a positive number of MB"),
    ("omp_negative", 2, "--omp-nthreads -2: must be 0 (automatic) or more"),  # every image failed in OpenVINO
    # red-team 19: the MB dropped in silence; the first label dropped in silence (sub-01 alone ran, status 0)
    ("mem_twice", 2, "--mem-gb 4 and --mem 100: give the memory once"),
    ("label_twice", 2, "participant label(s) not found: 99"),
    ("ce_contrast", 2, "a contrast-enhanced T1w is a T1w: --contrasts T1w strips it"),
    # pybids' index written into the input (status 0); into the output (the validator's NOT_INCLUDED); another
    # dataset's index: "error: ValueError: ... is not in the subpath of ..." (1)
    ("database_inside_input", 2, "the --bids-database-dir is inside the input dataset; use a folder outside it"),
    ("database_inside_output", 2, "the --bids-database-dir is inside the output folder, which would then hold "
                                  "pybids' index among the derivatives"),
    ("database_of_another_dataset", 2, "db: the pybids database of another dataset ("),
    # another dataset run into this app's outputs of a first one: its Sources named files the first lacks (status 0)
    ("output_of_another_raw_dataset", 2, "the output folder holds the outputs of another raw dataset, "),
])
def test_usage_errors(case, expected_rc, expected, small_dataset, tmp_path):
    bids, out, extra = small_dataset, tmp_path / "out", ["--skip-bids-validation"]
    if case == "same_dir":
        out = bids
    elif case == "inside":
        out = bids / "sub-01" / "out"
    elif case == "work_inside":
        extra += ["-w", bids / "work"]
    elif case == "work_is_output":
        extra += ["-w", out]
    elif case == "work_inside_output":
        extra += ["-w", out / "work"]
    elif case == "output_is_derivatives":
        out = bids / "derivatives"
    elif case in ("output_of_another_pipeline", "output_a_raw_dataset"):
        (out / "sub-01" / "anat").mkdir(parents=True)
        (out / "dataset_description.json").write_text(json.dumps(
            {"Name": "other", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
             "GeneratedBy": [{"Name": "fMRIPrep", "Version": "23.2.0"}]} if case == "output_of_another_pipeline"
            else {"Name": "other", "BIDSVersion": "1.10.0"}))
        (out / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz").write_bytes(b"theirs")
        theirs = snapshot(out)
    elif case == "border_inf":
        extra += ["--border", "inf"]
    elif case == "plugin_args_list":
        extra += ["--plugin-args", '["-p ci"]']
    elif case.startswith("plugin_args_"):
        extra += ["--plugin-args", {"plugin_args_no_procs": '{"n_procs": 0}', "plugin_args_memory_text":
                                    '{"memory_gb": "lots"}', "plugin_args_mp_context": '{"mp_context": "bogus"}'}[case]]
    elif case == "unknown_label":
        extra += ["--participant-label", "sub-99"]
    elif case == "empty_label":
        extra += ["--participant-label", ""]
    elif case.startswith("description_"):
        description = bids / "dataset_description.json"
        text = description.read_text()
        description.write_bytes({"description_not_json": b"{not json", "description_a_list": b"[1, 2]",
                                 "description_with_bom": b"\xef\xbb\xbf" + text.encode()}[case])
    elif case == "not_writable":
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "out"
    elif case == "work_not_writable":  # the output folder it created is removed again
        (tmp_path / "a_file").write_text("x")
        extra += ["-w", tmp_path / "a_file" / "work"]
        out = tmp_path / "new" / "out"
    elif case == "output_is_a_file":
        out = tmp_path / "a_file"
        out.write_text("x")
    elif case == "no_description":
        (bids / "dataset_description.json").unlink()
    elif case == "missing_dir":
        bids = tmp_path / "nowhere"
    elif case == "empty":
        shutil.rmtree(bids / "sub-01")
    elif case == "bad_filter":
        (tmp_path / "f.json").write_text("{not json")
        extra += ["--bids-filter-file", tmp_path / "f.json"]
    elif case == "filter_short_entity":
        (tmp_path / "f.json").write_text(json.dumps({"t1w": {"acq": "mprage"}}))
        extra += ["--bids-filter-file", tmp_path / "f.json"]
    elif case == "filter_matches_nothing":
        (tmp_path / "f.json").write_text(json.dumps({"t1w": {"acquisition": "nosuchacq"}}))
        extra += ["--bids-filter-file", tmp_path / "f.json"]
    elif case == "derivative_dataset":
        (bids / "dataset_description.json").write_text(json.dumps(
            {"Name": "fmriprep", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}))
    elif case == "unknown_plugin":
        extra += ["--plugin", "Foo"]
    elif case.startswith(("mem_", "omp_")):
        extra += {"mem_nan": ["--mem-gb", "nan"], "mem_inf": ["--mem-gb", "inf"], "mem_zero": ["--mem-gb", "0"],
                  "mem_mb_negative": ["--mem", "-1"], "omp_negative": ["--omp-nthreads", "-2"],
                  "mem_twice": ["--mem-gb", "4", "--mem", "100"]}[case]
    elif case == "label_twice":
        extra += ["--participant-label", "99", "--participant-label", "01"]
    elif case == "ce_contrast":
        extra += ["--contrasts", "ce-gadolinium_T1w"]
    elif case == "database_inside_input":
        extra += ["--bids-database-dir", bids / "code" / "db"]
    elif case == "database_inside_output":
        extra += ["--bids-database-dir", out / "db"]
    elif case in ("database_of_another_dataset", "output_of_another_raw_dataset"):
        other = tmp_path / "other"
        make_dataset(other, {"07": copy_head})
        if case == "database_of_another_dataset":
            from bids import BIDSLayout

            BIDSLayout(str(other), database_path=str(tmp_path / "db"))
            extra += ["--bids-database-dir", tmp_path / "db"]
        else:
            from bids_skullstrip.outputs import init_output_dir

            init_output_dir(out, other)
            theirs = snapshot(out)
    elif case == "other_contrasts_absent":
        extra += ["--contrasts", "flair", "T2w"]
    elif case in ("unit1_only", "flair_only"):
        t1w = bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
        t1w.rename(t1w.with_name("sub-01_UNIT1.nii.gz" if case == "unit1_only" else "sub-01_FLAIR.nii.gz"))
    before = snapshot(small_dataset) if small_dataset.exists() else {}
    res = app(bids, out, "participant", *extra)
    assert res.returncode == expected_rc, (res.returncode, res.stdout, res.stderr)
    assert expected in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert_one_line_errors(res)
    if case == "work_inside":
        assert not (bids / "work").exists()
    if case == "work_not_writable":
        assert not (tmp_path / "new").exists()
    if case not in ("same_dir", "inside", "no_description", "empty", "derivative_dataset", "unit1_only",
                    "flair_only") and not case.startswith("description_"):
        assert snapshot(small_dataset) == before
    if case in ("output_of_another_pipeline", "output_a_raw_dataset", "output_of_another_raw_dataset"):
        assert snapshot(out) == theirs
    elif case != "same_dir":
        assert not (out / "sub-01").exists()
    if case in ("unknown_plugin", "border_inf", "label_twice", "ce_contrast") \
            or case.startswith(("mem_", "omp_", "plugin_args_", "database_")):
        assert not out.exists()
    if case == "database_inside_input":
        assert not (bids / "code").exists()


@pytest.mark.parametrize("empty_output_folder", [False, True])
def test_group_level_before_any_participant_run_is_a_usage_error(empty_output_folder, tmp_path):
    """The same status (2: nothing to report on) whether or not the output folder exists."""
    make_dataset(tmp_path / "bids", {"01": copy_head})
    out = tmp_path / "out"
    if empty_output_folder:
        out.mkdir()
    res = app(tmp_path / "bids", out, "group")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "run the participant level first" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_validator_that_crashes_is_one_warning_and_the_run_goes_on(tmp_path):
    """The validator (deno) dies under a `ulimit -v` of 16 GB and on a file name that is not UTF-8 anywhere in the
    dataset: the run stopped (2) with a cut-off stack trace in colour codes. It judged nothing: the run goes on
    and says why in one line."""
    bids = tmp_path / "bids"
    make_dataset(bids, {"01": copy_head})
    fake = tmp_path / "bin" / "bids-validator-deno"  # found on PATH before the venv's
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nprintf '\\033[31m#\\n# Fatal process out of memory: Oilpan: CagedHeap reservation.\\n"
                    "#\\n==== C stack trace ===\\033[0m\\n' >&2\nexit 133\n")
    fake.chmod(0o755)
    res = app(bids, tmp_path / "out", "participant", "-w", tmp_path / "w",
              env={**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    [said] = [line for line in res.stdout.splitlines() if "BIDS validator" in line]
    assert "could not run (exit 133: # Fatal process out of memory: Oilpan: CagedHeap reservation.)" in said, said
    assert "\x1b" not in said and "processed" in res.stdout


def test_an_image_whose_output_names_would_be_too_long_fails_alone(small_dataset, tmp_path):
    """A legal 244-character name (a long acq- label) gave output names over 255 bytes: an OSError ended the run
    (no reports, no line per image), and every rerun failed at once in the "already finished?" check."""
    long_name = f"sub-01_acq-{'z' * 222}_T1w.nii.gz"
    copy_head(small_dataset / "sub-01" / "anat" / long_name)
    for attempt in range(2):
        res = app(small_dataset, tmp_path / "out", "participant", "-w", tmp_path / "work", "--skip-bids-validation")
        assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
        assert_one_line_errors(res)
        [line] = [line for line in res.stdout.splitlines() if line.startswith(f"  sub-01/anat/{long_name}: ")]
        assert "would have a file name of 260 bytes, more than the 255 file systems allow" in line, line
    assert (tmp_path / "out" / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz").is_file()
    assert (tmp_path / "out" / "sub-01.html").is_file()


def test_of_two_images_of_one_file_name_in_two_folders_the_misplaced_one_fails_in_one_line(small_dataset, tmp_path):
    """A misplaced copy (``sub-01/ses-1/anat/sub-01_T1w.nii.gz``, only --skip-bids-validation lets it through) shared
    the lock, figures and records of its name: the second image was "left to another run", the run itself, on
    every rerun (red-team 18); then both failed. The one where its name says is processed (red-team 19)."""
    misplaced = small_dataset / "sub-01" / "ses-1" / "anat" / "sub-01_T1w.nii.gz"
    misplaced.parent.mkdir(parents=True)
    copy_head(misplaced)
    out = tmp_path / "out"
    res = app(small_dataset, out, "participant", "-w", tmp_path / "work", "--skip-bids-validation")
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert_one_line_errors(res)
    assert ("1 of 2 image(s) failed:\n  sub-01/ses-1/anat/sub-01_T1w.nii.gz: its name puts it in sub-01/anat/, not in "
            "sub-01/ses-1/anat/: move it there or rename it") in res.stdout + res.stderr, res.stdout[-2000:]
    assert "another run" not in res.stdout + res.stderr
    assert (out / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz").is_file()
    assert not (out / "sub-01" / "ses-1").exists()


def test_a_rerun_redoes_an_image_whose_outputs_were_damaged_and_says_why(small_dataset, tmp_path):
    """A mask replaced by another image, a sidecar deleted or broken, an output deleted: the rerun said "1 already
    finished" and kept the damaged files (a deleted NIfTI was redone, but without a word)."""
    out, work = tmp_path / "out", tmp_path / "work"
    args = [small_dataset, out, "participant", "-w", work, "--skip-bids-validation"]
    assert app(*args).returncode == 0
    anat = out / "sub-01" / "anat"
    mask = anat / "sub-01_desc-brain_mask.nii.gz"
    damages = [
        (lambda: nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), str(mask)),
         "sub-01_desc-brain_mask.nii.gz has the shape 10x10x10, not the raw image's"),
        (lambda: (anat / "sub-01_desc-preproc_T1w.json").write_text("{ not json"),
         "sub-01_desc-preproc_T1w.json is missing or not a JSON object"),
        (lambda: (anat / "sub-01_desc-brain_metrics.json").write_text("[]"),
         "sub-01_desc-brain_metrics.json is missing or not a JSON object"),  # was a 400-character settings line
        (lambda: (anat / "sub-01_desc-brain_T1w.nii.gz").unlink(), "its brain output is missing"),
        (lambda: mask.unlink(), "its mask output is missing"),  # redone without a word (red-team 18)
        # the raw image replaced by another of its shape (re-converted, defaced): its old outputs were kept as
        # finished (red-team 18)
        (lambda: nib.save(nib.Nifti1Image(np.flip(np.asanyarray(nib.load(str(raw)).dataobj), 0), raw_img.affine,
                                          raw_img.header), str(raw)),
         "the raw image is not the file its outputs were made from (changed or replaced since: another sha256)"),
    ]
    raw = small_dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    raw_img = nib.load(str(raw))
    for damage, said in damages:
        damage()
        res = app(*args)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert f"  redoing sub-01/anat/sub-01_T1w.nii.gz: {said}" in res.stdout, res.stdout[-2000:]
        assert "1 processed in this run" in res.stdout
        _assert_outputs_complete(out, "01")
        assert nib.load(str(mask)).shape == nib.load(str(SMALL_HEAD)).shape
    # the same bytes with another time (a copy of the dataset) are the same image
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    res = app(*args)
    assert res.returncode == 0 and "1 already finished" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


def test_an_empty_image_fails_alone_with_the_validator_on(tmp_path):
    """The validator's EMPTY_FILE stopped the whole run (2) where a truncated image fails alone: the app judges an
    image's content itself (``JUDGED_BY_THE_APP``)."""
    bids = tmp_path / "bids"
    make_dataset(bids, {"01": copy_head, "02": lambda path: path.write_bytes(b"")})
    res = app(bids, tmp_path / "out", "participant", "-w", tmp_path / "w")
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "sub-02_T1w.nii.gz: empty file (0 bytes)" in res.stdout + res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
    assert (tmp_path / "out" / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz").is_file()


def test_the_validator_gate_is_scoped_to_what_the_run_reads(tmp_path):
    """As fMRIPrep: an error in a selected T1w (here its sidecar) stops the run with one line; errors in
    another participant's files do not stop a run that selects only the first."""
    bids = tmp_path / "bids"
    make_dataset(bids, {"01": copy_head, "02": copy_head})
    (bids / "sub-02" / "anat" / "sub-02_T1w.json").write_text("{not json")
    (bids / "sub-02" / "anat" / "sub-02_T1w_extra.nii.gz").write_bytes(SMALL_HEAD.read_bytes())
    # what the run does not read either: a stray top-level file, an optional field in the wrong format
    (bids / "columns").write_text("")
    description = json.loads((bids / "dataset_description.json").read_text())
    (bids / "dataset_description.json").write_text(json.dumps(dict(description, ReferencesAndLinks="a string")))
    res = app(bids, tmp_path / "out", "participant")
    assert res.returncode == 2
    assert "BIDS validator found" in res.stderr and "sub-02_T1w.json" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    only_01 = app(bids, tmp_path / "out", "participant", "--participant-label", "01", "-w", tmp_path / "w")
    assert only_01.returncode == 0, only_01.stdout[-2000:] + only_01.stderr[-2000:]
    assert "error(s) ignored: in files this run does not read" in only_01.stdout
    assert (tmp_path / "out" / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz").is_file()


def test_what_the_run_reads_from_the_top_level():
    from bids_skullstrip.discovery import _read_by_run

    reads = ["sub-01/anat/sub-01_acq-mp_T1w.nii.gz"]
    read = [{"location": "/sub-01/anat/sub-01_acq-mp_T1w.json", "code": "JSON_INVALID"},
            {"location": "/acq-mp_T1w.json", "code": "JSON_INVALID"},  # inherited by the selected T1w
            {"location": "/sub-01/sub-01_T1w.json", "code": "JSON_INVALID"},  # so is the subject level's
            {"location": "/dataset_description.json", "code": "JSON_INVALID"},
            {"location": "", "code": "SOMETHING_OF_THE_DATASET"}]
    not_read = [{"location": "/sub-02/anat/sub-02_T1w.json", "code": "JSON_INVALID"},
                {"location": "/sub-02/sub-02_T1w.json", "code": "JSON_INVALID"},  # another participant's
                {"location": "/sub-01/sub-01_T2w.json", "code": "JSON_INVALID"},  # another contrast's
                {"location": "/task-rest_bold.json", "code": "JSON_INVALID"},
                {"location": "/annex-uuid", "code": "NOT_INCLUDED"},
                # an image's content: the app reads it itself and fails that image alone
                {"location": "/sub-01/anat/sub-01_acq-mp_T1w.nii.gz", "code": "NIFTI_HEADER_UNREADABLE"},
                {"location": "/dataset_description.json", "code": "JSON_SCHEMA_VALIDATION_ERROR"}]
    assert all(_read_by_run(i, reads) for i in read)
    assert not any(_read_by_run(i, reads) for i in not_read)


def test_a_validator_issue_is_said_in_one_line_naming_its_key():
    """SIDECAR_KEY_REQUIRED came as nine lines of the specification's field description, without the missing key
    (red-team 12)."""
    from bids_skullstrip.discovery import _issue_text

    issue = {"code": "SIDECAR_KEY_REQUIRED", "subCode": "EchoTime", "location": "/sub-01/anat/sub-01_T2starw.nii.gz",
             "issueMessage": "Field description: The echo time (TE) for the acquisition, specified in seconds.\n"
                             "Corresponds to [DICOM Tag 0018, 0081]\n`Echo Time`\n" + "more text " * 40}
    assert _issue_text(issue) == ("SIDECAR_KEY_REQUIRED (EchoTime): /sub-01/anat/sub-01_T2starw.nii.gz Field "
                                  "description: The echo time (TE) for the acquisition, specified in seconds.")
    assert _issue_text({"code": "JSON_INVALID", "location": "/x.json", "issueMessage": "word " * 100}).endswith("...")


# ------------------------------------------------------------------------------- QC flags on the console
def noise_volume(path):
    """Pure noise on the small head's grid: the networks still draw a "brain" in it, far too large, which QC flags
    (a noisy image alone is a note, not a flag: docs/qc.md)."""
    img = nib.load(SMALL_HEAD)
    rng = np.random.default_rng(1)
    nib.save(nib.Nifti1Image(rng.normal(100, 30, img.shape).astype(np.float32), img.affine), path)


def head_with_codes_unset(path):
    """The small head with neither qform nor sform set: stripped with a warning (nifti.geometry_warnings)."""
    img = nib.load(SMALL_HEAD)
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    nib.save(img, path)


def test_flagged_images_are_listed_and_fail_on_flag_sets_status_3(tmp_path):
    """... and each image's warnings are said on the console by the run that made its outputs (0.2.0 wrote them
    only into the metrics JSON and the report: "the field of view is a slab", "already skull-stripped")."""
    bids = tmp_path / "bids"
    make_dataset(bids, {"01": head_with_codes_unset, "02": noise_volume})
    out, work = tmp_path / "out", tmp_path / "work"
    args = [bids, out, "participant", "-w", work, "--skip-bids-validation", "--n-cpus", "2"]
    res = app(*args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = res.stdout + res.stderr
    assert "2 image(s): 2 processed in this run, 0 already finished, 0 failed, 1 flagged by QC" in text, text
    flagged = [line for line in text.splitlines() if "flagged by QC: " in line]
    assert len(flagged) == 1 and "sub-02/anat/sub-02_T1w.nii.gz" in flagged[0] and "brain volume" in flagged[0]
    assert str(out / "sub-02.html") in flagged[0]
    assert "progress: 2 of 2 image(s) finished" in text, text
    warned = [line for line in text.splitlines() if "  warning: " in line]
    # the small head is stored L-S-A: read L-A-S without its codes, it is seen with its axes swapped back
    assert len(warned) == 3 and warned[0] == ("  warning: sub-01/anat/sub-01_T1w.nii.gz: neither qform nor sform is "
                                              "set: orientation is a guess from the voxel sizes"), warned
    assert warned[1].startswith("  warning: sub-01/anat/sub-01_T1w.nii.gz: the networks' views agree far better with "
                                "the image's axes read as R-S-A, not L-A-S as its header has them"), warned
    assert re.fullmatch(r"  warning: sub-02/anat/sub-02_T1w.nii.gz: neighbouring voxels are uncorrelated \(-?0\.0\d; "
                        r"real images 0\.86 or more\): the image looks like noise without a head; its mask means "
                        r"nothing", warned[2]), warned
    again = app(*args, "--fail-on-flag")  # the finished images are not redone; their flags still count
    assert again.returncode == 3, again.stdout[-3000:] + again.stderr[-3000:]
    assert "0 processed in this run, 2 already finished" in again.stdout + again.stderr
    assert "  warning: " not in again.stdout + again.stderr  # said by the run that made the outputs
    # the group level: its report's flags (it accepted --fail-on-flag and exited 0 over them)
    group = app(bids, out, "group", "--fail-on-flag")
    text = group.stdout + group.stderr
    assert group.returncode == 3, text[-3000:]
    flagged = [line for line in text.splitlines() if "flagged by QC: " in line]
    assert len(flagged) == 1 and "sub-02_T1w" in flagged[0] and "brain volume" in flagged[0], text
    assert "1 image(s) flagged by QC in the group report (--fail-on-flag): exit status 3" in text, text
    assert app(bids, out, "group", "--fail-on-flag", "--participant-label", "01").returncode == 0


def test_rerun_with_other_settings_redoes_the_image_and_the_same_settings_skip_it(tmp_path):
    bids = tmp_path / "bids"
    make_dataset(bids, {"01": copy_head})
    out, work = tmp_path / "out", tmp_path / "work"
    args = [bids, out, "participant", "-w", work, "--skip-bids-validation", "--n-cpus", "2"]
    assert app(*args).returncode == 0
    anat = out / "sub-01" / "anat"
    mask, metrics = anat / "sub-01_desc-brain_mask.nii.gz", anat / "sub-01_desc-brain_metrics.json"
    methods = (out / "logs" / "CITATION.md").read_text()
    from bids_skullstrip.model.inference import default_threshold

    assert f"thresholded at {default_threshold():g}" in methods
    assert "N4" in methods and "doi:10.1109/TMI.2010.2046908" in methods and "nipype" in methods.lower()
    assert "<h1>" in (out / "logs" / "CITATION.html").read_text()
    recorded = json.loads(metrics.read_text())["settings"]
    assert recorded["border_mm"] == 0.0 and len(recorded["model_sha256"]) == 64 and recorded["software_version"]
    assert 0 < json.loads(metrics.read_text())["qc"]["view_disagreement"] < 0.05  # from the skull-strip node
    volume = int((np.asanyarray(nib.load(mask).dataobj) > 0).sum())
    res = app(*args, "--threshold", "0.3", "--border", "3")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "redoing sub-01/anat/sub-01_T1w.nii.gz" in res.stdout and "border_mm 0.0 -> 3.0" in res.stdout, res.stdout
    assert "MultiProc plugin, 2 thread(s) per image" in res.stdout, res.stdout  # one image alone: --n-cpus
    # the threshold is recorded per contrast with --threshold too (it was a bare number then, a dict without)
    assert json.loads(sorted((out / "logs").glob("run-*_config.json"))[-1].read_text())["threshold"] == {"T1w": 0.3}
    assert json.loads((anat / "sub-01_desc-brain_mask.json").read_text())["Threshold"] == 0.3
    assert json.loads(metrics.read_text())["settings"]["border_mm"] == 3.0
    assert "grown by 3 mm" in (out / "logs" / "CITATION.md").read_text()
    assert "Of the networks' mask before its 3 mm border" in (out / "sub-01.html").read_text()
    assert app(bids, out, "group").returncode == 0  # one brain volume in the table and the TSV: the output's
    recorded_ml = json.loads(metrics.read_text())["brain_volume_ml"]
    assert recorded_ml > json.loads(metrics.read_text())["qc"]["brain_volume_ml"]
    assert f'data-v="{recorded_ml}"' in (out / "group_T1w.html").read_text()
    assert int((np.asanyarray(nib.load(mask).dataobj) > 0).sum()) > volume
    mtime = mask.stat().st_mtime_ns
    again = app(*args, "--threshold", "0.3", "--border", "3")
    assert again.returncode == 0 and "1 already finished" in again.stdout and "redoing" not in again.stdout
    assert mask.stat().st_mtime_ns == mtime
    # the outputs deleted, the work directory kept (nipype's cache): written again, not "failed"
    shutil.rmtree(out)
    res = app(*args, "--threshold", "0.3", "--border", "3")
    assert res.returncode == 0 and "1 processed in this run" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    assert mask.is_file() and json.loads(metrics.read_text())["settings"]["border_mm"] == 3.0
    mask.write_bytes(b"garbage")  # --overwrite rewrites every output
    res = app(*args, "--threshold", "0.3", "--border", "3", "--overwrite", "--save-probseg")
    assert res.returncode == 0 and "1 processed in this run" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    assert int((np.asanyarray(nib.load(mask).dataobj) > 0).sum()) > volume
    probseg = anat / "sub-01_label-brain_probseg.nii.gz"
    assert probseg.is_file() and probseg.with_name("sub-01_label-brain_probseg.json").is_file()
    # redone without --save-probseg: the earlier probability map goes (0.2.0 kept it beside the new mask), saying so
    # (red-team 15: silently)
    res = app(*args, "--overwrite")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert ("the probability map of 1 image(s) to redo (sub-01/anat/sub-01_T1w.nii.gz) goes once each is redone: "
            "not asked for (--save-probseg), it would disagree with the new mask") in res.stdout, res.stdout[-3000:]
    assert not probseg.exists() and not probseg.with_name("sub-01_label-brain_probseg.json").exists()


# ------------------------------------------------------------------------------- DataLad datasets
def _annexed(root, label, *, present):
    """sub-<label>'s T1w as git-annex stores it: a relative symbolic link into .git/annex/objects, whose
    target exists only once the content was fetched (``datalad get``)."""
    key = f"MD5E-s{label}--{label * 16}.nii.gz"
    target = root / ".git" / "annex" / "objects" / label[:2] / label[-2:] / key / key
    if present:
        target.parent.mkdir(parents=True)
        shutil.copyfile(SMALL_HEAD, target)
        target.chmod(0o444)  # annexed content is read-only, as git-annex leaves it
    link = root / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(target, link.parent))
    return link


def test_datalad_dataset_with_missing_content(tmp_path):
    """After ``datalad clone`` without ``datalad get``: the present images are processed (their outputs are
    regular files), each absent one gets one line saying how to fetch it, and the run exits 1. The BIDS
    validator (on: the default) does not stop the run for the absent one."""
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "annexed", "BIDSVersion": "1.10.0"}))
    _annexed(bids, "01", present=True)
    _annexed(bids, "02", present=False)
    before = snapshot(bids)
    out = tmp_path / "out"
    res = app(bids, out, "participant", "-w", tmp_path / "work", "--n-cpus", "2")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert_one_line_errors(res)
    lines = [line for line in (res.stdout + res.stderr).splitlines() if "sub-02_T1w.nii.gz" in line]
    assert any("git-annex content not present" in line and "datalad get sub-02/anat/sub-02_T1w.nii.gz" in line
               for line in lines), lines
    mask = out / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz"
    assert mask.is_file() and not mask.is_symlink()
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert not (out / "sub-02" / "anat").exists()
    assert snapshot(bids) == before


# ------------------------------------------------------------------------------- concurrent and interrupted
def test_concurrent_runs_into_one_output_dir(tmp_path):
    """Job-array style: one process per participant, all at once, same output folder."""
    bids = tmp_path / "bids"
    make_dataset(bids, {label: copy_head for label in ("01", "02", "03")})
    out = tmp_path / "out"
    cmd = [*_exe("bids_skullstrip", "bids_skullstrip.cli.run")]
    procs = [subprocess.Popen([*cmd, str(bids), str(out), "participant", "--participant-label", label,
                               "-w", str(tmp_path / f"work{label}"), "--skip-bids-validation", "--n-cpus", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for label in ("01", "02", "03")]
    results = [p.communicate(timeout=1200) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), results
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert (out / "logs" / "CITATION.md").read_text().rstrip().endswith("doi:10.1016/j.neuroimage.2010.09.025")
    assert (out / "README.md").read_text().startswith("# bids_skullstrip derivatives")
    for label in ("01", "02", "03"):
        assert (out / f"sub-{label}" / "anat" / f"sub-{label}_desc-brain_metrics.json").is_file()
    assert not list(out.rglob(".tmp-*"))


@pytest.mark.parametrize("shared", ["output folder", "work directory"])
def test_a_second_run_on_the_same_images_leaves_them_to_the_first(shared, tmp_path):
    """A relaunched job, or the same -w given twice: two runs wrote the same images through one work directory
    (nipype's files of one rewritten under the other: "No such file ... _unfinished.json", a worker killed by
    SIGBUS) or into one output folder. Each image is locked by the run writing it; the second run says so."""
    bids, labels = tmp_path / "bids", ("01", "02", "03", "04", "05", "06")
    make_dataset(bids, {label: copy_head for label in labels})
    out, work = tmp_path / "out", tmp_path / "work"
    first = _start([bids, out, "participant", "-w", work, "--skip-bids-validation", "--n-cpus", "1"])
    deadline = time.monotonic() + 120
    while len(list((work / ".locks").glob("*.lock"))) < len(labels) and time.monotonic() < deadline:
        time.sleep(0.05)
    second_out, second_work = (out, tmp_path / "work2") if shared == "output folder" else (tmp_path / "out2", work)
    second = app(bids, second_out, "participant", "-w", second_work, "--skip-bids-validation")
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-2000:]
    lines = [line for line in (second.stdout + second.stderr).splitlines() if "not processed: another run" in line]
    assert lines and all(f"with the same {shared} is processing it (pid {first.pid} on " in line for line in lines), \
        second.stdout[-2000:] + second.stderr[-2000:]
    assert f"{len(lines)} left to another run processing them" in second.stdout
    # what the first run finished (and unlocked) before the second one looked is the second's as any image: already
    # finished in the shared output folder, or done again from the shared work directory's cache (images take 1-2 s
    # each: the first run had finished both of the two this test used, on a loaded machine)
    done = int(re.search(r"(\d+) already finished" if shared == "output folder" else r"(\d+) processed in this run",
                         second.stdout).group(1))
    assert done + len(lines) == len(labels), second.stdout[-2000:]
    for label in labels:
        _assert_outputs_complete(out, label)
    assert not (out / "logs" / "failed").exists() or not list((out / "logs" / "failed").iterdir())
    assert not (out / "logs" / "locks").exists() and not (work / ".locks").exists()  # no lock left behind


def _finished_niftis(out):
    """The NIfTI files under ``out`` with their final names (a ``.tmp-*`` sibling is a write in progress)."""
    return [p for p in out.rglob("*.nii.gz") if not p.name.startswith(".tmp-")]


def _wait_for_a_finished_mask(out, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(p.name.endswith("_desc-brain_mask.nii.gz")
                                                  for p in _finished_niftis(out)):
        time.sleep(0.2)


def test_killed_run_leaves_no_half_written_file_and_resumes(tmp_path):
    bids = tmp_path / "bids"
    make_dataset(bids, {label: copy_head for label in ("01", "02", "03", "04")})
    out, work = tmp_path / "out", tmp_path / "work"
    args = [str(bids), str(out), "participant", "-w", str(work), "--skip-bids-validation", "--n-cpus", "2"]
    proc = subprocess.Popen([*_exe("bids_skullstrip", "bids_skullstrip.cli.run"), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_a_finished_mask(out)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: MultiProc workers too
    proc.wait()
    finals = _finished_niftis(out)
    assert finals, "the run was killed before writing anything: the test proves nothing"
    for nii in finals:  # every file with a final name is complete
        np.asanyarray(nib.load(nii).dataobj)
    # what a writer killed between creating its temporary file and renaming it leaves (whether the kill above
    # caught one is chance), beside a mask that was finished (two images run at once: either may be first)
    mask = next(p for p in finals if p.name.endswith("_desc-brain_mask.nii.gz"))
    _temporary_of_a_killed_writer(mask)
    res = app(*args[:3], "-w", work, "--skip-bids-validation", "--n-cpus", "2")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for label in ("01", "02", "03", "04"):
        assert (out / f"sub-{label}" / "anat" / f"sub-{label}_desc-brain_metrics.json").is_file()
    assert not list(out.rglob(".tmp-*")), "the rerun left the killed run's temporary files"
    assert "temporary file(s) an interrupted run left" in res.stdout, res.stdout[-2000:]


def _temporary_of_a_killed_writer(path):
    """A temporary sibling of ``path`` made by a process of this host that is gone; its path."""
    code = ("import sys; from pathlib import Path; from bids_skullstrip.nifti import tmp_sibling; "
            "t = tmp_sibling(Path(sys.argv[1]), '.nii.gz'); t.write_bytes(b'half'); print(t)")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return Path(res.stdout.strip())


def test_temporary_files_are_removed_once_their_writer_is_gone(tmp_path):
    from bids_skullstrip.nifti import STALE_TMP_S, remove_stale_temporaries, tmp_sibling

    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    dead = _temporary_of_a_killed_writer(anat / "sub-01_desc-brain_mask.nii.gz")
    # a SIGKILLed worker whose parent died too: a zombie until init reaps it (CI's init did not, at once)
    zombie = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; from bids_skullstrip.nifti "
                               "import tmp_sibling; tmp_sibling(Path(sys.argv[1]), '.nii.gz').write_bytes(b'half')",
                               str(anat / "sub-01_desc-preproc_T1w.nii.gz")])
    while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.05)
    own = tmp_sibling(anat / "sub-01_desc-brain_T1w.nii.gz", ".nii.gz")  # this process writes it now
    other_node = anat / ".tmp-12-0badc0de@node-b@sub-01_desc-preproc_T1w.nii.gz"  # another host's, in progress
    older_version = anat / ".tmp-12-0badc0de-sub-01_desc-brain_metrics.json"  # 0.2.0's names: no host
    abandoned = anat / ".tmp-13-0badc0de@node-b@sub-01_desc-brain_probseg.nii.gz"
    for path in (own, other_node, older_version, abandoned):
        path.write_bytes(b"half")
    long_ago = time.time() - STALE_TMP_S - 60
    for path in (older_version, abandoned):
        os.utime(path, (long_ago, long_ago))
    user_file = anat / ".tmp-notes.txt"  # not a name of ours: left alone however old
    user_file.write_text("mine")
    os.utime(user_file, (long_ago, long_ago))
    assert dead.is_file() and dead.parent == anat
    assert remove_stale_temporaries(tmp_path) == 4
    assert sorted(p.name for p in anat.iterdir()) == sorted([own.name, other_node.name, user_file.name])
    zombie.wait()


def test_a_run_removes_at_once_the_temporaries_of_the_images_it_holds(small_dataset, tmp_path):
    """A container killed while writing left a temporary file; every container has a host name of its own, so the
    next one could not tell whether its writer was gone and kept it for 10 minutes, in the finished dataset. A run
    that holds an image's lock knows nobody else writes it: its temporaries go at once, not another image's."""
    anat = tmp_path / "out" / "sub-01" / "anat"
    anat.mkdir(parents=True)
    killed = anat / ".tmp-18-e11caa9b@fbfa477bc1d4@sub-01_desc-brain_T1w.nii.gz"  # another container's
    others = anat / ".tmp-18-e11caa9b@fbfa477bc1d4@sub-01_acq-x_desc-brain_T1w.nii.gz"  # not an image of this run
    for path in (killed, others):
        path.write_bytes(b"half")
    res = app(small_dataset, tmp_path / "out", "participant", "--skip-bids-validation", "-w", tmp_path / "w")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert not killed.exists() and others.exists()
    assert "removed 1 temporary file(s) an interrupted writer left of the images it was writing" in res.stdout


@pytest.mark.parametrize("stopped", [False, True])
def test_a_temporary_a_killed_or_stopped_worker_left_is_gone_when_the_run_ends(stopped, small_dataset, tmp_path):
    """A worker killed while it wrote an image's output left its temporary file in the output folder until the next
    run (red-team 10b: SIGKILL to the worker of a sink); so did a run stopped (Ctrl-C, a scheduler's SIGTERM) while
    its worker wrote, and the next run may never come. Here one appears while the run goes on, named as the main
    process's own (alive, on this host: nothing else would judge it gone): the run removes it before it ends, and a
    stop once its workers are gone, then releases the images' locks (red-team 14: their files stayed)."""
    out = tmp_path / "out"
    res = app_patched(f"""
        from bids_skullstrip import runner
        from bids_skullstrip.nifti import tmp_sibling
        from bids_skullstrip.outputs import derivative_path
        process = runner.Run.process
        def processing(self, todo):
            tmp = tmp_sibling(derivative_path(self.config.output_dir, todo[0], "mask"))
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(b"half")
            {"os.kill(os.getpid(), signal.SIGTERM)" if stopped else ""}
            return process(self, todo)
        runner.Run.process = processing
        """, small_dataset, out, "participant", "--skip-bids-validation", "-w", tmp_path / "w", tmp_path=tmp_path,
                      timeout=300)
    assert res.returncode == (143 if stopped else 0), res.stdout[-2000:] + res.stderr[-2000:]
    assert not list(out.rglob(".tmp-*")), list(out.rglob(".tmp-*"))
    if stopped:
        assert "bids_skullstrip: interrupted (SIGTERM)" in res.stderr and "Traceback" not in res.stderr, res.stderr
    else:
        assert "removed 1 temporary file(s) an interrupted writer left of the images it was writing" in res.stdout
    assert not list((out / "logs" / "locks").glob("*.lock")) and not (tmp_path / "w" / ".locks").exists()


def test_the_group_level_says_which_images_of_the_dataset_its_report_lacks(small_dataset, tmp_path):
    """After a run stopped half-way, `group` wrote a report of the finished images only and said nothing of the
    others: it counts what it reports on, and names how many of the dataset's images have neither outputs nor a
    failure record."""
    out = tmp_path / "out"
    res = app(small_dataset, out, "participant", "--skip-bids-validation", "-w", tmp_path / "w")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    make_dataset(tmp_path / "more", {"02": copy_head})  # a participant the run never reached
    shutil.move(tmp_path / "more" / "sub-02", small_dataset / "sub-02")
    res = app(small_dataset, out, "group")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "group_T1w: 1 image(s): 1 processed (0 flagged by QC), 0 failed" in res.stdout, res.stdout
    assert ("group_T1w: 1 T1w image(s) of the dataset are not in it: not processed (yet), or left out by the "
            "participant level's selection; first: sub-02/anat/sub-02_T1w.nii.gz") in res.stdout, res.stdout
    # a contrast of which none is processed (here: not asked for) is named too: it was left out in silence
    copy_head(small_dataset / "sub-02" / "anat" / "sub-02_PDw.nii.gz")
    # an image whose mask is gone (a partial copy of the folder) is no finished image: its metrics alone made it one
    mask = out / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz"
    mask.unlink()
    res = app(small_dataset, out, "group")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert ("group_PDw: none: none of the dataset's 1 PDw image(s) is in the output folder (not processed yet, or not "
            "asked for: the participant level's --contrasts); first: sub-02/anat/sub-02_PDw.nii.gz") in res.stdout
    assert "group_T1w: 1 image(s): 1 processed (1 flagged by QC), 0 failed" in res.stdout, res.stdout
    assert (f"group_T1w: {mask.name}: the mask is missing (deleted, or not copied with the other outputs?): a rerun "
            "of the participant level redoes the image (flagged)") in res.stdout + res.stderr, res.stdout + res.stderr
    assert "the mask is missing" in (out / "group_T1w.tsv").read_text() + (out / "group_T1w.html").read_text()


def _start(args, **kw):
    """The app in a session of its own (its process group = its session, as a job step or a terminal's), with
    Ctrl-C not ignored, as in a terminal: a shell that starts the tests in the background (`cmd &`) makes them,
    and everything they start, ignore SIGINT, and Python then never turns it into KeyboardInterrupt."""
    return subprocess.Popen([*_exe("bids_skullstrip", "bids_skullstrip.cli.run"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def _session(sid):
    """The processes of session ``sid`` still alive (zombies are dead)."""
    alive = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (ProcessLookupError, PermissionError):
            pass
    return alive


def _assert_nothing_left(sid, grace_s=5.0):
    deadline = time.monotonic() + grace_s
    while (left := _session(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left behind: {[(p.pid, p.cmdline()) for p in left]}"


def _wait_for_busy_workers(proc, n=2, timeout=600):
    """Until ``n`` worker processes of ``proc`` have loaded the network (hold > 300 MB)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            kids = psutil.Process(proc.pid).children()
            if sum(k.memory_info().rss > 300e6 for k in kids) >= n:
                return kids
        except psutil.Error:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no {n} busy workers: {proc.poll()}")


def _metrics(out):
    return sorted(out.rglob("*_desc-brain_metrics.json"))


def _assert_outputs_complete(out, label):
    anat = out / f"sub-{label}" / "anat"
    for kind in ("desc-brain_mask", "desc-preproc_T1w", "desc-brain_T1w"):
        img = nib.load(anat / f"sub-{label}_{kind}.nii.gz")
        assert img.shape == nib.load(SMALL_HEAD).shape
        np.asanyarray(img.dataobj)
        json.loads((anat / f"sub-{label}_{kind}.json").read_text())
    json.loads((anat / f"sub-{label}_desc-brain_metrics.json").read_text())


LABELS6 = [f"{i:02d}" for i in range(1, 7)]


def _six_images_until(tmp_path, *, finished):
    """A two-worker run over six real images, once ``finished`` of them are: (process, out, work, arguments)."""
    bids = tmp_path / "bids"
    make_dataset(bids, {label: copy_head for label in LABELS6})
    out, work = tmp_path / "out", tmp_path / "work"
    args = [bids, out, "participant", "-w", work, "--skip-bids-validation", "--n-cpus", "2"]
    proc = _start(args)
    deadline = time.monotonic() + 600
    while len(_metrics(out)) < finished and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    return proc, out, work, args


def test_images_finish_one_after_another_while_both_workers_stay_busy(tmp_path):
    """Eight real images on two workers: the first image's outputs are complete while most images have not
    started (nipype's own order runs every image's networks first and writes every output at the end), the
    progress line counts images as they finish, and both workers are busy."""
    labels = [f"{i:02d}" for i in range(1, 9)]
    bids = tmp_path / "bids"
    make_dataset(bids, {label: copy_head for label in labels})
    out, work = tmp_path / "out", tmp_path / "work"
    proc = _start([bids, out, "participant", "-w", work, "--skip-bids-validation", "--n-cpus", "2"])
    started_at_first, group = None, None
    while proc.poll() is None:
        if started_at_first is None and _metrics(out):
            started_at_first = len(list(work.glob("bids_skullstrip_wf/*/*/skullstrip")))
            group = app(bids, out, "group")  # on what is finished, while the run goes on
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert started_at_first is not None and started_at_first <= 4, started_at_first
    assert group.returncode == 0, group.stdout[-2000:] + group.stderr[-2000:]
    # and says that another run is still at work on the others (red-team 15: only "not processed (yet)")
    assert re.search(r"warning: another run is at work in .* \(pid \d+ on .*\): the group report shows the images "
                     r"it has not finished as they were before it", group.stdout + group.stderr), \
        group.stdout[-2000:] + group.stderr[-2000:]
    with (out / "group_T1w.tsv").open() as fh:
        assert 1 <= len(fh.read().strip().splitlines()) - 1 < len(labels)  # a row per finished image
    counts = [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("progress: ")]
    assert len(counts) >= 4 and counts[-1] == len(labels), stdout
    assert "[MultiProc] Running 2 tasks" in (work / "nipype.log").read_text()  # both workers at once
    for label in labels:
        _assert_outputs_complete(out, label)


def test_sigterm_to_the_main_process_stops_every_worker_keeps_finished_images_and_a_rerun_does_the_rest(tmp_path):
    """``kill PID``: SIGTERM to the main process only, half-way through six images on two workers."""
    proc, out, work, args = _six_images_until(tmp_path, finished=2)
    os.kill(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 30, "the run did not stop promptly after SIGTERM"
    assert proc.returncode == 143, stderr
    assert "interrupted (SIGTERM)" in stderr and "rerun the same command to resume" in stderr, stderr
    assert "interrupted" not in stdout, stdout[-2000:]  # said once, on stderr
    log_file, = (out / "logs").glob("run-*.log")
    assert "WARNING interrupted (SIGTERM)" in log_file.read_text()  # and recorded in the run's log
    assert "Traceback" not in stderr, stderr[-3000:]
    _assert_nothing_left(proc.pid)
    finished = [m.name.split("_")[0][4:] for m in _metrics(out)]
    assert 2 <= len(finished) < len(LABELS6), finished
    for label in finished:
        _assert_outputs_complete(out, label)
    for nii in _finished_niftis(out):
        np.asanyarray(nib.load(nii).dataobj)
    res = app(*args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rest = len(LABELS6) - len(finished)
    assert f"{rest} processed in this run, {len(finished)} already finished" in res.stdout, res.stdout
    for label in LABELS6:
        _assert_outputs_complete(out, label)


def test_a_stopped_overwrite_run_says_what_a_rerun_redoes(small_dataset, tmp_path):
    """A run with --overwrite stopped half-way advised "rerun the same command to resume", which redid the images
    that run had already redone (red-team 15)."""
    res = app_patched("""
        from bids_skullstrip import runner
        process = runner.Run.process
        def processing(self, todo):
            os.kill(os.getpid(), signal.SIGTERM)
            return process(self, todo)
        runner.Run.process = processing
        """, small_dataset, tmp_path / "out", "participant", "--skip-bids-validation", "--overwrite", "-w",
        tmp_path / "work", tmp_path=tmp_path, timeout=300)
    assert res.returncode == 143, res.stderr[-3000:]
    assert ("rerun to resume: without --overwrite a rerun skips every image with complete outputs of these settings "
            "(this run's and earlier ones), with it every image is redone again") in res.stderr, res.stderr[-3000:]


def test_a_stop_signal_whose_exception_is_dropped_still_stops_the_run(tmp_path):
    """A signal that arrives while a finalizer or a weakref callback runs: the handler's exception is printed as
    "Exception ignored" and dropped (SQLAlchemy's cleanup under pybids, seen in CI: the SIGTERMed run finished its
    images and exited 0). A watchdog the handler starts stops the run all the same."""
    script = tmp_path / "dropped.py"
    script.write_text(
        "import os, signal, time, weakref\n"
        "from bids_skullstrip import runner\n"
        "signal.signal(signal.SIGTERM, runner._interrupt_in(os.getpid()))\n"
        "class Held: pass\n"
        "def cleanup():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.5)  # the handler runs here, inside the callback\n"
        "held = Held()\n"
        "weakref.finalize(held, cleanup)\n"
        "del held\n"
        "time.sleep(20)\n"
        "print('went on')\n")
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 143 and "went on" not in res.stdout, (res.returncode, res.stdout, res.stderr)
    assert "Exception ignored" in res.stderr and "bids_skullstrip: interrupted (SIGTERM)" in res.stderr, res.stderr
    assert time.monotonic() - t0 < 15


def test_a_stop_signal_before_the_run_begins_stops_it_with_its_message(small_dataset, tmp_path):
    """A container's main process (PID 1) ignores a signal it has no handler for: `podman stop` in the first second
    (while the configuration is resolved and nipype imported) was lost, and the run went on and exited 0. The
    handlers are now set before anything else: here SIGTERM arrives while the configuration is resolved."""
    out = tmp_path / "out"
    res = app_patched("""
        from bids_skullstrip.cli import run
        resolve = run.RunConfig.from_args
        def resolving(opts):
            os.kill(os.getpid(), signal.SIGTERM)
            return resolve(opts)
        run.RunConfig.from_args = resolving
        """, small_dataset, out, "participant", "--skip-bids-validation", tmp_path=tmp_path, timeout=120)
    assert res.returncode == 143, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert "bids_skullstrip: interrupted (SIGTERM)" in res.stderr and not out.exists(), res.stderr


@pytest.mark.parametrize("when", ["before the run", "in the run"])
def test_a_second_stop_signal_during_the_stop_changes_nothing(when, small_dataset, tmp_path):
    """A double Ctrl-C or `kill` sent twice: the second signal arrived while the first one's stop was under way
    (here: while it stops the workers) and raised there; the run ended with a traceback (status 1) before it began,
    and in it with status 0 and not a word, which a scheduler records as success (red-team 10b)."""
    second = """
        from bids_skullstrip import runner
        stop_workers = runner.stop_workers
        def stopping():
            os.kill(os.getpid(), signal.SIGTERM)
            stop_workers()
        runner.stop_workers = stopping
        """
    first = {"before the run": """
        from bids_skullstrip.cli import run
        resolve = run.RunConfig.from_args
        def resolving(opts):
            os.kill(os.getpid(), signal.SIGTERM)
            return resolve(opts)
        run.RunConfig.from_args = resolving
        """, "in the run": """
        from bids_skullstrip import runner
        process = runner.Run.process
        def processing(self, todo):
            os.kill(os.getpid(), signal.SIGTERM)
            return process(self, todo)
        runner.Run.process = processing
        """}[when]
    res = app_patched(textwrap.dedent(second) + textwrap.dedent(first), small_dataset, tmp_path / "out",
                      "participant", "--skip-bids-validation", "-w", tmp_path / "work", tmp_path=tmp_path, timeout=120)
    assert res.returncode == 143, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert res.stderr.count("bids_skullstrip: interrupted (SIGTERM)") == 1 and "Traceback" not in res.stderr, \
        res.stderr


def test_a_stop_signal_that_cuts_an_import_short_still_stops_the_run_in_one_line(tmp_path):
    """A signal in the first second lands inside an import (nipype's, networkx's); the stop then imported the
    modules that stop workers and SLURM jobs, which met the half-imported one: 30-126 lines of traceback and status
    1, in 5 of 60 runs (red-team 11). The stop imports nothing now; here every such import fails as it did."""
    script = tmp_path / "cut.py"
    script.write_text(textwrap.dedent("""
        import builtins
        from bids_skullstrip import runner
        imported = builtins.__import__
        def half_imported(name, *args, **kwargs):
            if name.rpartition(".")[2] in ("multiproc", "slurm"):
                raise KeyError("Algorithm already exists in dispatch namespace: has_path")
            return imported(name, *args, **kwargs)
        builtins.__import__ = half_imported
        runner.stop_now("SIGTERM")
        """))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 143 and res.stderr.strip().splitlines() == [
        "bids_skullstrip: interrupted (SIGTERM): the images finished so far are kept and no output was left "
        "half-written; rerun the same command to resume"], (res.returncode, res.stderr[-2000:])


def test_an_overwrite_stopped_before_an_image_is_rewritten_leaves_it_finished(small_dataset, tmp_path):
    """Every image of a run asked to redo them (--overwrite, or other settings) was un-marked before the graph ran:
    stopped early, the run left a complete output folder with no image finished (red-team 10b: the group level then
    said "run the participant level first" and the next run redid them all). An image is un-marked when its own
    sink begins; the metrics JSON names the run that wrote it."""
    out, work = tmp_path / "out", tmp_path / "work"
    res = app(small_dataset, out, "participant", "--skip-bids-validation", "-w", work)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    [metrics] = out.rglob("*_desc-brain_metrics.json")
    [log_file] = (out / "logs").glob("run-*.log")
    assert log_file.name == f"run-{json.loads(metrics.read_text())['run_id']}.log"
    before = metrics.read_bytes()
    res = app_patched("""
        from bids_skullstrip import execution
        plugin = execution.plugin
        def stopped(*args):
            os.kill(os.getpid(), signal.SIGTERM)  # the graph is built, no node has run
            return plugin(*args)
        execution.plugin = stopped
        """, small_dataset, out, "participant", "--skip-bids-validation", "-w", work, "--overwrite",
                      tmp_path=tmp_path, timeout=300)
    assert res.returncode == 143, res.stdout[-2000:] + res.stderr[-2000:]
    assert metrics.read_bytes() == before
    res = app(small_dataset, out, "group")
    assert res.returncode == 0 and "1 processed" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    # a redo that fails before the image's writing: its earlier outputs are not finished either (red-team 11: they
    # were, so the group level said "processed" and a plain rerun "already finished", forgetting the failure)
    res = app_patched("""
        from bids_skullstrip import strip
        def failing(*args, **kwargs):
            raise RuntimeError("a fault in the networks")
        strip.skullstrip_file = failing
        """, small_dataset, out, "participant", "--skip-bids-validation", "-w", tmp_path / "fresh", "--overwrite",
                      "--plugin", "Linear", tmp_path=tmp_path, timeout=300)  # a fresh work directory: no cached node
    assert res.returncode == 1 and "a fault in the networks" in res.stdout + res.stderr, res.stdout + res.stderr
    assert not metrics.exists()
    res = app(small_dataset, out, "group")
    assert "0 processed (0 flagged by QC), 1 failed" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    res = app(small_dataset, out, "participant", "--skip-bids-validation", "-w", work)
    assert res.returncode == 0 and "1 processed in this run" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


@pytest.mark.parametrize("signum, to_group, status", [
    (signal.SIGINT, True, 130),  # Ctrl-C in a terminal: the whole foreground process group
    (signal.SIGHUP, False, 129),  # the terminal closed
    (signal.SIGKILL, False, -9),  # the main process alone killed: its workers die with it (PR_SET_PDEATHSIG)
])
def test_ctrl_c_sighup_and_sigkill_stop_every_worker(signum, to_group, status, tmp_path):
    bids = tmp_path / "bids"
    make_dataset(bids, {label: copy_head for label in ("01", "02", "03")})
    proc = _start([bids, tmp_path / "out", "participant", "-w", tmp_path / "work", "--skip-bids-validation",
                   "--n-cpus", "2"])
    _wait_for_busy_workers(proc)
    (os.killpg if to_group else os.kill)(proc.pid, signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == status, stderr
    if signum != signal.SIGKILL:
        assert f"interrupted ({signal.Signals(signum).name})" in stderr and "Traceback" not in stderr, stderr[-3000:]
    _assert_nothing_left(proc.pid)


def test_sigkill_while_the_validator_runs_leaves_no_validator(small_dataset, tmp_path):
    """The main process SIGKILLed while the BIDS validator ran: the validator (deno) was re-parented to PID 1 and
    ran on to the end (red-team 15). It now dies with the run, as the workers do. A validator that takes a minute
    (a large dataset's) stands in for it here: the real one takes 0.2 s on this dataset."""
    slow = tmp_path / "bin" / "bids-validator-deno"
    slow.parent.mkdir()
    slow.write_text("#!/bin/sh\nexec sleep 60\n")
    slow.chmod(0o755)
    proc = _start([small_dataset, tmp_path / "out", "participant", "-w", tmp_path / "work"],
                  env={**os.environ, "PATH": f"{slow.parent}{os.pathsep}{os.environ['PATH']}"})
    deadline, validator = time.monotonic() + 120, None
    while validator is None and time.monotonic() < deadline and proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.name() == "sleep":
                    validator = child
        time.sleep(0.01)
    assert validator is not None, f"no validator seen: {proc.poll()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    _assert_nothing_left(proc.pid)


def _kill_a_worker_as_it_enters(proc, node, timeout=600):
    """SIGKILL the first worker of ``proc`` seen entering a ``node`` directory (nipype runs a node inside its
    own folder), so that it dies in the middle of that node rather than between two: (its pid, the folder)."""
    where, deadline = {}, time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for worker in psutil.Process(proc.pid).children():
            try:
                cwd = worker.cwd()
            except psutil.Error:
                continue
            if Path(cwd).name == node and where.get(worker.pid, cwd) != cwd:
                worker.send_signal(signal.SIGKILL)
                return worker.pid, cwd
            where[worker.pid] = cwd
        time.sleep(0.01)
    raise AssertionError(f"no worker entered a {node!r} node: {proc.poll()}")


def test_the_out_of_memory_advice_keeps_within_the_containers_limit(monkeypatch):
    """In a `--memory 1g` container run with `--mem-gb 8` the advice after an OOM kill read "21.9 GB free now: try
    --mem 6553 (MB)", the host's numbers, which would fail again."""
    import bids_skullstrip.execution as execution
    from bids_skullstrip.multiproc import death_message

    monkeypatch.setattr(execution, "cgroup_memory_free_gb", lambda: 1.0)
    said = death_message(-9, "n4", held_gb=0.9, pool_gb=1.0, memory_gb=8.0, n_procs=2, image_gb=0.5)
    assert "the run may use 8.0 GB, 1.0 GB free now): try --n-cpus 1 or --mem 819 (MB)" in said, said
    # an `--memory 800m` container: the advice was --mem 640, which the app then refused (an image needs 1.13 GB)
    said = death_message(-9, "n4", held_gb=0.6, pool_gb=0.7, memory_gb=1.2, n_procs=1, image_gb=1.13)
    assert said.endswith("1.0 GB free now): give the run more memory (an image needs about 1.13 GB)"), said
    # memory far from short (a worker killed from outside, red-team 10b): the advice was "try --mem 17355 (MB)"
    monkeypatch.setattr(execution, "cgroup_memory_free_gb", lambda: None)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 21.6 * 2**30})())
    said = death_message(-9, "skullstrip", held_gb=0.6, pool_gb=1.1, memory_gb=21.2, n_procs=2, image_gb=1.13)
    assert said == ("the worker process was killed by signal 9 (SIGKILL) while running its skullstrip step, by "
                    "someone (kill -9, a scheduler) or by the kernel for memory, which did not look short (it held "
                    "0.6 GB, the run's workers 1.1 GB when last seen, 21.6 GB free now, an image needs about 1.13 GB): "
                    "rerun to redo it; if it happens again, try --n-cpus 1 or --mem below 21708 (MB)"), said


def test_a_worker_killed_between_two_jobs_fails_nothing(tmp_path, caplog):
    """An idle worker SIGKILLed (the OOM killer may pick it: it holds its loaded networks) broke the pool; the
    next job's submit raised BrokenProcessPool, which ended the run and failed every image not yet finished with
    no word why (red-team 15: 5 of 9 kills at --n-cpus 2). The job goes to a new pool instead."""
    from nipype import Node
    from nipype.interfaces.utility import IdentityInterface

    from bids_skullstrip.multiproc import ImageFirstMultiProcPlugin

    plugin = ImageFirstMultiProcPlugin(plugin_args={"n_procs": 2})
    try:
        both = [plugin.pool.submit(time.sleep, 0.5) for _ in range(2)]  # two jobs at once: two workers started
        [job.result(timeout=60) for job in both]
        workers = list(plugin.pool._processes.values())
        assert len(workers) == 2
        workers[0].kill()
        workers[0].join(timeout=10)
        deadline = time.monotonic() + 10
        while not plugin.pool._broken and time.monotonic() < deadline:  # the executor notices the death
            time.sleep(0.05)
        assert plugin.pool._broken, "the executor did not notice the dead worker"
        node = Node(IdentityInterface(fields=["x"]), name="after_the_kill", base_dir=str(tmp_path))
        node.inputs.x = 1
        plugin._nodes[1] = (node, False)
        with caplog.at_level("WARNING", logger="nipype.workflow"):
            plugin._submit(1)
        result = plugin._task_obj[1].result(timeout=120)
        assert result["result"].outputs.x == 1 and result["traceback"] is None, result
        assert any("a worker was lost" in r.getMessage() for r in caplog.records), caplog.text
        assert plugin._exitcodes.get(workers[0].pid) == -signal.SIGKILL, plugin._exitcodes
    finally:
        plugin.pool.shutdown(wait=True)


def test_a_job_that_ends_wakes_the_scheduler(tmp_path, monkeypatch):
    """nipype's loop slept a fixed poll between its looks at the jobs, so each step of an image waited for it
    before the next one started (the workers of a 10-head run idle a fifth of the time). A job's end wakes the
    loop: with a poll of a minute, a chain of three quick nodes still takes seconds, not minutes."""
    from nipype import Function, Node, Workflow

    from bids_skullstrip.multiproc import ImageFirstMultiProcPlugin

    def add_one(x):
        return x + 1

    monkeypatch.setattr(ImageFirstMultiProcPlugin, "poll_s", 60.0)
    wf = Workflow(name="chain", base_dir=str(tmp_path))
    nodes = [Node(Function(function=add_one, input_names=["x"], output_names=["x"]), name=f"step{i}")
             for i in range(3)]
    nodes[0].inputs.x = 1
    for before, after in zip(nodes, nodes[1:]):
        wf.connect(before, "x", after, "x")
    t = time.monotonic()
    wf.run(plugin=ImageFirstMultiProcPlugin(plugin_args={"n_procs": 2}))
    assert time.monotonic() - t < 45, "the loop slept its whole poll after a job ended"


def test_a_pool_broken_beyond_repair_is_named_in_each_failure(small_dataset, tmp_path):
    """A BrokenProcessPool that ends nipype's loop (one at submit did, red-team 15) was logged at debug level only:
    every image not done failed "without a crash file", and no file said why."""
    out = tmp_path / "out"
    res = app_patched("""
        from concurrent.futures.process import BrokenProcessPool
        from bids_skullstrip.multiproc import ImageFirstMultiProcPlugin
        def sort_jobs(self, jobids, scheduler=None):
            raise BrokenProcessPool("the pool broke")
        ImageFirstMultiProcPlugin._sort_jobs = sort_jobs
        """, small_dataset, out, "participant", "--skip-bids-validation", "-w", tmp_path / "work",
        tmp_path=tmp_path, timeout=300)
    text = res.stdout + res.stderr
    assert res.returncode == 1, text[-3000:]
    assert ("sub-01/anat/sub-01_T1w.nii.gz: not processed: the run stopped on a broken process pool (the pool "
            "broke)") in text and "without a crash file" not in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def test_a_worker_killed_mid_run_fails_its_image_in_one_line_and_the_others_finish(tmp_path):
    """The kernel's OOM killer, imitated: SIGKILL to a worker in the middle of a node (N4, the longest after the
    network's) of a two-worker run over six images; a worker killed between two nodes fails nothing."""
    proc, out, work, args = _six_images_until(tmp_path, finished=3)  # images 4-6 still to come
    victim, node_dir = _kill_a_worker_as_it_enters(proc, "n4")
    killed, killed_at = time.monotonic(), datetime.datetime.now()
    stdout, stderr = proc.communicate(timeout=300)
    took = time.monotonic() - killed
    text = stdout + stderr
    print(f"killed worker {victim} in {node_dir}; the run ended {took:.1f} s later with status {proc.returncode}\n{text}")
    [lost] = [line for line in (work / "nipype.log").read_text().splitlines() if "a worker was lost" in line]
    noticed = datetime.datetime.strptime(lost[:23], "%Y-%m-%d %H:%M:%S,%f") - killed_at
    assert noticed.total_seconds() < 5, lost
    # then a new pool loads the network again and finishes the other images: 6 s measured on an idle machine,
    # 48-54 s once with other jobs on it; the bound leaves room for a slower one
    assert took < 90, f"the run took {took:.0f} s to end after the kill"
    assert proc.returncode == 1, text[-3000:]
    assert "Traceback" not in text and "BrokenProcessPool" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if "killed by signal 9 (SIGKILL)" in line]
    assert len(lines) == 1, text[-3000:]
    # the machine's memory was far from short: not "most likely out of memory" (the OOM killer is only imitated)
    assert "or by the kernel for memory, which did not look short" in lines[0] and "--n-cpus 1" in lines[0], lines[0]
    assert "1 of 6 image(s) failed" in text, text[-3000:]
    _assert_nothing_left(proc.pid)
    failed = [label for label in LABELS6 if f"sub-{label}/anat/sub-{label}_T1w.nii.gz" in lines[0]]
    assert len(failed) == 1 and f"sub_{failed[0]}_T1w_wf" in node_dir, (lines[0], node_dir)
    for label in set(LABELS6) - set(failed):
        _assert_outputs_complete(out, label)
    record = json.loads((out / "logs" / "failed" / f"sub-{failed[0]}_T1w.json").read_text())
    assert "killed by signal 9" in record["error"]
    res = app(*args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "1 processed in this run, 5 already finished" in res.stdout, res.stdout
    _assert_outputs_complete(out, failed[0])
    assert not (out / "logs" / "failed" / f"sub-{failed[0]}_T1w.json").exists()


def test_a_worker_dying_in_native_code_prints_nothing_itself(tmp_path):
    """nipype turns Python's fault handler on, so a pool worker dying of SIGSEGV printed "Fatal Python error", its
    stack and the 228 extension modules loaded to the console (red-team 10b), above the one line the run says of
    it. A worker as the pool starts it, then killed so: nothing on its stderr."""
    script = tmp_path / "worker.py"
    script.write_text("import multiprocessing, os, signal\n"
                      "import nipype  # noqa: F401\n"
                      "from bids_skullstrip.multiproc import _init_worker\n"
                      "_init_worker(os.getcwd(), multiprocessing.Queue())\n"
                      "os.kill(os.getpid(), signal.SIGSEGV)\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == -signal.SIGSEGV and not res.stderr.strip(), (res.returncode, res.stderr[-2000:])


# ------------------------------------------------------------------------------- the single-file CLI
def test_skullstrip_cli_outputs(tmp_path):
    res = skullstrip("-i", SMALL_HEAD, "-m", tmp_path / "m.nii.gz", "-o", tmp_path / "b.nii.gz",
                     "-p", tmp_path / "p.nii.gz")
    assert res.returncode == 0, res.stderr
    assert not res.stderr.strip(), res.stderr
    src = nib.load(SMALL_HEAD)
    mask, brain = nib.load(tmp_path / "m.nii.gz"), nib.load(tmp_path / "b.nii.gz")
    for img in (mask, brain, nib.load(tmp_path / "p.nii.gz")):
        assert img.shape == src.shape and np.array_equal(img.affine, src.affine)
        assert int(img.header["sform_code"]) == int(src.header["sform_code"])
    assert mask.get_data_dtype() == np.uint8
    assert brain.get_data_dtype() == src.get_data_dtype()  # int16 in, int16 out
    m = np.asanyarray(mask.dataobj) > 0
    assert 900 < m.sum() * 2 * 2 * 3 / 1000 < 2200  # ml
    assert np.array_equal(np.asanyarray(brain.dataobj)[m], np.asanyarray(src.dataobj)[m])


@pytest.mark.parametrize("slope, inter", [(400.0, 0.0), (0.5, 0.0), (1.0, 0.25)])
def test_the_brain_of_a_scaled_integer_image_keeps_its_intensities(slope, inter, tmp_path):
    """An integer image with scl_slope/scl_inter (nibabel moves them from the header to the data on load): the
    skull-stripped image holds the real intensities, not the stored integers wrapped or rounded."""
    from bids_skullstrip.strip import brain_image

    head = nib.load(SMALL_HEAD)
    scaled = nib.Nifti1Image(np.asanyarray(head.dataobj).astype(np.int16), head.affine)
    scaled.header.set_slope_inter(slope, inter)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    img, data = load_image(tmp_path / "scaled.nii.gz")
    mask = (data > np.percentile(data, 60)).astype(np.uint8)
    nib.save(brain_image(img, data, mask), tmp_path / "brain.nii.gz")
    assert np.allclose(nib.load(tmp_path / "brain.nii.gz").get_fdata(), data * mask)


@pytest.mark.parametrize("offset, expected", [
    (0, "vox_offset 0: the voxels of a single-file NIfTI start at byte 352 or later"),  # read from byte 0 (red-team 18)
    (348, "vox offset 348 too low for single file nifti1"),
    (352, None)])  # where every writer puts them (nibabel's loaded header says 0)
def test_a_single_file_nifti_whose_voxels_would_start_in_its_header_is_refused(offset, expected, tmp_path):
    from bids_skullstrip.nifti import InputError

    head = nib.load(SMALL_HEAD)
    raw = bytearray(nib.Nifti1Image(np.asanyarray(head.dataobj), head.affine, head.header).to_bytes())
    np.ndarray((), dtype=nib.nifti1.header_dtype, buffer=raw)["vox_offset"] = offset
    (tmp_path / "offset.nii").write_bytes(bytes(raw))
    if expected is None:
        assert np.array_equal(load_image(tmp_path / "offset.nii")[1], np.asanyarray(head.dataobj))
        return
    with pytest.raises(InputError, match=re.escape(expected)):
        load_image(tmp_path / "offset.nii")


@pytest.mark.parametrize("dtype", [np.int32, np.uint32, np.int64])
def test_the_brain_of_a_wide_integer_image_keeps_its_integers_exactly(dtype, tmp_path):
    """Integers beyond float32's exact ones (2**24; red-team 18: an int32 image of values up to 2e9 came back with
    most brain voxels changed by up to 64) are the input's own in the skull-stripped image."""
    from bids_skullstrip.strip import brain_image

    head = nib.load(SMALL_HEAD)
    wide = (np.asanyarray(head.dataobj).astype(np.int64) * 500_000 + 7).astype(dtype)
    nib.save(nib.Nifti1Image(wide, head.affine, dtype=dtype), tmp_path / "wide.nii.gz")
    img, data = load_image(tmp_path / "wide.nii.gz")
    mask = (data > np.percentile(data, 60)).astype(np.uint8)
    nib.save(brain_image(img, data, mask), tmp_path / "brain.nii.gz")
    brain = nib.load(tmp_path / "brain.nii.gz")
    assert brain.get_data_dtype() == dtype
    assert np.array_equal(np.asanyarray(brain.dataobj), np.where(mask > 0, wide, 0))


@needs(REPO.parent / "shared" / "data" / "contrasts", "../shared/data/contrasts")
def test_skullstrip_cli_strips_each_contrast_with_its_networks(tmp_path):
    """A FLAIR (by its BIDS name, or --contrast) gets the bundled any-contrast networks; --contrast T1w the T1w
    ones."""
    flair = tmp_path / "sub-01_FLAIR.nii.gz"
    flair.symlink_to(REPO.parent / "shared" / "data" / "contrasts" / "openms-p01-s1-flair" / "image.nii.gz")
    plain = tmp_path / "flair-of-patient-1.nii.gz"
    plain.symlink_to(flair)
    weights = REPO / "bids_skullstrip" / "model" / "weights_any_contrast"
    runs = {"name": [flair], "option": [plain, "--contrast", "FLAIR"], "weights": [plain, "--weights", weights],
            "t1w": [flair, "--contrast", "T1w"]}
    probs, said = {}, {}
    for key, (image, *options) in runs.items():
        res = skullstrip("-i", image, "-p", tmp_path / f"{key}.nii.gz", "-v", *options)
        assert res.returncode == 0, res.stderr
        probs[key], said[key] = np.asarray(nib.load(tmp_path / f"{key}.nii.gz").dataobj), res.stdout + res.stderr
    assert np.array_equal(probs["name"], probs["weights"]) and np.array_equal(probs["option"], probs["weights"])
    assert np.abs(probs["t1w"] - probs["weights"]).max() > 0.1  # the other networks
    from bids_skullstrip.model.card import ModelCard

    any_contrast = ModelCard.bundled_for("FLAIR").sha256[:12]
    assert f"stripped as FLAIR (from the file name) by the networks {any_contrast}" in said["name"]
    assert f"stripped as FLAIR (given) by the networks {any_contrast}" in said["option"]
    # a name that holds a contrast it does not end with: stripped as T1w, and said (0.2.0: in silence)
    note = "its name holds FLAIR but does not end with it: stripped as T1w (give --contrast FLAIR"
    assert note in said["weights"] and not any(note in said[k] for k in ("name", "option", "t1w"))


@pytest.mark.parametrize("writer, problem", [(truncated, "truncated or corrupt"), (not_nifti, "not a readable NIfTI")])
def test_skullstrip_cli_bad_input(writer, problem, tmp_path):
    bad = tmp_path / "bad_T1w.nii.gz"
    writer(bad)
    res = skullstrip("-i", bad, "-m", tmp_path / "m.nii.gz")
    assert res.returncode == 1
    assert problem in res.stderr and str(bad) in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.nii.gz").exists()


def test_skullstrip_cli_doubts_are_one_line_warnings_naming_the_file(tmp_path):
    """Voxels that are not numbers and a header without orientation codes are processed, each doubt said
    once as a `skullstrip: warning:` line (not Python's two-line warning with a source line)."""
    src = nib.load(SMALL_HEAD)
    data = np.asanyarray(src.dataobj).astype(np.float32)
    data[:4, :4, :4] = np.nan
    hdr = src.header.copy()
    hdr.set_data_dtype(np.float32)
    odd = nib.Nifti1Image(data, src.affine, hdr)
    odd.set_qform(None, code=0)
    odd.set_sform(None, code=0)
    bad = tmp_path / "odd_T1w.nii.gz"
    nib.save(odd, bad)
    res = skullstrip("-i", bad, "-m", tmp_path / "m.nii.gz")
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines and all(line.startswith(f"skullstrip: warning: {bad}: ") for line in lines), res.stderr
    assert any("64 NaN/infinite voxels set to 0" in line for line in lines), res.stderr
    assert any("neither qform nor sform is set" in line for line in lines), res.stderr
    assert nib.load(tmp_path / "m.nii.gz").shape == src.shape


@pytest.mark.parametrize("sform_code", [0, 1])
def test_a_qfac_of_0_is_named_where_the_qform_orients_the_image(sform_code, tmp_path):
    """nibabel reads pixdim[0] = 0 as 1 (the NIfTI standard) and logs it at INFO only; where no sform orients the
    image, a qfac that should have been -1 turns the head upside down without a word (a red-team pass: Dice 0.86)."""
    import struct

    head = nib.load(SMALL_HEAD)
    img = nib.Nifti1Image(np.asanyarray(head.dataobj), head.affine)
    img.set_qform(head.affine, 1)
    img.set_sform(head.affine, sform_code)
    path = tmp_path / "qfac0.nii"
    nib.save(img, path)
    with path.open("r+b") as fh:  # pixdim[0], which nibabel will not write as 0
        fh.seek(76)
        fh.write(struct.pack("<f", 0.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_image(path)
    named = [str(w.message) for w in caught if "qfac" in str(w.message)]
    if sform_code:
        assert named == []  # the sform orients it: the qfac does not matter
    else:
        assert len(named) == 1 and named[0].startswith(f"{path}: invalid header field fixed on load: ")
        assert "check that the head is not upside down" in named[0] and "\n" not in named[0]


def test_a_header_with_wrong_voxel_sizes_is_named_in_one_line_warnings_and_the_mask_keeps_its_grid(tmp_path):
    """Voxel sizes ten times too large (a header written in cm, say) make a 2 m "head": the tool still writes a
    mask on the input's grid, and says why it is not to be trusted: the field of view and the mask volume."""
    src = nib.load(SMALL_HEAD)
    wrong = tmp_path / "cm_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(src.dataobj), src.affine @ np.diag([10, 10, 10, 1]), src.header), wrong)
    res = skullstrip("-i", wrong, "-m", tmp_path / "m.nii.gz")
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert all(line.startswith(f"skullstrip: warning: {wrong}: ") for line in lines), res.stderr
    assert any("is not the size of a head: check the voxel sizes" in line for line in lines), res.stderr
    # the mask keeps a brain's proportions: its flags ask about the voxel sizes (0.2.0: "into the neck or face?")
    assert any("brain volume" in line and "are the voxel sizes in the header right?" in line for line in lines), \
        res.stderr
    mask = nib.load(tmp_path / "m.nii.gz")
    assert mask.shape == src.shape and np.allclose(mask.affine, nib.load(wrong).affine)


def test_a_real_head_has_no_field_of_view_doubt_but_a_slab_of_it_has(tmp_path):
    src = nib.load(SMALL_HEAD)
    assert not [m for m in geometry_warnings(src) if "field of view" in m]
    slab = nib.Nifti1Image(np.asanyarray(src.dataobj)[:, :, 20:30], src.affine, src.header)
    assert any("is a slab, thinner than a brain" in m for m in geometry_warnings(slab))


def test_a_mask_given_as_the_t1w_is_named_but_a_uint8_head_is_not(tmp_path):
    src = nib.load(SMALL_HEAD)
    head = np.asanyarray(src.dataobj).astype(np.float32)
    mask_file, head_file = tmp_path / "mask_as_T1w.nii.gz", tmp_path / "uint8_T1w.nii.gz"
    nib.save(nib.Nifti1Image((head > np.percentile(head, 70)).astype(np.uint8), src.affine), mask_file)
    nib.save(nib.Nifti1Image(np.round(255 * head / head.max()).astype(np.uint8), src.affine), head_file)

    def label_doubts(path):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_image(path)
        return [str(w.message) for w in caught if "distinct intensities" in str(w.message)]

    said = label_doubts(mask_file)
    assert len(said) == 1 and said[0].startswith(f"{mask_file}: only 2 distinct intensities"), said
    assert label_doubts(head_file) == []


def _gzip_named_nii(path):
    shutil.copyfile(SMALL_HEAD, path)  # a .nii.gz's bytes under a .nii name


def _mgz(path):
    src = nib.load(SMALL_HEAD)
    nib.save(nib.MGHImage(np.asanyarray(src.dataobj).astype(np.float32), src.affine), path)


def _hdr_img_pair(path):
    nib.save(nib.Nifti1Pair(np.asanyarray(nib.load(SMALL_HEAD).dataobj), nib.load(SMALL_HEAD).affine), path)


@pytest.mark.parametrize("name, writer, problem", [
    ("T1w.nii", _gzip_named_nii, "gzip-compressed but named .nii; rename it to T1w.nii.gz"),
    ("T1.mgz", _mgz, "not a NIfTI image but MGHImage; convert it to NIfTI first"),
    ("T1w.img", _hdr_img_pair, "a .hdr/.img pair: convert it to a single .nii or .nii.gz file"),
])
def test_images_in_the_wrong_format_say_what_to_do(name, writer, problem, tmp_path):
    from bids_skullstrip.nifti import InputError, load_image

    path = tmp_path / name
    writer(path)
    with pytest.raises(InputError) as err:
        load_image(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message, message


@pytest.mark.parametrize("shape, problem", [((64, 64, 1), "is a single slice; a 3D volume of the head is needed"),
                                            ((1, 64, 64), "is a single slice"), ((64, 64), "is not a 3D volume"),
                                            ((1, 1, 64), "is not a 3D volume")])
def test_images_that_are_not_volumes_say_what_they_are(shape, problem, tmp_path):
    from bids_skullstrip.nifti import InputError

    path = tmp_path / "T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), path)
    with pytest.raises(InputError, match=re.escape(f"{path}: image of shape {shape} {problem}")):
        load_image(path)


@pytest.mark.parametrize("scale, largest", [(1e37, "2.55e+39"), (1e-300, "2.55e-298"), (1e36, "2.55e+38")])
def test_intensities_beyond_what_float32_computes_with_are_one_line(scale, largest, tmp_path):
    """A float64 head scaled beyond float32's range was read as 1.3 million "NaN/infinite voxels set to 0" (then
    12 RuntimeWarnings and a wrong mask), one scaled below it as "constant (every voxel = 0)"; finite values near
    its limit overflowed the resampling with RuntimeWarnings on the console (red-team 10a)."""
    from bids_skullstrip.nifti import InputError

    head = nib.load(SMALL_HEAD)
    path = tmp_path / "T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(head.dataobj).astype(np.float64) * scale, head.affine), path)
    with pytest.raises(InputError) as err:
        load_image(path)
    assert str(err.value) == (f"{path}: intensities as large as {largest}: outside the 1e-30 to 1e+35 the app "
                              "computes with; rescale the image")
    # a NaN or constant image says so as before; an image of ordinary float64 is read
    nib.save(nib.Nifti1Image(np.full((64, 64, 64), np.nan), head.affine), path)
    with pytest.raises(InputError, match="every voxel is NaN or infinite"):
        load_image(path)
    nib.save(nib.Nifti1Image(np.asanyarray(head.dataobj).astype(np.float64) * 1e-3, head.affine), path)
    assert load_image(path)[1].max() == pytest.approx(float(np.asanyarray(head.dataobj).max()) * 1e-3)


def test_voxel_axes_nearly_parallel_are_an_invalid_affine(tmp_path):
    """Columns of valid lengths (1 mm) but nearly parallel (a voxel of 1/1000 of a mm³): read as a head, it gave an
    empty mask and "no brain found" (red-team 10a). A 45-degree shear, which some reslicing writes, is read."""
    from bids_skullstrip.nifti import InputError

    head = nib.load(SMALL_HEAD)
    path = tmp_path / "T1w.nii.gz"
    parallel = np.array([[1, 0.9995, 0, 0], [0, 0.0316, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(np.asanyarray(head.dataobj), parallel), path)
    with pytest.raises(InputError, match="invalid voxel-to-world affine .*axes nearly parallel"):
        load_image(path)
    sheared = np.array([[2, 2, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(np.asanyarray(head.dataobj), sheared), path)
    assert load_image(path)[1].shape == head.shape


def test_skullstrip_cli_names_a_pipe_and_an_output_given_twice(tmp_path):
    fifo = tmp_path / "in.nii.gz"
    os.mkfifo(fifo)  # was read as "empty file (0 bytes)"
    res = skullstrip("-i", fifo, "-m", tmp_path / "m.nii.gz")
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"skullstrip: error: {fifo}: not a regular file (a pipe, socket or device): give a NIfTI file"], res.stderr
    res = skullstrip("-i", SMALL_HEAD, "-m", tmp_path / "x.nii.gz", "-o", tmp_path / "x.nii.gz")
    assert res.returncode == 1 and f"{tmp_path / 'x.nii.gz'}: two outputs have the same file name" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz"]


def test_skullstrip_file_judges_the_mask_by_the_contrast_it_was_stripped_as(tmp_path):
    """``skullstrip --contrast T2w image.nii.gz`` got the T2w networks and the T1w QC limits (the contrast was
    not passed on)."""
    from bids_skullstrip.strip import skullstrip_file

    assert skullstrip_file(SMALL_HEAD, mask=tmp_path / "m.nii.gz", contrast="T2w").contrast == "T2w"
    assert skullstrip_file(SMALL_HEAD, mask=tmp_path / "m.nii.gz").contrast == "T1w"


def test_skullstrip_cli_refuses_to_overwrite_input(tmp_path):
    src = tmp_path / "T1w.nii.gz"
    shutil.copyfile(SMALL_HEAD, src)
    res = skullstrip("-i", src, "-o", src)
    assert res.returncode == 1 and "overwrite the input" in res.stderr
    assert src.read_bytes() == SMALL_HEAD.read_bytes()


def test_skullstrip_cli_an_output_that_is_a_folder_is_one_line_and_nothing_is_written(tmp_path):
    (tmp_path / "brain.nii.gz").mkdir()
    res = skullstrip("-i", SMALL_HEAD, "-m", tmp_path / "mask.nii.gz", "-o", tmp_path / "brain.nii.gz")
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"skullstrip: error: {tmp_path / 'brain.nii.gz'}: a folder is there; an output must be a file name"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brain.nii.gz"]
    # a folder whose name has no .nii: the same line (it said "output names must end in .nii or .nii.gz")
    res = skullstrip("-i", SMALL_HEAD, "-m", tmp_path)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"skullstrip: error: {tmp_path}: a folder is there; an output must be a file name"], res.stderr


@pytest.mark.parametrize("there_before", [False, True])
def test_outputs_are_all_written_or_none(there_before, tmp_path, monkeypatch):
    """A write that fails after another output was written (a full disk, a folder gone): no mask without the brain
    image asked for beside it, and outputs of an earlier call stay as they were (the new mask replaced the old one
    beside the old brain image, on a full disk)."""
    import bids_skullstrip.strip as strip

    calls, save = [], strip.save

    def second_write_fails(image, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        save(image, path)

    mask, brain = tmp_path / "mask.nii.gz", tmp_path / "brain.nii.gz"
    if there_before:
        mask.write_text("old mask")
        brain.write_text("old brain")
    monkeypatch.setattr(strip, "save", second_write_fails)
    with pytest.raises(OSError, match=f"{brain}: No space left on device"):
        strip.skullstrip_file(SMALL_HEAD, mask=mask, brain=brain)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == (["brain.nii.gz", "mask.nii.gz"] if there_before else [])
    if there_before:
        assert mask.read_text() == "old mask" and brain.read_text() == "old brain"


@pytest.mark.parametrize("args, problem", [
    ((), "nothing to write"),
    (("-m", "MASK", "--threshold", "1.5"), "between 0 and 1"),
    (("-m", "MASK", "--contrast", "bold"), "--contrast bold: unknown (one of T1w, T2w, FLAIR, PDw, T2starw)"),
    (("-m", "MASK", "--contrast", ""), "--contrast '': unknown (one of T1w, T2w, FLAIR, PDw, T2starw)"),
    (("-m", "MASK", "--border", "inf"), "--border inf: must be between -20 and 20 mm"),  # was a traceback
    (("-m", "MASK", "--border", "nan"), "--border nan: must be between -20 and 20 mm"),
    (("-m", "MASK", "--border", "-500"), "--border -500.0: must be between -20 and 20 mm"),  # was an empty mask
])
def test_skullstrip_cli_usage_errors_exit_2_in_one_line_writing_nothing(args, problem, tmp_path):
    res = skullstrip("-i", SMALL_HEAD, *[tmp_path / "m.nii.gz" if a == "MASK" else a for a in args])
    assert res.returncode == 2, res.stderr
    assert problem in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert list(tmp_path.iterdir()) == []


@needs(REPO.parent / "shared" / "data" / "brains", "the shared brains")
def test_already_skull_stripped_input(tmp_path):
    """A skull-stripped brain (no head around it) gets its own non-zero region as mask, with a warning."""
    brain = REPO.parent / "shared" / "data" / "brains" / "ds002748_sub-01_brain.nii.gz"
    res = skullstrip("-i", brain, "-m", tmp_path / "m.nii.gz")
    assert res.returncode == 0 and "already skull-stripped" in res.stderr, res.stderr
    mask = np.asanyarray(nib.load(tmp_path / "m.nii.gz").dataobj) > 0
    nonzero = np.asanyarray(nib.load(brain).dataobj) > 0
    assert (mask & nonzero).sum() / nonzero.sum() > 0.98


@needs(REPO.parent / "shared" / "data" / "contrasts", "the shared contrasts")
def test_a_small_head_with_zero_air_is_not_taken_for_a_stripped_brain(tmp_path):
    """A real clinical stack with exactly zero air, cut to its top 27 slices (1824 ml non-zero, brain-sized as a
    child's head is): its mask is the brain, not the whole head with a false "already skull-stripped" (0.2.0)."""
    case = REPO.parent / "shared" / "data" / "contrasts" / "openms-p01-s1-t1w"
    head = nib.load(case / "image.nii.gz").slicer[:, :, 12:]
    nib.save(head, tmp_path / "head.nii.gz")
    res = skullstrip("-i", tmp_path / "head.nii.gz", "-m", tmp_path / "m.nii.gz")
    assert res.returncode == 0 and "skull-stripped" not in res.stderr, res.stderr
    mask = np.asanyarray(nib.load(tmp_path / "m.nii.gz").dataobj) > 0
    ref = np.asanyarray(nib.load(case / "mask_ref.nii.gz").dataobj)[:, :, 12:] > 0
    nonzero = np.asanyarray(head.dataobj) != 0
    assert 2 * (mask & ref).sum() / (mask.sum() + ref.sum()) > 0.93  # 0.2.0: 0.70, the whole head
    assert mask.sum() < 0.7 * nonzero.sum()


@needs(REPO.parent / "shared" / "data" / "brains", "the shared brains")
def test_a_stripped_brain_on_a_background_that_is_not_0_is_recognised_or_flagged(tmp_path):
    """A skull-stripped brain on a background of 1 (as some tools write it), on faint noise (here 0.6 % of its
    99th percentile) or with the ringing of a spline resampling (a stripped brain registered: -19 to +13 % about
    its edge) is recognised as one: its region is the mask (0.2.0 and the networks cut 7-10 % of its edge: Dice
    0.905 each, only the noisy one flagged). On noise of 8 % it goes through the networks: their two views disagree
    on 7.5 % of the brain (real heads 1.5-3.9 %), and QC says so (0.2.0: no flag)."""
    brain = nib.load(REPO.parent / "shared" / "data" / "brains" / "ds002748_sub-01_brain.nii.gz")
    data = np.asanyarray(brain.dataobj)
    inside = data > 0
    rng = np.random.default_rng(0)
    turn = np.array([[1, 0, 0], [0, np.cos(0.17), -np.sin(0.17)], [0, np.sin(0.17), np.cos(0.17)]])
    centre = (np.array(data.shape) - 1) / 2
    resampled = {"order": 3, "offset": centre - turn @ centre}
    cases = {
        "one": (np.where(inside, data, 1).astype(data.dtype), inside),
        "faint": (np.where(inside, data, np.abs(rng.normal(0, 1.5, data.shape))).astype(np.float32), inside),
        "ringing": (ndi.affine_transform(data.astype(np.float32), turn, **resampled),
                    ndi.affine_transform(inside.astype(np.float32), turn, **{**resampled, "order": 1}) > 0.5),
    }
    for name, (image, region) in cases.items():
        nib.save(nib.Nifti1Image(image, brain.affine), tmp_path / f"{name}.nii.gz")
        res = skullstrip("-i", tmp_path / f"{name}.nii.gz", "-m", tmp_path / "m.nii.gz", "--fail-on-flag")
        assert res.returncode == 0 and "already skull-stripped" in res.stderr, (name, res.stderr)
        mask = np.asanyarray(nib.load(tmp_path / "m.nii.gz").dataobj) > 0  # its region, holes filled
        assert 2 * (mask & region).sum() / (mask.sum() + region.sum()) > 0.99, name
    noise = np.abs(rng.normal(0, 0.08 * np.percentile(data[inside], 99), data.shape))
    nib.save(nib.Nifti1Image(np.where(inside, data, noise).astype(np.float32), brain.affine),
             tmp_path / "noise.nii.gz")
    res = skullstrip("-i", tmp_path / "noise.nii.gz", "-m", tmp_path / "m.nii.gz", "--fail-on-flag")
    assert res.returncode == 3, res.stderr
    assert "QC: the network's two views of the brain disagree on a fraction of it: 0.0" in res.stderr, res.stderr
    assert "the network is unsure of this image" in res.stderr


@needs(REPO.parent / "shared" / "data" / "heads", "the shared heads")
def test_a_border_the_user_asks_for_is_not_flagged(tmp_path):
    """--border 3 and 5 grow a good mask as asked; QC judges the networks' mask before the border (0.2.0 flagged
    every such mask: "mask and p>0.5 disagree on a fraction of the mask: 0.119", and at 5 mm "mask too large?")."""
    head = REPO.parent / "shared" / "data" / "heads" / "ds000011-sub-13" / "T1w.nii.gz"
    volumes = []
    for border in ("0", "3", "5"):
        res = skullstrip("-i", head, "-m", tmp_path / f"m{border}.nii.gz", "--border", border, "--fail-on-flag")
        assert res.returncode == 0 and "QC:" not in res.stderr, res.stderr
        volumes.append(int((np.asanyarray(nib.load(tmp_path / f"m{border}.nii.gz").dataobj) > 0).sum()))
    assert volumes[0] < volumes[1] < volumes[2]


# ------------------------------------------------------------------------------- fMRIPrep's option names
def test_fmriprep_spellings_of_the_options(tmp_path):
    from bids_skullstrip.cli.parser import build_parser
    from bids_skullstrip.config import RunConfig
    from bids_skullstrip.execution import plugin_settings

    (tmp_path / "in").mkdir()
    opts = build_parser().parse_args([str(tmp_path / "in"), str(tmp_path / "out"), "participant", "--nthreads", "3",
                                      "--omp_nthreads", "1", "--mem", "3072", "--session_label", "1",
                                      "--stop-on-first-crash"])
    config = RunConfig.from_args(opts)
    assert (config.n_cpus, config.omp_nthreads, config.session_label, config.stop_on_first_crash) == (3, 1, ("1",), True)
    # no --threshold: each image gets its networks' calibrated one (ModelCard.bundled_for)
    assert config.mem_gb == 3.0 and config.threshold is None and config.work_dir.is_absolute()
    plugin, args = plugin_settings(config)
    assert plugin == "MultiProc" and args["n_procs"] == 3 and args["memory_gb"] == 3.0
    assert "(default: None)" not in build_parser().format_help() and "``" not in build_parser().format_help()
    from bids_skullstrip.cli.single_file import build_parser as skullstrip_parser

    assert "(default: None)" not in skullstrip_parser().format_help()
    assert "(default: 0.0)" in skullstrip_parser().format_help()  # --border: a default worth showing


def test_boilerplate_only_and_reports_only(small_dataset, tmp_path):
    out = tmp_path / "out"
    res = app(small_dataset, out, "participant", "--boilerplate-only", "--skip-bids-validation")
    assert res.returncode == 0, res.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "logs/CITATION.html", "logs/CITATION.md"]
    from bids_skullstrip.model.card import ModelCard

    t1w, other = ModelCard.bundled_for("T1w"), ModelCard.bundled_for("FLAIR")
    text = (out / "logs" / "CITATION.md").read_text()
    assert "Each image was skull-stripped by" in text and t1w.sha256 in text and other.sha256 not in text
    # the methods of a run of other contrasts, before any output: their networks and thresholds
    res = app(small_dataset, tmp_path / "out2", "participant", "--boilerplate-only", "--skip-bids-validation",
              "--contrasts", "T1w", "FLAIR", "T2w")
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "out2" / "logs" / "CITATION.md").read_text()
    assert "The T1w images were skull-stripped by" in text and "; the FLAIR and T2w images by" in text
    thresholds = f"thresholded at {t1w.threshold:g} (T1w) and {other.threshold:g} (FLAIR and T2w)"
    assert other.sha256 in text and thresholds in text
    # one threshold given for every contrast: said once (it read "0.55 (T1w) and 0.55 (FLAIR and T2w)")
    res = app(small_dataset, tmp_path / "out3", "participant", "--boilerplate-only", "--skip-bids-validation",
              "--contrasts", "T1w", "FLAIR", "T2w", "--threshold", "0.55")
    text = (tmp_path / "out3" / "logs" / "CITATION.md").read_text()
    assert res.returncode == 0 and "thresholded at 0.55, reduced" in text, text
    # --reports-only before any image was run: no report that would only say nothing was found, but one line (2)
    res = app(small_dataset, out, "participant", "--reports-only", "--skip-bids-validation")
    text = res.stdout + res.stderr
    assert res.returncode == 2 and not (out / "sub-01.html").exists() and not (out / "sub-01").exists(), text
    assert f"{out}: no report written: no image was processed into this folder" in text, text
    # an image whose last run failed has a report: its error
    from bids_skullstrip import outputs
    from bids_skullstrip.discovery import StructuralInput

    image = StructuralInput.from_path(small_dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz", small_dataset)
    outputs.record_failure(out, image, "sub-01/anat/sub-01_T1w.nii.gz: the worker process was killed by signal 9")
    res = app(small_dataset, out, "participant", "--reports-only", "--skip-bids-validation")
    assert res.returncode == 0, res.stderr
    assert "the worker process was killed by signal 9" in (out / "sub-01.html").read_text()
    assert not (out / "sub-01" / "anat").exists()
    # a report whose image a stopped redo un-marked (its metrics JSON gone, its other outputs there) showed it as
    # processed; rewritten, it says what is there now
    res = app(small_dataset, out, "participant", "--skip-bids-validation", "-w", tmp_path / "w")
    assert res.returncode == 0 and '<section id="' in (out / "sub-01.html").read_text(), res.stderr
    outputs.unmark_finished(out, image)
    (out / "sub-01_old.html").write_text("a user's copy")  # not a report of this app's (red-team 14)
    (out / "sub-dir.html").mkdir()
    res = app(small_dataset, out, "participant", "--reports-only", "--skip-bids-validation", "--contrasts", "FLAIR")
    assert res.returncode == 0, res.stderr
    report = (out / "sub-01.html").read_text()
    assert "No processed images were found for this participant." in report and '<section id="' not in report
    assert (out / "sub-01_old.html").read_text() == "a user's copy" and (out / "sub-dir.html").is_dir()
    assert "--reports-only uses only --participant-label of the selection options: --contrasts ignored" in \
        res.stdout + res.stderr, res.stdout + res.stderr
    res = app(small_dataset, tmp_path / "nowhere", "participant", "--reports-only")  # was made, empty (red-team 14)
    assert res.returncode == 2 and not (tmp_path / "nowhere").exists() and res.stderr.strip().splitlines() == [
        f"bids_skullstrip: error: {tmp_path / 'nowhere'}: output folder not found; run the participant level first"]
    res = app(small_dataset, out, "participant", "--reports-only", "--participant-label", "sub-")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "bids_skullstrip: error: an empty participant label was given (the output folder has 01)"], res.stderr


def test_reports_keep_every_contrasts_failures_and_forget_images_no_longer_in_the_dataset(tmp_path):
    """A participant's report held the failures of the run that wrote it only: a rerun with fewer --contrasts (or
    --reports-only, which followed --contrasts) dropped another contrast's failure that the group level still
    counted, and a participant with no image of the default contrast kept its old report (red-team 12). A failure
    of an image removed from the dataset since was counted on, and shown, for good."""
    bids = tmp_path / "bids"
    make_dataset(bids, {"01": copy_head})
    t2w = bids / "sub-01" / "anat" / "sub-01_T2w.nii.gz"
    nifti(np.random.default_rng(0).random((30, 30, 30, 3), dtype=np.float32) * 100)(t2w)  # 4D: fails
    (bids / "sub-02" / "anat").mkdir(parents=True)
    copy_head(bids / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz")
    out, common = tmp_path / "out", ["--skip-bids-validation", "-w", tmp_path / "w"]
    res = app(bids, out, "participant", "--contrasts", "all", *common)
    assert res.returncode == 1 and "sub-01_T2w.nii.gz" in res.stdout + res.stderr, res.stdout[-2000:] + res.stderr
    report = (out / "sub-01.html").read_text()
    assert "4D" in report and '<a href="#errors">1 failed</a>' in report, report
    res = app(bids, out, "group")  # every T2w failed: no measures, and no empty table of what they mean
    assert res.returncode == 0 and "What the measures mean" in (out / "group_T1w.html").read_text(), res.stderr
    assert "What the measures mean" not in (out / "group_T2w.html").read_text()
    res = app(bids, out, "group", "--participant-label", "02")  # the other contrasts' reports: said to be older
    assert ("group_T1w, group_T2w: not rewritten (participant(s) 02 have no such image): as an earlier group run "
            "wrote them") in res.stdout + res.stderr, res.stdout + res.stderr
    res = app(bids, out, "participant", "--participant-label", "01", *common)  # T1w only: the T2w not run
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "4D" in (out / "sub-01.html").read_text()
    (out / "sub-02.html").unlink()
    res = app(bids, out, "participant", "--reports-only", "--skip-bids-validation")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "4D" in (out / "sub-01.html").read_text() and "sub-02_FLAIR" in (out / "sub-02.html").read_text()
    t2w.unlink()
    res = app(bids, out, "participant", "--participant-label", "01", *common)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "forgot the failure of sub-01/anat/sub-01_T2w.nii.gz: it is no longer in the dataset" in res.stdout
    assert "4D" not in (out / "sub-01.html").read_text()
    # a failure of an image in a folder its name does not say (ses-1/ without ses- in the name; it fails for that
    # now, red-team 19) is kept: it is there (red-team 14: its path was rebuilt from its name, and the run forgot
    # the failure it had just recorded)
    odd = bids / "sub-01" / "ses-1" / "anat" / "sub-01_FLAIR.nii.gz"
    odd.parent.mkdir(parents=True)
    copy_head(odd)
    res = app(bids, out, "participant", "--participant-label", "01", "--contrasts", "FLAIR", *common)
    assert res.returncode == 1 and "forgot" not in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    said = ("sub-01/ses-1/anat/sub-01_FLAIR.nii.gz: its name puts it in sub-01/anat/, not in sub-01/ses-1/anat/: move "
            "it there or rename it")
    assert said in res.stdout + res.stderr and said in (out / "sub-01.html").read_text(), res.stdout + res.stderr
    assert not list((out / "sub-01").rglob("*FLAIR*"))  # nothing written for it
    shutil.rmtree(odd.parents[1])
    res = app(bids, out, "participant", "--participant-label", "01", *common)
    assert "forgot the failure of sub-01/ses-1/anat/sub-01_FLAIR.nii.gz: it is no longer in the dataset" in res.stdout
    flair = bids / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz"
    flair.rename(flair.with_name("sub-02_T2w.nii.gz"))  # renamed: its FLAIR outputs stay
    res = app(bids, out, "group")
    assert res.returncode == 0 and not (out / "group_T2w.tsv").exists(), res.stdout[-2000:] + res.stderr[-2000:]
    assert ("group_FLAIR: 1 image(s) in it are no longer in the dataset (removed or renamed since the participant "
            "level ran them); first: sub-02_FLAIR") in res.stdout, res.stdout
    assert "no longer in the dataset: removed or renamed" in (out / "group_FLAIR.tsv").read_text()  # the row too
    shutil.rmtree(bids / "sub-02")  # the participant removed: said with its label too (the dataset lacks it)
    res = app(bids, out, "group", "--participant-label", "02")
    assert ("group_FLAIR: 1 image(s) in it are no longer in the dataset (removed or renamed since the participant "
            "level ran them); first: sub-02_FLAIR") in res.stdout, res.stdout
    # the same image twice (.nii beside .nii.gz): the participant level fails it; so does the group level now (it
    # counted its earlier outputs as processed, 0 failed)
    shutil.copyfile(SMALL_HEAD, bids / "sub-01" / "anat" / "sub-01_T1w.nii")
    res = app(bids, out, "participant", "--participant-label", "01", *common)
    assert res.returncode == 1 and "there twice" in res.stdout + res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
    res = app(bids, out, "group")
    assert "group_T1w: 1 image(s): 0 processed (0 flagged by QC), 1 failed" in res.stdout, res.stdout


def test_run_logs_work_dir_size_node_local_warning_and_clean_workdir(small_dataset, tmp_path):
    """``python -m bids_skullstrip`` runs the app; each run leaves its log and its resolved configuration in
    ``<out>/logs/``; the end says where the work directory is and how large (``--clean-workdir`` removes
    it); under a scheduler a work directory on the node's own disk is warned about; matplotlib's first-run
    font-cache message does not reach the console."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, SLURM_JOB_ID="4242", MPLCONFIGDIR=str(tmp_path / "fresh_mpl"))
    res = subprocess.run([sys.executable, "-m", "bids_skullstrip", small_dataset, out, "participant", "-w", work,
                          "--skip-bids-validation", "--n-cpus", "1"], capture_output=True, text=True, env=env,
                         timeout=1200)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    assert "font cache" not in text, text
    assert f"the work directory {work} is on this node's own disk (SLURM_JOB_ID is set)" in text, text
    assert "put -w on shared scratch" in text
    [size_line] = [line for line in text.splitlines() if line.startswith(f"work directory: {work} (")]
    assert int(size_line.split("(")[1].split(" MB")[0]) > 1, size_line
    [log_file] = (out / "logs").glob("run-*.log")
    assert "summary: 1 image(s): 1 processed in this run" in log_file.read_text()
    [config_file] = (out / "logs").glob("run-*_config.json")
    config = json.loads(config_file.read_text())
    assert config["plugin"] == "MultiProc" and config["plugin_args"]["n_procs"] == 1
    from bids_skullstrip.model.card import ModelCard

    t1w = ModelCard.bundled_for("T1w")  # no --threshold: the calibrated one of each contrast's networks
    assert config["threshold"] == {"T1w": t1w.threshold} and config["model_sha256"] == {"T1w": t1w.sha256}
    assert config["work_dir"] == str(work) and config["run_id"] in log_file.name
    # another run (a job of the same array, other labels) busy with an image in the same work directory: its
    # folders are kept (they were removed under it: it failed with a missing result file)
    from bids_skullstrip.discovery import StructuralInput
    from bids_skullstrip.outputs import ImageLocks

    other = ImageLocks(work / ".locks")
    assert other.claim(StructuralInput.from_path(tmp_path / "bids" / "sub-02" / "anat" / "sub-02_T1w.nii.gz")) is None
    res = app(small_dataset, out, "participant", "-w", work, "--skip-bids-validation", "--n-cpus", "1",
              "--overwrite", "--clean-workdir")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"work directory {work} kept (--clean-workdir): another run is using it (pid {os.getpid()}" in res.stdout
    assert (work / "bids_skullstrip_wf").is_dir()
    other.release()
    res = app(small_dataset, out, "participant", "-w", work, "--skip-bids-validation", "--n-cpus", "1",
              "--overwrite", "--clean-workdir")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"work directory {work} removed (--clean-workdir)" in res.stdout and not work.exists()
    assert len(list((out / "logs").glob("run-*.log"))) == 3


# ------------------------------------------------------------------------------- memory limits
def test_a_memory_limit_below_what_an_image_needs_is_one_line_before_anything_runs(small_dataset, tmp_path):
    out = tmp_path / "out"
    res = app(small_dataset, out, "participant", "--mem-gb", "0.5", "--skip-bids-validation", "-w", tmp_path / "w")
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "sub-01/anat/sub-01_T1w.nii.gz: needs about" in res.stderr and "may use 0.50 GB" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists()  # a run that could not start made nothing (it made the output folder's files)


def test_a_memory_limit_below_two_images_runs_them_one_after_the_other_within_it(tmp_path):
    """``--mem-gb`` below what two images need at once: one worker, the images one after the other, and the
    run's processes together (sampled every 0.1 s) stay under the limit."""
    from types import SimpleNamespace

    from bids_skullstrip.workflows.base import image_memory_gb

    bids = tmp_path / "bids"
    make_dataset(bids, {"01": copy_head, "02": copy_head})
    need = image_memory_gb(SimpleNamespace(path=SMALL_HEAD))
    limit = round(1.9 * need, 2)
    work = tmp_path / "work"
    proc = _start([bids, tmp_path / "out", "participant", "-w", work, "--skip-bids-validation", "--n-cpus", "2",
                   "--mem-gb", limit])
    peak = 0
    while proc.poll() is None:
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert f"memory: 1 image(s) at a time (an image needs up to {need:.2f} GB, the run may use {limit:.2f} GB)" \
        in stdout, stdout
    assert "[MultiProc] Running 2 tasks" not in (work / "nipype.log").read_text()
    print(f"peak {peak / 2**30:.2f} GB of the run's processes, limit {limit} GB, an image needs {need} GB")
    assert peak < limit * 2**30, f"peak {peak / 2**30:.2f} GB > {limit} GB"
    for label in ("01", "02"):
        _assert_outputs_complete(tmp_path / "out", label)


def test_cgroup_memory_limit_is_read_for_both_cgroup_versions(tmp_path):
    from bids_skullstrip.execution import cgroup_memory_limit_gb

    none = tmp_path / "no-proc-cgroup"  # a container: its own cgroup is the root it sees
    (tmp_path / "memory.max").write_text("3221225472\n")  # a container started with --memory 3g (v2)
    assert cgroup_memory_limit_gb(tmp_path, none) == 3.0
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_memory_limit_gb(tmp_path, none) is None
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(str(2**31))  # v1
    assert cgroup_memory_limit_gb(tmp_path, none) == 2.0
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1 without a limit
    assert cgroup_memory_limit_gb(tmp_path, none) is None


def test_the_limits_of_a_job_steps_cgroup_below_the_root_are_read(tmp_path):
    """A SLURM job step (or Apptainer without a cgroup namespace) sees the whole tree: its limits are on its own
    cgroup, at the path /proc/self/cgroup names (the app read only the root's files and planned for the whole
    machine's memory); the tightest of the cgroups above it holds."""
    from bids_skullstrip.execution import cgroup_cpu_limit, cgroup_memory_free_gb, cgroup_memory_limit_gb

    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    step = v2 / "system.slice" / "slurmstepd.scope" / "job_27" / "step_0"
    step.mkdir(parents=True)
    (v2 / "proc_cgroup").write_text("0::/system.slice/slurmstepd.scope/job_27/step_0\n")
    (v2 / "memory.max").write_text("max\n")
    (step.parent / "memory.max").write_text(str(3 * 2**30))  # the job's --mem 3G
    (step / "memory.max").write_text("max\n")
    (step / "memory.current").write_text(str(2**30))
    (step.parent / "memory.current").write_text(str(2 * 2**30))
    (step.parent / "cpu.max").write_text("200000 100000\n")  # --cpus-per-task 2 under a CPU quota
    (step / "cpu.max").write_text("max 100000\n")
    assert cgroup_memory_limit_gb(v2, v2 / "proc_cgroup") == 3.0
    assert cgroup_memory_free_gb(v2, v2 / "proc_cgroup") == 1.0  # the job's limit less the job's usage
    assert cgroup_cpu_limit(v2, v2 / "proc_cgroup") == 2.0
    job = v1 / "memory" / "slurm" / "uid_0" / "job_27"
    job.mkdir(parents=True)
    (v1 / "cpu").mkdir()
    (v1 / "proc_cgroup").write_text("4:memory:/slurm/uid_0/job_27\n1:cpu,cpuacct:/\n0::/\n")
    (job / "memory.limit_in_bytes").write_text(str(2**31))
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000")  # docker run --cpus 1.5
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_memory_limit_gb(v1, v1 / "proc_cgroup") == 2.0
    assert cgroup_cpu_limit(v1, v1 / "proc_cgroup") == 1.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert cgroup_cpu_limit(v1, v1 / "proc_cgroup") is None


def test_the_default_number_of_cpus_is_what_the_process_may_run_on(monkeypatch):
    """`--cpuset-cpus 0`, `taskset -c 0`, a SLURM job's cpuset: the app started as many workers as the machine
    has CPUs (os.cpu_count())."""
    import bids_skullstrip.execution as execution

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(execution, "cgroup_cpu_limit", lambda: None)
    assert execution.available_cpus() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(execution, "cgroup_cpu_limit", lambda: 1.5)  # `--cpus 1.5`
    assert execution.available_cpus() == 2
    res = subprocess.run(["taskset", "-c", "0", sys.executable, "-c",
                          "from bids_skullstrip.cli.parser import build_parser; "
                          "print(build_parser().parse_args(['b', 'o', 'participant']).n_cpus)"],
                         capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "1", res.stdout + res.stderr


def test_a_work_directory_in_memory_is_counted_and_emptied_image_by_image(small_dataset, tmp_path):
    """A container run `--read-only` keeps its default work directory in a tmpfs /tmp, which takes the
    container's memory: the finished images' intermediate files (0.3 GB a 1 mm head) filled a `--memory 3g`
    container until its workers were killed for memory. Each image's are removed as soon as it is finished, and
    the memory plan counts those of the images in flight."""
    from bids_skullstrip.execution import in_memory
    from bids_skullstrip.workflows.base import image_memory_gb

    shm = Path("/dev/shm")
    assert in_memory(shm / "not-made-yet") and not in_memory("/proc")
    work = shm / f"bids_skullstrip_test_{os.getpid()}"
    try:
        res = app(small_dataset, tmp_path / "out", "participant", "--skip-bids-validation", "-w", work)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert f"the work directory {work} is in memory (tmpfs)" in res.stdout, res.stdout
        assert "in memory: lost when this machine or container stops" in res.stdout, res.stdout
        left = [p for p in work.rglob("*") if p.is_file() and p.name != "nipype.log"]
        assert left == [], left
        _assert_outputs_complete(tmp_path / "out", "01")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from types import SimpleNamespace

    image = SimpleNamespace(path=small_dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    extra = image_memory_gb(image, work_in_memory=True) - image_memory_gb(image)
    assert extra == pytest.approx(17 * np.prod(nib.load(image.path).shape[:3]) / 1e9, abs=0.01)


# ------------------------------------------------------------------------------- full disk, read-only mount, odd paths
@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (root only, where the machine allows mounting): ``mount(size_kb, read_only)``."""
    mounted = []

    def mount(size_kb, read_only=False):
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(point)],
                             capture_output=True, text=True)
        if res.returncode != 0:  # CI runs as root and can: there the test fails instead
            unavailable("full-disk", f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode})")
        mounted.append(point)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_full_disk_fails_the_image_with_one_line_and_leaves_nothing_half_written(small_dataset, tmpfs, tmp_path):
    out = tmpfs(1024) / "out"  # 1 MB: room for the folder and the small files, not for the images
    res = app(small_dataset, out, "participant", "-w", tmp_path / "work", "--skip-bids-validation")
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert_one_line_errors(res)
    lines = [line for line in (res.stdout + res.stderr).splitlines() if "sub-01_T1w.nii.gz" in line
             and "No space left on device" in line]
    assert lines, res.stdout[-3000:] + res.stderr[-3000:]
    for nii in out.rglob("*.nii.gz"):
        if not nii.name.startswith(".tmp-"):
            np.asanyarray(nib.load(nii).dataobj)  # whatever has a final name is complete
    assert not (out / "sub-01" / "anat" / "sub-01_desc-brain_metrics.json").exists()


def test_a_work_directory_that_fills_up_fails_each_image_in_one_line(tmpfs, tmp_path):
    """nipype's crash file could not be written on the full work directory: its OSError ended the whole run with
    one line naming no image and no file (and, with the log on that disk, ~240 lines of "--- Logging error ---")."""
    bids = tmp_path / "bids"
    make_dataset(bids, {"01": copy_head, "02": copy_head})
    work = tmpfs(12 * 1024) / "work"  # room for the first node's files and little more
    res = app(bids, tmp_path / "out", "participant", "-w", work, "--skip-bids-validation", "--n-cpus", "2")
    text = res.stdout + res.stderr
    assert res.returncode == 1, text[-3000:]
    assert_one_line_errors(res)
    assert "Logging error" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("  sub-")]
    assert len(lines) == 2 and all("No space left on device" in line for line in lines), text[-3000:]
    assert (tmp_path / "out" / "sub-01.html").is_file()  # the reports still say what became of each image


def _result_file_not_written():
    try:
        raise OSError(28, "No space left on device")  # writing the node's result file
    except OSError:
        raise FileNotFoundError("/w 1/n4/result_n4.pklz")  # nipype's run_node reads it: load_resultfile


def test_the_error_that_kept_a_result_file_from_being_written_is_the_one_said():
    """nipype's worker reads the node's result file while it handles the node's error: on a full work directory the
    line was the file's path alone (CI, 2026-12-07: `sub-01/anat/sub-01_T1w.nii.gz: /w/.../n4/result_n4.pklz`)."""
    import traceback
    from concurrent.futures import ProcessPoolExecutor

    from bids_skullstrip.execution import traceback_message

    with ProcessPoolExecutor(1) as pool:  # as the app's workers report it: the worker's traceback as the cause
        remote = pool.submit(_result_file_not_written).exception()
    try:
        _result_file_not_written()
    except OSError as local:
        for exc in (remote, local):
            text = "".join(traceback.format_exception(exc))
            assert traceback_message(text) == "[Errno 28] No space left on device", text
    try:  # the same error alone, or another final one, is said as before
        raise FileNotFoundError("/w/n4/result_n4.pklz")
    except OSError as exc:
        assert traceback_message("".join(traceback.format_exception(exc))) == "/w/n4/result_n4.pklz"
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise ValueError("cannot reshape array")
    except ValueError as exc:
        assert traceback_message("".join(traceback.format_exception(exc))) == "cannot reshape array"


def test_an_address_space_limit_is_named_when_an_image_runs_out_of_it(small_dataset, tmp_path):
    """`ulimit -v 900000` (HPC login shells set such limits): the image failed with "Failed to allocate 85196800
    bytes" or "cannot reshape array of size 0" (OpenVINO's empty output), the limit named nowhere. How much a
    process maps depends on the CPU (the runtimes pick their kernels by it): under 1.2 GB the image failed on one
    machine and was stripped on another, where 0.5-1.0 GB failed it."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (900 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))

    res = app(small_dataset, tmp_path / "out", "participant", "-w", tmp_path / "work", "--skip-bids-validation",
              preexec_fn=limit)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    [line] = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("  sub-01/")]
    assert "out of memory under an address-space limit of 0.9 GB, `ulimit -v`" in line, line
    assert "warning: the address space of each process is limited to 0.9 GB (`ulimit -v`)" in res.stdout  # before


def test_a_network_output_that_cannot_be_allocated_is_said_as_out_of_memory():
    """Under `ulimit -v`, OpenVINO returned its last, smaller output buffer without an error when a larger input's
    could not be allocated: the image failed with "cannot reshape array of size 614400 into shape (1,80,104,80,1)",
    which no one reads as out of memory (red-team 15)."""
    script = textwrap.dedent("""
        import resource, numpy as np, psutil
        from bids_skullstrip.execution import OUT_OF_ADDRESS_SPACE
        from bids_skullstrip.model.inference import WEIGHTS_DIR, OnnxNetwork
        net = OnnxNetwork(str(WEIGHTS_DIR / "unet.onnx"), 1)
        net(np.zeros((1, 80, 96, 80, 1), np.float32))
        resource.setrlimit(resource.RLIMIT_AS, (psutil.Process().memory_info().vms + 50 * 2**20,
                                                resource.RLIM_INFINITY))
        try:
            out = net(np.zeros((1, 96, 128, 96, 1), np.float32))
            print("returned", out.shape)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            print("raised", any(s in message for s in OUT_OF_ADDRESS_SPACE), message)
        """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.stdout.startswith("raised True"), res.stdout + res.stderr[-2000:]


def _as_in_a_terminal():
    """Ctrl-C and SIGHUP as a terminal's foreground job has them: tests started in the background or under nohup
    (CI) ignore both, and so does what they start (`skullstrip` keeps a signal it was started ignoring)."""
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


@pytest.mark.parametrize("signum, status, second", [(signal.SIGTERM, 143, None), (signal.SIGHUP, 129, None),
                                                     (signal.SIGINT, 130, None), (signal.SIGTERM, 143, signal.SIGHUP)])
def test_skullstrip_stopped_while_writing_says_so_and_leaves_no_temporary(signum, status, second, small_dataset,
                                                                           tmp_path):
    """SIGTERM or SIGHUP while `skullstrip` wrote its mask killed it without a word and left a 0-byte `.tmp-*` beside
    the outputs, which no later call removed; Ctrl-C printed a KeyboardInterrupt traceback (red-team 15). Here the
    signal arrives once the mask's temporary file is written, before it is renamed; a second, other signal while the
    first one unwinds printed a 50-line traceback and the second's status (red-team 17)."""
    script = tmp_path / "patched_skullstrip.py"
    script.write_text(textwrap.dedent(f"""
        import os, time
        from bids_skullstrip import nifti
        save = nifti.save
        def saving(img, path):
            save(img, path)
            try:
                os.kill(os.getpid(), {int(signum)})
                time.sleep(5)
            finally:  # while the first one unwinds
                if {int(second or 0)}:
                    os.kill(os.getpid(), {int(second or 0)})
        nifti.save = saving
        from bids_skullstrip.cli import single_file
        single_file.run()
        """))
    out = tmp_path / "out"
    out.mkdir()
    res = subprocess.run([sys.executable, str(script), "-i", small_dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz",
                          "-m", out / "mask.nii.gz"], capture_output=True, text=True, timeout=300,
                         preexec_fn=_as_in_a_terminal)
    assert res.returncode == status, res.stderr[-3000:]
    assert res.stderr.strip() == (f"skullstrip: interrupted ({signal.Signals(signum).name}): the outputs written so "
                                  "far are complete, no other was left half-written"), res.stderr[-3000:]
    assert not list(out.iterdir()), list(out.iterdir())


def test_skullstrip_out_of_address_space_is_one_line(small_dataset, tmp_path):
    """`skullstrip` under `prlimit --as=1000000000` printed OpenVINO's 40-line traceback ending "[CPU]
    ConvolutionBackpropData node ... can't alloc", the limit named nowhere (red-team 15)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (1000 * 10**6, resource.getrlimit(resource.RLIMIT_AS)[1]))

    image = small_dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    res = subprocess.run([*_exe("skullstrip", "bids_skullstrip.cli.single_file"), "-i", str(image), "-m",
                          str(tmp_path / "mask.nii.gz")], capture_output=True, text=True, timeout=300,
                         preexec_fn=limit)
    assert res.returncode == 1, res.stderr[-3000:]
    [line] = res.stderr.strip().splitlines()
    assert line.startswith(f"skullstrip: error: {image}: ") and "out of memory under an address-space limit" in line
    assert not list(tmp_path.glob("*mask*")), list(tmp_path.iterdir())


def test_a_full_output_folder_still_says_what_became_of_each_image(small_dataset, tmpfs, tmp_path):
    """A quota already used up: the failure records could not be written either, and their OSError ended the run
    with one line naming no file and no image."""
    out = tmpfs(20) / "out"
    res = app(small_dataset, out, "participant", "-w", tmp_path / "work", "--skip-bids-validation")
    text = res.stdout + res.stderr
    assert res.returncode == 1, text[-3000:]
    assert_one_line_errors(res)
    assert "error: could not write the failure records (logs/failed): [Errno 28] No space left on device" in text
    assert "sub-01/anat/sub-01_T1w.nii.gz: [Errno 28] No space left on device" in text, text[-3000:]
    assert "1 of 1 image(s) failed" in text, text[-3000:]


def test_read_only_output_mount_is_one_line_before_anything_runs(small_dataset, tmpfs, tmp_path):
    out = tmpfs(1024, read_only=True)
    res = app(small_dataset, out / "out", "participant", "-w", tmp_path / "work", "--skip-bids-validation")
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "not writable" in res.stderr and "Read-only file system" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_output_folders_another_user_left_read_only_are_said(tmp_path):
    """A rerun by another user over an earlier run's outputs: its logs/ or an image's folder not writable ended the
    run with "PermissionError: [Errno 13] Permission denied: '.../logs/.tmp-1-..._config.json'" (1), naming a
    temporary file. A read-only mount stands in for another user's folder (root may write anywhere else)."""
    bids = tmp_path / "bids"
    make_dataset(bids, {"01": copy_head, "02": copy_head})
    out, work = tmp_path / "out", tmp_path / "work"
    args = [bids, out, "participant", "-w", work, "--skip-bids-validation"]
    assert app(*args, "--participant-label", "01").returncode == 0
    mounted = []
    try:
        for folder in (out / "sub-01" / "anat", out / "logs"):
            subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], check=True)
            mounted.append(folder)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        res = app(*args, "--overwrite")
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [
            f"bids_skullstrip: error: {out / 'logs'}: the output folder's logs folder is not writable (Read-only file "
            "system)"], res.stderr
        subprocess.run(["umount", str(mounted.pop())], check=True)  # logs/ writable again: sub-01's folder is not
        res = app(*args, "--overwrite")
        assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
        assert_one_line_errors(res)
        assert (f"  sub-01/anat/sub-01_T1w.nii.gz: its output folder {out / 'sub-01' / 'anat'} is not writable by "
                "this user") in res.stdout, res.stdout[-2000:]
        _assert_outputs_complete(out, "02")
    finally:
        for folder in reversed(mounted):
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_group_level_on_a_full_output_folder_is_one_line(small_dataset, tmpfs, tmp_path):
    point = tmpfs(24)  # the metrics, and no room for the tables, figures and reports
    metrics = point / "sub-01" / "anat" / "sub-01_desc-brain_metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"qc": {"brain_volume_ml": 1400.0}, "flags": []}))
    subprocess.run(["dd", "if=/dev/zero", f"of={point / 'filler'}", "bs=1k", "count=64"], capture_output=True)
    res = app(small_dataset, point, "group")
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert_one_line_errors(res)
    [line] = [line for line in (res.stdout + res.stderr).splitlines() if "error" in line]
    assert line.startswith(f"error: the group report could not be written in {point}: ") and "No space left" in line


def test_group_level_on_a_read_only_output_folder_is_one_line(small_dataset, tmpfs, tmp_path):
    """The group tables and reports go into the output folder: one line and status 2 (an OSError and 1 before)."""
    point = tmpfs(1024)
    metrics = point / "sub-01" / "anat" / "sub-01_desc-brain_metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("{}")
    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
    res = app(small_dataset, point, "group")
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [
        f"bids_skullstrip: error: {point}: the output folder is not writable (Read-only file system)"], res.stderr


def test_outputs_of_a_raw_dataset_not_on_this_machine_are_said_and_added_to(tmp_path):
    """An output folder whose DatasetLinks.raw names a folder this machine lacks (a container's /bids, a dataset
    moved since): the same dataset or another; a warning, and the run goes on (where that folder is here and is
    another dataset, the run is refused: test_usage_errors)."""
    bids = tmp_path / "bids"
    make_dataset(bids, {"01": copy_head})
    out = tmp_path / "out"
    from bids_skullstrip.outputs import init_output_dir

    init_output_dir(out, tmp_path / "gone")  # as a container run wrote it: file:///bids
    res = app(bids, out, "participant", "--skip-bids-validation", "-w", tmp_path / "w", "--n-cpus", "1")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    said = [line for line in (res.stdout + res.stderr).splitlines() if "DatasetLinks.raw" in line]
    assert len(said) == 1 and said[0].startswith(f"warning: {out}: its outputs are of {tmp_path / 'gone'} ") \
        and said[0].endswith(f"if {bids} is another dataset, use an output folder of its own"), said
    assert (out / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz").is_file()


def test_paths_with_spaces_and_non_ascii_letters(tmp_path):
    root = tmp_path / "Études IRM" / "données brutes"
    make_dataset(root, {"01": copy_head})
    out = tmp_path / "dérivés à vérifier" / "out put"
    res = app(root, out, "participant", "-w", tmp_path / "trav ail", "--skip-bids-validation")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    mask = out / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz"
    assert (np.asanyarray(nib.load(mask).dataobj) > 0).sum() > 1000
    assert (out / "sub-01.html").is_file()
