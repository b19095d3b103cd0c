"""WeiPer + KLD: known answers from a per-row numpy computation, the seeded perturbation, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodguard.detectors import create
from oodguard.detectors.weight_perturbation import perturbed_head, smooth

PARAMS = {"n_repeats": 3, "n_bins": 7, "smoothing": 3, "smoothing_perturbed": 2, "lambda_1": 0.7, "lambda_2": 0.4}


def _data(seed=0, n=40, d=5, c=3):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % c
    features = np.abs(rng.normal(size=(c, d)) * 2.0)[labels] + np.abs(rng.normal(size=(n, d)))
    weight, bias = rng.normal(size=(c, d)), rng.normal(size=c)
    return features, weight, bias


def _histogram(values, low, high, bins):
    counts, _ = np.histogram(values, bins=np.linspace(low, high + 1e-8, bins + 1))
    return counts / len(values)


def _smooth(h, size):
    before = (size - 1) // 2
    padded = np.concatenate([np.full(before, h[0]), h, np.full(size - 1 - before, h[-1])])
    return np.array([padded[i : i + size].mean() for i in range(len(h))])


def _kld(p, h, size, eps):
    p = (p + eps) / (p + eps).sum()
    q = _smooth(h, size) + eps
    q = q / q.sum()
    return np.sum(p * np.log(p / q)) + np.sum(q * np.log(q / p))


def _expected(features, perturbed, bias, queries, p):
    # the state's rows are class-major: row c r + i is copy i of class c
    logits = features @ perturbed.T + np.repeat(bias, p["n_repeats"])
    f_low, f_high, l_low, l_high = features.min(), features.max(), logits.min(), logits.max()
    p_z = np.mean([_histogram(z, f_low, f_high, p["n_bins"]) for z in features], axis=0)
    p_w = np.mean([_histogram(row, l_low, l_high, p["n_bins"]) for row in logits], axis=0)
    scores = []
    for z in queries:
        row = perturbed @ z + np.repeat(bias, p["n_repeats"])
        copies = row.reshape(-1, p["n_repeats"]).T
        msp = np.mean([np.exp(c.max()) / np.exp(c).sum() for c in copies])
        k_z = _kld(p_z, _histogram(z, f_low, f_high, p["n_bins"]), p["smoothing"], 0.01)
        k_w = _kld(p_w, _histogram(row, l_low, l_high, p["n_bins"]), p["smoothing_perturbed"], 0.025)
        scores.append(k_z + p["lambda_1"] * k_w - p["lambda_2"] * msp)
    return np.array(scores)


def test_weiper_known_answer():
    features, weight, bias = _data()
    queries = np.abs(np.random.default_rng(1).normal(size=(6, 5)) * 3.0)
    detector = create("weiper", **PARAMS).fit({"features": features, "head": (weight, bias)})
    perturbed = perturbed_head(torch.as_tensor(weight), PARAMS["n_repeats"], 2.1, seed=0).numpy()
    expected = _expected(features, perturbed, bias, queries, PARAMS)
    np.testing.assert_allclose(detector.score(queries), expected, rtol=1e-9)


def test_perturbation_moves_each_class_row_by_delta_times_its_norm_and_is_seeded():
    _, weight, _ = _data(seed=2)
    head = perturbed_head(torch.as_tensor(weight), 4, 1.5, seed=0).numpy()
    moved = head.reshape(3, 4, 5).transpose(1, 0, 2) - weight  # class-major rows: c r + i
    np.testing.assert_allclose(np.linalg.norm(moved, axis=2), 1.5 * np.linalg.norm(weight, axis=1)[None].repeat(4, 0))
    directions = moved / np.linalg.norm(moved, axis=2, keepdims=True)
    assert np.abs(directions[0] - directions[1]).max() > 0.1  # each copy draws its own directions
    np.testing.assert_array_equal(perturbed_head(torch.as_tensor(weight), 4, 1.5, seed=0).numpy(), head)
    assert not np.array_equal(perturbed_head(torch.as_tensor(weight), 4, 1.5, seed=1).numpy(), head)


def test_weiper_scores_depend_on_the_seed_only_through_the_perturbation():
    features, weight, bias = _data(seed=4)
    fit = {"features": features, "head": (weight, bias)}
    first, again = (create("weiper", n_repeats=5).fit(fit).score(features[:5]) for _ in range(2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(create("weiper", n_repeats=5, seed=3).fit(fit).score(features[:5]), first)


@pytest.mark.parametrize("size", [1, 2, 3, 20])
def test_smoothing_is_a_moving_average_with_repeated_edges_as_torch_same_padding(size):
    histograms = torch.as_tensor(np.random.default_rng(3).random((2, 9)))
    conv = torch.nn.Conv1d(1, 1, size, padding="same", padding_mode="replicate", bias=False, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.fill_(1.0 / size)
        expected = conv(histograms[:, None, :])[:, 0, :]
    torch.testing.assert_close(smooth(histograms, size), expected, rtol=1e-12, atol=1e-12)


def test_weiper_refuses_bad_parameters_and_missing_head():
    for bad in ({"n_repeats": 0}, {"perturbation_distance": 0.0}, {"epsilon": 0.0}, {"smoothing": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            create("weiper", **bad)
    features, _, _ = _data()
    with pytest.raises(ValueError, match="needs head"):
        create("weiper").fit({"features": features})


def test_row_histograms_drop_values_outside_the_range_but_count_them_in_the_total():
    from oodguard.detectors.weight_perturbation import row_histograms

    values = np.array([[-5.0, 0.0, 0.49, 0.5, 1.0, 1.0 + 2e-8, 7.0, 0.99]])
    expected = _histogram(values[0], 0.0, 1.0, 4)
    np.testing.assert_allclose(row_histograms(torch.as_tensor(values), 0.0, 1.0, 4).numpy()[0], expected)
    # edges 0, 0.25 + 2.5e-9, 0.5 + 5e-9, ...: 0.5 is still in the second bin; -5, 1 + 2e-8 and 7 fall outside
    np.testing.assert_allclose(expected, [1 / 8, 2 / 8, 0, 2 / 8])


def test_weiper_refuses_constant_features():
    features, weight, bias = _data()
    constant = np.full_like(features, 0.7)  # one bin of width 1e-8: every other input falls outside the histograms
    with pytest.raises(ValueError, match="every fit value of the features is the same"):
        create("weiper", **PARAMS).fit({"features": constant, "head": (weight, bias)})
