"""One upload through the service as a stream: windows go to the batcher as soon as the decode
worker cuts them (decode overlaps inference), and each segment comes out once its window is
answered, in order; the summary `Prediction` comes last.

`predict_stream` is what POST /predict runs for both answers: the JSON one collects it, the NDJSON
one (`Accept: application/x-ndjson`) sends one line per item as it comes (`ndjson_lines`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.batcher import Batcher, BatchResult
from service.contract import OUTPUT_AUDIO_PROBS, OUTPUT_PROBS, OUTPUT_VIDEO_PROBS, OUTPUTS
from service.errors import ApiError, ErrorCode
from service.pipeline import Decoder, summarize, window_segments
from service.schemas import ModelInfo, Prediction, Segment, Timings
from service.windows import ClipEnd, Prepared, Windows

NDJSON = "application/x-ndjson"
OVERLOADED_RETRY_S = 0.02  # a later chunk of an admitted clip waits this long for queue room


@dataclass
class _Chunk:
    windows: Windows  # payload dropped once submitted: only the timeline facts stay
    usable: np.ndarray  # bool rows with a voice or a face (the only ones inferred)
    task: asyncio.Task[BatchResult] | None


def _light(w: Windows) -> Windows:
    """The windows without audio and frames (what the summary needs), so memory stays flat."""
    n = len(w)
    return Windows(
        audio=np.zeros((n, 0), np.float32), audio_len=w.audio_len, frames=np.zeros((n, 0), np.uint8),
        frames_len=w.frames_len, start_s=w.start_s, end_s=w.end_s,
        frames_sampled=w.frames_sampled, faces_found=w.faces_found,
    )


def _outputs(chunk: _Chunk, result: BatchResult | None, k: int) -> dict[str, np.ndarray]:
    """Every output for every row of the chunk; rows not inferred stay zero (and unused)."""
    n = len(chunk.windows)
    wide = (OUTPUT_PROBS, OUTPUT_AUDIO_PROBS, OUTPUT_VIDEO_PROBS)
    out = {name: np.zeros((n, k) if name in wide else n, np.float32) for name in OUTPUTS}
    if result is not None:
        for name in OUTPUTS:
            out[name][chunk.usable] = result.outputs[name]
    return out


async def _submit(
    batcher: Batcher, feeds: dict[str, np.ndarray], deadline: float, first: bool
) -> BatchResult:
    """The first chunk of a clip is refused at once when the queue is full (429, as a whole clip
    was before); a later one waits for room, so an admitted clip is not cut off mid-way."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return await batcher.submit(feeds, deadline=deadline)
        except ApiError as exc:
            if first or exc.code is not ErrorCode.OVERLOADED or loop.time() >= deadline:
                raise
        await asyncio.sleep(OVERLOADED_RETRY_S)


async def predict_stream(
    decoder: Decoder,
    batcher: Batcher,
    path: Path,
    *,
    labels: tuple[str, ...],
    model: ModelInfo,
    deadline: float,
    upload_s: float,
    start: float,
    observe: Callable[[str, float], None] = lambda stage, seconds: None,
) -> AsyncIterator[Segment | Prediction]:
    """Each window's `Segment` in order as soon as it is answered, then the clip's `Prediction`."""
    loop = asyncio.get_running_loop()
    chunks: deque[_Chunk] = deque()
    done: list[tuple[Windows, dict[str, np.ndarray]]] = []
    queue_s = infer_s = 0.0
    end: ClipEnd | None = None

    async def settle(chunk: _Chunk) -> list[Segment]:
        nonlocal queue_s, infer_s
        result = None
        if chunk.task is not None:
            result = await chunk.task
            queue_s, infer_s = queue_s + result.queue_s, infer_s + result.infer_s
        outputs = _outputs(chunk, result, len(labels))
        done.append((chunk.windows, outputs))
        return window_segments(chunk.windows, outputs, labels=labels)

    decoded = decoder.stream(path)
    upcoming: asyncio.Future[Windows | ClipEnd] | None = asyncio.ensure_future(anext(decoded))
    try:
        while upcoming is not None or chunks:
            while chunks and (chunks[0].task is None or chunks[0].task.done()):
                for segment in await settle(chunks.popleft()):
                    yield segment
            waits = {f for f in (upcoming, chunks[0].task if chunks else None) if f is not None}
            if not waits:
                continue
            ready, _ = await asyncio.wait(
                waits, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
            )
            if not ready:
                stage = "decoding" if upcoming is not None else "queued"
                raise ApiError(ErrorCode.DEADLINE_EXCEEDED, f"the request deadline passed while {stage}")
            if upcoming not in ready:
                continue
            try:
                item = upcoming.result()
            except StopAsyncIteration:
                upcoming = None
                continue
            upcoming = asyncio.ensure_future(anext(decoded))
            if isinstance(item, ClipEnd):
                end = item
                continue
            usable = (item.audio_len > 0) | (item.frames_len > 0)
            task = None
            if usable.any():
                first = not chunks and not done
                task = asyncio.ensure_future(_submit(batcher, item.select(usable).feeds(), deadline, first))
            chunks.append(_Chunk(_light(item), usable, task))
    finally:
        for future in [upcoming, *(c.task for c in chunks)]:
            if future is not None:
                future.cancel()  # a cancelled batcher task frees the slots of its windows
        if upcoming is not None:
            await asyncio.gather(upcoming, return_exceptions=True)
        await decoded.aclose()  # stops the worker's job if it is still running
    assert end is not None
    for stage in ("decode_queue", "decode", "faces"):
        observe(stage, end.timings_ms[stage] / 1000)
    prepared = Prepared.collect(end, [w for w, _ in done])
    outputs = {name: np.concatenate([o[name] for _, o in done]) for name in OUTPUTS}
    timings = Timings(
        upload=upload_s * 1000,
        decode_queue=end.timings_ms["decode_queue"],
        decode=end.timings_ms["decode"],
        faces=end.timings_ms["faces"],
        queue=queue_s * 1000,
        infer=infer_s * 1000,
        total=(time.perf_counter() - start) * 1000,
    )
    yield summarize(prepared, outputs, labels=labels, model=model, timings=timings)


async def collect(items: AsyncIterator[Segment | Prediction]) -> Prediction:
    """The summary of a stream (the JSON answer)."""
    async for item in items:
        if isinstance(item, Prediction):
            return item
    raise AssertionError("predict_stream ends with a Prediction")


async def ndjson_lines(
    first: Segment | Prediction,
    rest: AsyncIterator[Segment | Prediction],
    close: Callable[[], Awaitable[object]],
) -> AsyncIterator[bytes]:
    """One JSON line per item; an error after the first line is a last `{"error": ...}` line."""
    try:
        yield first.model_dump_json().encode() + b"\n"
        async for item in rest:
            yield item.model_dump_json().encode() + b"\n"
    except ApiError as exc:
        yield json.dumps(exc.body()).encode() + b"\n"
    except Exception as exc:  # noqa: BLE001 - the status line is sent; say it in the stream
        error = ApiError(ErrorCode.INTERNAL_ERROR, f"unexpected {type(exc).__name__}; see the service log")
        yield json.dumps(error.body()).encode() + b"\n"
        raise
    finally:
        await close()
