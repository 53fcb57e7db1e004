"""The floor of `foalnet bench`: decode alone, face detection alone and the model alone at each batch
size (no HTTP, no queue), each as clips/s on this machine.

How the floor is combined: decode and faces are timed with as many threads as cores (ffmpeg and
ONNX Runtime release the GIL) and the model at its best batch size, so each stage alone saturates the
machine; doing all three needs the sum of their per-clip times, so the floor throughput is
1 / (1/decode + 1/faces + windows/model). The floor latency of one clip is the single-stream sum.

The physical floor is what the machine can do with the service's own decoding: `windows.prepare`
(PyAV in-process, a one-thread decoder, every frame decoded and only the sampled ones converted,
faces frame by frame) in one process per core, started together (threads would share one GIL and
understate the machine), plus the model at its best batch size.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from bench.plan import Plan
from service import media
from service.contract import ModelSpec
from service.cpu import pin_opencv_threads
from service.engine import Engine
from service.faces import FaceCropper
from service.media_limits import DecodeLimits
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


def _prepare_loop(
    path: Path, spec_json: str, limits: DecodeLimits, calls: int, start: mp.synchronize.Barrier, out: mp.Queue
) -> None:
    """One physical-floor process: warm up, wait for the others, then `calls` prepares (wall s out)."""
    pin_opencv_threads()
    spec = ModelSpec.from_json(spec_json)
    cropper = FaceCropper(spec)
    prepare(path, spec, cropper, limits)
    start.wait()
    t0 = time.perf_counter()
    for _ in range(calls):
        prepare(path, spec, cropper, limits)
    out.put(time.perf_counter() - t0)


def _prepare_per_s(path: Path, spec: ModelSpec, limits: DecodeLimits, processes: int, calls: int) -> float:
    """Clips/s of `windows.prepare` in `processes` processes running at once."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(processes), ctx.Queue()
    workers = [
        ctx.Process(target=_prepare_loop, args=(path, spec.to_json(), limits, calls, start, out))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    walls = [out.get() for _ in workers]
    for worker in workers:
        worker.join()
    return processes * calls / max(walls)


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
        # The physical floor: what the decode workers run, with their one-thread decoder.
        one_thread = replace(limits, threads=1)
        physical_s, _ = _timed(partial(prepare, path, spec, cropper, one_thread), 1, plan.stage_repeats)
        physical_tp = _prepare_per_s(path, spec, one_thread, cores, plan.stage_repeats)
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
