"""uvicorn's httptools protocol with bounds on a request's head (request line and headers), checked before any key,
and on the time a body left unread by its answer may go on arriving.

- Size: httptools joins a header value or URL that arrives in pieces by copying what it has so far each time, without
  a limit: one client streaming a 256 MB header, no key needed, held the event loop for seconds at a time (every route
  and the probes waited 20 s) for 100 s and grew the process by 370 MB. Past `MAX_HEAD_BYTES` the connection gets 431
  and is closed; the copies stay bounded. (uvicorn's h11 protocol has such a bound of its own.)
- Time: uvicorn times out only idle keep-alive connections, and any byte received stops that timer: a connection that
  never sends a byte, or sends its head a byte at a time, was held open for good (slowloris). A head must now be
  complete within `head_timeout` seconds of the connection, or of its first byte on a reused connection; otherwise
  the connection gets 408 (or, if it sent nothing, is just closed) like a body that never arrives.
- The rest of an unread body: a request answered before its body was read whole (refused without a key, past the size
  or time limit) may go on sending it; uvicorn drops it, but each byte stopped the keep-alive timer, so an endless
  chunked body trickled a byte a second held the connection for good, without a key. The rest of the body must now
  arrive within `body_timeout` seconds of the answer; then the connection is closed.
- WebSocket upgrades: uvicorn hands one to its WebSocket protocol before any app sees it; one that protocol cannot
  take (a POST, a bad key or version) is refused here with the envelope (a POST was held open for good, unanswered).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Iterable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from haystream.server.asgi import Message

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_SECONDS = 30.0
BODY_TIMEOUT_SECONDS = 30.0


def _refusal(status: bytes, message: bytes, extra_headers: bytes = b"") -> bytes:
    body = b'{"error":{"message":"%s","type":"invalid_request_error","param":null,"code":null}}' % message
    return b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n%s" % (
        status,
        len(body),
        extra_headers,
        body,
    )


_TOO_LARGE = _refusal(b"431 Request Header Fields Too Large", b"Request headers too large.")
_TOO_SLOW = _refusal(b"408 Request Timeout", b"The request headers took too long to arrive.")
_WEBSOCKET_NOT_GET = _refusal(b"400 Bad Request", b"A WebSocket upgrade must be a GET request.")
_WEBSOCKET_BAD_KEY = _refusal(
    b"400 Bad Request", b"A WebSocket upgrade needs one Sec-WebSocket-Key: 16 bytes in base64."
)
_WEBSOCKET_BAD_VERSION = _refusal(
    b"426 Upgrade Required", b"A WebSocket upgrade needs Sec-WebSocket-Version: 13.", b"sec-websocket-version: 13\r\n"
)


_UNTIL_CLOSE = 1 << 62  # "no length": what a close-delimited body may still send


def close_delimited(cycle: Any) -> None:
    """Send a response of unknown length (a stream) to an HTTP/1.0 client as bytes until the connection closes.

    uvicorn's httptools protocol sent such a response with `Transfer-Encoding: chunked` to HTTP/1.0 clients too, which
    do not know that coding (RFC 9112 §6.1): they read the chunk sizes as part of the stream. An HTTP/1.0 connection is
    closed after its response anyway, and that close ends the body.
    """
    send = cycle.send
    until_close = False

    async def without_chunked_coding(message: Message) -> None:
        nonlocal until_close
        if message["type"] == "http.response.start":
            headers = message.get("headers", ())
            if not any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in headers):
                until_close = True
                cycle.chunked_encoding = False
                cycle.expected_content_length = _UNTIL_CLOSE
        elif until_close and message["type"] == "http.response.body" and not message.get("more_body", False):
            cycle.expected_content_length = len(message.get("body", b""))  # uvicorn checks a body ends at its length
        await send(message)

    cycle.send = without_chunked_coding


class BoundedHeadProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` that refuses a request whose head is still incomplete after `MAX_HEAD_BYTES` (431) or
    after `head_timeout` seconds (408), and closes a connection whose request was answered before its body ended and
    whose body is still arriving `body_timeout` seconds later."""

    # Slots, not instance attributes: four more attributes than uvicorn's own turned each connection's key-sharing
    # `__dict__` (288 bytes) into a 1,584-byte one of its own.
    __slots__ = ("_body_done", "_body_timeout", "_head_bytes", "_head_deadline", "_head_timeout", "_in_head")

    def __init__(
        self,
        *args: Any,
        head_timeout: float = HEAD_TIMEOUT_SECONDS,
        body_timeout: float = BODY_TIMEOUT_SECONDS,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # until the first request's headers are complete
        self._head_bytes = 0
        self._head_timeout = head_timeout
        self._head_deadline: asyncio.TimerHandle | None = None  # the head's, or the unread body's (see below)
        self._body_timeout = body_timeout
        self._body_done = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Only data after which the head is still incomplete counts: a chunk holding the end of a head and a body
        # does not, so a body never counts against the head.
        if not self._in_head or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._body_done = False
        self._arm_head_deadline()  # from the head's first byte: idle keep-alive time is uvicorn's to bound

    def on_message_complete(self) -> None:
        self._body_done = True
        self._disarm_head_deadline()  # the unread body's deadline, if its response went out before it ended
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._body_done and not self.transport.is_closing():
            # Answered before its body was read whole (refused: no key, too large, too slow). uvicorn drops the rest
            # as it arrives, and each byte stops its keep-alive timer: the rest gets the body's time, then the
            # connection is closed.
            self._disarm_head_deadline()
            self._head_deadline = self.loop.call_later(self._body_timeout, self._unread_body_too_slow)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_head_deadline()
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous and self.scope["http_version"] == "1.0":
            close_delimited(self.cycle)

    def handle_websocket_upgrade(self) -> None:
        """A request with `Upgrade: websocket` goes to uvicorn's WebSocket protocol before any app (or key) sees it:
        one that protocol cannot take is refused here with the envelope. A POST was never answered, and its
        connection held for good (the head's deadline ends with the head), without a key; a bad key or version got
        the WebSocket library's plain-text 400."""
        refusal = _bad_websocket_upgrade(self.scope["method"], self.scope["headers"])
        if refusal is not None:
            self._refuse(refusal)
            return
        super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        """A request httptools cannot parse (`Transfer-Encoding` with `Content-Length`, two lengths, a bad method):
        the OpenAI error envelope, as for the refusals above, not uvicorn's plain text."""
        self._in_head = False
        self._disarm_head_deadline()
        self.transport.write(_refusal(b"400 Bad Request", msg.encode("ascii", "replace").replace(b'"', b"'")))
        self.transport.close()

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self._head_timeout, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _unread_body_too_slow(self) -> None:
        self._head_deadline = None
        if not self._body_done and not self._in_head:
            self.transport.close()  # its answer went out already

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if not self._in_head or self.transport.is_closing():
            return
        if not self._head_bytes:  # not one byte of a request: nobody to answer
            self._in_head = False
            self.transport.close()
            return
        self._refuse(_TOO_SLOW)

    def _refuse(self, answer: bytes) -> None:
        self._in_head = False
        self._disarm_head_deadline()
        self.transport.write(answer)
        self.transport.close()


def _bad_websocket_upgrade(method: str, headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The refusal for a WebSocket handshake that RFC 6455 §4.2.1 does not allow, or None for a well-formed one."""
    if method != "GET":
        return _WEBSOCKET_NOT_GET
    keys = [value for name, value in headers if name == b"sec-websocket-key"]
    versions = [value for name, value in headers if name == b"sec-websocket-version"]
    if versions != [b"13"]:
        return _WEBSOCKET_BAD_VERSION
    try:
        if len(keys) != 1 or len(base64.b64decode(keys[0].strip(), validate=True)) != 16:
            return _WEBSOCKET_BAD_KEY
    except binascii.Error:
        return _WEBSOCKET_BAD_KEY
    return None
