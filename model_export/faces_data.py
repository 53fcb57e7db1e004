"""FER2013 faces for the face branch: FER+ vote distributions as targets, framed as the service frames
video faces.

FER+ (Barsoum et al. 2016) had 10 annotators relabel every FER2013 image; training on the vote
distribution (their "probabilistic label distribution" target) instead of the single noisy FER2013
label is what their paper found best. Files FER+ did not match keep a one-hot FER2013 target.

FER2013 images are cut tighter than the service's video crops (the detector's box widened by
`FACE_MARGIN`), so each image is framed the service's way: enlarged onto a replicated border, the same
detector (`service.faces.largest_face`) and `crop_square` margin, then `prepare_face`. Where the
detector finds nothing (10 % of FER val), the image gets the framing the detector gives on average (box
side 1.03 of the image, centred: measured on 600 FER val images).
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import cv2
import numpy as np

from model_export import data
from service.contract import LABELS_7, ModelSpec
from service.faces import DETECTOR_FILE

# FER+ vote columns -> our labels; contempt / unknown / not_face votes are not emotions we predict.
FERPLUS_COLUMNS: dict[str, str | None] = {
    "neutral": "neutral",
    "happiness": "happy",
    "surprise": "surprised",
    "sadness": "sad",
    "anger": "angry",
    "disgust": "disgust",
    "fear": "fearful",
    "contempt": None,
    "unknown": None,
    "not_face": None,
}
NOT_A_FACE_VOTES = 5  # FER+ images with at least this many "not face" votes are left out of training
UPSCALE = 3  # FER's 48 px enlarged to 144 px, then padded: a face in a frame, as the detector sees one
AVERAGE_BOX = 1.03  # framed box side / FER image side where the detector finds the face (median)


def ferplus_targets(root: Path, split: str, items: list[data.Item], labels: tuple[str, ...] = LABELS_7) -> tuple[
    np.ndarray, np.ndarray
]:
    """(targets float32 [N, K] summing to 1, usable bool [N]) for `scan_fer(root, split)` items.

    The FER+ CSV (`ferplus_train.csv` / `ferplus_val.csv`) is optional: without it every target is the
    FER2013 label one-hot."""
    k = len(labels)
    targets = np.zeros((len(items), k), np.float32)
    targets[np.arange(len(items)), data.labels_of(items, labels)] = 1.0
    usable = np.ones(len(items), bool)
    csv_path = Path(root) / f"ferplus_{split}.csv"
    if not csv_path.is_file():
        return targets, usable
    row_of = {str(it.path.relative_to(Path(root) / split)): i for i, it in enumerate(items)}
    with csv_path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            i = row_of.get(row["path"])
            if i is None:
                continue
            votes = np.zeros(k, np.float32)
            for column, label in FERPLUS_COLUMNS.items():
                if label is not None:
                    votes[labels.index(label)] += float(row[column])
            if float(row["not_face"]) >= NOT_A_FACE_VOTES:
                usable[i] = False
            if votes.sum() > 0:
                targets[i] = votes / votes.sum()
    return targets, usable


def frame_like_service(face: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """A tightly cut face image (uint8 [H, W] or [H, W, C]) framed as the service crops a video face."""
    from service.faces import crop_square, largest_face, prepare_face, to_gray

    gray = to_gray(face)
    side = gray.shape[0] * UPSCALE
    big = cv2.resize(gray, (side, side), interpolation=cv2.INTER_CUBIC)
    canvas = cv2.copyMakeBorder(big, side // 2, side // 2, side // 2, side // 2, cv2.BORDER_REPLICATE)
    box = largest_face(canvas)
    if box is None:
        w = round(AVERAGE_BOX * side)
        box = (side // 2 + (side - w) // 2, side // 2 + (side - w) // 2, w, w)
    return prepare_face(crop_square(canvas, box), spec)


def load_framed_faces(items: list[data.Item], spec: ModelSpec, cache_dir: Path = data.DEFAULT_CACHE) -> np.ndarray:
    """uint8 [N, S, S, C]: `frame_like_service` of every image (cached)."""
    kind = f"framed-faces-{DETECTOR_FILE.stem}"  # the detector frames them: its own cache
    frame = functools.partial(frame_like_service, spec=spec)
    return data.cached_images(items, spec, cache_dir, kind, frame, grayscale=True)
