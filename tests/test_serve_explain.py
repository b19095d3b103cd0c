"""``POST /v1/explain``: maps that match ``Guard.explain``, the token, the size limit and malformed bodies, in
process and on a real server."""

from __future__ import annotations

import json
import socket
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from guard_factory import make_model
from oodguard.guard import Guard
from oodguard.serve import create_app

from live_server import Server

with warnings.catch_warnings():  # starlette warns that its TestClient will move from httpx to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def model_guard(detector: str = "energy") -> Guard:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    guard = Guard(make_model().eval(), detector=detector, model_factory="guard_factory:make_model")
    guard.fit(rng.normal(size=(60, 4)).astype(np.float32))
    return guard.calibrate(rng.normal(size=(100, 4)).astype(np.float32))


@pytest.fixture(scope="module")
def guard() -> Guard:
    return model_guard()


def rows(n: int, seed: int) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32).tolist()


def test_explain_returns_the_guards_maps(guard):
    x = rows(3, 1)
    with TestClient(create_app(guard)) as client:
        response = client.post("/v1/explain", json={"inputs": x})
        assert response.status_code == 200, response.text
        body = response.json()
        assert response.headers["x-request-id"] == body["request_id"]
        assert body["detector"] == "energy" and body["shape"] == [4]
        expected = guard.explain(np.asarray(x, np.float32))
        np.testing.assert_allclose(np.asarray(body["maps"]), expected, rtol=1e-6)
        smoothed_refused = client.post("/v1/explain", json={"inputs": x, "sigma": 1.0})  # vectors have no pixels
        assert smoothed_refused.status_code == 422 and "spatial" in smoothed_refused.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("{", 400, "not valid JSON"),
        ('{"inputs": [[1, 2, 3, "a"]]}', 422, "inputs[0][3]: expected a number"),
        ('{"inputs": [[1.0, 2.0]]}', 422, "shape"),
        ('{"inputs": [[NaN, 1, 2, 3]]}', 422, "not a finite number"),
        ('{"inputs": []}', 422, "empty"),
        ("{}", 422, "inputs: missing"),
        ('{"inputs": [[1, 2, 3, 4]], "fdr": 0.1}', 422, "fdr: not a field of an explain request"),
        ('{"inputs": [[1, 2, 3, 4]], "sigma": -1}', 422, "sigma"),
        ("[1, 2]", 422, "expected a JSON object"),
    ],
)
def test_malformed_bodies_get_4xx_with_a_message(guard, body, status, message):
    with TestClient(create_app(guard)) as client:
        response = client.post("/v1/explain", content=body, headers={"content-type": "application/json"})
        assert response.status_code == status and message in response.json()["detail"], response.text
        assert client.post("/v1/explain", content="{}", headers={"content-type": "text/plain"}).status_code == 415


def test_a_sigma_wider_than_the_images_is_refused_not_allocated():
    rng = np.random.default_rng(0)
    images = Guard(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), detector="energy")
    images.fit(rng.random((30, 1, 4, 4), dtype=np.float32)).calibrate(rng.random((40, 1, 4, 4), dtype=np.float32))
    x = rng.random((2, 1, 4, 4), dtype=np.float32).tolist()
    with TestClient(create_app(images), raise_server_exceptions=False) as client:
        assert client.post("/v1/explain", json={"inputs": x, "sigma": 1.0}).status_code == 200
        for sigma in (1e5, 1e308):  # terabytes of padding; an infinite kernel radius
            response = client.post("/v1/explain", json={"inputs": x, "sigma": sigma})
            assert response.status_code == 422 and "blurs beyond these (4, 4) maps" in response.json()["detail"]


def test_guards_that_cannot_explain_say_so():
    rng = np.random.default_rng(0)
    outputs_only = Guard(detector="energy").fit({"logits": rng.normal(size=(30, 3))})
    outputs_only.calibrate({"logits": rng.normal(size=(40, 3))})
    with TestClient(create_app(outputs_only)) as client:
        response = client.post("/v1/explain", json={"inputs": rows(1, 0)})
        assert response.status_code == 501 and "no model" in response.json()["detail"]
    with TestClient(create_app(model_guard("klm"))) as client:
        response = client.post("/v1/explain", json={"inputs": rows(1, 0)})
        assert response.status_code == 501 and "Supported detectors" in response.json()["detail"]


def test_explain_documented_in_openapi(guard):
    with TestClient(create_app(guard)) as client:
        schema = client.get("/openapi.json").json()
    assert "/v1/explain" in schema["paths"]
    assert set(schema["components"]["schemas"]["ExplainRequest"]["properties"]) == {"inputs", "sigma"}


# ---------------------------------------------------------------------------- the real server in a subprocess
@pytest.fixture(scope="module")
def server(tmp_path_factory, guard):
    directory = tmp_path_factory.mktemp("explain") / "guard"
    guard.save(directory)
    here = Path(__file__).resolve().parent
    path = f"{here.parent / 'src'}:{here}"
    served = Server(directory, "--model-factory", "guard_factory:make_model", "--max-body-bytes", "2048",
                    env={"OODGUARD_TOKEN": "explain-token", "PYTHONPATH": path})  # fmt: skip
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()


@pytest.mark.slow
def test_real_server_explains_with_the_token_and_the_size_limit(server, guard):
    token = {"Authorization": "Bearer explain-token"}
    x = rows(2, 3)
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        assert client.post("/v1/explain", json={"inputs": x}).status_code == 401
        assert client.post("/v1/explain", json={"inputs": x}, headers={"Authorization": "Bearer no"}).status_code == 401
        response = client.post("/v1/explain", json={"inputs": x}, headers=token)
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(np.asarray(response.json()["maps"]), guard.explain(np.asarray(x, np.float32)),
                                   rtol=1e-6)  # fmt: skip
        big = json.dumps({"inputs": rows(60, 4)}).encode()
        assert len(big) > 2048
        headers = {**token, "content-type": "application/json"}
        too_large = client.post("/v1/explain", content=big, headers=headers)
        assert too_large.status_code == 413 and "limit of 2048 bytes" in too_large.json()["detail"]
        chunked = client.post("/v1/explain", content=iter([big[i : i + 512] for i in range(0, len(big), 512)]),
                              headers=headers)  # fmt: skip
        assert chunked.status_code == 413
        malformed = client.post("/v1/explain", content=b'{"inputs": [[1, 2]]}', headers=headers)
        assert malformed.status_code == 422
        assert client.post("/v1/explain", json={"inputs": x}, headers=token).status_code == 200  # still serving
        lines = client.get("/metrics", headers=token).text.splitlines()
        assert 'oodguard_requests_total{path="/v1/explain",status="401"} 2.0' in lines
        assert 'oodguard_requests_total{path="/v1/explain",status="200"} 2.0' in lines


@pytest.mark.slow
def test_a_half_sent_body_does_not_reach_the_guard_and_the_server_keeps_serving(server, guard):
    body = json.dumps({"inputs": rows(2, 5)}).encode()
    head = (f"POST /v1/explain HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) + 100}\r\nAuthorization: Bearer explain-token\r\n\r\n")  # fmt: skip
    for _ in range(3):  # announce more than is sent, then hang up
        connection = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        connection.sendall(head.encode() + body)
        time.sleep(0.1)
        connection.close()
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        token = {"Authorization": "Bearer explain-token"}
        response = client.post("/v1/explain", json={"inputs": rows(2, 5)}, headers=token)
        assert response.status_code == 200
        np.testing.assert_allclose(np.asarray(response.json()["maps"]),
                                   guard.explain(np.asarray(rows(2, 5), np.float32)), rtol=1e-6)  # fmt: skip
        assert 'oodguard_requests_total{path="/v1/explain",status="200"}' in client.get("/metrics", headers=token).text
