"""Logit detectors: known answers from plain per-sample loops, numerics at extreme logits, fitting."""

import inspect
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp

from oodguard import ModelOutputs
from oodguard.detectors import create, implementation, info
from oodguard.detectors.base import clone
from oodguard.detectors.logits import fit_temperature

LOGITS = np.array(
    [
        [2.0, 1.0, 0.1, -1.0],
        [0.5, 0.5, 0.4, 0.3],
        [-3.0, 4.0, 1.0, 0.0],
        [10.0, -2.0, 3.0, 9.5],
        [0.0, 0.0, 0.0, 0.0],
    ]
)


def softmax_row(row):
    exps = [math.exp(v - max(row)) for v in row]
    return [e / sum(exps) for e in exps]


def score(name, logits, **params):
    return create(name, **params).fit(ModelOutputs(logits=logits)).score(ModelOutputs(logits=logits))


# ---------------------------------------------------------------------- stateless detectors
def test_msp_known_answer_is_log_odds_of_msp():
    expected = []
    for row in LOGITS:
        msp = max(softmax_row(list(row)))
        expected.append(math.log((1 - msp) / msp))
    np.testing.assert_allclose(score("msp", LOGITS), expected, rtol=1e-12, atol=1e-12)


def test_msp_ranks_as_negative_msp():
    logits = np.random.default_rng(0).normal(size=(200, 6)) * 3
    msp = np.exp(log_softmax(logits, axis=1)).max(axis=1)
    assert np.array_equal(np.argsort(score("msp", logits), kind="stable"), np.argsort(-msp, kind="stable"))


def test_msp_huge_logits_are_finite_and_untied():
    logits = (torch.randn(500, 10, generator=torch.Generator().manual_seed(1)) * 1e4).to(torch.float32)
    # MSP saturates to 1, and even -log MSP in float64 collapses to 0, for almost every row
    assert float((torch.softmax(logits, dim=1).amax(dim=1) == 1).double().mean()) > 0.9
    neg_log_msp = torch.logsumexp(logits.double(), dim=1) - logits.double().amax(dim=1)
    assert float((neg_log_msp == 0).double().mean()) > 0.9
    scores = create("msp").score(ModelOutputs(logits=logits))
    assert bool(torch.isfinite(scores).all())
    assert len(torch.unique(scores)) == len(scores)
    values = logits.double().numpy()
    top = values.argmax(axis=1)
    rest = [logsumexp(np.delete(row, k)) - row[k] for row, k in zip(values, top, strict=True)]
    np.testing.assert_allclose(scores.numpy(), rest, rtol=1e-6)  # computed in the logits' float32


def test_maxlogit_and_energy_known_answers():
    np.testing.assert_allclose(score("maxlogit", LOGITS), [-max(row) for row in LOGITS])
    for temperature in (1.0, 2.5):
        expected = [-temperature * math.log(sum(math.exp(v / temperature) for v in row)) for row in LOGITS]
        np.testing.assert_allclose(score("energy", LOGITS, temperature=temperature), expected, rtol=1e-12)


@pytest.mark.parametrize(("gamma", "m"), [(0.1, 100), (0.5, 2), (2.0, 3)])
def test_gen_known_answer(gamma, m):
    expected = []
    for row in LOGITS:
        probs = sorted(softmax_row(list(row)), reverse=True)[:m]
        expected.append(sum(p**gamma * (1 - p) ** gamma for p in probs))
    np.testing.assert_allclose(score("gen", LOGITS, gamma=gamma, M=m), expected, rtol=1e-10)


def test_gen_does_not_saturate_at_large_logits():
    logits = np.array([[60.0, 0.0, -5.0], [50.0, 0.0, -5.0], [40.0, 0.0, -5.0]])
    scores = score("gen", logits)
    assert np.all(np.isfinite(scores)) and np.all(np.diff(scores) > 0)  # less confident -> more OOD


def test_float32_input_works_and_matches_float64():
    logits32 = LOGITS.astype(np.float32)
    for name in ("msp", "maxlogit", "energy", "gen"):
        np.testing.assert_allclose(score(name, logits32), score(name, LOGITS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("energy", {"temperature": 0}),
        ("energy", {"temperature": -1.0}),
        ("energy", {"temperature": float("nan")}),
        ("energy", {"temperature": "1"}),
        ("gen", {"gamma": 0.0}),
        ("gen", {"M": 0}),
        ("gen", {"M": 2.5}),
        ("gen", {"M": True}),
    ],
)
def test_bad_hyperparameters(name, params):
    with pytest.raises(ValueError, match=next(iter(params))):
        create(name, **params)


@pytest.mark.parametrize("name", ["msp", "gen", "klm"])
def test_single_class_is_refused(name):
    with pytest.raises(ValueError, match="at least 2 classes"):
        score(name, np.zeros((3, 1)))


# ---------------------------------------------------------------------- KL-matching
def klm_reference(fit_logits, test_logits):
    """Templates and min-KL by plain loops over samples and classes (OpenOOD ``kl_matching_postprocessor.py``)."""
    num_classes = fit_logits.shape[1]
    groups = {}
    for row in fit_logits:
        groups.setdefault(int(np.argmax(row)), []).append(softmax_row(list(row)))
    templates = {
        k: [max(sum(p[c] for p in ps) / len(ps), 1e-12) for c in range(num_classes)] for k, ps in groups.items()
    }
    scores = []
    for row in test_logits:
        p = softmax_row(list(row))
        kls = [sum(p[c] * math.log(p[c] / d[c]) for c in range(num_classes) if p[c] > 0) for d in templates.values()]
        scores.append(min(kls))
    return sorted(groups), np.array(scores)


def test_klm_known_answer():
    rng = np.random.default_rng(2)
    fit_logits = rng.normal(size=(40, 4)) * 2
    test_logits = rng.normal(size=(10, 4)) * 2
    classes, expected = klm_reference(fit_logits, test_logits)
    detector = create("klm").fit(ModelOutputs(logits=fit_logits))
    assert detector.state_["template_classes"].tolist() == classes
    np.testing.assert_allclose(detector.score(ModelOutputs(logits=test_logits)), expected, rtol=1e-9, atol=1e-12)


def test_klm_class_never_predicted_is_left_out():
    rng = np.random.default_rng(3)
    fit_logits = rng.normal(size=(30, 4))
    fit_logits[:, 2] -= 20.0  # class 2 is never the argmax
    test_logits = rng.normal(size=(8, 4))
    test_logits[0, 2] = 30.0  # a test sample predicted as the unseen class still gets a finite score
    classes, expected = klm_reference(fit_logits, test_logits)
    assert classes == [0, 1, 3]
    detector = create("klm").fit(ModelOutputs(logits=fit_logits))
    assert detector.state_["template_classes"].tolist() == [0, 1, 3]
    scores = detector.score(ModelOutputs(logits=test_logits))
    assert np.all(np.isfinite(scores))
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-12)


def test_klm_partial_fit_and_merge_equal_full_fit():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(90, 5)) * 3
    test = ModelOutputs(logits=rng.normal(size=(20, 5)) * 3)
    full = create("klm").fit(ModelOutputs(logits=logits))
    chunked = create("klm")
    for start in range(0, 90, 25):
        chunked.partial_fit(ModelOutputs(logits=logits[start : start + 25]))
    merged = (
        create("klm").fit(ModelOutputs(logits=logits[:37])).merge(create("klm").fit(ModelOutputs(logits=logits[37:])))
    )
    for other in (chunked, merged):
        for key, value in full.state_.items():
            np.testing.assert_allclose(other.state_[key].numpy(), value.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(other.score(test), full.score(test), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- temperature scaling
def nll(log_temperature, logits, labels):
    log_probs = log_softmax(logits / math.exp(log_temperature), axis=1)
    return -log_probs[np.arange(len(labels)), labels].mean()


def sample_calibrated(n, num_classes, seed):
    """Logits whose softmax is the true label distribution, and labels drawn from it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, num_classes)) * 2
    probs = np.exp(log_softmax(logits, axis=1))
    labels = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return logits, labels


def test_tempscale_matches_scipy_minimisation():
    logits, labels = sample_calibrated(400, 6, seed=5)
    logits = logits * 1.7 + np.random.default_rng(6).normal(size=logits.shape) * 0.3
    reference = minimize_scalar(nll, bounds=(-3, 3), args=(logits, labels), method="bounded", options={"xatol": 1e-10})
    detector = create("tempscale").fit(ModelOutputs(logits=logits, labels=labels))
    assert detector.temperature_ == pytest.approx(math.exp(reference.x), rel=1e-7)
    assert nll(math.log(detector.temperature_), logits, labels) <= reference.fun + 1e-12


def test_tempscale_recovers_known_temperature():
    logits, labels = sample_calibrated(8000, 5, seed=7)
    for temperature in (0.5, 3.0):
        fitted = fit_temperature(torch.from_numpy(logits * temperature), torch.from_numpy(labels))
        assert fitted == pytest.approx(temperature, rel=0.05)


def test_tempscale_known_answer_score():
    logits, labels = sample_calibrated(300, 4, seed=8)
    detector = create("tempscale").fit(ModelOutputs(logits=logits * 2, labels=labels))
    scaled = LOGITS / detector.temperature_
    expected = []
    for row in scaled:
        msp = max(softmax_row(list(row)))
        expected.append(math.log((1 - msp) / msp))
    np.testing.assert_allclose(detector.score(ModelOutputs(logits=LOGITS)), expected, rtol=1e-10, atol=1e-12)


def test_tempscale_separable_data_hits_the_bound_and_stays_finite():
    logits = np.eye(3)[[0, 1, 2, 0, 1, 2]] * 5
    detector = create("tempscale").fit(ModelOutputs(logits=logits, labels=[0, 1, 2, 0, 1, 2]))
    assert detector.temperature_ == pytest.approx(1e-3)
    assert np.all(np.isfinite(detector.score(ModelOutputs(logits=LOGITS[:, :3]))))


def test_tempscale_needs_labels_in_range():
    with pytest.raises(ValueError, match="labels"):
        create("tempscale").fit(ModelOutputs(logits=LOGITS, labels=[0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="labels"):
        create("tempscale").fit(ModelOutputs(logits=LOGITS))


# ---------------------------------------------------------------------- declared parameters
DEFAULTS = {
    "msp": {},
    "maxlogit": {},
    "energy": {"temperature": 1.0},
    "gen": {"gamma": 0.1, "M": 100},
    "klm": {},
    "tempscale": {},
}
GIVEN = {"energy": {"temperature": 2}, "gen": {"gamma": 0.5, "M": np.int64(3)}}
FIT = ModelOutputs(logits=LOGITS, labels=[0, 1, 1, 0, 2])


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_signature_names_every_parameter_keyword_only_with_its_default(name):
    cls = implementation(name)
    parameters = inspect.signature(cls).parameters.values()
    assert {p.name: p.default for p in parameters} == DEFAULTS[name]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)
    assert set(cls._parameter_constraints) == set(DEFAULTS[name])
    assert create(name).get_params() == DEFAULTS[name] == info(name)["defaults"]


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_get_params_are_the_arguments_as_given_and_clone_is_unfitted(name):
    given = GIVEN.get(name, {})
    detector = create(name, **given)
    params = detector.get_params()
    assert params == given
    assert {k: type(v) for k, v in params.items()} == {k: type(v) for k, v in given.items()}
    scores = detector.fit(FIT).score(FIT)
    assert detector.get_params() == params  # fitting changes no parameter
    copy = clone(detector)
    assert type(copy) is type(detector) and copy is not detector and copy.get_params() == params
    assert copy.is_fitted == (not copy.needs_fit) and copy.state_ is None
    np.testing.assert_array_equal(copy.fit(FIT).score(FIT), scores)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("energy", {"temperature": 0.0}),
        ("energy", {"temperature": math.inf}),
        ("energy", {"temperature": None}),
        ("gen", {"gamma": -0.1}),
        ("gen", {"gamma": True}),
        ("gen", {"M": 0}),
        ("gen", {"M": 3.0}),
    ],
)
def test_each_constrained_parameter_names_itself_in_the_one_error_format(name, params):
    (param,) = params
    with pytest.raises(ValueError, match=rf"^{name}: parameter '{param}' must be .*; got "):
        create(name, **params)


def test_params_are_read_only_and_set_params_validates():
    detector = create("gen", M=5)
    detector.params["M"] = 7  # a fresh dict: writing into it changes nothing
    assert detector.M == 5
    with pytest.raises(ValueError, match="parameter 'M' must be"):
        detector.set_params(M=0)
    assert detector.M == 5
