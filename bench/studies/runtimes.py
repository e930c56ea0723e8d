#!/usr/bin/env python
"""Which runtime serves the bundled networks: TensorFlow (the reference), LiteRT, ONNX Runtime, OpenVINO.

One-off study behind docs/benchmarks.md's "Inference runtime" table (issue 31). Install the candidates beside
the app first (they are not dependencies): ``pip install onnxruntime openvino ai-edge-litert onnx``.

    python bench/studies/runtimes.py --repeats 5          # import/load/peak RSS (fresh processes) + core times
    python bench/studies/runtimes.py --dice               # masks of every runtime against TensorFlow's, every split

Every fresh-process probe and every core timing alternates between the runtimes, so that the load of a
shared machine hits them alike; the tables give medians. Core = ``Skullstripper.mask`` (locator + the
segmenter's views + post-processing) on a 1 mm head with 2 threads.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
RUNTIMES = ("tensorflow", "litert", "onnxruntime", "openvino")
HEAD = DATA / "heads" / "colin27" / "T1w.nii.gz"  # 181x217x181, 1 mm
# What each runtime installs beside the app's other dependencies (its own wheel and those only it needs).
PACKAGES = {"tensorflow": ["tensorflow", "keras", "tensorboard", "h5py", "ml_dtypes", "optree", "absl", "flatbuffers",
                           "google", "grpc", "libclang", "opt_einsum", "astunparse", "gast", "wrapt", "termcolor",
                           "namex", "rich"],
            "litert": ["ai_edge_litert", "flatbuffers"],
            "onnxruntime": ["onnxruntime", "flatbuffers", "sympy", "mpmath"],
            "openvino": ["openvino", "openvino_telemetry"]}


def _pool_free_forward(model):
    """LiteRT has no builtin MaxPool3D (only TensorFlow's Flex kernels, which need TensorFlow itself): the
    U-Net's forward pass with each 2x2x2 max-pool as a 2D max-pool and a max over pairs of slices."""
    import tensorflow as tf

    def pool(x):
        s = tf.shape(x)
        y = tf.nn.max_pool2d(tf.reshape(x, [-1, s[2], s[3], s[4]]), 2, 2, "VALID")
        return tf.reduce_max(tf.reshape(y, [s[0], s[1] // 2, 2, s[2] // 2, s[3] // 2, s[4]]), axis=2)

    def forward(x):
        values = {model.inputs[0].name: x}
        for layer in model.layers[1:]:
            inbound = layer._inbound_nodes[0].input_tensors
            args = [values[t.name] for t in inbound]
            out = pool(args[0]) if layer.name.startswith("pool") else layer(args if len(args) > 1 else args[0])
            values[layer.output.name] = out
        return values[model.outputs[0].name]

    return forward


def litert_bytes(model):
    import tensorflow as tf

    fn = tf.function(_pool_free_forward(model), input_signature=[tf.TensorSpec([1, None, None, None, 1], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], model)
    return converter.convert()


class _LiteRT:
    def __init__(self, path, threads):
        from ai_edge_litert.interpreter import Interpreter

        self.it, self.shape = Interpreter(model_path=str(path), num_threads=threads), None

    def __call__(self, x, training=False):
        index = self.it.get_input_details()[0]["index"]
        if x.shape != self.shape:
            self.it.resize_tensor_input(index, x.shape)
            self.it.allocate_tensors()
            self.shape = x.shape
        self.it.set_tensor(index, np.ascontiguousarray(x, np.float32))
        self.it.invoke()
        return self.it.get_tensor(self.it.get_output_details()[0]["index"])


class _OnnxRuntime:
    def __init__(self, path, threads):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x, training=False):
        return self.session.run(None, {"t1w": x.reshape(1, 1, *x.shape[1:4])})[0].reshape(x.shape)


def exported(folder):
    """Write the LiteRT files beside the ONNX ones of ``folder`` (a copy of the bundled weights)."""
    from bids_skullstrip.model.inference import load_model

    networks = load_model(folder / "unet.weights.h5")
    for name, net in (("unet", networks.segmenter), ("locator", networks.locator)):
        target = folder / f"{name}.tflite"
        if not target.exists():
            target.write_bytes(litert_bytes(net))


def networks_of(runtime, folder, threads):
    """The two networks served by ``runtime`` (files of ``folder``), as ``BrainNetworks``."""
    from bids_skullstrip.model import inference

    if runtime == "tensorflow":
        return inference.load_networks(folder / "unet.weights.h5", runtime="tensorflow", threads=threads)
    if runtime == "openvino":
        return inference.load_networks(folder / "unet.weights.h5", runtime="openvino", threads=threads)
    kind, suffix = {"litert": (_LiteRT, ".tflite"), "onnxruntime": (_OnnxRuntime, ".onnx")}[runtime]
    return inference.BrainNetworks(kind(folder / f"locator{suffix}", threads), kind(folder / f"unet{suffix}", threads))


def probe(runtime, folder, threads):
    """In a fresh process: seconds to import the runtime, to load both networks, the first core call; peak RSS."""
    import nibabel as nib

    t = time.perf_counter()
    __import__({"tensorflow": "tensorflow", "litert": "ai_edge_litert.interpreter", "onnxruntime": "onnxruntime",
                "openvino": "openvino"}[runtime])
    import_s = time.perf_counter() - t
    from bids_skullstrip.model.predictor import Skullstripper

    t = time.perf_counter()
    networks = networks_of(runtime, folder, threads)
    load_s = time.perf_counter() - t
    img = nib.load(str(HEAD))
    t = time.perf_counter()
    Skullstripper(networks=networks, **_card_args()).mask(np.asarray(img.dataobj, np.float32), img.affine)
    first_s = time.perf_counter() - t
    return {"import_s": import_s, "load_s": load_s, "first_core_s": first_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _card_args():
    from bids_skullstrip.model.inference import default_threshold, model_card
    from bids_skullstrip.model.predictor import View

    card = model_card()
    return {"threshold": default_threshold(), "voxel_mm": card["voxel_mm"], "views": [View(**v) for v in card["views"]]}


def install_mb(runtime):
    import importlib.util

    total = 0
    for name in PACKAGES[runtime]:
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        roots = spec.submodule_search_locations or [spec.origin]
        for root in roots:
            root = Path(root)
            total += sum(f.stat().st_size for f in (root.rglob("*") if root.is_dir() else [root]) if f.is_file())
    return total / 2**20


def core_times(runtimes, folder, threads, repeats):
    """Warm ``Skullstripper.mask`` seconds per runtime, alternating, in one process."""
    import nibabel as nib

    from bids_skullstrip.model.predictor import Skullstripper

    img = nib.load(str(HEAD))
    data = np.asarray(img.dataobj, np.float32)
    strippers = {r: Skullstripper(networks=networks_of(r, folder, threads), **_card_args()) for r in runtimes}
    times = {r: [] for r in runtimes}
    for i in range(repeats + 1):  # the first round warms every runtime up
        for r in runtimes:
            t = time.perf_counter()
            result = strippers[r].mask(data, img.affine)
            if i:
                times[r].append((time.perf_counter() - t, result.timings["locate"], result.timings["inference"]))
    return times


def heads():
    splits = json.loads((DATA / "splits.json").read_text())
    for split, ids in splits.items():
        for head in ids:
            yield split, DATA / "heads" / head / "T1w.nii.gz"
    for folder in sorted((DATA / "contrasts").iterdir()):
        yield "contrasts", folder / "image.nii.gz"


def dice_study(runtimes, folder, threads):
    """Dice and largest probability difference of each runtime's masks against TensorFlow's, every head."""
    import nibabel as nib

    from bids_skullstrip.metrics import dice
    from bids_skullstrip.model.predictor import Skullstripper

    reference = Skullstripper(networks=networks_of("tensorflow", folder, threads), **_card_args())
    others = {r: Skullstripper(networks=networks_of(r, folder, threads), **_card_args()) for r in runtimes}
    worst = {r: {} for r in runtimes}
    for split, path in heads():
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, np.float32)
        ref = reference.mask(data, img.affine)
        for r, stripper in others.items():
            got = stripper.mask(data, img.affine)
            d = dice(got.mask, ref.mask)
            diff = float(np.abs(got.probability - ref.probability).max())
            w = worst[r].setdefault(split, {"n": 0, "min_dice": 1.0, "max_prob_diff": 0.0})
            w["n"] += 1
            w["min_dice"], w["max_prob_diff"] = min(w["min_dice"], d), max(w["max_prob_diff"], diff)
            print(f"{split} {path.parent.name} {r}: Dice {d:.6f}, max |dp| {diff:.2g}", flush=True)
    return worst


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, default=Path("/tmp/runtime-study"), help="where the exports are written")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dice", action="store_true", help="masks against TensorFlow's on every head instead")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.probe:
        print(json.dumps(probe(opts.probe, opts.folder, opts.threads)))
        return 0
    if not (opts.folder / "unet.onnx").exists():
        import shutil

        from bids_skullstrip.model.export import export_onnx
        from bids_skullstrip.model.inference import WEIGHTS_DIR

        shutil.copytree(WEIGHTS_DIR, opts.folder, dirs_exist_ok=True)
        export_onnx(opts.folder / "unet.weights.h5")
    if "litert" in opts.runtimes:
        exported(opts.folder)
    if opts.dice:
        others = [r for r in opts.runtimes if r != "tensorflow"]
        print(json.dumps(dice_study(others, opts.folder, opts.threads), indent=1))
        return 0
    probes = {r: [] for r in opts.runtimes}
    for _ in range(opts.repeats):
        for r in opts.runtimes:
            out = subprocess.run([sys.executable, __file__, "--probe", r, "--folder", str(opts.folder), "--threads",
                                  str(opts.threads)], capture_output=True, text=True, check=True)
            probes[r].append(json.loads(out.stdout.strip().splitlines()[-1]))
    cores = core_times(opts.runtimes, opts.folder, opts.threads, opts.repeats)
    ref = statistics.median(c[0] for c in cores[opts.runtimes[0]])
    print(f"head {HEAD.parent.name}, {opts.threads} threads, medians of {opts.repeats} (alternating)\n")
    print("| runtime | import (s) | load (s) | first core (s) | core (s) | locator (s) | segmenter views (s) "
          "| core / first runtime | peak RSS (MB) | install (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in opts.runtimes:
        med = {k: statistics.median(p[k] for p in probes[r]) for k in probes[r][0]}
        core = [statistics.median(c[i] for c in cores[r]) for i in range(3)]
        print(f"| {r} | {med['import_s']:.2f} | {med['load_s']:.2f} | {med['first_core_s']:.2f} | {core[0]:.2f} | "
              f"{core[1]:.2f} | {core[2]:.2f} | {core[0] / ref:.2f} | {med['peak_rss_mb']:.0f} | {install_mb(r):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
