"""Overload through a real `foalnet serve` on loopback: admission is bounded, the excess is
refused at once with 429 + Retry-After, admitted requests meet their deadline, a client that
leaves frees its slot, and the server's memory stays put.

The server admits decode_workers + decode_queue = 1 + 2 = 3 requests at once: that is its saturating
load. Its one decode worker is stopped (SIGSTOP) while each wave arrives, so the admitted requests
are still held when the excess comes, however fast or busy the test machine is; it goes on (SIGCONT)
once the excess has been refused.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bench.media import make_clip
from bench.server import rss_bytes
from tests.server import decode_workers, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WORKERS, QUEUE = 1, 2
CAPACITY = WORKERS + QUEUE
DEADLINE_S = 20.0
WAVES = 3


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("overload") / "talk.mp4", seconds=2, width=160, height=120)


@pytest.fixture(scope="module")
def server(lite_model, tmp_path_factory):
    uploads = tmp_path_factory.mktemp("overload-server") / "uploads"
    args = ("--decode-workers", str(WORKERS), "--decode-queue", str(QUEUE), "--deadline-s", str(DEADLINE_S))
    server = start_server(lite_model, uploads, *args)
    yield server
    log = server.stop()
    assert server.process.returncode == 0, log
    assert list(uploads.iterdir()) == []


def _post(http: httpx.Client, data: bytes) -> tuple[int, float, httpx.Headers, str]:
    start = time.monotonic()
    response = http.post("/predict", content=data, headers={"Content-Type": "video/mp4"})
    return response.status_code, time.monotonic() - start, response.headers, response.text


def _clients(server, n: int) -> list[httpx.Client]:
    """Made before the clock starts (a new client builds an SSL context: tens of ms)."""
    return [httpx.Client(base_url=server.url, timeout=60) for _ in range(n)]


def test_twice_the_saturating_load(server, clip):
    data = clip.read_bytes()
    clients = _clients(server, 2 * CAPACITY)
    assert _post(clients[0], data)[0] == 200  # warm: first decode, first batch
    (worker,) = decode_workers(server.pid)
    rss_before = rss_bytes(server.pid)
    results = []
    with ThreadPoolExecutor(2 * CAPACITY) as pool:
        for _ in range(WAVES):  # 2x capacity at once, then again once they are answered
            os.kill(worker, signal.SIGSTOP)
            try:
                futures = [pool.submit(_post, http, data) for http in clients]
                deadline = time.monotonic() + 20
                while sum(f.done() for f in futures) < CAPACITY:  # the excess is answered at once
                    assert time.monotonic() < deadline, "the excess was not refused"
                    time.sleep(0.02)
            finally:
                os.kill(worker, signal.SIGCONT)
            results += [f.result() for f in futures]
    rss_after = rss_bytes(server.pid)
    for http in clients:
        http.close()

    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 429}, [r for r in results if r[0] not in (200, 429)]
    admitted = [r[1] for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(admitted) == len(refused) == WAVES * CAPACITY
    assert max(admitted) < DEADLINE_S
    for _, _, headers, text in refused:
        assert int(headers["Retry-After"]) >= 1 and '"error":"overloaded"' in text
    refused_s = [r[1] for r in refused]
    assert max(refused_s) < 0.5, refused_s
    growth_mb = (rss_after - rss_before) / 2**20
    assert growth_mb < 50, growth_mb
    print(
        f"{len(admitted)} admitted (max {max(admitted):.2f} s), {len(refused)} refused "
        f"(median {statistics.median(refused_s) * 1000:.0f} ms, max {max(refused_s) * 1000:.0f} ms), "
        f"RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MB"
    )
    assert server.metric("foalnet_in_flight_requests") == 0


def _send_and_leave(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n"
            b"Content-Length: %d\r\n\r\n" % len(data) + data
        )


def test_clients_that_leave_free_their_slots(server, clip):
    data = clip.read_bytes()
    gone_before = server.metric('foalnet_requests_total{status="499"}')
    for _ in range(CAPACITY):  # fill every slot, then hang up
        _send_and_leave(server.port, data)
    deadline = time.monotonic() + 10
    while server.metric('foalnet_requests_total{status="499"}') < gone_before + CAPACITY:
        assert time.monotonic() < deadline, "the server did not notice the clients leaving"
        time.sleep(0.05)
    # The one decoding may still hold its worker; the waiting ones' slots are free already.
    clients = _clients(server, QUEUE)
    with ThreadPoolExecutor(QUEUE) as pool:
        statuses = [r[0] for r in pool.map(lambda http: _post(http, data), clients)]
    for http in clients:
        http.close()
    assert statuses == [200] * QUEUE
    assert server.metric("foalnet_in_flight_requests") == 0
    assert list(server.tmp_dir.iterdir()) == []
