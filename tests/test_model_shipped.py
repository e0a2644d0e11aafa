"""The shipped model: loads offline, is what its card says, and keeps out-of-scope pictures from
raising melanoma alerts."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from model.card import ModelCard, card_path_for, shipped_model_path
from model.data import IMAGE_SUFFIXES, ISIC_CLASSES
from model.inference import Classifier, Prediction
from service.flags import UNUSUAL_PICTURE, flag_of

SHARED_TRAINING_SET = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic-train"


@pytest.fixture(scope="module")
def shipped() -> Classifier:
    return Classifier()  # the default path is the shipped model


def test_the_shipped_model_and_card_load_offline_and_agree(shipped: Classifier) -> None:
    path = shipped_model_path()
    card = ModelCard.read(card_path_for(path))
    assert card.classes == list(ISIC_CLASSES)
    shipped_bytes = sum(p.stat().st_size for p in path.parent.iterdir())
    assert shipped_bytes < 30 * 1024 * 1024

    assert shipped.model.input_shape[1:3] == tuple(card.input_size)
    assert 0.0 < shipped.threshold < 1.0
    # The card describes the model it sits beside: as many networks, the same temperature.
    import keras

    networks = [layer for layer in shipped.model.layers if isinstance(layer, keras.Model)]
    assert max(len(networks), 1) == card.members
    temperatures = [layer.temperature for layer in shipped.model.layers
                    if type(layer).__name__ == "TemperatureScaling"]
    assert temperatures == [pytest.approx(card.temperature)] * len(temperatures)
    assert temperatures or card.temperature == 1.0
    height, width = card.input_size
    probabilities = shipped.predict_arrays(np.full((2, height, width, 3), 128, np.float32))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def _non_lesion_pictures(folder: Path, seed: int = 0) -> dict[str, list[Path]]:
    """Pictures that are not dermoscopic lesion images, by kind: frames, documents, faces,
    scenes, patterns."""
    rng = random.Random(seed)
    size = (240, 180)
    pictures: list[tuple[str, Image.Image]] = []
    for colour in [(0, 0, 0), (255, 255, 255), (128, 128, 128), (224, 172, 140), (30, 90, 200)]:
        pictures.append(("frame", Image.new("RGB", size, colour)))  # a skin-coloured one too
    for _ in range(4):  # documents: lines of text on paper
        page = Image.new("RGB", size, (250, 250, 245))
        draw = ImageDraw.Draw(page)
        for line in range(9):
            words = " ".join(rng.choice(["Patient", "referral", "2026", "lesion", "Dr.", "clinic",
                                         "report", "left", "arm", "follow-up"]) for _ in range(6))
            draw.text((8, 6 + 19 * line), words, fill=(20, 20, 20))
        pictures.append(("document", page))
    for _ in range(4):  # cartoon faces
        face = Image.new("RGB", size, (rng.randint(100, 240), rng.randint(100, 240), 255))
        draw = ImageDraw.Draw(face)
        skin = (rng.randint(150, 240), rng.randint(110, 190), rng.randint(90, 160))
        draw.ellipse((60, 15, 180, 170), fill=skin)
        draw.ellipse((90, 60, 105, 72), fill=(30, 30, 30))
        draw.ellipse((135, 60, 150, 72), fill=(30, 30, 30))
        draw.arc((95, 100, 145, 140), 20, 160, fill=(150, 40, 40), width=4)
        draw.rectangle((60, 10, 180, 35), fill=(60, 40, 20))  # hair
        pictures.append(("face", face))
    for _ in range(3):  # outdoor scenes: sky, ground, a house
        scene = Image.new("RGB", size, (120, 170, 235))
        draw = ImageDraw.Draw(scene)
        draw.rectangle((0, 110, 240, 180), fill=(60, 140, 50))
        x = rng.randint(20, 140)
        draw.rectangle((x, 70, x + 70, 120), fill=(200, 60, 50))
        draw.polygon([(x - 5, 70), (x + 35, 40), (x + 75, 70)], fill=(90, 50, 30))
        pictures.append(("scene", scene))
    grid = np.indices((180, 240)).sum(axis=0) // 20 % 2 * 255  # a checkerboard
    pictures.append(("pattern", Image.fromarray(np.stack([grid] * 3, -1).astype(np.uint8))))
    noise = np.random.default_rng(seed).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    pictures.append(("pattern", Image.fromarray(noise)))
    paths: dict[str, list[Path]] = {}
    for i, (kind, picture) in enumerate(pictures):
        path = folder / f"{kind}-{i:02d}.jpg"
        picture.save(path, quality=90)
        paths.setdefault(kind, []).append(path)
    return paths


def test_frames_documents_faces_scenes_and_patterns_are_out_of_scope_and_never_called_melanoma(
        shipped: Classifier, tmp_path: Path) -> None:
    pictures = _non_lesion_pictures(tmp_path)
    kinds = ("frame", "document", "face", "scene", "pattern")
    paths = [path for kind in kinds for path in pictures[kind]]
    answers = shipped.predict(paths)
    predictions = [a for a in answers if isinstance(a, Prediction)]
    assert len(predictions) == len(paths) == 18
    # Nearly all are out of scope (one outdoor scene is not, and stays far below the threshold).
    assert sum(p.out_of_scope for p in predictions) >= 17
    # Out of scope never silences an alert (service.flags): one that reaches the threshold is
    # alerted, but only ever as an unusual picture that needs a look, never a suspected melanoma.
    flags = [flag_of(p.melanoma_probability, shipped.threshold, out_of_scope=p.out_of_scope)
             for p in predictions]
    assert all(flag.label in (None, UNUSUAL_PICTURE) for flag in flags)


@pytest.mark.skipif(not SHARED_TRAINING_SET.is_dir(), reason="the shared training folder is absent")
def test_dermoscopic_images_are_in_scope(shipped: Classifier, tmp_path: Path) -> None:
    # A fixture made at test time from the shared folder: five images of each class.
    sample = []
    for name in ISIC_CLASSES:
        files = sorted(p for p in (SHARED_TRAINING_SET / name).iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES)
        sample += random.Random(0).sample(files, min(5, len(files)))
    answers = shipped.predict(sample)
    predictions = [a for a in answers if isinstance(a, Prediction)]
    assert len(predictions) == len(sample) >= 40
    assert sum(p.out_of_scope for p in predictions) <= 1
