"""Preparing labelled images for training: read the sets, assign folds, decode once (cached as
uint8), and weigh each image."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.data import (
    MELANOMA,
    LabelledSet,
    Sample,
    in_first_chunk,
    merge_sets,
    scan_folder,
    stratified_folds,
)
from model.imaging import DecodeError, decode_image
from model.labels import TEST_FOLD, grouped_folds, read_labels, source_group
from model.recipe import TrainConfig

Reporter = Callable[[str], None]


@dataclass
class Prepared:
    """The decoded set: uint8 images at load size (n, h, w, 3) and at input size, labels, folds."""

    dataset: LabelledSet
    samples: list[Sample]
    loaded: np.ndarray
    inputs: np.ndarray
    labels: np.ndarray
    folds: np.ndarray
    sources: list[str]
    #: Each data folder as scanned alone (the card records their counts and fingerprints).
    folders: tuple[LabelledSet, ...] = ()


#: The folder `melanoscreen export` writes a `refer` verdict without a diagnosis to.
SUSPECTED_FOLDER = "melanoma-suspected"


def scan_data(data_dirs: Path | Sequence[Path],
              suspected_as_melanoma: bool = False) -> tuple[LabelledSet, tuple[LabelledSet, ...]]:
    """Read one or several labelled sets; (all of them as one set, each alone).

    Each is a table of labels (a `.csv` file, `model.labels`) or a folder-per-class set. When a
    table is among them, a folder's images count as a dataset of the folder's name.
    """
    dirs = [Path(data_dirs)] if isinstance(data_dirs, (str, Path)) else [Path(d) for d in data_dirs]
    aliases = {SUSPECTED_FOLDER: MELANOMA} if suspected_as_melanoma else None
    tables = any(d.suffix == ".csv" for d in dirs)
    folders = []
    for d in dirs:
        if d.suffix == ".csv":
            folders.append(read_labels(d))
            continue
        labelled = scan_folder(d, aliases=aliases)
        if tables:
            labelled.samples = [replace(s, dataset=d.name) for s in labelled.samples]
        folders.append(labelled)
    return merge_sets(folders), tuple(folders)


def folder_summaries(folders: Sequence[LabelledSet]) -> list[dict[str, Any]]:
    """What the card records of each data folder: name, fingerprint, counts."""
    return [{"folder": labelled.root.name, "fingerprint": labelled.fingerprint(),
             "unique_images": len(labelled.samples), "dropped": len(labelled.dropped),
             "class_counts": labelled.counts()} for labelled in folders]


def load_images(samples: list[Sample], size: tuple[int, int],
                report: Reporter) -> tuple[np.ndarray, list[Sample]]:
    """Decode samples once: uint8, shape (n, H, W, 3); unreadable ones are reported and left out."""
    images, kept = [], []
    for sample in samples:
        try:
            images.append(decode_image(sample.path, size).astype(np.uint8))
        except DecodeError as exc:
            report(f"dropped unreadable {sample.path}: {exc.reason}")
            continue
        kept.append(sample)
    height, width = size
    stacked = np.stack(images) if images else np.zeros((0, height, width, 3), np.uint8)
    return stacked, kept


def prepare(data_dir: Path | Sequence[Path], config: TrainConfig, report: Reporter,
            cache: Path | None = None) -> Prepared:
    """Read the sets (de-duplicated across them), assign folds, and decode every image at load
    and input size (once: kept in `cache` when given).

    With a table of labels, folds keep each lesion whole and the test set out
    (`model.labels.grouped_folds`).
    """
    dataset, folders = scan_data(data_dir, config.suspected_as_melanoma)
    for folder in dataset.unknown_folders:
        report(f"skipped folder {folder!r}: not one of the model's classes")
    for item in dataset.dropped:
        report(f"dropped {item.path}: {item.reason}")
    for labelled in folders:
        report(f"{labelled.root}: {len(labelled.samples)} images, fingerprint "
               f"{labelled.fingerprint()[:12]}")
    height, width = config.size
    load = (round(height * config.load_scale), round(width * config.load_scale))
    candidates = dataset.samples
    if any(s.dataset for s in candidates):
        assigned = grouped_folds(candidates, config.folds, config.seed, config.hold_out_datasets)
        kept_apart = sum(f == TEST_FOLD for f in assigned)
        report(f"{kept_apart} images of the test set (and its lesions) kept out of training, "
               f"calibration and model choice")
        fold_of = {s.sha256: f for s, f in zip(candidates, assigned, strict=True)}
        candidates = [s for s in candidates if fold_of[s.sha256] != TEST_FOLD]
    loaded, samples = cached_images(candidates, load, cache, report)
    inputs, _ = cached_images(samples, (height, width), cache, report)
    labels = np.asarray([s.label for s in samples], np.int32)
    if any(s.dataset for s in samples):
        folds = np.asarray([fold_of[s.sha256] for s in samples], np.int32)
    else:
        folds = np.asarray(stratified_folds(samples, config.folds, config.seed), np.int32)
    if config.hold_out_chunk:
        folds[[in_first_chunk(s.path) for s in samples]] = 0
    if MELANOMA in dataset.classes:
        m = dataset.classes.index(MELANOMA)
        for fold in range(config.folds):
            if not (labels[folds == fold] == m).any():
                raise ValueError(f"fold {fold} has no melanoma: cannot set an alert threshold")
    report(f"{len(samples)} unique images after dropping {len(dataset.dropped)}; "
           f"{config.folds} folds of ~{len(samples) // config.folds}")
    return Prepared(dataset, samples, loaded, inputs, labels, folds,
                    [source_group(s) for s in samples], folders)


def cached_images(samples: list[Sample], size: tuple[int, int], cache: Path | None,
                  report: Reporter) -> tuple[np.ndarray, list[Sample]]:
    """`load_images`, kept in `cache` (a folder) as uint8 `.npy` named by content and size, so a
    resumed run decodes nothing again."""
    if cache is None:
        return load_images(samples, size, report)
    key = hashlib.sha256("\n".join(s.sha256 for s in samples).encode()).hexdigest()[:16]
    images_path = cache / f"images-{key}-{size[0]}x{size[1]}.npy"
    kept_path = images_path.with_suffix(".kept.json")
    if images_path.is_file() and kept_path.is_file():
        kept = set(json.loads(kept_path.read_text()))
        return np.load(images_path), [s for s in samples if s.sha256 in kept]
    images, kept_samples = load_images(samples, size, report)
    cache.mkdir(parents=True, exist_ok=True)
    partial = images_path.with_suffix(".partial.npy")
    np.save(partial, images)
    os.replace(partial, images_path)
    kept_path.write_text(json.dumps([s.sha256 for s in kept_samples]))
    return images, kept_samples


def sample_weights(labels: np.ndarray, sources: list[str], num_classes: int) -> np.ndarray:
    """Per image: each (source, class) cell weighs about the same, softened by a square root.

    float32, shape (n,), mean 1. A class that one source owns can then not be learnt from how
    many images that source has; a cell of two images cannot outweigh the rest (capped at 4x).
    `sources` may be finer than `source_of` (training passes `batch_of`).
    """
    cells = [f"{source}/{label}" for source, label in zip(sources, labels, strict=True)]
    names, inverse, counts = np.unique(cells, return_inverse=True, return_counts=True)
    weights = np.sqrt(len(cells) / (len(names) * counts[inverse]))
    weights = np.clip(weights, 0.25, 4.0)
    return (weights / weights.mean()).astype(np.float32)
