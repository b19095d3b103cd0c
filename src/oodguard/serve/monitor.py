"""Rolling OOD rate of a deployed guard, with an alert when it significantly exceeds the false-alarm rate.

A calibrated guard flags in-distribution (ID) inputs as OOD at its false-alarm rate ``alpha`` (``1 - TPR``
for a threshold set at a target ID true-positive rate; the level of the conformal test for p-values). On
ID-like traffic the OOD decisions in a window are then (at most) Binomial(n, alpha); a window whose count
of OOD decisions is improbably high under that law signals a shift in the inputs. The test is the exact
one-sided binomial test (``scipy.stats.binomtest``, ``alternative="greater"``) of H0: rate <= alpha, and
the alert fires when its p-value is below the chosen significance level. Because the test is exact, on
ID traffic a window alerts with probability at most the significance level (less for small windows,
where the discrete test is conservative).

A threshold calibrated on a finite ID set has a false-alarm rate that itself varies around ``alpha``
from one calibration set to another; with very large windows the test detects that small excess too.
Use the calibration-conditional level of the guard, if it has one, as ``alpha`` to bound that effect.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from scipy.stats import binomtest

__all__ = ["OODRateMonitor", "ServiceMetrics", "WindowStatus", "ood_rate_pvalue"]


def ood_rate_pvalue(n_ood: int, n: int, alpha: float) -> float:
    """P-value of the exact one-sided binomial test of H0: OOD rate <= ``alpha`` given ``n_ood`` of ``n``.

    Small p-values mean more OOD decisions than a guard with false-alarm rate ``alpha`` makes on ID data.
    An empty window has p-value 1 (no evidence).

    Examples
    --------
    >>> round(ood_rate_pvalue(5, 100, 0.05), 3), round(ood_rate_pvalue(15, 100, 0.05), 5)
    (0.564, 0.00014)
    """
    _check_rate(alpha, "alpha")
    if n < 0 or not 0 <= n_ood <= n:
        raise ValueError(f"expected 0 <= n_ood <= n, got n_ood={n_ood}, n={n}")
    if n == 0:
        return 1.0
    return float(binomtest(int(n_ood), int(n), float(alpha), alternative="greater").pvalue)


def _check_rate(value: float, name: str) -> None:
    if not isinstance(value, (int, float, np.floating)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: expected a rate in [0, 1], got {value!r}")


@dataclass(frozen=True)
class WindowStatus:
    """Counts and test result of one time window of OOD decisions.

    Attributes
    ----------
    start, end : float
        The window's time span, in the monitor's clock (seconds).
    n, n_ood : int
        Decisions in the window, and how many of them were OOD.
    ood_rate : float
        ``n_ood / n`` (0 for an empty window).
    pvalue : float
        P-value of :func:`ood_rate_pvalue` against the guard's false-alarm rate.
    alert : bool
        ``pvalue < significance``: more OOD decisions than the false-alarm rate explains.
    """

    start: float
    end: float
    n: int
    n_ood: int
    ood_rate: float
    pvalue: float
    alert: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class OODRateMonitor:
    """Rolling OOD rate over the last ``window_seconds``, tested against the false-alarm rate ``alpha``.

    Decisions are counted in ``resolution`` buckets per window, so the rolling window covers the last
    ``window_seconds`` to within ``window_seconds / resolution``; memory stays constant whatever the
    traffic. Thread-safe: the service records from several worker threads.

    Parameters
    ----------
    alpha : float
        The guard's calibrated false-alarm rate (expected OOD rate on ID traffic).
    window_seconds : float, default 60
        Length of the rolling window.
    significance : float, default 0.01
        Level of the binomial test: on ID traffic a window alerts with probability at most this.
    resolution : int, default 10
        Buckets per window.
    clock : callable, default ``time.time``
        Returns the current time in seconds; a fake clock makes tests deterministic.

    Attributes
    ----------
    total, total_ood : int
        Decisions recorded since creation, and how many were OOD.

    Examples
    --------
    >>> now = [0.0]
    >>> monitor = OODRateMonitor(alpha=0.05, window_seconds=60, clock=lambda: now[0])
    >>> monitor.record([False] * 90 + [True] * 10)
    >>> status = monitor.status()
    >>> status.n, status.ood_rate, status.alert
    (100, 0.1, False)
    >>> monitor.record([True] * 20)
    >>> monitor.status().alert
    True
    >>> now[0] = 120.0  # two windows later the old decisions have left the window
    >>> monitor.status().n
    0
    """

    def __init__(
        self,
        alpha: float,
        *,
        window_seconds: float = 60.0,
        significance: float = 0.01,
        resolution: int = 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_rate(alpha, "alpha")
        if not (isinstance(significance, (int, float)) and 0.0 < significance < 1.0):
            raise ValueError(f"significance: expected a level in (0, 1), got {significance!r}")
        if not (isinstance(window_seconds, (int, float)) and math.isfinite(window_seconds) and window_seconds > 0):
            raise ValueError(f"window_seconds: expected a positive number of seconds, got {window_seconds!r}")
        if not (isinstance(resolution, int) and resolution >= 1):
            raise ValueError(f"resolution: expected a positive number of buckets, got {resolution!r}")
        self.alpha = float(alpha)
        self.window_seconds = float(window_seconds)
        self.significance = float(significance)
        self.resolution = resolution
        self.clock = clock
        self._bucket_seconds = self.window_seconds / resolution
        self._buckets: deque[list[int]] = deque()  # [bucket index, n, n_ood], oldest first
        self._lock = threading.Lock()
        self.total = 0
        self.total_ood = 0

    def record(self, is_ood: Any) -> None:
        """Count a batch of decisions (booleans, True = OOD) at the current time."""
        decisions = np.asarray(is_ood, dtype=bool).reshape(-1)
        n, n_ood = int(decisions.size), int(np.count_nonzero(decisions))
        self.record_counts(n, n_ood)

    def record_counts(self, n: int, n_ood: int) -> None:
        """Count ``n`` decisions of which ``n_ood`` were OOD, at the current time."""
        if n < 0 or not 0 <= n_ood <= n:
            raise ValueError(f"expected 0 <= n_ood <= n, got n_ood={n_ood}, n={n}")
        if n == 0:
            return
        bucket = math.floor(self.clock() / self._bucket_seconds)
        with self._lock:
            self.total += n
            self.total_ood += n_ood
            if self._buckets and self._buckets[-1][0] == bucket:
                self._buckets[-1][1] += n
                self._buckets[-1][2] += n_ood
            elif self._buckets and self._buckets[-1][0] > bucket:  # clock stepped back: count it as now
                self._buckets[-1][1] += n
                self._buckets[-1][2] += n_ood
            else:
                self._buckets.append([bucket, n, n_ood])
            self._prune(bucket)

    def _prune(self, bucket: int) -> None:
        while self._buckets and self._buckets[0][0] <= bucket - self.resolution:
            self._buckets.popleft()

    def status(self) -> WindowStatus:
        """Counts, rate and test of the rolling window ending now."""
        now = self.clock()
        bucket = math.floor(now / self._bucket_seconds)
        with self._lock:
            self._prune(bucket)
            n = sum(b[1] for b in self._buckets)
            n_ood = sum(b[2] for b in self._buckets)
        pvalue = ood_rate_pvalue(n_ood, n, self.alpha)
        return WindowStatus(
            start=(bucket - self.resolution + 1) * self._bucket_seconds,
            end=now,
            n=n,
            n_ood=n_ood,
            ood_rate=n_ood / n if n else 0.0,
            pvalue=pvalue,
            alert=pvalue < self.significance,
        )

    def __repr__(self) -> str:
        return (
            f"OODRateMonitor(alpha={self.alpha}, window_seconds={self.window_seconds}, "
            f"significance={self.significance}, total={self.total}, total_ood={self.total_ood})"
        )


#: Upper bounds (seconds) of the request latency histogram's buckets.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")

#: Counters read from the monitor at scrape time: family name (exposed with ``_total``), help text.
_DECISION_COUNTERS = (
    ("oodguard_decisions", "Inputs scored (one decision per input)."),
    ("oodguard_ood_decisions", "Inputs flagged as out-of-distribution."),
)
#: Gauges read from the monitor at scrape time: name, help text.
_MONITOR_GAUGES = (
    ("oodguard_ood_rate", "Fraction of inputs flagged as OOD since the service started."),
    ("oodguard_rolling_window_seconds", "Length of the rolling monitoring window."),
    ("oodguard_rolling_decisions", "Inputs scored in the rolling window."),
    ("oodguard_rolling_ood_rate", "Fraction of inputs flagged as OOD in the rolling window."),
    ("oodguard_false_alarm_rate", "Expected false-alarm rate alpha of the guard (its OOD rate on ID data)."),
    ("oodguard_ood_rate_pvalue", "Exact one-sided binomial test of rolling OOD rate <= alpha."),
    ("oodguard_alert_significance", "Significance level of the OOD-rate alert."),
    ("oodguard_ood_alert", "1 when the rolling OOD rate significantly exceeds the false-alarm rate."),
)


class _MonitorCollector(Collector):
    """The decision counters and rolling-window gauges of a monitor, read when the registry is scraped.

    One :meth:`OODRateMonitor.status` per scrape, so the window's count, rate, p-value and alert agree.
    """

    def __init__(self, monitor: OODRateMonitor) -> None:
        self.monitor = monitor

    def describe(self) -> Iterator[Metric]:
        """The families' names and types without reading the monitor (lets the registry refuse clashes)."""
        for name, help_text in _DECISION_COUNTERS:
            yield CounterMetricFamily(name, help_text)
        for name, help_text in _MONITOR_GAUGES:
            yield GaugeMetricFamily(name, help_text)

    def collect(self) -> Iterator[Metric]:
        m = self.monitor
        window = m.status()
        total, total_ood = m.total, m.total_ood
        values = {
            "oodguard_decisions": total,
            "oodguard_ood_decisions": total_ood,
            "oodguard_ood_rate": total_ood / total if total else 0.0,
            "oodguard_rolling_window_seconds": m.window_seconds,
            "oodguard_rolling_decisions": window.n,
            "oodguard_rolling_ood_rate": window.ood_rate,
            "oodguard_false_alarm_rate": m.alpha,
            "oodguard_ood_rate_pvalue": window.pvalue,
            "oodguard_alert_significance": m.significance,
            "oodguard_ood_alert": float(window.alert),
        }
        for name, help_text in _DECISION_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=values[name])  # no created timestamp: no _created
        for name, help_text in _MONITOR_GAUGES:
            yield GaugeMetricFamily(name, help_text, value=values[name])


class _WithoutCreated(Collector):
    """The families of the library's counters and histograms, less their ``_created`` samples.

    prometheus_client adds a ``_created`` timestamp to every counter and histogram; turning that off is a
    process-wide switch, so this registry drops the samples itself instead.
    """

    def __init__(self, *metrics: MetricWrapperBase) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        for metric in self.metrics:
            yield from metric.describe()

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            for family in metric.collect():
                family.samples = [s for s in family.samples if s.name != family.name + "_created"]
                yield family


class ServiceMetrics:
    """Counters of the HTTP service, exposed in the Prometheus text format by ``prometheus_client``.

    Requests are counted by path and status code with a latency histogram per path; decisions are
    counted in total and as OOD, and the rolling window of an :class:`OODRateMonitor` gives the current
    OOD rate, its binomial-test p-value and the alert gauge, read when the metrics are scraped. Each
    instance has its own registry (``registry``), so several services in one process do not share
    metrics. Thread-safe.

    Examples
    --------
    >>> metrics = ServiceMetrics(OODRateMonitor(alpha=0.05, clock=lambda: 0.0))
    >>> metrics.observe_request("/v1/score", 200, 0.0015)
    >>> metrics.observe_decisions([False, True])
    >>> text = metrics.render()
    >>> 'oodguard_requests_total{path="/v1/score",status="200"} 1.0' in text.splitlines()
    True
    >>> 'oodguard_ood_decisions_total 1.0' in text.splitlines()
    True
    >>> metrics.content_type.startswith("text/plain")
    True
    """

    #: Media type of :meth:`render`'s text.
    content_type: str = CONTENT_TYPE_LATEST

    def __init__(self, monitor: OODRateMonitor, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.monitor = monitor
        self.buckets = tuple(sorted(buckets))
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "oodguard_requests", "HTTP requests handled, by path and status code.", ["path", "status"], registry=None
        )
        self._latency = Histogram(
            "oodguard_request_duration_seconds",
            "Time to handle an HTTP request, by path.",
            ["path"],
            buckets=self.buckets,
            registry=None,
        )
        self.registry.register(_WithoutCreated(self._requests, self._latency))
        self.registry.register(_MonitorCollector(monitor))
        self.extra_gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self._extra: dict[str, Gauge] = {}
        self._extra_lock = threading.Lock()

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        """Count one HTTP request with its status code and latency in seconds."""
        self._requests.labels(path=path, status=str(status)).inc()
        self._latency.labels(path=path).observe(seconds)

    def observe_decisions(self, is_ood: Any) -> None:
        """Count a request's decisions (True = OOD) and feed them to the rolling monitor."""
        self.monitor.record(is_ood)

    def add_gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Expose ``read()`` as gauge ``name`` (read at every scrape).

        Adding a gauge under the name of one added before replaces it; a name that is not a valid metric
        name, or that another metric of the service uses, raises ``ValueError``.
        """
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"add_gauge: {name!r} is not a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)")
        gauge = Gauge(name, help_text, registry=None)
        gauge.set_function(lambda: float(read()))
        with self._extra_lock:
            previous = self._extra.get(name)
            if previous is not None:
                self.registry.unregister(previous)
            self.registry.register(gauge)  # refuses a name that another metric of the service uses
            self._extra[name] = gauge
            self.extra_gauges[name] = (help_text, read)

    def render(self) -> str:
        """All metrics in the Prometheus text format (media type :attr:`content_type`)."""
        return generate_latest(self.registry).decode()
