"""The network: a small 3D U-Net sized for CPU inference on a 2 mm grid."""

import keras
from keras import layers


def _conv_block(x, filters, name, dtype):
    for i in (1, 2):
        x = layers.Conv3D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}", dtype=dtype)(x)
        x = layers.BatchNormalization(name=f"{name}_bn{i}", dtype=dtype)(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}", dtype=dtype)(x)
    return x


def build_unet(*, base_filters=16, levels=4, dtype=None):
    """Return a fully convolutional 3D U-Net: (batch, x, y, z, 1) image -> brain probability.

    Spatial sizes must be divisible by ``2 ** (levels - 1)``. ``dtype``: the Keras dtype policy of every layer
    but the output, which stays float32 (e.g. "mixed_bfloat16" for training; its weights are float32 either
    way, so they load into the default float32 network).
    """
    inputs = keras.Input(shape=(None, None, None, 1), name="t1w")
    skips = []
    x = inputs
    for level in range(levels - 1):
        x = _conv_block(x, base_filters * 2**level, f"down{level}", dtype)
        skips.append(x)
        x = layers.MaxPooling3D(2, name=f"pool{level}", dtype=dtype)(x)
    x = _conv_block(x, base_filters * 2 ** (levels - 1), "bottom", dtype)
    for level in reversed(range(levels - 1)):
        x = layers.Conv3DTranspose(base_filters * 2**level, 2, strides=2, name=f"up{level}", dtype=dtype)(x)
        x = layers.Concatenate(name=f"skip{level}", dtype=dtype)([x, skips[level]])
        x = _conv_block(x, base_filters * 2**level, f"dec{level}", dtype)
    outputs = layers.Conv3D(1, 1, activation="sigmoid", dtype="float32", name="brain")(x)
    return keras.Model(inputs, outputs, name="skullstrip_unet")
