"""End to end through a real `foalnet serve` process (uvicorn) on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.media import make_clip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, tmp_dir: Path, *args: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.tmp_dir = tmp_dir
        env = os.environ | {
            "FOALNET_TMP_DIR": str(tmp_dir),
            "FOALNET_INTRA_OP_THREADS": "1",
            "OMP_NUM_THREADS": "1",
        }
        command = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--port",
            str(self.port),
            "--model",
            str(model),
            "--device",
            "auto",
            "--buckets",
            "1,2,4",
            "--decode-workers",
            "1",
            "--metrics-port",
            str(self.metrics_port),
            "--log-level",
            "warning",
            *args,
        ]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}:\n{self.process.stdout.read()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready in 90 s")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.stdout.read()

    def metric(self, line_start: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.split()[-1])
        return 0.0


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
        answer = s.recv(4096).decode()
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
    assert server.process.returncode in (0, -signal.SIGTERM), log
    assert list(tmp_path.iterdir()) == []
