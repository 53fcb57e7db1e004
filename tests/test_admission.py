"""The admission gate owns /predict from the first byte, through a real `foalnet serve` on
loopback with raw sockets: uploads in progress are capped (a slot is reserved before the body is
read; beyond the cap 429 + Retry-After at once), a stalled body is cut with 408 `upload_timeout`,
a body that trickles past the request deadline with 504, and each cut upload's temp file and
descriptors go. 1,000 stalled uploads at once do not stop normal requests from being answered.
"""

from __future__ import annotations

import json
import resource
import selectors
import socket
import time
from pathlib import Path

import httpx
import pytest

from bench.media import make_clip
from bench.server import open_fds
from tests.server import start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STALLED = 1000
IDLE_S = 4.0
FD_SLACK = 8
BOUNDARY = b"b0undary"
PART_HEAD = (
    b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="a.mp4"\r\n'
    b"Content-Type: video/mp4\r\n\r\n"
)


def _head(length: int = 1_000_000, extra: bytes = b"") -> bytes:
    return (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=" + BOUNDARY
        + b"\r\nContent-Length: %d\r\n" % length + extra + b"\r\n"
    )


def _stall(port: int) -> socket.socket:
    """Headers and the first bytes of a multipart body, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(_head() + PART_HEAD + b"\0" * 64)
    return sock


def _answers(socks: list[socket.socket], timeout_s: float) -> list[bytes]:
    """Everything each socket receives until the server closes it (or the timeout)."""
    data = {s: b"" for s in socks}
    open_ = set(socks)
    with selectors.DefaultSelector() as sel:
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                try:
                    chunk = key.fileobj.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    data[key.fileobj] += chunk
                else:
                    sel.unregister(key.fileobj)
                    open_.discard(key.fileobj)
    return [data[s] for s in socks]


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def _error(answer: bytes) -> str:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


def _uploads_in_progress(server) -> int:
    return httpx.get(server.url + "/info", timeout=10).json()["limits"]["uploads_in_progress"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("admission") / "talk.mp4", seconds=2, width=160, height=120)


def test_a_thousand_stalled_uploads_are_cut_while_normal_requests_are_answered(tiny_model, tmp_path, clip):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * STALLED + 512  # this process's sockets + the server's sockets and temp files
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the descriptor limit ({hard}) is below the {need} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))  # the server inherits it
    uploads = tmp_path / "uploads"
    server = start_server(
        tiny_model, uploads, "--max-uploads", str(STALLED + 16), "--upload-idle-timeout-s", str(IDLE_S)
    )
    socks: list[socket.socket] = []
    try:
        warm = httpx.post(server.url + "/predict", files={"file": clip.open("rb")}, timeout=60)
        assert warm.status_code == 200, warm.text
        fds_before = open_fds(server.pid)
        started = time.monotonic()
        socks = [_stall(server.port) for _ in range(STALLED)]
        while _uploads_in_progress(server) < STALLED:
            assert time.monotonic() - started < IDLE_S, "the stalled uploads did not all reach the server"
            time.sleep(0.05)
        assert len(list(uploads.iterdir())) == STALLED  # each holds a temp file...
        normal = httpx.post(server.url + "/predict", files={"file": clip.open("rb")}, timeout=60)
        assert normal.status_code == 200, normal.text  # ...and the service still answers
        answers = _answers(socks, timeout_s=IDLE_S + 20)
        took = time.monotonic() - started
        statuses = {_status(a) for a in answers}
        assert statuses == {408}, [a[:200] for a in answers if _status(a) != 408][:3]
        assert {_error(a) for a in answers} == {"upload_timeout"}
        assert took < IDLE_S + 15, took
        time.sleep(0.5)
        assert list(uploads.iterdir()) == []
        assert _uploads_in_progress(server) == 0
        assert open_fds(server.pid) <= fds_before + FD_SLACK, (fds_before, open_fds(server.pid))
        again = httpx.post(server.url + "/predict", files={"file": clip.open("rb")}, timeout=60)
        assert again.status_code == 200, again.text
    finally:
        for s in socks:
            s.close()
        log = server.stop()
    assert server.process.returncode == 0, log


@pytest.fixture(scope="module")
def small_gate(tiny_model, tmp_path_factory):
    uploads = tmp_path_factory.mktemp("gate") / "uploads"
    server = start_server(tiny_model, uploads, "--max-uploads", "3", "--upload-idle-timeout-s", "2")
    yield server
    log = server.stop()
    assert server.process.returncode == 0, log
    assert list(uploads.iterdir()) == []


def test_the_cap_reserves_a_slot_and_refuses_the_rest_before_reading(small_gate):
    start = time.monotonic()
    socks = [_stall(small_gate.port) for _ in range(20)]  # all at once: only 3 may pass
    answers = _answers(socks, timeout_s=15)
    for s in socks:
        s.close()
    refused = [a for a in answers if _status(a) == 429]
    cut = [a for a in answers if _status(a) == 408]
    assert len(refused) == 17 and len(cut) == 3, sorted(_status(a) for a in answers)
    assert {_error(a) for a in refused} == {"overloaded"}
    assert all(b"retry-after: " in a.lower() for a in refused)
    assert time.monotonic() - start < 10
    assert _uploads_in_progress(small_gate) == 0


def test_a_body_slower_than_the_deadline_is_cut_with_504(small_gate):
    with socket.create_connection(("127.0.0.1", small_gate.port), timeout=10) as sock:
        sock.sendall(_head(extra=b"X-Request-Timeout: 1.5\r\n") + PART_HEAD)
        start = time.monotonic()
        sock.setblocking(False)
        answer = b""
        while time.monotonic() - start < 10:  # one byte every 0.2 s: never idle, never done
            try:
                sock.sendall(b"\0")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.2)
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                break
            answer += chunk
            if not chunk or b"}" in answer:
                break
    took = time.monotonic() - start
    assert _status(answer) == 504 and _error(answer) == "deadline_exceeded", answer
    assert b"connection: close" in answer.lower()
    assert 1.3 < took < 4, took
    assert list(small_gate.tmp_dir.iterdir()) == []
