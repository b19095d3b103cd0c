"""The HTTP service of a guard (FastAPI): scores and decisions, health, Prometheus metrics.

``POST /v1/score`` takes model outputs (``logits`` and/or ``features``, for a model-agnostic guard) or
model inputs (``inputs``, for a guard that runs its model) and returns, per input, the model's
prediction, the OOD score (higher = more likely OOD), the conformal p-value and the decision.
``GET /healthz`` answers while the service runs; ``GET /metrics`` exposes request counts, latencies and
the rolling OOD rate with its alert in the Prometheus text format. The OpenAPI schema is at
``/openapi.json`` (interactive documentation at ``/docs``).

Every malformed request gets a 4xx status and a JSON body ``{"detail": "<what was wrong>"}``; the
service keeps serving. Requests larger than ``max_body_bytes`` get 413, whether they announce their size
(``Content-Length``) or not (chunked). With a token in the environment variable ``token_env``, scoring
and metrics need ``Authorization: Bearer <token>`` (compared in constant time); health never does.
"""

from __future__ import annotations

import hmac
import os
import time
import uuid
from collections.abc import MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypeAliasType

from oodguard.serve.monitor import OODRateMonitor, ServiceMetrics
from oodguard.serve.store import DecisionLog

__all__ = ["ScoreRequest", "ScoreResponse", "create_app"]

#: Default request size limit: 1 MiB holds ~50,000 numbers, e.g. a batch of 100 feature vectors of 512.
DEFAULT_MAX_BODY_BYTES = 1 << 20
_PATHS = ("/v1/score", "/healthz", "/metrics")

FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Matrix = list[list[FiniteNumber]]
# Rows of any rank: [N, D], [N, C, H, W], ... (validated strictly: numbers only, finite).
# mypy cannot resolve a recursive alias built at run time; pydantic can, and validates with it.
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
    """Per input (same order as the request): prediction, OOD score, p-value and decision."""

    request_id: str = Field(description="Identifier of this request, also in the decision log and X-Request-ID.")
    predictions: list[int | None] = Field(description="The model's predicted class (null when unknown).")
    scores: list[float] = Field(description="OOD scores, higher = more likely out-of-distribution.")
    pvalues: list[float | None] = Field(description="Conformal p-values (small = unlike the calibration data).")
    is_ood: list[bool] = Field(description="The guard's decision: true = flagged as out-of-distribution.")


class Health(BaseModel):
    status: str = Field(description='"ok" while the service runs.')
    mode: str = Field(description='"outputs" (send logits/features) or "inputs" (send model inputs).')
    false_alarm_rate: float = Field(description="Expected fraction of ID inputs the guard flags (alert baseline).")


class ErrorMessage(BaseModel):
    detail: str = Field(description="What was wrong with the request, and how to fix it.")


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorMessage, "description": text}
    for code, text in [
        (400, "Body is not valid JSON"),
        (401, "Missing or wrong bearer token"),
        (413, "Body larger than the size limit"),
        (415, "Body not sent as application/json"),
        (422, "Well-formed JSON but wrong fields, shapes, dtypes or non-finite numbers"),
    ]
}


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

    def decide(self, request: ScoreRequest) -> dict[str, list[Any]]:
        """Run the guard on a validated request; a ``ValueError`` means the input does not fit the guard."""
        if self.mode == "inputs":
            if request.inputs is None or request.logits is not None or request.features is not None:
                raise ValueError("this guard runs its model: send the model's inputs as {'inputs': [...]}")
            import torch

            x: Any = torch.from_numpy(_numeric_array(request.inputs, "inputs", min_rank=1))
        else:
            if request.inputs is not None:
                raise ValueError("this guard scores model outputs: send 'logits' and/or 'features', not 'inputs'")
            if request.logits is None and request.features is None:
                raise ValueError("send 'logits' [N, C] and/or 'features' [N, D] (whichever the guard's detector needs)")
            x = {
                name: _numeric_array(values, name, min_rank=2)
                for name, values in (("logits", request.logits), ("features", request.features))
                if values is not None
            }
        try:
            result = self.guard.guard(x) if request.fdr is None else self.guard.guard_batch(x, fdr=request.fdr)
        except RuntimeError as error:
            if self.mode != "inputs":
                raise
            # torch's complaint about well-formed numbers: inputs of the wrong shape for the model
            raise ValueError(f"the model cannot run on inputs of shape {list(x.shape)}: {error}") from error
        predictions = np.asarray(result.prediction).tolist()
        return {
            "predictions": [None if p < 0 else p for p in predictions],  # -1: no logits and no head to predict from
            "scores": np.asarray(result.score, dtype=np.float64).tolist(),
            "pvalues": np.asarray(result.pvalue, dtype=np.float64).tolist(),
            "is_ood": np.asarray(result.is_ood, dtype=bool).tolist(),
        }


def _numeric_array(values: list[Any], field: str, min_rank: int) -> np.ndarray:
    """Nested lists of numbers -> a finite float32 array ``[N, ...]``, or a ValueError naming the problem."""
    try:
        array = np.array(values)
    except (ValueError, TypeError) as error:  # ragged nesting
        raise ValueError(f"{field}: rows of different lengths or shapes; every row must have the same shape") from error
    if array.dtype.kind not in "iuf":  # already excluded by the request model; kept for direct callers
        raise ValueError(f"{field}: expected numbers only, got dtype {array.dtype}; send JSON numbers")
    if array.ndim < min_rank:
        raise ValueError(f"{field}: expected a list of rows (rank >= {min_rank}), got shape {list(array.shape)}")
    if array.shape[0] == 0 or array.size == 0:
        raise ValueError(f"{field}: empty; send at least one row")
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{field}: contains NaN or infinite values (or numbers beyond float32); send finite numbers")
    return array


# ---------------------------------------------------------------------------- size limit and request metrics
class _RequestGate:
    """ASGI middleware: body size limit (413) and per-request metrics (status and latency by path).

    The body is read here, up to the limit, before the application sees it: a request over the limit is
    refused as soon as its ``Content-Length`` or its bytes exceed the limit, whatever the route.
    """

    def __init__(self, app: Any, metrics: ServiceMetrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

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
            refusal = self._check_length(scope)
            body = b""
            if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, refusal = await self._read_body(receive)
            if refusal is not None:
                code, message = refusal
                await JSONResponse({"detail": message}, status_code=code)(scope, receive, send_and_record)
                return
            await self.app(scope, _replay(body, receive), send_and_record)
        finally:
            path = scope["path"] if scope["path"] in _PATHS else "other"
            self.metrics.observe_request(path, status[0], time.perf_counter() - started)

    def _check_length(self, scope: dict[str, Any]) -> tuple[int, str] | None:
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return 400, "Content-Length is not a number"
                if length > self.max_body_bytes:
                    return 413, f"request body of {length} bytes exceeds the limit of {self.max_body_bytes} bytes"
        return None

    async def _read_body(self, receive: Any) -> tuple[bytes, tuple[int, str] | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", (400, "client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", (413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
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


_BEARER = HTTPBearer(auto_error=False, description="The token in the server's environment (OODGUARD_TOKEN by default).")


class _TokenCheck:
    """Dependency: the request carries ``Authorization: Bearer <token>``, compared in constant time."""

    def __init__(self, token: str) -> None:
        self.token = token.encode()

    def __call__(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        if credentials is None:
            raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        if not hmac.compare_digest(credentials.credentials.encode(), self.token):
            raise HTTPException(401, "wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def _validation_message(error: RequestValidationError) -> tuple[int, str]:
    problems = error.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        detail = next(p for p in problems if p.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return 400, f"body is not valid JSON ({detail})" if detail else "body is not valid JSON"
    parts: list[str] = []
    for problem in problems:
        # Drop "body" and the union branches pydantic names in nested inputs ("list[float]", ...).
        location = [str(x) for x in problem.get("loc", ()) if x != "body" and not (isinstance(x, str) and "[" in x)]
        where = location[0] + "".join(f"[{x}]" for x in location[1:]) if location else "body"
        part = f"{where}: {problem.get('msg', 'invalid')}"
        if part not in parts:
            parts.append(part)
    more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
    return 422, "; ".join(parts[:3]) + more


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
) -> FastAPI:
    """A FastAPI application serving ``guard``.

    Parameters
    ----------
    guard : Guard
        A fitted and calibrated guard (see :mod:`oodguard.guard`); a guard with a model takes model
        inputs, a model-agnostic one takes logits and/or features.
    token_env : str, default ``"OODGUARD_TOKEN"``
        Environment variable holding the bearer token. Unset: no authentication. Set but empty: error.
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
        The false-alarm rate the alert tests against; default: the guard's ``false_alarm_rate_`` (the
        expected fraction of ID inputs it flags, from its calibration).
    clock : callable, default ``time.time``
        Time source of the monitor and the log (seconds since the epoch).

    Returns
    -------
    FastAPI
        The application; ``app.state`` holds ``guard``, ``metrics``, ``monitor`` and ``decision_log``.
    """
    if not isinstance(max_body_bytes, int) or isinstance(max_body_bytes, bool) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes: expected a positive number of bytes, got {max_body_bytes!r}")
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
    )
    app.state.guard = guard
    app.state.metrics = metrics
    app.state.monitor = monitor
    app.state.decision_log = decision_log

    protected = [Depends(_TokenCheck(token))] if token is not None else []

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and not (kind == "application/json" or kind.endswith("+json")):
            return JSONResponse({"detail": f"send the body as JSON with 'Content-Type: application/json' (got "
                                           f"{kind or 'no content type'})"}, status_code=415)  # fmt: skip
        code, message = _validation_message(error)
        return JSONResponse({"detail": message}, status_code=code)

    @app.exception_handler(Exception)
    async def _failed(_request: Request, _error: Exception) -> JSONResponse:
        return JSONResponse({"detail": "internal error while scoring; see the server log"}, status_code=500)

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses=_ERRORS,
        dependencies=protected,
        summary="Score inputs: prediction, OOD score, p-value and decision per input",
    )
    def score(body: ScoreRequest, response: Response) -> dict[str, Any]:
        try:
            decided = adapter.decide(body)
        except (ValueError, FloatingPointError) as error:  # input that does not fit the guard
            raise HTTPException(422, " ".join(str(error).split())) from error
        request_id = uuid.uuid4().hex
        metrics.observe_decisions(decided["is_ood"])
        if decision_log is not None:
            decision_log.log(request_id, timestamp=clock(), **decided)
        response.headers["X-Request-ID"] = request_id
        return {"request_id": request_id, **decided}

    @app.get("/healthz", response_model=Health, summary="Liveness: answers while the service runs")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "mode": adapter.mode, "false_alarm_rate": adapter.false_alarm_rate}

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        dependencies=protected,
        responses={401: _ERRORS[401], 200: {"content": {"text/plain": {}}}},
        summary="Prometheus metrics: requests, latency histogram, OOD rate and alert",
    )
    def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    app.add_middleware(_RequestGate, metrics=metrics, max_body_bytes=max_body_bytes)
    return app


def _version() -> str:
    from oodguard import __version__

    return __version__
