"""Inference throughput: decode, forward and end-to-end images/s at batch 1 and 32.

The shipped model, the previous shipped model (v1, kept in benchmarks/baseline/) and the seed
network run side by side in one process, one after another for each image size and batch, so
that the noise of a shared machine hits them alike; ratios are the figures to quote. The shipped
model also runs as saved ("unfolded"), without the service's folding of batch normalisation into
the convolutions (`model.folding`); the two are also timed back to back, round by round, which
shows what the folding saves better than the table's separate runs.

    python benchmarks/inference.py [--images 256] [--rounds 3] [--model PATH] [--baseline PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image

from model.architectures import build_seed, count_flops
from model.card import ModelCard, card_path_for
from model.data import ISIC_CLASSES
from model.inference import Classifier

BASELINE = Path(__file__).resolve().parent / "baseline" / "melanoscreen-v1.keras"


def make_jpegs(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """Synthetic lesion-like JPEGs: a dark blob on skin tone with noise, `size` = (width, height)."""
    rng = np.random.default_rng(0)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    paths = []
    for i in range(count):
        cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
        radius = rng.uniform(0.15, 0.3) * min(size)
        blob = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius**2)))[..., None]
        skin = np.array([220, 170, 140], np.float32)
        lesion = np.array([90, 50, 40], np.float32)
        pixels = skin * (1 - blob) + lesion * blob + rng.normal(0, 8, (height, width, 3))
        path = folder / f"lesion-{i:04d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def seed_classifier(folder: Path) -> Classifier:
    """The seed network (weights do not change its speed) behind the same Classifier code path."""
    path = folder / "seed.keras"
    build_seed((180, 180, 3), len(ISIC_CLASSES)).save(path)
    ModelCard(version="seed-untrained", architecture="seed", classes=list(ISIC_CLASSES),
              input_size=[180, 180], alert_threshold=0.5).write(card_path_for(path))
    return Classifier(path)


def rate(work: Callable[[], int], rounds: int) -> float:
    """Median images/s of `work` (which returns how many images it handled) over rounds."""
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        count = work()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def measure(classifier: Classifier, paths: list[Path], batch: int, rounds: int) -> dict[str, float]:
    """Decode, forward and end-to-end images/s for one model at one batch size."""
    arrays = np.stack([classifier.decode(p) for p in paths])
    classifier.predict_arrays(arrays[:batch], batch_size=batch)  # trace once

    def decode() -> int:
        for p in paths:
            classifier.decode(p)
        return len(paths)

    def forward() -> int:
        classifier.predict_arrays(arrays, batch_size=batch)
        return len(arrays)

    def end_to_end() -> int:
        for start in range(0, len(paths), batch):
            classifier.predict(paths[start : start + batch], batch_size=batch)
        return len(paths)

    return {"decode": rate(decode, rounds), "forward": rate(forward, rounds),
            "end_to_end": rate(end_to_end, rounds)}


def paired_forward_ratios(ours: Classifier, theirs: Classifier, paths: list[Path], batch: int,
                          rounds: int) -> list[float]:
    """Per round, `ours` forward rate over `theirs`, the two timed back to back on the same
    arrays, alternating which goes first: a pair shares the load of its moment."""
    arrays = np.stack([ours.decode(p) for p in paths])
    for classifier in (ours, theirs):
        classifier.predict_arrays(arrays[:batch], batch_size=batch)  # trace once

    def seconds(classifier: Classifier) -> float:
        start = time.perf_counter()
        classifier.predict_arrays(arrays, batch_size=batch)
        return time.perf_counter() - start

    ratios = []
    for round_ in range(rounds):
        if round_ % 2:
            theirs_s, ours_s = seconds(theirs), seconds(ours)
        else:
            ours_s, theirs_s = seconds(ours), seconds(theirs)
        ratios.append(theirs_s / ours_s)
    return ratios


def main() -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--baseline", type=Path, default=BASELINE,
                        help="the model to compare with (default: v1)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        small = make_jpegs(folder, args.images, (180, 180))
        (folder / "large").mkdir()
        large = make_jpegs(folder / "large", max(args.images // 4, 32), (1024, 768))
        models = {"shipped": Classifier(args.model), "v1": Classifier(args.baseline),
                  "seed": seed_classifier(folder),
                  "unfolded": Classifier(args.model, fold_normalisation=False)}
        flip = {name: 2 if c.card.test_time_flips else 1 for name, c in models.items()}
        print(f"{os.cpu_count()} CPU cores; {args.images} 180x180 JPEGs and {len(large)} "
              f"1024x768 JPEGs; median of {args.rounds} rounds")
        for name, c in models.items():
            flops = count_flops(c.model) * flip[name]
            print(f"{name:<8} {c.version}: input {c.input_size[0]}x{c.input_size[1]}, "
                  f"{c.model.count_params():,} parameters, {flops / 1e6:.0f} MFLOPs per image"
                  + (" (with test-time flip)" if flip[name] == 2 else ""))
        print(f"{'model':<8}{'images':>10}{'batch':>6}{'decode/s':>10}{'forward/s':>11}"
              f"{'end-to-end/s':>14}")
        results: dict[tuple[str, str, int], dict[str, float]] = {}
        for label, paths in (("180x180", small), ("1024x768", large)):
            for batch in (1, 32):
                for name, c in models.items():
                    figures = measure(c, paths if batch == 32 else paths[:64], batch, args.rounds)
                    results[(name, label, batch)] = figures
                    print(f"{name:<8}{label:>10}{batch:>6}{figures['decode']:>10.0f}"
                          f"{figures['forward']:>11.0f}{figures['end_to_end']:>14.0f}")
        for batch in (1, 32):
            ratios = paired_forward_ratios(models["shipped"], models["unfolded"],
                                           small[: 64 if batch == 1 else len(small)], batch,
                                           max(args.rounds, 7))
            print(f"folded/unfolded forward rate, 180x180, batch {batch}, back to back: median "
                  f"{statistics.median(ratios):.2f}x over {len(ratios)} rounds "
                  f"({min(ratios):.2f}-{max(ratios):.2f})")
        for other in ("v1", "seed", "unfolded"):
            for label in ("180x180", "1024x768"):
                for batch in (1, 32):
                    ours, theirs = results[("shipped", label, batch)], results[(other, label, batch)]
                    print(f"speed ratio shipped/{other}, {label}, batch {batch}: forward "
                          f"{ours['forward'] / theirs['forward']:.2f}x, end-to-end "
                          f"{ours['end_to_end'] / theirs['end_to_end']:.2f}x")


if __name__ == "__main__":
    main()
