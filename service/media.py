"""Decoding with an ffmpeg process: an upload's 16 kHz mono audio (`decode_audio`, what training
reads speech with) or its audio and frames sampled at the model's rate in one run (`decode`). The
service decodes in-process with PyAV instead (`avdecode`, in the decode workers); this path is the
training side's and the reference the PyAV path is tested against.

Every input is opened with the allow-lists of `media_limits` (`-protocol_whitelist file,pipe` and a
`file:` URL, `-format_whitelist`, and `-f <probed demuxer>` so ffmpeg cannot re-detect the file as
something else), under the time and resource limits of `ffmpeg_run`. Failures are `ApiError`s:
NOT_MEDIA, CORRUPT_MEDIA, UNSUPPORTED_CODEC, NO_USABLE_STREAM, TOO_LONG, TOO_LARGE, DECODE_TIMEOUT.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import ffmpeg
import numpy as np

from service.contract import SAMPLE_RATE, ModelSpec
from service.errors import ApiError, ErrorCode
from service.ffmpeg_run import failure, ffmpeg_exe, file_url, input_options, run, stderr_tail
from service.media_limits import (
    DECODE_THREADS,
    DECODE_TIMEOUT_S,
    DEFAULT_LIMITS,
    OVERRUN_MARGIN_S,
    PROBE_TIMEOUT_S,
    DecodeLimits,
)
from service.metadata import Probe, frame_size, probe

_FFMPEG_FLAGS = ("-nostdin", "-hide_banner", "-loglevel", "error")
_RAW_AUDIO = {"format": "f32le", "acodec": "pcm_f32le", "ac": 1}


@dataclass
class Media:
    """A decoded clip: audio (None without an audio stream) and frames sampled at `fps`."""

    audio: np.ndarray | None  # float32 [S] at SAMPLE_RATE, mono, in [-1, 1]
    frames: np.ndarray | None  # uint8 [N, H, W, C], C = 1 (gray) or 3 (RGB); read-only view
    frame_times: np.ndarray  # float64 [N], seconds from the start of the clip
    fps: float
    duration_s: float
    probe: Probe


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
    opts = {"f": info.demuxer, "threads": threads, **input_options()}
    if max_duration_s is not None:
        # A file whose header lies about (or lacks) its length still stops here; the margin lets
        # `decode` tell a clip that runs past the limit from one that ends at it.
        opts["t"] = max_duration_s + OVERRUN_MARGIN_S
    return ffmpeg.input(file_url(path), **opts)


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
    rc, raw, _, err = run(out.global_args(*_FFMPEG_FLAGS).compile(cmd=ffmpeg_exe()), left_s)
    if rc != 0:
        raise failure(err, "audio decode", opened=True)
    audio = _to_audio(raw)
    if max_duration_s is not None and audio.size > (max_duration_s + OVERRUN_MARGIN_S / 2) * sample_rate:
        raise ApiError(ErrorCode.TOO_LONG, f"the clip runs past the limit of {max_duration_s:g} s")
    return audio


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
    rc, raw_video, raw_audio, err = run(args, left_s, extra_pipe=info.has_audio)
    if rc != 0:
        raise failure(err, "decode", opened=True)

    audio = _to_audio(raw_audio) if info.has_audio else None
    frames = None
    n = 0
    if info.has_video:
        per_frame = width * height * channels
        n = len(raw_video) // per_frame
        frames = np.frombuffer(raw_video[: n * per_frame], dtype=np.uint8).reshape(n, height, width, channels)
    if (audio is None or audio.size == 0) and n == 0:
        raise ApiError(ErrorCode.CORRUPT_MEDIA, f"nothing could be decoded: {stderr_tail(err)}")
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
