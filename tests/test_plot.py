"""Python conveniences: GuardResult.to_pandas, metrics.evaluate_frame, and the pictures of oodguard.plot."""

from __future__ import annotations

import subprocess
import sys

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
    assert len(frame) == len(result) == 2
    assert frame["prediction"].tolist() == result.prediction.tolist()
    np.testing.assert_array_equal(frame["pvalue"].to_numpy(), result.pvalue)
    assert frame.dtypes.to_dict() == {
        "prediction": result.prediction.dtype,
        "score": np.dtype("float64"),
        "pvalue": np.dtype("float64"),
        "is_ood": np.dtype("bool"),
        "reason": np.dtype("object"),
    }


def test_histogram_bars_are_the_densities_of_the_clipped_scores():
    heavy = np.concatenate([RNG.normal(2.0, size=300), [1e4, 5e4, -3e3]])
    ax = plot.score_histograms(ID, {"heavy": heavy}, bins=12, clip=(0.01, 0.99))
    low, high = plot.robust_range([ID, heavy], clip=(0.01, 0.99))
    assert (low, high) == tuple(np.quantile(np.concatenate([ID, heavy]), [0.01, 0.99]))
    edges = np.linspace(low, high, 13)
    for patch, scores in zip(ax.patches, (ID, heavy), strict=True):
        expected, _ = np.histogram(np.clip(scores, low, high), bins=edges, density=True)
        heights = patch.get_xy()[1 : 2 * 12 : 2, 1]  # a filled step outline: the top of bin i is vertex 2i + 1
        np.testing.assert_allclose(heights, expected)
    assert ax.oodguard_clipped == {
        "ID": int(((ID < low) | (ID > high)).sum()),
        "heavy": int(((heavy < low) | (heavy > high)).sum()),
    }
    plt.close("all")


def test_importing_oodguard_does_not_import_matplotlib():
    code = "import sys, oodguard, oodguard.plot, oodguard.metrics; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False"
