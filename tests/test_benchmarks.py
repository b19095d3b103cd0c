"""The performance scripts in benchmarks/ keep working (tiny scale; the real runs are recorded in docs/)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from oodguard import detectors

pytestmark = pytest.mark.slow  # runs the measurement scripts, one of them against a live server

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_detector_speed_script_times_every_detector_against_a_bound():
    speed = load("detector_speed")
    rows = speed.run("tiny", detectors.available(), repeats=1)
    output_based = [n for n in detectors.available(needs_model=False) if "layers" not in detectors.info(n)["requires"]]
    assert [row["detector"] for row in rows] == output_based
    for row in rows:
        assert row["score_s"] > 0 and row["bound_s"] > 0, row
    assert "| knn |" in speed.table(rows, "tiny")


def test_service_latency_script_measures_a_live_server():
    latency = load("service_latency")
    results = latency.run(dim=16, classes=3, requests=40, clients=2)
    assert results and all(row["median_ms"] > 0 for row in results), results
    assert "median" in latency.table(results, 16, 2)


def test_model_cost_script_counts_forward_pass_equivalents():
    cost = load("model_cost")
    rows = cost.run(["odin", "cover", "nac_layers", "gradnorm_autograd"], digits_n=8, resnet_n=2, repeats=1)
    assert {row["detector"] for row in rows} >= {"odin", "cover", "nac_layers", "gradnorm_autograd"}
    assert {row["detector"] for row in rows} >= {"explain (energy)", "explain (mahalanobis)"}
    assert not [row for row in rows if "skipped" in row]


def test_extraction_overhead_script_compares_extract_with_a_bare_loop():
    overhead = load("extraction_overhead")
    rows = overhead.run(n=64, batch_size=32, repeats=1)
    assert [row["output"] for row in rows] == ["tensor", "dict", "ModelOutput-like"]
    assert all(row["bare_s"] > 0 and row["extract_s"] > 0 for row in rows)
    assert "| dict |" in overhead.table(rows, 64)


def test_knn_index_script_compares_backends():
    pytest.importorskip("faiss")
    script = load("knn_index")
    rows = script.run(bank=3000, dim=16, queries=100, k=5, nprobes=(2, 50))
    labels = ["torch exact", "faiss flat", "faiss ivf, nprobe=2", "faiss ivf, nprobe=50", "faiss hnsw"]
    assert [row["backend"] for row in rows] == labels
    assert rows[1]["recall"] == 1.0 and all(0 <= row["recall"] <= 1 for row in rows)
    assert rows[3]["recall"] >= rows[2]["recall"] and rows[3]["fit_s"] == rows[2]["fit_s"]  # one index, two nprobes
    assert all(row["peak_gb"] > 0 for row in rows)
    assert "| faiss ivf, nprobe=2 |" in script.table(rows, 3000, 16, 100, 5)
    skipped = script.run(bank=3000, dim=16, queries=100, k=5, skip=frozenset({"flat", "hnsw"}))
    assert [row["backend"] for row in skipped] == ["torch exact", "faiss ivf, nprobe=16"]
