"""Metrics for OOD detection, misclassification detection and out-of-model-scope (OMS) evaluation.

Score convention: every score is an **OOD score, higher = more likely OOD** (or, for misclassification
and OMS, higher = more likely wrong, i.e. should be rejected). A threshold ``t`` flags a sample as OOD
when ``s >= t`` and accepts it as ID when ``s < t``; equivalently, "accept when ``s <= t``" for the next
lower distinct value. Thresholds run over every distinct score value, so the operating points are exactly
the cuts of the sorted pooled scores; tied scores are never split.

Two FPR@95 conventions are in use and give very different numbers (``methods/metrics.md``); each has
its own function and its own key in :func:`evaluate`:

- :func:`fpr_at_tpr` (ID-TPR; ODIN, Energy, ReAct, KNN, ViM papers): the threshold keeps >= ``tpr`` of the
  ID samples; report the fraction of OOD samples accepted as ID. Key ``fpr_at_95_id_tpr``.
- :func:`fpr_at_ood_tpr` (OOD-TPR; OpenOOD since commit 873e8c2, pytorch-ood ``FPR95TPR``): the threshold
  flags >= ``tpr`` of the OOD samples; report the fraction of ID samples flagged as OOD.
  Key ``fpr_at_95_ood_tpr``.

AUPR comes with two estimators: ``"average_precision"`` (step function, as
``sklearn.metrics.average_precision_score``; Outlier Exposure, Energy code) and ``"trapezoid"``
(``sklearn.metrics.auc`` over ``precision_recall_curve``; OpenOOD, pytorch-ood), which is optimistic.

Every metric is computed in float64 numpy from the raw scores (never squashed through a sigmoid), by
one sort of the pooled scores: O(n log n), fine for millions of scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]

#: AUPR estimators accepted by ``aupr_in``, ``aupr_out``, ``evaluate`` and ``bootstrap``.
AUPR_ESTIMATORS = ("average_precision", "trapezoid")
#: Metric names accepted by ``bootstrap``.
BOOTSTRAP_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "fpr_at_ood_tpr", "detection_error")
# Replicates are processed in batches holding about this many counts at once (keeps memory ~100 MB).
_BOOTSTRAP_BATCH_ELEMENTS = 2_000_000

__all__ = [
    "AUPR_ESTIMATORS",
    "BOOTSTRAP_METRICS",
    "aupr_in",
    "aupr_out",
    "aurc",
    "auroc",
    "bootstrap",
    "detection_error",
    "eaurc",
    "error_detection_auroc",
    "evaluate",
    "evaluate_frame",
    "evaluate_oms",
    "expected_calibration_error",
    "fpr_at_ood_tpr",
    "fpr_at_tpr",
    "paired_bootstrap",
    "percentile_interval",
    "roc_curve",
    "threshold_at_tpr",
]


# ----------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------


def _to_numpy(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        tensor = values.detach().cpu()
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.to(torch.float32)
        return tensor.numpy()
    try:
        return np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: could not be read as a 1-D array ({exc}); pass a numpy array or tensor") from exc


def _check_1d(array: np.ndarray, name: str) -> None:
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array with one value per sample, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty; pass at least one sample")


def _as_scores(values: ArrayLike, name: str) -> np.ndarray:
    """Validate scores and return them as a 1-D float64 numpy array."""
    array = _to_numpy(values, name)
    if array.dtype.kind not in "iuf":
        raise ValueError(
            f"{name}: expected real-valued scores, got dtype {array.dtype}; convert them to float "
            "(boolean decisions are not scores)"
        )
    _check_1d(array, name)
    array = array.astype(np.float64, copy=False)
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{name} contains {bad.size} non-finite value(s) (NaN or Inf), the first at index {bad[0]}; "
            "remove those samples or fix the score that produced them"
        )
    return array


def _as_correct(values: ArrayLike, name: str, n: int) -> np.ndarray:
    """Validate a per-sample correctness indicator (bool, or 0/1) and return it as a bool array."""
    array = _to_numpy(values, name)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected booleans or 0/1, got dtype {array.dtype}")
    _check_1d(array, name)
    if array.dtype.kind != "b" and not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name}: expected booleans or 0/1 (1 = correctly classified), got other values")
    if array.size != n:
        raise ValueError(f"{name} has {array.size} entries but scores has {n}; pass one entry per score")
    return array.astype(bool)


def _as_labels(values: Any, name: str, n: int, scores_name: str) -> np.ndarray:
    array = _to_numpy(values, name)
    _check_1d(array, name)
    if array.size != n:
        raise ValueError(f"{name} has {array.size} entries but {scores_name} has {n}; pass one entry per score")
    return array


def _check_tpr(tpr: float) -> float:
    if isinstance(tpr, bool) or not isinstance(tpr, Real) or not math.isfinite(tpr) or not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be a fraction in (0, 1], got {tpr!r}; pass e.g. 0.95 for 95 %")
    return float(tpr)


def _check_estimator(estimator: str, name: str = "estimator") -> str:
    if estimator not in AUPR_ESTIMATORS:
        raise ValueError(f"{name} must be one of {AUPR_ESTIMATORS}, got {estimator!r}")
    return estimator


def _percent(tpr: float) -> str:
    """0.95 -> '95', 0.999 -> '99.9' (for key names)."""
    return f"{round(100.0 * tpr, 6):g}"


# ----------------------------------------------------------------------------------------------------
# Core: everything is computed from per-distinct-value counts in increasing score order.
# The helpers accept counts of shape (G,) or (B, G) (a batch of bootstrap replicates).
# ----------------------------------------------------------------------------------------------------


def _group_index(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values in increasing order, and the index of each sample's value among them."""
    order = np.argsort(scores)
    ordered = scores[order]
    is_new = np.empty(ordered.size, dtype=bool)
    is_new[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=is_new[1:])
    group = np.empty(ordered.size, dtype=np.int64)
    group[order] = np.cumsum(is_new) - 1
    return ordered[is_new], group


def _tie_counts(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct pooled values (increasing) with the number of ID and of OOD samples at each value."""
    # Sorting each class and then merging the two sorted runs (timsort: linear) is about twice as fast
    # as an argsort of the pooled scores.
    runs = np.concatenate([np.sort(id_scores), np.sort(ood_scores)])
    order = np.argsort(runs, kind="stable")
    ordered = runs[order]
    is_new = np.empty(ordered.size, dtype=bool)
    is_new[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=is_new[1:])
    starts = np.flatnonzero(is_new)
    ood_counts = np.add.reduceat((order >= id_scores.size).astype(np.int64), starts)
    sizes = np.diff(np.append(starts, ordered.size))
    return ordered[starts], sizes - ood_counts, ood_counts


def _last(array: np.ndarray) -> np.ndarray:
    return array[..., -1:]


def _auroc_counts(id_counts: np.ndarray, ood_counts: np.ndarray) -> np.ndarray:
    # Mann-Whitney: each (ID, OOD) pair scores 1 when OOD is higher and 1/2 when tied; integer sums are exact.
    ood_cum = np.cumsum(ood_counts, axis=-1)
    ood_above = _last(ood_cum) - ood_cum
    twice_wins = np.sum(id_counts * (2 * ood_above + ood_counts), axis=-1)
    return twice_wins / (2.0 * id_counts.sum(axis=-1) * ood_cum[..., -1])


def _first_reaching(pos_counts: np.ndarray, tpr: float) -> np.ndarray:
    """Counts in sweep order; the first step j at which the first j+1 groups hold a fraction >= tpr of the total."""
    pos_cum = np.cumsum(pos_counts, axis=-1)
    # Same float expression as sklearn's roc_curve (tps / tps[-1]), so the comparison agrees bit for bit.
    return np.argmax(pos_cum / _last(pos_cum) >= tpr, axis=-1)


def _fpr_at_first_point(pos_counts: np.ndarray, neg_counts: np.ndarray, tpr: float) -> np.ndarray:
    """Counts are in sweep order; at step j the first j+1 groups are 'caught'. First step with rate >= tpr."""
    neg_cum = np.cumsum(neg_counts, axis=-1)
    first = _first_reaching(pos_counts, tpr)
    caught_neg = np.take_along_axis(neg_cum, np.expand_dims(first, -1), axis=-1)[..., 0]
    return caught_neg / neg_cum[..., -1]


def _fpr_at_id_tpr_counts(id_counts: np.ndarray, ood_counts: np.ndarray, tpr: float) -> np.ndarray:
    # Sweep t upwards: accept s <= t.
    return _fpr_at_first_point(id_counts, ood_counts, tpr)


def _fpr_at_ood_tpr_counts(id_counts: np.ndarray, ood_counts: np.ndarray, tpr: float) -> np.ndarray:
    # Sweep t downwards: flag s >= t.
    return _fpr_at_first_point(ood_counts[..., ::-1], id_counts[..., ::-1], tpr)


def _detection_error_counts(id_counts: np.ndarray, ood_counts: np.ndarray) -> np.ndarray:
    id_accepted = np.cumsum(id_counts, axis=-1)
    ood_accepted = np.cumsum(ood_counts, axis=-1)
    n_id, n_ood = _last(id_accepted), _last(ood_accepted)
    # 2 * n_id * n_ood * error, in integers so that the minimum is exact (and mirror-symmetric).
    scaled = (n_id - id_accepted) * n_ood + ood_accepted * n_id
    # The last cut accepts everything (error 0.5); rejecting everything also gives 0.5.
    return np.minimum(scaled.min(axis=-1) / (2.0 * n_id[..., 0] * n_ood[..., 0]), 0.5)


def _precision(pos_counts: np.ndarray, neg_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    true_pos = np.cumsum(pos_counts, axis=-1)
    predicted = true_pos + np.cumsum(neg_counts, axis=-1)
    # predicted == 0 only for empty leading groups of a bootstrap replicate, where recall does not move.
    precision = np.divide(true_pos, predicted, out=np.ones(true_pos.shape), where=predicted > 0)
    return precision, true_pos


def _aupr_counts(pos_counts: np.ndarray, neg_counts: np.ndarray, estimator: str) -> np.ndarray:
    """AUPR with counts in decreasing score order (the positive class scoring high)."""
    precision, true_pos = _precision(pos_counts, neg_counts)
    recall_step = pos_counts / _last(true_pos)
    if estimator == "average_precision":
        return np.sum(recall_step * precision, axis=-1)
    # Trapezoid through the points of precision_recall_curve, starting at (recall 0, precision 1).
    previous = np.concatenate([np.ones(precision.shape[:-1] + (1,)), precision[..., :-1]], axis=-1)
    return np.sum(recall_step * 0.5 * (precision + previous), axis=-1)


def _aupr_in_counts(id_counts: np.ndarray, ood_counts: np.ndarray, estimator: str) -> np.ndarray:
    # ID positive with score -s: increasing s is decreasing -s.
    return _aupr_counts(id_counts, ood_counts, estimator)


def _aupr_out_counts(id_counts: np.ndarray, ood_counts: np.ndarray, estimator: str) -> np.ndarray:
    return _aupr_counts(ood_counts[..., ::-1], id_counts[..., ::-1], estimator)


def _metric_counts(name: str, id_counts: np.ndarray, ood_counts: np.ndarray, tpr: float, estimator: str) -> np.ndarray:
    if name == "auroc":
        return _auroc_counts(id_counts, ood_counts)
    if name == "aupr_in":
        return _aupr_in_counts(id_counts, ood_counts, estimator)
    if name == "aupr_out":
        return _aupr_out_counts(id_counts, ood_counts, estimator)
    if name == "fpr_at_tpr":
        return _fpr_at_id_tpr_counts(id_counts, ood_counts, tpr)
    if name == "fpr_at_ood_tpr":
        return _fpr_at_ood_tpr_counts(id_counts, ood_counts, tpr)
    if name == "detection_error":
        return _detection_error_counts(id_counts, ood_counts)
    raise ValueError(f"unknown metric {name!r}; choose from {BOOTSTRAP_METRICS}")


def _counts(id_scores: ArrayLike, ood_scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _tie_counts(_as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores"))


# ----------------------------------------------------------------------------------------------------
# ID versus OOD
# ----------------------------------------------------------------------------------------------------


def auroc(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Area under the ROC curve of OOD-versus-ID detection.

    The probability that a random OOD sample scores higher than a random ID sample, ties counted one
    half (Mann-Whitney U / (n_id * n_ood)). Equals ``sklearn.metrics.roc_auc_score(is_ood, s)``.
    Symmetric in which class is called positive: ``auroc(id, ood) == 1 - auroc(ood, id)``.

    Parameters
    ----------
    id_scores, ood_scores : 1-D arrays (numpy, torch or list) of finite OOD scores, higher = more OOD.

    Returns
    -------
    float in [0, 1]; 1 = every OOD sample scores above every ID sample, 0.5 = chance.

    Examples
    --------
    >>> auroc([0.1, 0.2, 0.3], [0.25, 0.9])
    0.8333333333333334
    >>> auroc([1.0, 2.0], [2.0, 3.0])  # the tied pair counts 1/2
    0.875
    """
    _, id_counts, ood_counts = _counts(id_scores, ood_scores)
    return float(_auroc_counts(id_counts, ood_counts))


def roc_curve(id_scores: ArrayLike, ood_scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of OOD-versus-ID detection, one point per distinct score value; :func:`auroc` is its area.

    OOD is the positive class and a sample is flagged as OOD when ``s >= t``. The thresholds ``t`` are the
    distinct pooled score values in decreasing order, preceded by ``+inf`` (nothing flagged: the point (0, 0)).
    Equals ``sklearn.metrics.roc_curve(is_ood, s, drop_intermediate=False)``.

    Parameters
    ----------
    id_scores, ood_scores : 1-D arrays of finite OOD scores, higher = more OOD.

    Returns
    -------
    ``(fpr, tpr, thresholds)``: float64 arrays, one entry per distinct score value plus one. ``fpr`` is the
    fraction of ID samples flagged at each threshold, ``tpr`` the fraction of OOD samples flagged.

    Examples
    --------
    >>> fpr, tpr, thresholds = roc_curve([0.0, 1.0, 2.0], [1.0, 3.0])
    >>> tpr.tolist(), thresholds.tolist()
    ([0.0, 0.5, 0.5, 1.0, 1.0], [inf, 3.0, 2.0, 1.0, 0.0])
    >>> (3 * fpr).round(6).tolist()  # ID flagged: none, none, 1, 2 (the tie at 1), 3 of 3
    [0.0, 0.0, 1.0, 2.0, 3.0]
    """
    values, id_counts, ood_counts = _counts(id_scores, ood_scores)
    flagged_id = np.cumsum(id_counts[::-1])
    flagged_ood = np.cumsum(ood_counts[::-1])
    fpr = np.concatenate([[0.0], flagged_id / flagged_id[-1]])
    tpr = np.concatenate([[0.0], flagged_ood / flagged_ood[-1]])
    return fpr, tpr, np.concatenate([[np.inf], values[::-1]])


def aupr_in(id_scores: ArrayLike, ood_scores: ArrayLike, estimator: str = "average_precision") -> float:
    """Area under the precision-recall curve with **ID as the positive class** and score ``-s``.

    Parameters
    ----------
    id_scores, ood_scores : 1-D arrays of finite OOD scores, higher = more OOD.
    estimator : ``"average_precision"`` (default): ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds,
        a step function, equal to ``sklearn.metrics.average_precision_score(is_id, -s)``.
        ``"trapezoid"``: trapezoidal area through the points of ``precision_recall_curve(is_id, -s)``,
        starting at (recall 0, precision 1), equal to ``sklearn.metrics.auc(recall, precision)`` as
        OpenOOD and pytorch-ood compute it; optimistic compared with average precision.

    Notes
    -----
    Swapping the roles gives AUPR-Out: ``aupr_in(id, ood) == aupr_out(-ood, -id)``. OpenOOD had AUPR-In
    and AUPR-Out swapped between 2023-08-10 and commit 4a72488 (2023-12-18, issue #211).

    Examples
    --------
    >>> aupr_in([0.0, 1.0, 2.0], [1.0, 3.0])  # precisions 1, 2/3, 3/4 at recalls 1/3, 2/3, 1
    0.8055555555555556
    >>> aupr_in([0.0, 1.0, 2.0], [1.0, 3.0], estimator="trapezoid")
    0.8472222222222221
    """
    _check_estimator(estimator)
    _, id_counts, ood_counts = _counts(id_scores, ood_scores)
    return float(_aupr_in_counts(id_counts, ood_counts, estimator))


def aupr_out(id_scores: ArrayLike, ood_scores: ArrayLike, estimator: str = "average_precision") -> float:
    """Area under the precision-recall curve with **OOD as the positive class** and score ``s``.

    Parameters
    ----------
    id_scores, ood_scores : 1-D arrays of finite OOD scores, higher = more OOD.
    estimator : ``"average_precision"`` (default; ``sklearn.metrics.average_precision_score(is_ood, s)``)
        or ``"trapezoid"`` (``sklearn.metrics.auc`` over ``precision_recall_curve(is_ood, s)``, as
        OpenOOD and pytorch-ood). See :func:`aupr_in`.

    Examples
    --------
    >>> aupr_out([0.0, 1.0, 2.0], [1.0, 3.0])
    0.75
    >>> aupr_out([0.0, 1.0, 2.0], [1.0, 3.0], estimator="trapezoid")
    0.75
    """
    _check_estimator(estimator)
    _, id_counts, ood_counts = _counts(id_scores, ood_scores)
    return float(_aupr_out_counts(id_counts, ood_counts, estimator))


def fpr_at_tpr(id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = 0.95) -> float:
    """FPR at a target **ID** true-positive rate: the fraction of OOD samples accepted as ID when the
    threshold keeps at least ``tpr`` of the ID samples (ID-TPR convention; ODIN, Energy, ReAct, KNN, ViM).

    Rule: a sample is accepted as ID when ``s <= t``. The thresholds ``t`` are the distinct pooled score
    values; take the smallest ``t`` whose ID acceptance rate is ``>= tpr`` (the first ROC point at or
    beyond the target, no interpolation), and return the fraction of OOD samples with ``s <= t``. OOD
    samples tied with that threshold are therefore counted as accepted. This equals
    ``fpr[argmax(tpr_curve >= tpr)]`` of ``sklearn.metrics.roc_curve(is_id, -s, drop_intermediate=False)``.

    "How many OOD inputs slip through when we keep ``tpr`` of the good traffic." Not comparable with
    :func:`fpr_at_ood_tpr` (the OpenOOD v1.5 convention).

    Other code under the same convention: OpenOOD before 873e8c2 keeps the ``floor(tpr * n_id)`` lowest-scoring
    ID samples and counts OOD strictly below the threshold; the Outlier Exposure / Energy code
    (``fpr_and_fdr_at_recall``) takes the ROC point nearest to the target rate, which may fall short of it.
    On continuous scores with ``tpr * n_id`` an integer, OpenOOD's old rule gives the same value as this one.

    Parameters
    ----------
    id_scores, ood_scores : 1-D arrays of finite OOD scores, higher = more OOD.
    tpr : target fraction of ID samples accepted, in (0, 1].

    Examples
    --------
    >>> id_s = [0.0, 1.0, 1.0, 1.0, 2.0]
    >>> ood_s = [1.0, 1.0, 3.0, 3.0]
    >>> fpr_at_tpr(id_s, ood_s, tpr=0.5)  # t = 1 keeps 4/5 ID and accepts the two OOD samples tied at 1
    0.5
    >>> fpr_at_tpr(id_s, ood_s, tpr=0.2)  # t = 0 keeps 1/5 ID and no OOD sample
    0.0
    """
    tpr = _check_tpr(tpr)
    _, id_counts, ood_counts = _counts(id_scores, ood_scores)
    return float(_fpr_at_id_tpr_counts(id_counts, ood_counts, tpr))


def threshold_at_tpr(id_scores: ArrayLike, tpr: float = 0.95) -> float:
    """The score threshold that keeps a fraction ``tpr`` of the ID samples: accept as ID when ``s <= t``.

    ``t`` is the smallest ID score with ``#{ID scores <= t} / n >= tpr``, the fraction computed as the float
    ``k / n`` (as ``sklearn.metrics.roc_curve`` computes its rates). It is the threshold of :func:`fpr_at_tpr`
    (ID-TPR convention): ``fpr_at_tpr(id, ood, tpr) == mean(ood <= threshold_at_tpr(id, tpr))``. Tied scores
    are never split, so the fraction actually kept may exceed ``tpr``.

    This is the ``tpr`` quantile with ``numpy.quantile(..., method="inverted_cdf")`` (the inverse of the empirical
    CDF, no interpolation), except where ``tpr * n`` rounds above an integer in floats: numpy gives 8 for the
    0.28 quantile of ``1..25`` because ``0.28 * 25`` is ``7.000000000000001``; here 7 of 25 is a fraction 0.28.

    Parameters
    ----------
    id_scores : 1-D array of finite OOD scores of ID samples, higher = more OOD.
    tpr : target fraction of ID samples accepted, in (0, 1].

    Returns
    -------
    float, one of the ID scores.

    Examples
    --------
    >>> threshold_at_tpr([3.0, 1.0, 2.0, 4.0], tpr=0.5)
    2.0
    >>> threshold_at_tpr([1.0, 2.0, 2.0, 2.0, 5.0], tpr=0.5)  # the tied 2s are kept together: 4/5 accepted
    2.0
    >>> threshold_at_tpr(range(1, 26), tpr=0.28)
    7.0
    """
    tpr = _check_tpr(tpr)
    values, counts = np.unique(_as_scores(id_scores, "id_scores"), return_counts=True)
    return float(values[_first_reaching(counts, tpr)])


def fpr_at_ood_tpr(id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = 0.95) -> float:
    """FPR at a target **OOD** true-positive rate: the fraction of ID samples flagged as OOD when the
    threshold catches at least ``tpr`` of the OOD samples (OOD-TPR convention).

    This is the convention of OpenOOD since commit ``873e8c2`` (2023-08-10, v1.5) and of pytorch-ood's
    ``FPR95TPR``. OpenOOD used the ID-TPR convention (:func:`fpr_at_tpr`) before that commit, so its FPR@95
    numbers before and after are not comparable (OpenOOD issues #177, #308); on skewed score distributions
    the two conventions differ by far more than on Gaussian ones.

    Rule: a sample is flagged as OOD when ``s >= t``. The thresholds ``t`` are the distinct pooled score
    values; take the largest ``t`` whose OOD detection rate is ``>= tpr`` (the first ROC point at or beyond
    the target, no interpolation), and return the fraction of ID samples with ``s >= t``. This equals
    ``fpr[argmax(tpr_curve >= tpr)]`` of ``sklearn.metrics.roc_curve(is_ood, s, drop_intermediate=False)``.
    OpenOOD calls ``roc_curve`` with its default ``drop_intermediate=True``, which removes points on
    straight, evenly spaced runs of the curve and can then skip the first qualifying point; oodguard keeps
    one point per distinct score.

    Parameters
    ----------
    id_scores, ood_scores : 1-D arrays of finite OOD scores, higher = more OOD.
    tpr : target fraction of OOD samples flagged, in (0, 1].

    Examples
    --------
    >>> id_s = [0.0, 1.0, 1.0, 1.0, 2.0]
    >>> ood_s = [1.0, 1.0, 3.0, 3.0]
    >>> fpr_at_ood_tpr(id_s, ood_s, tpr=0.5)  # t = 3 catches 2/4 OOD and flags no ID sample
    0.0
    >>> fpr_at_ood_tpr(id_s, ood_s, tpr=0.95)  # t = 1 catches 4/4 OOD and flags 4/5 ID samples
    0.8
    """
    tpr = _check_tpr(tpr)
    _, id_counts, ood_counts = _counts(id_scores, ood_scores)
    return float(_fpr_at_ood_tpr_counts(id_counts, ood_counts, tpr))


def detection_error(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Minimum detection error: ``min_t 0.5 * (1 - TPR_ID(t)) + 0.5 * FPR(t)``.

    The misclassification probability of the best threshold when ID and OOD are equally likely.
    ``TPR_ID(t)`` is the fraction of ID accepted (``s <= t``) and ``FPR(t)`` the fraction of OOD accepted.
    The minimum runs over every distinct score value plus accept-nothing and accept-everything (both 0.5),
    so the result lies in [0, 0.5].

    Examples
    --------
    >>> detection_error([0.0, 0.0, 1.0, 3.0], [1.0, 2.0, 2.0, 4.0])
    0.25
    """
    _, id_counts, ood_counts = _counts(id_scores, ood_scores)
    return float(_detection_error_counts(id_counts, ood_counts))


def _evaluate_keys(tpr: float) -> dict[str, str]:
    pct = _percent(tpr)
    return {
        "auroc": "auroc",
        "aupr_in": "aupr_in",
        "aupr_out": "aupr_out",
        "fpr_at_tpr": f"fpr_at_{pct}_id_tpr",
        "fpr_at_ood_tpr": f"fpr_at_{pct}_ood_tpr",
        "detection_error": "detection_error",
    }


def evaluate(
    id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = 0.95, aupr_estimator: str = "average_precision"
) -> dict[str, float]:
    """All ID-versus-OOD metrics from one sort of the scores.

    Keys (shown for ``tpr=0.95``; the number follows ``tpr``, e.g. ``fpr_at_90_id_tpr``):

    - ``auroc``: :func:`auroc`.
    - ``aupr_in``, ``aupr_out``: :func:`aupr_in`, :func:`aupr_out` with ``aupr_estimator``.
    - ``fpr_at_95_id_tpr``: :func:`fpr_at_tpr`, the ID-TPR convention (fraction of OOD accepted when 95 %
      of ID is kept; ODIN/Energy papers, OpenOOD before 873e8c2).
    - ``fpr_at_95_ood_tpr``: :func:`fpr_at_ood_tpr`, the OOD-TPR convention (fraction of ID flagged when
      95 % of OOD is caught; OpenOOD v1.5, pytorch-ood).
    - ``detection_error``: :func:`detection_error`.

    Examples
    --------
    >>> result = evaluate([0.0, 1.0, 2.0], [1.0, 3.0])
    >>> sorted(result)
    ['aupr_in', 'aupr_out', 'auroc', 'detection_error', 'fpr_at_95_id_tpr', 'fpr_at_95_ood_tpr']
    >>> result["auroc"]
    0.75
    """
    tpr = _check_tpr(tpr)
    _check_estimator(aupr_estimator, "aupr_estimator")
    _, id_counts, ood_counts = _counts(id_scores, ood_scores)
    return {
        key: float(_metric_counts(name, id_counts, ood_counts, tpr, aupr_estimator))
        for name, key in _evaluate_keys(tpr).items()
    }


def evaluate_frame(
    id_scores: ArrayLike | Mapping[str, ArrayLike],
    ood_scores: Mapping[str, ArrayLike],
    tpr: float = 0.95,
    aupr_estimator: str = "average_precision",
) -> Any:
    """:func:`evaluate` for several OOD sets (and detectors) at once, as a pandas DataFrame.

    ``ood_scores`` maps an OOD set's name to its scores. ``id_scores`` is one array (one detector), or a mapping
    detector -> ID scores, in which case ``ood_scores`` maps detector -> {set -> scores}. One row per
    (detector, OOD set), with a column per metric of :func:`evaluate`.

    Examples
    --------
    >>> frame = evaluate_frame([0.0, 1.0, 2.0], {"near": [1.0, 3.0], "far": [5.0, 6.0]})
    >>> frame[["ood_set", "auroc"]].values.tolist()
    [['near', 0.75], ['far', 1.0]]
    """
    import pandas as pd

    per_detector: dict[str, tuple[Any, Any]]
    if isinstance(id_scores, Mapping):
        per_detector = {name: (id_scores[name], ood_scores[name]) for name in id_scores}
    else:
        per_detector = {"": (id_scores, ood_scores)}
    rows = []
    for detector, (id_part, sets) in per_detector.items():
        if not isinstance(sets, Mapping):
            raise ValueError(f"ood_scores: expected a mapping OOD set name -> scores for detector {detector!r}")
        for set_name, scores in sets.items():
            rows.append({"detector": detector, "ood_set": set_name, **evaluate(id_part, scores, tpr, aupr_estimator)})
    frame = pd.DataFrame(rows)
    return frame.drop(columns="detector") if not isinstance(id_scores, Mapping) else frame


def bootstrap(
    id_scores: ArrayLike,
    ood_scores: ArrayLike,
    metrics: Sequence[str] = BOOTSTRAP_METRICS,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
    *,
    tpr: float = 0.95,
    aupr_estimator: str = "average_precision",
) -> dict[str, tuple[float, float, float]]:
    """Bootstrap percentile confidence intervals for ID-versus-OOD metrics.

    ID and OOD scores are resampled independently, with replacement, each to its own size, ``n_boot``
    times, from ``numpy.random.default_rng(seed)``; the same seed gives the same intervals. Each replicate
    is computed from the tie groups of the full sample (a resample only changes how many samples sit at
    each score value), so no replicate is re-sorted.

    Parameters
    ----------
    id_scores, ood_scores : 1-D arrays of finite OOD scores, higher = more OOD.
    metrics : names among ``BOOTSTRAP_METRICS``: ``"auroc"``, ``"aupr_in"``, ``"aupr_out"``,
        ``"fpr_at_tpr"`` (ID-TPR convention), ``"fpr_at_ood_tpr"`` (OOD-TPR convention), ``"detection_error"``.
    n_boot : number of bootstrap replicates.
    confidence : coverage of the percentile interval, in (0, 1).
    seed : seed of the numpy Generator.
    tpr, aupr_estimator : as in :func:`evaluate`.

    Returns
    -------
    dict mapping each metric name to ``(estimate, low, high)``: the estimate on the full sample and the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of the replicates. A percentile
    interval usually, but not always, contains the estimate. Two detectors whose intervals overlap heavily
    should not be ranked.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> ci = bootstrap(rng.normal(0, 1, 500), rng.normal(1, 1, 500), metrics=("auroc",), n_boot=200)
    >>> estimate, low, high = ci["auroc"]
    >>> bool(low < estimate < high)
    True
    """
    id_s = _as_scores(id_scores, "id_scores")
    ood_s = _as_scores(ood_scores, "ood_scores")
    if isinstance(metrics, str):
        metrics = (metrics,)
    names = tuple(metrics)
    if not names:
        raise ValueError(f"metrics is empty; choose names from {BOOTSTRAP_METRICS}")
    unknown = [name for name in names if name not in BOOTSTRAP_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {BOOTSTRAP_METRICS}")
    _check_n_boot(n_boot)
    _check_confidence(confidence)
    tpr = _check_tpr(tpr)
    _check_estimator(aupr_estimator, "aupr_estimator")

    values, group = _group_index(np.concatenate([id_s, ood_s]))
    n_groups = values.size
    id_group, ood_group = group[: id_s.size], group[id_s.size :]
    full_id = np.bincount(id_group, minlength=n_groups)
    full_ood = np.bincount(ood_group, minlength=n_groups)
    estimates = {name: float(_metric_counts(name, full_id, full_ood, tpr, aupr_estimator)) for name in names}

    rng = np.random.default_rng(seed)
    batch = max(1, min(n_boot, _BOOTSTRAP_BATCH_ELEMENTS // (id_s.size + ood_s.size)))
    draws = {name: np.empty(n_boot) for name in names}
    for start in range(0, n_boot, batch):
        size = min(batch, n_boot - start)
        id_counts = _resampled_counts(rng, id_group, size, n_groups)
        ood_counts = _resampled_counts(rng, ood_group, size, n_groups)
        for name in names:
            draws[name][start : start + size] = _metric_counts(name, id_counts, ood_counts, tpr, aupr_estimator)

    return {name: (estimates[name], *percentile_interval(draws[name], confidence)) for name in names}


def _check_n_boot(n_boot: int) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")


def _check_confidence(confidence: float) -> None:
    if isinstance(confidence, bool) or not isinstance(confidence, Real) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}; pass e.g. 0.95")


def _resampled_counts(rng: np.random.Generator, group: np.ndarray, n_rep: int, n_groups: int) -> np.ndarray:
    """Counts per tie group of ``n_rep`` resamples (with replacement) of the samples whose groups are given."""
    return _drawn_counts(group, rng.integers(0, group.size, size=(n_rep, group.size)), n_groups)


def _drawn_counts(group: np.ndarray, draws: np.ndarray, n_groups: int) -> np.ndarray:
    """Counts per tie group ``[n_rep, n_groups]`` of the resamples ``draws [n_rep, m]`` (sample indices)."""
    n_rep = draws.shape[0]
    picks = group[draws]
    picks += (np.arange(n_rep, dtype=np.int64) * n_groups)[:, None]
    return np.bincount(picks.ravel(), minlength=n_rep * n_groups).reshape(n_rep, n_groups)


def percentile_interval(replicates: ArrayLike, confidence: float = 0.95) -> tuple[float, float]:
    """Bootstrap percentile interval: the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles.

    Quantiles of the replicates by ``numpy.quantile`` with its default linear interpolation; the levels are
    computed as ``tail = (1 - confidence) / 2`` and ``1 - tail``. :func:`bootstrap` reports these intervals; use
    this function on the replicates of :func:`paired_bootstrap` (or of a difference of two rows of it) so that
    every interval in a report is computed the same way.

    Parameters
    ----------
    replicates : 1-D array of finite bootstrap replicates of one statistic (not the full-sample estimate).
    confidence : coverage of the interval, in (0, 1).

    Returns
    -------
    ``(low, high)`` as floats.

    Examples
    --------
    >>> percentile_interval(np.arange(101.0), confidence=0.5)
    (25.0, 75.0)
    """
    values = _as_scores(replicates, "replicates")
    _check_confidence(confidence)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def _as_score_rows(values: Any, name: str) -> np.ndarray:
    """Scores of several detectors on the same samples as a float64 array ``[n_detectors, n_samples]``."""
    if isinstance(values, (list, tuple)):
        rows = [_as_scores(row, f"{name}[{i}]") for i, row in enumerate(values)]
    else:
        array = _to_numpy(values, name)
        if array.ndim != 2:
            raise ValueError(
                f"{name}: expected one row of scores per detector [n_detectors, n_samples], got shape {array.shape}"
            )
        rows = [_as_scores(row, f"{name}[{i}]") for i, row in enumerate(array)]
    if not rows:
        raise ValueError(f"{name} holds no detector's scores; pass one row of scores per detector")
    sizes = {row.size for row in rows}
    if len(sizes) > 1:
        raise ValueError(
            f"{name}: the detectors' rows have different lengths {sorted(sizes)}; a paired bootstrap needs every "
            "detector's scores of the same samples, in the same order"
        )
    return np.stack(rows)


def paired_bootstrap(
    id_scores: Any,
    ood_scores: Sequence[Any],
    metric: str = "auroc",
    n_boot: int = 1000,
    seed: int | None = 0,
    *,
    tpr: float = 0.95,
    aupr_estimator: str = "average_precision",
) -> np.ndarray:
    """Paired bootstrap of one ID-versus-OOD metric for several detectors scored on the same samples.

    Every replicate resamples, with replacement, the ID samples and each OOD set's samples once and applies the
    same indices to every detector, so that differences between detectors are paired: the variation they share
    (which samples were drawn) cancels in ``result[:, i] - result[:, j]``, whose :func:`percentile_interval`
    is the interval of the difference. :func:`bootstrap` instead resamples one detector's scores on its own.

    The draws come from ``numpy.random.default_rng(seed)``, replicate by replicate: the ID indices
    (``rng.integers(0, n_id, n_id)``), then each OOD set's in the order given (``rng.integers(0, n_k, n_k)``).
    As in :func:`bootstrap`, each replicate is computed from the tie groups of the full sample, without
    re-sorting.

    Parameters
    ----------
    id_scores : ``[n_detectors, n_id]``: one row of OOD scores per detector (a 2-D array or tensor, or a list of
        1-D arrays), the same ID samples in the same order in every row.
    ood_scores : a sequence of OOD sets, each ``[n_detectors, n_k]`` with the detectors in the same order.
    metric : one of ``BOOTSTRAP_METRICS`` (see :func:`bootstrap`).
    n_boot : number of bootstrap replicates.
    seed : seed of the numpy Generator.
    tpr, aupr_estimator : as in :func:`evaluate`.

    Returns
    -------
    float64 array ``[n_boot + 1, n_detectors, n_sets]``: row 0 holds the metric on the full samples, rows
    ``1..n_boot`` the replicates.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> id_s, ood_s = rng.normal(0, 1, 300), rng.normal(1, 1, 200)
    >>> values = paired_bootstrap([id_s, 2 * id_s], [[ood_s, 2 * ood_s + 0.5]], n_boot=200)
    >>> values.shape
    (201, 2, 1)
    >>> bool(values[0, 0, 0] == auroc(id_s, ood_s))
    True
    >>> low, high = percentile_interval(values[1:, 1, 0] - values[1:, 0, 0])
    >>> bool(0 < low < high)  # the shift of the second detector's OOD scores helps in every replicate
    True
    """
    if metric not in BOOTSTRAP_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {BOOTSTRAP_METRICS}")
    _check_n_boot(n_boot)
    tpr = _check_tpr(tpr)
    _check_estimator(aupr_estimator, "aupr_estimator")
    id_rows = _as_score_rows(id_scores, "id_scores")
    if isinstance(ood_scores, (str, bytes)) or not isinstance(ood_scores, (Sequence, np.ndarray, torch.Tensor)):
        kind = type(ood_scores).__name__
        raise ValueError(f"ood_scores: expected a sequence of OOD sets [n_detectors, n_k], got {kind}")
    sets = [_as_score_rows(ood, f"ood_scores[{k}]") for k, ood in enumerate(ood_scores)]
    if not sets:
        raise ValueError("ood_scores holds no OOD set; pass at least one [n_detectors, n_k] set")
    n_detectors = id_rows.shape[0]
    for k, ood in enumerate(sets):
        if ood.shape[0] != n_detectors:
            raise ValueError(
                f"ood_scores[{k}] has {ood.shape[0]} detectors' rows but id_scores has {n_detectors}; "
                "pass the detectors in the same order in every set"
            )

    # Tie groups of every (detector, OOD set) pair, once: (ID groups, OOD groups, number of groups).
    pairs = {}
    result = np.empty((n_boot + 1, n_detectors, len(sets)))
    for k, ood in enumerate(sets):
        for d in range(n_detectors):
            values, group = _group_index(np.concatenate([id_rows[d], ood[d]]))
            pairs[d, k] = (group[: id_rows.shape[1]], group[id_rows.shape[1] :], values.size)
            id_group, ood_group, n_groups = pairs[d, k]
            full_id = np.bincount(id_group, minlength=n_groups)
            full_ood = np.bincount(ood_group, minlength=n_groups)
            result[0, d, k] = _metric_counts(metric, full_id, full_ood, tpr, aupr_estimator)

    rng = np.random.default_rng(seed)
    sizes = [id_rows.shape[1], *(ood.shape[1] for ood in sets)]
    batch = max(1, min(n_boot, _BOOTSTRAP_BATCH_ELEMENTS // sum(sizes)))
    for start in range(0, n_boot, batch):
        size = min(batch, n_boot - start)
        draws = [np.empty((size, n), dtype=np.int64) for n in sizes]
        for r in range(size):
            for drawn, n in zip(draws, sizes, strict=True):
                drawn[r] = rng.integers(0, n, n)
        for (d, k), (id_group, ood_group, n_groups) in pairs.items():
            id_counts = _drawn_counts(id_group, draws[0], n_groups)
            ood_counts = _drawn_counts(ood_group, draws[k + 1], n_groups)
            replicates = _metric_counts(metric, id_counts, ood_counts, tpr, aupr_estimator)
            result[1 + start : 1 + start + size, d, k] = replicates
    return result


# ----------------------------------------------------------------------------------------------------
# Misclassification detection
# ----------------------------------------------------------------------------------------------------


def aurc(scores: ArrayLike, correct: ArrayLike) -> float:
    """Area under the risk-coverage curve (selective classification; Geifman & El-Yaniv; lower is better).

    ``scores`` are uncertainty scores, higher = more likely wrong (rejected first). Sort the samples by
    increasing score; the risk at coverage k/n is the error rate of the k most confident samples, and

        AURC = (1/n) * sum_{k=1..n} errors(k most confident) / k,

    the definition of Geifman et al. (ICLR 2019) and of the common implementations (e.g. the CRL code of
    Moon et al., 2020). Tied scores have no order, so within a group of tied samples the error count
    grows linearly (its expectation over random tie-breaking); with distinct scores this is exactly the
    formula above.

    Parameters
    ----------
    scores : 1-D array of finite uncertainty scores, higher = more likely wrong.
    correct : 1-D booleans (or 0/1), True where the model's prediction is correct.

    Examples
    --------
    >>> round(aurc([0.1, 0.2, 0.3, 0.4], [True, True, False, True]), 6)  # risks 0, 0, 1/3, 1/4
    0.145833
    """
    score = _as_scores(scores, "scores")
    is_correct = _as_correct(correct, "correct", score.size)
    return float(_aurc(score, ~is_correct))


def _aurc(scores: np.ndarray, is_error: np.ndarray) -> float:
    _, correct_counts, errors = _tie_counts(scores[~is_error], scores[is_error])
    size = correct_counts + errors
    before = np.cumsum(size) - size
    errors_before = np.cumsum(errors) - errors
    sample_group = np.repeat(np.arange(size.size), size)  # group of the k-th most confident sample
    covered = np.arange(1, scores.size + 1)
    position = covered - before[sample_group]  # 1..size within the group
    expected_errors = errors_before[sample_group] + position * (errors[sample_group] / size[sample_group])
    return float(np.mean(expected_errors / covered))


def _oracle_aurc(n: int, n_errors: int) -> float:
    # The oracle accepts every correct sample first: risk(k) = max(0, k - n_correct) / k.
    covered = np.arange(1, n + 1)
    return float(np.mean(np.maximum(covered - (n - n_errors), 0) / covered))


def eaurc(scores: ArrayLike, correct: ArrayLike) -> float:
    """Excess AURC: :func:`aurc` minus the AURC of the oracle ranking (every correct sample before every error).

    The oracle's AURC is computed exactly for the n samples at hand:
    ``(1/n) * sum_k max(0, k - n_correct) / k``. Geifman et al. (ICLR 2019) and the CRL code use its
    continuous approximation ``r + (1 - r) * ln(1 - r)`` (r = error rate), which differs by O(log(n) / n)
    and is undefined at r = 1; the exact form is 0 for a perfect ranking at any n.

    Examples
    --------
    >>> eaurc([0.1, 0.2, 0.3, 0.4], [True, True, True, False])  # the error is rejected first: oracle
    0.0
    >>> round(eaurc([0.1, 0.2, 0.3, 0.4], [False, True, True, True]), 6)  # risks 1, 1/2, 1/3, 1/4 vs 0, 0, 0, 1/4
    0.458333
    """
    score = _as_scores(scores, "scores")
    is_error = ~_as_correct(correct, "correct", score.size)
    return _aurc(score, is_error) - _oracle_aurc(score.size, int(is_error.sum()))


# ----------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------


def expected_calibration_error(confidence: ArrayLike, correct: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins (Naeini et al., AAAI 2015; Guo et al., ICML 2017).

    Bin ``m`` holds the samples whose confidence lies in ``((m - 1) / M, m / M]`` (bin 1 also takes confidence 0),
    and

        ECE = sum_m |B_m| / n * |accuracy(B_m) - mean confidence(B_m)|,

    empty bins contributing nothing. With ``M = 15`` and the maximum softmax probability as the confidence this is
    the ECE of Guo et al. and of the regularisation study of Chun et al. (arXiv 1906.02900), in [0, 1].

    Parameters
    ----------
    confidence : 1-D array of the predicted class's probability, in [0, 1].
    correct : 1-D booleans (or 0/1), True where the prediction is correct.
    n_bins : number of equal-width bins, default 15.

    Examples
    --------
    >>> # bin (0.8, 0.9]: accuracy 1/2, confidence 0.9; bin (0.5, 0.6]: accuracy 1, confidence 0.6
    >>> expected_calibration_error([0.9, 0.9, 0.6, 0.6], [True, False, True, True], n_bins=10)
    0.4
    """
    conf = _as_scores(confidence, "confidence")
    if conf.size and (conf.min() < 0.0 or conf.max() > 1.0):
        raise ValueError("confidence: expected probabilities in [0, 1] (the predicted class's softmax probability)")
    is_correct = _as_correct(correct, "correct", conf.size)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins: expected a positive integer, got {n_bins!r}")
    if conf.size == 0:
        raise ValueError("confidence: empty; the ECE needs at least one sample")
    # lower < confidence <= upper with the edges of np.linspace, as the reference implementations compare
    bins = np.clip(np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1), conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.bincount(bins, weights=is_correct.astype(np.float64), minlength=n_bins) - np.bincount(
        bins, weights=conf, minlength=n_bins
    )  # per bin: count * (accuracy - mean confidence)
    return float(np.abs(gap).sum() / count.sum())


def error_detection_auroc(scores: ArrayLike, correct: ArrayLike) -> float:
    """AUROC of detecting misclassified samples: positives are errors, scored by ``scores`` (higher = wrong).

    Equals ``sklearn.metrics.roc_auc_score(~correct, scores)``; ties count one half.

    Examples
    --------
    >>> error_detection_auroc([0.1, 0.2, 0.3, 0.4], [True, True, False, True])
    0.6666666666666666
    """
    score = _as_scores(scores, "scores")
    is_correct = _as_correct(correct, "correct", score.size)
    if is_correct.all() or not is_correct.any():
        kind = "correct" if is_correct.all() else "wrong"
        raise ValueError(f"every sample is {kind}; error-detection AUROC needs both correct and wrong samples")
    _, correct_counts, error_counts = _tie_counts(score[is_correct], score[~is_correct])
    return float(_auroc_counts(correct_counts, error_counts))


# ----------------------------------------------------------------------------------------------------
# Out-of-model-scope evaluation (Guérin et al., AAAI 2023)
# ----------------------------------------------------------------------------------------------------


def evaluate_oms(
    id_scores: ArrayLike,
    ood_scores: ArrayLike,
    id_labels: ArrayLike,
    id_predictions: ArrayLike,
    ood_labels: ArrayLike | None = None,
    ood_predictions: ArrayLike | None = None,
    novelty: bool = True,
    *,
    tpr: float = 0.95,
    aupr_estimator: str = "average_precision",
) -> dict[str, float]:
    """Out-of-model-scope evaluation: does the monitor reject the inputs the model gets wrong?

    Guérin, Delmas, Ferreira, Guiochet, "Out-of-Distribution Detection Is Not All You Need", AAAI 2023;
    official code: github.com/jorisguerin/neural-network-monitoring-benchmark (``Evaluator``). The pool is
    the ID test set plus the OOD set; scores are monitor scores, higher = reject.

    Ground truth: **should reject** (positive) = misclassified ID samples, plus every OOD sample when
    ``novelty=True`` (new classes), or only the misclassified OOD samples when ``novelty=False`` (covariate
    shift or attack: same classes, ``ood_labels`` and ``ood_predictions`` required). **Should accept**
    (negative) = correctly classified samples.

    Returned keys (``95`` follows ``tpr``):

    - ``oms_auroc``: AUROC, should-reject samples positive.
    - ``oms_aupr``: AUPR, should-reject samples positive (``aupr_estimator``; average precision by default,
      as the official code).
    - ``oms_tnr_at_95_tpr``: the threshold is the largest score value that rejects (``s >= t``) at least 95 %
      of the should-reject samples (first ROC point at or beyond the target); the fraction of
      should-accept samples still accepted there.
    - ``oms_precision``, ``oms_recall``, ``oms_f1``, ``oms_f1_threshold``: at the threshold (reject when
      ``s >= t``, ``t`` over the distinct score values) maximising F1 of the should-reject class; among
      equal F1 the largest threshold.
    - ``ood_*``: the standard ID-versus-OOD metrics of :func:`evaluate` on the same scores, for contrast
      (``ood_auroc``, ``ood_aupr_in``, ``ood_aupr_out``, ``ood_fpr_at_95_id_tpr``, ``ood_fpr_at_95_ood_tpr``,
      ``ood_detection_error``).

    Parameters
    ----------
    id_scores, ood_scores : 1-D monitor scores, higher = reject.
    id_labels, id_predictions : true and predicted classes of the ID samples.
    ood_labels, ood_predictions : the same for the OOD samples; needed when ``novelty=False``, only
        length-checked when ``novelty=True``.
    novelty : True when the OOD set holds classes the model does not know (every OOD sample should be
        rejected).
    tpr, aupr_estimator : target rate of should-reject samples for the TNR, and the AUPR estimator.

    Examples
    --------
    >>> r = evaluate_oms([0.1, 0.2, 0.9], [0.8], id_labels=[0, 1, 2], id_predictions=[0, 1, 1])
    >>> r["oms_auroc"], r["oms_f1"]
    (1.0, 1.0)
    """
    tpr = _check_tpr(tpr)
    _check_estimator(aupr_estimator, "aupr_estimator")
    id_s = _as_scores(id_scores, "id_scores")
    ood_s = _as_scores(ood_scores, "ood_scores")
    id_wrong = _as_labels(id_labels, "id_labels", id_s.size, "id_scores") != _as_labels(
        id_predictions, "id_predictions", id_s.size, "id_scores"
    )
    checked = {}
    for name, value in (("ood_labels", ood_labels), ("ood_predictions", ood_predictions)):
        if value is not None:
            checked[name] = _as_labels(value, name, ood_s.size, "ood_scores")
    if novelty:
        ood_wrong = np.ones(ood_s.size, dtype=bool)
    else:
        if len(checked) < 2:
            raise ValueError(
                "novelty=False (covariate shift: the OOD set has the ID classes) needs ood_labels and "
                "ood_predictions to tell which OOD samples the model gets wrong; pass both, or set "
                "novelty=True if the OOD set holds new classes"
            )
        ood_wrong = checked["ood_labels"] != checked["ood_predictions"]

    should_reject = np.concatenate([id_wrong, ood_wrong])
    scores = np.concatenate([id_s, ood_s])
    if not should_reject.any():
        raise ValueError(
            "no sample should be rejected (every prediction is correct and novelty=False); "
            "OMS metrics need at least one should-reject sample"
        )
    if should_reject.all():
        raise ValueError("no sample should be accepted (every prediction is wrong); OMS metrics need both kinds")

    values, accept_counts, reject_counts = _tie_counts(scores[~should_reject], scores[should_reject])
    result = {
        "oms_auroc": float(_auroc_counts(accept_counts, reject_counts)),
        "oms_aupr": float(_aupr_out_counts(accept_counts, reject_counts, aupr_estimator)),
        f"oms_tnr_at_{_percent(tpr)}_tpr": 1.0 - float(_fpr_at_ood_tpr_counts(accept_counts, reject_counts, tpr)),
    }
    result.update(_best_f1(values, accept_counts, reject_counts))
    result.update({f"ood_{key}": value for key, value in evaluate(id_s, ood_s, tpr, aupr_estimator).items()})
    return result


def _best_f1(values: np.ndarray, accept_counts: np.ndarray, reject_counts: np.ndarray) -> dict[str, float]:
    # Sweep t downwards, rejecting s >= t; F1 = 2 TP / (TP + FP + P).
    true_pos = np.cumsum(reject_counts[::-1])
    false_pos = np.cumsum(accept_counts[::-1])
    positives = true_pos[-1]
    f1 = 2.0 * true_pos / (true_pos + false_pos + positives)
    best = int(np.argmax(f1))
    return {
        "oms_precision": float(true_pos[best] / (true_pos[best] + false_pos[best])),
        "oms_recall": float(true_pos[best] / positives),
        "oms_f1": float(f1[best]),
        "oms_f1_threshold": float(values[::-1][best]),
    }
