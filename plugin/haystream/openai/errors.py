"""The OpenAI error envelope: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

import orjson

from haystream.openai.protocol import ErrorEnvelope

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    408: "invalid_request_error",
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
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})  # e.g. Retry-After on a 429

    def to_dict(self) -> ErrorEnvelope:
        """The `{"error": {...}}` object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_json(self) -> bytes:
        """The `{"error": {...}}` object as JSON bytes."""
        return orjson.dumps(self.to_dict())


# Each pattern is linear in its input (no nested or overlapping quantifiers), and runs on a bounded prefix.
_URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]{0,15}://)(?:[^\s/@?#]*@)?([^\s/?#]*)([^\s?#]*)(?:\?[^\s#]*)?(?:#\S*)?")
_SCHEME_TOKEN = re.compile(r"(?i)\b(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=-]{4,}")
_KEY_SHAPED = re.compile(r"\b(?:sk|pk|rk|ak|key)[-_][A-Za-z0-9_-]{8,}")
_ASSIGNED = re.compile(
    r"(?i)\b((?:api[_-]?key|access[_-]?token|token|secret|password|passwd|authorization)[\"']?\s{0,3}[:=]\s{0,3}[\"']?)"
    r"[^\s\"',;&]+"
)
REDACTED = "[redacted]"
_SCAN_LIMIT = 4000


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without what could be a secret: the given keys, bearer tokens, key-shaped words, `key=...` values,
    and URLs' credentials, query strings and fragments. Only the first few thousand characters are kept."""
    text = text[:_SCAN_LIMIT]
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    text = _URL.sub(r"\1\2\3", text)
    text = _SCHEME_TOKEN.sub(r"\1\2" + REDACTED, text)
    text = _KEY_SHAPED.sub(REDACTED, text)
    return _ASSIGNED.sub(r"\1" + REDACTED, text)


def describe_failure(error: BaseException, limit: int = 500, secrets: Iterable[str] = ()) -> str:
    """A one-line, client-safe description of an exception: its root cause's type and message (secrets redacted),
    no traceback."""
    root = error
    seen = {id(root)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    message = str(root).strip()
    text = redact(message.splitlines()[0], secrets) if message else ""
    description = f"{type(root).__name__}: {text}" if text else type(root).__name__
    return description if len(description) <= limit else description[: limit - 1] + "…"


def status_for_failure(error: BaseException) -> int:
    """HTTP status for a failed run: see `classify_failure`."""
    return classify_failure(error)[0]


def classify_failure(error: BaseException) -> tuple[int, str]:
    """HTTP status and error code for a failed run: a prompt longer than the model's context is the client's
    mistake (400 `context_length_exceeded`, as OpenAI answers); an upstream rate limit stays 429 and an unavailable
    upstream (or busy local model) 503; everything else is a 500 `pipeline_error`."""
    for current in _causes(error):
        if getattr(current, "code", None) == "context_length_exceeded" or _CONTEXT_EXCEEDED.search(str(current)[:500]):
            return 400, "context_length_exceeded"
        status = getattr(current, "status_code", None)
        if status in (429, 503):
            return int(status), "pipeline_error"
    return 500, "pipeline_error"


def refused_upstream(error: BaseException) -> bool:
    """Whether a run failed because an upstream refused its request outright (400, 401, 403, 404, 422): the same
    request fails the same way again, so a client should not retry it (`x-should-retry: false`)."""
    return any(getattr(current, "status_code", None) in _REFUSALS for current in _causes(error))


_REFUSALS = frozenset({400, 401, 403, 404, 422})


def _causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and the exceptions it was raised from or while handling, outermost first (cycles cut)."""
    current: BaseException | None = error
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# llama.cpp: "Requested tokens (N) exceed context window of M"; OpenAI-compatible servers: "maximum context length".
_CONTEXT_EXCEEDED = re.compile(r"(?i)exceeds? (?:the )?context window|maximum context length|context_length_exceeded")
