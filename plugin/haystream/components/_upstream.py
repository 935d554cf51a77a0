"""The wire under the fast generator: pooled aiohttp sessions, an SSE byte decoder, and OpenAI's error types.

Nothing here builds a pydantic object or an httpx request per chunk; the SDK's exception classes are only
constructed when something failed, so user code that catches `openai.RateLimitError` & co. keeps working.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import email.utils
import math
import random
import threading
import time
import urllib.parse
import urllib.request
import weakref
from collections.abc import AsyncGenerator, Mapping
from functools import lru_cache
from typing import Any

import aiohttp
import openai
import orjson

try:  # the HTTP library whose Request/Response the SDK's exceptions carry: httpx2 from openai 3, httpx before
    import httpx2 as sdk_http
except ImportError:  # pragma: no cover - openai < 3
    import httpx as sdk_http  # type: ignore[no-redef]

# The OpenAI SDK's retry constants (openai._constants), so backoff behaves as users know it.
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
MAX_RETRY_AFTER_DELAY = 120.0

_STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}


# --- one pooled session per event loop ----------------------------------------------------------------------------


class _LoopSession:
    """A loop's session, and an async generator parked on that loop whose `finally` closes the session.

    `asyncio.run()` / `asyncio.Runner` finalise live async generators (`loop.shutdown_asyncgens()`) before closing
    their loop, so the session is closed on its own loop without anyone having to remember to.
    """

    def __init__(self) -> None:
        # No connection limit: every concurrent stream holds its connection for the whole answer.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, enable_cleanup_closed=False)
        # No `trust_env`: with it aiohttp looks up proxies and ~/.netrc in a worker thread on every request (two
        # thread round trips each), and a netrc entry for the upstream clashes with our Authorization header.
        # Proxies come from `env_proxy` instead, once per origin, as the SDK's httpx client reads them once.
        self.session = aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=True)
        self.closer = self._close_at_shutdown()

    async def _close_at_shutdown(self) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            await self.session.close()


_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopSession] = weakref.WeakKeyDictionary()


async def loop_session() -> aiohttp.ClientSession:
    """The running loop's pooled `aiohttp.ClientSession` (created on first use, closed when the loop shuts down)."""
    loop = asyncio.get_running_loop()
    entry = _sessions.get(loop)
    if entry is None or entry.session.closed:
        entry = _sessions[loop] = _LoopSession()
        await entry.closer.__anext__()  # parks it: the loop now knows the generator and will finalise it
    return entry.session


async def close_loop_session() -> None:
    """Close the running loop's pooled session now (the next request opens a new one)."""
    entry = _sessions.pop(asyncio.get_running_loop(), None)
    if entry is not None:
        await entry.closer.aclose()


@lru_cache(maxsize=256)
def env_proxy(url: str) -> tuple[str | None, aiohttp.BasicAuth | None]:
    """The proxy the environment names for `url` (`HTTP_PROXY`/`HTTPS_PROXY`, minus `NO_PROXY`) and its credentials.

    Read once per URL, as the OpenAI SDK's client reads them once. aiohttp speaks to HTTP proxies only: an
    `https://` or SOCKS proxy is not used, as with aiohttp's own `trust_env`.
    """
    target = urllib.parse.urlsplit(url)
    if not target.hostname or urllib.request.proxy_bypass(target.hostname):
        return None, None
    address = urllib.request.getproxies().get(target.scheme)
    if not address:
        return None, None
    proxy = urllib.parse.urlsplit(address if "://" in address else f"http://{address}")
    if proxy.scheme != "http" or not proxy.hostname:
        return None, None
    auth = None
    if proxy.username:
        user, password = urllib.parse.unquote(proxy.username), urllib.parse.unquote(proxy.password or "")
        auth = aiohttp.BasicAuth(user, password)
    netloc = proxy.hostname if proxy.port is None else f"{proxy.hostname}:{proxy.port}"
    return f"http://{netloc}", auth


# --- private event loops for sync callers --------------------------------------------------------------------------


class _ThreadLoop:
    """An event loop owned by one thread, reused by its sync calls so that they share a connection pool."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        _thread_loops.add(self)

    def close(self) -> None:
        loop = self.loop
        if loop.is_closed() or loop.is_running():
            return
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())  # closes the session (see `_LoopSession`)
        finally:
            loop.close()

    def __del__(self) -> None:  # the owning thread ended
        with contextlib.suppress(Exception):  # nothing useful to do with an error while a thread is torn down
            self.close()


_local = threading.local()
_thread_loops: weakref.WeakSet[_ThreadLoop] = weakref.WeakSet()


def thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's private event loop for running the async implementation from sync code."""
    holder = getattr(_local, "holder", None)
    if holder is None or holder.loop.is_closed():
        holder = _local.holder = _ThreadLoop()
    return holder.loop


@atexit.register
def _close_thread_loops() -> None:
    for holder in list(_thread_loops):
        holder.close()


# --- server-sent events --------------------------------------------------------------------------------------------


MAX_SSE_EVENT_BYTES = 16 * 2**20
"""The default bound on one server-sent event (16 MiB: far above any real chunk, which is a few hundred bytes)."""


# What one kept `data:` line costs beyond its bytes (a bytes object's header, a list slot): counted, so that an event
# of many short lines is bounded by the memory it holds, not only by its bytes.
_LINE_OVERHEAD = 48


class SSEEventTooLarge(ValueError):
    """An event-stream event (one line, or its `data:` lines together) grew past the decoder's `max_event` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"An event-stream event exceeded {limit} bytes without ending")
        self.limit = limit


class SSEDecoder:
    """Incremental server-sent-events decoder over raw bytes: `feed(block)` returns the complete events' data.

    Lines may be split across reads; `\\r\\n` endings, comments (`: ping`) and fields other than `data` are handled
    as the SSE spec says; several `data:` lines of one event are joined with `\\n`. An event that grows past
    `max_event` bytes before it ends raises `SSEEventTooLarge`: one line without end (counted while it spans reads, to
    within one read), or `data:` lines without the blank line that ends their event.
    """

    __slots__ = ("_data", "_data_size", "_max_event", "_pending", "_tail")

    def __init__(self, max_event: int = MAX_SSE_EVENT_BYTES) -> None:
        self._tail: list[bytes] = []  # the pieces of an unfinished line, joined once it ends (linear in its length)
        self._pending = 0  # bytes in `_tail` that came in reads without a line break (the start is not counted)
        self._max_event = max_event
        self._data: list[bytes] = []
        self._data_size = 0  # what the `data:` lines in `_data` hold: their bytes and `_LINE_OVERHEAD` each

    def feed(self, block: bytes) -> list[bytes]:
        tail = self._tail
        if b"\n" not in block:
            if block:
                tail.append(block)
                # Only a read without a line break grows a line: counting here leaves the common path untouched.
                self._pending += len(block)
                if self._pending + self._data_size > self._max_event:
                    self._reset()
                    raise SSEEventTooLarge(self._max_event)
            return []
        if tail:
            tail.append(block)
            block = b"".join(tail)
            tail.clear()
            self._pending = 0
        lines = block.split(b"\n")
        if last := lines.pop():
            tail.append(last)
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if line and line[-1] == 13:  # b"\r"
                line = line[:-1]
            if not line:
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data.clear()
                    self._data_size = 0
            elif line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
                self._data_size += len(line) + _LINE_OVERHEAD
                if self._data_size > self._max_event:
                    self._reset()
                    raise SSEEventTooLarge(self._max_event)
        return events

    def _reset(self) -> None:
        self._tail.clear()
        self._data.clear()
        self._pending = self._data_size = 0

    def flush(self) -> list[bytes]:
        """The last event, if the stream ended without its blank line."""
        events = self.feed(b"\n\n") if (self._tail or self._data) else []
        self._reset()
        return events


# --- the OpenAI SDK's exceptions -----------------------------------------------------------------------------------


def sdk_request(url: str) -> sdk_http.Request:
    """The request object the SDK's exceptions carry."""
    return sdk_http.Request("POST", url)


def status_error(url: str, status: int, headers: Mapping[str, str], raw: bytes) -> openai.APIStatusError:
    """The exception the OpenAI SDK raises for this HTTP error response (`openai.OpenAI._make_status_error`)."""
    response = sdk_http.Response(status, headers=list(headers.items()), content=raw, request=sdk_request(url))
    message = f"Error code: {status}"
    body: Any = raw.decode("utf-8", "replace").strip()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    else:
        error = body.get("error", body) if isinstance(body, dict) else None
        detail = error.get("message") if isinstance(error, dict) else None
        if isinstance(detail, str) and detail:
            message += f" - {detail}"
    data = body.get("error", body) if isinstance(body, dict) else body
    cls = _STATUS_ERRORS.get(status) or (openai.InternalServerError if status >= 500 else openai.APIStatusError)
    return cls(message, response=response, body=data)


def stream_error(url: str, error: Any) -> openai.APIError:
    """The `APIError` the SDK raises for a `data: {"error": ...}` event in a stream."""
    message = error.get("message") if isinstance(error, dict) else None
    if not message or not isinstance(message, str):
        message = "An error occurred during streaming"
    return openai.APIError(message=message, request=sdk_request(url), body=error)


def not_an_event_stream(url: str, status: int, content_type: str, head: bytes) -> openai.APIError:
    """The `APIError` for a successful response whose body held no event and is not `text/event-stream`."""
    body: Any = head.decode("utf-8", "replace").strip()
    try:
        body = orjson.loads(head)
    except orjson.JSONDecodeError:
        excerpt = " ".join(body.split())[:200]
    else:
        error = body.get("error") if isinstance(body, dict) else None
        if error:  # an error object sent with status 200, as some gateways do
            return stream_error(url, error)
        excerpt = head.decode("utf-8", "replace")[:200]
    message = f"The upstream answered {status} with {content_type or 'no content type'}, not an event stream"
    return openai.APIError(message=f"{message}: {excerpt}" if excerpt else message, request=sdk_request(url), body=body)


def event_too_large(url: str, limit: int) -> openai.APIError:
    """The `APIError` for an upstream that sent an event-stream event larger than `limit` bytes."""
    message = f"The upstream sent an event-stream event larger than {limit} bytes; the stream was closed"
    return openai.APIError(message=message, request=sdk_request(url), body=None)


def transport_error(url: str, exc: BaseException) -> openai.APIConnectionError:
    """`APITimeoutError` for timeouts, `APIConnectionError` for every other transport failure."""
    if isinstance(exc, TimeoutError):
        return openai.APITimeoutError(request=sdk_request(url))
    return openai.APIConnectionError(request=sdk_request(url))  # the SDK's message; the cause is chained


# --- retries (the SDK's rules) -------------------------------------------------------------------------------------


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    for header, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        value = headers.get(header)
        if value is None:
            continue
        try:
            return float(value) / divisor
        except ValueError:
            continue
    retry_header = headers.get("retry-after")
    try:
        parsed = email.utils.parsedate_tz(retry_header)
        return None if parsed is None else float(email.utils.mktime_tz(parsed) - time.time())
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def should_retry(status: int, headers: Mapping[str, str]) -> bool:
    """Whether the SDK would retry this response: 408, 409, 429, 5xx, unless told otherwise by the server."""
    retry_after = _retry_after(headers)
    if retry_after is not None and math.isfinite(retry_after) and retry_after > MAX_RETRY_AFTER_DELAY:
        return False
    explicit = headers.get("x-should-retry")
    if explicit in ("true", "false"):
        return explicit == "true"
    return status in (408, 409, 429) or status >= 500


def retry_delay(retries_taken: int, headers: Mapping[str, str] | None = None) -> float:
    """Seconds to wait before the next attempt: `Retry-After` if sane, else exponential backoff with jitter."""
    retry_after = _retry_after(headers)
    if retry_after is not None and math.isfinite(retry_after) and 0 < retry_after <= MAX_RETRY_AFTER_DELAY:
        return retry_after
    delay = min(INITIAL_RETRY_DELAY * 2.0 ** min(retries_taken, 1000), MAX_RETRY_DELAY)
    return delay * (1 - 0.25 * random.random())  # jitter, not security
