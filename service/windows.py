"""Cut a clip into model windows: the one place a clip becomes a batch of model inputs.

A clip is split into consecutive windows of spec.window_s (a long video becomes a timeline). Each
window holds its audio slice, zero-padded to spec.window_samples, and up to frames_per_window face
crops from the frames sampled inside it, zero-padded; `audio_len` / `frames_len` say how much is
real. A last partial window is kept when it lasts at least MIN_LAST_WINDOW_S, or when it is the
whole clip.

`stream` decodes in-process (avdecode), finds faces frame by frame and gives out each window as
soon as it is complete, so only the unfinished window's audio and crops are ever held: memory is
flat with clip length. `prepare` is the same, collected into one `Prepared`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from service.avdecode import Audio, Clip
from service.contract import INPUT_AUDIO, INPUT_AUDIO_LEN, INPUT_FRAMES, INPUT_FRAMES_LEN, ModelSpec
from service.errors import ApiError, ErrorCode
from service.faces import FaceCropper
from service.media import Media
from service.media_limits import DEFAULT_LIMITS, DecodeLimits
from service.metadata import Probe

MIN_LAST_WINDOW_S = 1.0  # a shorter tail after the last full window is dropped


@dataclass
class Windows:
    audio: np.ndarray  # float32 [N, window_samples]
    audio_len: np.ndarray  # int64 [N] valid samples, 0 without audio
    frames: np.ndarray  # uint8 [N, F, S, S, C] face crops (or letterboxed frames), zero-padded
    frames_len: np.ndarray  # int64 [N] valid crops, 0 without face / video
    start_s: np.ndarray  # float64 [N]
    end_s: np.ndarray  # float64 [N]
    frames_sampled: np.ndarray  # int64 [N] decoded frames inside the window
    faces_found: np.ndarray  # int64 [N] of those, frames with a face (may exceed F before capping)

    def __len__(self) -> int:
        return len(self.start_s)

    @classmethod
    def empty(cls, n: int, spec: ModelSpec) -> Windows:
        return cls(
            audio=np.zeros((n, spec.window_samples), np.float32),
            audio_len=np.zeros(n, np.int64),
            frames=np.zeros((n, *spec.frames_shape), np.uint8),
            frames_len=np.zeros(n, np.int64),
            start_s=np.zeros(n, np.float64),
            end_s=np.zeros(n, np.float64),
            frames_sampled=np.zeros(n, np.int64),
            faces_found=np.zeros(n, np.int64),
        )

    @classmethod
    def concat(cls, parts: list[Windows]) -> Windows:
        return cls(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__})

    def select(self, rows: np.ndarray) -> Windows:
        return Windows(**{f: getattr(self, f)[rows] for f in self.__dataclass_fields__})

    def feeds(self) -> dict[str, np.ndarray]:
        """The model inputs, keyed by the contract names."""
        return {
            INPUT_AUDIO: self.audio,
            INPUT_AUDIO_LEN: self.audio_len,
            INPUT_FRAMES: self.frames,
            INPUT_FRAMES_LEN: self.frames_len,
        }


@dataclass
class ClipEnd:
    """What `stream` says about the clip once every window is out."""

    probe: Probe
    duration_s: float
    frames_total: int
    frames_with_face: int
    audio_present: bool
    video_present: bool
    timings_ms: dict[str, float]  # "decode" (demux, decode, scale), "faces"


@dataclass
class Prepared(ClipEnd):
    """A clip ready for the engine: all its windows, and what a response and the metrics report."""

    windows: Windows

    @classmethod
    def collect(cls, end: ClipEnd, parts: list[Windows]) -> Prepared:
        return cls(**vars(end), windows=Windows.concat(parts))


def window_bounds(duration_s: float, window_s: float) -> list[tuple[float, float]]:
    """(start, end) of each window; at least one, even for a clip shorter than a window."""
    full = int(math.floor(duration_s / window_s + 1e-9))
    bounds = [(i * window_s, (i + 1) * window_s) for i in range(full)]
    tail = duration_s - full * window_s
    if not bounds or tail >= MIN_LAST_WINDOW_S - 1e-9:
        bounds.append((full * window_s, max(duration_s, full * window_s)))
    return bounds


def _spread(indices: np.ndarray, limit: int) -> np.ndarray:
    """At most `limit` of `indices`, evenly spread over the window."""
    if len(indices) <= limit:
        return indices
    return indices[np.linspace(0, len(indices) - 1, limit).round().astype(int)]


class WindowCutter:
    """Audio and frames of one clip, in order, in; each window out once nothing more can fall in it.

    A full window [start, end) is complete when every stream the clip has decoded past `end` and
    the header's duration (when there is one) reaches `end`; `finish` cuts the rest once the real
    duration is known. Only the audio and crops from the first unfinished window on are held."""

    def __init__(self, spec: ModelSpec, *, audio: bool, video: bool, header_s: float | None = None) -> None:
        self.spec, self.audio, self.video, self.header_s = spec, audio, video, header_s
        self.emitted = 0  # windows given out
        self._audio = np.zeros(0, np.float32)
        self._audio_from = 0  # clip sample index of self._audio[0]
        self._audio_end = 0  # samples received
        self._times: list[float] = []  # sampled frames not yet behind a finished window
        self._crops: list[np.ndarray | None] = []  # their crops, None without a face
        self._video_s = 0.0  # the next sampled frame's time

    def add_audio(self, samples: np.ndarray) -> None:
        self._audio = np.concatenate([self._audio, samples]) if self._audio.size else samples
        self._audio_end += len(samples)

    def add_frame(self, time_s: float, crop: np.ndarray | None) -> None:
        self._times.append(time_s)
        self._crops.append(crop)
        self._video_s = time_s + 1 / self.spec.frames_fps

    def ready(self) -> Windows | None:
        """The full windows completed since the last call, or None."""
        reached = min(
            self._audio_end / self.spec.sample_rate if self.audio else math.inf,
            self._video_s if self.video else math.inf,
            math.inf if self.header_s is None else self.header_s + 1e-6,
        )
        w = self.spec.window_s
        count = max(0, int(math.floor(reached / w + 1e-9)) - self.emitted) if math.isfinite(reached) else 0
        first = self.emitted
        return self._cut([((first + i) * w, (first + i + 1) * w) for i in range(count)])

    def finish(self, duration_s: float) -> Windows | None:
        """The windows left once the clip's duration is known (window_bounds past those given out)."""
        return self._cut(window_bounds(duration_s, self.spec.window_s)[self.emitted :])

    def _cut(self, bounds: list[tuple[float, float]]) -> Windows | None:
        if not bounds:
            return None
        spec, out = self.spec, Windows.empty(len(bounds), self.spec)
        times = np.asarray(self._times, np.float64)
        found = np.array([c is not None for c in self._crops], bool)
        for i, (start, end) in enumerate(bounds):
            out.start_s[i], out.end_s[i] = start, end
            if self.audio:
                first = int(round(start * spec.sample_rate))
                stop = min(first + spec.window_samples, int(round(end * spec.sample_rate)))
                piece = self._audio[max(0, first - self._audio_from) : max(0, stop - self._audio_from)]
                out.audio[i, : len(piece)] = piece
                out.audio_len[i] = len(piece)
            if self.video:
                inside = np.flatnonzero((times >= start - 1e-6) & (times < end - 1e-6))
                with_face = _spread(inside[found[inside]], spec.frames_per_window)
                out.frames_sampled[i] = len(inside)
                out.faces_found[i] = int(found[inside].sum())
                for slot, k in enumerate(with_face):
                    out.frames[i, slot] = self._crops[k]
                out.frames_len[i] = len(with_face)
        self.emitted += len(bounds)
        self._drop_before(bounds[-1][1])
        return out

    def _drop_before(self, t: float) -> None:
        keep_from = int(round(t * self.spec.sample_rate))
        if keep_from > self._audio_from:
            self._audio = self._audio[keep_from - self._audio_from :].copy()
            self._audio_from = keep_from
        kept = sum(1 for x in self._times if x < t - 1e-6)
        del self._times[:kept], self._crops[:kept]


def cut_windows(media: Media, crops: np.ndarray | None, found: np.ndarray | None, spec: ModelSpec) -> Windows:
    """Split a whole decoded clip and its face crops (from FaceCropper, one per decoded frame)."""
    cutter = WindowCutter(spec, audio=media.audio is not None, video=crops is not None and found is not None)
    if media.audio is not None:
        cutter.add_audio(media.audio)
    if crops is not None and found is not None:
        for t, crop, hit in zip(media.frame_times, crops, found):
            cutter.add_frame(float(t), crop if hit else None)
    windows = cutter.finish(media.duration_s)
    assert windows is not None  # window_bounds gives at least one
    return windows


def stream(
    path: str | os.PathLike[str],
    spec: ModelSpec,
    cropper: FaceCropper,
    limits: DecodeLimits = DEFAULT_LIMITS,
    *,
    deadline: float | None = None,
) -> Iterator[Windows | ClipEnd]:
    """Decode in-process, find faces frame by frame, and give out windows as they complete, then
    a `ClipEnd`. Raises NO_USABLE_STREAM at the end when neither modality was usable (no audio and
    no face anywhere); the windows given out before carry nothing the model could read."""
    t0 = time.perf_counter()
    faces_s = 0.0
    frames_total = frames_with_face = 0
    with Clip(path, spec, limits, deadline=deadline) as clip:
        probe = clip.probe
        cutter = WindowCutter(spec, audio=probe.has_audio, video=probe.has_video, header_s=probe.duration_s)
        for item in clip:
            if isinstance(item, Audio):
                cutter.add_audio(item.samples)
            else:
                f0 = time.perf_counter()
                crop = cropper.crop(item.image)
                faces_s += time.perf_counter() - f0
                frames_total += 1
                frames_with_face += crop is not None
                cutter.add_frame(item.time_s, crop)
            windows = cutter.ready()
            if windows is not None:
                yield windows
        audio_present = clip.audio_samples > 0
        if not audio_present and frames_with_face == 0:
            video = f"no face in any of the {frames_total} sampled frames" if frames_total else "no video"
            raise ApiError(ErrorCode.NO_USABLE_STREAM, f"nothing to recognise: no audio track and {video}")
        windows = cutter.finish(clip.duration_s)
        if windows is not None:
            yield windows
        total_s = time.perf_counter() - t0
        yield ClipEnd(
            probe=clip.probe,
            duration_s=clip.duration_s,
            frames_total=frames_total,
            frames_with_face=frames_with_face,
            audio_present=audio_present,
            video_present=probe.has_video,
            timings_ms={"decode": (total_s - faces_s) * 1000.0, "faces": faces_s * 1000.0},
        )


def prepare(
    path: str | os.PathLike[str], spec: ModelSpec, cropper: FaceCropper, limits: DecodeLimits = DEFAULT_LIMITS
) -> Prepared:
    """`stream`, collected: decode, find faces and cut into windows, timing each stage.

    Raises NO_USABLE_STREAM when neither modality can be used (no audio and no face anywhere)."""
    parts: list[Windows] = []
    for item in stream(path, spec, cropper, limits):
        if isinstance(item, Windows):
            parts.append(item)
            continue
        return Prepared.collect(item, parts)
    raise AssertionError("stream() ends with a ClipEnd")
