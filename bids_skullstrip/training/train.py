"""Patch-based CPU training of the two networks, resumable from checkpoints at any step.

The locator is trained first (whole fields of view on the coarse grid), then the segmenter (brain-centred
boxes on the fine grid), each in a folder of its own under the output folder. The data stream of each is a
pure function of (seed, stage, step), so a resumed run sees exactly the patches an uninterrupted one would
have seen.
"""

import csv
import hashlib
import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import __version__
from ..geometry import LOCATOR_VOXEL_MM, MODEL_VOXEL_MM
from ..metrics import dice, score_heads
from ..model.inference import (LOCATOR_FILE_NAME, WEIGHTS_FILE, BrainNetworks, default_threshold, load_model,
                               model_card)
from ..model.export import export_onnx
from ..model.predictor import Skullstripper, default_views
from ..model.tf_runtime import set_threads
from ..nifti import atomic_file, atomic_write_text
from .augment import COMPOSITE_SIZE, training_patch
from .data import TrainingHead

log = logging.getLogger("bids_skullstrip.train")


@dataclass(frozen=True)
class Stage:
    """What differs between the two networks' training."""
    name: str
    index: int  # part of the data stream's seed
    voxel_mm: float
    patch_size: tuple
    architecture: dict
    weights_file: str


def stages(*, patch_size=(80, 96, 80), base_filters=16, levels=4, voxel_mm=MODEL_VOXEL_MM,
           locator_patch_size=(64, 64, 64), locator_base_filters=8):
    # 64³ at 4 mm is 256 mm: a whole field of view, necks and shoulders included; 80x96x80 at 2 mm is
    # geometry.BRAIN_BOX_MM, the box the segmenter sees at inference.
    return (Stage("locator", 1, LOCATOR_VOXEL_MM, tuple(locator_patch_size),
                  {"base_filters": locator_base_filters, "levels": 4}, LOCATOR_FILE_NAME),
            Stage("segmenter", 2, float(voxel_mm), tuple(patch_size),
                  {"base_filters": base_filters, "levels": levels}, WEIGHTS_FILE.name))


# CPUs with Intel AMX's bfloat16 tiles train the U-Net in mixed precision: the same 2-core segmenter step in 0.68x
# the time, measured side by side (bench/training_step.py). AVX512-BF16 alone is not enough: on a Xeon with it and
# without AMX the segmenter step took 1.58x as long as in float32 (2026-12-07).
BFLOAT16_CPU_FLAGS = frozenset({"amx_bf16"})
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def cpu_flags():
    """The instruction-set flags of this machine's CPU (Linux; an empty set elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags") for word in line.split()[2:])


def training_dtype(precision="auto", flags=None):
    """The Keras dtype policy to train in: ``precision`` "float32", "bfloat16" (mixed: bfloat16 maths, float32
    weights), or "auto": bfloat16 where the CPU has AMX, float32 elsewhere (slower without it)."""
    if precision == "auto":
        precision = "bfloat16" if BFLOAT16_CPU_FLAGS & (cpu_flags() if flags is None else set(flags)) else "float32"
    return PRECISIONS[precision]


def dice_bce_loss(y_true, y_pred):
    import keras.ops as K

    y_pred = K.clip(y_pred, 1e-6, 1.0 - 1e-6)
    bce = -K.mean(y_true * K.log(y_pred) + (1.0 - y_true) * K.log(1.0 - y_pred))
    intersection = K.sum(y_true * y_pred)
    dice = (2.0 * intersection + 1.0) / (K.sum(y_true) + K.sum(y_pred) + 1.0)
    return bce + 1.0 - dice


def learning_rate(step, total, *, peak=1e-3, floor=2e-5, warmup=100):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


class PatchStream:
    """Background thread producing the training patches of steps start, start+1, ..."""

    def __init__(self, heads, brains, stage, *, seed, start, augmentation, head_weights=None, depth=4):
        self.heads, self.brains, self.seed, self.stage = heads, brains, seed, stage
        self.head_p = None if head_weights is None else np.asarray(head_weights, float) / np.sum(head_weights)
        self.patch_options = {"size": stage.patch_size, "stage": stage.name, "voxel_mm": stage.voxel_mm,
                              **augmentation}
        self.queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, args=(start,), daemon=True)
        self.thread.start()

    def _run(self, step):
        while True:
            rng = np.random.default_rng([self.seed, self.stage.index, step])
            n = len(self.heads)
            head = self.heads[rng.integers(n) if self.head_p is None else rng.choice(n, p=self.head_p)]
            image, label = training_patch(head, rng, brains=self.brains, **self.patch_options)
            self.queue.put((step, image[None, ..., None], label[None, ..., None]))
            step += 1

    def get(self):
        return self.queue.get()


def _load_labelled(head):
    img = nib.load(str(head.image))
    data = np.asarray(img.dataobj, dtype=np.float32)
    return data, img.affine, np.asarray(nib.load(str(head.mask)).dataobj) > 0


def validate(networks, heads, *, threshold, voxel_mm=MODEL_VOXEL_MM):
    stripper = Skullstripper(networks=networks, voxel_mm=voxel_mm)
    return score_heads(heads, lambda head, data, affine: stripper.mask(data, affine, threshold=threshold))


def hard_head_weights(networks, heads, *, fraction, threshold, voxel_mm=MODEL_VOXEL_MM):
    """Each head's share of the patches: ``1 - fraction`` spread evenly, ``fraction`` in proportion to the
    head's error (1 - Dice) under ``networks``, so a cycle spends its steps where the model is worst."""
    errors = np.array([1.0 - r["dice"] for r in validate(networks, heads, threshold=threshold, voxel_mm=voxel_mm)])
    share = errors / errors.sum() if errors.sum() > 0 else np.full(len(heads), 1.0 / len(heads))
    return (1.0 - fraction) / len(heads) + fraction * share


THRESHOLD_CANDIDATES = tuple(np.round(np.arange(0.3, 0.81, 0.05), 2))


def calibrate_threshold(networks, heads, *, voxel_mm=MODEL_VOXEL_MM):
    """The probability threshold with the best median Dice on ``heads`` (the training heads: the
    validation heads choose nothing). Returns (threshold, {threshold: median Dice})."""
    scores = {t: [] for t in THRESHOLD_CANDIDATES}
    for head in heads:
        data, affine, reference = _load_labelled(head)
        stripper = Skullstripper(networks=networks, voxel_mm=voxel_mm)
        prediction = stripper.probability(data, affine)
        for t in THRESHOLD_CANDIDATES:
            scores[t].append(dice(stripper.mask(data, affine, threshold=t, prediction=prediction).mask, reference))
    medians = {float(t): float(np.median(v)) for t, v in scores.items()}
    return max(medians, key=medians.get), medians


def inference_copy(model, architecture):
    """The float32, uncompiled network that inference builds, with the weights of ``model`` (which may train in
    another precision): what is validated, calibrated and saved is what users run."""
    from ..model.unet import build_unet

    network = build_unet(**architecture)
    network.set_weights(model.get_weights())
    return network


def _save_atomically(network, path):
    """Save a ``StageRun``'s network (an ``inference_copy``: float32, uncompiled, so no optimizer state)."""
    with atomic_file(path) as tmp:  # a *.weights.h5 name still, which Keras asks for
        network.save_weights(str(tmp))
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size_bytes": path.stat().st_size}


def export_weights(models, out_dir, card, stage_list):
    """Write both networks' weights + ``model.json`` (the model card's machine-readable half); returns the
    segmenter's weights file (``load_model`` finds the rest beside it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = dict(card)
    for stage in stage_list:
        record = _save_atomically(models[stage.name], out_dir / stage.weights_file)
        if stage.name == "segmenter":
            card.update(record)
        else:
            card[stage.name] = dict(card[stage.name], **record)
    atomic_write_text(out_dir / "model.json", json.dumps(card, indent=2) + "\n")
    export_onnx(out_dir / WEIGHTS_FILE.name, networks=BrainNetworks(models["locator"], models["segmenter"]))
    return out_dir / WEIGHTS_FILE.name


def freeze_batch_norm(model, optimizer):
    """BatchNorm from here on uses (and keeps) its running statistics, in training as at inference.

    With one patch per batch the running statistics follow the last ~100 patches and their augmentation,
    so the validation Dice of consecutive checkpoints swung by up to 0.1; for the last steps of the
    schedule the other weights adapt to fixed statistics, the ones inference will use."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    model.compile(optimizer=optimizer, loss=dice_bce_loss)


class WeightAverage:
    """Running mean of the weights over the frozen-BatchNorm phase (Polyak/SWA averaging), kept in the
    checkpoint so a resumed run averages exactly what an uninterrupted one would.

    With one patch per batch the weights of consecutive checkpoints still differ by up to 0.01 validation
    Dice after the freeze; their mean is steadier and generalises at least as well. The averaging is only
    sound because BatchNorm statistics are fixed over that phase (they are averaged too, as constants)."""

    def __init__(self, model):
        import tensorflow as tf

        self.model = model
        self.mean = [tf.Variable(tf.zeros_like(w.value), trainable=False) for w in model.weights]
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False)

    def trackable(self):
        import tensorflow as tf

        return tf.train.Checkpoint(mean=self.mean, count=self.count)

    def update(self):
        n = float(self.count.assign_add(1).numpy())
        for mean, weight in zip(self.mean, self.model.weights):
            mean.assign_add((weight.value - mean) / n)

    def apply(self):
        """Give the model the averaged weights; returns how many steps they average (0: left unchanged)."""
        count = int(self.count.numpy())
        if count:
            self.model.set_weights([mean.numpy() for mean in self.mean])
        return count


@dataclass
class StageRun:
    """A stage's network after training (its averaged weights, as the float32 inference network) and what its
    checkpoints recorded."""
    model: object
    steps: int
    cpu_hours: float
    averaged_steps: int


def _run_steps(stage, model, optimizer, average, manager, step_var, spent, train_heads, brains, validation,
               out_dir, *, start, steps, until, seed, augmentation, peak_lr, checkpoint_every, validate_every,
               freeze_bn_from, head_weights):
    log.info("%s: loading %d training heads and %d brains at %g mm", stage.name, len(train_heads), len(brains),
             stage.voxel_mm)
    # tissue label maps are derived once per head and kept with the run (not in the project)
    labels_cache = out_dir.parent / "tissue_labels" if augmentation.get("labels_prob") else None
    heads = [TrainingHead.load(h, stage.voxel_mm, labels_cache=labels_cache) for h in train_heads]
    stream = PatchStream(heads, [TrainingHead.load_brain(b, stage.voxel_mm) for b in brains], stage, seed=seed,
                         start=start, augmentation=augmentation, head_weights=head_weights)
    history = out_dir / "history.csv"
    new_history = not history.exists()
    with history.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if new_history:
            writer.writerow(["step", "loss", "lr", "seconds_per_step", "val_median_dice", "val_min_dice"])
        losses, t0 = [], time.perf_counter()
        for step in range(start, min(steps, until)):
            if step == max(start, freeze_bn_from):
                freeze_batch_norm(model, optimizer)
                log.info("%s step %d: BatchNorm statistics frozen for the rest of the schedule", stage.name, step)
            got_step, x, y = stream.get()
            assert got_step == step
            lr = learning_rate(step, steps, peak=peak_lr)
            optimizer.learning_rate.assign(lr)
            losses.append(float(model.train_on_batch(x, y)))
            if step >= freeze_bn_from:
                average.update()
            done = step + 1
            if done % checkpoint_every == 0 or done in (steps, until):
                elapsed = time.perf_counter() - t0
                spent.assign_add(elapsed)
                step_var.assign(done)
                manager.save(checkpoint_number=done)
                val_median = val_min = ""
                if validation and (done % validate_every == 0 or done == steps):
                    rows = validation(model)
                    dices = [r["dice"] for r in rows]
                    val_median, val_min = float(np.median(dices)), float(np.min(dices))
                    log.info("%s step %d validation (threshold 0.5): %s", stage.name, done,
                             ", ".join(f"{r['name']} {r['dice']:.4f}" for r in rows))
                writer.writerow([done, np.mean(losses), lr, elapsed / len(losses), val_median, val_min])
                fh.flush()
                log.info("%s step %d/%d loss %.4f lr %.2e %.2f s/step", stage.name, done, steps, np.mean(losses),
                         lr, elapsed / len(losses))
                losses, t0 = [], time.perf_counter()


def train_stage(stage, train_heads, out_dir, *, brains=(), steps, until=None, seed, augmentation, peak_lr,
                checkpoint_every, validate_every, frozen_bn_fraction, init_weights=None, validation=None,
                export_only=False, dtype="float32", head_weights=None):
    """Train (or resume) one network to ``steps`` on a cosine schedule; ``until`` stops this run earlier
    (the schedule is unchanged, so ``until`` then a plain rerun equals one uninterrupted run)."""
    import tensorflow as tf
    import keras

    from ..model.unet import build_unet

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed + stage.index)
    model = build_unet(**stage.architecture, dtype=dtype)
    if init_weights:
        model.load_weights(str(init_weights))
        log.info("%s: initialised from %s (fine-tuning)", stage.name, init_weights)
    optimizer = keras.optimizers.Adam(peak_lr)
    model.compile(optimizer=optimizer, loss=dice_bce_loss)

    step_var = tf.Variable(0, dtype=tf.int64, name="step")
    spent = tf.Variable(0.0, dtype=tf.float64, name="cpu_seconds")
    average = WeightAverage(model)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var, seconds=spent,
                               average=average.trackable())
    manager = tf.train.CheckpointManager(ckpt, str(out_dir / "checkpoints"), max_to_keep=2)
    # Optimizer slots exist only after a first update, so build them before restoring.
    optimizer.build(model.trainable_variables)
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).expect_partial()
        log.info("%s: resumed from %s at step %d", stage.name, manager.latest_checkpoint, int(step_var.numpy()))
    start = int(step_var.numpy())
    until = steps if until is None else min(until, steps)
    if not export_only and start < until:
        _run_steps(stage, model, optimizer, average, manager, step_var, spent, train_heads, brains, validation,
                   out_dir, start=start, steps=steps, until=until, seed=seed, augmentation=augmentation,
                   peak_lr=peak_lr, checkpoint_every=checkpoint_every,
                   validate_every=validate_every, freeze_bn_from=int(round(steps * (1.0 - frozen_bn_fraction))),
                   head_weights=head_weights)
    averaged = average.apply()
    if averaged:
        log.info("%s: the mean of the weights of the last %d steps (BatchNorm frozen)", stage.name, averaged)
    return StageRun(inference_copy(model, stage.architecture), int(step_var.numpy()), float(spent.numpy()) / 3600.0,
                    averaged)


def _provenance(init_weights):
    """What fine-tuned weights started from: the checksums and the training record of the weights' own card
    (so the card of a fine-tuned model keeps the whole recipe); "" for training from scratch."""
    if not init_weights:
        return ""
    parent = model_card(init_weights)
    return {"file": Path(init_weights).name, "sha256": parent.get("sha256"),
            "locator_sha256": (parent.get("locator") or {}).get("sha256"), "training": parent.get("training")}


def train(train_heads, val_heads, out_dir, *, brains=(), steps=4000, locator_steps=2000, seed=20261125,
          patch_size=(80, 96, 80), synth_prob=0.25, composite_prob=0.2, composite_size=COMPOSITE_SIZE,
          base_filters=16, levels=4, voxel_mm=MODEL_VOXEL_MM, peak_lr=1e-3,
          checkpoint_every=200, validate_every=1000, init_weights=None, threads=None, export_only=False,
          until=None, frozen_bn_fraction=0.3, left_out=(), precision="auto", hard_head_fraction=0.0,
          labels_prob=0.0, thick_prob=0.3, thickness_mm=None, fine_bias_prob=0.0, mass_prob=0.0, enhance_prob=0.0):
    """Train (or resume) the locator to ``locator_steps``, then the segmenter to ``steps`` (``until`` stops
    the segmenter's run earlier), calibrate the threshold on the training heads and export both networks (one
    step of a ``recipe``).
    ``init_weights`` (a segmenter weights file with its locator beside it) fine-tunes both. ``left_out`` names
    the sources kept out of ``train_heads`` for a leave-one-source-out run; the card records them.
    ``hard_head_fraction`` (fine-tuning): that share of the segmenter's patches comes from heads drawn in
    proportion to their error (1 - Dice) under the starting weights, the rest uniformly (``hard_head_weights``).
    ``precision``: see ``training_dtype``; the exported, validated and calibrated networks are float32."""
    import tensorflow as tf

    # one op at a time: the same command gives the same weights (0.85-0.87 s per segmenter step, 0.87-0.94 s side
    # by side); TensorFlow may have run already in a caller's process (its own inference)
    if not set_threads(tf, threads):
        log.warning("TensorFlow already ran in this process with its own threads: the run is not bit-reproducible")
    out_dir = Path(out_dir)
    locator_stage, segmenter_stage = stage_list = stages(patch_size=patch_size, base_filters=base_filters,
                                                         levels=levels, voxel_mm=voxel_mm)
    dtype = training_dtype(precision)
    log.info("training in %s", dtype)
    augmentation = {"synth_prob": synth_prob, "composite_prob": composite_prob,
                    "composite_size": tuple(composite_size), "labels_prob": labels_prob, "thick_prob": thick_prob,
                    "thickness_mm": None if thickness_mm is None else tuple(thickness_mm),
                    "fine_bias_prob": fine_bias_prob, "mass_prob": mass_prob, "enhance_prob": enhance_prob}
    common = {"brains": brains, "seed": seed, "augmentation": augmentation,
              "peak_lr": peak_lr, "checkpoint_every": checkpoint_every, "validate_every": validate_every,
              "frozen_bn_fraction": frozen_bn_fraction, "export_only": export_only, "dtype": dtype}
    init = Path(init_weights) if init_weights else None
    locator = train_stage(locator_stage, train_heads, out_dir / locator_stage.name, steps=locator_steps,
                          init_weights=init and init.with_name(LOCATOR_FILE_NAME), **common)

    def validate_with_locator(segmenter):
        segmenter = inference_copy(segmenter, segmenter_stage.architecture)
        return validate(BrainNetworks(locator.model, segmenter), val_heads, threshold=0.5, voxel_mm=voxel_mm)

    validation = validate_with_locator if val_heads else None
    head_weights = None
    if hard_head_fraction and init:
        head_weights = hard_head_weights(load_model(init), train_heads, fraction=hard_head_fraction,
                                         threshold=default_threshold(init), voxel_mm=voxel_mm)
        log.info("segmenter: heads drawn with weights %s", ", ".join(
            f"{h.name} {w:.3f}" for h, w in zip(train_heads, head_weights)))
    segmenter = train_stage(segmenter_stage, train_heads, out_dir / segmenter_stage.name, steps=steps, until=until,
                            init_weights=init, validation=validation, head_weights=head_weights, **common)
    networks = BrainNetworks(locator.model, segmenter.model)

    def record(stage, run, schedule):
        return {"steps": run.steps, "schedule_steps": schedule, "patch_size": list(stage.patch_size),
                "averaged_steps": run.averaged_steps, "cpu_hours": run.cpu_hours}

    card = {
        "name": "bids_skullstrip two-stage U-Net",
        "software_version": __version__,
        "architecture": segmenter_stage.architecture,
        "voxel_mm": segmenter_stage.voxel_mm,
        "locator": {"architecture": locator_stage.architecture, "voxel_mm": locator_stage.voxel_mm,
                    "file": locator_stage.weights_file},
        "training": {
            "seed": seed, "synth_prob": synth_prob, "composite_prob": composite_prob,
            "composite_size": list(composite_size), "labels_prob": labels_prob, "thick_prob": thick_prob,
            "thickness_mm": None if thickness_mm is None else list(thickness_mm), "fine_bias_prob": fine_bias_prob,
            "mass_prob": mass_prob, "enhance_prob": enhance_prob, "frozen_bn_fraction": frozen_bn_fraction,
            "peak_lr": peak_lr, "precision": dtype,
            "locator": record(locator_stage, locator, locator_steps),
            "segmenter": record(segmenter_stage, segmenter, steps),
            "cpu_hours": locator.cpu_hours + segmenter.cpu_hours,
            "composited_brains": [Path(b).name for b in brains],
            "heads": [h.name for h in train_heads], "left_out_sources": list(left_out),
            "fine_tuned_from": _provenance(init),
            "hard_head_fraction": hard_head_fraction,
            "head_weights": None if head_weights is None else {
                h.name: float(w) for h, w in zip(train_heads, head_weights)},
        },
    }
    log.info("calibrating the threshold on the %d training heads", len(train_heads))
    card["threshold"], card["threshold_calibration"] = calibrate_threshold(networks, train_heads,
                                                                           voxel_mm=voxel_mm)
    # the segmenter views the threshold was calibrated with
    card["views"] = [vars(view) for view in default_views(voxel_mm)]
    log.info("threshold %.2f (median training Dice by threshold: %s)", card["threshold"],
             card["threshold_calibration"])
    finished = segmenter.steps >= steps and locator.steps >= locator_steps and not export_only
    if val_heads and finished:
        card["validation"] = validate(networks, val_heads, threshold=card["threshold"], voxel_mm=voxel_mm)
        log.info("exported weights, validation: %s",
                 ", ".join(f"{r['name']} {r['dice']:.4f}" for r in card["validation"]))
    final = out_dir / ("final" if finished else f"export-step{segmenter.steps}")
    export_weights({"locator": locator.model, "segmenter": networks.segmenter}, final, card, stage_list)
    return final


def average_exports(exports, train_heads, val_heads, out_dir, *, shares=None):
    """The weight-space mean of exports of one lineage (cycles fine-tuned from the same weights: other seeds,
    other head draws), both networks, with ``shares`` (even by default); then the threshold is calibrated on the
    training heads and the validation heads are scored, as for any export. Networks fine-tuned from one start lie
    in one basin of the loss, where their mean is a network of its own and often better than each ("model
    soups", Wortsman et al. 2022). Returns the segmenter's weights file in ``out_dir``."""
    from ..model.unet import build_unet

    exports = [Path(e) for e in exports]
    shares = np.full(len(exports), 1.0 / len(exports)) if shares is None else np.asarray(shares, np.float64)
    if len(shares) != len(exports) or not np.isclose(shares.sum(), 1.0) or (shares < 0).any():
        raise ValueError(f"shares {list(shares)}: one non-negative share per export, summing to 1")
    cards = [model_card(e) for e in exports]
    shape = [(c.get("architecture"), (c.get("locator") or {}).get("architecture"), c.get("voxel_mm")) for c in cards]
    if any(s != shape[0] for s in shape):
        raise ValueError(f"{', '.join(map(str, exports))}: not one architecture and voxel size; only networks of "
                         "one lineage can be averaged")
    voxel_mm = float(cards[0].get("voxel_mm", MODEL_VOXEL_MM))
    models = [load_model(e) for e in exports]

    def mean_network(architecture, pick):
        network = build_unet(**architecture)
        per_model = [pick(m).get_weights() for m in models]
        network.set_weights([sum(share * weights[i] for share, weights in zip(shares, per_model))
                             for i in range(len(per_model[0]))])
        return network

    networks = BrainNetworks(mean_network(cards[0]["locator"]["architecture"], lambda m: m.locator),
                             mean_network(cards[0]["architecture"], lambda m: m.segmenter))
    card = {key: cards[0][key] for key in ("name", "architecture", "voxel_mm") if key in cards[0]}
    card.update(software_version=__version__, locator={k: cards[0]["locator"][k] for k in ("architecture",
                                                                                              "voxel_mm", "file")})
    card["training"] = {"average_of": [dict(_provenance(e), share=float(s)) for e, s in zip(exports, shares)]}
    log.info("the mean of %s (shares %s): calibrating the threshold on the %d training heads",
             ", ".join(map(str, exports)), ", ".join(f"{s:.3f}" for s in shares), len(train_heads))
    card["threshold"], card["threshold_calibration"] = calibrate_threshold(networks, train_heads, voxel_mm=voxel_mm)
    card["views"] = [vars(view) for view in default_views(voxel_mm)]
    if val_heads:
        card["validation"] = validate(networks, val_heads, threshold=card["threshold"], voxel_mm=voxel_mm)
        log.info("averaged weights, threshold %.2f, validation: %s", card["threshold"],
                 ", ".join(f"{r['name']} {r['dice']:.4f}" for r in card["validation"]))
    stage_list = stages(voxel_mm=voxel_mm, **cards[0]["architecture"])
    return export_weights({"locator": networks.locator, "segmenter": networks.segmenter}, Path(out_dir) / "final",
                          card, stage_list)
