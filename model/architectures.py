"""Pure Keras builders: the seed project's network and MelanoScreen's own CNN."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras
    import numpy as np


def build_seed(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The seed project's network, layer for layer: the baseline to beat.

    Input float32, shape (batch, 180, 180, 3), values 0..255; output softmax over classes.
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Dropout(0.2)(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Dropout(0.2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.25)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="seed")


def _conv_bn(x: keras.KerasTensor, filters: int, *, strides: int = 1,
             name: str) -> keras.KerasTensor:
    from keras import layers

    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def build_melanonet(input_shape: tuple[int, int, int], num_classes: int, *,
                    widths: tuple[int, ...] = (24, 48, 96, 192),
                    dropout: float = 0.3, colour_constancy: bool = False) -> keras.Model:
    """MelanoScreen's CNN: a strided stem, VGG-style BN blocks, global pooling, small head.

    Input float32, shape (batch, H, W, 3), values 0..255 (160x160 in the shipped model); the
    stem and the three pools between blocks leave H/16 x W/16 (10x10). Global average pooling
    keeps it small (0.75 M parameters) and Grad-CAM reads the last block ("last_relu").
    With `colour_constancy` the image's illuminant is divided out first (Shades of Gray), so
    that training and inference see the same normalised colours.
    """
    import keras
    from keras import layers

    from model.layers import ShadesOfGray

    inputs = keras.Input(shape=input_shape, name="image")
    x = ShadesOfGray(name="colour_constancy")(inputs) if colour_constancy else inputs
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(x)
    x = _conv_bn(x, widths[0], strides=2, name="stem")
    for i, width in enumerate(widths):
        x = _conv_bn(x, width, name=f"block{i}a")
        x = _conv_bn(x, width, name=f"block{i}b")
        if i < len(widths) - 1:
            x = layers.MaxPooling2D(name=f"block{i}_pool")(x)
    x = layers.Conv2D(widths[-1] * 2, 1, use_bias=False, name="last_conv")(x)
    x = layers.BatchNormalization(name="last_bn")(x)
    x = layers.ReLU(name="last_relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="melanonet")


def build_melanonet2(input_shape: tuple[int, int, int], num_classes: int, *,
                     widths: tuple[int, ...] = (20, 40, 80, 160),
                     dropout: float = 0.3) -> keras.Model:
    """One member of the v2 ensemble: MelanoNet, narrower, behind Shades of Gray colour constancy.

    Input float32, shape (batch, H, W, 3), values 0..255; 0.52 M parameters, 0.7x v1's
    multiply-adds, so that three members cost about 2.1x v1's forward pass.
    """
    return build_melanonet(input_shape, num_classes, widths=widths, dropout=dropout,
                           colour_constancy=True)


def build_melanonet_cc(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """MelanoNet v1's widths behind Shades of Gray colour constancy (0.75 M parameters)."""
    return build_melanonet(input_shape, num_classes, colour_constancy=True)


def build_mobilenet(input_shape: tuple[int, int, int], num_classes: int, *,
                    dropout: float = 0.2, colour_constancy: bool = False) -> keras.Model:
    """MobileNetV1-1.0 (Howard et al., 2017), meant to start from ImageNet weights
    (`model.pretrained`), with global pooling and a nine-class head.

    Input float32, shape (batch, H, W, 3), values 0..255 (160x160 in the shipped model); the
    network rescales to -1..1 as its ImageNet training did. 3.2 M parameters; the layers keep
    Keras's MobileNet names, which the weight conversion and Grad-CAM ("conv_pw_13_relu") use.
    With `colour_constancy` each image's illuminant is divided out first (Shades of Gray, no
    weights), so a dermatoscope's light or a camera's white balance reaches the filters as grey.
    """
    import keras
    from keras import layers

    from model.layers import ShadesOfGray

    inputs = keras.Input(shape=input_shape, name="image")
    x = ShadesOfGray(name="colour_constancy")(inputs) if colour_constancy else inputs
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(x)
    backbone = keras.applications.MobileNet(input_tensor=x, include_top=False, weights=None)
    x = layers.GlobalAveragePooling2D(name="pool")(backbone.output)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="mobilenet")


def build_mobilenet_cc(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """`build_mobilenet` behind Shades of Gray colour constancy; the same ImageNet weights fit."""
    return build_mobilenet(input_shape, num_classes, colour_constancy=True)


#: MobileNetV1's depthwise-separable blocks (`conv_dw_i` and `conv_pw_i`, i = 1..13).
MOBILENET_BLOCKS = 13
#: The architectures built on those blocks: MobileNet's ImageNet weights fit them, and
#: `freeze_leading_blocks` applies to them.
MOBILENET_ARCHITECTURES = ("mobilenet", "mobilenet-cc")


def freeze_leading_blocks(model: keras.Model, blocks: int) -> int:
    """Keep a `build_mobilenet` network's stem and its first `blocks` depthwise-separable blocks
    as they are (their ImageNet weights); return how many layers with weights were frozen.

    Frozen batch normalisation runs in inference mode, on its ImageNet statistics. The early
    blocks see edges, colour blobs and textures at full resolution: frozen, they cannot learn the
    look of one camera, and training skips most of their backward pass.
    """
    pattern = re.compile(r"conv1(_bn)?|conv_(dw|pw)_(\d+)(_bn)?")
    frozen = 0
    for layer in model.layers:
        match = pattern.fullmatch(layer.name)
        if match and (match.group(3) is None or int(match.group(3)) <= blocks) and layer.weights:
            layer.trainable = False
            frozen += 1
    if blocks and not frozen:
        raise ValueError("--freeze-blocks: the network has no MobileNet blocks "
                         "(it applies to --arch mobilenet only)")
    return frozen


#: EfficientNet-Lite0's blocks (Tan and Le, 2019; the "lite" variant for mobile CPUs): per
#: stage, (repeats, kernel, first stride, expansion, output channels).
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


def build_efficientnet_lite0(input_shape: tuple[int, int, int], num_classes: int, *,
                             dropout: float = 0.2) -> keras.Model:
    """EfficientNet-Lite0, meant to start from ImageNet weights (`model.pretrained`), with
    global pooling and a nine-class head.

    The lite variant of EfficientNet-B0: no squeeze-and-excitation, ReLU6 instead of swish, a
    32-channel stem and a 1,280-channel head; 3.4 M parameters before the head. Input float32,
    shape (batch, H, W, 3), values 0..255; the network rescales to (x - 127) / 128 as its
    ImageNet training did. Padding is TensorFlow's "same" (the extra row and column of a
    stride-2 convolution at the bottom and right), which the ImageNet weights were trained with.
    Layers are named `stem_*`, `block{i}_*` (0..15) and `head_*`; Grad-CAM reads "head_relu".
    """
    import keras
    from keras import layers

    def batch_norm(name: str) -> layers.BatchNormalization:
        return layers.BatchNormalization(epsilon=1e-3, momentum=0.99, name=name)

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="rescale")(inputs)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.ReLU(6.0, name="stem_relu")(batch_norm("stem_bn")(x))
    channels, block = 32, 0
    for repeats, kernel, first_stride, expansion, out in LITE0_STAGES:
        for r in range(repeats):
            stride, name, shortcut = (first_stride if r == 0 else 1), f"block{block}", x
            if expansion != 1:
                x = layers.Conv2D(channels * expansion, 1, use_bias=False,
                                  name=f"{name}_expand")(x)
                x = layers.ReLU(6.0, name=f"{name}_expand_relu")(batch_norm(f"{name}_expand_bn")(x))
            x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                       name=f"{name}_dwconv")(x)
            x = layers.ReLU(6.0, name=f"{name}_dw_relu")(batch_norm(f"{name}_dw_bn")(x))
            x = layers.Conv2D(out, 1, use_bias=False, name=f"{name}_project")(x)
            x = batch_norm(f"{name}_project_bn")(x)
            if stride == 1 and channels == out:
                x = layers.Add(name=f"{name}_add")([shortcut, x])
            channels, block = out, block + 1
    x = layers.Conv2D(1280, 1, use_bias=False, name="head_conv")(x)
    x = layers.ReLU(6.0, name="head_relu")(batch_norm("head_bn")(x))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="efficientnet_lite0")


#: The layers whose pooled activations `scope_features` measures, where the rule below does not
#: apply: colour and texture (blocks 3 and 5) and lesion structure (block 13); 1,408 features,
#: a 7.9 MB whitening matrix.
SCOPE_LAYERS: dict[str, tuple[str, ...]] = {
    "mobilenet": ("conv_pw_3_relu", "conv_pw_5_relu", "conv_pw_13_relu"),
    "efficientnet_lite0": ("block2_add", "block4_add", "head_relu")}


def scope_features(network: keras.Model) -> keras.Model:
    """The features the scope distance measures: each block's activations, averaged over space.

    Input as the network's; output float32, shape (batch, sum of the blocks' channels). Early
    blocks see colour and texture statistics (a scanned page is far from skin there even when
    the last block cannot tell), the last block sees lesion structure.
    """
    import keras
    from keras import layers

    names = list(SCOPE_LAYERS.get(network.name) or (
        layer.name for layer in network.layers
        if layer.name.endswith("b_relu") or layer.name == "last_relu"))
    pooled = [layers.GlobalAveragePooling2D(name=f"scope_pool_{name}")(network.get_layer(name).output)
              for name in names]
    features = layers.Concatenate(name="scope_features")(pooled) if len(pooled) > 1 else pooled[0]
    return keras.Model(network.input, features, name=f"{network.name}_scope_features")


def build_ensemble(members: list[keras.Model], temperature: float = 1.0,
                   scope: list[tuple[np.ndarray, np.ndarray]] | None = None) -> keras.Model:
    """One model that averages the members' temperature-scaled probabilities.

    Input float32, shape (batch, H, W, 3), values 0..255. Output: probabilities, shape
    (batch, classes); with `scope` (feature mean and whitening matrix of the first len(scope)
    members, see `model.scope`) also `scope_distance`, shape (batch,): those members' mean
    Mahalanobis distance of the image's `scope_features` from the training images'.
    """
    import keras
    from keras import layers

    from model.layers import MahalanobisDistance, TemperatureScaling

    inputs = keras.Input(shape=members[0].input_shape[1:], name="image")
    probabilities, distances = [], []
    for i, member in enumerate(members):
        if scope is None or i >= len(scope):
            # Wrapped under a name of its own: members of one architecture share theirs.
            named = keras.Model(member.input, member.output, name=f"member_{i}")
            probabilities.append(TemperatureScaling(temperature, name=f"temperature_{i}")(
                named(inputs)))
            continue
        both = keras.Model(member.input, [member.output, scope_features(member).output],
                           name=f"member_{i}")
        p, features = both(inputs)
        probabilities.append(TemperatureScaling(temperature, name=f"temperature_{i}")(p))
        mean, whitening = scope[i]
        measure = MahalanobisDistance(int(mean.shape[0]), name=f"scope_{i}")
        distances.append(measure(features))
        measure.set_weights([mean, whitening])
    averaged = (layers.Average(name="probabilities")(probabilities) if len(probabilities) > 1
                else probabilities[0])
    if not distances:
        return keras.Model(inputs, averaged, name="ensemble")
    distance = (layers.Average(name="scope_distance")(distances) if len(distances) > 1
                else distances[0])
    return keras.Model(inputs, [averaged, distance], name="ensemble")


#: Selectable by `melanoscreen train --arch NAME`.
ARCHITECTURES: dict[str, Callable[..., keras.Model]] = {
    "seed": build_seed,
    "melanonet": build_melanonet,
    "melanonet2": build_melanonet2,
    "melanonet-cc": build_melanonet_cc,
    "mobilenet": build_mobilenet,
    "mobilenet-cc": build_mobilenet_cc,
    "efficientnet-lite0": build_efficientnet_lite0,
}
#: Input size (height, width) each architecture trains at by default.
DEFAULT_INPUT_SIZE: dict[str, tuple[int, int]] = {
    "seed": (180, 180), "melanonet": (160, 160), "melanonet2": (160, 160),
    "melanonet-cc": (160, 160), "mobilenet": (160, 160), "mobilenet-cc": (160, 160),
    "efficientnet-lite0": (160, 160)}
#: The layer Grad-CAM reads, per architecture (others: their last Conv2D).
GRADCAM_LAYER: dict[str, str] = {"melanonet": "last_relu", "melanonet2": "last_relu",
                                 "melanonet-cc": "last_relu", "mobilenet": "conv_pw_13_relu",
                                 "mobilenet-cc": "conv_pw_13_relu",
                                 "efficientnet-lite0": "head_relu"}


def count_flops(model: keras.Model) -> int:
    """Multiply-adds x 2 of one forward pass for one image (conv and dense layers)."""
    import keras
    from keras import layers

    flops = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):  # an ensemble's member
            flops += count_flops(layer)
        elif isinstance(layer, layers.DepthwiseConv2D):
            _, h, w, c_out = layer.output.shape
            k_h, k_w = layer.kernel_size
            flops += 2 * h * w * c_out * k_h * k_w
        elif isinstance(layer, layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            k_h, k_w = layer.kernel_size
            c_in = layer.input.shape[-1]
            flops += 2 * h * w * c_out * k_h * k_w * c_in
        elif isinstance(layer, layers.Dense):
            flops += 2 * layer.input.shape[-1] * layer.units
    return int(flops)
