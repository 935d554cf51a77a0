"""The OpenAI error envelope: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any

import orjson

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
}


class OpenAIError(Exception):
    """An error that reaches the client as an OpenAI error object with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        """The `{"error": {...}}` object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_json(self) -> bytes:
        """The `{"error": {...}}` object as JSON bytes."""
        return orjson.dumps(self.to_dict())


def describe_failure(error: BaseException, limit: int = 500) -> str:
    """A one-line, client-safe description of an exception: its root cause's type and message, no traceback."""
    root = error
    seen = {id(root)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    text = str(root).strip().splitlines()[0] if str(root).strip() else ""
    description = f"{type(root).__name__}: {text}" if text else type(root).__name__
    return description if len(description) <= limit else description[: limit - 1] + "…"


def status_for_failure(error: BaseException) -> int:
    """HTTP status for a failed run: an upstream rate limit stays 429, everything else is a 500."""
    current: BaseException | None = error
    while current is not None:
        if getattr(current, "status_code", None) == 429:
            return 429
        current = current.__cause__
    return 500
