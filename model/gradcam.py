"""Grad-CAM: where in the image the network looked for its melanoma probability."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from model.architectures import GRADCAM_LAYER
from model.inference import Classifier


def gradcam_heatmap(classifier: Classifier, image: np.ndarray, class_index: int) -> np.ndarray:
    """Heatmap in 0..1, shape (H, W) of the model input, for one float32 image (H, W, 3)."""
    import keras
    import tensorflow as tf

    model = classifier.model
    layer_name = GRADCAM_LAYER.get(classifier.card.architecture)
    if layer_name is None or layer_name not in {layer.name for layer in model.layers}:
        conv = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
        layer_name = conv[-1].name
    grad_model = keras.Model(model.inputs, [model.get_layer(layer_name).output, model.output])
    batch = tf.constant(image[np.newaxis].astype(np.float32))
    with tf.GradientTape() as tape:
        features, predictions = grad_model(batch, training=False)
        score = predictions[:, class_index]
    grads = tape.gradient(score, features)
    weights = tf.reduce_mean(grads, axis=(1, 2))  # (1, channels)
    cam = tf.nn.relu(tf.reduce_sum(features * weights[:, tf.newaxis, tf.newaxis, :], axis=-1))[0]
    cam_np = cam.numpy()
    if cam_np.max() > 0:
        cam_np = cam_np / cam_np.max()
    height, width = image.shape[:2]
    resized = Image.fromarray((cam_np * 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


def _colormap(values: np.ndarray) -> np.ndarray:
    """A jet-like colour ramp: values 0..1, shape (H, W) -> uint8 RGB, shape (H, W, 3)."""
    r = np.clip(1.5 - np.abs(4 * values - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * values - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * values - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def overlay_png(classifier: Classifier, source: Any, class_name: str = "melanoma",
                alpha: float = 0.4) -> bytes:
    """PNG bytes: the decoded image with its Grad-CAM heatmap blended on top."""
    image = classifier.decode(source)
    heatmap = gradcam_heatmap(classifier, image, classifier.classes.index(class_name))
    blended = (1 - alpha) * image + alpha * _colormap(heatmap).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()
