"""`service.client.Client` and `foalnet predict --url` against a real `foalnet serve` on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from bench.media import make_clip, write_bytes
from bench.server import free_port
from foalnet_cli import build_app
from service.client import Client, ServiceError
from service.schemas import Prediction, Segment
from tests.server import start_server

app = build_app("predict")

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    # One upload at a time: a stalled upload makes the next request a 429 with Retry-After.
    server = start_server(tiny_model, tmp_path_factory.mktemp("client"), "--max-uploads", "1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clips") / "talk.mp4", seconds=5, width=160, height=120)


def test_predict_returns_a_typed_answer(server, clip):
    with Client(server.url) as client:
        assert client.ready()
        prediction = client.predict(clip)
        assert client.info()["model"]["name"] == prediction.model.name
    assert isinstance(prediction, Prediction)
    assert prediction.modalities.audio.present and len(prediction.segments) == 2
    assert abs(sum(prediction.probabilities.values()) - 1) < 1e-4


def test_error_answers_raise_with_code_and_request_id(server, tmp_path):
    broken = write_bytes(tmp_path / "broken.mp4", b"not a video " * 100)
    with Client(server.url) as client, pytest.raises(ServiceError) as error:
        client.predict(broken, request_id="client-test-1")
    assert (error.value.status, error.value.code) == (415, "not_media")
    assert error.value.request_id == "client-test-1" and error.value.detail


def _stall_upload(port: int) -> socket.socket:
    """An upload that sent its headers and a few bytes: it holds the server's only upload slot."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\nContent-Length: 100000\r\n\r\nabc"
    )
    return sock


def _overloaded(server) -> float:
    return server.metric('foalnet_rejections_total{reason="overloaded"}')


def test_429_is_retried_after_retry_after(server, clip):
    stalled = _stall_upload(server.port)
    time.sleep(0.3)  # the server has taken the slot
    refused_before = _overloaded(server)
    threading.Timer(0.5, stalled.close).start()  # the slot frees half a second in
    start = time.monotonic()
    with Client(server.url, retries=3) as client:
        prediction = client.predict(clip)
    waited = time.monotonic() - start
    assert isinstance(prediction, Prediction)
    assert _overloaded(server) >= refused_before + 1, "the first attempt was not refused"
    assert waited >= 1.0, "Retry-After (at least 1 s) was not honoured"


def test_429_without_retries_left_raises(server, clip):
    stalled = _stall_upload(server.port)
    try:
        time.sleep(0.3)
        with Client(server.url, retries=0) as client, pytest.raises(ServiceError) as error:
            client.predict(clip)
        assert error.value.status == 429 and error.value.code == "overloaded"
        # The wait a retry would need passes the deadline: the 429 is raised at once.
        with Client(server.url, retries=3, deadline_s=0.5) as client, pytest.raises(ServiceError) as late:
            client.predict(clip)
        assert late.value.status == 429
    finally:
        stalled.close()
    time.sleep(0.3)


def test_deadline_is_sent_and_enforced(server, clip):
    with Client(server.url) as client, pytest.raises(ServiceError) as error:
        client.predict(clip, deadline_s=0.001)
    assert error.value.code == "deadline_exceeded"


def test_streamed_answer_gives_segments_then_the_summary(server, clip):
    with Client(server.url) as client:
        items = list(client.predict_stream(clip))
        whole = client.predict(clip)
    *segments, summary = items
    assert all(isinstance(s, Segment) for s in segments) and isinstance(summary, Prediction)
    assert [s.start for s in segments] == [s.start for s in whole.segments]
    assert summary.emotion == whole.emotion


def test_refused_connections_are_retried_then_raised():
    with Client(f"http://127.0.0.1:{free_port()}", retries=1) as client:
        start = time.monotonic()
        with pytest.raises(httpx.ConnectError):
            client.predict(b"\x00" * 10)
        assert time.monotonic() - start >= 0.5  # one backoff between the two attempts


def test_foalnet_predict_url_uses_the_client(server, clip, tmp_path):
    broken = write_bytes(tmp_path / "bad.mp4", b"nope " * 100)
    result = CliRunner().invoke(app, ["predict", "--url", server.url, "--json", str(clip), str(broken)])
    assert result.exit_code == 1, result.output
    good, bad = json.loads(result.stdout)
    assert good.pop("file") == str(clip)
    Prediction.model_validate(good)
    assert bad == {"file": str(broken), "error": "not_media", "detail": bad["detail"]}
    table = CliRunner().invoke(app, ["predict", "--url", server.url, str(clip)])
    assert table.exit_code == 0 and "talk.mp4" in table.output
