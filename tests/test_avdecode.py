"""avdecode.py, windows.stream and decode_pool.py on real generated clips: the same frames and
audio as the ffmpeg path, the same refusals, flat buffering, and workers that survive a crash or
a hang."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bench.media import make_clip
from service import media, windows
from service.avdecode import Audio, Clip, Frame
from service.contract import LITE_SPEC, PAPER_SPEC, SAMPLE_RATE
from service.decode_pool import DecodePool
from service.errors import ApiError, ErrorCode
from service.faces import FaceCropper
from service.media import DecodeLimits
from service.windows import ClipEnd, Windows

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("av")
    cases = {"clip.mp4": {}, "clip.webm": {}, "rot90.mp4": {"rotate": 90}, "mute.mp4": {"audio": None}}
    out = {name: make_clip(d / name, seconds=2, **kw) for name, kw in cases.items()}
    out["long.mp4"] = make_clip(d / "long.mp4", seconds=12, width=160, height=120, fps=10)
    return out


def _decode(path: Path, spec=LITE_SPEC, **limits) -> tuple[Clip, np.ndarray | None, list[Frame]]:
    with Clip(path, spec, DecodeLimits(**limits)) as clip:
        items = list(clip)
    audio = [i.samples for i in items if isinstance(i, Audio)]
    return clip, np.concatenate(audio) if audio else None, [i for i in items if isinstance(i, Frame)]


@pytest.mark.parametrize("name", ["clip.mp4", "clip.webm", "rot90.mp4", "mute.mp4"])
@pytest.mark.parametrize("spec", [LITE_SPEC, PAPER_SPEC], ids=["gray", "rgb"])
def test_same_frames_and_audio_as_the_ffmpeg_path(clips, name, spec):
    clip, audio, frames = _decode(clips[name], spec)
    ref = media.decode(clips[name], spec)
    unset = {"format_name": "", "duration_s": None}
    assert replace(clip.probe, **unset) == replace(ref.probe, **unset)
    assert clip.duration_s == pytest.approx(ref.duration_s, abs=0.05)
    assert ref.frames is not None and len(frames) == len(ref.frames)
    for mine, theirs in zip(frames, ref.frames):
        assert mine.image.shape == theirs.shape
        assert np.abs(mine.image.astype(int) - theirs.astype(int)).mean() < 1.0  # libswscale both ways
    np.testing.assert_allclose([f.time_s for f in frames], ref.frame_times)
    if ref.audio is None:
        assert audio is None
    else:
        n = min(len(audio), len(ref.audio))
        assert abs(len(audio) - len(ref.audio)) < 0.02 * SAMPLE_RATE
        np.testing.assert_allclose(audio[:n], ref.audio[:n], atol=0.01)


def _code(path: Path, **limits) -> ErrorCode:
    with pytest.raises(ApiError) as e:
        _decode(path, **limits)
    return e.value.code


def test_refusals(tmp_path, clips):
    cases = {
        "random.mp4": (random.Random(2).randbytes(20_000), ErrorCode.NOT_MEDIA),  # no guessing by name
        "empty.mp4": (b"", ErrorCode.NOT_MEDIA),
        "playlist.mp4": (b"#EXTM3U\n#EXTINF:1,\n/etc/passwd\n#EXT-X-ENDLIST\n", ErrorCode.NOT_MEDIA),
        "list.ffconcat": (b"ffconcat version 1.0\nfile /etc/passwd\n", ErrorCode.NOT_MEDIA),
        "cut.mp4": (clips["clip.mp4"].read_bytes()[:5000], ErrorCode.CORRUPT_MEDIA),
    }
    for name, (data, code) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert _code(tmp_path / name) == code, name
    assert _code(clips["clip.mp4"], max_duration_s=1.0) == ErrorCode.TOO_LONG
    assert _code(clips["long.mp4"], timeout_s=0.0) == ErrorCode.DECODE_TIMEOUT


def test_windows_stream_out_as_they_complete_and_buffers_stay_small(clips, monkeypatch):
    """A 12 s clip: three windows, each given out as soon as its last frame is decoded, and
    never more than one window of sampled frames held."""
    held: list[int] = []
    add_frame = windows.WindowCutter.add_frame

    def spy(self, time_s, crop):
        add_frame(self, time_s, crop)
        held.append(len(self._times))

    monkeypatch.setattr(windows.WindowCutter, "add_frame", spy)
    events = []
    for item in windows.stream(clips["long.mp4"], LITE_SPEC, FaceCropper(LITE_SPEC)):
        events.append((type(item).__name__, len(held)))
    assert [e[0] for e in events] == ["Windows", "Windows", "Windows", "ClipEnd"]
    frames_per_window = LITE_SPEC.frames_per_window
    assert [frames for _, frames in events[:3]] == [frames_per_window, 2 * frames_per_window, 18]
    assert max(held) <= frames_per_window


@pytest.fixture(scope="module")
def pool():
    pool = DecodePool(LITE_SPEC, DecodeLimits(timeout_s=3.0), workers=1)
    yield pool
    pool.close()


def _run(pool: DecodePool, path: Path, during=None) -> list[object]:
    items: list[object] = []

    def emit(item):
        items.append(item)
        if during is not None and len(items) == 1:
            during()

    pool.run(path, emit, threading.Event())
    return items


def test_pool_decodes_like_in_process(pool, clips):
    items = _run(pool, clips["long.mp4"])
    here = windows.prepare(clips["long.mp4"], LITE_SPEC, FaceCropper(LITE_SPEC))
    there = Windows.concat([i for i in items if isinstance(i, Windows)])
    assert isinstance(items[-1], ClipEnd) and items[-1].frames_with_face == here.frames_with_face
    for field in ("audio", "frames", "audio_len", "frames_len", "start_s", "end_s"):
        np.testing.assert_array_equal(getattr(there, field), getattr(here.windows, field))


def test_pool_errors_are_typed(pool, tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"#EXTM3U\n#EXTINF:1,\n/etc/passwd\n")
    with pytest.raises(ApiError) as e:
        _run(pool, tmp_path / "x.mp4")
    assert e.value.code == ErrorCode.NOT_MEDIA


@pytest.mark.parametrize(
    "sig, code, word",
    [
        (signal.SIGSEGV, ErrorCode.CORRUPT_MEDIA, "SIGSEGV"),
        (signal.SIGSTOP, ErrorCode.DECODE_TIMEOUT, "longer"),
    ],
)
def test_a_crashed_or_stuck_worker_is_typed_and_replaced(pool, clips, sig, code, word):
    (pid,) = pool.pids()
    start = time.monotonic()
    with pytest.raises(ApiError) as e:
        _run(pool, clips["long.mp4"], during=lambda: os.kill(pid, sig))
    assert e.value.code == code and word in e.value.detail
    assert time.monotonic() - start < pool.limits.timeout_s + 2
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert isinstance(_run(pool, clips["clip.mp4"])[-1], ClipEnd)  # a fresh worker took over
    assert pool.pids() != [pid]


def test_shutdown_during_a_job_answers_it_typed(clips):
    """The service's shutdown stops the workers while a job's thread still reads from one: the job
    ends with a typed 503, and neither side fails on the pipe the other closed."""
    pool = DecodePool(LITE_SPEC, DecodeLimits(timeout_s=3.0), workers=1)

    def shutdown() -> None:
        closer = threading.Thread(target=pool.close)
        closer.start()
        closer.join()

    try:
        with pytest.raises(ApiError) as e:
            _run(pool, clips["long.mp4"], during=shutdown)
        assert e.value.code == ErrorCode.NOT_READY and "shutting down" in e.value.detail
        with pytest.raises(ApiError) as e:  # and no worker is started again
            _run(pool, clips["clip.mp4"])
        assert e.value.code == ErrorCode.NOT_READY
    finally:
        pool.close()  # a second close is harmless
    assert pool.pids() == []


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenCV's default pool is one thread on one CPU")
def test_a_worker_pins_opencv_to_one_thread(pool, clips):
    """The face detector runs in the workers, so each sets OpenCV's pool itself (cpu.pin_opencv_threads):
    left at OpenCV's default, a pool thread per CPU would stay behind after the first face search."""
    _run(pool, clips["clip.mp4"])
    (pid,) = pool.pids()
    deadline = time.monotonic() + 5  # the decoder's threads end with the job's container
    while _threads(pid) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _threads(pid) == 1
