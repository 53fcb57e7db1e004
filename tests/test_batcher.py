"""The dynamic batcher: batches across requests, admission (429), deadlines (504), cancellation."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import numpy as np
import pytest

from service.batcher import Batcher
from service.engine import Engine
from service.errors import ApiError, ErrorCode
from service.metrics import Metrics

pytestmark = pytest.mark.timeout(30)


class Recorder:
    """An infer function that echoes each window's id and records the batches it was given."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.gate = gate

    def __call__(self, feeds):
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay_s)
        ids = feeds["id"].tolist()
        self.batches.append(ids)
        return {"echo": feeds["id"] * 10}


def windows(*ids: int) -> dict[str, np.ndarray]:
    return {"id": np.array(ids, np.int64)}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def one_running_one_queued(infer: Recorder) -> tuple[Batcher, asyncio.Task, asyncio.Task]:
    """A started one-window batcher whose worker holds request 1 (inside `infer`) while request 2 waits."""
    batcher = Batcher(infer, max_batch=1, max_wait_ms=0, queue_windows=8)
    batcher.start()
    loop = asyncio.get_running_loop()
    running = asyncio.create_task(batcher.submit(windows(1), deadline=loop.time() + 10))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(batcher.submit(windows(2), deadline=loop.time() + 10))
    await asyncio.sleep(0.01)
    return batcher, running, queued


def sample(metrics: Metrics, name: str, labels: dict | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    infer, metrics = Recorder(delay_s=0.02), Metrics()

    async def main():
        batcher = Batcher(infer, max_batch=8, max_wait_ms=50, queue_windows=64, metrics=metrics)
        batcher.start()
        requests = [windows(*range(100 * i, 100 * i + 1 + i % 3)) for i in range(10)]
        results = await asyncio.gather(
            *(batcher.submit(r, deadline=asyncio.get_running_loop().time() + 10) for r in requests)
        )
        await batcher.stop()
        return requests, results

    requests, results = run(main())
    for request, result in zip(requests, results):
        np.testing.assert_array_equal(result.outputs["echo"], request["id"] * 10)
        assert result.infer_s > 0 and result.queue_s >= 0
    assert max(len(b) for b in infer.batches) > 1
    assert all(len(b) <= 8 for b in infer.batches)
    assert sorted(i for b in infer.batches for i in b) == sorted(i for r in requests for i in r["id"])
    assert sample(metrics, "foalnet_batch_size_count") == len(infer.batches)
    assert sample(metrics, "foalnet_windows_total") == sum(len(r["id"]) for r in requests)
    assert sample(metrics, "foalnet_stage_duration_seconds_count", {"stage": "queue"}) == 10
    assert sample(metrics, "foalnet_queue_depth") == 0


def test_a_long_request_is_split_across_batches_in_order():
    infer = Recorder()

    async def main():
        batcher = Batcher(infer, max_batch=4, max_wait_ms=1, queue_windows=64)
        batcher.start()
        result = await batcher.submit(windows(*range(11)), deadline=asyncio.get_running_loop().time() + 10)
        await batcher.stop()
        return result

    result = run(main())
    np.testing.assert_array_equal(result.outputs["echo"], np.arange(11) * 10)
    assert [len(b) for b in infer.batches] == [4, 4, 3]


def test_full_queue_answers_429_at_once_with_retry_after():
    gate = threading.Event()
    infer = Recorder(gate=gate)

    async def main():
        batcher = Batcher(infer, max_batch=2, max_wait_ms=0, queue_windows=6)
        batcher.start()
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(batcher.submit(windows(1, 2), deadline=loop.time() + 10))  # in the engine
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(batcher.submit(windows(3, 4, 5, 6), deadline=loop.time() + 10))
        await asyncio.sleep(0.01)
        assert batcher.depth == 4
        start = loop.time()
        with pytest.raises(ApiError) as caught:
            await batcher.submit(windows(7, 8, 9), deadline=loop.time() + 10)
        refused_in = loop.time() - start
        with pytest.raises(ApiError) as too_long:
            await batcher.submit(windows(*range(7)), deadline=loop.time() + 10)
        gate.set()
        await asyncio.gather(first, queued)
        await batcher.stop()
        return caught.value, refused_in, too_long.value

    error, refused_in, too_long = run(main())
    assert error.code is ErrorCode.OVERLOADED and error.status == 429
    assert error.retry_after_s is not None and error.retry_after_s >= 1
    assert refused_in < 0.05
    assert too_long.code is ErrorCode.TOO_LONG


def test_deadline_passed_in_the_queue_is_504_and_never_computed():
    gate = threading.Event()
    infer = Recorder(gate=gate)

    async def main():
        batcher = Batcher(infer, max_batch=1, max_wait_ms=0, queue_windows=16)
        batcher.start()
        loop = asyncio.get_running_loop()
        blocker = asyncio.create_task(batcher.submit(windows(1), deadline=loop.time() + 10))
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError) as caught:
            await batcher.submit(windows(2, 3), deadline=loop.time() + 0.1)
        assert batcher.depth == 0  # the expired request's slots are free again
        gate.set()
        await blocker
        later = await batcher.submit(windows(4), deadline=loop.time() + 10)
        await batcher.stop()
        return caught.value, later

    error, later = run(main())
    assert error.code is ErrorCode.DEADLINE_EXCEEDED and error.status == 504
    assert infer.batches == [[1], [4]]
    assert later.outputs["echo"].tolist() == [40]


def test_a_cancelled_caller_frees_its_slots_and_is_skipped():
    gate = threading.Event()
    infer = Recorder(gate=gate)

    async def main():
        batcher = Batcher(infer, max_batch=2, max_wait_ms=0, queue_windows=4)
        batcher.start()
        loop = asyncio.get_running_loop()
        blocker = asyncio.create_task(batcher.submit(windows(1), deadline=loop.time() + 10))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(batcher.submit(windows(2, 3, 4), deadline=loop.time() + 10))
        await asyncio.sleep(0.01)
        assert batcher.depth == 3
        gone.cancel()  # what the app does when the client disconnects
        await asyncio.gather(gone, return_exceptions=True)
        assert batcher.depth == 0
        kept = asyncio.create_task(batcher.submit(windows(5, 6, 7, 8), deadline=loop.time() + 10))  # fits now
        await asyncio.sleep(0.01)
        gate.set()
        await blocker
        result = await kept
        await batcher.stop()
        return result

    result = run(main())
    assert result.outputs["echo"].tolist() == [50, 60, 70, 80]
    assert all(i not in (2, 3, 4) for b in infer.batches for i in b)


def test_an_inference_failure_fails_every_request_in_the_batch():
    def broken(feeds):
        raise ApiError(ErrorCode.INFERENCE_FAILED, "boom")

    async def main():
        batcher = Batcher(broken, max_batch=4, max_wait_ms=20, queue_windows=8)
        batcher.start()
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(batcher.submit(windows(i), deadline=loop.time() + 5) for i in range(3)), return_exceptions=True
        )
        await batcher.stop()
        return results

    results = run(main())
    assert all(isinstance(r, ApiError) and r.code is ErrorCode.INFERENCE_FAILED for r in results)


def test_with_the_onnx_engine(tiny_model):
    engine = Engine(tiny_model, device="cpu", intra_op_threads=1, buckets=(1, 2, 4))
    feeds = engine.dummy_feeds(3)
    expected = engine.infer(feeds)

    async def main():
        batcher = Batcher(engine.infer, max_batch=4, max_wait_ms=5)
        batcher.start()
        result = await batcher.submit(feeds, deadline=asyncio.get_running_loop().time() + 10)
        await batcher.stop()
        return result

    result = run(main())
    for name, value in expected.items():
        np.testing.assert_allclose(result.outputs[name], value, rtol=1e-6)


def test_stop_fails_queued_and_running_requests():
    gate = threading.Event()
    infer = Recorder(gate=gate)

    async def main():
        batcher, running, queued = await one_running_one_queued(infer)
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.01)
        gate.set()
        await stopping
        return await asyncio.gather(running, queued, return_exceptions=True)

    results = run(main())
    assert all(isinstance(r, ApiError) and r.code is ErrorCode.NOT_READY for r in results)


def test_a_request_already_past_its_deadline_is_never_batched():
    """Its future fails before the worker's next cut, but the done callback that would remove it
    runs after: the cut itself must skip it."""
    infer = Recorder()

    async def main():
        batcher = Batcher(infer, max_batch=4, max_wait_ms=0, queue_windows=16)
        batcher.start()
        loop = asyncio.get_running_loop()
        with pytest.raises(ApiError) as caught:
            await batcher.submit(windows(9, 9), deadline=loop.time() - 1)
        await asyncio.sleep(0.05)
        later = await batcher.submit(windows(1), deadline=loop.time() + 10)
        await batcher.stop()
        return caught.value, later, batcher.depth

    error, later, depth = run(main())
    assert error.code is ErrorCode.DEADLINE_EXCEEDED
    assert infer.batches == [[1]] and later.outputs["echo"].tolist() == [10]
    assert depth == 0


class Costly:
    """A GPU-like engine: a fixed cost per batch plus a little per window (sleeps: no CPU)."""

    def __init__(self, per_batch_s: float = 0.02, per_window_s: float = 0.0005) -> None:
        self.per_batch_s, self.per_window_s = per_batch_s, per_window_s
        self.batches: list[list[int]] = []

    def __call__(self, feeds):
        ids = feeds["id"].tolist()
        time.sleep(self.per_batch_s + self.per_window_s * len(ids))
        self.batches.append(ids)
        return {"echo": feeds["id"] * 10}


def _short_latencies(with_long: bool) -> list[float]:
    """Eight one-window requests, sent 25 ms apart, alone or just after a 150-window clip."""

    async def main():
        batcher = Batcher(Costly(), max_batch=16, max_wait_ms=5, queue_windows=256)
        batcher.start()
        loop = asyncio.get_running_loop()
        long = None
        if with_long:
            long = asyncio.create_task(batcher.submit(windows(*range(1000, 1150)), deadline=loop.time() + 30))
            await asyncio.sleep(0.01)

        async def short(i: int) -> float:
            await asyncio.sleep(0.025 * i)
            start = time.perf_counter()
            await batcher.submit(windows(i), deadline=loop.time() + 30)
            return time.perf_counter() - start

        latencies = await asyncio.gather(*(short(i) for i in range(8)))
        if long is not None:
            assert (await long).outputs["echo"].tolist() == [i * 10 for i in range(1000, 1150)]
        await batcher.stop()
        return latencies

    return run(main())


def test_short_requests_are_not_stuck_behind_a_long_clip():
    lone = statistics.median(_short_latencies(with_long=False))
    beside = statistics.median(_short_latencies(with_long=True))
    print(f"short p50 alone {lone * 1000:.0f} ms, next to a 150-window clip {beside * 1000:.0f} ms")
    assert beside <= 2 * lone, (lone, beside)


def test_round_robin_batches_share_room_between_requests():
    infer = Recorder(gate=threading.Event())

    async def main():
        batcher = Batcher(infer, max_batch=4, max_wait_ms=50, queue_windows=64)
        batcher.start()
        loop = asyncio.get_running_loop()
        requests = [windows(*range(100, 110)), windows(200, 201), windows(300)]
        tasks = [asyncio.create_task(batcher.submit(r, deadline=loop.time() + 10)) for r in requests]
        await asyncio.sleep(0.01)
        infer.gate.set()
        await asyncio.gather(*tasks)
        await batcher.stop()

    run(main())
    assert infer.batches[0] == [100, 101, 200, 300]  # not four windows of the long request
    assert infer.batches[1] == [102, 103, 104, 201]
    assert infer.batches[2] == [105, 106, 107, 108]  # alone now: it gets the whole batch


def test_a_dead_worker_fails_its_queue_at_once_and_is_restarted(monkeypatch):
    monkeypatch.setattr("service.batcher.RESTART_DELAY_S", 0.2)
    gate = threading.Event()
    infer = Recorder(gate=gate)

    async def main():
        batcher, running, queued = await one_running_one_queued(infer)
        loop = asyncio.get_running_loop()
        start = loop.time()
        batcher._worker.cancel()  # noqa: SLF001 - the fault
        results = await asyncio.gather(running, queued, return_exceptions=True)
        failed_in = loop.time() - start
        assert not batcher.running
        gate.set()
        await asyncio.sleep(0.3)
        assert batcher.running and batcher.restarts == 1
        after = await batcher.submit(windows(3), deadline=loop.time() + 10)
        await batcher.stop()
        return results, failed_in, after

    results, failed_in, after = run(main())
    assert all(isinstance(r, ApiError) and r.status == 503 for r in results), results
    assert failed_in < 0.1
    assert after.outputs["echo"].tolist() == [30]
