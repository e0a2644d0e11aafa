"""Training: data pipeline, the two protocols (MelanoScreen's and the seed's), checkpoints, card."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.architectures import ARCHITECTURES, DEFAULT_INPUT_SIZE
from model.card import ModelCard, card_path_for
from model.data import MELANOMA, LabelledSet, Sample, scan_folder, stratified_split
from model.imaging import DecodeError, decode_image
from model.metrics import (
    crossfit_threshold,
    evaluate_predictions,
    sensitivity_specificity,
    threshold_for_sensitivity,
)

logger = logging.getLogger(__name__)

Reporter = Callable[[str], None]


@dataclass
class TrainConfig:
    """Everything that decides a training run; recorded in the card."""

    arch: str = "melanonet"
    epochs: int = 100
    seed: int = 1337
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    validation_fraction: float = 0.2
    target_sensitivity: float = 0.95
    patience: int = 25
    input_size: tuple[int, int] | None = None
    widths: tuple[int, ...] | None = None  # melanonet block widths; None: the builder's default
    seed_copies_per_class: int = 500


def load_images(samples: list[Sample], size: tuple[int, int],
                report: Reporter) -> tuple[np.ndarray, np.ndarray, list[Sample]]:
    """Decode samples once: uint8, shape (n, H, W, 3); labels int32, shape (n,)."""
    images, labels, kept = [], [], []
    for sample in samples:
        try:
            array = decode_image(sample.path, size)
        except DecodeError as exc:
            report(f"dropped unreadable {sample.path}: {exc.reason}")
            continue
        images.append(array.astype(np.uint8))
        labels.append(sample.label)
        kept.append(sample)
    height, width = size
    stacked = np.stack(images) if images else np.zeros((0, height, width, 3), np.uint8)
    return stacked, np.asarray(labels, dtype=np.int32), kept


def _augmenter(seed: int) -> Any:
    """Dermoscopy-fitting augmentation: orientation is meaningless, colour varies by device."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            layers.RandomFlip("horizontal_and_vertical", seed=seed),
            layers.RandomRotation(0.5, fill_mode="reflect", seed=seed + 1),
            layers.RandomZoom((-0.15, 0.15), fill_mode="reflect", seed=seed + 2),
            layers.RandomBrightness(0.15, value_range=(0, 255), seed=seed + 3),
            layers.RandomContrast(0.2, seed=seed + 4),
        ],
        name="augment",
    )


def _hue_jitter(images: Any, seed: int) -> Any:
    import tensorflow as tf

    return tf.clip_by_value(tf.image.random_hue(images / 255.0, 0.04, seed=seed) * 255.0, 0, 255)


def _seed_rotated_copies(images: np.ndarray, labels: np.ndarray, copies: int,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seed protocol's rebalancing: `copies` images per class rotated by +-10 degrees."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out_images, out_labels = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        for index in rng.choice(members, size=copies, replace=True):
            angle = float(rng.uniform(-10, 10))
            rotated = Image.fromarray(images[index]).rotate(angle, Image.Resampling.BILINEAR)
            out_images.append(np.asarray(rotated))
            out_labels.append(label)
    return np.stack(out_images), np.asarray(out_labels, np.int32)


class _Progress:
    """Per-epoch validation, best-epoch checkpoint, resumable state, and an ETA line."""

    def __init__(self, *, predict: Callable[[], np.ndarray], y_val: np.ndarray,
                 classes: list[str], epochs: int, start_epoch: int, best: float,
                 checkpoint: Path, best_path: Path, state_path: Path, patience: int,
                 report: Reporter, select: bool, seconds_before: float) -> None:
        import keras

        progress = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
                progress._begin(epoch, logs)

            def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
                progress._end(epoch, logs)

        self.callback = Callback()
        self.predict, self.y_val, self.classes = predict, y_val, classes
        self.epochs, self.start_epoch, self.best = epochs, start_epoch, best
        self.checkpoint, self.best_path, self.state_path = checkpoint, best_path, state_path
        self.patience, self.report, self.select = patience, report, select
        self.started = time.monotonic()
        self.seconds_before = seconds_before
        self.epoch_start = self.started
        self.stale = 0

    def _begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.epoch_start = time.monotonic()

    def _end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        logs = logs or {}
        model = self.callback.model
        probabilities = self.predict()
        metrics = evaluate_predictions(probabilities, self.y_val, self.classes, threshold=0.5)
        score = metrics["balanced_accuracy"]
        improved = score > self.best
        if improved or not self.select:
            self.best = max(score, self.best)
            model.save(self.best_path)
            self.stale = 0
        else:
            self.stale += 1
        model.save(self.checkpoint)
        self.state_path.write_text(json.dumps({
            "epoch": epoch + 1, "best": self.best,
            "seconds": self.seconds_before + time.monotonic() - self.started}))
        done = epoch + 1 - self.start_epoch
        per_epoch = (time.monotonic() - self.started) / max(done, 1)
        eta = per_epoch * (self.epochs - epoch - 1)
        auc = metrics["melanoma"]["auc"]
        self.report(
            f"epoch {epoch + 1}/{self.epochs}  loss {logs.get('loss', float('nan')):.4f}  "
            f"val balanced acc {score:.3f}  val acc {metrics['accuracy']:.3f}  "
            f"melanoma AUC {auc if auc is None else round(auc, 3)}  "
            f"{time.monotonic() - self.epoch_start:.0f}s  ETA {eta / 60:.1f} min"
            + ("  *best" if improved else "")
        )
        if self.select and self.stale >= self.patience:
            self.report(f"early stop: no better balanced accuracy for {self.patience} epochs")
            model.stop_training = True


def train(data_dir: Path, out: Path, config: TrainConfig, *, resume: bool = True,
          report: Reporter = logger.info) -> ModelCard:
    """Train `config.arch` on a folder-per-class set and write `out` (.keras) and its card."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    if config.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {config.arch!r}; choose from {sorted(ARCHITECTURES)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()

    dataset: LabelledSet = scan_folder(Path(data_dir))
    for folder in dataset.unknown_folders:
        report(f"skipped folder {folder!r}: not one of the model's classes")
    for item in dataset.dropped:
        report(f"dropped {item.path.relative_to(dataset.root)}: {item.reason}")
    train_samples, val_samples = stratified_split(
        dataset.samples, config.validation_fraction, config.seed)
    report(f"{len(dataset.samples)} unique images after dropping {len(dataset.dropped)}; "
           f"train {len(train_samples)}, validation {len(val_samples)}")

    size = tuple(config.input_size or DEFAULT_INPUT_SIZE[config.arch])
    height, width = size
    x_train, y_train, train_samples = load_images(train_samples, (height, width), report)
    x_val, y_val, val_samples = load_images(val_samples, (height, width), report)
    classes = list(dataset.classes)
    k = len(classes)
    if MELANOMA in classes and not (y_val == classes.index(MELANOMA)).any():
        raise ValueError("the validation split has no melanoma: cannot set an alert threshold")

    seed_protocol: dict[str, Any] = {}
    if config.arch == "seed":
        # The seed's protocol: rotated copies rebalance the classes, then a random 80/20 split
        # of that pool, so copies of one lesion sit on both sides. Its held-out fifth is kept
        # to report the seed's own (inflated) validation accuracy beside the honest one.
        x_copies, y_copies = _seed_rotated_copies(
            x_train, y_train, config.seed_copies_per_class, config.seed)
        x_pool = np.concatenate([x_train, x_copies])
        y_pool = np.concatenate([y_train, y_copies])
        order = np.random.default_rng(config.seed).permutation(len(x_pool))
        cut = int(len(order) * 0.8)
        x_train, y_train = x_pool[order[:cut]], y_pool[order[:cut]]
        x_pool_val, y_pool_val = x_pool[order[cut:]], y_pool[order[cut:]]
        seed_protocol = {"pool": len(x_pool), "pool_validation": len(x_pool_val)}

    builder_options = {"widths": tuple(config.widths)} if config.widths else {}
    model = ARCHITECTURES[config.arch]((height, width, 3), k, **builder_options)
    steps = math.ceil(len(x_train) / config.batch_size)
    if config.arch == "seed":
        optimizer: Any = keras.optimizers.Adam()
        loss: Any = keras.losses.SparseCategoricalCrossentropy()
        class_weight = None
        train_ds = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
                    .shuffle(len(x_train), seed=config.seed)
                    .batch(config.batch_size)
                    .map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
                    .prefetch(tf.data.AUTOTUNE))
    else:
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=steps * config.epochs, warmup_target=config.learning_rate,
            warmup_steps=steps * 3, alpha=0.02)
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
        counts = np.bincount(y_train, minlength=k).astype(float)
        # Balanced weights, softened by a square root so the rarest classes don't dominate.
        weights = np.sqrt(counts.sum() / (k * np.maximum(counts, 1)))
        class_weight = {i: float(w) for i, w in enumerate(weights)}
        augment = _augmenter(config.seed)
        train_ds = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
                    .shuffle(len(x_train), seed=config.seed, reshuffle_each_iteration=True)
                    .batch(config.batch_size)
                    .map(lambda x, y: (_hue_jitter(augment(tf.cast(x, tf.float32), training=True),
                                                   config.seed), tf.one_hot(y, k)),
                         num_parallel_calls=tf.data.AUTOTUNE)
                    .prefetch(tf.data.AUTOTUNE))
    model.compile(optimizer=optimizer, loss=loss)

    checkpoint = out.with_name(out.stem + ".last.keras")
    best_path = out.with_name(out.stem + ".best.keras")
    state_path = out.with_name(out.stem + ".state.json")
    start_epoch, best, seconds_before = 0, -1.0, 0.0
    if resume and checkpoint.is_file() and state_path.is_file():
        state = json.loads(state_path.read_text())
        start_epoch, best = int(state["epoch"]), float(state["best"])
        seconds_before = float(state.get("seconds", 0.0))
        model = keras.models.load_model(checkpoint)
        report(f"resuming from epoch {start_epoch} (best balanced accuracy {best:.3f})")

    x_val_f = x_val.astype(np.float32)

    def predict_val() -> np.ndarray:
        return np.asarray(model.predict(x_val_f, batch_size=64, verbose=0))

    progress = _Progress(predict=predict_val, y_val=y_val, classes=classes,
                         epochs=config.epochs, start_epoch=start_epoch, best=best,
                         checkpoint=checkpoint, best_path=best_path, state_path=state_path,
                         patience=config.patience, report=report,
                         select=config.arch != "seed", seconds_before=seconds_before)
    started = time.monotonic()
    if start_epoch < config.epochs:
        model.fit(train_ds, epochs=config.epochs, initial_epoch=start_epoch,
                  class_weight=class_weight, callbacks=[progress.callback], verbose=0,
                  shuffle=False)  # the tf.data pipeline shuffles, seeded
    seconds = seconds_before + time.monotonic() - started  # all sessions of a resumed run

    model = keras.models.load_model(best_path, compile=False)
    model.save(out)
    x = tf.constant(x_val_f)
    plain = np.asarray(model.predict(x, batch_size=64, verbose=0))
    flipped = np.asarray(model.predict(tf.image.flip_left_right(x), batch_size=64, verbose=0))
    averaged = (plain + flipped) / 2.0
    m = classes.index(MELANOMA)
    is_mel = y_val == m
    plain_metrics = evaluate_predictions(plain, y_val, classes, 0.5)
    avg_metrics = evaluate_predictions(averaged, y_val, classes, 0.5)
    use_flips = config.arch != "seed" and (
        avg_metrics["balanced_accuracy"] >= plain_metrics["balanced_accuracy"])
    probabilities = averaged if use_flips else plain
    threshold = threshold_for_sensitivity(is_mel, probabilities[:, m], config.target_sensitivity)
    metrics = evaluate_predictions(probabilities, y_val, classes, threshold)
    metrics["melanoma"]["threshold_set_on_other_half"] = crossfit_threshold(
        is_mel, probabilities[:, m], config.target_sensitivity, config.seed)
    sens, spec = sensitivity_specificity(is_mel, probabilities[:, m], threshold)
    report(f"alert threshold {threshold:.4f}: validation melanoma sensitivity {sens:.3f}, "
           f"specificity {spec:.3f}; balanced accuracy {metrics['balanced_accuracy']:.3f}")
    if seed_protocol:
        pool_pred = np.asarray(model.predict(x_pool_val.astype(np.float32), batch_size=64,
                                             verbose=0)).argmax(axis=1)
        seed_protocol["seed_protocol_validation_accuracy"] = float((pool_pred == y_pool_val).mean())
        report("seed protocol's own validation accuracy (copies on both sides, inflated): "
               f"{seed_protocol['seed_protocol_validation_accuracy']:.3f}")

    card = ModelCard(
        version=f"{config.arch}-{dt.date.today():%Y%m%d}-{dataset.fingerprint()[:8]}-s{config.seed}",
        architecture=config.arch,
        classes=classes,
        input_size=[height, width],
        alert_threshold=threshold,
        test_time_flips=use_flips,
        target_sensitivity=config.target_sensitivity,
        trained_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        training_set={
            "folder": str(Path(data_dir).name),
            "fingerprint": dataset.fingerprint(),
            "unique_images": len(dataset.samples),
            "dropped": len(dataset.dropped),
            "train": len(train_samples),
            "validation": len(val_samples),
            "validation_sha256": sorted(s.sha256 for s in val_samples),
            "class_counts": dataset.counts(),
        },
        training={**{k_: (list(v) if isinstance(v, tuple) else v)
                     for k_, v in config.__dict__.items()},
                  "parameters": int(model.count_params()),
                  "seconds": round(seconds, 1),
                  "without_test_time_flips_balanced_accuracy": plain_metrics["balanced_accuracy"],
                  **seed_protocol},
        validation=metrics,
    )
    card.write(card_path_for(out))
    return card
