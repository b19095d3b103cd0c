"""Monitoring of a served guard: the rolling OOD rate and its binomial alert, the Prometheus text, the decision log."""

from __future__ import annotations

import doctest
import math
import re
import sqlite3
import threading

import numpy as np
import pandas as pd
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from oodguard.serve import monitor as monitor_module
from oodguard.serve import store as store_module
from oodguard.serve.monitor import LATENCY_BUCKETS, OODRateMonitor, ServiceMetrics, ood_rate_pvalue
from oodguard.serve.store import DecisionLog, database_url, read_decisions, read_info, summarise


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def binomial_upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed term by term (independent of scipy)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.parametrize("module", [monitor_module, store_module], ids=["monitor", "store"])
def test_doctests(module):
    failures, attempted = doctest.testmod(module)
    assert attempted > 0 and failures == 0


# ---------------------------------------------------------------------------- the binomial test
@pytest.mark.parametrize("k, n, alpha", [(0, 10, 0.1), (3, 10, 0.1), (12, 100, 0.05), (100, 100, 0.5), (7, 40, 0.02)])
def test_pvalue_is_the_binomial_upper_tail(k, n, alpha):
    assert ood_rate_pvalue(k, n, alpha) == pytest.approx(binomial_upper_tail(k, n, alpha), rel=1e-9, abs=1e-15)


def test_pvalue_edge_cases_and_bad_input():
    assert ood_rate_pvalue(0, 0, 0.05) == 1.0  # no decisions, no evidence
    assert ood_rate_pvalue(1, 10, 0.0) == 0.0  # a guard that never false-alarms: any OOD decision is a shift
    with pytest.raises(ValueError, match="0 <= n_ood <= n"):
        ood_rate_pvalue(5, 3, 0.05)
    with pytest.raises(ValueError, match="alpha"):
        ood_rate_pvalue(1, 3, 1.5)


def run_windows(rate: float, *, windows: int, per_window: int, alpha: float, significance: float, seed: int):
    """Feed ``windows`` consecutive windows of Bernoulli(rate) decisions; return each window's status at its end."""
    rng = np.random.default_rng(seed)
    clock = FakeClock()
    monitor = OODRateMonitor(alpha, window_seconds=60.0, significance=significance, clock=clock)
    statuses = []
    for w in range(windows):
        times = np.sort(rng.uniform(60.0 * w, 60.0 * (w + 1), size=per_window // 10))
        for t in times:  # batches of 10 decisions at random times inside the window
            clock.now = float(t)
            monitor.record(rng.random(10) < rate)
        clock.now = 60.0 * (w + 1) - 1e-6
        statuses.append(monitor.status())
    return monitor, statuses


def test_no_false_alerts_on_id_like_traffic():
    alpha, significance, windows = 0.05, 0.05, 400
    monitor, statuses = run_windows(alpha, windows=windows, per_window=200, alpha=alpha, significance=significance,
                                    seed=0)  # fmt: skip
    assert all(s.n == 200 for s in statuses)  # each status sees exactly its own window
    false_alerts = np.mean([s.alert for s in statuses])
    # The exact test has size <= significance; allow three binomial standard errors for the finite sample.
    assert false_alerts <= significance + 3 * math.sqrt(significance * (1 - significance) / windows)
    assert monitor.total == 200 * windows
    assert abs(monitor.total_ood / monitor.total - alpha) < 0.01


def test_alert_on_shifted_stream():
    _, statuses = run_windows(0.15, windows=50, per_window=200, alpha=0.05, significance=0.01, seed=1)
    assert np.mean([s.alert for s in statuses]) >= 0.9
    assert all(s.ood_rate > 0.05 for s in statuses)


def test_rolling_window_follows_a_shift_and_forgets():
    clock = FakeClock(1000.0)
    monitor = OODRateMonitor(0.05, window_seconds=10.0, significance=0.01, clock=clock)
    monitor.record([False] * 95 + [True] * 5)
    assert not monitor.status().alert
    clock.now += 5.0
    monitor.record([True] * 40)
    status = monitor.status()
    assert (status.n, status.n_ood, status.alert) == (140, 45, True)
    clock.now += 5.5  # the first batch (11 s ago) has left the 10 s window; the shifted one is still in it
    status = monitor.status()
    assert (status.n, status.n_ood, status.alert) == (40, 40, True)
    clock.now += 20.0
    status = monitor.status()
    assert (status.n, status.alert, status.pvalue) == (0, False, 1.0)
    assert (monitor.total, monitor.total_ood) == (140, 45)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 0.05, "significance": 0.0}, "significance"),
        ({"alpha": 0.05, "window_seconds": float("nan")}, "window_seconds"),
        ({"alpha": 0.05, "resolution": 0}, "resolution"),
    ],
)
def test_monitor_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OODRateMonitor(**kwargs)


# ---------------------------------------------------------------------------- Prometheus text
SAMPLE_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\.)*",?)*\})? '
                         r"(-?[0-9.e+-]+|NaN|\+Inf|-Inf)$")  # fmt: skip


def parse_prometheus(text: str) -> dict[str, float]:
    """Check every line of the exposition format and return {"name{labels}": value}."""
    assert text.endswith("\n")
    samples, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"counter", "gauge", "histogram"} and name not in typed
            typed.add(name)
            continue
        assert SAMPLE_LINE.match(line), line
        key, value = line.rsplit(" ", 1)
        samples[key] = float(value)
    return samples


def test_metrics_text_format_and_values():
    clock = FakeClock(0.0)
    metrics = ServiceMetrics(OODRateMonitor(0.1, window_seconds=60, significance=0.01, clock=clock))
    for seconds in (0.0004, 0.003, 0.003, 7.0, 60.0):
        metrics.observe_request("/v1/score", 200, seconds)
    metrics.observe_request("/v1/score", 422, 0.001)
    metrics.observe_request('odd"path\\', 404, 0.001)
    metrics.observe_decisions([True] * 30 + [False] * 70)
    samples = parse_prometheus(metrics.render())
    assert samples['oodguard_requests_total{path="/v1/score",status="200"}'] == 5
    assert samples['oodguard_requests_total{path="/v1/score",status="422"}'] == 1
    assert samples['oodguard_requests_total{path="odd\\"path\\\\",status="404"}'] == 1
    bucket = 'oodguard_request_duration_seconds_bucket{{le="{}",path="/v1/score"}}'
    assert samples[bucket.format("0.0005")] == 1
    assert samples[bucket.format("0.005")] == 4  # cumulative: 0.0004, 0.001, 0.003, 0.003
    assert samples[bucket.format("10.0")] == 5
    assert samples[bucket.format("+Inf")] == 6
    assert samples['oodguard_request_duration_seconds_count{path="/v1/score"}'] == 6
    assert samples['oodguard_request_duration_seconds_sum{path="/v1/score"}'] == pytest.approx(67.0074)
    assert samples["oodguard_decisions_total"] == 100
    assert samples["oodguard_ood_decisions_total"] == 30
    assert samples["oodguard_ood_rate"] == pytest.approx(0.3)
    assert samples["oodguard_rolling_ood_rate"] == pytest.approx(0.3)
    assert samples["oodguard_false_alarm_rate"] == pytest.approx(0.1)
    assert samples["oodguard_ood_rate_pvalue"] == pytest.approx(binomial_upper_tail(30, 100, 0.1))
    assert samples["oodguard_ood_alert"] == 1
    clock.now = 1000.0  # the window empties, the lifetime counters stay
    samples = parse_prometheus(metrics.render())
    assert (samples["oodguard_ood_alert"], samples["oodguard_rolling_decisions"]) == (0, 0)
    assert samples["oodguard_decisions_total"] == 100


#: Every family the service exposes (the parser names counters without ``_total``): type, help text.
FAMILIES = {
    "oodguard_requests": ("counter", "HTTP requests handled, by path and status code."),
    "oodguard_request_duration_seconds": ("histogram", "Time to handle an HTTP request, by path."),
    "oodguard_decisions": ("counter", "Inputs scored (one decision per input)."),
    "oodguard_ood_decisions": ("counter", "Inputs flagged as out-of-distribution."),
    "oodguard_ood_rate": ("gauge", "Fraction of inputs flagged as OOD since the service started."),
    "oodguard_rolling_window_seconds": ("gauge", "Length of the rolling monitoring window."),
    "oodguard_rolling_decisions": ("gauge", "Inputs scored in the rolling window."),
    "oodguard_rolling_ood_rate": ("gauge", "Fraction of inputs flagged as OOD in the rolling window."),
    "oodguard_false_alarm_rate": ("gauge", "Expected false-alarm rate alpha of the guard (its OOD rate on ID data)."),
    "oodguard_ood_rate_pvalue": ("gauge", "Exact one-sided binomial test of rolling OOD rate <= alpha."),
    "oodguard_alert_significance": ("gauge", "Significance level of the OOD-rate alert."),
    "oodguard_ood_alert": ("gauge", "1 when the rolling OOD rate significantly exceeds the false-alarm rate."),
    "oodguard_decision_log_pending_rows": ("gauge", "Decisions queued for the database."),
}


def library_samples(text: str) -> tuple[dict[str, tuple[str, str]], dict[tuple[str, frozenset], float]]:
    """Families {name: (type, help)} and samples {(name, labels): value} as prometheus_client parses them."""
    families, samples = {}, {}
    for family in text_string_to_metric_families(text):
        assert family.name not in families
        families[family.name] = (family.type, family.documentation)
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples
            samples[key] = sample.value
    return families, samples


def test_metrics_parsed_by_prometheus_client():
    clock = FakeClock(0.0)
    metrics = ServiceMetrics(OODRateMonitor(0.2, window_seconds=30, significance=0.05, clock=clock))
    pending = [7]
    metrics.add_gauge("oodguard_decision_log_pending_rows", "Decisions queued for the database.", lambda: pending[0])
    for seconds in (0.0005, 0.02, 3.0):
        metrics.observe_request("/v1/score", 200, seconds)
    metrics.observe_request("/healthz", 200, 0.0001)
    metrics.observe_request("/v1/score", 413, 0.0001)
    metrics.observe_decisions([True] * 4 + [False] * 6)
    metrics.observe_decisions(np.array([False, False]))
    families, samples = library_samples(metrics.render())
    assert families == FAMILIES

    def value(name: str, **labels: str) -> float:
        return samples[name, frozenset(labels.items())]

    requests = {key: v for key, v in samples.items() if key[0] == "oodguard_requests_total"}
    assert {labels: v for (_, labels), v in requests.items()} == {
        frozenset({("path", "/v1/score"), ("status", "200")}): 3,
        frozenset({("path", "/healthz"), ("status", "200")}): 1,
        frozenset({("path", "/v1/score"), ("status", "413")}): 1,
    }
    edges = [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
    score_buckets = [value("oodguard_request_duration_seconds_bucket", le=le, path="/v1/score") for le in edges]
    assert score_buckets == [2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4]  # cumulative, upper bounds inclusive
    assert value("oodguard_request_duration_seconds_count", path="/v1/score") == 4
    assert value("oodguard_request_duration_seconds_sum", path="/v1/score") == pytest.approx(3.0206)
    assert value("oodguard_request_duration_seconds_count", path="/healthz") == 1
    assert not any(name.endswith("_created") for name, _ in samples)
    assert value("oodguard_decisions_total") == 12 and value("oodguard_ood_decisions_total") == 4
    assert value("oodguard_ood_rate") == pytest.approx(4 / 12)
    assert value("oodguard_rolling_window_seconds") == 30 and value("oodguard_rolling_decisions") == 12
    assert value("oodguard_rolling_ood_rate") == pytest.approx(4 / 12)
    assert value("oodguard_false_alarm_rate") == 0.2 and value("oodguard_alert_significance") == 0.05
    assert value("oodguard_ood_rate_pvalue") == pytest.approx(binomial_upper_tail(4, 12, 0.2))
    assert value("oodguard_ood_alert") == 0
    assert value("oodguard_decision_log_pending_rows") == 7
    # Scrape-time values: the window and the added gauge are read again at every render.
    clock.now = 100.0
    pending[0] = 0
    metrics.observe_decisions([True] * 10)
    _, samples = library_samples(metrics.render())
    assert value("oodguard_rolling_decisions") == 10 and value("oodguard_rolling_ood_rate") == 1
    assert value("oodguard_ood_alert") == 1 and value("oodguard_decisions_total") == 22
    assert value("oodguard_decision_log_pending_rows") == 0


def test_metrics_have_a_registry_each():
    first = ServiceMetrics(OODRateMonitor(0.1, clock=FakeClock()))
    second = ServiceMetrics(OODRateMonitor(0.1, clock=FakeClock()))
    first.add_gauge("oodguard_decision_log_pending_rows", "Decisions queued for the database.", lambda: 1)
    second.add_gauge("oodguard_decision_log_pending_rows", "Decisions queued for the database.", lambda: 2)
    first.observe_request("/v1/score", 200, 0.01)
    first.observe_decisions([True])
    _, samples = library_samples(second.render())
    assert not any(name == "oodguard_requests_total" for name, _ in samples)
    assert samples["oodguard_decisions_total", frozenset()] == 0
    assert samples["oodguard_decision_log_pending_rows", frozenset()] == 2
    assert first.registry is not second.registry
    assert "oodguard_ood_alert" not in generate_latest(REGISTRY).decode()  # never the process-wide registry
    assert first.content_type == CONTENT_TYPE_LATEST


def test_add_gauge_replaces_its_own_name_and_refuses_others():
    metrics = ServiceMetrics(OODRateMonitor(0.1, clock=FakeClock()))
    metrics.add_gauge("oodguard_queue", "First.", lambda: 1)
    metrics.add_gauge("oodguard_queue", "Second.", lambda: 2)
    families, samples = library_samples(metrics.render())
    assert families["oodguard_queue"] == ("gauge", "Second.") and samples["oodguard_queue", frozenset()] == 2
    for name in ("oodguard_ood_alert", "oodguard_decisions_total", "oodguard_request_duration_seconds_count"):
        with pytest.raises(ValueError, match="Duplicated"):
            metrics.add_gauge(name, "Clash.", lambda: 0)
    with pytest.raises(ValueError, match="not a Prometheus metric name"):
        metrics.add_gauge("queue rows", "Spaces.", lambda: 0)
    expected = FAMILIES.keys() - {"oodguard_decision_log_pending_rows"} | {"oodguard_queue"}
    assert library_samples(metrics.render())[0].keys() == expected  # the refused gauges left nothing behind


# ---------------------------------------------------------------------------- decision log
def log_batch(log: DecisionLog, request: str, n: int, timestamp: float, ood_every: int = 0) -> None:
    is_ood = [bool(ood_every) and i % ood_every == 0 for i in range(n)]
    log.log(request, predictions=list(range(n)), scores=np.linspace(0, 1, n), pvalues=np.full(n, 0.5),
            is_ood=is_ood, timestamp=timestamp)  # fmt: skip


def test_log_rows_and_wal_mode(tmp_path):
    path = tmp_path / "nested" / "log.sqlite"
    with DecisionLog(path, alpha=0.05, significance=0.02) as log:
        log.log("a", predictions=np.array([2, 0]), scores=np.array([0.5, 3.0], dtype=np.float32),
                pvalues=None, is_ood=np.array([False, True]), timestamp=12.5)  # fmt: skip
        log.log("b", predictions=None, scores=[1.0], pvalues=[0.25], is_ood=[False], timestamp=13.0)
        assert log.flush(timeout=10)
    frame = read_decisions(path)
    assert frame[["request_id", "batch_index", "is_ood"]].values.tolist() == [["a", 0, False], ["a", 1, True],
                                                                               ["b", 0, False]]  # fmt: skip
    assert frame["prediction"].tolist()[:2] == [2, 0] and pd.isna(frame["prediction"].iloc[2])
    assert frame["pvalue"].isna().tolist() == [True, True, False]
    assert frame["timestamp"].tolist() == [12.5, 12.5, 13.0]
    assert read_info(path) == {"alpha": 0.05, "significance": 0.02}
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_writers_lose_no_rows(tmp_path):
    url = database_url(tmp_path / "log.sqlite")
    assert url.startswith("sqlite:///")
    log = DecisionLog(url, max_pending=16, batch_rows=100)  # a small queue: writers wait, nothing is dropped

    def client(k: int) -> None:
        for j in range(100):
            log_batch(log, f"{k}-{j}", n=1 + j % 3, timestamp=float(j))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()  # everything still queued is written on close
    expected = 8 * sum(1 + j % 3 for j in range(100))
    assert log.rows_written == expected and log.rows_failed == 0
    frame = read_decisions(url)
    assert len(frame) == expected
    assert frame.groupby("request_id").size().to_dict() == {f"{k}-{j}": 1 + j % 3 for k in range(8) for j in range(100)}
    with pytest.raises(RuntimeError, match="closed"):
        log_batch(log, "late", n=1, timestamp=0.0)


def test_summarise_windows_and_alerts(tmp_path):
    path = tmp_path / "log.sqlite"
    with DecisionLog(path, alpha=0.05) as log:
        log_batch(log, "quiet-1", n=100, timestamp=0.0, ood_every=20)  # 5 % OOD: as calibrated
        log_batch(log, "quiet-2", n=100, timestamp=59.9, ood_every=20)
        log_batch(log, "shifted", n=100, timestamp=125.0, ood_every=2)  # 50 % OOD, two windows later
    summary = summarise(path, window_seconds=60)
    assert summary.attrs["alpha"] == 0.05 and summary.attrs["significance"] == 0.01
    assert summary["requests"].tolist() == [2, 1]
    assert summary["n"].tolist() == [200, 100] and summary["n_ood"].tolist() == [10, 50]
    assert summary["ood_rate"].tolist() == [0.05, 0.5]
    assert summary["alert"].tolist() == [False, True]
    assert summary["pvalue"].iloc[1] == pytest.approx(binomial_upper_tail(50, 100, 0.05))
    assert summary["start"].iloc[1] == pd.Timestamp(120, unit="s", tz="UTC")
    assert summary["end"].iloc[1] == pd.Timestamp(180, unit="s", tz="UTC")
    # One long window pools everything; an explicit alpha overrides the stored one.
    pooled = summarise(path, window_seconds=3600, alpha=0.5)
    assert pooled["n"].tolist() == [300] and pooled["alert"].tolist() == [False]


def test_summarise_without_alpha_or_rows(tmp_path):
    with DecisionLog(tmp_path / "empty.sqlite"):
        pass
    assert summarise(tmp_path / "empty.sqlite").empty
    with DecisionLog(tmp_path / "log.sqlite") as log:
        log_batch(log, "a", n=10, timestamp=0.0)
    summary = summarise(tmp_path / "log.sqlite")
    assert summary["n"].tolist() == [10] and summary["pvalue"].isna().all() and summary["alert"].isna().all()


def test_log_bad_locations(tmp_path):
    with pytest.raises(FileNotFoundError, match="no decision log"):
        summarise(tmp_path / "missing.sqlite")
    with sqlite3.connect(tmp_path / "other.sqlite") as connection:
        connection.execute("CREATE TABLE t (x)")
    with pytest.raises(ValueError, match="not an oodguard decision log"):
        read_decisions(tmp_path / "other.sqlite")
    with pytest.raises(ValueError, match="in-memory"):
        DecisionLog(":memory:")
    with pytest.raises(ValueError, match="window_seconds"):
        summarise(tmp_path / "other.sqlite", window_seconds=0)
