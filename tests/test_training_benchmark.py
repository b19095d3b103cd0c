"""The training-time benchmark end to end on a tiny benchmark (1 epoch per method), its statistics and its CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from oodguard import metrics
from oodguard.benchmark.spec import Benchmark, DataSplit
from oodguard.benchmark.training import (
    _digest,
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
    expected_rows |= {"dos: absent-class", "rotation: rotation"}  # own scores that are not msp or energy
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


def test_every_row_reports_the_id_ece_of_its_model(tiny_run):
    """The ID ECE of each model, by hand: softmax of the ID test logits, 15 equal-width bins of the top probability."""
    benchmark, _, _, _, trained = tiny_run
    summary = trained.summary
    with torch.no_grad():
        p = torch.softmax(benchmark.model(benchmark.test.data).double(), dim=1).numpy()
    confidence, correct = p.max(axis=1), p.argmax(axis=1) == benchmark.test.labels.numpy()
    edges = np.linspace(0, 1, 16)
    by_hand = sum(
        abs(correct[inside].mean() - confidence[inside].mean()) * inside.mean()
        for inside in ((confidence > lo) & (confidence <= hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True))
        if inside.any()
    )
    baseline = summary[summary["method"] == "baseline"]["id ece"]
    assert baseline.tolist() == pytest.approx([by_hand] * len(baseline), abs=1e-12)
    assert summary["id ece"].between(0, 1).all()
    assert summary.groupby("method")["id ece"].nunique().max() == 1  # one value per model, on every score row
    assert "| ID ECE |" in trained.to_markdown()


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
    assert verdict(interval(boot["strong"][:, 0] - boot["weak"][:, 0])) == "helped"
    assert verdict(interval(boot["weak"][:, 0] - boot["strong"][:, 0])) == "hurt"
    assert verdict((0.01, -0.002, 0.02)) == "no significant difference"


def test_verdict_uses_the_paired_difference_not_the_overlap_of_marginal_intervals():
    # "better" scores the same OOD rows a little higher in EVERY replicate (a consistent, small gain), but the
    # spread from resampling the shared rows is larger than the gain: the marginal intervals overlap while the
    # paired difference excludes zero.
    rng = np.random.default_rng(3)
    ids = rng.normal(0, 1, 300)
    ood = rng.normal(1.0, 1, 300)
    rows = {"reference": {"id": ids, "a": ood}, "better": {"id": ids, "a": ood + 0.05}}
    boot = group_auroc_bootstrap(rows, {"near": ["a"]}, n_boot=200, seed=0)
    interval = lambda v: (v[0], *np.percentile(v[1:], [2.5, 97.5]))  # noqa: E731
    better, reference = interval(boot["better"][:, 0]), interval(boot["reference"][:, 0])
    assert better[1] < reference[2]  # the marginal intervals overlap: the old rule said "no significant difference"
    difference = interval(boot["better"][:, 0] - boot["reference"][:, 0])
    assert difference[1] > 0
    assert verdict(difference) == "helped"


def test_summary_verdicts_follow_the_paired_difference_columns(tiny_run):
    _, _, _, _, trained = tiny_run
    own = trained.summary[trained.summary["own score"] & (trained.summary["method"] != "baseline")]
    for row in own.to_dict(orient="records"):
        expected = [verdict((row[f"{g} delta"], row[f"{g} delta low"], row[f"{g} delta high"]))
                    for g in ("near", "far")]  # fmt: skip
        assert row["verdict"] == " / ".join(expected)


def test_a_truncated_cache_file_is_trained_again(tiny_run, tmp_path):
    benchmark, outliers, cache, runs, trained = tiny_run
    (cached,) = cache.glob("*-oe-*.safetensors")
    copy = tmp_path / cached.name
    copy.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])  # an interrupted write
    again = run_training_benchmark(benchmark, outliers, ["oe"], runs=runs, n_boot=20, cache_dir=tmp_path,
                                   progress=False)  # fmt: skip
    assert not again.runs["oe"]["cached"]
    rewritten, original = load_file(copy), load_file(cached)  # retrained to the same weights (timings differ)
    assert rewritten.keys() == original.keys() and all(torch.equal(rewritten[k], original[k]) for k in original)
    np.testing.assert_array_equal(again.results.scores["oe: msp"]["noise"], trained.results.scores["oe: msp"]["noise"])


def test_cache_keys_cover_array_content_shape_dtype_and_part_boundaries():
    a = np.zeros(5000, dtype=np.float32)
    b = a.copy()
    b[2500] = 1.0  # numpy prints both as [0. 0. 0. ... 0. 0. 0.]: a key built from str() would collide
    assert str(a) == str(b)
    assert _digest(a) != _digest(b)
    assert _digest(a) == _digest(torch.from_numpy(a.copy()))  # numpy and torch give the same key
    assert _digest(a) != _digest(a.reshape(50, 100))
    assert _digest(a) != _digest(a.view(np.int32))  # same bytes, other dtype
    assert _digest("ab", "c") != _digest("a", "bc")
    assert _digest({"x": 1}, 2) == _digest({"x": 1}, 2)
    with pytest.raises(TypeError, match="neither an array nor a JSON value"):
        _digest(object())


def test_a_fit_split_that_is_not_a_tensor_with_labels_is_refused(tiny_run):
    from torch.utils.data import DataLoader, TensorDataset

    benchmark, outliers, _, runs, _ = tiny_run
    fit = benchmark.fit
    for data, labels in ((TensorDataset(fit.data, fit.labels), None), (DataLoader(TensorDataset(fit.data)), None),
                         (fit.data, None), (fit.data, fit.labels[:-1])):  # fmt: skip
        bad = dataclasses.replace(benchmark, fit=DataSplit("fit", data, labels))
        with pytest.raises(ValueError, match="fit split as an input tensor .* with labels"):
            run_training_benchmark(bad, outliers, ["oe"], runs=runs, progress=False)


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
