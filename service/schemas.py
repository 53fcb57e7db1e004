"""Response models of the HTTP API (they also drive the OpenAPI page at /docs)."""

from __future__ import annotations

from pydantic import BaseModel, Field

Probabilities = dict[str, float]


class Alignment(BaseModel):
    """How well voice and face agree (only where both are present)."""

    similarity: float = Field(
        description="AVEL cosine of the projected audio and video embeddings, in [-1, 1]."
    )
    audio: float = Field(
        description="MEM probability that the voice matches the face's emotion (audio queries video)."
    )
    video: float = Field(
        description="MEM probability that the face matches the voice's emotion (video queries audio)."
    )


class AudioView(BaseModel):
    present: bool = Field(description="Some window had an audio track.")
    probabilities: Probabilities | None = Field(
        description="Audio-only head, averaged over windows with audio."
    )


class VideoView(BaseModel):
    present: bool = Field(description="Some window had a face (or a frame, for whole-frame models).")
    frames_with_face: int = Field(description="Sampled frames in which a face was found.")
    frames: int = Field(description="Frames sampled from the video stream.")
    probabilities: Probabilities | None = Field(
        description="Video-only head, averaged over windows with faces."
    )


class Modalities(BaseModel):
    audio: AudioView
    video: VideoView


class Segment(BaseModel):
    """One model window of the clip's timeline."""

    start: float = Field(description="Seconds from the start of the clip.")
    end: float
    emotion: str | None = Field(
        description="Most likely label; null where the window has neither voice nor face."
    )
    probabilities: Probabilities | None
    confidence: float | None = Field(
        None, description="Calibrated probability of `emotion`; null where the window has neither voice nor face."
    )
    uncertain: bool | None = Field(
        None, description="True when `confidence` is below the service's threshold (see /info): read it as 'not sure'."
    )
    alignment: Alignment | None = Field(description="Null unless the window has both voice and face.")


class ModelInfo(BaseModel):
    name: str
    version: str
    provider: str = Field(description="ONNX Runtime execution provider, e.g. CUDAExecutionProvider.")


class Timings(BaseModel):
    """Milliseconds per stage of this request."""

    upload: float
    decode_queue: float = Field(description="Waiting for a free decode worker.")
    decode: float
    faces: float
    queue: float
    infer: float
    total: float


class Prediction(BaseModel):
    emotion: str = Field(description="Most likely label for the whole clip.")
    probabilities: Probabilities = Field(
        description="Duration-weighted mean over windows of each window's result."
    )
    confidence: float = Field(
        description="Probability of `emotion` (the model's heads are temperature-calibrated on validation data)."
    )
    uncertain: bool = Field(
        description="True when `confidence` is below the service's threshold: the answer is a guess, say 'not sure'."
    )
    modalities: Modalities
    alignment: Alignment | None = Field(description="Clip-level agreement; null when a modality is missing.")
    segments: list[Segment]
    duration_s: float
    model: ModelInfo
    timings_ms: Timings


class ErrorBody(BaseModel):
    error: str = Field(description="Machine-readable code, e.g. too_large (see the error table).")
    detail: str = Field(description="A sentence saying what was wrong.")
    request_id: str | None = Field(
        None, description="The request's id (X-Request-Id): quote it when reporting a problem."
    )
