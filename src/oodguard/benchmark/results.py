"""The results of a benchmark run: per-set metrics with bootstrap intervals, per-detector status, the raw scores; the
leaderboard, and CSV/JSON/Markdown/HTML output."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oodguard import persist

#: Metrics reported per detector and OOD set, each with a bootstrap interval.
REPORTED = {
    "auroc": "auroc",
    "fpr95": "fpr_at_tpr",  # ID-TPR convention: OOD accepted when 95 % of ID is kept
    "aupr_in": "aupr_in",
    "aupr_out": "aupr_out",
}


@dataclass
class Results:
    """What a benchmark run produced: per-set metrics, per-detector status, and the raw scores."""

    benchmark: str
    table: pd.DataFrame
    status: pd.DataFrame
    scores: dict[str, dict[str, np.ndarray]]
    groups: dict[str, list[str]]
    id_accuracy: float
    full_spectrum: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    #: Detectors not run, with why (missing fields or parameters, no model); failed ones are in ``status``.
    skipped: dict[str, str] = field(default_factory=dict)
    #: Per detector, the views besides OOD vs ID (``oodguard.benchmark.side_views``): misclassified ID inputs,
    #: ambiguous inputs vs ID and vs OOD. Empty when the run has neither labels with errors nor ambiguous sets.
    views: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["detector"]))
    #: Measurements of the model rather than of detectors, e.g. ``"ocs_curve"``: the mean distance of its predictions
    #: to the optimal constant solution by corruption severity (:func:`oodguard.diagnostics.ocs_curve`).
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def leaderboard(self) -> pd.DataFrame:
        """One row per detector: mean AUROC and FPR@95 per group (unweighted over sets), sorted best first.

        Sorted by the mean AUROC over the semantic groups (near, far) when present, else over all groups.
        Failed detectors come last with their error.
        """
        rows = []
        for detector, status in self.status.set_index("detector").iterrows():
            row: dict[str, Any] = {"detector": detector}
            subset = self.table[self.table["detector"] == detector]
            for group in self.groups:
                in_group = subset[subset["group"] == group]
                row[f"{group} AUROC"] = in_group["auroc"].mean() if len(in_group) else np.nan
                row[f"{group} FPR@95"] = in_group["fpr95"].mean() if len(in_group) else np.nan
            row["status"] = status["status"]
            row["error"] = status["error"]
            rows.append(row)
        board = pd.DataFrame(rows)
        semantic = [f"{g} AUROC" for g in ("near", "far") if g in self.groups] or [f"{g} AUROC" for g in self.groups]
        board["_rank"] = board[semantic].mean(axis=1)
        board.loc[board["status"] != "ok", "_rank"] = -np.inf
        board = board.sort_values("_rank", ascending=False, kind="stable").drop(columns="_rank")
        return board.reset_index(drop=True)

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write CSV, JSON, Markdown and the HTML report; return their paths."""
        from oodguard.benchmark.report import write_report

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {
            "csv": directory / "results.csv",
            "json": directory / "results.json",
            "markdown": directory / "leaderboard.md",
            "html": directory / "report.html",
        }
        persist.write_bytes_atomic(paths["csv"], self.table.to_csv(index=False).encode())
        payload = {
            "benchmark": self.benchmark,
            "id_accuracy": self.id_accuracy,
            "full_spectrum": self.full_spectrum,
            "settings": self.settings,
            "groups": self.groups,
            "status": self.status.to_dict(orient="records"),
            "skipped": self.skipped,
            "views": self.views.to_dict(orient="records"),
            "diagnostics": self.diagnostics,
            "results": self.table.to_dict(orient="records"),
            "leaderboard": self.leaderboard().to_dict(orient="records"),
        }
        persist.write_bytes_atomic(paths["json"], json.dumps(payload, indent=2, default=_json_default).encode())
        persist.write_bytes_atomic(paths["markdown"], self.to_markdown().encode())
        write_report(self, paths["html"])
        return paths

    def report(self, path: str | Path) -> Path:
        """Write the self-contained HTML report to ``path``; return it."""
        from oodguard.benchmark.report import write_report

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_report(self, path)
        return path

    def to_markdown(self) -> str:
        """The leaderboard as a Markdown table (AUROC and FPR@95 in percent), then the side views' table."""
        board = self.leaderboard()
        # the ambiguous group is not OOD: it goes to the side views' table instead
        columns = [c for c in board.columns if (c.endswith("AUROC") or c.endswith("FPR@95"))
                   and not c.startswith("ambiguous ")]  # fmt: skip
        lines = [
            f"Benchmark `{self.benchmark}`; ID accuracy {100 * self.id_accuracy:.2f} %; "
            f"{'full-spectrum (covariate sets count as ID)' if self.full_spectrum else 'standard'} protocol. "
            "AUROC higher is better; FPR@95 = % of OOD accepted when 95 % of ID is kept (lower is better); "
            "group means are unweighted over the group's OOD sets.",
            "",
            "| rank | detector | " + " | ".join(columns) + " |",
            "|---:|---|" + "---:|" * len(columns),
        ]
        for rank, values in enumerate(board.to_dict(orient="records"), start=1):
            if values["status"] != "ok":
                lines.append(f"| - | {values['detector']} | failed: {_one_line(values['error'])} |")
                continue
            cells = " | ".join("" if pd.isna(values[c]) else f"{100 * values[c]:.2f}" for c in columns)
            lines.append(f"| {rank} | {values['detector']} | {cells} |")
        lines += self._views_markdown(board)
        if self.skipped:
            listed = "; ".join(f"`{name}` ({reason})" for name, reason in sorted(self.skipped.items()))
            lines += ["", f"Not run ({len(self.skipped)}): {listed}."]
        return "\n".join(lines) + "\n"

    def _views_markdown(self, board: pd.DataFrame) -> list[str]:
        """The side views (``oodguard.benchmark.side_views``) in leaderboard order, in percent."""
        views = self.views.set_index("detector") if len(self.views) else None
        if views is None:
            return []
        columns = [c for c in views.columns if views[c].notna().any()]
        if not columns:
            return []
        lines = ["", "Beside OOD: misclassified AUROC = misclassified ID test inputs vs correctly classified ones; "
                 "ambiguous AUROC = truly ambiguous inputs vs ID; OOD vs ambiguous AUROC = near and far OOD sets vs "
                 "the ambiguous inputs (about 50 when the detector cannot tell novelty from ambiguity).", "",
                 "| detector | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]  # fmt: skip
        for detector in board.loc[board["status"] == "ok", "detector"]:
            if detector in views.index:
                values = views.loc[detector]
                cells = " | ".join("" if pd.isna(values[c]) else f"{100 * values[c]:.2f}" for c in columns)
                lines.append(f"| {detector} | {cells} |")
        return lines

    def scores_frame(self) -> pd.DataFrame:
        """Every per-sample score, long format: ``detector``, ``set`` (``"id"`` or an OOD set), ``index``, ``score``."""
        frames = [
            pd.DataFrame(
                {
                    "detector": detector,
                    "set": set_name,
                    "index": np.arange(len(values)),
                    "score": np.asarray(values, dtype=np.float64),
                }
            )  # fmt: skip
            for detector, per_set in self.scores.items()
            for set_name, values in per_set.items()
        ]
        columns = ["detector", "set", "index", "score"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:200]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
