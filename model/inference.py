"""Batched inference: image files or bytes in, nine probabilities per image out."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.card import ModelCard, card_path_for, shipped_model_path
from model.imaging import DecodeError, ImageSource, decode_image

logger = logging.getLogger(__name__)

_threads_lock = threading.Lock()
_threads_set = False


def configure_threads(intra_op: int | None = None, inter_op: int | None = None) -> None:
    """Size TensorFlow's thread pools; must run before the first TensorFlow op in the process."""
    global _threads_set
    with _threads_lock:
        if _threads_set:
            return
        import tensorflow as tf

        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
        _threads_set = True


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image."""

    probabilities: tuple[float, ...]  # one per class, in the card's class order; sums to 1
    predicted_class: str
    melanoma_probability: float
    #: How unlike the training images it is (see `model.scope`); None for a model without it.
    scope_distance: float | None = None
    #: True when the image is not like a dermoscopic lesion image: its class scores mean nothing.
    out_of_scope: bool = False


class Classifier:
    """A loaded model and its card; `predict` runs batches through one compiled forward pass."""

    def __init__(self, model_path: Path | str | None = None, *,
                 decode_threads: int | None = None, fold_normalisation: bool = True) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf

        from model import layers  # noqa: F401  registers the layers that saved models use
        from model.folding import fold_batch_norm

        self.model_path = Path(model_path) if model_path else shipped_model_path()
        card_path = card_path_for(self.model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"model file not found: {self.model_path}")
        if not card_path.is_file():
            raise FileNotFoundError(f"model card not found beside the model: {card_path}")
        self.card = ModelCard.read(card_path)
        self.model = keras.models.load_model(self.model_path, compile=False)
        height, width = self.card.input_size
        model_shape = tuple(self.model.input_shape[1:3])
        if model_shape != (height, width):
            raise ValueError(f"card input size {height}x{width} does not match model {model_shape}")
        scoped = isinstance(self.model.output, (list, tuple))
        probabilities_shape = self.model.output_shape[0] if scoped else self.model.output_shape
        if probabilities_shape[-1] != len(self.card.classes):
            raise ValueError("card classes do not match the model's outputs")
        flips = self.card.test_time_flips
        # The same function with batch normalisation folded into the convolutions: fewer passes
        # over the activations (`model.folding`; `fold_normalisation=False` runs the network as
        # saved, for the benchmark). Grad-CAM keeps reading `self.model`.
        model = fold_batch_norm(self.model) if fold_normalisation else self.model

        @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32)],
                     reduce_retracing=True)
        def forward(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            def run(batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                out = model(batch, training=False)
                if scoped:
                    return out[0], out[1]
                return out, tf.fill(tf.shape(batch)[:1], float("nan"))

            probabilities, distance = run(images)
            if flips:
                flipped, flipped_distance = run(tf.image.flip_left_right(images))
                probabilities = (probabilities + flipped) / 2.0
                distance = (distance + flipped_distance) / 2.0
            return probabilities, distance

        self._forward = forward
        # Pillow releases the GIL while it decodes and resizes, so threads decode in parallel.
        self._decode_threads = decode_threads or min(4, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def classes(self) -> list[str]:
        """Class names in output order."""
        return list(self.card.classes)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the images are resized to."""
        height, width = self.card.input_size
        return height, width

    @property
    def version(self) -> str:
        """The model version recorded with every prediction."""
        return self.card.version

    @property
    def threshold(self) -> float:
        """The card's melanoma alert threshold."""
        return float(self.card.alert_threshold)

    def decode(self, source: ImageSource) -> np.ndarray:
        """One image to float32, shape (H, W, 3), values 0..255; raises `DecodeError`."""
        return decode_image(source, self.input_size)

    def predict_arrays(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Probabilities, shape (n, classes), for float32 images, shape (n, H, W, 3), 0..255."""
        return self.predict_arrays_scoped(images, batch_size)[0]

    def predict_arrays_scoped(self, images: np.ndarray,
                              batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (n, classes) and scope distances (n,), NaN for a model without them."""
        images = np.asarray(images, dtype=np.float32)
        if len(images) == 0:
            return (np.zeros((0, len(self.card.classes)), dtype=np.float32),
                    np.zeros((0,), dtype=np.float32))
        outputs = [self._forward(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return (np.concatenate([p.numpy() for p, _ in outputs]).astype(np.float32),
                np.concatenate([d.numpy() for _, d in outputs]).astype(np.float32))

    def is_out_of_scope(self, distance: float) -> bool:
        """Whether a scope distance marks the image as not a dermoscopic lesion image."""
        limit = self.card.out_of_scope_distance
        return limit is not None and not np.isnan(distance) and distance > limit

    def _decode_all(self, sources: Sequence[ImageSource]) -> list[np.ndarray | DecodeError]:
        def attempt(source: ImageSource) -> np.ndarray | DecodeError:
            try:
                return self.decode(source)
            except DecodeError as exc:
                return exc

        if self._decode_threads <= 1 or len(sources) <= 1:
            return [attempt(source) for source in sources]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._decode_threads, thread_name_prefix="decode")
        return list(self._pool.map(attempt, sources))

    def to_prediction(self, probabilities: np.ndarray, distance: float = float("nan")) -> Prediction:
        """Wrap one probability vector and its scope distance."""
        m = self.card.melanoma_index
        return Prediction(
            probabilities=tuple(float(p) for p in probabilities),
            predicted_class=self.card.classes[int(np.argmax(probabilities))],
            melanoma_probability=float(probabilities[m]),
            scope_distance=None if np.isnan(distance) else float(distance),
            out_of_scope=self.is_out_of_scope(float(distance)),
        )

    def predict(self, sources: Sequence[ImageSource],
                batch_size: int = 64) -> list[Prediction | DecodeError]:
        """Decode every source and predict the readable ones in batches.

        The result has one entry per source, in order: a `Prediction`, or the `DecodeError`
        that says why that input could not be screened. One bad input never stops the rest.
        """
        results: list[Prediction | DecodeError] = []
        for start in range(0, len(sources), batch_size):
            decoded_or_errors = self._decode_all(sources[start : start + batch_size])
            decoded = [d for d in decoded_or_errors if not isinstance(d, DecodeError)]
            slots = [d if isinstance(d, DecodeError) else None for d in decoded_or_errors]
            if decoded:
                probabilities, distances = self.predict_arrays_scoped(np.stack(decoded))
            else:
                probabilities, distances = np.zeros((0, 0)), np.zeros((0,))
            answers = iter(zip(probabilities, distances, strict=True))
            for slot in slots:
                results.append(slot if slot is not None else self.to_prediction(*next(answers)))
        return results


__all__ = ["Classifier", "DecodeError", "Prediction", "configure_threads"]
