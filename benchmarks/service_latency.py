"""Latency and throughput of the HTTP service (``oodguard serve``) on single-sample features requests.

A model-agnostic guard (Mahalanobis on synthetic penultimate features) is saved, served by uvicorn on
127.0.0.1 in a subprocess, and measured from this process over keep-alive HTTP connections:

- latency: one client sends single-sample ``{"features": [[...]]}`` requests one after another;
  median and tail of the round trip (client + HTTP + validation + scoring + logging);
- throughput: 8 concurrent clients (threads) for a fixed number of requests each.

The baseline, measured in the same process, is the guard's own ``guard.guard`` call on the same single
sample: the service overhead is the difference. The run is repeated with the decision log off and on:
SQLite (WAL, ``synchronous=FULL``) and, with ``--postgres-url``, PostgreSQL. With a log, every response is
sent only after its decisions are committed (group commit). Prints a Markdown table; the target is a median
under 10 ms and a p99 under 40 ms at 8 clients with durable logging, and no errors.

    OMP_NUM_THREADS=1 python benchmarks/service_latency.py [--postgres-url postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from oodguard.guard import Guard


def synthetic_guard(dim: int, classes: int, seed: int = 0) -> tuple[Guard, np.ndarray]:
    """A Mahalanobis guard fitted and calibrated on Gaussian class clusters; returns it and ID test rows."""
    rng = np.random.default_rng(seed)
    means = 3.0 * rng.normal(size=(classes, dim))
    weight, bias = means.astype(np.float32), np.zeros(classes, dtype=np.float32)

    def sample(n: int) -> dict[str, np.ndarray]:
        labels = rng.integers(0, classes, n)
        features = (means[labels] + rng.normal(size=(n, dim))).astype(np.float32)
        return {"features": features, "labels": labels, "head": (weight, bias)}

    guard = Guard(detector="mahalanobis").fit(sample(20 * classes + dim))
    guard.calibrate({"features": sample(1000)["features"]}, tpr=0.95)
    return guard, sample(200)["features"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, directory: Path, log: str | None) -> None:
        self.port = free_port()
        args = ["--no-log"] if log is None else ["--log", log]
        command = [sys.executable, "-m", "oodguard.cli", "serve", str(directory), "--port", str(self.port), *args]
        env = {k: v for k, v in os.environ.items() if k != "OODGUARD_TOKEN"}
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read().decode()}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    connection.close()
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError("server did not start within 60 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def post_loop(port: int, bodies: list[bytes], latencies: list[float]) -> None:
    """Send every body over one keep-alive connection; append each round trip's seconds."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    try:
        for body in bodies:
            started = time.perf_counter()
            connection.request("POST", "/v1/score", body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            latencies.append(time.perf_counter() - started)
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
    finally:
        connection.close()


def measure(port: int, rows: np.ndarray, requests: int, clients: int) -> dict[str, float]:
    bodies = [json.dumps({"features": [rows[i % len(rows)].tolist()]}).encode() for i in range(requests)]
    post_loop(port, bodies[:200], [])  # warm-up
    latencies: list[float] = []
    post_loop(port, bodies, latencies)
    per_client = requests // clients
    results: list[list[float]] = [[] for _ in range(clients)]
    threads = [
        threading.Thread(target=post_loop, args=(port, bodies[k * per_client : (k + 1) * per_client], results[k]))
        for k in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    done = sum(len(r) for r in results)
    if done != per_client * clients:
        raise RuntimeError(f"only {done} of {per_client * clients} concurrent requests completed")
    concurrent = [x for r in results for x in r]
    return {
        "median_ms": 1e3 * statistics.median(latencies),
        "p99_ms": 1e3 * float(np.quantile(latencies, 0.99)),
        "throughput": done / elapsed,
        "concurrent_median_ms": 1e3 * statistics.median(concurrent),
        "concurrent_p99_ms": 1e3 * float(np.quantile(concurrent, 0.99)),
        "errors": requests - done,
    }


def baseline_ms(guard: Guard, rows: np.ndarray, repeats: int) -> float:
    times = []
    for i in range(repeats):
        x = {"features": rows[i % len(rows)][None, :]}
        started = time.perf_counter()
        guard.guard(x)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def run(
    dim: int = 512, classes: int = 10, requests: int = 2000, clients: int = 8, postgres_url: str | None = None
) -> list[dict[str, object]]:
    guard, rows = synthetic_guard(dim, classes)
    direct = baseline_ms(guard, rows, 2000)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        guard.save(Path(folder) / "guard")
        logs = [("off", None), ("SQLite (WAL, synchronous=FULL)", str(Path(folder) / "decisions.sqlite"))]
        if postgres_url:
            logs.append(("PostgreSQL", postgres_url))
        for label, log in logs:
            server = Server(Path(folder) / "guard", log)
            try:
                numbers = measure(server.port, rows, requests, clients)
            finally:
                server.stop()
            results.append({"decision log": label, "guard.guard_ms": direct, **numbers})
    return results


def table(results: list[dict[str, object]], dim: int, clients: int) -> str:
    lines = [
        f"| decision log | guard.guard in process, ms | 1 client: median, ms | 1 client: p99, ms | {clients} clients: "
        f"req/s | {clients} clients: median, ms | {clients} clients: p99, ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['decision log']} | {r['guard.guard_ms']:.3f} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['throughput']:.0f} | {r['concurrent_median_ms']:.2f} | {r['concurrent_p99_ms']:.2f} | {r['errors']} |"
        )
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    lines.append(
        f"\nSingle-sample features requests (D={dim}, Mahalanobis), uvicorn on 127.0.0.1, "
        f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={threads}; with a log, each reply waits for its commit."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=512, help="feature dimension D")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for the throughput")
    parser.add_argument("--postgres-url", default=None, help="also measure a PostgreSQL decision log (SQLAlchemy URL)")
    args = parser.parse_args()
    results = run(args.dim, args.classes, args.requests, args.clients, args.postgres_url)
    print(table(results, args.dim, args.clients))


if __name__ == "__main__":
    main()
