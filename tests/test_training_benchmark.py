"""The training-time benchmark end to end on a tiny benchmark (1 epoch per method), its statistics and its CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from oodguard import metrics
from oodguard.benchmark.spec import Benchmark, DataSplit
from oodguard.benchmark.training import (
    demonstration_runs,
    group_auroc_bootstrap,
    run_training_benchmark,
    verdict,
)
from oodguard.cli import main


def tiny_benchmark():
    g = torch.Generator().manual_seed(0)

    def images(n, label_means, scale=0.5):
        labels = torch.arange(n) % len(label_means)
        means = torch.tensor(label_means)[labels]
        return torch.randn(n, 1, 8, 8, generator=g) * scale + means[:, None, None, None], labels

    fit_x, fit_y = images(60, [-1.0, 0.0, 1.0])
    test_x, test_y = images(30, [-1.0, 0.0, 1.0])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(fit_x), fit_y).backward()
        optimizer.step()
    near = torch.randn(25, 1, 8, 8, generator=g) * 0.5 + 2.0
    far = torch.rand(25, 1, 8, 8, generator=g) * 8 - 4
    minus = torch.full((25,), -1)
    return Benchmark(
        name="tiny",
        model=model.eval(),
        fit=DataSplit("fit", fit_x, fit_y),
        test=DataSplit("test", test_x, test_y),
        ood=[DataSplit("shifted", near, minus, group="near"), DataSplit("noise", far, minus, group="far")],
    ), torch.randn(48, 1, 8, 8, generator=g) * 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    benchmark, outliers = tiny_benchmark()
    cache = tmp_path_factory.mktemp("train-cache")
    runs = demonstration_runs(epochs=1, retrain_epochs=1)
    trained = run_training_benchmark(benchmark, outliers, runs=runs, n_boot=20, cache_dir=cache, progress=False)
    return benchmark, outliers, cache, runs, trained


def test_every_method_is_evaluated_beside_the_baseline(tiny_run, tmp_path):
    _, _, _, runs, trained = tiny_run
    summary = trained.summary
    assert set(summary["method"]) == {"baseline", *runs}
    expected_rows = {"baseline: msp", "baseline: energy"}
    for label in runs:
        expected_rows |= {f"{label}: msp", f"{label}: energy"}
    expected_rows.add("dos: absent-class")
    assert set(summary["row"]) == expected_rows
    own = summary[summary["own score"] & (summary["method"] != "baseline")]
    assert set(own["method"]) == set(runs)
    allowed = {"helped", "hurt", "no significant difference"}
    for value in own["verdict"]:
        assert set(value.split(" / ")) <= allowed
    assert trained.reference in {"baseline: msp", "baseline: energy"}
    assert (summary["near low"] <= summary["near high"]).all()
    paths = trained.save(tmp_path)
    for key in ("csv", "json", "markdown", "html", "training"):
        assert paths[key].stat().st_size > 0
    markdown = paths["markdown"].read_text()
    assert "dos | absent-class" in markdown and "verdict" in markdown
    payload = json.loads(paths["training"].read_text())
    assert payload["runs"]["oe"]["steps"] == 1 and payload["runs"]["oe"]["seconds"] > 0


def test_group_estimates_equal_the_mean_of_per_set_auroc(tiny_run):
    _, _, _, _, trained = tiny_run
    scores = trained.results.scores["oe: msp"]
    row = trained.summary.set_index("row").loc["oe: msp"]
    assert row["near AUROC"] == pytest.approx(metrics.auroc(scores["id"], scores["shifted"]), abs=1e-12)
    assert row["far AUROC"] == pytest.approx(metrics.auroc(scores["id"], scores["noise"]), abs=1e-12)


def test_a_rerun_loads_the_cached_fine_tuned_weights(tiny_run):
    benchmark, outliers, cache, runs, trained = tiny_run
    again = run_training_benchmark(benchmark, outliers, ["oe", "dos"], runs=runs, n_boot=20, cache_dir=cache,
                                   progress=False)  # fmt: skip
    assert again.runs["oe"]["cached"] and again.runs["dos"]["cached"]
    np.testing.assert_array_equal(again.results.scores["dos: absent-class"]["noise"],
                                  trained.results.scores["dos: absent-class"]["noise"])  # fmt: skip


def test_paired_bootstrap_and_verdicts():
    rng = np.random.default_rng(0)
    ids = rng.normal(0, 1, 200)
    strong = {"id": ids, "a": rng.normal(3, 1, 100)}
    weak = {"id": ids + 0.01, "a": strong["a"] - 2.5}
    boot = group_auroc_bootstrap({"strong": strong, "weak": weak}, {"far": ["a"]}, n_boot=100, seed=1)
    assert boot["strong"].shape == (101, 1)
    assert boot["strong"][0, 0] == pytest.approx(metrics.auroc(strong["id"], strong["a"]), abs=1e-12)
    interval = lambda v: (v[0], *np.percentile(v[1:], [2.5, 97.5]))  # noqa: E731
    assert verdict(interval(boot["strong"][:, 0]), interval(boot["weak"][:, 0])) == "helped"
    assert verdict(interval(boot["weak"][:, 0]), interval(boot["strong"][:, 0])) == "hurt"
    assert verdict((0.9, 0.85, 0.95), (0.91, 0.88, 0.97)) == "no significant difference"


def test_bad_requests_are_refused(tiny_run):
    benchmark, outliers, _, runs, _ = tiny_run
    with pytest.raises(ValueError, match="unknown training method"):
        run_training_benchmark(benchmark, outliers, ["vos"], runs=runs, progress=False)
    with pytest.raises(ValueError, match="shaped like the fit split"):
        run_training_benchmark(benchmark, torch.zeros(4, 3, 8, 8), ["oe"], runs=runs, progress=False)


def test_cli_refuses_a_benchmark_it_cannot_train_on_with_one_line(capsys):
    assert main(["train-bench", "imagenet", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: train-bench runs on the digits benchmarks") and err.count("\n") == 1


def test_cli_refuses_unknown_methods_before_any_work(capsys):
    assert main(["train-bench", "digits", "--methods", "oe,vos", "-q"]) == 1
    assert "unknown training method(s) ['vos']" in capsys.readouterr().err
