"""Known answers and fit statistics of the feature-distance detectors (mahalanobis, rmds, knn, she, wdiscood).

Every expected value is computed here independently of oodguard: numpy loops over classes and samples,
``numpy.linalg`` and scikit-learn (``EmpiricalCovariance``, ``NearestNeighbors``), and for WDiscOOD a
direct transcription of the official fit (``ivalab/WDiscOOD``, ``ood_scores/scorer_dist.py``).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

from oodguard import ModelOutputs, detectors
from oodguard.detectors import distance
from oodguard.detectors.base import clone, symmetric_pinv
from oodguard.detectors.distance import WDiscOOD, pinv_sqrt

CLASS_SIZES = (14, 9, 17, 11)  # unequal on purpose
NUM_CLASSES = len(CLASS_SIZES)
DIM = 6


def blobs(seed: int = 0, sizes=CLASS_SIZES, dim: int = DIM, offset: float = 0.0):
    """Float64 Gaussian class clusters with correlated noise; returns features, labels, head."""
    rng = np.random.default_rng(seed)
    centres = offset + 3.0 * rng.normal(size=(len(sizes), dim))
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim) + np.eye(dim)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    features = centres[labels] + rng.normal(size=(len(labels), dim)) @ mixing
    order = rng.permutation(len(labels))
    weight = centres - centres.mean(0)
    bias = -0.5 * (centres**2).sum(1) + 0.5 * (centres.mean(0) ** 2).sum()
    return features[order], labels[order], (weight, bias)


def outputs(features, labels=None, head=None, logits=True) -> ModelOutputs:
    logit_values = features @ head[0].T + head[1] if (head is not None and logits) else None
    return ModelOutputs(features=features, labels=labels, logits=logit_values)


def queries(seed: int = 1, n: int = 12, dim: int = DIM) -> np.ndarray:
    return 4.0 * np.random.default_rng(seed).normal(size=(n, dim))


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


# ---------------------------------------------------------------------- references (independent of oodguard)
def reference_means(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.stack([z[y == c].mean(axis=0) for c in range(y.max() + 1)])


def reference_mahalanobis(z, y, test, relative=False):
    means = reference_means(z, y)
    precision = EmpiricalCovariance().fit(z - means[y]).precision_
    whole_mean = z.mean(axis=0)
    whole_precision = EmpiricalCovariance().fit(z).precision_
    scores = []
    for x in test:
        class_dist = [float((x - m) @ precision @ (x - m)) for m in means]
        background = float((x - whole_mean) @ whole_precision @ (x - whole_mean))
        scores.append(min(class_dist) - (background if relative else 0.0))
    return np.array(scores)


def reference_wdiscood(z, y, test, num_disc, alpha=1e-5, res_weight=5.0, feat_norm=False):
    """Straight transcription of the official WDiscOOD.fit / cal_score (per-sample loop)."""
    if feat_norm:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        test = test / np.linalg.norm(test, axis=1, keepdims=True)
    dim = z.shape[1]
    means = reference_means(z, y)
    precision = EmpiricalCovariance(assume_centered=True).fit(z - means[y]).precision_
    values, vectors = np.linalg.eigh(precision)
    whiten = vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T
    zw = np.stack([whiten @ row for row in z])
    means_w = reference_means(zw, y)
    centre_w = zw.mean(axis=0)
    between = EmpiricalCovariance(assume_centered=True).fit(means_w - centre_w).covariance_
    within = EmpiricalCovariance(assume_centered=True).fit(zw - means_w[y]).covariance_
    ratios, vecs = np.linalg.eig(np.linalg.inv(within + alpha * np.eye(dim)) @ between)
    ratios, discriminants = np.real(ratios), np.real(vecs).T
    order = np.argsort(ratios)[::-1]
    g = discriminants[order][:num_disc]
    _, singular, vh = np.linalg.svd(g)
    basis = vh[: singular.shape[0]]
    h = np.eye(dim) - basis.T @ basis
    scores = []
    for x in test:
        xw = whiten @ x
        d_g = min(np.linalg.norm(g @ xw - g @ m) for m in means_w)
        d_h = np.linalg.norm(h @ xw - h @ centre_w)
        scores.append(d_g + res_weight * d_h)
    return np.array(scores)


# ---------------------------------------------------------------------- known answers
def test_pinv_sqrt_squares_to_the_pseudo_inverse_even_when_singular():
    rng = np.random.default_rng(0)
    low_rank = rng.normal(size=(5, 3)) @ rng.normal(size=(3, 5))
    matrix = torch.from_numpy(low_rank @ low_rank.T)  # rank 3
    root = pinv_sqrt(matrix)
    torch.testing.assert_close(root, root.T)
    torch.testing.assert_close(root @ root, symmetric_pinv(matrix), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose((root @ root).numpy(), np.linalg.pinv(matrix.numpy(), hermitian=True), atol=1e-8)


@pytest.mark.parametrize("relative", [False, True], ids=["mahalanobis", "rmds"])
def test_mahalanobis_and_rmds_match_sklearn_loop(relative):
    z, y, _ = blobs()
    test = queries()
    detector = detectors.create("rmds" if relative else "mahalanobis").fit(outputs(z, y))
    expected = reference_mahalanobis(z, y, test, relative=relative)
    np.testing.assert_allclose(detector.score({"features": test}), expected, rtol=1e-8, atol=1e-8)


def test_mahalanobis_float32_keeps_accuracy_with_a_large_offset():
    # |mu|^2 >> M_c: the expansion |y|^2 - 2 y.m + |m|^2 would cancel badly without centring on the mean
    z, y, _ = blobs(offset=200.0)
    test = z[:10] + 0.5
    detector = detectors.create("mahalanobis").fit(outputs(z, y))
    exact = detector.score({"features": test})
    single = detector.score({"features": test.astype(np.float32)})
    np.testing.assert_allclose(single, exact, rtol=2e-3)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_knn_matches_sklearn_nearest_neighbors(dtype):
    z, _, _ = blobs()
    test = np.concatenate([queries(), z[:3]])  # fit rows too: their first neighbour is themselves
    k = 5
    detector = detectors.create("knn", k=k).fit({"features": z.astype(dtype)})
    distances, _ = NearestNeighbors(n_neighbors=k).fit(unit(z)).kneighbors(unit(test))
    tol = 1e-9 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(detector.score({"features": test.astype(dtype)}), distances[:, -1], rtol=tol, atol=tol)


def test_knn_zero_feature_is_sqrt2_from_everything():
    z, _, _ = blobs()
    detector = detectors.create("knn", k=3).fit({"features": z})
    np.testing.assert_allclose(detector.score({"features": np.zeros((2, DIM))}), np.sqrt(2.0))


def test_knn_bank_is_normalised_in_float64_chunk_by_chunk(monkeypatch):
    monkeypatch.setattr(distance, "_NORMALIZE_ROWS", 7)  # several chunks and a short last one
    features = torch.randn(40, 5, dtype=torch.float32)
    features[3] = 0.0
    bank = detectors.create("knn", k=3).fit({"features": features}).state_["bank"]
    assert bank.dtype == torch.float32
    # row by row, so the same bits as normalising the whole bank in float64 at once
    assert torch.equal(bank, distance.normalize_rows(features.to(torch.float64)).to(torch.float32))


def test_knn_subsample_is_seeded_and_uses_only_the_kept_rows():
    z, _, _ = blobs()
    fit = {"features": z}
    first = detectors.create("knn", k=3, ratio=0.5, seed=7).fit(fit)
    again = detectors.create("knn", k=3, ratio=0.5, seed=7).fit(fit)
    other = detectors.create("knn", k=3, ratio=0.5, seed=8).fit(fit)
    bank = first.state_["bank"].numpy()
    assert bank.shape == (len(z) // 2, DIM)
    np.testing.assert_array_equal(bank, again.state_["bank"].numpy())
    assert not np.array_equal(bank, other.state_["bank"].numpy())
    kept = [int(np.argmin(np.linalg.norm(unit(z) - row, axis=1))) for row in bank]
    assert len(set(kept)) == len(kept)  # distinct fit rows
    distances, _ = NearestNeighbors(n_neighbors=3).fit(unit(z)[kept]).kneighbors(unit(queries()))
    np.testing.assert_allclose(first.score({"features": queries()}), distances[:, -1], rtol=1e-9)


def test_she_uses_correctly_classified_samples_of_the_predicted_class():
    z, y, head = blobs()
    data = outputs(z, y, head)
    predicted = data.logits.argmax(1).numpy()
    z, y = np.concatenate([z, z[:1]]), np.concatenate([y, [(y[0] + 1) % NUM_CLASSES]])  # one wrong label
    logits = np.concatenate([data.logits.numpy(), data.logits.numpy()[:1]])
    predicted = np.concatenate([predicted, predicted[:1]])
    detector = detectors.create("she").fit({"features": z, "labels": y, "logits": logits})
    patterns = np.stack([z[(y == c) & (predicted == c)].mean(axis=0) for c in range(NUM_CLASSES)])
    test = queries()
    test_logits = test @ head[0].T + head[1]
    expected = [-float(x @ patterns[np.argmax(f)]) for x, f in zip(test, test_logits, strict=True)]
    np.testing.assert_allclose(detector.score({"features": test, "logits": test_logits}), expected, rtol=1e-10)


@pytest.mark.parametrize("feat_norm", [False, True])
def test_wdiscood_matches_the_official_fit_transcribed(feat_norm):
    z, y, _ = blobs()
    test = queries()
    params = {"num_disc": 2, "alpha": 1e-5, "res_weight": 5.0, "feat_norm": feat_norm}
    detector = detectors.create("wdiscood", **params).fit(outputs(z, y))
    expected = reference_wdiscood(z, y, test, **params)
    np.testing.assert_allclose(detector.score({"features": test}), expected, rtol=1e-7)


def test_wdiscood_num_disc_rule_and_zero_fisher_ratios():
    assert [WDiscOOD.default_num_disc(d) for d in (2048, 4096, 768, 1024, 512, 16, 1)] == [
        1000, 1000, 512, 512, 256, 8, 1,
    ]  # fmt: skip
    z, y, _ = blobs(sizes=(10, 10, 10), dim=8)  # balanced: rank(S_b) = C - 1 = 2
    detector = detectors.create("wdiscood", num_disc=6).fit(outputs(z, y))
    assert detector.state_["fisher_ratio"].shape == (2,)  # the 4 zero-ratio directions go to the residual
    reference = reference_wdiscood(z, y, queries(dim=8), num_disc=2)
    np.testing.assert_allclose(detector.score({"features": queries(dim=8)}), reference, rtol=1e-7)


# ---------------------------------------------------------------------- sufficient statistics
@pytest.mark.parametrize("name", ["mahalanobis", "rmds", "she", "wdiscood", "knn"])
def test_partial_fit_over_chunks_and_merge_equal_fit(name):
    z, y, head = blobs(seed=3)
    data, test = outputs(z, y, head), outputs(queries(), head=head)
    params = {"k": 4} if name == "knn" else {}
    full = detectors.create(name, **params).fit(data)
    chunked = detectors.create(name, **params)
    for part in (data[:20], data[20:33], data[33:]):
        chunked.partial_fit(part)
    merged = detectors.create(name, **params).fit(data[:25]).merge(detectors.create(name, **params).fit(data[25:]))
    for other in (chunked, merged):
        for key, value in full.stats_.items():
            torch.testing.assert_close(other.stats_[key], value, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(other.score(test), full.score(test), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["mahalanobis", "rmds", "wdiscood"])
def test_partial_fit_on_class_sorted_chunks_waits_for_every_class(name):
    z, y, _ = blobs(seed=3)  # chunks of one class each, C known from the labels only
    full = detectors.create(name).fit(outputs(z, y)).score({"features": queries()})
    forward = detectors.create(name)
    for c in range(NUM_CLASSES):  # C grows chunk by chunk: earlier statistics are zero-padded
        forward.partial_fit(outputs(z[y == c], y[y == c]))
    np.testing.assert_allclose(forward.score({"features": queries()}), full, rtol=1e-9)
    backward = detectors.create(name)
    for c in reversed(range(NUM_CLASSES)):
        backward.partial_fit(outputs(z[y == c], y[y == c]))
        if c > 0:  # classes below c have no sample yet: scoring waits, and says which
            with pytest.raises(ValueError, match="class 0: 0"):
                backward.score({"features": queries()})
    np.testing.assert_allclose(backward.score({"features": queries()}), full, rtol=1e-9)


# ---------------------------------------------------------------------- degenerate data and bad input
@pytest.mark.parametrize("name", ["mahalanobis", "rmds", "wdiscood"])
def test_fewer_samples_than_dimensions_and_dead_units_give_finite_scores(name):
    z, y, _ = blobs(sizes=(3, 2, 4), dim=20)  # N = 9 < D = 20
    z[:, 5] = 0.0  # a dead unit
    detector = detectors.create(name).fit(outputs(z, y))
    scores = detector.score({"features": queries(dim=20)})
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("name", ["mahalanobis", "rmds", "wdiscood"])
def test_class_with_one_sample_is_refused(name):
    z, y, _ = blobs(sizes=(5, 1, 5))
    with pytest.raises(ValueError, match="at least 2 fit samples .*class 1: 1"):
        detectors.create(name).fit(outputs(z, y))


def test_labels_outside_the_logit_classes_are_refused():
    z, y, head = blobs()
    data = outputs(z, y, head)
    with pytest.raises(ValueError, match="labels must lie in 0..3"):
        detectors.create("mahalanobis").fit({"features": z, "labels": y + 1, "logits": data.logits.numpy()})


def test_she_class_without_a_correct_prediction_is_refused():
    z, y, head = blobs()
    logits = outputs(z, y, head).logits.numpy()
    logits[:, 2] = -1e3  # nothing is ever predicted as class 2
    with pytest.raises(ValueError, match="correctly classified .*class 2: 0"):
        detectors.create("she").fit({"features": z, "labels": y, "logits": logits})


def test_knn_k_larger_than_the_bank_is_refused():
    z, _, _ = blobs()
    with pytest.raises(ValueError, match="k=60 but the bank holds only 51"):
        detectors.create("knn", k=60).fit({"features": z})
    with pytest.raises(ValueError, match="k=20 but the bank holds only 12"):
        detectors.create("knn", k=20, ratio=0.25).fit({"features": z})
    partial = detectors.create("knn", k=20).partial_fit({"features": z[:10]})
    with pytest.raises(ValueError, match="so far"):
        partial.score({"features": queries()})


def test_knn_subsampled_bank_refuses_partial_fit_and_merge():
    z, _, _ = blobs()
    detector = detectors.create("knn", k=3, ratio=0.5)
    assert not detector.supports_partial_fit
    with pytest.raises(TypeError, match="ratio=0.5 .*not a sufficient statistic"):
        detector.partial_fit({"features": z})
    fitted = detector.fit({"features": z})
    with pytest.raises(TypeError, match="ratio=0.5"):
        fitted.merge(detectors.create("knn", k=3, ratio=0.5).fit({"features": z}))


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("knn", {"k": 0}, "parameter 'k' must be"),
        ("knn", {"k": 2.5}, "parameter 'k' must be"),
        ("knn", {"ratio": 0.0}, "parameter 'ratio' must be"),
        ("knn", {"ratio": 1.5}, "parameter 'ratio' must be"),
        ("knn", {"seed": -1}, "parameter 'seed' must be"),
        ("wdiscood", {"alpha": 0.0}, "parameter 'alpha' must be"),
        ("wdiscood", {"num_disc": 0}, "parameter 'num_disc' must be"),
        ("wdiscood", {"num_disc": 2.0}, "parameter 'num_disc' must be"),
        ("wdiscood", {"res_weight": -1.0}, "parameter 'res_weight' must be"),
        ("wdiscood", {"res_weight": float("inf")}, "parameter 'res_weight' must be"),
        ("wdiscood", {"feat_norm": "yes"}, "parameter 'feat_norm' must be"),
        ("wdiscood", {"feat_norm": 1}, "parameter 'feat_norm' must be"),
        ("knn", {"k": True}, "parameter 'k' must be"),
        ("knn", {"seed": 1.0}, "parameter 'seed' must be"),
    ],
)
def test_bad_hyperparameters_are_refused(name, params, match):
    with pytest.raises(ValueError, match=match):
        detectors.create(name, **params)


# ---------------------------------------------------------------------- declared parameters
DEFAULTS = {
    "mahalanobis": {"shrinkage": None},
    "rmds": {"shrinkage": None},
    "she": {},
    "wdiscood": {"feat_norm": False, "alpha": 1e-05, "num_disc": None, "res_weight": 5.0},
    "knn": {
        "k": 50,
        "ratio": 1.0,
        "seed": 0,
        "backend": "torch",
        "index": "flat",
        "nlist": None,
        "nprobe": 8,
        "M": 32,
        "ef_search": 128,
    },
}
GIVEN = {
    "mahalanobis": {"shrinkage": "ledoit_wolf"},
    "rmds": {"shrinkage": np.float32(0.25)},
    "she": {},
    "wdiscood": {"feat_norm": True, "alpha": 1e-3, "num_disc": np.int64(2), "res_weight": 2},
    "knn": {
        "k": 3,
        "ratio": 0.5,
        "seed": 7,
        "backend": "faiss",
        "index": "ivf",
        "nlist": np.int64(4),
        "nprobe": 2,
        "M": 16,
        "ef_search": 64,
    },
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_signature_names_every_parameter_keyword_only_with_its_default(name):
    parameters = inspect.signature(detectors.implementation(name)).parameters.values()
    assert {p.name: p.default for p in parameters} == DEFAULTS[name]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)
    assert detectors.create(name).get_params() == DEFAULTS[name]


@pytest.mark.parametrize("name", sorted(GIVEN))
def test_get_params_are_the_arguments_as_given_and_clone_is_unfitted(name):
    detector = detectors.create(name, **GIVEN[name])
    params = detector.get_params()
    assert params == GIVEN[name]
    assert {k: type(v) for k, v in params.items()} == {k: type(v) for k, v in GIVEN[name].items()}
    features, labels, head = blobs(3)
    detector.fit(outputs(features, labels, head))
    copy = clone(detector)
    assert type(copy) is type(detector) and copy is not detector
    assert copy.get_params() == params and not copy.is_fitted
    assert detector.get_params() == params  # fitting changes no parameter
    copy.fit(outputs(features, labels, head))
    np.testing.assert_array_equal(
        copy.score(outputs(features, head=head)), detector.score(outputs(features, head=head))
    )


def test_params_are_read_only_and_set_params_validates():
    detector = detectors.create("knn", k=3)
    detector.params["k"] = 7  # a fresh dict: writing into it changes nothing
    assert detector.k == 3
    with pytest.raises(ValueError, match="parameter 'k' must be"):
        detector.set_params(k=0)
    assert detector.k == 3
