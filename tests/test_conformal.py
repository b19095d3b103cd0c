import doctest
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.stats import false_discovery_control

from oodguard import conformal
from oodguard.conformal import (
    CORRECTIONS,
    benjamini_hochberg,
    calibration_conditional,
    conformal_pvalues,
    false_alarm_rate,
    minimum_calibration_size,
)

REPETITIONS = 300


def test_doctests():
    failures, attempted = doctest.testmod(conformal)
    assert attempted > 0 and failures == 0


# ---------------------------------------------------------------------------------------------- p-values
def test_pvalues_known_answers_and_ties():
    calibration = [3.0, 1.0, 2.0, 2.0]  # unsorted on purpose; n = 4, denominator 5
    test = [0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 7.0]
    # #{S_i >= s}: 4, 4, 3, 3 (ties count against the test point), 1, 1, 0
    expected = [5 / 5, 5 / 5, 4 / 5, 4 / 5, 2 / 5, 2 / 5, 1 / 5]
    np.testing.assert_array_equal(conformal_pvalues(calibration, test), expected)
    np.testing.assert_array_equal(conformal_pvalues(sorted(calibration), test, presorted=True), expected)
    np.testing.assert_array_equal(conformal_pvalues(torch.tensor(calibration), torch.tensor(test)), expected)
    assert conformal_pvalues([1.0], []).shape == (0,)


def test_pvalues_equal_a_brute_force_count():
    rng = np.random.default_rng(0)
    calibration = np.round(rng.normal(size=200), 1)  # many ties
    test = np.round(rng.normal(size=300) * 1.5, 1)
    brute = np.array([(1 + np.sum(calibration >= s)) / (len(calibration) + 1) for s in test])
    np.testing.assert_array_equal(conformal_pvalues(calibration, test), brute)


@pytest.mark.parametrize(
    "calibration, test, message",
    [
        ([], [1.0], "empty"),
        ([1.0, np.nan], [1.0], "NaN"),
        ([1.0], [np.inf], "NaN or infinite"),
        ([[1.0, 2.0]], [1.0], "1-D"),
        (["a"], [1.0], "numeric"),
    ],
)
def test_pvalues_refuse_bad_input(calibration, test, message):
    with pytest.raises(ValueError, match=message):
        conformal_pvalues(calibration, test)


# ---------------------------------------------------------------------------------------------- corrections
def simes_reference(p, n, delta):
    """The spec's formula written out directly: a moving average of log(1..n) over windows of k = floor(n/2)."""
    k = n // 2
    log_i = np.log(np.arange(1, n + 1, dtype=np.float64))
    window_means = np.array([log_i[i - k : i].mean() for i in range(k, n + 1)])  # a_i for i = k..n
    a = np.zeros(n)
    a[k - 1 :] = np.exp(window_means + math.log(delta) / k - log_i[n - k :].mean())
    j = np.maximum(1, np.floor((n + 1) * (1 - np.asarray(p)) + 1e-9).astype(int))
    return 1 - a[j - 1]


def test_dkwm_known_answer():
    p = np.array([0.01, 0.5, 0.99])
    epsilon = math.sqrt(math.log(2 / 0.1) / (2 * 50))
    np.testing.assert_allclose(calibration_conditional(p, 50, delta=0.1, method="dkwm"), np.minimum(1, p + epsilon))


@pytest.mark.parametrize("n", [2, 3, 10, 99, 1000])
@pytest.mark.parametrize("delta", [0.01, 0.1])
def test_simes_matches_the_spec_formula_on_every_p_value(n, delta):
    p = (1 + np.arange(n + 1)) / (n + 1)  # every marginal p-value n calibration scores can give
    corrected = calibration_conditional(p, n, delta=delta, method="simes")
    np.testing.assert_allclose(corrected, simes_reference(p, n, delta), rtol=1e-12, atol=1e-12)
    assert np.all(np.diff(corrected) >= 0), "a larger p-value never gets a smaller corrected one"
    assert np.all(corrected[:-1] >= p[:-1] - 1e-12), "the correction is conservative"
    if n >= 4:  # k >= 2 makes a_1 = 0; with k = 1 the official rule gives 1 - delta / n at p = 1
        assert corrected[-1] == 1.0


def test_simes_smallest_value_by_hand():
    # c = 0: j = n, a_n = delta ** (1/k), so p~ = 1 - delta ** (1/k); n = 10, k = 5.
    value = calibration_conditional(np.array([1 / 11]), 10, delta=0.05, method="simes")[0]
    assert value == pytest.approx(1 - 0.05 ** (1 / 5), rel=1e-12)
    # a p-value of 0 (not a conformal one) is treated like the smallest one instead of indexing past the end
    assert calibration_conditional(np.array([0.0]), 10, delta=0.05, method="simes")[0] == pytest.approx(value)


def test_correction_refuses_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        calibration_conditional([0.5], 10, method="bonferroni")
    with pytest.raises(ValueError, match="delta"):
        calibration_conditional([0.5], 10, delta=1.5)
    with pytest.raises(ValueError, match="n:"):
        calibration_conditional([0.5], 0)
    with pytest.raises(ValueError, match="at least 2"):
        calibration_conditional([0.5], 1, method="simes")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration_conditional([1.5], 10)


def test_minimum_calibration_size():
    assert minimum_calibration_size(0.1) == 9  # 1/(9+1) = 0.1
    assert minimum_calibration_size(0.01) == 99
    assert minimum_calibration_size(0.3) == 3  # 1/4 <= 0.3 < 1/3
    for correction in ("dkwm", "simes"):
        n = minimum_calibration_size(0.1, 0.05, correction)

        def smallest(size, correction=correction):
            return calibration_conditional(np.array([1 / (size + 1)]), size, 0.05, correction)[0]

        assert smallest(n) <= 0.1 < smallest(n - 1)
    with pytest.raises(ValueError, match="correction"):
        minimum_calibration_size(0.1, 0.05, "bonferroni")


def every_rank_pvalues(n):
    """The p-value of a fresh score at each of its n + 1 possible ranks, through conformal_pvalues."""
    return conformal_pvalues(np.arange(n, dtype=float), np.arange(n + 1) - 0.5)


@pytest.mark.parametrize("n", [1, 9, 19, 20, 150, 399])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.25, 0.5])
def test_false_alarm_rate_counts_the_flagged_ranks(n, alpha):
    assert false_alarm_rate(n, alpha) == np.mean(every_rank_pvalues(n) <= alpha)
    assert false_alarm_rate(n, alpha) == pytest.approx(math.floor(Fraction(str(alpha)) * (n + 1)) / (n + 1))
    if n >= 2:
        for correction in CORRECTIONS:
            corrected = calibration_conditional(every_rank_pvalues(n), n, 0.1, correction)
            assert false_alarm_rate(n, alpha, 0.1, correction) == np.mean(corrected <= alpha)
            assert false_alarm_rate(n, alpha, 0.1, correction) <= false_alarm_rate(n, alpha)


@pytest.mark.parametrize("correction", [None, "dkwm", "simes"])
def test_false_alarm_rate_is_the_simulated_one(correction):
    n, alpha, delta = 400, 0.1, 0.1
    rates = false_alarm_rates(n, alpha, seed=11, correction=correction, delta=delta)
    expected = false_alarm_rate(n, alpha, delta, correction)
    # each draw's rate has mean `expected` and a spread of at most about sqrt(p (1 - p) / n) from the calibration draw
    assert abs(rates.mean() - expected) <= 4 * math.sqrt(expected * (1 - expected) / n / REPETITIONS) + 0.002


def test_false_alarm_rate_refuses_bad_arguments():
    with pytest.raises(ValueError, match="n:"):
        false_alarm_rate(0, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        false_alarm_rate(10, 1.0)
    with pytest.raises(ValueError, match="correction"):
        false_alarm_rate(10, 0.1, 0.05, "bonferroni")
    with pytest.raises(ValueError, match="at least 2"):
        false_alarm_rate(1, 0.5, 0.05, "simes")


# ---------------------------------------------------------------------------------------------- BH
def bh_brute_force(p, alpha):
    """Largest k whose k-th smallest p-value is <= k alpha / m; reject every p-value <= that one.

    In exact rational arithmetic on the decimal values as printed, so boundary ties (p = k alpha / m) count.
    """
    m = len(p)
    ordered = sorted(Fraction(repr(float(value))) for value in p)
    alpha = Fraction(repr(alpha))
    for k in range(m, 0, -1):
        if ordered[k - 1] <= k * alpha / m:
            return np.array([Fraction(repr(float(value))) <= ordered[k - 1] for value in p])
    return np.zeros(m, dtype=bool)


def test_bh_known_answers():
    # m = 4, alpha = 0.2: bounds 0.05, 0.1, 0.15, 0.2; sorted 0.01, 0.12, 0.13, 0.9 -> k* = 3 (0.13 <= 0.15)
    np.testing.assert_array_equal(
        benjamini_hochberg([0.9, 0.13, 0.01, 0.12], 0.2), [False, True, True, True]
    )  # step-up: 0.12 > 0.1 is rejected because a later p-value passes
    np.testing.assert_array_equal(benjamini_hochberg([0.5, 0.6], 0.2), [False, False])
    np.testing.assert_array_equal(benjamini_hochberg([0.05, 0.05, 0.05], 0.05), [True, True, True])
    assert benjamini_hochberg([], 0.1).shape == (0,)


def test_bh_matches_brute_force_and_scipy():
    rng = np.random.default_rng(1)
    for trial in range(200):
        m = int(rng.integers(1, 40))
        p = np.concatenate([rng.uniform(size=m), rng.uniform(0, 0.02, size=int(rng.integers(0, 10)))])
        if trial % 3 == 0:
            p = np.round(p, 2)  # ties
        alpha = float(rng.choice([0.01, 0.05, 0.1, 0.3]))
        mask = benjamini_hochberg(p, alpha)
        np.testing.assert_array_equal(mask, bh_brute_force(list(p), alpha))
        np.testing.assert_array_equal(mask, false_discovery_control(p, method="bh") <= alpha)


def test_bh_refuses_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        benjamini_hochberg([0.1], 0.0)
    with pytest.raises(ValueError, match="NaN"):
        benjamini_hochberg([0.1, np.nan], 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        benjamini_hochberg([-0.1], 0.1)


# ---------------------------------------------------------------------------------------------- guarantees
def binomial_margin(rate, trials, sigmas=3.5):
    return sigmas * math.sqrt(rate * (1 - rate) / trials)


def false_alarm_rates(n, alpha, seed, correction=None, delta=0.1, m=2000):
    """Per calibration draw: the fraction of fresh ID test scores flagged by p <= alpha (same distribution)."""
    rng = np.random.default_rng(seed)
    calibration = rng.standard_normal((REPETITIONS, n))
    test = rng.standard_normal((REPETITIONS, m))
    rates = np.empty(REPETITIONS)
    for r in range(REPETITIONS):
        p = conformal_pvalues(calibration[r], test[r])
        if correction is not None:
            p = calibration_conditional(p, n, delta=delta, method=correction)
        rates[r] = np.mean(p <= alpha)
    return rates


@pytest.mark.parametrize("n, alpha", [(19, 0.1), (199, 0.05), (150, 0.1)])
def test_marginal_false_alarm_rate_is_at_most_alpha(n, alpha):
    rates = false_alarm_rates(n, alpha, seed=n)
    exact = math.floor(alpha * (n + 1) + 1e-9) / (n + 1)  # the exact marginal rate for continuous scores
    # Spread of the mean: the calibration draw dominates (the rate given a draw is Beta(j, n + 1 - j)).
    j = exact * (n + 1)
    sd = math.sqrt(j * (n + 1 - j) / ((n + 1) ** 2 * (n + 2)) / REPETITIONS)
    assert rates.mean() <= alpha + 4 * sd
    assert abs(rates.mean() - exact) <= 4 * sd, "not tight: an off-by-one in the p-value would show here"


@pytest.mark.parametrize("correction", ["dkwm", "simes"])
def test_calibration_conditional_false_alarm_rate(correction):
    n, alpha, delta = 400, 0.1, 0.1
    marginal = false_alarm_rates(n, alpha, seed=7)
    corrected = false_alarm_rates(n, alpha, seed=7, correction=correction, delta=delta)
    # The test can see a failure: without a correction, about half of the draws exceed alpha.
    assert np.mean(marginal > alpha) > 0.3
    assert np.mean(corrected > alpha) <= delta + binomial_margin(delta, REPETITIONS)
    assert np.all(corrected <= marginal)
    assert corrected.mean() > 0.02, "the correction should not flag nothing at all"


def test_benjamini_hochberg_controls_fdr_on_mixtures():
    n, m_id, m_ood, fdr = 500, 160, 40, 0.1
    rng = np.random.default_rng(3)
    proportions, powers = [], []
    for _ in range(REPETITIONS):
        calibration = rng.standard_normal(n)
        test = np.concatenate([rng.standard_normal(m_id), rng.standard_normal(m_ood) + 3.0])
        flagged = benjamini_hochberg(conformal_pvalues(calibration, test), fdr)
        false = flagged[:m_id].sum()
        proportions.append(false / max(1, flagged.sum()))
        powers.append(flagged[m_id:].mean())
    bound = fdr * m_id / (m_id + m_ood)
    # FDP per draw is a bounded [0, 1] variable; its spread here is about 0.1.
    assert np.mean(proportions) <= bound + 3.5 * np.std(proportions) / math.sqrt(REPETITIONS)
    assert np.mean(powers) > 0.3
