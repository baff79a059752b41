"""Errors of the HTTP API: ``{"error": {"code", "message"}}`` and a status from a fixed set.

keyrotor's typed errors map to a status and a stable code. Their messages name scopes, versions
and causes, never a value or a key (``keyrotor.errors``); anything else becomes a fixed sentence,
so no exception text (which could quote input) ever reaches a response.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from keyrotor.api.limits import retry_after
from keyrotor.errors import (
    AccessDenied,
    CiphertextTooLarge,
    ConfigurationError,
    Conflict,
    DecryptionFailed,
    InvalidInput,
    KeyExhausted,
    KeyrotorError,
    KeyVersionTooOld,
    KeyVersionUnknown,
    LegacyDecryptDisabled,
    LegacyDecryptThrottled,
    NotFound,
    TransientError,
)

MAX_MESSAGE_CHARS = 300


class ApiError(Exception):
    """An answer other than success, raised by a handler or a middleware."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


# Most specific first: the first class an error is an instance of decides.
_MAP: tuple[tuple[type[KeyrotorError], int, str], ...] = (
    (LegacyDecryptThrottled, 429, "throttled"),
    (AccessDenied, 403, "forbidden"),
    (CiphertextTooLarge, 413, "too_large"),
    (DecryptionFailed, 400, "decryption_failed"),
    (KeyVersionUnknown, 400, "key_version_unknown"),
    (KeyVersionTooOld, 400, "key_version_destroyed"),
    (KeyExhausted, 409, "key_exhausted"),
    (LegacyDecryptDisabled, 400, "legacy_disabled"),
    (InvalidInput, 400, "invalid_input"),
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (TransientError, 503, "unavailable"),
    (ConfigurationError, 503, "misconfigured"),
)


def from_keyrotor(exc: KeyrotorError) -> ApiError:
    """The answer for one of keyrotor's typed errors."""
    for cls, status, code in _MAP:
        if isinstance(exc, cls):
            message = str(exc) if status < 500 else _UNAVAILABLE.get(code, "keyrotor cannot do this now")
            # A throttled caller is told when its window ends, as a rate-limited one is.
            headers = None
            if isinstance(exc, LegacyDecryptThrottled):
                headers = {"Retry-After": retry_after(exc.retry_after_s)}
            return ApiError(status, code, message[:MAX_MESSAGE_CHARS], headers=headers)
    return ApiError(400, "refused", type(exc).__name__)


_UNAVAILABLE = {
    "unavailable": "a dependency (database, KEK provider, queue) is unavailable; retry later",
    "misconfigured": "the server is misconfigured; see its log",
}


def body(code: str, message: str) -> dict[str, Any]:
    """The JSON of an error."""
    return {"error": {"code": code, "message": message}}


def response(err: ApiError) -> web.Response:
    """The HTTP answer for ``err``."""
    return web.json_response(body(err.code, err.message), status=err.status, headers=err.headers)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


# Statuses aiohttp raises itself (routing, body size) -> codes.
HTTP_CODES = {
    400: "invalid_request",
    401: "unauthenticated",
    403: "forbidden",
    # aiohttp's own 404: no route serves the path (a missing resource is "not_found").
    404: "no_route",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}
