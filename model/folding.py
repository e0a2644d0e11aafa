"""Batch normalisation folded into the convolution before it, for inference.

At inference a batch-normalisation layer is a fixed affine map per channel: y = s * x + b with
s = gamma / sqrt(variance + epsilon) and b = beta - s * mean. After a convolution without an
activation, it can be moved into that convolution's kernel and bias, which removes two passes
over every activation tensor (a multiply and an add) from the forward pass. The result computes
the same function up to float rounding; it is never saved or trained: the `.keras` file keeps
the network as trained.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import keras
import numpy as np


class _Passthrough(keras.layers.Layer):
    """Stands where a folded batch normalisation stood: its output is its input."""

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        return inputs


def _producers(arguments: Any) -> Iterator[str]:
    """The names of the layers whose outputs a layer's serialised call arguments name."""
    if isinstance(arguments, dict):
        if arguments.get("class_name") == "__keras_tensor__":
            yield arguments["config"]["keras_history"][0]
        else:
            for value in arguments.values():
                yield from _producers(value)
    elif isinstance(arguments, (list, tuple)):
        for value in arguments:
            yield from _producers(value)


def foldable_pairs(model: keras.Model) -> dict[str, keras.layers.BatchNormalization]:
    """Convolution name -> the batch normalisation it alone feeds, for every pair that folds:
    a Conv2D or DepthwiseConv2D (channels last, no activation) whose output nothing else reads,
    into a batch normalisation over the channel axis."""
    layers = {layer.name: layer for layer in model.layers}
    readers: dict[str, int] = {}
    inputs_of: dict[str, list[str]] = {}
    for entry in model.get_config()["layers"]:
        names = list(_producers(entry.get("inbound_nodes", [])))
        inputs_of[entry["name"]] = names
        for name in names:
            readers[name] = readers.get(name, 0) + 1
    pairs: dict[str, keras.layers.BatchNormalization] = {}
    for name, layer in layers.items():
        if not isinstance(layer, keras.layers.BatchNormalization) or len(inputs_of[name]) != 1:
            continue
        source = layers.get(inputs_of[name][0])
        if (isinstance(source, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))
                and not isinstance(source, keras.layers.Conv2DTranspose)
                and source.data_format == "channels_last"
                and source.activation is keras.activations.linear
                and layer.axis in (-1, 3)
                and readers.get(source.name) == 1
                and len(source.weights) == (2 if source.use_bias else 1)):
            pairs[source.name] = layer
    return pairs


def _folded_weights(conv: Any, norm: Any) -> tuple[np.ndarray, np.ndarray]:
    """The kernel and bias of `conv` followed by `norm` (in inference mode) as one layer."""
    mean = np.asarray(norm.moving_mean, np.float64)
    variance = np.asarray(norm.moving_variance, np.float64)
    gamma = np.asarray(norm.gamma, np.float64) if norm.scale else np.ones_like(mean)
    beta = np.asarray(norm.beta, np.float64) if norm.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(variance + norm.epsilon)
    weights = conv.get_weights()
    kernel = np.asarray(weights[0], np.float64)
    bias = np.asarray(weights[1], np.float64) if conv.use_bias else np.zeros_like(mean)
    if isinstance(conv, keras.layers.DepthwiseConv2D):
        # Output channel c * multiplier + m comes from input channel c's m-th filter.
        kernel = kernel * scale.reshape(1, 1, kernel.shape[2], kernel.shape[3])
    else:
        kernel = kernel * scale
    return kernel.astype(np.float32), (scale * (bias - mean) + beta).astype(np.float32)


def fold_batch_norm(model: keras.Model) -> keras.Model:
    """A copy of `model` (nested models included) with every foldable batch normalisation
    (`foldable_pairs`) moved into its convolution; every other layer is copied as it is, with its
    weights. The original model is left untouched (no layer of it is called again)."""
    pairs = foldable_pairs(model)
    folded_norms = {norm.name for norm in pairs.values()}
    originals = {layer.name: layer for layer in model.layers}

    def clone(layer: Any) -> Any:
        if isinstance(layer, keras.Model):
            return fold_batch_norm(layer)
        if layer.name in folded_norms:
            return _Passthrough(name=layer.name)
        config = layer.get_config()
        if layer.name in pairs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in copy.layers:
        original = originals[layer.name]
        if isinstance(layer, keras.Model) or layer.name in folded_norms:
            continue
        if layer.name in pairs:
            layer.set_weights(list(_folded_weights(original, pairs[layer.name])))
        else:
            layer.set_weights(original.get_weights())
    return copy
