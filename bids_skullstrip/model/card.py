"""The model card: what a set of weights is (``model.json``, written by ``bids_skullstrip-train``), read once.

Everything that depends on the weights reads it from here: the predictor (networks, grids, views,
threshold), the QC record (checksums) and the methods text, so none of them can drift from the weights in use.

    card = ModelCard.load()                         # the bundled weights
    card = ModelCard.load("my_weights/")            # a folder holding model.json and the weights files
    card = ModelCard.load("my_weights/model.json")  # or its card (any name), or the segmenter's .h5 file
    card = ModelCard.bundled_for("FLAIR")           # the bundled networks for an image of that BIDS suffix

Two sets of networks are bundled. T1w images get the T1w networks (``weights/``): trained on real T1w heads, they
are the most accurate there. Every other suffix (T2w, FLAIR, PDw, ...) gets the any-contrast networks
(``weights_any_contrast/``), trained on the same heads painted with random contrasts from their tissue label
maps as well: better on FLAIR and T2w, worse on T1w heads with necks in view (docs/model_card.md).
"""

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import geometry

WEIGHTS_DIR = Path(__file__).parent / "weights"
ANY_CONTRAST_WEIGHTS_DIR = Path(__file__).parent / "weights_any_contrast"
BUNDLED_DIRS = (WEIGHTS_DIR, ANY_CONTRAST_WEIGHTS_DIR)
# The suffixes the T1w networks are bundled for; any other suffix gets the any-contrast networks.
T1W_SUFFIXES = ("T1w",)
CARD_NAME = "model.json"
SEGMENTER_FILE_NAME = "unet.weights.h5"
LOCATOR_FILE_NAME = "locator.weights.h5"
# Cards written before the training recipe recorded its contrasts come from T1w heads only.
DEFAULT_CONTRASTS = ("T1w",)


class ModelCardError(ValueError):
    """The weights named by the user cannot be used (one line, naming the path)."""


@dataclass(frozen=True, eq=False)  # one object per card version (``load`` caches): compared and hashed by identity
class ModelCard:
    path: Path  # the card file (it may not exist for bare weights of old versions: then ``data`` is {})
    segmenter_file: Path
    locator_file: Path
    data: dict = field(repr=False)  # the whole card, as written by the training command

    @classmethod
    def load(cls, weights=None):
        """The card of ``weights``: None (the bundled weights), a folder, a card file, or the segmenter's
        weights file (its card is the ``model.json`` beside it)."""
        weights = Path(weights or WEIGHTS_DIR).expanduser()
        if weights.is_dir():
            card_file, segmenter = weights / CARD_NAME, None
        elif weights.suffix == ".json":
            card_file, segmenter = weights, None
        else:
            card_file, segmenter = weights.with_name(CARD_NAME), weights
        if not (card_file.exists() or (segmenter and segmenter.exists())):
            raise ModelCardError(f"{weights}: no model weights there (a folder with {CARD_NAME} and the weights "
                                 "files, or its model card, is expected)")
        card_file = card_file.resolve()
        try:
            stat = card_file.stat()
            version = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            version = None
        segmenter = None if segmenter is None else segmenter.resolve()
        if segmenter == card_file.parent / SEGMENTER_FILE_NAME:  # one card object however it is named
            segmenter = None
        elif segmenter is not None and not segmenter.is_file():  # another file's networks would run instead
            raise ModelCardError(f"{weights}: no such weights file (its folder holds {CARD_NAME}: give the folder "
                                 "to use its weights)")
        return _load(card_file, segmenter, version)

    @classmethod
    def bundled_for(cls, suffix="T1w"):
        """The bundled networks for an image of BIDS ``suffix`` (``T1w``, ``FLAIR``, ...; any ``ce-``/``acq-``), or a
        ValueError for a suffix the app does not strip (a typo would otherwise get the any-contrast networks)."""
        from ..discovery import check_suffix

        return cls.load(WEIGHTS_DIR if check_suffix(suffix) in T1W_SUFFIXES else ANY_CONTRAST_WEIGHTS_DIR)

    # What the networks are and how they see the image
    @property
    def architecture(self):
        return dict(self.data.get("architecture", {}))

    @property
    def locator_architecture(self):
        return dict(self.locator.get("architecture", {}))

    @property
    def locator(self):
        return dict(self.data.get("locator") or {})

    @property
    def voxel_mm(self):
        """The segmenter's grid (isotropic voxels, mm); the box it sees is ``geometry.BRAIN_BOX_MM``."""
        return float(self.data.get("voxel_mm", geometry.MODEL_VOXEL_MM))

    @property
    def locator_voxel_mm(self):
        return float(self.locator.get("voxel_mm", geometry.LOCATOR_VOXEL_MM))

    @property
    def views(self):
        """The segmenter's views of the brain box, as recorded (dicts of ``predictor.View``); () if none."""
        return tuple(dict(v) for v in self.data.get("views", ()))

    @property
    def threshold(self):
        """The probability threshold calibrated for these weights."""
        return float(self.data.get("threshold", 0.5))

    # What the weights are
    @property
    def name(self):
        return self.data.get("name") or "bids_skullstrip U-Net"

    @property
    def sha256(self):
        return self.data.get("sha256")

    @property
    def locator_sha256(self):
        return self.locator.get("sha256")

    @property
    def software_version(self):
        """The bids_skullstrip version that exported the weights."""
        return self.data.get("software_version")

    @property
    def contrasts(self):
        """The image contrasts (BIDS suffixes) the networks were trained on."""
        return tuple(self.data.get("contrasts") or DEFAULT_CONTRASTS)

    @property
    def painted_contrasts(self):
        """Whether the training painted heads with random contrasts from their tissue label maps (any step of the
        lineage, fine-tuned or averaged: ``labels_prob`` > 0), so that the networks are meant for any contrast."""
        def painted(training):
            if not isinstance(training, dict):
                return False
            parents = [training.get("fine_tuned_from") or {}, *(training.get("average_of") or [])]
            return bool(training.get("labels_prob")) or any(painted(p.get("training")) for p in parents)
        return painted(self.data.get("training"))

    @property
    def bundled(self):
        return self.path.parent in {d.resolve() for d in BUNDLED_DIRS}

    def record(self):
        """What an output records of the model that made it (the metrics JSON's ``model``)."""
        return {"name": self.data.get("name"), "sha256": self.sha256, "voxel_mm": self.data.get("voxel_mm"),
                "locator_sha256": self.locator_sha256}


@functools.lru_cache(maxsize=16)
def _load(card_file, segmenter, version):
    """Read once per card file and version (a card rewritten in place, as training does, is read again)."""
    try:
        data = json.loads(card_file.read_text()) if version is not None else {}
    except (OSError, ValueError) as exc:
        raise ModelCardError(f"{card_file}: unreadable model card ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ModelCardError(f"{card_file}: a model card is a JSON object")
    folder = card_file.parent
    locator = (data.get("locator") or {}).get("file", LOCATOR_FILE_NAME)
    return ModelCard(path=card_file, segmenter_file=segmenter or folder / SEGMENTER_FILE_NAME,
                     locator_file=folder / locator, data=data)
