"""Training: k-fold members on a folder-per-class set, out-of-fold calibration and threshold, one
shipped ensemble with its card.

The steps, each a function: `prepare` (scan, de-duplicate, folds, decode once), `train_member`
(one fold: fit with stock Keras callbacks, predict the held-out fold), `calibrate` (temperature
and threshold on the out-of-fold predictions), `assemble` (the members averaged into one model)
and `train`, which runs them and writes the card.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from model.architectures import (
    ARCHITECTURES,
    MOBILENET_ARCHITECTURES,
    MOBILENET_BLOCKS,
    freeze_leading_blocks,
)
from model.calibration import calibrate
from model.card import ModelCard, card_path_for
from model.data import batch_of, in_first_chunk, scan_folder, source_of
from model.ensemble import assemble
from model.labels import source_group
from model.metrics import by_source_figures, evaluate_predictions, melanoma_same_source
from model.preparation import (
    Prepared,
    Reporter,
    folder_summaries,
    load_images,
    prepare,
    sample_weights,
)
from model.pretrained import PRETRAINED_SOURCES
from model.recipe import TrainConfig

logger = logging.getLogger(__name__)



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


class Stopwatch:
    """A run's training time over all its stretches: a run stopped and resumed adds the seconds
    of each stretch, kept in `path` (in the run's `.folds` folder) and saved at every epoch's end,
    so a stop loses at most the epoch it interrupted (which training repeats anyway)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.before = float(json.loads(path.read_text())["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            self.before = 0.0
        self.started = time.monotonic()

    def seconds(self) -> float:
        return self.before + time.monotonic() - self.started

    def save(self) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps({"seconds": round(self.seconds(), 1)}))
        partial.replace(self.path)


def _train_dataset(x: np.ndarray, y: np.ndarray, w: np.ndarray, config: TrainConfig,
                   num_classes: int, seed: int, teachers: Sequence[Any] = ()) -> Any:
    """Batches of (augmented images, targets, weights). With `teachers` (loaded models), each
    target is (1 - `config.distill_weight`) of the label and the rest the teachers' averaged
    probabilities for the augmented images of that very batch."""
    import tensorflow as tf

    from model.augment import AUGMENTATIONS

    augment_batch = AUGMENTATIONS[config.augmentation]
    size = config.size
    height, width = x.shape[1:3]

    # One target row per image: the label one-hot, or a soft target (`soft_targets`).
    targets = (y.astype(np.float32) if y.ndim == 2
               else np.eye(num_classes, dtype=np.float32)[y.astype(np.int64)])

    def gather(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return x[indices], targets[indices], w[indices].astype(np.float32)

    def load(indices: Any) -> tuple[Any, Any, Any]:
        # Batches are gathered from the array in place: a dataset built from the array itself
        # would copy it into the graph, which refuses more than 2 GB.
        images, labels, weights = tf.numpy_function(gather, [indices],
                                                    [tf.uint8, tf.float32, tf.float32])
        images.set_shape([None, height, width, 3])
        labels.set_shape([None, num_classes])
        weights.set_shape([None])
        return images, labels, weights

    def teach(images: Any, labels: Any, weights: Any) -> tuple[Any, Any, Any]:
        taught = tf.add_n([class_probabilities(teacher(images, training=False))
                           for teacher in teachers]) / float(len(teachers))
        share = config.distill_weight
        return images, (1.0 - share) * labels + share * tf.cast(taught, tf.float32), weights

    seeds = tf.data.Dataset.random(seed=seed).batch(2)  # one stateless seed per batch
    order = tf.data.Dataset.range(len(x)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    batches = (tf.data.Dataset.zip(order.batch(config.batch_size).map(load), seeds)
               .map(lambda batch, s: (augment_batch(tf.cast(batch[0], tf.float32), s, size),
                                      batch[1], batch[2]),
                    num_parallel_calls=tf.data.AUTOTUNE))
    if teachers:
        # One batch at a time: each call already spreads over the cores.
        batches = batches.map(teach)
    return batches.prefetch(tf.data.AUTOTUNE)


def train_member(prepared: Prepared, fold: int, config: TrainConfig, workdir: Path,
                 report: Reporter, member: int = 0,
                 stopwatch: Stopwatch | None = None) -> tuple[Path, np.ndarray]:
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
        if config.init_from:
            copied = continue_from(model, Path(config.init_from), prepared.samples, held)
            report(f"weights copied into {copied} layers from {config.init_from}")
        elif config.pretrained and arch in PRETRAINED_SOURCES:
            from model.pretrained import load_layer_weights, pretrained_weights

            copied = load_layer_weights(model, pretrained_weights(arch, Path(config.pretrained)))
            report(f"ImageNet weights copied into {copied} layers from {config.pretrained}")
        if config.freeze_blocks:
            frozen = freeze_leading_blocks(model, config.freeze_blocks)
            report(f"the stem and the first {config.freeze_blocks} blocks kept as they start "
                   f"({frozen} layers frozen)")
        x_train, y_train = prepared.loaded[~held], prepared.labels[~held]
        teaching: list[Any] = []
        if config.distill_from:
            teachers = [Path(path) for path in config.distill_from]
            for teacher in teachers:
                check_same_held_out(teacher, prepared.samples, held, "--distill-from")
            if config.distill_consistent:
                if keras.backend.backend() != "tensorflow":
                    raise ValueError("--distill-consistent runs the teachers inside the input "
                                     "pipeline (tf.data): it needs Keras on the TensorFlow "
                                     f"backend, not {keras.backend.backend()}")
                teaching = [keras.models.load_model(path, compile=False) for path in teachers]
                for path, loaded in zip(teachers, teaching, strict=True):
                    classes_out = class_probabilities(loaded.output_shape)[-1]
                    if classes_out != k or tuple(loaded.input_shape[1:3]) != config.size:
                        raise ValueError(f"--distill-from: {path} takes {loaded.input_shape[1:3]} "
                                         f"images into {classes_out} classes, not {config.size} "
                                         f"into {k}")
                how = "each batch as augmented for training"
            else:
                y_train = soft_targets(teachers, prepared.inputs[~held], y_train, k,
                                       config.distill_weight)
                how = "each image and its mirror image"
            report(f"targets mixed with {config.distill_weight:.2f} of the probabilities of "
                   f"{', '.join(map(str, teachers))} ({how}, all averaged)")
        # Cells by acquisition batch: the older archive's early batch has melanomas and nevi, its
        # later one melanomas only, so weighting by batch puts the weight where the two meet.
        sources = [s.dataset or batch_of(s.path)
                   for s, h in zip(prepared.samples, held, strict=True) if not h]
        weights = (sample_weights(y_train, sources, k) if config.source_balanced
                   else np.ones(len(y_train), np.float32))
        steps = math.ceil(len(x_train) / config.batch_size)
        schedule = (keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=steps * config.epochs, warmup_target=config.learning_rate,
            warmup_steps=steps * config.warmup_epochs, alpha=0.02) if config.warmup_epochs
            else keras.optimizers.schedules.CosineDecay(
                config.learning_rate, decay_steps=steps * config.epochs, alpha=0.02))
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
        if stopwatch is not None:
            callbacks.append(keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: stopwatch.save()))
        report(f"fold {fold + 1}/{config.folds} ({arch}): train {int((~held).sum())}, "
               f"held out {int(held.sum())}")
        model.fit(_train_dataset(x_train, y_train, weights, config, k, seed, teaching),
                  epochs=config.epochs, callbacks=callbacks, verbose=0)
        model.save(member_path)
    model = keras.models.load_model(member_path, compile=False)
    held_out = np.asarray(model.predict(prepared.inputs[held].astype(np.float32),
                                        batch_size=64, verbose=0))
    return member_path, held_out


def soup_member(prepared: Prepared, fold: int, paths: list[Path], each: list[np.ndarray],
                workdir: Path, report: Reporter) -> tuple[Path, np.ndarray]:
    """One fold's members averaged weight by weight (`model.ensemble.soup`), its batch-norm
    statistics measured on the fold's training images; returns its path and held-out
    probabilities, and reports the held-out same-source melanoma AUC of each member (`each`:
    their held-out probabilities, as `train_member` returned them), of their averaged outputs
    and of the soup, side by side."""
    import keras

    from model import layers  # noqa: F401  registers the custom layers, to read a soup back
    from model.ensemble import soup

    classes = list(prepared.dataset.classes)
    held = prepared.folds == fold
    path = workdir / f"soup-fold{fold}.keras"
    if not path.is_file():
        soup(paths, prepared.inputs[~held]).save(path)
    x_val = prepared.inputs[held].astype(np.float32)
    val_sources = [s for s, h in zip(prepared.sources, held, strict=True) if h]

    def auc(probabilities: np.ndarray) -> str:
        same = melanoma_same_source(probabilities, prepared.labels[held], val_sources, classes,
                                    0.5, bootstrap=0)
        return f"{same.get('auc') or 0.0:.3f}"

    held_out = np.asarray(keras.models.load_model(path, compile=False).predict(
        x_val, batch_size=64, verbose=0))
    report(f"fold {fold + 1} held-out same-source melanoma AUC: members "
           f"{', '.join(auc(p) for p in each)}; their averaged outputs {auc(np.mean(each, 0))}; "
           f"the soup {auc(held_out)}")
    return path, held_out


def _provenance(source: Path) -> dict[str, Any]:
    """What a continued run started from: the model's version, file digest and recipe."""
    import hashlib

    card = ModelCard.read(card_path_for(source))
    return {"version": card.version,
            "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
            "training": {k: v for k, v in card.training.items() if k != "seconds"}}


def check_same_held_out(source: Path, samples: list[Any], held: np.ndarray, option: str) -> None:
    """Refuse a trained model whose card did not hold out exactly the images `held` marks: one
    that had trained on any of them would pass what it learnt of them on, and this run's
    held-out figures would measure memory."""
    card = ModelCard.read(card_path_for(source))
    validation = set(card.training_set.get("validation_sha256", []))
    here = {s.sha256 for s, h in zip(samples, held, strict=True) if h}
    if validation != here:
        raise ValueError(f"{option}: {source}'s card holds out {len(validation)} images, this "
                         f"run's fold 0 {len(here)} ({len(here - validation)} of them trained on "
                         "there); use only a model trained on the same folds")


def class_probabilities(outputs: Any) -> Any:
    """A trained model's class probabilities from its outputs: the first of them where the model
    also gives its scope distance."""
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def soft_targets(teachers: Sequence[Path], images: np.ndarray, labels: np.ndarray,
                 num_classes: int, weight: float) -> np.ndarray:
    """Training targets for distillation: (1 - weight) of each label one-hot and `weight` of the
    trained models' probabilities for the image, each model's averaged with its mirror image's
    (test-time flips, which no model can afford at run time) and the models' then averaged
    (an ensemble, likewise). `images` at the teachers' input size, values 0..255. Shape
    (n, num_classes), rows summing to 1."""
    import keras

    from model import layers  # noqa: F401  registers the custom layers for loading

    taught = np.zeros((len(images), num_classes), np.float32)
    for teacher in teachers:
        model = keras.models.load_model(teacher, compile=False)
        for start in range(0, len(images), 1024):
            chunk = images[start:start + 1024].astype(np.float32)
            flipped = chunk[:, :, ::-1]
            both = [model.predict(batch, batch_size=64, verbose=0) for batch in (chunk, flipped)]
            plain, mirrored = (np.asarray(class_probabilities(out)) for out in both)
            if plain.shape[1] != num_classes:
                raise ValueError(f"--distill-from: {teacher} has {plain.shape[1]} classes, "
                                 f"not {num_classes}")
            taught[start:start + len(chunk)] += (plain + mirrored) / (2.0 * len(teachers))
    one_hot = np.eye(num_classes, dtype=np.float32)[np.asarray(labels, np.int64)]
    return ((1.0 - weight) * one_hot + weight * taught).astype(np.float32)


def continue_from(model: Any, source: Path, samples: list[Any], held: np.ndarray) -> int:
    """Copy the first network of the trained model `source` into `model`, layer by layer.

    Refuses unless `source`'s card held out exactly the images `held` marks: a network that had
    trained on one of them would make this run's held-out figures a measure of memory.
    Returns the number of layers copied.
    """
    import keras

    from model import layers  # noqa: F401  registers the custom layers for loading

    check_same_held_out(source, samples, held, "--init-from")
    trained = keras.models.load_model(source, compile=False)
    network = next((layer for layer in trained.layers if layer.name == "member_0"), trained)
    copied = 0
    for layer in model.layers:
        if not layer.weights:
            continue
        try:
            theirs = network.get_layer(layer.name)
        except ValueError as exc:
            raise ValueError(f"--init-from: {source} has no layer {layer.name!r}: "
                             "not the same architecture") from exc
        layer.set_weights(theirs.get_weights())
        copied += 1
    return copied


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
    if config.soup and (len(config.architectures) < 2 or len(set(config.architectures)) > 1):
        raise ValueError("a soup averages two or more members of one architecture "
                         f"(--arch {config.architectures[0]}+{config.architectures[0]}), "
                         f"not {config.arch}")
    if config.freeze_blocks and (not set(config.architectures) <= set(MOBILENET_ARCHITECTURES)
                                 or not 0 < config.freeze_blocks <= MOBILENET_BLOCKS):
        raise ValueError(f"--freeze-blocks applies to --arch {' or '.join(MOBILENET_ARCHITECTURES)}, "
                         f"1..{MOBILENET_BLOCKS} blocks, not {config.freeze_blocks} of "
                         f"{config.arch}")
    if config.freeze_blocks and not (config.pretrained or config.init_from):
        raise ValueError("--freeze-blocks keeps blocks at their starting weights: give "
                         "--pretrained or --init-from, or random filters stay random")
    out = Path(out)
    workdir = out.with_name(out.stem + ".folds")
    if not resume and workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    tf.config.experimental.enable_op_determinism()
    stopwatch = Stopwatch(workdir / "seconds.json")

    prepared = prepare(data_dir, config, report, cache=workdir / "cache")
    classes = list(prepared.dataset.classes)
    # Each architecture's out-of-fold probabilities: shape (architectures, n, classes).
    oof = np.zeros((len(config.architectures), len(prepared.samples), len(classes)), np.float32)
    trained = range(min(config.members, config.folds) or config.folds)
    if config.ship_folds > len(trained):
        raise ValueError(f"cannot ship {config.ship_folds} folds' members: {len(trained)} trained")
    shipped_folds = range(config.ship_folds or len(trained))
    souped = np.zeros((1, *oof.shape[1:]), np.float32)
    members = []
    for fold in trained:
        paths, each = [], []
        for a in range(len(config.architectures)):
            path, held_out = train_member(prepared, fold, config, workdir, report, a,
                                          stopwatch)
            oof[a, prepared.folds == fold] = held_out
            paths.append(path)
            each.append(held_out)
        if config.soup:
            path, held_out = soup_member(prepared, fold, paths, each, workdir, report)
            souped[0, prepared.folds == fold] = held_out
            paths = [path]
        if fold in shipped_folds:
            members.extend(paths)
    np.save(workdir / "oof.npy", oof)
    if config.soup:
        oof = souped

    # The images some member never trained on: all of them with one member per fold.
    held = np.isin(prepared.folds, list(trained))
    # And those that no shipped member trained on (what `evaluate --split validation` reads).
    unseen = ([s for s, f in zip(prepared.samples, prepared.folds, strict=True) if f == 0]
              if len(shipped_folds) == 1 else [])
    samples = [s for s, h in zip(prepared.samples, held, strict=True) if h]
    sources = [s for s, h in zip(prepared.sources, held, strict=True) if h]
    batches = [(s.dataset and source_group(s)) or batch_of(s.path) for s in samples]
    temperature, threshold, scaled = calibrate(oof[:, held], prepared.labels[held], sources,
                                               batches, classes, config.target_sensitivity)
    # The scope statistics come from images the shipped members trained on: with one shipped
    # member, never its held-out fold.
    trained_on = (prepared.folds != shipped_folds[0] if len(shipped_folds) == 1
                  else np.ones(len(prepared.folds), bool))
    ensemble, scope_distance = assemble(members, temperature, prepared.inputs[trained_on])
    ensemble.save(out)
    seconds = stopwatch.seconds()
    stopwatch.save()
    started_from = ([a for a in config.architectures if a in PRETRAINED_SOURCES]
                    if config.pretrained else [])

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
                  **({"pretrained_source": PRETRAINED_SOURCES[started_from[0]]}
                     if started_from else {}),
                  **({"continued_from": _provenance(Path(config.init_from))}
                     if config.init_from else {}),
                  **({"distilled_from": [_provenance(Path(path))
                                         for path in config.distill_from]}
                     if config.distill_from else {}),
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
    model, scope_distance = assemble([Path(model_path)], temperature, seen)
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
        out_of_scope_distance=scope_distance,
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
