"""A Python client for the service: upload a clip, get a typed `Prediction`.

    from service.client import Client
    with Client("http://127.0.0.1:8000") as client:
        prediction = client.predict("talk.mp4", deadline_s=30)
        print(prediction.emotion, prediction.probabilities)

It sends the raw file (streamed from disk), an `X-Request-Id` (yours or a new one, the same on every
retry) and `X-Request-Timeout` (what is left of the deadline, so the server gives up when the caller
does). 429 and 503 are retried after the server's `Retry-After` (else a short backoff), as are
refused connections, a bounded number of times and never past the deadline. Any other error answer
raises `ServiceError` with the server's code, detail and request id.
"""

from __future__ import annotations

import json
import mimetypes
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from service.schemas import ErrorBody, Prediction, Segment

REQUEST_ID_HEADER = "X-Request-Id"  # service/observability.py's; that module is server-side only
NDJSON = "application/x-ndjson"
RETRY_STATUSES = frozenset({429, 503})
# Added to the HTTP timeout over the deadline, so the server's own 504 arrives before it.
TIMEOUT_GRACE_S = 2.0

Media = str | Path | bytes


class ServiceError(Exception):
    """An error answer from the service (or no answer before the deadline: code deadline_exceeded)."""

    def __init__(self, status: int | None, code: str, detail: str, request_id: str | None) -> None:
        super().__init__(f"{status or 'no answer'} {code}: {detail} (request id {request_id})")
        self.status = status
        self.code = code
        self.detail = detail
        self.request_id = request_id


@dataclass(frozen=True)
class _Call:
    request_id: str
    deadline: float  # time.monotonic()


class Client:
    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        deadline_s: float = 60.0,
        retries: int = 3,
        max_retry_wait_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """`deadline_s`: default time for one call, retries included; `retries`: extra attempts
        after a 429/503 or a refused connection; `max_retry_wait_s`: longest wait between two."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.deadline_s = deadline_s
        self.retries = retries
        self.max_retry_wait_s = max_retry_wait_s
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---- calls ---------------------------------------------------------------------------------

    def predict(
        self, media: Media, *, deadline_s: float | None = None, request_id: str | None = None
    ) -> Prediction:
        """The service's answer for one clip (a path or its bytes)."""
        call = self._call(deadline_s, request_id)
        with self._send(call, media, accept="application/json") as response:
            response.read()
            return Prediction.model_validate_json(response.content)

    def predict_stream(
        self, media: Media, *, deadline_s: float | None = None, request_id: str | None = None
    ) -> Iterator[Segment | Prediction]:
        """Each window's `Segment` as the server finishes it, then the whole `Prediction`.

        Asks for `application/x-ndjson`; a server that does not stream answers JSON, and then the
        segments come from that one answer (all at once)."""
        call = self._call(deadline_s, request_id)
        with self._send(call, media, accept=f"{NDJSON}, application/json") as response:
            if not response.headers.get("content-type", "").startswith(NDJSON):
                response.read()
                prediction = Prediction.model_validate_json(response.content)
                yield from prediction.segments
                yield prediction
                return
            for line in response.iter_lines():
                if line.strip():
                    yield _stream_item(json.loads(line), call.request_id)

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def info(self) -> dict[str, Any]:
        response = self._http.get("/info", timeout=10)
        _raise_for_error(response, response.headers.get(REQUEST_ID_HEADER))
        return response.json()

    # ---- machinery -----------------------------------------------------------------------------

    def _call(self, deadline_s: float | None, request_id: str | None) -> _Call:
        seconds = self.deadline_s if deadline_s is None else deadline_s
        return _Call(request_id or uuid.uuid4().hex, time.monotonic() + seconds)

    @contextmanager
    def _send(self, call: _Call, media: Media, *, accept: str) -> Iterator[httpx.Response]:
        """POST /predict until an answer that is not retried; yields it, open for streaming."""
        for attempt in range(self.retries + 1):
            left = call.deadline - time.monotonic()
            if left <= 0:
                raise ServiceError(None, "deadline_exceeded", "the deadline passed", call.request_id)
            headers = {
                REQUEST_ID_HEADER: call.request_id,
                "X-Request-Timeout": f"{left:.3f}",
                "Accept": accept,
            }
            try:
                with _body(media) as (content, content_type):
                    headers["Content-Type"] = content_type
                    request = self._http.build_request(
                        "POST", "/predict", content=content, headers=headers, timeout=left + TIMEOUT_GRACE_S
                    )
                    response = self._http.send(request, stream=True)
            except httpx.ConnectError as exc:
                if attempt == self.retries:
                    raise
                self._wait(call, _backoff(attempt), exc)
                continue
            except httpx.TimeoutException:
                raise ServiceError(
                    None, "deadline_exceeded", "no answer before the deadline", call.request_id
                ) from None
            try:
                if response.status_code in RETRY_STATUSES and attempt < self.retries:
                    response.read()
                    wait = _retry_after(response) or _backoff(attempt)
                    self._wait(call, wait, _error(response, call.request_id))
                    continue
                if response.status_code >= 400:
                    response.read()
                    _raise_for_error(response, call.request_id)
                yield response
                return
            finally:
                response.close()

    def _wait(self, call: _Call, seconds: float, cause: Exception) -> None:
        """Sleep before a retry, or raise `cause` when the wait would pass the deadline."""
        seconds = min(seconds, self.max_retry_wait_s)
        if time.monotonic() + seconds >= call.deadline:
            raise cause
        time.sleep(seconds)


@contextmanager
def _body(media: Media) -> Iterator[tuple[bytes | BinaryIO, str]]:
    """The request body (a file is streamed from disk) and its content type."""
    if isinstance(media, bytes):
        yield media, "application/octet-stream"
        return
    path = Path(media)
    guessed = mimetypes.guess_type(path.name)[0] or ""
    content_type = guessed if guessed.startswith(("video/", "audio/")) else "application/octet-stream"
    with path.open("rb") as file:
        yield file, content_type


def _backoff(attempt: int) -> float:
    return 0.5 * 2**attempt


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):  # absent, or an HTTP date (this service sends seconds)
        return None


def _error(response: httpx.Response, request_id: str) -> ServiceError:
    try:
        body = ErrorBody.model_validate_json(response.content)
        return ServiceError(response.status_code, body.error, body.detail, body.request_id or request_id)
    except ValueError:
        return ServiceError(response.status_code, "http_error", response.text[:200], request_id)


def _raise_for_error(response: httpx.Response, request_id: str | None) -> None:
    if response.status_code >= 400:
        raise _error(response, request_id or "")


def _stream_item(item: dict[str, Any], request_id: str) -> Segment | Prediction:
    """One NDJSON line: an error, a window's segment, or the summary (the last line)."""
    if "error" in item:
        raise ServiceError(None, item["error"], item.get("detail", ""), item.get("request_id", request_id))
    return Segment.model_validate(item) if "start" in item else Prediction.model_validate(item)
