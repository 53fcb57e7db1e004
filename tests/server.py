"""A real `foalnet serve` for end-to-end tests: `bench.server.ServerProcess` with small pools, and
the decode worker processes it runs (to hang or crash one the way a hostile file could)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.server import ServerProcess, children, proc_stat

# Small pools: two cores are shared by several workers.
E2E_ARGS = ("--device", "auto", "--buckets", "1,2,4", "--decode-workers", "1", "--intra-op-threads", "1")


def start_server(model: Path, tmp_dir: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Started and ready (or ServerError with its log), /metrics also on `.metrics_port`; `stop()`
    sends SIGTERM."""
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    return ServerProcess.serve(model, tmp_dir, *E2E_ARGS, *args, metrics_port=True, env=env)


def decode_workers(server_pid: int) -> list[int]:
    """The server's decode workers: the children of its multiprocessing forkserver."""
    return [worker for child in children(server_pid) for worker in children(child)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used."""
    utime, stime = proc_stat(pid)[11:13]
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    """Running or stopped; a zombie (killed, not reaped yet) is dead."""
    try:
        return proc_stat(pid)[0] != "Z"
    except OSError:
        return False


def wait_until_idle(pid: int, quiet_s: float = 0.3, timeout_s: float = 30.0) -> None:
    """Returns once the process has used no CPU for `quiet_s` (a decode worker that has finished
    starting up and waits on its pipe), so the next CPU it uses is the next job's."""
    deadline = time.monotonic() + timeout_s
    while True:
        before = cpu_seconds(pid)
        time.sleep(quiet_s)
        if cpu_seconds(pid) == before:
            return
        assert time.monotonic() < deadline, f"process {pid} never went idle"


def wait_until_busy(pid: int, timeout_s: float = 20.0) -> None:
    """Returns once the process uses CPU (an idle decode worker uses none: it waits on its pipe)."""
    start, deadline = cpu_seconds(pid), time.monotonic() + timeout_s
    while cpu_seconds(pid) == start:
        assert time.monotonic() < deadline, f"process {pid} never started working"
        time.sleep(0.005)
