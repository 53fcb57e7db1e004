"""faces.py: BlazeFace face crops on the astronaut photo and on decoded clips, FER-style preparation,
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
from service.faces import FaceCropper, crop_square, detector, largest_face, letterbox, prepare_face, to_gray
from service.media import decode


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # RGB 512x512, face at about x=177, y=66, w=95


def test_largest_face_on_the_astronaut_photo(astronaut):
    x, y, w, h = detector()(astronaut)  # BlazeFace's own box
    assert abs(x - 177) < 12 and abs(y - 66) < 20 and abs(w - 95) < 15
    # ...handed out framed as the face model learned faces: larger, centred higher.
    fx, fy, fw, fh = largest_face(astronaut)
    scale, down = faces.HAAR_FRAMING
    assert fw == fh and abs(fw - scale * max(w, h)) <= 1
    assert abs(fx + fw / 2 - (x + w / 2)) <= 1 and abs(fy + fh / 2 - (y + h / 2 + down * max(w, h))) <= 1
    gx, gy, gw, _ = largest_face(to_gray(astronaut))  # gray frames (the lite model's) work as well
    assert abs(gx - fx) < 12 and abs(gy - fy) < 15 and abs(gw - fw) < 15


@pytest.mark.parametrize("degrees", [30, -30])
def test_finds_a_tilted_face(astronaut, degrees):
    """Haar's frontal cascade finds no face in these frames; BlazeFace does, where it is."""
    h, w = astronaut.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    tilted = cv2.warpAffine(astronaut, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
    x, y, bw, bh = largest_face(tilted)
    cx, cy = m @ np.array([177 + 95 / 2, 66 + 95 / 2, 1.0])  # the face's centre, tilted with the frame
    assert abs(x + bw / 2 - cx) < 0.3 * bw and abs(y + bh / 2 - cy) < 0.4 * bh


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
    # The crop is framed on the face: the detector finds it again when scaled up.
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


def test_cropper_is_thread_safe(decoded):
    frames, _ = decoded
    cropper = FaceCropper(LITE_SPEC)
    serial = cropper(frames)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(cropper, [frames] * 4))
    for crops, found in results:
        np.testing.assert_array_equal(crops, serial[0])
        np.testing.assert_array_equal(found, serial[1])


def test_anchor_grid_is_blazeface_short_range():
    anchors = faces._anchors()
    assert anchors.shape == (896, 2)  # 16x16 cells x 2 anchors + 8x8 cells x 6 anchors
    assert anchors.min() > 0 and anchors.max() < 1
    assert np.allclose(anchors[0], [0.5 / 16, 0.5 / 16]) and np.allclose(anchors[-1], [7.5 / 8, 7.5 / 8])


def test_degenerate_detections_count_as_no_face(monkeypatch):
    """Boxes without area, or centred in the letterbox bars, are no face (not a failed frame)."""
    blaze = faces.BlazeFace()
    anchors = faces._anchors() * faces.INPUT_SIDE
    regressors = np.zeros((1, len(anchors), 16), np.float32)
    scores = np.full((1, len(anchors), 1), 10.0, np.float32)  # every anchor confident
    monkeypatch.setattr(blaze, "session", type("Fake", (), {"run": lambda self, *_: (regressors, scores)})())
    wide = np.zeros((90, 160), np.uint8)  # letterboxed to 128x72: bars of 28 rows above and below
    regressors[0, :, 2:4] = -5.0  # negative width and height
    assert blaze(wide) is None
    regressors[0, :, 1] = 5.0 - anchors[:, 1]  # every centre at y = 5: in the top bar
    regressors[0, :, 2:4] = 20.0
    assert blaze(wide) is None
    regressors[0, :, 1] = 64.0 - anchors[:, 1]  # ...and in the picture: a face
    assert blaze(wide) is not None
