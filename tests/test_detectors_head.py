"""fDBD, NNGuide, GradNorm and NAC: known answers from the paper formulas, exact partial fits, bad input."""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import pytest
import torch

from oodguard import ModelOutputs, detectors
from oodguard.detectors.base import clone
from oodguard.detectors.head import NAC, nac_bin_edges


def random_outputs(n: int, c: int = 4, d: int = 6, seed: int = 0, head_seed: int = 0) -> ModelOutputs:
    """float64 non-negative features with a random head (float64 keeps the comparisons exact)."""
    rng = np.random.default_rng(seed)
    head_rng = np.random.default_rng(1000 + head_seed)
    weight, bias = head_rng.normal(size=(c, d)), 0.3 * head_rng.normal(size=c)
    features = np.abs(rng.normal(size=(n, d)))
    labels = rng.integers(0, c, size=n)
    return ModelOutputs(features=features, logits=features @ weight.T + bias, labels=labels, head=(weight, bias))


def log_sum_exp(values) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def logits_of(z, weight, bias) -> list[float]:
    return [sum(w * x for w, x in zip(row, z, strict=True)) + b for row, b in zip(weight, bias, strict=True)]


# ---------------------------------------------------------------------- fDBD
def test_fdbd_known_answer_by_hand():
    # Two classes in 2-D: w_0 - w_1 = (2, 0), so the boundary distance of z is |f_0 - f_1| / 2.
    weight, bias = np.array([[1.0, 0.0], [-1.0, 0.0]]), np.zeros(2)
    fit = ModelOutputs(features=np.array([[0.0, 0.0], [2.0, 2.0]]), head=(weight, bias))  # mean (1, 1)
    test = ModelOutputs(features=np.array([[4.0, 1.0], [1.0, 5.0]]))
    scores = detectors.create("fdbd").fit(fit).score(test)
    # z=(4,1): |4 - (-4)| / 2 = 4, ||z - mu|| = 3 -> s = 4/3.  z=(1,5): |1 - (-1)| / 2 = 1, ||z - mu|| = 4.
    np.testing.assert_allclose(scores, [-4 / 3, -1 / 4], rtol=1e-12)


def test_fdbd_known_answer_against_paper_formula_loop():
    fit, test = random_outputs(40, c=5, seed=1), random_outputs(7, c=5, seed=2)
    weight, bias = (t.numpy() for t in fit.head)
    mean = fit.features.numpy().mean(axis=0)
    expected = []
    for z in test.features.numpy():
        f = logits_of(z, weight, bias)
        top = max(range(5), key=lambda c: f[c])
        total = sum(abs(f[top] - f[c]) / math.dist(weight[top], weight[c]) for c in range(5) if c != top)
        expected.append(-total / math.dist(z, mean))
    np.testing.assert_allclose(detectors.create("fdbd").fit(fit).score(test), expected, rtol=1e-10)


def test_fdbd_partial_fit_and_merge_equal_full_fit():
    data, test = random_outputs(61, seed=3), random_outputs(9, seed=4)
    full = detectors.create("fdbd").fit(data)
    chunked = detectors.create("fdbd")
    for part in (data[:20], data[20:21], data[21:]):
        chunked.partial_fit(part)
    merged = detectors.create("fdbd").fit(data[:33]).merge(detectors.create("fdbd").fit(data[33:]))
    for other in (chunked, merged):
        np.testing.assert_allclose(other.state_["mean"], full.state_["mean"], rtol=1e-12)
        np.testing.assert_allclose(other.score(test), full.score(test), rtol=1e-10, atol=1e-12)


def test_head_is_kept_exactly_through_fit_and_merge():
    data = random_outputs(12, seed=3)
    for name in ("fdbd", "nac"):
        fitted = detectors.create(name).fit(data[:5]).merge(detectors.create(name).fit(data[5:]))
        assert torch.equal(fitted.state_["weight"], data.head[0]) and torch.equal(fitted.state_["bias"], data.head[1])


def test_fdbd_refuses_identical_weight_rows():
    data = random_outputs(10)
    weight, bias = data.head
    weight = weight.clone()
    weight[2] = weight[0]
    with pytest.raises(ValueError, match="rows 0 and 2 are identical"):
        detectors.create("fdbd").fit(data.with_fields(head=(weight, bias)))


def test_fdbd_feature_at_the_train_mean_is_finite_and_very_id():
    data = random_outputs(10)
    detector = detectors.create("fdbd").fit(data)
    at_mean = detector.state_["mean"].numpy()[None, :]
    scores = detector.score({"features": np.concatenate([at_mean, data.features.numpy()[:3]])})
    assert np.isfinite(scores).all() and scores[0] < scores[1:].min()


def test_fdbd_refuses_chunks_or_merges_from_another_model():
    first, other_model = random_outputs(10, seed=1), random_outputs(10, seed=2, head_seed=1)
    detector = detectors.create("fdbd").fit(first)
    with pytest.raises(ValueError, match="different final layer"):
        detector.partial_fit(other_model)
    with pytest.raises(ValueError, match="different final layer"):
        detector.merge(detectors.create("fdbd").fit(other_model))


# ---------------------------------------------------------------------- NNGuide
def nnguide_expected(fit: ModelOutputs, test: ModelOutputs, ratio: float, k: int, seed: int, q=None):
    """Straight from the paper and the official code: shuffled bank, LSE-scaled unit vectors, top-k mean."""
    features, weight, bias = fit.features.numpy(), *(t.numpy() for t in fit.head)
    index = np.arange(len(features))
    np.random.RandomState(seed).shuffle(index)  # the official subsample after np.random.seed(seed)
    bank_rows = features[index[: int(len(features) * ratio)]]
    clip = np.percentile(bank_rows, q) if q is not None else math.inf
    bank = []
    for z in bank_rows:
        z = [min(v, clip) for v in z]
        norm = math.sqrt(sum(v * v for v in z))
        bank.append([v / norm * log_sum_exp(logits_of(z, weight, bias)) for v in z])
    expected = []
    for z in test.features.numpy():
        z = [min(v, clip) for v in z]
        norm = math.sqrt(sum(v * v for v in z))
        sims = sorted((sum(a * v / norm for a, v in zip(b, z, strict=True)) for b in bank), reverse=True)
        expected.append(-log_sum_exp(logits_of(z, weight, bias)) * sum(sims[:k]) / k)
    return expected


def test_nnguide_known_answer():
    fit, test = random_outputs(30, seed=5), random_outputs(6, seed=6)
    detector = detectors.create("nnguide", bank_ratio=0.4, k=3, seed=7).fit(fit)
    assert detector.state_["bank"].shape == (12, 6)
    np.testing.assert_allclose(detector.score(test), nnguide_expected(fit, test, 0.4, 3, 7), rtol=1e-10)


def test_nnguide_react_clip_known_answer():
    fit, test = random_outputs(30, seed=5), random_outputs(6, seed=6)
    test = ModelOutputs(features=test.features * 1.5)  # some entries above the clip
    detector = detectors.create("nnguide", bank_ratio=0.5, k=4, react_percentile=80).fit(fit)
    expected = nnguide_expected(fit, test, 0.5, 4, 0, q=80)
    np.testing.assert_allclose(detector.score(test), expected, rtol=1e-10)


def test_nnguide_k_larger_than_bank_is_refused():
    with pytest.raises(ValueError, match="bank holds 3 sample.*k=10.*raise bank_ratio"):
        detectors.create("nnguide").fit(random_outputs(300))


@pytest.mark.parametrize(
    "params",
    [{"bank_ratio": 0}, {"bank_ratio": 1.5}, {"k": 0}, {"k": 2.5}, {"seed": -1}, {"react_percentile": 0}],
)
def test_nnguide_bad_parameters(params):
    with pytest.raises(ValueError, match=next(iter(params))):
        detectors.create("nnguide", **params)


# ---------------------------------------------------------------------- GradNorm
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradnorm_closed_form_equals_autograd(temperature):
    """The official computation: L1 norm of dL/dW from a real backward pass through nn.Linear, one sample at a time."""
    fit, test = random_outputs(5, c=5, d=7, seed=8), random_outputs(6, c=5, d=7, seed=9)
    layer = torch.nn.Linear(7, 5).double()
    with torch.no_grad():
        layer.weight.copy_(fit.head[0])
        layer.bias.copy_(fit.head[1])
    expected = []
    for z in test.features:
        layer.zero_grad()
        loss = -torch.log_softmax(layer(z[None]) / temperature, dim=-1).sum()
        loss.backward()
        expected.append(-float(layer.weight.grad.abs().sum()))
    scores = detectors.create("gradnorm", temperature=temperature).fit(fit).score(test)
    np.testing.assert_allclose(scores, expected, rtol=1e-10)


def test_gradnorm_bad_temperature():
    for value in (0, -1.0, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            detectors.create("gradnorm", temperature=value)


# ---------------------------------------------------------------------- NAC
def reference_edges(m: int) -> np.ndarray:
    """The official ``logspace(1e3, M)`` construction, written out independently."""
    h = m // 2
    x_l = np.array([math.log(t, 1000) for t in np.linspace(1, math.sqrt(1000), h)])
    x_r = (1 - x_l)[::-1]
    edges = list(x_l[:-1]) + list(x_r)
    edges[-1] += 0.01
    return np.array([*edges, 1.2])


@pytest.mark.parametrize("m", [4, 10, 50, 1000])
def test_nac_bin_edges_follow_the_official_construction(m):
    edges = nac_bin_edges(m).numpy()
    assert edges.shape == (m,) and edges[0] == 0 and edges[-1] == 1.2 and edges[-2] == pytest.approx(1.01)
    np.testing.assert_allclose(edges, reference_edges(m), rtol=1e-15, atol=1e-15)
    for i in range(1, m // 2):  # symmetric about 0.5, apart from the shifted edge 1.01
        assert edges[i] + edges[m - 2 - i] == pytest.approx(1.0, abs=1e-15)
    if m == 4:
        np.testing.assert_allclose(edges, [0.0, 0.5, 1.01, 1.2])


def nac_states_by_autograd(data: ModelOutputs, alpha: float) -> np.ndarray:
    layer = torch.nn.Linear(data.features.shape[1], data.head[0].shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(data.head[0])
        layer.bias.copy_(data.head[1])
    z = data.features.clone().requires_grad_(True)
    logits = layer(z)
    c = logits.shape[1]
    loss = (-(1.0 / c) * torch.log_softmax(logits, dim=-1)).sum()  # summed over the batch, as the official
    (grad,) = torch.autograd.grad(loss, z)
    o, g = data.features.numpy(), grad.numpy()
    return np.array(
        [[1 / (1 + math.exp(-alpha * o[i, n] * g[i, n])) for n in range(o.shape[1])] for i in range(len(o))]
    )


def bin_of(state: float, edges: np.ndarray) -> int | None:
    for i in range(len(edges) - 1):
        if edges[i] <= state < edges[i + 1]:
            return i
    return None


def test_nac_known_answer_against_autograd_and_loops():
    alpha, m, o = 3.0, 10, 10
    fit, test = random_outputs(40, seed=10), random_outputs(8, seed=11)
    edges = reference_edges(m)
    counts = np.zeros((m - 1, 6))
    for row in nac_states_by_autograd(fit, alpha):
        for n, state in enumerate(row):
            counts[bin_of(state, edges), n] += 1
    coverage = np.minimum(counts / o, 1)
    expected = []
    for row in nac_states_by_autograd(test, alpha):
        expected.append(-np.mean([coverage[bin_of(s, edges), n] for n, s in enumerate(row)]))
    detector = detectors.create("nac", alpha=alpha, M=m, O=o).fit(fit)
    np.testing.assert_array_equal(detector.stats_["counts"].numpy(), counts)
    assert len(set(np.round(expected, 12))) > 3  # the states really spread over several bins
    np.testing.assert_allclose(detector.score(test), expected, rtol=1e-12)


def test_nac_float32_edges_decide_exactly_as_float64():
    edges = nac_bin_edges(50)
    rounded = NAC._edges_for(edges, torch.float32)
    near = torch.cat([edges.float(), torch.nextafter(edges.float(), torch.zeros(50)), torch.rand(2000)])
    exact = (near.double()[:, None] >= edges[None, :]).sum(dim=1)
    np.testing.assert_array_equal(torch.searchsorted(rounded, near, right=True), exact)


def test_nac_saturated_states_are_binned_and_scores_in_range():
    data = random_outputs(30, seed=12)
    detector = detectors.create("nac").fit(data)  # alpha=100 saturates: states 0 and 1 fall in the end bins
    scores = detector.score({"features": data.features.numpy() * 50})
    assert np.all((scores >= -1) & (scores <= 0))


def test_nac_partial_fit_and_merge_equal_full_fit():
    data, test = random_outputs(57, seed=13), random_outputs(9, seed=14)
    params = {"alpha": 3.0, "M": 20, "O": 4}
    full = detectors.create("nac", **params).fit(data)
    chunked = detectors.create("nac", **params)
    for part in (data[:25], data[25:26], data[26:]):
        chunked.partial_fit(part)
    merged = detectors.create("nac", **params).fit(data[:30]).merge(detectors.create("nac", **params).fit(data[30:]))
    for other in (chunked, merged):
        np.testing.assert_array_equal(other.stats_["counts"].numpy(), full.stats_["counts"].numpy())
        np.testing.assert_allclose(other.score(test), full.score(test), rtol=1e-12)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"M": 51}, "parameter 'M' must be an even integer"),
        ({"M": 2}, "parameter 'M' must be an integer >= 4"),
        ({"M": 10.0}, "parameter 'M'"),
        ({"alpha": 0}, "parameter 'alpha'"),
        ({"O": -1}, "parameter 'O'"),
    ],
)
def test_nac_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        detectors.create("nac", **params)


# ---------------------------------------------------------------------- registry
def test_registry_metadata():
    for name in ("fdbd", "nnguide", "gradnorm", "nac"):
        meta = detectors.info(name)
        assert meta["requires"] == ["features"] and "head" in meta["fit_requires"] and meta["needs_fit"]
    assert detectors.info("fdbd")["partial_fit"] and detectors.info("nac")["partial_fit"]
    assert not detectors.info("nnguide")["partial_fit"] and not detectors.info("gradnorm")["partial_fit"]
    assert detectors.info("nac")["defaults"] == {"alpha": 100.0, "M": 50, "O": 50}


# ---------------------------------------------------------------------- old spellings
def test_gradnorm_mode_autograd_creates_gradnorm_autograd_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="gradnorm_autograd"):
        detector = detectors.create("gradnorm", mode="autograd", temperature=2.0)
    assert detector.name == "gradnorm_autograd" and detector.get_params() == {"temperature": 2.0}
    with pytest.warns(DeprecationWarning, match="mode parameter is deprecated"):
        closed = detectors.create("gradnorm", mode="closed_form")
    assert closed.name == "gradnorm" and "mode" not in closed.get_params()


def test_nac_layers_creates_nac_layers_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="nac_layers"):
        detector = detectors.create("nac", layers=["layer1"], M=10)
    assert detector.name == "nac_layers" and detector.get_params()["layers"] == ["layer1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # layers=None is the penultimate NAC: nothing deprecated
        assert detectors.create("nac", layers=None).name == "nac"


def test_gradnorm_and_nac_no_longer_take_the_switching_parameters():
    with pytest.raises(TypeError, match="unknown parameter"):
        detectors.implementation("gradnorm")().set_params(mode="autograd")
    with pytest.raises(TypeError):
        NAC(layers=["layer1"])  # type: ignore[call-arg]


# ---------------------------------------------------------------------- declared parameters
DEFAULTS = {
    "fdbd": {},
    "nnguide": {
        "bank_ratio": 0.01,
        "k": 10,
        "seed": 0,
        "react_percentile": None,
        "backend": "torch",
        "index": "flat",
        "nlist": None,
        "nprobe": 8,
        "M": 32,
        "ef_search": 128,
    },
    "gradnorm": {"temperature": 1.0},
    "nac": {"alpha": 100.0, "M": 50, "O": 50},
}
GIVEN = {
    "fdbd": {},
    "nnguide": {
        "bank_ratio": 0.5,
        "k": 3,
        "seed": np.int64(7),
        "react_percentile": 80,
        "backend": "faiss",
        "index": "ivf",
        "nlist": np.int64(2),
        "nprobe": 2,
        "M": 16,
        "ef_search": 64,
    },
    "gradnorm": {"temperature": 2},
    "nac": {"alpha": 5, "M": 10, "O": 2.5},
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_signature_names_every_parameter_keyword_only_with_its_default(name):
    cls = detectors.implementation(name)
    parameters = inspect.signature(cls).parameters.values()
    assert {p.name: p.default for p in parameters} == DEFAULTS[name]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)
    assert set(cls._parameter_constraints) == set(DEFAULTS[name])
    assert detectors.create(name).get_params() == DEFAULTS[name]


@pytest.mark.parametrize("name", sorted(GIVEN))
def test_get_params_are_the_arguments_as_given_and_clone_is_unfitted(name):
    detector = detectors.create(name, **GIVEN[name])
    params = detector.get_params()
    assert params == GIVEN[name]
    assert {k: type(v) for k, v in params.items()} == {k: type(v) for k, v in GIVEN[name].items()}
    fit, test = random_outputs(40, seed=1), random_outputs(7, seed=2)
    detector.fit(fit)
    assert detector.get_params() == params  # fitting changes no parameter
    copy = clone(detector)
    assert type(copy) is type(detector) and copy is not detector
    assert copy.get_params() == params and not copy.is_fitted
    np.testing.assert_array_equal(copy.fit(fit).score(test), detector.score(test))


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("nnguide", {"bank_ratio": 0.0}),
        ("nnguide", {"bank_ratio": 1.01}),
        ("nnguide", {"k": 0}),
        ("nnguide", {"k": True}),
        ("nnguide", {"seed": -1}),
        ("nnguide", {"seed": 2**32}),
        ("nnguide", {"react_percentile": 0}),
        ("nnguide", {"react_percentile": 100.5}),
        ("gradnorm", {"temperature": 0.0}),
        ("gradnorm", {"temperature": "1"}),
        ("nac", {"alpha": -1.0}),
        ("nac", {"M": 2}),
        ("nac", {"M": 51}),
        ("nac", {"O": 0}),
        ("nac", {"O": math.nan}),
    ],
)
def test_each_constrained_parameter_names_itself_in_the_one_error_format(name, params):
    (param,) = params
    with pytest.raises(ValueError, match=rf"^{name}: parameter '{param}' must be .*; got "):
        detectors.create(name, **params)


def test_params_are_read_only_and_set_params_validates():
    detector = detectors.create("nnguide", k=3)
    detector.params["k"] = 7  # a fresh dict: writing into it changes nothing
    assert detector.k == 3
    with pytest.raises(ValueError, match="parameter 'k' must be"):
        detector.set_params(k=0)
    assert detector.k == 3
