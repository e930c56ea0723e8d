"""The whole training recipe as data: the steps that make the shipped weights, in order.

Each step is a run of ``train.train`` (both networks, from scratch or from an earlier step's export) or the
weight-space mean of earlier steps' exports (``train.average_exports``), in a folder of its own under the output
folder. A step whose export is there is done; one that is not resumes from its checkpoints, so rerunning the
command after a stop continues where it stopped. The last step's export is what ships (``final/``), or, in a recipe
that makes both sets of bundled networks, each step marked ``ships`` (into ``weights/`` and
``weights_any_contrast/``, the package's folders of the same names).
"""

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..model.card import BUNDLED_DIRS
from ..model.inference import LOCATOR_FILE_NAME, WEIGHTS_FILE
from ..nifti import atomic_file, atomic_write_text

log = logging.getLogger("bids_skullstrip.train")

BUNDLED = "bundled"


@dataclass(frozen=True)
class Step:
    """One step of a recipe. ``init``: None (from scratch), ``"bundled"`` (the weights in the package), the name of
    an earlier step or a weights file; ``average``: earlier steps (or weights files) whose mean this step exports
    instead of training, with ``shares``; ``options``: keyword arguments of ``train.train`` (steps, locator_steps,
    peak_lr, seed, hard_head_fraction, labels_prob, ...); ``ships``: the package's weights folder this step's export
    is copied to, under the output folder (``weights``, ``weights_any_contrast``)."""
    name: str
    init: str = None
    average: tuple = ()
    shares: tuple = None
    options: dict = field(default_factory=dict)
    ships: str = None

    @classmethod
    def from_dict(cls, spec):
        if not isinstance(spec, dict) or not isinstance(spec.get("options", {}), dict):
            raise ValueError(f"recipe step {json.dumps(spec)}: a step is a JSON object with a name (and options as an "
                             "object)")
        unknown = set(spec) - {"name", "init", "average", "shares", "options", "ships"}
        if unknown or "name" not in spec:
            raise ValueError(f"recipe step {spec}: needs a name; unknown keys {sorted(unknown)}")
        return cls(spec["name"], spec.get("init"), tuple(spec.get("average", ())),
                   None if spec.get("shares") is None else tuple(spec["shares"]), dict(spec.get("options", {})),
                   spec.get("ships"))


# The shipped weights' lineage (docs/model_card.md, "Training"): a from-scratch run, a second cycle of the
# segmenter, a third with hard heads drawn more often, and the mean of the last two.
RECIPE = (
    Step("scratch", options={"steps": 4000, "locator_steps": 2000, "peak_lr": 1e-3}),
    Step("cycle2", init="scratch", options={"steps": 2500, "locator_steps": 0, "peak_lr": 3e-4}),
    Step("hard-heads", init="cycle2", options={"steps": 1000, "locator_steps": 0, "peak_lr": 1e-4,
                                                "hard_head_fraction": 0.5, "seed": 20261203}),
    Step("mean", average=("cycle2", "hard-heads")),
)

# The any-contrast networks' lineage (``weights_any_contrast/``, for every suffix but T1w; docs/model_card.md, "Two
# sets of networks"): the same kind of steps with patches painted from tissue label maps and acquired in 3-7 mm
# slices in every step, then a longer third cycle with more real T1w patches.
_PAINTED = {"thick_prob": 0.35, "thickness_mm": [3.0, 7.0], "labels_prob": 0.3}
ANY_CONTRAST_RECIPE = (
    Step("scratch", options={"steps": 4000, "locator_steps": 2000, "peak_lr": 1e-3, **_PAINTED}),
    Step("cycle2", init="scratch", options={"steps": 1500, "locator_steps": 0, "peak_lr": 3e-4, **_PAINTED}),
    Step("hard-heads", init="cycle2", options={"steps": 600, "locator_steps": 0, "peak_lr": 1e-4,
                                                "hard_head_fraction": 0.5, "seed": 20261203, **_PAINTED}),
    Step("mean", average=("cycle2", "hard-heads")),
    Step("cycle3", init="mean", options={"steps": 2000, "locator_steps": 0, "peak_lr": 3e-4, "seed": 20261206,
                                         **_PAINTED, "labels_prob": 0.2, "thick_prob": 0.3}),
)


def _renamed(recipe, prefix):
    """``recipe`` with every step name (and every reference to one) prefixed, to share an output folder."""
    def name(ref):
        return prefix + ref if any(s.name == ref for s in recipe) else ref

    return tuple(replace(s, name=prefix + s.name, init=s.init and name(s.init), average=tuple(map(name, s.average)))
                 for s in recipe)


def _shipping(recipe, folder):
    return (*recipe[:-1], replace(recipe[-1], ships=folder))


# Both sets in one command: the two lineages share no step; each one's last export ships into its folder.
ALL_RECIPE = (*_shipping(RECIPE, "weights"), *_shipping(_renamed(ANY_CONTRAST_RECIPE, "any-"), "weights_any_contrast"))
RECIPES = {"t1w": RECIPE, "any-contrast": ANY_CONTRAST_RECIPE, "all": ALL_RECIPE}


def load_recipe(path):
    """A recipe from a JSON file: a list of steps as ``Step`` fields."""
    try:
        specs = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not a JSON recipe ({exc})") from None
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"{path}: a recipe is a non-empty JSON list of steps")
    return tuple(Step.from_dict(spec) for spec in specs)


# A training step's options (``train.train``'s keywords; the command line's, by their dest)
COUNTS, FRACTIONS = ("steps", "locator_steps", "until"), (
    "synth_prob", "labels_prob", "thick_prob", "fine_bias_prob", "mass_prob", "enhance_prob", "composite_prob",
    "frozen_bn_fraction", "hard_head_fraction")
PAIRS = ("thickness_mm", "composite_size")
OPTIONS = (*COUNTS, *FRACTIONS, *PAIRS, "seed", "peak_lr")


def check_options(options, name):
    """A ValueError naming the first option of a training step that the step could not run with, as ``name(key)``
    calls it (a recipe's step and key, or the command line's option)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for key, value in options.items():
        if key not in OPTIONS:
            raise ValueError(f"{name(key)}: unknown option (one of {', '.join(OPTIONS)})")
        bad = ((key in COUNTS or key == "seed") and not (isinstance(value, int) and not isinstance(value, bool)
                                                          and value >= 0)
               or key in FRACTIONS and not (number(value) and 0.0 <= value <= 1.0)
               or key == "peak_lr" and not (number(value) and value > 0)
               or key in PAIRS and not (isinstance(value, (list, tuple)) and len(value) == 2
                                        and all(number(v) and v > 0 for v in value) and value[0] <= value[1]))
        if bad:
            wanted = ("0 or more (a whole number)" if key in COUNTS or key == "seed" else "between 0 and 1"
                      if key in FRACTIONS else "above 0" if key == "peak_lr" else "two numbers, low and high, above 0")
            raise ValueError(f"{name(key)} {json.dumps(value)}: must be {wanted}")


def check_recipe(recipe):
    """Raise ValueError naming the first step that refers to a step not before it, repeats a name, has a name that
    is no folder name, or an option it could not run with."""
    seen = set()
    for step in recipe:
        if step.name in seen or step.name in ("final", *(d.name for d in BUNDLED_DIRS)):
            raise ValueError(f"recipe step {step.name!r}: names must be unique and not 'final' nor "
                             f"{' nor '.join(repr(d.name) for d in BUNDLED_DIRS)}")
        if not isinstance(step.name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", step.name):
            raise ValueError(f"recipe step {step.name!r}: a name is a folder name (letters, digits, - _ .)")
        check_options(step.options, lambda key, step=step: f"recipe step {step.name!r}: {key}")
        for ref in ([step.init] if step.init else []) + list(step.average):
            if ref != BUNDLED and ref not in seen and not Path(ref).is_file():
                raise ValueError(f"recipe step {step.name!r}: {ref!r} is neither an earlier step nor a weights file")
        if step.average and (step.init or step.options):
            raise ValueError(f"recipe step {step.name!r}: an average trains nothing (no init, no options)")
        if step.ships is not None and step.ships not in {d.name for d in BUNDLED_DIRS} - {s.ships for s in recipe
                                                                                          if s.name in seen}:
            raise ValueError(f"recipe step {step.name!r}: ships {step.ships!r}: one of "
                             f"{', '.join(d.name for d in BUNDLED_DIRS)}, each shipped by one step")
        seen.add(step.name)


def estimate_hours(recipe, *, segmenter_s, locator_s, export_s=120.0):
    """The recipe's wall time from measured seconds per step (``bench/training_step.py``); each export (threshold
    calibration on the training heads and validation) costs about ``export_s``."""
    seconds = sum(step.options.get("steps", 4000) * segmenter_s + step.options.get("locator_steps", 2000) * locator_s
                  for step in recipe if not step.average)
    return (seconds + export_s * len(recipe)) / 3600.0


def run_recipe(recipe, train_heads, val_heads, out_dir, **common):
    """Run (or resume) every step of ``recipe`` into ``out_dir/<step>/`` (a step done with the same spec before is
    skipped; a folder that holds a run of other settings is a ValueError); what ships (the last step's export, in
    ``out_dir/final/``, or each step marked ``ships``, in ``out_dir/<ships>/``) is copied there with the recipe
    recorded in its ``model.json``. ``common``: keyword arguments of ``train.train`` shared by every training step
    (brains, threads, precision, checkpoint_every, ...). Returns the shipped folders, or () if a step stopped
    before its end (``until``, ``export_only``)."""
    from .train import average_exports, train

    check_recipe(recipe)
    out_dir = Path(out_dir)

    def weights_of(ref):
        if ref == BUNDLED:
            return WEIGHTS_FILE
        step_export = out_dir / ref / "final" / WEIGHTS_FILE.name
        return step_export if any(s.name == ref for s in recipe) else Path(ref)

    for step in recipe:
        folder = out_dir / step.name
        _check_same_run(folder, step, train_heads)
        done = folder / "step.json"  # written when the step's export is complete
        if done.exists() and json.loads(done.read_text()) == _trained(step):
            log.info("recipe step %s: done before (%s)", step.name, folder / "final")
            continue
        log.info("recipe step %s: %s", step.name, asdict(step))
        if step.average:
            average_exports([weights_of(r) for r in step.average], train_heads, val_heads, folder,
                            shares=step.shares)
        else:
            init = weights_of(step.init) if step.init else None
            exported = train(train_heads, val_heads, folder, init_weights=init, **{**common, **step.options})
            if exported.name != "final":
                log.info("recipe step %s stopped early: %s; rerun to continue", step.name, exported)
                return ()
        atomic_write_text(done, json.dumps(_trained(step)))
    shipping = [(s, s.ships) for s in recipe if s.ships] or [(recipe[-1], "final")]
    return tuple(_ship(out_dir / step.name / "final", out_dir / name, recipe) for step, name in shipping)


def _ship(export, folder, recipe):
    """Copy the export in ``export`` to ``folder`` (each file whole or not there, the card last, with ``recipe``
    recorded in it), unless it is there already."""
    card = json.loads((export / "model.json").read_text())
    if (folder / "model.json").exists() and json.loads((folder / "model.json").read_text())["sha256"] == card["sha256"]:
        return folder
    folder.mkdir(exist_ok=True)
    (folder / "model.json").unlink(missing_ok=True)  # a folder without a card is not an export yet
    # the weights and their ONNX exports (what inference runs without TensorFlow)
    for name in (WEIGHTS_FILE.name, LOCATOR_FILE_NAME, *(p.name for p in export.glob("*.onnx"))):
        with atomic_file(folder / name) as tmp:
            shutil.copyfile(export / name, tmp)
    card["training"] = dict(card["training"], recipe=[_as_json(step) for step in recipe])
    atomic_write_text(folder / "model.json", json.dumps(card, indent=2) + "\n")
    return folder


def _as_json(step):
    return json.loads(json.dumps({k: v for k, v in asdict(step).items() if v not in (None, (), {})}))


def _trained(step):
    """What a step makes, where its export ships aside: a run of the T1w recipe is done before in 'all'."""
    return {k: v for k, v in _as_json(step).items() if k != "ships"}


def _run_of(step, train_heads):
    """What a step's folder holds a run of: the step (without ``until``, where a run may stop and go on) and its
    training heads."""
    spec = _trained(step)
    spec["options"] = {k: v for k, v in spec.get("options", {}).items() if k != "until"}
    return {"step": spec, "train_heads": [str(h.image) for h in train_heads]}


def _check_same_run(folder, step, train_heads):
    """A ValueError where ``folder`` holds checkpoints or an export of another run (other options, starting weights
    or training heads): resumed, they made a model of neither run whose card described the new one. The run is
    recorded in ``run.json`` when the step starts."""
    record, run = folder / "run.json", _run_of(step, train_heads)
    if record.exists():
        before = json.loads(record.read_text())
        if before != run:
            old, new = before["step"], run["step"]
            changed = [f"{k} {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in sorted({*old, *new})
                       if k != "options" and old.get(k) != new.get(k)]
            changed += [f"{k} {json.dumps(old['options'].get(k))} -> {json.dumps(new['options'].get(k))}"
                        for k in sorted({*old.get("options", {}), *new.get("options", {})})
                        if old.get("options", {}).get(k) != new.get("options", {}).get(k)]
            if before["train_heads"] != run["train_heads"]:
                changed.append(f"training heads ({len(before['train_heads'])} -> {len(run['train_heads'])}, "
                               "not the same)")
            if all(c.startswith("steps ") for c in changed):  # a run made longer (or shorter) goes on, and says so
                log.warning("recipe step %s: %s: the run goes on from its checkpoints on the new schedule (its "
                            "weights are not those of a run of that many steps from the start)", step.name, changed[0])
                atomic_write_text(record, json.dumps(run, indent=1) + "\n")
                return
            raise ValueError(f"{folder}: holds a run with other settings ({'; '.join(changed)}): give another output "
                             f"folder, or delete {folder} to run that step again")
    elif not (folder / "step.json").exists():  # a run of an earlier version without a record resumes as before
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(run, indent=1) + "\n")
