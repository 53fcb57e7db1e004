"""Typed errors and the one table that maps each to an HTTP status.

Every failure the service reports is an `ApiError` carrying an `ErrorCode`; the app turns it into
`{"error": code, "detail": ...}` with the status from `STATUS`. Nothing else picks status codes.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    EMPTY_UPLOAD = "empty_upload"
    TOO_LARGE = "too_large"
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    NOT_MEDIA = "not_media"
    CORRUPT_MEDIA = "corrupt_media"
    UNSUPPORTED_CODEC = "unsupported_codec"
    NO_USABLE_STREAM = "no_usable_stream"
    TOO_LONG = "too_long"
    DECODE_TIMEOUT = "decode_timeout"
    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_READY = "not_ready"
    INFERENCE_FAILED = "inference_failed"
    STORAGE_FULL = "storage_full"
    UPLOAD_TIMEOUT = "upload_timeout"
    # Framework-level answers, so 404/405/500 come out in the same JSON shape.
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INTERNAL_ERROR = "internal_error"


STATUS: dict[ErrorCode, int] = {
    ErrorCode.EMPTY_UPLOAD: 400,
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.UPLOAD_TIMEOUT: 408,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_CONTENT_TYPE: 415,
    ErrorCode.NOT_MEDIA: 415,
    ErrorCode.UNSUPPORTED_CODEC: 415,
    ErrorCode.CORRUPT_MEDIA: 422,
    ErrorCode.NO_USABLE_STREAM: 422,
    ErrorCode.TOO_LONG: 422,
    ErrorCode.DECODE_TIMEOUT: 422,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.NOT_READY: 503,
    ErrorCode.INFERENCE_FAILED: 503,
    ErrorCode.STORAGE_FULL: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
}


class ApiError(Exception):
    """A failure with a code from the table and a sentence saying what was wrong.

    `close_connection`: answer with `Connection: close` (the request body was cut off unread, so
    the connection cannot carry another request)."""

    def __init__(
        self,
        code: ErrorCode,
        detail: str,
        *,
        retry_after_s: float | None = None,
        close_connection: bool = False,
    ) -> None:
        super().__init__(f"{code.value}: {detail}")
        self.code = code
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.close_connection = close_connection

    @property
    def status(self) -> int:
        return STATUS[self.code]

    def body(self) -> dict[str, str]:
        return {"error": self.code.value, "detail": self.detail}
