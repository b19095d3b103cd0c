"""ReAct, DICE, ASH, SCALE: known answers from per-sample numpy loops over the formulas, and edge cases."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from oodguard.detectors import create, implementation
from oodguard.detectors.base import clone
from oodguard.detectors.shaping import kept_count, shape_activations

from detector_data import fit_with_head, head_data, neg_energy_by_hand


def _data(n=50, d=20, c=6, seed=0):
    return head_data(n, d, c, seed, loc=0.3, query_scale=1.2, queries=8)


def _top_k_indices(z, k):
    return np.argsort(z)[::-1][:k]


# ---------------------------------------------------------------- ReAct
@pytest.mark.parametrize("p", [90, 37.5, 100])
def test_react_known_answer(p):
    features, weight, bias, queries = _data()
    threshold = np.percentile(features, p)
    expected = [neg_energy_by_hand(weight @ np.minimum(z, threshold) + bias) for z in queries]
    detector = fit_with_head("react", features, weight, bias, percentile=p)
    assert float(detector.state_["threshold"]) == pytest.approx(threshold, rel=1e-12)
    np.testing.assert_allclose(detector.score({"features": queries}), expected, rtol=1e-10)


# ---------------------------------------------------------------- DICE
@pytest.mark.parametrize("p", [90, 70, 0])
def test_dice_known_answer(p):
    features, weight, bias, queries = _data(seed=1)
    mean = features.mean(axis=0)
    contribution = weight * mean[None, :]
    threshold = np.percentile(contribution, p)
    masked = np.where(contribution > threshold, weight, 0.0)
    expected = [neg_energy_by_hand(masked @ z + bias) for z in queries]
    detector = fit_with_head("dice", features, weight, bias, percentile=p)
    np.testing.assert_allclose(detector.score({"features": queries}), expected, rtol=1e-10)
    assert int((detector.state_["weight"] != 0).sum()) == int((contribution > threshold).sum())


def test_dice_partial_fit_and_merge_equal_full_fit():
    features, weight, bias, queries = _data(n=90, seed=2)
    head = (weight, bias)
    full = fit_with_head("dice", features, weight, bias)
    chunked = create("dice")
    for rows in (slice(0, 17), slice(17, 60), slice(60, 90)):
        chunked.partial_fit({"features": features[rows], "head": head})
    left = create("dice").fit({"features": features[:41], "head": head})
    right = create("dice").fit({"features": features[41:], "head": head})
    merged = left.merge(right)
    expected = full.score({"features": queries})
    for detector in (chunked, merged):
        np.testing.assert_allclose(detector.score({"features": queries}), expected, rtol=0, atol=1e-10)
        np.testing.assert_allclose(detector.state_["mean"].numpy(), features.mean(axis=0), rtol=1e-12)


def test_dice_refuses_to_merge_different_heads():
    features, weight, bias, _ = _data(seed=3)
    left = fit_with_head("dice", features, weight, bias)
    right = fit_with_head("dice", features, weight + 1.0, bias)
    with pytest.raises(ValueError, match="different heads"):
        left.merge(right)


def test_dice_save_load_keeps_partial_fit(tmp_path):
    from oodguard.detectors import load

    features, weight, bias, queries = _data(n=60, seed=4)
    head = (weight, bias)
    detector = create("dice").partial_fit({"features": features[:30], "head": head})
    detector.save(tmp_path)
    restored = load(tmp_path).partial_fit({"features": features[30:], "head": head})
    full = fit_with_head("dice", features, weight, bias)
    np.testing.assert_allclose(restored.score({"features": queries}), full.score({"features": queries}), atol=1e-10)


# ---------------------------------------------------------------- ASH
def _reference_ash(z, p, variant):
    d = len(z)
    k = d - int(np.round(d * p / 100.0))
    top = _top_k_indices(z, k)
    shaped = np.zeros(d)
    if variant == "b":
        shaped[top] = z.sum() / k
    else:
        shaped[top] = z[top]
        if variant == "s":
            shaped *= np.exp(z.sum() / shaped.sum())
    return shaped


@pytest.mark.parametrize("variant", ["p", "b", "s"])
@pytest.mark.parametrize("p", [90, 65, 0])
def test_ash_known_answer(variant, p):
    features, weight, bias, queries = _data(seed=5)
    expected = [neg_energy_by_hand(weight @ _reference_ash(z, p, variant) + bias) for z in queries]
    detector = fit_with_head("ash", features, weight, bias, variant=variant, percentile=p)
    np.testing.assert_allclose(detector.score({"features": queries}), expected, rtol=1e-10)
    shaped = shape_activations(torch.from_numpy(queries), p, variant).numpy()
    np.testing.assert_allclose(shaped, [_reference_ash(z, p, variant) for z in queries], rtol=1e-12)


@pytest.mark.parametrize(
    ("variant", "logits"),
    [
        # z = [4, 1, 3, 0, 2], p = 60: k = 5 - round(3) = 2 kept (entries 0 and 2), s1 = 10, s2 = 7
        ("p", [4.0, 3.0 + 0.5]),  # a = [4, 0, 3, 0, 0]
        ("b", [5.0, 5.0 + 0.5]),  # a = [5, 0, 5, 0, 0]: s1 / k on the kept entries
        ("s", [4.0 * np.exp(10 / 7), 3.0 * np.exp(10 / 7) + 0.5]),  # a = [4, 0, 3, 0, 0] * exp(s1 / s2)
    ],
)
def test_ash_variants_worked_by_hand(variant, logits):
    # Each variant as in the paper (Djurisic et al., ICLR 2023, Alg. 1) and andrijazz/ash ash.py (ash_p/ash_b/ash_s).
    z = np.array([[4.0, 1.0, 3.0, 0.0, 2.0]])
    weight = np.array([[1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0]])  # logit c reads entry 0 and entry 2
    bias = np.array([0.0, 0.5])
    detector = fit_with_head("ash", z, weight, bias, variant=variant, percentile=60)
    expected = -np.logaddexp(*logits)
    assert detector.score({"features": z})[0] == pytest.approx(expected, rel=1e-12)


def test_ash_default_is_ash_s_at_90():
    features, weight, bias, queries = _data(seed=12)
    default = fit_with_head("ash", features, weight, bias).score({"features": queries})
    explicit = fit_with_head("ash", features, weight, bias, variant="s", percentile=90).score({"features": queries})
    np.testing.assert_array_equal(default, explicit)


def test_ash_defaults_are_the_official_resnet50_imagenet_setting():
    assert create("ash").params == {"variant": "s", "percentile": 90}
    assert create("scale").params == {"percentile": 85}
    assert create("dice").params == {"percentile": 90}
    assert create("react").params == {"percentile": 90}


def test_ash_b_preserves_the_activation_sum():
    _, _, _, queries = _data(seed=6)
    shaped = shape_activations(torch.from_numpy(queries), 80, "b").numpy()
    np.testing.assert_allclose(shaped.sum(axis=1), queries.sum(axis=1), rtol=1e-12)
    assert np.all((shaped != 0).sum(axis=1) == kept_count(queries.shape[1], 80))


def test_kept_count_rounds_like_numpy():
    for d, p in [(10, 65), (10, 75), (2048, 90), (20, 12.5), (7, 50)]:
        assert kept_count(d, p) == d - int(np.round(d * p / 100.0))


def test_ash_s_float32_does_not_overflow():
    # D = 800, p = 99.9 keeps one entry: exp(s1/s2) ~ exp(400) overflows float32 but not the float64 scale.
    rng = np.random.default_rng(7)
    weight, bias = rng.normal(size=(4, 800)), rng.normal(size=4)
    features = rng.random((30, 800))
    queries = rng.random((5, 800))
    detector = fit_with_head("ash", features, weight, bias, percentile=99.9)
    scores64 = detector.score({"features": queries})
    scores32 = detector.score({"features": queries.astype(np.float32)})
    assert np.all(np.isfinite(scores32))
    np.testing.assert_allclose(scores32, scores64, rtol=1e-4)
    expected = [neg_energy_by_hand(weight @ _reference_ash(z, 99.9, "s") + bias) for z in queries]
    np.testing.assert_allclose(scores64, expected, rtol=1e-10)


# ---------------------------------------------------------------- SCALE
@pytest.mark.parametrize("p", [85, 50, 0])
def test_scale_known_answer(p):
    features, weight, bias, queries = _data(seed=8)
    expected = []
    for z in queries:
        k = len(z) - int(np.round(len(z) * p / 100.0))
        ratio = z.sum() / z[_top_k_indices(z, k)].sum()
        expected.append(neg_energy_by_hand(weight @ (z * np.exp(ratio)) + bias))  # the bias is not scaled
    detector = fit_with_head("scale", features, weight, bias, percentile=p)
    np.testing.assert_allclose(detector.score({"features": queries}), expected, rtol=1e-10)


# ---------------------------------------------------------------- shared behaviour
@pytest.mark.parametrize("name", ["ash", "scale"])
def test_signed_features_with_non_positive_kept_sum_are_refused(name):
    features, weight, bias, queries = _data(seed=9)
    detector = fit_with_head(name, features, weight, bias)
    signed = queries.copy()
    signed[0] = -np.abs(signed[0])  # every entry negative: the kept top-k sum is negative
    with pytest.raises(ValueError, match="non-negative"):
        detector.score({"features": signed})


@pytest.mark.parametrize("name", ["ash", "scale"])
def test_all_zero_rows_score_as_the_bias_alone(name):
    features, weight, bias, queries = _data(seed=10)
    detector = fit_with_head(name, features, weight, bias)
    rows = queries.copy()
    rows[2] = 0.0
    scores = detector.score({"features": rows})
    assert scores[2] == pytest.approx(neg_energy_by_hand(bias), rel=1e-12)


def test_ash_p_and_b_accept_signed_features():
    features, weight, bias, queries = _data(seed=11)
    signed = queries - 1.0
    for variant in ("p", "b"):
        scores = fit_with_head("ash", features, weight, bias, variant=variant).score({"features": signed})
        expected = [neg_energy_by_hand(weight @ _reference_ash(z, 90, variant) + bias) for z in signed]
        np.testing.assert_allclose(scores, expected, rtol=1e-10)


@pytest.mark.parametrize("name", ["react", "dice", "ash", "scale"])
def test_float32_features_agree_with_float64(name):
    features, weight, bias, queries = _data(n=200, d=64, seed=12)
    detector = fit_with_head(name, features, weight, bias)
    scores32 = detector.score({"features": torch.from_numpy(queries.astype(np.float32))})
    np.testing.assert_allclose(scores32.numpy(), detector.score({"features": queries}), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("ash", {"variant": "x"}),
        ("ash", {"percentile": 100}),
        ("ash", {"percentile": -1}),
        ("ash", {"percentile": float("nan")}),
        ("ash", {"percentile": "90"}),
        ("scale", {"percentile": 100}),
        ("scale", {"percentile": -1}),
        ("scale", {"percentile": True}),
        ("dice", {"percentile": 100}),
        ("dice", {"percentile": -1}),
        ("react", {"percentile": 0}),
        ("react", {"percentile": 100.5}),
        ("react", {"percentile": None}),
        ("dice", {"percentile": float("inf")}),
        ("ash", {"variant": "S"}),
        ("ash", {"variant": None}),
    ],
)
def test_bad_parameters_are_refused(name, params):
    (param,) = params
    with pytest.raises(ValueError, match=f"{name}: parameter '{param}' must be"):
        create(name, **params)


@pytest.mark.parametrize("name", ["ash", "scale"])
def test_percentile_that_keeps_nothing_is_refused_at_fit(name):
    features, weight, bias, _ = _data(d=8)
    with pytest.raises(ValueError, match="keeps no activation"):
        fit_with_head(name, features, weight, bias, percentile=95)  # round(8 * 0.95) = 8 -> k = 0


@pytest.mark.parametrize("name", ["react", "dice", "ash", "scale"])
def test_state_does_not_alias_the_callers_head(name):
    features, weight, bias, queries = _data(seed=13)
    detector = fit_with_head(name, features, weight, bias)
    before = detector.score({"features": queries})
    weight[:] = 0.0
    bias[:] = 0.0
    np.testing.assert_array_equal(detector.score({"features": queries}), before)


# ---------------------------------------------------------------- declared parameters
DEFAULTS = {
    "react": {"percentile": 90},
    "dice": {"percentile": 90},
    "ash": {"variant": "s", "percentile": 90},
    "scale": {"percentile": 85},
}
GIVEN = {
    "react": {"percentile": 95},
    "dice": {"percentile": 70.5},
    "ash": {"variant": "b", "percentile": np.float32(65.0)},
    "scale": {"percentile": 80},
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_signature_names_every_parameter_keyword_only_with_its_default(name):
    parameters = inspect.signature(implementation(name)).parameters.values()
    assert {p.name: p.default for p in parameters} == DEFAULTS[name]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)
    assert create(name).get_params() == DEFAULTS[name]


@pytest.mark.parametrize("name", sorted(GIVEN))
def test_get_params_are_the_arguments_as_given_and_clone_is_unfitted(name):
    features, weight, bias, queries = _data()
    detector = fit_with_head(name, features, weight, bias, **GIVEN[name])
    params = detector.get_params()
    assert params == GIVEN[name]
    assert {k: type(v) for k, v in params.items()} == {k: type(v) for k, v in GIVEN[name].items()}
    copy = clone(detector)
    assert type(copy) is type(detector) and copy.get_params() == params and not copy.is_fitted
    copy.fit({"features": features, "head": (weight, bias)})
    np.testing.assert_array_equal(copy.score({"features": queries}), detector.score({"features": queries}))
