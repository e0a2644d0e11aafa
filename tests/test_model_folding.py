"""Batch normalisation folded into convolutions: the same function, fewer operations, and the
trained model left as it was."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import layers

from model.card import shipped_model_path
from model.folding import fold_batch_norm, foldable_pairs
from model.inference import Classifier
from model.layers import TemperatureScaling


def _network() -> keras.Model:
    """Every kind of pair: foldable ones (a bias-free convolution, a depthwise one with a depth
    multiplier and a bias, a normalisation without scale or centre) and ones that must stay (a
    convolution with its own activation, one whose output a second branch also reads)."""
    inputs = keras.Input((12, 12, 3), name="image")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)
    x = layers.BatchNormalization(center=False, scale=False, name="dw_bn")(x)
    x = layers.Conv2D(8, 1, activation="relu", name="activated")(x)
    x = layers.BatchNormalization(name="activated_bn")(x)
    shared = layers.Conv2D(8, 1, name="shared")(x)
    branch = layers.BatchNormalization(name="shared_bn")(shared)
    x = layers.Add(name="join")([branch, shared])
    pooled = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(4, activation="softmax", name="probabilities")(pooled)
    network = keras.Model(inputs, outputs, name="member_0")
    rng = np.random.default_rng(4)
    for layer in network.layers:  # trained-looking statistics, not the identity of a new layer
        layer.set_weights([rng.normal(0.0, 0.5, w.shape).astype(np.float32)
                           if "variance" not in w.path else rng.uniform(0.2, 3.0, w.shape)
                           .astype(np.float32) for w in layer.weights])
    return network


def test_folding_keeps_the_function_and_removes_only_the_foldable_normalisations() -> None:
    network = _network()
    assert sorted(foldable_pairs(network)) == ["dw", "stem"]
    image = keras.Input((12, 12, 3), name="image")
    model = keras.Model(image, TemperatureScaling(0.7, name="temperature_0")(network(image)))

    folded = fold_batch_norm(model)
    images = np.random.default_rng(5).uniform(0, 255, (6, 12, 12, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(folded(images, training=False)),
                               np.asarray(model(images, training=False)), rtol=1e-4, atol=1e-6)
    inner = folded.get_layer("member_0")
    norms = sorted(layer.name for layer in inner.layers
                   if isinstance(layer, layers.BatchNormalization))
    assert norms == ["activated_bn", "shared_bn"]
    assert inner.get_layer("stem").use_bias and inner.get_layer("dw").use_bias
    # The trained network is untouched: its layers still have one output each (Grad-CAM reads
    # them), its normalisations and bias-free kernels as they were.
    assert network.get_layer("stem_relu").output.shape == (None, 12, 12, 8)
    assert not network.get_layer("stem").use_bias
    assert isinstance(network.get_layer("stem_bn"), layers.BatchNormalization)


def test_the_shipped_model_predicts_the_same_with_its_normalisations_folded(
        tmp_path: Path) -> None:
    """The service's forward pass (folded) against the saved network as trained."""
    classifier = Classifier(shipped_model_path())
    height, width = classifier.input_size
    images = np.random.default_rng(6).uniform(0, 255, (4, height, width, 3)).astype(np.float32)
    probabilities, distances = classifier.predict_arrays_scoped(images)
    expected, expected_distances = classifier.model(images, training=False)
    np.testing.assert_allclose(probabilities, np.asarray(expected), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(distances, np.asarray(expected_distances), rtol=1e-4)
    assert not any(isinstance(layer, layers.BatchNormalization)
                   for layer in fold_batch_norm(classifier.model).get_layer("member_0").layers)
