"""Grad-CAM: where in the image the network looked for its melanoma probability."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from model.architectures import GRADCAM_LAYER
from model.inference import Classifier


def _networks(model: Any) -> list[Any]:
    """The CNNs inside a model: an ensemble's members, or the model itself."""
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return nested or [model]


def _cam(network: Any, layer_name: str | None, batch: Any, class_index: int) -> np.ndarray:
    """One network's class activation map, shape (h, w) of the chosen layer, 0..1."""
    import keras
    import tensorflow as tf

    names = {layer.name for layer in network.layers}
    if layer_name is None or layer_name not in names:
        conv = [layer for layer in network.layers if isinstance(layer, keras.layers.Conv2D)]
        layer_name = conv[-1].name
    output = network.output[0] if isinstance(network.output, (list, tuple)) else network.output
    grad_model = keras.Model(network.inputs, [network.get_layer(layer_name).output, output])
    with tf.GradientTape() as tape:
        features, predictions = grad_model(batch, training=False)
        score = predictions[:, class_index]
    grads = tape.gradient(score, features)
    weights = tf.reduce_mean(grads, axis=(1, 2))  # (1, channels)
    cam = tf.nn.relu(tf.reduce_sum(features * weights[:, tf.newaxis, tf.newaxis, :], axis=-1))[0]
    cam_np = np.asarray(cam)
    return cam_np / cam_np.max() if cam_np.max() > 0 else cam_np


def gradcam_heatmap(classifier: Classifier, image: np.ndarray, class_index: int) -> np.ndarray:
    """Heatmap in 0..1, shape (H, W) of the model input, for one float32 image (H, W, 3).

    For an ensemble, the members' maps are averaged (each from its own last block).
    """
    import tensorflow as tf

    batch = tf.constant(image[np.newaxis].astype(np.float32))
    layer_name = GRADCAM_LAYER.get(classifier.card.architecture)
    cams = [_cam(network, layer_name, batch, class_index)
            for network in _networks(classifier.model)]
    cam = np.mean(cams, axis=0)
    if cam.max() > 0:
        cam = cam / cam.max()
    height, width = image.shape[:2]
    resized = Image.fromarray((cam * 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


def overlay_png(classifier: Classifier, source: Any, class_name: str = "melanoma",
                alpha: float = 0.4) -> bytes:
    """PNG bytes: the decoded image with its Grad-CAM heatmap blended on top (jet colormap)."""
    from matplotlib import colormaps

    image = classifier.decode(source)
    heatmap = gradcam_heatmap(classifier, image, classifier.classes.index(class_name))
    colours = colormaps["jet"](heatmap)[..., :3].astype(np.float32) * 255.0  # (H, W, 3)
    blended = (1 - alpha) * image + alpha * colours
    out = io.BytesIO()
    Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()
