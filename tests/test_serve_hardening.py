"""The service as an operator and an attacker meet it: durable decisions, inputs outside the guard's range, refusals
before the body, slow and piled-up clients, shutdown with a deadline, several workers sharing a PostgreSQL log."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from oodguard import Guard
from oodguard.cli import main
from oodguard.serve import create_app, read_decisions

from detector_data import id_outputs
from live_server import Server

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "guard.md"


@pytest.fixture(scope="module")
def outputs_guard() -> Guard:
    return Guard(detector="mahalanobis").fit(id_outputs(40, seed=1)).calibrate(id_outputs(40, seed=2), alpha=0.1)


@pytest.fixture(scope="module")
def pixel_guard() -> Guard:
    """A model guard fitted on 'pixels' in [0, 1]."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    generator = torch.Generator().manual_seed(1)
    fit, calibration = torch.rand(60, 4, generator=generator), torch.rand(100, 4, generator=generator)
    return Guard(model, detector="energy").fit(fit).calibrate(calibration, alpha=0.1)


def rows(n: int, seed: int) -> list[list[float]]:
    return id_outputs(1, seed).features.numpy()[:n].tolist()


# ---------------------------------------------------------------------------- the input contract
def test_inputs_outside_the_fitted_range_are_decided_ood_with_a_reason(pixel_guard):
    pixels = torch.rand(3, 4, generator=torch.Generator().manual_seed(5))
    with TestClient(create_app(pixel_guard)) as client:
        fine = client.post("/v1/score", json={"inputs": pixels.tolist()}).json()
        assert fine["reasons"] == [None] * 3 and all(score is not None for score in fine["scores"])
        as_bytes = client.post("/v1/score", json={"inputs": (pixels * 255).tolist()}).json()  # 0-255, not [0, 1]
        assert as_bytes["is_ood"] == [True] * 3 and as_bytes["scores"] == [None] * 3
        assert all(re.match(r"inputs: value \d+\.?\d* outside \[-0\.2\d+, 1\.2\d+\]", r) for r in as_bytes["reasons"])
        assert as_bytes["pvalues"] == [0.0] * 3 and as_bytes["predictions"] == [None] * 3
        text = '{"inputs": [' + json.dumps(pixels[0].tolist()) + ", [0.5, 0.5, 0.5, 1e400]]}"  # 1e400: valid JSON
        mixed = client.post("/v1/score", content=text, headers={"content-type": "application/json"})
        assert mixed.status_code == 200, mixed.text  # a finite number in the text, beyond any float: OOD, not 422
        body = mixed.json()
        assert body["is_ood"][1] and "NaN or infinite" in body["reasons"][1] and body["reasons"][0] is None
        huge = client.post("/v1/score", json={"inputs": [[3e38, 1e300, -1e300, 1e39]]}).json()
        assert huge["is_ood"] == [True] and "outside" in huge["reasons"][0]
        batch = client.post("/v1/score", json={"inputs": (pixels * 255).tolist(), "fdr": 0.1}).json()
        assert batch["is_ood"] == [True] * 3


def test_schema_says_what_the_guard_expects_and_its_example_is_accepted(pixel_guard, outputs_guard):
    with TestClient(create_app(pixel_guard)) as client:
        schema = client.get("/v1/schema").json()
        assert schema["mode"] == "inputs" and schema["fields"]["inputs"]["row_shape"] == [4]
        assert schema["fields"]["inputs"]["dtype"] == "float32"
        low, high = schema["fields"]["inputs"]["seen_range"]
        assert 0 <= low < 0.1 and 0.9 < high <= 1
        accepted = schema["fields"]["inputs"]["accepted_range"]
        assert accepted[0] == pytest.approx(low - 0.25 * (high - low))
        response = client.post("/v1/score", json=schema["example"])
        assert response.status_code == 200 and response.json()["reasons"] == [None]
    with TestClient(create_app(outputs_guard)) as client:
        schema = client.get("/v1/schema").json()
        assert schema["mode"] == "outputs" and set(schema["fields"]) == {"logits", "features"}
        assert schema["fields"]["features"]["row_shape"] == [32] and schema["max_body_bytes"] == 1 << 20
        assert client.post("/v1/score", json=schema["example"]).status_code == 200


# ---------------------------------------------------------------------------- durable decisions
def test_a_locked_log_gets_503_not_a_silent_200(outputs_guard, tmp_path):
    """A real lock on the SQLite log: requests wait for their commit, then get 503; none is acknowledged unlogged."""
    path = tmp_path / "log.sqlite"
    app = create_app(outputs_guard, log_url=str(path), commit_timeout=0.5)
    with TestClient(app) as client:
        first = client.post("/v1/score", json={"features": rows(2, seed=3)})
        assert first.status_code == 200 and first.headers["x-decision-logged"] == "true"
        blocker = sqlite3.connect(path, timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            refused = client.post("/v1/score", json={"features": rows(2, seed=4)})
            assert refused.status_code == 503 and "could not be logged" in refused.json()["detail"]
            assert "nothing was acknowledged" in refused.json()["detail"]
        finally:
            blocker.rollback()
            blocker.close()
        after = client.post("/v1/score", json={"features": rows(1, seed=5)})
        assert after.status_code == 200
    logged = read_decisions(path)
    assert {first.json()["request_id"], after.json()["request_id"]} <= set(logged["request_id"])


def test_allow_unlogged_serves_and_says_so(outputs_guard, tmp_path):
    path = tmp_path / "log.sqlite"
    app = create_app(outputs_guard, log_url=str(path), commit_timeout=0.5, allow_unlogged=True)
    with TestClient(app) as client:
        blocker = sqlite3.connect(path, timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            served = client.post("/v1/score", json={"features": rows(1, seed=4)})
            assert served.status_code == 200 and served.headers["x-decision-logged"] == "false"
        finally:
            blocker.rollback()
            blocker.close()
    with TestClient(create_app(outputs_guard)) as client:
        assert client.post("/v1/score", json={"features": rows(1, seed=4)}).headers["x-decision-logged"] == "off"


@pytest.mark.slow
def test_kill_9_loses_no_acknowledged_decision():
    """The full 20-run loop is benchmarks/decision_durability.py (docs/guard.md records it)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "decision_durability.py"
    spec = importlib.util.spec_from_file_location("decision_durability", path)
    durability = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(durability)
    results = durability.run(runs=2, clients=3)
    assert all(r["acknowledged"] > 0 for r in results), results
    assert [r["lost"] for r in results] == [0, 0], results


# ---------------------------------------------------------------------------- a real server under abuse
@pytest.fixture(scope="module")
def hardened(outputs_guard, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hardened") / "guard"
    outputs_guard.save(directory)
    server = Server(directory, "--body-timeout", "1", "--max-bodies-in-flight", "2", "--shutdown-timeout", "2",
                    "--max-body-bytes", "200000", env={"OODGUARD_TOKEN": "tok"})  # fmt: skip
    server.wait_ready()
    yield server
    server.stop()


def raw_request(port: int, head: str, body: bytes = b"") -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=5)
    connection.sendall(head.encode() + b"\r\n" + body)
    return connection


def status_of(connection: socket.socket, timeout: float) -> int:
    connection.settimeout(timeout)
    received = connection.recv(4096).decode(errors="replace")
    match = re.match(r"HTTP/1\.1 (\d{3})", received)
    assert match, received
    return int(match.group(1))


def post_head(length: int, token: str | None) -> str:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
            f"{auth}")  # fmt: skip


@pytest.mark.slow
def test_no_token_is_refused_before_the_body_is_sent(hardened):
    for token in (None, "wrong"):
        connection = raw_request(hardened.port, post_head(150_000, token))  # announces a body, sends none
        started = time.monotonic()
        assert status_of(connection, timeout=3) == 401 and time.monotonic() - started < 2
        connection.close()
    for path in ("/docs", "/openapi.json", "/v1/schema", "/metrics"):
        assert httpx.get(hardened.url + path).status_code == 401
    assert httpx.get(hardened.url + "/healthz").status_code == 200


@pytest.mark.slow
def test_slow_bodies_time_out_and_bodies_in_flight_are_bounded(hardened):
    body = json.dumps({"features": rows(1, seed=3)}).encode()
    slow = [raw_request(hardened.port, post_head(len(body), "tok"), body[:10]) for _ in range(2)]
    time.sleep(0.2)
    third = raw_request(hardened.port, post_head(len(body), "tok"), body)
    assert status_of(third, timeout=3) == 503  # two bodies already being received
    third.close()
    started = time.monotonic()
    assert [status_of(connection, timeout=5) for connection in slow] == [408, 408]
    assert time.monotonic() - started < 3
    for connection in slow:
        connection.close()
    good = httpx.post(hardened.url + "/v1/score", content=body, headers={"Authorization": "Bearer tok",
                      "Content-Type": "application/json"})  # fmt: skip
    assert good.status_code == 200


@pytest.mark.slow
def test_shutdown_has_a_deadline_even_with_a_slow_client(outputs_guard, tmp_path):
    outputs_guard.save(tmp_path / "guard")
    server = Server(tmp_path / "guard", "--shutdown-timeout", "2", "--no-log")
    server.wait_ready()
    hanging = raw_request(server.port, post_head(100_000, None), b'{"features": [[')  # never finishes
    time.sleep(0.3)
    started = time.monotonic()
    server.process.terminate()  # SIGTERM
    server.process.wait(timeout=15)
    assert time.monotonic() - started < 8
    hanging.close()


# ---------------------------------------------------------------------------- replicas sharing PostgreSQL
@pytest.mark.slow
def test_two_workers_share_a_postgresql_log_read_by_monitor(outputs_guard, postgres_url, tmp_path, capsys):
    outputs_guard.save(tmp_path / "guard")
    server = Server(tmp_path / "guard", "--workers", "2", "--log", postgres_url)
    server.wait_ready()
    acknowledged: list[str] = []
    failures: list[int] = []

    def client_loop(seed: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for i in range(40):
                response = client.post("/v1/score", json={"features": rows(2, seed=seed * 100 + i)})
                (acknowledged.append(response.json()["request_id"]) if response.status_code == 200
                 else failures.append(response.status_code))  # fmt: skip

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert server.stop() == 0 and not failures
    logged = read_decisions(postgres_url)
    assert set(acknowledged) <= set(logged["request_id"]) and len(acknowledged) == 240
    assert logged["replica"].nunique() >= 1 and logged["replica"].str.contains(":").all()
    capsys.readouterr()
    assert main(["monitor", postgres_url, "--window", "3600"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert f"{len(logged)} decisions" in shown


# ---------------------------------------------------------------------------- the documented curl call
@pytest.mark.slow
def test_the_curl_calls_in_the_docs_work_as_written(tmp_path):
    """Run docs/guard.md's example as written: its Python saves a guard, its curl calls query the served guard."""
    section = DOCS.read_text().split("<!-- example: tested -->", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.startswith("curl")]
    assert len(commands) == 2 and "oodguard serve energy-guard" in block, block
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)
    server = Server(tmp_path / "energy-guard", env={"OODGUARD_TOKEN": "s3cret"})
    server.wait_ready()
    answers = []
    try:
        for command in commands:
            command = command.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
            done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30,
                                  env={"OODGUARD_TOKEN": "s3cret", "PATH": os.environ["PATH"]})  # fmt: skip
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            answers.append(json.loads(done.stdout))
    finally:
        server.stop()
    schema, scored = answers
    assert schema["fields"]["logits"]["row_shape"] == [3]
    assert scored["is_ood"] == [False, True] and scored["reasons"][0] is None and "outside" in scored["reasons"][1]
