"""A learned failure monitor: the probability that the guarded system fails on an input, learned from logged outcomes.

The OOD score says how unlike the training data an input is; it does not say whether the system built on the
model will fail on it. Chakraborty, Gupta and Bansal, "Enhancing Safety and Robustness of Vision-Based Controllers
via Reachability Analysis" (arXiv:2410.21736, 2024; earlier Gupta, Chakraborty and Bansal, arXiv:2309.13475, code at
github.com/sia-lab-git/visual_failure_mitigation) label the inputs on which the closed-loop system failed and train a
binary classifier on them as a run-time failure monitor, which then triggers a fallback. They report that this
monitor finds system-level failures that thresholding the controller's prediction error or its uncertainty misses:
what fails is learned from failures, not assumed from uncertainty.

:class:`FailureMonitor` does that for a guard from outcomes logged in production (``failed``: one boolean per input).

What it sees, and why (a deviation from the paper)
--------------------------------------------------
The paper's monitor is an image network (EfficientNet-B0) trained on raw camera images, with hundreds of thousands
of labelled images mined by reachability analysis. A guard has the model's outputs and a few tens to hundreds of
logged failures, so the monitor here is an L2-regularised logistic regression on four summaries of each input:

* ``ood_score`` -- the guard's OOD score (higher = more OOD);
* ``max_probability`` -- the largest softmax probability;
* ``margin`` -- largest minus second-largest softmax probability;
* ``entropy`` -- the softmax entropy (nats).

The three softmax summaries are the model's own uncertainty (the paper's baselines); the OOD score is the guard's
view of novelty; the classifier learns, from the failures, how much each matters. Four standardised inputs give
five coefficients: they can be fitted from few failures without over-fitting, in milliseconds, deterministically,
and are readable. Logistic regression minimises the log loss, a proper scoring rule, so its probabilities are
calibrated where the model is well specified; with an unpenalised intercept the mean fitted probability equals the
fit data's failure rate exactly. Raw logits or features (hundreds of dimensions) are not used: with tens of failures
they would be memorised. When the outputs hold no logits (features without the final layer) the monitor uses the
OOD score alone and says so with a warning.

The decision ``failure_flag`` is ``probability >= threshold_``, with ``threshold_`` the largest probability that
still flags at least ``recall`` (default 95%) of the fit failures: a fallback is triggered for most failures, as in
the paper, at the cost of the false flags reported in ``fit_flag_rate_``. It is chosen on the fit data, so it is
optimistic; check it on held-out outcomes.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodguard import persist
from oodguard.logistic import fit_logistic
from oodguard.metrics import auroc

__all__ = ["FEATURES", "FailureMonitor", "summary_features", "fit_logistic"]

#: The summaries the monitor can learn from, in the order of its coefficients.
FEATURES = ("ood_score", "max_probability", "margin", "entropy")
_KIND = "failure_monitor"
_VERSION = 1


def summary_features(scores: np.ndarray, logits: torch.Tensor | np.ndarray | None) -> np.ndarray:
    """The monitor's inputs ``[N, F]`` (float64): the OOD score, then, when logits are given, the largest softmax
    probability, the top-two margin and the softmax entropy (columns in the order of :data:`FEATURES`)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    if logits is None:
        return scores
    logits = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    if logits.ndim != 2 or logits.shape[0] != scores.shape[0]:
        raise ValueError(f"logits: expected [{scores.shape[0]}, C], got {list(logits.shape)}")
    log_p = torch.log_softmax(logits, dim=1)
    p = log_p.exp()
    top = p.topk(min(2, p.shape[1]), dim=1).values
    second = top[:, 1] if top.shape[1] == 2 else torch.zeros_like(top[:, 0])
    entropy = -(p * log_p).nan_to_num(0.0).sum(dim=1)  # 0 * log 0 = 0 for classes of probability 0
    summaries = torch.stack([top[:, 0], top[:, 0] - second, entropy], dim=1).numpy()
    return np.concatenate([scores, summaries], axis=1)


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


def _as_failed(failed: Any, n: int) -> np.ndarray:
    """``failed`` as a boolean array ``[n]``: booleans or 0/1 numbers, one per row, no NaN."""
    try:
        array = np.asarray(failed.detach().cpu() if isinstance(failed, torch.Tensor) else failed)
    except ValueError as error:
        raise ValueError(f"failed: expected one boolean per row ({error})") from error
    if array.ndim != 1:
        raise ValueError(f"failed: expected a 1-D array of booleans, one per row, got shape {list(array.shape)}")
    if array.shape[0] != n:
        raise ValueError(f"failed: {array.shape[0]} outcomes for {n} rows; give exactly one outcome per row")
    if array.dtype == bool:
        return array
    if array.dtype.kind not in "iuf":
        raise ValueError(f"failed: expected booleans (or 0/1), got dtype {array.dtype}")
    if array.dtype.kind == "f" and np.isnan(array).any():
        first = int(np.flatnonzero(np.isnan(array))[0])
        raise ValueError(f"failed: row {first} is NaN; drop the rows whose outcome is unknown")
    if not np.isin(array, (0, 1)).all():
        bad = array[~np.isin(array, (0, 1))][0]
        raise ValueError(f"failed: expected booleans or 0/1, found {bad!r}")
    return array.astype(bool)


class FailureMonitor:
    """Logistic regression of logged failures on the OOD score and the model's softmax summaries.

    Parameters
    ----------
    c : float, default 1.0
        Inverse strength of the L2 penalty on the standardised coefficients (scikit-learn's ``C``); the intercept
        is not penalised. The penalty keeps the fit finite when failures are perfectly separable.
    recall : float in (0, 1], default 0.95
        ``threshold_`` is the largest probability that flags at least this fraction of the fit failures.
    min_per_class : int, default 10
        Fewest failures, and fewest successes, to fit from.

    Attributes
    ----------
    features_ : tuple of str
        The summaries used (:data:`FEATURES`, or ``("ood_score",)`` when fitted without logits).
    mean_, scale_ : float64 ``[F]``
        Standardisation of the summaries (fit mean and standard deviation; 1 for a constant summary).
    coef_ : float64 ``[F]``, intercept_ : float
        The coefficients on the standardised summaries.
    threshold_ : float
        ``failure_flag = probability >= threshold_``.
    n_fit_, n_failures_ : int
    fit_recall_, fit_flag_rate_, fit_auroc_ : float
        On the fit data: fraction of failures flagged, fraction of all rows flagged, AUROC of the probability for
        failure versus success.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> scores = rng.normal(size=400)
    >>> failed = rng.random(400) < 1 / (1 + np.exp(-3 * scores))
    >>> monitor = FailureMonitor().fit(scores, None, failed)
    >>> monitor.features_, bool(monitor.fit_auroc_ > 0.8)
    (('ood_score',), True)
    >>> p = monitor.predict_proba(np.array([-3.0, 3.0]), None)
    >>> bool(p[0] < 0.05 and p[1] > 0.95)
    True
    """

    def __init__(self, c: float = 1.0, recall: float = 0.95, min_per_class: int = 10) -> None:
        self.c = _check_positive(c, "c")
        if isinstance(recall, bool) or not isinstance(recall, (int, float)) or not 0 < recall <= 1:
            raise ValueError(f"recall: expected a fraction in (0, 1], got {recall!r}")
        self.recall = float(recall)
        if isinstance(min_per_class, bool) or not isinstance(min_per_class, int) or min_per_class < 1:
            raise ValueError(f"min_per_class: expected a positive integer, got {min_per_class!r}")
        self.min_per_class = min_per_class
        self.features_: tuple[str, ...] = ()
        self.mean_ = self.scale_ = self.coef_ = np.empty(0)
        self.intercept_ = self.threshold_ = math.nan
        self.n_fit_ = self.n_failures_ = 0
        self.fit_recall_ = self.fit_flag_rate_ = self.fit_auroc_ = math.nan

    @property
    def is_fitted(self) -> bool:
        return bool(self.features_)

    # ------------------------------------------------------------------ fitting
    def fit(self, scores: np.ndarray, logits: torch.Tensor | np.ndarray | None, failed: Any) -> FailureMonitor:
        """Fit on OOD scores ``[N]``, logits ``[N, C]`` (or None) and outcomes ``failed [N]``; returns ``self``."""
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        outcome = _as_failed(failed, scores.shape[0])
        if logits is None:
            warnings.warn(
                "fit_failure_monitor: the outputs hold no logits (nor features with the final layer), so the failure "
                "monitor learns from the OOD score alone; give logits to use the model's softmax summaries too",
                stacklevel=3,
            )
        x = summary_features(scores, logits)
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise ValueError(
                f"fit_failure_monitor: row {int(np.flatnonzero(bad)[0])} has a non-finite OOD score or softmax summary "
                f"({int(bad.sum())} such rows); fit on inputs the guard scores (inside the range it was fitted on)"
            )
        n_failures = int(outcome.sum())
        n_successes = outcome.shape[0] - n_failures
        if n_failures == 0 or n_successes == 0:
            only = "failures" if n_successes == 0 else "successes"
            raise ValueError(
                f"failed: all {outcome.shape[0]} outcomes are {only}; the monitor learns to tell failures from "
                "successes, so it needs both"
            )
        if min(n_failures, n_successes) < self.min_per_class:
            raise ValueError(
                f"failed: {n_failures} failures and {n_successes} successes; the monitor needs at least "
                f"{self.min_per_class} of each to learn from. Log more outcomes (or lower min_per_class)"
            )
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale = np.where(scale > 1e-12 * np.maximum(1.0, np.abs(mean)), scale, 1.0)  # a constant summary stays 0
        coef, intercept, _ = fit_logistic((x - mean) / scale, outcome.astype(np.float64), self.c)
        self.features_ = FEATURES[: x.shape[1]]
        self.mean_, self.scale_, self.coef_, self.intercept_ = mean, scale, coef, intercept
        probability = self._probability(x)
        failures = np.sort(probability[outcome])[::-1]
        self.threshold_ = float(failures[math.ceil(self.recall * n_failures) - 1])
        flagged = probability >= self.threshold_
        self.n_fit_, self.n_failures_ = int(outcome.shape[0]), n_failures
        self.fit_recall_ = float(flagged[outcome].mean())
        self.fit_flag_rate_ = float(flagged.mean())
        self.fit_auroc_ = auroc(probability[~outcome], probability[outcome])
        return self

    # ------------------------------------------------------------------ predicting
    def _probability(self, x: np.ndarray) -> np.ndarray:
        z = ((x - self.mean_) / self.scale_) @ self.coef_ + self.intercept_
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function, without overflow for large |z|

    def predict_proba(self, scores: np.ndarray, logits: torch.Tensor | np.ndarray | None) -> np.ndarray:
        """Failure probability ``[N]`` (float64) per row; NaN for a row whose OOD score is not finite (an input the
        guard decided OOD without scoring), which :meth:`flag` flags."""
        if not self.is_fitted:
            raise RuntimeError("FailureMonitor: call fit(...) before predict_proba(...)")
        if logits is None and len(self.features_) > 1:
            raise ValueError(
                "the failure monitor was fitted on the model's softmax summaries and needs logits (or features with "
                "the final layer); these outputs hold neither"
            )
        x = summary_features(scores, logits if len(self.features_) > 1 else None)
        probability = self._probability(np.where(np.isfinite(x), x, 0.0))
        probability[~np.isfinite(x).all(axis=1)] = np.nan
        return probability

    def flag(self, probability: np.ndarray) -> np.ndarray:
        """``probability >= threshold_``; a NaN probability (not scored) is flagged: nothing vouches for it."""
        probability = np.asarray(probability, dtype=np.float64)
        return np.isnan(probability) | (probability >= self.threshold_)

    # ------------------------------------------------------------------ saving
    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted state to one safetensors file (oodguard's file format, with its digest)."""
        if not self.is_fitted:
            raise RuntimeError("FailureMonitor: call fit(...) before save(...)")
        tensors = {
            "mean": torch.from_numpy(self.mean_.copy()),
            "scale": torch.from_numpy(self.scale_.copy()),
            "coef": torch.from_numpy(self.coef_.copy()),
            "intercept": torch.tensor([self.intercept_], dtype=torch.float64),
            "threshold": torch.tensor([self.threshold_], dtype=torch.float64),
        }
        header = {
            "features": list(self.features_),
            "params": {"c": self.c, "recall": self.recall, "min_per_class": self.min_per_class},
            "fit": {
                "n": self.n_fit_,
                "n_failures": self.n_failures_,
                "recall": self.fit_recall_,
                "flag_rate": self.fit_flag_rate_,
                "auroc": self.fit_auroc_,
            },
        }
        return persist.save(path, tensors, kind=_KIND, version=_VERSION, header=header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FailureMonitor:
        """Read a monitor written by :meth:`save`; a damaged or inconsistent file is a ValueError."""
        tensors, header = persist.load(path, kind=_KIND, versions=_VERSION)
        try:
            params, fit, features = header["params"], header["fit"], tuple(header["features"])
            monitor = cls(params["c"], params["recall"], params["min_per_class"])
            n = len(features)
            if features != FEATURES[:n] or n == 0:
                raise ValueError(f"unknown features {list(features)}")
            shapes = {"mean": [n], "scale": [n], "coef": [n], "intercept": [1], "threshold": [1]}
            for name, shape in shapes.items():
                tensor = tensors.get(name)
                if tensor is None or list(tensor.shape) != shape or not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"tensor {name!r} is missing, not of shape {shape} or not finite")
            if not bool((tensors["scale"] > 0).all()):
                raise ValueError("tensor 'scale' is not positive")
            monitor.features_ = features
            monitor.mean_, monitor.scale_, monitor.coef_ = (
                tensors[name].to(torch.float64).numpy() for name in ("mean", "scale", "coef")
            )
            monitor.intercept_ = float(tensors["intercept"][0])
            monitor.threshold_ = float(tensors["threshold"][0])
            monitor.n_fit_, monitor.n_failures_ = int(fit["n"]), int(fit["n_failures"])
            monitor.fit_recall_, monitor.fit_flag_rate_ = float(fit["recall"]), float(fit["flag_rate"])
            monitor.fit_auroc_ = float(fit["auroc"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a valid failure monitor ({error}); save it again") from error
        return monitor

    def __repr__(self) -> str:
        if not self.is_fitted:
            return f"FailureMonitor(c={self.c}, recall={self.recall}, fitted=False)"
        return (
            f"FailureMonitor(features={list(self.features_)}, threshold={self.threshold_:.4g}, n_fit={self.n_fit_}, "
            f"n_failures={self.n_failures_}, fit_auroc={self.fit_auroc_:.4f})"
        )
