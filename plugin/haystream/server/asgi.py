"""Small pure-ASGI helpers: bounded request bodies, sending JSON, watching for the client leaving."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import orjson
from starlette.types import (
    Message,
    Receive,
    Scope,
    Send,
)  # the ASGI aliases live in Starlette; modules import them here

from haystream.openai import UTF8_BOM, OpenAIError


class ClientDisconnected(Exception):
    """The client went away while the request was still being read."""


async def read_body(scope: Scope, receive: Receive, limit: int, timeout: float | None = None) -> bytes:
    """The whole request body, refusing more than `limit` bytes (413) before reading it all, and a body that takes
    longer than `timeout` seconds to arrive (408). A compressed body is refused (415) before any of it is read."""
    check_declared_length(scope, limit)
    check_content_encoding(scope)
    if timeout is None:
        return await _read_body(receive, limit)
    try:
        async with asyncio.timeout(timeout):
            return await _read_body(receive, limit)
    except TimeoutError:
        raise _too_slow(timeout) from None


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def check_declared_length(scope: Scope, limit: int) -> None:
    """Refuse (413) a body whose `Content-Length` is over `limit` before reading any of it."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise _too_large(limit)


def check_content_encoding(scope: Scope) -> None:
    """Refuse (415) a body sent with a `Content-Encoding` (gzip, ...): it is not decoded here, and parsing the
    compressed bytes as JSON only gave a confusing "Malformed JSON" error."""
    encoding = header(scope, b"content-encoding")
    if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
        raise OpenAIError(
            415,
            f"Content-Encoding {encoding.decode('latin-1')[:50]!r} is not supported; send the body uncompressed.",
            code="unsupported_content_encoding",
        )


def check_json_body(scope: Scope, raw: bytes) -> None:
    """Refuse, with a message that says what is wrong, an empty body (400) and a body that is not JSON sent with a
    `Content-Type` that does not say JSON either (415: a form or multipart upload). A JSON object sent with another
    type still passes: `curl -d` labels it a form."""
    if not raw.strip():
        raise OpenAIError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    content_type = (header(scope, b"content-type") or b"").split(b";", 1)[0].strip().lower()
    if content_type and not content_type.endswith(b"json") and raw.removeprefix(UTF8_BOM).lstrip()[:1] != b"{":
        raise OpenAIError(
            415,
            f"Content-Type {content_type.decode('latin-1')[:100]!r} is not supported; send a JSON object with "
            "Content-Type: application/json.",
            code="unsupported_content_type",
        )


class BoundedBody:
    """The request body handed to an app as it arrives, within `limit` bytes and `timeout` seconds.

    Past a limit, the app is told that the client left (`http.disconnect`) and whatever it sends is dropped, so that
    the caller can answer with `refusal` (413 or 408) once the app returns. An app that starts its response without
    having read the whole body gets the rest read (and discarded) first: the limits hold whether a route reads its
    body or not. Use `receive` and `send` in place of the server's.
    """

    def __init__(self, receive: Receive, send: Send, limit: int, timeout: float) -> None:
        self._receive = receive
        self._send = send
        self._limit = limit
        self._timeout = timeout
        self._deadline = asyncio.get_running_loop().time() + timeout
        self._size = 0
        self._complete = False
        self._reading = asyncio.Lock()  # an app may read the body and wait for a disconnect at once
        self.refusal: OpenAIError | None = None

    async def receive(self) -> Message:
        if self._complete:
            return await self._receive()  # after the body only the disconnect comes, whenever it does
        async with self._reading:
            if self.refusal is not None:
                return {"type": "http.disconnect"}
            if self._complete:
                return await self._receive()
            try:
                async with asyncio.timeout_at(self._deadline):
                    message = await self._receive()
            except TimeoutError:
                self.refusal = _too_slow(self._timeout)
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                self._size += len(message.get("body", b""))
                if self._size > self._limit:
                    self.refusal = _too_large(self._limit)
                    return {"type": "http.disconnect"}
                self._complete = not message.get("more_body", False)
            return message

    async def send(self, message: Message) -> None:
        if not self._complete and message["type"] == "http.response.start":
            while not self._complete and (await self.receive())["type"] != "http.disconnect":
                pass  # the rest of a body the app did not read, counted and dropped
        if self.refusal is None:
            await self._send(message)


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"Request body is larger than {limit} bytes.", code="body_too_large")


def _too_slow(timeout: float) -> OpenAIError:
    return OpenAIError(408, f"The request body did not arrive within {timeout:g} seconds.", code="request_timeout")


async def send_json(send: Send, status: int, payload: Any, *, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A complete `application/json` response."""
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send, error: OpenAIError, *, headers: list[tuple[bytes, bytes]] | None = None, detail: bool = False
) -> None:
    """An OpenAI error envelope with its HTTP status (and the error's own headers, such as Retry-After). `detail`
    adds the message as a top-level `detail` too, for hayhooks' CLI, which shows only that field on routes it
    calls ("Unknown error" otherwise)."""
    extra = list(headers or ())
    extra += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in error.headers.items()]
    body = orjson.dumps({**error.to_dict(), "detail": error.message}) if detail else error.to_json()
    await send_json(send, error.status, body, headers=extra)


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header `name` (lower-case bytes), or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def replay_body(raw: bytes, receive: Receive) -> Receive:
    """A `receive` that hands over a body already read, then passes on the real one (for the disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replay


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (the body has already been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_until_disconnect(work: Awaitable[None], receive: Receive) -> bool:
    """Run `work` in the calling task, cancelling it if the client disconnects first. Returns True if the client left.

    Only the watch for the disconnect gets a task of its own (`receive()` has no callback form); the work itself
    does not need one, which saves a task, a wait and their frames per request.
    """
    task = asyncio.current_task()
    assert task is not None
    left = False

    async def watch() -> None:
        nonlocal left
        await wait_for_disconnect(receive)
        left = True
        # The work is suspended at an await (the watcher only runs while it is): the cancellation lands inside it.
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await work
    except asyncio.CancelledError:
        if not left:
            raise
        task.uncancel()
        return True
    finally:
        watcher.cancel()
    if left:  # the work caught the cancellation itself and returned
        task.uncancel()
    return left
