"""`stream()` and `astream()`: iterate the chunks of a Pipeline, chat generator or Agent as they are produced."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any

from haystack.dataclasses import ChatMessage, StreamingChunk

from haystream.streaming.channel import END, AsyncChannel, LoopToThreadChannel, StreamCancelled, ThreadChannel
from haystream.streaming.loop import shared_loop
from haystream.streaming.producer import abandon, register_nested_stream, start_producer
from haystream.streaming.targets import StreamingComponents, StreamTarget, resolve_target

DEFAULT_BUFFER_SIZE = 64
_CANCEL_TIMEOUT_SECONDS = 2.0


class _Outcome:
    """Result bookkeeping shared by both stream twins."""

    _target: StreamTarget
    _channel: Any = None
    _finished = False
    #: The error the iteration raised, or True if the stream was closed before its end: either way, no result.
    _failed: BaseException | bool = False

    @property
    def result(self) -> dict[str, Any]:
        """The run's output (as `Pipeline.run` or the component's `run` returns it), once the stream is exhausted.

        :raises RuntimeError: before the end, or if the run failed (chained to its error) or was stopped.
        """
        if isinstance(self._failed, BaseException):
            raise RuntimeError(f"The run failed ({type(self._failed).__name__}); it has no result.") from self._failed
        if self._failed:
            raise RuntimeError("The stream was closed before its end; it has no result.")
        if not self._finished:
            raise RuntimeError("The stream has not been fully consumed; iterate it to the end first.")
        return self._channel.result

    @property
    def reply(self) -> ChatMessage | None:
        """The final reply `ChatMessage` of the run, once the stream is exhausted (None if the run has none)."""
        return self._target.reply(self.result)


class _Ran:
    """Stands in for the channel of a stream that `run_into` ran directly."""

    def __init__(self, result: dict[str, Any]) -> None:
        self.result = result


class ChunkStream(_Outcome, Iterator[StreamingChunk]):
    """A synchronous iterator over the `StreamingChunk`s of one run.

    The run starts on the first `next()`. When every streamed component supports `run_async`, it runs on
    haystream's shared event loop (one daemon thread per process, whatever the number of streams), exactly as
    `astream()` would; otherwise in a producer thread of haystream's own executor. Closing the stream (`close()`,
    leaving a `with` block, or dropping the last reference) stops the run: a run on the shared loop is cancelled
    (which closes the upstream HTTP stream), a sync run stops at its next chunk. Errors raised by the run are
    re-raised here after the chunks produced before them.
    """

    _future: concurrent.futures.Future[None] | None = None
    _handed_over = False

    def __init__(self, target: StreamTarget, buffer_size: int = DEFAULT_BUFFER_SIZE) -> None:
        self._target = target
        self._buffer_size = buffer_size

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> StreamingChunk:
        if self._finished or self._failed:
            raise StopIteration
        if self._channel is None:
            self._start()
        try:
            item = self._channel.get()
        except Exception as error:  # the run's error, raised once; the stream is over
            self._failed = error
            raise
        if item is END:
            self._finished = True
            raise StopIteration
        return item

    def _start(self) -> None:
        if self._handed_over:
            raise RuntimeError("This stream was handed over with as_async(); iterate that one instead.")
        if self._target.supports_async and not _in_event_loop_thread():
            loop = shared_loop()
            channel: Any = LoopToThreadChannel(self._buffer_size, loop)
            # The task runs in a copy of this thread's context (tracing spans, request ids).
            self._future = asyncio.run_coroutine_threadsafe(_run_on_loop(self._target, channel), loop)
        else:
            channel = ThreadChannel(self._buffer_size)
            start_producer(self._target.run, channel)
        self._channel = channel

    def as_async(self, buffer_size: int | None = None) -> AsyncChunkStream:
        """The async twin of this not-yet-started stream, to iterate on the caller's own event loop instead.

        For bridges that hold a `ChunkStream` but run an event loop (haystream's server does this with what a sync
        wrapper returns): the run then needs no thread at all when its components support `run_async`.
        """
        if self._channel is not None or self._handed_over:
            raise RuntimeError("as_async() needs a stream that has not been iterated yet.")
        self._handed_over = True
        return AsyncChunkStream(self._target, buffer_size or self._buffer_size)

    def run_into(self, sink: Callable[[StreamingChunk], None]) -> dict[str, Any]:
        """Run this (not yet started) stream in the calling thread, handing each chunk to `sink`.

        For bridges that already own a thread: it saves the hand-off through a second one. Returns the result.
        """
        if self._channel is not None or self._handed_over:
            raise RuntimeError("run_into() needs a stream that has not been iterated yet.")
        self._channel = _Ran(self._target.run(sink))
        self._finished = True
        return self._channel.result

    @property
    def started(self) -> bool:
        """True once the run has started (by iteration, `run_into` or `as_async`)."""
        return self._channel is not None or self._handed_over

    def close(self) -> None:
        """Stop the run (if it is still going): cancel it on the shared loop, or release the producer thread."""
        self._stop(wait=True)

    def _stop(self, *, wait: bool) -> None:
        if self._finished or self._failed:
            return
        self._failed = True
        if self._channel is None:
            return
        if self._future is None:
            abandon(self._channel)
            return
        self._channel.close()
        self._future.cancel()  # thread-safe: the task is cancelled on the shared loop
        if wait and self._channel.producing and not _in_event_loop_thread():
            # Returns once the run has unwound (the upstream response closed), as `aclose()` does.
            self._channel.wait_ended(_CANCEL_TIMEOUT_SECONDS)

    def __enter__(self) -> ChunkStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Garbage collection may run on any thread, the shared loop's included: never wait here.
        self._stop(wait=False)


register_nested_stream(ChunkStream, lambda stream: stream._stop(wait=False))


class AsyncChunkStream(_Outcome, AsyncIterator[StreamingChunk]):
    """An asynchronous iterator over the `StreamingChunk`s of one run.

    Runs natively on the event loop (`run_async`) when every streamed component supports it; otherwise the sync run
    goes to a producer thread whose chunks are handed to the loop without polling or per-chunk thread hops.
    `aclose()`, leaving an `async with` block, cancelling the consuming task, or dropping the last reference stops
    the run.
    """

    def __init__(self, target: StreamTarget, buffer_size: int = DEFAULT_BUFFER_SIZE) -> None:
        self._target = target
        self._buffer_size = buffer_size
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False  # an __anext__ is waiting

    def __aiter__(self) -> AsyncChunkStream:
        return self

    async def __anext__(self) -> StreamingChunk:
        if self._finished or self._failed:
            raise StopAsyncIteration
        if self._reading:
            # Its channel wakes one reader: a second task would wait for ever (or steal chunks), as a generator's
            # "already running" error says.
            raise RuntimeError("This stream is already being read by another task; a stream has one consumer.")
        if self._channel is None:
            self._start()
        self._reading = True
        try:
            item = await self._next_item()
        except asyncio.CancelledError:
            self._abort()
            raise
        except Exception as error:  # the run's error, raised once; the stream is over
            self._failed = error
            raise
        finally:
            self._reading = False
        if item is END:
            self._finished = True
            raise StopAsyncIteration
        return item

    def start(self) -> AsyncChunkStream:
        """Start the run now, on the running loop, instead of at the first `__anext__`; returns the stream.

        A server that will iterate the stream in another task saves that task's first turn before the upstream
        request goes out (under load, a turn of the loop can take long).
        """
        if self._channel is None:
            self._start()
        return self

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._target.supports_async:
            channel: Any = AsyncChannel(self._buffer_size)
            self._task = self._loop.create_task(_run_on_loop(self._target, channel))
            self._next_item = channel.get
        else:
            channel = ThreadChannel(self._buffer_size, loop=self._loop)
            start_producer(self._target.run, channel)
            self._next_item = channel.aget
        self._channel = channel

    def _abort(self) -> None:
        if self._finished or self._failed:
            return
        self._failed = True
        if self._channel is None:
            return
        if self._task is None:
            abandon(self._channel)
        else:
            self._channel.close()
            if not self._task.done():
                self._task.cancel()

    async def aclose(self) -> None:
        """Stop the run (if it is still going) and wait briefly for it to wind down."""
        self._abort()
        if self._task is not None and not self._task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({self._task}, timeout=_CANCEL_TIMEOUT_SECONDS)

    async def __aenter__(self) -> AsyncChunkStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if self._channel is None or self._finished:
            return
        if self._task is None:
            abandon(self._channel)  # thread-safe
        elif self._loop is not None and not self._loop.is_closed():
            self._channel.close()
            self._loop.call_soon_threadsafe(self._task.cancel)


def _in_event_loop_thread() -> bool:
    # A sync stream consumed in a thread that runs an event loop blocks that loop: its run must not need it (nor
    # the shared loop, which may be this very loop), and its components' async clients may belong to it. Such a
    # stream keeps a producer thread.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _run_on_loop(target: StreamTarget, channel: AsyncChannel[StreamingChunk] | LoopToThreadChannel[Any]) -> None:
    channel.producing = True
    try:
        result = await target.run_async(channel.put)
    except StreamCancelled:
        channel.finish()
    except asyncio.CancelledError:
        channel.finish(error=asyncio.CancelledError())
        raise
    except Exception as error:
        channel.finish(error=error)
    else:
        channel.finish(result=result)


def _check_buffer_size(buffer_size: int) -> None:
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, int):
        raise TypeError(f"buffer_size must be an int, not {type(buffer_size).__name__}.")
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be at least 1, not {buffer_size}.")


def stream(
    target: Any,
    data: dict[str, Any] | None = None,
    *,
    messages: list[ChatMessage] | None = None,
    streaming_components: StreamingComponents = None,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    **run_kwargs: Any,
) -> ChunkStream:
    """Stream a Pipeline, a chat generator or an Agent as a sync iterator of `StreamingChunk`s.

    :param target: a `Pipeline`, an `Agent`, or any component whose `run` takes a `streaming_callback`.
    :param data: pipeline inputs (nested or flat, as `Pipeline.run` takes them), or extra run inputs of a component.
    :param messages: chat messages; for a pipeline they go to every component with an unconnected `messages` input.
    :param streaming_components: pipelines only: `None` for the final streaming component(s), `"all"`, or names.
    :param buffer_size: how many chunks the producer may get ahead of the consumer before it waits.
    :param run_kwargs: further keyword arguments of the target's `run` (e.g. `generation_kwargs`,
        `include_outputs_from`).
    :raises ValueError: at once, for unknown or non-streaming `streaming_components`, or a `buffer_size` below 1.
    :raises TypeError: at once, for a target that cannot stream (a class instead of an instance included), `data`
        that is not a dict, or a `buffer_size` that is not an int.
    """
    _check_buffer_size(buffer_size)
    resolved = resolve_target(
        target, data, messages=messages, streaming_components=streaming_components, run_kwargs=run_kwargs
    )
    return ChunkStream(resolved, buffer_size)


def astream(
    target: Any,
    data: dict[str, Any] | None = None,
    *,
    messages: list[ChatMessage] | None = None,
    streaming_components: StreamingComponents = None,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    **run_kwargs: Any,
) -> AsyncChunkStream:
    """Stream a Pipeline, a chat generator or an Agent as an async iterator of `StreamingChunk`s.

    Same parameters as `stream()`. The run starts at the first `__anext__` on the running event loop.
    """
    _check_buffer_size(buffer_size)
    resolved = resolve_target(
        target, data, messages=messages, streaming_components=streaming_components, run_kwargs=run_kwargs
    )
    return AsyncChunkStream(resolved, buffer_size)
