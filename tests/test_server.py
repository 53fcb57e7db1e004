"""End to end through a real `foalnet serve` process (uvicorn) on 127.0.0.1."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from bench.media import make_clip
from tests.server import start_server as Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("e2e") / "talk.mp4", seconds=3)


@pytest.fixture(scope="module")
def server(lite_model, tmp_path_factory):
    tmp_dir = tmp_path_factory.mktemp("server-uploads")
    server = Server(lite_model, tmp_dir)
    yield server
    server.stop()
    assert list(tmp_dir.iterdir()) == []


def test_predict_then_metrics(server, clip):
    with clip.open("rb") as f:
        response = httpx.post(
            server.url + "/predict", files={"file": ("talk.mp4", f, "video/mp4")}, timeout=60
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["modalities"]["audio"]["present"] and body["modalities"]["video"]["present"]
    assert body["model"]["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    info = httpx.get(server.url + "/info").json()
    assert (info["fallback_reason"] is None) is (info["provider"] == "CUDAExecutionProvider")
    text = httpx.get(server.url + "/metrics").text
    assert 'foalnet_requests_total{status="200"} 1.0' in text
    assert f'provider="{info["provider"]}"' in text
    assert "foalnet_batch_size_count 1.0" in text
    assert (
        'foalnet_requests_total{status="200"} 1.0'
        in httpx.get(f"http://127.0.0.1:{server.metrics_port}/").text
    )
    assert list(server.tmp_dir.iterdir()) == []


def test_content_length_over_the_cap_is_refused_before_the_body(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n"
            b"Content-Length: 900000000\r\n\r\n" + b"\x00" * 1024
        )  # 900 MB announced, 1 KB sent
        answer = b""
        while b"}" not in answer and (chunk := s.recv(4096)):  # headers and body may come apart
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413")
    assert '"error":"too_large"' in answer


def test_a_client_that_disconnects_is_dropped(server, clip):
    before = server.metric('foalnet_requests_total{status="499"}')
    data = clip.read_bytes()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n"
            b"Content-Length: %d\r\n\r\n" % len(data) + data
        )
    deadline = time.monotonic() + 30
    while server.metric('foalnet_requests_total{status="499"}') == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric('foalnet_requests_total{status="499"}') == before + 1
    assert server.metric("foalnet_in_flight_requests") == 0
    assert server.metric("foalnet_queue_depth") == 0
    assert list(server.tmp_dir.iterdir()) == []


def test_sigterm_lets_the_request_in_flight_finish(lite_model, tmp_path, clip):
    server = Server(lite_model, tmp_path)
    result: dict[str, httpx.Response] = {}

    def send() -> None:
        result["r"] = httpx.post(
            server.url + "/predict",
            content=clip.read_bytes(),
            headers={"Content-Type": "video/mp4"},
            timeout=60,
        )

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 10
    while server.metric("foalnet_in_flight_requests") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.process.send_signal(signal.SIGTERM)
    sender.join(60)
    log = server.stop()
    assert result["r"].status_code == 200, log
    assert server.process.returncode == 0, log
    assert list(tmp_path.iterdir()) == []
