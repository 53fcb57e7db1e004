"""The HTTP API in-process, continued: admission (429 when the queue is full, 504 when the deadline
passes in it), the health / info / metrics / docs endpoints, the page at `/`, draining, and the
visible CPU fallback. Same fixtures as test_app.py."""

# ruff: noqa: F811 (the fixtures imported below are parameters by name)
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service import pipeline
from service.app import create_app
from service.contract import LABELS_7, LITE_SPEC
from service.engine import Engine, EngineError
from service.errors import ErrorCode
from service.metrics import STAGES
from tests.test_app import (  # noqa: F401 (module fixtures, used by name)
    assert_error,
    client,
    clips,
    engine,
    make_settings,
    metric,
    post_file,
    tmp_uploads,
)

pytestmark = pytest.mark.timeout(120)


# ---- batching, admission and deadlines through the app (concurrent, httpx ASGI) ------------------


class Gate:
    """Holds every inference until opened; counts the batches it let through."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.open, self.sizes = engine, threading.Event(), []
        self.entered = threading.Event()

    def __call__(self, feeds):
        self.entered.set()
        self.open.wait(20)
        self.sizes.append(len(next(iter(feeds.values()))))
        return Engine.infer(self.engine, feeds)


async def _with_app(app, scenario):
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            return await scenario(http)


def _post(http, path: Path, **headers):
    return http.post("/predict", content=path.read_bytes(), headers={"Content-Type": "video/mp4", **headers})


def test_queue_full_is_429_and_batches_form(engine, make_settings, clips, monkeypatch):
    gate = Gate(engine)
    monkeypatch.setattr(engine, "infer", gate)
    app = create_app(
        make_settings(queue_windows=6, max_batch=4, max_wait_ms=200, decode_workers=2), engine=engine
    )
    service = app.state.service

    async def scenario(http):
        first = asyncio.create_task(_post(http, clips["long"]))  # 3 windows: a batch that waits at the gate
        await asyncio.to_thread(gate.entered.wait, 20)
        queued = [asyncio.create_task(_post(http, clips["long"])) for _ in range(2)]  # 6 windows wait
        while service.batcher.depth < 6:
            await asyncio.sleep(0.02)
        refused = await _post(http, clips["mp4"])
        gate.open.set()
        return refused, await first, await asyncio.gather(*queued)

    refused, first, queued = asyncio.run(_with_app(app, scenario))
    assert_error(refused, ErrorCode.OVERLOADED)
    assert int(refused.headers["Retry-After"]) >= 1
    assert first.status_code == 200 and all(r.status_code == 200 for r in queued)
    assert max(gate.sizes) == 4  # windows of the two queued requests shared a batch
    assert queued[0].json()["probabilities"] == pytest.approx(first.json()["probabilities"], rel=1e-5)


def test_deadline_passed_in_the_queue_is_504(engine, make_settings, clips, monkeypatch):
    gate = Gate(engine)
    monkeypatch.setattr(engine, "infer", gate)
    app = create_app(make_settings(decode_workers=2), engine=engine)

    async def scenario(http):
        first = asyncio.create_task(_post(http, clips["mp4"]))
        await asyncio.to_thread(gate.entered.wait, 20)
        late = await _post(http, clips["mp4"], **{"X-Request-Timeout": "3"})
        gate.open.set()
        return late, await first

    late, first = asyncio.run(_with_app(app, scenario))
    assert_error(late, ErrorCode.DEADLINE_EXCEEDED)
    assert first.status_code == 200
    assert gate.sizes == [1]  # the expired request's window was never computed


# ---- health, info, metrics, docs, page -----------------------------------------------------------


def test_health_info_metrics_docs(client, clips):
    assert client.get("/livez").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ok"}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    info = client.get("/info").json()
    assert info["model"]["name"] == "foalnet-lite" and info["labels"] == list(LABELS_7)
    assert info["model"]["spec"]["window_s"] == 4.0
    assert info["provider"] == "CPUExecutionProvider" and info["fallback_reason"] is None
    assert info["limits"]["max_upload_bytes"] == 200_000_000
    assert info["batch"] == {
        "max_batch": 4,
        "max_wait_ms": 5.0,
        "buckets": [1, 2, 4],
        "queue_windows": 256,
        "queue_depth": 0,
    }
    assert post_file(client, clips["mp4"]).status_code == 200
    text = client.get("/metrics").text
    for line in (
        'foalnet_requests_total{status="200"} 1.0',
        f'foalnet_model_info{{name="{LITE_SPEC.name}",provider="CPUExecutionProvider",'
        f'version="{LITE_SPEC.version}"}} 1.0',
        "foalnet_windows_total 1.0",
        "foalnet_in_flight_requests 0.0",
        "foalnet_ready 1.0",
    ):
        assert line in text
    for stage in STAGES:
        assert f'foalnet_stage_duration_seconds_count{{stage="{stage}"}} 1.0' in text
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"Prediction", "Segment", "Alignment", "ErrorBody"} <= set(schema["components"]["schemas"])
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]


def test_page_is_served_at_root_without_shadowing_the_api(client):
    if not (Path(pipeline.__file__).parent / "static" / "index.html").exists():
        pytest.skip("no web page in service/static")
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert client.get("/info").headers["content-type"] == "application/json"


def test_draining_turns_readiness_off(client):
    client.app.state.service.draining = True
    assert_error(client.get("/readyz"), ErrorCode.NOT_READY)
    assert client.get("/livez").status_code == 200


@pytest.mark.skipif(
    "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
    reason="this machine has the CUDA provider",
)
def test_cpu_fallback_is_visible_and_explicit_cuda_fails(make_settings):
    with TestClient(create_app(make_settings(device="auto"))) as client:
        info = client.get("/info").json()
        assert info["provider"] == "CPUExecutionProvider"
        assert "CUDAExecutionProvider" in info["fallback_reason"]
        assert 'provider="CPUExecutionProvider"' in client.get("/metrics").text
    with (
        pytest.raises(EngineError, match="device=cuda"),
        TestClient(create_app(make_settings(device="cuda"))),
    ):
        pass
