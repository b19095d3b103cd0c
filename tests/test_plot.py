"""Python conveniences: GuardResult.to_pandas, metrics.evaluate_frame, and the pictures of oodguard.plot."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from oodguard import Guard, metrics, plot  # noqa: E402

RNG = np.random.default_rng(0)
ID, NEAR, FAR = RNG.normal(size=300), RNG.normal(1.0, size=200), RNG.normal(6.0, size=100)


def test_roc_curves_draw_exactly_the_metrics_curves():
    ax = plot.roc_curves(ID, {"near": NEAR, "far": FAR})
    lines = ax.get_lines()[:2]
    for line, scores in zip(lines, (NEAR, FAR), strict=True):
        fpr, tpr, _ = metrics.roc_curve(ID, scores)
        np.testing.assert_array_equal(line.get_xdata(), fpr)
        np.testing.assert_array_equal(line.get_ydata(), tpr)
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == [f"near (AUROC {metrics.auroc(ID, NEAR):.3f})", f"far (AUROC {metrics.auroc(ID, FAR):.3f})"]
    several = plot.roc_curves({"a": ID, "b": -ID}, {"a": NEAR, "b": -NEAR})
    assert [line.get_label().split(" ")[0] for line in several.get_lines()[:2]] == ["a", "b"]
    plt.close("all")


def test_histograms_share_a_robust_range_and_report_what_they_clip():
    heavy = np.concatenate([RNG.normal(size=200), [1e6, -1e5]])  # two wild scores would squash everything
    ax = plot.score_histograms(ID, {"near": NEAR, "heavy": heavy}, bins=20)
    low, high = plot.robust_range([ID, NEAR, heavy])
    assert high - low < 20  # the quantile range, not 1e6
    assert ax.oodguard_clipped["heavy"] >= 2 and ax.oodguard_clipped["ID"] == int(((ID < low) | (ID > high)).sum())
    counts = [patch for patch in ax.patches]
    assert len(counts) == 3  # one filled step per set
    assert "heavy (" in [t.get_text() for t in ax.get_legend().get_texts()][2]
    with pytest.raises(ValueError, match="no finite score"):
        plot.robust_range([np.array([np.inf])])
    plt.close("all")


def test_evaluate_frame_is_evaluate_per_set_and_detector():
    frame = metrics.evaluate_frame(ID, {"near": NEAR, "far": FAR})
    assert list(frame["ood_set"]) == ["near", "far"] and "detector" not in frame
    assert frame.loc[0, "auroc"] == metrics.evaluate(ID, NEAR)["auroc"]
    both = metrics.evaluate_frame({"a": ID, "b": -ID}, {"a": {"near": NEAR}, "b": {"near": -NEAR}})
    assert list(both["detector"]) == ["a", "b"]
    assert both.loc[1, "fpr_at_95_id_tpr"] == metrics.evaluate(-ID, -NEAR)["fpr_at_95_id_tpr"]


def test_guard_results_as_a_dataframe():
    guard = Guard(detector="energy").fit({"logits": RNG.normal(size=(100, 3))})
    guard.calibrate({"logits": RNG.normal(size=(200, 3))}, alpha=0.1)
    result = guard.guard({"logits": np.array([[0.1, 0.0, -0.2], [1e4, 0.0, 0.0]])})
    frame = result.to_pandas()
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == [
        "prediction",
        "score",
        "pvalue",
        "is_ood",
        "reason",
    ]
    assert frame["is_ood"].tolist() == result.is_ood.tolist() and frame["score"].tolist()[0] == result.score[0]
    assert frame["reason"][0] is None and "outside" in frame["reason"][1]
