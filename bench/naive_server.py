"""The naive baseline `foalnet bench` compares the service with: what a user could write in an afternoon.

The same model in torch eager, behind a minimal FastAPI endpoint: the whole upload read into memory,
ffprobe plus one ffmpeg call per stream (audio, then full-size frames), the service's face detector,
one forward pass per request over that request's windows, and one request at a time (a lock). No
cross-request batching, no queue, no ONNX Runtime.

Weights: `--checkpoint` (a `foalnet train` checkpoint), else the first of `<model>.pt` beside the ONNX
file, `runs/lite/fused.pt` (where `foalnet train` writes the lite model by default) and
`FoalNet(FoalNetConfig())` seeded with 0 (exactly what `export_untrained_lite` exports) whose outputs
match the ONNX file's on random inputs; each has its weights rounded to float16 precision first, as the
exporter does. `/info` says which, and whether they match (`parity`); the
compute per window is the same either way as long as the architecture is.

Run: `python -m bench.naive_server --model weights/foalnet-lite.onnx --port 8001` (needs the `train`
extra: torch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import uvicorn
from fastapi import FastAPI, UploadFile

from model_export.export import PARITY_TOL, random_inputs, read_spec
from model_export.model import FoalNet, FoalNetConfig, load_checkpoint
from model_export.weight_storage import round_for_storage
from service.contract import INPUTS, OUTPUT_PROBS, ModelSpec
from service.faces import FaceCropper

UNTRAINED_SEED = 0
TRAIN_CHECKPOINT = Path("runs/lite/fused.pt")  # `foalnet train`'s default output, relative to its cwd


def load_model(onnx_path: Path, checkpoint: Path | None) -> tuple[FoalNet, dict]:
    """The torch model with the ONNX file's weights, and where they came from.

    Without `checkpoint`, the candidates are tried in order and the first whose outputs match the ONNX
    file's is taken; when none matches, the first is used and `parity` says so.
    """
    if checkpoint is not None:
        candidates = [checkpoint]
    else:
        candidates = [p for p in (onnx_path.with_suffix(".pt"), TRAIN_CHECKPOINT) if p.is_file()] + [None]
    feeds = random_inputs(read_spec(onnx_path), 2)
    expected = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run([OUTPUT_PROBS], feeds)[0]
    first = None
    for candidate in candidates:
        if candidate is None:
            torch.manual_seed(UNTRAINED_SEED)
            model, source = FoalNet(FoalNetConfig()).eval(), f"FoalNetConfig() seeded with {UNTRAINED_SEED}"
        else:
            model, source = load_checkpoint(candidate), str(candidate)
        round_for_storage(model)  # as the exporter did before it wrote the file
        try:
            with torch.no_grad():
                got = model(*(torch.from_numpy(feeds[name]) for name in INPUTS))[OUTPUT_PROBS].numpy()
            diff = float(np.abs(got - expected).max())
        except RuntimeError:  # a different architecture does not even take the inputs
            diff = float("inf")
        info = {"weights": source, "max_abs_diff": diff, "parity": diff <= PARITY_TOL}
        if info["parity"]:
            return model, info
        first = first or (model, info)
    return first


def _ffmpeg(args: list[str]) -> bytes:
    return subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", *args], capture_output=True, check=True).stdout


def decode_audio(path: str, spec: ModelSpec) -> np.ndarray:
    raw = _ffmpeg(["-i", path, "-vn", "-ac", "1", "-ar", str(spec.sample_rate), "-f", "f32le", "-"])
    return np.frombuffer(raw, np.float32)


def decode_frames(path: str, spec: ModelSpec) -> np.ndarray:
    """Full-size frames at the model's frame rate (gray or RGB per the spec)."""
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=width,height", "-of", "json",
         path],
        capture_output=True, check=True,
    )
    size = json.loads(probe.stdout)["streams"][0]
    pix_fmt = "gray" if spec.channels == 1 else "rgb24"
    raw = _ffmpeg(["-i", path, "-an", "-vf", f"fps={spec.frames_fps}", "-f", "rawvideo", "-pix_fmt", pix_fmt, "-"])
    return np.frombuffer(raw, np.uint8).reshape(-1, size["height"], size["width"], spec.channels)


def windows(audio: np.ndarray, crops: np.ndarray, found: np.ndarray, spec: ModelSpec) -> list[np.ndarray]:
    """Consecutive windows of spec.window_s: audio zero-padded, the faces of the frames inside it."""
    duration = max(len(audio) / spec.sample_rate, len(found) / spec.frames_fps)
    n = max(1, int(np.ceil(duration / spec.window_s - 1e-6)))
    s, f = spec.window_samples, spec.frames_per_window
    batch = [np.zeros((n, s), np.float32), np.zeros(n, np.int64), np.zeros((n, *spec.frames_shape), np.uint8),
             np.zeros(n, np.int64)]
    for i in range(n):
        clip = audio[i * s : (i + 1) * s]
        batch[0][i, : len(clip)], batch[1][i] = clip, len(clip)
        faces = crops[i * f : (i + 1) * f][found[i * f : (i + 1) * f]]
        batch[2][i, : len(faces)], batch[3][i] = faces, len(faces)
    return batch


def create_app(onnx_path: Path, checkpoint: Path | None = None) -> FastAPI:
    spec = read_spec(onnx_path)
    model, provenance = load_model(onnx_path, checkpoint)
    cropper = FaceCropper(spec)
    lock = threading.Lock()
    app = FastAPI(title="Foal-Net naive baseline")

    @app.get("/readyz")
    def readyz() -> dict:
        return {"ready": True}

    @app.get("/info")
    def info() -> dict:
        return {"model": str(onnx_path), "torch_threads": torch.get_num_threads(), **provenance}

    @app.post("/predict")
    def predict(file: UploadFile) -> dict:
        with lock, tempfile.NamedTemporaryFile(suffix=Path(file.filename or "clip").suffix) as tmp:
            tmp.write(file.file.read())
            tmp.flush()
            audio = decode_audio(tmp.name, spec)
            crops, found = cropper(decode_frames(tmp.name, spec))
            feeds = windows(audio, crops, found, spec)
            with torch.no_grad():
                probs = model(*(torch.from_numpy(array) for array in feeds))[OUTPUT_PROBS].mean(0)
        return {"emotion": spec.labels[int(probs.argmax())], "probabilities": dict(zip(spec.labels, probs.tolist()))}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the ONNX file whose spec (and weights) to use")
    parser.add_argument("--checkpoint", type=Path, help="torch checkpoint with the same weights")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model, args.checkpoint), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
