"""GMM (class-conditional Gaussian mixture): known answers from scikit-learn, per-class statistics, bad fits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from oodguard.detectors import create
from oodguard.detectors.mixture import class_scatter


def _clusters(seed=0, n_per_class=30, d=5, c=3, offset=50.0):
    """Classes with different (correlated) covariances, far from the origin to exercise the centring."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(c), n_per_class)
    mixing = rng.normal(size=(c, d, d))
    features = np.stack([3.0 * rng.normal(size=d) * (y + 1) + mixing[y] @ rng.normal(size=d) for y in labels])
    return features + offset, labels


def _sklearn_mixture(features, labels, reg):
    classes = int(labels.max()) + 1
    means = np.stack([features[labels == c].mean(0) for c in range(classes)])
    covariances = np.stack(
        [np.cov(features[labels == c].T, bias=True) + reg * np.eye(features.shape[1]) for c in range(classes)]
    )
    mixture = GaussianMixture(classes, covariance_type="full")
    mixture.weights_ = np.bincount(labels) / len(labels)
    mixture.means_ = means
    mixture.covariances_ = covariances
    mixture.precisions_cholesky_ = np.stack([np.linalg.cholesky(np.linalg.inv(s)) for s in covariances])
    return mixture


@pytest.mark.parametrize("reg", [1e-6, 0.5])
def test_gmm_known_answer_is_minus_sklearn_log_likelihood(reg):
    features, labels = _clusters()
    labels[:10] = 1  # unequal class weights
    queries = np.random.default_rng(1).normal(size=(9, 5)) * 6.0 + 50.0
    detector = create("gmm", reg=reg).fit({"features": features, "labels": labels})
    expected = -_sklearn_mixture(features, labels, reg).score_samples(queries)
    np.testing.assert_allclose(detector.score(queries), expected, rtol=1e-10)
    # float32 features score in float32 products: close, not equal
    np.testing.assert_allclose(detector.score(queries.astype(np.float32)), expected, rtol=1e-5)


def test_gmm_uses_per_class_covariances():
    # class 0 wide, class 1 narrow, same centre distance: the point near the wide class is far less OOD
    rng = np.random.default_rng(2)
    wide = rng.normal(size=(400, 2)) * 5.0
    narrow = rng.normal(size=(400, 2)) * 0.1 + 20.0
    detector = create("gmm").fit({"features": np.vstack([wide, narrow]), "labels": np.repeat([0, 1], 400)})
    scores = detector.score(np.array([[3.0, 0.0], [23.0, 20.0]]))
    assert scores[0] < scores[1]


def test_class_scatter_matches_a_per_class_loop():
    rng = np.random.default_rng(3)
    rows = torch.as_tensor(rng.normal(size=(50, 4)))
    labels = torch.as_tensor(rng.integers(0, 4, size=50))
    labels[labels == 2] = 3  # an empty class has a zero scatter
    expected = torch.stack([rows[labels == c].T @ rows[labels == c] for c in range(4)])
    torch.testing.assert_close(class_scatter(rows, labels, 4), expected, rtol=1e-12, atol=1e-12)


def test_gmm_refuses_a_covariance_that_is_singular_without_reg():
    features, labels = _clusters(n_per_class=3)  # 3 rows in 5 dimensions: rank 2
    with pytest.raises(ValueError, match="larger reg"):
        create("gmm", reg=0.0).fit({"features": features, "labels": labels})
    assert np.isfinite(create("gmm").fit({"features": features, "labels": labels}).score(features)).all()


def test_gmm_refuses_bad_parameters_and_short_classes():
    with pytest.raises(ValueError, match="reg"):
        create("gmm", reg=-1.0)
    features, labels = _clusters()
    with pytest.raises(ValueError, match="at least 2"):
        create("gmm").fit({"features": features[:31], "labels": labels[:31]})


def test_gmm_refuses_covariances_that_cannot_fit_in_memory_before_allocating():
    from oodguard.detectors.mixture import check_covariance_memory, physical_memory_bytes

    # ImageNet-sized features: 1000 classes x 2048^2 float64 is 31 GiB per block
    with pytest.raises(MemoryError, match=r"1000 classes x 2048\^2 .* 93\.8 GiB, more than .* 24\.0 GiB; reduce"):
        check_covariance_memory("gmm", 1000, 2048, limit=24 * 2**30)
    check_covariance_memory("gmm", 10, 64, limit=24 * 2**30)  # a few MB: fine
    memory = physical_memory_bytes()
    assert memory is None or memory > 2**30
    # the detector checks before it converts or allocates anything: a [2, 1e6] float32 view costs nothing
    wide = {"features": torch.zeros(2, 1_000_000).expand(2, -1), "labels": torch.tensor([0, 1])}
    with pytest.raises(MemoryError, match="gmm: 2 classes"):
        create("gmm").fit(wide)


def test_gmm_refuses_features_that_vary_in_no_class():
    _, labels = _clusters()
    constant = np.full((len(labels), 5), 2.0)  # only reg would remain: every other input scores about 1/reg
    with pytest.raises(ValueError, match="do not vary within any class"):
        create("gmm").fit({"features": constant, "labels": labels})
    one_varies = constant.copy()
    one_varies[labels == 0, 0] += np.arange((labels == 0).sum())  # one class that varies is enough to fit
    assert np.isfinite(create("gmm").fit({"features": one_varies, "labels": labels}).score(one_varies)).all()
