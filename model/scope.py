"""Out-of-scope inputs: is this image like the dermoscopic images the model learnt from?

A CNN gives some answer for any picture, a face or a scanned letter included, and a softmax
can be confident about it. The saved model therefore also reports how far each image's
features (every block's activations, averaged over space) lie from the training images' (a
Mahalanobis distance per member, averaged); an image beyond the card's `out_of_scope_distance`
is marked out of scope instead of alerted.
NumPy only.
"""

from __future__ import annotations

import numpy as np

#: The out-of-scope distance is this many times the farthest training image's. Out of scope
#: never silences an alert (it changes the wording to "Unusual picture"), so the limit can sit
#: at the training images' own edge: beyond 1.0, a network trained with heavy augmentation let
#: document renders through (the model card's figures).
SCOPE_MARGIN = 1.0
#: Shrinkage of the covariance towards its mean variance (keeps the inverse stable in 256-d).
SHRINKAGE = 0.1


def fit_whitening(features: np.ndarray, shrinkage: float = SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """(mean, W) with W = C^(-1/2) of the shrunk covariance C; features shape (n, d)."""
    features = np.asarray(features, np.float64)
    mean = features.mean(axis=0)
    centred = features - mean
    covariance = centred.T @ centred / max(len(features) - 1, 1)
    scale = float(np.trace(covariance)) / covariance.shape[0]
    covariance = (1 - shrinkage) * covariance + shrinkage * scale * np.eye(covariance.shape[0])
    values, vectors = np.linalg.eigh(covariance)
    whitening = vectors @ np.diag(1.0 / np.sqrt(np.maximum(values, 1e-12))) @ vectors.T
    return mean.astype(np.float32), whitening.astype(np.float32)


def distance(features: np.ndarray, mean: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    """What `MahalanobisDistance` computes, in NumPy: shape (n,)."""
    z = (np.asarray(features, np.float64) - mean) @ whitening
    return np.sqrt(np.mean(z**2, axis=1))


def scope_threshold(training_distances: np.ndarray, margin: float = SCOPE_MARGIN) -> float:
    """The out-of-scope distance: `margin` times the farthest training image's own distance."""
    return float(np.max(np.asarray(training_distances, float)) * margin)
