"""CARef, CADRef, pNML and IGEOOD (logits): known answers from per-sample numpy/scipy loops, invariances, edges."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, logsumexp, softmax

from oodguard.detectors import create, load

# small random heads leave some classes unpredicted on the fit rows; the warning has its own test
pytestmark = pytest.mark.filterwarnings("ignore:.*never predicted:UserWarning")


def _data(n=80, d=12, c=4, seed=0):
    rng = np.random.default_rng(seed)
    features = np.abs(rng.normal(0.5, 1.0, size=(n, d)))
    weight = rng.normal(size=(c, d))
    bias = rng.normal(size=c) + 3.0  # positive LSE everywhere, as CADRef assumes
    labels = rng.integers(0, c, size=n)
    labels[:c] = np.arange(c)
    queries = np.abs(rng.normal(0.5, 1.5, size=(7, d)))
    return features, weight, bias, labels, queries


def _outputs(features, weight, bias, labels=None, head=True):
    out = {"features": features, "logits": features @ weight.T + bias}
    if head:
        out["head"] = (weight, bias)
    if labels is not None:
        out["labels"] = labels
    return out


def _predicted_means(features, logits):
    predicted = logits.argmax(1)
    return {c: features[predicted == c].mean(0) for c in np.unique(predicted)}


# ---------------------------------------------------------------- CARef
def test_caref_known_answer():
    features, weight, bias, _, queries = _data()
    means = _predicted_means(features, features @ weight.T + bias)
    expected = []
    for z in queries:
        c = int(np.argmax(weight @ z + bias))
        expected.append(np.abs(z - means[c]).sum() / np.abs(z).sum())
    detector = create("caref").fit(_outputs(features, weight, bias, head=False))
    np.testing.assert_allclose(detector.score(_outputs(queries, weight, bias, head=False)), expected, rtol=1e-10)


def test_caref_scores_zero_at_a_class_mean():
    features, weight, bias, _, queries = _data(seed=1)
    detector = create("caref").fit(_outputs(features, weight, bias, head=False))
    at_mean = detector.state_["means"].numpy()[:1]
    logits = np.zeros((1, weight.shape[0]))
    logits[0, 0] = 1.0
    assert detector.score({"features": at_mean, "logits": logits})[0] == pytest.approx(0.0, abs=1e-12)


def test_caref_warns_for_never_predicted_classes_and_uses_the_overall_mean():
    features, weight, bias, _, _ = _data(seed=2)
    logits = np.zeros((len(features), 4))
    logits[:, 1] = 1.0  # only class 1 is ever predicted
    with pytest.warns(UserWarning, match="never predicted"):
        detector = create("caref").fit({"features": features, "logits": logits})
    np.testing.assert_allclose(detector.state_["means"].numpy(), np.tile(features.mean(0), (4, 1)), rtol=1e-12)


def test_caref_refuses_all_zero_rows():
    features, weight, bias, _, _ = _data(seed=3)
    detector = create("caref").fit(_outputs(features, weight, bias, head=False))
    with pytest.raises(ValueError, match="all-zero"):
        detector.score({"features": np.zeros((1, features.shape[1])), "logits": np.ones((1, 4))})


# ---------------------------------------------------------------- CADRef
def test_cadref_known_answer():
    features, weight, bias, _, queries = _data(seed=4)
    fit_logits = features @ weight.T + bias
    means = _predicted_means(features, fit_logits)
    mean_confidence = logsumexp(fit_logits, axis=1).mean()
    expected = []
    for z in queries:
        f = weight @ z + bias
        c = int(np.argmax(f))
        positive = negative = 0.0
        for d in range(len(z)):
            a = np.sign(weight[c, d]) * (z[d] - means[c][d])
            positive += max(a, 0.0)
            negative += max(-a, 0.0)
        norm = np.abs(z).sum()
        expected.append(positive / norm / logsumexp(f) + negative / norm / mean_confidence)
    detector = create("cadref").fit(_outputs(features, weight, bias))
    np.testing.assert_allclose(detector.score(_outputs(queries, weight, bias, head=False)), expected, rtol=1e-10)


def test_cadref_parts_add_up_to_caref_when_confidences_are_one():
    # with S(x) = S_bar = 1 the two parts sum to the CARef error (no zero weights here)
    features, weight, _, _, queries = _data(seed=5)
    c = weight.shape[0]
    bias = np.full(c, 0.0)
    fit = {"features": features, "logits": features @ weight.T, "head": (weight, bias)}
    cadref = create("cadref").fit(fit)
    caref = create("caref").fit(fit)
    shift = 1.0 - logsumexp(queries @ weight.T, axis=1, keepdims=True)  # LSE of the shifted logits is 1
    logits = queries @ weight.T + shift
    cadref.state_["mean_confidence"] = torch.ones(1, dtype=torch.float64)
    np.testing.assert_allclose(
        cadref.score({"features": queries, "logits": logits}),
        caref.score({"features": queries, "logits": logits}),
        rtol=1e-10,
    )


def test_cadref_refuses_non_positive_confidence_and_mixed_heads():
    features, weight, bias, _, _ = _data(seed=6)
    with pytest.raises(ValueError, match="not positive"):
        create("cadref").fit(_outputs(features, weight, bias - 100.0))
    detector = create("cadref").fit(_outputs(features, weight, bias))
    with pytest.raises(ValueError, match="LSE"):
        detector.score({"features": features[:2], "logits": np.full((2, 4), -50.0)})
    parts = create("cadref").partial_fit(_outputs(features, weight, bias))
    with pytest.raises(ValueError, match="different heads"):
        parts.partial_fit(_outputs(features, -weight, bias))


# ---------------------------------------------------------------- pNML
def test_pnml_known_answer():
    features, weight, bias, _, queries = _data(n=40, d=6, seed=7)
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    projector = np.linalg.pinv(x.T @ x)
    logits = queries @ weight.T + bias
    expected = []
    for z, f in zip(queries, logits, strict=True):
        u = z / np.linalg.norm(z)
        g = u @ projector @ u / (1 + u @ projector @ u)
        p = softmax(f)
        expected.append(np.log(np.sum(p / (p + (1 - p) * p**g))) / np.log(len(p)))
    detector = create("pnml").fit({"features": features})
    np.testing.assert_allclose(detector.score({"features": queries, "logits": logits}), expected, rtol=1e-9)


def test_pnml_regret_is_near_zero_well_inside_the_fit_span():
    rng = np.random.default_rng(8)
    features = np.zeros((200, 6))
    features[:, :3] = np.abs(rng.normal(1.0, 0.3, size=(200, 3)))  # the fit spans the first three units only
    inside = np.abs(rng.normal(1.0, 0.3, size=(5, 6)))
    inside[:, 3:] = 0.0
    logits = np.tile([2.0, 0.0, -1.0], (5, 1))
    detector = create("pnml").fit({"features": features})
    low = detector.score({"features": inside, "logits": logits})
    assert np.all(low >= 0) and np.all(low < 0.05)


def test_pnml_partial_fit_equals_fit():
    features, *_, queries = _data(seed=9)
    logits = np.random.default_rng(1).normal(size=(len(queries), 4))
    full = create("pnml").fit({"features": features})
    parts = create("pnml")
    for chunk in np.array_split(features, 4):
        parts.partial_fit({"features": chunk})
    np.testing.assert_allclose(
        parts.score({"features": queries, "logits": logits}), full.score({"features": queries, "logits": logits}),
        rtol=1e-10,
    )  # fmt: skip


def test_pnml_saturated_probabilities_stay_finite():
    features, *_ = _data(seed=10)
    detector = create("pnml").fit({"features": features})
    logits = np.array([[800.0, 0.0, -800.0, 0.0]])
    score = detector.score({"features": features[:1], "logits": logits})
    assert np.isfinite(score).all() and 0 <= score[0] <= 1


# ---------------------------------------------------------------- IGEOOD
@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_igeood_known_answer(temperature):
    features, weight, bias, labels, queries = _data(seed=11)
    fit_logits = features @ weight.T + bias
    centroids = np.stack([fit_logits[labels == c].mean(0) for c in range(4)])
    logits = queries @ weight.T + bias
    expected = []
    for f in logits:
        p = softmax(f / temperature)
        distances = [2 * np.arccos(min(1.0, np.sum(np.sqrt(p * softmax(mu / temperature))))) for mu in centroids]
        expected.append(-np.mean(distances))
    detector = create("igeood", temperature=temperature).fit({"logits": fit_logits, "labels": labels})
    np.testing.assert_allclose(detector.score(logits), expected, rtol=1e-9)


def test_igeood_distance_is_zero_at_a_centroid_and_invariant_to_logit_shifts():
    logits = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    detector = create("igeood").fit({"logits": logits, "labels": np.arange(3)})
    queries = np.array([[1.0, 2.0, 0.5]])
    np.testing.assert_allclose(detector.score(queries), detector.score(queries + 7.0), rtol=1e-12)
    roots = np.exp(0.5 * log_softmax(logits, axis=1))
    at_first = 2 * np.arccos(np.clip(roots @ roots[0], 0, 1))
    assert detector.score(logits[:1])[0] == pytest.approx(-at_first.mean(), abs=1e-7)


def test_igeood_needs_labels_for_every_class():
    logits = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match="labels"):
        create("igeood").fit({"logits": logits})
    with pytest.raises(ValueError, match="at least one"):
        create("igeood").fit({"logits": logits, "labels": np.zeros(10, dtype=np.int64)})


@pytest.mark.parametrize("name", ["caref", "cadref", "pnml", "igeood"])
def test_save_load_round_trip(name, tmp_path):
    features, weight, bias, labels, queries = _data(seed=12)
    detector = create(name).fit(_outputs(features, weight, bias, labels))
    test = _outputs(queries, weight, bias, head=False)
    detector.save(tmp_path)
    np.testing.assert_array_equal(load(tmp_path).score(test), detector.score(test))


# ---------------------------------------------------------------- Relation
@pytest.mark.parametrize(("power", "threshold"), [(1, 0.03), (4, 0.0), (2, 0.5)])
def test_relation_known_answer(power, threshold):
    features, weight, bias, _, queries = _data(n=30, seed=13)
    fit_logits = features @ weight.T + bias
    logits = queries @ weight.T + bias
    units = features / np.sqrt((features**2).sum(1, keepdims=True) + 1e-10)
    probabilities = softmax(fit_logits, axis=1)
    expected = []
    for z, f in zip(queries, logits, strict=True):
        u = z / np.sqrt((z**2).sum() + 1e-10)
        p = softmax(f)
        total = 0.0
        for u_j, p_j in zip(units, probabilities, strict=True):
            r = max(u @ u_j, 0.0) * (p @ p_j)
            total += r**power if r > threshold else 0.0
        expected.append(-total)
    detector = create("relation", pow=power, threshold=threshold)
    detector.fit({"features": features, "logits": fit_logits})
    np.testing.assert_allclose(detector.score({"features": queries, "logits": logits}), expected, rtol=1e-10)


def test_relation_partial_fit_equals_fit_and_scales_with_the_bank():
    features, weight, bias, _, queries = _data(n=40, seed=14)
    fit = {"features": features, "logits": features @ weight.T + bias}
    test = {"features": queries, "logits": queries @ weight.T + bias}
    full = create("relation").fit(fit)
    parts = create("relation")
    for chunk in np.array_split(np.arange(40), 3):
        parts.partial_fit({key: value[chunk] for key, value in fit.items()})
    np.testing.assert_allclose(parts.score(test), full.score(test), rtol=1e-12)
    doubled = create("relation").fit({key: np.concatenate([value, value]) for key, value in fit.items()})
    np.testing.assert_allclose(doubled.score(test), 2 * full.score(test), rtol=1e-12)  # a sum over the bank


def test_relation_save_load_round_trip(tmp_path):
    features, weight, bias, _, queries = _data(seed=15)
    detector = create("relation", pow=2).fit({"features": features, "logits": features @ weight.T + bias})
    test = {"features": queries, "logits": queries @ weight.T + bias}
    detector.save(tmp_path)
    # the loaded bank may sit at another memory alignment, which can change the BLAS summation order by an ulp
    np.testing.assert_allclose(load(tmp_path).score(test), detector.score(test), rtol=1e-13)
    with pytest.raises(ValueError, match="pow"):
        create("relation", pow=0)


def test_relation_row_sums_accumulate_blocks_in_float64():
    from oodguard.detectors.relation import row_sums

    rng = np.random.default_rng(16)
    values = rng.random((6, 5000)).astype(np.float32) * (rng.random((6, 5000)) > 0.3)
    exact = values.astype(np.float64).sum(axis=1)
    sums = row_sums(torch.from_numpy(values))
    assert sums.dtype == torch.float64
    np.testing.assert_allclose(sums.numpy(), exact, rtol=2e-7)  # float32 blocks, float64 across them
    wide = torch.from_numpy(values.astype(np.float64))
    assert torch.equal(row_sums(wide), wide.sum(dim=1))
    assert row_sums(torch.zeros(0, 7)).shape == (0,) and row_sums(torch.zeros(3, 0)).tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- IGEOOD (features)
def _fisher_rao_univariate(m1, s1, m2, s2):
    """The official closed form, sqrt(2) log((a + b) / (a - b)), written out per pair of univariate Gaussians."""
    a = np.hypot((m1 - m2) / np.sqrt(2), s1 + s2)
    b = np.hypot((m1 - m2) / np.sqrt(2), s1 - s2)
    return np.sqrt(2) * np.log((a + b) / (a - b)) if a != b else 0.0


def test_igeood_features_known_answer():
    features, _, _, labels, queries = _data(seed=13)
    means = np.stack([features[labels == c].mean(0) for c in range(4)])
    sigma = np.sqrt(np.mean((features - means[labels]) ** 2, axis=0))  # tied, diagonal, biased
    expected = [
        min(
            np.sqrt(sum(_fisher_rao_univariate(z[d], sigma[d], means[c, d], sigma[d]) ** 2 for d in range(len(z))))
            for c in range(4)
        )
        for z in queries
    ]
    detector = create("igeood_features").fit({"features": features, "labels": labels})
    np.testing.assert_allclose(detector.score(queries), expected, rtol=1e-9)
    np.testing.assert_allclose(detector.score(queries.astype(np.float32)), expected, rtol=1e-5)


def test_igeood_features_is_zero_at_a_class_mean_and_leaves_constant_units_out():
    features, _, _, labels, queries = _data(seed=14)
    features[:, 3] = 2.0  # a dead unit: no within-class variance
    detector = create("igeood_features").fit({"features": features, "labels": labels})
    mean = features[labels == 1].mean(0, keepdims=True)
    assert detector.score(mean)[0] == pytest.approx(0.0, abs=1e-12)
    moved = queries.copy()
    moved[:, 3] += 100.0
    np.testing.assert_allclose(detector.score(moved), detector.score(queries), rtol=1e-12)
    with pytest.raises(ValueError, match="do not vary"):
        create("igeood_features").fit({"features": np.ones((8, 3)), "labels": np.arange(8) % 2})
