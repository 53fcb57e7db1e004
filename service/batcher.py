"""Dynamic batcher: windows of many requests share one inference call.

One asyncio task owns the queue. Requests are admitted whole (all their windows fit in the free
capacity, else 429 at once); the worker cuts batches of up to `max_batch` windows across requests,
waiting at most `max_wait_ms` after the oldest waiting window for a batch to fill, and runs them in
a single worker thread, so the event loop never blocks and one inference runs at a time. Requests
past their deadline, or whose caller has gone (cancelled future), are dropped before inference.

Batches are filled round-robin, one window per waiting request in turn, so a 150-window clip
shares every batch with the short requests behind it instead of going first for ten batches.
The worker task is supervised: if it dies, its queued requests fail at once with 503, `running`
is False (readiness 503) and it is restarted after RESTART_DELAY_S.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.errors import ApiError, ErrorCode
from service.metrics import Metrics

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
InferFn = Callable[[Feeds], Feeds]
RESTART_DELAY_S = 1.0  # a dead worker is restarted this long after it died


@dataclass(frozen=True)
class BatchResult:
    outputs: Feeds  # every output, one row per window of the request, in order
    queue_s: float  # time in the batcher not spent in inference of its own windows
    infer_s: float  # summed duration of the batches that carried its windows


@dataclass(eq=False)
class _Request:
    feeds: Feeds
    n: int
    deadline: float  # loop time
    submitted: float  # loop time, for the batch-fill wait
    future: asyncio.Future[BatchResult]
    taken: int = 0  # windows already put into batches (they are taken in order)
    done: int = 0
    infer_s: float = 0.0
    since: float = field(default_factory=time.perf_counter)  # for timings (uvloop's clock ticks in ms)
    parts: list[tuple[int, Feeds]] = field(default_factory=list)

    @property
    def waiting(self) -> int:
        return self.n - self.taken


class Batcher:
    def __init__(
        self,
        infer: InferFn,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        queue_windows: int = 256,
        metrics: Metrics | None = None,
    ) -> None:
        self._infer = infer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.queue_windows = queue_windows
        self._metrics = metrics
        self._queue: deque[_Request] = deque()
        self._depth = 0  # windows waiting, not yet taken into a batch
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")
        self._worker: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0  # worker deaths noticed (each followed by a restart)
        self._batch_s = 0.05  # running mean of batch time, for Retry-After

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    def start(self) -> None:
        if self._stopping:
            return
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")
        self._worker.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        """Supervision: a worker that ended while the batcher runs has died (a bug, or a cancel
        from outside). Its waiting requests would hang to their deadlines: fail them now."""
        if self._stopping or task is not self._worker:
            return
        self.restarts += 1
        error = None if task.cancelled() else task.exception()
        log.error(
            "the batcher task died (%s); failing %d queued requests, restarting in %g s",
            "cancelled" if error is None else repr(error),
            len(self._queue),
            RESTART_DELAY_S,
        )
        _fail(self._queue, ApiError(ErrorCode.INFERENCE_FAILED, "the batcher stopped; it is restarting"))
        asyncio.get_running_loop().call_later(RESTART_DELAY_S, self.start)

    async def stop(self) -> None:
        self._stopping = True
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        _fail(self._queue, ApiError(ErrorCode.NOT_READY, "the service is shutting down"))
        await asyncio.to_thread(self._executor.shutdown, wait=True)  # a running batch finishes

    async def submit(self, feeds: Feeds, *, deadline: float) -> BatchResult:
        """Queue one request's windows; `deadline` is in `loop.time()` seconds."""
        loop = asyncio.get_running_loop()
        n = len(next(iter(feeds.values())))
        if not self.running:
            raise ApiError(ErrorCode.NOT_READY, "the batcher is not running")
        if n > self.queue_windows:
            raise ApiError(
                ErrorCode.TOO_LONG, f"the clip needs {n} windows; the queue holds {self.queue_windows}"
            )
        if n > self.queue_windows - self._depth:
            raise ApiError(
                ErrorCode.OVERLOADED,
                f"{self._depth} of {self.queue_windows} queue slots taken; this clip needs {n}",
                retry_after_s=self._retry_after(),
            )
        request = _Request(feeds, n, deadline, loop.time(), loop.create_future())
        request.future.add_done_callback(lambda _: self._discard(request))
        self._queue.append(request)
        self._set_depth(self._depth + n)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(request.future, max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:  # wait_for cancelled the future: its slots are freed
            raise ApiError(ErrorCode.DEADLINE_EXCEEDED, "the request deadline passed while queued") from None

    def _retry_after(self) -> float:
        return max(1.0, math.ceil(self._depth / self.max_batch * self._batch_s))

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        if self._metrics:
            self._metrics.queue_depth.set(depth)

    def _discard(self, request: _Request) -> None:
        """Free a finished (answered, failed, cancelled, expired) request's waiting slots."""
        if request in self._queue:
            self._queue.remove(request)
            self._set_depth(self._depth - request.waiting)

    def _expire(self, now: float) -> None:
        for request in [r for r in self._queue if r.deadline <= now]:
            if not request.future.done():  # its done callback discards it
                request.future.set_exception(
                    ApiError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed in the queue")
                )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._expire(loop.time())
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Let the batch fill until max_batch windows wait or the oldest has waited max_wait.
            fill_until = self._queue[0].submitted + self.max_wait_s
            while self._depth < self.max_batch and loop.time() < fill_until:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), fill_until - loop.time())
                except asyncio.TimeoutError:
                    break
            self._expire(loop.time())
            batch = self._take()
            if batch:
                await self._run_batch(batch)

    def _take(self) -> list[tuple[_Request, int, int]]:
        """Cut one batch, round-robin: one window of each waiting request in turn until the batch
        is full. Requests already answered (expired, cancelled) are dropped here, not batched:
        their done callbacks may not have run yet."""
        now = asyncio.get_running_loop().time()
        for request in [r for r in self._queue if r.future.done() or r.deadline <= now]:
            self._discard(request)
            if not request.future.done():
                error = ApiError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed in the queue")
                request.future.set_exception(error)
        counts = dict.fromkeys(self._queue, 0)
        room = self.max_batch
        while room and any(r.waiting > counts[r] for r in counts):
            for request in counts:
                if room and request.waiting > counts[request]:
                    counts[request] += 1
                    room -= 1
        batch: list[tuple[_Request, int, int]] = []
        for request, count in counts.items():
            if count:
                batch.append((request, request.taken, request.taken + count))
                request.taken += count
                self._set_depth(self._depth - count)
                if not request.waiting:
                    self._queue.remove(request)
        return batch

    async def _run_batch(self, batch: list[tuple[_Request, int, int]]) -> None:
        loop = asyncio.get_running_loop()
        names = list(batch[0][0].feeds)
        feeds = {k: np.concatenate([r.feeds[k][a:b] for r, a, b in batch]) for k in names}
        size = len(feeds[names[0]])
        start = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self._infer, feeds)
        except asyncio.CancelledError:  # stop() while computing
            _fail([r for r, _, _ in batch], ApiError(ErrorCode.NOT_READY, "the service is shutting down"))
            raise
        except Exception as exc:  # noqa: BLE001 - any failure fails its requests, never the worker
            error = exc if isinstance(exc, ApiError) else ApiError(ErrorCode.INFERENCE_FAILED, str(exc))
            _fail([r for r, _, _ in batch], error)
            return
        seconds = time.perf_counter() - start
        self._batch_s = 0.8 * self._batch_s + 0.2 * seconds
        if self._metrics:
            self._metrics.batch_size.observe(size)
            self._metrics.windows.inc(size)
        offset = 0
        for request, a, b in batch:
            part = {k: v[offset : offset + b - a] for k, v in outputs.items()}
            offset += b - a
            request.parts.append((a, part))
            request.done += b - a
            request.infer_s += seconds
            if request.done == request.n and not request.future.done():
                self._finish(request)

    def _finish(self, request: _Request) -> None:
        parts = [p for _, p in sorted(request.parts, key=lambda item: item[0])]
        outputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        queue_s = max(0.0, time.perf_counter() - request.since - request.infer_s)
        if self._metrics:
            self._metrics.stage_duration.labels("queue").observe(queue_s)
            self._metrics.stage_duration.labels("infer").observe(request.infer_s)
        request.future.set_result(BatchResult(outputs, queue_s, request.infer_s))


def _fail(requests: Iterable[_Request], error: ApiError) -> None:
    for request in list(requests):
        if not request.future.done():
            request.future.set_exception(error)
