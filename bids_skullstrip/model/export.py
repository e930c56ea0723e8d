"""Export the trained networks to ONNX, the inference format that ships beside the Keras weights.

TensorFlow stays the framework the networks are defined, trained and checked in; ONNX Runtime serves them
(docs/benchmarks.md, "Inference runtime": 0.1 s to import instead of 2.5-5 s). tf2onnx does not follow
Keras 3, and the networks are plain 3D U-Nets (``unet.build_unet``), so the graph is written here from the
Keras layers' weights, each batch normalisation folded into the convolution before it.

    python -m bids_skullstrip.model.export [WEIGHTS_DIR]   # writes unet.onnx + locator.onnx, records them in model.json
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

OPSET = 17
ONNX_SUFFIX = ".onnx"


def onnx_file_name(weights_file_name):
    """``unet.weights.h5`` -> ``unet.onnx``."""
    return weights_file_name.split(".")[0] + ONNX_SUFFIX


def _unet_graph(network, *, base_filters, levels):
    """The ONNX graph of ``unet.build_unet(base_filters=, levels=)`` with the weights of Keras ``network``:
    input ``t1w`` and output ``brain`` are (1, 1, x, y, z) (channels first, as ONNX convolutions are)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, weights = [], []

    def const(name, array):
        weights.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    def conv_bn_relu(x, name):
        kernel = network.get_layer(f"{name.replace('_bn', '_conv')}").get_weights()[0]
        bn = network.get_layer(name)
        gamma, beta, mean, var = bn.get_weights()
        scale = gamma / np.sqrt(var + bn.epsilon)
        w = const(f"{name}_w", np.transpose(kernel, (4, 3, 0, 1, 2)) * scale[:, None, None, None, None])
        b = const(f"{name}_b", beta - mean * scale)
        nodes.append(helper.make_node("Conv", [x, w, b], [f"{name}_conv"], pads=[1] * 6, kernel_shape=[3] * 3))
        nodes.append(helper.make_node("Relu", [f"{name}_conv"], [name]))
        return name

    def block(x, name):
        return conv_bn_relu(conv_bn_relu(x, f"{name}_bn1"), f"{name}_bn2")

    x, skips = "t1w", []
    for level in range(levels - 1):
        x = block(x, f"down{level}")
        skips.append(x)
        nodes.append(helper.make_node("MaxPool", [x], [f"pool{level}"], kernel_shape=[2] * 3, strides=[2] * 3))
        x = f"pool{level}"
    x = block(x, "bottom")
    for level in reversed(range(levels - 1)):
        kernel, bias = network.get_layer(f"up{level}").get_weights()
        w = const(f"up{level}_w", np.transpose(kernel, (4, 3, 0, 1, 2)))  # Keras (k, k, k, out, in)
        nodes.append(helper.make_node("ConvTranspose", [x, w, const(f"up{level}_b", bias)], [f"up{level}"],
                                      kernel_shape=[2] * 3, strides=[2] * 3))
        nodes.append(helper.make_node("Concat", [f"up{level}", skips[level]], [f"skip{level}"], axis=1))
        x = block(f"skip{level}", f"dec{level}")
    kernel, bias = network.get_layer("brain").get_weights()
    w = const("brain_w", np.transpose(kernel, (4, 3, 0, 1, 2)))
    nodes.append(helper.make_node("Conv", [x, w, const("brain_b", bias)], ["logit"], kernel_shape=[1] * 3))
    nodes.append(helper.make_node("Sigmoid", ["logit"], ["brain"]))
    shape = [1, 1, "x", "y", "z"]
    return helper.make_graph(nodes, "skullstrip_unet", [helper.make_tensor_value_info("t1w", TensorProto.FLOAT, shape)],
                             [helper.make_tensor_value_info("brain", TensorProto.FLOAT, shape)], initializer=weights)


def onnx_bytes(network, architecture):
    """The serialized ONNX model of one Keras U-Net (the same bytes for the same weights)."""
    import onnx
    from onnx import helper

    model = helper.make_model(_unet_graph(network, **{"base_filters": 16, "levels": 4, **architecture}),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bids_skullstrip")
    model.ir_version = 8  # read by every ONNX Runtime since 1.10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def export_onnx(weights=None, *, networks=None):
    """Write ``<name>.onnx`` beside each network's ``<name>.weights.h5`` (``weights``: what ``ModelCard.load``
    takes; the bundled ones by default) and record their files and sha256 in the ``onnx`` entries of
    ``model.json`` (top level: the segmenter; under ``locator``: the locator). ``networks``: the Keras
    ``BrainNetworks`` those files hold, if the caller has them (training does), else they are loaded. Returns
    the segmenter's ONNX file."""
    from ..nifti import atomic_file, atomic_write_text
    from .card import ModelCard
    from .inference import load_model

    card = ModelCard.load(weights)
    data, networks = json.loads(card.path.read_text()), networks or load_model(card)
    entries = {"segmenter": (data, card.segmenter_file, networks.segmenter, card.architecture),
               "locator": (data["locator"], card.locator_file, networks.locator, card.locator_architecture)}
    for entry, weights_file, network, architecture in entries.values():
        graph = onnx_bytes(network, architecture)
        target = weights_file.with_name(onnx_file_name(weights_file.name))
        with atomic_file(target) as tmp:
            tmp.write_bytes(graph)
        entry["onnx"] = {"file": target.name, "sha256": hashlib.sha256(graph).hexdigest(), "size_bytes": len(graph),
                         "opset": OPSET}
    atomic_write_text(card.path, json.dumps(data, indent=2) + "\n")
    return card.path.with_name(data["onnx"]["file"])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bids_skullstrip.model.export", description=__doc__.splitlines()[0])
    p.add_argument("weights", nargs="?", type=Path,
                   help="a folder with model.json and the weights files, or its model card (default: the bundled ones)")
    opts = p.parse_args(argv)
    try:
        print(export_onnx(opts.weights))
    except (OSError, KeyError, ValueError) as exc:
        print(f"export: error: {opts.weights or 'bundled weights'}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
