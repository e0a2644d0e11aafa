"""The shipped model: members averaged into one Keras model, with the temperature and the scope
distance inside."""

from __future__ import annotations

from collections.abc import Sequence
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


def soup(member_paths: Sequence[Path], images: np.ndarray, *, batch_size: int = 64) -> Any:
    """The members' weights averaged into one network of one member's cost (a uniform model
    soup, Wortsman et al. 2022), its batch-norm statistics measured again on `images`.

    The members must share an architecture and a starting point (ImageNet's weights): networks
    fine-tuned from one start stay close enough that their average still works, unlike networks
    from different random starts. Batch normalisation's moving means and variances describe the
    activations of the network that kept them, not of the average, so they are measured again,
    as stochastic weight averaging does (Izmailov et al. 2018): each layer's statistics become
    the mean of its batch statistics over `images` (n, H, W, 3; values 0..255, the training
    images, unaugmented) in equal batches of `batch_size`.
    """
    import keras

    from model import layers  # noqa: F401  registers the custom layers for loading

    members = [keras.models.load_model(p, compile=False) for p in member_paths]
    network = members[0]
    shapes = [w.shape for w in network.get_weights()]
    for path, member in zip(member_paths[1:], members[1:], strict=True):
        if [w.shape for w in member.get_weights()] != shapes:
            raise ValueError(f"cannot average {path} with {member_paths[0]}: "
                             "their architectures differ")
    network.set_weights([np.mean(ws, axis=0) for ws in zip(*(m.get_weights() for m in members),
                                                            strict=True)])
    norms = [layer for layer in _all_layers(network)
             if isinstance(layer, keras.layers.BatchNormalization)]
    if norms:
        batches = max(len(images) // batch_size, 1)
        kept = [layer.momentum for layer in norms]
        try:
            for t in range(batches):
                # Momentum t/(t+1) makes the moving value the running mean of the batch values.
                for layer in norms:
                    layer.momentum = t / (t + 1)
                network(images[t * batch_size:(t + 1) * batch_size].astype(np.float32),
                        training=True)
        finally:
            for layer, momentum in zip(norms, kept, strict=True):
                layer.momentum = momentum
    return network


def _all_layers(model: Any) -> list[Any]:
    """Every layer of `model`, those of nested models included."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found.extend(_all_layers(layer))
    return found
