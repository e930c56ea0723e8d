"""Run the bundled network: a model-grid volume in, a brain probability map out."""

import contextlib
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "unet.weights.h5"
CARD_FILE = WEIGHTS_DIR / "model.json"
# The locator's weights lie beside the segmenter's, under this name (the ``file`` of model.json's ``locator``).
LOCATOR_FILE_NAME = "locator.weights.h5"


def normalize(volume, *, hi_scale=1.0):
    """Map intensities to ~[0, 1]: 0.5th percentile -> 0, 99.5th of the non-background -> 1."""
    sample = volume[::2, ::2, ::2]
    lo = np.percentile(sample, 0.5)
    above = sample[sample > lo]
    if above.size == 0:
        return np.zeros_like(volume, dtype=np.float32)
    hi = np.percentile(above, 99.5) * hi_scale
    scale = hi - lo if hi > lo else 1.0
    return np.clip((volume - lo) / scale, 0.0, 2.0).astype(np.float32)


@contextlib.contextmanager
def _native_stderr_silenced():
    """TensorFlow's C++ start-up notices (absl, oneDNN) bypass Python logging and TF_CPP_MIN_LOG_LEVEL."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# TensorFlow imports Keras, and Keras imports these when they are installed, for plotting, scikit-learn
# wrappers and DataFrame inputs that the network never uses (each import is guarded by
# ``except ImportError``): about 1 s of every process start that runs the network.
UNUSED_BY_KERAS_HERE = ("matplotlib", "sklearn", "pandas")


@contextlib.contextmanager
def _hidden_modules(names):
    """Make ``import name`` fail inside the block unless ``name`` is already imported."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, "") is None:
                del sys.modules[name]


def import_tensorflow(threads=None):
    """Import TensorFlow quietly; ``threads`` caps its intra-op threads (if TF has not run yet)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX-512 VNNI or newer; without
    # them 3D convolutions fall back to Eigen: on this project's AVX2 machine, inference 2.4x and a
    # training step 5x slower (measured side by side).
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    with _native_stderr_silenced(), _hidden_modules(UNUSED_BY_KERAS_HERE):
        import tensorflow as tf

        tf.constant(0.0) + 1.0  # the second start-up notice comes with the first op
    if threads:
        with contextlib.suppress(RuntimeError):
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def model_card(weights=None):
    """The ``model.json`` beside ``weights`` (the bundled ones by default); {} if there is none."""
    card_file = Path(weights).with_name("model.json") if weights else CARD_FILE
    return json.loads(card_file.read_text()) if card_file.exists() else {}


def default_threshold(weights=None):
    """The probability threshold calibrated for ``weights`` (the bundled ones by default)."""
    return float(model_card(weights).get("threshold", 0.5))


@dataclass(frozen=True)
class BrainNetworks:
    """The two stages: ``locator`` finds the brain in the whole field of view on a coarse grid,
    ``segmenter`` draws its boundary on a fine grid centred on it. Any callable (batch volume ->
    batch probability) will do, which is how tests use stand-ins."""

    locator: object
    segmenter: object

    @classmethod
    def of(cls, model):
        """``model`` as two stages: a ``BrainNetworks`` as it is, a single callable for both."""
        return model if isinstance(model, cls) else cls(model, model)


def _build(architecture, weights):
    from .unet import build_unet

    network = build_unet(**architecture)
    network.load_weights(str(weights))
    return network


@functools.lru_cache(maxsize=4)
def load_model(weights=None):
    """The two networks, their weights from the segmenter's ``weights`` file and the locator's beside it
    (the bundled ones by default). Cached per process."""
    import_tensorflow()
    weights = Path(weights or WEIGHTS_FILE)
    card = model_card(weights)
    locator = weights.with_name((card.get("locator") or {}).get("file", LOCATOR_FILE_NAME))
    if "locator" not in card or not locator.is_file():
        raise FileNotFoundError(f"{weights}: no locator beside these weights ({locator.name} and the 'locator' entry "
                                "of model.json): single-stage weights of earlier versions do not load; export "
                                "both networks with bids_skullstrip-train")
    return BrainNetworks(locator=_build(card["locator"]["architecture"], locator),
                         segmenter=_build(card.get("architecture", {}), weights))


def prepare_network(threads=None):
    """Import TensorFlow, build the bundled network and trace its graph: most of a cold start, which a
    caller can run in a thread while it reads the image (and join before it uses the network)."""
    import_tensorflow(threads)
    networks = load_model()
    _forward(networks.locator).get_concrete_function()
    _forward(networks.segmenter).get_concrete_function()


@functools.lru_cache(maxsize=4)
def _graph_forward(model):
    """The network as one TensorFlow graph for any volume size (traced once per process).

    Eager Keras keeps every intermediate feature map alive until the output exists; a graph lets
    TensorFlow free them as it goes: peak memory 1.2 GB instead of 2.6 GB on a 96x120x128 grid, and
    faster (measured side by side in one run).
    """
    tf = import_tensorflow()
    spec = tf.TensorSpec([1, None, None, None, 1], tf.float32)
    return tf.function(lambda x: model(x, training=False), input_signature=[spec])


def _forward(model):
    import keras

    if isinstance(model, keras.Model):
        return _graph_forward(model)
    return lambda x: model(x, training=False)  # stand-ins used by tests


def predict_probability(volume, network):
    """Brain probability (float32, same shape) of one network for a volume on its grid."""
    x = normalize(volume)[None, ..., None]
    return np.asarray(_forward(network)(x))[0, ..., 0].astype(np.float32, copy=False)
