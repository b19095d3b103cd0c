"""`oodguard bench digits` end to end: the main job of the README."""

from __future__ import annotations

import json

import pytest

from oodguard import detectors
from oodguard.benchmark import digits, presets
from oodguard.cli import main

pytestmark = pytest.mark.slow  # runs the digits benchmark end to end


@pytest.fixture(scope="module")
def bench_run(digits_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-digits")
    code = main(["bench", "digits", "--cache-dir", str(digits_cache), "--out", str(out), "-q", "--n-boot", "50"])
    return code, out


def test_bench_digits_writes_leaderboard_and_report(bench_run, capsys):
    code, out = bench_run
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["id_accuracy"] >= 0.97
    assert set(payload["groups"]) == {"near", "far", "covariate", "synthetic", "ambiguous"}
    failed = [row for row in payload["status"] if row["status"] != "ok"]
    assert failed == []
    ok = {row["detector"] for row in payload["status"]}
    # every registered detector runs: output-based, MOS (trained head), Gram (layers) and the model-based ones;
    # except those needing parameters with no default that digits does not give (zero-shot label embeddings),
    # those asked for by name only (slow ones, rotation's head), those the CNN cannot run (no dropout layers) and
    # those that embed raw texts (digits has images)
    given = digits.DETECTOR_PARAMS
    by_name = {"ae_mahalanobis_images", "msma_images", "rankfeat", "rotation", "mcdropout"}
    expected = {
        name
        for name in detectors.available()
        if name not in by_name
        and detectors.info(name)["input_kind"] != "texts"
        and (name == "mos" or set(detectors.info(name)["required_params"]) <= set(given.get(name, {})))
    }
    assert ok == expected, expected ^ ok
    assert {"nac", "nac_layers", "gradnorm_autograd", "mahalanobis_ensemble", "cover", "odin", "gram"} <= ok
    assert payload["settings"]["params"]["nac_layers"]["layers"] == ["features.2", "features.5", "<features>"]
    rows = {(r["detector"], r["ood_set"]): r for r in payload["results"]}
    # far-away natural images and noise are easy for the energy score of a 98 %-accurate CNN
    assert rows[("energy", "photo-crops")]["auroc"] > 0.9
    assert rows[("energy", "uniform-noise")]["auroc"] > 0.9
    for name in ("results.csv", "leaderboard.md", "report.html"):
        assert (out / name).stat().st_size > 0


def test_outputs_are_cached_for_the_second_run(bench_run, digits_cache):
    entries = [p for p in presets.outputs_cache_dir(digits_cache).iterdir() if (p / "complete.json").exists()]
    assert len(entries) >= 11  # fit, validation, test and every OOD set


def test_open_set_variant_runs(digits_cache, tmp_path):
    code = main(["bench", "digits-open-set", "--cache-dir", str(digits_cache), "--out", str(tmp_path), "-q",
                 "--n-boot", "20", "-d", "msp,energy,knn"])  # fmt: skip
    assert code == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert "digits-6-9" in payload["groups"]["near"]


def test_model_based_detectors_join_the_leaderboard_on_request(digits_cache, tmp_path):
    code = main(["bench", "digits", "--cache-dir", str(digits_cache), "--out", str(tmp_path / "auto"), "-q",
                 "--n-boot", "10", "-d", "energy,odin,gradnorm_autograd",
                 "-p", "gradnorm_autograd.temperature=1"])  # fmt: skip
    assert code == 0
    payload = json.loads((tmp_path / "auto" / "results.json").read_text())
    ok = {row["detector"] for row in payload["status"] if row["status"] == "ok"}
    assert ok == {"energy", "odin", "gradnorm_autograd"}
    assert payload["settings"]["params"]["gradnorm_autograd"] == {"temperature": 1}
    code = main(["bench", "digits", "--cache-dir", str(digits_cache), "--out", str(tmp_path / "closed"), "-q",
                 "--n-boot", "10", "-d", "gradnorm"])  # fmt: skip
    assert code == 0
    closed = json.loads((tmp_path / "closed" / "results.json").read_text())
    # the autograd GradNorm through the real model equals the closed form on the cached outputs
    autograd = {r["ood_set"]: r["auroc"] for r in payload["results"] if r["detector"] == "gradnorm_autograd"}
    for row in closed["results"]:
        assert abs(row["auroc"] - autograd[row["ood_set"]]) < 1e-6


def test_no_model_detectors_runs_everything_from_the_cached_outputs(digits_cache, tmp_path, monkeypatch):
    from oodguard.extraction.model_runner import ModelRunner

    def refuse(*args, **kwargs):
        raise AssertionError("a model-based detector ran")

    monkeypatch.setattr(ModelRunner, "gradient_batches", refuse)
    monkeypatch.setattr(ModelRunner, "forward_views", refuse)
    code = main(["bench", "digits", "--cache-dir", str(digits_cache), "--out", str(tmp_path), "-q", "--n-boot", "10",
                 "--no-model-detectors"])  # fmt: skip
    assert code == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    ran = {row["detector"] for row in payload["status"] if row["status"] == "ok"}
    assert not ran & set(detectors.available(needs_model=True))
    assert "nac" in ran and "layers" not in payload["settings"]["params"].get("nac", {})  # closed form on outputs
