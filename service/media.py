"""Media decoding with ffmpeg: probe an upload, then decode 16 kHz mono audio and sampled frames.

Every preprocessing fact about media lives here as a module constant. All decoding shells out to
ffmpeg (commands built with ffmpeg-python, run with `subprocess` so each run has a timeout and is
killed on it). Uploads are untrusted, so every ffmpeg/ffprobe input is opened with:

- `-protocol_whitelist file,pipe` and a `file:` URL, so a path can never be read as a URL;
- `-format_whitelist` of ordinary audio/video containers, checked by libavformat right after
  detection and before the demuxer reads its header: an HLS playlist or ffconcat list pointing at
  `/etc/passwd` (or a URL) is refused without any of its references being opened;
- `-f <probed demuxer>` when decoding, so ffmpeg cannot re-detect the file as something else.

Each ffmpeg/ffprobe runs in its own process group (a timeout kills the whole group, wrapper
scripts included) under `RLIMIT_CPU` and `RLIMIT_AS` limits (see `_limit_child`).

Failures become `ApiError`s: NOT_MEDIA, CORRUPT_MEDIA, UNSUPPORTED_CODEC, NO_USABLE_STREAM,
TOO_LONG, TOO_LARGE, DECODE_TIMEOUT.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import cache

import ffmpeg
import numpy as np

from service.contract import SAMPLE_RATE, ModelSpec
from service.errors import ApiError, ErrorCode

# Limits (the service config may override them per deployment through DecodeLimits).
PROBE_TIMEOUT_S = 10.0  # seconds for ffprobe on one upload
DECODE_TIMEOUT_S = 60.0  # seconds for one whole decode (probe included) of audio + frames
MAX_DURATION_S = 600.0  # longer uploads are refused before decoding (and decoding is capped at it)
MAX_SIDE = 480  # decoded frames are scaled inside ffmpeg so their longer side is at most this
OVERRUN_MARGIN_S = 1.0  # decoding reads this far past max_duration_s to detect overlong clips
DECODE_THREADS = 2  # decoder threads per ffmpeg process; many requests decode at once
MAX_INPUT_PIXELS = 7680 * 4320  # larger declared frames (8K UHD) are refused before decoding
# Sanity bounds on declared metadata: outside them a value is ignored (duration, rotation) or the
# stream is not used as video (size). 65535 px is what most containers can even store.
MAX_SIDE_DECLARED = 65535
MAX_DURATION_DECLARED_S = 1e7
# Per ffmpeg/ffprobe process, set in the child before exec. The wall-clock timeout is the main
# limit; the CPU limit (timeout x CPU_PER_WALL_S, ffmpeg has several threads) is the backstop if
# the parent could not kill it. The address-space limit bounds what a hostile file can make it
# allocate: a 1080p decode maps about 0.5 GB (mostly shared libraries and thread stacks).
CPU_PER_WALL_S = DECODE_THREADS + 1
FFMPEG_MAX_MEMORY = 2 << 30  # bytes of virtual address space (RLIMIT_AS)
# Binaries: these environment variables override the search (a pinned build, or fault injection).
FFMPEG_ENV = "FOALNET_FFMPEG"
FFPROBE_ENV = "FOALNET_FFPROBE"

# Demuxers allowed to open an upload: ordinary single-file audio/video containers. Deliberately
# absent: hls/applehttp, dash, concat, image2 and *_pipe image demuxers, lavfi, tee, sdp, rtp,
# data, subtitles and every other demuxer that follows references or is not audio/video.
ALLOWED_DEMUXERS: tuple[str, ...] = (
    "mov",  # mov,mp4,m4a,3gp,3g2,mj2
    "matroska",  # matroska,webm
    "avi",
    "mpegts",
    "mpeg",  # MPEG-PS (.mpg, .vob)
    "flv",
    "asf",  # .wmv, .wma
    "ogg",
    "wav",
    "w64",
    "aiff",
    "flac",
    "mp3",
    "aac",  # ADTS
    "amr",
    "caf",
    "au",
)
ALLOWED_PROTOCOLS = "file,pipe"

_FFMPEG_FLAGS = ("-nostdin", "-hide_banner", "-loglevel", "error")
_FFPROBE_FLAGS = ("-hide_banner", "-loglevel", "error")
_RAW_AUDIO = {"format": "f32le", "acodec": "pcm_f32le", "ac": 1}


@dataclass(frozen=True)
class Probe:
    """What ffprobe says about an upload. width/height are the display size (after rotation)."""

    format_name: str
    duration_s: float | None
    has_audio: bool
    has_video: bool
    width: int | None
    height: int | None
    rotation: int  # clockwise display rotation in degrees: 0, 90, 180 or 270
    video_codec: str | None
    audio_codec: str | None
    n_streams: int
    video_stream: int | None = None  # absolute stream index decoded as video
    audio_stream: int | None = None  # absolute stream index decoded as audio

    @property
    def demuxer(self) -> str:
        """The allowed demuxer name to force with `-f` (first matching alias of format_name)."""
        for name in self.format_name.split(","):
            if name in ALLOWED_DEMUXERS:
                return name
        raise ApiError(ErrorCode.NOT_MEDIA, f"container {self.format_name!r} is not accepted")


@dataclass(frozen=True)
class DecodeLimits:
    timeout_s: float = DECODE_TIMEOUT_S
    max_duration_s: float = MAX_DURATION_S
    max_side: int = MAX_SIDE
    threads: int = DECODE_THREADS  # decoder threads per ffmpeg (the service: cpu.thread_plan)


DEFAULT_LIMITS = DecodeLimits()


@dataclass
class Media:
    """A decoded clip: audio (None without an audio stream) and frames sampled at `fps`."""

    audio: np.ndarray | None  # float32 [S] at SAMPLE_RATE, mono, in [-1, 1]
    frames: np.ndarray | None  # uint8 [N, H, W, C], C = 1 (gray) or 3 (RGB); read-only view
    frame_times: np.ndarray  # float64 [N], seconds from the start of the clip
    fps: float
    duration_s: float
    probe: Probe


# --- binaries ---------------------------------------------------------------------------------


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
    With None, `probe` reads the same facts through PyAV (`_probe_pyav`)."""
    if os.environ.get(FFPROBE_ENV):
        return os.environ[FFPROBE_ENV]
    if os.environ.get(FFMPEG_ENV) is None and _bundled_ffmpeg():
        return None
    return shutil.which("ffprobe")


def _bundled_ffmpeg() -> bool:
    return "imageio_ffmpeg" in ffmpeg_exe()


def _url(path: str | os.PathLike[str]) -> str:
    """An explicit file: URL, so a name like `-x`, `http:...` or `concat:...` stays a local path."""
    return "file:" + os.path.abspath(os.fspath(path))


def _input_options() -> dict[str, str]:
    return {"protocol_whitelist": ALLOWED_PROTOCOLS, "format_whitelist": ",".join(ALLOWED_DEMUXERS)}


# --- running ffmpeg ---------------------------------------------------------------------------


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


_running: set[subprocess.Popen] = set()  # every ffmpeg/ffprobe this process is waiting on
_running_lock = threading.Lock()


def stop_all() -> int:
    """Kill every ffmpeg/ffprobe still running (shutdown: the threads waiting on them then end
    at once instead of keeping the process alive until their timeouts). Returns how many."""
    with _running_lock:
        procs = list(_running)
    for proc in procs:
        _kill_group(proc)
    return len(procs)


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


def _run(args: list[str], timeout_s: float, *, extra_pipe: bool = False) -> tuple[int, bytes, bytes, str]:
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
    with _running_lock:
        _running.add(proc)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.wait()
        for r in readers:
            r.join()
        raise ApiError(ErrorCode.DECODE_TIMEOUT, f"ffmpeg took longer than {timeout_s:.3g} s") from None
    finally:
        with _running_lock:
            _running.discard(proc)
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


def _stderr_tail(stderr: str, limit: int = 300) -> str:
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


def _failure(stderr: str, what: str, *, opened: bool = False) -> ApiError:
    """Turn ffmpeg/ffprobe stderr into the fitting error.

    When a demuxer complained about the content (`moov atom not found`, `EBML header parsing
    failed`), or the input had already been opened (`opened`), the file is damaged media; when
    ffmpeg only says it found no format, or the format is not on the whitelist (playlists,
    images, text), it is not media we accept."""
    low = stderr.lower()
    if "error while loading shared libraries" in low:  # not the upload's fault
        return ApiError(
            ErrorCode.INTERNAL_ERROR,
            f"{what}: ffmpeg could not load its libraries (FFMPEG_MAX_MEMORY too low?): {_stderr_tail(stderr)}",
        )
    if "cannot allocate memory" in low or "get_buffer() failed" in low:  # RLIMIT_AS reached
        return ApiError(
            ErrorCode.TOO_LARGE, f"{what}: decoding this file needs more memory than the limit allows"
        )
    if re.search(r"decoder \(.*\) not found|no decoder found|unsupported codec", low):
        return ApiError(
            ErrorCode.UNSUPPORTED_CODEC, f"{what}: no decoder for a stream: {_stderr_tail(stderr)}"
        )
    if "not on whitelist" in low:
        return ApiError(ErrorCode.NOT_MEDIA, f"{what}: this container type is not accepted")
    specific = "\n".join(line for line in stderr.splitlines() if not _GENERIC_LINE.search(line))
    if opened or specific:
        return ApiError(
            ErrorCode.CORRUPT_MEDIA, f"{what}: the file is damaged: {_stderr_tail(specific or stderr)}"
        )
    return ApiError(ErrorCode.NOT_MEDIA, f"{what}: not an audio or video file")


# --- probe ------------------------------------------------------------------------------------


def probe(path: str | os.PathLike[str], *, timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    """Describe an upload, refusing anything that is not an accepted audio/video container.

    Uses ffprobe's JSON when ffprobe is installed; otherwise PyAV's structured values (same
    facts, same whitelists), so the imageio-ffmpeg binary alone works. Never ffmpeg's banner."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise ApiError(ErrorCode.NOT_MEDIA, f"probe: cannot read the file ({exc.strerror})") from exc
    if size == 0:
        raise ApiError(ErrorCode.NOT_MEDIA, "probe: the file is empty")
    result, err = _probe_url(_url(path), timeout_s)
    if result is None:
        failure = _failure(err, "probe")
        if failure.code == ErrorCode.CORRUPT_MEDIA and os.path.splitext(path)[1]:
            failure = _recheck_by_content(path, failure, timeout_s)
        raise failure
    result.demuxer  # noqa: B018 - raises NOT_MEDIA for a format outside the allow-list
    if not result.has_audio and not result.has_video:
        raise ApiError(ErrorCode.NO_USABLE_STREAM, "the file has neither an audio nor a video stream")
    if result.width and result.height and result.width * result.height > MAX_INPUT_PIXELS:
        raise ApiError(
            ErrorCode.TOO_LARGE,
            f"the video is {result.width}x{result.height}; at most {MAX_INPUT_PIXELS / 1e6:.1f} "
            "megapixels per frame are accepted",
        )
    return result


def _probe_url(url: str, timeout_s: float) -> tuple[Probe | None, str]:
    """(Probe, "") on success, (None, stderr) when ffprobe / ffmpeg cannot open the input."""
    whitelist = [arg for k, v in _input_options().items() for arg in (f"-{k}", v)]
    exe = ffprobe_exe()
    if exe is not None:
        args = [exe, *_FFPROBE_FLAGS, *whitelist, "-of", "json", "-show_format", "-show_streams", url]
        rc, out, _, err = _run(args, timeout_s)
        if rc != 0:
            return None, err
        try:
            info = json.loads(out or b"{}")
        except ValueError:
            return None, "ffprobe printed no valid JSON for this file"
        return _probe_from_json(info if isinstance(info, dict) else {}), ""
    return _probe_pyav(url, timeout_s)


def _recheck_by_content(path: str | os.PathLike[str], failure: ApiError, timeout_s: float) -> ApiError:
    """ffmpeg falls back on the file extension, so random bytes named `.mp4` fail in the mov
    demuxer as if damaged. Probe the head of the file under a name without extension: if no
    demuxer recognises the content itself, it is not media."""
    # Next to the upload (the service's temp dir, which it watches), else in the system's.
    folder: str | None = os.path.dirname(os.path.abspath(path))
    if not os.access(folder, os.W_OK):
        folder = None
    try:
        with open(path, "rb") as src, tempfile.TemporaryDirectory(prefix="foalnet-probe-", dir=folder) as tmp:
            head = os.path.join(tmp, "head")
            with open(head, "wb") as dst:
                dst.write(src.read(1 << 20))
            result, err = _probe_url(_url(head), timeout_s)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ApiError(ErrorCode.STORAGE_FULL, "no space left for a temporary file") from exc
        raise
    if result is None and _failure(err, "probe").code == ErrorCode.NOT_MEDIA:
        return ApiError(ErrorCode.NOT_MEDIA, "probe: not an audio or video file")
    return failure


def _clockwise(counterclockwise_deg: float) -> int:
    """ffmpeg reports the display matrix as a counterclockwise angle; keep 0/90/180/270 clockwise.
    Like ffmpeg's autorotation, an angle more than 1 degree off a quarter turn is ignored (0)."""
    quarters = round(-counterclockwise_deg / 90.0)
    return quarters % 4 * 90 if abs(-counterclockwise_deg - quarters * 90) <= 1.0 else 0


def _display_size(width: int, height: int, sar: str | None, rotation: int) -> tuple[int, int]:
    """Size a player shows: non-square pixels stretched, then rotated (ffmpeg autorotates)."""
    m = re.fullmatch(r"(\d+):(\d+)", sar or "")
    if m and int(m[1]) > 0 and int(m[2]) > 0 and m[1] != m[2]:
        width = max(1, round(width * int(m[1]) / int(m[2])))
    return (height, width) if rotation % 180 == 90 else (width, height)


def _number(value: object, low: float, high: float) -> float | None:
    """A metadata number, or None unless it is finite and in [low, high]: file metadata is
    untrusted data (`rotate=nan`, a duration of 1e300) and is ignored rather than believed."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and low <= number <= high else None


def _probe_from_json(info: dict) -> Probe:
    """A `Probe` from ffprobe's JSON (or `_probe_pyav`'s dict of the same shape), every number
    checked: a stream whose size is not a sane positive integer is not used as video, an
    unreadable rotation or duration is ignored."""
    fmt = info.get("format") or {}
    streams = [st for st in info.get("streams") or [] if isinstance(st, dict)]
    video = audio = None
    unknown_codec = []
    for st in streams:
        kind = st.get("codec_type")
        if kind not in ("audio", "video") or (st.get("disposition") or {}).get("attached_pic"):
            continue  # subtitles, data, cover art
        if _number(st.get("index"), 0, 1 << 20) is None:
            continue
        if not st.get("codec_name") or st.get("codec_name") == "none":
            unknown_codec.append(kind)
            continue
        sized = all(_number(st.get(k), 1, MAX_SIDE_DECLARED) for k in ("width", "height"))
        if kind == "video" and video is None and sized:
            video = st
        elif kind == "audio" and audio is None:
            audio = st
    if video is None and audio is None and unknown_codec:
        raise ApiError(
            ErrorCode.UNSUPPORTED_CODEC, f"no known codec for the {', '.join(unknown_codec)} stream(s)"
        )
    rotation, width, height = 0, None, None
    if video is not None:
        side = [sd for sd in video.get("side_data_list") or [] if isinstance(sd, dict)]
        angle = next((_number(sd["rotation"], -360, 360) for sd in side if "rotation" in sd), None)
        if angle is None:  # old-style tag, clockwise
            tag = _number((video.get("tags") or {}).get("rotate"), -360, 360)
            angle = None if tag is None else -tag
        rotation = _clockwise(angle or 0.0)
        width, height = _display_size(
            int(video["width"]), int(video["height"]), video.get("sample_aspect_ratio"), rotation
        )
    return Probe(
        format_name=str(fmt.get("format_name") or ""),
        duration_s=_number(fmt.get("duration"), 0, MAX_DURATION_DECLARED_S),
        has_audio=audio is not None,
        has_video=video is not None,
        width=width,
        height=height,
        rotation=rotation,
        video_codec=video.get("codec_name") if video else None,
        audio_codec=audio.get("codec_name") if audio else None,
        n_streams=len(streams),
        video_stream=int(video["index"]) if video else None,
        audio_stream=int(audio["index"]) if audio else None,
    )


@cache
def _pyav():
    """PyAV, imported on first use, with libav's error line attached to the exceptions it raises
    (what `_failure` classifies) and kept out of the service log."""
    import av
    import av.logging

    av.logging.set_level(av.logging.ERROR)
    libav = logging.getLogger("libav")
    libav.addHandler(logging.NullHandler())
    libav.propagate = False
    return av


def _probe_pyav(url: str, timeout_s: float) -> tuple[Probe | None, str]:
    """The facts ffprobe's JSON gives, read as values from libavformat through PyAV (same
    whitelists), never from ffmpeg's human-readable banner, where a title tag reading
    `Duration: 00:00:01.00` would pass for the clip's length. The rotation is the display matrix
    of the first video frame (PyAV has no stream side data). (None, error text) when it cannot
    be opened."""
    av = _pyav()
    try:
        container = av.open(url, options=_input_options(), timeout=timeout_s, metadata_errors="replace")
    except av.FFmpegError as exc:
        logged = getattr(exc, "log", None)
        return None, f"{exc.strerror}\n" + (f"[{logged[1]} @ 0x0] {logged[2].strip()}" if logged else "")
    with container:
        streams: list[dict] = []
        for st in container.streams:
            codec = st.codec_context
            info: dict = {"index": st.index, "codec_type": st.type, "codec_name": codec and codec.name}
            if st.disposition & av.stream.Disposition.attached_pic:
                info["disposition"] = {"attached_pic": 1}
            if st.type == "video" and codec is not None:
                info |= {"width": codec.width, "height": codec.height}
                sar = st.sample_aspect_ratio
                info["sample_aspect_ratio"] = f"{sar.numerator}:{sar.denominator}" if sar else None
            streams.append(info)
        video = next((i for i in streams if i.get("width") and "disposition" not in i), None)
        if video is not None and video["width"] * video["height"] <= MAX_INPUT_PIXELS:
            try:
                frame = next(container.decode(container.streams[video["index"]]), None)
            except (av.FFmpegError, StopIteration):
                frame = None
            if frame is not None:
                video["side_data_list"] = [{"rotation": frame.rotation}]
        duration = None if container.duration is None else container.duration / av.time_base
        fmt = {"format_name": container.format.name, "duration": duration}
        return _probe_from_json({"format": fmt, "streams": streams}), ""


# --- decode -----------------------------------------------------------------------------------


def _checked_probe(
    path: str | os.PathLike[str], max_duration_s: float | None, timeout_s: float
) -> tuple[Probe, float]:
    """Probe and check the length; returns the probe and the seconds left of `timeout_s`."""
    start = time.monotonic()
    info = probe(path, timeout_s=min(timeout_s, PROBE_TIMEOUT_S))
    if max_duration_s is not None and info.duration_s is not None and info.duration_s > max_duration_s:
        raise ApiError(
            ErrorCode.TOO_LONG, f"the clip lasts {info.duration_s:.1f} s; the limit is {max_duration_s:g} s"
        )
    left = timeout_s - (time.monotonic() - start)
    if left <= 0:
        raise ApiError(ErrorCode.DECODE_TIMEOUT, f"decoding took longer than {timeout_s:g} s")
    return info, left


def _input(
    path: str | os.PathLike[str], info: Probe, max_duration_s: float | None, threads: int = DECODE_THREADS
):
    opts = {"f": info.demuxer, "threads": threads, **_input_options()}
    if max_duration_s is not None:
        # A file whose header lies about (or lacks) its length still stops here; the margin lets
        # `decode` tell a clip that runs past the limit from one that ends at it.
        opts["t"] = max_duration_s + OVERRUN_MARGIN_S
    return ffmpeg.input(_url(path), **opts)


def _to_audio(raw: bytes) -> np.ndarray:
    audio = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return np.clip(audio, -1.0, 1.0, out=audio)


def decode_audio(
    path: str | os.PathLike[str],
    *,
    sample_rate: int = SAMPLE_RATE,
    timeout_s: float = DECODE_TIMEOUT_S,
    max_duration_s: float | None = None,
) -> np.ndarray:
    """The first audio stream as float32 mono in [-1, 1] at `sample_rate` (training and serving)."""
    info, left_s = _checked_probe(path, max_duration_s, timeout_s)
    if not info.has_audio:
        raise ApiError(ErrorCode.NO_USABLE_STREAM, "the file has no audio stream")
    out = _input(path, info, max_duration_s)[str(info.audio_stream)].output(
        "pipe:1", ar=sample_rate, **_RAW_AUDIO
    )
    rc, raw, _, err = _run(out.global_args(*_FFMPEG_FLAGS).compile(cmd=ffmpeg_exe()), left_s)
    if rc != 0:
        raise _failure(err, "audio decode", opened=True)
    audio = _to_audio(raw)
    if max_duration_s is not None and audio.size > (max_duration_s + OVERRUN_MARGIN_S / 2) * sample_rate:
        raise ApiError(ErrorCode.TOO_LONG, f"the clip runs past the limit of {max_duration_s:g} s")
    return audio


def frame_size(info: Probe, max_side: int) -> tuple[int, int]:
    """(width, height) of decoded frames: display aspect kept, longer side <= max_side, even."""
    assert info.width and info.height
    scale = min(1.0, max_side / max(info.width, info.height))
    return max(2, round(info.width * scale / 2) * 2), max(2, round(info.height * scale / 2) * 2)


def decode(path: str | os.PathLike[str], spec: ModelSpec, limits: DecodeLimits = DEFAULT_LIMITS) -> Media:
    """Decode audio (16 kHz mono) and frames sampled at `spec.frames_fps` in ONE ffmpeg run.

    Frames come out of stdout as raw gray/RGB at `frame_size`, audio out of a second pipe; both are
    drained concurrently. ffmpeg autorotates, so frames are upright at the probed display size."""
    info, left_s = _checked_probe(path, limits.max_duration_s, limits.timeout_s)
    inp = _input(path, info, limits.max_duration_s, limits.threads)
    outputs = []
    width = height = 0
    channels = spec.channels
    if info.has_video:
        width, height = frame_size(info, limits.max_side)
        video = (
            inp[str(info.video_stream)]
            .filter("fps", fps=spec.frames_fps)
            .filter("scale", width, height, flags="area")
            .filter("setsar", 1)
        )
        pix_fmt = "gray" if channels == 1 else "rgb24"
        # threads=1: the rawvideo "encoder" copies bytes; its default frame threads (one per core)
        # would each reserve a stack for nothing.
        outputs.append(video.output("pipe:1", format="rawvideo", pix_fmt=pix_fmt, threads=1))
    if info.has_audio:
        outputs.append(
            inp[str(info.audio_stream)].output("pipe:{EXTRA_FD}", ar=spec.sample_rate, **_RAW_AUDIO)
        )
    graph = ffmpeg.merge_outputs(*outputs).global_args(*_FFMPEG_FLAGS, "-filter_threads", "1")
    args = graph.compile(cmd=ffmpeg_exe())
    rc, raw_video, raw_audio, err = _run(args, left_s, extra_pipe=info.has_audio)
    if rc != 0:
        raise _failure(err, "decode", opened=True)

    audio = _to_audio(raw_audio) if info.has_audio else None
    frames = None
    n = 0
    if info.has_video:
        per_frame = width * height * channels
        n = len(raw_video) // per_frame
        frames = np.frombuffer(raw_video[: n * per_frame], dtype=np.uint8).reshape(n, height, width, channels)
    if (audio is None or audio.size == 0) and n == 0:
        raise ApiError(ErrorCode.CORRUPT_MEDIA, f"nothing could be decoded: {_stderr_tail(err)}")
    decoded_s = max(n / spec.frames_fps, 0.0 if audio is None else audio.size / spec.sample_rate)
    if decoded_s > limits.max_duration_s + OVERRUN_MARGIN_S / 2:  # the header did not say (or lied)
        raise ApiError(ErrorCode.TOO_LONG, f"the clip runs past the limit of {limits.max_duration_s:g} s")
    # The header's length, unless less was decodable (a truncated file).
    duration = decoded_s if info.duration_s is None else min(info.duration_s, decoded_s)
    return Media(
        audio=audio,
        frames=frames,
        frame_times=np.arange(n, dtype=np.float64) / spec.frames_fps,
        fps=spec.frames_fps,
        duration_s=float(duration),
        probe=info,
    )
