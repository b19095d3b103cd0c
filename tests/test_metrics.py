"""Tests of oodguard.metrics: sklearn as an independent oracle, hand-worked tied cases, properties."""

from __future__ import annotations

import doctest
import itertools
import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from oodguard import metrics
from oodguard.metrics import (
    aupr_in,
    aupr_out,
    aurc,
    auroc,
    bootstrap,
    detection_error,
    eaurc,
    error_detection_auroc,
    evaluate,
    evaluate_oms,
    fpr_at_ood_tpr,
    fpr_at_tpr,
    paired_bootstrap,
    percentile_interval,
    threshold_at_tpr,
)

TARGETS = (0.05, 0.2, 0.5, 0.9, 0.95, 1.0)


# ------------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------------


def _pooled(id_s, ood_s):
    scores = np.concatenate([id_s, ood_s]).astype(np.float64)
    is_ood = np.concatenate([np.zeros(len(id_s)), np.ones(len(ood_s))])
    return scores, is_ood


def sklearn_reference(id_s, ood_s, targets=(0.95,)):
    """Every ID-vs-OOD metric from sklearn, with the conventions stated in methods/metrics.md."""
    s, is_ood = _pooled(id_s, ood_s)
    is_id = 1 - is_ood
    fpr_id, tpr_id, _ = roc_curve(is_id, -s, drop_intermediate=False)
    fpr_ood, tpr_ood, _ = roc_curve(is_ood, s, drop_intermediate=False)
    prec_in, rec_in, _ = precision_recall_curve(is_id, -s)
    prec_out, rec_out, _ = precision_recall_curve(is_ood, s)
    ref = {
        "auroc": roc_auc_score(is_ood, s),
        "aupr_in": average_precision_score(is_id, -s),
        "aupr_out": average_precision_score(is_ood, s),
        "aupr_in_trapezoid": auc(rec_in, prec_in),
        "aupr_out_trapezoid": auc(rec_out, prec_out),
    }
    for tpr in targets:
        ref[f"fpr_at_tpr_{tpr}"] = fpr_id[np.argmax(tpr_id >= tpr)]
        ref[f"fpr_at_ood_tpr_{tpr}"] = fpr_ood[np.argmax(tpr_ood >= tpr)]
    return ref


def fpr_at_ood_tpr_transcribed(id_s, ood_s, tpr):
    """Plain-Python transcription of sklearn's roc_curve sweep: thresholds = distinct scores in decreasing
    order, flag s >= t, stop at the first point whose OOD rate is >= tpr."""
    for t in sorted(set(id_s) | set(ood_s), reverse=True):
        caught = sum(s >= t for s in ood_s) / len(ood_s)
        if caught >= tpr:
            return sum(s >= t for s in id_s) / len(id_s)
    raise AssertionError("unreachable: the lowest threshold catches everything")


def fpr_at_id_tpr_transcribed(id_s, ood_s, tpr):
    """Thresholds = distinct scores in increasing order, accept s <= t, first point with ID rate >= tpr."""
    for t in sorted(set(id_s) | set(ood_s)):
        kept = sum(s <= t for s in id_s) / len(id_s)
        if kept >= tpr:
            return sum(s <= t for s in ood_s) / len(ood_s)
    raise AssertionError("unreachable")


def detection_error_brute_force(id_s, ood_s):
    values = sorted(set(id_s) | set(ood_s))
    cuts = [values[0] - 1.0] + values  # accept s <= t; the first cut accepts nothing
    return min(0.5 * (1 - np.mean(np.asarray(id_s) <= t)) + 0.5 * np.mean(np.asarray(ood_s) <= t) for t in cuts)


def aurc_transcribed(scores, correct):
    """Geifman et al. / CRL: sort by confidence, risk after k samples = errors / k, AURC = mean risk."""
    order = np.argsort(scores, kind="stable")
    risks, errors = [], 0
    for k, index in enumerate(order, start=1):
        errors += not correct[index]
        risks.append(errors / k)
    return sum(risks) / len(risks)


def aurc_over_tie_orders(scores, correct):
    """Average of the transcribed AURC over every order of the samples (so every tie-breaking)."""
    scores, correct = np.asarray(scores), np.asarray(correct)
    values = [aurc_transcribed(scores[list(p)], correct[list(p)]) for p in itertools.permutations(range(len(scores)))]
    return float(np.mean(values))


def _rng_case(rng, tied):
    n_id, n_ood = rng.integers(1, 40, size=2)
    if tied:
        return rng.integers(0, 4, n_id).astype(float), rng.integers(0, 4, n_ood).astype(float)
    return rng.normal(0.0, 1.0, n_id), rng.normal(0.7, 1.3, n_ood)


# ------------------------------------------------------------------------------------------------
# Agreement with sklearn
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["continuous", "heavily-tied"])
def test_matches_sklearn(tied):
    rng = np.random.default_rng(7 + tied)
    for _ in range(60):
        id_s, ood_s = _rng_case(rng, tied)
        ref = sklearn_reference(id_s, ood_s, TARGETS)
        assert auroc(id_s, ood_s) == pytest.approx(ref["auroc"], abs=1e-12)
        assert aupr_in(id_s, ood_s) == pytest.approx(ref["aupr_in"], abs=1e-12)
        assert aupr_out(id_s, ood_s) == pytest.approx(ref["aupr_out"], abs=1e-12)
        assert aupr_in(id_s, ood_s, "trapezoid") == pytest.approx(ref["aupr_in_trapezoid"], abs=1e-12)
        assert aupr_out(id_s, ood_s, "trapezoid") == pytest.approx(ref["aupr_out_trapezoid"], abs=1e-12)
        for tpr in TARGETS:
            # Same float rate expression as sklearn: the first-point rule agrees exactly.
            assert fpr_at_tpr(id_s, ood_s, tpr) == ref[f"fpr_at_tpr_{tpr}"]
            assert fpr_at_ood_tpr(id_s, ood_s, tpr) == ref[f"fpr_at_ood_tpr_{tpr}"]


@pytest.mark.parametrize("tied", [False, True], ids=["continuous", "heavily-tied"])
def test_roc_curve_matches_sklearn(tied):
    rng = np.random.default_rng(17 + tied)
    for _ in range(40):
        id_s, ood_s = _rng_case(rng, tied)
        scores, is_ood = _pooled(id_s, ood_s)
        expected = roc_curve(is_ood, scores, drop_intermediate=False)  # sklearn's
        for ours, theirs in zip(metrics.roc_curve(id_s, ood_s), expected, strict=True):
            np.testing.assert_array_equal(ours, theirs)
        fpr, tpr, _ = metrics.roc_curve(id_s, ood_s)
        assert auc(fpr, tpr) == pytest.approx(auroc(id_s, ood_s), abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(
    id_s=st.lists(st.integers(-3, 3), min_size=1, max_size=30),
    ood_s=st.lists(st.integers(-3, 3), min_size=1, max_size=30),
    tpr=st.sampled_from(TARGETS),
)
def test_fpr_conventions_match_transcribed_sweeps(id_s, ood_s, tpr):
    assert fpr_at_ood_tpr(id_s, ood_s, tpr) == fpr_at_ood_tpr_transcribed(id_s, ood_s, tpr)
    assert fpr_at_tpr(id_s, ood_s, tpr) == fpr_at_id_tpr_transcribed(id_s, ood_s, tpr)


def test_evaluate_bundles_the_individual_metrics():
    rng = np.random.default_rng(0)
    id_s, ood_s = rng.normal(0, 1, 300), rng.integers(0, 5, 200).astype(float)
    for estimator in metrics.AUPR_ESTIMATORS:
        result = evaluate(id_s, ood_s, tpr=0.95, aupr_estimator=estimator)
        assert result == {
            "auroc": auroc(id_s, ood_s),
            "aupr_in": aupr_in(id_s, ood_s, estimator),
            "aupr_out": aupr_out(id_s, ood_s, estimator),
            "fpr_at_95_id_tpr": fpr_at_tpr(id_s, ood_s, 0.95),
            "fpr_at_95_ood_tpr": fpr_at_ood_tpr(id_s, ood_s, 0.95),
            "detection_error": detection_error(id_s, ood_s),
        }
    assert set(evaluate(id_s, ood_s, tpr=0.9)) >= {"fpr_at_90_id_tpr", "fpr_at_90_ood_tpr"}
    assert "fpr_at_99.5_id_tpr" in evaluate(id_s, ood_s, tpr=0.995)


def test_trapezoid_is_optimistic_on_a_tied_example():
    # The two estimators disagree on tied scores; the trapezoid interpolates optimistically.
    id_s, ood_s = [0.0, 1.0, 2.0], [1.0, 3.0]
    assert aupr_in(id_s, ood_s) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert aupr_in(id_s, ood_s, estimator="trapezoid") == pytest.approx(
        1 / 3 * 1 + 1 / 3 * (1 + 2 / 3) / 2 + 1 / 3 * (2 / 3 + 3 / 4) / 2
    )


# ------------------------------------------------------------------------------------------------
# Hand-worked FPR examples on tied scores
# ------------------------------------------------------------------------------------------------


def test_fpr_hand_worked_ties():
    id_s = [0.0, 1.0, 1.0, 1.0, 2.0]
    ood_s = [1.0, 1.0, 3.0, 3.0]
    # ID-TPR: accept s <= t. t=0 keeps 1/5 ID; t=1 keeps 4/5; t=2 keeps 5/5.
    assert fpr_at_tpr(id_s, ood_s, tpr=0.2) == 0.0  # t=0: no OOD <= 0
    assert fpr_at_tpr(id_s, ood_s, tpr=0.5) == 0.5  # t=1: the two OOD tied at 1 are accepted
    assert fpr_at_tpr(id_s, ood_s, tpr=0.8) == 0.5
    assert fpr_at_tpr(id_s, ood_s, tpr=0.95) == 0.5  # t=2
    # OOD-TPR: flag s >= t. t=3 catches 2/4 OOD; t=1 catches 4/4.
    assert fpr_at_ood_tpr(id_s, ood_s, tpr=0.5) == 0.0  # t=3 flags no ID
    assert fpr_at_ood_tpr(id_s, ood_s, tpr=0.51) == 0.8  # t=1 flags the 4 ID samples >= 1
    assert fpr_at_ood_tpr(id_s, ood_s, tpr=0.95) == 0.8


def test_fpr_conventions_differ_strongly():
    # OOD with a low tail: keeping 95 % of ID lets 10 % of OOD through, but catching 95 % of OOD
    # requires going below every ID score.
    id_s = [0.0] * 19 + [10.0]
    ood_s = [-1.0] * 2 + [5.0] * 18
    assert fpr_at_tpr(id_s, ood_s) == 0.1  # t=0 keeps 19/20 ID; OOD <= 0: the two at -1
    assert fpr_at_ood_tpr(id_s, ood_s) == 1.0  # t=-1 is needed to catch 20/20 >= 95 %; every ID flagged
    # ID with a high tail: the other way round.
    id_s = [0.0] * 18 + [10.0] * 2
    ood_s = [5.0] * 20
    assert fpr_at_tpr(id_s, ood_s) == 1.0  # keeping 95 % of ID needs t=10, which accepts all OOD
    assert fpr_at_ood_tpr(id_s, ood_s) == 0.1  # t=5 catches all OOD and flags the two ID at 10


def test_fpr_target_reached_exactly_counts():
    # 19/20 == 0.95 exactly in float64: the threshold stops there, not one step later.
    id_s = list(range(20))
    ood_s = [18.5, 30.0]
    assert fpr_at_tpr(id_s, ood_s, tpr=0.95) == 0.0  # t=18 keeps 19/20
    assert fpr_at_tpr(id_s, ood_s, tpr=0.951) == 0.5  # needs t=19, which accepts 18.5


def test_one_threshold_per_distinct_score_unlike_sklearn_default():
    # Each score value holds one ID and one OOD sample: the ROC curve is a straight, evenly spaced line.
    # sklearn's default drop_intermediate=True (used by OpenOOD) removes its inner points and lands on (1, 1).
    scores = np.arange(20.0)
    s, is_ood = _pooled(scores, scores)
    fpr, tpr, _ = roc_curve(is_ood, s)
    assert fpr[np.argmax(tpr >= 0.95)] == 1.0
    assert fpr_at_ood_tpr(scores, scores) == 0.95  # t=1 catches 19/20 OOD and flags 19/20 ID
    assert fpr_at_tpr(scores, scores) == 0.95


def _openood_v1_fpr_recall(id_s, ood_s, tpr=0.95):
    """Transcription of OpenOOD's fpr_recall before commit 873e8c2 (confidence = -score, higher = ID)."""
    ind_conf, ood_conf = -np.asarray(id_s), -np.asarray(ood_s)
    thresh = np.sort(ind_conf)[-int(np.floor(tpr * len(ind_conf)))]
    return np.sum(ood_conf > thresh) / len(ood_conf)


def test_id_tpr_convention_matches_openood_before_873e8c2_on_continuous_scores():
    rng = np.random.default_rng(4)
    for _ in range(30):
        id_s, ood_s = rng.normal(0, 1, 100), rng.normal(1, 1, int(rng.integers(1, 200)))
        assert fpr_at_tpr(id_s, ood_s) == _openood_v1_fpr_recall(id_s, ood_s)


def test_fpr_is_monotone_in_target():
    rng = np.random.default_rng(3)
    id_s, ood_s = rng.integers(0, 6, 50).astype(float), rng.integers(2, 9, 40).astype(float)
    targets = np.linspace(0.01, 1.0, 60)
    id_conv = [fpr_at_tpr(id_s, ood_s, t) for t in targets]
    ood_conv = [fpr_at_ood_tpr(id_s, ood_s, t) for t in targets]
    assert np.all(np.diff(id_conv) >= 0) and np.all(np.diff(ood_conv) >= 0)


# ------------------------------------------------------------------------------------------------
# Detection error
# ------------------------------------------------------------------------------------------------


def brute_force_threshold(id_s, tpr):
    """The documented rule read literally: the smallest ID score t with #{ID <= t} / n >= tpr (float division)."""
    scores = np.asarray(id_s, dtype=np.float64)
    return min(t for t in scores if np.count_nonzero(scores <= t) / scores.size >= tpr)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tpr", TARGETS + (0.7, 0.333, 0.999))
def test_threshold_at_tpr_matches_brute_force(seed, tpr):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    id_s = rng.integers(0, 5, n).astype(float) if seed % 2 else rng.normal(0, 1, n)  # tied and continuous scores
    assert threshold_at_tpr(id_s, tpr) == brute_force_threshold(id_s, tpr)


def test_threshold_at_tpr_is_the_inverted_cdf_quantile():
    # numpy's empirical-CDF inverse, wherever tpr * n is not within rounding of an integer
    rng = np.random.default_rng(11)
    for _ in range(200):
        n, tpr = int(rng.integers(1, 300)), float(rng.uniform(0.01, 1.0))
        if abs(tpr * n - round(tpr * n)) < 1e-6:
            continue
        id_s = rng.normal(0, 1, n) if n % 2 else rng.integers(0, 9, n).astype(float)
        assert threshold_at_tpr(id_s, tpr) == np.quantile(id_s, tpr, method="inverted_cdf")
    # where tpr * n rounds above an integer, the fraction k / n is compared (as fpr_at_tpr and sklearn do)
    assert 0.28 * 25 > 7 and np.quantile(np.arange(1.0, 26.0), 0.28, method="inverted_cdf") == 8.0
    assert threshold_at_tpr(np.arange(1.0, 26.0), 0.28) == 7.0


@pytest.mark.parametrize("seed", range(4))
def test_threshold_at_tpr_is_the_threshold_of_fpr_at_tpr(seed):
    rng = np.random.default_rng(seed)
    id_s, ood_s = rng.integers(0, 12, 80).astype(float), rng.integers(3, 15, 50).astype(float)
    for tpr in TARGETS:
        assert fpr_at_tpr(id_s, ood_s, tpr) == np.mean(ood_s <= threshold_at_tpr(id_s, tpr))
        assert np.mean(id_s <= threshold_at_tpr(id_s, tpr)) >= tpr


def test_threshold_at_tpr_bad_inputs():
    with pytest.raises(ValueError, match=r"tpr must be a fraction in \(0, 1\]"):
        threshold_at_tpr([1.0, 2.0], 0.0)
    with pytest.raises(ValueError, match="id_scores is empty"):
        threshold_at_tpr([], 0.9)
    with pytest.raises(ValueError, match="non-finite"):
        threshold_at_tpr([1.0, np.nan], 0.9)
    assert threshold_at_tpr(torch.tensor([3.0, 1.0, 2.0]), 1.0) == 3.0


def test_detection_error_hand_worked():
    # accept s <= t: t=0 -> 0.5*(1/2) + 0 = 0.25; t=1 -> 0.5*(1/4) + 0.5*(1/4) = 0.25; t=2 -> 0.5; t=3 -> 0.375
    assert detection_error([0.0, 0.0, 1.0, 3.0], [1.0, 2.0, 2.0, 4.0]) == 0.25
    assert detection_error([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert detection_error([2.0, 3.0], [0.0, 1.0]) == 0.5  # reversed scores: best is accept all / nothing
    assert detection_error([1.0], [1.0]) == 0.5


def test_detection_error_matches_brute_force():
    rng = np.random.default_rng(11)
    for _ in range(100):
        id_s, ood_s = _rng_case(rng, tied=bool(rng.integers(2)))
        assert detection_error(id_s, ood_s) == pytest.approx(detection_error_brute_force(id_s, ood_s), abs=1e-12)


# ------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------

score_lists = st.lists(st.integers(-30, 30), min_size=1, max_size=25)
# Strictly increasing on the integers in [-30, 30], and injective there in float64.
TRANSFORMS = [
    lambda x: 3.0 * x - 7.0,
    lambda x: x**3,
    lambda x: np.exp(x / 4.0),
    np.arctan,
    lambda x: np.sign(x) * np.log1p(np.abs(x)),
]


def _all_metrics(id_s, ood_s, tpr):
    return (
        auroc(id_s, ood_s),
        aupr_in(id_s, ood_s),
        aupr_out(id_s, ood_s),
        aupr_in(id_s, ood_s, "trapezoid"),
        aupr_out(id_s, ood_s, "trapezoid"),
        fpr_at_tpr(id_s, ood_s, tpr),
        fpr_at_ood_tpr(id_s, ood_s, tpr),
        detection_error(id_s, ood_s),
    )


@settings(max_examples=80, deadline=None)
@given(id_s=score_lists, ood_s=score_lists, tpr=st.sampled_from(TARGETS), which=st.integers(0, len(TRANSFORMS) - 1))
def test_invariant_to_strictly_increasing_transforms(id_s, ood_s, tpr, which):
    f = TRANSFORMS[which]
    id_a, ood_a = np.asarray(id_s, dtype=float), np.asarray(ood_s, dtype=float)
    assert _all_metrics(f(id_a), f(ood_a), tpr) == _all_metrics(id_a, ood_a, tpr)


@settings(max_examples=80, deadline=None)
@given(id_s=score_lists, ood_s=score_lists, tpr=st.sampled_from(TARGETS))
def test_swap_symmetries(id_s, ood_s, tpr):
    id_a, ood_a = np.asarray(id_s, dtype=float), np.asarray(ood_s, dtype=float)
    # Renaming the classes and negating the scores turns each metric into its mirror image:
    # "ID positive, score -s" on (id, ood) is "OOD positive, score s" on (-ood, -id).
    swapped_id, swapped_ood = -ood_a, -id_a
    assert auroc(id_a, ood_a) == pytest.approx(1.0 - auroc(ood_a, id_a), abs=1e-12)
    assert auroc(id_a, ood_a) == auroc(swapped_id, swapped_ood)
    for estimator in metrics.AUPR_ESTIMATORS:
        assert aupr_in(id_a, ood_a, estimator) == pytest.approx(aupr_out(swapped_id, swapped_ood, estimator), abs=1e-12)
        assert aupr_out(id_a, ood_a, estimator) == pytest.approx(aupr_in(swapped_id, swapped_ood, estimator), abs=1e-12)
    # The two FPR conventions are the same rule applied to the mirrored problem.
    assert fpr_at_tpr(id_a, ood_a, tpr) == fpr_at_ood_tpr(swapped_id, swapped_ood, tpr)
    assert fpr_at_ood_tpr(id_a, ood_a, tpr) == fpr_at_tpr(swapped_id, swapped_ood, tpr)
    assert detection_error(id_a, ood_a) == detection_error(swapped_id, swapped_ood)
    assert 0.0 <= detection_error(id_a, ood_a) <= 0.5


@settings(max_examples=60, deadline=None)
@given(id_s=score_lists, ood_s=score_lists)
def test_sample_order_does_not_matter(id_s, ood_s):
    assert _all_metrics(id_s, ood_s, 0.9) == _all_metrics(id_s[::-1], sorted(ood_s), 0.9)


# ------------------------------------------------------------------------------------------------
# Numerics and inputs
# ------------------------------------------------------------------------------------------------


def test_huge_scores_use_raw_values():
    # torchmetrics squashed scores outside [0, 1] through a sigmoid; they saturate and AUROC collapses to ~0.5.
    assert auroc([1e30, 2e30, 3e30], [4e30, 5e30]) == 1.0
    assert auroc([-1e30, 1e30], [-5e29, 2e30]) == 0.75
    assert auroc(torch.tensor([1e30, 2e30, 3e30]), torch.tensor([4e30, 5e30])) == 1.0  # float32 tensors
    rng = np.random.default_rng(0)
    id_s, ood_s = rng.normal(0, 1, 500) * 1e30, rng.normal(0.5, 1, 400) * 1e30
    ref = sklearn_reference(id_s, ood_s)
    assert auroc(id_s, ood_s) == pytest.approx(ref["auroc"], abs=1e-12)
    assert fpr_at_tpr(id_s, ood_s) == ref["fpr_at_tpr_0.95"]
    assert auroc(id_s, ood_s) == auroc(id_s / 1e30, ood_s / 1e30)


def test_accepts_numpy_torch_and_lists():
    rng = np.random.default_rng(1)
    id_s, ood_s = rng.normal(0, 1, 50).astype(np.float32), rng.normal(1, 1, 60).astype(np.float32)
    expected = evaluate(id_s, ood_s)
    assert evaluate(torch.from_numpy(id_s), torch.from_numpy(ood_s)) == expected
    assert evaluate(id_s.tolist(), ood_s.tolist()) == expected
    assert evaluate(torch.from_numpy(id_s).requires_grad_(), torch.from_numpy(ood_s)) == expected
    assert auroc(torch.tensor([0.0, 1.0], dtype=torch.bfloat16), [2]) == 1.0
    assert auroc(np.array([0, 1, 2]), np.array([2, 3])) == auroc([0.0, 1.0, 2.0], [2.0, 3.0])


@pytest.mark.parametrize(
    "id_s, ood_s, match",
    [
        ([], [1.0], "id_scores is empty"),
        ([1.0], np.array([]), "ood_scores is empty"),
        ([1.0, float("nan")], [1.0], "id_scores contains 1 non-finite value"),
        ([1.0], [1.0, float("inf"), -float("inf")], "ood_scores contains 2 non-finite value"),
        (np.zeros((2, 3)), [1.0], r"id_scores: expected a 1-D array.*\(2, 3\)"),
        ([1.0], np.float64(1.0), r"ood_scores: expected a 1-D array.*\(\)"),
        (["a", "b"], [1.0], "id_scores: expected real-valued scores"),
        ([True, False], [1.0], "id_scores: expected real-valued scores"),
        ([[1.0], [1.0, 2.0]], [1.0], "id_scores: could not be read"),
        (torch.tensor([True]), [1.0], "id_scores: expected real-valued scores"),
    ],
)
def test_bad_scores_are_refused(id_s, ood_s, match):
    for fn in (auroc, aupr_in, aupr_out, fpr_at_tpr, fpr_at_ood_tpr, detection_error, evaluate, bootstrap):
        with pytest.raises(ValueError, match=match):
            fn(id_s, ood_s)


@pytest.mark.parametrize("tpr", [0.0, -0.1, 1.5, 95, float("nan"), True, "0.95"])
def test_bad_tpr_is_refused(tpr):
    for fn in (fpr_at_tpr, fpr_at_ood_tpr, evaluate):
        with pytest.raises(ValueError, match=r"tpr must be a fraction in \(0, 1\]"):
            fn([0.0, 1.0], [2.0], tpr)


def test_bad_estimator_is_refused():
    with pytest.raises(ValueError, match="estimator must be one of"):
        aupr_in([0.0], [1.0], estimator="auc")
    with pytest.raises(ValueError, match="aupr_estimator must be one of"):
        evaluate([0.0], [1.0], aupr_estimator="trapz")


def test_a_million_scores_quickly():
    rng = np.random.default_rng(0)
    id_s, ood_s = rng.normal(0, 1, 1_000_000), rng.normal(1, 1, 1_000_000)
    start = time.perf_counter()
    result = evaluate(id_s, ood_s)
    elapsed = time.perf_counter() - start
    assert result["auroc"] == pytest.approx(0.7602, abs=2e-3)  # Phi(1 / sqrt(2))
    assert elapsed < 10.0, f"evaluate on 2e6 scores took {elapsed:.1f} s"


# ------------------------------------------------------------------------------------------------
# Bootstrap
# ------------------------------------------------------------------------------------------------


def test_bootstrap_is_seeded_and_reproducible():
    rng = np.random.default_rng(5)
    id_s, ood_s = rng.normal(0, 1, 300), rng.normal(1, 1, 200)
    first = bootstrap(id_s, ood_s, n_boot=200, seed=3)
    assert first == bootstrap(id_s, ood_s, n_boot=200, seed=3)
    assert first != bootstrap(id_s, ood_s, n_boot=200, seed=4)
    assert set(first) == set(metrics.BOOTSTRAP_METRICS)
    # Which metrics are asked for does not change the draws.
    assert bootstrap(id_s, ood_s, metrics=("fpr_at_tpr",), n_boot=200, seed=3)["fpr_at_tpr"] == first["fpr_at_tpr"]
    assert bootstrap(torch.from_numpy(id_s), ood_s.tolist(), n_boot=200, seed=3) == first


def test_bootstrap_intervals_contain_estimate_and_shrink_with_n():
    rng = np.random.default_rng(6)
    widths = {}
    for n in (200, 5000):
        id_s, ood_s = rng.normal(0, 1, n), rng.normal(1, 1, n)
        ci = bootstrap(id_s, ood_s, n_boot=300, seed=0, tpr=0.9, aupr_estimator="trapezoid")
        full = evaluate(id_s, ood_s, tpr=0.9, aupr_estimator="trapezoid")
        assert ci["auroc"][0] == full["auroc"]
        assert ci["fpr_at_tpr"][0] == full["fpr_at_90_id_tpr"]
        assert ci["aupr_out"][0] == full["aupr_out"]
        for name, (estimate, low, high) in ci.items():
            assert low <= estimate <= high, name
        widths[n] = {name: high - low for name, (_, low, high) in ci.items()}
    for name in metrics.BOOTSTRAP_METRICS:
        assert widths[5000][name] < 0.5 * widths[200][name], name


def test_bootstrap_confidence_widens_interval():
    rng = np.random.default_rng(8)
    id_s, ood_s = rng.normal(0, 1, 400), rng.normal(1, 1, 400)
    narrow = bootstrap(id_s, ood_s, metrics=("auroc",), n_boot=300, confidence=0.5)["auroc"]
    wide = bootstrap(id_s, ood_s, metrics=("auroc",), n_boot=300, confidence=0.99)["auroc"]
    assert wide[1] < narrow[1] < narrow[2] < wide[2]


def test_bootstrap_replicates_equal_metrics_of_explicit_resamples():
    # The bootstrap evaluates replicates from per-value counts of the full sample (groups a resample
    # misses have count 0). Check that path against the public functions on explicitly resampled scores.
    rng = np.random.default_rng(9)
    id_s, ood_s = rng.integers(0, 8, 40).astype(float), rng.normal(4, 3, 30).round(1)
    values, group = metrics._group_index(np.concatenate([id_s, ood_s]))
    n_rep = 25
    id_idx = rng.integers(0, id_s.size, size=(n_rep, id_s.size))
    ood_idx = rng.integers(0, ood_s.size, size=(n_rep, ood_s.size))
    id_counts = np.stack([np.bincount(group[:40][i], minlength=values.size) for i in id_idx])
    ood_counts = np.stack([np.bincount(group[40:][i], minlength=values.size) for i in ood_idx])
    for name in metrics.BOOTSTRAP_METRICS:
        for estimator in metrics.AUPR_ESTIMATORS:
            batched = metrics._metric_counts(name, id_counts, ood_counts, 0.9, estimator)
            fn = getattr(metrics, name)
            kwargs = {"tpr": 0.9} if name.startswith("fpr") else {"estimator": estimator} if "aupr" in name else {}
            direct = [fn(id_s[i], ood_s[o], **kwargs) for i, o in zip(id_idx, ood_idx, strict=True)]
            np.testing.assert_allclose(batched, direct, rtol=0, atol=1e-12, err_msg=name)


def test_bootstrap_is_fast_enough():
    rng = np.random.default_rng(10)
    id_s, ood_s = rng.normal(0, 1, 10_000), rng.normal(1, 1, 10_000)
    start = time.perf_counter()
    ci = bootstrap(id_s, ood_s, metrics=("auroc", "fpr_at_tpr"), n_boot=1000)
    elapsed = time.perf_counter() - start
    assert ci["auroc"][1] < ci["auroc"][0] < ci["auroc"][2]
    assert elapsed < 10.0, f"1000 replicates of 10k + 10k scores took {elapsed:.1f} s"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"metrics": ("auroc", "fpr95")}, "unknown metric"),
        ({"metrics": ()}, "metrics is empty"),
        ({"n_boot": 0}, "n_boot must be a positive integer"),
        ({"n_boot": 10.0}, "n_boot must be a positive integer"),
        ({"confidence": 1.0}, r"confidence must be in \(0, 1\)"),
        ({"confidence": 95}, r"confidence must be in \(0, 1\)"),
        ({"tpr": 0.0}, "tpr must be"),
        ({"aupr_estimator": "x"}, "aupr_estimator must be one of"),
    ],
)
def test_bootstrap_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap([0.0, 1.0], [2.0], **kwargs)


def test_bootstrap_accepts_single_metric_name():
    assert set(bootstrap([0.0, 1.0], [2.0, 0.5], metrics="auroc", n_boot=5)) == {"auroc"}


def test_percentile_interval_matches_numpy_percentile():
    rng = np.random.default_rng(12)
    values = rng.normal(0, 1, 537)
    for confidence in (0.5, 0.9, 0.95, 0.99):
        tail = 50.0 * (1.0 - confidence)
        expected = np.percentile(values, [tail, 100.0 - tail])
        np.testing.assert_allclose(percentile_interval(values, confidence), expected, rtol=0, atol=1e-12)
    # hand-worked: 0..100, the 25 % and 75 % quantiles
    assert percentile_interval(np.arange(101.0), 0.5) == (25.0, 75.0)
    assert percentile_interval([4.0], 0.95) == (4.0, 4.0)


def test_percentile_interval_bad_inputs():
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        percentile_interval([1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="replicates is empty"):
        percentile_interval([], 0.95)
    with pytest.raises(ValueError, match="replicates contains 1 non-finite"):
        percentile_interval([1.0, np.nan], 0.95)


def explicit_paired_resamples(n_id, ood_sizes, n_boot, seed):
    """The documented draws, replicate by replicate: ID indices, then each OOD set's."""
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, n_id, n_id), *(rng.integers(0, n, n) for n in ood_sizes)] for _ in range(n_boot)]


@pytest.mark.parametrize("tied", [False, True])
def test_paired_bootstrap_auroc_matches_sklearn_on_explicit_resamples(tied):
    rng = np.random.default_rng(13)
    n_id, sizes = 70, (40, 25)
    if tied:
        id_rows = rng.integers(0, 6, (3, n_id)).astype(float)
        ood_sets = [rng.integers(1, 7, (3, n)).astype(float) for n in sizes]
    else:
        id_rows = rng.normal(0, 1, (3, n_id))
        ood_sets = [rng.normal(1, 1, (3, n)) for n in sizes]
    result = paired_bootstrap(id_rows, ood_sets, n_boot=30, seed=4)
    assert result.shape == (31, 3, 2)
    resamples = [[np.arange(n_id), *(np.arange(n) for n in sizes)], *explicit_paired_resamples(n_id, sizes, 30, 4)]
    for r, (id_idx, *ood_idx) in enumerate(resamples):
        for d in range(3):
            for k, ood in enumerate(ood_sets):
                scores, is_ood = _pooled(id_rows[d][id_idx], ood[d][ood_idx[k]])
                assert result[r, d, k] == pytest.approx(roc_auc_score(is_ood, scores), abs=1e-12)


@pytest.mark.parametrize("name", metrics.BOOTSTRAP_METRICS)
def test_paired_bootstrap_of_every_metric_equals_the_metric_of_explicit_resamples(name):
    rng = np.random.default_rng(14)
    id_rows = np.stack([rng.integers(0, 8, 50), rng.normal(0, 2, 50).round(1)]).astype(float)
    ood = np.stack([rng.integers(2, 10, 35), rng.normal(2, 2, 35).round(1)]).astype(float)
    result = paired_bootstrap(id_rows, [ood], name, n_boot=20, seed=1, tpr=0.9, aupr_estimator="trapezoid")
    fn = getattr(metrics, name)
    kwargs = {"tpr": 0.9} if name.startswith("fpr") else {"estimator": "trapezoid"} if "aupr" in name else {}
    for r, (id_idx, ood_idx) in enumerate(explicit_paired_resamples(50, (35,), 20, seed=1), start=1):
        for d in range(2):
            assert result[r, d, 0] == pytest.approx(fn(id_rows[d][id_idx], ood[d][ood_idx], **kwargs), abs=1e-12)
    assert result[0, 1, 0] == pytest.approx(fn(id_rows[1], ood[1], **kwargs), abs=1e-12)


def test_paired_bootstrap_is_seeded_batched_and_accepts_lists_and_tensors(monkeypatch):
    rng = np.random.default_rng(15)
    id_rows, ood = rng.normal(0, 1, (2, 40)), rng.normal(1, 1, (2, 30))
    first = paired_bootstrap(id_rows, [ood], n_boot=50, seed=2)
    np.testing.assert_array_equal(first, paired_bootstrap(list(id_rows), [list(ood)], n_boot=50, seed=2))
    tensors = paired_bootstrap(torch.from_numpy(id_rows), [torch.from_numpy(ood)], n_boot=50, seed=2)
    np.testing.assert_array_equal(first, tensors)
    assert not np.array_equal(first, paired_bootstrap(id_rows, [ood], n_boot=50, seed=3))
    monkeypatch.setattr(metrics, "_BOOTSTRAP_BATCH_ELEMENTS", 150)  # two replicates per batch
    np.testing.assert_array_equal(first, paired_bootstrap(id_rows, [ood], n_boot=50, seed=2))


def test_paired_bootstrap_pairs_the_detectors():
    # A detector that adds a constant to every OOD score gains in every replicate: the paired difference is never
    # negative, though the replicates of the two detectors, taken apart, overlap widely.
    rng = np.random.default_rng(16)
    id_s, ood_s = rng.normal(0, 1, 200), rng.normal(0.5, 1, 150)
    result = paired_bootstrap([id_s, id_s], [[ood_s, ood_s + 0.1]], n_boot=200, seed=0)
    difference = result[1:, 1, 0] - result[1:, 0, 0]
    assert (difference >= 0).all() and difference.mean() > 0
    assert result[1:, 0, 0].max() > result[1:, 1, 0].min()


@pytest.mark.parametrize(
    "id_scores, ood_scores, kwargs, match",
    [
        (np.zeros(5), [np.zeros((1, 3))], {}, r"id_scores: expected one row of scores per detector"),
        ([np.zeros(5), np.zeros(4)], [np.zeros((2, 3))], {}, "different lengths"),
        (np.zeros((2, 5)), [np.zeros((3, 3))], {}, r"ood_scores\[0\] has 3 detectors' rows but id_scores has 2"),
        (np.zeros((2, 5)), [], {}, "ood_scores holds no OOD set"),
        (np.zeros((2, 5)), np.zeros((2, 3)), {}, r"ood_scores\[0\]: expected one row .*shape \(3,\)"),
        (np.zeros((0, 5)), [np.zeros((0, 3))], {}, "holds no detector"),
        ([[0.0, np.nan]], [np.zeros((1, 3))], {}, r"id_scores\[0\] contains 1 non-finite"),
        (np.zeros((1, 5)), [np.zeros((1, 3))], {"metric": "fpr95"}, "unknown metric"),
        (np.zeros((1, 5)), [np.zeros((1, 3))], {"n_boot": 0}, "n_boot must be a positive integer"),
        (np.zeros((1, 5)), [np.zeros((1, 3))], {"tpr": 2.0}, "tpr must be"),
        (np.zeros((1, 5)), "abc", {}, "expected a sequence of OOD sets"),
    ],
)
def test_paired_bootstrap_bad_inputs(id_scores, ood_scores, kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(id_scores, ood_scores, **kwargs)


# ------------------------------------------------------------------------------------------------
# Misclassification: AURC, E-AURC, error-detection AUROC
# ------------------------------------------------------------------------------------------------


def test_aurc_matches_transcription_without_ties():
    rng = np.random.default_rng(12)
    for _ in range(50):
        n = int(rng.integers(1, 60))
        scores, correct = rng.normal(size=n), rng.random(n) < 0.7
        assert aurc(scores, correct) == pytest.approx(aurc_transcribed(scores, correct), abs=1e-12)


def test_aurc_hand_worked():
    # Most confident first: correct, correct, wrong, correct -> risks 0, 0, 1/3, 1/4.
    assert aurc([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 1]) == pytest.approx((1 / 3 + 1 / 4) / 4)
    # A tie between the wrong and a correct sample: expected errors after 2 and 3 samples = 1/2 and 1.
    assert aurc([0.1, 0.5, 0.5], [True, False, True]) == pytest.approx((0 + 0.5 / 2 + 1 / 3) / 3)
    assert aurc([1.0, 2.0], [True, True]) == 0.0
    assert aurc([1.0, 2.0], [False, False]) == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_aurc_with_ties_is_the_average_over_tie_orders(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 7))
    scores, correct = rng.integers(0, 3, n).astype(float), rng.random(n) < 0.5
    assert aurc(scores, correct) == pytest.approx(aurc_over_tie_orders(scores, correct), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_eaurc_subtracts_the_brute_force_oracle(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 8))
    scores, correct = rng.normal(size=n), rng.random(n) < 0.6
    best = min(aurc_transcribed(np.arange(n, dtype=float), correct[list(p)]) for p in itertools.permutations(range(n)))
    assert eaurc(scores, correct) == pytest.approx(aurc(scores, correct) - best, abs=1e-12)
    assert eaurc(scores, correct) >= -1e-12
    # The oracle ranking itself (every error rejected first) has zero excess.
    assert eaurc(np.where(correct, 0.0, 1.0), correct) == pytest.approx(0.0, abs=1e-12)


def test_eaurc_oracle_approaches_the_continuous_closed_form():
    # Geifman et al. approximate the oracle AURC by r + (1 - r) ln(1 - r); the exact finite form converges to it.
    rng = np.random.default_rng(13)
    n = 100_000
    correct = rng.random(n) < 0.8
    r = 1 - correct.mean()
    scores = rng.normal(size=n)
    oracle = aurc(scores, correct) - eaurc(scores, correct)
    assert oracle == pytest.approx(r + (1 - r) * math.log(1 - r), abs=1e-3)
    assert eaurc([0.0, 1.0], [False, False]) == 0.0  # r = 1, where the closed form is undefined


def test_error_detection_auroc_matches_sklearn():
    rng = np.random.default_rng(14)
    for _ in range(30):
        n = int(rng.integers(2, 80))
        scores = rng.integers(0, 5, n).astype(float)
        correct = rng.random(n) < 0.6
        if correct.all() or not correct.any():
            continue
        assert error_detection_auroc(scores, correct) == pytest.approx(roc_auc_score(~correct, scores), abs=1e-12)


def test_misclassification_bad_inputs():
    with pytest.raises(ValueError, match="correct has 2 entries but scores has 3"):
        aurc([0.0, 1.0, 2.0], [True, False])
    with pytest.raises(ValueError, match="expected booleans or 0/1"):
        eaurc([0.0, 1.0], [0, 2])
    with pytest.raises(ValueError, match="every sample is correct"):
        error_detection_auroc([0.0, 1.0], [True, True])
    with pytest.raises(ValueError, match="every sample is wrong"):
        error_detection_auroc([0.0, 1.0], torch.tensor([False, False]))
    with pytest.raises(ValueError, match="scores contains 1 non-finite"):
        aurc([0.0, float("nan")], [True, False])


# ------------------------------------------------------------------------------------------------
# Out-of-model-scope (Guérin et al., AAAI 2023)
# ------------------------------------------------------------------------------------------------

OMS_ID_SCORES = [0.1, 0.2, 0.3, 0.6, 0.5, 0.9]
OMS_ID_LABELS = [0, 1, 2, 0, 1, 2]
OMS_ID_PREDICTIONS = [0, 1, 2, 0, 2, 1]  # the samples scored 0.5 and 0.9 are misclassified
OMS_OOD_SCORES = [0.25, 0.8]


def test_oms_novelty_hand_worked():
    r = evaluate_oms(OMS_ID_SCORES, OMS_OOD_SCORES, OMS_ID_LABELS, OMS_ID_PREDICTIONS)
    # Should reject: ID errors {0.5, 0.9} and every OOD sample {0.25, 0.8}; should accept {0.1, 0.2, 0.3, 0.6}.
    # Pairs (reject > accept): 0.25 > 2, 0.5 > 3, 0.8 > 4, 0.9 > 4 -> 13 of 16.
    assert r["oms_auroc"] == pytest.approx(13 / 16)
    # Decreasing score: 0.9 R, 0.8 R, 0.6 A, 0.5 R, 0.3 A, 0.25 R -> precisions 1, 1, 3/4, 4/6 at each R.
    assert r["oms_aupr"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 6) / 4)
    # Rejecting >= 95 % of the 4 needs t = 0.25, which also rejects 0.3 and 0.6: TNR = 2/4.
    assert r["oms_tnr_at_95_tpr"] == pytest.approx(0.5)
    # F1 = 2TP / (TP + FP + P) per threshold: 2/5, 4/6, 4/7, 6/8, 6/9, 8/10, 8/11, 8/12 -> best at t = 0.25.
    assert r["oms_f1"] == pytest.approx(0.8)
    assert r["oms_precision"] == pytest.approx(4 / 6)
    assert r["oms_recall"] == 1.0
    assert r["oms_f1_threshold"] == 0.25
    # The OOD setting, for contrast: ID {0.1, 0.2, 0.3, 0.6, 0.5, 0.9} versus OOD {0.25, 0.8} -> 7/12.
    assert r["ood_auroc"] == pytest.approx(7 / 12)
    assert {k[4:]: v for k, v in r.items() if k.startswith("ood_")} == evaluate(OMS_ID_SCORES, OMS_OOD_SCORES)


def test_oms_covariate_shift_hand_worked():
    r = evaluate_oms(OMS_ID_SCORES, OMS_OOD_SCORES, OMS_ID_LABELS, OMS_ID_PREDICTIONS, [0, 1], [0, 0], novelty=False)
    # Only the OOD sample scored 0.8 is misclassified: reject {0.5, 0.8, 0.9}, accept {0.1, 0.2, 0.25, 0.3, 0.6}.
    assert r["oms_auroc"] == pytest.approx(14 / 15)
    assert r["oms_aupr"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert r["oms_tnr_at_95_tpr"] == pytest.approx(4 / 5)  # t = 0.5 also rejects 0.6
    assert r["oms_f1"] == pytest.approx(6 / 7)
    assert (r["oms_precision"], r["oms_recall"], r["oms_f1_threshold"]) == (pytest.approx(3 / 4), 1.0, 0.5)


def _guerin_tnr(pos, neg, frac=0.95):
    """Transcription of the official Evaluator's OMS TNR: the threshold is a sorted positive score."""
    limit = np.sort(pos)[int((1 - frac) * len(pos))]
    return 1 - np.count_nonzero(neg >= limit) / len(neg)


def test_oms_matches_independent_references():
    rng = np.random.default_rng(15)
    for _ in range(40):
        n_id, n_ood = rng.integers(5, 60, size=2)
        id_s, ood_s = rng.normal(0, 1, n_id), rng.normal(1, 1, n_ood)
        id_y, id_p = rng.integers(0, 3, n_id), rng.integers(0, 3, n_id)
        ood_y, ood_p = rng.integers(0, 3, n_ood), rng.integers(0, 3, n_ood)
        for novelty in (True, False):
            reject = np.concatenate([id_y != id_p, np.ones(n_ood, bool) if novelty else ood_y != ood_p])
            if reject.all() or not reject.any():
                continue
            s = np.concatenate([id_s, ood_s])
            r = evaluate_oms(id_s, ood_s, id_y, id_p, ood_y, ood_p, novelty=novelty)
            assert r["oms_auroc"] == pytest.approx(roc_auc_score(reject, s), abs=1e-12)
            assert r["oms_aupr"] == pytest.approx(average_precision_score(reject, s), abs=1e-12)
            assert r["oms_tnr_at_95_tpr"] == pytest.approx(_guerin_tnr(s[reject], s[~reject]), abs=1e-12)
            f1s = [2 * np.sum(reject & (s >= t)) / (np.sum(s >= t) + np.sum(reject)) for t in np.unique(s)]
            assert r["oms_f1"] == pytest.approx(max(f1s), abs=1e-12)


def test_oms_accepts_tensors_and_other_tpr():
    r = evaluate_oms(
        torch.tensor(OMS_ID_SCORES),
        torch.tensor(OMS_OOD_SCORES),
        torch.tensor(OMS_ID_LABELS),
        torch.tensor(OMS_ID_PREDICTIONS),
        tpr=0.5,
        aupr_estimator="trapezoid",
    )
    assert "oms_tnr_at_50_tpr" in r and "ood_fpr_at_50_id_tpr" in r
    assert r["oms_tnr_at_50_tpr"] == 1.0  # t = 0.8 rejects 2 of the 4 and no should-accept sample


def test_oms_bad_inputs():
    args = (OMS_ID_SCORES, OMS_OOD_SCORES, OMS_ID_LABELS, OMS_ID_PREDICTIONS)
    with pytest.raises(ValueError, match="novelty=False .* needs ood_labels and ood_predictions"):
        evaluate_oms(*args, novelty=False)
    with pytest.raises(ValueError, match="id_predictions has 5 entries but id_scores has 6"):
        evaluate_oms(OMS_ID_SCORES, OMS_OOD_SCORES, OMS_ID_LABELS, OMS_ID_PREDICTIONS[:5])
    with pytest.raises(ValueError, match="ood_labels has 1 entries but ood_scores has 2"):
        evaluate_oms(*args, [0], [0, 1])
    with pytest.raises(ValueError, match="no sample should be rejected"):
        evaluate_oms(OMS_ID_SCORES, OMS_OOD_SCORES, OMS_ID_LABELS, OMS_ID_LABELS, [0, 1], [0, 1], novelty=False)
    with pytest.raises(ValueError, match="no sample should be accepted"):
        evaluate_oms([0.1], [0.2], [0], [1])
    with pytest.raises(ValueError, match="ood_scores contains 1 non-finite"):
        evaluate_oms(OMS_ID_SCORES, [0.2, float("nan")], OMS_ID_LABELS, OMS_ID_PREDICTIONS)


# ------------------------------------------------------------------------------------------------
# Documentation
# ------------------------------------------------------------------------------------------------


def test_docstring_examples_run():
    failures, attempted = doctest.testmod(metrics, optionflags=doctest.ELLIPSIS)
    assert attempted > 10
    assert failures == 0


def test_every_public_function_states_its_convention():
    for name in metrics.__all__:
        obj = getattr(metrics, name)
        if callable(obj):
            assert obj.__doc__ and "Examples" in obj.__doc__, name


# ---------------------------------------------------------------------------------------------- calibration
def test_expected_calibration_error_by_hand():
    # 15 bins of width 1/15: 0.95 and 0.97 share the bin (14/15, 1] (accuracy 1/2, mean confidence 0.96);
    # 0.5 lies in (7/15, 8/15] alone (accuracy 1); 0.2 in (3/15, 4/15] alone (accuracy 0).
    confidence = [0.95, 0.97, 0.5, 0.2]
    correct = [True, False, True, False]
    expected = (2 * abs(0.5 - 0.96) + abs(1 - 0.5) + abs(0 - 0.2)) / 4
    assert metrics.expected_calibration_error(confidence, correct) == pytest.approx(expected, abs=1e-15)
    assert metrics.expected_calibration_error([1.0, 1.0], [True, True]) == 0.0  # perfectly confident and right
    assert metrics.expected_calibration_error([0.0], [False]) == 0.0  # confidence 0 falls in the first bin


def test_expected_calibration_error_matches_a_loop_over_bins():
    """Against the reference formulation (Guo et al.'s code: lower < confidence <= upper per bin, in a loop)."""
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.1, 1.0, size=5000)
    correct = rng.random(5000) < confidence**2
    edges = np.linspace(0, 1, 16)
    reference = 0.0
    for lower, upper in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lower) & (confidence <= upper)
        if inside.any():
            reference += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    assert metrics.expected_calibration_error(confidence, correct) == pytest.approx(reference, abs=1e-12)


@pytest.mark.parametrize(
    ("confidence", "correct", "n_bins", "message"),
    [
        ([1.5], [True], 15, "probabilities in"),
        ([0.5], [True, False], 15, "entries"),
        ([np.nan], [True], 15, "non-finite"),
        ([0.5], [True], 0, "n_bins"),
        ([], [], 15, "empty"),
    ],
)
def test_expected_calibration_error_refuses_bad_input(confidence, correct, n_bins, message):
    with pytest.raises(ValueError, match=message):
        metrics.expected_calibration_error(confidence, correct, n_bins=n_bins)
