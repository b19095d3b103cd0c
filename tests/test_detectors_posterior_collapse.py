"""Known answers for entropy, doctor, webo (posterior), mahalanobis_pp, rmds_pp (normalized_distance), neco and nci
(collapse): scores against values worked out independently (numpy loops, scipy, scikit-learn)."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from oodguard import detectors
from oodguard.detectors import collapse, posterior


def logits(seed: int = 0, n: int = 60, c: int = 7) -> np.ndarray:
    return 3.0 * np.random.default_rng(seed).normal(size=(n, c))


# ---------------------------------------------------------------------- entropy
def test_entropy_is_the_log_of_minus_sum_p_log_p():
    f = logits()
    p = softmax(f, axis=1)
    expected = np.log(-(p * np.log(p)).sum(axis=1))
    np.testing.assert_allclose(detectors.create("entropy").score(f), expected, rtol=1e-12, atol=1e-12)


def test_entropy_by_hand_and_ties():
    f = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, -np.log(3.0), -np.log(3.0)]])
    # uniform over 3: log 3; two tied tops and one below; p = (3/5, 1/5, 1/5)
    p2 = np.array([np.e, np.e, 1.0]) / (2 * np.e + 1)
    p3 = np.array([0.6, 0.2, 0.2])
    expected = np.log([np.log(3.0), -(p2 * np.log(p2)).sum(), -(p3 * np.log(p3)).sum()])
    np.testing.assert_allclose(detectors.create("entropy").score(f), expected, rtol=1e-12)


def test_entropy_does_not_saturate_for_confident_float32_logits():
    # top gaps of 40..60: a float32 softmax rounds 1 - p_max to 0; the scores must still be distinct and ordered
    gaps = np.arange(40.0, 60.0, 1.0)
    f = np.zeros((len(gaps), 3), dtype=np.float32)
    f[:, 0] = gaps
    scores = detectors.create("entropy").score(f)
    assert np.all(np.diff(scores) < 0)
    # H = 2 e^-g (g + 1) + O(e^-2g) for two runner-ups at gap g
    np.testing.assert_allclose(scores, np.log(2 * np.exp(-gaps) * (gaps + 1)), rtol=1e-6)


def test_entropy_is_shift_invariant_and_direction():
    f = logits(1)
    np.testing.assert_allclose(detectors.create("entropy").score(f + 5.0), detectors.create("entropy").score(f))
    flat, sharp = np.zeros((1, 5)), np.array([[10.0, 0, 0, 0, 0]])
    assert detectors.create("entropy").score(flat)[0] > detectors.create("entropy").score(sharp)[0]


# ---------------------------------------------------------------------- doctor
def test_doctor_alpha_and_beta_against_the_probabilities():
    f = logits(2)
    for temperature in (1.0, 1.5):
        p = softmax(f / temperature, axis=1)
        g = (p**2).sum(axis=1)
        alpha = detectors.create("doctor", temperature=temperature).score(f)
        np.testing.assert_allclose(alpha, np.log((1 - g) / g), rtol=1e-10)
        beta = detectors.create("doctor", mode="beta", temperature=temperature).score(f)
        np.testing.assert_allclose(beta, np.log((1 - p.max(1)) / p.max(1)), rtol=1e-10, atol=1e-12)


def test_doctor_by_hand():
    # p = (1/2, 1/4, 1/4): sum p^2 = 3/8, D_alpha = (5/8) / (3/8) = 5/3; uniform over 4: D_alpha = 3; ties at the top
    f = np.log(np.array([[0.5, 0.25, 0.25, 1e-300], [1.0, 1.0, 1.0, 1.0], [0.4, 0.4, 0.2, 1e-300]]))
    f = np.maximum(f, -700.0)
    g3 = 0.4**2 * 2 + 0.2**2
    expected = np.log([5.0 / 3.0, 3.0, (1 - g3) / g3])
    np.testing.assert_allclose(detectors.create("doctor").score(f), expected, rtol=1e-10)


def test_doctor_alpha_does_not_saturate():
    gaps = np.arange(40.0, 60.0)
    f = np.zeros((len(gaps), 4), dtype=np.float32)
    f[:, 0] = gaps
    scores = detectors.create("doctor").score(f)
    assert np.all(np.diff(scores) < 0)
    np.testing.assert_allclose(scores, np.log(2 * 3 * np.exp(-gaps)), rtol=1e-6)  # D_alpha ~ 2R, R = 3 e^-g


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_entropy_and_doctor_when_every_other_class_is_far_below_the_top(dtype):
    # runner-up gaps from 60 to 900: on both sides of the float32 (~60 here) and float64 (~660) limits of the one-pass
    # path, where exp(-g) of every other class is (near) zero, mixed with an ordinary row in one call
    gaps = np.array([60.0, 100.0, 300.0, 700.0, 900.0])
    f = np.zeros((len(gaps) + 1, 4), dtype=dtype)
    f[:-1, 0] = gaps
    f[:-1, 3] = -5.0  # classes at g, g and g + 5
    f[-1] = [1.0, 0.0, 0.0, -1.0]
    # to O(e^-g): H = A + R, A = e^-g (2g + (g + 5) e^-5), R = e^-g (2 + e^-5); D_alpha = 2R
    tail = np.exp(-5.0)
    expected_h = -gaps + np.log(2 * gaps + (gaps + 5) * tail + 2 + tail)
    expected_d = np.log(2.0) - gaps + np.log(2 + tail)
    p = softmax(f[-1].astype(np.float64))
    h_scores, d_scores = detectors.create("entropy").score(f), detectors.create("doctor").score(f)
    np.testing.assert_allclose(h_scores[:-1], expected_h, rtol=1e-7 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(d_scores[:-1], expected_d, rtol=1e-7 if dtype == np.float32 else 1e-12)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(h_scores[-1], np.log(-(p * np.log(p)).sum()), rtol=rtol)
    np.testing.assert_allclose(d_scores[-1], np.log((1 - (p**2).sum()) / (p**2).sum()), rtol=rtol)


def test_entropy_and_doctor_count_ties_with_the_top_in_wide_rows():
    # 20,000 classes (the tie count sums in float64 past 16,384) with the top tied 3 times, against scipy
    f = logits(4, n=4, c=20_000).astype(np.float32)
    f[:, :3] = f.max(axis=1, keepdims=True) + 2.0
    p = softmax(f.astype(np.float64), axis=1)
    g = (p**2).sum(axis=1)
    np.testing.assert_allclose(detectors.create("entropy").score(f), np.log(-(p * np.log(p)).sum(axis=1)), rtol=1e-6)
    np.testing.assert_allclose(detectors.create("doctor").score(f), np.log((1 - g) / g), rtol=1e-6)


def test_doctor_refuses_bad_parameters():
    with pytest.raises(ValueError, match="parameter 'mode'"):
        detectors.create("doctor", mode="gamma")
    with pytest.raises(ValueError, match="parameter 'temperature'"):
        detectors.create("doctor", temperature=0.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        detectors.create("doctor").score(np.zeros((3, 1)))


# ---------------------------------------------------------------------- webo
def test_webo_is_minus_log_of_the_weighted_sum_of_exponentials():
    f = logits(3)
    w = np.array([0.5, 2.0, -1.0, 0.0, 1.0, 3.0, 0.1])  # negative weights count as 0 (relu)
    expected = -np.log((np.maximum(w, 0) * np.exp(f)).sum(axis=1))
    np.testing.assert_allclose(detectors.create("webo", weights=w).score(f), expected, rtol=1e-12)
    ones = detectors.create("webo", weights=[1.0] * 7).score(f)
    np.testing.assert_allclose(ones, detectors.create("energy").score(f), rtol=1e-12)
    np.testing.assert_allclose(ones, -logsumexp(f, axis=1), rtol=1e-12)


def test_webo_refuses_bad_weights(tmp_path):
    with pytest.raises(ValueError, match="parameter 'weights'"):
        detectors.create("webo")
    with pytest.raises(ValueError, match="at least one positive"):
        detectors.create("webo", weights=np.array([0.0, -1.0]))
    with pytest.raises(ValueError, match="C=3"):
        detectors.create("webo", weights=np.ones(2)).score(np.zeros((4, 3)))
    webo = detectors.create("webo", weights=np.array([1.0, 2.0, 3.0]))
    webo.save(tmp_path / "webo")
    np.testing.assert_array_equal(detectors.load(tmp_path / "webo").score(logits(4, c=3)), webo.score(logits(4, c=3)))
    webo.set_params(weights=np.array([3.0, 2.0, 1.0]))
    expected = -np.log((np.array([3.0, 2.0, 1.0]) * np.exp(logits(4, c=3))).sum(1))
    np.testing.assert_allclose(webo.score(logits(4, c=3)), expected, rtol=1e-12)


# ---------------------------------------------------------------------- mahalanobis++ and rmds++
def gaussian_classes(seed: int = 0, n: int = 240, d: int = 6, c: int = 3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    z = 3.0 + rng.normal(size=(c, d))[labels] + rng.normal(size=(n, d)) * rng.uniform(0.5, 4.0, size=(n, 1))
    return z, labels, 3.0 + rng.normal(size=(25, d)) * 2.0


def mahalanobis_loop(z, labels, test):
    classes = np.unique(labels)
    means = np.stack([z[labels == c].mean(0) for c in classes])
    centred = z - means[labels]
    precision = np.linalg.inv(centred.T @ centred / len(z))
    per_class = np.array([[(t - m) @ precision @ (t - m) for m in means] for t in test])
    global_precision = np.linalg.inv(np.cov(z.T, bias=True))
    background = np.array([(t - z.mean(0)) @ global_precision @ (t - z.mean(0)) for t in test])
    return per_class.min(1), per_class.min(1) - background


def test_mahalanobis_pp_and_rmds_pp_are_the_originals_on_normalised_features():
    z, labels, test = gaussian_classes()
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    unit_test = test / np.linalg.norm(test, axis=1, keepdims=True)
    mds, rmds = mahalanobis_loop(unit, labels, unit_test)
    fit = {"features": z, "labels": labels}
    np.testing.assert_allclose(detectors.create("mahalanobis_pp").fit(fit).score(test), mds, rtol=1e-8)
    np.testing.assert_allclose(detectors.create("rmds_pp").fit(fit).score(test), rmds, rtol=1e-8, atol=1e-8)
    # invariant to rescaling any row, unlike the originals
    scaled = test * np.random.default_rng(1).uniform(0.1, 10.0, size=(len(test), 1))
    detector = detectors.create("mahalanobis_pp").fit(fit)
    np.testing.assert_allclose(detector.score(scaled), detector.score(test), rtol=1e-9)
    assert not np.allclose(detectors.create("mahalanobis").fit(fit).score(scaled), mds)


def test_mahalanobis_pp_partial_fit_and_shrinkage():
    z, labels, test = gaussian_classes(2)
    full = detectors.create("mahalanobis_pp", shrinkage=0.1).fit({"features": z, "labels": labels})
    chunked = detectors.create("mahalanobis_pp", shrinkage=0.1)
    for rows in (slice(0, 100), slice(100, 240)):
        chunked.partial_fit({"features": z[rows], "labels": labels[rows]})
    np.testing.assert_allclose(chunked.score(test), full.score(test), rtol=1e-10)


# ---------------------------------------------------------------------- neco
def test_neco_against_scikit_learn_scaler_and_pca():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12)) + 2.0
    test = rng.normal(size=(30, 12)) * 3.0
    standardised = StandardScaler().fit(z)
    pca = PCA().fit(standardised.transform(z))
    s = standardised.transform(test)
    for dim in (2, 5):
        expected = np.linalg.norm(pca.transform(s)[:, :dim], axis=1) / np.linalg.norm(s, axis=1)
        np.testing.assert_allclose(detectors.create("neco", dim=dim).fit({"features": z}).score(test), -expected)
    # default: the fewest components explaining 90 % of the variance
    default = detectors.create("neco").fit({"features": z})
    assert default.dim_ == int(np.searchsorted(np.cumsum(pca.explained_variance_ratio_), 0.9) + 1)
    # max-logit calibration multiplies the ratio
    f = rng.normal(size=(30, 4))
    ratio = np.linalg.norm(pca.transform(s)[:, :5], axis=1) / np.linalg.norm(s, axis=1)
    calibrated = detectors.create("neco", dim=5, maxlogit=True).fit({"features": z})
    np.testing.assert_allclose(calibrated.score({"features": test, "logits": f}), -ratio * f.max(1))
    with pytest.raises(ValueError, match="needs logits"):
        calibrated.score({"features": test})


def test_neco_constant_column_and_bad_dim():
    rng = np.random.default_rng(6)
    z = rng.normal(size=(100, 5))
    z[:, 2] = 7.0  # no variance: left unscaled, as scikit-learn's scaler does
    scores = detectors.create("neco", dim=2).fit({"features": z}).score(z[:5])
    assert np.isfinite(scores).all()
    with pytest.raises(ValueError, match="below the feature dimension D=5"):
        detectors.create("neco", dim=5).fit({"features": z})
    with pytest.raises(ValueError, match="do not vary"):
        detectors.create("neco", dim=1).fit({"features": np.ones((10, 3))})


# ---------------------------------------------------------------------- nci
def test_nci_by_loop_with_and_without_logits():
    rng = np.random.default_rng(7)
    z, test = rng.random((80, 6)), rng.random((20, 6)) * 2.0
    w, b = rng.normal(size=(4, 6)), rng.normal(size=4)
    mean = z.mean(0)
    for alpha in (0.0, 1e-4, 0.5):
        expected = []
        for row in test:
            c = int(np.argmax(w @ row + b))
            centred = row - mean
            expected.append(-(w[c] @ centred / np.linalg.norm(centred) + alpha * np.abs(row).sum()))
        nci = detectors.create("nci", alpha=alpha).fit({"features": z, "head": (w, b)})
        np.testing.assert_allclose(nci.score({"features": test}), expected, rtol=1e-10)
        np.testing.assert_allclose(nci.score({"features": test, "logits": test @ w.T + b}), expected, rtol=1e-10)


def test_nci_predicted_class_comes_from_the_given_logits():
    rng = np.random.default_rng(8)
    z, w, b = rng.random((40, 3)), rng.normal(size=(2, 3)), np.zeros(2)
    nci = detectors.create("nci", alpha=0.0).fit({"features": z, "head": (w, b)})
    row = z[:1]
    centred = row[0] - z.mean(0)
    forced = nci.score({"features": row, "logits": np.array([[0.0, 1.0]])})
    np.testing.assert_allclose(forced, [-(w[1] @ centred) / np.linalg.norm(centred)], rtol=1e-10)
    with pytest.raises(ValueError, match="parameter 'alpha'"):
        detectors.create("nci", alpha=-1.0)


@pytest.mark.parametrize("name", ["entropy", "doctor", "neco", "nci", "mahalanobis_pp", "rmds_pp"])
def test_float32_torch_inputs_match_float64(name):
    rng = np.random.default_rng(9)
    labels = np.repeat(np.arange(3), 30)
    z = (rng.normal(size=(3, 8))[labels] + rng.normal(size=(90, 8))).astype(np.float64)
    w, b = rng.normal(size=(3, 8)), rng.normal(size=3)
    fit = {"features": z, "labels": labels, "head": (w, b), "logits": z @ w.T + b}
    params = {"dim": 3} if name == "neco" else {}
    detector = detectors.create(name, **params).fit(fit)
    test = {"features": z[:10], "logits": z[:10] @ w.T + b}
    as_float32 = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in test.items()}
    np.testing.assert_allclose(detector.score(as_float32).numpy(), detector.score(test), rtol=1e-4, atol=1e-4)


def test_doctests():
    for module in (posterior, collapse):
        failures, attempted = doctest.testmod(module)
        assert attempted and not failures, module.__name__
