"""The running service: what one app instance runs (engine, decode workers, batcher, engine watch,
metrics), its readiness and draining, and the path of one POST /predict (auth, deadline,
admission, upload, decode, batcher, answer). `service.app` puts HTTP routes in front of it.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from pathlib import Path

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import start_http_server
from starlette.requests import ClientDisconnect

from service import cpu, observability
from service.batcher import Batcher
from service.engine import Engine
from service.errors import ApiError, ErrorCode
from service.health import EngineWatch
from service.metrics import Metrics
from service.pipeline import UNCERTAIN_BELOW, Decoder
from service.schemas import ModelInfo, Prediction, Segment
from service.settings import Settings
from service.streaming import NDJSON, collect, ndjson_lines, predict_stream
from service.upload import Upload, UploadSlots, receive_upload

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for "the client went away before the answer"
MAX_REQUEST_TIMEOUT_S = 3600.0


class Service:
    """Everything one app instance runs: engine, decoder pool, batcher, metrics, readiness."""

    def __init__(
        self, settings: Settings, engine: Engine | None = None, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.engine = engine
        self.decoder: Decoder | None = None
        self.batcher: Batcher | None = None
        self.uploads = UploadSlots(settings.max_uploads)  # reserved before a body byte is read
        self.watch: EngineWatch | None = None  # canary and liveness while the engine is unhealthy
        self.draining = False
        self._metrics_server = None
        self.metrics.ready.set_function(lambda: float(self.ready))
        self.metrics.watch(self)

    @property
    def ready(self) -> bool:
        engine, batcher = self.engine, self.batcher
        return bool(engine and engine.warm and engine.healthy and batcher and batcher.running and not self.draining)

    def not_ready_reason(self) -> str:
        if self.draining:
            return "the service is shutting down"
        if self.engine is None or not self.engine.warm:
            return "the model is still loading"
        if not self.engine.healthy:
            return "the last inference failed; a canary inference retries it with backoff"
        if self.batcher is not None and self.batcher.restarts:
            return f"the batcher task died ({self.batcher.restarts} times so far); restarting it"
        return "the batcher is not running"

    @property
    def live(self) -> bool:
        """False once the engine has been unhealthy for `unhealthy_restart_s`: restart me."""
        return self.watch is None or self.watch.live

    async def start(self) -> None:
        s = self.settings
        if self.engine is None:
            self.engine = await asyncio.to_thread(
                Engine, s.model_path, device=s.device, intra_op_threads=s.intra_op_threads, buckets=s.engine_buckets
            )
        engine = self.engine
        cpu.apply_threads(decode_workers=s.decode_workers, intra_op=s.intra_op_threads, ffmpeg=s.ffmpeg_threads)
        self.metrics.model_info.labels(engine.spec.name, engine.spec.version, engine.provider).set(1)
        if not engine.warm:
            await asyncio.to_thread(engine.warmup)
        self.decoder = await asyncio.to_thread(Decoder, engine.spec, s)  # starts the decode workers
        self.batcher = Batcher(
            engine.infer,
            max_batch=s.max_batch,
            max_wait_ms=s.max_wait_ms,
            queue_windows=s.queue_windows,
            metrics=self.metrics,
        )
        self.batcher.start()
        self.watch = EngineWatch(engine, restart_after_s=s.unhealthy_restart_s)
        self.watch.start()
        if s.metrics_port:
            self._metrics_server, _ = start_http_server(
                s.metrics_port, addr=s.host, registry=self.metrics.registry
            )
        log.info("ready: %s %s on %s", engine.spec.name, engine.spec.version, engine.provider)

    async def stop(self) -> None:
        self.draining = True
        if self.watch:
            await self.watch.stop()
        if self.batcher:
            await self.batcher.stop()
        if self.decoder:
            self.decoder.close()
        if self._metrics_server:
            self._metrics_server.shutdown()

    # ---- /predict ------------------------------------------------------------------------------

    async def predict(self, request: Request) -> Prediction | Response:
        start = time.perf_counter()
        self.metrics.in_flight.inc()
        status = "500"
        try:
            result = await self._predict(request, start)
            status = str(result.status_code if isinstance(result, Response) else 200)
            return result
        except ApiError as exc:
            status = str(exc.status)
            raise
        except ClientDisconnect:
            status = str(CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.exception("unexpected failure in /predict")
                raise ApiError(ErrorCode.INTERNAL_ERROR, f"unexpected {exc!r}; see the service log") from exc
            status = "503"
            raise ApiError(ErrorCode.STORAGE_FULL, "no space left on the service's disk") from exc
        except Exception as exc:
            log.exception("unexpected failure in /predict")
            raise ApiError(
                ErrorCode.INTERNAL_ERROR, f"unexpected {type(exc).__name__}; see the service log"
            ) from exc
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(status).inc()
            self.metrics.request_duration.labels(status).observe(time.perf_counter() - start)

    async def _predict(self, request: Request, start: float) -> Prediction | Response:
        self._authorize(request)
        deadline = asyncio.get_running_loop().time() + self._timeout(request)
        if self.draining or not (self.decoder and self.batcher and self.engine):
            raise ApiError(ErrorCode.NOT_READY, self.not_ready_reason())
        self.decoder.check_room()  # refuse before reading the body; `stream` checks again after
        if NDJSON in request.headers.get("accept", ""):
            return await self._predict_ndjson(request, deadline, start)
        async with self._receive(request, deadline) as upload:
            self.metrics.stage_duration.labels("upload").observe(upload.seconds)
            work = asyncio.ensure_future(self._infer_upload(upload.path, upload.seconds, deadline, start))
            gone = asyncio.ensure_future(_disconnected(request))
            try:
                await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when this handler itself is cancelled
                gone.cancel()
                if not work.done():  # the client left: cancelling frees its batcher slots
                    work.cancel()
                    await asyncio.gather(work, return_exceptions=True)
            if work.cancelled():
                log.info("client disconnected before the answer; dropped its work")
                return Response(status_code=CLIENT_CLOSED)
            return work.result()

    def _receive(self, request: Request, deadline: float) -> AbstractAsyncContextManager[Upload]:
        s = self.settings
        return receive_upload(
            request,
            max_bytes=s.max_upload_bytes,
            slots=self.uploads,
            idle_timeout_s=s.upload_idle_timeout_s,
            deadline=deadline,  # the deadline covers the upload too
            tmp_dir=s.tmp_dir,
        )

    async def _infer_upload(self, path: Path, upload_s: float, deadline: float, start: float) -> Prediction:
        prediction = await collect(self._stream(path, upload_s, deadline, start))
        observability.record_timings(prediction.timings_ms.model_dump())
        return prediction

    async def _predict_ndjson(self, request: Request, deadline: float, start: float) -> Response:
        """One line per segment as it is ready, then the summary. Errors before the first line are
        the usual typed answers; the upload's temp file lives until the last line is sent."""
        stack = AsyncExitStack()
        try:
            upload = await stack.enter_async_context(self._receive(request, deadline))
            self.metrics.stage_duration.labels("upload").observe(upload.seconds)
            items = self._stream(upload.path, upload.seconds, deadline, start)
            stack.push_async_callback(items.aclose)
            first = await anext(items)
        except BaseException:
            await stack.aclose()
            raise
        return StreamingResponse(ndjson_lines(first, items, stack.aclose), media_type=NDJSON)

    def _stream(self, path: Path, upload_s: float, deadline: float, start: float) -> AsyncIterator[Segment | Prediction]:
        assert self.decoder and self.batcher and self.engine
        engine = self.engine
        return predict_stream(
            self.decoder, self.batcher, path,
            labels=engine.spec.labels,
            model=ModelInfo(name=engine.spec.name, version=engine.spec.version, provider=engine.provider),
            deadline=deadline, upload_s=upload_s, start=start,
            observe=lambda stage, seconds: self.metrics.stage_duration.labels(stage).observe(seconds),
        )

    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), key.get_secret_value().encode()
        ):
            raise ApiError(ErrorCode.UNAUTHORIZED, "POST /predict needs `Authorization: Bearer <api key>`")

    def _timeout(self, request: Request) -> float:
        header = request.headers.get("x-request-timeout")
        if header is None:
            return self.settings.deadline_s
        try:
            seconds = float(header)
        except ValueError:
            seconds = math.nan
        if not 0 < seconds <= MAX_REQUEST_TIMEOUT_S:
            raise ApiError(
                ErrorCode.INVALID_REQUEST,
                f"X-Request-Timeout must be seconds in (0, {MAX_REQUEST_TIMEOUT_S:g}]",
            )
        return seconds

    # ---- /info ---------------------------------------------------------------------------------

    def info(self) -> dict:
        if self.engine is None:
            raise ApiError(ErrorCode.NOT_READY, self.not_ready_reason())
        s, spec = self.settings, self.engine.spec
        return {
            "model": {
                "name": spec.name,
                "version": spec.version,
                "labels": list(spec.labels),
                "spec": spec.__dict__ | {"labels": list(spec.labels)},
                "path": str(self.engine.model_path),
            },
            "labels": list(spec.labels),
            "uncertain_below": UNCERTAIN_BELOW,
            "device": s.device,
            "provider": self.engine.provider,
            "fallback_reason": self.engine.fallback_reason,
            "ready": self.ready,
            "limits": {
                "max_upload_bytes": s.max_upload_bytes,
                "max_duration_s": s.max_duration_s,
                "decode_timeout_s": s.decode_timeout_s,
                "deadline_s": s.deadline_s,
                "decode_workers": s.decode_workers,
                "decode_queue": s.decode_queue,
                "max_uploads": s.max_uploads,
                "uploads_in_progress": self.uploads.in_progress,
                "upload_idle_timeout_s": s.upload_idle_timeout_s,
            },
            "batch": {
                "max_batch": s.max_batch,
                "max_wait_ms": s.max_wait_ms,
                "buckets": list(self.engine.buckets),
                "queue_windows": s.queue_windows,
                "queue_depth": self.batcher.depth if self.batcher else 0,
            },
            "auth": s.api_key is not None,
        }


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so only disconnects arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
