"""Pictures of scores with matplotlib (the ``bench`` extra): ROC curves, score histograms and OCS curves.

matplotlib is imported when a function is called, so ``import oodguard`` never needs it. Every function draws on
the given ``ax`` (or a new figure) and returns the Axes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from oodguard.metrics import auroc, roc_curve

__all__ = ["ocs_curves", "roc_curves", "score_histograms", "robust_range"]


def _axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(f"oodguard.plot needs matplotlib ({error}); pip install 'oodguard[bench]'") from error
    return plt.subplots(figsize=(6, 4))[1]


def roc_curves(
    id_scores: np.ndarray | Mapping[str, Any], ood_scores: Any, *, ax: Any = None, title: str | None = None
) -> Any:
    """ROC curves (OOD = positive) of one detector on several OOD sets, or of several detectors on one.

    ``roc_curves(id, {"near": near, "far": far})``: one detector, a curve per OOD set.
    ``roc_curves({"knn": id_knn, "msp": id_msp}, {"knn": ood_knn, "msp": ood_msp})``: a curve per detector.
    The legend gives each curve's AUROC; the curves are :func:`oodguard.metrics.roc_curve`.
    """
    ax = _axes(ax)
    if isinstance(id_scores, Mapping):
        pairs = [(name, id_scores[name], ood_scores[name]) for name in id_scores]
    elif isinstance(ood_scores, Mapping):
        pairs = [(name, id_scores, scores) for name, scores in ood_scores.items()]
    else:
        pairs = [("OOD", id_scores, ood_scores)]
    for name, inside, outside in pairs:
        fpr, tpr, _ = roc_curve(inside, outside)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(inside, outside):.3f})", drawstyle="steps-post")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
    ax.set_xlabel("false-positive rate (ID flagged)")
    ax.set_ylabel("true-positive rate (OOD flagged)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize="small")
    if title:
        ax.set_title(title)
    return ax


def robust_range(values: list[np.ndarray], clip: tuple[float, float] = (0.005, 0.995)) -> tuple[float, float]:
    """The range holding the pooled scores between the ``clip`` quantiles (a heavy tail cannot squash the rest)."""
    pooled = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values])
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        raise ValueError("no finite score to plot")
    low, high = np.quantile(pooled, clip)
    if high <= low:
        low, high = float(pooled.min()), float(pooled.max())
        if high <= low:
            low, high = low - 0.5, high + 0.5
    return float(low), float(high)


def score_histograms(
    id_scores: Any,
    ood_scores: Mapping[str, Any],
    *,
    ax: Any = None,
    bins: int = 50,
    clip: tuple[float, float] = (0.005, 0.995),
    title: str | None = None,
) -> Any:
    """Histograms of the ID scores and of each OOD set on one robust common range.

    Bins span the ``clip`` quantiles of all scores pooled; scores outside fall into the first or last bin, and the
    legend says how many each set had there, so one heavy-tailed set cannot flatten the others into one bar.
    Densities, so sets of different sizes compare. Returns the Axes; ``ax.oodguard_clipped`` maps each set to its
    number of clipped scores.
    """
    ax = _axes(ax)
    named = [("ID", np.asarray(id_scores, dtype=np.float64))]
    named += [(name, np.asarray(scores, dtype=np.float64)) for name, scores in ood_scores.items()]
    low, high = robust_range([scores for _, scores in named], clip)
    edges = np.linspace(low, high, bins + 1)
    clipped = {}
    for name, scores in named:
        outside = int(((scores < low) | (scores > high)).sum())
        clipped[name] = outside
        label = name if not outside else f"{name} ({outside} beyond the range, in the end bins)"
        ax.hist(np.clip(scores, low, high), bins=edges, density=True, histtype="stepfilled", alpha=0.45, label=label)
    ax.set_xlabel("OOD score (higher = more OOD)")
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    ax.oodguard_clipped = clipped
    return ax


def ocs_curves(curve: Any, *, ax: Any = None, title: str | None = None) -> Any:
    """The distance of the predictions to the optimal constant solution against corruption severity.

    ``curve`` is an :class:`oodguard.diagnostics.OCSCurve`: a line per corruption and their mean (black). A falling
    line means the predictions approach the OCS as the shift grows (Kang et al., ICLR 2024).
    """
    ax = _axes(ax)
    severities = np.asarray(curve.severities)
    for name, row in zip(curve.corruptions, curve.distance, strict=True):
        ax.plot(severities, row, marker="o", alpha=0.75, label=name)
    ax.plot(severities, curve.mean_distance, color="black", linewidth=2, label="mean")
    ax.set_xticks(severities)
    ax.set_xlabel("corruption severity (0 = clean)")
    ax.set_ylabel("mean KL(prediction || OCS)")
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return ax
