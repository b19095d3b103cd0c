"""VRA, BATS, LTS: known answers from per-sample numpy loops over the formulas, and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodguard.detectors import create, load

from detector_data import fit_with_head, head_data, neg_energy_by_hand


def _data(n=60, d=16, c=5, seed=0):
    return head_data(n, d, c, seed, loc=0.4, query_scale=1.5, queries=9)


# ---------------------------------------------------------------- VRA
@pytest.mark.parametrize(("low", "high", "gamma"), [(60, 90, 0.0), (60, 95, 0.6), (0, 100, 0.0), (30, 30, 0.2)])
def test_vra_known_answer(low, high, gamma):
    features, weight, bias, queries = _data()
    a = np.percentile(features, low, axis=0)
    b = np.percentile(features, high, axis=0)
    expected = []
    for z in queries:
        h = np.array([0.0 if z[d] < a[d] else (b[d] if z[d] > b[d] else z[d] + gamma) for d in range(len(z))])
        expected.append(neg_energy_by_hand(weight @ h + bias))
    detector = fit_with_head("vra", features, weight, bias, lower_percentile=low, upper_percentile=high, gamma=gamma)
    np.testing.assert_allclose(detector.score({"features": queries}), expected, rtol=1e-10)


def test_vra_with_the_whole_range_and_no_gamma_is_the_energy():
    features, weight, bias, queries = _data(seed=1)
    detector = fit_with_head("vra", features, weight, bias, lower_percentile=0, upper_percentile=100)
    inside = np.clip(queries, features.min(0), features.max(0))
    expected = [neg_energy_by_hand(weight @ z + bias) for z in inside]
    np.testing.assert_allclose(detector.score({"features": inside}), expected, rtol=1e-10)


def test_vra_refuses_crossed_percentiles():
    with pytest.raises(ValueError, match="lower_percentile"):
        create("vra", lower_percentile=95, upper_percentile=90)


# ---------------------------------------------------------------- BATS
@pytest.mark.parametrize("lam", [1.05, 3.25, 0.1])
def test_bats_known_answer(lam):
    features, weight, bias, queries = _data(seed=2)
    mean, std = features.mean(axis=0), features.std(axis=0)  # population std
    expected = [neg_energy_by_hand(weight @ np.clip(z, mean - lam * std, mean + lam * std) + bias) for z in queries]
    detector = fit_with_head("bats", features, weight, bias, lam=lam)
    np.testing.assert_allclose(detector.score({"features": queries}), expected, rtol=1e-10)


def test_bats_partial_fit_equals_fit_and_refuses_another_head():
    features, weight, bias, queries = _data(seed=3)
    full = fit_with_head("bats", features, weight, bias)
    parts = create("bats")
    for chunk in np.array_split(np.arange(len(features)), 3):
        parts.partial_fit({"features": features[chunk], "head": (weight, bias)})
    np.testing.assert_allclose(parts.score({"features": queries}), full.score({"features": queries}), rtol=1e-12)
    with pytest.raises(ValueError, match="different heads"):
        parts.partial_fit({"features": features, "head": (weight + 1.0, bias)})


# ---------------------------------------------------------------- LTS
@pytest.mark.parametrize("p", [65, 90, 0])
def test_lts_known_answer(p):
    features, weight, bias, queries = _data(seed=4)
    rng = np.random.default_rng(9)
    signed = queries - 0.3 * rng.random(queries.shape)  # some negative entries: LTS rectifies them first
    logits = signed @ weight.T + bias
    d = signed.shape[1]
    k = d - int(np.round(d * p / 100))
    expected = []
    for z, f in zip(signed, logits, strict=True):
        r = np.maximum(z, 0)
        scale = (r.sum() / np.sort(r)[::-1][:k].sum()) ** 2
        expected.append(neg_energy_by_hand(scale * f))
    detector = create("lts", percentile=p)
    assert not detector.needs_fit
    np.testing.assert_allclose(detector.score({"features": signed, "logits": logits}), expected, rtol=1e-10)


def test_lts_refuses_rows_without_activation_and_too_high_percentiles():
    logits = np.zeros((2, 3))
    with pytest.raises(ValueError, match="no positive feature"):
        create("lts").score({"features": np.array([[0.0, -1.0], [1.0, 2.0]]), "logits": logits})
    with pytest.raises(ValueError, match="keeps k = 0"):
        create("lts", percentile=99).score({"features": np.ones((2, 8)), "logits": logits})


# ---------------------------------------------------------------- shared
@pytest.mark.parametrize("name", ["vra", "bats"])
def test_float32_scores_match_float64(name):
    features, weight, bias, queries = _data(seed=5)
    detector = fit_with_head(name, features, weight, bias)
    np.testing.assert_allclose(
        detector.score({"features": queries.astype(np.float32)}), detector.score({"features": queries}), rtol=1e-5
    )


@pytest.mark.parametrize("name", ["vra", "bats"])
def test_save_load_round_trip(name, tmp_path):
    features, weight, bias, queries = _data(seed=6)
    detector = fit_with_head(name, features, weight, bias)
    detector.save(tmp_path)
    again = load(tmp_path)
    np.testing.assert_array_equal(again.score({"features": queries}), detector.score({"features": queries}))
    assert isinstance(again.score({"features": torch.as_tensor(queries)}), torch.Tensor)


@pytest.mark.parametrize("name", ["vra", "bats"])
def test_fit_needs_the_head(name):
    features, *_ = _data()
    with pytest.raises(ValueError, match="head"):
        create(name).fit({"features": features})
