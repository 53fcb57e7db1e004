"""Following one request: request ids, the access log (text or JSON lines) and OpenTelemetry spans.

`RequestMiddleware` (pure ASGI, so streaming bodies and disconnects pass through untouched) gives
every HTTP request an id: the caller's `X-Request-Id` when it is safe to log, else a new one. The
id is echoed in the response header, carried by every log line written while the request runs and
put in every error body. When the request ends it writes one access-log line with the status,
duration and stage timings, and, when tracing is on, adds one child span per stage (upload,
decode_queue, decode, faces, queue, infer) to the request's server span.

The server span itself is FastAPI's own (`TELEMETRY`: semantic-convention attributes, the caller's
`traceparent` continued); it exists once a tracer provider is configured. `configure_tracing()`
configures one from the standard `OTEL_*` variables when the SDK is installed (`pip install
.[otel]`); without it, or with no exporter asked for, nothing is traced.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import entry_points
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import STAGES
from service.settings import LogFormat

from opentelemetry import trace  # the API comes with FastAPI; the SDK with the `otel` extra

log = logging.getLogger(__name__)
access_log = logging.getLogger("foalnet.access")

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_MAX = 128
# Letters, digits and the punctuation of UUIDs, trace ids and base64: nothing that could split a
# log line, forge a field or inject markup.
_SAFE_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:/+=@-]{{0,{REQUEST_ID_MAX - 1}}}")
# Polled every few seconds by probes and Prometheus: logged at debug level, never traced.
QUIET_PATHS = frozenset({"/metrics", "/livez", "/readyz", "/v2/health/live", "/v2/health/ready"})

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


@dataclass
class RequestContext:
    """What one request has told about itself so far."""

    request_id: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    timings_end_ns: int = 0  # wall clock when the timings were recorded (stages end there)
    error: str | None = None  # the error code of an error answer


_current: ContextVar[RequestContext | None] = ContextVar("foalnet_request", default=None)


def valid_request_id(value: str | None) -> str | None:
    """`value` when it is a request id we may log and echo, else None."""
    return value if value and _SAFE_ID.fullmatch(value) else None


def new_request_id() -> str:
    return uuid.uuid4().hex


def current() -> RequestContext | None:
    return _current.get()


def request_id() -> str | None:
    ctx = _current.get()
    return ctx.request_id if ctx else None


def record_timings(timings: Mapping[str, float]) -> None:
    """The request's stage timings in ms (the `Timings` of the answer); they end now."""
    ctx = _current.get()
    if ctx is not None:
        ctx.timings_ms = dict(timings)
        ctx.timings_end_ns = time.time_ns()


def error_body(code: str, detail: str) -> dict[str, str | None]:
    """The JSON body of an error answer, with the request id; notes the code for the access log."""
    ctx = _current.get()
    if ctx is not None:
        ctx.error = code
    return {"error": code, "detail": detail, "request_id": ctx.request_id if ctx else None}


class RequestMiddleware:
    """Request id in and out, one access-log line and (when tracing) a server span per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        ctx = RequestContext(valid_request_id(headers.get(REQUEST_ID_HEADER)) or new_request_id())
        # Not reset on the way out: Starlette's 500 handler runs outside this middleware, in this
        # same task, and must still see the id. Each request runs in a task of its own.
        _current.set(ctx)
        start = time.perf_counter()
        status = 500
        span = trace.get_current_span()  # FastAPI's server span for this request, when tracing

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                response_headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER not in response_headers:
                    response_headers.append(REQUEST_ID_HEADER, ctx.request_id)
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                if span.is_recording():  # FastAPI ends the span once this last part is sent
                    _annotate(span, ctx)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _access(scope, ctx, status, (time.perf_counter() - start) * 1000, span)


def _access(scope: Scope, ctx: RequestContext, status: int, duration_ms: float, span: Any) -> None:
    quiet = _quiet(scope)
    level = logging.DEBUG if quiet else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "duration_ms": round(duration_ms, 2),
    }
    if ctx.timings_ms:
        fields["timings_ms"] = {k: round(v, 2) for k, v in ctx.timings_ms.items()}
    if ctx.error:
        fields["error"] = ctx.error
    if span.get_span_context().is_valid:
        fields["trace_id"] = format(span.get_span_context().trace_id, "032x")
    stages = ", ".join(f"{k} {v:.0f}" for k, v in ctx.timings_ms.items())
    message = f"{scope['method']} {scope['path']} {status} in {duration_ms:.0f} ms"
    access_log.log(level, message + (f" ({stages} ms)" if stages else ""), extra={"fields": fields})


# ---- logging -----------------------------------------------------------------------------------


class RequestIdFilter(logging.Filter):
    """Stamps every record with the id of the request it was written for (None outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request_id, and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Root logging for the process: uvicorn's loggers propagate here (run it with log_config=None)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


# ---- tracing -----------------------------------------------------------------------------------

SERVICE_NAME = "foalnet"
_EXPORTER_GROUP = "opentelemetry_traces_exporter"  # where OTel packages register span exporters
_OTLP_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}
_tracer = trace.get_tracer("service.observability")


def _quiet(scope: Scope) -> bool:
    return scope["path"] in QUIET_PATHS


# FastAPI's native telemetry: HTTP server spans (probes and scrapes left out); its OTel metrics are
# off (Prometheus has ours); providers are configured by `configure_tracing`, not by FastAPI.
TELEMETRY = {"metrics": False, "auto_configure": False, "exclude": _quiet}


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    """OTEL_TRACES_EXPORTER's names. Unset, it means `otlp` only when an OTLP endpoint is set (the
    spec's default is `otlp` always; a service without a collector should not log export errors)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = environ.get("OTEL_TRACES_EXPORTER")
    if names is None:
        endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        names = "otlp" if any(environ.get(k) for k in endpoints) else ""
    return [n.strip() for n in names.split(",") if n.strip() and n.strip() != "none"]


def tracer_provider_from_env(environ: Mapping[str, str] = os.environ) -> Any | None:
    """An SDK TracerProvider with the exporters the OTEL_* variables name, or None (tracing off).

    Exporters are found by name among the installed OTel packages' entry points, as the SDK's own
    auto-configuration does; `otlp` means OTLP over OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL
    (http/protobuf by default). Endpoints, headers, sampler, batch sizes and resource attributes
    are read by the SDK and the exporters themselves from the usual variables."""
    names = _exporter_names(environ)
    if not names:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_* asks for traces (%s) but the OTel SDK is missing: pip install '.[otel]'", names)
        return None
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(attributes))
    installed = {ep.name: ep for ep in entry_points(group=_EXPORTER_GROUP)}
    for name in names:
        if name == "otlp":
            protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
            )
            name = _OTLP_BY_PROTOCOL.get(protocol, protocol)
        if name not in installed:
            have = ", ".join(sorted(installed))
            raise ValueError(f"no installed OTel span exporter {name!r} (have: {have})")
        provider.add_span_processor(BatchSpanProcessor(installed[name].load()()))
    return provider


def configure_tracing(environ: Mapping[str, str] = os.environ) -> Any | None:
    """Install the OTEL_*-configured provider process-wide; returns it (shut it down on exit)."""
    provider = tracer_provider_from_env(environ)
    if provider is not None:
        trace.set_tracer_provider(provider)
        log.info("tracing on: spans exported by %s", _exporter_names(environ))
    return provider


def _annotate(span: Any, ctx: RequestContext) -> None:
    """Tag the server span with the request id and error code, and give it the stage spans.

    The pipeline times stages as durations and runs them one after the other, so each child span
    is laid back to back, ending when the timings were recorded. (`infer` is the summed time of
    the batches that carried the request's windows, placed last.)"""
    span.set_attribute("foalnet.request_id", ctx.request_id)
    if ctx.error:
        span.set_attribute("foalnet.error", ctx.error)
    stages = [(s, ctx.timings_ms[s]) for s in STAGES if s in ctx.timings_ms]
    start_ns = ctx.timings_end_ns - sum(int(ms * 1e6) for _, ms in stages)
    for stage, ms in stages:
        child = _tracer.start_span(stage, start_time=start_ns)
        start_ns += int(ms * 1e6)
        child.end(end_time=start_ns)
