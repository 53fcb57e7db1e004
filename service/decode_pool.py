"""Long-lived decode worker processes: in-process PyAV decoding, isolated from the service.

Each worker is a process started once (multiprocessing's forkserver, with the decoding modules
preloaded so a restart takes milliseconds) that runs `windows.stream` for one upload at a time and
sends every window back through its pipe as soon as it is cut. Inside each worker:
- OpenCV's pool and the decoder's threads are sized by `cpu.thread_plan` (through the limits);
- RLIMIT_AS caps what a hostile file can make the decoder allocate (MemoryError -> 413);
- RLIMIT_CPU is re-armed per job at the CPU seconds used so far + the job's budget (SIGXCPU).
In the service, one thread per worker waits on its pipe with the job's wall-clock timeout: a
worker that overruns it is killed and restarted (422 decode_timeout), one that dies (a decoder
segfault, the CPU limit) is restarted and the job answered with a typed 422; a job whose caller
has gone kills its worker too (restarted lazily), so an abandoned 10-minute decode stops at once.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import resource
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from service.contract import ModelSpec
from service.cpu import pin_opencv_threads
from service.errors import ApiError, ErrorCode
from service.media_limits import FFMPEG_MAX_MEMORY, DecodeLimits
from service.windows import ClipEnd

WORKER_MEMORY = FFMPEG_MAX_MEMORY  # bytes of address space per worker (RLIMIT_AS)
# CPU seconds a job may use per second of its wall-clock limit: one per decoder thread, plus half
# a second for the face loop (which runs between decodes, on the worker's own thread).
CPU_SLACK_PER_WALL_S = 0.5
POLL_S = 0.1  # how often a waiting thread checks for cancellation and a dead worker
_PRELOAD = ["service.windows"]  # imported once in the forkserver, inherited by every worker

Emit = Callable[[object], None]


def _worker_main(conn: Connection, spec_json: str, limits: DecodeLimits) -> None:
    """A worker's loop: a path in; its windows, then a ClipEnd or ("error", code, detail) out."""
    from service.faces import FaceCropper
    from service.windows import stream

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service stops its workers itself
    pin_opencv_threads()  # the face detector runs here; the service's own setting is not inherited
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    memory = WORKER_MEMORY if hard == resource.RLIM_INFINITY else min(WORKER_MEMORY, hard)
    resource.setrlimit(resource.RLIMIT_AS, (memory, hard))
    spec = ModelSpec.from_json(spec_json)
    cropper = FaceCropper(spec)
    while (path := conn.recv()) is not None:
        _arm_cpu_limit(limits.timeout_s * (limits.threads + CPU_SLACK_PER_WALL_S))
        try:
            for item in stream(path, spec, cropper, limits):
                conn.send(item)
        except ApiError as exc:
            conn.send(("error", exc.code.value, exc.detail))
        except MemoryError:
            detail = "decoding this file needs more memory than the limit allows"
            conn.send(("error", ErrorCode.TOO_LARGE.value, detail))
        except Exception as exc:  # noqa: BLE001 - a decoder failure on this file, not the worker's end
            detail = f"the decoder failed on this file ({type(exc).__name__})"
            conn.send(("error", ErrorCode.CORRUPT_MEDIA.value, detail))


def _arm_cpu_limit(cpu_s: float) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = math.ceil(used + cpu_s) + 1
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _shutting_down() -> ApiError:
    return ApiError(ErrorCode.NOT_READY, "the service is shutting down")


class _Worker:
    """One worker process and the service's end of its pipe; (re)started on demand.

    `start` and `stop` hold a lock: the thread running a job stops its worker on a timeout or a
    cancel while the service's shutdown may stop every worker (a pipe closed twice could close a
    descriptor that has been reused)."""

    def __init__(self, ctx: mp.context.BaseContext, spec: ModelSpec, limits: DecodeLimits) -> None:
        self._ctx, self._spec_json, self._limits = ctx, spec.to_json(), limits
        self._lock = threading.RLock()
        self.process: mp.process.BaseProcess | None = None
        self.conn: Connection | None = None

    def start(self) -> None:
        with self._lock:
            if self.process is not None and self.process.is_alive():
                return
            self.stop()
            ours, theirs = self._ctx.Pipe()
            self.process = self._ctx.Process(
                target=_worker_main,
                args=(theirs, self._spec_json, self._limits),
                daemon=True,
                name="foalnet-decode",
            )
            self.process.start()
            theirs.close()
            self.conn = ours

    def stop(self) -> None:
        with self._lock:
            if self.process is not None:
                if self.process.is_alive():
                    self.process.kill()
                self.process.join(5)
                self.process = None
            if self.conn is not None:
                self.conn.close()
                self.conn = None

    def death(self) -> ApiError:
        """The error for a job whose worker died under it (then the worker is cleaned up)."""
        with self._lock:
            process = self.process
            if process is None:  # stopped by the service's shutdown while the job ran
                return _shutting_down()
            process.join(1)
            code = process.exitcode
            self.stop()
        if code is not None and -code == signal.SIGXCPU:
            return ApiError(ErrorCode.DECODE_TIMEOUT, "the decoder was stopped at its CPU time limit")
        name = signal.Signals(-code).name if code is not None and code < 0 else f"exit {code}"
        return ApiError(ErrorCode.CORRUPT_MEDIA, f"the decoder crashed ({name}) on this file")


class DecodePool:
    """`workers` decode processes; `run` is called from at most `workers` threads at once."""

    def __init__(self, spec: ModelSpec, limits: DecodeLimits, workers: int) -> None:
        self.limits = limits
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        self._all = [_Worker(ctx, spec, limits) for _ in range(workers)]
        self._closed = False
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for worker in self._all:
            worker.start()
            self._idle.put(worker)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._all if w.process is not None and w.process.pid]

    def run(self, path: Path, emit: Emit, cancelled: threading.Event) -> None:
        """Decode `path` in a worker, calling `emit` with each window and the ClipEnd; raises the
        job's ApiError. Blocks: call it from a thread."""
        worker = self._idle.get()
        try:
            self._run(worker, path, emit, cancelled)
        finally:
            self._idle.put(worker)

    def _run(self, worker: _Worker, path: Path, emit: Emit, cancelled: threading.Event) -> None:
        if self._closed:  # no new worker once the shutdown has stopped them
            raise _shutting_down()
        worker.start()
        conn, process = worker.conn, worker.process  # this job's: a shutdown may stop the worker
        assert conn is not None and process is not None
        deadline = time.monotonic() + self.limits.timeout_s
        try:
            conn.send(os.fspath(path))
            while True:
                if cancelled.is_set():
                    worker.stop()  # nobody wants the rest: stop decoding now
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    worker.stop()
                    detail = f"decoding took longer than {self.limits.timeout_s:g} s"
                    raise ApiError(ErrorCode.DECODE_TIMEOUT, detail)
                if not conn.poll(min(left, POLL_S)):
                    if not process.is_alive():
                        raise worker.death()
                    continue
                item = conn.recv()
                if isinstance(item, tuple):
                    _, code, detail = item
                    raise ApiError(ErrorCode(code), detail)
                emit(item)
                if isinstance(item, ClipEnd):
                    return
        except (EOFError, OSError):  # the pipe broke: the worker died mid-message (or was stopped)
            raise worker.death() from None

    def close(self) -> None:
        self._closed = True
        for worker in self._all:
            worker.stop()
