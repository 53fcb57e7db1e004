"""Face crops for the video branch: OpenCV's Haar cascade, the largest face per frame.

Detection runs on a gray copy downscaled to DETECT_SIDE for speed; the box is mapped back, made
square, widened by FACE_MARGIN (FER2013 faces are framed tightly: brows to chin, little hair or
background) and cut from the full-resolution frame. `prepare_face` is the one place that turns a
crop into what the model sees (size, colour); training applies it to FER images too.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from service.contract import ModelSpec

CASCADE_FILE = "haarcascade_frontalface_default.xml"
DETECT_SIDE = 320  # longer side of the gray frame the cascade scans
SCALE_FACTOR = 1.15  # cascade pyramid step (1.1 finds the same talking-head faces, 1.6x slower)
MIN_NEIGHBORS = 5  # detections that must agree; higher = fewer false faces
MIN_FACE = 24  # pixels at DETECT_SIDE; smaller faces are ignored
FACE_MARGIN = 0.1  # fraction of the box side added on every side of the Haar box
# Tracking: between full scans, look for the face only around where it was, at a small scale.
FULL_SCAN_EVERY = 8  # frames (one lite window); a full scan also runs whenever the face is lost
TRACK_FACE_PX = 40  # the previous face is scanned at about this size (the cascade's window is 24)
TRACK_RANGE = (0.6, 1.6)  # face size allowed relative to the previous one

_local = threading.local()  # a CascadeClassifier is not safe to share across threads


def _cascade() -> cv2.CascadeClassifier:
    cascade = getattr(_local, "cascade", None)
    if cascade is None:
        cascade = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADE_FILE)
        if cascade.empty():
            raise RuntimeError(f"OpenCV could not load {CASCADE_FILE} from {cv2.data.haarcascades}")
        _local.cascade = cascade
    return cascade


def to_gray(image: np.ndarray) -> np.ndarray:
    """[H, W] uint8 from [H, W], [H, W, 1] or RGB [H, W, 3]."""
    if image.ndim == 2:
        return image
    if image.shape[2] == 1:
        return image[:, :, 0]
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def _colour(image: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """[H, W, C] with C = spec.channels; gray input is replicated for RGB models."""
    if spec.channels == 1:
        return to_gray(image)[:, :, None]
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(to_gray(image), cv2.COLOR_GRAY2RGB)
    return image


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    shrink = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def prepare_face(image: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """A face crop (uint8 gray or RGB, ideally square; others are stretched) as the model's
    uint8 [S, S, C] input: resized to spec.frame_size, converted to spec.colour."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    size = spec.frame_size
    resized = _resize(image, size, size)
    return np.ascontiguousarray(_colour(resized, spec)).reshape(size, size, spec.channels)


def letterbox(image: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """A whole frame fitted inside spec.frame_size square, aspect kept, black bars."""
    size = spec.frame_size
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    framed = np.zeros((size, size, spec.channels), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    framed[top : top + nh, left : left + nw] = _colour(_resize(image, nw, nh), spec).reshape(nh, nw, -1)
    return framed


def centre_crop(image: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """CLIP's preprocessing of a whole frame: resized (bicubic) so its shortest side is
    spec.frame_size, then the centre square."""
    size = spec.frame_size
    h, w = image.shape[:2]
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    resized = cv2.resize(np.ascontiguousarray(image), (nw, nh), interpolation=cv2.INTER_CUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    square = resized[top : top + size, left : left + size]
    return np.ascontiguousarray(_colour(square, spec)).reshape(size, size, spec.channels)


Box = tuple[int, int, int, int]  # x, y, w, h in full-frame pixels


def _largest(gray: np.ndarray, scale: float, min_side: int, max_side: int = 0) -> Box | None:
    """The largest cascade box on `gray` resized by `scale`, in `gray`'s pixels."""
    h, w = gray.shape
    small = _resize(gray, max(1, round(w * scale)), max(1, round(h * scale))) if scale < 1 else gray
    scale = min(scale, 1.0)
    boxes = _cascade().detectMultiScale(
        small,
        scaleFactor=SCALE_FACTOR,
        minNeighbors=MIN_NEIGHBORS,
        minSize=(min_side, min_side),
        maxSize=(max_side, max_side),
    )
    if len(boxes) == 0:
        return None
    x, y, bw, bh = max(boxes, key=lambda b: int(b[2]) * int(b[3]))
    return tuple(int(round(v / scale)) for v in (x, y, bw, bh))  # type: ignore[return-value]


def largest_face(gray: np.ndarray) -> Box | None:
    """(x, y, w, h) of the largest Haar face in the whole frame, or None."""
    return _largest(gray, DETECT_SIDE / max(gray.shape), MIN_FACE)


def face_near(gray: np.ndarray, box: Box) -> Box | None:
    """The largest face of about `box`'s size within one box width around it, or None."""
    x, y, w, h = box
    x0, y0 = max(0, x - w), max(0, y - h)
    roi = gray[y0 : y + 2 * h, x0 : x + 2 * w]
    scale = TRACK_FACE_PX / w
    lo, hi = (max(MIN_FACE, int(r * w * min(scale, 1.0))) for r in TRACK_RANGE)
    found = _largest(roi, scale, lo, hi)
    return None if found is None else (found[0] + x0, found[1] + y0, found[2], found[3])


def crop_square(image: np.ndarray, box: tuple[int, int, int, int], margin: float = FACE_MARGIN) -> np.ndarray:
    """The square around `box` widened by `margin` per side; parts outside the frame replicate
    its edge so the crop stays square and centred on the face."""
    x, y, w, h = box
    side = int(round(max(w, h) * (1 + 2 * margin)))
    x0, y0 = x + w // 2 - side // 2, y + h // 2 - side // 2
    x1, y1 = x0 + side, y0 + side
    H, W = image.shape[:2]
    crop = image[max(y0, 0) : min(y1, H), max(x0, 0) : min(x1, W)]
    pad = (max(-y0, 0), max(y1 - H, 0), max(-x0, 0), max(x1 - W, 0))
    return cv2.copyMakeBorder(crop, *pad, cv2.BORDER_REPLICATE) if any(pad) else crop


class FaceCropper:
    """frames uint8 [N, H, W, C] -> (crops uint8 [N, S, S, C], found bool [N]).

    spec.frame_mode == "face": the largest face per frame (zeros and found=False without one);
    "whole": every frame letterboxed, "clip_crop": every frame centre-cropped; found=True."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        if spec.frame_mode == "face":
            _cascade()  # load now: a missing cascade file fails at start-up, not on a request

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, c = self.spec.frame_size, self.spec.channels
        crops = np.zeros((len(frames), s, s, c), np.uint8)
        found = np.zeros(len(frames), bool)
        tracker = FaceTracker()
        for i, frame in enumerate(frames):
            crop = self.crop(frame, tracker)
            if crop is not None:
                crops[i], found[i] = crop, True
        return crops, found

    def crop(self, frame: np.ndarray, tracker: FaceTracker) -> np.ndarray | None:
        """One frame of a clip, in order (the tracker carries the clip's last box): the model's
        [S, S, C] input, or None without a face. Streaming decodes call this frame by frame."""
        if self.spec.frame_mode == "whole":
            return letterbox(frame, self.spec)
        if self.spec.frame_mode == "clip_crop":
            return centre_crop(frame, self.spec)
        box = tracker(frame)
        return None if box is None else prepare_face(crop_square(frame, box), self.spec)

    @staticmethod
    def boxes(frames: np.ndarray) -> list[Box | None]:
        """The face box per frame (see FaceTracker)."""
        tracker = FaceTracker()
        return [tracker(frame) for frame in frames]


class FaceTracker:
    """One clip's frames, in order -> the face box of each: a full scan every FULL_SCAN_EVERY
    frames (and whenever the face was lost), in between a cheap search around the previous box.
    A larger face that appears elsewhere is picked up at the next full scan."""

    def __init__(self) -> None:
        self.previous: Box | None = None
        self.index = 0

    def __call__(self, frame: np.ndarray) -> Box | None:
        gray = to_gray(frame)
        box = None
        if self.previous is not None and self.index % FULL_SCAN_EVERY:
            box = face_near(gray, self.previous)
        self.previous = box or largest_face(gray)
        self.index += 1
        return self.previous
