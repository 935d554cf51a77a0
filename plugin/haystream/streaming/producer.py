"""Running a sync-only target in a producer thread, and what happens when that run is abandoned.

Runs whose streamed components all have `run_async` need no thread (they run on an event loop and are cancelled as
tasks); the others get one producer thread from haystream's own executor (never anyio's shared limiter, never a
thread hop per chunk). When the consumer leaves, the producer stops at its next chunk: the injected callback raises
`StreamCancelled`. Providers' sync streaming loops do not close their HTTP response on an exception (Haystack's
`OpenAIChatGenerator` among them), so the upstream would keep generating until a garbage collection, and a producer
blocked in a read would wait for the next chunk. Unless `HAYSTREAM_ABANDON_SOCKETS=false`, haystream therefore
closes the HTTP responses it finds in the producer's frames (and shuts down the sockets HTTP clients' own frames are
reading: httpx/httpcore, which the OpenAI SDK uses, requests/urllib3, http.client), which cuts the upstream at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from types import FrameType, TracebackType
from typing import Any, TypeVar

from haystream.settings import StreamingSettings
from haystream.streaming.channel import END, StreamCancelled, ThreadChannel

T = TypeVar("T")

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
_running = 0
_running_changed = threading.Condition()
_HTTP_CLIENT_MODULES = ("httpcore", "httpx", "urllib3", "http.client", "requests", "aiohttp")


def producer_executor() -> ThreadPoolExecutor:
    """The executor that runs sync producers; `HAYSTREAM_PRODUCER_THREADS` bounds it (default 2048)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            max_workers = StreamingSettings().producer_threads
            _executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="haystream-producer")
        return _executor


def start_producer(produce: Callable[[Callable[[Any], None]], Any], channel: ThreadChannel[Any]) -> None:
    """Call `produce(channel.put)` in a producer thread; its return value becomes the channel's result.

    The caller's context (tracing spans, request ids) goes along.
    """
    context = contextvars.copy_context()
    producer_executor().submit(context.run, _produce, produce, channel)


async def iterate_in_thread(
    produce: Callable[[Callable[[T], None]], Any], *, buffer_size: int = 64
) -> AsyncIterator[T]:
    """Async-iterate what `produce(sink)` hands to `sink` from a producer thread.

    Items reach the event loop without polling or per-item thread hops; leaving the iteration (break, `aclose()`,
    cancellation) makes the producer's next `sink` call raise `StreamCancelled`.
    """
    channel: ThreadChannel[T] = ThreadChannel(buffer_size, loop=asyncio.get_running_loop())
    start_producer(produce, channel)
    try:
        while (item := await channel.aget()) is not END:
            yield item
    finally:
        if not channel.done:
            abandon(channel)


def running_producers() -> int:
    """How many producer threads are running a target right now."""
    return _running


def wait_for_idle_producers(timeout: float) -> bool:
    """Wait until no producer is running; False on timeout."""
    with _running_changed:
        return _running_changed.wait_for(lambda: _running == 0, timeout=timeout)


def abandon_sockets() -> bool:
    """Whether abandoned sync runs get their HTTP responses and sockets closed (`HAYSTREAM_ABANDON_SOCKETS`)."""
    return StreamingSettings().abandon_sockets


def abandon(channel: ThreadChannel[Any]) -> None:
    """The consumer leaves: stop the producer at its next chunk, and at once if it is waiting on the network.

    A producer blocked in a read (a slow first token, a stalled upstream) would otherwise run on until the next
    chunk arrives; the HTTP streams and sockets it is reading are closed from here, which ends the read with an
    error in the producer thread.
    """
    channel.close()
    ident = channel.producer_ident
    if ident is not None and abandon_sockets():
        frame = sys._current_frames().get(ident)
        if frame is not None:
            _close_network_in_frames(frame, channel)


#: Stream types a producer may be consuming (a wrapper's generator relaying `haystream.stream(...)`), and how to stop
#: one without waiting: registered by `haystream.streaming.stream`, which imports this module.
_nested_streams: dict[type, Callable[[Any], None]] = {}


def register_nested_stream(kind: type, stop: Callable[[Any], None]) -> None:
    """Let `abandon` stop a stream of type `kind` found in an abandoned producer's frames."""
    _nested_streams[kind] = stop


def _produce(produce: Callable[[Callable[[Any], None]], Any], channel: ThreadChannel[Any]) -> None:
    _count_running(+1)
    channel.producer_ident = threading.get_ident()
    try:
        result = produce(channel.put)
    except StreamCancelled as cancelled:
        if abandon_sockets():
            close_http_responses(cancelled.__traceback__)
        channel.finish()
    except BaseException as error:  # delivered to the consumer, which re-raises it
        if abandon_sockets():
            close_http_responses(error.__traceback__)
        channel.finish(error=error)
    else:
        channel.finish(result=result)
    finally:
        channel.producer_ident = None
        _count_running(-1)


def _count_running(delta: int) -> None:
    global _running
    with _running_changed:
        _running += delta
        _running_changed.notify_all()


def close_http_responses(tb: TracebackType | None) -> int:
    """Close the HTTP responses (and SDK stream objects wrapping one) held in the frames of a traceback.

    Returns how many were closed.
    """
    closed = 0
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if _is_http_stream(value):
                closed += _close_quietly(value)
        tb = tb.tb_next
    return closed


def _close_network_in_frames(frame: FrameType | None, own: ThreadChannel[Any]) -> None:
    # Innermost first: the socket a read is blocked on, then the responses and SDK streams around it. Sockets are
    # only taken from HTTP clients' own frames, whose connections are per request: a pooled database or cache
    # connection that a component happens to hold must not be cut. A producer that is itself waiting on another
    # haystream stream (a wrapper's generator relaying `haystream.stream(...)`) abandons that one in turn.
    while frame is not None:
        in_http_client = frame.f_globals.get("__name__", "").startswith(_HTTP_CLIENT_MODULES)
        for value in list(frame.f_locals.values()):
            sock = _socket_of(value) if in_http_client else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a recv() blocked in the producer thread
            elif isinstance(value, ThreadChannel) and value is not own and not value.done:
                abandon(value)
            elif type(value) in _nested_streams:
                _nested_streams[type(value)](value)
            elif _is_http_stream(value):
                _close_quietly(value)
        frame = frame.f_back


# Where HTTP clients keep the socket a streamed response reads: httpcore's sync stream (`_sock`), http.client's and
# urllib3's connections (`sock`), urllib3's response (`_connection.sock`), http.client's response (its buffered
# `fp` over a `SocketIO`), and requests' response (`raw`, the urllib3 response).
_SOCKET_PATHS = (
    ("_sock",),
    ("sock",),
    ("_connection", "sock"),
    ("fp", "raw", "_sock"),
    ("_fp", "fp", "raw", "_sock"),
    ("raw", "_fp", "fp", "raw", "_sock"),
)


def _socket_of(value: Any) -> socket.socket | None:
    if isinstance(value, socket.socket):
        return value
    if isinstance(value, type):
        return None
    for path in _SOCKET_PATHS:
        current = value
        try:
            for name in path:
                current = getattr(current, name, None)
                if current is None:
                    break
        except Exception:  # an arbitrary object's attribute access may fail in any way
            continue
        if isinstance(current, socket.socket):
            return current
    return None


def _close_quietly(stream: Any) -> int:
    try:
        stream.close()
    except Exception:  # best effort: the stream may already be broken, or be closing in its own thread
        return 0
    return 1


def _is_http_stream(value: Any) -> bool:
    # Duck-typed, because SDKs differ in their HTTP library (openai 3 uses httpx2, others httpx): a streamed
    # response, or an SDK stream wrapper (openai.Stream, anthropic.Stream, ...) that exposes the response it reads.
    try:
        return _is_http_response(value) or (
            _is_http_response(getattr(value, "response", None)) and callable(value.close)
        )
    except Exception:  # an arbitrary object's attribute access may fail in any way
        return False


def _is_http_response(value: Any) -> bool:
    return (
        not isinstance(value, type)
        and callable(getattr(value, "iter_bytes", None))
        and callable(getattr(value, "close", None))
    )
