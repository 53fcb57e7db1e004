"""The floor of `foalnet bench`: decode alone, face detection alone and the model alone at each batch
size (no HTTP, no queue), each as clips/s on this machine.

How the floor is combined: decode and faces are timed with as many threads as cores (ffmpeg and
OpenCV release the GIL) and the model at its best batch size, so each stage alone saturates the
machine; doing all three needs the sum of their per-clip times, so the floor throughput is
1 / (1/decode + 1/faces + windows/model). The floor latency of one clip is the single-stream sum.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from bench.plan import Plan
from service import media
from service.engine import Engine
from service.faces import FaceCropper
from service.windows import prepare


def _timed(fn: Callable[[], object], workers: int, calls_per_worker: int) -> tuple[float, float]:
    """Run fn `workers x calls_per_worker` times on `workers` threads -> (median call s, calls/s)."""

    def one() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    n = workers * calls_per_worker
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        durations = list(pool.map(lambda _: one(), range(n)))
    wall = time.perf_counter() - t0
    return float(np.median(durations)), n / wall


def _tile(feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The clip's windows repeated to exactly `batch` rows."""
    n = next(iter(feeds.values())).shape[0]
    idx = np.arange(batch) % n
    return {name: np.ascontiguousarray(array[idx]) for name, array in feeds.items()}


def measure_floor(model: Path, clips: dict[str, Path], plan: Plan, device: str) -> dict:
    engine = Engine(model, device=device)
    engine.warmup()
    spec = engine.spec
    cropper = FaceCropper(spec)
    limits = media.DEFAULT_LIMITS
    cores = os.cpu_count() or 1
    result: dict = {"cores": cores, "provider": engine.provider, "clips": {}, "model": []}

    feeds_by_clip = {}
    for name, path in clips.items():
        decoded = media.decode(path, spec, limits)
        prepared = prepare(path, spec, cropper, limits)
        feeds = prepared.windows.feeds()
        feeds_by_clip[name] = feeds
        windows = int(next(iter(feeds.values())).shape[0])
        decode, faces = partial(media.decode, path, spec, limits), partial(cropper, decoded.frames)
        decode_s, _ = _timed(decode, 1, plan.stage_repeats)
        _, decode_tp = _timed(decode, cores, plan.stage_repeats)
        faces_s, _ = _timed(faces, 1, plan.stage_repeats)
        _, faces_tp = _timed(faces, cores, plan.stage_repeats)
        model_s, _ = _timed(partial(engine.infer, feeds), 1, plan.stage_repeats)
        # The physical floor: PyAV in-process (one thread, every frame decoded, only the sampled
        # ones converted by libswscale) with faces found frame by frame, as the decode workers do.
        physical = partial(prepare, path, spec, cropper, limits)
        physical_s, _ = _timed(physical, 1, plan.stage_repeats)
        _, physical_tp = _timed(physical, cores, plan.stage_repeats)
        result["clips"][name] = {
            "windows": windows,
            "frames": 0 if decoded.frames is None else int(decoded.frames.shape[0]),
            "decode_ms": decode_s * 1e3,
            "decode_clips_per_s": decode_tp,
            "faces_ms": faces_s * 1e3,
            "faces_clips_per_s": faces_tp,
            "model_ms": model_s * 1e3,
            "latency_ms": (decode_s + faces_s + model_s) * 1e3,
            "physical_ms": physical_s * 1e3,
            "physical_clips_per_s": physical_tp,
            "physical_latency_ms": (physical_s + model_s) * 1e3,
        }

    first = next(iter(feeds_by_clip.values()))
    for batch in plan.batch_sizes:
        batch_s, _ = _timed(partial(engine.infer, _tile(first, batch)), 1, plan.stage_repeats)
        result["model"].append({"batch": batch, "ms": batch_s * 1e3, "windows_per_s": batch / batch_s})
    best = max(row["windows_per_s"] for row in result["model"])
    for row in result["clips"].values():
        row["model_clips_per_s"] = best / row["windows"]
        per_clip_s = 1 / row["decode_clips_per_s"] + 1 / row["faces_clips_per_s"] + 1 / row["model_clips_per_s"]
        row["clips_per_s"] = 1 / per_clip_s
        row["physical_floor_clips_per_s"] = 1 / (1 / row["physical_clips_per_s"] + 1 / row["model_clips_per_s"])
    return result
