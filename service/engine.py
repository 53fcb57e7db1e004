"""ONNX Runtime engine: one session, its execution provider, fixed batch buckets, warm-up.

The model file carries its `ModelSpec` in its metadata, so the engine is configured by the file
alone. Batches are padded to a fixed set of sizes ("buckets") so the provider only ever sees a few
shapes: each is compiled/allocated once during `warmup()`, not on a user's request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from service.contract import (
    INPUT_AUDIO,
    INPUT_AUDIO_LEN,
    INPUT_FRAMES,
    INPUT_FRAMES_LEN,
    INPUTS,
    METADATA_KEY,
    OUTPUTS,
    ModelSpec,
)
from service.errors import ApiError, ErrorCode

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
Device = Literal["auto", "cuda", "cpu"]


class EngineError(RuntimeError):
    """The model cannot be loaded as asked (missing file, no spec, CUDA demanded but absent)."""


class Engine:
    def __init__(
        self,
        model_path: str | Path,
        *,
        device: Device = "auto",
        intra_op_threads: int | None = None,
        buckets: Sequence[int] = (1, 2, 4, 8, 16, 32),
    ) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise EngineError(f"model file not found: {self.model_path} (set FOALNET_MODEL_PATH or --model)")
        if device not in ("auto", "cuda", "cpu"):
            raise EngineError(f"device must be auto, cuda or cpu, not {device!r}")
        self.buckets = tuple(sorted({int(b) for b in buckets}))
        if not self.buckets or self.buckets[0] < 1:
            raise EngineError(f"buckets must be positive batch sizes, got {buckets!r}")
        self.device = device
        self.fallback_reason: str | None = None
        self.healthy = True  # False after a failed inference, until one succeeds
        self.unhealthy_since: float | None = None  # time.monotonic() of the first failure in a row
        self.warm = False
        self._lock = threading.Lock()  # one run at a time per session

        self.session = self._open(intra_op_threads)
        self.provider = self.session.get_providers()[0]
        self.spec = self._read_spec()
        missing = set(INPUTS) - {i.name for i in self.session.get_inputs()}
        missing |= set(OUTPUTS) - {o.name for o in self.session.get_outputs()}
        if missing:
            raise EngineError(f"{self.model_path} lacks contract inputs/outputs: {sorted(missing)}")

    def _open(self, intra_op_threads: int | None) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or 0  # 0: ORT picks one per physical core
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Requests arrive in bursts and share the CPU with ffmpeg decodes: idle threads sleep
        # instead of spinning between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")

        providers: list[str] = [CPU]
        if self.device != "cpu":
            available = ort.get_available_providers()
            if CUDA in available:
                providers = [CUDA, CPU]
            else:
                self._no_cuda(
                    f"{CUDA} is not in this onnxruntime build (available: {', '.join(available)}); "
                    "install onnxruntime-gpu for GPU inference"
                )
        try:
            session = ort.InferenceSession(str(self.model_path), options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise EngineError(f"cannot load {self.model_path}: {exc}") from exc
        if CUDA in providers and session.get_providers()[0] != CUDA:
            self._no_cuda(
                f"{CUDA} failed to initialise (CUDA or cuDNN libraries missing or no GPU visible); "
                "see the onnxruntime log above"
            )
        return session

    def _no_cuda(self, reason: str) -> None:
        if self.device == "cuda":
            raise EngineError(f"device=cuda asked for, but {reason}")
        self.fallback_reason = reason
        log.warning("device=auto: running on CPU: %s", reason)

    def _read_spec(self) -> ModelSpec:
        metadata = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in metadata:
            raise EngineError(f"{self.model_path} has no {METADATA_KEY!r} metadata: not a Foal-Net export")
        return ModelSpec.from_json(metadata[METADATA_KEY])

    def bucket_for(self, n: int) -> int:
        """Smallest bucket holding `n` windows (callers chunk by the largest one)."""
        return next((b for b in self.buckets if b >= n), self.buckets[-1])

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run any number of windows: chunked by the largest bucket, each chunk padded to a bucket."""
        n = len(feeds[INPUT_AUDIO])
        if n == 0:
            raise ApiError(ErrorCode.INVALID_REQUEST, "no windows to infer")
        largest = self.buckets[-1]
        parts = [
            self._run_padded({k: v[i : i + largest] for k, v in feeds.items()}) for i in range(0, n, largest)
        ]
        return {name: np.concatenate([p[name] for p in parts]) for name in OUTPUTS}

    def _run_padded(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(feeds[INPUT_AUDIO])
        pad = self.bucket_for(n) - n
        if pad:
            # Repeat the last window: padded rows take the same path as real ones (no all-empty
            # masks), and they are sliced off below.
            feeds = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in feeds.items()}
        try:
            with self._lock:
                values = self.session.run(list(OUTPUTS), feeds)
        except Exception as exc:
            if self.healthy:
                self.unhealthy_since = time.monotonic()
            self.healthy = False
            log.exception("inference failed on a batch of %d (+%d padding)", n, pad)
            raise ApiError(ErrorCode.INFERENCE_FAILED, f"the model failed on this batch: {exc}") from exc
        self.healthy, self.unhealthy_since = True, None
        return {name: value[:n] for name, value in zip(OUTPUTS, values)}

    def dummy_feeds(self, n: int) -> dict[str, np.ndarray]:
        """`n` windows of silence and blank frames marked fully valid (both modalities' paths run)."""
        spec = self.spec
        return {
            INPUT_AUDIO: np.zeros((n, spec.window_samples), np.float32),
            INPUT_AUDIO_LEN: np.full((n,), spec.window_samples, np.int64),
            INPUT_FRAMES: np.zeros((n, *spec.frames_shape), np.uint8),
            INPUT_FRAMES_LEN: np.full((n,), spec.frames_per_window, np.int64),
        }

    def warmup(self) -> dict[int, float]:
        """Run every bucket once; returns seconds per bucket. The service is ready only after it."""
        seconds = {}
        for bucket in self.buckets:
            start = time.perf_counter()
            self.infer(self.dummy_feeds(bucket))
            seconds[bucket] = time.perf_counter() - start
        self.warm = True
        log.info("warmed buckets %s on %s in %.2f s", self.buckets, self.provider, sum(seconds.values()))
        return seconds
