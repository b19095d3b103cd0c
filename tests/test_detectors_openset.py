"""MOS and OpenMax: known answers from plain loops (and scipy for the Weibull fits), layouts, errors."""

import inspect
import math
import tempfile

import numpy as np
import pytest
import scipy.spatial.distance as spd
import torch
from scipy.optimize import brentq
from scipy.stats import weibull_min

from oodguard import ModelOutputs
from oodguard.detectors import create, implementation, load
from oodguard.detectors.base import clone
from oodguard.detectors.openset import fit_weibull_high, mos_group_labels, mos_predict

GROUPS = [2, 3, 1]  # 6 classes in 3 groups -> 9 logits: [o, a, b | o, c, d, e | o, f]


def softmax_row(row):
    exps = [math.exp(v - max(row)) for v in row]
    return [e / sum(exps) for e in exps]


def mos_reference(logits, group_sizes):
    """Per sample, loop over groups: min "others" probability, and the official group-wise prediction."""
    scores, predictions = [], []
    for row in logits:
        start, first_class, others, best = 0, 0, [], (-1.0, None)
        for size in group_sizes:
            probs = softmax_row(list(row[start : start + size + 1]))
            others.append(probs[0])
            for j in range(1, size + 1):
                if probs[j] > best[0]:
                    best = (probs[j], first_class + j - 1)
            start += size + 1
            first_class += size
        scores.append(min(others))
        predictions.append(best[1])
    return np.array(scores), np.array(predictions)


# ---------------------------------------------------------------------- MOS
def test_mos_known_answer_and_prediction():
    logits = np.random.default_rng(0).normal(size=(12, 9)) * 2
    logits[0, [0, 3, 7]] += 6  # confidently "others" in every group
    min_others, predictions = mos_reference(logits, GROUPS)
    scores = create("mos", group_sizes=GROUPS).score(ModelOutputs(logits=logits))
    np.testing.assert_allclose(scores, np.log(min_others / (1 - min_others)), rtol=1e-10, atol=1e-12)
    assert np.argmax(scores) == 0
    np.testing.assert_array_equal(mos_predict(logits, GROUPS), predictions)
    torch_prediction = mos_predict(torch.from_numpy(logits), GROUPS)
    assert isinstance(torch_prediction, torch.Tensor) and torch_prediction.tolist() == predictions.tolist()


def test_mos_huge_logits_do_not_saturate():
    logits = np.zeros((3, 9))
    logits[:, [0, 3, 7]] = [[100.0], [200.0], [300.0]]  # "others" probability is 1.0 in float64 for all three
    scores = create("mos", group_sizes=GROUPS).score(ModelOutputs(logits=logits))
    assert np.all(np.isfinite(scores)) and np.all(np.diff(scores) > 0)


def test_mos_group_labels():
    labels = np.array([0, 1, 2, 3, 4, 5, -1])
    expected = []
    for label in labels:
        row, first = [], 0
        for size in GROUPS:
            row.append(label - first + 1 if first <= label < first + size else 0)
            first += size
        expected.append(row)
    np.testing.assert_array_equal(mos_group_labels(labels, GROUPS), expected)
    with pytest.raises(ValueError, match="0..5"):
        mos_group_labels(np.array([6]), GROUPS)


def test_mos_fit_save_load_and_width_check():
    logits = np.random.default_rng(1).normal(size=(5, 9))
    detector = create("mos", group_sizes=np.array(GROUPS)).fit(ModelOutputs(logits=logits))
    np.testing.assert_array_equal(detector.params["group_sizes"], GROUPS)  # stored as given (an array)
    with tempfile.TemporaryDirectory() as directory:
        detector.save(directory)
        reloaded = load(directory)
    outputs = ModelOutputs(logits=logits)
    np.testing.assert_array_equal(reloaded.score(outputs), detector.score(outputs))
    with pytest.raises(ValueError, match="9 logits"):
        create("mos", group_sizes=GROUPS).score(ModelOutputs(logits=np.zeros((2, 8))))
    with pytest.raises(ValueError, match="9 logits"):
        mos_predict(np.zeros((2, 6)), GROUPS)


@pytest.mark.parametrize(
    "group_sizes",
    [
        None,
        [],
        [2, 0],
        [1.5, 2],
        "abc",
        [True, 2],
        np.array([2, 0]),
        np.array([1.5, 2.0]),
        np.array([True, True]),
        np.array([], dtype=np.int64),
        np.array([[2, 3]]),
        torch.tensor([2, -1]),
    ],
)
def test_mos_bad_group_sizes(group_sizes):
    with pytest.raises(ValueError, match="mos: parameter 'group_sizes' must be"):
        create("mos", group_sizes=group_sizes)


def test_mos_set_params_changes_the_layout_used_for_scoring():
    detector = create("mos", group_sizes=GROUPS)
    detector.score(ModelOutputs(logits=np.zeros((2, 9))))
    detector.set_params(group_sizes=[3, 3])  # 6 classes in 2 groups -> 8 logits
    logits = np.random.default_rng(3).normal(size=(4, 8))
    np.testing.assert_array_equal(
        detector.score(ModelOutputs(logits=logits)),
        create("mos", group_sizes=[3, 3]).score(ModelOutputs(logits=logits)),
    )
    with pytest.raises(ValueError, match="8 logits"):
        detector.score(ModelOutputs(logits=np.zeros((2, 9))))


# ---------------------------------------------------------------------- Weibull fitting
def test_weibull_fit_matches_scipy():
    rng = np.random.default_rng(2)
    tails = np.sort(rng.gamma(5.0, 1.0, size=(4, 100)), axis=1)[:, ::-1][:, :20].copy()
    mask = np.ones_like(tails, dtype=bool)
    mask[2, 6:] = False  # a class with a short tail (few samples)
    shape, scale, loc = fit_weibull_high(torch.from_numpy(tails), torch.from_numpy(mask))
    for k in range(4):
        tail = tails[k][mask[k]]
        c, _, s = weibull_min.fit(tail - tail.min() + 10000.0, floc=0)
        assert shape[k].item() == pytest.approx(c, rel=1e-6)
        assert scale[k].item() == pytest.approx(s, rel=1e-9)
        assert loc[k].item() == pytest.approx(tail.min() - 10000.0, rel=1e-12)


def test_weibull_fit_refuses_constant_tails():
    with pytest.raises(ValueError, match="all their tail values are equal"):
        fit_weibull_high(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool))


# ---------------------------------------------------------------------- OpenMax
def openmax_data(seed=3, num_classes=4, per_class=40):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    logits = rng.normal(size=(len(labels), num_classes)) + 4.0 * np.eye(num_classes)[labels]
    return logits, labels


def weibull_mle(y):
    """Two-parameter Weibull MLE: scipy's fit, polished with brentq on the shape's likelihood equation.

    scipy alone stops at a residual ~1e-11 in that equation, which for these translated data (shapes of 1e4-1e5)
    is a relative error in the shape of up to 1e-5.
    """
    log_y = np.log(y)

    def likelihood_equation(shape):
        weights = np.exp(shape * (log_y - log_y.max()))
        return 1 / shape + log_y.mean() - (weights * log_y).sum() / weights.sum()

    start, _, _ = weibull_min.fit(y, floc=0)
    shape = brentq(likelihood_equation, 0.5 * start, 2 * start, xtol=1e-14 * start)
    return shape, math.exp(log_y.max()) * np.mean(np.exp(shape * (log_y - log_y.max()))) ** (1 / shape)


def openmax_reference(fit_logits, fit_labels, test_logits, tailsize, alpha, distance, eu_weight):
    """OpenOOD's openmax_postprocessor, per class and per sample, with scipy's Weibull MLE in place of libMR."""

    def dist(a, b):
        if distance == "euclidean":
            return spd.euclidean(a, b)
        if distance == "cosine":
            return spd.cosine(a, b)
        return eu_weight * spd.euclidean(a, b) + spd.cosine(a, b)

    num_classes = fit_logits.shape[1]
    models = []
    for c in range(num_classes):
        rows = [row for row, label in zip(fit_logits, fit_labels, strict=True) if label == c and np.argmax(row) == c]
        mav = np.mean(rows, axis=0)
        tail = np.sort([dist(mav, row) for row in rows])[-tailsize:]
        small = tail.min()
        shape, scale = weibull_mle(tail - small + 10000.0)
        models.append((mav, shape, scale, small))
    log_odds = []
    for row in test_logits:
        ranked = np.argsort(row)[::-1][:alpha]
        omega = np.zeros(num_classes)
        omega[ranked] = [(alpha + 1 - r) / alpha for r in range(1, alpha + 1)]
        revised, unknown = [], 0.0
        for c, (mav, shape, scale, small) in enumerate(models):
            w_score = weibull_min.cdf(dist(mav, row) - small + 10000.0, shape, scale=scale)
            revised.append(row[c] * (1 - w_score * omega[c]))
            unknown += row[c] - revised[-1]
        denominator = sum(math.exp(v) for v in revised) + math.exp(unknown)
        p_unknown = math.exp(unknown) / denominator
        log_odds.append(math.log(p_unknown / (1 - p_unknown)))
    return np.array(log_odds)


@pytest.mark.parametrize(("distance", "tailsize", "alpha"), [("euclidean", 20, 3), ("eucos", 10, 2), ("cosine", 20, 4)])
def test_openmax_known_answer(distance, tailsize, alpha):
    logits, labels = openmax_data()
    rng = np.random.default_rng(4)
    test_logits = np.concatenate([logits[::16] + rng.normal(size=(10, 4)) * 0.5, rng.normal(size=(5, 4)) * 3])
    params = {"distance": distance, "tailsize": tailsize, "alpha": alpha, "eu_weight": 0.5}
    expected = openmax_reference(logits, labels, test_logits, **params)
    detector = create("openmax", **params).fit(ModelOutputs(logits=logits, labels=labels))
    np.testing.assert_allclose(detector.score(ModelOutputs(logits=test_logits)), expected, rtol=1e-7, atol=1e-10)


def test_openmax_ignores_misclassified_fit_samples():
    logits, labels = openmax_data()
    wrong = logits.copy()
    wrong[0] = [0.0, 9.0, 0.0, 0.0]  # labelled 0, predicted 1: must not enter class 0's or class 1's model
    a = create("openmax").fit(ModelOutputs(logits=np.delete(logits, 0, axis=0), labels=labels[1:]))
    b = create("openmax").fit(ModelOutputs(logits=wrong, labels=labels))
    for key, value in a.state_.items():
        np.testing.assert_allclose(b.state_[key].numpy(), value.numpy(), rtol=1e-12)


def test_openmax_far_logits_score_higher():
    logits, labels = openmax_data()
    detector = create("openmax").fit(ModelOutputs(logits=logits, labels=labels))
    near = detector.score(ModelOutputs(logits=logits))
    far = detector.score(ModelOutputs(logits=logits + 25.0 * np.array([1.0, -1.0, 1.0, -1.0])))
    assert np.median(far) > np.median(near)


def test_openmax_errors():
    logits, labels = openmax_data()
    few = np.concatenate([logits[labels != 2], logits[labels == 2][:2]])
    few_labels = np.concatenate([labels[labels != 2], [2, 2]])
    with pytest.raises(ValueError, match="class 2: 2"):
        create("openmax").fit(ModelOutputs(logits=few, labels=few_labels))
    with pytest.raises(ValueError, match="alpha"):
        create("openmax", alpha=5).fit(ModelOutputs(logits=logits, labels=labels))
    with pytest.raises(ValueError, match="labels"):
        create("openmax").fit(ModelOutputs(logits=logits))


@pytest.mark.parametrize(
    "params",
    [
        {"alpha": 0},
        {"alpha": 2.0},
        {"tailsize": 1},
        {"tailsize": 20.0},
        {"distance": "manhattan"},
        {"distance": None},
        {"eu_weight": -1.0},
        {"eu_weight": 0},
    ],
)
def test_openmax_bad_hyperparameters(params):
    with pytest.raises(ValueError, match=f"openmax: parameter '{next(iter(params))}' must be"):
        create("openmax", **params)


# ---------------------------------------------------------------------- declared parameters
DEFAULTS = {
    "mos": {"group_sizes": None},
    "openmax": {"tailsize": 20, "alpha": 3, "distance": "euclidean", "eu_weight": 0.5},
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_signature_names_every_parameter_keyword_only_with_its_default(name):
    parameters = inspect.signature(implementation(name)).parameters.values()
    assert {p.name: p.default for p in parameters} == DEFAULTS[name]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)


def test_mos_group_sizes_is_required():
    assert implementation("mos").required_params == ("group_sizes",)
    with pytest.raises(ValueError, match="mos: parameter 'group_sizes' must be"):
        create("mos")


@pytest.mark.parametrize("group_sizes", [GROUPS, tuple(GROUPS), [np.int64(2), 3, 1]])
def test_mos_get_params_are_the_arguments_as_given_and_clone_copies_them(group_sizes):
    detector = create("mos", group_sizes=group_sizes)
    assert detector.get_params() == {"group_sizes": group_sizes}
    assert type(detector.group_sizes) is type(group_sizes)
    assert [type(size) for size in detector.group_sizes] == [type(size) for size in group_sizes]
    copy = clone(detector)
    assert type(copy) is type(detector) and copy.get_params() == {"group_sizes": group_sizes}
    assert copy.state_ is None
    if isinstance(group_sizes, list):  # a deep copy: editing the clone's list leaves the original alone
        assert copy.group_sizes is not detector.group_sizes
    logits = ModelOutputs(logits=np.random.default_rng(4).normal(size=(3, 9)))
    np.testing.assert_array_equal(copy.score(logits), detector.score(logits))


def test_openmax_get_params_are_the_arguments_as_given_and_clone_is_unfitted():
    given = {"tailsize": 10, "alpha": np.int64(2), "distance": "eucos", "eu_weight": 1}
    logits, labels = openmax_data()
    detector = create("openmax", **given).fit(ModelOutputs(logits=logits, labels=labels))
    params = detector.get_params()
    assert params == given and {k: type(v) for k, v in params.items()} == {k: type(v) for k, v in given.items()}
    copy = clone(detector)
    assert type(copy) is type(detector) and copy.get_params() == given and not copy.is_fitted
    copy.fit(ModelOutputs(logits=logits, labels=labels))
    np.testing.assert_array_equal(copy.score(ModelOutputs(logits=logits)), detector.score(ModelOutputs(logits=logits)))
