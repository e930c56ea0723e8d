"""Real BIDS layouts from bids-standard/bids-examples, with real heads as their T1w images, through the app.

    python bench/bids_examples.py [--datasets NAME ...] [--revision REV] [--keep DIR] [--json FILE]

Each manifest in bench/bids_examples/ (one per dataset: file tree and small text files, see its "notes") is
rebuilt in a temporary folder: text files with their content, every *_T1w.nii[.gz] a real head from
../shared/data/heads (cycling through HEADS; .nii ones saved uncompressed), every other file empty, as
bids-examples has them. The app then runs the participant level on the first participant that has a T1w
image (the first participant at all where none has, to see how the app refuses), and bids-validator-deno,
when it is installed, judges the output folder. Printed: one Markdown row per dataset ("T1w in layout": the
raw sub-*/[ses-*/]anat/*_T1w images of the rebuilt layout; the message is the app's last stderr line), then
the app's "summary:" and "flagged by QC" lines.

- ``--revision REV``: run the app of a git revision (a temporary ``git worktree``) instead of this tree;
  run it once per revision and compare the two tables (or the ``--json`` records).
- ``--keep DIR``: rebuilt layouts, outputs, work folders and console logs go to DIR/<dataset>/ and stay.
- ``--datasets NAME ...``: a subset (default: every manifest). A run has 15 minutes per dataset; the app
  runs with ``--n-cpus 2``.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MANIFESTS = HERE / "bids_examples"
HEADS_DIR = REPO.parent / "shared" / "data" / "heads"
HEADS = ["ds000011-sub-13", "ds000011-sub-14", "niivue-t1-2mm", "nichart-trio-mprage", "fstrain-09"]
TIMEOUT_S = 15 * 60


def is_t1w(relpath):
    return relpath.endswith(("_T1w.nii", "_T1w.nii.gz"))


def raw_t1w(relpath):
    """A T1w image the app may select: in a participant folder of the raw dataset, not in derivatives/."""
    return is_t1w(relpath) and relpath.startswith("sub-") and "/anat/" in relpath


def rebuild(manifest, dest, heads):
    """Write the layout of ``manifest`` under ``dest``; ``heads``: T1w.nii.gz paths to cycle through.
    Returns the number of raw T1w images written."""
    import nibabel as nib

    dest = Path(dest)
    uncompressed = {}  # head -> the .nii written from it, which later .nii targets link to
    n_heads = n_t1w = 0
    for relpath, text in sorted(manifest["files"].items()):
        path = dest / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        if is_t1w(relpath):
            head = Path(heads[n_heads % len(heads)])
            n_heads += 1
            n_t1w += raw_t1w(relpath)
            if relpath.endswith(".gz"):
                path.symlink_to(head)  # read in place: the heads are never copied around
            elif head in uncompressed:
                os.link(uncompressed[head], path)  # ds004332 has 16 uncompressed T1w images of one participant
            else:
                nib.save(nib.load(head), path)
                uncompressed[head] = path
        elif text is None:
            path.touch()
        else:
            path.write_bytes(text.encode())  # bytes: the CRLF files keep their line endings
    return n_t1w


def first_participant(manifest):
    """The first participant label with a raw T1w image, else the first participant folder, else None."""
    subjects = sorted({p.split("/")[0][4:] for p in manifest["files"] if raw_t1w(p)})
    if not subjects:
        subjects = sorted({p.split("/")[0][4:] for p in manifest["files"] if p.startswith("sub-") and "/" in p})
    return subjects[0] if subjects else None


def validator():
    beside_python = Path(sys.executable).with_name("bids-validator-deno")  # a venv that is not on PATH
    return shutil.which("bids-validator-deno") or (str(beside_python) if beside_python.exists() else None)


def validate(exe, folder):
    """(errors, warnings) of bids-validator-deno for ``folder``, or None if it produced no report."""
    report = Path(folder).with_name(Path(folder).name + "_validator.json")
    subprocess.run([exe, "--format", "json", "--outfile", str(report), str(folder)],
                   capture_output=True, text=True, timeout=TIMEOUT_S)
    try:
        issues = json.loads(report.read_text())["issues"]["issues"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (sum(i.get("severity") == "error" for i in issues), sum(i.get("severity") == "warning" for i in issues))


def run_app(tree, layout, label, out, work):
    env = dict(os.environ, PYTHONPATH=str(tree), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "bids_skullstrip.cli.run", str(layout), str(out), "participant",
           "--participant-label", label, "-w", str(work), "--n-cpus", "2"]
    start = time.perf_counter()
    # A session of its own: on timeout the whole group goes, nipype's worker processes with the app.
    proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        status = "timeout"
    seconds = time.perf_counter() - start
    (out.parent / "console.log").write_text(f"$ {' '.join(cmd)}\n{stdout}\n--- stderr ---\n{stderr}")
    lines = [line for line in stderr.splitlines() if line.strip()]
    # Without the temporary folder's name, the messages of two runs (two revisions) compare as text.
    message = (lines[-1] if lines else "").replace(str(layout), "<bids_dir>").replace(str(out), "<output_dir>")
    return {"exit": status, "seconds": round(seconds, 1), "message": message,
            "masks": len(list(out.rglob("*_desc-brain_mask.nii.gz"))) if out.exists() else 0,
            "console": [line.strip() for line in (stdout + stderr).splitlines()
                        if "flagged by QC" in line or "summary:" in line]}


def bench(name, tree, root, heads, exe):
    manifest = json.loads((MANIFESTS / f"{name}.json").read_text())
    folder = root / name
    if folder.exists():  # --keep DIR from an earlier run: start afresh, or the app resumes
        shutil.rmtree(folder)
    layout, out, work = folder / "bids", folder / "out", folder / "work"
    record = {"dataset": name, "t1w": rebuild(manifest, layout, heads), "participant": first_participant(manifest)}
    if record["participant"] is None:
        return dict(record, exit=None, masks=0, message="the layout has no participant folder", console=[])
    record.update(run_app(tree, layout, record["participant"], out, work))
    record["validator"] = validate(exe, out) if exe and (out / "dataset_description.json").exists() else None
    return record


def cell(text, width=200):
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def table(records):
    rows = ["| dataset | T1w in layout | participant run | exit | masks written "
            "| output validator errors/warnings | message |", "|---|---|---|---|---|---|---|"]
    for r in records:
        checked = "not run" if r.get("validator") is None else "%d / %d" % tuple(r["validator"])
        rows.append(f"| {r['dataset']} | {r['t1w']} | {r['participant'] or '-'} | {r['exit']} | {r['masks']} | "
                    f"{checked} | {cell(r['message'])} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=sorted(m.stem for m in MANIFESTS.glob("*.json")))
    p.add_argument("--revision", help="git revision of the app to run (default: this source tree)")
    p.add_argument("--keep", type=Path, help="keep layouts, outputs and logs in this folder")
    p.add_argument("--json", type=Path, help="write every record to this file")
    p.add_argument("--heads", nargs="+", default=HEADS, help=f"head ids under {HEADS_DIR}")
    args = p.parse_args(argv)
    unknown = [d for d in args.datasets if not (MANIFESTS / f"{d}.json").exists()]
    if unknown:
        p.error(f"no manifest for {', '.join(unknown)} in {MANIFESTS}")
    heads = [HEADS_DIR / h / "T1w.nii.gz" for h in args.heads]
    exe = validator()
    with tempfile.TemporaryDirectory(prefix="bids_examples_") as tmp:
        root = (args.keep or Path(tmp)).resolve()
        tree = REPO
        if args.revision:
            tree = Path(tmp) / "tree"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.revision],
                           check=True, capture_output=True)
        try:
            records = []
            for name in args.datasets:
                records.append(bench(name, tree, root, heads, exe))
                r = records[-1]
                print(f"{name}: exit {r['exit']}, {r['masks']} mask(s), {r.get('seconds', 0)} s",
                      file=sys.stderr, flush=True)
        finally:
            if args.revision:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    revision = args.revision or "working tree"
    print(f"app: {revision} of {REPO}; validator: {exe or 'not found'}\n")
    print(table(records))
    for r in records:
        for line in r["console"]:
            print(f"- {r['dataset']}: {line}")
    if args.json:
        args.json.write_text(json.dumps({"revision": revision, "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
