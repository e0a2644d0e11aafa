"""Training from a table of labels: one sample per content, lesions never split across folds, the
test set never trained on, a held-out dataset whole in fold 0."""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.labels import TEST_DATASET, TEST_FOLD, LabelsError, grouped_folds, read_labels
from model.preparation import prepare
from model.recipe import TrainConfig

COLUMNS = ("file", "isic_id", "folder_class", "label", "label_source", "dataset", "lesion_id",
           "sha256")


def _write_table(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({name: row.get(name, "") for name in COLUMNS})


def _row(file: str, label: str, dataset: str, lesion: str = "", sha: str | None = None
         ) -> dict[str, str]:
    return {"file": file, "label": label, "dataset": dataset, "lesion_id": lesion,
            "sha256": sha or hashlib.sha256(file.encode()).hexdigest()}


def _table(tmp_path: Path) -> Path:
    rows = []
    # HAM10000: 30 lesions of 1-3 photos each, melanomas and nevi.
    for lesion in range(30):
        label = "melanoma" if lesion % 3 == 0 else "nevus"
        for photo in range(1 + lesion % 3):
            rows.append(_row(f"extra/{label}/ham_{lesion}_{photo}.jpg", label, "HAM10000",
                             f"HAM_{lesion:07d}"))
    # The course set: one copy shares a file's bytes under another folder (one sample), and a
    # photo of HAM lesion 3 (the same lesion across datasets).
    for i in range(12):
        label = "melanoma" if i % 2 else "nevus"
        rows.append(_row(f"course/{label}/c{i}.jpg", label, "course"))
    rows.append(_row("course/other/c1.jpg", "melanoma", "course", sha=rows[-11]["sha256"]))
    rows.append(_row("course/melanoma/ham3.jpg", "melanoma", "course", "HAM_0000003"))
    # The ISIC 2018 test, held out whole.
    for i in range(8):
        rows.append(_row(f"extra/2018/{i}.jpg", "melanoma" if i < 3 else "nevus", "ISIC2018-test"))
    # The ISIC 2017 test: one of its images is also listed under the training set (same bytes),
    # and one shows HAM lesion 6.
    for i in range(6):
        rows.append(_row(f"extra/2017test/{i}.jpg", "melanoma" if i < 2 else "nevus", TEST_DATASET))
    rows.append(_row("extra/2017train/dup.jpg", "melanoma", "ISIC2017-train", sha=rows[-6]["sha256"]))
    rows.append(_row("extra/2017test/ham6.jpg", "melanoma", TEST_DATASET, "HAM_0000006"))
    table = tmp_path / "labels.csv"
    _write_table(table, rows)
    return table


def test_a_table_gives_one_sample_per_content_with_its_dataset_and_lesion(tmp_path: Path) -> None:
    labelled = read_labels(_table(tmp_path))

    hashes = [s.sha256 for s in labelled.samples]
    assert len(hashes) == len(set(hashes))
    by_name = {s.path.name: s for s in labelled.samples}
    assert "dup.jpg" not in by_name  # a copy of a test image is the test image
    assert by_name["0.jpg"].dataset in (TEST_DATASET, "ISIC2018-test")
    assert all(s.path.is_relative_to(tmp_path) for s in labelled.samples)
    assert by_name["ham3.jpg"].lesions == ("HAM_0000003",)
    assert labelled.counts()["melanoma"] > 0


def test_a_lesion_never_sits_in_two_folds_and_the_test_set_never_in_a_training_fold(
        tmp_path: Path) -> None:
    samples = read_labels(_table(tmp_path)).samples

    folds = grouped_folds(samples, k=3, seed=7, hold_out=("ISIC2018-test",))

    by_lesion: dict[str, set[int]] = defaultdict(set)
    for sample, fold in zip(samples, folds, strict=True):
        for lesion in sample.lesions:
            by_lesion[lesion].add(fold)
        if sample.dataset == TEST_DATASET:
            assert fold == TEST_FOLD
        if sample.dataset == "ISIC2018-test":
            assert fold == 0
    assert all(len(f) == 1 for f in by_lesion.values())
    # A lesion photographed for the test set is kept out whole, its HAM photos too.
    assert by_lesion["HAM_0000006"] == {TEST_FOLD}
    # Every fold holds out some of the other datasets; the split is seeded.
    for fold in range(3):
        held = {s.dataset for s, f in zip(samples, folds, strict=True) if f == fold}
        assert {"HAM10000", "course"} <= held
    assert folds == grouped_folds(samples, k=3, seed=7, hold_out=("ISIC2018-test",))
    assert folds != grouped_folds(samples, k=3, seed=8, hold_out=("ISIC2018-test",))


def test_a_table_with_an_unknown_class_or_two_labels_for_one_content_is_refused(
        tmp_path: Path) -> None:
    bad = tmp_path / "unknown.csv"
    _write_table(bad, [_row("a.jpg", "freckle", "course")])
    with pytest.raises(LabelsError, match="unknown class 'freckle'"):
        read_labels(bad)
    twice = tmp_path / "twice.csv"
    _write_table(twice, [_row("a.jpg", "nevus", "course", sha="ab" * 32),
                         _row("b.jpg", "melanoma", "course", sha="ab" * 32)])
    with pytest.raises(LabelsError, match="labelled"):
        read_labels(twice)


def test_preparing_a_table_decodes_once_and_leaves_the_test_set_out(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        label = "melanoma" if i % 3 == 0 else "nevus"
        dataset = TEST_DATASET if i >= 20 else ("course" if i % 2 else "HAM10000")
        file = f"images/{label}/{i}.png"
        path = tmp_path / file
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)
        rows.append(_row(file, label, dataset, sha=hashlib.sha256(path.read_bytes()).hexdigest()))
    table = tmp_path / "labels.csv"
    _write_table(table, rows)
    config = TrainConfig(arch="seed", folds=2, input_size=(16, 16))
    cache = tmp_path / "cache"

    prepared = prepare(table, config, lambda line: None, cache=cache)

    assert len(prepared.samples) == 20
    assert TEST_DATASET not in {s.dataset for s in prepared.samples}
    assert prepared.inputs.shape == (20, 16, 16, 3) and prepared.inputs.dtype == np.uint8
    assert set(prepared.folds.tolist()) == {0, 1}
    assert len(list(cache.glob("*.npy"))) == 2
    # A second preparation reads the cache: the images' files are no longer needed.
    for path in (tmp_path / "images").rglob("*.png"):
        path.unlink()
    again = prepare(table, config, lambda line: None, cache=cache)
    np.testing.assert_array_equal(again.loaded, prepared.loaded)
    assert [s.sha256 for s in again.samples] == [s.sha256 for s in prepared.samples]
