"""The loader: duplicates by content, conflicting labels, and a leak-free stratified split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.data import (
    HAM10000,
    ISIC_ARCHIVE,
    ISIC_CLASSES,
    UNKNOWN_SOURCE,
    in_first_chunk,
    scan_folder,
    source_of,
    stratified_folds,
)


def _write(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


def test_exact_duplicates_keep_one_copy_and_conflicting_labels_are_dropped(tmp_path: Path) -> None:
    _write(tmp_path / "nevus" / "a.png", 1)
    shutil.copy(tmp_path / "nevus" / "a.png", tmp_path / "nevus" / "z-copy.png")
    _write(tmp_path / "melanoma" / "b.png", 2)
    shutil.copy(tmp_path / "melanoma" / "b.png", tmp_path / "nevus" / "b-as-nevus.png")
    _write(tmp_path / "melanoma" / "c.png", 3)
    _write(tmp_path / "not a class" / "d.png", 4)

    found = scan_folder(tmp_path)

    kept = sorted(s.path.name for s in found.samples)
    assert kept == ["a.png", "c.png"]
    reasons = {d.path.name: d.reason for d in found.dropped}
    assert "exact duplicate" in reasons["z-copy.png"]
    assert "different labels" in reasons["b.png"]
    assert "different labels" in reasons["b-as-nevus.png"]
    assert found.unknown_folders == ["not a class"]
    assert found.counts()["melanoma"] == 1
    assert found.classes == ISIC_CLASSES


def test_folds_are_stratified_by_source_and_class_seeded_and_every_image_held_out_once(
        tmp_path: Path) -> None:
    for c, name in enumerate(("melanoma", "nevus", "vascular lesion")):
        for i in range(10 + 5 * c):
            # nevi come from both archives; the others from one each, as in isic-train
            number = 100 + i if name == "melanoma" or (name == "nevus" and i % 2) else 25000 + i
            _write(tmp_path / name / f"ISIC_{number + 1000 * c:07d}.png", 100 * c + i)
        # a duplicate inside the class is one image: it cannot sit in two folds
        first = sorted((tmp_path / name).iterdir())[0]
        shutil.copy(first, tmp_path / name / "copy.png")
    found = scan_folder(tmp_path)

    folds = np.asarray(stratified_folds(found.samples, 5, seed=7))
    assert folds.tolist() == stratified_folds(found.samples, 5, seed=7)
    assert folds.tolist() != stratified_folds(found.samples, 5, seed=8)
    assert len(folds) == len(found.samples) == 45
    assert np.bincount(folds).tolist() == [9, 9, 9, 9, 9]
    for label in (ISIC_CLASSES.index("melanoma"), ISIC_CLASSES.index("nevus")):
        members = [f for f, s in zip(folds, found.samples, strict=True) if s.label == label]
        counts = np.bincount(members, minlength=5)
        assert counts.max() - counts.min() <= 1  # every fold gets its share of each class
    archive_nevi = [f for f, s in zip(folds, found.samples, strict=True)
                    if s.label == ISIC_CLASSES.index("nevus") and source_of(s.path) == ISIC_ARCHIVE]
    assert len(set(archive_nevi)) == 5  # and of each source within it


@pytest.mark.parametrize(("name", "source"), [
    ("ISIC_0000000.jpg", ISIC_ARCHIVE),
    ("ISIC_0011193.jpg", ISIC_ARCHIVE),
    ("ISIC_0024305.jpg", ISIC_ARCHIVE),
    ("ISIC_0024306.jpg", HAM10000),
    ("ISIC_0034320.png", HAM10000),
    ("ISIC_0034321.jpg", ISIC_ARCHIVE),  # past HAM10000's range: the archive's later images
    ("clinic-a/ISIC_0025780_downsampled.jpg", HAM10000),
    ("patient-17-lesion2.jpg", UNKNOWN_SOURCE),
    ("ISIC_123.jpg", UNKNOWN_SOURCE),  # not a seven-digit id
    ("ISIC_00243060.jpg", UNKNOWN_SOURCE),
])
def test_the_source_is_read_from_the_isic_id_in_the_name(name: str, source: str) -> None:
    assert source_of(name) == source
    assert source_of(Path("/data") / name) == source


def test_fingerprint_names_content_not_paths(tmp_path: Path) -> None:
    _write(tmp_path / "one" / "melanoma" / "x.png", 1)
    _write(tmp_path / "two" / "melanoma" / "renamed.png", 1)
    _write(tmp_path / "three" / "melanoma" / "x.png", 2)
    a = scan_folder(tmp_path / "one").fingerprint()
    assert a == scan_folder(tmp_path / "two").fingerprint()
    assert a != scan_folder(tmp_path / "three").fingerprint()


@pytest.mark.parametrize(("name", "inside"), [
    ("ISIC_0000000.jpg", True),
    ("nevus/ISIC_0000199_downsampled.jpg", True),
    ("ISIC_0000200.jpg", False),
    ("ISIC_0024306.jpg", False),
    ("patient-17-lesion2.jpg", False),
])
def test_the_first_chunk_is_the_early_batch_below_id_200(name: str, inside: bool) -> None:
    assert in_first_chunk(name) is inside
