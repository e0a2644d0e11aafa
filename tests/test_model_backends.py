"""A `.keras` file is the same network on every Keras backend: the shipped model loads and computes
the same under JAX, and a network trained under JAX is served by the TensorFlow `Classifier`.

Each JAX side runs in its own process (a process picks its Keras backend once, at import).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from model.card import shipped_model_path
from model.inference import Classifier
from tests.conftest import write_class_coloured_set

REPO = Path(__file__).resolve().parent.parent

#: Run under JAX: load a `.keras` file, check the backend really is JAX, and save what the
#: model computes on the images in argv[2] to argv[3].
PREDICT_UNDER_JAX = textwrap.dedent("""
    import sys
    import keras
    import numpy as np
    import model.layers  # registers the custom layers the file names
    assert keras.backend.backend() == "jax", keras.backend.backend()
    network = keras.models.load_model(sys.argv[1], compile=False)
    outputs = network.predict(np.load(sys.argv[2]), verbose=0)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    np.savez(sys.argv[3], *[np.asarray(o) for o in outputs])
""")

#: Run under JAX: train a small colour-constant MobileNet ensemble on the folder argv[1].
TRAIN_UNDER_JAX = textwrap.dedent("""
    import sys
    from pathlib import Path
    import keras
    from model.recipe import TrainConfig
    from model.train import train
    assert keras.backend.backend() == "jax", keras.backend.backend()
    config = TrainConfig(arch="mobilenet-cc", augmentation="heavy", members=0, epochs=1,
                         folds=2, batch_size=8, input_size=(32, 32), seed=5)
    train(Path(sys.argv[1]), Path(sys.argv[2]), config, report=print)
""")


def under_jax(script: str, *args: Path) -> None:
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def jax_outputs(model: Path, images: np.ndarray, tmp_path: Path) -> list[np.ndarray]:
    np.save(tmp_path / "images.npy", images)
    under_jax(PREDICT_UNDER_JAX, model, tmp_path / "images.npy", tmp_path / "out.npz")
    with np.load(tmp_path / "out.npz") as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def test_the_shipped_model_computes_the_same_under_jax(tmp_path: Path) -> None:
    served = Classifier(shipped_model_path())
    height, width = served.card.input_size
    images = np.random.default_rng(7).uniform(0, 255, (6, height, width, 3)).astype(np.float32)
    probabilities, distances = served.predict_arrays_scoped(images)

    outputs = jax_outputs(shipped_model_path(), images, tmp_path)
    assert len(outputs) == 2
    np.testing.assert_allclose(outputs[0], probabilities, atol=2e-4)
    np.testing.assert_allclose(outputs[1].reshape(-1), distances, rtol=1e-3)


def test_a_network_trained_under_jax_is_served_by_the_tensorflow_classifier(tmp_path: Path) -> None:
    training_set = write_class_coloured_set(tmp_path / "set", per_class=4, seed=1)
    out = tmp_path / "model" / "jax.keras"
    under_jax(TRAIN_UNDER_JAX, training_set, out)

    served = Classifier(out)
    assert served.card.members == 2 and served.card.architecture == "mobilenet-cc"
    images = np.random.default_rng(2).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    probabilities, distances = served.predict_arrays_scoped(images)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    outputs = jax_outputs(out, images, tmp_path)
    np.testing.assert_allclose(outputs[0], probabilities, atol=2e-4)
    np.testing.assert_allclose(outputs[1].reshape(-1), distances, rtol=1e-3)
