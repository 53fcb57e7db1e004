"""Following one request: request ids in and out, JSON access logs, OpenTelemetry spans.

A real `foalnet serve` writes JSON log lines (parsed here) and exports its spans over OTLP/HTTP to a
receiver on loopback; an in-process uvicorn server exports to the SDK's InMemorySpanExporter.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import uvicorn

from bench.media import make_clip, write_bytes
from bench.server import free_port
from service import observability
from service.app import create_app
from service.engine import Engine
from service.metrics import STAGES
from service.settings import Settings
from tests.server import start_server

pytestmark = pytest.mark.timeout(180)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "value", ["abc-123", "0f3e9c1c-5a43-4c8e-9d1a-3c2b1a0f9e8d", "Root=1-5e1b4151/x.y:z@host", "a" * 128]
)
def test_safe_request_ids_are_kept(value):
    assert observability.valid_request_id(value) == value


@pytest.mark.parametrize(
    "value", [None, "", "a" * 129, "two words", 'quote"d', "line\nbreak", "<script>", "-leading", "é"]
)
def test_unsafe_request_ids_are_replaced(value):
    assert observability.valid_request_id(value) is None


def test_tracing_follows_the_otel_variables():
    pytest.importorskip("opentelemetry.sdk")
    assert observability.tracer_provider_from_env({}) is None  # no exporter asked for: off
    assert observability.tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    disabled = {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}
    assert observability.tracer_provider_from_env(disabled) is None
    provider = observability.tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "console"})
    assert provider.resource.attributes["service.name"] == "foalnet"
    provider.shutdown()
    with pytest.raises(ValueError, match="no installed OTel span exporter 'zipkin'"):
        observability.tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})


# ---- a real server: JSON log lines and OTLP export ---------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: keeps every span it is sent."""

    spans: list = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def collector() -> Iterator[str]:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the otel extra is not installed")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="module")
def json_server(tiny_model, collector, tmp_path_factory):
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "foalnet-test",
    }
    folder = tmp_path_factory.mktemp("json-log")
    server = start_server(tiny_model, folder, "--log-format", "json", "--log-level", "info", env=env)
    yield server
    server.stop()


def _log_lines(server) -> list[dict]:
    lines = [line for line in server.log().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is one JSON object


def test_json_log_line_per_request_with_id_status_and_timings(json_server, tmp_path):
    clip = make_clip(tmp_path / "talk.mp4", seconds=2, width=160, height=120)
    response = httpx.post(
        json_server.url + "/predict",
        content=clip.read_bytes(),
        headers={"Content-Type": "video/mp4", "X-Request-Id": "job-42/clip-1", "traceparent": TRACEPARENT},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "job-42/clip-1"

    def access() -> list[dict]:
        return [e for e in _log_lines(json_server) if e.get("request_id") == "job-42/clip-1"]

    deadline = time.monotonic() + 10
    while not access() and time.monotonic() < deadline:
        time.sleep(0.1)
    (line,) = access()
    assert line["logger"] == "foalnet.access" and line["level"] == "info"
    assert (line["method"], line["path"], line["status"]) == ("POST", "/predict", 200)
    assert set(line["timings_ms"]) == {*STAGES, "total"}
    assert line["timings_ms"]["total"] <= line["duration_ms"]
    assert line["trace_id"] == TRACE_ID  # the caller's trace continues here
    keys = {"time", "level", "logger", "message", "request_id"}
    assert all(keys <= set(e) for e in _log_lines(json_server))
    # Start-up says what the CPU quota gave.
    (sizing,) = [e for e in _log_lines(json_server) if e["message"].startswith("threads: ")]
    assert sizing["logger"] == "service.cpu" and "-> 1 decode workers" in sizing["message"]


def test_unsafe_request_id_is_replaced_and_errors_carry_it(json_server, tmp_path):
    broken = write_bytes(tmp_path / "broken.mp4", b"not a video " * 100)
    response = httpx.post(
        json_server.url + "/predict",
        content=broken.read_bytes(),
        headers={"Content-Type": "video/mp4", "X-Request-Id": "<script>alert(1)</script>"},
        timeout=60,
    )
    assert response.status_code == 415
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    body = response.json()
    assert body == {"error": "not_media", "detail": body["detail"], "request_id": request_id}
    time.sleep(0.3)
    (line,) = [e for e in _log_lines(json_server) if e.get("request_id") == request_id]
    assert line["status"] == 415 and line["error"] == "not_media"
    assert "<script>" not in json_server.log()

    missing = httpx.get(json_server.url + "/no/such/path", headers={"X-Request-Id": "r-404"})
    assert missing.status_code == 404 and missing.json()["request_id"] == "r-404"


def test_spans_are_exported_over_otlp(json_server, tmp_path):
    clip = make_clip(tmp_path / "traced.mp4", seconds=2, width=160, height=120)
    headers = {"Content-Type": "video/mp4", "X-Request-Id": "traced-1", "traceparent": TRACEPARENT}
    assert httpx.post(json_server.url + "/predict", content=clip.read_bytes(), headers=headers, timeout=60)
    deadline = time.monotonic() + 15

    def server_span():
        def tagged(span) -> bool:
            ids = [a.value.string_value for a in span.attributes if a.key == "foalnet.request_id"]
            return ids == ["traced-1"]

        return next((s for s in _Receiver.spans if tagged(s)), None)

    while server_span() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    span = server_span()
    assert span is not None, "no span for the request reached the receiver"
    assert span.name == "POST /predict" and span.trace_id.hex() == TRACE_ID
    # FastAPI adds its own operation spans (dependencies, endpoint, ...) beside ours.
    children = [s for s in _Receiver.spans if s.parent_span_id == span.span_id and s.name in STAGES]
    assert [c.name for c in sorted(children, key=lambda c: c.start_time_unix_nano)] == list(STAGES)
    assert all(span.start_time_unix_nano <= c.start_time_unix_nano <= c.end_time_unix_nano for c in children)
    assert max(c.end_time_unix_nano for c in children) <= span.end_time_unix_nano


# ---- in process: the SDK's in-memory exporter -------------------------------------------------


@pytest.fixture(scope="module")
def memory_exporter():
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the process-wide provider can be set once
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # later tests in this process keep a provider, but nothing is kept


@pytest.fixture(scope="module")
def local_server(tiny_model, tmp_path_factory) -> Iterator[str]:
    engine = Engine(tiny_model, device="cpu", intra_op_threads=1, buckets=(1, 2))
    settings = Settings(
        model_path=tiny_model, device="cpu", intra_op_threads=1, buckets=(1, 2), max_batch=2,
        decode_workers=1, tmp_dir=tmp_path_factory.mktemp("uploads"),
    )
    port = free_port()
    config = uvicorn.Config(create_app(settings, engine=engine), port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(30)


def test_in_memory_exporter_gets_the_request_and_stage_spans(memory_exporter, local_server, tmp_path):
    clip: Path = make_clip(tmp_path / "mem.mp4", seconds=2, width=160, height=120)
    memory_exporter.clear()
    response = httpx.post(
        local_server + "/predict", files={"file": ("mem.mp4", clip.read_bytes(), "video/mp4")}, timeout=60
    )
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    spans = memory_exporter.get_finished_spans()
    (root,) = [s for s in spans if s.attributes.get("foalnet.request_id") == request_id]
    assert root.name == "POST /predict" and root.attributes["http.response.status_code"] == 200
    children = [s for s in spans if s.parent and s.parent.span_id == root.context.span_id]
    stages = sorted((s for s in children if s.name in STAGES), key=lambda s: s.start_time)
    assert [s.name for s in stages] == list(STAGES)
    timings = response.json()["timings_ms"]
    for span in stages:  # each stage span lasts what the answer's timings say
        assert (span.end_time - span.start_time) / 1e6 == pytest.approx(timings[span.name], abs=0.01)
    # Probes and scrapes are not traced.
    memory_exporter.clear()
    assert httpx.get(local_server + "/metrics").status_code == 200
    assert memory_exporter.get_finished_spans() == ()
