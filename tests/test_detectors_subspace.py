"""ViM and Residual: known answers from a plain numpy implementation of the formulas, and their edge cases."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from oodguard.detectors import create, implementation
from oodguard.detectors.base import clone
from oodguard.detectors.subspace import vim_principal_dim


def _data(n=60, d=12, c=5, seed=0):
    rng = np.random.default_rng(seed)
    features = np.maximum(rng.normal(0.5, 1.0, size=(n, d)), 0) + 0.1 * rng.random((n, d))
    weight = rng.normal(size=(c, d))
    bias = rng.normal(size=c) + 2.0
    queries = np.abs(rng.normal(0.5, 1.5, size=(9, d)))
    return features, weight, bias, queries


def _logsumexp(v):
    m = max(v)
    return m + np.log(sum(np.exp(x - m) for x in v))


def _reference_subspace(features, weight, bias, k):
    """Official recipe: u = -pinv(W) b, uncentred covariance of z - u, eigenvectors of ranks k+1..D."""
    u = -np.linalg.pinv(weight) @ bias
    centred = features - u
    cov = centred.T @ centred / len(features)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    return u, vectors[:, order[k:]]


def _reference_vim(features, weight, bias, queries, k, query_logits=None):
    u, residual_basis = _reference_subspace(features, weight, bias, k)
    fit_max_logits = [max(weight @ z + bias) for z in features]
    fit_residuals = [np.linalg.norm((z - u) @ residual_basis) for z in features]
    alpha = np.mean(fit_max_logits) / np.mean(fit_residuals)
    scores = []
    for i, z in enumerate(queries):
        logits = weight @ z + bias if query_logits is None else query_logits[i]
        scores.append(alpha * np.linalg.norm((z - u) @ residual_basis) - _logsumexp(logits))
    return np.array(scores), alpha


@pytest.mark.parametrize("dim", [3, 6, 9, None])  # 3: principal basis stored; 6 (= D/2), 9: residual basis
def test_vim_known_answer(dim):
    features, weight, bias, queries = _data()
    k = 6 if dim is None else dim
    expected, alpha = _reference_vim(features, weight, bias, queries, k)
    detector = create("vim", dim=dim).fit({"features": features, "head": (weight, bias)})
    np.testing.assert_allclose(detector.score({"features": queries}), expected, rtol=1e-9, atol=1e-9)
    assert float(detector.state_["alpha"]) == pytest.approx(alpha, rel=1e-10)
    assert int(detector.state_["principal_dim"]) == k


@pytest.mark.parametrize("dim", [3, 9, None])
def test_residual_known_answer(dim):
    features, weight, bias, queries = _data(seed=1)
    k = 6 if dim is None else dim
    u, residual_basis = _reference_subspace(features, weight, bias, k)
    expected = [np.linalg.norm((z - u) @ residual_basis) for z in queries]
    detector = create("residual", dim=dim).fit({"features": features, "head": (weight, bias)})
    np.testing.assert_allclose(detector.score({"features": queries}), expected, rtol=1e-9, atol=1e-9)


def test_vim_uses_supplied_logits():
    features, weight, bias, queries = _data(seed=2)
    rng = np.random.default_rng(5)
    fit_logits = features @ weight.T + bias + rng.normal(size=(len(features), len(bias)))
    query_logits = rng.normal(size=(len(queries), len(bias)))
    detector = create("vim", dim=4).fit({"features": features, "logits": fit_logits, "head": (weight, bias)})
    u, residual_basis = _reference_subspace(features, weight, bias, 4)
    alpha = fit_logits.max(axis=1).mean() / np.mean([np.linalg.norm((z - u) @ residual_basis) for z in features])
    expected = [
        alpha * np.linalg.norm((z - u) @ residual_basis) - _logsumexp(f)
        for z, f in zip(queries, query_logits, strict=True)
    ]
    scores = detector.score({"features": queries, "logits": query_logits})
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-9)


def test_vim_ranks_like_the_virtual_logit_probability():
    features, weight, bias, _ = _data(n=200, d=16, seed=3)
    queries = np.abs(np.random.default_rng(4).normal(0.5, 1.0, size=(300, 16)))
    detector = create("vim").fit({"features": features, "head": (weight, bias)})
    scores = detector.score({"features": queries})
    # Paper: append the virtual logit alpha * r(x); the OOD probability is its softmax entry.
    alpha = float(detector.state_["alpha"])
    residual = create("residual").fit({"features": features, "head": (weight, bias)}).score({"features": queries})
    extended = np.concatenate([queries @ weight.T + bias, alpha * residual[:, None]], axis=1)
    extended -= extended.max(axis=1, keepdims=True)
    virtual_probability = np.exp(extended[:, -1]) / np.exp(extended).sum(axis=1)
    assert np.all(np.diff(virtual_probability[np.argsort(scores)]) >= 0)
    assert len(np.unique(virtual_probability)) > 250  # not saturated, so the ranking check has teeth


def test_principal_dim_rule():
    assert [vim_principal_dim(d) for d in (4096, 2048, 2047, 1024, 768, 767, 512, 16, 3)] == [
        1000,
        1000,
        512,
        512,
        512,
        383,
        256,
        8,
        1,
    ]
    rng = np.random.default_rng(0)
    features, weight = rng.random((40, 768)), rng.normal(size=(3, 768))
    detector = create("residual").fit({"features": features, "head": (weight, np.zeros(3))})
    assert int(detector.state_["principal_dim"]) == 512


def test_float32_features_stay_float32_and_agree():
    features, weight, bias, queries = _data(n=300, d=32, seed=6)
    for dim in (4, 24):
        detector = create("vim", dim=dim).fit({"features": features, "head": (weight, bias)})
        torch_scores = detector.score({"features": torch.from_numpy(queries.astype(np.float32))})
        assert torch_scores.dtype == torch.float64
        np.testing.assert_allclose(torch_scores.numpy(), detector.score({"features": queries}), rtol=1e-4, atol=1e-4)


def test_fewer_fit_rows_than_features():
    features, weight, bias, queries = _data(n=20, d=32, seed=7)  # N < D, but N > k = 8
    for name in ("vim", "residual"):
        scores = create(name, dim=8).fit({"features": features, "head": (weight, bias)}).score({"features": queries})
        assert np.all(np.isfinite(scores))
    # N <= k = 16: every fit feature lies in the principal subspace. Residual works, ViM's alpha is undefined.
    features = features[:12]
    scores = create("residual").fit({"features": features, "head": (weight, bias)}).score({"features": queries})
    assert np.all(np.isfinite(scores))
    with pytest.raises(ValueError, match="alpha"):
        create("vim").fit({"features": features, "head": (weight, bias)})


def test_non_positive_alpha_warns():
    features, weight, bias, _ = _data(seed=8)
    with pytest.warns(RuntimeWarning, match="alpha"):
        create("vim").fit({"features": features, "head": (weight, bias - 1000.0)})


@pytest.mark.parametrize("dim", [0, -3, 2.5, True, "8"])
def test_bad_dim_is_refused_at_construction(dim):
    for name in ("vim", "residual"):
        with pytest.raises(ValueError, match=f"{name}: parameter 'dim' must be None or an integer >= 1"):
            create(name, dim=dim)


@pytest.mark.parametrize("dim", [12, 13])
def test_dim_not_below_feature_dim_is_refused_at_fit(dim):
    features, weight, bias, _ = _data()
    for name in ("vim", "residual"):
        with pytest.raises(ValueError, match="0 < dim < D = 12"):
            create(name, dim=dim).fit({"features": features, "head": (weight, bias)})


def test_numpy_integer_dim_is_kept_as_given_and_saved_as_json(tmp_path):
    from oodguard.detectors import load

    features, weight, bias, queries = _data()
    detector = create("vim", dim=np.int64(4)).fit({"features": features, "head": (weight, bias)})
    assert type(detector.params["dim"]) is np.int64  # parameters are stored as given
    detector.save(tmp_path)
    loaded = load(tmp_path)
    assert type(loaded.params["dim"]) is int and loaded.params["dim"] == 4
    np.testing.assert_array_equal(loaded.score({"features": queries}), detector.score({"features": queries}))


def test_no_partial_fit():
    features, weight, bias, _ = _data()
    with pytest.raises(TypeError, match="partial_fit"):
        create("vim").partial_fit({"features": features, "head": (weight, bias)})


def test_state_does_not_alias_the_callers_head():
    features, weight, bias, queries = _data()
    detector = create("vim").fit({"features": features, "head": (weight, bias)})
    before = detector.score({"features": queries})
    weight[:] = 0.0
    np.testing.assert_array_equal(detector.score({"features": queries}), before)


# ---------------------------------------------------------------------- declared parameters
@pytest.mark.parametrize("name", ["vim", "residual"])
def test_signature_names_dim_keyword_only_with_its_default(name):
    parameters = inspect.signature(implementation(name)).parameters
    assert list(parameters) == ["dim"]
    assert parameters["dim"].default is None and parameters["dim"].kind is inspect.Parameter.KEYWORD_ONLY
    assert create(name).get_params() == {"dim": None}


@pytest.mark.parametrize("name", ["vim", "residual"])
@pytest.mark.parametrize("dim", [None, 3, np.int32(5)])
def test_get_params_are_the_arguments_as_given_and_clone_is_unfitted(name, dim):
    features, weight, bias, queries = _data()
    detector = create(name, dim=dim).fit({"features": features, "head": (weight, bias)})
    assert detector.get_params() == {"dim": dim} and type(detector.dim) is type(dim)
    copy = clone(detector)
    assert type(copy) is type(detector) and copy.get_params() == {"dim": dim} and not copy.is_fitted
    copy.fit({"features": features, "head": (weight, bias)})
    np.testing.assert_array_equal(copy.score({"features": queries}), detector.score({"features": queries}))
