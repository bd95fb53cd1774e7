"""API errors: one body shape everywhere, `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `APIError` (or let Sanic raise its own exceptions); the app's error handler turns every
exception into that body. Bad input is always a 4xx; a 500 means a bug and is logged with its traceback.
"""
from __future__ import annotations

import logging

from sanic import response
from sanic.exceptions import SanicException
from sanic.helpers import STATUS_CODES

log = logging.getLogger("realizar.server")

# status -> (type, default code)
_TYPES = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "body_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "queue_full"),
    500: ("server_error", "internal_error"),
    503: ("service_unavailable", "unavailable"),
    504: ("timeout_error", "timeout"),
}


class APIError(Exception):
    """An error answered to the client with `status` and the standard error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        default_type, default_code = _TYPES.get(status, ("server_error" if status >= 500 else
                                                         "invalid_request_error", None))
        self.type = type or default_type
        self.code = code if code is not None else default_code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def to_api_error(exc: BaseException) -> APIError:
    """Any exception as an APIError: ours as they are, Sanic's by their status, anything else a logged 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SanicException):
        status = int(getattr(exc, "status_code", 500) or 500)
        message = str(exc) or STATUS_CODES.get(status, b"error").decode()
        if status == 413:
            message = f"request body too large: {message}"
        if status == 404:
            return APIError(404, message, code="route_not_found")
        return APIError(status, message)
    log.exception("internal error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}")


def error_response(err: APIError):
    return response.json(err.body(), status=err.status, headers=err.headers or None)
