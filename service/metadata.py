"""Probe an upload: what it holds (container, streams, codecs, display size and rotation,
duration), read from ffprobe's JSON or, without ffprobe, from PyAV's structured values; never from
ffmpeg's human-readable banner. File metadata is untrusted: every number is checked, and anything
outside the accepted containers and sizes is refused.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass

from service.errors import ApiError, ErrorCode
from service.ffmpeg_run import (
    failure,
    ffprobe_exe,
    file_url,
    input_options,
    libav_message,
    quiet_libav,
    run,
)
from service.media_limits import (
    ALLOWED_DEMUXERS,
    MAX_DURATION_DECLARED_S,
    MAX_INPUT_PIXELS,
    MAX_SIDE_DECLARED,
    PROBE_TIMEOUT_S,
)

_FFPROBE_FLAGS = ("-hide_banner", "-loglevel", "error")


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
    result, err = _probe_url(file_url(path), timeout_s)
    if result is None:
        error = failure(err, "probe")
        if error.code == ErrorCode.CORRUPT_MEDIA and os.path.splitext(path)[1]:
            error = _recheck_by_content(path, error, timeout_s)
        raise error
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
    whitelist = [arg for k, v in input_options().items() for arg in (f"-{k}", v)]
    exe = ffprobe_exe()
    if exe is not None:
        args = [exe, *_FFPROBE_FLAGS, *whitelist, "-of", "json", "-show_format", "-show_streams", url]
        rc, out, _, err = run(args, timeout_s)
        if rc != 0:
            return None, err
        try:
            info = json.loads(out or b"{}")
        except ValueError:
            return None, "ffprobe printed no valid JSON for this file"
        return probe_from_json(info if isinstance(info, dict) else {}), ""
    return _probe_pyav(url, timeout_s)


def _recheck_by_content(path: str | os.PathLike[str], error: ApiError, timeout_s: float) -> ApiError:
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
            result, err = _probe_url(file_url(head), timeout_s)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ApiError(ErrorCode.STORAGE_FULL, "no space left for a temporary file") from exc
        raise
    if result is None and failure(err, "probe").code == ErrorCode.NOT_MEDIA:
        return ApiError(ErrorCode.NOT_MEDIA, "probe: not an audio or video file")
    return error


def clockwise(counterclockwise_deg: float) -> int:
    """ffmpeg reports the display matrix as a counterclockwise angle; keep 0/90/180/270 clockwise.
    Like ffmpeg's autorotation, an angle more than 1 degree off a quarter turn is ignored (0)."""
    quarters = round(-counterclockwise_deg / 90.0)
    return quarters % 4 * 90 if abs(-counterclockwise_deg - quarters * 90) <= 1.0 else 0


def display_size(width: int, height: int, sar: str | None, rotation: int) -> tuple[int, int]:
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


def probe_from_json(info: dict) -> Probe:
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
        rotation = clockwise(angle or 0.0)
        width, height = display_size(
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


def _probe_pyav(url: str, timeout_s: float) -> tuple[Probe | None, str]:
    """The facts ffprobe's JSON gives, read as values from libavformat through PyAV (same
    whitelists), never from ffmpeg's human-readable banner, where a title tag reading
    `Duration: 00:00:01.00` would pass for the clip's length. The rotation is the display matrix
    of the first video frame (PyAV has no stream side data). (None, error text) when it cannot
    be opened."""
    import av

    quiet_libav()
    try:
        container = av.open(url, options=input_options(), timeout=timeout_s, metadata_errors="replace")
    except av.FFmpegError as exc:
        return None, libav_message(exc)
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
        return probe_from_json({"format": fmt, "streams": streams}), ""


def frame_size(info: Probe, max_side: int) -> tuple[int, int]:
    """(width, height) of decoded frames: display aspect kept, longer side <= max_side, even."""
    assert info.width and info.height
    scale = min(1.0, max_side / max(info.width, info.height))
    return max(2, round(info.width * scale / 2) * 2), max(2, round(info.height * scale / 2) * 2)
