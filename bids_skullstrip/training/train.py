"""Patch-based CPU training of the U-Net, resumable from checkpoints at any step.

The data stream is a pure function of (seed, step), so a resumed run sees exactly the patches an
uninterrupted one would have seen.
"""

import csv
import hashlib
import json
import logging
import math
import queue
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import __version__
from ..geometry import MODEL_VOXEL_MM
from ..metrics import compare_masks, dice
from ..postproc import clean_mask
from ..skullstrip import skullstrip_array, voxel_sizes
from .augment import training_patch
from .data import TrainingHead

log = logging.getLogger("bids_skullstrip.train")


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

    def __init__(self, heads, brains, *, seed, start, patch_size, synth_prob, composite_prob, depth=4):
        self.heads, self.brains, self.seed = heads, brains, seed
        self.patch_options = {"size": patch_size, "synth_prob": synth_prob, "composite_prob": composite_prob}
        self.queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, args=(start,), daemon=True)
        self.thread.start()

    def _run(self, step):
        while True:
            rng = np.random.default_rng([self.seed, step])
            head = self.heads[rng.integers(len(self.heads))]
            image, label = training_patch(head, rng, brains=self.brains, **self.patch_options)
            self.queue.put((step, image[None, ..., None], label[None, ..., None]))
            step += 1

    def get(self):
        return self.queue.get()


def validate(model, val_heads, *, threshold=None):
    rows = []
    for head in val_heads:
        img = nib.load(str(head.image))
        data = np.asarray(img.dataobj, dtype=np.float32)
        reference = np.asarray(nib.load(str(head.mask)).dataobj) > 0
        result = skullstrip_array(data, img.affine, model=model, threshold=threshold)
        rows.append({"name": head.name, **compare_masks(result.mask, reference, voxel_sizes(img.affine))})
    return rows


THRESHOLD_CANDIDATES = tuple(np.round(np.arange(0.3, 0.81, 0.05), 2))


def calibrate_threshold(model, heads):
    """The probability threshold with the best median Dice on ``heads`` (the training heads: the
    validation heads choose nothing). Returns (threshold, {threshold: median Dice})."""
    scores = {t: [] for t in THRESHOLD_CANDIDATES}
    for head in heads:
        img = nib.load(str(head.image))
        data = np.asarray(img.dataobj, dtype=np.float32)
        reference = np.asarray(nib.load(str(head.mask)).dataobj) > 0
        prob = skullstrip_array(data, img.affine, model=model, threshold=0.5).probability
        for t in THRESHOLD_CANDIDATES:
            scores[t].append(dice(clean_mask(prob, threshold=t, voxel_mm=voxel_sizes(img.affine)), reference))
    medians = {float(t): float(np.median(v)) for t, v in scores.items()}
    return max(medians, key=medians.get), medians


def export_weights(model, out_dir, card):
    """Write ``unet.weights.h5`` + ``model.json`` (the model card's machine-readable half)."""
    from ..model.unet import build_unet

    inference_model = build_unet(**card["architecture"])  # uncompiled: no optimizer state in the file
    inference_model.set_weights(model.get_weights())
    model = inference_model
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "unet.weights.h5"
    tmp = out_dir / "unet.tmp.weights.h5"
    model.save_weights(str(tmp))
    tmp.replace(weights)
    card = dict(card, sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
                size_bytes=weights.stat().st_size)
    (out_dir / "model.json").write_text(json.dumps(card, indent=2) + "\n")
    return weights


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


def _run_steps(model, optimizer, average, manager, step_var, spent, train_heads, brains, val_heads, out_dir, *,
               start, steps, until, seed, patch_size, synth_prob, composite_prob, peak_lr, checkpoint_every,
               validate_every, freeze_bn_from):
    log.info("loading %d training heads and %d brains", len(train_heads), len(brains))
    heads = [TrainingHead.load(h) for h in train_heads]
    stream = PatchStream(heads, [TrainingHead.load_brain(b) for b in brains], seed=seed, start=start,
                         patch_size=tuple(patch_size), synth_prob=synth_prob, composite_prob=composite_prob)
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
                log.info("step %d: BatchNorm statistics frozen for the rest of the schedule", step)
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
                if val_heads and (done % validate_every == 0 or done == steps):
                    rows = validate(model, val_heads)
                    dices = [r["dice"] for r in rows]
                    val_median, val_min = float(np.median(dices)), float(np.min(dices))
                    log.info("step %d validation: %s", done,
                             ", ".join(f"{r['name']} {r['dice']:.4f}" for r in rows))
                writer.writerow([done, np.mean(losses), lr, elapsed / len(losses), val_median, val_min])
                fh.flush()
                log.info("step %d/%d loss %.4f lr %.2e %.2f s/step", done, steps, np.mean(losses), lr,
                         elapsed / len(losses))
                losses, t0 = [], time.perf_counter()


def train(train_heads, val_heads, out_dir, *, brains=(), steps=3000, seed=20261125, patch_size=(80, 80, 80),
          synth_prob=0.25, composite_prob=0.2, base_filters=16, levels=4, peak_lr=1e-3, checkpoint_every=200,
          validate_every=1000, init_weights=None, threads=None, export_only=False, until=None,
          frozen_bn_fraction=0.3):
    """Train (or resume) to ``steps`` on a cosine schedule over ``steps``; ``until`` stops this run earlier
    (the schedule is unchanged, so ``--until`` then a plain rerun equals one uninterrupted run)."""
    import tensorflow as tf
    import keras

    from ..model.unet import build_unet

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    architecture = {"base_filters": base_filters, "levels": levels}
    model = build_unet(**architecture)
    if init_weights:
        model.load_weights(str(init_weights))
        log.info("initialised from %s (fine-tuning)", init_weights)
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
        log.info("resumed from %s at step %d", manager.latest_checkpoint, int(step_var.numpy()))
    start = int(step_var.numpy())
    until = steps if until is None else min(until, steps)
    if not export_only and start < until:
        _run_steps(model, optimizer, average, manager, step_var, spent, train_heads, brains, val_heads, out_dir,
                   start=start, steps=steps, until=until, seed=seed, patch_size=patch_size, synth_prob=synth_prob,
                   composite_prob=composite_prob, peak_lr=peak_lr, checkpoint_every=checkpoint_every,
                   validate_every=validate_every, freeze_bn_from=int(round(steps * (1.0 - frozen_bn_fraction))))
    done = int(step_var.numpy())
    averaged = average.apply()
    if averaged:
        log.info("exporting the mean of the weights of the last %d steps (BatchNorm frozen)", averaged)

    card = {
        "name": "bids_skullstrip U-Net",
        "software_version": __version__,
        "architecture": architecture,
        "voxel_mm": MODEL_VOXEL_MM,
        "training": {
            "steps": done, "schedule_steps": steps, "seed": seed, "patch_size": list(patch_size),
            "synth_prob": synth_prob, "composite_prob": composite_prob, "frozen_bn_fraction": frozen_bn_fraction,
            "averaged_steps": averaged,
            "composited_brains": [Path(b).name for b in brains], "peak_lr": peak_lr, "cpu_hours": float(spent.numpy()) / 3600.0,
            "heads": [h.name for h in train_heads], "fine_tuned_from": str(init_weights or ""),
        },
    }
    log.info("calibrating the threshold on the %d training heads", len(train_heads))
    card["threshold"], card["threshold_calibration"] = calibrate_threshold(model, train_heads)
    log.info("threshold %.2f (median training Dice by threshold: %s)", card["threshold"],
             card["threshold_calibration"])
    finished = done >= steps and not export_only
    if val_heads and finished:
        card["validation"] = validate(model, val_heads, threshold=card["threshold"])
        log.info("exported weights, validation: %s",
                 ", ".join(f"{r['name']} {r['dice']:.4f}" for r in card["validation"]))
    final = out_dir / ("final" if finished else f"export-step{done}")
    export_weights(model, final, card)
    return final
