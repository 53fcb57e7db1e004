"""From a media file to a `Prediction`: decode in a thread pool, and turn model outputs into the answer.

Shared by the HTTP app (windows go through the batcher) and `foalnet predict` (straight to the
engine), so both give the same response for the same file.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service.contract import (
    OUTPUT_AUDIO_PROBS,
    OUTPUT_MATCH_A2V,
    OUTPUT_MATCH_V2A,
    OUTPUT_PROBS,
    OUTPUT_SIMILARITY,
    OUTPUT_VIDEO_PROBS,
    ModelSpec,
)
from service.decode_pool import DecodePool
from service.engine import Engine
from service.errors import ApiError, ErrorCode
from service.faces import FaceCropper
from service.media_limits import DecodeLimits
from service.schemas import (
    Alignment,
    AudioView,
    Modalities,
    ModelInfo,
    Prediction,
    Segment,
    Timings,
    VideoView,
)
from service.settings import Settings
from service.windows import ClipEnd, Prepared, Windows, prepare

# An answer whose top (calibrated) probability is below this is flagged `uncertain`. On the shipped
# model's validation data, answers at or above it are right far more often than those below
# (weights/README.md, "Calibration"); with 7 classes it means "clearly ahead of the other six".
UNCERTAIN_BELOW = 0.5


def decode_limits(settings: Settings) -> DecodeLimits:
    return DecodeLimits(
        timeout_s=settings.decode_timeout_s,
        max_duration_s=settings.max_duration_s,
        threads=settings.ffmpeg_threads,
    )


class Decoder:
    """Decodes uploads in the decode pool's worker processes, one thread here per worker.

    Admission: at most `decode_workers + decode_queue` uploads are decoding or waiting for a
    worker; beyond that `check_room` / `stream` answer 429 at once instead of queueing without
    bound. A slot is held until its job ends: a waiting job whose request is cancelled (the client
    left) frees it at once, a running one as soon as its worker is stopped."""

    AHEAD = 8  # window chunks a decode may run ahead of the caller before its worker waits

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        self.spec = spec
        self.limits = decode_limits(settings)
        self.workers = settings.decode_workers
        self.decode_pool = DecodePool(spec, self.limits, self.workers)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        self.capacity = settings.decode_workers + settings.decode_queue
        self.pending = 0  # jobs submitted and not finished
        self._lock = threading.Lock()  # `pending` drops in pool threads' done callbacks
        self._decode_s = 0.5  # running mean of one decode, for Retry-After

    def check_room(self) -> None:
        """429 OVERLOADED when every decode slot is taken."""
        if self.pending >= self.capacity:
            retry = math.ceil(self.pending / self.workers * self._decode_s)
            raise ApiError(
                ErrorCode.OVERLOADED,
                f"{self.pending} uploads are decoding or waiting to (limit {self.capacity})",
                retry_after_s=max(1.0, retry),
            )

    async def stream(self, path: Path) -> AsyncIterator[Windows | ClipEnd]:
        """The upload's windows as its worker cuts them, then its ClipEnd (timings_ms gains
        "decode_queue", the wait for a worker)."""
        with self._lock:
            self.check_room()
            self.pending += 1
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[object] = asyncio.Queue()
        room = threading.Semaphore(self.AHEAD)  # back-pressure: memory stays flat
        cancelled = threading.Event()
        submitted = time.perf_counter()
        started = submitted

        def emit(item: object) -> None:
            while not room.acquire(timeout=0.1):
                if cancelled.is_set():
                    return
            loop.call_soon_threadsafe(items.put_nowait, item)

        def run() -> None:
            nonlocal started
            started = time.perf_counter()
            self.decode_pool.run(path, emit, cancelled)

        task = self.pool.submit(run)
        task.add_done_callback(self._release)
        task.add_done_callback(lambda _: loop.call_soon_threadsafe(items.put_nowait, _DONE))
        try:
            while (item := await items.get()) is not _DONE:
                room.release()
                if isinstance(item, ClipEnd):
                    item.timings_ms["decode_queue"] = (started - submitted) * 1000  # waiting for a worker
                    self._decode_s = 0.8 * self._decode_s + 0.2 * item.timings_ms["decode"] / 1000
                yield item
            task.result()  # the job's ApiError, if it failed
        finally:
            cancelled.set()  # the caller left or failed: stop the worker's job
            task.cancel()  # a job not yet started never starts

    def _release(self, _task: object) -> None:
        with self._lock:
            self.pending -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.decode_pool.close()  # decodes still running end now, not at their timeout


_DONE = object()  # the end of a decode job's items


def _weighted_mean(rows: np.ndarray, weights: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    if not mask.any():
        return None
    w = weights[mask]
    return (rows[mask] * w[:, None]).sum(0) / w.sum() if w.sum() > 0 else rows[mask].mean(0)


def _labelled(labels: tuple[str, ...], p: np.ndarray | None) -> dict[str, float] | None:
    return None if p is None else {label: float(v) for label, v in zip(labels, p)}


def _alignment(similarity: float, a2v: float, v2a: float) -> Alignment:
    return Alignment(similarity=float(similarity), audio=float(a2v), video=float(v2a))


class _Heads:
    """Which head answers each window: the fused one with voice and face, else the head of the one
    modality it has (`usable` is False where it has neither); the agreement outputs as floats."""

    def __init__(self, w: Windows, outputs: dict[str, np.ndarray]) -> None:
        self.has_audio = np.asarray(w.audio_len) > 0
        self.has_video = np.asarray(w.frames_len) > 0
        self.both, self.usable = self.has_audio & self.has_video, self.has_audio | self.has_video
        fused, audio, video = outputs[OUTPUT_PROBS], outputs[OUTPUT_AUDIO_PROBS], outputs[OUTPUT_VIDEO_PROBS]
        self.per_window = np.where(self.both[:, None], fused, np.where(self.has_audio[:, None], audio, video))
        self.agreement = [
            np.asarray(outputs[k], float) for k in (OUTPUT_SIMILARITY, OUTPUT_MATCH_A2V, OUTPUT_MATCH_V2A)
        ]


def window_segments(w: Windows, outputs: dict[str, np.ndarray], *, labels: tuple[str, ...]) -> list[Segment]:
    """One timeline segment per window (the head `_Heads` picks); no emotion where it has neither."""
    return _segments(w, _Heads(w, outputs), labels)


def _segments(w: Windows, h: _Heads, labels: tuple[str, ...]) -> list[Segment]:
    sim, a2v, v2a = h.agreement
    return [
        Segment(
            start=float(w.start_s[i]),
            end=float(w.end_s[i]),
            emotion=labels[int(h.per_window[i].argmax())] if h.usable[i] else None,
            probabilities=_labelled(labels, h.per_window[i]) if h.usable[i] else None,
            **(_confidence(h.per_window[i]) if h.usable[i] else {}),
            alignment=_alignment(sim[i], a2v[i], v2a[i]) if h.both[i] else None,
        )
        for i in range(len(w))
    ]


def _confidence(p: np.ndarray) -> dict[str, float | bool]:
    top = float(np.max(p))
    return {"confidence": top, "uncertain": top < UNCERTAIN_BELOW}


def summarize(
    prepared: Prepared,
    outputs: dict[str, np.ndarray],
    *,
    labels: tuple[str, ...],
    model: ModelInfo,
    timings: Timings,
) -> Prediction:
    """The response: per-window results and their duration-weighted means.

    Per window the result is the fused head when it has voice and face, else the head of the one
    modality it has; windows with neither (possible inside a long clip) are left out of the mean.
    """
    w = prepared.windows
    h = _Heads(w, outputs)
    has_audio, has_video, both = h.has_audio, h.has_video, h.both
    audio, video = outputs[OUTPUT_AUDIO_PROBS], outputs[OUTPUT_VIDEO_PROBS]
    weights = np.clip(np.asarray(w.end_s, float) - np.asarray(w.start_s, float), 0, None)
    clip = _weighted_mean(h.per_window, weights, h.usable)
    if clip is None:
        raise ApiError(ErrorCode.NO_USABLE_STREAM, "no window has a voice or a face to read")
    clip_alignment = None
    if both.any():
        means = [_weighted_mean(v[:, None], weights, both)[0] for v in h.agreement]
        clip_alignment = _alignment(*means)

    segments = _segments(w, h, labels)
    return Prediction(
        emotion=labels[int(clip.argmax())],
        probabilities=_labelled(labels, clip),
        **_confidence(clip),
        modalities=Modalities(
            audio=AudioView(
                present=bool(has_audio.any()),
                probabilities=_labelled(labels, _weighted_mean(audio, weights, has_audio)),
            ),
            video=VideoView(
                present=bool(has_video.any()),
                frames_with_face=prepared.frames_with_face,
                frames=prepared.frames_total,
                probabilities=_labelled(labels, _weighted_mean(video, weights, has_video)),
            ),
        ),
        alignment=clip_alignment,
        segments=segments,
        duration_s=float(prepared.duration_s),
        model=model,
        timings_ms=timings,
    )


class Predictor:
    """The service's pipeline in-process, without HTTP or batcher (`foalnet predict`)."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.limits = decode_limits(settings)
        self.cropper = FaceCropper(engine.spec)
        self.model = ModelInfo(name=engine.spec.name, version=engine.spec.version, provider=engine.provider)

    def __call__(self, path: Path) -> Prediction:
        start = time.perf_counter()
        prepared = prepare(path, self.engine.spec, self.cropper, self.limits)
        infer_start = time.perf_counter()
        outputs = self.engine.infer(prepared.windows.feeds())
        done = time.perf_counter()
        timings = Timings(
            upload=0.0,
            decode_queue=0.0,
            decode=prepared.timings_ms["decode"],
            faces=prepared.timings_ms["faces"],
            queue=0.0,
            infer=(done - infer_start) * 1000,
            total=(done - start) * 1000,
        )
        return summarize(prepared, outputs, labels=self.engine.spec.labels, model=self.model, timings=timings)
