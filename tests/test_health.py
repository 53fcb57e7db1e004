"""Health that recovers, through a real uvicorn server on 127.0.0.1 (in a thread of this process,
so the engine can be made to fail): an engine that fails K times is brought back by the canary
with no traffic; one that never recovers turns /livez to 503 after `unhealthy_restart_s`; a
killed batcher task is noticed, readiness fails meanwhile, and it is restarted.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from bench.media import make_clip
from bench.server import free_port
from service import batcher as batcher_module
from service.app import create_app
from service.engine import Engine
from service.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


class FlakySession:
    """An ONNX Runtime session whose first `failures` runs raise (a lost device, say)."""

    def __init__(self, session, failures: float) -> None:
        self.session, self.failures, self.calls = session, failures, 0

    def run(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"device lost (failure {self.calls})")
        return self.session.run(*args, **kwargs)


class ThreadServer:
    """uvicorn serving `app` on a free loopback port from a thread; `stop()` shuts it down."""

    def __init__(self, app) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def engine(tiny_model) -> Engine:
    engine = Engine(tiny_model, device="cpu", intra_op_threads=1, buckets=(1, 2, 4))
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("health") / "talk.mp4", seconds=2, width=160, height=120)


def _serve(engine: Engine, tmp_path: Path, **settings) -> ThreadServer:
    base = {"model_path": engine.model_path, "device": "cpu", "intra_op_threads": 1, "buckets": (1, 2, 4)}
    base |= {"max_batch": 4, "decode_workers": 1, "tmp_dir": tmp_path / "uploads"}
    return ThreadServer(create_app(Settings(**(base | settings)), engine=engine))


def _post(server: ThreadServer, clip: Path) -> httpx.Response:
    return httpx.post(server.url + "/predict", files={"file": clip.open("rb")}, timeout=60)


def _wait_for(check, timeout_s: float) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


def test_an_engine_that_fails_k_times_recovers_without_traffic(engine, tmp_path, clip):
    flaky = engine.session = FlakySession(engine.session, failures=4)
    server = _serve(engine, tmp_path, unhealthy_restart_s=60)
    try:
        failed = _post(server, clip)
        assert failed.status_code == 503 and failed.json()["error"] == "inference_failed", failed.text
        ready = server.get("/readyz")
        assert ready.status_code == 503 and "canary" in ready.json()["detail"]
        calls_after_request = flaky.calls
        # No request from here on: only the canary (0.5 s, 1 s, 2 s...) can make it ready again.
        took = _wait_for(lambda: server.get("/readyz").status_code == 200, timeout_s=20)
        assert flaky.calls == 5 and calls_after_request == 1, flaky.calls
        assert server.get("/livez").status_code == 200
        assert _post(server, clip).status_code == 200
        print(f"ready again {took:.1f} s after the failed request, {flaky.calls - 1} canaries")
    finally:
        server.stop()


def test_an_engine_that_never_recovers_fails_liveness(engine, tmp_path, clip):
    engine.session = FlakySession(engine.session, failures=float("inf"))
    server = _serve(engine, tmp_path, unhealthy_restart_s=2)
    try:
        assert _post(server, clip).status_code == 503
        assert server.get("/livez").status_code == 200  # not yet: the canary may still fix it
        took = _wait_for(lambda: server.get("/livez").status_code == 503, timeout_s=10)
        assert 1.5 < took < 5, took
        live = server.get("/livez").json()
        assert live["error"] == "not_ready" and "failed every inference" in live["detail"]
        assert server.get("/readyz").status_code == 503
    finally:
        server.stop()


def test_a_killed_batcher_is_noticed_and_restarted(engine, tmp_path, clip, monkeypatch):
    monkeypatch.setattr(batcher_module, "RESTART_DELAY_S", 1.5)
    server = _serve(engine, tmp_path)
    try:
        service = server.server.config.app.state.service
        assert _post(server, clip).status_code == 200
        worker = service.batcher._worker  # noqa: SLF001 - the fault: kill the task from outside
        worker.get_loop().call_soon_threadsafe(worker.cancel)
        _wait_for(lambda: server.get("/readyz").status_code == 503, timeout_s=1)
        ready = server.get("/readyz").json()
        assert "batcher task died" in ready["detail"], ready
        refused = _post(server, clip)  # while it is down: a typed 503 at once, not a hang
        assert refused.status_code == 503 and refused.json()["error"] == "not_ready", refused.text
        _wait_for(lambda: server.get("/readyz").status_code == 200, timeout_s=5)
        assert service.batcher.restarts == 1
        assert _post(server, clip).status_code == 200
    finally:
        server.stop()

