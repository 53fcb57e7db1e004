"""In-process decoding with PyAV: one upload as 16 kHz mono audio chunks and upright frames sampled
at the model's rate, scaled and converted by libswscale, one item at a time (memory stays flat).

The security posture is the ffmpeg path's (media.py), and so are its allow-list (media_limits) and
error classification (ffmpeg_run):
- libavformat reads the upload through a Python file object without a name: no protocol is ever
  used and the format is detected from the content alone (no guessing from the extension);
- `format_whitelist` (ALLOWED_DEMUXERS) refuses playlists, concat lists, images and every
  other demuxer right after detection, and `io_open` refuses any nested open a demuxer attempts;
- the frame size and the container's duration are checked before decoding; decoding stops just
  past `max_duration_s`, and past the caller's wall-clock deadline.
Hard limits (address space, CPU time, a kill on timeout, a crash) are decode_pool.py's workers'.

Metadata is PyAV's structured values, never text: the duration from the container, the size and
sample aspect ratio from the codec, the rotation from the display matrix of the first frame.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from fractions import Fraction

import av
import numpy as np

from service.contract import ModelSpec
from service.errors import ApiError, ErrorCode
from service.ffmpeg_run import failure, libav_message, quiet_libav
from service.media_limits import (
    ALLOWED_DEMUXERS,
    DEFAULT_LIMITS,
    MAX_DURATION_DECLARED_S,
    MAX_INPUT_PIXELS,
    OVERRUN_MARGIN_S,
    DecodeLimits,
)
from service.metadata import Probe, clockwise, display_size, frame_size

quiet_libav()

MAX_BAD_PACKETS = 1000  # packets a decoder may refuse before the file counts as damaged
# Resampled audio comes out in chunks this long: fewer, larger chunks cost less Python per second
# of audio (an AAC frame is 21 ms) and delay a window by no more than this.
AUDIO_CHUNK_S = 0.25


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # float32 [n], 16 kHz mono in [-1, 1], following the previous chunk


@dataclass(frozen=True)
class Frame:
    time_s: float  # the sampling instant, k / spec.frames_fps
    image: np.ndarray  # uint8 [H, W, C], upright, C = spec.channels


class _Unnamed(io.RawIOBase):
    """The upload as a file object with no name, so libavformat cannot guess from an extension."""

    def __init__(self, raw: io.BufferedReader) -> None:
        self._raw = raw

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._raw.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


def _refuse(url: str, flags: int, options: dict) -> None:
    raise PermissionError(f"this upload may not open other resources ({url!r})")


def _error(exc: av.FFmpegError, what: str, *, opened: bool) -> ApiError:
    """The one classification (ffmpeg_run.failure), fed the libav error line of the exception."""
    return failure(libav_message(exc), what, opened=opened)


def _finite(value: float | None, low: float, high: float) -> float | None:
    return value if value is not None and math.isfinite(value) and low <= value <= high else None


class Clip:
    """An opened upload: `probe` (final once iteration ended), then `Audio` and `Frame` items.

        with Clip(path, spec, limits) as clip:
            for item in clip: ...
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        spec: ModelSpec,
        limits: DecodeLimits = DEFAULT_LIMITS,
        *,
        deadline: float | None = None,
    ) -> None:
        self.spec, self.limits = spec, limits
        self.deadline = deadline if deadline is not None else time.monotonic() + limits.timeout_s
        if os.path.getsize(path) == 0:
            raise ApiError(ErrorCode.NOT_MEDIA, "probe: the file is empty")
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            self.container = av.open(
                _Unnamed(self._file),
                options={"format_whitelist": ",".join(ALLOWED_DEMUXERS)},
                io_open=_refuse,
                metadata_errors="replace",
            )
        except av.FFmpegError as exc:
            self._file.close()
            raise _error(exc, "probe", opened=False) from None
        try:
            self.probe = self._probe()
        except BaseException:
            self.close()
            raise
        self.audio_samples = 0
        self.frames = 0
        self.video_s = 0.0  # end of the last decoded video frame, seconds from the start

    def __enter__(self) -> Clip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.container.close()
        self._file.close()

    @property
    def decoded_s(self) -> float:
        return max(self.audio_samples / self.spec.sample_rate, self.frames / self.spec.frames_fps)

    # --- metadata ------------------------------------------------------------------------------

    def _probe(self) -> Probe:
        video = audio = None
        unknown = []
        for stream in self.container.streams:
            cover_art = stream.disposition & av.stream.Disposition.attached_pic
            if stream.type not in ("audio", "video") or cover_art:
                continue  # subtitles, data, cover art
            if stream.codec_context is None:
                unknown.append(stream.type)
            elif stream.type == "video" and video is None and stream.codec_context.width > 0:
                video = stream
            elif stream.type == "audio" and audio is None:
                audio = stream
        if video is None and audio is None:
            if unknown:
                kinds = ", ".join(unknown)
                raise ApiError(ErrorCode.UNSUPPORTED_CODEC, f"no known codec for the {kinds} stream(s)")
            raise ApiError(ErrorCode.NO_USABLE_STREAM, "the file has neither an audio nor a video stream")
        width = height = None
        if video is not None:
            width, height = video.codec_context.width, video.codec_context.height
            if width * height > MAX_INPUT_PIXELS:
                raise ApiError(
                    ErrorCode.TOO_LARGE,
                    f"the video is {width}x{height}; at most {MAX_INPUT_PIXELS / 1e6:.1f} "
                    "megapixels per frame are accepted",
                )
            for s in (video, audio):
                if s is not None:
                    s.codec_context.thread_count = self.limits.threads  # cpu.thread_plan's share
        raw = self.container.duration
        duration = _finite(raw / av.time_base if raw is not None else None, 0.0, MAX_DURATION_DECLARED_S)
        max_s = self.limits.max_duration_s
        if max_s is not None and duration is not None and duration > max_s:
            raise ApiError(ErrorCode.TOO_LONG, f"the clip lasts {duration:.1f} s; the limit is {max_s:g} s")
        self._video, self._audio = video, audio
        return Probe(
            format_name=self.container.format.name,
            duration_s=duration,
            has_audio=audio is not None,
            has_video=video is not None,
            width=width,
            height=height,
            rotation=0,  # read from the first frame's display matrix (PyAV has no stream side data)
            video_codec=video.codec_context.name if video is not None else None,
            audio_codec=audio.codec_context.name if audio is not None else None,
            n_streams=len(self.container.streams),
            video_stream=video.index if video is not None else None,
            audio_stream=audio.index if audio is not None else None,
        )

    def _orient(self, frame: av.VideoFrame) -> None:
        """Fix rotation and display size from the first video frame."""
        rotation = clockwise(_finite(frame.rotation, -360.0, 360.0) or 0.0)
        sar = self._video.sample_aspect_ratio
        sar_text = f"{sar.numerator}:{sar.denominator}" if isinstance(sar, Fraction) and sar > 0 else None
        width, height = display_size(frame.width, frame.height, sar_text, rotation)
        self.probe = replace(self.probe, rotation=rotation, width=width, height=height)
        self._out = frame_size(self.probe, self.limits.max_side)

    def _convert(self, frame: av.VideoFrame) -> np.ndarray:
        """libswscale scales and converts to the model's colour; numpy turns it upright."""
        width, height = self._out
        quarter = self.probe.rotation // 90
        sw, sh = (height, width) if quarter % 2 else (width, height)
        fmt = "gray" if self.spec.channels == 1 else "rgb24"
        image = frame.reformat(width=sw, height=sh, format=fmt, interpolation="AREA").to_ndarray()
        if quarter:
            image = np.rot90(image, k=-quarter)  # clockwise
        return np.ascontiguousarray(image).reshape(height, width, self.spec.channels)

    # --- decoding ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Audio | Frame]:
        streams = [s for s in (self._video, self._audio) if s is not None]
        rate = self.spec.sample_rate
        chunk = round(rate * AUDIO_CHUNK_S)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate, frame_size=chunk)
        fps = self.spec.frames_fps
        origin = (self.container.start_time or 0) / av.time_base
        pending: av.VideoFrame | None = None  # the latest frame, converted only if a slot takes it
        bad = 0
        try:
            for packet in self.container.demux(streams):
                self._check_time()
                try:
                    decoded = packet.decode()
                except av.error.InvalidDataError:  # a damaged packet: skip it, as ffmpeg does
                    bad += 1
                    if bad > MAX_BAD_PACKETS:
                        raise
                    continue
                for frame in decoded:
                    if isinstance(frame, av.AudioFrame):
                        for out in resampler.resample(frame):
                            yield self._audio_chunk(out)
                        continue
                    if pending is None and self.frames == 0:
                        self._orient(frame)
                    t = frame.time - origin if frame.time is not None else self.video_s
                    yield from self._slots(pending, until=math.floor(t * fps + 0.5))
                    pending = frame
                    step = frame.duration * frame.time_base if frame.duration and frame.time_base else 0
                    self.video_s = max(self.video_s, t + float(step or 1 / fps))
                self._check_length()
            if self._audio is not None:
                for out in resampler.resample(None):
                    yield self._audio_chunk(out)
            yield from self._slots(pending, until=math.floor(self.video_s * fps + 0.5))
            self._check_length()
        except av.FFmpegError as exc:
            raise _error(exc, "decode", opened=True) from None
        if self.audio_samples == 0 and self.frames == 0:
            raise ApiError(ErrorCode.CORRUPT_MEDIA, "decode: nothing could be decoded from this file")

    def _audio_chunk(self, out: av.AudioFrame) -> Audio:
        samples = np.clip(out.to_ndarray().reshape(-1), -1.0, 1.0).astype(np.float32, copy=False)
        self.audio_samples += len(samples)
        return Audio(samples)

    def _slots(self, frame: av.VideoFrame | None, until: int) -> Iterator[Frame]:
        """Sampling instants k / fps before `until` take `frame` (ffmpeg's fps filter, round=near:
        each instant shows the last frame at or before it); the frame is converted once."""
        if frame is None or self.frames >= until:
            return
        image = self._convert(frame)
        while self.frames < until:
            yield Frame(self.frames / self.spec.frames_fps, image)
            self.frames += 1

    def _check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise ApiError(ErrorCode.DECODE_TIMEOUT, f"decoding took longer than {self.limits.timeout_s:g} s")

    def _check_length(self) -> None:
        max_s = self.limits.max_duration_s
        if max_s is not None and self.decoded_s > max_s + OVERRUN_MARGIN_S / 2:
            raise ApiError(ErrorCode.TOO_LONG, f"the clip runs past the limit of {max_s:g} s")

    @property
    def duration_s(self) -> float:
        """The header's length, unless less was decodable (a truncated file)."""
        decoded = self.decoded_s
        return decoded if self.probe.duration_s is None else min(self.probe.duration_s, decoded)
