"""Service settings: one pydantic-settings model, read from `FOALNET_*` environment variables.

`foalnet serve` mirrors every field as a flag with the same env var, so the two never disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.cpu import thread_plan

MODEL_FILE = Path("weights") / "foalnet-lite.onnx"
ENV_PREFIX = "FOALNET_"

Device = Literal["auto", "cuda", "cpu"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
LogFormat = Literal["text", "json"]


def default_model_path() -> Path:
    """`weights/foalnet-lite.onnx` of the source checkout, else of the working directory.

    A checkout (or an editable install) has `weights/` next to the `service` package; a wheel
    installed into site-packages does not, so there the model is looked for under the current
    directory (the Docker image's WORKDIR), or set with FOALNET_MODEL_PATH.
    """
    beside_package = Path(__file__).resolve().parents[1] / MODEL_FILE
    return beside_package if beside_package.exists() else Path.cwd() / MODEL_FILE


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 in containers).")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port.")
    model_path: Path = Field(default_factory=default_model_path, description="ONNX model file.")
    device: Device = Field(
        "auto", description="auto: CUDA if it can be had, else CPU (logged); cuda: fail without it."
    )
    intra_op_threads: int | None = Field(
        default_factory=lambda: thread_plan().intra_op_threads,
        ge=1,
        description="ONNX Runtime intra-op threads (default: half the CPUs this process may use).",
    )
    max_batch: int = Field(16, ge=1, description="Most windows in one inference batch.")
    max_wait_ms: float = Field(5.0, ge=0, description="Longest a window waits for a batch to fill.")
    queue_windows: int = Field(256, ge=1, description="Windows that may wait for the engine; beyond it 429.")
    buckets: Annotated[tuple[int, ...], NoDecode] = Field(
        (1, 2, 4, 8, 16, 32), description="Batch sizes the engine pads to (comma-separated)."
    )
    deadline_s: float = Field(
        60.0, gt=0, description="Default per-request deadline (X-Request-Timeout overrides)."
    )
    max_upload_mb: float = Field(200.0, gt=0, description="Largest upload accepted, in MB (10^6 bytes).")
    max_duration_s: float = Field(600.0, gt=0, description="Longest clip accepted, in seconds.")
    decode_timeout_s: float = Field(60.0, gt=0, description="Time limit of one decode.")
    decode_workers: int = Field(
        default_factory=lambda: thread_plan().decode_workers,
        ge=1,
        description="Uploads decoded at once (default: one per CPU this process may use).",
    )
    ffmpeg_threads: int = Field(
        default_factory=lambda: thread_plan().ffmpeg_threads,
        ge=1,
        description="Decoder threads per decode worker (default: 1; parallelism comes from the workers).",
    )
    decode_queue: int = Field(
        8, ge=0, description="Uploads that may wait for a decode worker; beyond it 429 at once."
    )
    max_uploads: int = Field(
        64, ge=1, description="Uploads being received at once; beyond it 429 before the body is read."
    )
    upload_idle_timeout_s: float = Field(
        15.0, gt=0, description="An upload that sends nothing for this long is cut (408 upload_timeout)."
    )
    unhealthy_restart_s: float = Field(
        300.0,
        gt=0,
        description="After the engine has failed (canary included) for this long, /livez answers 503 "
        "so an orchestrator restarts the process.",
    )
    tmp_dir: Path | None = Field(None, description="Directory for upload temp files (unset: the system's).")
    api_key: SecretStr | None = Field(
        None, description="Bearer token required by POST /predict (unset: open)."
    )
    metrics_port: int | None = Field(None, ge=1, le=65535, description="Also serve /metrics on this port.")
    graceful_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests may finish."
    )
    drain_s: float = Field(
        0.0,
        ge=0,
        description="On SIGTERM, keep the port open this long first, answering readiness and new "
        "requests with 503, so load balancers stop sending traffic (Kubernetes: use preStop instead).",
    )
    log_level: LogLevel = Field("info", description="Log level.")
    log_format: LogFormat = Field(
        "text", description="text, or json: one JSON object a line (request id, status, stage timings)."
    )

    @field_validator("buckets", mode="before")
    @classmethod
    def _parse_buckets(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(int(part) for part in value.replace(" ", "").split(",") if part)
        return value

    @field_validator("buckets")
    @classmethod
    def _check_buckets(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or min(value) < 1:
            raise ValueError("buckets must be positive batch sizes")
        return tuple(sorted(set(value)))

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def engine_buckets(self) -> tuple[int, ...]:
        """The buckets a batch of at most `max_batch` windows can use: larger ones would only be
        warmed (time and memory at start-up) and never run."""
        fits = next((b for b in self.buckets if b >= self.max_batch), self.buckets[-1])
        return tuple(b for b in self.buckets if b <= fits)


def env_var(field: str) -> str:
    """The environment variable that sets `field`."""
    return ENV_PREFIX + field.upper()
