"""The shipped model: members averaged into one Keras model, with the temperature and the scope
distance inside."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from model.architectures import build_ensemble, scope_features


def fit_scope(members: list[Any], images: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each member's scope-feature mean and whitening over the training images (n, H, W, 3)."""
    from model.scope import fit_whitening

    fitted = []
    for member in members:
        features = np.asarray(scope_features(member).predict(images.astype(np.float32),
                                                             batch_size=64, verbose=0))
        fitted.append(fit_whitening(features))
    return fitted


def assemble(member_paths: list[Path], temperature: float, images: np.ndarray) -> tuple[Any, float]:
    """The members averaged into one Keras model, temperature and scope distance inside.

    Returns the model and its out-of-scope distance (`model.scope.scope_threshold` of the
    training images' own distances, measured on the first member's features).
    """
    import keras

    from model import layers  # noqa: F401  registers the custom layers for loading
    from model.scope import scope_threshold

    members = [keras.models.load_model(p, compile=False) for p in member_paths]
    # The first member's features measure the scope: each member's whitening matrix is about
    # 2 MB (744 x 744 floats at MelanoNet's widths), and the shipped model must stay small.
    ensemble = build_ensemble(members, temperature, fit_scope(members[:1], images))
    _, distances = ensemble.predict(images.astype(np.float32), batch_size=64, verbose=0)
    return ensemble, scope_threshold(np.asarray(distances))
