"""The loader: duplicates by content, conflicting labels, and a leak-free stratified split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from model.data import ISIC_CLASSES, scan_folder, stratified_split


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


def test_split_is_stratified_seeded_and_no_hash_is_on_both_sides(tmp_path: Path) -> None:
    for c, name in enumerate(("melanoma", "nevus", "vascular lesion")):
        for i in range(10 + 5 * c):
            _write(tmp_path / name / f"{i}.png", 100 * c + i)
        # a duplicate inside the class must not leak across the split
        shutil.copy(tmp_path / name / "0.png", tmp_path / name / "0-again.png")
    found = scan_folder(tmp_path)

    train, val = stratified_split(found.samples, 0.2, seed=7)
    again_train, again_val = stratified_split(found.samples, 0.2, seed=7)
    other_train, _ = stratified_split(found.samples, 0.2, seed=8)

    assert {s.sha256 for s in train}.isdisjoint({s.sha256 for s in val})
    assert len(train) + len(val) == len(found.samples) == 45
    assert [s.sha256 for s in val] == [s.sha256 for s in again_val]
    assert [s.sha256 for s in train] == [s.sha256 for s in again_train]
    assert [s.sha256 for s in train] != [s.sha256 for s in other_train]
    per_class_val = np.bincount([s.label for s in val], minlength=9)
    assert per_class_val[ISIC_CLASSES.index("melanoma")] == 2
    assert per_class_val[ISIC_CLASSES.index("nevus")] == 3
    assert per_class_val[ISIC_CLASSES.index("vascular lesion")] == 4


def test_fingerprint_names_content_not_paths(tmp_path: Path) -> None:
    _write(tmp_path / "one" / "melanoma" / "x.png", 1)
    _write(tmp_path / "two" / "melanoma" / "renamed.png", 1)
    _write(tmp_path / "three" / "melanoma" / "x.png", 2)
    a = scan_folder(tmp_path / "one").fingerprint()
    assert a == scan_folder(tmp_path / "two").fingerprint()
    assert a != scan_folder(tmp_path / "three").fingerprint()
