"""Hostile and malformed uploads through a real `foalnet serve` (uvicorn), plus the security knobs.

The corpus is `bench.corpus` (the one `foalnet soak` sends). Every upload must get an answer
the case allows (a typed 4xx, or 200 for valid media) in under 5 s, never a 5xx, never the
content of a local file; the playlists' local listener is never contacted, no temp file
survives, and the server still answers a valid clip afterwards.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from bench.corpus import LOCAL_SECRET_MARK, OK, Listener, build_corpus, multipart
from bench.media import make_clip
from service.errors import STATUS, ErrorCode
from tests.server import start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

API_KEY = "hostile-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ANSWER_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def listener():
    with Listener() as listener:
        yield listener


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("hostile-base") / "talk.mp4", seconds=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, base, listener):
    return build_corpus(tmp_path_factory.mktemp("corpus"), base, listener_url=listener.url)


@pytest.fixture(scope="module")
def server(lite_model, tmp_path_factory):
    tmp_dir = tmp_path_factory.mktemp("hostile-uploads")
    server = start_server(lite_model, tmp_dir, "--api-key", API_KEY)
    yield server
    log = server.stop()
    assert server.process.returncode == 0, log
    assert list(tmp_dir.iterdir()) == []


def post(server, data: bytes, filename: bytes, headers=AUTH) -> httpx.Response:
    body, content_type = multipart(data, filename)
    return httpx.post(
        server.url + "/predict", content=body, headers={"Content-Type": content_type, **headers}, timeout=60
    )


def test_every_hostile_upload_gets_a_typed_answer_fast(server, corpus, listener, base):
    failures, timings = [], {}
    for case in corpus:
        start = time.monotonic()
        response = post(server, case.path.read_bytes(), case.filename)
        timings[case.name] = seconds = time.monotonic() - start
        status = response.status_code
        outcome = OK if status == 200 else response.json().get("error")
        if status >= 500 or outcome not in case.expect:
            failures.append(f"{case.name}: {status} {response.text[:200]}")
        if status != 200:
            assert STATUS[ErrorCode(outcome)] == status
            assert response.json()["detail"]
        if not case.valid and seconds > ANSWER_WITHIN_S:
            failures.append(f"{case.name}: answered in {seconds:.1f} s")
        if LOCAL_SECRET_MARK in response.text:
            failures.append(f"{case.name}: a local file's content came back")
        if list(server.tmp_dir.iterdir()):
            failures.append(f"{case.name}: left {list(server.tmp_dir.iterdir())}")
    assert failures == [], "\n".join(failures)
    assert listener.contacts == 0
    assert {c.name for c in corpus if c.valid} >= {
        "audio-only.m4a",
        "rotated.mp4",
        "vfr.mkv",
        "name-traversal",
    }
    after = post(server, base.read_bytes(), b"after.mp4")  # still serving
    assert after.status_code == 200, after.text
    print("slowest answers:", sorted(timings.items(), key=lambda kv: -kv[1])[:3])


def test_server_reads_only_the_upload_given(server, tmp_path, listener):
    """Even a plain URL or path as the raw body is just bytes: nothing is fetched or opened."""
    for body in (f"{listener.url}/x.mp4".encode(), b"file:/etc/passwd", b"/etc/passwd"):
        response = httpx.post(
            server.url + "/predict", content=body, headers={"Content-Type": "video/mp4", **AUTH}, timeout=30
        )
        assert response.status_code == 415 and response.json()["error"] == "not_media"
        assert LOCAL_SECRET_MARK not in response.text
    assert listener.contacts == 0


def test_api_key_through_the_server(server, base):
    data = base.read_bytes()
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": API_KEY},
        {"Authorization": "Basic x"},
    ):
        response = post(server, data, b"a.mp4", headers=headers)
        assert response.status_code == 401 and response.json()["error"] == "unauthorized", headers
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert API_KEY not in response.text
    assert post(server, data, b"a.mp4", headers={"Authorization": f"bearer  {API_KEY}"}).status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200  # probes need no key
    assert httpx.get(server.url + "/info").json()["auth"] is True


def test_metrics_on_their_own_port(server):
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    assert 'foalnet_requests_total{status="401"}' in text
    assert "foalnet_ready 1.0" in text
    assert API_KEY not in text
