"""The HTTP service of a guard (FastAPI): scores and decisions, its input schema, health, Prometheus metrics.

``POST /v1/score`` takes model outputs (``logits`` and/or ``features``, for a model-agnostic guard) or
model inputs (``inputs``, for a guard that runs its model) and returns, per input, the model's
prediction, the OOD score (higher = more likely OOD), the conformal p-value, the decision and, for inputs
decided OOD without scoring (outside the value range seen at fit, or beyond what a float can hold), the
reason. ``GET /v1/schema`` says what input the guard expects, with an example request. ``GET /healthz``
answers while the service runs; ``POST /v1/explain`` (a guard that runs its model) returns, per input, a map of
what drives its OOD score (:mod:`oodguard.explain`); ``GET /metrics`` exposes request counts, latencies and the
rolling OOD rate with its alert (``prometheus_client``). The OpenAPI schema is at ``/openapi.json`` (documentation at
``/docs``; both can be switched off).

Order of work per request, cheapest refusal first: the bearer token (every path but ``/healthz``, before any
byte of the body is read), the announced size, a bound on bodies in flight, the body itself within a
deadline and a size limit, then the JSON. Every malformed request gets a 4xx status and a JSON body
``{"detail": "<what was wrong>"}``; the service keeps serving. With a decision log, the response is sent
only after the request's rows are committed (group commit across concurrent requests); when they cannot be,
the request gets 503 and no decision is acknowledged (``allow_unlogged=True`` serves anyway, with
``X-Decision-Logged: false``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import time
import uuid
from collections.abc import MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypeAliasType

try:  # optional: a faster JSON parser and writer
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None  # type: ignore[assignment]

from oodguard.serve.monitor import OODRateMonitor, ServiceMetrics
from oodguard.serve.store import DecisionLog, DecisionLogError

__all__ = ["ScoreRequest", "ScoreResponse", "create_app", "app_from_environment", "parse_score_request"]

#: Default request size limit: 1 MiB holds ~50,000 numbers, e.g. a batch of 100 feature vectors of 512.
DEFAULT_MAX_BODY_BYTES = 1 << 20
#: Seconds a client has to send its whole body.
DEFAULT_BODY_TIMEOUT = 10.0
#: Request bodies read or held at once; more get 503 at once (bounds the memory clients can hold).
DEFAULT_MAX_BODIES_IN_FLIGHT = 64
#: Seconds a request waits for its decisions to be committed before it gets 503.
DEFAULT_COMMIT_TIMEOUT = 10.0
#: Deepest JSON nesting accepted (a model input [N, C, H, W] nests 4 deep inside the body object).
MAX_JSON_DEPTH = 32
_OPEN_PATHS = ("/healthz",)
_PATHS = ("/v1/score", "/v1/explain", "/v1/schema", "/healthz", "/metrics", "/docs", "/openapi.json")
SETTINGS_ENV = "OODGUARD_SERVE_SETTINGS"
# Model-output requests up to this size are decided on the event loop (no model runs; well under a millisecond).
_INLINE_BODY_BYTES = 64 << 10

FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Matrix = list[list[FiniteNumber]]
# Rows of any rank: [N, D], [N, C, H, W], ... (documents the request body; the service parses it itself).
# mypy cannot resolve a recursive alias built at run time; pydantic can.
NestedNumbers = TypeAliasType("NestedNumbers", list[FiniteNumber] | list["NestedNumbers"])  # type: ignore[misc]


class ScoreRequest(BaseModel):
    """Inputs to score: model outputs for a model-agnostic guard, or model inputs for a model guard."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"features": [[0.1, 2.3, 0.0, 1.7]]}, {"logits": [[4.1, -0.3, 0.8]]}]},
    )

    logits: Matrix | None = Field(None, description="Classifier logits before the softmax, one row per input [N, C].")
    features: Matrix | None = Field(
        None, description="Penultimate features (input of the final linear layer), one row per input [N, D]."
    )
    inputs: list[NestedNumbers] | None = Field(
        None,
        description="Model inputs as nested lists of numbers, first axis = inputs [N, ...] "
        "(only for a guard that runs its model).",
    )
    fdr: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        strict=True,
        description="Decide the batch jointly with Benjamini-Hochberg at this false discovery rate, "
        "instead of each input by the guard's own rule.",
    )


class ScoreResponse(BaseModel):
    """Per input (same order as the request): prediction, OOD score, p-value, decision and its reason."""

    request_id: str = Field(description="Identifier of this request, also in the decision log and X-Request-ID.")
    predictions: list[int | None] = Field(description="The model's predicted class (null when unknown).")
    scores: list[float | None] = Field(
        description="OOD scores, higher = more likely out-of-distribution (null: decided without scoring)."
    )
    pvalues: list[float | None] = Field(description="Conformal p-values (small = unlike the calibration data).")
    is_ood: list[bool] = Field(description="The guard's decision: true = flagged as out-of-distribution.")
    reasons: list[str | None] = Field(
        description="Why an input was decided OOD without scoring (outside the range seen at fit, not finite)."
    )
    failure_probabilities: list[float | None] | None = Field(
        None,
        description="Only for a guard with a failure monitor: the probability that the system fails on the input, "
        "learned from logged outcomes (null: decided without scoring).",
    )
    failure_flags: list[bool] | None = Field(
        None,
        description="Only for a guard with a failure monitor: failure probability at or above the monitor's "
        "threshold (true for inputs decided without scoring).",
    )


class ExplainRequest(BaseModel):
    """Model inputs whose OOD scores to explain (only for a guard that runs its model)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"inputs": [[[[0.0, 0.5], [1.0, 0.2]]]]}]}
    )

    inputs: list[NestedNumbers] = Field(description="Model inputs as nested lists of numbers [N, ...].")
    sigma: float | None = Field(
        None, ge=0.0, strict=True, description="Gaussian smoothing of the maps in pixels (default 0: none)."
    )


class ExplainResponse(BaseModel):
    """Per input (same order as the request), a map of what raises its OOD score."""

    request_id: str = Field(description="Identifier of this request, also in X-Request-ID.")
    detector: str = Field(description="The detector whose score is explained.")
    shape: list[int] = Field(description="Shape of each map: [H, W] for images [C, H, W], else the row shape.")
    maps: list[Any] = Field(
        description="Per input, the positive part of gradient x input, channels summed, normalised to sum 1 "
        "(all zeros: nothing raises the score), as nested lists."
    )


class Health(BaseModel):
    status: str = Field(description='"ok" while the service runs.')
    mode: str = Field(description='"outputs" (send logits/features) or "inputs" (send model inputs).')
    false_alarm_rate: float = Field(description="Expected fraction of ID inputs the guard flags (alert baseline).")


class InputSchema(BaseModel):
    mode: str = Field(description='"outputs" (send logits/features) or "inputs" (send model inputs).')
    fields: dict[str, Any] = Field(
        description="Per field: row shape, dtype, the value range seen at fit and the range accepted before an "
        "input is decided OOD without scoring."
    )
    example: dict[str, Any] = Field(description="A request body that fits (one row, mid-range values).")
    max_body_bytes: int = Field(description="Larger request bodies get 413.")


class ErrorMessage(BaseModel):
    detail: str = Field(description="What was wrong with the request, and how to fix it.")


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorMessage, "description": text}
    for code, text in [
        (400, "Body is not valid JSON, not UTF-8, or nested too deeply"),
        (401, "Missing or wrong bearer token"),
        (408, "Body not received within the deadline"),
        (413, "Body larger than the size limit"),
        (415, "Body not sent as application/json"),
        (501, "The guard cannot explain (no model, or a detector whose score is not differentiable)"),
        (422, "Well-formed JSON but wrong fields, shapes or types"),
        (503, "Too many requests in flight, or the decision log cannot commit the decisions (retry)"),
    ]
}


class RequestProblem(Exception):
    """A request the service refuses: an HTTP status and a message that says what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------- parsing a request body
@dataclass(frozen=True)
class ParsedRequest:
    """A score request after parsing: arrays of float64 by field (``inputs``, ``logits``, ``features``) and ``fdr``."""

    arrays: dict[str, np.ndarray]
    fdr: float | None


_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_FIELDS = ("logits", "features", "inputs", "fdr")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    names: dict[type, str] = {str: "a string", dict: "an object", list: "a list"}
    return names.get(type(value), type(value).__name__)


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _nesting_depth(body: bytes) -> int:
    """The deepest nesting of ``[`` and ``{`` in a JSON text (brackets inside strings ignored)."""
    brackets = _STRINGS.sub(b'""', body).translate(None, _NOT_BRACKETS)
    if len(brackets) <= 2 * MAX_JSON_DEPTH:  # cannot nest deeper than half its brackets
        return len(brackets) // 2
    steps = np.frombuffer(brackets, dtype=np.uint8)
    return int(np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1)).max(initial=0))


def _first_non_number(values: Any, where: str) -> tuple[str, Any] | None:
    """Where the first entry that is not a JSON number (or a list of them) lies, depth first."""
    stack = [(values, where)]
    while stack:
        value, place = stack.pop()
        if isinstance(value, list):
            stack.extend((inner, f"{place}[{i}]") for i, inner in reversed(list(enumerate(value))))
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            return place, value
    return None


def _numbers(values: Any, field: str, body: bytes) -> np.ndarray:
    """A JSON field of nested lists of numbers -> a float64 array ``[N, ...]``, or a RequestProblem naming the fault.

    Numbers too large for a float64 (``1e400``) become infinite: the guard decides such rows OOD with a reason.
    """
    if not isinstance(values, list):
        raise RequestProblem(422, f"{field}: expected a list of rows, got {_json_type(values)}")
    if b"true" in body or b"false" in body or b"null" in body:  # numpy would read true as 1 and null as an object
        found = _first_non_number(values, field)
        if found is not None:
            raise RequestProblem(422, f"{found[0]}: expected a number, got {_json_type(found[1])}")
    try:
        array = np.array(values)
    except (ValueError, OverflowError):  # ragged nesting
        raise RequestProblem(
            422, f"{field}: rows of different lengths or shapes; every row must have the same shape"
        ) from None
    if array.dtype.kind not in "iuf":
        found = _first_non_number(values, field)
        if found is not None:
            raise RequestProblem(422, f"{found[0]}: expected a number, got {_json_type(found[1])}")
        with np.errstate(over="ignore"):
            array = np.array(values, dtype=np.float64)  # integers beyond int64: finite text, infinite as a float
    if array.ndim == 0 or array.shape[0] == 0:
        raise RequestProblem(422, f"{field}: empty; send at least one row")
    if array.size == 0:
        raise RequestProblem(422, f"{field}: empty rows; send at least one number per row")
    return array.astype(np.float64, copy=False)


def _reject_constant(name: str) -> Any:
    raise RequestProblem(422, f"{name} is not a finite number: send finite JSON numbers")


_MISSING = object()


def _fast_loads(body: bytes) -> Any:
    """orjson when installed (several times faster on long lists of numbers), else the standard parser."""
    if orjson is None:
        raise ValueError("no orjson")
    return orjson.loads(body)


def _dumps(payload: dict[str, Any]) -> bytes:
    if orjson is not None:
        return orjson.dumps(payload)
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def _json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a RequestProblem saying why it is not one."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestProblem(400, f"body is not UTF-8 text (invalid byte at position {error.start})") from None
    if not text.strip():
        raise RequestProblem(422, 'body is empty: send a JSON object such as {"features": [[...]]}')
    depth = _nesting_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise RequestProblem(400, f"body nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted")
    try:
        payload = _fast_loads(body)
    except ValueError:  # orjson's messages are terse: the standard parser says exactly what is wrong
        payload = _MISSING
    try:
        if payload is _MISSING:
            payload = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        where = f"{error.msg} at line {error.lineno} column {error.colno}"
        raise RequestProblem(400, f"body is not valid JSON ({where})") from None
    except RecursionError:
        raise RequestProblem(400, "body nests too deeply to parse") from None
    if not isinstance(payload, dict):
        raise RequestProblem(
            422, f'body: expected a JSON object such as {{"features": [[...]]}}, got {_json_type(payload)}'
        )
    return payload


def parse_score_request(body: bytes) -> ParsedRequest:
    """Parse and check the body of ``POST /v1/score``; a :class:`RequestProblem` says what is wrong and where."""
    payload = _json_object(body)
    unknown = sorted(set(payload) - set(_FIELDS))
    if unknown:
        raise RequestProblem(422, f"{unknown[0]}: not a field of a score request (fields: {', '.join(_FIELDS)})")
    fdr = payload.get("fdr")
    if fdr is not None and (isinstance(fdr, bool) or not isinstance(fdr, (int, float)) or not 0 < fdr < 1):
        raise RequestProblem(422, f"fdr: expected a number in (0, 1), got {fdr!r}")
    arrays = {name: _numbers(payload[name], name, body) for name in _FIELDS[:3] if payload.get(name) is not None}
    return ParsedRequest(arrays, None if fdr is None else float(fdr))


def parse_explain_request(body: bytes) -> tuple[np.ndarray, float]:
    """The inputs ``[N, ...]`` and smoothing ``sigma`` of a ``POST /v1/explain`` body (a RequestProblem if wrong)."""
    payload = _json_object(body)
    unknown = sorted(set(payload) - {"inputs", "sigma"})
    if unknown:
        raise RequestProblem(422, f"{unknown[0]}: not a field of an explain request (fields: inputs, sigma)")
    if payload.get("inputs") is None:
        raise RequestProblem(422, "inputs: missing; send the model's inputs as {'inputs': [...]}")
    sigma = payload.get("sigma", 0.0)
    if sigma is None:
        sigma = 0.0
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma < float("inf"):
        raise RequestProblem(422, f"sigma: expected a number of pixels >= 0, got {sigma!r}")
    return _numbers(payload["inputs"], "inputs", body), float(sigma)


# ---------------------------------------------------------------------------- the guard behind the service
class GuardAdapter:
    """What the service needs from a :class:`~oodguard.guard.Guard`: its mode, its false-alarm rate, decisions."""

    def __init__(self, guard: Any, false_alarm_rate: float | None = None) -> None:
        self.guard = guard
        self.mode = "outputs" if getattr(guard, "model", None) is None else "inputs"
        if false_alarm_rate is None:
            false_alarm_rate = getattr(guard, "false_alarm_rate_", None)  # raises NotFittedError if uncalibrated
        self.false_alarm_rate = None if false_alarm_rate is None else float(false_alarm_rate)
        detector = getattr(guard, "detector", None)
        if detector is not None and getattr(detector, "is_fitted", False):
            _ = detector.state_  # finalise a lazily fitted state now, not concurrently in the first requests
        contract = getattr(guard, "input_contract_", None)
        self.contract = contract if contract is not None and contract.fields else None

    def decide(self, request: ParsedRequest) -> dict[str, list[Any]]:
        """Run the guard on a parsed request; a ``RequestProblem`` means the input does not fit the guard."""
        arrays = request.arrays
        if self.mode == "inputs":
            if "inputs" not in arrays or len(arrays) > 1:
                raise RequestProblem(422, "this guard runs its model: send the model's inputs as {'inputs': [...]}")
            x: Any = self._typed(arrays["inputs"], "inputs")
        else:
            if "inputs" in arrays:
                raise RequestProblem(
                    422, "this guard scores model outputs: send 'logits' and/or 'features', not 'inputs'"
                )
            if not arrays:
                raise RequestProblem(
                    422, "send 'logits' [N, C] and/or 'features' [N, D] (whichever the guard's detector needs)"
                )
            for name, array in arrays.items():
                if array.ndim != 2:
                    raise RequestProblem(
                        422, f"{name}: expected a list of rows [N, D] (rank 2), got shape {list(array.shape)}"
                    )
            x = {name: self._typed(array, name) for name, array in arrays.items()}
        try:
            result = self.guard.guard(x) if request.fdr is None else self.guard.guard_batch(x, fdr=request.fdr)
        except (ValueError, FloatingPointError) as error:
            raise RequestProblem(422, " ".join(str(error).split())) from error
        except RuntimeError as error:
            if self.mode != "inputs":
                raise
            # torch's complaint about well-formed numbers: inputs of the wrong shape for the model
            shape = list(arrays["inputs"].shape)
            raise RequestProblem(422, f"the model cannot run on inputs of shape {shape}: {error}") from error
        scores = np.asarray(result.score, dtype=np.float64)
        decided = {
            "predictions": [None if p < 0 else p for p in np.asarray(result.prediction).tolist()],
            "scores": [v if np.isfinite(v) else None for v in scores.tolist()],
            "pvalues": np.asarray(result.pvalue, dtype=np.float64).tolist(),
            "is_ood": np.asarray(result.is_ood, dtype=bool).tolist(),
            "reasons": list(getattr(result, "reason", None) or [None] * len(scores)),
        }
        failure = getattr(result, "failure_probability", None)
        if failure is not None:  # a guard with a failure monitor; without one the response is as before
            failure = np.asarray(failure, dtype=np.float64)
            decided["failure_probabilities"] = [None if np.isnan(v) else v for v in failure.tolist()]
            decided["failure_flags"] = np.asarray(result.failure_flag, dtype=bool).tolist()
        return decided

    def explain(self, inputs: np.ndarray, sigma: float) -> dict[str, Any]:
        """Attribution maps of the inputs' OOD scores (see :meth:`oodguard.guard.Guard.explain`)."""
        if self.mode != "inputs":
            raise RequestProblem(
                501, "this guard scores model outputs and has no model: explain needs a guard that runs its model"
            )
        if self.contract is not None and "inputs" in self.contract.fields:
            try:
                self.contract.check_shape("inputs", np.empty((0, *inputs.shape[1:])), "inputs")
            except ValueError as error:
                raise RequestProblem(422, " ".join(str(error).split())) from error
        try:
            maps = self.guard.explain(self._typed(inputs, "inputs"), sigma=sigma)
        except ValueError as error:
            status = 501 if "cannot be explained" in str(error) else 422
            raise RequestProblem(status, " ".join(str(error).split())) from error
        except RuntimeError as error:
            raise RequestProblem(
                422, f"the model cannot run on inputs of shape {list(inputs.shape)}: {error}"
            ) from error
        return {"detector": self.guard.detector.name, "shape": list(maps.shape[1:]), "maps": maps.tolist()}

    def _typed(self, array: np.ndarray, name: str) -> np.ndarray:
        """float64 for a guard with an input contract (it screens the values, then casts); float32 otherwise, with
        values beyond float32 left infinite, which the guard decides OOD."""
        if self.contract is not None and name in self.contract.fields:
            return array
        with np.errstate(over="ignore"):
            return array.astype(np.float32)

    def schema(self, max_body_bytes: int) -> dict[str, Any]:
        fields = {} if self.contract is None else self.contract.describe()
        example = {} if self.contract is None else self.contract.example()
        return {"mode": self.mode, "fields": fields, "example": example, "max_body_bytes": max_body_bytes}


# ---------------------------------------------------------------------------- refusals before the application
class _RequestGate:
    """ASGI middleware: the token, size limit, bodies in flight and body deadline, then per-request metrics.

    Everything is refused before a byte of the body is read where it can be: a missing or wrong token (401),
    an announced size over the limit (413), too many bodies in flight (503). The body is then read within
    ``body_timeout`` seconds (else 408) and up to the limit (else 413), before the application sees it.
    """

    def __init__(
        self,
        app: Any,
        metrics: ServiceMetrics,
        max_body_bytes: int,
        token: str | None,
        body_timeout: float,
        max_bodies_in_flight: int,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.expected_authorization = None if token is None else f"Bearer {token}".encode()
        self.body_timeout = body_timeout
        self.max_bodies_in_flight = max_bodies_in_flight
        self.bodies_in_flight = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_and_record(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._check_token(scope) or self._check_length(scope)
            if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
                if self.bodies_in_flight >= self.max_bodies_in_flight:
                    refusal = 503, f"{self.bodies_in_flight} requests are already being received; retry shortly", {
                        "Retry-After": "1"}  # fmt: skip
                else:
                    self.bodies_in_flight += 1
                    try:
                        body, refusal = await self._read_body(receive)
                        if refusal is None:
                            await self.app(scope, _replay(body, receive), send_and_record)
                            return
                    finally:
                        self.bodies_in_flight -= 1
            if refusal is not None:
                code, message, headers = refusal
                await JSONResponse({"detail": message}, status_code=code, headers=headers)(
                    scope, receive, send_and_record
                )
                return
            await self.app(scope, receive, send_and_record)
        finally:
            path = scope["path"] if scope["path"] in _PATHS else "other"
            self.metrics.observe_request(path, status[0], time.perf_counter() - started)

    def _check_token(self, scope: dict[str, Any]) -> tuple[int, str, dict[str, str]] | None:
        if self.expected_authorization is None or scope["path"] in _OPEN_PATHS:
            return None
        given = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        challenge = {"WWW-Authenticate": "Bearer"}
        if given is None:
            return 401, "missing bearer token: send 'Authorization: Bearer <token>'", challenge
        if not hmac.compare_digest(given, self.expected_authorization):
            return 401, "wrong bearer token", challenge
        return None

    def _check_length(self, scope: dict[str, Any]) -> tuple[int, str, dict[str, str]] | None:
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return 400, "Content-Length is not a number", {}
                if length > self.max_body_bytes:
                    return 413, f"request body of {length} bytes exceeds the limit of {self.max_body_bytes} bytes", {}
        return None

    async def _read_body(self, receive: Any) -> tuple[bytes, tuple[int, str, dict[str, str]] | None]:
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.0))
            except TimeoutError:
                return b"", (408, f"request body not received within {self.body_timeout:g} s", {"Connection": "close"})
            if message["type"] == "http.disconnect":
                return b"", (400, "client disconnected before sending the whole body", {})
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", (413, f"request body exceeds the limit of {self.max_body_bytes} bytes", {})
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive: Any) -> Any:
    sent = [False]

    async def replayed() -> dict[str, Any]:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect as usual

    return replayed


# Declares the bearer scheme in the OpenAPI schema; the gate has already checked the token.
_BEARER = HTTPBearer(auto_error=False, description="The token in the server's environment (OODGUARD_TOKEN by default).")


def _documented_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
    return None


# ---------------------------------------------------------------------------- the application
def create_app(
    guard: Any,
    *,
    token_env: str = "OODGUARD_TOKEN",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_url: str | None = None,
    window_seconds: float = 60.0,
    significance: float = 0.01,
    false_alarm_rate: float | None = None,
    clock: Any = time.time,
    allow_unlogged: bool = False,
    docs: bool = True,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_bodies_in_flight: int = DEFAULT_MAX_BODIES_IN_FLIGHT,
    commit_timeout: float = DEFAULT_COMMIT_TIMEOUT,
) -> FastAPI:
    """A FastAPI application serving ``guard``.

    Parameters
    ----------
    guard : Guard
        A fitted and calibrated guard (see :mod:`oodguard.guard`); a guard with a model takes model
        inputs, a model-agnostic one takes logits and/or features.
    token_env : str, default ``"OODGUARD_TOKEN"``
        Environment variable holding the bearer token. Unset: no authentication. Set but empty: error.
        With a token, every path but ``/healthz`` needs it (``/docs`` and ``/openapi.json`` included).
    max_body_bytes : int, default 1 MiB
        Larger request bodies get 413.
    log_url : str, optional
        Decision log: a SQLite file path or a SQLAlchemy URL (see :class:`~oodguard.serve.store.DecisionLog`).
        ``None``: decisions are not logged.
    window_seconds : float, default 60
        Length of the rolling window of the OOD-rate monitor.
    significance : float, default 0.01
        Level of the binomial test behind the OOD-rate alert.
    false_alarm_rate : float, optional
        The false-alarm rate the alert tests against; default: the guard's ``false_alarm_rate_``.
    clock : callable, default ``time.time``
        Time source of the monitor and the log (seconds since the epoch).
    allow_unlogged : bool, default False
        When the decision log cannot commit a request's rows: False answers 503 (nothing acknowledged that is
        not logged); True answers 200 with ``X-Decision-Logged: false``.
    docs : bool, default True
        Serve ``/docs`` and ``/openapi.json``.
    body_timeout : float, default 10
        Seconds a client has to send its body (else 408).
    max_bodies_in_flight : int, default 64
        Request bodies received or held at once; beyond it requests get 503 with ``Retry-After``.
    commit_timeout : float, default 10
        Seconds a request waits for its decisions to be committed before it gets 503.

    Returns
    -------
    FastAPI
        The application; ``app.state`` holds ``guard``, ``metrics``, ``monitor`` and ``decision_log``.
    """
    if not isinstance(max_body_bytes, int) or isinstance(max_body_bytes, bool) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes: expected a positive number of bytes, got {max_body_bytes!r}")
    for name, value in (("body_timeout", body_timeout), ("commit_timeout", commit_timeout)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
            raise ValueError(f"{name}: expected a positive number of seconds, got {value!r}")
    if not isinstance(max_bodies_in_flight, int) or isinstance(max_bodies_in_flight, bool) or max_bodies_in_flight < 1:
        raise ValueError(f"max_bodies_in_flight: expected a positive integer, got {max_bodies_in_flight!r}")
    token = os.environ.get(token_env) if token_env else None
    if token is not None and not token.strip():
        raise ValueError(f"environment variable {token_env} is set but empty; unset it or set a token")
    adapter = GuardAdapter(guard, false_alarm_rate)
    if adapter.false_alarm_rate is None:
        raise ValueError("the guard has no calibrated false-alarm rate; calibrate it or pass false_alarm_rate")
    monitor = OODRateMonitor(
        adapter.false_alarm_rate, window_seconds=window_seconds, significance=significance, clock=clock
    )
    metrics = ServiceMetrics(monitor)
    decision_log = (
        None if log_url is None else DecisionLog(log_url, alpha=adapter.false_alarm_rate, significance=significance)
    )
    if decision_log is not None:
        metrics.add_gauge(
            "oodguard_decision_log_pending_rows",
            "Decisions queued for the database.",
            lambda: decision_log.pending_rows,
        )
        metrics.add_gauge(
            "oodguard_decision_log_failed_rows", "Decisions the database refused.", lambda: decision_log.rows_failed
        )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        yield
        if decision_log is not None:
            decision_log.close()  # writes every queued decision before the process exits

    app = FastAPI(
        title="oodguard",
        summary="Out-of-distribution guard of a trained model: scores, p-values and decisions per input.",
        version=_version(),
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.guard = guard
    app.state.metrics = metrics
    app.state.monitor = monitor
    app.state.decision_log = decision_log
    protected = [Depends(_documented_token)] if token is not None else []

    @app.exception_handler(RequestProblem)
    async def _refused(_request: Request, problem: RequestProblem) -> JSONResponse:
        return JSONResponse({"detail": problem.message}, status_code=problem.status)

    @app.exception_handler(Exception)
    async def _failed(_request: Request, _error: Exception) -> JSONResponse:
        return JSONResponse({"detail": "internal error while scoring; see the server log"}, status_code=500)

    request_body = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}}},
    }

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses=_ERRORS,
        dependencies=protected,
        openapi_extra={"requestBody": request_body},
        summary="Score inputs: prediction, OOD score, p-value and decision per input",
    )
    async def score(request: Request) -> Response:
        _require_json(request)
        body = await request.body()
        parsed = parse_score_request(body)
        if adapter.mode == "outputs" and len(body) <= _INLINE_BODY_BYTES:
            decided = adapter.decide(parsed)  # a fraction of a millisecond: cheaper than a hop to a thread
        else:
            decided = await run_in_threadpool(adapter.decide, parsed)
        request_id = uuid.uuid4().hex
        headers = {"X-Request-ID": request_id, "X-Decision-Logged": "off"}
        if decision_log is not None:
            headers["X-Decision-Logged"] = await _commit(decision_log, request_id, decided, clock(), commit_timeout,
                                                         allow_unlogged)  # fmt: skip
        metrics.observe_decisions(decided["is_ood"])
        return Response(_dumps({"request_id": request_id, **decided}), media_type="application/json", headers=headers)

    @app.post(
        "/v1/explain",
        response_model=ExplainResponse,
        responses=_ERRORS,
        dependencies=protected,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ExplainRequest"}}},
            }
        },
        summary="Explain OOD scores: per input, a map of what raises its score (UA-Backprop)",
    )
    async def explain(request: Request) -> Response:
        _require_json(request)
        inputs, sigma = parse_explain_request(await request.body())
        explained = await run_in_threadpool(adapter.explain, inputs, sigma)
        request_id = uuid.uuid4().hex
        headers = {"X-Request-ID": request_id}
        return Response(_dumps({"request_id": request_id, **explained}), media_type="application/json", headers=headers)

    @app.get(
        "/v1/schema",
        response_model=InputSchema,
        dependencies=protected,
        responses={401: _ERRORS[401]},
        summary="The input the guard expects: fields, row shapes, dtypes, value ranges and an example request",
    )
    def schema() -> dict[str, Any]:
        return adapter.schema(max_body_bytes)

    @app.get("/healthz", response_model=Health, summary="Liveness: answers while the service runs")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "mode": adapter.mode, "false_alarm_rate": adapter.false_alarm_rate}

    @app.get(
        "/metrics",
        dependencies=protected,
        responses={401: _ERRORS[401], 200: {"content": {"text/plain": {}}}},
        summary="Prometheus metrics: requests, latency histogram, OOD rate and alert",
    )
    def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    _document_request_model(app)
    app.add_middleware(
        _RequestGate,
        metrics=metrics,
        max_body_bytes=max_body_bytes,
        token=token,
        body_timeout=float(body_timeout),
        max_bodies_in_flight=max_bodies_in_flight,
    )
    return app


def _require_json(request: Request) -> None:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (kind == "application/json" or kind.endswith("+json")):
        shown = kind or "no content type"
        raise RequestProblem(415, f"send the body as JSON with 'Content-Type: application/json' (got {shown})")


async def _commit(
    decision_log: DecisionLog,
    request_id: str,
    decided: dict[str, list[Any]],
    timestamp: float,
    timeout: float,
    allow_unlogged: bool,
) -> str:
    """Wait until the request's rows are committed: ``"true"``; on failure 503, or ``"false"`` when allowed."""
    try:
        committed = decision_log.log(request_id, timestamp=timestamp, block=False, **decided)
        # shield: a request that stops waiting must not cancel the commit itself
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(committed)), timeout=timeout)
        return "true"
    except (DecisionLogError, TimeoutError) as error:
        if allow_unlogged:
            return "false"
        why = str(error) or f"not committed within {timeout:g} s"
        raise RequestProblem(
            503, f"the decision could not be logged ({why}); nothing was acknowledged, retry"
        ) from None


def _document_request_model(app: FastAPI) -> None:
    """Add ScoreRequest and ExplainRequest (parsed by the service itself, for speed and exact messages) to the
    OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ScoreRequest, ExplainRequest):
                request = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(request.pop("$defs", {}))
                components[model.__name__] = request
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# ---------------------------------------------------------------------------- several worker processes
def app_from_environment() -> FastAPI:
    """The application described by the JSON in :data:`SETTINGS_ENV` (how ``oodguard serve --workers N`` starts
    each worker process: ``directory``, ``model_factory`` and the keyword arguments of :func:`create_app`)."""
    from oodguard.guard import load_guard

    settings = json.loads(os.environ[SETTINGS_ENV])
    guard = load_guard(settings.pop("directory"), model_factory=settings.pop("model_factory", None))
    return create_app(guard, **settings)


def _version() -> str:
    from oodguard import __version__

    return __version__
