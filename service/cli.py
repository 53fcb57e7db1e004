"""`foalnet serve` and `foalnet predict`: the serving side's commands (`register` adds them to the
`foalnet` app of `foalnet_cli`).

Every `serve` flag mirrors a `Settings` field and reads the same `FOALNET_*` variable; a flag left
unset falls through to the variable, then to the field's default (the one place defaults live).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from service.engine import Engine, EngineError
from service.errors import ApiError
from service.observability import configure_logging, configure_tracing
from service.settings import Settings, env_var

log = logging.getLogger("foalnet")


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(predict)


def _opt(field: str, *flags: str, secret: bool = False) -> Any:
    """A typer option for a Settings field: its env var, its description and default in the help."""
    info = Settings.model_fields[field]
    default = (
        "unset"
        if secret
        else (info.get_default(call_default_factory=True) if info.default_factory else info.default)
    )
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    names = flags or ("--" + field.replace("_", "-"),)
    return typer.Option(
        *names,
        envvar=env_var(field),
        help=f"{info.description} " + escape(f"[default: {default}]"),
        show_envvar=True,
        show_default=False,
    )


def _settings(**flags: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from exc


def _load_engine(settings: Settings) -> Engine:
    try:
        return Engine(
            settings.model_path,
            device=settings.device,
            intra_op_threads=settings.intra_op_threads,
            buckets=settings.engine_buckets,
        )
    except EngineError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from exc


def serve(
    host: Annotated[str | None, _opt("host")] = None,
    port: Annotated[int | None, _opt("port")] = None,
    model_path: Annotated[Path | None, _opt("model_path", "--model-path", "--model")] = None,
    device: Annotated[str | None, _opt("device")] = None,
    intra_op_threads: Annotated[int | None, _opt("intra_op_threads")] = None,
    max_batch: Annotated[int | None, _opt("max_batch")] = None,
    max_wait_ms: Annotated[float | None, _opt("max_wait_ms")] = None,
    queue_windows: Annotated[int | None, _opt("queue_windows")] = None,
    buckets: Annotated[str | None, _opt("buckets")] = None,
    deadline_s: Annotated[float | None, _opt("deadline_s")] = None,
    max_upload_mb: Annotated[float | None, _opt("max_upload_mb")] = None,
    max_duration_s: Annotated[float | None, _opt("max_duration_s")] = None,
    decode_timeout_s: Annotated[float | None, _opt("decode_timeout_s")] = None,
    decode_workers: Annotated[int | None, _opt("decode_workers")] = None,
    decode_queue: Annotated[int | None, _opt("decode_queue")] = None,
    ffmpeg_threads: Annotated[int | None, _opt("ffmpeg_threads")] = None,
    max_uploads: Annotated[int | None, _opt("max_uploads")] = None,
    upload_idle_timeout_s: Annotated[float | None, _opt("upload_idle_timeout_s")] = None,
    unhealthy_restart_s: Annotated[float | None, _opt("unhealthy_restart_s")] = None,
    tmp_dir: Annotated[Path | None, _opt("tmp_dir")] = None,
    api_key: Annotated[str | None, _opt("api_key", secret=True)] = None,
    metrics_port: Annotated[int | None, _opt("metrics_port")] = None,
    graceful_timeout_s: Annotated[float | None, _opt("graceful_timeout_s")] = None,
    drain_s: Annotated[float | None, _opt("drain_s")] = None,
    log_level: Annotated[str | None, _opt("log_level")] = None,
    log_format: Annotated[str | None, _opt("log_format")] = None,
) -> None:
    """Run the HTTP service (API, /docs, the web page, /metrics).

    Traces go where the standard OTEL_* variables say (`pip install .[otel]`), e.g.
    OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318."""
    settings = _settings(**locals())
    from service.app import create_app

    configure_logging(settings.log_level, settings.log_format)
    tracing = configure_tracing()
    engine = _load_engine(settings)  # a bad model or an unavailable device fails here, clearly
    api = create_app(settings, engine=engine)
    config = uvicorn.Config(
        api,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers go through ours (text or JSON, with request ids)
        access_log=False,  # the service writes its own access line, with id and stage timings
        timeout_graceful_shutdown=int(settings.graceful_timeout_s),
        lifespan="on",
    )
    server = DrainingServer(config, api.state.service, drain_s=settings.drain_s)
    try:
        server.run()
    finally:
        if tracing is not None:
            tracing.shutdown()  # export the spans still batched
    if not server.started:
        raise typer.Exit(1)


class DrainingServer(uvicorn.Server):
    """uvicorn's Server that turns readiness and new /predict requests to 503 the moment
    SIGTERM/SIGINT arrives. After `drain_s` (at once by default; a second signal cuts it short)
    uvicorn stops accepting connections and lets in-flight requests finish (graceful timeout)."""

    def __init__(self, config: uvicorn.Config, service: Any, *, drain_s: float = 0.0) -> None:
        super().__init__(config)
        self.service = service
        self.drain_s = drain_s
        self._drain_timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.service.draining = True
        if self.drain_s > 0 and self._drain_timer is None:
            self._drain_timer = threading.Timer(self.drain_s, self._stop, (sig, frame))
            self._drain_timer.daemon = True
            self._drain_timer.start()
            return
        self._stop(sig, frame)

    def _stop(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises a captured signal once it has shut down, so the process would die of
        # SIGTERM after draining cleanly; a requested, completed shutdown exits 0 instead.
        self._captured_signals.clear()


def predict(
    videos: Annotated[list[Path], typer.Argument(help="Clips to analyse (any container ffmpeg reads).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")] = False,
    model_path: Annotated[Path | None, _opt("model_path", "--model", "--model-path")] = None,
    device: Annotated[str | None, _opt("device")] = None,
    intra_op_threads: Annotated[int | None, _opt("intra_op_threads")] = None,
    url: Annotated[
        str | None, typer.Option("--url", envvar="FOALNET_URL", help="A running service's base URL.")
    ] = None,
    api_key: Annotated[str | None, _opt("api_key", secret=True)] = None,
    deadline_s: Annotated[
        float, typer.Option("--deadline-s", help="With --url: seconds for each clip, retries included.")
    ] = 120.0,
) -> None:
    """Analyse clips in-process (the same pipeline and response as POST /predict), or with
    --url through a running service (retries on 429/503, deadline, request id)."""
    from service.client import ServiceError  # httpx: only `predict` needs it

    configure_logging("warning")
    predictor = _remote(url, api_key, deadline_s) if url else _local(model_path, device, intra_op_threads)
    out, err = Console(), Console(stderr=True)
    results: list[dict[str, Any]] = []
    failed = 0
    for video in videos:
        try:
            prediction = predictor(video)
        except (ApiError, ServiceError) as exc:
            failed += 1
            code = exc.code.value if isinstance(exc, ApiError) else exc.code
            results.append({"file": str(video), "error": code, "detail": exc.detail})
            err.print(f"[bold red]{video}[/]: {code}: {exc.detail}")
            continue
        results.append({"file": str(video), **prediction.model_dump(mode="json")})
        if not as_json:
            out.print(_table(video, prediction))
    if as_json:
        typer.echo(json.dumps(results if len(videos) > 1 else results[0], indent=2))
    if failed:
        raise typer.Exit(1)


def _local(model_path: Path | None, device: str | None, threads: int | None) -> Callable[[Path], Any]:
    from service.pipeline import Predictor

    settings = _settings(model_path=model_path, device=device, intra_op_threads=threads)
    return Predictor(_load_engine(settings), settings)


def _remote(url: str, api_key: str | None, deadline_s: float) -> Callable[[Path], Any]:
    from service.client import Client

    client = Client(url, api_key=api_key, deadline_s=deadline_s)
    return lambda video: client.predict(video)


def _pct(probabilities: dict[str, float] | None, label: str) -> str:
    return "" if not probabilities else f"{100 * probabilities[label]:.1f}%"


def _table(video: Path, p: Any) -> Table:
    audio, video_view = p.modalities.audio, p.modalities.video
    sources = " + ".join(
        n for n, present in (("voice", audio.present), ("face", video_view.present)) if present
    )
    caption = (
        f"{p.duration_s:.1f} s, {len(p.segments)} window(s), from {sources}; faces in "
        f"{video_view.frames_with_face}/{video_view.frames} frames; {p.model.name} {p.model.version} "
        f"on {p.model.provider}; {p.timings_ms.total:.0f} ms"
    )
    if p.alignment:
        caption += f"; voice-face similarity {p.alignment.similarity:+.2f}"
    table = Table(title=f"{video.name}: [bold]{p.emotion}[/]", caption=caption)
    for column in ("emotion", "fused", "voice", "face"):
        table.add_column(column, justify="left" if column == "emotion" else "right")
    for label in sorted(p.probabilities, key=p.probabilities.get, reverse=True):
        table.add_row(
            label,
            _pct(p.probabilities, label),
            _pct(audio.probabilities, label),
            _pct(video_view.probabilities, label),
            style="bold" if label == p.emotion else None,
        )
    return table

