"""Do the QC flags catch broken masks, and how often do they fire on good ones, for every contrast?

On every real head of ../shared/data/heads with a silver mask (T1w + mask_silver, read in place) and, with
``--contrasts``, on the FLAIR, T2w and 2D T1w images of ../shared/data/contrasts (image + mask_ref, evaluated
inside fov.nii.gz: the image is zeroed outside it, where the reference is not defined) this computes the QC
measures (``bids_skullstrip.qc.qc_measures``) of

* the good mask (silver), with a proxy probability map (the mask smoothed by a 1.5 mm Gaussian);
* masks broken on purpose: shifted 10 / 20 mm (along R, A or S, the direction and sign rotating over the
  heads), eroded / dilated 5 / 8 mm, the top third cut off, flipped A-P and S-I (the mask of a wrongly
  oriented image), the mask of another head (the next head in sorted order of another subject, mostly of the
  same study, moved so that the two masks' centroids coincide: right place, wrong brain), a leak into the neck
  (the head's tissue in a column of 25 mm radius below the brainstem, 60 mm down: what the networks shipped
  before the two-stage model did; only where the field of view shows enough neck for it to add 30 ml or more);
* the good mask on the image with heavy Rician noise (sigma = 0.3 x brain median): not a failure (the networks'
  masks of such images are good), so a flag there is a false alarm and the noise gets a note;
* probability-map failures a model can produce (synthetic): a 30 ml blob of p > 0.5 outside the brain, a
  blurred, hesitant probability map (6 mm Gaussian);
* with ``--model``: the bundled networks (``Skullstripper``) on the clean image, on the noisy image and on
  the image with its S-I axis flipped in the data (a header that lies about the orientation); a model mask
  counts as a failure when its Dice against the right answer is < 0.90.

Flags are evaluated two ways: the absolute rules alone (``qc.flag_image``), and absolute + group robust
z-scores (``qc.flag_group`` on the good images of all the *other* heads plus the one image under test; the
model's own clean masks for the model rows). A last line applies the group rule within one study (the 14
ds000011 heads) to count group false alarms where a group is homogeneous.

    python bench/qc_flags.py                                  # all heads, ~5 min on 2 busy cores
    python bench/qc_flags.py --heads ds000011-sub-01 colin27
    python bench/qc_flags.py --model --model-cache ~/.cache/bids_skullstrip-bench/qc_model   # + the network
    python bench/qc_flags.py --cache /tmp/qc.json             # keep the measures; re-runs only re-evaluate
    python bench/qc_flags.py --contrasts --model              # the 13 clinical images, one table per contrast

The limits in ``bids_skullstrip.qc.LIMITS`` were calibrated on the good masks of all these heads (silver and
the model's own) and on the corruptions below; docs/qc.md has the table this prints.
"""

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from scipy import ndimage as ndi

from bids_skullstrip import qc
from bids_skullstrip.metrics import dice
from bids_skullstrip.nifti import atomic_write_text
from bids_skullstrip.postproc import apply_border

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PROXY_SIGMA_MM = 1.5

# condition -> (kind, is_failure)
CONDITIONS = {
    "good": ("mask", False),
    "shift_10mm": ("mask", True),
    "shift_20mm": ("mask", True),
    "erode_5mm": ("mask", True),
    "erode_8mm": ("mask", True),
    "dilate_5mm": ("mask", True),
    "dilate_8mm": ("mask", True),
    "cut_top_third": ("mask", True),
    "flip_AP": ("mask", True),
    "flip_SI": ("mask", True),
    "other_head": ("mask", True),
    "noise_heavy": ("image", False),  # a good mask of a noisy image: a note (qc.NOTE_LIMITS), not a failure
    "prob_extra_blob": ("probability", True),
    "prob_blurred": ("probability", True),
    "add_neck": ("mask", True),  # last: each condition's seed is its place here
}


def world_axis(affine, code):
    """(voxel axis, sign) of the voxel axis closest to world direction ``code`` in R/A/S."""
    codes = nib.aff2axcodes(affine)
    pairs = {"R": "L", "A": "P", "S": "I"}
    for ax, c in enumerate(codes):
        if c == code:
            return ax, 1
        if c == pairs[code]:
            return ax, -1
    raise ValueError(codes)


def shift(mask, ax, n):
    out = np.zeros_like(mask)
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    if n > 0:
        src[ax], dst[ax] = slice(0, -n), slice(n, None)
    elif n < 0:
        src[ax], dst[ax] = slice(-n, None), slice(0, n)
    out[tuple(dst)] = mask[tuple(src)]
    return out


def grow(mask, mm, vox):
    """Dilate (mm > 0) or erode (mm < 0) by a distance in mm: the app's own border, on the mask's box."""
    box = _box(mask, abs(mm), vox)
    out = mask.copy()
    out[box] = apply_border(mask[box], mm, vox)
    return out


def _box(mask, pad_mm, vox):
    idx = np.argwhere(mask[::2, ::2, ::2]) * 2
    pad = np.ceil(pad_mm / vox).astype(int) + 2
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, mask.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def proxy_probability(mask, vox, sigma_mm=PROXY_SIGMA_MM):
    """The mask smoothed by a Gaussian (computed on the mask's box: zero far from it anyway)."""
    prob = np.zeros(mask.shape, np.float32)
    if mask.any():
        box = _box(mask, 4 * sigma_mm, vox)
        prob[box] = ndi.gaussian_filter(mask[box].astype(np.float32), sigma=sigma_mm / vox)
    return prob


def add_noise(t1, mask, rng, level=0.30):
    """Rician noise with sigma = level x brain median, added in the brain's box + 30 mm (all that QC and the
    figures look at; keeps the bench light on a shared machine)."""
    sigma = level * float(np.median(t1[mask]))
    box = _box(mask, 30.0, np.ones(3))
    out = t1.copy()
    sub = t1[box]
    n1 = rng.normal(0, sigma, sub.shape).astype(np.float32)
    n2 = rng.normal(0, sigma, sub.shape).astype(np.float32)
    out[box] = np.sqrt((sub + n1) ** 2 + n2 ** 2)
    return out


def blob_outside(mask, vox, rng, ml=30.0):
    """A ball of ``ml`` millilitres centred 25-35 mm outside the brain (eyes, neck, scalp...)."""
    d_out = ndi.distance_transform_edt(~mask[::2, ::2, ::2], sampling=vox * 2)
    cand = np.argwhere((d_out > 25) & (d_out < 35)) * 2
    centre = cand[rng.integers(len(cand))]
    r = (3 * ml * 1000 / (4 * np.pi)) ** (1 / 3)
    grids = np.ogrid[tuple(slice(0, n) for n in mask.shape)]
    dist2 = sum(((g - c) * v) ** 2 for g, c, v in zip(grids, centre, vox))
    return dist2 <= r * r


def other_head_mask(mask, affine, other_mask, other_affine):
    """The brain mask of another head on this head's grid, through world coordinates, with the two masks'
    centroids made to coincide (the hardest version of a mix-up: right place, wrong brain)."""
    c_this = affine[:3, :3] @ np.argwhere(mask[::2, ::2, ::2]).mean(0) * 2 + affine[:3, 3]
    c_other = other_affine[:3, :3] @ np.argwhere(other_mask[::2, ::2, ::2]).mean(0) * 2 + other_affine[:3, 3]
    shift_world = np.eye(4)
    shift_world[:3, 3] = c_other - c_this
    m = np.linalg.inv(other_affine) @ shift_world @ affine  # this voxel -> other voxel
    out = ndi.affine_transform(other_mask.astype(np.uint8), m[:3, :3], offset=m[:3, 3], output_shape=mask.shape,
                               order=0, mode="constant", cval=0)
    return out > 0


NECK_RADIUS_MM, NECK_LENGTH_MM, NECK_MIN_ML = 25.0, 60.0, 30.0


def neck_leak(t1, mask, affine):
    """``mask`` run on into the neck: the voxels of head tissue (the image smoothed by 1 voxel above a fifth of the
    brain's median) in a column of NECK_RADIUS_MM about the axis through the mask's lowest 10 mm, from 5 mm above
    its lowest point to NECK_LENGTH_MM below it; None where that adds less than NECK_MIN_ML (the field of view ends
    at the brainstem). Red-team 18's leak (F2), which every QC measure missed."""
    grid = np.ogrid[tuple(slice(0, n) for n in mask.shape)]
    r, a, s = (sum(row[j] * g for j, g in enumerate(grid)) + row[3] for row in affine[:3])
    s_low = float(s[mask].min())
    low = mask & (s < s_low + 10)
    column = np.hypot(r - r[low].mean(), a - a[low].mean()) < NECK_RADIUS_MM
    head = ndi.gaussian_filter(t1, 1.0) > 0.2 * float(np.median(t1[mask]))
    neck = head & column & (s < s_low + 5) & (s > s_low - NECK_LENGTH_MM)
    labels, _ = ndi.label(mask | neck)
    out = labels == labels[tuple(np.argwhere(mask)[0])]
    return out if np.count_nonzero(out & ~mask) * float(np.prod(voxel_sizes(affine))) / 1000 >= NECK_MIN_ML else None


def corrupt(name, t1, mask, vox, affine, i, rng, other=None):
    """(t1, probability, mask) of one condition, None where it does not apply to this image; ``other`` = (mask,
    affine) of another head."""
    m = mask
    if name == "good":
        return t1, proxy_probability(m, vox), m
    if name.startswith("shift_"):
        mm = float(name.split("_")[1][:-2])
        code = "RAS"[i % 3]
        ax, sign = world_axis(affine, code)
        direction = -1 if (i // 3) % 2 else 1
        m = shift(mask, ax, int(round(direction * sign * mm / vox[ax])))
    elif name.startswith("erode_"):
        m = grow(mask, -float(name.split("_")[1][:-2]), vox)
    elif name.startswith("dilate_"):
        m = grow(mask, float(name.split("_")[1][:-2]), vox)
    elif name == "cut_top_third":
        ax, sign = world_axis(affine, "S")
        idx = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))[0]
        lo, hi = idx[0], idx[-1]
        third = (hi - lo + 1) // 3
        m = mask.copy()
        sl = [slice(None)] * 3
        sl[ax] = slice(hi + 1 - third, None) if sign > 0 else slice(0, lo + third)
        m[tuple(sl)] = False
    elif name in ("flip_AP", "flip_SI"):
        ax, _ = world_axis(affine, name[-2])
        m = np.flip(mask, axis=ax).copy()
    elif name == "other_head":
        m = other_head_mask(mask, affine, *other)
    elif name == "add_neck":
        m = neck_leak(t1, mask, affine)
        if m is None:
            return None
    elif name == "noise_heavy":
        return add_noise(t1, mask, rng), proxy_probability(mask, vox), mask
    elif name == "prob_extra_blob":
        p = proxy_probability(mask, vox)
        p[blob_outside(mask, vox, rng)] = 0.95
        return t1, p, mask  # post-processing keeps the largest component: the mask is unchanged
    elif name == "prob_blurred":
        p = proxy_probability(mask, vox, sigma_mm=6.0)
        return t1, p, (p > 0.5)
    else:
        raise KeyError(name)
    return t1, proxy_probability(m, vox), m


def model_conditions(t1, mask, affine, vox, rng, head="", model_cache=None, fov=None, contrast="T1w"):
    """Real model runs, by the bundled networks of ``contrast`` as the app runs them: (name, t1 used for QC,
    probability, mask, Dice against the right answer; inside ``fov`` where given).

    ``model_flipped_SI`` is an image whose data is upside down with respect to its header (a wrong
    orientation): the right mask is the silver mask flipped the same way, and the model's mask is a failure
    only if it misses that one (QC cannot know, and should not care, that the header is wrong)."""
    from bids_skullstrip.model.card import ModelCard
    from bids_skullstrip.model.predictor import Skullstripper

    card = ModelCard.bundled_for(contrast)
    weights_tag = card.sha256[:12] + f"-t{card.threshold:g}"
    out = []
    ax_s, _ = world_axis(affine, "S")
    flipped = np.flip(mask, axis=ax_s)
    within = np.ones(mask.shape, bool) if fov is None else fov
    inside = {"model_clean": within, "model_noise_heavy": within, "model_flipped_SI": np.flip(within, axis=ax_s)}
    for name, data, truth in (("model_clean", t1, mask), ("model_noise_heavy", add_noise(t1, mask, rng), mask),
                              ("model_flipped_SI", np.flip(t1, axis=ax_s).copy(), flipped)):
        saved = Path(model_cache) / f"{head}_{name}_{weights_tag}.npz" if model_cache else None
        if saved is not None and saved.exists():
            with np.load(saved) as z:
                prob, m = z["probability"].astype(np.float32), z["mask"]
        else:
            res = Skullstripper(card).mask(data, affine)
            prob, m = res.probability, res.mask
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(saved, probability=prob.astype(np.float16), mask=m)
        out.append((name, data, prob, m, dice(m & inside[name], truth & inside[name])))
    return out


MODEL_CONDITIONS = ("model_clean", "model_noise_heavy", "model_flipped_SI")


def load_head(head):
    """(image, good mask, field of view where the mask is defined or None) of a head or a contrasts image."""
    folder = DATA / "heads" / head
    if folder.is_dir():
        img = nib.load(str(folder / "T1w.nii.gz"))
        return img, np.asarray(nib.load(str(folder / "mask_silver.nii.gz")).dataobj) > 0, None
    folder = DATA / "contrasts" / head
    img = nib.load(str(folder / "image.nii.gz"))
    mask, fov = (np.asarray(nib.load(str(folder / f)).dataobj) > 0 for f in ("mask_ref.nii.gz", "fov.nii.gz"))
    return img, mask, fov


def all_heads(contrasts=False):
    """{id: BIDS suffix} of the heads with a silver mask (T1w), or of the contrasts images."""
    if contrasts:
        return {p.parent.name: json.loads((p.parent / "meta.json").read_text())["bids_suffix"]
                for p in sorted((DATA / "contrasts").glob("*/mask_ref.nii.gz"))}
    return {p.parent.name: "T1w" for p in sorted((DATA / "heads").glob("*/mask_silver.nii.gz"))}


def subject(head):
    """Whose head it is: a contrasts image's patient (its other images are the same brain), else the head."""
    meta = DATA / "contrasts" / head / "meta.json"
    return json.loads(meta.read_text())["subject"] if meta.exists() else head


def run(heads, use_model, cache, verbose=True, model_cache=None, contrasts=False):
    """QC measures of every (head, condition); cached in ``cache`` (JSON) when given, so that re-running
    after a change of LIMITS only re-evaluates the flags. Delete the cache after a change of qc_measures."""
    results = json.loads(Path(cache).read_text()) if cache and Path(cache).exists() else {}
    splits = json.loads((DATA / "splits.json").read_text())
    split_of = {h: s for s, hs in splits.items() for h in hs}
    everyone = all_heads(contrasts)
    names = list(everyone)
    for head in heads:
        i = names.index(head)  # fixed per head, whatever subset is run: same corruption, same seed
        want = [c for c in CONDITIONS if f"{head}|{c}" not in results]
        want_model = [c for c in MODEL_CONDITIONS if use_model and f"{head}|{c}" not in results]
        if not (want or want_model):
            continue
        img, mask, fov = load_head(head)
        t1 = img.get_fdata(dtype=np.float32)
        # the corrupted masks are judged where the good one is defined: the image is zeroed outside that
        shown = t1 if fov is None else t1 * fov
        vox = voxel_sizes(img.affine)
        other = None
        if "other_head" in want:  # the next head in sorted order of another subject (mostly: the same study)
            o_img, o_mask, _ = load_head(next(n for n in names[i + 1:] + names[:i] if subject(n) != subject(head)))
            other = (o_mask, o_img.affine)
        info = {"head": head, "contrast": everyone[head], "split": split_of.get(head, "contrasts" if contrasts else "?")}
        for name in want:
            rng = np.random.default_rng([i, list(CONDITIONS).index(name)])
            made = corrupt(name, shown, mask, vox, img.affine, i, rng, other=other)
            if made is None:
                results[f"{head}|{name}"] = {**info, "condition": name, "not_applicable": True}
                continue
            t, p, m = made
            t0 = time.perf_counter()
            meas = qc.qc_measures(t, p, m.astype(np.uint8), vox)
            dt = time.perf_counter() - t0
            d = float(dice(m, mask))
            results[f"{head}|{name}"] = {**info, "condition": name, "failure": CONDITIONS[name][1], "dice": d,
                                         "seconds": dt, "qc": meas}
            if verbose:
                flags = qc.flag_image(meas, everyone[head])
                print(f"{head:18s} {name:16s} dice {d:.3f}  {dt:.2f}s  flags: {flags}", flush=True)
        if want_model:
            rng = np.random.default_rng([i, 99])
            for name, t, p, m, d in model_conditions(t1, mask, img.affine, vox, rng, head, model_cache, fov,
                                                            everyone[head]):
                if name not in want_model:
                    continue
                meas = qc.qc_measures(t, p, m, vox)
                results[f"{head}|{name}"] = {**info, "condition": name, "failure": bool(d < MODEL_FAIL_DICE),
                                             "dice": float(d), "seconds": 0.0, "qc": meas}
                if verbose:
                    flags = qc.flag_image(meas, everyone[head])
                    print(f"{head:18s} {name:16s} dice {d:.3f}  flags: {flags}", flush=True)
        if cache:
            atomic_write_text(cache, json.dumps(results))
    return {k: r for k, r in results.items() if r["head"] in heads and not r.get("not_applicable")}


MODEL_FAIL_DICE = 0.90


def evaluate(results):
    """Per condition: [n, flagged by the absolute rules, flagged by absolute + group rules, failures among n,
    flagged failures (abs+group)], the Dice values, and the reasons (which rule fired, abs+group)."""
    rows = list(results.values())
    # the reference group of an image: the good images of all other heads of its contrast (silver masks for
    # the silver conditions, the model's outputs on the clean images for the model conditions)
    ref = {"silver": {r["head"]: r for r in rows if r["condition"] == "good"},
           "model": {r["head"]: r for r in rows if r["condition"] == "model_clean"}}
    table = defaultdict(lambda: {"n": 0, "abs": 0, "grp": 0, "fail": 0, "fail_abs": 0, "fail_grp": 0, "dice": [],
                                 "low": 0, "low_abs": 0})
    reasons = defaultdict(lambda: defaultdict(int))
    for r in rows:
        contrast = r.get("contrast", "T1w")
        flags_abs = qc.flag_image(r["qc"], contrast)
        family = ref["model" if r["condition"].startswith("model_") else "silver"]
        group = [g["qc"] for h, g in sorted(family.items())
                 if h != r["head"] and g.get("contrast", "T1w") == contrast] + [r["qc"]]
        flags_grp = qc.flag_group(group, contrast)[-1]
        t = table[r["condition"]]
        t["n"] += 1
        t["abs"] += bool(flags_abs)
        t["grp"] += bool(flags_grp)
        t["fail"] += bool(r["failure"])
        t["fail_abs"] += bool(r["failure"] and flags_abs)
        t["fail_grp"] += bool(r["failure"] and flags_grp)
        t["dice"].append(r["dice"])
        t["low"] += r["dice"] < MODEL_FAIL_DICE
        t["low_abs"] += bool(r["dice"] < MODEL_FAIL_DICE and flags_abs)
        for rule in {_rule(f) for f in flags_grp}:
            reasons[r["condition"]][rule] += 1
    return table, reasons


def _rule(flag):
    if "group outlier" in flag:
        return "z:" + flag.split(" is a group outlier")[0].rsplit(" ", 1)[0].replace(" ", "_")
    if flag.startswith("brain volume"):
        return "brain_volume_ml"
    for key, (_, _, _, text) in qc.LIMITS.items():
        if flag.startswith(text):
            return key
    return flag[:30]


STUDY_PREFIX = "ds000011-"  # 14 raw scanner images of one study: a realistic group for the z-scores


def study_false_alarms(results):
    """Group z-scores within one study: how many of its good images get a group-outlier flag, for the
    silver masks and for the model's own masks."""
    out = {}
    for cond in ("good", "model_clean"):
        rows = sorted((r for r in results.values() if r["condition"] == cond and r["head"].startswith(STUDY_PREFIX)
                       and not (cond == "model_clean" and r["failure"])), key=lambda r: r["head"])
        if len(rows) < qc.GROUP_MIN_IMAGES:
            continue
        flags = qc.flag_group([r["qc"] for r in rows])
        hits = [(r["head"], [f for f in fl if "group outlier" in f]) for r, fl in zip(rows, flags)]
        out[cond] = (len(rows), [(h, f) for h, f in hits if f])
    return out


def print_table(table, reasons, study=None):
    lines = ["| condition | a failure? | Dice vs silver (median) | flagged: absolute rules | "
             "flagged: absolute + group z | Dice < 0.90: flagged (absolute) | rules that fired (abs + group) |",
             "|---|---|---|---|---|---|---|"]
    order = list(CONDITIONS) + list(MODEL_CONDITIONS)
    for cond in order:
        if cond not in table:
            continue
        t = table[cond]
        top = sorted(reasons[cond].items(), key=lambda kv: (-kv[1], kv[0]))[:4]
        why = ", ".join(f"{k} {v}" for k, v in top) or "–"
        if cond.startswith("model_"):
            nf, ng = t["fail"], t["n"] - t["fail"]
            what = f"Dice < {MODEL_FAIL_DICE}: {nf}/{t['n']}"

            def cell(k, kf):
                return f"{t[kf]}/{nf} failures, {t[k] - t[kf]}/{ng} others"
            lines.append(f"| {cond} | {what} | {np.median(t['dice']):.3f} | {cell('abs', 'fail_abs')} | "
                         f"{cell('grp', 'fail_grp')} | {t['fail_abs']}/{nf} | {why} |")
        else:
            label = f"**{cond}** (false alarms)" if cond == "good" else cond
            low = f"{t['low_abs']}/{t['low']}" if t["low"] else "–"
            lines.append(f"| {label} | {'yes' if CONDITIONS[cond][1] else 'no'} | {np.median(t['dice']):.3f} | "
                         f"{t['abs']}/{t['n']} | {t['grp']}/{t['n']} | {low} | {why} |")
    fails = [c for c, (_, f) in CONDITIONS.items() if f and c in table]
    summary = []
    for label, k in (("absolute rules", "abs"), ("absolute + group rules", "grp")):
        det = sum(table[c][k] for c in fails)
        tot = sum(table[c]["n"] for c in fails)
        fa = table["good"][k] if "good" in table else 0
        ng = table["good"]["n"] if "good" in table else 0
        summary.append(f"{label}: detected {det}/{tot} corrupted inputs ({100 * det / max(tot, 1):.0f} %), "
                       f"false alarms on {fa}/{ng} good masks")
    for cond, (n, hits) in (study or {}).items():
        what = "silver masks" if cond == "good" else "the model's masks (Dice >= 0.9)"
        detail = "; ".join(f"{h}: {', '.join(f)}" for h, f in hits)
        summary.append(f"group z within one study ({STUDY_PREFIX}*, {n} images, {what}): "
                       f"{len(hits)} flagged" + (f" ({detail})" if detail else ""))
    text = "\n".join(lines) + "\n\n" + "\n".join(summary)
    print(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", nargs="*", help="head ids (default: all with a silver mask)")
    ap.add_argument("--contrasts", action="store_true", help="the FLAIR, T2w and 2D T1w images of "
                                                             "../shared/data/contrasts instead: a table per contrast")
    ap.add_argument("--cache", default=None, help="JSON file to keep measures between runs (delete it after "
                                                   "changing qc_measures; LIMITS changes need no recompute)")
    ap.add_argument("--model", action="store_true", help="also run the bundled model (~10 s per head and run)")
    ap.add_argument("--model-cache", default=None, help="folder to keep the model's masks and probabilities "
                                                        "(per weights file) between runs")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    ap.add_argument("-q", "--quiet", action="store_true", help="no per-image lines")
    args = ap.parse_args(argv)
    everyone = all_heads(args.contrasts)
    heads = args.heads or list(everyone)
    unknown = sorted(set(heads) - set(everyone))
    if unknown:
        sys.exit(f"no image + good mask for: {' '.join(unknown)} (in {DATA / ('contrasts' if args.contrasts else 'heads')})")
    if args.model:
        from bids_skullstrip.model.inference import WEIGHTS_FILE
        if not WEIGHTS_FILE.exists():
            sys.exit(f"--model: no weights at {WEIGHTS_FILE}")
    results = run(heads, args.model, args.cache, verbose=not args.quiet, model_cache=args.model_cache,
                  contrasts=args.contrasts)
    secs = [r["seconds"] for r in results.values() if r["seconds"]]
    print(f"\n{len(heads)} heads; qc_measures: median {np.median(secs):.2f} s, max {np.max(secs):.2f} s per image\n")
    texts = []
    for contrast in sorted({r.get("contrast", "T1w") for r in results.values()}):
        mine = {k: r for k, r in results.items() if r.get("contrast", "T1w") == contrast}
        print(f"### {contrast} ({len({r['head'] for r in mine.values()})} images)\n")
        table, reasons = evaluate(mine)
        texts.append(f"### {contrast}\n\n" + print_table(table, reasons, study_false_alarms(mine)))
        print()
    if args.markdown:
        atomic_write_text(args.markdown, "\n\n".join(texts) + "\n")


if __name__ == "__main__":
    main()
