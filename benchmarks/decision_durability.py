"""Acknowledged decisions survive ``kill -9``: no request that got a 200 is missing from the decision log.

Each run saves a model-agnostic guard, starts ``oodguard serve`` on 127.0.0.1 with a decision log (SQLite by
default, or ``--log-url``), and has several clients send 100-row requests as fast as they can, recording the
request id of every 200. After a random delay the server is killed with SIGKILL (no shutdown, no flush). The
log is then read: every acknowledged request must be there with all its rows. Requests that were not
acknowledged may or may not be there (the client cannot know; it retries).

    python benchmarks/decision_durability.py --runs 20
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from oodguard.guard import Guard
from oodguard.serve import read_decisions


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def synthetic_guard(dim: int = 32, seed: int = 0) -> tuple[Guard, np.ndarray]:
    """A KNN guard on Gaussian features and a linear head; returns it and rows to send."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(5, dim)).astype(np.float32)

    def sample(n: int) -> dict[str, object]:
        return {"features": rng.normal(size=(n, dim)).astype(np.float32), "head": (weight, np.zeros(5, np.float32))}

    guard = (
        Guard(detector="knn", detector_params={"k": 5})
        .fit(sample(200))
        .calibrate({"features": sample(400)["features"]}, alpha=0.05)
    )
    return guard, sample(1000)["features"]


def start_server(directory: Path, log_url: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [sys.executable, "-m", "oodguard.cli", "serve", str(directory), "--port", str(port), "--log", log_url]
    env = {k: v for k, v in os.environ.items() if k != "OODGUARD_TOKEN"} | {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read().decode() if process.stderr else ''}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                connection.close()
                return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise TimeoutError("server did not start within 60 s")


def client_loop(port: int, rows: np.ndarray, per_request: int, acknowledged: list[str], seed: int) -> None:
    """Send requests until the server goes away; record the id of every acknowledged (200) request."""
    rng = np.random.default_rng(seed)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            batch = rows[rng.integers(0, len(rows), per_request)]
            body = json.dumps({"features": batch.tolist()})
            connection.request("POST", "/v1/score", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                acknowledged.append(response.headers["X-Request-ID"])
    except (OSError, http.client.HTTPException):
        return  # killed: the connection broke


def run_once(
    directory: Path, log_url: str, rows: np.ndarray, *, clients: int = 4, per_request: int = 100, seed: int = 0
) -> dict[str, int]:
    """One kill -9 run; returns how many requests were acknowledged and how many of those are missing."""
    chooser = random.Random(seed)
    process, port = start_server(directory, log_url)
    acknowledged: list[list[str]] = [[] for _ in range(clients)]
    threads = [
        threading.Thread(target=client_loop, args=(port, rows, per_request, acknowledged[k], seed * 100 + k))
        for k in range(clients)
    ]
    for thread in threads:
        thread.start()
    time.sleep(chooser.uniform(0.5, 2.0))
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    for thread in threads:
        thread.join(timeout=60)
    acked = [rid for entries in acknowledged for rid in entries]
    logged = read_decisions(log_url).groupby("request_id").size().to_dict()
    missing = [rid for rid in acked if logged.get(rid, 0) != per_request]
    return {"acknowledged": len(acked), "logged_requests": len(logged), "lost": len(missing)}


def run(runs: int = 20, log_url: str | None = None, clients: int = 4) -> list[dict[str, int]]:
    guard, rows = synthetic_guard()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder) / "guard"
        guard.save(directory)
        for seed in range(runs):
            url = log_url or f"sqlite:///{Path(folder) / f'decisions-{seed}.sqlite'}"  # a fresh log per run
            results.append({"run": seed, **run_once(directory, url, rows, clients=clients, seed=seed)})
    return results


def table(results: list[dict[str, int]]) -> str:
    lines = ["| run | acknowledged requests | requests in the log | acknowledged but lost |", "|---:|---:|---:|---:|"]
    # (with one --log-url for every run, 'requests in the log' counts all runs so far)
    lines += [f"| {r['run']} | {r['acknowledged']} | {r['logged_requests']} | {r['lost']} |" for r in results]
    total = sum(r["acknowledged"] for r in results)
    lines.append(
        f"\n{len(results)} kill -9 runs: {total} acknowledged requests, {sum(r['lost'] for r in results)} lost."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--log-url", default=None, help="decision log URL (default: a SQLite file per session)")
    args = parser.parse_args()
    results = run(args.runs, args.log_url, args.clients)
    print(table(results))
    if any(r["lost"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
