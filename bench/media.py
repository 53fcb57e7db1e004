"""Real media for the tests and the harnesses, made on demand with ffmpeg: a real face, real
(synthetic) speech.

The face is the astronaut photo shipped with scikit-image (OpenCV's Haar cascade finds her face at
about x=177, y=66, w=95 in the 512x512 image), composited onto a plain background and drifting a
little so frames differ. Speech comes from espeak-ng; without it the audio falls back to a tone and
a `SpeechUnavailable` warning says so. Nothing is cached: every call writes fresh files.

    from bench.media import make_clip
    clip = make_clip(tmp_path / "a.mp4", seconds=2)            # h264/aac, speech, moving face
    make_clip(tmp_path / "b.webm", video="noface", audio=None)  # vp9, test pattern, no audio track
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import warnings
import wave
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from service.media import ffmpeg_exe

Audio = Literal["speech", "silence", "tone"] | None
Video = Literal["face", "noface"] | None

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog. I can't believe it is already Friday!"
# Head and shoulders around the astronaut's face (x=177, y=66, w=95) in skimage.data.astronaut().
FACE_REGION = (slice(10, 270), slice(110, 340))  # rows, cols

# container -> (default video codec, default audio codec)
CODECS: dict[str, tuple[str, str]] = {
    "mp4": ("libx264", "aac"),
    "mov": ("libx264", "aac"),
    "mkv": ("libx264", "aac"),
    "webm": ("libvpx-vp9", "libopus"),
    "wav": ("", "pcm_s16le"),  # audio only
}
_CODEC_FLAGS: dict[str, list[str]] = {
    "libx264": ["-preset", "ultrafast", "-pix_fmt", "yuv420p"],
    "libvpx-vp9": ["-deadline", "realtime", "-cpu-used", "8", "-b:v", "400k", "-pix_fmt", "yuv420p"],
    "mpeg4": ["-q:v", "5"],
}


class SpeechUnavailable(UserWarning):
    """espeak-ng is not installed: clips asked to carry speech carry a tone instead."""


def speech_available() -> bool:
    return shutil.which("espeak-ng") is not None


def ffmpeg(*args: str, timeout_s: float = 120.0) -> None:
    """Run ffmpeg (the service's binary) to write a file; RuntimeError with its message if it fails."""
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")


def _espeak(path: Path, text: str) -> bool:
    """Write espeak-ng speech to `path` (22.05 kHz wav); False when espeak-ng is missing."""
    if not speech_available():
        warnings.warn("espeak-ng not found: using a tone instead of speech", SpeechUnavailable, stacklevel=3)
        return False
    subprocess.run(
        ["espeak-ng", "-s", "165", "-w", str(path), text], check=True, capture_output=True, timeout=30
    )
    return True


def tone_wav(path: str | Path, freq: float, seconds: float = 0.5) -> Path:
    """A 16 kHz mono 16-bit wav of one sine tone (stands in for a corpus file in tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(16_000 * seconds)) / 16_000
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16_000)
        handle.writeframes(pcm.tobytes())
    return path


def make_speech_wav(path: str | Path, text: str = DEFAULT_TEXT, seconds: float | None = None) -> Path:
    """Speech as a 16 kHz mono wav, padded with silence or cut to `seconds` when given."""
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "speech.wav"
        if _espeak(raw, text):
            source = ["-i", str(raw)]
        else:
            source = ["-f", "lavfi", "-i", f"sine=frequency=220:duration={seconds or 3}"]
        length = ["-af", "apad", "-t", str(seconds)] if seconds else []
        ffmpeg(*source, *length, "-ac", "1", "-ar", "16000", "-c:a", "pcm_s16le", str(path))
    return path


def astronaut_face() -> np.ndarray:
    """Head and shoulders of the astronaut photo, RGB uint8."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[FACE_REGION])


def make_clip(
    path: str | Path,
    *,
    seconds: float = 2.0,
    width: int = 320,
    height: int = 240,
    fps: int = 30,
    container: str | None = None,
    vcodec: str | None = None,
    acodec: str | None = None,
    audio: Audio = "speech",
    video: Video = "face",
    rotate: int | None = None,
    text: str = DEFAULT_TEXT,
) -> Path:
    """Write a clip and return its path. `container` defaults to the path's suffix (else mp4).

    video="face": the astronaut drifting on a plain background; "noface": ffmpeg's testsrc2
    pattern; None: no video stream. audio="speech" (espeak-ng, looped to fill), "silence",
    "tone" (440 Hz) or None: no audio stream. `rotate` (90/180/270) stores the frames turned
    counterclockwise plus display-rotation metadata, like a phone does: a player (and our decoder)
    turns them back upright at width x height, and `probe` reports `rotation == rotate`."""
    path = Path(path)
    container = container or (path.suffix.lstrip(".") or "mp4")
    if container not in CODECS:
        raise ValueError(f"container {container!r}: choose from {sorted(CODECS)}")
    if audio is None and video is None:
        raise ValueError("a clip needs audio or video")
    if container == "wav" and video is not None:
        raise ValueError("wav holds audio only; pass video=None")
    if rotate and container not in ("mp4", "mov"):
        raise ValueError("rotation metadata is written for mp4/mov only")
    default_v, default_a = CODECS[container]
    vcodec, acodec = vcodec or default_v, acodec or default_a

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        inputs: list[str] = []
        maps: list[str] = []
        filters: list[str] = []
        # With `rotate`, store the frames turned counterclockwise; the metadata turns them back.
        store = {None: "", 0: "", 90: ",transpose=cclock", 180: ",hflip,vflip", 270: ",transpose=clock"}[
            rotate
        ]
        store += ",format=yuv420p"
        if video == "face":
            face = astronaut_face()
            face_png = Path(tmp) / "face.png"
            cv2.imwrite(str(face_png), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
            face_h = int(min(height * 0.85, width * 0.85 * face.shape[0] / face.shape[1])) // 2 * 2
            inputs += ["-f", "lavfi", "-i", f"color=c=0x4a6a8a:s={width}x{height}:r={fps}:d={seconds}"]
            inputs += ["-loop", "1", "-framerate", str(fps), "-t", str(seconds), "-i", str(face_png)]
            drift = "2*PI*t/1.7"
            filters.append(
                f"[1:v]scale=-2:{face_h}[f];[0:v][f]overlay="
                f"x='(W-w)/2+W*0.05*sin({drift})':y='(H-h)/2+H*0.03*cos({drift})':shortest=1{store}[v]"
            )
        elif video == "noface":
            inputs += ["-f", "lavfi", "-i", f"testsrc2=s={width}x{height}:r={fps}:d={seconds}"]
            filters.append(f"[0:v]null{store}[v]")
        if video is not None:
            maps += ["-map", "[v]"]
        n_video_inputs = {"face": 2, "noface": 1, None: 0}[video]

        if audio is not None:
            speech = Path(tmp) / "speech.wav"
            if audio == "speech" and _espeak(speech, text):
                inputs += ["-stream_loop", "-1", "-i", str(speech)]
            elif audio == "silence":
                inputs += ["-f", "lavfi", "-i", "anullsrc=r=48000:cl=mono"]
            else:  # "tone", or speech without espeak-ng
                inputs += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"]
            maps += ["-map", f"{n_video_inputs}:a"]

        codec_args: list[str] = []
        if video is not None:
            codec_args += ["-c:v", vcodec, *_CODEC_FLAGS.get(vcodec, [])]
        if audio is not None:
            codec_args += ["-c:a", acodec, "-ac", "1", "-ar", "48000"]
        graph = ["-filter_complex", ";".join(filters)] if filters else []
        encoded = Path(tmp) / f"encoded.{container}" if rotate else path
        ffmpeg(*inputs, *graph, *maps, *codec_args, "-t", str(seconds), "-f", _muxer(container), str(encoded))
        if rotate:
            set_rotation(encoded, path, rotate, _muxer(container))
    return path


def _ffmpeg_major() -> int:
    out = subprocess.run([ffmpeg_exe(), "-version"], capture_output=True, text=True, timeout=10).stdout
    match = re.match(r"ffmpeg version n?(\d+)", out)
    return int(match[1]) if match else 0


def set_rotation(src: Path, dst: Path, clockwise: int, muxer: str = "mp4") -> Path:
    """Remux with a display matrix that makes players turn the frames `clockwise` degrees.

    Both spellings take the counterclockwise angle: ffmpeg 6+ `-display_rotation` on the input,
    older ffmpeg the `rotate` stream tag (only honoured when stream-copying)."""
    ccw = str((360 - clockwise) % 360)
    if _ffmpeg_major() >= 6:
        ffmpeg("-display_rotation:v:0", ccw, "-i", str(src), "-c", "copy", "-f", muxer, str(dst))
    else:
        ffmpeg("-i", str(src), "-c", "copy", "-metadata:s:v:0", f"rotate={ccw}", "-f", muxer, str(dst))
    return dst


def _muxer(container: str) -> str:
    return {"mkv": "matroska"}.get(container, container)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """A file with exactly these bytes (random garbage, a playlist, a truncated copy...)."""
    path = Path(path)
    path.write_bytes(data)
    return path
