"""The training pipeline: data discovery in users' layouts, reproducible augmentation, resumable runs."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _ci import needs
from scipy import ndimage as ndi

from bids_skullstrip.geometry import LOCATOR_VOXEL_MM, MODEL_VOXEL_MM
from bids_skullstrip.metrics import score_heads
from bids_skullstrip.training.augment import (_composite_brain, _enhance, _mass, _sample, _sample_world,
                                              _smooth_field, synthesize_from_labels, training_patch)
from bids_skullstrip.training.data import (NEAR_BRAIN_MM, TISSUES, TrainingHead, find_brains, find_labelled_heads,
                                           tissue_labels)
from bids_skullstrip.training.train import hard_head_weights, learning_rate, training_dtype

SHARED = Path(__file__).parents[1].parent / "shared" / "data"
pytestmark = needs(SHARED / "heads", "the shared heads")


def _small_head(name, tmp_path, layout):
    """A real head downsampled to ~3 mm, written in an NFBS-like or BIDS layout."""
    src = nib.load(str(SHARED / "heads" / name / "T1w.nii.gz"))
    mask = nib.load(str(SHARED / "heads" / name / "mask_silver.nii.gz"))
    factor = 3.0 / np.array(src.header.get_zooms()[:3])
    data = ndi.zoom(np.asarray(src.dataobj, np.float32), 1 / factor, order=1)
    mdata = (ndi.zoom(np.asarray(mask.dataobj, np.float32), 1 / factor, order=1) > 0.5).astype(np.uint8)
    affine = src.affine @ np.diag([*factor, 1.0])
    if layout == "nfbs":
        folder = tmp_path / name
        image_path, mask_path = folder / f"{name}_T1w.nii.gz", folder / f"{name}_brainmask.nii.gz"
    else:
        folder = tmp_path / f"sub-{name.replace('-', '')}" / "anat"
        stem = f"sub-{name.replace('-', '')}"
        image_path, mask_path = folder / f"{stem}_T1w.nii.gz", folder / f"{stem}_desc-brain_mask.nii.gz"
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(image_path))
    nib.save(nib.Nifti1Image(mdata, affine), str(mask_path))
    return image_path, mask_path


def test_shared_layout_uses_splits():
    train = find_labelled_heads(SHARED, split="train")
    val = find_labelled_heads(SHARED, split="val")
    assert len(train) == 25 and len(val) == 4
    assert not {h.name for h in train} & {h.name for h in val}
    assert all(h.image.exists() and h.mask.exists() for h in train + val)


@pytest.mark.parametrize("layout", ["nfbs", "bids"])
def test_user_layouts_are_found(tmp_path, layout):
    image, mask = _small_head("ds000011-sub-01", tmp_path, layout)
    heads = find_labelled_heads(tmp_path)
    assert [(h.image, h.mask) for h in heads] == [(image, mask)]


def test_patch_stream_is_reproducible_and_varied():
    head = TrainingHead.load(find_labelled_heads(SHARED, split="train")[-1])
    a = training_patch(head, np.random.default_rng([1, 7]), size=(48, 48, 48))
    b = training_patch(head, np.random.default_rng([1, 7]), size=(48, 48, 48))
    c = training_patch(head, np.random.default_rng([1, 8]), size=(48, 48, 48))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    for image, label in (a, c):
        assert image.dtype == np.float32 and image.shape == (48, 48, 48)
        assert 0.0 <= label.min() and label.max() <= 1.0
        assert np.isfinite(image).all()


@pytest.mark.parametrize("shape, coarse", [((80, 96, 80), 5), ((64, 64, 64), 4), ((33, 20, 47), 5)])
def test_smooth_field_is_the_cubic_spline_zoom_of_its_coarse_noise(shape, coarse):
    field = _smooth_field(np.random.default_rng(4), shape, coarse, 2.0)
    noise = np.random.default_rng(4).normal(0.0, 2.0, (coarse,) * 3)
    zoomed = ndi.zoom(noise, [n / coarse for n in shape], order=3, mode="nearest")
    assert field.shape == zoomed.shape == shape
    np.testing.assert_allclose(field, zoomed, rtol=0, atol=1e-12)
    assert field.std() > 0.5


def test_real_brain_composited_into_a_real_head():
    """The label becomes the composited brain's mask; outside both brains the head is untouched; the old
    brain's uncovered space turns dark like CSF; the new brain's intensities match the head's brain."""
    head = TrainingHead.load(find_labelled_heads(SHARED, split="train")[0])
    brains = find_brains(SHARED)
    assert len(brains) == 36
    brain = TrainingHead.load_brain(brains[0])
    size = (64, 64, 64)
    rng = np.random.default_rng(3)
    world = _sample_world(head, rng, size, MODEL_VOXEL_MM, "segmenter")
    (image, label), _ = _sample((head.image, head.mask), head.affine, world, size)
    new_image, new_label = _composite_brain(rng, head, brain, world, size, image, label)
    old, new = label > 0.99, new_label > 0.99
    assert new.sum() > 0.1 * new.size and not np.array_equal(old, new)
    outside = (label == 0) & (new_label == 0)
    assert outside.sum() > 0.05 * outside.size
    assert np.allclose(new_image[outside], image[outside], rtol=1e-5, atol=1e-3 * head.brain_median)
    uncovered = old & (new_label < 0.01)
    assert uncovered.any() and np.median(new_image[uncovered]) < 0.5 * head.brain_median
    assert 0.8 < np.median(new_image[new]) / head.brain_median < 1.25
    assert np.isfinite(new_image).all() and new_image.dtype == np.float32
    # a smaller brain in the same space: an atrophic one, with more CSF under the skull
    small = [_composite_brain(np.random.default_rng(5), head, brain, world, size, image, label,
                              size_range=(r, r))[1] > 0.99 for r in (1.0, 0.85)]
    assert small[1].sum() < 0.8 * small[0].sum()
    assert (old & ~small[1]).sum() > (old & ~small[0]).sum()


def test_tissue_labels_of_a_real_head():
    """Inside the silver mask CSF, gray and white matter in T1w order; outside it the head's tissues, the dark
    class split at NEAR_BRAIN_MM from the brain; background where there is no head; cached once per head."""
    head = find_labelled_heads(SHARED, split="train")[-1]
    loaded = TrainingHead.load(head, LOCATOR_VOXEL_MM)
    labels = tissue_labels(loaded.image, loaded.mask, loaded.affine)
    brain = loaded.mask > 0.5
    assert labels.dtype == np.uint8 and set(np.unique(labels[brain])) == {1, 2, 3}
    assert set(np.unique(labels[~brain])) == {0, 4, 5, 6, 7, 8}
    means = [loaded.image[labels == c].mean() for c in range(len(TISSUES))]
    assert means[1] < means[2] < means[3] and means[0] < means[1] and means[5] < means[6] < means[7] < means[8]
    distance = ndi.distance_transform_edt(~brain, sampling=nib.affines.voxel_sizes(loaded.affine))
    assert distance[labels == 4].max() <= NEAR_BRAIN_MM < distance[labels == 5].max()
    assert (labels[0] == 0).mean() > 0.5  # the first slab is mostly air


def test_patches_painted_from_labels_are_any_contrast_and_keep_the_brain_label(tmp_path):
    """Painted patches: reproducible, the brain label the real T1w patch would have, class orderings unlike T1w's
    (CSF brighter than white matter in some), background dark; label maps come from the cache."""
    head = find_labelled_heads(SHARED, split="train")[-1]
    loaded = TrainingHead.load(head, MODEL_VOXEL_MM, labels_cache=tmp_path)
    cached = tmp_path / f"{head.name}_2mm_labels.npy"
    assert np.array_equal(np.load(cached), loaded.labels)
    options = {"size": (48, 56, 48), "labels_prob": 1.0, "thick_prob": 1.0, "thickness_mm": (3.0, 7.0)}
    a = training_patch(loaded, np.random.default_rng([2, 1]), **options)
    b = training_patch(loaded, np.random.default_rng([2, 1]), **options)
    real = training_patch(loaded, np.random.default_rng([2, 1]), **dict(options, labels_prob=0.0))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], real[1]) and not np.array_equal(a[0], real[0])
    brighter_csf = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        image = synthesize_from_labels(rng, rng.choice(len(TISSUES), size=(24, 24, 24)).astype(np.uint8))
        assert image.dtype == np.float32 and np.isfinite(image).all() and image.min() >= 0
        painted = synthesize_from_labels(np.random.default_rng(seed), np.full((16, 16, 16), 1, np.uint8))
        white = synthesize_from_labels(np.random.default_rng(seed), np.full((16, 16, 16), 3, np.uint8))
        brighter_csf += painted.mean() > white.mean()
    assert 5 < brighter_csf < 35
    assert synthesize_from_labels(np.random.default_rng(0), np.zeros((16, 16, 16), np.uint8)).mean() < 0.12
    for seed in range(20):  # one contrast asked for (bench/stress_eval.py's painted heads): its physics' order
        csf, white = ({contrast: synthesize_from_labels(np.random.default_rng(seed), np.full((8, 8, 8), c, np.uint8),
                                                         contrast=contrast).mean() for contrast in ("T2w", "FLAIR")}
                      for c in (1, 3))
        assert csf["T2w"] > white["T2w"] and csf["FLAIR"] < white["FLAIR"]


def test_the_fine_bias_field_varies_within_a_lobe_and_leaves_other_streams_alone(tmp_path):
    """``fine_bias_prob``: a second multiplicative field ~16 mm fine on top of the smooth one; at 0 (every recipe
    before it) the patch stream is exactly what it was, so resumed and reproduced runs do not change."""
    head = find_labelled_heads(SHARED, split="train")[0]
    loaded = TrainingHead.load(head, MODEL_VOXEL_MM)
    options = {"size": (48, 56, 48), "thick_prob": 0.0, "synth_prob": 0.0}
    plain = [training_patch(loaded, np.random.default_rng([7, s]), **options) for s in range(6)]
    again = [training_patch(loaded, np.random.default_rng([7, s]), fine_bias_prob=0.0, **options) for s in range(6)]
    fine = [training_patch(loaded, np.random.default_rng([7, s]), fine_bias_prob=1.0, **options) for s in range(6)]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(plain, again))
    assert all(np.array_equal(a[1], f[1]) for a, f in zip(plain, fine))  # the label is untouched
    assert sum(not np.allclose(a[0], f[0], atol=1e-3) for a, f in zip(plain, fine)) >= 5
    # the field itself: neighbouring control points ~16 mm apart on the 2 mm grid differ, a field 4 voxels
    # apart barely does
    field = _smooth_field(np.random.default_rng(0), (80, 96, 80), 10, 0.2)
    assert np.abs(field[::8][1:] - field[::8][:-1]).mean() > 4 * np.abs(field[1:] - field[:-1]).mean()


def test_masses_paint_the_brain_enhancement_the_dura_and_at_zero_neither_changes_the_stream():
    """``mass_prob``: a tumour-like mass painted inside the brain, which stays brain in the label;
    ``enhance_prob``: a bright shell outside it (the dura of a post-contrast T1w), which stays not brain. At 0
    (every recipe before them) the patch stream is exactly what it was."""
    head = find_labelled_heads(SHARED, split="train")[0]
    loaded = TrainingHead.load(head, MODEL_VOXEL_MM)
    options = {"size": (48, 56, 48), "thick_prob": 0.0, "synth_prob": 0.0}
    plain = [training_patch(loaded, np.random.default_rng([8, s]), **options) for s in range(6)]
    again = [training_patch(loaded, np.random.default_rng([8, s]), mass_prob=0.0, enhance_prob=0.0, **options)
             for s in range(6)]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(plain, again))
    rng = np.random.default_rng(3)
    image, label = plain[0]
    brain = label > 0.5
    near = ndi.binary_dilation(brain, np.ones((3, 3, 3)), iterations=2)
    changed = brightened = 0
    for _ in range(8):
        massed = _mass(rng, image, label, MODEL_VOXEL_MM)
        moved = np.abs(massed - image) > 1e-3
        assert massed.dtype == np.float32 and np.isfinite(massed).all()
        assert not (moved & ~near).any()  # inside the brain; outside only its soft edge, 2 voxels at most
        changed += moved.sum() > 500
        enhanced = _enhance(rng, image, label, MODEL_VOXEL_MM)
        lit = enhanced > image + 1e-3
        assert not (lit & brain).any() and not (lit & ~near).any()  # outside the brain, within 3 mm of it
        brightened += lit.sum() > 100 and enhanced[lit].mean() > np.median(image[brain])
    assert changed >= 6 and brightened >= 6


def test_score_heads_scores_inside_the_field_of_view_only():
    """``contrasts`` images are scored inside their fov.nii.gz: a mask grown outside it scores as the reference
    does, grown inside it does not; each row names its contrast."""
    heads = find_labelled_heads(SHARED, split="contrasts")
    assert len(heads) == 13 and {h.contrast for h in heads} == {"T1w", "T2w", "FLAIR"}
    head = next(h for h in heads if h.contrast == "FLAIR")
    reference = np.asarray(nib.load(str(head.mask)).dataobj) > 0
    fov = np.asarray(nib.load(str(head.fov)).dataobj) > 0
    assert (~fov).any()
    grown = ndi.binary_dilation(reference, iterations=3)

    class Result:
        def __init__(self, mask):
            self.mask = mask

    masks = iter([reference, reference | (grown & ~fov), grown])
    rows = score_heads([head] * 3, lambda h, data, affine: Result(next(masks)))
    assert [r["contrast"] for r in rows] == ["FLAIR"] * 3
    assert rows[0]["dice"] == rows[1]["dice"] == 1.0 and rows[2]["dice"] < 0.97
    assert rows[2]["volume_diff_pct"] > 3


def test_frozen_batch_norm_keeps_its_statistics_while_the_rest_learns():
    import keras

    from bids_skullstrip.model.unet import build_unet
    from bids_skullstrip.training.train import dice_bce_loss, freeze_batch_norm

    model = build_unet(base_filters=4, levels=2)
    optimizer = keras.optimizers.Adam(1e-2)
    model.compile(optimizer=optimizer, loss=dice_bce_loss)
    rng = np.random.default_rng(0)
    x = rng.random((1, 16, 16, 16, 1)).astype(np.float32)
    y = (rng.random((1, 16, 16, 16, 1)) > 0.5).astype(np.float32)
    bn = next(layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv3D))
    model.train_on_batch(x, y)
    stats, kernel = [v.numpy() for v in bn.non_trainable_weights], conv.kernel.numpy()
    model.train_on_batch(x, y)
    assert not np.array_equal(bn.non_trainable_weights[0].numpy(), stats[0])  # moving before the freeze
    freeze_batch_norm(model, optimizer)
    stats, kernel = [v.numpy() for v in bn.non_trainable_weights], conv.kernel.numpy()
    model.train_on_batch(x, y)
    assert all(np.array_equal(v.numpy(), s) for v, s in zip(bn.non_trainable_weights, stats))
    assert not np.array_equal(conv.kernel.numpy(), kernel)


def test_weight_average_is_the_mean_of_the_updates_and_survives_a_checkpoint(tmp_path):
    import tensorflow as tf

    from bids_skullstrip.model.unet import build_unet
    from bids_skullstrip.training.train import WeightAverage

    model = build_unet(base_filters=4, levels=2)
    average = WeightAverage(model)
    snapshots = []
    for k in range(3):
        model.set_weights([np.full(w.shape, float(k), np.float32) + np.asarray(w) for w in model.weights])
        snapshots.append([np.asarray(w).copy() for w in model.weights])
        average.update()
    tf.train.Checkpoint(average=average.trackable()).write(str(tmp_path / "ckpt"))
    restored = WeightAverage(model)
    tf.train.Checkpoint(average=restored.trackable()).read(str(tmp_path / "ckpt")).assert_consumed()
    model.set_weights([np.zeros(w.shape, np.float32) for w in model.weights])
    assert restored.apply() == 3
    for weight, *values in zip(model.weights, *snapshots):
        np.testing.assert_allclose(np.asarray(weight), np.mean(values, axis=0), rtol=1e-5, atol=1e-5)
    assert WeightAverage(model).apply() == 0


def test_learning_rate_schedule():
    assert learning_rate(0, 1000) < learning_rate(99, 1000)
    assert learning_rate(100, 1000) == pytest.approx(1e-3, rel=1e-3)
    assert learning_rate(999, 1000) < 1e-4


def test_training_precision_is_bfloat16_only_where_the_cpu_has_amx():
    assert training_dtype("auto", flags={"avx2", "amx_bf16", "avx512_bf16"}) == "mixed_bfloat16"
    assert training_dtype("auto", flags={"avx2", "avx512_bf16"}) == "float32"  # bfloat16 1.58x slower there
    assert training_dtype("auto", flags={"avx2", "avx512f"}) == "float32"
    assert training_dtype("float32", flags={"amx_bf16"}) == "float32"
    assert training_dtype("bfloat16", flags=set()) == "mixed_bfloat16"


def test_fine_tune_resume_and_export(tmp_path):
    """Two steps, stop, resume to three: a user's NFBS-like folder through the real CLI."""
    from bids_skullstrip.cli.train import main

    data = tmp_path / "nfbs"
    _small_head("ds000011-sub-02", data, "nfbs")
    _small_head("ds000011-sub-03", data, "nfbs")
    out = tmp_path / "run"
    common = [str(data), str(out), "--fine-tune", "--patch-size", "32", "32", "32", "--checkpoint-every", "1",
              "--lr", "1e-4", "--locator-steps", "2", "--precision", "float32", "--hard-head-fraction", "0.5",
              "--leave-out", "ds000011-sub-03"]
    assert main([*common[:-1], "no-such-source", "--steps", "2"]) == 2
    assert main([c for c in common if c != "--fine-tune"] + ["--steps", "2"]) == 2  # hard heads need weights
    assert not (out / "segmenter").exists()
    assert main(common + ["--steps", "2"]) == 0
    assert main(common + ["--steps", "3"]) == 0
    rows = list(csv.DictReader((out / "fine-tune" / "segmenter" / "history.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert [r["step"] for r in csv.DictReader((out / "fine-tune" / "locator" / "history.csv").open())] == ["1", "2"]
    log = (out / "train.log").read_text()
    assert "segmenter: resumed from" in log and "segmenter step 2: BatchNorm statistics frozen" in log
    card = json.loads((out / "final" / "model.json").read_text())
    weights = out / "final" / "unet.weights.h5"
    locator = out / "final" / card["locator"]["file"]
    assert card["training"]["segmenter"]["steps"] == 3 and card["training"]["fine_tuned_from"]
    # the options made a one-step recipe; the left-out source is out of training and recorded
    assert [s["name"] for s in card["training"]["recipe"]] == ["fine-tune"]
    assert card["training"]["recipe"][0]["init"] == "bundled"
    assert card["training"]["heads"] == ["ds000011-sub-02"]
    assert card["training"]["left_out_sources"] == ["ds000011-sub-03"]
    assert card["training"]["precision"] == "float32"
    assert card["training"]["hard_head_fraction"] == 0.5
    assert card["training"]["head_weights"] == {"ds000011-sub-02": pytest.approx(1.0)}
    # the 2-step schedule froze (and averaged) its step 2, the 3-step one its step 3
    assert card["training"]["segmenter"]["averaged_steps"] == 2
    assert weights.stat().st_size + locator.stat().st_size < 10 * 2**20
    # with the ONNX exports, which inference without TensorFlow runs (0.2.0: the .h5 files only)
    assert sorted(p.name for p in (out / "final").glob("*.onnx")) == ["locator.onnx", "unet.onnx"]
    assert card["sha256"] and len(card["sha256"]) == 64 and len(card["locator"]["sha256"]) == 64
    # the export loads as the two networks inference uses
    from bids_skullstrip.model.inference import BrainNetworks, load_model
    assert isinstance(load_model(str(weights)), BrainNetworks)


def test_hard_heads_get_more_patches_and_every_head_keeps_its_even_share(tmp_path):
    """A head the starting weights get wrong (here: its label eroded by 6 mm, so the bundled model's mask
    disagrees with it) is drawn more often; the uniform part keeps every head in the stream."""
    from bids_skullstrip.model.inference import load_model

    data = tmp_path / "nfbs"
    _small_head("ds000011-sub-02", data, "nfbs")
    _, bad_mask = _small_head("ds000011-sub-03", data, "nfbs")
    mask = nib.load(str(bad_mask))
    eroded = ndi.binary_erosion(np.asarray(mask.dataobj) > 0, iterations=2).astype(np.uint8)
    nib.save(nib.Nifti1Image(eroded, mask.affine), str(bad_mask))
    heads = find_labelled_heads(data)
    weights = hard_head_weights(load_model(), heads, fraction=0.5, threshold=0.55)
    good, bad = (weights[[h.name for h in heads].index(n)] for n in ("ds000011-sub-02", "ds000011-sub-03"))
    assert weights.sum() == pytest.approx(1.0)
    assert bad > 1.5 * good and good >= 0.25
    even = hard_head_weights(load_model(), heads, fraction=0.0, threshold=0.55)
    np.testing.assert_allclose(even, [0.5, 0.5])


def test_average_exports_the_weighted_mean_of_both_networks_with_its_own_threshold(tmp_path):
    """``--average``: no training; the export holds share-weighted means of both networks of the given exports,
    a threshold calibrated on the training heads and the provenance of each export; exports of another
    architecture or shares that do not sum to 1 are one-line errors."""
    import shutil

    from bids_skullstrip.cli.train import main
    from bids_skullstrip.model.inference import WEIGHTS_DIR, WEIGHTS_FILE, load_model
    from bids_skullstrip.model.unet import build_unet

    data = tmp_path / "nfbs"
    _small_head("ds000011-sub-02", data, "nfbs")
    shipped_card = json.loads((WEIGHTS_DIR / "model.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(WEIGHTS_DIR, other)
    shipped = load_model()
    for name, network, architecture in (("unet.weights.h5", shipped.segmenter, shipped_card["architecture"]),
                                        ("locator.weights.h5", shipped.locator,
                                         shipped_card["locator"]["architecture"])):
        moved = build_unet(**architecture)
        moved.set_weights([w * 0.9 + 0.01 for w in network.get_weights()])
        moved.save_weights(str(other / name))
    out = tmp_path / "mean"
    assert main([str(data), str(out), "--average", str(WEIGHTS_FILE), str(other / "unet.weights.h5"),
                 "--shares", "0.25", "0.75"]) == 0
    final = out / "final"
    card = json.loads((final / "model.json").read_text())
    mean = load_model(str(final / "unet.weights.h5"))
    moved_networks = load_model(str(other / "unet.weights.h5"))
    for pick in (lambda m: m.segmenter, lambda m: m.locator):
        for got, a, b in zip(pick(mean).get_weights(), pick(shipped).get_weights(),
                             pick(moved_networks).get_weights()):
            np.testing.assert_allclose(got, 0.25 * a + 0.75 * b, rtol=1e-5, atol=1e-6)
    assert [r["share"] for r in card["training"]["average_of"]] == [0.25, 0.75]
    assert card["training"]["average_of"][0]["sha256"] == shipped_card["sha256"]
    assert str(card["threshold"]) in card["threshold_calibration"]
    assert card["architecture"] == shipped_card["architecture"] and len(card["sha256"]) == 64

    (other / "model.json").write_text(json.dumps(dict(shipped_card, architecture={"base_filters": 8, "levels": 4})))
    assert main([str(data), str(tmp_path / "bad"), "--average", str(WEIGHTS_FILE), str(other / "unet.weights.h5")]) == 2
    assert main([str(data), str(tmp_path / "bad"), "--average", str(WEIGHTS_FILE), str(WEIGHTS_FILE),
                 "--shares", "0.5", "0.6"]) == 2
    assert main([str(data), str(tmp_path / "bad"), "--average", str(tmp_path / "none.weights.h5")]) == 2
    assert not (tmp_path / "bad" / "final").exists()


def test_until_stops_early_and_a_rerun_of_the_same_step_finishes(tmp_path):
    """From scratch, one step: locator, then the segmenter stopped early and resumed; trained in bfloat16,
    shipped as the float32 network inference builds."""
    from bids_skullstrip.cli.train import main

    data = tmp_path / "nfbs"
    _small_head("ds000011-sub-02", data, "nfbs")
    out = tmp_path / "run"
    common = [str(data), str(out), "--patch-size", "32", "32", "32", "--checkpoint-every", "5", "--steps", "3",
              "--locator-steps", "2", "--precision", "bfloat16"]
    assert main(common + ["--until", "2"]) == 0
    early = json.loads((out / "scratch" / "export-step2" / "model.json").read_text())["training"]
    assert early["segmenter"]["steps"] == 2 and early["segmenter"]["schedule_steps"] == 3
    assert not (out / "final").exists() and not (out / "scratch" / "final").exists()
    assert main(common) == 0
    training = json.loads((out / "final" / "model.json").read_text())["training"]
    assert training["segmenter"]["steps"] == 3 and training["precision"] == "mixed_bfloat16"
    assert [r["step"] for r in csv.DictReader((out / "scratch" / "segmenter" / "history.csv").open())] == ["2", "3"]
    import h5py
    with h5py.File(out / "final" / "unet.weights.h5") as final:
        found = []
        final.visititems(lambda name, obj: found.append(obj.dtype) if isinstance(obj, h5py.Dataset) else None)
        assert set(found) == {np.dtype("float32")}
    from bids_skullstrip.model.inference import load_model
    from bids_skullstrip.model.predictor import Skullstripper
    image = nib.load(str(next(data.rglob("*_T1w.nii.gz"))))
    networks = load_model(str(out / "final" / "unet.weights.h5"))
    assert networks.segmenter.layers[1].dtype_policy.name == "float32"
    probability = Skullstripper(networks=networks).probability(np.asarray(image.dataobj, np.float32), image.affine)
    assert probability.probability.dtype == np.float32 and np.isfinite(probability.probability).all()


def test_one_command_runs_the_whole_recipe_and_a_rerun_resumes_it(tmp_path):
    """A recipe of every kind of step (scratch, a cycle from it, a mean, a contrast stage painted from tissue
    label maps): each step in its folder, the last one's export in final/ with the recipe and the whole lineage in
    its card; a rerun finds every step done and changes nothing; bad recipes are one-line errors."""
    from bids_skullstrip.cli.train import _recipe, build_parser, main
    from bids_skullstrip.training.recipe import ANY_CONTRAST_RECIPE, RECIPE, RECIPES, estimate_hours

    data = tmp_path / "nfbs"
    _small_head("ds000011-sub-02", data, "nfbs")
    _small_head("ds000011-sub-03", data, "nfbs")
    recipe = [{"name": "scratch", "options": {"steps": 2, "locator_steps": 1}},
              {"name": "cycle2", "init": "scratch", "options": {"steps": 2, "locator_steps": 0, "peak_lr": 1e-4}},
              {"name": "mean", "average": ["scratch", "cycle2"], "shares": [0.5, 0.5]},
              {"name": "contrasts", "init": "mean",
               "options": {"steps": 2, "locator_steps": 1, "labels_prob": 1.0, "thick_prob": 1.0,
                           "thickness_mm": [3.0, 7.0], "seed": 7}}]
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(recipe))
    out = tmp_path / "run"
    argv = [str(data), str(out), "--recipe", str(recipe_file), "--patch-size", "32", "32", "32",
            "--precision", "float32"]
    assert main(argv) == 0
    assert all((out / step["name"] / "final" / "model.json").exists() for step in recipe)
    card = json.loads((out / "final" / "model.json").read_text())
    last = json.loads((out / "contrasts" / "final" / "model.json").read_text())
    assert card["sha256"] == last["sha256"] and (out / "final" / card["locator"]["file"]).exists()
    training = card["training"]
    assert [s["name"] for s in training["recipe"]] == ["scratch", "cycle2", "mean", "contrasts"]
    assert training["labels_prob"] == 1.0 and training["thickness_mm"] == [3.0, 7.0]
    assert training["segmenter"]["steps"] == 2 and training["locator"]["steps"] == 1
    # the lineage: contrasts <- mean <- (scratch, cycle2 <- scratch)
    parents = training["fine_tuned_from"]["training"]["average_of"]
    assert [p["training"]["segmenter"]["schedule_steps"] for p in parents] == [2, 2]
    assert parents[1]["training"]["fine_tuned_from"]["sha256"] == parents[0]["sha256"]
    # tissue label maps derived once per head, kept with the run's step, not in the project
    assert sorted(p.name for p in (out / "contrasts" / "tissue_labels").iterdir()) == [
        "ds000011-sub-02_2mm_labels.npy", "ds000011-sub-02_4mm_labels.npy",
        "ds000011-sub-03_2mm_labels.npy", "ds000011-sub-03_4mm_labels.npy"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")} == before
    assert (out / "train.log").read_text().count("recipe step contrasts: done before") == 1

    recipe_file.write_text(json.dumps([{"name": "cycle2", "init": "scratch"}]))
    assert main(argv) == 2  # refers to a step that is not before it
    recipe_file.write_text(json.dumps([{"name": "x", "options": {"steps": 1}, "bogus": 1}]))
    assert main(argv) == 2
    recipe_file.write_text("{}")
    assert main(argv) == 2
    # the shipped recipes, at the step times measured on this machine, fit in 4 h each; both are named
    assert 2.0 < estimate_hours(RECIPE, segmenter_s=1.0, locator_s=0.3) < 4.0
    assert 2.0 < estimate_hours(ANY_CONTRAST_RECIPE, segmenter_s=1.0, locator_s=0.3) < 4.0
    assert _recipe(build_parser().parse_args(["d", "o", "--recipe", "any-contrast"])) is ANY_CONTRAST_RECIPE
    assert RECIPES["t1w"] is RECIPE is _recipe(build_parser().parse_args(["d", "o"]))


def test_one_command_makes_both_sets_each_into_the_folder_it_ships_to(tmp_path, capsys):
    """A recipe of two lineages (``ships``): each marked step's export in out/weights/ and out/weights_any_contrast/
    (the package's folders), the first lineage's step taken as done from an earlier run of it alone; the bundled
    'all' recipe is both shipped recipes, step for step."""
    from dataclasses import replace

    from bids_skullstrip.cli.train import _recipe, build_parser, main
    from bids_skullstrip.training.recipe import ALL_RECIPE, ANY_CONTRAST_RECIPE, RECIPE, Step, check_recipe

    data = tmp_path / "nfbs"
    _small_head("ds000011-sub-02", data, "nfbs")
    recipe = [{"name": "t1", "options": {"steps": 1, "locator_steps": 1}, "ships": "weights"},
              {"name": "any", "options": {"steps": 1, "locator_steps": 1, "labels_prob": 1.0, "seed": 3},
               "ships": "weights_any_contrast"}]
    recipe_file = tmp_path / "recipe.json"
    out = tmp_path / "run"
    argv = [str(data), str(out), "--recipe", str(recipe_file), "--patch-size", "32", "32", "32", "--precision",
            "float32"]
    # the first lineage alone first: where its export ships does not change the run, so it is done before
    recipe_file.write_text(json.dumps([{k: v for k, v in recipe[0].items() if k != "ships"}]))
    assert main(argv) == 0 and (out / "final" / "model.json").exists()
    (out / "final" / "model.json").unlink()
    recipe_file.write_text(json.dumps(recipe))
    assert main(argv) == 0
    assert (out / "train.log").read_text().count("recipe step t1: done before") == 1
    assert capsys.readouterr().out.splitlines()[-2:] == [f"weights written to {out / 'weights'}",
                                                       f"weights written to {out / 'weights_any_contrast'}"]
    for step, folder in (("t1", "weights"), ("any", "weights_any_contrast")):
        card = json.loads((out / folder / "model.json").read_text())
        assert card["sha256"] == json.loads((out / step / "final" / "model.json").read_text())["sha256"]
        assert [s["name"] for s in card["training"]["recipe"]] == ["t1", "any"]
        assert (out / folder / card["locator"]["file"]).exists()
    assert not (out / "final" / "model.json").exists()

    assert _recipe(build_parser().parse_args(["d", "o", "--recipe", "all"])) is ALL_RECIPE
    check_recipe(ALL_RECIPE)
    t1w, any_contrast = ALL_RECIPE[:len(RECIPE)], ALL_RECIPE[len(RECIPE):]
    assert t1w == (*RECIPE[:-1], replace(RECIPE[-1], ships="weights"))
    renamed = [replace(s, name="any-" + s.name, init=s.init and "any-" + s.init,
                       average=tuple("any-" + a for a in s.average)) for s in ANY_CONTRAST_RECIPE]
    assert any_contrast == (*renamed[:-1], replace(renamed[-1], ships="weights_any_contrast"))
    for bad, problem in (([Step("a", ships="weights"), Step("b", ships="weights")], "each shipped by one step"),
                         ([Step("a", ships="elsewhere")], "ships 'elsewhere': one of weights"),
                         ([Step("weights")], "names must be unique and not 'final'")):
        with pytest.raises(ValueError, match=problem):
            check_recipe(tuple(bad))


def _eval_rows(capsys, argv, csv_path):
    from bids_skullstrip.cli.evaluate import main

    assert main([*argv, "--csv", str(csv_path)]) == 0
    table = capsys.readouterr().out
    assert "median" in table and "worst" in table
    return {r["name"]: {k: float(v) for k, v in r.items() if k != "name"} for r in csv.DictReader(csv_path.open())}


def test_eval_scores_existing_masks(tmp_path, capsys):
    data = tmp_path / "nfbs"
    _, mask_path = _small_head("ds000011-sub-02", data, "nfbs")
    predictions = tmp_path / "pred"
    predictions.mkdir()
    mask = nib.load(str(mask_path))
    eroded = ndi.binary_erosion(np.asarray(mask.dataobj) > 0, iterations=2).astype(np.uint8)
    nib.save(nib.Nifti1Image(eroded, mask.affine), str(predictions / "ds000011-sub-02.nii.gz"))
    rows = _eval_rows(capsys, [str(data), "--predictions", str(predictions)], tmp_path / "scores.csv")
    row = rows["ds000011-sub-02"]
    assert 0.5 < row["dice"] < 0.95 and row["iou"] < row["dice"]
    assert row["hd95_mm"] == pytest.approx(6.0, abs=1.5)  # two 3 mm voxels
    assert row["volume_diff_pct"] < -10


def test_eval_uses_the_threshold_calibrated_for_the_given_weights(tmp_path, capsys):
    import shutil

    from bids_skullstrip.model.inference import LOCATOR_FILE_NAME, WEIGHTS_FILE, model_card

    data = tmp_path / "nfbs"
    _small_head("ds000011-sub-02", data, "nfbs")
    weights = tmp_path / "model" / "unet.weights.h5"
    weights.parent.mkdir()
    shutil.copy(WEIGHTS_FILE, weights)
    shutil.copy(WEIGHTS_FILE.with_name(LOCATOR_FILE_NAME), weights.with_name(LOCATOR_FILE_NAME))
    card = model_card()
    (weights.parent / "model.json").write_text(json.dumps(dict(card, threshold=0.95)))
    common = [str(data), "--weights", str(weights)]
    own = _eval_rows(capsys, common, tmp_path / "own.csv")["ds000011-sub-02"]
    explicit = _eval_rows(capsys, [*common, "--threshold", "0.95"], tmp_path / "explicit.csv")["ds000011-sub-02"]
    low = _eval_rows(capsys, [*common, "--threshold", "0.3"], tmp_path / "low.csv")["ds000011-sub-02"]
    assert own["volume_ml"] == explicit["volume_ml"]
    assert own["volume_ml"] < low["volume_ml"]


def test_a_training_run_is_bit_for_bit_reproducible(tmp_path):
    """The same command twice, each in a fresh process as users run it: the same weights, checksum for checksum,
    so that what a recipe produces can be checked against what ships. (Ops run side by side would add a
    step's float sums in varying order and the runs would differ in the last bits.)"""
    data = tmp_path / "nfbs"
    _small_head("ds000011-sub-02", data, "nfbs")
    checksums = []
    for run in ("a", "b"):
        out = tmp_path / run
        # full-size patches and 8 steps: before the fix 4 of 4 such pairs differed (smaller runs at times did not)
        subprocess.run([sys.executable, "-m", "bids_skullstrip.cli.train", str(data), str(out), "--steps", "8",
                        "--locator-steps", "2", "--checkpoint-every", "10", "--threads", "2"],
                       check=True, capture_output=True)
        card = json.loads((out / "final" / "model.json").read_text())
        checksums.append((card["sha256"], card["locator"]["sha256"]))
    assert checksums[0] == checksums[1]


@pytest.mark.parametrize("argv, message", [
    (["{shared}", "--split", "nope"], "no split 'nope' (splits.json has"),  # was: error: 'nope'
    (["{shared}", "--threshold", "2"], "threshold 2.0: must be between 0 and 1"),  # ran: Dice 0.0000
    (["{tmp}/nowhere"], "nowhere: data folder not found"),
])
def test_eval_usage_errors_say_what_is_wrong(argv, message, tmp_path, capsys):
    from bids_skullstrip.cli.evaluate import main

    assert main([a.format(shared=SHARED, tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/nowhere", "{tmp}/out"], "data folder {tmp}/nowhere: folder not found"),
    (["{shared}", "{tmp}/out", "--steps", "-1"], "--steps -1: must be 0 or more"),  # training started
    (["{shared}", "{tmp}/out", "--val-data", "{tmp}/nowhere"], "--val-data {tmp}/nowhere: folder not found"),
    (["{shared}", "{tmp}/out", "--recipe", "nope"], "--recipe nope: neither t1w nor any-contrast nor all nor a JSON file"),
    (["{shared}", "{tmp}/out", "--recipe", "{tmp}/bad.json"], "{tmp}/bad.json: not a JSON recipe"),
    (["{shared}", "{tmp}/out", "--labels-prob", "1.5"], "--labels-prob 1.5: must be between 0 and 1"),
])
def test_train_arguments_are_judged_before_anything_is_made_or_loaded(argv, message, tmp_path, capsys):
    from bids_skullstrip.cli.train import main

    (tmp_path / "bad.json").write_text("[{name: scratch}]")
    argv = [a.format(shared=SHARED, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(tmp=tmp_path) in err[0], err
    assert not (tmp_path / "out").exists()  # train.log and the folder were made before


# ------------------------------------------------------------------------------- a user's own labelled data
def test_a_users_labelled_folder_is_read_as_the_readme_says_and_its_gaps_are_named(tmp_path, caplog):
    """NFBS names its masks <stem>_T1w_brainmask (the README's example found no pair); an image without a mask is
    named (it was dropped in silence); two masks for one image are an error (the first by name was taken); the
    same stem at two sites gets two names (one cached label map served both)."""
    from bids_skullstrip.training.data import find_labelled_heads

    data = tmp_path / "nfbs"
    image, mask = _small_head("ds000011-sub-02", data / "siteA", "nfbs")
    mask.rename(mask.with_name(image.name.replace("_T1w.nii.gz", "_T1w_brainmask.nii.gz")))
    _small_head("ds000011-sub-02", data / "siteB", "nfbs")
    other, other_mask = _small_head("ds000011-sub-03", data / "siteB", "nfbs")
    other_mask.unlink()
    with caplog.at_level("WARNING", logger="bids_skullstrip"):
        heads = find_labelled_heads(data)
    assert sorted(h.name for h in heads) == ["siteA_ds000011-sub-02_ds000011-sub-02",
                                             "siteB_ds000011-sub-02_ds000011-sub-02"]
    assert f"1 image(s) without a brain mask skipped: {other}" in caplog.text
    (image.parent / "ds000011-sub-02_mask.nii.gz").write_bytes(b"")  # a second candidate
    with pytest.raises(ValueError, match="2 brain masks could be its own"):
        find_labelled_heads(data)
    with pytest.raises(ValueError, match=r"1 \*_T1w image\(s\) but no brain mask beside any"):
        find_labelled_heads(data / "siteB" / "ds000011-sub-03")


@pytest.mark.parametrize("change, problem", [
    (lambda m, a: (m.astype(np.float32) * 0.9, a), None),  # 0 and one value: fine
    (lambda m, a: (m * 255, a), None),
    (lambda m, a: (ndi.gaussian_filter(m.astype(np.float32), 1), a), "not a binary brain mask"),
    (lambda m, a: (m + (ndi.binary_dilation(m, iterations=2) & ~m.astype(bool)) * 2, a), "not a binary brain mask"),
    (lambda m, a: (1 - m, a), "covers .* of the field of view: inverted"),
    (lambda m, a: (np.zeros_like(m), a), "empty"),
    (lambda m, a: (m[::-1], a @ np.diag([-1.0, 1, 1, 1])), "affine differs from its image's"),
    (lambda m, a: (m[::2, ::2, ::2], a), "shape .* differs from its image's"),
])
def test_a_mask_that_is_no_brain_mask_of_its_image_is_refused_in_one_line(change, problem, tmp_path):
    """Read as mask > 0, such masks trained networks that were silently wrong (a probability map: 3.4x the brain,
    training Dice 0.48; an inverted mask: 0.01; a mask in another voxel order: flipped labels)."""
    from bids_skullstrip.training.data import LabelledHead, check_pair

    image, mask_path = _small_head("ds000011-sub-02", tmp_path, "nfbs")
    mask = nib.load(str(mask_path))
    data, affine = change(np.asarray(mask.dataobj), mask.affine)
    data = np.asarray(data)
    nib.save(nib.Nifti1Image(data.astype(np.int16) if data.dtype.kind in "iu" else data, affine), str(mask_path))
    head = LabelledHead("x", image, mask_path)
    if problem is None:
        check_pair(head)
    else:
        with pytest.raises(ValueError, match=problem) as err:
            check_pair(head)
        assert str(err.value).startswith(f"{mask_path}: ") and "\n" not in str(err.value)


def test_recipe_steps_are_checked_as_the_command_line_checks_its_options(tmp_path):
    from bids_skullstrip.training.recipe import Step, check_recipe, load_recipe

    for options, problem in (({"steps": -3}, "'a': steps -3: must be 0 or more"),
                             ({"labels_prob": 1.5}, "labels_prob 1.5: must be between 0 and 1"),
                             ({"lr": 1e-4}, "'a': lr: unknown option"),
                             ({"steps": "4"}, 'steps "4": must be 0 or more .a whole number.'),
                             ({"thickness_mm": [7, 3]}, "thickness_mm .7, 3.: must be two numbers")):
        with pytest.raises(ValueError, match=problem):
            check_recipe((Step("a", options=options),))
    with pytest.raises(ValueError, match="a name is a folder name"):
        check_recipe((Step("a/../../x"),))
    (tmp_path / "r.json").write_text("[4]")
    with pytest.raises(ValueError, match="a step is a JSON object"):
        load_recipe(tmp_path / "r.json")


def test_a_run_folder_holding_another_runs_checkpoints_is_refused(tmp_path):
    """Resumed, another run's checkpoints made a model of neither run whose card described the new one (other
    starting weights; other training heads and the same options: "done before", the old model returned)."""
    from bids_skullstrip.training.data import LabelledHead
    from bids_skullstrip.training.recipe import Step, _check_same_run

    heads = [LabelledHead("a", tmp_path / "a_T1w.nii.gz", tmp_path / "a_brainmask.nii.gz")]
    folder = tmp_path / "run" / "fine-tune"
    _check_same_run(folder, Step("fine-tune", init="bundled", options={"steps": 4}), heads)  # records it
    _check_same_run(folder, Step("fine-tune", init="bundled", options={"steps": 4, "until": 2}), heads)
    _check_same_run(folder, Step("fine-tune", init="bundled", options={"steps": 8}), heads)  # longer: goes on
    with pytest.raises(ValueError, match=r"holds a run with other settings \(init \"bundled\" -> \"w.h5\"\)"):
        _check_same_run(folder, Step("fine-tune", init="w.h5", options={"steps": 8}), heads)
    with pytest.raises(ValueError, match=r"training heads \(1 -> 2, not the same\)"):
        _check_same_run(folder, Step("fine-tune", init="bundled", options={"steps": 8}), heads * 2)


def test_training_and_eval_commands_refuse_files_that_are_no_weights_in_one_line(tmp_path, capsys):
    from bids_skullstrip.cli.evaluate import main as evaluate
    from bids_skullstrip.cli.train import main as train

    data = tmp_path / "nfbs"
    _small_head("ds000011-sub-02", data, "nfbs")
    bad = tmp_path / "bad.weights.h5"
    bad.write_text("not weights")
    assert train([str(data), str(tmp_path / "out"), "--init-weights", str(bad), "--steps", "2"]) == 2
    assert train([str(data), str(tmp_path / "out"), "--recipe", "t1w", "--steps", "2"]) == 2
    assert evaluate([str(data), "--weights", str(bad)]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said[0] == f"bids_skullstrip-train: error: --init-weights {bad}: not a Keras weights file (*.weights.h5, HDF5)"
    assert said[1].startswith("bids_skullstrip-train: error: --recipe t1w and --steps: a recipe gives")
    assert said[2] == f"bids_skullstrip-eval: error: --weights {bad}: not a Keras weights file (*.weights.h5, HDF5)"
    assert not (tmp_path / "out").exists()


def test_averaging_weights_without_their_card_or_of_another_architecture_is_one_line(tmp_path, capsys):
    """--average of weights copied without their model.json said "no locator ... single-stage weights of earlier
    versions"; of weights whose card names another architecture, Keras' error listed every layer and its
    weights (hundreds of lines) after 32 warnings."""
    from bids_skullstrip.cli.train import main as train
    from bids_skullstrip.model.card import WEIGHTS_DIR

    data = tmp_path / "nfbs"
    _small_head("ds000011-sub-02", data, "nfbs")
    alone, other = tmp_path / "alone", tmp_path / "other"
    alone.mkdir()
    shutil.copy(WEIGHTS_DIR / "unet.weights.h5", alone)
    shutil.copytree(WEIGHTS_DIR, other)
    card = json.loads((other / "model.json").read_text())
    card["architecture"]["base_filters"] = 8
    (other / "model.json").write_text(json.dumps(card))
    for weights in (alone, other):
        assert train([str(data), str(tmp_path / f"out-{weights.name}"), "--average",
                      str(weights / "unet.weights.h5"), str(weights / "unet.weights.h5")]) == 2
    err = capsys.readouterr().err
    said = [line for line in err.strip().splitlines() if "bids_skullstrip-train" in line]
    assert said == [f"bids_skullstrip-train: error: {alone / 'unet.weights.h5'}: no model.json beside these weights: "
                    "the networks' card (architecture, locator, threshold), which bids_skullstrip-train exports with "
                    "them, is needed to load them",
                    f"bids_skullstrip-train: error: {other / 'unet.weights.h5'}: these weights are not of the "
                    "architecture their model.json describes (base_filters 8, levels 4): use the model.json "
                    "exported with them"], err[-3000:]
    assert "Skipping" not in err and "could not be loaded" not in err, err[-3000:]
