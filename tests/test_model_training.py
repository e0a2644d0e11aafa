"""Architectures, a short training run end to end, inference and Grad-CAM on what it saved."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from model.architectures import build_efficientnet_lite0, build_melanonet, build_seed, count_flops
from model.card import ModelCard, card_path_for, shipped_model_path
from model.data import ISIC_CLASSES, sha256_file
from model.imaging import DecodeError
from model.inference import Classifier
from model.recipe import TrainConfig
from model.train import train
from tests.conftest import class_coloured_pixels, write_class_coloured_set


@pytest.mark.parametrize(("builder", "shape"), [(build_seed, (180, 180, 3)),
                                                (build_melanonet, (160, 160, 3)),
                                                (build_melanonet, (64, 48, 3)),
                                                (build_efficientnet_lite0, (64, 64, 3))])
def test_architectures_map_images_to_nine_probabilities(builder: object, shape: tuple) -> None:
    model = builder(shape, 9)  # type: ignore[operator]
    assert model.input_shape == (None, *shape)
    assert model.output_shape == (None, 9)
    out = np.asarray(model(np.zeros((2, *shape), np.float32), training=False))
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    assert count_flops(model) > 0


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine classes of 6 synthetic 40x40 'lesions', each class its own colour."""
    return write_class_coloured_set(tmp_path_factory.mktemp("tiny-set"), per_class=6, seed=0)


CONFIG = TrainConfig(arch="melanonet2", augmentation="heavy", members=0, epochs=2, folds=3,
                     batch_size=8, input_size=(32, 32), seed=3)


@pytest.fixture(scope="module")
def trained(tiny_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny.keras"
    train(tiny_set, out, CONFIG, report=lambda line: None)
    return out


def test_a_model_version_changes_with_any_setting_and_only_then() -> None:
    day = dt.date(2026, 11, 26)
    base = TrainConfig(arch="melanonet+melanonet-cc", label_smoothing=0.1)
    version = base.version(2, "b79cf4874970aa", day)
    assert version.startswith("melanonet+melanonet-cc-x2-20261126-b79cf487-s1337-c")
    assert TrainConfig(arch="melanonet+melanonet-cc", label_smoothing=0.1).version(
        2, "b79cf4874970aa", day) == version
    # Same architecture, data, day and seed: before, these two runs shared one version.
    assert TrainConfig(arch="melanonet+melanonet-cc", label_smoothing=0.0).version(
        2, "b79cf4874970aa", day) != version
    assert TrainConfig(arch="melanonet+melanonet-cc", epochs=59).version(
        2, "b79cf4874970aa", day) != version


def test_a_cross_validated_run_saves_one_ensemble_and_a_card_that_load_again(
        trained: Path, tiny_set: Path) -> None:
    card = ModelCard.read(card_path_for(trained))
    assert card.classes == list(ISIC_CLASSES)
    assert card.input_size == [32, 32]
    assert card.members == 3
    assert 0.0 <= card.alert_threshold <= 1.0
    assert card.temperature > 0 and card.out_of_scope_distance is not None
    assert len(card.training_set["fingerprint"]) == 64
    # Every image was held out once: the card's figures are out of fold, over all 54.
    assert card.validation["n"] == len(card.training_set["fold_sha256"]) == 54
    assert sorted(set(card.training_set["fold_sha256"].values())) == [0, 1, 2]
    assert card.validation["melanoma_same_source"]["sensitivity"] >= 0.95
    assert "expected_calibration_error_before_temperature" in card.validation
    # The card records the recipe whole: `train --config` reads it back as it was.
    assert TrainConfig.from_card(card) == CONFIG

    classifier = Classifier(trained)
    images = sorted((tiny_set / "melanoma").iterdir())[:3]
    results = classifier.predict([images[0], b"not an image", *images[1:]])
    assert isinstance(results[1], DecodeError)
    for result in [results[0], *results[2:]]:
        assert not isinstance(result, DecodeError)
        assert len(result.probabilities) == 9
        assert sum(result.probabilities) == pytest.approx(1.0, abs=1e-5)
        assert result.melanoma_probability == result.probabilities[3]
        assert result.scope_distance is not None and result.scope_distance > 0


def test_training_is_deterministic_for_a_seed(trained: Path, tiny_set: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.keras"
    train(tiny_set, again, CONFIG, report=lambda line: None)
    image = next((tiny_set / "nevus").iterdir())
    first = Classifier(trained).predict([image])[0]
    second = Classifier(again).predict([image])[0]
    assert not isinstance(first, DecodeError) and not isinstance(second, DecodeError)
    np.testing.assert_allclose(first.probabilities, second.probabilities, atol=1e-6)


def test_a_finished_member_is_read_back_not_trained_again(trained: Path, tiny_set: Path) -> None:
    lines: list[str] = []
    image = next((tiny_set / "nevus").iterdir())
    before = Classifier(trained).predict([image])[0]
    train(tiny_set, trained, CONFIG, report=lines.append)
    assert not any(line.startswith(("fold ", "epoch ")) for line in lines)
    after = Classifier(trained).predict([image])[0]
    assert not isinstance(before, DecodeError) and not isinstance(after, DecodeError)
    np.testing.assert_allclose(before.probabilities, after.probabilities, atol=1e-6)


def test_train_without_options_trains_the_shipped_recipe_and_names_what_it_lacks(
        tmp_path: Path) -> None:
    shipped = TrainConfig.from_card(ModelCard.read(card_path_for(shipped_model_path())))
    assert shipped == TrainConfig()
    run = subprocess.run(
        [sys.executable, "-m", "melanoscreen", "train", "--data", str(tmp_path),
         "--out", str(tmp_path / "m.keras")], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("error: --pretrained:")
    assert "Traceback" not in run.stderr


def test_predict_and_evaluate_commands_print_probabilities_and_contract_json(
        trained: Path, tiny_set: Path, tmp_path: Path) -> None:
    image = next((tiny_set / "melanoma").iterdir())
    explain = tmp_path / "explain"
    run = subprocess.run(
        [sys.executable, "-m", "melanoscreen", "predict", str(image), "--model", str(trained),
         "--json", "--explain", str(explain)], capture_output=True, text=True, check=True)
    [row] = json.loads(run.stdout)
    assert set(row["probabilities"]) == set(ISIC_CLASSES)
    assert row["threshold"] == ModelCard.read(card_path_for(trained)).alert_threshold
    assert row["out_of_scope"] in (True, False)
    overlay = Image.open(row["explanation"])
    assert overlay.size == (32, 32)

    run = subprocess.run(
        [sys.executable, "-m", "melanoscreen", "evaluate", "--data", str(tiny_set), "--model",
         str(trained), "--json", "--report", str(tmp_path / "report")],
        capture_output=True, text=True, check=True)
    figures = json.loads(run.stdout)
    for key in ("n", "classes", "accuracy", "balanced_accuracy", "per_class", "confusion_matrix"):
        assert key in figures
    assert figures["n"] == 54
    assert set(figures["melanoma"]) >= {"auc", "threshold", "sensitivity", "specificity"}
    assert figures["by_source"]["unknown"]["n"] == 54  # synthetic names carry no ISIC id
    assert figures["melanoma_same_source"]["melanomas"] == 6
    assert np.asarray(figures["confusion_matrix"]).sum() == 54
    for name in ("confusion_matrix.png", "melanoma_roc.png", "calibration.png"):
        assert Image.open(tmp_path / "report" / name).size[0] > 100


def test_evaluating_a_table_reports_each_dataset_and_the_test_set_beside_the_challenge(
        trained: Path, tiny_set: Path) -> None:
    rows = ["file,label,dataset,lesion_id,sha256"]
    for i, path in enumerate(sorted(tiny_set.rglob("*.png"))):
        dataset = ("ISIC2017-test", "HAM10000", "course")[i % 3]
        rows.append(f"{path.relative_to(tiny_set)},{path.parent.name},{dataset},,"
                    f"{sha256_file(path)}")
    table = tiny_set / "labels.csv"
    table.write_text("\n".join(rows) + "\n")

    run = subprocess.run(
        [sys.executable, "-m", "melanoscreen", "evaluate", "--data", str(table), "--model",
         str(trained), "--json"], capture_output=True, text=True, check=True)
    figures = json.loads(run.stdout)

    assert sorted(figures["by_dataset"]) == ["HAM10000", "ISIC2017-test", "course"]
    assert sum(row["n"] for row in figures["by_dataset"].values()) == figures["n"] == 54
    test = figures["isic2017_test"]
    assert test["n"] == 18 and test["melanomas"] == 2
    assert test["challenge_best_auc"] == pytest.approx(0.87)
    assert len(test["auc_interval"]) == 2 and test["auc_interval"][0] <= test["auc_interval"][1]
    assert 0 <= test["melanomas_emailed"] <= test["emailed"] <= test["n"]

    # A model trained on the table with one member: its validation split is the held-out fold,
    # on which evaluate sets training's threshold again, then again on redraws of those images.
    one = tiny_set.parent / "one-member.keras"
    card = train(table, one, replace(CONFIG, members=1, folds=2), report=lambda line: None)
    run = subprocess.run(
        [sys.executable, "-m", "melanoscreen", "evaluate", "--data", str(table), "--model",
         str(one), "--split", "validation", "--json"], capture_output=True, text=True, check=True)
    stability = json.loads(run.stdout)["threshold_stability"]
    assert stability["n"] == card.validation["n"]  # the held-out fold, never the test set
    assert stability["threshold"] == pytest.approx(card.alert_threshold, rel=1e-4)
    low, high = stability["threshold_interval"]
    assert low <= stability["threshold"] * (1 + 1e-4) and high >= stability["threshold"] * (1 - 1e-4)


def test_predict_says_why_an_image_is_unreadable(trained: Path, tmp_path: Path) -> None:
    bad = tmp_path / "empty.jpg"
    bad.write_bytes(b"")
    run = subprocess.run([sys.executable, "-m", "melanoscreen", "predict", str(bad),
                          "--model", str(trained)], capture_output=True, text=True)
    assert run.returncode == 2
    assert "empty file" in run.stdout
    assert "Traceback" not in run.stderr


def _set_with_a_first_chunk(root: Path) -> set[str]:
    """Six images a class; half the melanomas and nevi inside the first chunk (ids 100..102 and
    0..2). Returns the chunk's file names."""
    rng = np.random.default_rng(1)
    chunk_names: set[str] = set()
    for c, name in enumerate(ISIC_CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(6):
            # Melanomas and nevi: half of them inside the first chunk.
            number = {"melanoma": 100, "nevus": 0}.get(name, 300 + 10 * c) + i
            number += 0 if i < 3 or name not in ("melanoma", "nevus") else 500
            file = root / name / f"ISIC_{number:07d}.png"
            Image.fromarray(class_coloured_pixels(c, rng)).save(file)
            if number < 200:
                chunk_names.add(file.name)
    return chunk_names


def test_one_fold_of_two_architectures_with_the_first_chunk_held_out_never_trains_on_it(
        tmp_path: Path) -> None:
    """--members 1 --hold-out-chunk --arch a+b: one fold's two networks, averaged, calibrated and
    measured on the held-out fold, which holds every image of the early batch's first 200 ids."""
    root = tmp_path / "set"
    chunk_names = _set_with_a_first_chunk(root)
    out = tmp_path / "one.keras"
    config = TrainConfig(arch="melanonet+melanonet-cc", epochs=1, folds=3, batch_size=8,
                         input_size=(32, 32), seed=5, members=1, hold_out_chunk=True,
                         augmentation="mild")
    card = train(root, out, config, report=lambda line: None)

    assert card.members == 2
    assert sorted(p.name for p in (tmp_path / "one.folds").glob("*fold0.keras")) == [
        "melanonet-cc-fold0.keras", "melanonet-fold0.keras"]
    folds = card.training_set["fold_sha256"]
    validation = set(card.training_set["validation_sha256"])
    assert validation == {sha for sha, fold in folds.items() if fold == 0}
    chunk_hashes = {sha256_file(p) for p in root.rglob("*.png") if p.name in chunk_names}
    assert chunk_hashes <= validation
    assert card.validation["n"] == len(validation) < len(folds)
    assert card.validation["melanoma_unseen_chunk"]["n"] == len(chunk_hashes) == 6
    assert card.validation["melanoma_unseen_chunk"]["melanomas"] == 3
    assert Classifier(out).card.members == 2


def test_folds_trained_only_for_calibration_are_not_shipped(tmp_path: Path) -> None:
    """--members 2 --ship-folds 1: two folds' members trained, both folds' held-out predictions
    fit the temperature and the threshold, only fold 0's member is in the saved model."""
    root = tmp_path / "set"
    _set_with_a_first_chunk(root)
    out = tmp_path / "shipped.keras"
    config = TrainConfig(arch="melanonet", epochs=1, folds=3, batch_size=8, input_size=(32, 32),
                         seed=5, members=2, ship_folds=1, hold_out_chunk=True, augmentation="mild")
    card = train(root, out, config, report=lambda line: None)

    assert sorted(p.name for p in (tmp_path / "shipped.folds").glob("fold?.keras")) == [
        "fold0.keras", "fold1.keras"]
    assert card.members == 1
    assert Classifier(out).card.members == 1
    folds = card.training_set["fold_sha256"]
    assert card.training_set["calibration_folds"] == [0, 1]
    assert card.validation["n"] == sum(1 for fold in folds.values() if fold in (0, 1))
    # What no shipped member saw: fold 0 alone, which `evaluate --split validation` reads.
    assert set(card.training_set["validation_sha256"]) == {
        sha for sha, fold in folds.items() if fold == 0}
    with pytest.raises(ValueError, match="cannot ship 3 folds"):
        train(root, tmp_path / "more.keras",
              TrainConfig(arch="melanonet", epochs=1, folds=3, members=2, ship_folds=3),
              report=lambda line: None)


def test_a_continued_run_starts_from_the_models_network_and_refuses_other_folds(
        tmp_path: Path) -> None:
    """--init-from: the member starts from the trained model's network (zero further epochs of
    learning leave its held-out predictions where they were), the card says what it continued;
    a model that held out other images is refused, since its training images would be counted
    as held out here."""
    root = tmp_path / "set"
    _set_with_a_first_chunk(root)
    first = tmp_path / "first.keras"
    config = TrainConfig(arch="melanonet", epochs=1, folds=3, batch_size=8, input_size=(32, 32),
                         seed=5, members=1, augmentation="mild")
    first_card = train(root, first, config, report=lambda line: None)

    lines: list[str] = []
    again = tmp_path / "again.keras"
    card = train(root, again, replace(config, init_from=str(first), learning_rate=0.0,
                                      warmup_epochs=0), report=lines.append)
    assert any(line.startswith("weights copied into") for line in lines)
    assert card.training["continued_from"]["version"] == first_card.version
    assert card.training["continued_from"]["training"]["epochs"] == 1
    assert card.validation["n"] == first_card.validation["n"]
    # With a zero learning rate the kernels stay the first network's trained ones (a fresh start
    # from the same seed would hold its initial ones; only batch-norm statistics move).
    import keras

    theirs = keras.models.load_model(tmp_path / "first.folds" / "fold0.keras", compile=False)
    ours = keras.models.load_model(tmp_path / "again.folds" / "fold0.keras", compile=False)
    kernels = [layer.name for layer in ours.layers if isinstance(layer, keras.layers.Conv2D)]
    assert kernels
    for name in kernels:
        np.testing.assert_array_equal(ours.get_layer(name).get_weights()[0],
                                      theirs.get_layer(name).get_weights()[0])

    other = tmp_path / "other.keras"
    train(root, other, replace(config, seed=6), report=lambda line: None)
    with pytest.raises(ValueError, match=r"--init-from: .* holds out"):
        train(root, tmp_path / "mixed.keras", replace(config, init_from=str(other)),
              report=lambda line: None)


def test_frozen_blocks_keep_their_starting_weights_while_the_rest_learns(tmp_path: Path) -> None:
    """--freeze-blocks N: MobileNet's stem and first N blocks leave training exactly as they
    started, batch-norm statistics included; the blocks above them learn. Freezing needs a start
    worth keeping and MobileNet's blocks; otherwise the run is refused before it trains. Here
    the frozen run is MobileNet behind colour constancy (`mobilenet-cc`), which starts from a
    plain MobileNet's weights and is served like any other model."""
    import keras

    from model.layers import ShadesOfGray

    root = tmp_path / "set"
    _set_with_a_first_chunk(root)
    config = TrainConfig(arch="mobilenet", epochs=1, folds=3, batch_size=8, input_size=(32, 32),
                         seed=5, members=1, augmentation="mild", warmup_epochs=0)
    first = tmp_path / "first.keras"
    train(root, first, config, report=lambda line: None)

    lines: list[str] = []
    card = train(root, tmp_path / "frozen.keras",
                 replace(config, arch="mobilenet-cc", init_from=str(first), freeze_blocks=5),
                 report=lines.append)
    assert card.training["freeze_blocks"] == 5
    assert card.architecture == "mobilenet-cc"
    served = Classifier(tmp_path / "frozen.keras")
    probabilities = served.predict_arrays(np.full((2, 32, 32, 3), 120.0, np.float32))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert any("the first 5 blocks kept as they start (22 layers frozen)" in line
               for line in lines)
    theirs = keras.models.load_model(tmp_path / "first.folds" / "fold0.keras", compile=False)
    ours = keras.models.load_model(tmp_path / "frozen.folds" / "fold0.keras", compile=False)
    assert isinstance(ours.get_layer("colour_constancy"), ShadesOfGray)
    for name in ("conv1", "conv1_bn", "conv_dw_1", "conv_pw_5", "conv_pw_5_bn"):
        for mine, start in zip(ours.get_layer(name).get_weights(),
                               theirs.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(mine, start)
    for name in ("conv_dw_6", "conv_pw_13", "probabilities"):
        assert not np.array_equal(ours.get_layer(name).get_weights()[0],
                                  theirs.get_layer(name).get_weights()[0])

    with pytest.raises(ValueError, match="--freeze-blocks keeps blocks at their starting"):
        train(root, tmp_path / "random.keras", replace(config, freeze_blocks=5),
              report=lambda line: None)
    with pytest.raises(ValueError, match="--freeze-blocks applies to --arch mobilenet"):
        train(root, tmp_path / "other.keras",
              replace(config, arch="melanonet", init_from=str(first), freeze_blocks=5),
              report=lambda line: None)
    with pytest.raises(ValueError,
                       match=r"--freeze-blocks applies to --arch mobilenet or mobilenet-cc, 1\.\.13"):
        train(root, tmp_path / "many.keras", replace(config, freeze_blocks=14),
              report=lambda line: None)


def test_a_soup_averages_its_members_weights_and_measures_batch_norm_again(tmp_path: Path) -> None:
    """Two networks of one architecture: the soup's kernels are their mean, and each batch-norm
    layer's moving mean is the mean of its batch means over the images given (not the members'
    averaged statistics, which describe other activations)."""
    import keras

    from model.ensemble import soup

    paths = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        network = build_melanonet((32, 32, 3), 9)
        # Moving statistics far from the images', as a trained member's would be.
        for layer in network.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.moving_mean.assign(np.full(layer.moving_mean.shape, 5.0 * seed, np.float32))
        paths.append(tmp_path / f"member{seed}.keras")
        network.save(paths[-1])
    members = [keras.models.load_model(p, compile=False) for p in paths]
    images = np.random.default_rng(0).uniform(0, 255, (20, 32, 32, 3)).astype(np.uint8)

    averaged = soup(paths, images, batch_size=8)

    conv = next(layer.name for layer in averaged.layers if isinstance(layer, keras.layers.Conv2D))
    np.testing.assert_allclose(
        averaged.get_layer(conv).get_weights()[0],
        (members[0].get_layer(conv).get_weights()[0]
         + members[1].get_layer(conv).get_weights()[0]) / 2, rtol=1e-6)
    norm = next(layer for layer in averaged.layers
                if isinstance(layer, keras.layers.BatchNormalization))
    probe = keras.Model(averaged.input, norm.input)
    # Two equal batches of 8 (the last 4 images make no third batch).
    batch_means = [np.asarray(probe(images[i:i + 8].astype(np.float32))).mean(axis=(0, 1, 2))
                   for i in (0, 8)]
    np.testing.assert_allclose(np.asarray(norm.moving_mean), np.mean(batch_means, axis=0),
                               rtol=1e-4, atol=1e-4)
    assert norm.momentum == 0.99  # the layer's own momentum is given back


def test_a_souped_run_ships_one_network_of_one_members_cost(tmp_path: Path) -> None:
    root = tmp_path / "set"
    _set_with_a_first_chunk(root)
    out = tmp_path / "soup.keras"
    config = TrainConfig(arch="melanonet+melanonet", soup=True, epochs=1, folds=3, batch_size=8,
                         input_size=(32, 32), seed=5, members=1, augmentation="mild")
    lines: list[str] = []
    card = train(root, out, config, report=lines.append)

    assert card.members == 1
    assert sorted(p.name for p in (tmp_path / "soup.folds").glob("*fold0.keras")) == [
        "melanonet-2-fold0.keras", "melanonet-fold0.keras", "soup-fold0.keras"]
    assert any("the soup" in line for line in lines)
    single = build_melanonet((32, 32, 3), 9).count_params()
    assert Classifier(out).card.members == 1
    assert card.training["soup"] is True
    # The shipped model holds one network (and the scope's statistics), not two.
    assert card.training["parameters"] < 2 * single
    with pytest.raises(ValueError, match="one architecture"):
        train(root, tmp_path / "mixed.keras", replace(config, arch="melanonet+seed"),
              report=lambda line: None)


def test_distillation_mixes_the_teachers_mirrored_probabilities_into_the_targets(
        tmp_path: Path) -> None:
    """--distill-from: each training image's target is (1 - w) of its label and w of the
    teachers' probabilities for it and its mirror image, all averaged; the card names the
    teachers; a teacher that held out other images is refused, since the student would learn
    from it what the teacher learnt of this run's held-out images."""
    from model.train import soft_targets

    root = tmp_path / "set"
    _set_with_a_first_chunk(root)
    teacher = tmp_path / "teacher.keras"
    config = TrainConfig(arch="melanonet", epochs=1, folds=3, batch_size=8, input_size=(32, 32),
                         seed=5, members=1, augmentation="mild")
    teacher_card = train(root, teacher, config, report=lambda line: None)

    images = np.random.default_rng(2).uniform(0, 255, (5, 32, 32, 3)).astype(np.uint8)
    labels = np.array([0, 1, 2, 3, 4])
    other = tmp_path / "other.keras"
    train(root, other, replace(config, seed=6), report=lambda line: None)

    def flipped_average(path: Path) -> np.ndarray:
        classifier = Classifier(path)
        plain = classifier.predict_arrays(images.astype(np.float32))
        mirrored = classifier.predict_arrays(images[:, :, ::-1].astype(np.float32))
        assert not np.allclose(plain, mirrored, atol=1e-4)  # the mirror image changes something
        return (plain + mirrored) / 2

    expected_teacher, expected_other = flipped_average(teacher), flipped_average(other)
    assert not np.allclose(expected_teacher, expected_other, atol=1e-4)
    np.testing.assert_allclose(soft_targets([teacher], images, labels, 9, 1.0), expected_teacher,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(soft_targets([teacher, other], images, labels, 9, 1.0),
                               (expected_teacher + expected_other) / 2, rtol=1e-4, atol=1e-6)
    mixed = soft_targets([teacher], images, labels, 9, 0.25)
    np.testing.assert_allclose(mixed, 0.75 * np.eye(9)[labels] + 0.25 * expected_teacher,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0, rtol=1e-5)

    lines: list[str] = []
    card = train(root, tmp_path / "student.keras",
                 replace(config, distill_from=(str(teacher),), distill_weight=0.5),
                 report=lines.append)
    assert [source["version"] for source in card.training["distilled_from"]] == [
        teacher_card.version]
    assert any(line.startswith("targets mixed with 0.50") for line in lines)

    with pytest.raises(ValueError, match=r"--distill-from: .* holds out"):
        train(root, tmp_path / "refused.keras",
              replace(config, distill_from=(str(teacher), str(other))),
              report=lambda line: None)


def test_consistent_distillation_teaches_on_the_batch_as_the_student_sees_it(
        tmp_path: Path) -> None:
    """--distill-consistent: the teachers score each augmented batch, so every target is
    (1 - w) of the label and w of the teachers' averaged probabilities for exactly the images
    of that batch; a run records it in the card."""
    import keras

    from model import layers  # noqa: F401  registers the custom layers for loading
    from model.train import _train_dataset

    root = tmp_path / "set"
    _set_with_a_first_chunk(root)
    config = TrainConfig(arch="melanonet", epochs=1, folds=3, batch_size=8, input_size=(32, 32),
                         seed=5, members=1, augmentation="heavy")
    first, second = tmp_path / "first.keras", tmp_path / "second.keras"
    train(root, first, config, report=lambda line: None)
    train(root, second, replace(config, seed=6), report=lambda line: None)
    teachers = [keras.models.load_model(path, compile=False) for path in (first, second)]

    images = np.random.default_rng(2).uniform(0, 255, (8, 36, 36, 3)).astype(np.uint8)
    labels = np.arange(8) % 9
    weights = np.ones(8, np.float32)
    recipe = replace(config, distill_weight=0.25)
    plain_images, one_hot, _ = next(iter(_train_dataset(images, labels, weights, recipe, 9, 3)))
    taught_images, targets, _ = next(iter(
        _train_dataset(images, labels, weights, recipe, 9, 3, teachers)))
    np.testing.assert_array_equal(plain_images, taught_images)  # the same batch, augmented alike

    def probabilities(model: Any, batch: Any) -> np.ndarray:
        out = model(batch, training=False)
        return np.asarray(out[0] if isinstance(out, (list, tuple)) else out)

    averaged = sum(probabilities(model, taught_images) for model in teachers) / 2
    plain = sum(probabilities(model, images[:, 2:34, 2:34].astype(np.float32))
                for model in teachers) / 2
    assert not np.allclose(averaged, plain, atol=1e-3)  # the augmented view changes the targets
    np.testing.assert_allclose(targets, 0.75 * np.asarray(one_hot) + 0.25 * averaged,
                               rtol=1e-4, atol=1e-6)

    lines: list[str] = []
    card = train(root, tmp_path / "student.keras",
                 replace(config, distill_from=(str(first),), distill_consistent=True),
                 report=lines.append)
    assert card.training["distill_consistent"] is True
    assert any("each batch as augmented for training" in line for line in lines)
    with pytest.raises(ValueError, match=r"--distill-from: .* takes \(32, 32\) images"):
        train(root, tmp_path / "refused.keras",
              replace(config, input_size=(40, 40), distill_from=(str(first),),
                      distill_consistent=True), report=lambda line: None)


def test_a_resumed_run_counts_the_training_time_of_every_stretch(tmp_path: Path) -> None:
    """The card's `seconds` is the whole run's training time: a run resumed after a stop (here,
    after it had finished its member and the model file was lost) adds the earlier stretch."""
    root = tmp_path / "set"
    _set_with_a_first_chunk(root)
    out = tmp_path / "run.keras"
    config = TrainConfig(arch="melanonet", epochs=2, folds=3, batch_size=8, input_size=(32, 32),
                         seed=5, members=1, augmentation="mild")
    first = train(root, out, config, report=lambda line: None)
    kept = json.loads((tmp_path / "run.folds" / "seconds.json").read_text())["seconds"]
    assert kept == pytest.approx(first.training["seconds"], abs=0.2) and kept > 0

    out.unlink()
    lines: list[str] = []
    again = train(root, out, config, report=lines.append)
    assert not any(line.startswith("fold 1/3") for line in lines)  # the member was read back
    assert again.training["seconds"] > first.training["seconds"]
