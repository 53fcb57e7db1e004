"""The paper's frames: CLIP's own preprocessing (shortest side resized, centre square) of whole frames,
up to 180 a 6 s window, through the service's decoder and windows exactly as serving cuts them."""

from __future__ import annotations

import numpy as np

from bench.media import make_clip
from service.contract import PAPER_SPEC
from service.faces import FaceCropper, centre_crop
from service.windows import prepare


def test_centre_crop_is_clips_resize_and_centre_square():
    wide = np.zeros((240, 480, 3), np.uint8)
    wide[:, 120:360] = 200  # the centre square of a 2:1 frame
    crop = centre_crop(wide, PAPER_SPEC)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    assert (crop[:, 2:-2] == 200).all()  # no bars, nothing of the sides
    tall = np.zeros((640, 360, 3), np.uint8)
    tall[140:500] = 90
    assert (centre_crop(tall, PAPER_SPEC)[2:-2] == 90).all()
    small = np.full((48, 64, 3), 30, np.uint8)  # upscaled too
    assert (centre_crop(small, PAPER_SPEC) == 30).all()


def test_a_6_s_window_gets_every_frame_at_30_fps(tmp_path):
    clip = make_clip(tmp_path / "talk.mp4", seconds=6, audio="tone", width=320, height=240)
    p = prepare(clip, PAPER_SPEC, FaceCropper(PAPER_SPEC))
    assert PAPER_SPEC.frames_fps == 30.0 and p.windows.frames.shape == (1, 180, 224, 224, 3)
    assert (
        abs(int(p.windows.frames_len[0]) - 180) <= 1 and p.windows.audio_len[0] == PAPER_SPEC.window_samples
    )
    # 4:3 frames are cropped, not letterboxed: the top rows hold picture, not black bars.
    assert p.windows.frames[0, 0, :20].mean() > 30
