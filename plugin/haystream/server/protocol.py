"""uvicorn's httptools protocol with a bound on a request's head (request line and headers), checked before any key.

httptools joins a header value or URL that arrives in pieces by copying what it has so far each time, without a
limit: one client streaming a 256 MB header, no key needed, held the event loop for seconds at a time (every route
and the probes waited 20 s) for 100 s and grew the process by 370 MB. Past `MAX_HEAD_BYTES` the connection gets 431
and is closed; the copies stay bounded. (uvicorn's h11 protocol has such a bound of its own.)
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
_REFUSAL = b'{"error":{"message":"Request headers too large.","type":"invalid_request_error","param":null,"code":null}}'


class BoundedHeadProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` that refuses (431) a request whose head is still incomplete after `MAX_HEAD_BYTES`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # until the first request's headers are complete
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Only data after which the head is still incomplete counts: a chunk holding the end of a head and a body
        # does not, so a body never counts against the head.
        if not self._in_head or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._in_head = False
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_REFUSAL), _REFUSAL)
            )
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
