"""Conformal p-values for OOD scores, calibration-conditional corrections, and Benjamini-Hochberg.

Bates, Candès, Lei, Romano, Sesia, "Testing for outliers with conformal p-values", Annals of Statistics
2023; official code: github.com/msesia/conditional-conformal-pvalues (``cccpv/methods.py``,
``cccpv/utils_calib.py``). The method specification is section 18 of ``methods/training-vlm-other.md``.

Scores follow the oodguard convention, **higher = more likely OOD**. The calibration scores must come from
in-distribution data that was **not** used to fit the detector (otherwise the calibration scores are
optimistically low and the false-alarm guarantee is lost).

- :func:`conformal_pvalues`: the marginal (split-conformal) p-value
  ``p(x) = (1 + #{i : S_i >= S(x)}) / (n + 1)``. For an ID test point exchangeable with the calibration
  set, ``P(p(x) <= alpha) <= alpha``, averaged over the calibration draw.
- :func:`calibration_conditional`: ``p~ = h(p)`` such that, with probability ``>= 1 - delta`` over the
  calibration draw, the false-alarm rate of ``p~ <= alpha`` is ``<= alpha`` for every ``alpha`` at once.
- :func:`false_alarm_rate`: the probability that ``p <= alpha`` (corrected or not) flags a fresh ID input, given
  the number of calibration scores.
- :func:`benjamini_hochberg`: step-up FDR control over a batch. Conformal p-values sharing a calibration set
  are PRDS, so BH controls the false discovery rate at ``alpha * m0 / m``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np
from scipy.special import gammaln

__all__ = [
    "conformal_pvalues",
    "calibration_conditional",
    "benjamini_hochberg",
    "false_alarm_rate",
    "minimum_calibration_size",
    "CORRECTIONS",
]

#: Names of the calibration-conditional corrections.
CORRECTIONS = ("dkwm", "simes")


def _as_scores(values: Any, name: str) -> np.ndarray:
    """A finite float64 1-D numpy array (accepts numpy, torch, lists)."""
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected a numeric array, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of scores [n], got shape {array.shape}")
    if array.size and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"{name}: contains {bad} NaN or infinite value(s); scores must be finite")
    return array


def check_fraction(value: Any, name: str, *, allow_one: bool = False) -> float:
    """``value`` as a float in (0, 1), or in (0, 1] with ``allow_one``; a ValueError naming ``name`` otherwise."""
    inside = isinstance(value, Real) and not isinstance(value, bool) and 0.0 < float(value)
    inside = inside and (float(value) <= 1.0 if allow_one else float(value) < 1.0)
    if not inside:
        raise ValueError(f"{name}: expected a number in {'(0, 1]' if allow_one else '(0, 1)'}, got {value!r}")
    return float(value)


def _check_count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
        raise ValueError(f"n: expected the number of calibration scores (a positive integer), got {n!r}")
    return int(n)


def check_correction(correction: Any) -> None:
    if correction is not None and correction not in CORRECTIONS:
        raise ValueError(f"correction: expected None or one of {', '.join(map(repr, CORRECTIONS))}, got {correction!r}")


def _pvalue_of_count(at_least: Any, n: int) -> Any:
    """The conformal p-value of a test score that ``at_least`` of the ``n`` calibration scores equal or exceed."""
    return (1.0 + at_least) / (n + 1.0)


def _check_pvalues(pvalues: Any, name: str = "pvalues") -> np.ndarray:
    array = np.atleast_1d(_as_scores(np.asarray(pvalues) if not hasattr(pvalues, "detach") else pvalues, name))
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise ValueError(f"{name}: p-values must lie in [0, 1], got range [{array.min()}, {array.max()}]")
    return array


def conformal_pvalues(calibration_scores: Any, test_scores: Any, *, presorted: bool = False) -> np.ndarray:
    """Marginal conformal p-values of test scores against ID calibration scores (higher score = more OOD).

    ``p = (1 + #{i : S_i >= s}) / (n + 1)``. Ties count against the test point, so the p-value is
    conservative on discrete scores. Cost: one sort of the calibration scores (skipped with
    ``presorted=True``) and a binary search per test score.

    Parameters
    ----------
    calibration_scores : 1-D array ``[n]``
        OOD scores of in-distribution data **disjoint from the data the detector was fitted on**.
    test_scores : 1-D array ``[m]``
        OOD scores to test.
    presorted : bool
        The calibration scores are already sorted ascending (skips the sort; not checked).

    Returns
    -------
    numpy float64 array ``[m]`` of p-values in ``[1/(n+1), 1]``. Small = unlike the calibration data.

    Examples
    --------
    >>> conformal_pvalues([1.0, 2.0, 3.0, 4.0], [0.5, 2.0, 3.5, 9.0]).tolist()
    [1.0, 0.8, 0.4, 0.2]
    """
    calibration = _as_scores(calibration_scores, "calibration_scores")
    if calibration.size == 0:
        raise ValueError("calibration_scores: empty; conformal p-values need at least one calibration score")
    test = _as_scores(test_scores, "test_scores")
    return sorted_pvalues(calibration if presorted else np.sort(calibration), test)


def sorted_pvalues(calibration: np.ndarray, test: np.ndarray) -> np.ndarray:
    """:func:`conformal_pvalues` of validated float64 scores, the calibration scores sorted ascending."""
    n = calibration.size
    # searchsorted(side="left") counts the calibration scores strictly below s; the rest are >= s.
    at_least = n - np.searchsorted(calibration, test, side="left")
    return _pvalue_of_count(at_least, n)


def simes_sequence(n: int, delta: float) -> np.ndarray:
    """``a_1..a_n`` of the Simes bound with ``k = floor(n/2)`` (``a_i = 0`` for ``i < k``).

    For ``i >= k``: ``a_i = (delta * prod_{j<k} (i-j)/(n-j)) ** (1/k)``, i.e. the geometric mean of the ``k``
    ratios ``i/n, (i-1)/(n-1), ...`` times ``delta ** (1/k)``, computed through log-gamma in float64.
    """
    k = n // 2
    i = np.arange(k, n + 1, dtype=np.float64)
    log_window = gammaln(i + 1.0) - gammaln(i - k + 1.0)  # sum of log(i-k+1 .. i)
    log_top = gammaln(n + 1.0) - gammaln(n - k + 1.0)  # sum of log(n-k+1 .. n)
    sequence = np.zeros(n, dtype=np.float64)
    sequence[k - 1 :] = np.exp((log_window - log_top + math.log(delta)) / k)
    return sequence


def calibration_conditional(
    pvalues: Any, n: int, delta: float = 0.05, method: str = "dkwm", *, _simes: np.ndarray | None = None
) -> np.ndarray:
    """Calibration-conditional p-values ``p~ = h(p)`` from marginal conformal p-values.

    With probability at least ``1 - delta`` over the draw of the ``n`` calibration scores, the test
    ``p~ <= alpha`` has a false-alarm rate (on fresh ID data, given that calibration set) of at most
    ``alpha``, simultaneously for every ``alpha``. The price: larger p-values, i.e. fewer detections.

    Parameters
    ----------
    pvalues : array of marginal p-values from :func:`conformal_pvalues` with the same ``n``.
    n : number of calibration scores.
    delta : probability that the calibration draw is unlucky, in (0, 1).
    method :
        ``"dkwm"``: ``p~ = min(1, p + sqrt(log(2/delta) / (2 n)))`` (Dvoretzky-Kiefer-Wolfowitz-Massart).
        ``"simes"``: ``p~ = 1 - a_j`` with ``j = max(1, floor((n + 1)(1 - p)))`` and the Simes sequence
        ``a_i = 0`` for ``i < k``, else ``exp(mean(log(i-k+1 .. i)) + log(delta)/k - mean(log(n-k+1 .. n)))``,
        ``k = floor(n/2)`` (``simes_kden = 2`` in the official code; needs ``n >= 2``). Tighter than DKWM
        for small p-values, which are the ones that matter for OOD detection.

    Returns
    -------
    numpy float64 array of corrected p-values, same shape as ``pvalues``.

    Examples
    --------
    >>> p = conformal_pvalues(list(range(99)), [200.0])  # smallest possible p = 1/100
    >>> round(float(calibration_conditional(p, 99, delta=0.05, method="dkwm")[0]), 4)
    0.1465
    >>> round(float(calibration_conditional(p, 99, delta=0.05, method="simes")[0]), 4)
    0.0593
    """
    n = _check_count(n)
    delta = check_fraction(delta, "delta")
    scalar = np.ndim(pvalues) == 0
    p = _check_pvalues(pvalues)
    if method == "dkwm":
        out = np.minimum(1.0, p + math.sqrt(math.log(2.0 / delta) / (2.0 * n)))
    elif method == "simes":
        if n < 2:
            raise ValueError("method='simes' needs at least 2 calibration scores (k = floor(n/2) >= 1)")
        sequence = simes_sequence(n, delta) if _simes is None else _simes
        # Round before the floor: p = (1+c)/(n+1) must give exactly n - c, not n - c - 1 from a rounding error.
        position = np.floor(np.round((n + 1) * (1.0 - p), 9)).astype(np.int64)
        out = 1.0 - sequence[np.clip(position, 1, n) - 1]
    else:
        raise ValueError(f"method: expected one of {', '.join(map(repr, CORRECTIONS))}, got {method!r}")
    return out[0] if scalar else out


def minimum_calibration_size(alpha: float, delta: float | None = None, correction: str | None = None) -> int:
    """Smallest number of calibration scores for which ``p <= alpha`` can flag anything at all.

    Uncorrected: the smallest p-value is ``1/(n+1)``, so ``n >= 1/alpha - 1``. With a correction, the smallest
    corrected p-value must be ``<= alpha`` too (DKWM needs many more: ``log(2/delta) / (2 n) < alpha**2``).

    Examples
    --------
    >>> minimum_calibration_size(0.05)
    19
    >>> minimum_calibration_size(0.05, delta=0.05, correction="dkwm") > 500
    True
    """
    alpha = check_fraction(alpha, "alpha")

    def smallest_pvalue(n: int) -> float:
        p = _pvalue_of_count(0, n)
        if correction is None:
            return p
        if correction == "simes" and n < 2:
            return 1.0
        return float(calibration_conditional(np.array([p]), n, delta if delta is not None else 0.05, correction)[0])

    check_correction(correction)
    # The smallest p-value does not increase with n: double until feasible, then bisect (low stays infeasible).
    high = 1
    while smallest_pvalue(high) > alpha:
        high *= 2
        if high > 2**40:
            raise ValueError(f"alpha={alpha} is too small to reach with any calibration set")
    low = high // 2
    while high - low > 1:
        middle = (low + high) // 2
        if smallest_pvalue(middle) <= alpha:
            high = middle
        else:
            low = middle
    return high


def false_alarm_rate(n: int, alpha: float, delta: float | None = None, correction: str | None = None) -> float:
    """Probability that the test ``p <= alpha`` flags a fresh ID input, with ``n`` calibration scores.

    A fresh ID score exchangeable with the calibration scores is equalled or exceeded by a count ``c`` of them
    that is uniform on ``0..n`` (for continuous scores; ties only make p-values larger), so its p-value
    ``(1 + c) / (n + 1)`` is uniform on ``n + 1`` values: the rate is the fraction of them that are ``<= alpha``
    (after the correction, when one is given), ``floor(alpha (n + 1)) / (n + 1)`` without one. It is averaged
    over calibration draws; with a correction, the rate *given* one calibration set is at most ``alpha`` with
    probability ``>= 1 - delta``.

    Parameters
    ----------
    n : number of calibration scores.
    alpha : level of the test, in (0, 1).
    delta, correction : as in :func:`calibration_conditional` (``delta`` defaults to 0.05 with a correction and is
        not used without one).

    Examples
    --------
    >>> false_alarm_rate(19, 0.05)  # p = 1/20 is the only value <= 0.05
    0.05
    >>> false_alarm_rate(18, 0.05)  # 18 calibration scores cannot give a p-value <= 0.05
    0.0
    >>> round(false_alarm_rate(400, 0.1, delta=0.1, correction="simes"), 4)  # below alpha: the price of the guarantee
    0.0648
    """
    n = _check_count(n)
    alpha = check_fraction(alpha, "alpha")
    check_correction(correction)
    pvalues = _pvalue_of_count(np.arange(n + 1), n)
    if correction is not None:
        pvalues = calibration_conditional(pvalues, n, 0.05 if delta is None else delta, correction)
    return int(np.count_nonzero(pvalues <= alpha)) / (n + 1)


def benjamini_hochberg(pvalues: Any, alpha: float) -> np.ndarray:
    """Benjamini-Hochberg step-up procedure: a boolean mask of the rejected hypotheses (flagged as OOD).

    Sort the ``m`` p-values, find ``k* = max{k : p_(k) <= k * alpha / m}`` and reject the ``k*`` smallest.
    For conformal p-values sharing one calibration set the false discovery rate (expected fraction of ID
    inputs among the flagged ones) is at most ``alpha * m0 / m``.

    Examples
    --------
    >>> benjamini_hochberg([0.01, 0.04, 0.03, 0.5], alpha=0.1).tolist()
    [True, True, True, False]
    >>> benjamini_hochberg([0.02, 0.9], alpha=0.03).tolist()
    [False, False]
    """
    alpha = check_fraction(alpha, "alpha")
    p = _check_pvalues(pvalues)
    m = p.size
    mask = np.zeros(m, dtype=bool)
    if m == 0:
        return mask
    order = np.argsort(p, kind="stable")
    # A relative slack of 1e-12 keeps p-values that equal k * alpha / m in exact arithmetic (common with
    # conformal p-values, which lie on the grid j / (n + 1)) from being lost to the rounding of the product.
    below = p[order] <= alpha * np.arange(1, m + 1) / m * (1.0 + 1e-12)
    if below.any():
        count = int(np.flatnonzero(below)[-1]) + 1
        mask[order[:count]] = True
    return mask
