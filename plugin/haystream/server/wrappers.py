"""Calling a pipeline wrapper's chat method and turning whatever it returns into one async iterator of items.

Sync methods never run on the event loop: the call happens in a producer thread, and so does the iteration of a
sync iterator it returns (`iterate_in_threadpool`'s thread hop per chunk is what makes hayhooks' sync streams
expensive). A `haystream.stream()` returned by a sync wrapper is not iterated in a thread at all: its async twin
runs on the server's loop, so the thread is released as soon as the method returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from hayhooks import BasePipelineWrapper
from starlette.datastructures import Headers

from haystream._compat import accepts_request_headers
from haystream.openai import OpenAIError
from haystream.streaming import use_event_loop
from haystream.streaming.producer import iterate_in_thread, producer_executor
from haystream.streaming.stream import AsyncChunkStream, ChunkStream

logger = logging.getLogger("haystream.server")

# Whether a wrapper method takes `headers`: hayhooks inspects the signature (~1.2 ms); once per method is enough.
_takes_headers: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
_warned_blocking: set[str] = set()  # `*_async` methods that are plain functions, said once each


def is_chat_wrapper(wrapper: Any) -> bool:
    """Whether a registry entry implements a chat method (run_api-only wrappers are not models)."""
    return isinstance(wrapper, BasePipelineWrapper) and (_implements_sync(wrapper) or _implements_async(wrapper))


def is_async_chat_wrapper(wrapper: Any) -> bool:
    """Whether a chat wrapper answers with `run_chat_completion_async` (which haystream prefers)."""
    return isinstance(wrapper, BasePipelineWrapper) and _implements_async(wrapper)


async def open_items(
    wrapper: BasePipelineWrapper, *, model: str, body: dict[str, Any], headers: Headers, buffer_size: int
) -> AsyncIterator[Any]:
    """Call the wrapper for one request; the returned iterator yields its items (str, chunks, events, dicts)."""
    kwargs: dict[str, Any] = {"model": model, "messages": body["messages"], "body": body}
    if _implements_async(wrapper):
        method = wrapper.run_chat_completion_async
        if _accepts_headers(method):
            kwargs["headers"] = headers
        return as_async_items(await _call_async(method, kwargs), buffer_size)
    if _implements_sync(wrapper):
        method = wrapper.run_chat_completion
        if _accepts_headers(method):
            kwargs["headers"] = headers
        loop = asyncio.get_running_loop()
        # Sync streams started in producer threads (a wrapper's generator iterating haystream.stream) run on this
        # loop too, so that components are only ever driven from one loop.
        use_event_loop(loop)
        call = functools.partial(contextvars.copy_context().run, functools.partial(method, **kwargs))
        result = await loop.run_in_executor(producer_executor(), call)
        if inspect.isawaitable(result):  # an `async def run_chat_completion`: its coroutine runs on the loop
            result = await result
        return as_async_items(result, buffer_size)
    raise OpenAIError(501, f"Pipeline '{model}' does not implement chat completions.", code="chat_not_implemented")


def is_responses_wrapper(wrapper: Any) -> bool:
    """Whether a registry entry can answer `POST /v1/responses` (a chat method, or hayhooks' `run_response`)."""
    return is_chat_wrapper(wrapper) or (
        isinstance(wrapper, BasePipelineWrapper)
        and (_implements(wrapper, "run_response") or _implements(wrapper, "run_response_async"))
    )


async def open_response_items(
    wrapper: BasePipelineWrapper,
    *,
    model: str,
    input_items: list[dict[str, Any]],
    body: dict[str, Any],
    headers: Headers,
    buffer_size: int,
) -> AsyncIterator[Any]:
    """Call the wrapper for one Responses request: its `run_response[_async]` if it has one (hayhooks' contract),
    else its chat method with `body["messages"]`."""
    if _implements(wrapper, "run_response_async") or _implements(wrapper, "run_response"):
        kwargs: dict[str, Any] = {"model": model, "input_items": input_items, "body": body}
        if _implements(wrapper, "run_response_async"):
            method = wrapper.run_response_async
            if _accepts_headers(method):
                kwargs["headers"] = headers
            return as_async_items(await _call_async(method, kwargs), buffer_size)
        method = wrapper.run_response
        if _accepts_headers(method):
            kwargs["headers"] = headers
        return iterate_in_thread(lambda sink: _call_and_drain(method, kwargs, sink), buffer_size=buffer_size)
    return await open_items(wrapper, model=model, body=body, headers=headers, buffer_size=buffer_size)


def as_async_items(result: Any, buffer_size: int) -> AsyncIterator[Any]:
    """Any supported return value (str, async iterator, sync iterator, None) as an async iterator of items."""
    if isinstance(result, AsyncChunkStream):
        return result.start()  # the upstream request goes out now, not when the response task first reads
    if hasattr(result, "__aiter__"):
        return result.__aiter__()
    if isinstance(result, ChunkStream) and not result.started:
        return result.as_async(buffer_size).start()  # no thread, when its components support run_async
    if _is_sync_iterable(result):
        return iterate_in_thread(lambda sink: drain(result, sink), buffer_size=buffer_size)
    return _single(result)


async def _call_async(method: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Call a wrapper's `*_async` method: a coroutine function (awaited) or an async generator function (`async
    def` with `yield`, whose generator is the answer; awaiting it was a TypeError)."""
    result = method(**kwargs)
    if inspect.isawaitable(result):
        return await result
    if not hasattr(result, "__aiter__"):
        name = f"{type(getattr(method, '__self__', method)).__module__}.{getattr(method, '__qualname__', method)}"
        if name not in _warned_blocking:
            _warned_blocking.add(name)
            logger.warning(
                "%s is a plain function: it ran on the event loop, holding up every other request while it ran. "
                "Make it `async def`, or name it without `_async` to run it in a thread.",
                name,
            )
    return result


def _accepts_headers(method: Any) -> bool:
    function = getattr(method, "__func__", method)
    try:
        return _takes_headers[function]
    except (KeyError, TypeError):
        accepts = accepts_request_headers(method)
    with contextlib.suppress(TypeError):  # not weak-referenceable: asked again next time
        _takes_headers[function] = accepts
    return accepts


def drain(result: Any, sink: Callable[[Any], None]) -> None:
    """Hand a wrapper's (sync) result to `sink` item by item, closing the iterator however the loop ends."""
    if isinstance(result, ChunkStream) and not result.started:
        result.run_into(sink)
        return
    if not _is_sync_iterable(result):
        if result is not None:
            sink(result)
        return
    iterator = iter(result)
    try:
        for item in iterator:
            sink(item)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # a generator's finally blocks run now, stopping whatever it was streaming


def _call_and_drain(method: Callable[..., Any], kwargs: dict[str, Any], sink: Callable[[Any], None]) -> None:
    drain(method(**kwargs), sink)


def _implements(wrapper: BasePipelineWrapper, method: str) -> bool:
    # What hayhooks' loader records in private flags, asked of the class: is the method overridden?
    return getattr(type(wrapper), method, None) is not getattr(BasePipelineWrapper, method, None)


def _implements_sync(wrapper: BasePipelineWrapper) -> bool:
    return _implements(wrapper, "run_chat_completion")


def _implements_async(wrapper: BasePipelineWrapper) -> bool:
    return _implements(wrapper, "run_chat_completion_async")


def _is_sync_iterable(value: Any) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, str | bytes | dict)


async def _single(value: Any) -> AsyncIterator[Any]:
    if value is not None:
        yield value
