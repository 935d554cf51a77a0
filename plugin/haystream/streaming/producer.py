"""Running a target in a producer thread, and what happens when that run is abandoned.

Every sync stream gets one producer thread from haystream's own executor (never anyio's shared limiter, never a
thread hop per chunk). When the consumer leaves, the producer stops at its next chunk: the injected callback raises
`StreamCancelled`. Providers' sync streaming loops do not close their HTTP response on an exception (Haystack's
`OpenAIChatGenerator` among them), so the upstream would keep generating until a garbage collection; the producer
closes every HTTP response it finds in the failed call's frames instead, which cuts the upstream at once.
"""

from __future__ import annotations

import contextvars
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from haystream.streaming.channel import StreamCancelled, ThreadChannel
from haystream.streaming.targets import StreamTarget

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
_running = 0
_running_changed = threading.Condition()


def producer_executor() -> ThreadPoolExecutor:
    """The executor that runs sync producers; `HAYSTREAM_PRODUCER_THREADS` bounds it (default 2048)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            max_workers = int(os.environ.get("HAYSTREAM_PRODUCER_THREADS", "2048"))
            _executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="haystream-producer")
        return _executor


def start_producer(target: StreamTarget, channel: ThreadChannel[Any]) -> None:
    """Run `target` in a producer thread, feeding `channel`; the context (tracing, request ids) goes along."""
    context = contextvars.copy_context()
    producer_executor().submit(context.run, _produce, target, channel)


def running_producers() -> int:
    """How many producer threads are running a target right now."""
    return _running


def wait_for_idle_producers(timeout: float) -> bool:
    """Wait until no producer is running; False on timeout."""
    with _running_changed:
        return _running_changed.wait_for(lambda: _running == 0, timeout=timeout)


def _produce(target: StreamTarget, channel: ThreadChannel[Any]) -> None:
    _count_running(+1)
    try:
        result = target.run(channel.put)
    except StreamCancelled as cancelled:
        close_http_responses(cancelled.__traceback__)
        channel.finish()
    except BaseException as error:  # delivered to the consumer, which re-raises it
        close_http_responses(error.__traceback__)
        channel.finish(error=error)
    else:
        channel.finish(result=result)
    finally:
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
                try:
                    value.close()
                    closed += 1
                except Exception:
                    pass
        tb = tb.tb_next
    return closed


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
