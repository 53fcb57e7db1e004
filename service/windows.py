"""Cut a decoded clip into model windows: the one place a clip becomes a batch of model inputs.

A clip is split into consecutive windows of spec.window_s (a long video becomes a timeline). Each
window holds its audio slice, zero-padded to spec.window_samples, and up to frames_per_window face
crops from the frames sampled inside it, zero-padded; `audio_len` / `frames_len` say how much is
real. A last partial window is kept when it lasts at least MIN_LAST_WINDOW_S, or when it is the
whole clip.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from service.contract import INPUT_AUDIO, INPUT_AUDIO_LEN, INPUT_FRAMES, INPUT_FRAMES_LEN, ModelSpec
from service.errors import ApiError, ErrorCode
from service.faces import FaceCropper
from service.media import DEFAULT_LIMITS, DecodeLimits, Media, Probe, decode

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

    def feeds(self) -> dict[str, np.ndarray]:
        """The model inputs, keyed by the contract names."""
        return {
            INPUT_AUDIO: self.audio,
            INPUT_AUDIO_LEN: self.audio_len,
            INPUT_FRAMES: self.frames,
            INPUT_FRAMES_LEN: self.frames_len,
        }


@dataclass
class Prepared:
    """A clip ready for the engine, with what a response and the metrics report about it."""

    windows: Windows
    probe: Probe
    duration_s: float
    frames_total: int
    frames_with_face: int
    audio_present: bool
    video_present: bool
    timings_ms: dict[str, float] = field(default_factory=dict)  # "decode", "faces"


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


def cut_windows(media: Media, crops: np.ndarray | None, found: np.ndarray | None, spec: ModelSpec) -> Windows:
    """Split a decoded clip and its face crops (from FaceCropper, one per decoded frame)."""
    bounds = window_bounds(media.duration_s, spec.window_s)
    n, samples, per_window = len(bounds), spec.window_samples, spec.frames_per_window
    out = Windows(
        audio=np.zeros((n, samples), np.float32),
        audio_len=np.zeros(n, np.int64),
        frames=np.zeros((n, *spec.frames_shape), np.uint8),
        frames_len=np.zeros(n, np.int64),
        start_s=np.array([b[0] for b in bounds], np.float64),
        end_s=np.array([b[1] for b in bounds], np.float64),
        frames_sampled=np.zeros(n, np.int64),
        faces_found=np.zeros(n, np.int64),
    )
    times = media.frame_times
    for i, (start, end) in enumerate(bounds):
        if media.audio is not None:
            first = int(round(start * spec.sample_rate))
            piece = media.audio[first : min(first + samples, int(round(end * spec.sample_rate)))]
            out.audio[i, : len(piece)] = piece
            out.audio_len[i] = len(piece)
        if crops is None or found is None:
            continue
        inside = np.flatnonzero((times >= start - 1e-6) & (times < end - 1e-6))
        with_face = _spread(inside[found[inside]], per_window)
        out.frames_sampled[i] = len(inside)
        out.faces_found[i] = int(found[inside].sum())
        out.frames[i, : len(with_face)] = crops[with_face]
        out.frames_len[i] = len(with_face)
    return out


def prepare(
    path: str | os.PathLike[str], spec: ModelSpec, cropper: FaceCropper, limits: DecodeLimits = DEFAULT_LIMITS
) -> Prepared:
    """Decode, find faces and cut into windows, timing each stage.

    Raises NO_USABLE_STREAM when neither modality can be used (no audio and no face anywhere)."""
    t0 = time.perf_counter()
    media = decode(path, spec, limits)
    t1 = time.perf_counter()
    crops = found = None
    if media.frames is not None:
        crops, found = cropper(media.frames)
    t2 = time.perf_counter()

    audio_present = media.audio is not None and media.audio.size > 0
    frames_total = 0 if media.frames is None else len(media.frames)
    frames_with_face = 0 if found is None else int(found.sum())
    if not audio_present and frames_with_face == 0:
        video = f"no face in any of the {frames_total} sampled frames" if frames_total else "no video"
        raise ApiError(ErrorCode.NO_USABLE_STREAM, f"nothing to recognise: no audio track and {video}")
    return Prepared(
        windows=cut_windows(media, crops, found, spec),
        probe=media.probe,
        duration_s=media.duration_s,
        frames_total=frames_total,
        frames_with_face=frames_with_face,
        audio_present=audio_present,
        video_present=media.frames is not None,
        timings_ms={"decode": (t1 - t0) * 1000.0, "faces": (t2 - t1) * 1000.0},
    )
