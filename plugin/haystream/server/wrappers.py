"""Calling a pipeline wrapper's chat method and turning whatever it returns into one async iterator of items.

Sync methods never run on the event loop: the call and the iteration of what it returns happen in one producer
thread (`iterate_in_threadpool`'s thread hop per chunk is what makes hayhooks' sync streams expensive). A
`haystream.stream()` returned by a sync wrapper runs directly in that thread, without a second hand-off.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from hayhooks import BasePipelineWrapper
from hayhooks.server.utils.request_headers import accepts_request_headers
from starlette.datastructures import Headers

from haystream.openai import OpenAIError
from haystream.streaming.producer import iterate_in_thread
from haystream.streaming.stream import ChunkStream


def is_chat_wrapper(wrapper: Any) -> bool:
    """Whether a registry entry implements a chat method (run_api-only wrappers are not models)."""
    return isinstance(wrapper, BasePipelineWrapper) and (_implements_sync(wrapper) or _implements_async(wrapper))


async def open_items(
    wrapper: BasePipelineWrapper, *, model: str, body: dict[str, Any], headers: Headers, buffer_size: int
) -> AsyncIterator[Any]:
    """Call the wrapper for one request; the returned iterator yields its items (str, chunks, events, dicts)."""
    kwargs: dict[str, Any] = {"model": model, "messages": body["messages"], "body": body}
    if _implements_async(wrapper):
        method = wrapper.run_chat_completion_async
        if accepts_request_headers(method):
            kwargs["headers"] = headers
        return as_async_items(await method(**kwargs), buffer_size)
    if _implements_sync(wrapper):
        method = wrapper.run_chat_completion
        if accepts_request_headers(method):
            kwargs["headers"] = headers
        return iterate_in_thread(lambda sink: _call_and_drain(method, kwargs, sink), buffer_size=buffer_size)
    raise OpenAIError(501, f"Pipeline '{model}' does not implement chat completions.", code="chat_not_implemented")


def is_responses_wrapper(wrapper: Any) -> bool:
    """Whether a registry entry can answer `POST /v1/responses` (a chat method, or hayhooks' `run_response`)."""
    return is_chat_wrapper(wrapper) or (
        isinstance(wrapper, BasePipelineWrapper)
        and (wrapper._is_run_response_implemented or wrapper._is_run_response_async_implemented)
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
    if wrapper._is_run_response_async_implemented or wrapper._is_run_response_implemented:
        kwargs: dict[str, Any] = {"model": model, "input_items": input_items, "body": body}
        if wrapper._is_run_response_async_implemented:
            method = wrapper.run_response_async
            if accepts_request_headers(method):
                kwargs["headers"] = headers
            return as_async_items(await method(**kwargs), buffer_size)
        method = wrapper.run_response
        if accepts_request_headers(method):
            kwargs["headers"] = headers
        return iterate_in_thread(lambda sink: _call_and_drain(method, kwargs, sink), buffer_size=buffer_size)
    return await open_items(wrapper, model=model, body=body, headers=headers, buffer_size=buffer_size)


def as_async_items(result: Any, buffer_size: int) -> AsyncIterator[Any]:
    """Any supported return value (str, async iterator, sync iterator, None) as an async iterator of items."""
    if hasattr(result, "__aiter__"):
        return result.__aiter__()
    if _is_sync_iterable(result):
        return iterate_in_thread(lambda sink: drain(result, sink), buffer_size=buffer_size)
    return _single(result)


def drain(result: Any, sink: Callable[[Any], None]) -> None:
    """Hand a wrapper's (sync) result to `sink` item by item, closing the iterator however the loop ends."""
    if isinstance(result, ChunkStream) and not _started(result):
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


def _implements_sync(wrapper: BasePipelineWrapper) -> bool:
    # What hayhooks' loader records in private flags, asked of the class: is the method overridden?
    return type(wrapper).run_chat_completion is not BasePipelineWrapper.run_chat_completion


def _implements_async(wrapper: BasePipelineWrapper) -> bool:
    return type(wrapper).run_chat_completion_async is not BasePipelineWrapper.run_chat_completion_async


def _is_sync_iterable(value: Any) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, str | bytes | dict)


def _started(stream: ChunkStream) -> bool:
    return stream._channel is not None


async def _single(value: Any) -> AsyncIterator[Any]:
    if value is not None:
        yield value
