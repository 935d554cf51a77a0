"""hayhooks' own error answers (its routes: `/{name}/run`, `/status`, deploy, ...), in the OpenAI error envelope.

hayhooks answers errors as FastAPI does, `{"detail": ...}`, which OpenAI clients do not parse: a path or method it
has no route for, a request its route's model refuses (422, `detail` a list of problems), an `HTTPException`
(`detail` a string), and a `run_api` that raised (500, the error's text as it was, with `HAYHOOKS_SHOW_TRACEBACKS`
its traceback). Each becomes `{"error": {message, type, param, code}}` with the same status; a 4xx keeps every field
hayhooks sent (its `detail` too, which its CLI shows and its clients may read), a 5xx keeps only its first line,
redacted. Any other answer, and an error body that is not FastAPI's JSON object, passes as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from haystream.openai import OpenAIError
from haystream.openai.errors import redact
from haystream.server.asgi import Message, Scope, Send, send_error, send_json

INTERNAL_ERROR = OpenAIError(500, "The server had an error while processing your request.", code="internal_error")

# FastAPI's answers for a path, or a method, that hayhooks has no route for.
_NO_ROUTE_BODIES = {404: b'{"detail":"Not Found"}', 405: b'{"detail":"Method Not Allowed"}'}
_HELD_ERROR_BYTES = 64 * 1024  # of an error body, read for its message; the rest of a longer one is dropped
_MESSAGE_SHOWN = 500


def openai_shaped_errors(scope: Scope, send: Send, secrets: Sequence[str]) -> Send:
    """hayhooks' `send`, with its error answers (status >= 400) in the OpenAI envelope (see the module)."""
    held: Message | None = None
    parts: list[bytes] = []
    size = 0

    async def shaped(message: Message) -> None:
        nonlocal held, size
        if message["type"] == "http.response.start" and message["status"] >= 400:
            held = message  # until its body is read
            return
        if held is None or message["type"] != "http.response.body":
            await send(message)
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        room = _HELD_ERROR_BYTES - size
        size += len(body)
        if size > _HELD_ERROR_BYTES and held["status"] < 500:
            # Longer than any error answer of FastAPI's: the route's own, passed on as it is from here.
            start, held = held, None
            await send(start)
            await send({"type": "http.response.body", "body": b"".join((*parts, body)), "more_body": more})
            parts.clear()
            return
        if room > 0:
            parts.append(body[:room])
        if more:
            return
        start, held = held, None
        await _answer(scope, send, start, b"".join(parts), complete=size <= _HELD_ERROR_BYTES, secrets=secrets)

    return shaped


async def _answer(
    scope: Scope, send: Send, start: Message, body: bytes, *, complete: bool, secrets: Sequence[str]
) -> None:
    status: int = start["status"]
    kept = [(n, v) for n, v in start["headers"] if n.lower() not in (b"content-type", b"content-length")]
    if body == _NO_ROUTE_BODIES.get(status):
        method, path = scope["method"], scope["path"][:256]
        if status == 404:
            error = OpenAIError(404, f"Invalid URL ({method} {path})")
        else:
            error = OpenAIError(405, f"Method {method} is not allowed on {path}.")
        await send_error(send, error, headers=kept, detail=True)  # hayhooks' CLI calls such paths, and shows `detail`
        return
    fields = _json_object(body) if complete else None
    if status >= 500:
        detail = fields.get("detail") if fields else None
        if isinstance(detail, str) and detail.strip():
            first_line = detail.strip().split("\n", 1)[0]
            error = OpenAIError(status, redact(first_line, secrets)[:_MESSAGE_SHOWN], code="pipeline_error")
        else:
            error = OpenAIError(status, INTERNAL_ERROR.message, code="internal_error")
        await send_error(send, error, headers=kept, detail=True)
        return
    if fields is None or "detail" not in fields or "error" in fields:
        await send(start)  # not FastAPI's error answer: the route's own
        await send({"type": "http.response.body", "body": body})
        return
    error = _client_error(status, fields["detail"], secrets)
    await send_json(send, status, {**fields, **error.to_dict()}, headers=kept)


def _client_error(status: int, detail: Any, secrets: Sequence[str]) -> OpenAIError:
    """A 4xx's envelope from FastAPI's `detail`: its text, or the first of the problems a validation found."""
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        problem = detail[0]
        location = [str(part) for part in problem.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = f"{param}: {problem.get('msg', 'invalid')}" if param else str(problem.get("msg", "invalid"))
        if len(detail) > 1:
            message += f" (and {len(detail) - 1} more problems; see `detail`)"
        return OpenAIError(status, redact(message, secrets)[:_MESSAGE_SHOWN], param=param)
    text = detail if isinstance(detail, str) and detail.strip() else f"Request refused ({status})."
    return OpenAIError(status, redact(text.strip().split("\n", 1)[0], secrets)[:_MESSAGE_SHOWN])


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
