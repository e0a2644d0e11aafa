"""Training: k-fold members on a folder-per-class set, out-of-fold calibration and threshold, one
shipped ensemble with its card.

The steps, each a function: `prepare` (scan, de-duplicate, folds, decode once), `train_member`
(one fold: fit with stock Keras callbacks, predict the held-out fold), `calibrate` (temperature
and threshold on the out-of-fold predictions), `assemble` (the members averaged into one model)
and `train`, which runs them and writes the card.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.architectures import ARCHITECTURES, DEFAULT_INPUT_SIZE, build_ensemble, scope_features
from model.calibration import fit_temperature, temperature_scale
from model.card import ModelCard, card_path_for
from model.data import (
    MELANOMA,
    LabelledSet,
    Sample,
    batch_of,
    in_first_chunk,
    merge_sets,
    scan_folder,
    source_of,
    stratified_folds,
)
from model.imaging import DecodeError, decode_image
from model.labels import TEST_FOLD, grouped_folds, read_labels, source_group
from model.metrics import (
    by_source_figures,
    evaluate_predictions,
    melanoma_same_source,
    threshold_for_sensitivity,
)

logger = logging.getLogger(__name__)

Reporter = Callable[[str], None]


@dataclass
class TrainConfig:
    """Everything that decides a training run; recorded in the card. The defaults are the
    shipped model's recipe (data and the pretrained file's path aside)."""

    #: One architecture, or several joined by "+" (one member of each per fold, averaged).
    arch: str = "mobilenet"
    epochs: int = 10
    folds: int = 5
    seed: int = 1337
    batch_size: int = 32
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    target_sensitivity: float = 0.95
    input_size: tuple[int, int] | None = None
    #: Images are decoded this much larger than the input, so random crops keep detail.
    load_scale: float = 1.125
    source_balanced: bool = True
    #: "heavy" erases acquisition cues (colour casts, blur, JPEG, vignettes, hairs); "mild" is
    #: v1's (geometry, brightness and contrast only; the lesion's colours are kept).
    augmentation: str = "moderate"
    #: Train only the first `members` folds' members (0: one per fold); calibration and the
    #: figures then use those folds' held-out images only.
    members: int = 1
    #: Put the early batch's first chunk of ids (`model.data.FIRST_CHUNK_IDS`) in fold 0 whole.
    hold_out_chunk: bool = False
    #: Ship only the first `ship_folds` folds' members (0: every member trained). The others
    #: are trained only for their held-out predictions: the temperature, the threshold and the
    #: card's figures use every trained fold's, so they rest on more images than one fold holds.
    ship_folds: int = 0
    #: Datasets (`labels.csv`'s `dataset`) put in fold 0 whole, beside fold 0's share of the
    #: others: fold 0's member then meets them as a new clinic's images.
    hold_out_datasets: tuple[str, ...] = ("ISIC2018-test",)
    #: ImageNet weights for a `mobilenet` member (`model.pretrained`): the pinned package's source
    #: distribution or its graph file. None: random initialisation.
    pretrained: str | None = None
    #: Epochs of linear learning-rate warm-up before the cosine decay.
    warmup_epochs: int = 1
    #: Count a `melanoma-suspected` folder (a `refer` verdict without a diagnosis, from
    #: `melanoscreen export`) as melanoma; otherwise it is skipped like any unknown folder.
    suspected_as_melanoma: bool = False

    @classmethod
    def from_card(cls, card: ModelCard) -> TrainConfig:
        """The recipe a card's `training` block records (its figures and paths aside)."""
        known = {name: value for name, value in card.training.items()
                 if name in cls.__dataclass_fields__ and name != "pretrained"}
        for name in ("input_size", "hold_out_datasets"):
            if isinstance(known.get(name), list):
                known[name] = tuple(known[name])
        return cls(**known)

    @property
    def architectures(self) -> list[str]:
        """The architectures `arch` names, in order."""
        return self.arch.split("+")

    @property
    def size(self) -> tuple[int, int]:
        """Input (height, width): `input_size`, else the first architecture's default."""
        return self.input_size or DEFAULT_INPUT_SIZE[self.architectures[0]]

    def version(self, members: int, fingerprint: str, day: dt.date) -> str:
        """The trained model's version: what it is, when, on which data, and a digest of every
        setting, so that two runs that differ in any setting never share a version (predictions
        are stored once per image and version)."""
        settings = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"{self.arch}-x{members}-{day:%Y%m%d}-{fingerprint[:8]}-s{self.seed}-c{settings[:6]}"


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


class ValidationFigures:
    """A Keras callback factory: adds the held-out fold's figures to the logs each epoch."""

    @staticmethod
    def make(x_val: np.ndarray, y_val: np.ndarray, val_sources: list[str], classes: list[str],
             epochs: int, report: Reporter) -> Any:
        """The callback: `val_balanced_accuracy`, `val_melanoma_auc`, `val_same_source_auc`."""
        import keras

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
                self.started = time.monotonic()

            def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
                logs = logs if logs is not None else {}
                probabilities = np.asarray(self.model.predict(x_val, batch_size=64, verbose=0))
                figures = evaluate_predictions(probabilities, y_val, classes, threshold=0.5)
                same = melanoma_same_source(probabilities, y_val, val_sources, classes, 0.5,
                                            bootstrap=0)
                logs["val_balanced_accuracy"] = figures["balanced_accuracy"]
                logs["val_melanoma_auc"] = figures["melanoma"]["auc"] or 0.0
                logs["val_same_source_auc"] = same.get("auc") or 0.0
                report(f"epoch {epoch + 1}/{epochs}  loss {logs.get('loss', float('nan')):.4f}  "
                       f"val balanced acc {logs['val_balanced_accuracy']:.3f}  melanoma AUC "
                       f"{logs['val_melanoma_auc']:.3f}  same-source AUC "
                       f"{logs['val_same_source_auc']:.3f}  {time.monotonic() - self.started:.0f}s")

        return Callback()


def _train_dataset(x: np.ndarray, y: np.ndarray, w: np.ndarray, config: TrainConfig,
                   num_classes: int, seed: int) -> Any:
    import tensorflow as tf

    from model.augment import AUGMENTATIONS

    augment_batch = AUGMENTATIONS[config.augmentation]
    size = config.size
    height, width = x.shape[1:3]

    def gather(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return x[indices], y[indices].astype(np.int32), w[indices].astype(np.float32)

    def load(indices: Any) -> tuple[Any, Any, Any]:
        # Batches are gathered from the array in place: a dataset built from the array itself
        # would copy it into the graph, which refuses more than 2 GB.
        images, labels, weights = tf.numpy_function(gather, [indices],
                                                    [tf.uint8, tf.int32, tf.float32])
        images.set_shape([None, height, width, 3])
        labels.set_shape([None])
        weights.set_shape([None])
        return images, labels, weights

    seeds = tf.data.Dataset.random(seed=seed).batch(2)  # one stateless seed per batch
    order = tf.data.Dataset.range(len(x)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return (tf.data.Dataset.zip(order.batch(config.batch_size).map(load), seeds)
            .map(lambda batch, s: (augment_batch(tf.cast(batch[0], tf.float32), s, size),
                                   tf.one_hot(batch[1], num_classes), batch[2]),
                 num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


def train_member(prepared: Prepared, fold: int, config: TrainConfig, workdir: Path,
                 report: Reporter, member: int = 0) -> tuple[Path, np.ndarray]:
    """Train on every fold but `fold`; return the member's path and its held-out probabilities.

    `member` indexes `config.architectures`; with several, each member's files carry its
    architecture's name, and an architecture named again is another seed of it (seed + 100 per
    repeat; its files numbered). Resumable: `BackupAndRestore` keeps the epoch, weights
    and optimizer; a finished member is read back, not trained again.
    """
    import keras

    from model import layers  # noqa: F401  registers the custom layers, to read a member back

    classes = list(prepared.dataset.classes)
    k = len(classes)
    held = prepared.folds == fold
    architectures = config.architectures
    arch = architectures[member]
    repeat = architectures[:member].count(arch)
    if len(architectures) == 1:
        name = f"fold{fold}"
    else:
        name = f"{arch}-fold{fold}" if repeat == 0 else f"{arch}-{repeat + 1}-fold{fold}"
    member_path = workdir / f"{name}.keras"
    if not member_path.is_file():
        seed = config.seed + 1000 * fold + 100 * repeat
        keras.utils.set_random_seed(seed)
        height, width = config.size
        model = ARCHITECTURES[arch]((height, width, 3), k)
        if config.pretrained and arch == "mobilenet":
            from model.pretrained import imagenet_weights, load_mobilenet_v1

            copied = load_mobilenet_v1(model, imagenet_weights(Path(config.pretrained)))
            report(f"ImageNet weights copied into {copied} layers from {config.pretrained}")
        x_train, y_train = prepared.loaded[~held], prepared.labels[~held]
        # Cells by acquisition batch: the older archive's early batch has melanomas and nevi, its
        # later one melanomas only, so weighting by batch puts the weight where the two meet.
        sources = [s.dataset or batch_of(s.path)
                   for s, h in zip(prepared.samples, held, strict=True) if not h]
        weights = (sample_weights(y_train, sources, k) if config.source_balanced
                   else np.ones(len(y_train), np.float32))
        steps = math.ceil(len(x_train) / config.batch_size)
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=steps * config.epochs, warmup_target=config.learning_rate,
            warmup_steps=steps * config.warmup_epochs, alpha=0.02)
        model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay),
                      loss=keras.losses.CategoricalCrossentropy(
                          label_smoothing=config.label_smoothing))
        val_sources = [s for s, h in zip(prepared.sources, held, strict=True) if h]
        callbacks = [
            ValidationFigures.make(prepared.inputs[held].astype(np.float32), prepared.labels[held],
                                   val_sources, classes, config.epochs, report),
            keras.callbacks.CSVLogger(str(workdir / f"{name}.log.csv"), append=True),
            keras.callbacks.ModelCheckpoint(str(workdir / f"{name}.last.keras")),
            keras.callbacks.BackupAndRestore(str(workdir / f"{name}.backup")),
        ]
        report(f"fold {fold + 1}/{config.folds} ({arch}): train {int((~held).sum())}, "
               f"held out {int(held.sum())}")
        model.fit(_train_dataset(x_train, y_train, weights, config, k, seed),
                  epochs=config.epochs, callbacks=callbacks, verbose=0)
        model.save(member_path)
    model = keras.models.load_model(member_path, compile=False)
    held_out = np.asarray(model.predict(prepared.inputs[held].astype(np.float32),
                                        batch_size=64, verbose=0))
    return member_path, held_out


def calibrate(held_out: np.ndarray, labels: np.ndarray, sources: list[str], batches: list[str],
              classes: list[str], target_sensitivity: float) -> tuple[float, float, np.ndarray]:
    """Temperature on held-out probabilities, then the threshold on same-source melanomas.

    `held_out` has shape (n, classes), or (members, n, classes) for several members per image
    (averaged after scaling, as the ensemble does). Returns (temperature, threshold, the scaled
    probabilities). The threshold is the highest that reaches the target sensitivity both on
    every melanoma against the benign lesions of its own source, and on the melanomas of each
    acquisition batch against that batch's benign lesions (`model.data.batch_of`): the groups in
    which the source cannot give the answer away.
    A set without ISIC ids is one source.
    """
    temperature = fit_temperature(held_out, labels)
    scaled = temperature_scale(held_out, temperature)
    m = classes.index(MELANOMA)
    is_mel = np.asarray(labels) == m
    thresholds = []
    for groups in (sources, batches):
        group_array = np.asarray(groups)
        for group in sorted(set(group_array[is_mel].tolist())):
            inside = group_array == group
            if (~is_mel[inside]).sum() >= 10:  # a group with benign lesions to tell apart
                thresholds.append(threshold_for_sensitivity(
                    is_mel[inside], scaled[inside, m], target_sensitivity))
    if not thresholds:
        thresholds.append(threshold_for_sensitivity(is_mel, scaled[:, m], target_sensitivity))
    return temperature, min(thresholds), scaled


def held_out_figures(before: np.ndarray, after: np.ndarray, labels: np.ndarray, sources: list[str],
                     batches: list[str], classes: list[str], threshold: float,
                     seed: int, chunk: np.ndarray | None = None) -> dict[str, Any]:
    """The card's figures on held-out predictions: the contract's, by source, same source and
    same batch with intervals, and the calibration error before and after the temperature.

    With `chunk` (bool per image: in the first chunk, held out whole) also the melanoma figures
    within that chunk, `melanoma_unseen_chunk`.
    """
    figures = evaluate_predictions(after, labels, classes, threshold)
    figures["by_source"] = by_source_figures(after, labels, sources, classes)
    figures["melanoma_same_source"] = melanoma_same_source(
        after, labels, sources, classes, threshold, seed=seed)
    figures["melanoma_same_batch"] = melanoma_same_source(
        after, labels, batches, classes, threshold, min_benign=10, seed=seed)
    figures["expected_calibration_error_before_temperature"] = evaluate_predictions(
        before, labels, classes, threshold)["expected_calibration_error"]
    if chunk is not None and np.asarray(chunk).any():
        inside = np.asarray(chunk, bool)
        figures["melanoma_unseen_chunk"] = melanoma_same_source(
            after[inside], np.asarray(labels)[inside], ["first-chunk"] * int(inside.sum()),
            classes, threshold, seed=seed)
    return figures


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


def train(data_dir: Path | Sequence[Path], out: Path, config: TrainConfig, *, resume: bool = True,
          report: Reporter = logger.info) -> ModelCard:
    """Train `config.folds` members, calibrate on their out-of-fold predictions, write the ensemble.

    Writes `out` (.keras) and its card; the members and their logs sit in `<out stem>.folds/`.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    for arch in config.architectures:
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    out = Path(out)
    workdir = out.with_name(out.stem + ".folds")
    if not resume and workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    tf.config.experimental.enable_op_determinism()
    started = time.monotonic()

    prepared = prepare(data_dir, config, report, cache=workdir / "cache")
    classes = list(prepared.dataset.classes)
    # Each architecture's out-of-fold probabilities: shape (architectures, n, classes).
    oof = np.zeros((len(config.architectures), len(prepared.samples), len(classes)), np.float32)
    trained = range(min(config.members, config.folds) or config.folds)
    if config.ship_folds > len(trained):
        raise ValueError(f"cannot ship {config.ship_folds} folds' members: {len(trained)} trained")
    shipped_folds = range(config.ship_folds or len(trained))
    members = []
    for fold in trained:
        for a in range(len(config.architectures)):
            path, held_out = train_member(prepared, fold, config, workdir, report, a)
            oof[a, prepared.folds == fold] = held_out
            if fold in shipped_folds:
                members.append(path)
    np.save(workdir / "oof.npy", oof)

    # The images some member never trained on: all of them with one member per fold.
    held = np.isin(prepared.folds, list(trained))
    # And those that no shipped member trained on (what `evaluate --split validation` reads).
    unseen = ([s for s, f in zip(prepared.samples, prepared.folds, strict=True) if f == 0]
              if len(shipped_folds) == 1 else [])
    samples = [s for s, h in zip(prepared.samples, held, strict=True) if h]
    sources = [s for s, h in zip(prepared.sources, held, strict=True) if h]
    batches = [s.dataset and source_group(s) or batch_of(s.path) for s in samples]
    temperature, threshold, scaled = calibrate(oof[:, held], prepared.labels[held], sources,
                                               batches, classes, config.target_sensitivity)
    # The scope statistics come from images the shipped members trained on: with one shipped
    # member, never its held-out fold.
    trained_on = (prepared.folds != shipped_folds[0] if len(shipped_folds) == 1
                  else np.ones(len(prepared.folds), bool))
    ensemble, scope_distance = assemble(members, temperature, prepared.inputs[trained_on])
    ensemble.save(out)
    seconds = time.monotonic() - started

    figures = held_out_figures(np.mean(oof[:, held], axis=0), scaled, prepared.labels[held],
                               sources, batches, classes, threshold, config.seed,
                               chunk=np.asarray([in_first_chunk(s.path) for s in samples])
                               if config.hold_out_chunk else None)
    report(f"temperature {temperature:.3f}: out-of-fold ECE "
           f"{figures['expected_calibration_error_before_temperature']:.3f} -> "
           f"{figures['expected_calibration_error']:.3f}")
    report(f"alert threshold {threshold:.4f}: same source {figures['melanoma_same_source']}")
    card = ModelCard(
        version=config.version(len(members), prepared.dataset.fingerprint(), dt.date.today()),
        architecture=config.arch,
        classes=classes,
        input_size=list(config.size),
        alert_threshold=threshold,
        target_sensitivity=config.target_sensitivity,
        temperature=temperature,
        members=len(members),
        out_of_scope_distance=scope_distance,
        trained_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        training_set={
            "folder": "+".join(labelled.root.name for labelled in prepared.folders),
            "fingerprint": prepared.dataset.fingerprint(),
            "unique_images": len(prepared.samples),
            "dropped": len(prepared.dataset.dropped),
            "folds": config.folds,
            "fold_sha256": {s.sha256: int(f) for s, f in zip(prepared.samples, prepared.folds,
                                                            strict=True)},
            # What `evaluate --split validation` reads: the images no member trained on.
            **({"validation_sha256": sorted(s.sha256 for s in unseen)} if unseen else {}),
            # The folds whose held-out predictions fitted the temperature and the threshold.
            "calibration_folds": list(trained),
            "class_counts": prepared.dataset.counts(),
            # Each --data folder alone: its fingerprint and counts before merging.
            "sources": folder_summaries(prepared.folders),
        },
        training={**{k_: (list(v) if isinstance(v, tuple) else v)
                     for k_, v in asdict(config).items()},
                  "parameters": int(ensemble.count_params()),
                  "seconds": round(seconds, 1)},
        validation=figures,
    )
    card.write(card_path_for(out))
    return card



def recalibrate(model_path: Path, data_dir: Path, out: Path, *, target_sensitivity: float = 0.95,
                seed: int = 0, report: Reporter = logger.info) -> ModelCard:
    """An existing single model, calibrated on its card's validation split and given a scope.

    The temperature and the same-source threshold are fitted on the validation images (held out
    from its training); the scope statistics on its training images. Writes `out` and its card
    with a new version: the probabilities change, so predictions must say which model made them.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from model import layers  # noqa: F401  registers the custom layers for loading
    from model.scope import scope_threshold

    source_card = ModelCard.read(card_path_for(model_path))
    validation = set(source_card.training_set.get("validation_sha256", []))
    if not validation:
        raise ValueError(f"{model_path}'s card records no validation split to calibrate on")
    dataset = scan_folder(Path(data_dir), tuple(source_card.classes))
    height, width = source_card.input_size
    held, held_samples = load_images([s for s in dataset.samples if s.sha256 in validation],
                                     (height, width), report)
    seen, _ = load_images([s for s in dataset.samples if s.sha256 not in validation],
                          (height, width), report)
    network = keras.models.load_model(model_path, compile=False)
    raw = np.asarray(network.predict(held.astype(np.float32), batch_size=64, verbose=0))
    labels = np.asarray([s.label for s in held_samples])
    sources = [source_of(s.path) for s in held_samples]
    batches = [batch_of(s.path) for s in held_samples]
    classes = list(source_card.classes)
    temperature, threshold, scaled = calibrate(raw, labels, sources, batches, classes,
                                               target_sensitivity)
    model = build_ensemble([network], temperature, fit_scope([network], seen))
    _, distances = model.predict(seen.astype(np.float32), batch_size=64, verbose=0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    figures = held_out_figures(raw, scaled, labels, sources, batches, classes, threshold, seed)
    card = ModelCard(
        version=f"{source_card.version}-cal",
        architecture=source_card.architecture,
        classes=classes,
        input_size=[height, width],
        alert_threshold=threshold,
        target_sensitivity=target_sensitivity,
        temperature=temperature,
        members=1,
        out_of_scope_distance=scope_threshold(np.asarray(distances)),
        trained_at=source_card.trained_at,
        training_set=source_card.training_set,
        training={**source_card.training, "recalibrated_from": source_card.version,
                  "recalibrated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")},
        validation=figures,
    )
    card.write(card_path_for(out))
    report(f"temperature {temperature:.3f}, threshold {threshold:.4f}; same source "
           f"{figures['melanoma_same_source']['auc']}, same batch "
           f"{figures['melanoma_same_batch']['auc']}")
    return card
