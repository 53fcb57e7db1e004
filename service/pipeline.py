"""From a media file to a `Prediction`: decode in a thread pool, and turn model outputs into the answer.

Shared by the HTTP app (windows go through the batcher) and `foalnet predict` (straight to the
engine), so both give the same response for the same file.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service import media
from service.contract import (
    OUTPUT_AUDIO_PROBS,
    OUTPUT_MATCH_A2V,
    OUTPUT_MATCH_V2A,
    OUTPUT_PROBS,
    OUTPUT_SIMILARITY,
    OUTPUT_VIDEO_PROBS,
    ModelSpec,
)
from service.engine import Engine
from service.errors import ApiError, ErrorCode
from service.faces import FaceCropper
from service.media import DecodeLimits
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
from service.windows import Prepared, prepare


def decode_limits(settings: Settings) -> DecodeLimits:
    return DecodeLimits(timeout_s=settings.decode_timeout_s, max_duration_s=settings.max_duration_s)


class Decoder:
    """Runs `windows.prepare` in a bounded thread pool (ffmpeg and OpenCV release the GIL).

    Admission: at most `decode_workers + decode_queue` uploads are decoding or waiting for a
    worker; beyond that `check_room` / `prepare` answer 429 at once instead of queueing without
    bound. A slot is held until its pool task ends: a waiting task whose request is cancelled
    (the client left) frees it at once, a running decode when ffmpeg finishes."""

    def __init__(self, spec: ModelSpec, settings: Settings, pool: ThreadPoolExecutor) -> None:
        self.spec = spec
        self.limits = decode_limits(settings)
        self.cropper = FaceCropper(spec)  # thread-safe: one cascade per thread inside
        self.pool = pool
        self.workers = settings.decode_workers
        self.capacity = settings.decode_workers + settings.decode_queue
        self.pending = 0  # pool tasks submitted and not finished
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

    async def prepare(self, path: Path) -> Prepared:
        with self._lock:
            self.check_room()
            self.pending += 1
        submitted = time.perf_counter()
        started = submitted

        def run() -> Prepared:
            nonlocal started
            started = time.perf_counter()
            return prepare(path, self.spec, self.cropper, self.limits)

        task = self.pool.submit(run)
        task.add_done_callback(self._release)
        prepared = await asyncio.wrap_future(task)  # cancelling this cancels a task not yet started
        prepared.timings_ms["decode_queue"] = (started - submitted) * 1000  # waiting for a worker
        self._decode_s = 0.8 * self._decode_s + 0.2 * prepared.timings_ms["decode"] / 1000
        return prepared

    def _release(self, _task: object) -> None:
        with self._lock:
            self.pending -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        media.stop_all()  # decodes still running end now, not at their timeout


def _weighted_mean(rows: np.ndarray, weights: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    if not mask.any():
        return None
    w = weights[mask]
    return (rows[mask] * w[:, None]).sum(0) / w.sum() if w.sum() > 0 else rows[mask].mean(0)


def _labelled(labels: tuple[str, ...], p: np.ndarray | None) -> dict[str, float] | None:
    return None if p is None else {label: float(v) for label, v in zip(labels, p)}


def _alignment(similarity: float, a2v: float, v2a: float) -> Alignment:
    return Alignment(similarity=float(similarity), audio=float(a2v), video=float(v2a))


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
    has_audio = np.asarray(w.audio_len) > 0
    has_video = np.asarray(w.frames_len) > 0
    both = has_audio & has_video
    start, end = np.asarray(w.start_s, float), np.asarray(w.end_s, float)
    weights = np.clip(end - start, 0, None)

    fused, audio, video = outputs[OUTPUT_PROBS], outputs[OUTPUT_AUDIO_PROBS], outputs[OUTPUT_VIDEO_PROBS]
    per_window = np.where(both[:, None], fused, np.where(has_audio[:, None], audio, video))
    usable = has_audio | has_video
    clip = _weighted_mean(per_window, weights, usable)
    if clip is None:
        raise ApiError(ErrorCode.NO_USABLE_STREAM, "no window has a voice or a face to read")
    sim, a2v, v2a = (
        np.asarray(outputs[k], float) for k in (OUTPUT_SIMILARITY, OUTPUT_MATCH_A2V, OUTPUT_MATCH_V2A)
    )
    clip_alignment = None
    if both.any():
        means = [_weighted_mean(v[:, None], weights, both)[0] for v in (sim, a2v, v2a)]
        clip_alignment = _alignment(*means)

    segments = [
        Segment(
            start=float(start[i]),
            end=float(end[i]),
            emotion=labels[int(per_window[i].argmax())] if usable[i] else None,
            probabilities=_labelled(labels, per_window[i]) if usable[i] else None,
            alignment=_alignment(sim[i], a2v[i], v2a[i]) if both[i] else None,
        )
        for i in range(len(start))
    ]
    return Prediction(
        emotion=labels[int(clip.argmax())],
        probabilities=_labelled(labels, clip),
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
