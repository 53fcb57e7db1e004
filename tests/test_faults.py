"""Faults through a real `foalnet serve`: a decode worker that hangs or crashes mid-decode (as a
hostile file could make the decoder do), the limits it runs under, and a full temporary directory.
Each answer is typed, the server keeps serving, and no temporary file survives. (An inference
failure answering 503 and dropping readiness until the engine recovers is tested in-process:
tests/test_app.py::test_inference_failure_is_503_and_readiness_recovers.)
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from bench.media import make_clip
from bench.server import ServerProcess
from service import ffmpeg_run
from service.decode_pool import CPU_SLACK_PER_WALL_S, WORKER_MEMORY
from service.errors import ErrorCode
from tests.server import alive, cpu_seconds, decode_workers, start_server, wait_until_busy, wait_until_idle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DECODE_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("faults") / "talk.mp4", seconds=2)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    """Long enough that its decode is still running when the test signals the worker."""
    path = tmp_path_factory.mktemp("faults") / "long.mp4"
    return make_clip(path, seconds=30, width=160, height=120, fps=10, audio="tone")


def _post(server, data: bytes) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = httpx.post(
        server.url + "/predict", content=data, headers={"Content-Type": "video/mp4"}, timeout=60
    )
    return response, time.monotonic() - start


def _post_and_signal(server, data: bytes, worker: int, sig: signal.Signals) -> tuple[httpx.Response, float]:
    """Send `data`, and signal the decode worker once it is decoding it (not while it is still
    starting up: a worker killed then is replaced before the upload reaches it)."""
    wait_until_idle(worker)
    result: list[tuple[httpx.Response, float]] = []
    sender = threading.Thread(target=lambda: result.append(_post(server, data)))
    sender.start()
    wait_until_busy(worker)
    os.kill(worker, sig)
    sender.join(60)
    return result[0]


def _limits(pid: int) -> dict[str, str]:
    """Soft limits from /proc/<pid>/limits, by name ("Max cpu time": "12")."""
    rows = Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]
    return {m[1]: m[2] for m in (re.match(r"(Max [a-z ]+?)\s{2,}(\S+)", row) for row in rows) if m}


@pytest.mark.parametrize(
    "sig, code, word",
    [(signal.SIGSTOP, "decode_timeout", "longer than"), (signal.SIGSEGV, "corrupt_media", "SIGSEGV")],
    ids=["hung", "crashed"],
)
def test_a_hung_or_crashed_decode_worker_is_killed_typed_and_replaced(
    lite_model, tmp_path, clip, long_clip, sig, code, word
):
    uploads = tmp_path / "uploads"
    server = start_server(lite_model, uploads, "--decode-timeout-s", str(DECODE_TIMEOUT_S))
    try:
        (worker,) = decode_workers(server.pid)
        response, seconds = _post_and_signal(server, long_clip.read_bytes(), worker, sig)
        assert response.status_code == 422 and response.json()["error"] == code, response.text
        assert word in response.json()["detail"]
        assert seconds < DECODE_TIMEOUT_S + 3
        assert not alive(worker), "the hung worker was not killed"
        assert list(uploads.iterdir()) == []

        ok, _ = _post(server, clip.read_bytes())  # a fresh worker decodes the next upload
        assert ok.status_code == 200, ok.text
        (fresh,) = decode_workers(server.pid)
        assert fresh != worker
        limits = _limits(fresh)
        assert int(limits["Max address space"]) == WORKER_MEMORY  # set by the worker at its start
        # The CPU limit is armed per job: its budget on top of what the worker has used so far.
        used, budget = cpu_seconds(fresh), DECODE_TIMEOUT_S * (1 + CPU_SLACK_PER_WALL_S)
        assert used < int(limits["Max cpu time"]) <= used + budget + 2
        assert httpx.get(server.url + "/readyz").status_code == 200
    finally:
        log = server.stop()
    assert server.process.returncode == 0, log
    assert list(uploads.iterdir()) == []


@contextmanager
def _tiny_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """`folder` as a tmpfs of `size` (skips the test where mounting is not allowed)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tiny tmpfs needs root")
    folder.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    mounted = subprocess.run(command, capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextmanager
def _served(model: Path, uploads: Path) -> Iterator[ServerProcess]:
    """A server that must also stop cleanly (exit 0)."""
    server = start_server(model, uploads)
    try:
        yield server
    finally:
        log = server.stop()
    assert server.process.returncode == 0, log


def test_full_temp_dir_is_storage_full(lite_model, tmp_path, clip):
    with _tiny_tmpfs(tmp_path / "full", "32k") as uploads, _served(lite_model, uploads) as server:
        data = clip.read_bytes()
        assert len(data) > 32 * 1024
        response, _ = _post(server, data)
        assert response.status_code == 503 and response.json()["error"] == "storage_full", response.text
        assert list(uploads.iterdir()) == []
        small, _ = _post(server, random.Random(0).randbytes(8 * 1024))  # fits: the service still works
        assert small.status_code == 415 and small.json()["error"] == "not_media", small.text
        assert httpx.get(server.url + "/readyz").status_code == 200
        assert list(uploads.iterdir()) == []


@pytest.mark.parametrize(
    "stderr, code",
    [
        ("[h264 @ 0x55] thread_get_buffer() failed\n[h264 @ 0x55] no frame!", ErrorCode.TOO_LARGE),
        ("Error while decoding stream #0:0: Cannot allocate memory", ErrorCode.TOO_LARGE),
        (
            "/usr/bin/ffprobe: error while loading shared libraries: libx.so.1: failed to map segment",
            ErrorCode.INTERNAL_ERROR,
        ),
        ("[mov,mp4 @ 0x55] moov atom not found", ErrorCode.CORRUPT_MEDIA),
    ],
)
def test_limit_failures_are_not_blamed_on_the_file(stderr, code):
    """Hitting RLIMIT_AS is too_large (the file needs more), not corrupt_media; a limit so low
    that ffmpeg cannot even load is the deployment's fault (500), not the upload's."""
    assert ffmpeg_run.failure(stderr, "decode", opened=True).code == code


def test_enospc_on_the_final_flush_is_storage_full(tiny_model, tmp_path):
    """An upload smaller than the file buffer reaches the disk only when the file is closed:
    ENOSPC raised there must be 503 storage_full too, not a 500."""
    with _tiny_tmpfs(tmp_path / "full", "64k") as uploads, _served(tiny_model, uploads) as server:
        filler = uploads / "filler"
        with filler.open("wb", buffering=0) as f:  # fill every block; an empty file still fits
            with pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 4096)
        response, _ = _post(server, random.Random(0).randbytes(2000))
        assert response.status_code == 503 and response.json()["error"] == "storage_full", response.text
        assert [p.name for p in uploads.iterdir()] == ["filler"]
        filler.unlink()
        small, _ = _post(server, random.Random(0).randbytes(2000))
        assert small.status_code == 415 and small.json()["error"] == "not_media", small.text
