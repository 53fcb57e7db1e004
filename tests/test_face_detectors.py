"""The face-detector comparison (model_export/face_detectors.py): the box geometry that carries a
reference face through each variant, and a whole `measure` run on a real face photo (Haar standing
in for both detectors: the same detector twice must frame the face identically)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cv2")

from bench.media import astronaut_face
from model_export import face_detectors as fd


def test_box_geometry():
    box = (10, 20, 30, 40)
    assert fd._moved(box, np.eye(2, 3, dtype=np.float32)) == pytest.approx((10, 20, 40, 60))
    half = np.array([[0.5, 0, 100], [0, 0.5, 0]], np.float32)
    assert fd._moved(box, half) == pytest.approx((105, 10, 120, 30))
    assert fd._hit((0, 0, 20, 20), (5, 5, 15, 15)) and not fd._hit((0, 0, 4, 4), (5, 5, 15, 15))
    assert not fd._hit(None, (0, 0, 1, 1))
    assert fd._iou(box, box) == pytest.approx(1.0) and fd._iou(box, (100, 100, 5, 5)) == 0.0


def test_measure_scores_every_variant_against_the_carried_reference():
    face = astronaut_face()
    frame = np.full((360, 480, 3), 90, np.uint8)
    frame[50 : 50 + face.shape[0], 120 : 120 + face.shape[1]] = face
    tallies, framing = fd.measure([frame], {"Haar": fd.haar, "BlazeFace": fd.haar})
    assert set(tallies) == set(fd.VARIANTS)
    frontal = tallies["frontal (as recorded)"]
    assert frontal.frames == 1 and frontal.hits == {"Haar": 1, "BlazeFace": 1}
    assert framing.ious == [pytest.approx(1.0)]  # the same detector twice frames the face identically
    assert all(t.frames == 1 and len(t.ms["Haar"]) == 1 for t in tallies.values())
    empty, _ = fd.measure([np.zeros((120, 160, 3), np.uint8)], {"Haar": fd.haar, "BlazeFace": fd.haar})
    assert all(t.frames == 0 for t in empty.values())  # no reference face: nothing to score
