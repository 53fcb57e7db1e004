"""The HTTP API in-process (TestClient / httpx ASGI) with the untrained lite model and real clips."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bench.media import make_clip
from service.app import create_app
from service.contract import LABELS_7, LITE_SPEC
from service.engine import Engine
from service.errors import STATUS, ErrorCode
from service.settings import Settings

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def engine(lite_model) -> Engine:
    engine = Engine(lite_model, device="cpu", intra_op_threads=1, buckets=(1, 2, 4))
    engine.warmup()
    return engine


@pytest.fixture
def tmp_uploads(tmp_path) -> Path:
    """The service's temp dir; every test leaves it empty, whatever the answer was."""
    folder = tmp_path / "uploads"
    yield folder
    assert not folder.exists() or list(folder.iterdir()) == []


@pytest.fixture
def make_settings(lite_model, tmp_uploads):
    def make(**overrides) -> Settings:
        base = {
            "model_path": lite_model,
            "device": "cpu",
            "intra_op_threads": 1,
            "buckets": (1, 2, 4),
            "max_batch": 4,
            "decode_workers": 1,
            "tmp_dir": tmp_uploads,
        }
        return Settings(**(base | overrides))

    return make


@pytest.fixture
def client(engine, make_settings):
    with TestClient(create_app(make_settings(), engine=engine), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    made = {
        "mp4": make_clip(folder / "a.mp4", seconds=2),
        "webm": make_clip(folder / "b.webm", seconds=2),
        "mkv": make_clip(folder / "c.mkv", seconds=2),
        "mov": make_clip(folder / "d.mov", seconds=2),
        "no_audio_track": make_clip(folder / "e.mp4", seconds=2, audio=None),
        "no_video_stream": make_clip(folder / "f.wav", seconds=2, video=None),
        "silence": make_clip(folder / "g.mp4", seconds=2, audio="silence"),
        "no_face": make_clip(folder / "h.mp4", seconds=2, video="noface"),
        "portrait": make_clip(folder / "i.mp4", seconds=2, width=240, height=320),
        "long": make_clip(folder / "j.mp4", seconds=9, width=160, height=120, fps=10),
        "nothing": make_clip(folder / "k.mp4", seconds=2, video="noface", audio=None),
    }
    return made


def post_file(client, path: Path, **kwargs):
    return client.post("/predict", files={"file": (path.name, path.read_bytes(), "video/mp4")}, **kwargs)


def assert_error(response, code: ErrorCode) -> None:
    assert response.status_code == STATUS[code], response.text
    request_id = response.headers["x-request-id"]
    assert response.json() == {"error": code.value, "detail": response.json()["detail"], "request_id": request_id}
    assert response.json()["detail"]


def metric(client, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


# ---- media through the whole app -----------------------------------------------------------------

EXPECTED = {  # clip: (audio present, video present, windows)
    "mp4": (True, True, 1),
    "webm": (True, True, 1),
    "mkv": (True, True, 1),
    "mov": (True, True, 1),
    "no_audio_track": (False, True, 1),
    "no_video_stream": (True, False, 1),
    "silence": (True, True, 1),
    "no_face": (True, False, 1),
    "portrait": (True, True, 1),
    "long": (True, True, 3),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_clips_get_a_full_answer(client, clips, name):
    audio, video, n_windows = EXPECTED[name]
    response = post_file(client, clips[name])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["emotion"] in LABELS_7
    assert set(body["probabilities"]) == set(LABELS_7)
    assert math.isclose(sum(body["probabilities"].values()), 1.0, rel_tol=1e-4)
    assert body["emotion"] == max(body["probabilities"], key=body["probabilities"].get)
    modalities = body["modalities"]
    assert modalities["audio"]["present"] is audio
    assert modalities["video"]["present"] is video
    assert (modalities["audio"]["probabilities"] is None) is not audio
    assert (modalities["video"]["probabilities"] is None) is not video
    assert (body["alignment"] is None) is not (audio and video)
    if video:
        assert 0 < modalities["video"]["frames_with_face"] <= modalities["video"]["frames"]
    assert len(body["segments"]) == n_windows
    assert body["segments"][0]["start"] == 0 and body["segments"][-1]["end"] == pytest.approx(
        body["duration_s"], abs=0.1
    )
    assert body["duration_s"] == pytest.approx(9 if name == "long" else 2, abs=0.15)
    assert body["model"] == {
        "name": LITE_SPEC.name,
        "version": LITE_SPEC.version,
        "provider": "CPUExecutionProvider",
    }
    timings = body["timings_ms"]
    assert set(timings) == {"upload", "decode_queue", "decode", "faces", "queue", "infer", "total"}
    # Windows go to the batcher while the clip decodes, so the stages overlap and do not add up to the
    # total; and `infer` counts a batch once for each chunk of this clip it carried, so it is not
    # bounded by the total either (docs/service.md).
    assert timings["decode"] > 0 and timings["faces"] >= 0
    assert timings["infer"] > 0 and timings["total"] > 0


def test_no_face_counts_frames_but_finds_none(client, clips):
    video = post_file(client, clips["no_face"]).json()["modalities"]["video"]
    assert video["frames"] > 0 and video["frames_with_face"] == 0


def test_clip_result_is_the_duration_weighted_mean_of_segments(client, clips):
    body = post_file(client, clips["long"]).json()
    weights = np.array([s["end"] - s["start"] for s in body["segments"]])
    rows = np.array([[s["probabilities"][k] for k in LABELS_7] for s in body["segments"]])
    np.testing.assert_allclose(
        [body["probabilities"][k] for k in LABELS_7], weights @ rows / weights.sum(), rtol=1e-5
    )
    assert weights.tolist() == pytest.approx([4, 4, 1], abs=0.1)


def test_raw_bodies_are_accepted(client, clips):
    data = clips["mp4"].read_bytes()
    first = None
    for content_type in ("video/mp4", "application/octet-stream", "audio/mp4"):
        response = client.post("/predict", content=data, headers={"Content-Type": content_type})
        assert response.status_code == 200, response.text
        first = first or response.json()["probabilities"]
        assert response.json()["probabilities"] == pytest.approx(first, rel=1e-5)


def test_neither_voice_nor_face_is_422(client, clips):
    assert_error(post_file(client, clips["nothing"]), ErrorCode.NO_USABLE_STREAM)


# ---- the error table -----------------------------------------------------------------------------


def test_unsupported_content_type_is_415(client):
    assert_error(
        client.post("/predict", content=b"abc", headers={"Content-Type": "text/plain"}),
        ErrorCode.UNSUPPORTED_CONTENT_TYPE,
    )
    assert_error(client.post("/predict", json={"file": "x"}), ErrorCode.UNSUPPORTED_CONTENT_TYPE)


def test_empty_uploads_are_400(client):
    assert_error(
        client.post("/predict", content=b"", headers={"Content-Type": "video/mp4"}), ErrorCode.EMPTY_UPLOAD
    )
    assert_error(client.post("/predict", files={"file": ("a.mp4", b"", "video/mp4")}), ErrorCode.EMPTY_UPLOAD)
    assert_error(
        client.post("/predict", files={"other": ("a.mp4", b"abc", "video/mp4")}), ErrorCode.INVALID_REQUEST
    )


def test_garbage_is_not_media(client):
    assert_error(
        client.post("/predict", content=b"\x00garbage" * 100, headers={"Content-Type": "video/mp4"}),
        ErrorCode.NOT_MEDIA,
    )


def test_too_large_by_content_length_and_by_stream(engine, make_settings, clips):
    data = clips["mp4"].read_bytes()
    settings = make_settings(max_upload_mb=len(data) / 2 / 1e6)
    with TestClient(create_app(settings, engine=engine)) as client:
        assert_error(
            client.post("/predict", content=data, headers={"Content-Type": "video/mp4"}), ErrorCode.TOO_LARGE
        )
        assert_error(post_file(client, clips["mp4"]), ErrorCode.TOO_LARGE)
        chunks = (data[i : i + 4096] for i in range(0, len(data), 4096))  # chunked: no Content-Length
        response = client.post("/predict", content=chunks, headers={"Content-Type": "video/mp4"})
        assert "content-length" not in {k.lower() for k in response.request.headers}
        assert_error(response, ErrorCode.TOO_LARGE)
        assert metric(client, 'foalnet_rejections_total{reason="too_large"}') == 3


def test_api_key(engine, make_settings, clips):
    with TestClient(create_app(make_settings(api_key="s3cret"), engine=engine)) as client:
        missing = post_file(client, clips["mp4"])
        assert_error(missing, ErrorCode.UNAUTHORIZED)
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert_error(
            post_file(client, clips["mp4"], headers={"Authorization": "Bearer wrong"}), ErrorCode.UNAUTHORIZED
        )
        ok = post_file(client, clips["mp4"], headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/readyz").status_code == 200  # only /predict is guarded


def test_deadline_and_bad_timeout_header(client, clips):
    assert_error(
        post_file(client, clips["mp4"], headers={"X-Request-Timeout": "0.001"}), ErrorCode.DEADLINE_EXCEEDED
    )
    assert_error(
        post_file(client, clips["mp4"], headers={"X-Request-Timeout": "soon"}), ErrorCode.INVALID_REQUEST
    )


def test_not_found_and_method_not_allowed_are_json(client):
    assert_error(client.get("/no/such/page"), ErrorCode.NOT_FOUND)
    assert_error(client.delete("/info"), ErrorCode.METHOD_NOT_ALLOWED)
    assert_error(client.get("/predict"), ErrorCode.METHOD_NOT_ALLOWED)


def test_validation_errors_are_json(client):
    @client.app.get("/square")
    def square(n: int) -> int:
        return n * n

    client.app.router.routes.insert(0, client.app.router.routes.pop())  # ahead of the page mount
    assert client.get("/square?n=3").json() == 9
    assert_error(client.get("/square?n=three"), ErrorCode.INVALID_REQUEST)


def test_unexpected_failure_is_500_json(client, clips, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr("service.streaming.summarize", broken)
    assert_error(post_file(client, clips["mp4"]), ErrorCode.INTERNAL_ERROR)


def test_inference_failure_is_503_and_readiness_recovers(client, clips, engine, monkeypatch):
    run = engine.session.run

    def failing(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.session, "run", failing, raising=False)
    assert_error(post_file(client, clips["mp4"]), ErrorCode.INFERENCE_FAILED)
    assert_error(client.get("/readyz"), ErrorCode.NOT_READY)
    assert client.get("/v2/health/ready").status_code == 503
    assert metric(client, "foalnet_ready") == 0
    monkeypatch.setattr(engine.session, "run", run, raising=False)
    assert post_file(client, clips["mp4"]).status_code == 200
    assert client.get("/readyz").status_code == 200
    assert metric(client, "foalnet_ready") == 1
