"""A server in a subprocess on 127.0.0.1: started, timed until `/readyz` answers 200, stopped with
SIGTERM. `foalnet bench` and `foalnet soak` measure through it, and the end-to-end tests start
their `foalnet serve` with it (tests/server.py). Also what they read off a running server: one
/metrics sample, its resident memory and open descriptors (Linux /proc)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from typing import Self

HOST = "127.0.0.1"
READY_TIMEOUT_S = 120.0  # a cold start slower than this is a failure, not a number
READY_POLL_S = 0.02  # fine enough to time a cold start


class ServerError(RuntimeError):
    """The server exited or did not become ready (its log tail is in the message)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def serve_command(model: Path, port: int, *args: str) -> list[str]:
    """`foalnet serve` of this checkout or install on `port` (the serving commands alone: no torch)."""
    return [sys.executable, "-m", "foalnet_cli", "serve", "--host", HOST, "--port", str(port),
            "--model", str(model), *args]


class ServerProcess:
    """`command` in a subprocess, ready once GET {url}/readyz answers 200 (`cold_start_s`: how long
    that took from the start). Its output goes to `log_path`, else to a temporary file (a pipe
    nobody reads would fill and block the server); `stop()` sends SIGTERM and returns the log."""

    def __init__(
        self,
        command: list[str],
        port: int,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        log_path: Path | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
        tmp_dir: Path | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.port, self.tmp_dir, self.metrics_port = port, tmp_dir, metrics_port
        self.url = f"http://{HOST}:{port}"
        self._log: IO[bytes] = log_path.open("w+b") if log_path else tempfile.TemporaryFile()  # noqa: SIM115
        start = time.perf_counter()
        self.process = subprocess.Popen(
            command, env=os.environ | (env or {}), cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.pid = self.process.pid
        self.cold_start_s = self._wait_ready(start, ready_timeout_s)

    @classmethod
    def serve(
        cls, model: Path, tmp_dir: Path, *args: str, metrics_port: bool = False, **kwargs
    ) -> ServerProcess:
        """`foalnet serve` with its uploads in `tmp_dir` (and, with `metrics_port`, /metrics on a
        second free port: `.metrics_port`)."""
        port, extra = free_port(), ["--tmp-dir", str(tmp_dir), "--log-level", "warning"]
        second = free_port() if metrics_port else None
        if second:
            extra += ["--metrics-port", str(second)]
        command = serve_command(model, port, *extra, *args)
        return cls(command, port, tmp_dir=tmp_dir, metrics_port=second, **kwargs)

    def _wait_ready(self, start: float, timeout_s: float) -> float:
        with httpx.Client(timeout=2.0) as client:
            while time.perf_counter() - start < timeout_s:
                if self.process.poll() is not None:
                    raise ServerError(f"server exited {self.process.returncode}:\n{self.log()[-4000:]}")
                try:
                    if client.get(self.url + "/readyz").status_code == 200:
                        return time.perf_counter() - start
                except httpx.TransportError:
                    pass
                time.sleep(READY_POLL_S)
        self.stop()
        raise ServerError(f"server not ready after {timeout_s:g} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def stop(self, timeout_s: float = 60) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.log()

    def metric(self, line_start: str) -> float:
        return metric(self.url, line_start)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def metric(url: str, line_start: str) -> float:
    """One sample from the server's /metrics (0 when absent)."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def memory_kb(pid: int) -> dict[str, int]:
    """Resident memory of one process (its children not included), now (VmRSS) and at its peak
    (VmHWM), in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return {"rss_kb": fields["VmRSS"], "peak_kb": fields["VmHWM"]}


def rss_bytes(pid: int) -> int:
    return memory_kb(pid)["rss_kb"] * 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command name (field 3, the state, comes first)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(proc_stat(int(entry.name))[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError):  # gone meanwhile
            continue
    return found
