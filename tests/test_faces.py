"""faces.py: Haar face crops on the astronaut photo and on decoded clips, FER-style preparation,
whole-frame letterboxing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import cv2
import numpy as np
import pytest

from bench.media import make_clip
from service import faces
from service.contract import LITE_SPEC, PAPER_SPEC
from service.faces import FaceCropper, crop_square, face_near, largest_face, letterbox, prepare_face, to_gray
from service.media import decode


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # RGB 512x512, face at about x=177, y=66, w=95


def test_largest_face_on_the_astronaut_photo(astronaut):
    x, y, w, h = largest_face(to_gray(astronaut))
    assert abs(x - 177) < 12 and abs(y - 66) < 12 and abs(w - 95) < 15 and w == h


def test_no_face_in_plain_or_patterned_images():
    assert largest_face(np.full((240, 320), 90, np.uint8)) is None
    checker = (np.indices((240, 320)).sum(0) // 20 % 2 * 255).astype(np.uint8)
    assert largest_face(checker) is None


def test_crop_square_pads_at_the_border():
    image = np.arange(100 * 100, dtype=np.uint16).reshape(100, 100)
    crop = crop_square(image, (0, 0, 50, 50), margin=0.1)
    assert crop.shape == (60, 60)
    assert (crop[:5, :5] == image[0, 0]).all()  # replicated edge, not black


def test_prepare_face_for_fer_and_rgb_models(astronaut):
    fer = np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)
    np.testing.assert_array_equal(prepare_face(fer, LITE_SPEC)[:, :, 0], fer)  # FER images pass as they are
    face = astronaut[60:170, 170:280]
    gray = prepare_face(face, LITE_SPEC)
    assert gray.shape == (48, 48, 1) and gray.dtype == np.uint8
    assert abs(int(gray.mean()) - int(to_gray(face).mean())) <= 2
    rgb = prepare_face(face, PAPER_SPEC)
    assert rgb.shape == (224, 224, 3)
    np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), face.reshape(-1, 3).mean(0), atol=2)
    assert prepare_face(fer[:, :, None], PAPER_SPEC).shape == (224, 224, 3)


def test_letterbox_keeps_aspect_with_black_bars():
    portrait = np.full((640, 360, 3), 200, np.uint8)
    framed = letterbox(portrait, PAPER_SPEC)
    assert framed.shape == (224, 224, 3)
    assert (framed[:, :30] == 0).all() and (framed[:, -30:] == 0).all()
    assert (framed[:, 70:150] == 200).all()


@pytest.fixture(scope="module")
def decoded(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("faces")
    face = decode(make_clip(d / "face.mp4", seconds=2, audio=None), LITE_SPEC)
    noface = decode(make_clip(d / "noface.mp4", seconds=2, audio=None, video="noface"), LITE_SPEC)
    return face.frames, noface.frames


def test_cropper_finds_the_face_in_every_frame_of_the_clip(decoded):
    frames, _ = decoded
    crops, found = FaceCropper(LITE_SPEC)(frames)
    assert crops.shape == (len(frames), 48, 48, 1) and crops.dtype == np.uint8
    assert found.all()
    # The crop is framed on the face: the cascade finds it again when scaled up.
    big = cv2.resize(crops[0, :, :, 0], (144, 144), interpolation=cv2.INTER_LINEAR)
    x, y, w, h = largest_face(big)
    assert w > 80 and abs(x + w / 2 - 72) < 20 and abs(y + h / 2 - 72) < 25


def test_cropper_finds_nothing_without_a_face(decoded):
    _, frames = decoded
    crops, found = FaceCropper(LITE_SPEC)(frames)
    assert not found.any() and not crops.any()


def test_whole_frame_mode_letterboxes_every_frame(decoded):
    frames, _ = decoded
    crops, found = FaceCropper(replace(PAPER_SPEC, frame_mode="whole"))(frames)
    assert found.all() and crops.shape == (len(frames), 224, 224, 3)
    assert (crops[:, :20] == 0).all()  # 4:3 frame -> bars top and bottom


def test_tracking_finds_the_same_faces_as_full_scans(decoded, monkeypatch):
    frames, _ = decoded
    tracked = FaceCropper.boxes(frames)
    monkeypatch.setattr(faces, "FULL_SCAN_EVERY", 1)
    scanned = FaceCropper.boxes(frames)
    assert all(b is not None for b in tracked)
    for t, s in zip(tracked, scanned, strict=False):
        assert np.abs(np.subtract(t, s)).max() <= 0.15 * s[2]


def test_tracking_recovers_when_the_face_moves_or_vanishes(decoded):
    frames, _ = decoded
    h, w = frames.shape[1:3]
    left, right, blank = (np.full((h, 2 * w, 1), 90, np.uint8) for _ in range(3))
    left[:, :w], right[:, w:] = frames[0], frames[0]  # the face jumps across a wide frame
    boxes = FaceCropper.boxes(np.stack([left, right, blank, left]))
    assert [b is not None for b in boxes] == [True, True, False, True]
    assert face_near(to_gray(right), boxes[0]) is None  # so the moved face came from a full scan
    assert abs(boxes[1][0] - (boxes[0][0] + w)) < 15


def test_cropper_is_thread_safe(decoded):
    frames, _ = decoded
    cropper = FaceCropper(LITE_SPEC)
    serial = cropper(frames)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(cropper, [frames] * 4))
    for crops, found in results:
        np.testing.assert_array_equal(crops, serial[0])
        np.testing.assert_array_equal(found, serial[1])
