"""Running ffmpeg: which binaries, one process run under a timeout and resource limits, and what
its failures (stderr, or the libav error line PyAV attaches to an exception) mean as `ApiError`s.

Each ffmpeg/ffprobe runs in its own process group (a timeout kills the whole group, wrapper
scripts included) under `RLIMIT_CPU` and `RLIMIT_AS` limits (see `_limit_child`); every input is
opened through an explicit `file:` URL with the protocol and demuxer allow-lists of `media_limits`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import threading
from functools import cache

from service.errors import ApiError, ErrorCode
from service.media_limits import ALLOWED_DEMUXERS, ALLOWED_PROTOCOLS, CPU_PER_WALL_S, FFMPEG_MAX_MEMORY

# Binaries: these environment variables override the search (a pinned build, or fault injection).
FFMPEG_ENV = "FOALNET_FFMPEG"
FFPROBE_ENV = "FOALNET_FFPROBE"


@cache
def ffmpeg_exe() -> str:
    """$FOALNET_FFMPEG, else the static build bundled with imageio-ffmpeg, else the system ffmpeg.

    The static build comes first for speed: a distro ffmpeg links ~200 shared libraries and takes
    ~110 ms to start, the static one ~15 ms, and every upload starts ffmpeg twice (probe, decode)."""
    found = os.environ.get(FFMPEG_ENV)
    if found:
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):  # not installed, or its binary removed (the Docker image)
        return shutil.which("ffmpeg") or "ffmpeg"


@cache
def ffprobe_exe() -> str | None:
    """$FOALNET_FFPROBE; else None when ffmpeg is the bundled static build (imageio-ffmpeg ships no
    ffprobe, and one fast `ffmpeg -i` beats a slow-starting distro ffprobe); else the system ffprobe.
    With None, `probe` reads the same facts through PyAV."""
    if os.environ.get(FFPROBE_ENV):
        return os.environ[FFPROBE_ENV]
    if os.environ.get(FFMPEG_ENV) is None and _bundled_ffmpeg():
        return None
    return shutil.which("ffprobe")


def _bundled_ffmpeg() -> bool:
    return "imageio_ffmpeg" in ffmpeg_exe()


def file_url(path: str | os.PathLike[str]) -> str:
    """An explicit file: URL, so a name like `-x`, `http:...` or `concat:...` stays a local path."""
    return "file:" + os.path.abspath(os.fspath(path))


def input_options() -> dict[str, str]:
    return {"protocol_whitelist": ALLOWED_PROTOCOLS, "format_whitelist": ",".join(ALLOWED_DEMUXERS)}


STDERR_KEEP = 64 * 1024  # bytes of ffmpeg's stderr kept (a broken file can log per packet)


class _Reader(threading.Thread):
    """Drains one pipe so ffmpeg never blocks on a full pipe while we read another; with `keep`,
    only the last `keep` bytes are kept."""

    def __init__(self, stream, keep: int | None = None) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.keep = keep
        self.data = b""

    def run(self) -> None:
        with self.stream:
            if self.keep is None:
                self.data = self.stream.read()
                return
            while chunk := self.stream.read1(1 << 16):
                self.data = (self.data + chunk)[-self.keep :]


def _child_limits(cpu_s: int) -> list[tuple[int, tuple[int, int]]]:
    """The (resource, (soft, hard)) limits for one child, never above this process's hard limits
    (raising them would fail in a container that set lower ones)."""
    limits = []
    for res, soft, hard in (
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),  # soft: SIGXCPU; hard, a second later: SIGKILL
        (resource.RLIMIT_AS, FFMPEG_MAX_MEMORY, FFMPEG_MAX_MEMORY),
    ):
        ceiling = resource.getrlimit(res)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        limits.append((res, (soft, hard)))
    return limits


def _limit_child(limits: list[tuple[int, tuple[int, int]]]) -> None:
    """preexec_fn: runs in the forked child before exec. It only calls setrlimit (no imports, no
    locks taken), which is what keeps a preexec_fn safe in the service's multi-threaded process."""
    for res, values in limits:
        resource.setrlimit(res, values)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the child's whole process group: a wrapper script's own children hold our pipes too."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _signalled(rc: int, args: list[str], cpu_s: int) -> ApiError:
    """The error for a process killed by a signal: the CPU limit, or a crash on this input."""
    name = os.path.basename(args[0])
    sig = signal.Signals(-rc)
    if sig in (signal.SIGXCPU, signal.SIGKILL):  # the CPU limit (or the kernel's OOM killer)
        return ApiError(ErrorCode.DECODE_TIMEOUT, f"{name} was stopped at its CPU limit ({cpu_s} s)")
    return ApiError(ErrorCode.CORRUPT_MEDIA, f"{name} crashed ({sig.name}) on this file")


def run(args: list[str], timeout_s: float, *, extra_pipe: bool = False) -> tuple[int, bytes, bytes, str]:
    """Run a command with a timeout and resource limits, draining stdout, stderr and (with
    `extra_pipe`) one more pipe, whose fd number replaces `{EXTRA_FD}` in `args` (e.g.
    `pipe:{EXTRA_FD}`). Its process group is killed on timeout; death by a signal is an ApiError.

    Returns (returncode, stdout, extra, stderr)."""
    cpu_s = max(1, math.ceil(timeout_s * CPU_PER_WALL_S))
    limits = _child_limits(cpu_s)
    pass_fds: tuple[int, ...] = ()
    extra = []
    if extra_pipe:
        read_fd, write_fd = os.pipe()
        pass_fds = (write_fd,)
        extra = [os.fdopen(read_fd, "rb")]
        args = [a.replace("{EXTRA_FD}", str(write_fd)) for a in args]
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            start_new_session=True,
            preexec_fn=lambda: _limit_child(limits),  # noqa: PLW1509 - see _limit_child
        )
    except OSError as exc:  # a broken installation, not a bad upload
        for f in extra:
            f.close()
        raise ApiError(
            ErrorCode.INTERNAL_ERROR, f"could not start {os.path.basename(args[0])}: {exc}"
        ) from exc
    finally:
        for fd in pass_fds:
            os.close(fd)  # the child holds its own copy; ours must go so the reader sees EOF
    readers = [_Reader(proc.stdout), _Reader(proc.stderr, keep=STDERR_KEEP), *map(_Reader, extra)]
    for r in readers:
        r.start()
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.wait()
        for r in readers:
            r.join()
        raise ApiError(ErrorCode.DECODE_TIMEOUT, f"ffmpeg took longer than {timeout_s:.3g} s") from None
    for r in readers:
        r.join(timeout=1.0)
    if any(r.is_alive() for r in readers):  # a wrapper's leftover children still hold our pipes
        _kill_group(proc)
        for r in readers:
            r.join()
    if rc < 0:
        raise _signalled(rc, args, cpu_s)
    out, err = readers[0].data, readers[1].data
    extra = readers[2].data if extra_pipe else b""
    return rc, out, extra, err.decode("utf-8", "replace")


def stderr_tail(stderr: str, limit: int = 300) -> str:
    """The last lines of ffmpeg's message, without the server-side path or pointer noise."""
    text = " ".join(line.strip() for line in stderr.strip().splitlines()[-3:])
    text = re.sub(r"file:\S+?:", "input:", re.sub(r"\[[\w#,]+ @ 0x[0-9a-f]+\] ", "", text))
    return text[-limit:] or "no message"


# Lines ffmpeg prints for any input it cannot open; whatever else it says comes from a demuxer.
_GENERIC_LINE = re.compile(
    r"invalid data found when processing input|error opening input|at least one output file|"
    r"last message repeated|not detecting .* with non standard extension|^\s*$",
    re.IGNORECASE,
)


def failure(stderr: str, what: str, *, opened: bool = False) -> ApiError:
    """Turn ffmpeg/ffprobe stderr into the fitting error.

    When a demuxer complained about the content (`moov atom not found`, `EBML header parsing
    failed`), or the input had already been opened (`opened`), the file is damaged media; when
    ffmpeg only says it found no format, or the format is not on the whitelist (playlists,
    images, text), it is not media we accept."""
    low = stderr.lower()
    if "error while loading shared libraries" in low:  # not the upload's fault
        return ApiError(
            ErrorCode.INTERNAL_ERROR,
            f"{what}: ffmpeg could not load its libraries (FFMPEG_MAX_MEMORY too low?): {stderr_tail(stderr)}",
        )
    if "cannot allocate memory" in low or "get_buffer() failed" in low:  # RLIMIT_AS reached
        return ApiError(
            ErrorCode.TOO_LARGE, f"{what}: decoding this file needs more memory than the limit allows"
        )
    if re.search(r"decoder \(.*\) not found|no decoder found|unsupported codec", low):
        return ApiError(
            ErrorCode.UNSUPPORTED_CODEC, f"{what}: no decoder for a stream: {stderr_tail(stderr)}"
        )
    if "not on whitelist" in low:
        return ApiError(ErrorCode.NOT_MEDIA, f"{what}: this container type is not accepted")
    specific = "\n".join(line for line in stderr.splitlines() if not _GENERIC_LINE.search(line))
    if opened or specific:
        return ApiError(
            ErrorCode.CORRUPT_MEDIA, f"{what}: the file is damaged: {stderr_tail(specific or stderr)}"
        )
    return ApiError(ErrorCode.NOT_MEDIA, f"{what}: not an audio or video file")


@cache
def quiet_libav() -> None:
    """libav's error log is attached to the exceptions PyAV raises (what `failure` classifies); it
    must not also flood the service log with one line per damaged packet."""
    import av.logging

    av.logging.set_level(av.logging.ERROR)
    libav = logging.getLogger("libav")
    libav.addHandler(logging.NullHandler())
    libav.propagate = False


def libav_message(exc: Exception) -> str:
    """A PyAV exception as the stderr text ffmpeg would print for it (what `failure` reads)."""
    import av

    logged = getattr(exc, "log", None)
    text = f"{exc.strerror}\n" + (f"[{logged[1]} @ 0x0] {logged[2].strip()}" if logged else "")
    if isinstance(exc, av.error.MemoryError):  # RLIMIT_AS reached
        text += "\ncannot allocate memory"
    return text
