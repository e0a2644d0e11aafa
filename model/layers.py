"""Custom Keras layers that travel inside the saved model, so inference needs no extra code path."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="melanoscreen")
class ShadesOfGray(keras.layers.Layer):
    """Shades of Gray colour constancy (Finlayson and Trezzi, 2004).

    Estimates each image's illuminant as the Minkowski p-norm mean of each channel and divides
    it out, scaled so the mean brightness stays: a colour cast from a dermatoscope's light or a
    camera's white balance becomes grey balance. Input and output float32, shape
    (batch, H, W, 3), values 0..255.
    """

    def __init__(self, power: float = 6.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.power = float(power)

    def call(self, images: Any) -> Any:
        x = ops.maximum(images, 0.0) / 255.0
        illuminant = ops.power(ops.mean(ops.power(x, self.power), axis=(1, 2), keepdims=True),
                               1.0 / self.power)  # (batch, 1, 1, 3)
        illuminant = ops.maximum(illuminant, 1e-6)
        gain = ops.mean(illuminant, axis=-1, keepdims=True) / illuminant
        return ops.clip(x * gain, 0.0, 1.0) * 255.0

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "power": self.power}


@keras.saving.register_keras_serializable(package="melanoscreen")
class TemperatureScaling(keras.layers.Layer):
    """Softmax probabilities in, probabilities of the logits divided by `temperature` out.

    Shape (batch, classes). softmax(log(p) / T) = p^(1/T) / sum(p^(1/T)); T > 1 softens an
    over-confident model, T < 1 sharpens it. The argmax never changes.
    """

    def __init__(self, temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.temperature = float(temperature)

    def call(self, probabilities: Any) -> Any:
        logits = ops.log(ops.maximum(probabilities, 1e-12)) / self.temperature
        return ops.softmax(logits, axis=-1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "temperature": self.temperature}


@keras.saving.register_keras_serializable(package="melanoscreen")
class MahalanobisDistance(keras.layers.Layer):
    """Distance of a feature vector from the training images' features, in their own units.

    Input float32, shape (batch, d); output shape (batch,): sqrt(mean(((f - mean) @ W)^2)),
    where W whitens the training features' (shrunk) covariance, so a training-like image scores
    about 1 and an image unlike any training image scores far more. Weights are fitted by
    `model.scope.fit_whitening` and saved with the model.
    """

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.mean = self.add_weight(shape=(self.dim,), initializer="zeros", trainable=False,
                                    name="mean")
        self.whitening = self.add_weight(shape=(self.dim, self.dim), initializer="identity",
                                         trainable=False, name="whitening")

    def call(self, features: Any) -> Any:
        z = ops.matmul(features - self.mean, self.whitening)
        return ops.sqrt(ops.mean(ops.square(z), axis=-1))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "dim": self.dim}
