"""The model contract: the one place that says what a Foal-Net ONNX file takes and gives.

The exporter writes a `ModelSpec` into the ONNX metadata; the service, the evaluator and the
Triton config generator read it back, so every preprocessing fact travels with the model file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

SAMPLE_RATE = 16_000  # Hz, mono, for every configuration

# Shipped (lite) labels: RAVDESS `calm` is merged into neutral, FER `fear`/`surprise` renamed.
LABELS_7: tuple[str, ...] = ("neutral", "happy", "sad", "angry", "fearful", "disgust", "surprised")
# Paper configuration: IEMOCAP's four classes (excited merged into happy).
LABELS_IEMOCAP: tuple[str, ...] = ("neutral", "happy", "sad", "angry")

# Graph I/O names, dtypes and shapes. B is the dynamic batch axis; the rest come from the spec.
INPUT_AUDIO = "audio"  # float32 [B, S]   S = window_samples, 16 kHz mono in [-1, 1]
INPUT_AUDIO_LEN = "audio_len"  # int64 [B]   valid samples (0 = no audio)
INPUT_FRAMES = "frames"  # uint8 [B, F, H, W, C]   F = frames_per_window, H = W = frame_size
INPUT_FRAMES_LEN = "frames_len"  # int64 [B]   valid frames (0 = no face / no video)
INPUTS: tuple[str, ...] = (INPUT_AUDIO, INPUT_AUDIO_LEN, INPUT_FRAMES, INPUT_FRAMES_LEN)

OUTPUT_PROBS = "probs"  # float32 [B, K] fused emotion probabilities
OUTPUT_AUDIO_PROBS = "audio_probs"  # float32 [B, K] audio-only head
OUTPUT_VIDEO_PROBS = "video_probs"  # float32 [B, K] video-only head
OUTPUT_SIMILARITY = "similarity"  # float32 [B] AVEL cosine of projected audio / video embeddings
OUTPUT_MATCH_A2V = "match_a2v"  # float32 [B] MEM P(same emotion), audio queries video
OUTPUT_MATCH_V2A = "match_v2a"  # float32 [B] MEM P(same emotion), video queries audio
OUTPUTS: tuple[str, ...] = (
    OUTPUT_PROBS,
    OUTPUT_AUDIO_PROBS,
    OUTPUT_VIDEO_PROBS,
    OUTPUT_SIMILARITY,
    OUTPUT_MATCH_A2V,
    OUTPUT_MATCH_V2A,
)

METADATA_KEY = "foalnet.spec"  # ONNX metadata_props key holding ModelSpec as JSON

Colour = Literal["gray", "rgb"]
FrameMode = Literal["face", "whole", "clip_crop"]


@dataclass(frozen=True)
class ModelSpec:
    """Preprocessing and identity facts a model file carries about itself."""

    name: str
    version: str
    labels: tuple[str, ...]
    window_s: float  # seconds of audio and video one model input covers
    frames_per_window: int  # frames sampled uniformly across a window
    frame_size: int  # H = W of each frame the model sees
    colour: Colour  # "gray" -> C = 1, "rgb" -> C = 3
    frame_mode: FrameMode  # "face": largest face crop; "whole": the whole frame, letterboxed;
    # "clip_crop": the whole frame resized on its shortest side and centre-cropped (CLIP's own preprocessing)
    sample_rate: int = SAMPLE_RATE
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def window_samples(self) -> int:
        return int(round(self.window_s * self.sample_rate))

    @property
    def channels(self) -> int:
        return 1 if self.colour == "gray" else 3

    @property
    def frames_fps(self) -> float:
        """Frame sampling rate that puts `frames_per_window` frames in one window."""
        return self.frames_per_window / self.window_s

    @property
    def frames_shape(self) -> tuple[int, int, int, int]:
        return (self.frames_per_window, self.frame_size, self.frame_size, self.channels)

    def to_json(self) -> str:
        data = asdict(self)
        data["labels"] = list(self.labels)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        data = json.loads(text)
        data["labels"] = tuple(data["labels"])
        return cls(**data)


# The shipped lite model: 4 s windows (a RAVDESS sentence fits), 1.5 face crops a second (6 kept the CNN
# model of 1.x within 10 ms a window on 2 CPU cores; 8 took ~11), FER-sized.
LITE_SPEC = ModelSpec(
    name="foalnet-lite",
    version="2.4.0",
    labels=LABELS_7,
    window_s=4.0,
    frames_per_window=6,
    frame_size=48,
    colour="gray",
    frame_mode="face",
)

# The paper configuration (the released Foal-Net): 6 s of WavLM audio; up to 180 whole RGB frames
# (every frame at 30 fps) cropped as CLIP's processor does, 224 px for ViT-L/14.
PAPER_SPEC = ModelSpec(
    name="foalnet-paper",
    version="2.0.0",
    labels=LABELS_IEMOCAP,
    window_s=6.0,
    frames_per_window=180,
    frame_size=224,
    colour="rgb",
    frame_mode="clip_crop",
)
