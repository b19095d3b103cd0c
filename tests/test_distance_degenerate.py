"""Degenerate fits of the Mahalanobis family are refused or reported, and Ledoit-Wolf shrinkage agrees with
scikit-learn's independent implementation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf

from oodguard.detectors import create
from oodguard.detectors.distance import ledoit_wolf_intensity, shrink

FAMILY = ["mahalanobis", "rmds"]


def gaussian_classes(n: int, dim: int, classes: int = 3, seed: int = 0, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    means = 4.0 * rng.normal(size=(classes, dim))
    labels = np.arange(n) % classes
    features = means[labels] + rng.normal(size=(n, dim)) * np.linspace(0.5, 2.0, dim) + shift
    return {"features": features.astype(np.float32), "labels": labels}


@pytest.mark.parametrize("dim, n", [(5, 200), (40, 25), (60, 60)])
def test_ledoit_wolf_matches_scikit_learn(dim, n):
    rows = np.random.default_rng(dim).normal(size=(n, dim)) @ np.random.default_rng(1).normal(size=(dim, dim))
    centred = rows - rows.mean(0)
    covariance = torch.from_numpy(centred.T @ centred / n)
    intensity = ledoit_wolf_intensity(covariance, float((np.square(centred).sum(1) ** 2).sum()), n)
    expected_cov, expected_intensity = ledoit_wolf(centred, assume_centered=True)
    assert intensity == pytest.approx(expected_intensity, rel=1e-10)
    np.testing.assert_allclose(shrink(covariance, intensity).numpy(), expected_cov, rtol=1e-10, atol=1e-12)


def test_the_detector_shrinks_its_within_class_covariance_as_scikit_learn_would():
    data = gaussian_classes(30, 50)
    detector = create("mahalanobis", shrinkage="ledoit_wolf").fit(data)
    z, labels = data["features"].astype(np.float64), data["labels"]
    means = np.stack([z[labels == c].mean(0) for c in range(3)])
    centred = z - means[labels]
    covariance, _ = ledoit_wolf(centred, assume_centered=True)
    test = gaussian_classes(6, 50, seed=5)["features"]
    precision = np.linalg.inv(covariance)
    expected = np.min([np.einsum("nd,de,ne->n", test - m, precision, test - m) for m in means], axis=0)
    np.testing.assert_allclose(detector.score({"features": test}), expected, rtol=2e-4)


@pytest.mark.parametrize("name", FAMILY)
def test_zero_shrinkage_is_the_plain_estimate_and_warns_on_nothing_for_well_conditioned_data(name):
    data, test = gaussian_classes(600, 8), gaussian_classes(20, 8, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # N >> D, no constant column: no warning
        plain = create(name).fit(data).score(test)
        zero = create(name, shrinkage=0.0).fit(data).score(test)
    np.testing.assert_array_equal(plain, zero)
    shrunk = create(name, shrinkage=0.5).fit(data).score(test)
    assert not np.allclose(plain, shrunk)


@pytest.mark.parametrize("name", FAMILY)
def test_fewer_samples_than_dimensions_warn_and_shrinkage_fixes_it(name):
    data = gaussian_classes(24, 64)
    with pytest.warns(
        UserWarning, match=r"is singular \(rank \d+ of D=64, from N=24 samples\).*shrinkage='ledoit_wolf'"
    ):
        create(name).fit(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        detector = create(name, shrinkage="ledoit_wolf").fit(data)
    near, far = gaussian_classes(30, 64, seed=9), gaussian_classes(30, 64, seed=9, shift=12.0)
    near_scores, far_scores = detector.score(near), detector.score(far)
    assert np.isfinite(near_scores).all() and np.isfinite(far_scores).all()
    if name == "mahalanobis":  # (a uniform shift also moves rmds' background term; its point is near-OOD)
        assert far_scores.min() > np.median(near_scores)


@pytest.mark.parametrize("name", FAMILY)
def test_constant_features_are_refused_and_dead_units_ignored(name):
    for value in (3.0, 0.1, 1e4):  # 0.1 leaves a covariance of ~1e-17 after rounding, not exactly 0
        constant = {"features": np.full((40, 6), value, dtype=np.float32), "labels": np.arange(40) % 2}
        with pytest.raises(ValueError, match="do not vary within classes.*every input would score the same"):
            create(name).fit(constant)
    data, test = gaussian_classes(300, 6), gaussian_classes(5, 6, seed=4)
    data["features"][:, 2] = 1.5  # one dead unit among informative ones: no information, ignored without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = create(name).fit(data).score(test)
    informative = {"features": np.delete(data["features"], 2, axis=1), "labels": data["labels"]}
    expected = create(name).fit(informative).score({"features": np.delete(test["features"], 2, axis=1)})
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)  # as if the column were not there
    few = gaussian_classes(20, 30)
    few["features"][:, 0] = 0.0
    with pytest.warns(UserWarning, match=r"from N=20 samples; 1 feature column\(s\) are constant"):
        create(name).fit(few)


def test_rmds_with_one_class_is_refused():
    one_class = {
        "features": np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32),
        "labels": np.zeros(50, int),
    }
    with pytest.raises(ValueError, match="rmds: needs at least 2 classes, got 1.*use mahalanobis"):
        create("rmds").fit(one_class)
    assert np.isfinite(create("mahalanobis").fit(one_class).score(one_class)).all()


def test_ledoit_wolf_needs_one_fit_and_a_fixed_intensity_combines_exactly():
    first, second = gaussian_classes(90, 6, seed=1), gaussian_classes(90, 6, seed=2)
    streamed = create("mahalanobis", shrinkage="ledoit_wolf").partial_fit(first)
    with pytest.raises(ValueError, match="ledoit_wolf.*partial_fit and merge.*shrinkage=<intensity"):
        streamed.partial_fit(second)
    both = {k: np.concatenate([first[k], second[k]]) for k in first}
    fixed = create("mahalanobis", shrinkage=0.3).partial_fit(first).partial_fit(second)
    test = gaussian_classes(10, 6, seed=3)
    np.testing.assert_allclose(fixed.score(test), create("mahalanobis", shrinkage=0.3).fit(both).score(test), rtol=1e-5)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "oas", True])
def test_bad_shrinkage_is_refused(bad):
    with pytest.raises(ValueError, match="shrinkage"):
        create("mahalanobis", shrinkage=bad)


def test_a_shrunk_detector_saves_and_loads(tmp_path):
    data, test = gaussian_classes(30, 40), gaussian_classes(5, 40, seed=6)
    detector = create("rmds", shrinkage="ledoit_wolf").fit(data)
    detector.save(tmp_path / "d")
    from oodguard.detectors import load

    loaded = load(tmp_path / "d")
    assert loaded.get_params() == {"shrinkage": "ledoit_wolf"}
    np.testing.assert_array_equal(loaded.score(test), detector.score(test))
