"""The HTTP API: FastAPI app factory, lifespan (start and stop the `runtime.Service`), routes and
error handling.

`create_app(settings)` builds everything; `uvicorn --factory service.app:create_app` or
`foalnet serve` run it. The request path (runtime.py) is upload → decode workers → batcher → answer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import observability, v2
from service.engine import Engine
from service.errors import STATUS, ApiError, ErrorCode
from service.runtime import Service
from service.schemas import ErrorBody, Prediction
from service.settings import Settings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}


ERROR_RESPONSES = {
    status: {"model": ErrorBody, "description": ", ".join(c.value for c, s in STATUS.items() if s == status)}
    for status in sorted(set(STATUS.values()))
}

PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}},
            }
        },
        "video/*": {"schema": {"type": "string", "format": "binary"}},
        "audio/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> FastAPI:
    """The app. `engine` lets tests share one loaded model across apps."""
    settings = settings or Settings()
    service = Service(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="Foal-Net emotion recognition",
        description="Upload a short talking-face clip; get the emotion from voice and face.",
        version="1",
        lifespan=lifespan,
        telemetry=observability.TELEMETRY,
    )
    app.state.service = service
    app.add_middleware(observability.RequestMiddleware)

    def error_response(
        code: ErrorCode, detail: str, retry_after_s: float | None = None, close: bool = False
    ) -> JSONResponse:
        service.metrics.rejections.labels(code.value).inc()
        body = observability.error_body(code.value, detail)
        headers = {observability.REQUEST_ID_HEADER: body["request_id"]} if body["request_id"] else {}
        if retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
        if code is ErrorCode.UNAUTHORIZED:
            headers["WWW-Authenticate"] = "Bearer"
        if close:  # the body was cut off unread: uvicorn closes the connection after this answer
            headers["Connection"] = "close"
        return JSONResponse(body, STATUS[code], headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.code, exc.detail, exc.retry_after_s, exc.close_connection)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.INVALID_REQUEST)
        detail = f"{request.method} {request.url.path}: {exc.detail}"
        response = error_response(code, detail)
        response.status_code = exc.status_code
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(ErrorCode.INVALID_REQUEST, "; ".join(str(e.get("msg")) for e in exc.errors()))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected failure in %s %s", request.method, request.url.path)
        return error_response(
            ErrorCode.INTERNAL_ERROR, f"unexpected {type(exc).__name__}; see the service log"
        )

    @app.post(
        "/predict",
        response_model=Prediction,
        responses=ERROR_RESPONSES,
        openapi_extra={"requestBody": PREDICT_BODY},
        summary="Recognise the emotion in a clip",
    )
    async def predict(request: Request) -> Prediction | Response:
        """Send a clip as multipart `file` or as the raw body (video/*, audio/*, application/octet-stream).

        Optional headers: `Authorization: Bearer <key>` (when the service has an API key),
        `X-Request-Timeout: <seconds>` (the deadline; 504 when it passes).
        """
        return await service.predict(request)

    def health(ok: bool, reason: str = "") -> JSONResponse:
        if ok:
            return JSONResponse({"status": "ok"})
        return error_response(ErrorCode.NOT_READY, reason)

    @app.get("/livez", summary="The process is alive (503: the engine stayed unhealthy; restart it)")
    async def livez() -> JSONResponse:
        unhealthy_s = service.watch.unhealthy_s if service.watch else 0.0
        return health(service.live, f"the engine has failed every inference for {unhealthy_s:.0f} s")

    @app.get(
        "/readyz",
        summary="The model is loaded and warm, and the service takes traffic",
        responses={503: {"model": ErrorBody}},
    )
    async def readyz() -> JSONResponse:
        return health(service.ready, service.not_ready_reason())

    app.include_router(v2.router)

    @app.get("/info", summary="Model, provider, limits and batching settings")
    async def info() -> dict:
        return service.info()

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if STATIC_DIR.is_dir():  # after every API route: the page must not shadow them
        api_paths = {route.path for route in app.routes if hasattr(route, "methods")}
        app.mount("/", _Page(api_paths, directory=STATIC_DIR, html=True), name="static")
    return app


class _Page(StaticFiles):
    """The web page at `/`. A mount at `/` matches every path, so an API path reached with the
    wrong method (GET /predict) would land here as a 404; it stays a 405."""

    def __init__(self, api_paths: set[str], **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.api_paths = api_paths

    async def get_response(self, path: str, scope: dict) -> Response:
        if scope["path"] in self.api_paths:
            raise StarletteHTTPException(405)
        return await super().get_response(path, scope)
