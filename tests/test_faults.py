"""Faults through a real `foalnet serve`: ffmpeg/ffprobe that hang or crash, resource limits on
them, and a full temporary directory. Each answer is typed, the server keeps serving, and no
temporary file survives. (An inference failure answering 503 and dropping readiness until the
engine recovers is tested in-process: tests/test_app.py::test_inference_failure_is_503_and_readiness_recovers.)
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from service import media
from service.errors import ErrorCode
from service.media import FFMPEG_MAX_MEMORY, ffmpeg_exe, ffprobe_exe
from tests.media import make_clip
from tests.server import start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DECODE_TIMEOUT_S = 2.0

# A stand-in for ffmpeg/ffprobe that records its resource limits, then misbehaves when its input
# file ends with "hang-<name>" (a child sleeps; the shell waits on it) or "segv-<name>" (the
# process dies of SIGSEGV), and otherwise runs the real binary.
FAKE = """#!/bin/sh
echo "$(ulimit -t) $(ulimit -v)" > "{folder}/limits-{name}"
input=
for a in "$@"; do case "$a" in file:*) input="${{a#file:}}";; esac; done
mark=$(tail -c 16 "$input" 2>/dev/null)
case "$mark" in
  *hang-{name}) sleep 60 & echo $! > "{folder}/sleeper-{name}"; wait ;;
  *segv-{name}) kill -SEGV $$ ;;
esac
exec "{real}" "$@"
"""


def _fake(folder: Path, name: str, real: str) -> Path:
    path = folder / name
    path.write_text(FAKE.format(folder=folder, name=name, real=real))
    path.chmod(0o755)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("faults") / "talk.mp4", seconds=2)


def _post(server, data: bytes) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = httpx.post(
        server.url + "/predict", content=data, headers={"Content-Type": "video/mp4"}, timeout=60
    )
    return response, time.monotonic() - start


def test_hung_and_crashing_ffmpeg_are_killed_and_typed(lite_model, tmp_path, clip):
    real_ffprobe = ffprobe_exe() or shutil.which("ffprobe")  # the default static ffmpeg has none
    if real_ffprobe is None:
        pytest.skip("no ffprobe to stand in for")
    fakes = tmp_path / "bin"
    fakes.mkdir()
    env = {
        "FOALNET_FFPROBE": str(_fake(fakes, "ffprobe", real_ffprobe)),
        "FOALNET_FFMPEG": str(_fake(fakes, "ffmpeg", ffmpeg_exe())),
    }
    uploads = tmp_path / "uploads"
    server = start_server(lite_model, uploads, "--decode-timeout-s", str(DECODE_TIMEOUT_S), env=env)
    try:
        data = clip.read_bytes()
        for stage in ("ffprobe", "ffmpeg"):
            response, seconds = _post(server, data + f"hang-{stage}".encode())
            assert response.status_code == 422 and response.json()["error"] == "decode_timeout", response.text
            assert seconds < DECODE_TIMEOUT_S + 2
            sleeper = int((fakes / f"sleeper-{stage}").read_text())
            assert not _alive(sleeper), f"the hung {stage}'s child survived the kill"

            response, _ = _post(server, data + f"segv-{stage}".encode())
            assert response.status_code == 422 and response.json()["error"] == "corrupt_media", response.text
            assert "SIGSEGV" in response.json()["detail"]
            assert list(uploads.iterdir()) == []

        ok, _ = _post(server, data)
        assert ok.status_code == 200, ok.text
        assert httpx.get(server.url + "/readyz").status_code == 200
        for stage in ("ffprobe", "ffmpeg"):  # both ran under the limits
            cpu_s, memory_kb = (fakes / f"limits-{stage}").read_text().split()
            assert 1 <= int(cpu_s) <= 3 * DECODE_TIMEOUT_S
            assert int(memory_kb) * 1024 == FFMPEG_MAX_MEMORY
    finally:
        log = server.stop()
    assert server.process.returncode == 0, log
    assert list(uploads.iterdir()) == []


def test_full_temp_dir_is_storage_full(lite_model, tmp_path, clip):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tiny tmpfs needs root")
    uploads = tmp_path / "full"
    uploads.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(uploads)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        server = start_server(lite_model, uploads)
        try:
            data = clip.read_bytes()
            assert len(data) > 32 * 1024
            response, _ = _post(server, data)
            assert response.status_code == 503 and response.json()["error"] == "storage_full", response.text
            assert list(uploads.iterdir()) == []
            small, _ = _post(server, random.Random(0).randbytes(8 * 1024))  # fits: the service still works
            assert small.status_code == 415 and small.json()["error"] == "not_media", small.text
            assert httpx.get(server.url + "/readyz").status_code == 200
            assert list(uploads.iterdir()) == []
        finally:
            log = server.stop()
        assert server.process.returncode == 0, log
    finally:
        subprocess.run(["umount", str(uploads)], check=True)


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
    assert media._failure(stderr, "decode", opened=True).code == code
