"""Views of a benchmark run besides OOD-vs-ID: misclassified ID inputs, and truly ambiguous inputs against OOD.

A detector guards a model well when it flags what the model gets wrong, not only what lies outside its classes.
Two questions the leaderboard's OOD columns do not answer:

* **misclassified AUROC**: does the score rank the ID test inputs the model misclassifies above those it gets right
  (:func:`oodguard.metrics.error_detection_auroc`)?
* **OOD vs ambiguous AUROC**: does the score put the semantic OOD sets (near and far groups) above the truly
  ambiguous inputs (the ``ambiguous`` group: inputs between two ID classes)? The mean over those OOD sets of the
  AUROC with the OOD set as positives and the ambiguous inputs as negatives: about 0.5 when the detector cannot
  tell ambiguity from novelty, near 1 when it ranks novelty above ambiguity, below 0.5 when it flags ambiguity
  more. Read it beside the ambiguous group's own AUROC (ambiguous vs ID): a detector that flags both highly but
  ranks them apart lets a deployment treat the two differently (abstain on ambiguity, alarm on novelty).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from oodguard import metrics

__all__ = ["side_views", "VIEW_COLUMNS"]

VIEW_COLUMNS = ("misclassified AUROC", "ambiguous AUROC", "OOD vs ambiguous AUROC")
SEMANTIC_GROUPS = ("near", "far")


def side_views(
    scores: Mapping[str, Mapping[str, np.ndarray]],
    groups: Mapping[str, list[str]],
    correct: np.ndarray | None,
) -> pd.DataFrame:
    """One row per detector with the columns of ``VIEW_COLUMNS`` that the run can fill (NaN where it cannot).

    ``scores[detector]`` maps ``"id"`` and each OOD set to per-sample scores; ``correct`` marks the ID test inputs
    the model classifies correctly (None without labels or logits). Empty when no column applies.
    """
    ambiguous = list(groups.get("ambiguous", []))
    semantic = [name for group in SEMANTIC_GROUPS for name in groups.get(group, [])]
    has_errors = correct is not None and 0 < int(correct.sum()) < len(correct)
    correct = correct if has_errors else None
    if not (has_errors or ambiguous):
        return pd.DataFrame(columns=["detector", *VIEW_COLUMNS])
    rows = []
    for detector, per_set in scores.items():
        row: dict[str, object] = {"detector": detector}
        row["misclassified AUROC"] = (
            metrics.error_detection_auroc(per_set["id"], correct) if correct is not None else np.nan
        )
        if ambiguous:
            mixed = np.concatenate([np.asarray(per_set[name], dtype=np.float64) for name in ambiguous])
            row["ambiguous AUROC"] = metrics.auroc(per_set["id"], mixed)
            row["OOD vs ambiguous AUROC"] = (
                float(np.mean([metrics.auroc(mixed, per_set[name]) for name in semantic])) if semantic else np.nan
            )
        else:
            row["ambiguous AUROC"] = row["OOD vs ambiguous AUROC"] = np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["detector", *VIEW_COLUMNS])
