"""The HTTP service: scoring, bad input, size limit, auth, OpenAPI, metrics, decision log, and a real server.

In-process tests use FastAPI's TestClient; the end-to-end tests start ``python -m oodguard.cli serve`` with
uvicorn on 127.0.0.1 (a free port) in a subprocess and talk to it over HTTP with httpx, including a load
test of 2,000 requests from 8 concurrent clients after which the decision log must hold every row.
"""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client import CONTENT_TYPE_LATEST

from oodguard.cli import main
from oodguard.guard import Guard
from oodguard.serve import create_app, read_decisions, summarise

from detector_data import far_outputs, id_outputs
from live_server import Server

with warnings.catch_warnings():  # starlette warns that its TestClient will move from httpx to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


# ---------------------------------------------------------------------------- guards from synthetic outputs
@pytest.fixture(scope="module")
def guard() -> Guard:
    """A model-agnostic Mahalanobis guard on synthetic features; predictions come from the fitted head."""
    return Guard(detector="mahalanobis").fit(id_outputs(40, seed=1)).calibrate(id_outputs(40, seed=2), tpr=0.95)


@pytest.fixture(scope="module")
def model_guard() -> Guard:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    rng = np.random.default_rng(0)
    guard = Guard(model, detector="energy").fit(torch.from_numpy(rng.normal(size=(60, 4)).astype(np.float32)))
    return guard.calibrate(torch.from_numpy(rng.normal(size=(100, 4)).astype(np.float32)))


def features(n: int, seed: int, far: bool = False) -> list[list[float]]:
    data = far_outputs(n, seed) if far else id_outputs(1, seed).with_fields(labels=None)
    return data.features.numpy()[:n].tolist()


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------- scoring in process
def test_score_features_matches_the_guard(guard):
    rows = features(3, seed=5) + features(2, seed=6, far=True)
    with TestClient(create_app(guard)) as client:
        response = client.post("/v1/score", json={"features": rows})
        assert response.status_code == 200, response.text
        body = response.json()
        assert response.headers["x-request-id"] == body["request_id"] and len(body["request_id"]) == 32
        expected = guard.guard({"features": np.asarray(rows, dtype=np.float32)})
        assert body["predictions"] == expected.prediction.tolist()
        assert body["scores"] == expected.score.tolist() and body["pvalues"] == expected.pvalue.tolist()
        assert body["is_ood"] == expected.is_ood.tolist() == [False, False, False, True, True]
        # Batch decisions with Benjamini-Hochberg, as guard_batch.
        batch = client.post("/v1/score", json={"features": rows, "fdr": 0.2}).json()
        assert batch["is_ood"] == guard.guard_batch({"features": np.asarray(rows, np.float32)}, fdr=0.2).is_ood.tolist()
        health = client.get("/healthz").json()
        assert health == {"status": "ok", "mode": "outputs", "false_alarm_rate": guard.false_alarm_rate_}


def test_score_logits_without_head_gives_null_predictions():
    data = id_outputs(30, seed=1)
    guard = Guard(detector="knn", detector_params={"k": 2}).fit({"features": data.features.numpy()})
    guard.calibrate({"features": id_outputs(30, seed=2).features.numpy()})
    with TestClient(create_app(guard)) as client:
        body = client.post("/v1/score", json={"features": features(2, seed=3)}).json()
    assert body["predictions"] == [None, None] and len(body["scores"]) == 2


def test_score_model_inputs(model_guard):
    inputs = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    with TestClient(create_app(model_guard)) as client:
        assert client.get("/healthz").json()["mode"] == "inputs"
        body = client.post("/v1/score", json={"inputs": inputs.tolist()}).json()
        expected = model_guard.guard(torch.from_numpy(inputs))
        assert body["scores"] == pytest.approx(expected.score.tolist(), rel=1e-6)
        assert body["predictions"] == expected.prediction.tolist()
        wrong = client.post("/v1/score", json={"features": inputs.tolist()})
        assert wrong.status_code == 422 and "runs its model" in wrong.json()["detail"]
        ragged = client.post("/v1/score", json={"inputs": [[1.0, 2.0, 3.0, 4.0], [1.0]]})
        assert ragged.status_code == 422 and "different lengths" in ragged.json()["detail"]
        for body, message in [
            ('{"inputs": [[NaN, 1, 2, 3]]}', "NaN is not a finite number"),
            ('{"inputs": [["1", 1, 2, 3]]}', "inputs[0][0]: expected a number, got a string"),
            ('{"inputs": [[1, 2, 3, true]]}', "inputs[0][3]: expected a number, got true"),
            ('{"inputs": []}', "empty"),
            ('{"inputs": [1, 2]}', "inputs rows have shape [], but the guard was fitted on rows of shape [4]"),
            ('{"inputs": [[null, 1, 2, 3]]}', "inputs[0][0]: expected a number, got null"),
            ('{"inputs": 3}', "inputs: expected a list of rows, got int"),
        ]:
            bad = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
            assert bad.status_code == 422 and message in bad.json()["detail"], bad.text
        shape = client.post("/v1/score", json={"inputs": [[1.0, 2.0]]})  # the model wants 4 inputs
        assert shape.status_code == 422 and "rows have shape [2]" in shape.json()["detail"]
        assert "fitted on rows of shape [4]" in shape.json()["detail"]
        assert client.post("/v1/score", json={"inputs": inputs.tolist()}).status_code == 200


BAD_REQUESTS = [
    ('{"features": [[1.0, 2.0', 400, "not valid JSON"),
    ("", 422, "body is empty"),
    ('{"features": [[NaN, 1.0]]}', 422, "NaN is not a finite number"),
    ('{"features": [[Infinity, 1.0]]}', 422, "Infinity is not a finite number"),
    ('{"features": [[-Infinity, 1.0]]}', 422, "-Infinity is not a finite number"),
    ('{"features": [["1.0", 2.0]]}', 422, "features[0][0]: expected a number, got a string"),
    ('{"features": [[true, 2.0]]}', 422, "features[0][0]: expected a number, got true"),
    ('{"features": [[null, 2.0]]}', 422, "features[0][0]: expected a number, got null"),
    ('{"features": [1.0, 2.0]}', 422, "expected a list of rows [N, D] (rank 2), got shape [2]"),
    ('{"features": [[[1.0]]]}', 422, "expected a list of rows [N, D] (rank 2), got shape [1, 1, 1]"),
    ('{"features": [[1.0, 2.0], [3.0]]}', 422, "different lengths"),
    ('{"features": [[1.0, 2.0]]}', 422, "features rows have shape [2], but the guard was fitted on rows of shape [32]"),
    ('{"features": []}', 422, "empty"),
    ('{"features": [[]]}', 422, "empty"),
    ("{}", 422, "send 'logits'"),
    ('{"inputs": [[1.0]]}', 422, "not 'inputs'"),
    ('{"feature": [[1.0]]}', 422, "feature: not a field of a score request"),
    ("[[1.0, 2.0]]", 422, "expected a JSON object"),
    ('"features"', 422, "expected a JSON object"),
    ('{"features": [[1.0]], "fdr": 1.5}', 422, "fdr: expected a number in (0, 1)"),
    ('{"features": [[1.0]], "fdr": "0.1"}', 422, "fdr"),
    ('{"features": [[1.0]], "fdr": true}', 422, "fdr"),
    ("[" * 5000 + "]" * 5000, 400, "nests 5000 levels deep"),
    ('{"features": [[' + "[" * 40 + "]" * 40 + "]]}", 400, "nests 43 levels deep"),
    ('{"features": [["[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["]]}', 422, "expected a number, got a string"),
    (b'{"features": [[1.0, \xff]]}'.decode("unicode_escape"), 400, "not valid JSON"),
]


@pytest.mark.parametrize("body, status, message", BAD_REQUESTS)
def test_bad_requests_get_4xx_with_a_message(guard, body, status, message):
    with TestClient(create_app(guard), raise_server_exceptions=False) as client:
        response = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, response.text
        detail = response.json()["detail"]
        assert isinstance(detail, str) and message in detail
        assert client.post("/v1/score", json={"features": features(1, seed=3)}).status_code == 200


def test_other_bad_requests(guard):
    with TestClient(create_app(guard), raise_server_exceptions=False) as client:
        text = client.post("/v1/score", content=b'{"features": [[1.0]]}', headers={"content-type": "text/plain"})
        assert text.status_code == 415 and "application/json" in text.json()["detail"]
        untyped = client.post("/v1/score", content=b'{"features": [[1.0]]}', headers={"content-type": ""})
        assert untyped.status_code == 415
        binary = client.post("/v1/score", content=b"\xff\xfe\x00", headers={"content-type": "application/json"})
        assert binary.status_code == 400 and "not UTF-8 text (invalid byte at position 0)" in binary.json()["detail"]
        assert client.get("/v1/score").status_code == 405
        assert client.get("/nowhere").status_code == 404
        length = client.post("/v1/score", content=b"{}", headers={"content-length": "abc"})
        assert length.status_code == 400


def test_size_limit_by_header_and_by_bytes(guard):
    with TestClient(create_app(guard, max_body_bytes=2000)) as client:
        small = json.dumps({"features": features(1, seed=3)})
        headers = {"content-type": "application/json"}
        assert len(small) < 2000 and client.post("/v1/score", content=small, headers=headers).status_code == 200
        large = json.dumps({"features": features(1, seed=3) * 4})
        refused = client.post("/v1/score", content=large, headers=headers)  # announced by Content-Length
        assert refused.status_code == 413 and "limit of 2000 bytes" in refused.json()["detail"]

        def chunks():  # no Content-Length: chunked transfer, refused once the bytes pass the limit
            for start in range(0, len(large), 500):
                yield large[start : start + 500].encode()

        streamed = client.post("/v1/score", content=chunks(), headers=headers)
        assert streamed.status_code == 413 and "exceeds the limit" in streamed.json()["detail"]
        assert client.post("/v1/score", content=small, headers=headers).status_code == 200
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app(guard, max_body_bytes=0)


def test_bearer_token(guard, monkeypatch):
    monkeypatch.setenv("TEST_OODGUARD_TOKEN", "s3cret-token")
    with TestClient(create_app(guard, token_env="TEST_OODGUARD_TOKEN")) as client:
        payload = {"features": features(1, seed=3)}
        missing = client.post("/v1/score", json=payload)
        assert missing.status_code == 401 and "missing bearer token" in missing.json()["detail"]
        assert missing.headers["www-authenticate"] == "Bearer"
        for header in ("Bearer wrong", "Bearer s3cret-token-and-more", "Basic czNjcmV0LXRva2Vu", "Bearer"):
            wrong = client.post("/v1/score", json=payload, headers={"Authorization": header})
            assert wrong.status_code == 401 and isinstance(wrong.json()["detail"], str)
        good = {"Authorization": "Bearer s3cret-token"}
        assert client.post("/v1/score", json=payload, headers=good).status_code == 200
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=good).status_code == 200
        assert client.get("/healthz").status_code == 200  # liveness probes need no token
    monkeypatch.setenv("TEST_OODGUARD_TOKEN", "  ")
    with pytest.raises(ValueError, match="set but empty"):
        create_app(guard, token_env="TEST_OODGUARD_TOKEN")


def resolve(schema: dict, node):
    """Follow every $ref in ``node`` (recursively); fail on a dangling one."""
    if isinstance(node, dict):
        if "$ref" in node:
            assert node["$ref"].startswith("#/"), node["$ref"]
            target = schema
            for part in node["$ref"][2:].split("/"):
                target = target[part]
        for value in node.values():
            resolve(schema, value)
    elif isinstance(node, list):
        for value in node:
            resolve(schema, value)


def test_openapi_schema_documents_the_score_endpoint(guard, monkeypatch):
    monkeypatch.setenv("OODGUARD_TOKEN", "x")
    with TestClient(create_app(guard)) as client:
        assert client.get("/openapi.json").status_code == 401 and client.get("/docs").status_code == 401
        token = {"Authorization": "Bearer x"}
        schema = json.loads(client.get("/openapi.json", headers=token).text)
        assert client.get("/docs", headers=token).status_code == 200
    with TestClient(create_app(guard, docs=False)) as client:
        assert client.get("/openapi.json", headers=token).status_code == 404
        assert client.get("/docs", headers=token).status_code == 404
    assert schema["openapi"].startswith("3.") and schema["info"]["title"] == "oodguard"
    resolve(schema, schema)
    post = schema["paths"]["/v1/score"]["post"]
    request = post["requestBody"]["content"]["application/json"]["schema"]
    assert request == {"$ref": "#/components/schemas/ScoreRequest"} and post["requestBody"]["required"]
    ok = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/ScoreResponse"}
    assert {"400", "401", "413", "422"} <= set(post["responses"])
    assert post["security"] == [{"HTTPBearer": []}]
    models = schema["components"]["schemas"]
    assert set(models["ScoreRequest"]["properties"]) == {"logits", "features", "inputs", "fdr"}
    assert models["ScoreRequest"]["additionalProperties"] is False
    always = {"request_id", "predictions", "scores", "pvalues", "is_ood", "reasons"}
    monitor_only = {"failure_probabilities", "failure_flags"}  # sent by a guard with a failure monitor only
    assert set(models["ScoreResponse"]["properties"]) == always | monitor_only
    assert set(models["ScoreResponse"]["required"]) == always
    assert {"/healthz", "/metrics", "/v1/schema"} <= set(schema["paths"])


def test_metrics_and_alert_on_a_shifted_stream(guard, tmp_path):
    clock = FakeClock()
    app = create_app(guard, log_url=str(tmp_path / "log.sqlite"), window_seconds=60, clock=clock)
    flagged = 0
    with TestClient(app) as client:
        for seed in range(5):
            response = client.post("/v1/score", json={"features": features(6, seed=10 + seed)})
            flagged += sum(response.json()["is_ood"])
        assert flagged <= 2 and "oodguard_ood_alert 0.0" in client.get("/metrics").text.splitlines()
        clock.now += 30
        for seed in range(5):  # a stream of far-away inputs: all flagged
            response = client.post("/v1/score", json={"features": features(8, seed=20 + seed, far=True)})
            assert response.json()["is_ood"] == [True] * 8
            flagged += 8
        client.post("/v1/score", content="{", headers={"content-type": "application/json"})
        scraped = client.get("/metrics")
        assert scraped.headers["content-type"] == CONTENT_TYPE_LATEST
        lines = scraped.text.splitlines()
        assert "oodguard_ood_alert 1.0" in lines and "oodguard_decisions_total 70.0" in lines
        assert f"oodguard_ood_decisions_total {flagged}.0" in lines
        assert 'oodguard_requests_total{path="/v1/score",status="200"} 10.0' in lines
        assert 'oodguard_requests_total{path="/v1/score",status="400"} 1.0' in lines
        assert 'oodguard_requests_total{path="/metrics",status="200"} 1.0' in lines
        assert 'oodguard_request_duration_seconds_count{path="/v1/score"} 11.0' in lines
        assert "oodguard_decision_log_failed_rows 0.0" in lines
        clock.now += 120  # the shift is over: the rolling window empties
        assert "oodguard_ood_alert 0.0" in client.get("/metrics").text.splitlines()
    # Leaving the client shut the app down, which wrote every queued decision.
    rows = read_decisions(tmp_path / "log.sqlite")
    assert len(rows) == 70 and rows["is_ood"].sum() == flagged and rows["request_id"].nunique() == 10
    summary = summarise(tmp_path / "log.sqlite", window_seconds=3600)
    assert summary["n"].tolist() == [70] and summary["alert"].tolist() == [True]


def test_create_app_refuses_an_uncalibrated_guard():
    guard = Guard(detector="energy").fit({"logits": np.zeros((5, 3))})
    with pytest.raises(Exception, match="calibrate"):
        create_app(guard)


# ---------------------------------------------------------------------------- the real server in a subprocess
@pytest.fixture(scope="module")
def saved_guard(tmp_path_factory, guard) -> Path:
    directory = tmp_path_factory.mktemp("served") / "guard"
    guard.save(directory)
    return directory


@pytest.fixture(scope="module")
def servers(saved_guard, tmp_path_factory):
    """Two servers started together: one with a token and a small size limit, one for the load test."""
    logs = tmp_path_factory.mktemp("logs")
    guarded = Server(saved_guard, "--log", str(logs / "guarded.sqlite"), "--max-body-bytes", "4096",
                     env={"OODGUARD_TOKEN": "test-token"})  # fmt: skip
    loaded = Server(saved_guard, "--log", f"sqlite:///{logs / 'load.sqlite'}")
    try:
        guarded.wait_ready()
        loaded.wait_ready()
        yield {"guarded": guarded, "load": loaded, "logs": logs}
    finally:
        guarded.stop()
        loaded.stop()


@pytest.mark.slow
def test_server_refuses_bad_requests_and_keeps_serving(servers):
    server = servers["guarded"]
    token = {"Authorization": "Bearer test-token"}
    good = {"features": features(2, seed=3)}
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        assert client.post("/v1/score", json=good).status_code == 401
        assert client.post("/v1/score", json=good, headers={"Authorization": "Bearer nope"}).status_code == 401
        json_headers = {**token, "content-type": "application/json"}
        for body, status in [(b'{"features": [[NaN]]}', 422), (b'{"features": [["a"]]}', 422), (b"{", 400),
                             (b'{"features": [[1.0, 2.0]]}', 422), (b'{"logits": 3}', 422)]:  # fmt: skip
            response = client.post("/v1/score", content=body, headers=json_headers)
            assert response.status_code == status and isinstance(response.json()["detail"], str)
        big = json.dumps({"features": features(1, seed=3) * 10}).encode()
        assert len(big) > 4096
        assert client.post("/v1/score", content=big, headers=json_headers).status_code == 413
        chunked = client.post("/v1/score", content=iter([big[i : i + 1024] for i in range(0, len(big), 1024)]),
                              headers=json_headers)  # fmt: skip
        assert chunked.status_code == 413
        response = client.post("/v1/score", json=good, headers=token)
        assert response.status_code == 200 and len(response.json()["scores"]) == 2
        lines = client.get("/metrics", headers=token).text.splitlines()
        assert 'oodguard_requests_total{path="/v1/score",status="401"} 2.0' in lines
        assert 'oodguard_requests_total{path="/v1/score",status="413"} 2.0' in lines
        assert 'oodguard_requests_total{path="/v1/score",status="200"} 1.0' in lines
        assert "oodguard_decisions_total 2.0" in lines


@pytest.mark.slow
def test_load_2000_requests_8_clients_no_lost_rows(servers, capsys):
    server = servers["load"]
    n_clients, per_client = 8, 250
    pool = np.concatenate([id_outputs(10, seed=7).features.numpy(), far_outputs(20, seed=8).features.numpy()])
    sent: list[list[tuple[str, int, int]]] = [[] for _ in range(n_clients)]
    failures: list[str] = []

    def client_loop(k: int) -> None:
        rng = np.random.default_rng(k)
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            for _ in range(per_client):
                size = int(rng.integers(1, 4))
                rows = pool[rng.integers(0, len(pool), size)]
                response = client.post("/v1/score", json={"features": rows.tolist()})
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text}")
                    continue
                body = response.json()
                sent[k].append((body["request_id"], size, sum(body["is_ood"])))

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(n_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures[:3]
    requests = [entry for entries in sent for entry in entries]
    assert len(requests) == n_clients * per_client
    assert server.stop() == 0  # graceful shutdown (SIGINT) writes every queued decision
    rows = read_decisions(f"sqlite:///{servers['logs'] / 'load.sqlite'}")
    assert len(rows) == sum(size for _, size, _ in requests)
    per_request = rows.groupby("request_id").agg(n=("batch_index", "size"), ood=("is_ood", "sum"))
    assert per_request["n"].to_dict() == {rid: size for rid, size, _ in requests}
    assert per_request["ood"].to_dict() == {rid: ood for rid, _, ood in requests}
    # The CLI summary of that log.
    capsys.readouterr()
    assert main(["monitor", str(servers["logs"] / "load.sqlite"), "--window", "3600"]) == 0
    shown = capsys.readouterr().out
    assert f"{len(rows)} decisions" in shown and "ALERT" in shown  # a quarter of the pool is far away


def test_monitor_command_reads_the_guard_folder(tmp_path, capsys, guard):
    directory = tmp_path / "guard"
    guard.save(directory)
    with TestClient(create_app(guard, log_url=str(directory / "decisions.sqlite"))) as client:
        client.post("/v1/score", json={"features": features(3, seed=4)})
    assert main(["monitor", str(directory)]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "3 decisions in 1 windows" in shown and "ok" in shown and "replicas" in shown
    assert main(["monitor", str(tmp_path / "missing.sqlite")]) == 1
    assert "no decision log" in capsys.readouterr().err
