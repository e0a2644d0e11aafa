"""Colour constancy, temperature scaling, the scope distance and how scores are written."""

from __future__ import annotations

import numpy as np
import pytest

from model.calibration import fit_temperature, temperature_scale
from model.metrics import expected_calibration_error
from model.scope import distance, fit_whitening, scope_threshold
from model.scores import probability_text, threshold_meaning, threshold_text


def test_shades_of_gray_maps_a_colour_cast_image_back_to_grey_balance() -> None:
    from model.layers import ShadesOfGray

    rng = np.random.default_rng(0)
    grey_world = rng.uniform(60, 200, (1, 32, 32, 1)) * np.ones((1, 1, 1, 3))
    texture = grey_world * rng.uniform(0.9, 1.1, (1, 32, 32, 3))
    cast = texture * np.array([1.0, 0.7, 0.45])  # a warm, orange light
    out = np.asarray(ShadesOfGray()(cast.astype(np.float32)))
    before = cast.reshape(-1, 3).mean(axis=0)
    after = out.reshape(-1, 3).mean(axis=0)
    assert before.max() / before.min() > 2.0
    assert after.max() / after.min() < 1.05  # the channels agree again
    assert out.min() >= 0.0 and out.max() <= 255.0
    assert abs(after.mean() - before.mean()) / before.mean() < 0.1  # brightness is kept


def test_colour_constant_mobilenet_takes_mobilenet_weights_and_ignores_a_colour_cast() -> None:
    """`--arch mobilenet-cc` is MobileNet behind Shades of Gray: every weight of a MobileNet (its
    ImageNet start) fits it layer by layer, and a colour cast that keeps the brightness (another
    camera's white balance) changes what plain MobileNet computes but not what it computes."""
    import keras

    from model.architectures import ARCHITECTURES
    from model.pretrained import PRETRAINED_SOURCES, load_layer_weights

    keras.utils.set_random_seed(0)
    plain = ARCHITECTURES["mobilenet"]((32, 32, 3), 9)
    constant = ARCHITECTURES["mobilenet-cc"]((32, 32, 3), 9)
    weights = {layer.name: layer.get_weights() for layer in plain.layers if layer.weights}
    assert load_layer_weights(constant, weights) == len(weights)
    assert PRETRAINED_SOURCES["mobilenet-cc"] == PRETRAINED_SOURCES["mobilenet"]

    rng = np.random.default_rng(1)
    image = rng.uniform(20, 180, (2, 32, 32, 3)).astype(np.float32)
    illuminant = np.mean((image / 255.0) ** 6, axis=(1, 2)) ** (1 / 6)  # (images, channels)
    gains = np.tile([1.25, 0.85, 0.0], (2, 1))
    gains[:, 2] = (illuminant.sum(axis=1) - gains[:, 0] * illuminant[:, 0]
                   - gains[:, 1] * illuminant[:, 1]) / illuminant[:, 2]
    cast = (image * gains[:, None, None, :]).astype(np.float32)
    assert cast.max() <= 255.0

    def features(network: keras.Model, images: np.ndarray) -> np.ndarray:
        """The second block's activations: all the rest is computed from them (an untrained
        network's last blocks are near zero for any image)."""
        return np.asarray(keras.Model(network.input,
                                      network.get_layer("conv_pw_2_relu").output)(images))

    # Untrained activations are small (about 0.005 here): the cast is measured against them.
    scale = np.abs(features(plain, image)).max()
    assert np.abs(features(plain, cast) - features(plain, image)).max() > 0.05 * scale
    assert np.abs(features(constant, cast) - features(constant, image)).max() < 1e-4 * scale


def test_temperature_scaling_lowers_the_calibration_error_of_an_overconfident_model() -> None:
    rng = np.random.default_rng(0)
    n, k = 2000, 4
    labels = rng.integers(0, k, n)
    # A model that is right 70% of the time but says 0.97 when it is.
    right = rng.uniform(size=n) < 0.7
    predicted = np.where(right, labels, (labels + rng.integers(1, k, n)) % k)
    logits = np.full((n, k), 0.0)
    logits[np.arange(n), predicted] = 5.0
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    temperature = fit_temperature(probabilities, labels)
    scaled = temperature_scale(probabilities, temperature)

    before, _ = expected_calibration_error(probabilities, labels)
    after, _ = expected_calibration_error(scaled, labels)
    assert temperature > 1.5  # over-confident: softened
    assert after < before / 3 and after < 0.05
    assert (scaled.argmax(axis=1) == probabilities.argmax(axis=1)).all()
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0)


def test_the_temperature_layer_computes_what_the_numpy_scaling_does() -> None:
    from model.layers import TemperatureScaling

    probabilities = np.array([[0.7, 0.2, 0.1], [0.05, 0.9, 0.05]], np.float32)
    np.testing.assert_allclose(np.asarray(TemperatureScaling(2.5)(probabilities)),
                               temperature_scale(probabilities, 2.5), rtol=1e-5)


def test_several_members_are_scaled_one_by_one_then_averaged_as_the_saved_ensemble_does() -> None:
    """Calibrating a two-architecture ensemble fits T on what the saved ensemble outputs."""
    from model.architectures import build_ensemble, build_melanonet

    images = np.random.default_rng(4).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    members = [build_melanonet((32, 32, 3), 9, widths=(4, 8)),
               build_melanonet((32, 32, 3), 9, widths=(4, 8), colour_constancy=True)]
    each = np.stack([np.asarray(m(images, training=False)) for m in members])
    ensemble = np.asarray(build_ensemble(members, temperature=0.7)(images, training=False))
    by_hand = (temperature_scale(each[0], 0.7) + temperature_scale(each[1], 0.7)) / 2
    np.testing.assert_allclose(temperature_scale(each, 0.7), by_hand)
    np.testing.assert_allclose(ensemble, by_hand, rtol=1e-4, atol=1e-6)


def test_the_scope_distance_is_about_one_on_training_features_and_large_far_away() -> None:
    from model.layers import MahalanobisDistance

    rng = np.random.default_rng(0)
    features = rng.normal(0, 1, (500, 16)) @ rng.normal(0, 1, (16, 16))
    mean, whitening = fit_whitening(features)
    inside = distance(features, mean, whitening)
    assert 0.8 < np.median(inside) < 1.2
    limit = scope_threshold(inside)
    far = features[:5] + 40.0
    assert (distance(far, mean, whitening) > limit).all()

    layer = MahalanobisDistance(16)
    layer.build((None, 16))
    layer.set_weights([mean, whitening])
    np.testing.assert_allclose(np.asarray(layer(far.astype(np.float32))),
                               distance(far, mean, whitening), rtol=1e-4)


@pytest.mark.parametrize(("p", "threshold", "text"), [
    (0.91, 0.0538, "0.91"),
    (0.0541, 0.0538, "0.0541"),  # never "0.05" beside a threshold that also reads 0.05
    (0.05, 0.0538, "0.050"),
    (0.0538, 0.0538, "0.05"),  # equal: nothing to tell apart
    (0.5, None, "0.50"),
])
def test_a_probability_never_reads_like_the_threshold_it_differs_from(
        p: float, threshold: float | None, text: str) -> None:
    assert probability_text(p, threshold) == text


def test_the_threshold_is_written_unrounded_and_says_what_it_means() -> None:
    assert threshold_text(0.0538) == "0.0538"
    assert threshold_text(0.5) == "0.50"
    meaning = threshold_meaning({"melanoma_same_source": {"sensitivity": 0.953}}, 0.95)
    assert meaning.startswith("at this threshold the model caught 95% of melanomas in validation")


def _scores(melanomas: list[float], benign: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(melanomas + benign),
            np.asarray([True] * len(melanomas) + [False] * len(benign)))


def test_the_threshold_reaches_the_target_within_every_group_with_benign_lesions() -> None:
    from model.calibration import threshold_within_groups

    easy, easy_mel = _scores([0.9, 0.8, 0.7, 0.6], [0.1] * 12)
    hard, hard_mel = _scores([0.5, 0.3, 0.2, 0.05], [0.2] * 12)
    few, few_mel = _scores([0.01], [0.0] * 3)  # three benign lesions: sets nothing
    scores = np.concatenate([easy, hard, few])
    melanoma = np.concatenate([easy_mel, hard_mel, few_mel])
    groups = ["easy"] * 16 + ["hard"] * 16 + ["few"] * 4

    threshold = threshold_within_groups(scores, melanoma, [groups], 0.75)

    # The hard group's third melanoma (just under it); the easy group would allow 0.7.
    assert threshold == pytest.approx(0.2, rel=1e-4)
    for name in ("easy", "hard"):
        inside = np.asarray(groups) == name
        caught = (scores[inside & melanoma] >= threshold).mean()
        assert caught >= 0.75


def test_the_threshold_is_checked_on_a_dataset_held_out_whole_and_set_by_the_others() -> None:
    from model.data import ISIC_CLASSES
    from model.evaluate import new_source_figures

    m = ISIC_CLASSES.index("melanoma")
    n = ISIC_CLASSES.index("nevus")
    seen, seen_mel = _scores([0.9, 0.8, 0.7, 0.6, 0.5], [0.1] * 20)
    new, new_mel = _scores([0.55, 0.4, 0.3, 0.2, 0.1], [0.05] * 10 + [0.45] * 10)
    test, test_mel = _scores([0.01], [0.99] * 10)  # the test set must set nothing
    scores = np.concatenate([seen, new, test])
    labels = np.where(np.concatenate([seen_mel, new_mel, test_mel]), m, n)
    probabilities = np.zeros((len(scores), len(ISIC_CLASSES)))
    probabilities[:, m] = scores
    probabilities[:, n] = 1 - scores
    datasets = ["HAM10000"] * 25 + ["ISIC2018-test"] * 25 + ["ISIC2017-test"] * 11

    figures = new_source_figures(probabilities, labels, datasets, list(ISIC_CLASSES),
                                 ["ISIC2018-test"], 0.8, bootstrap=0)

    row = figures["ISIC2018-test"]
    # HAM10000's fourth melanoma of five.
    assert row["threshold_from_other_datasets"] == pytest.approx(0.6, rel=1e-4)
    assert row["melanomas"] == 5 and row["n"] == 25
    assert row["sensitivity"] == 0.0  # the new source's melanomas all score below it
    assert row["specificity"] == 1.0


def test_the_thresholds_interval_shows_how_far_it_rests_on_a_few_melanomas() -> None:
    """Redrawing the held-out images moves the threshold as far as the lowest-scored melanomas
    allow: not at all when every melanoma scores alike, and over the span of the low scores when
    a few melanomas score low; each redraw's threshold is measured on all the images."""
    from model.evaluate import threshold_stability

    alike, alike_mel = _scores([0.9] * 20, [0.1] * 30)
    steady = threshold_stability(alike, alike_mel, [["A"] * 50], 0.95, bootstrap=200)
    assert steady["threshold"] == pytest.approx(0.9, rel=1e-4)
    assert steady["threshold_interval"][0] == steady["threshold_interval"][1] == steady["threshold"]
    assert steady["sensitivity_interval"] == [1.0, 1.0]
    assert steady["specificity_interval"] == [1.0, 1.0]

    # Two groups; group B's melanomas include three low scores, among benign lesions that
    # score between them, so whether a redraw holds them decides its threshold.
    scores_a, mel_a = _scores([0.8] * 20, [0.1] * 20)
    scores_b, mel_b = _scores([0.8] * 17 + [0.05, 0.3, 0.5], list(np.linspace(0.0, 0.6, 40)))
    scores = np.concatenate([scores_a, scores_b])
    melanoma = np.concatenate([mel_a, mel_b])
    groups = ["A"] * 40 + ["B"] * 60
    moving = threshold_stability(scores, melanoma, [groups], 0.95, bootstrap=300)

    assert moving["n"] == 100 and moving["melanomas"] == 40 and moving["bootstrap"] == 300
    # All images: 19 of B's 20 melanomas at 0.95 means the second-lowest, 0.3, decides.
    assert moving["threshold"] == pytest.approx(0.3, rel=1e-4)
    low, high = moving["threshold_interval"]
    assert low < moving["threshold"] < high
    assert low >= 0.05 * (1 - 1e-4) and high <= 0.8
    spec_low, spec_high = moving["specificity_interval"]
    assert spec_low < spec_high  # a lower threshold emails more benign lesions
    sens_low, sens_high = moving["sensitivity_interval"]
    assert sens_low <= 39 / 40 <= sens_high and sens_low < sens_high
