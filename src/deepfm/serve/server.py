"""The scoring and ranking HTTP service over a bundle (FastAPI on uvicorn).

Routes (JSON in and out; every route but ``/health`` needs ``Authorization: Bearer TOKEN`` when
the server has a token):

* ``POST /predict`` ``{"records": [{field: value, ...}, ...]}`` → ``{"ctr": [...]}`` in order;
* ``POST /rank`` ``{"user": {...}, "context": {...}, "candidates": [{..., "bid": x}], "top": L,
  "by": "ctr" | "ctr_bid"}`` → ``{"items": [{"index", "score", "ctr"}, ...]}`` best first;
* ``GET /health``; ``GET /model`` (what is served); ``GET /metrics`` (Prometheus text);
* ``POST /reload`` (or SIGHUP): load the bundle directory again and swap it in.

Bad input never gets a 5xx: malformed JSON → 400; a wrong type, an unknown key, a value that is
not a feature value (NaN, infinity, an object) → 422 with a message naming the place
(``candidates[3], field 'C7': ...``); more records than ``max_records`` or a body larger than
``max_body_bytes`` → 413; a missing or wrong token → 401.

Hot reload: every request takes the predictor once, when it starts, and finishes on it; a reload
loads and verifies the new bundle off the event loop and then replaces one reference, so requests
in flight finish on the old model and none fails. A bundle that fails to load or verify leaves the
old one serving (``/reload`` answers 409 with the reason).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

from deepfm.errors import ConfigError, DataError, DeepFMError, is_finite_number
from deepfm.outputs import to_json
from deepfm.serve.batching import INLINE_BELOW, ForwardBatcher
from deepfm.serve.encoding import PLAIN_DICTS
from deepfm.serve.predictor import Predictor, Runtime, check_finite, default_runtime
from deepfm.train.trainer import MAX_THREADS

try:  # a fast JSON parser; without it pydantic parses every body (same answers, ~2x the CPU)
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency of the serve extra
    orjson = None

log = logging.getLogger("deepfm.serve")

ROUTES = ("/predict", "/rank", "/health", "/model", "/metrics", "/reload")
#: a host name or an IPv4/IPv6 address (no scheme, port, path or spaces)
HOST = re.compile(r"[A-Za-z0-9._:%-]{1,253}")
#: the media type every POST must declare: no other type (text/plain, forms) can be sent
#: cross-site without a CORS preflight, which this server never grants
JSON_TYPE = b"application/json"
#: a JSON string, to blank out before counting the objects and keys of a body
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
OPEN_ROUTES = frozenset({"/health"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)


@dataclass
class ServeSettings:
    """What ``deepfm serve`` was asked for. ``threads``: torch / ONNX Runtime intra-op threads
    per forward pass; ``concurrency``: forward passes run at once (each in a worker thread; by
    default one per core the process may use, less the event loop's, from 1 to 4);
    ``batch_wait_ms`` and ``max_batch_rows``: dynamic batching (:mod:`deepfm.serve.batching`)."""

    model_dir: Path
    runtime: Runtime | None = None  # ONNX Runtime when installed, else torch
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_records: int = 1000
    max_body_bytes: int = 8 << 20
    threads: int = 1
    concurrency: int | None = None
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    batch_wait_ms: float = 0.0
    max_batch_rows: int = 4096
    http: str | None = None  # the HTTP parser: httptools when installed, else h11

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        if self.runtime is None:
            self.runtime = default_runtime()
        if self.http is None:
            self.http = default_http()
        if self.concurrency is None:
            self.concurrency = default_concurrency()
        if self.http not in HTTP_PARSERS:
            raise ConfigError(f"--http must be one of {', '.join(HTTP_PARSERS)}")
        if self.http == "httptools" and default_http() != "httptools":
            raise ConfigError("--http httptools needs httptools: pip install 'deepfm[serve]'")
        if not (is_finite_number(self.batch_wait_ms) and 0 <= self.batch_wait_ms <= 1000):
            raise ConfigError("--batch-wait-ms must be in [0, 1000]")
        if self.max_batch_rows < 1:
            raise ConfigError("--max-batch-rows must be positive")
        if self.max_records < 1 or self.max_body_bytes < 1:
            raise ConfigError("--max-records and --max-body-bytes must be positive")
        if not 1 <= self.threads <= MAX_THREADS or not 1 <= self.concurrency <= MAX_THREADS:
            raise ConfigError(f"--threads and --concurrency must be in 1..{MAX_THREADS}")
        if self.token is not None and not self.token.strip():
            raise ConfigError("the token must not be empty: give one, or no token at all")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535 (0: any free port), got {self.port}")
        if not HOST.fullmatch(self.host):
            raise ConfigError(
                f"--host {self.host!r} is not a host name or IP address (e.g. 127.0.0.1, ::1, "
                "0.0.0.0, localhost)"
            )
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if not (is_finite_number(value) and 0 < value <= 3600):
                raise ConfigError(f"--{name.replace('_', '-')} must be in (0, 3600] seconds")


# -- request bodies --------------------------------------------------------------------------

StrictInt = Annotated[int, Strict()]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    records: list[dict[str, Any]] = Field(description="one object of field values per record")


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: dict[str, Any] = Field(default_factory=dict, description="user fields")
    context: dict[str, Any] = Field(default_factory=dict, description="request context fields")
    candidates: list[dict[str, Any]] = Field(description="item fields (and a bid) per candidate")
    top: StrictInt = Field(10, ge=1, le=1_000_000, description="how many to return")
    by: Literal["ctr", "ctr_bid"] = Field("ctr", description="rank by CTR or by CTR × bid")


class HTTPProblem(Exception):
    """An error answered with ``status`` and ``{"detail": message}``."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def validation_message(exc: ValidationError, limit: int = 5) -> str:
    """``loc: message`` of the first errors (never the offending input, which may be huge)."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False)[:limit]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        parts.append(f"{where}: {message}")
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_body(model: type[BaseModel], body: bytes) -> Any:
    """The request ``model`` in ``body``, or an :class:`HTTPProblem` (400 or 422).

    A body in plain JSON that is valid as it is (the usual case) is parsed by orjson and checked
    by :func:`_plain_request`; anything else goes through pydantic, whose messages the refusals
    carry: a refusal, NaN or infinity (which orjson does not read), a run of 19 or more digits
    (orjson reads an integer past 64 bits as a float, pydantic as the integer it is)."""
    if orjson is not None and _LONG_RUN not in body.translate(_DIGITS):
        try:
            request = _plain_request(model, orjson.loads(body))
        except orjson.JSONDecodeError:
            request = None
        if request is not None:
            return request
    if not body.strip():
        raise HTTPProblem(400, "empty body: send a JSON object", "bad_json")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            detail = exc.errors(include_input=False, include_url=False)[0]["msg"]
            raise HTTPProblem(400, f"malformed JSON: {detail}", "bad_json") from None
        raise HTTPProblem(422, validation_message(exc), "invalid") from None


def _plain_request(model: type[BaseModel], data: Any) -> BaseModel | None:
    """``data`` as ``model`` when pydantic would accept it as it is (the fields' exact JSON
    types, within bounds), without validating record by record; None otherwise."""
    if type(data) is not dict or not _FIELDS[model].issuperset(data):
        return None
    if model is PredictRequest:
        records = data.get("records")
        if type(records) is not list or not PLAIN_DICTS.issuperset(map(type, records)):
            return None
        return PredictRequest.model_construct(records=records)
    candidates = data.get("candidates")
    user, context = data.get("user", {}), data.get("context", {})
    top, by = data.get("top", 10), data.get("by", "ctr")
    if (
        type(candidates) is not list
        or not PLAIN_DICTS.issuperset(map(type, candidates))
        or type(user) is not dict
        or type(context) is not dict
        or type(top) is not int
        or not 1 <= top <= 1_000_000
        or by not in ("ctr", "ctr_bid")
    ):
        return None
    return RankRequest.model_construct(
        user=user, context=context, candidates=candidates, top=top, by=by
    )


_FIELDS = {m: frozenset(m.model_fields) for m in (PredictRequest, RankRequest)}
#: the routes :class:`Scoring` answers (POST only), and their request bodies
SCORED: dict[str, type[BaseModel]] = {"/predict": PredictRequest, "/rank": RankRequest}
#: every byte to "1" if a digit, else "0": a run of 19 "1"s is digits enough for an integer past
#: 64 bits (anywhere: in a string it only costs the slower path); 20x faster than a regex here
_DIGITS = bytes(49 if 48 <= c <= 57 else 48 for c in range(256))
_LONG_RUN = b"1" * 19


# -- the model being served ------------------------------------------------------------------


def settle_heap() -> None:
    """Put every object alive now out of the cyclic collector's reach (``gc.freeze``), after
    one full collection (of what an earlier call froze too). A loaded server holds ~540k
    tracked objects (torch, ONNX Runtime, FastAPI, the bundle), and a full collection of them
    takes ~0.26 s of the event loop's thread: a latency spike whenever the requests' survivors
    trigger one. Frozen, they are never scanned; they are still freed when unreferenced."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class ModelHolder:
    """The served predictor, replaced as a whole by :meth:`reload` (one reference swap).
    ``settle_heap``: after each reload, :func:`settle_heap` (the new model frozen; a previous
    one still finishing requests is frozen with it and its cycles, if any, collected at the
    next reload); set by :func:`serve`, whose process is the server's alone."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.predictor = self._load()
        self.loaded_at = time.time()
        self.reloads = 0
        self.settle_heap = False
        self._lock = threading.Lock()  # one reload at a time

    def _load(self) -> Predictor:
        s = self.settings
        predictor = Predictor.load(s.model_dir, runtime=s.runtime, threads=s.threads)
        predictor.feature_map.prepare_row_keys()  # now, not on the first request
        return predictor

    def reload(self) -> Predictor:
        """Load and verify the bundle again; on success swap it in. Raises DeepFMError."""
        with self._lock:
            fresh = self._load()
            self.predictor = fresh
            self.loaded_at = time.time()
            self.reloads += 1
            if self.settle_heap:
                settle_heap()
            return fresh

    def describe(self) -> dict[str, Any]:
        predictor = self.predictor
        return {
            **predictor.info,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "reloads": self.reloads,
        }


# -- metrics ---------------------------------------------------------------------------------


@dataclass
class ServiceMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "deepfm_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "deepfm_request_duration_seconds",
            "time from request start to response end, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "deepfm_request_errors", "refused or failed requests by route and kind",
            ["route", "kind"], registry=r,
        )  # fmt: skip
        self.rows = Counter("deepfm_scored_rows", "records scored, by route", ["route"], registry=r)
        self.reloads = Counter("deepfm_reloads", "reloads by result", ["result"], registry=r)
        self.batch = Histogram(
            "deepfm_batch_requests", "requests scored together in one forward pass",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r,
        )  # fmt: skip
        self.model = Gauge(
            "deepfm_model_info", "the bundle being served (value 1)",
            ["model", "feature_map_sha256", "created", "runtime"], registry=r,
        )  # fmt: skip

    def set_model(self, info: dict[str, Any]) -> None:
        self.model.clear()
        labels = ("model", "feature_map_sha256", "created", "runtime")
        self.model.labels(*(str(info.get(k)) for k in labels)).set(1)


# -- ASGI middleware: token, body limit, metrics ---------------------------------------------


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()


def _scores_json(data: dict[str, Any]) -> bytes:
    """A scored answer (finite floats, ints, lists and NumPy arrays of them) as JSON."""
    if orjson is not None:
        return orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)
    return _json_bytes({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in data.items()})


async def _send_json(send, status: int, data: Any, headers: list | None = None) -> None:
    body = _json_bytes(data)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ServiceMiddleware:
    """Bearer token on every route but ``/health``; request counts, latency and errors; and
    ``/predict`` and ``/rank`` answered here by ``scoring`` (:class:`Scoring`), in front of
    FastAPI: its routing, dependency solving and response classes cost about a third of the
    CPU of a 100-candidate ``/rank``. Every other route is FastAPI's."""

    def __init__(
        self, app, settings: ServeSettings, metrics: ServiceMetrics, scoring: Scoring
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.scoring = scoring
        self.token = None if settings.token is None else f"Bearer {settings.token}".encode()
        self.latency = {route: metrics.latency.labels(route) for route in (*ROUTES, "other")}

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self.token)
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope["path"]
        route = path if path in ROUTES else "other"
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.token is not None and path not in OPEN_ROUTES and not self._authorized(scope):
                self.metrics.errors.labels(route, "unauthorized").inc()
                await _send_json(
                    send_status,
                    401,
                    {"detail": "missing or wrong bearer token (Authorization: Bearer TOKEN)"},
                    [(b"www-authenticate", b"Bearer")],
                )
            elif scope["method"] == "POST" and route != "other" and not _is_json(scope):
                self.metrics.errors.labels(route, "media_type").inc()
                await _send_json(
                    send_status,
                    415,
                    {"detail": "send the body as Content-Type: application/json"},
                )
            elif route in SCORED and scope["method"] == "POST":
                await self.scoring(route, scope, receive, send_status)
            elif route in SCORED:  # as FastAPI answers a method a route does not take
                await _send_json(
                    send_status, 405, {"detail": "Method Not Allowed"}, [(b"allow", b"POST")]
                )
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.latency[route].observe(time.perf_counter() - start)


def _is_json(scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == JSON_TYPE
    return False


async def read_body(scope, receive, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes: the declared length is checked
    first, then the bytes as they arrive (nothing past the limit is ever held)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                raise HTTPProblem(
                    413, f"body of {value.decode()} bytes exceeds the limit of {limit}", "too_large"
                )
            break
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":  # the client left (or timed out) mid-body
            raise HTTPProblem(CLIENT_CLOSED, "the client left mid-body", "disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPProblem(413, f"body exceeds the limit of {limit} bytes", "too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


#: status recorded for a request whose client left before it was read (nginx's convention)
CLIENT_CLOSED = 499


def check_structure(body: bytes, max_objects: int, max_keys: int) -> None:
    """Refuse with 413, before parsing, a body holding more JSON objects or keys than any
    acceptable request can: parsing 8 MB of ``{}`` would build millions of Python dicts."""
    objects, keys = body.count(b"{"), body.count(b":")
    if (objects > max_objects or keys > max_keys) and b'"' in body:
        # braces and colons inside strings only add: counted again without them, only when
        # the bytes' own count is too high (blanking the strings costs as much CPU as scoring)
        bare = _JSON_STRING.sub(b'""', body)
        objects, keys = bare.count(b"{"), bare.count(b":")
    if objects > max_objects or keys > max_keys:
        raise HTTPProblem(
            413,
            f"the body holds {objects} objects and {keys} keys, more than a request within the "
            f"limits can ({max_objects} objects, {max_keys} keys)",
            "too_large",
        )


class Scoring:
    """``POST /predict`` and ``/rank`` on bare ASGI messages: read the body, check and parse it,
    encode it on the event loop (a request's records in a few vectorised passes), score its rows
    in a forward pass shared with the requests waiting at the same time (:class:`ForwardBatcher`,
    in worker threads: the event loop keeps reading requests) and answer JSON bytes. A refusal
    is an :class:`HTTPProblem` answered ``{"detail": message}``, counted by kind."""

    def __init__(
        self,
        settings: ServeSettings,
        holder: ModelHolder,
        metrics: ServiceMetrics,
        batcher: ForwardBatcher,
    ) -> None:
        self.settings, self.holder, self.metrics, self.batcher = settings, holder, metrics, batcher

    async def __call__(self, route: str, scope, receive, send) -> None:
        try:
            content = await self._answer(route, scope, receive)
        except HTTPProblem as exc:
            self.metrics.errors.labels(route, exc.kind).inc()
            await _send_json(send, exc.status, {"detail": exc.message})
            return
        except Exception as exc:  # a bug: say so, log it
            self.metrics.errors.labels(route, "internal").inc()
            log.exception("internal error on %s", route)
            await _send_json(send, 500, {"detail": f"internal error: {type(exc).__name__}"})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(content)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})

    async def _answer(self, route: str, scope, receive) -> bytes:
        settings = self.settings
        raw = await read_body(scope, receive, settings.max_body_bytes)
        fields = len(self.holder.predictor.encoder.names) + 1  # and a bid
        # records or candidates, plus the body, user and context objects (keys likewise): no
        # request within the limits holds more, unknown keys being refused anyway
        most = settings.max_records + 3
        check_structure(raw, most, most * fields + len(RankRequest.model_fields))
        rank = route == "/rank"
        body = parse_body(RankRequest if rank else PredictRequest, raw)
        n = len(body.candidates if rank else body.records)
        if n > settings.max_records:
            what = "candidates" if rank else "records"
            raise HTTPProblem(
                413, f"{n} {what} exceed the limit of {settings.max_records}", "too_large"
            )
        predictor = self.holder.predictor  # this request finishes on this model, whatever reloads
        try:
            if rank:
                encoded = predictor.encode_rank(
                    body.user, body.context, body.candidates, strict=True
                )
            else:
                encoded = predictor.encode(body.records, strict=True)
            ctr = check_finite(await self.batcher.score(predictor, encoded.ids, encoded.values))
            if rank:
                answer = {"items": Predictor.ranked(ctr, body.candidates, top=body.top, by=body.by)}
            else:
                answer = {"ctr": ctr}
            content = _scores_json(answer)
        except DataError as exc:
            raise HTTPProblem(422, str(exc), "invalid") from None
        self.metrics.rows.labels(route).inc(n)
        return content


# -- the application -------------------------------------------------------------------------


def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def create_app(settings: ServeSettings, holder: ModelHolder | None = None) -> FastAPI:
    """The FastAPI application over ``settings.model_dir`` (loaded here unless ``holder``)."""
    holder = holder or ModelHolder(settings)
    metrics = ServiceMetrics()
    metrics.set_model(holder.predictor.info)
    batcher = ForwardBatcher(
        settings.concurrency,
        window=settings.batch_wait_ms / 1e3,
        max_rows=settings.max_batch_rows,
        on_pass=lambda requests, _rows: metrics.batch.observe(requests),
        # a batching window asks for merged passes: none then runs alone on the loop
        inline_below=INLINE_BELOW if settings.batch_wait_ms == 0 else 0.0,
    )

    async def reload_model(source: str) -> tuple[bool, str]:
        try:
            predictor = await anyio.to_thread.run_sync(holder.reload)
        except DeepFMError as exc:
            metrics.reloads.labels("failed").inc()
            log.warning("reload (%s) failed, still serving the previous model: %s", source, exc)
            return False, str(exc)
        except Exception as exc:  # a bundle that breaks the loader in an unforeseen way
            metrics.reloads.labels("failed").inc()
            log.exception("reload (%s) failed, still serving the previous model", source)
            return False, f"{type(exc).__name__}: {exc}"
        metrics.reloads.labels("ok").inc()
        metrics.set_model(predictor.info)
        log.warning("reloaded (%s): %s", source, settings.model_dir)
        return True, ""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()

        def on_sighup() -> None:
            task = loop.create_task(reload_model("SIGHUP"))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        hangup = getattr(signal, "SIGHUP", None)
        if hangup is not None and threading.current_thread() is threading.main_thread():
            loop.add_signal_handler(hangup, on_sighup)
        try:
            yield
        finally:
            if hangup is not None and threading.current_thread() is threading.main_thread():
                loop.remove_signal_handler(hangup)
            batcher.close()

    app = ServiceApp(
        title="deepfm",
        summary="click probabilities and rankings from a DeepFM bundle",
        lifespan=lifespan,
    )
    app.state.holder = holder
    app.state.metrics = metrics

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:  # a bug: say so, log it
        metrics.errors.labels(_route(request), "internal").inc()
        log.exception("internal error on %s", request.url.path)
        return _json_response(500, {"detail": f"internal error: {type(exc).__name__}"})

    @app.get("/health")
    async def health() -> Response:
        return _json_response(200, {"status": "ok"})

    @app.get("/model")
    async def model() -> Response:
        return _json_response(200, to_json(holder.describe()))  # old bundles may hold NaN

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reload")
    async def reload() -> Response:
        ok, reason = await reload_model("POST /reload")
        if ok:
            return _json_response(200, to_json({"reloaded": True, "model": holder.describe()}))
        return _json_response(
            409,
            to_json(
                {
                    "detail": f"reload failed, the previous model is still served: {reason}",
                    "model": holder.describe(),
                }
            ),
        )

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    scoring = Scoring(settings, holder, metrics, batcher)
    app.service = ServiceMiddleware(
        functools.partial(FastAPI.__call__, app), settings, metrics, scoring
    )
    return app


class ServiceApp(FastAPI):
    """FastAPI behind :class:`ServiceMiddleware` (``service``): every request passes it first,
    and the two scored routes never enter FastAPI's own middleware stack (its error, telemetry
    and body-limit layers cost about 0.1 ms of CPU a request). FastAPI's answers, its 404 and
    405 included, pass back through it to be counted."""

    service: ServiceMiddleware | None = None

    async def __call__(self, scope, receive, send) -> None:
        if self.service is None:
            await super().__call__(scope, receive, send)
        else:
            await self.service(scope, receive, send)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI schema of its routes, with the two :class:`ServiceMiddleware` answers
    (computed once, as FastAPI does)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        scored = {
            path: {
                "post": {
                    "summary": path[1:].title(),
                    "operationId": f"{path[1:]}_{path[1:]}_post",
                    **_schema_of(model),
                    "responses": {
                        "200": {
                            "description": "Successful Response",
                            "content": {"application/json": {"schema": {}}},
                        }
                    },
                }
            }
            for path, model in SCORED.items()
        }
        schema["paths"] = {**scored, **schema["paths"]}
        app.openapi_schema = schema
    return app.openapi_schema


def _route(request: Request) -> str:
    path = request.url.path
    return path if path in ROUTES else "other"


def _json_response(status: int, data: Any) -> Response:
    return Response(_json_bytes(data), status_code=status, media_type="application/json")


# -- running ---------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: the system picks a free port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


#: how the connection's requests are read: httptools (a C parser, less CPU per request) when it
#: is installed, else h11 (pure Python, a dependency of uvicorn)
HTTP_PARSERS = ("httptools", "h11")
#: the most bytes of a request line and headers (h11's default)
MAX_HEAD_BYTES = 16 << 10
#: the parts of a request that have a read deadline
_HEAD, _BODY = "headers", "body"


def default_concurrency() -> int:
    """Worker threads for forward passes: one per usable core but the event loop's, 1 to 4
    (on 2 cores, two workers and the loop contend for the cores and each request costs more
    CPU)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, (cores or 1) - 1))


def default_http() -> str:
    import importlib.util

    return "httptools" if importlib.util.find_spec("httptools") else "h11"


class _ReadDeadlines:
    """Read deadlines of a uvicorn HTTP protocol (mixed in before it): a connection that has not
    sent a request's headers within ``header_timeout`` seconds of starting to wait for them (on
    connecting, or once the previous answer is sent), or its body within ``body_timeout``
    seconds after the headers, is closed. uvicorn only limits idle keep-alive time, so a client
    trickling bytes would otherwise hold a connection forever. Each protocol says which part of
    a request it is reading (:meth:`_arm`)."""

    header_timeout: float
    body_timeout: float
    _deadline: asyncio.TimerHandle | None = None
    _phase: object = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None, None)
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self, phase, seconds: float | None) -> None:
        """Start the deadline of ``phase`` (None: none runs), unless it already runs."""
        if phase is not None and phase is self._phase:
            return  # still reading the same part: its deadline stands
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None and seconds is not None:
            self._deadline = self.loop.call_later(seconds, self._timed_out)  # type: ignore[attr-defined]

    def _timed_out(self) -> None:
        self._deadline = None
        transport = self.transport  # type: ignore[attr-defined]
        if not transport.is_closing():
            transport.close()  # the app sees a disconnect, not an error


class _OneWritePerTurn:
    """A transport that sends an answer's head with its body: uvicorn writes the status line
    and headers, then the body, each at once (two sends and two TCP segments, and two reads
    for the client). A write is held until the next one, which leaves with it, or until the end
    of the loop's turn; closing sends what is held first."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._held is None:
            self._held = data
            self._loop.call_soon(self._flush)
        else:
            held, self._held = self._held, None
            self._transport.write(held + data)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():  # closed: nobody reads
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's
        return getattr(self._transport, name)


class _CoalescedWrites:
    """Mixed into a uvicorn HTTP protocol: its transport writes once per loop turn."""

    def connection_made(self, transport) -> None:
        super().connection_made(_OneWritePerTurn(transport, self.loop))  # type: ignore[misc,attr-defined]


def _timed_h11() -> type:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(_ReadDeadlines, _CoalescedWrites, H11Protocol):
        """h11's protocol; the part being read is h11's state of the connection after each
        event."""

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def _watch(self) -> None:
            state = self.conn.their_state
            if state is h11.IDLE:  # waiting for a request line and headers
                phase = _HEAD if self.conn.our_state is h11.IDLE else None
                self._arm(phase, self.header_timeout)
            elif state is h11.SEND_BODY:
                self._arm(_BODY, self.body_timeout)
            else:  # the request is read: the app answers, keep-alive is uvicorn's
                self._arm(None, None)

    return TimedH11Protocol


def _timed_httptools() -> type:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class TimedHttpToolsProtocol(_ReadDeadlines, _CoalescedWrites, HttpToolsProtocol):
        """httptools' protocol; the part being read follows the parser's callbacks. httptools
        itself takes headers of any length: past :data:`MAX_HEAD_BYTES` they are refused (400)
        here, as h11 refuses them."""

        _head_bytes = 0

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(_HEAD, self.header_timeout)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0

        def on_url(self, url: bytes) -> None:
            self._count(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(value, len(name) + 4)
            super().on_header(name, value)

        def _count(self, part: bytes, extra: int = 0) -> None:
            self._head_bytes += len(part) + extra
            if self._head_bytes > MAX_HEAD_BYTES:  # raised out of the parser: uvicorn answers 400
                raise ValueError(f"request line and headers over {MAX_HEAD_BYTES} bytes")

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._arm(_BODY, self.body_timeout)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._arm(None, None)  # the request is read: the app answers

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # nothing read is left to answer: the next request's headers are awaited
            if self.cycle.response_complete and not self.transport.is_closing():
                self._arm(_HEAD, self.header_timeout)

    return TimedHttpToolsProtocol


def timed_protocol(header_timeout: float, body_timeout: float, http: str | None = None) -> type:
    """uvicorn's protocol for ``http`` (one of :data:`HTTP_PARSERS`; None:
    :func:`default_http`) with the read deadlines of :class:`_ReadDeadlines`."""
    protocol = _timed_httptools() if (http or default_http()) == "httptools" else _timed_h11()
    protocol.header_timeout, protocol.body_timeout = header_timeout, body_timeout
    return protocol


def build_server(settings: ServeSettings, app: FastAPI | None = None):
    """``(uvicorn.Server, listening socket)`` for ``settings`` (the app built here unless
    given); ``server.run(sockets=[sock])`` serves until ``server.should_exit``."""
    import uvicorn

    app = app or create_app(settings)
    sock = bind_socket(settings.host, settings.port)
    config = uvicorn.Config(
        app,
        http=timed_protocol(settings.header_timeout, settings.body_timeout, settings.http),
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # nothing here reads the client's address
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    return uvicorn.Server(config), sock


def serve(settings: ServeSettings) -> None:
    """Load the bundle, bind the socket, and serve until SIGINT/SIGTERM."""
    import torch

    app = create_app(settings)
    server, sock = build_server(settings, app)
    torch.set_num_threads(settings.threads)  # once the bundle has loaded: this process serves
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    if not is_loopback(settings.host) and settings.token is None:
        print(
            f"deepfm serve: warning: listening on {settings.host} without --token: "
            "anyone who can reach this address can score and reload",
            file=sys.stderr,
        )
    info = app.state.holder.predictor.info
    print(
        f"deepfm serve: {info['model']} ({settings.runtime}) from {settings.model_dir} "
        f"listening on {url}",
        file=sys.stderr,
        flush=True,
    )
    logging.basicConfig(level=logging.WARNING, format="deepfm serve: %(message)s")
    app.state.holder.settle_heap = True
    settle_heap()
    server.run(sockets=[sock])
