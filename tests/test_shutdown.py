"""SIGTERM on a real `foalnet serve` with requests in flight (tests/test_server.py checks the
plain case: one request in flight finishes, exit 0). Here: during the drain window readiness is
503 and new requests get 503 not_ready while the one in flight finishes; then the port closes and
the process exits 0; and a request that outlasts the graceful timeout does not keep the process
alive (its decode worker is killed), leaving no temp file and no child process behind.

The decode worker is stopped (SIGSTOP) before the request, so "in flight" lasts as long as the
test needs: the upload waits in the worker's pipe until the test lets the worker go on (SIGCONT).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from bench.media import make_clip
from tests.server import alive, decode_workers, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("shutdown") / "talk.mp4", seconds=2, width=160, height=120)


def _in_flight(server, data: bytes) -> tuple[threading.Thread, dict]:
    """Send a request from a thread; returns once the server is decoding it."""
    result: dict = {}

    def send() -> None:
        try:
            result["response"] = httpx.post(
                server.url + "/predict", content=data, headers={"Content-Type": "video/mp4"}, timeout=60
            )
        except httpx.TransportError as exc:
            result["error"] = exc

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 20
    while server.metric("foalnet_in_flight_requests") < 1:
        assert time.monotonic() < deadline, "the request never reached the server"
        time.sleep(0.02)
    return sender, result


def _metrics_port_ready(server) -> float:
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("foalnet_ready "))


def test_drain_refuses_new_work_finishes_in_flight_then_exits_0(lite_model, tmp_path, clip):
    uploads = tmp_path / "uploads"
    server = start_server(lite_model, uploads, "--drain-s", "2", "--graceful-timeout-s", "20")
    (worker,) = decode_workers(server.pid)
    os.kill(worker, signal.SIGSTOP)
    sender, result = _in_flight(server, clip.read_bytes())
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)

    ready = httpx.get(server.url + "/readyz", timeout=5)
    assert ready.status_code == 503 and ready.json()["error"] == "not_ready"
    assert "shutting down" in ready.json()["detail"]
    assert _metrics_port_ready(server) == 0
    late = httpx.post(
        server.url + "/predict", content=clip.read_bytes(), headers={"Content-Type": "video/mp4"}, timeout=10
    )
    assert late.status_code == 503 and late.json()["error"] == "not_ready"
    assert time.monotonic() - signalled < 2, "checked inside the drain window"

    deadline = time.monotonic() + 10  # after the drain window the port closes
    while True:
        try:
            httpx.get(server.url + "/livez", timeout=1)
        except httpx.ConnectError:
            break
        except (httpx.RemoteProtocolError, httpx.ReadError):
            pass  # accepted just as uvicorn closed its idle connections: closing, not closed yet
        assert time.monotonic() < deadline, "the port stayed open after the drain window"
        time.sleep(0.1)

    os.kill(worker, signal.SIGCONT)  # the request in flight decodes now, and is answered
    sender.join(30)
    assert server.process.wait(30) == 0, server.log()
    assert "response" in result, result
    assert result["response"].status_code == 200, result["response"].text
    assert list(uploads.iterdir()) == []


def test_graceful_timeout_bounds_the_shutdown(lite_model, tmp_path, clip):
    uploads = tmp_path / "uploads"
    server = start_server(lite_model, uploads, "--graceful-timeout-s", "1")  # decode timeout: 60 s
    (worker,) = decode_workers(server.pid)
    os.kill(worker, signal.SIGSTOP)  # the decode hangs
    sender, result = _in_flight(server, clip.read_bytes())
    start = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(15) == 0, server.log()
    took = time.monotonic() - start
    assert took < 6, f"exited {took:.1f} s after SIGTERM with a 1 s graceful timeout"
    sender.join(10)
    assert "error" in result or result["response"].status_code >= 500  # cut off, not answered 200
    assert not alive(worker), "the hung decode worker outlived the server"
    assert list(uploads.iterdir()) == []
