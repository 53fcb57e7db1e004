"""windows.py: window boundaries, padding and lengths, and `prepare` on real generated clips."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bench.media import make_clip
from service.contract import INPUTS, LITE_SPEC, PAPER_SPEC, SAMPLE_RATE
from service.errors import ApiError, ErrorCode
from service.faces import FaceCropper
from service.media import Media
from service.metadata import Probe
from service.windows import cut_windows, prepare, window_bounds

W = LITE_SPEC.window_s  # 4 s
# The frame arithmetic of the cutting tests is written for 8 frames a 4 s window (2 fps).
SPEC_2FPS = replace(LITE_SPEC, frames_per_window=8)


@pytest.mark.parametrize(
    "duration, expected",
    [
        (0.4, [(0.0, 0.4)]),  # shorter than a window: one window
        (2.0, [(0.0, 2.0)]),
        (4.0, [(0.0, 4.0)]),
        (4.5, [(0.0, 4.0)]),  # 0.5 s tail dropped
        (5.0, [(0.0, 4.0), (4.0, 5.0)]),  # 1 s tail kept
        (10.0, [(0.0, 4.0), (4.0, 8.0), (8.0, 10.0)]),
    ],
)
def test_window_bounds(duration, expected):
    bounds = window_bounds(duration, W)
    assert np.asarray(bounds) == pytest.approx(np.asarray(expected))


def _media(
    duration: float, *, audio: bool = True, fps: float = SPEC_2FPS.frames_fps, frames: bool = True
) -> Media:
    n = int(duration * fps)
    samples = np.linspace(-0.5, 0.5, int(duration * SAMPLE_RATE), dtype=np.float32)
    info = Probe("mov,mp4", duration, audio, frames, 64, 64, 0, "h264", "aac", 2)
    return Media(
        audio=samples if audio else None,
        frames=np.zeros((n, 64, 64, 1), np.uint8) if frames else None,
        frame_times=np.arange(n) / fps,
        fps=fps,
        duration_s=duration,
        probe=info,
    )


def test_cut_pads_audio_and_faces_and_counts_them():
    m = _media(10.0)
    n = len(m.frame_times)  # 20 frames at 2 fps
    crops = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 48, 48, 1), np.uint8)
    found = np.ones(n, bool)
    found[3] = found[17] = found[18] = False  # frames at 1.5 s, 8.5 s, 9.0 s have no face
    w = cut_windows(m, crops, found, SPEC_2FPS)

    assert len(w) == 3
    np.testing.assert_array_equal(w.start_s, [0, 4, 8])
    np.testing.assert_array_equal(w.end_s, [4, 8, 10])
    np.testing.assert_array_equal(w.audio_len, [64_000, 64_000, 32_000])
    np.testing.assert_array_equal(w.audio[1], m.audio[64_000:128_000])
    assert not w.audio[2, 32_000:].any()  # zero padding after the clip's end
    np.testing.assert_array_equal(w.frames_sampled, [8, 8, 4])
    np.testing.assert_array_equal(w.faces_found, [7, 8, 2])
    np.testing.assert_array_equal(w.frames_len, [7, 8, 2])
    np.testing.assert_array_equal(w.frames[0, :7, 0, 0, 0], [0, 1, 2, 4, 5, 6, 7])  # frame 3 skipped
    np.testing.assert_array_equal(w.frames[2, :2, 0, 0, 0], [16, 19])
    assert not w.frames[0, 7:].any() and not w.frames[2, 2:].any()

    feeds = w.feeds()
    assert tuple(feeds) == INPUTS
    assert feeds["audio"].dtype == np.float32 and feeds["audio"].shape == (3, LITE_SPEC.window_samples)
    assert feeds["audio_len"].dtype == np.int64 and feeds["frames_len"].dtype == np.int64
    assert feeds["frames"].dtype == np.uint8 and feeds["frames"].shape == (3, *SPEC_2FPS.frames_shape)


def test_more_faces_than_slots_are_spread_over_the_window():
    spec = replace(LITE_SPEC, frames_per_window=4)
    m = _media(4.0, fps=4.0)  # 16 sampled frames, every one with a face
    crops = np.arange(16, dtype=np.uint8)[:, None, None, None] * np.ones((1, 48, 48, 1), np.uint8)
    w = cut_windows(m, crops, np.ones(16, bool), spec)
    assert w.frames_len[0] == 4 and w.faces_found[0] == 16
    np.testing.assert_array_equal(w.frames[0, :, 0, 0, 0], [0, 5, 10, 15])


def test_cut_without_audio_or_video():
    no_audio = cut_windows(
        _media(3.0, audio=False), np.zeros((6, 48, 48, 1), np.uint8), np.ones(6, bool), SPEC_2FPS
    )
    assert (
        no_audio.audio_len.tolist() == [0]
        and not no_audio.audio.any()
        and no_audio.frames_len.tolist() == [6]
    )
    no_video = cut_windows(_media(3.0, frames=False), None, None, SPEC_2FPS)
    assert no_video.frames_len.tolist() == [0] and no_video.audio_len.tolist() == [48_000]


# --- prepare on real clips --------------------------------------------------------------------


@pytest.fixture(scope="module")
def cropper() -> FaceCropper:
    return FaceCropper(LITE_SPEC)


def test_prepare_long_video_gives_a_timeline(tmp_path, cropper):
    clip = make_clip(tmp_path / "long.mp4", seconds=10, width=192, height=144, fps=10)
    p = prepare(clip, LITE_SPEC, cropper)
    w = p.windows
    assert len(w) == 3 and w.end_s[-1] == pytest.approx(10.0, abs=0.05)
    assert p.audio_present and p.video_present
    sampled = round(10 * LITE_SPEC.frames_fps)
    assert p.frames_total == sampled and p.frames_with_face == sampled
    full, last = LITE_SPEC.frames_per_window, round(2 * LITE_SPEC.frames_fps)  # the last window is 2 s
    np.testing.assert_array_equal(w.frames_len, [full, full, last])
    assert w.audio_len[0] == LITE_SPEC.window_samples and abs(w.audio_len[2] - 2 * SAMPLE_RATE) < 400
    assert w.frames[:, :4].std() > 10  # real face pixels, not padding
    assert set(p.timings_ms) == {"decode", "faces"} and all(v > 0 for v in p.timings_ms.values())


def test_prepare_without_face_keeps_the_audio(tmp_path, cropper):
    p = prepare(make_clip(tmp_path / "noface.mp4", seconds=2, video="noface"), LITE_SPEC, cropper)
    assert p.video_present and p.frames_total >= 3 and p.frames_with_face == 0
    assert p.windows.frames_len.tolist() == [0] and p.windows.audio_len[0] > SAMPLE_RATE


def test_prepare_audio_only(tmp_path, cropper):
    p = prepare(make_clip(tmp_path / "voice.wav", seconds=2, video=None), LITE_SPEC, cropper)
    assert p.audio_present and not p.video_present and p.frames_total == 0
    assert p.windows.frames_len.tolist() == [0]


def test_prepare_whole_frames_for_the_paper_spec(tmp_path):
    clip = make_clip(tmp_path / "mute.webm", seconds=2, audio=None)
    p = prepare(clip, PAPER_SPEC, FaceCropper(PAPER_SPEC))
    assert not p.audio_present and p.windows.audio_len.tolist() == [0]
    assert p.windows.frames.shape == (1, *PAPER_SPEC.frames_shape)  # up to 180 frames of 6 s, 224 px
    assert p.windows.frames_len[0] == p.frames_total > 0


def test_prepare_refuses_a_clip_with_nothing_usable(tmp_path, cropper):
    clip = make_clip(tmp_path / "pattern.mp4", seconds=2, video="noface", audio=None)
    with pytest.raises(ApiError) as e:
        prepare(clip, LITE_SPEC, cropper)
    assert e.value.code == ErrorCode.NO_USABLE_STREAM and "no face" in e.value.detail


def test_feeds_run_through_the_lite_model(tmp_path, cropper, lite_model: Path):
    from service.engine import Engine

    p = prepare(make_clip(tmp_path / "a.mp4", seconds=5), LITE_SPEC, cropper)
    engine = Engine(lite_model, device="cpu", intra_op_threads=1)
    out = engine.infer(p.windows.feeds())
    assert out["probs"].shape == (2, len(engine.spec.labels))
    np.testing.assert_allclose(out["probs"].sum(1), 1.0, atol=1e-4)
