"""Receiving an upload: streamed from the request body straight into a size-capped temp file.

A raw body (`video/*`, `audio/*`, `application/octet-stream`) is written as it arrives; a
`multipart/form-data` body goes through python-multipart's streaming parser and only the `file`
field is written. Nothing is held in memory beyond one chunk, the cap is enforced while streaming,
and the temp file is removed when the `receive_upload` context exits, whatever happened.

The receiving phase is bounded too: an `UploadSlots` slot is reserved before the first body byte
is read (429 when none is free), every chunk must arrive within the idle timeout (408
`upload_timeout`) and the whole body before the request's deadline (504), and a full disk at any
step, the final flush included, is 503 `storage_full`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import ApiError, ErrorCode

FILE_FIELD = "file"
RAW_TYPES = ("video/", "audio/", "application/octet-stream")
MULTIPART = "multipart/form-data"
# Room for boundaries, part headers and small extra fields around the file in a multipart body.
MULTIPART_SLACK = 64 * 1024
TEMP_PREFIX = "foalnet-upload-"


@dataclass(frozen=True)
class Upload:
    path: Path
    size: int  # bytes of media written
    filename: str | None
    seconds: float  # time spent receiving


def _too_large(limit: int) -> ApiError:
    return ApiError(ErrorCode.TOO_LARGE, f"the upload is larger than the limit of {limit / 1e6:g} MB")


class UploadSlots:
    """At most `limit` uploads being received at once. `take()` reserves a slot at once (there is
    no await between the check and the count, so concurrent requests cannot all pass a check)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_progress = 0
        self._seconds = 1.0  # running mean of one upload, for Retry-After

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        if self.in_progress >= self.limit:
            raise ApiError(
                ErrorCode.OVERLOADED,
                f"{self.in_progress} uploads are being received (limit {self.limit})",
                retry_after_s=max(1.0, math.ceil(self._seconds)),
            )
        self.in_progress += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self.in_progress -= 1
            self._seconds = 0.8 * self._seconds + 0.2 * (time.perf_counter() - start)


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """A full disk (or quota) while doing `what` is 503 storage_full, not a crash."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ApiError(ErrorCode.STORAGE_FULL, f"no space left for {what}") from exc
        raise


async def _body(request: Request, idle_s: float, deadline: float) -> AsyncIterator[bytes]:
    """The request body's chunks; each must come within `idle_s`, all before `deadline` (loop
    time). Reads the ASGI messages directly: Starlette's stream has no timeout."""
    loop = asyncio.get_running_loop()
    while True:
        left = deadline - loop.time()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            message = await asyncio.wait_for(request.receive(), min(idle_s, left))
        except asyncio.TimeoutError:
            if loop.time() >= deadline - 1e-3:
                raise ApiError(
                    ErrorCode.DEADLINE_EXCEEDED,
                    "the request deadline passed while the upload was being received",
                    close_connection=True,
                ) from None
            raise ApiError(
                ErrorCode.UPLOAD_TIMEOUT, f"the upload sent nothing for {idle_s:g} s", close_connection=True
            ) from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        if message.get("body"):
            yield message["body"]
        if not message.get("more_body", False):
            return


class _Sink:
    """Writes the media bytes to the temp file, counting them against the cap."""

    def __init__(self, file: BinaryIO, limit: int) -> None:
        self.file = file
        self.limit = limit
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise _too_large(self.limit)
        self.file.write(data)


class _FormFile:
    """python-multipart callbacks that send the `file` field's bytes to a sink."""

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self.found = False
        self.filename: str | None = None
        self._writing = False
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._append("_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._append("_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _append(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._headers, self._field, self._value = {}, b"", b""

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._writing = not self.found and options.get(b"name") == FILE_FIELD.encode()
        if self._writing and b"filename" in options:
            self.filename = options[b"filename"].decode("utf-8", "replace")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._writing:
            self.sink.write(memoryview(data)[start:end])

    def _part_end(self) -> None:
        if self._writing:
            self.found, self._writing = True, False


def check_content_type(header: str) -> str:
    """The media type of the body, or 415 when it is not one we take."""
    media_type = header.split(";", 1)[0].strip().lower()
    if media_type == MULTIPART or media_type.startswith(RAW_TYPES):
        return media_type
    raise ApiError(
        ErrorCode.UNSUPPORTED_CONTENT_TYPE,
        f"Content-Type {media_type or '(none)'!r} is not accepted: send multipart/form-data with a `file` field, "
        "or the raw bytes as video/*, audio/* or application/octet-stream",
    )


@contextlib.asynccontextmanager
async def receive_upload(
    request: Request,
    *,
    max_bytes: int,
    slots: UploadSlots,
    idle_timeout_s: float,
    deadline: float,
    tmp_dir: Path | None = None,
) -> AsyncIterator[Upload]:
    """Stream the request's media into a temp file; yields it, then removes it. A slot of
    `slots` is held while the body is received; `deadline` is in loop time."""
    start = time.perf_counter()
    content_type = request.headers.get("content-type", "")
    media_type = check_content_type(content_type)
    multipart = media_type == MULTIPART
    body_limit = max_bytes + (MULTIPART_SLACK if multipart else 0)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > body_limit:
        raise _too_large(max_bytes)
    if multipart:
        _, options = parse_options_header(content_type)
        if not options.get(b"boundary"):
            raise ApiError(ErrorCode.INVALID_REQUEST, "multipart/form-data without a boundary")

    name = None
    try:
        with slots.take(), storage_errors("the upload's temp file"):
            if tmp_dir is not None:
                tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=tmp_dir)
            with os.fdopen(fd, "wb") as file:  # closing flushes: ENOSPC can come from there too
                sink = _Sink(file, max_bytes)
                form = _FormFile(sink) if multipart else None
                parser = MultipartParser(options[b"boundary"], form.callbacks()) if form else None
                received = 0
                async for chunk in _body(request, idle_timeout_s, deadline):
                    received += len(chunk)
                    if received > body_limit:
                        raise _too_large(max_bytes)
                    if parser is None:
                        sink.write(chunk)
                    else:
                        try:
                            parser.write(chunk)
                        except MultipartParseError as exc:
                            detail = f"malformed multipart body: {exc}"
                            raise ApiError(ErrorCode.INVALID_REQUEST, detail) from exc
                if parser is not None:
                    parser.finalize()
                    if not form.found:
                        raise ApiError(
                            ErrorCode.INVALID_REQUEST, f"the multipart body has no `{FILE_FIELD}` field"
                        )
        if sink.size == 0:
            raise ApiError(ErrorCode.EMPTY_UPLOAD, "the upload is empty")
        yield Upload(Path(name), sink.size, form.filename if form else None, time.perf_counter() - start)
    finally:
        if name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
