"""Errors the proxy itself answers with, always in OpenAI's shape."""

from __future__ import annotations

from typing import Mapping

import orjson

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ProxyError(Exception):
    """Raise from a hook to answer the client with an OpenAI-shaped error.

    ``message`` reaches the client: never put a secret, a stack trace or a value
    from the request (PII) in it. ``headers`` are added to the error answer
    (``retry-after`` on a 429, for example).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        #: a short machine word for logs and ``ctx.answer_reason`` (defaults to ``code``)
        self.reason = reason or code or self.type

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


class StateUnavailable(ProxyError):
    """A state backend (Redis, SQLite) is slow, down or its breaker is open."""

    #: the call may have been carried out all the same: it was sent, and its answer did not come in
    #: time (a stall). A refused connection or an open breaker never sent it.
    ambiguous = False

    def __init__(self, message: str = "a state backend is unavailable", **kw) -> None:
        kw.setdefault("code", "state_unavailable")
        super().__init__(503, message, **kw)


class ConfigError(Exception):
    """The config file is invalid; the message names the file, the path and the plugin."""
