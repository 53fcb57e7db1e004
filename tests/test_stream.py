"""NDJSON answers from a real `foalnet serve`: one line per segment as it is ready, then the
summary, equal to the JSON answer; errors before the first line are the usual typed answers."""

from __future__ import annotations

import json

import httpx
import pytest

from bench.media import make_clip
from service.schemas import Prediction, Segment
from service.streaming import NDJSON
from tests.server import start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    uploads = tmp_path_factory.mktemp("stream-uploads")
    server = start_server(tiny_model, uploads)
    yield server
    log = server.stop()
    assert server.process.returncode == 0, log
    assert list(uploads.iterdir()) == []


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream")
    return make_clip(folder / "talk.mp4", seconds=13, width=160, height=120, fps=10)


def _post(server, data: bytes, accept: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "video/mp4"} | ({"Accept": accept} if accept else {})
    return httpx.post(server.url + "/predict", content=data, headers=headers, timeout=60)


def _comparable(prediction: dict) -> dict:
    return {k: v for k, v in prediction.items() if k != "timings_ms"}


def test_segments_arrive_in_order_then_the_summary_equal_to_the_json_answer(server, clip):
    data = clip.read_bytes()
    lines = []
    with httpx.stream(
        "POST", server.url + "/predict", content=data, timeout=60,
        headers={"Content-Type": "video/mp4", "Accept": NDJSON},
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(NDJSON)
        lines = [json.loads(line) for line in response.iter_lines() if line]
    *segments, summary = lines
    assert [Segment.model_validate(s).start for s in segments] == [0.0, 4.0, 8.0, 12.0]
    assert segments[-1]["end"] == pytest.approx(13.0, abs=0.05)
    Prediction.model_validate(summary)
    assert summary["segments"] == segments
    plain = _post(server, data)
    assert plain.status_code == 200
    assert _comparable(summary) == _comparable(plain.json())


def test_errors_before_the_first_line_are_typed_json(server, tmp_path):
    response = _post(server, b"not a video at all" * 100, accept=NDJSON)
    assert response.status_code == 415 and response.json()["error"] == "not_media"
    silent = make_clip(tmp_path / "nothing.mp4", seconds=2, video="noface", audio=None).read_bytes()
    response = _post(server, silent, accept=NDJSON)
    assert response.status_code == 422 and response.json()["error"] == "no_usable_stream"
