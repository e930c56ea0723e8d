"""Run the bundled network: a model-grid volume in, a brain probability map out."""

import functools
import hashlib
import importlib.util
import logging
import sys
import threading
import warnings
from dataclasses import dataclass

import numpy as np

from .card import (LOCATOR_FILE_NAME, SEGMENTER_FILE_NAME, WEIGHTS_DIR, ModelCard,  # noqa: F401
                   ModelCardError)
from .tf_runtime import import_tensorflow

WEIGHTS_FILE = WEIGHTS_DIR / SEGMENTER_FILE_NAME


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


def model_card(weights=None):
    """The model card of ``weights`` (the bundled ones by default; see ``ModelCard.load``) as a dict; {} if
    there is none."""
    return ModelCard.load(weights).data


def default_threshold(weights=None):
    """The probability threshold calibrated for ``weights`` (the bundled ones by default)."""
    return ModelCard.load(weights).threshold


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
    try:
        with warnings.catch_warnings(record=True) as said:  # one per layer before the error, said again on success
            warnings.simplefilter("always")
            network.load_weights(str(weights))
    except ValueError:  # Keras' message lists every layer and its weights (hundreds of lines)
        raise ModelCardError(f"{weights}: these weights are not of the architecture their model.json describes "
                             f"({', '.join(f'{k} {v}' for k, v in architecture.items())}): use the model.json "
                             "exported with them") from None
    except OSError as exc:  # h5py's own words for a truncated or foreign file name no file
        raise ModelCardError(f"{weights}: unreadable weights file ({' '.join(str(exc).split())[:200]})") from None
    for warning in said:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return network


def load_model(weights=None):
    """The two networks of ``weights`` (a ``ModelCard``, or what ``ModelCard.load`` takes: the bundled ones by
    default). Cached per process and per card, however its path is spelled."""
    return _load_model(weights if isinstance(weights, ModelCard) else ModelCard.load(weights))


@functools.lru_cache(maxsize=4)
def _load_model(card):
    import_tensorflow(_threads)
    weights, locator = card.segmenter_file, card.locator_file
    if not card.path.is_file():
        raise ModelCardError(f"{weights}: no {card.path.name} beside these weights: the networks' card "
                             "(architecture, locator, threshold), which bids_skullstrip-train exports with them, "
                             "is needed to load them")
    if not card.locator or not locator.is_file():
        raise FileNotFoundError(f"{weights}: no locator beside these weights ({locator.name} and the 'locator' entry "
                                "of model.json): single-stage weights of earlier versions do not load; export "
                                "both networks with bids_skullstrip-train")
    return BrainNetworks(locator=_build(card.locator_architecture, locator),
                         segmenter=_build(card.architecture, weights))


# Inference runs the networks' ONNX export (``export.export_onnx``) with OpenVINO: the same probabilities as
# TensorFlow to 1e-5 at the same speed, imported in 0.1 s instead of 2.5-5 s, 180 MB installed instead of 1.3 GB
# (docs/benchmarks.md, "Inference runtime"). "tensorflow" runs the Keras networks themselves, as training and
# the tests' reference do.
RUNTIMES = ("openvino", "tensorflow")
DEFAULT_RUNTIME = "openvino"
_threads = None
log = logging.getLogger(__name__)


def set_threads(threads):
    """Cap the CPU threads of the networks loaded from now on (and of TensorFlow, if it has not run yet)."""
    global _threads
    _threads = int(threads) if threads else None


def _import_openvino():
    """``openvino`` without its model converter, which ``import openvino`` loads to send a usage event to Google
    Analytics unless the user opted out (OpenVINO's telemetry; on a machine whose home folder is missing, as in a
    container run as another user, it also prints "Failed to find location of the openvino_telemetry file"). The
    runtime needs none of it; a later ``import openvino.tools.ovc`` by the caller's own code still works."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    sys.modules["openvino.tools.ovc"] = None  # openvino/__init__ imports it in a try: the ImportError is skipped
    try:
        import openvino
    finally:
        del sys.modules["openvino.tools.ovc"]
    return openvino


class OnnxNetwork:
    """One exported network compiled by OpenVINO; called like a Keras model: (1, x, y, z, 1) in and out."""

    def __init__(self, path, threads=None):
        openvino = _import_openvino()
        self.network = openvino.Core().compile_model(str(path), "CPU", {
            "INFERENCE_NUM_THREADS": threads or 0,  # 0: one per core
            "PERFORMANCE_HINT": "LATENCY",
            # float32 everywhere: on CPUs with bfloat16 units OpenVINO would use them, and the probabilities
            # would differ from TensorFlow's by up to 0.02 (the masks then depend on the machine)
            "INFERENCE_PRECISION_HINT": "f32",
            "ENABLE_CPU_PINNING": False,  # the participant level runs several of these processes on shared cores
        })

        self._requests = threading.local()

    def __call__(self, x, training=False):
        x = np.asarray(x, np.float32)
        request = getattr(self._requests, "request", None)
        if request is None:  # one per thread: the compiled model's own request serves one call at a time ("busy")
            request = self._requests.request = self.network.create_infer_request()
        out = request.infer([x.reshape(1, 1, *x.shape[1:4])])[0]
        if out.size < x.size:  # a larger output that cannot be allocated (`ulimit -v`): the last one, no error
            raise MemoryError(f"Unable to allocate the network's output of {x.size} values (it returned {out.size})")
        return out.reshape(x.shape)


def _checked_onnx(folder, entry):
    """The ONNX file that ``entry`` (a model.json ``onnx`` record) names in ``folder``, if it is there and its
    sha256 is the recorded one; else None."""
    path = folder / entry["file"] if entry else None
    if path is None or not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != entry.get("sha256"):
        return None
    return path


def load_networks(weights=None, *, runtime=None, threads=None):
    """The two networks of ``weights`` (as ``load_model`` takes them) as inference runs them: their ONNX exports
    compiled by OpenVINO, or, with ``runtime="tensorflow"`` or where an export is missing or does not match its
    checksum in model.json (a warning then says so), the Keras networks in TensorFlow (a ``ModelCardError``
    where TensorFlow is not installed: inference needs only OpenVINO). Cached like ``load_model``."""
    card = weights if isinstance(weights, ModelCard) else ModelCard.load(weights)
    return _load_networks(card, runtime or DEFAULT_RUNTIME, threads or _threads)


@functools.lru_cache(maxsize=4)
def _load_networks(card, runtime, threads):
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}: one of {', '.join(RUNTIMES)}")
    if runtime == "openvino":
        folder = card.path.parent
        files = [_checked_onnx(folder, card.locator.get("onnx")), _checked_onnx(folder, card.data.get("onnx"))]
        # the exports are those of the folder's own segmenter: weights named in another file are not exported
        if all(files) and card.segmenter_file == folder / SEGMENTER_FILE_NAME:
            return BrainNetworks(*(OnnxNetwork(f, threads) for f in files))
        missing = f"{card.segmenter_file}: no ONNX export matching model.json beside these weights"
        if importlib.util.find_spec("tensorflow") is None:
            raise ModelCardError(f"{missing}, and no TensorFlow to run the Keras weights instead: pip install "
                                 "'bids_skullstrip[train]', then python -m bids_skullstrip.model.export "
                                 f"{card.path.parent}")
        log.warning("%s (python -m bids_skullstrip.model.export writes it): the networks run in TensorFlow, "
                    "seconds slower", missing)
    set_threads(threads)
    return load_model(card)


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
    keras = sys.modules.get("keras")  # a Keras model exists only once Keras is imported
    if keras is not None and isinstance(model, keras.Model):
        return _graph_forward(model)
    return lambda x: model(x, training=False)  # ONNX networks, and stand-ins used by tests


def predict_probability(volume, network):
    """Brain probability (float32, same shape) of one network for a volume on its grid."""
    x = normalize(volume)[None, ..., None]
    return np.asarray(_forward(network)(x))[0, ..., 0].astype(np.float32, copy=False)
