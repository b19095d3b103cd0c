"""The benchmark runner on ready outputs, its tables, and the HTML report in a real browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from oodguard import metrics
from oodguard.benchmark.report import histograms, roc_curve
from oodguard.benchmark.runner import run_on_outputs

from detector_data import far_outputs, id_outputs

DETECTORS = ["msp", "energy", "mahalanobis", "knn", "nnguide", "mos"]  # nnguide fails: its 1 % bank < k


@pytest.fixture(scope="module")
def results():
    near = id_outputs(10, seed=5).with_fields(labels=None)
    shifted = id_outputs(10, seed=6)
    shifted = shifted.with_fields(features=shifted.features * 0.7, logits=shifted.logits * 0.7)
    sets = [("far-cluster", "far", far_outputs(80, seed=3)), ("near-copy", "near", near),
            ("dimmed", "covariate", shifted)]  # fmt: skip
    return run_on_outputs("synthetic", id_outputs(40, seed=1), id_outputs(15, seed=2), sets, DETECTORS,
                          n_boot=50, progress=False)  # fmt: skip


def test_failed_detector_is_reported_and_the_run_goes_on(results):
    status = results.status.set_index("detector")
    assert status.loc["nnguide", "status"] == "failed" and "bank" in status.loc["nnguide", "error"]
    assert (status.drop("nnguide")["status"] == "ok").all()
    board = results.leaderboard()
    assert board.iloc[-1]["detector"] == "nnguide"


def test_mos_is_evaluated_with_a_head_trained_on_the_fit_features(results):
    table = results.table[results.table["detector"] == "mos"].set_index("ood_set")
    assert table.loc["far-cluster", "auroc"] > 0.9


def test_table_values_match_the_metrics_module(results):
    row = results.table.set_index(["detector", "ood_set"]).loc[("knn", "far-cluster")]
    scores = results.scores["knn"]
    assert row["auroc"] == pytest.approx(metrics.auroc(scores["id"], scores["far-cluster"]))
    assert row["fpr95"] == pytest.approx(metrics.fpr_at_tpr(scores["id"], scores["far-cluster"]))
    assert row["auroc_low"] <= row["auroc"] <= row["auroc_high"]
    assert results.groups == {"near": ["near-copy"], "far": ["far-cluster"], "covariate": ["dimmed"]}


def test_leaderboard_group_means_and_order(results):
    board = results.leaderboard().set_index("detector")
    table = results.table
    expected = table[(table.detector == "energy") & (table.group == "far")]["auroc"].mean()
    assert board.loc["energy", "far AUROC"] == pytest.approx(expected)
    ok = results.leaderboard()
    ok = ok[ok.status == "ok"]
    rank_key = ok[["near AUROC", "far AUROC"]].mean(axis=1).to_numpy()
    assert (np.diff(rank_key) <= 1e-12).all()


def test_full_spectrum_counts_covariate_sets_as_id():
    sets = [("far-cluster", "far", far_outputs(40, seed=3)), ("dimmed", "covariate", id_outputs(5, seed=6))]
    fit, test = id_outputs(40, seed=1), id_outputs(10, seed=2)
    spectrum = run_on_outputs("s", fit, test, sets, ["energy"], full_spectrum=True, n_boot=10, progress=False)
    assert list(spectrum.table["ood_set"]) == ["far-cluster"]
    scores = spectrum.scores["energy"]
    pooled_id = np.concatenate([scores["id"], scores["dimmed"]])
    assert spectrum.table["auroc"].iloc[0] == pytest.approx(metrics.auroc(pooled_id, scores["far-cluster"]))


def test_bad_arguments_are_refused():
    fit, test = id_outputs(10, seed=1), id_outputs(3, seed=2)
    with pytest.raises(ValueError, match="unknown detector"):
        run_on_outputs("s", fit, test, [("x", "far", far_outputs(5, seed=3))], ["nope"], progress=False)
    with pytest.raises(ValueError, match="odin run the model themselves"):
        run_on_outputs("s", fit, test, [("x", "far", far_outputs(5, seed=3))], ["odin"], progress=False)
    with pytest.raises(ValueError, match="group must be one of"):
        run_on_outputs("s", fit, test, [("x", "weird", far_outputs(5, seed=3))], ["msp"], progress=False)
    with pytest.raises(ValueError, match="no OOD sets"):
        run_on_outputs("s", fit, test, [], ["msp"], progress=False)
    with pytest.raises(ValueError, match="2 OOD-labelled row"):
        run_on_outputs("s", fit, test.concat([test, far_outputs(2, seed=3)]), [("x", "far", far_outputs(5, seed=3))],
                       ["msp"], progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="no OOD set to evaluate"):
        run_on_outputs("s", fit, test, [("x", "covariate", id_outputs(3, seed=4))], ["msp"], full_spectrum=True,
                       progress=False)  # fmt: skip
    mixed = fit.concat([fit, far_outputs(3, seed=3)])
    with pytest.raises(ValueError, match="3 OOD-labelled"):
        run_on_outputs("s", mixed, test, [("x", "far", far_outputs(5, seed=3))], ["msp"], progress=False)


def test_roc_curve_and_histograms_known_answers():
    curve = roc_curve(np.array([0.0, 1.0, 2.0]), np.array([1.0, 3.0]))
    # thresholds 3, 2, 1, 0 flag: {ood 3}, {+id 2}, {+id 1, ood 1}, {+id 0}
    assert curve["fpr"] == [0.0, 0.0, pytest.approx(1 / 3, abs=1e-4), pytest.approx(2 / 3, abs=1e-4), 1.0]
    assert curve["tpr"] == [0.0, 0.5, 0.5, 1.0, 1.0]
    hist = histograms({"id": np.zeros(10), "ood": np.ones(10)}, bins=4)["ood"]
    assert sum(hist["id"]) == pytest.approx(1.0) and sum(hist["ood"]) == pytest.approx(1.0)
    # A heavy-tailed set gets its own panel range: it neither squashes the other set's panel nor is squashed itself
    rng = np.random.default_rng(0)
    scores = {"id": rng.normal(size=1000), "near": rng.normal(0.5, size=1000),
              "heavy": np.concatenate([rng.normal(2.0, size=990), np.full(10, 1e6)])}  # fmt: skip
    panels = histograms(scores, bins=20)
    assert panels["near"]["edges"][-1] < 10 and panels["heavy"]["edges"][-1] < 10  # quantiles, not 1e6
    assert panels["heavy"]["ood_clipped"] >= 10 and panels["near"]["ood_clipped"] <= 40  # about 1 % each side
    assert max(panels["near"]["id"]) < 0.3  # ID spread over several bins, not one bar


def test_save_writes_every_format(results, tmp_path):
    paths = results.save(tmp_path)
    table = pd.read_csv(paths["csv"])
    assert {"detector", "ood_set", "group", "auroc", "auroc_low", "fpr95", "aupr_in", "aupr_out"} <= set(table)
    payload = json.loads(paths["json"].read_text())
    assert payload["benchmark"] == "synthetic" and payload["leaderboard"][0]["status"] == "ok"
    markdown = paths["markdown"].read_text()
    assert "| rank | detector |" in markdown and "failed:" in markdown
    page = paths["html"].read_text()
    assert "<script src" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())  # no temporaries


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
def test_report_renders_in_a_headless_browser_without_console_errors(results, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium for this test")
        pytest.skip("chromium not installed (apt-get install chromium)")
    paths = results.save(tmp_path)
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=5000", "--dump-dom", paths["html"].resolve().as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    assert 'data-rendered="ok"' in done.stdout
    assert '<div id="errors"></div>' in done.stdout
    roc = done.stdout.split('id="roc"')[1].split("</svg>")[0]
    assert roc.count("<polyline") == 3  # one ROC curve per OOD set of the selected detector
    assert "<table>" in done.stdout and "knn" in done.stdout
    overlay = done.stdout.split('id="overlay-svg"')[1].split("</svg>")[0]
    assert 1 <= overlay.count("<polyline") <= 5  # the best detectors on one OOD set
    assert 'id="perset-table"' in done.stdout and "–" in done.stdout.split('id="perset-table"')[1]  # intervals
    assert 'id="notrun-list"' in done.stdout and "failed" in done.stdout  # the results hold a failed detector


def test_benchmark_parameters_merge_under_the_users_and_enable_detectors_with_required_parameters():
    from oodguard.benchmark.runner import default_detectors, merge_params

    merged = merge_params({"knn": {"k": 5, "ratio": 1.0}, "vim": {"dim": 4}}, {"knn": {"k": 9}, "msp": {}})
    assert merged == {"knn": {"k": 9, "ratio": 1.0}, "vim": {"dim": 4}, "msp": {}}
    fit = id_outputs(20, seed=1)
    assert "mos" not in default_detectors(fit)  # its group layout has no default
    assert "mos" in default_detectors(fit, {"mos": {"group_sizes": [2, 2]}})


def test_bad_parameters_are_refused_before_any_work_and_tensors_are_recorded_by_shape():
    import torch

    from oodguard.benchmark.runner import _describe_params

    fit, test = id_outputs(20, seed=1), id_outputs(5, seed=2)
    with pytest.raises(TypeError, match="msp: unknown parameter"):
        run_on_outputs("s", fit, test, [("x", "far", far_outputs(5, seed=3))], ["msp"],
                       params={"msp": {"bank": torch.zeros(3, 4)}}, n_boot=5, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="knn: parameter 'k'"):
        run_on_outputs("s", fit, test, [("x", "far", far_outputs(5, seed=3))], ["knn"], params={"knn": {"k": 0}},
                       n_boot=5, progress=False)  # fmt: skip
    described = _describe_params({"mcm": {"label_embeddings": torch.zeros(3, 4), "temperature": 1.0}})
    assert described == {"mcm": {"label_embeddings": "Tensor(shape=[3, 4], dtype=torch.float32)", "temperature": 1.0}}


def test_model_detectors_that_need_images_are_left_out_for_other_inputs():
    import torch

    from oodguard import detectors
    from oodguard.benchmark.runner import _model_detectors_for

    every = set(detectors.available(needs_model=True))
    params = {"nac_layers": {"layers": ["<features>"]}}  # its layers have no default
    assert set(_model_detectors_for(torch.zeros(3, 1, 8, 8), params)) == every
    assert set(_model_detectors_for(torch.zeros(3, 1, 8, 8))) == every - {"nac_layers"}
    assert set(_model_detectors_for(torch.zeros(3, 384), params)) == every - {"cover"}
    assert set(_model_detectors_for(object(), params)) == every  # not inspectable: kept, failures are reported


def test_run_refuses_bad_parameters_before_running_the_model(monkeypatch):
    from oodguard.benchmark import runner
    from oodguard.benchmark.spec import Benchmark

    def no_extraction(*args, **kwargs):
        raise AssertionError("the model ran before the parameters were checked")

    monkeypatch.setattr(runner, "extract_benchmark", no_extraction)
    benchmark = Benchmark.__new__(Benchmark)  # only detector_params is read before extraction
    object.__setattr__(benchmark, "detector_params", {})
    with pytest.raises(ValueError, match="knn: parameter 'k' must be an integer >= 1; got 0"):
        runner.run(benchmark, ["knn"], params={"knn": {"k": 0}}, progress=False)


def test_clone_is_exported_from_the_detector_package():
    from oodguard import detectors

    twin = detectors.clone(detectors.create("knn", k=5))
    assert twin.get_params() == {**detectors.create("knn").get_params(), "k": 5} and not twin.is_fitted
