"""The benchmark runner on ready outputs, its tables, and the HTML report in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from oodguard import metrics
from oodguard.benchmark.report import group_intervals, histograms, report_data, roc_curve
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
    assert panels["near"]["scale"] == "linear" and np.allclose(np.diff(panels["near"]["edges"]), 0.25, atol=0.05)


def test_histograms_switch_to_a_symmetric_log_scale_only_when_the_range_is_heavy_tailed():
    rng = np.random.default_rng(1)
    piled = np.concatenate([np.zeros(600), rng.exponential(0.2, size=400)])  # like gram: half the ID scores at 0
    broad = np.exp(rng.normal(6.0, 1.5, size=500))  # OOD over three orders of magnitude
    panel = histograms({"id": piled, "far": broad}, bins=40)["far"]
    edges = np.array(panel["edges"])
    low, high = np.quantile(np.concatenate([piled, broad]), [0.01, 0.99])
    assert panel["scale"] == "symlog" and (np.diff(edges) > 0).all()
    assert edges[0] == pytest.approx(low) and edges[-1] == pytest.approx(high)
    # ID's own body (above the pile at 0) is spread over many bins instead of sharing the first one
    assert sum(fraction > 0 for fraction in panel["id"]) >= 10 and panel["id"][0] < 0.9
    assert sum(panel["id"]) == pytest.approx(1.0) and sum(panel["ood"]) == pytest.approx(1.0)
    assert panel["ood_clipped"] == int(((broad < edges[0]) | (broad > edges[-1])).sum()) > 0
    counts, _ = np.histogram(np.clip(broad, edges[0], edges[-1]), bins=edges)
    assert panel["ood"] == pytest.approx(counts / broad.size, abs=1e-5)
    # A set piled up on one value with a body as wide as the others (knn on constant images: quartiles 0.738-0.746,
    # 5-95 % 0.55-0.78) is no heavy tail: the axis stays linear
    spike = np.r_[0.742 + rng.normal(0, 0.006, size=240), rng.uniform(0.5, 0.78, size=60)]
    assert histograms({"id": rng.normal(0.35, 0.08, 1000), "constant": spike})["constant"]["scale"] == "linear"


def _scored(id_scores, sets, full_spectrum=False, n_boot=40):
    """Results of one extra job that returns the given scores (the outputs only name the sets)."""
    ood = [(name, group, far_outputs(3, seed=k)) for k, (name, group, _) in enumerate(sets)]
    scores = {"id": id_scores, **{name: values for name, _, values in sets}}
    fit, test = id_outputs(5, seed=1), id_outputs(2, seed=2)
    return run_on_outputs("scored", fit, test, ood, [], n_boot=n_boot, seed=3, full_spectrum=full_spectrum,
                          progress=False, extra_jobs={"given": lambda: scores})  # fmt: skip


def _paired_group_interval(id_scores, group_sets, n_boot, seed):
    """The percentile interval of a group's mean AUROC, from scratch: the draw order metrics.paired_bootstrap documents,
    and scikit-learn's AUROC of each resample."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_boot):
        inside = id_scores[rng.integers(0, len(id_scores), len(id_scores))]
        draws = [values[rng.integers(0, len(values), len(values))] for values in group_sets]
        means.append(np.mean([roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(d))], np.r_[inside, d])
                              for d in draws]))  # fmt: skip
    return np.quantile(means, [0.025, 0.975])


def test_leaderboard_intervals_are_group_means_of_a_paired_bootstrap():
    rng = np.random.default_rng(2)
    inside, near = rng.normal(size=60), rng.normal(0.6, size=40)
    far_a, far_b = rng.normal(2, size=30), rng.normal(1, size=50)
    results = _scored(inside, [("near-a", "near", near), ("far-a", "far", far_a), ("far-b", "far", far_b)])
    got = group_intervals(results)["given"]
    expected = _paired_group_interval(inside, [far_a, far_b], n_boot=40, seed=3)
    assert got["far AUROC"] == pytest.approx(expected, abs=1e-4)
    row = results.table.set_index("ood_set").loc["near-a"]  # a group of one set keeps the run's interval
    assert got["near AUROC"] == [round(row["auroc_low"], 4), round(row["auroc_high"], 4)]
    board = results.leaderboard().set_index("detector")
    assert got["far AUROC"][0] <= board.loc["given", "far AUROC"] <= got["far AUROC"][1]
    assert report_data(results)["intervals"] == group_intervals(results)


def test_full_spectrum_report_pools_the_covariate_sets_with_id_in_curves_and_intervals():
    rng = np.random.default_rng(4)
    inside, shifted = rng.normal(size=50), rng.normal(0.3, size=20)
    far_a, far_b = rng.normal(1.5, size=30), rng.normal(2.5, size=30)
    sets = [("far-a", "far", far_a), ("far-b", "far", far_b), ("dimmed", "covariate", shifted)]
    results = _scored(inside, sets, full_spectrum=True)
    pooled = np.concatenate([inside, shifted])
    expected = _paired_group_interval(pooled, [far_a, far_b], n_boot=40, seed=3)
    assert group_intervals(results)["given"]["far AUROC"] == pytest.approx(expected, abs=1e-4)
    curve = report_data(results)["detectors"]["given"]["roc"]["far-a"]
    fpr, tpr, _ = metrics.roc_curve(pooled, far_a)
    assert curve == {"fpr": np.round(fpr, 4).tolist(), "tpr": np.round(tpr, 4).tolist()}
    assert np.trapezoid(tpr, fpr) == pytest.approx(results.table.set_index("ood_set").loc["far-a", "auroc"])


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


def _rendered(browser: str, page, profile) -> str:
    """The page's DOM after its scripts ran in headless Chromium; fails on any console message."""
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    assert 'data-rendered="ok"' in done.stdout
    assert '<div id="errors"></div>' in done.stdout
    return done.stdout


def _tick_labels(svg: str, axis: str) -> list[str]:
    return re.findall(rf'<text [^>]*class="{axis}tick"[^>]*>([^<]*)</text>', svg)


def _browser() -> str:
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium for this test")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return browser


@pytest.mark.slow
def test_report_renders_in_a_headless_browser_without_console_errors(results, tmp_path):
    browser = _browser()
    paths = results.save(tmp_path)
    dom = _rendered(browser, paths["html"], tmp_path / "profile")
    roc = dom.split('id="roc"')[1].split("</svg>")[0]
    assert roc.count("<polyline") == 3  # one ROC curve per OOD set of the selected detector
    assert "<table>" in dom and "knn" in dom
    board = dom.split('id="leaderboard"')[1].split("</table>")[0]
    ok = int((results.status["status"] == "ok").sum())
    assert board.count('class="ci"') == ok * len(results.groups)  # an interval under every group AUROC
    overlay = dom.split('id="overlay-svg"')[1].split("</svg>")[0]
    assert 1 <= overlay.count("<polyline") <= 5  # the best detectors on one OOD set
    perset = dom.split('id="perset-table"')[1].split("</table>")[0]
    assert perset.count('class="ci"') == len(results.table)  # every (detector, set) with its interval
    assert 'data-metric="auroc"' in dom and '<option value="fpr95">FPR@95</option>' in dom
    assert 'id="notrun-list"' in dom and "failed" in dom  # the results hold a failed detector
    for svg in dom.split("<svg")[1:]:
        for axis in "xy":
            labels = _tick_labels(svg, axis)
            assert len(set(labels)) == len(labels) and all(0 < len(label) <= 9 for label in labels), labels


@pytest.mark.slow
def test_report_histograms_stay_readable_for_heavy_tails_and_narrow_offsets(tmp_path):
    browser = _browser()
    rng = np.random.default_rng(5)
    inside = 1000.2 + 0.01 * rng.normal(size=300)  # scores far from 0 that differ in the fifth digit
    heavy = 1000.2 + np.exp(rng.normal(4.0, 2.0, size=200))  # from the ID scores out to 1e5 and beyond
    close = 1000.21 + 0.01 * rng.normal(size=200)
    results = _scored(inside, [("heavy", "far", heavy), ("close", "near", close)], n_boot=20)
    dom = _rendered(browser, results.report(tmp_path / "report.html"), tmp_path / "profile")
    hists = dom.split('id="hists"')[1]
    by_set = dict(re.findall(r'<div class="panel" data-set="([^"]+)">(.*?)</svg>', hists))
    assert sorted(by_set) == ["close", "heavy"]
    assert "symmetric log scale" in by_set["heavy"] and "symmetric log scale" not in by_set["close"]
    for svg in by_set.values():
        labels = _tick_labels(svg, "x")
        assert len(labels) == 5 and len(set(labels)) == 5, labels  # 3 significant digits would print 1000 five times
        assert all(len(label) <= 9 for label in labels), labels


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

    # rotation needs a model trained with its head, the others are slow: asked for by name only; detectors that
    # embed raw texts (ahm) are chosen from the benchmark's texts and encoder, not from its inputs
    by_name = {"rotation", "ae_mahalanobis_images", "msma_images", "rankfeat"}
    tensors = {n for n in detectors.available(needs_model=True) if detectors.info(n)["input_kind"] == "tensors"}
    assert "ahm" in detectors.available(needs_model=True) and "ahm" not in tensors
    every = tensors - by_name
    params = {"nac_layers": {"layers": ["<features>"]}}  # its layers have no default
    assert set(_model_detectors_for(torch.zeros(3, 1, 8, 8), params)) == every
    assert set(_model_detectors_for(torch.zeros(3, 1, 8, 8))) == every - {"nac_layers"}
    images_only = {"cover", "ae_mahalanobis_images", "msma_images"}  # input_ndim 4: images [N, C, H, W]
    assert set(_model_detectors_for(torch.zeros(3, 384), params)) == every - images_only
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


def test_run_calibrates_sdm_on_the_validation_split_and_caches_trained_detectors(monkeypatch, tmp_path):
    import torch
    from torch import nn

    from oodguard.benchmark import runner
    from oodguard.benchmark.spec import Benchmark, DataSplit
    from oodguard.detectors.sdm import SDM

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(90) % 3
    x = torch.randn(90, 6, generator=g) + 3 * torch.nn.functional.one_hot(labels, 6).float()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    minus = torch.full((20,), -1)
    benchmark = Benchmark(
        name="tiny", model=model, fit=DataSplit("fit", x[:60], labels[:60]),
        validation=DataSplit("held-out", x[60:75], labels[60:75]), test=DataSplit("test", x[75:], labels[75:]),
        ood=[DataSplit("noise", torch.randn(20, 6, generator=g) * 5, minus, group="far")],
    )  # fmt: skip
    calibrated = []
    original = SDM.calibrate

    def recording(self, outputs, **kwargs):
        calibrated.append(len(outputs))
        return original(self, outputs, **kwargs)

    monkeypatch.setattr(SDM, "calibrate", recording)
    results = runner.run(benchmark, ["sdm", "msp", "ae_mahalanobis"], params={"ae_mahalanobis": {"latent_dim": 2}},
                         n_boot=10, progress=False, cache_dir=tmp_path)  # fmt: skip
    assert calibrated == [15] and results.settings["calibration_split"] == "held-out"
    assert set(results.status["status"]) == {"ok"}
    assert len(list((tmp_path / "detectors").glob("ae_mahalanobis-*.safetensors"))) == 1
    assert "cache_dir" not in json.dumps(results.settings["params"])  # the runner's folder is not a user parameter


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A tiny image benchmark run through run(): ambiguous set, validation split, the model's OCS curve."""
    import torch
    from torch import nn

    from oodguard.benchmark import runner
    from oodguard.benchmark.spec import Benchmark, DataSplit

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(150) % 3
    images = (torch.rand(150, 1, 8, 8, generator=g) * 0.3 + 0.2 * labels[:, None, None, None]).clamp(0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(images[:90]), labels[:90]).backward()
        optimiser.step()
    minus = torch.full((30,), -1)
    benchmark = Benchmark(
        name="tiny-images", model=model.eval(), fit=DataSplit("fit", images[:90], labels[:90]),
        test=DataSplit("test", images[90:], labels[90:]),
        ood=[DataSplit("noise", torch.rand(30, 1, 8, 8, generator=g), minus, group="far"),
             DataSplit("between", images[90:120].roll(1, dims=0) * 0.5 + images[90:120] * 0.5, minus,
                       group="ambiguous")],
    )  # fmt: skip
    results = runner.run(benchmark, ["msp", "energy"], n_boot=10, progress=False)
    return benchmark, results


def test_run_measures_the_models_ocs_curve_on_image_benchmarks(image_run):
    from oodguard.detectors.ocs import optimal_constant_solution
    from oodguard.diagnostics import ocs_curve

    benchmark, results = image_run
    curve = results.diagnostics["ocs_curve"]
    expected = ocs_curve(benchmark.model, benchmark.test.data, optimal_constant_solution(benchmark.fit.labels, 3),
                         labels=benchmark.test.labels)  # fmt: skip
    np.testing.assert_allclose(curve["distance"], expected.distance, rtol=1e-6)
    assert curve["severities"] == [0, 1, 2, 3, 4, 5] and len(curve["corruptions"]) == 5
    assert np.asarray(curve["accuracy"]).shape == (5, 6)
    assert list(results.views["detector"]) == ["msp", "energy"]
    assert results.views["OOD vs ambiguous AUROC"].notna().all()


def test_run_explains_the_top_scoring_inputs_of_each_ood_set(image_run):
    from oodguard.benchmark.explanations import PER_SET
    from oodguard.detectors import create
    from oodguard.explain import explain_inputs

    benchmark, results = image_run
    explained = results.diagnostics["explanations"]
    assert explained["detector"] == "energy" and [s["name"] for s in explained["sets"]] == ["noise"]  # not ambiguous
    noise = explained["sets"][0]
    scores = np.asarray(results.scores["energy"]["noise"])
    top = np.argsort(-scores, kind="stable")[:PER_SET]
    np.testing.assert_allclose(noise["scores"], scores[top], atol=1e-4)
    maps = explain_inputs(benchmark.model, create("energy"), benchmark.ood[0].data[top.tolist()])
    for shown, expected in zip(noise["maps"], maps, strict=True):  # each scaled to 0-255 by its own range
        expected = expected - expected.min()
        np.testing.assert_allclose(np.asarray(shown), np.rint(255 * expected / expected.max()), atol=1)
    assert np.asarray(noise["images"]).shape == (PER_SET, 8, 8)


def test_explanations_are_skipped_with_a_reason_when_the_model_is_not_run_again(image_run):
    from oodguard.benchmark import runner

    benchmark, _ = image_run
    results = runner.run(benchmark, ["energy"], n_boot=10, progress=False, model_detectors=False)
    assert "--no-model-detectors" in results.diagnostics["explanations"]["skipped"]


@pytest.mark.slow
def test_report_draws_the_views_and_the_ocs_curve_in_a_browser(image_run, tmp_path):
    browser = _browser()
    _, results = image_run
    paths = results.save(tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["diagnostics"]["ocs_curve"]["severities"] == [0, 1, 2, 3, 4, 5]
    dom = _rendered(browser, paths["html"], tmp_path / "profile")
    ocs = dom.split('id="ocs-plot"')[1].split("</svg>")[0]
    assert ocs.count("<polyline") == 5  # one line per corruption
    views = dom.split('id="views-table"')[1].split("</table>")[0]
    assert views.count("<tr>") == 3 and "OOD vs ambiguous AUROC" in views  # header and one row per detector
    board = dom.split('id="leaderboard"')[1].split("</table>")[0]
    assert "ambiguous AUROC" not in board  # not an OOD column
    explained = dom.split('id="explain-grid"')[1]
    assert explained.count("<canvas") >= 8  # the 4 top-scoring noise images and their maps


def test_run_adds_the_benchmarks_own_rows_by_default_or_by_name(monkeypatch):
    import torch
    from torch import nn

    from oodguard.benchmark import runner
    from oodguard.benchmark.spec import Benchmark, DataSplit

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    x = torch.randn(60, 6, generator=g) + 3 * torch.nn.functional.one_hot(labels, 6).float()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3)).eval()
    calls = []

    def own_row() -> dict:
        calls.append(1)
        return {"id": np.arange(20.0), "noise": np.arange(20.0) + 10}

    def benchmark(jobs):
        return Benchmark(
            name="tiny", model=model, fit=DataSplit("fit", x[:40], labels[:40]),
            test=DataSplit("test", x[40:], labels[40:]),
            ood=[DataSplit("noise", torch.randn(20, 6, generator=g) * 5, torch.full((20,), -1), group="far")],
            extra_jobs=jobs,
        )  # fmt: skip

    tiny = benchmark({"own": own_row})
    asked = runner.run(tiny, ["msp"], n_boot=5, progress=False)
    assert set(asked.status["detector"]) == {"msp"} and not calls  # not asked for: not run
    named = runner.run(tiny, ["own"], n_boot=5, progress=False)
    assert list(named.status["detector"]) == ["own"] and calls == [1]
    assert named.table.set_index("ood_set").loc["noise", "auroc"] == pytest.approx(metrics.auroc(
        np.arange(20.0), np.arange(20.0) + 10))  # fmt: skip
    monkeypatch.setattr(runner, "default_detectors", lambda outputs, params=None: ["msp"])
    monkeypatch.setattr(runner, "_model_detectors_for", lambda data, params=None, model=None: [])
    default = runner.run(tiny, n_boot=5, progress=False)
    assert list(default.status["detector"]) == ["msp", "mos", "own"] and calls == [1, 1]
    with pytest.raises(ValueError, match="own: computed by the 'tiny' benchmark itself"):
        runner.run(tiny, ["own"], params={"own": {"k": 1}}, progress=False)
    with pytest.raises(ValueError, match=r"own rows \['msp'\] have the names of registered detectors"):
        runner.run(benchmark({"msp": own_row}), ["msp"], progress=False)
