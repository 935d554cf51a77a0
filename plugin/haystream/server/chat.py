"""`POST /v1/chat/completions`: one wrapper call, answered as exact OpenAI SSE or as one `chat.completion`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from haystream.openai import (
    DONE,
    PING,
    ChatCompletionRequest,
    ChunkFramer,
    CompletionBuilder,
    DeltaMapper,
    Event,
    OpenAIError,
    ToolActivity,
    ToolCallStarted,
    classify_failure,
    data_frame,
    describe_failure,
    refused_upstream,
)
from haystream.openai.protocol import Delta
from haystream.openwebui import activity
from haystream.openwebui.activity import PLAIN_CLIENT, ClientStyle
from haystream.server import tracing
from haystream.server.asgi import Send, send_error, send_json

logger = logging.getLogger("haystream.server")

_FAILED = "The pipeline failed: "


def failure_error(error: BaseException, request_id: str, secrets: Sequence[str] = ()) -> OpenAIError:
    """The client-facing error for a wrapper that raised: secrets redacted, the request id added; the traceback is
    logged, never sent."""
    tracing.note_failure(error)  # the request's span is marked failed with this error
    if isinstance(error, OpenAIError):
        return error
    logger.error("request %s: the pipeline failed", request_id, exc_info=error)
    status, code = classify_failure(error)
    # Behind another haystream, the upstream's message already starts with this prefix: say it once.
    description = describe_failure(error, secrets=secrets).replace(_FAILED, "")
    message = f"{_FAILED}{description} (request id {request_id})"
    # An upstream's outright refusal would come back on every retry, and each retry runs the pipeline again: the
    # OpenAI SDKs retry a 5xx twice unless told not to.
    headers = {"x-should-retry": "false"} if status >= 500 and refused_upstream(error) else None
    return OpenAIError(status, message, type="server_error" if status >= 500 else None, code=code, headers=headers)


class ChatResponse:
    """Streams (or aggregates) the items of one wrapper call to the client."""

    def __init__(
        self,
        request: ChatCompletionRequest,
        items: AsyncIterator[Any],
        *,
        request_id: str,
        keepalive_seconds: float,
        send_timeout_seconds: float = 60.0,
        secrets: Sequence[str] = (),
        style: ClientStyle = PLAIN_CLIENT,
    ) -> None:
        self._request = request
        self._items = items
        self._request_id = request_id
        self._keepalive = keepalive_seconds
        self._send_timeout = send_timeout_seconds
        self._secrets = secrets
        self._sending = False  # a write is waiting for the client to read
        self._events = style.events
        self._style = style
        self._framer = ChunkFramer(request.model)
        self._mapper = DeltaMapper()
        self._last_send = 0.0

    async def send(self, send: Send) -> None:
        """Answer the request; always closes the item iterator."""
        try:
            if self._request.stream:
                await self._stream(send)
            else:
                await self._complete(send)
        finally:
            await aclose(self._items)

    async def _complete(self, send: Send) -> None:
        builder = CompletionBuilder()
        try:
            async for item in self._items:
                for delta in self._client_deltas(item):
                    if not isinstance(delta, Event):
                        builder.add(delta)
            tool_deltas, finish_reason, usage = self._mapper.finish()
        except Exception as error:
            await send_error(send, failure_error(error, self._request_id, self._secrets), headers=self._id_header())
            return
        for delta in tool_deltas:
            builder.add(delta)
        framer = self._framer
        completion = builder.build(
            id=framer.id, created=framer.created, model=framer.model, finish_reason=finish_reason, usage=usage
        )
        await send_json(send, 200, completion, headers=self._id_header())

    async def _stream(self, send: Send) -> None:
        # Headers wait for the first item a client can see (a role-only chunk, or an event this client does not
        # get, is not one), so that a failure before any visible output gets a real status and the error envelope.
        # A slow first output (longer than the keep-alive interval) commits them anyway, and pings keep the
        # connection alive from then on.
        task = asyncio.current_task()
        assert task is not None
        watchdog = _Watchdog(self, send, task)
        failed: Exception | None = None
        try:
            first = await self._first_output()
        except asyncio.CancelledError:
            watchdog.disarm()
            if not watchdog.stalled:
                raise
            self._end_stalled(task)
            return
        except Exception as error:
            if not await watchdog.committed():
                await send_error(send, failure_error(error, self._request_id, self._secrets), headers=self._id_header())
                return
            first, failed = None, error  # the headers went out already: the error ends the stream below
        else:
            if not await watchdog.committed():
                # Known to show no text before its end (tool calls only, or nothing): the role chunk says
                # `content: null`, as OpenAI's does, so that SDK helpers give None rather than "".
                await self._start(send, text_follows=first is not None)
                watchdog.arm()
        try:
            if failed is not None:
                raise failed
            if first is not None:
                await self._write(send, first)
                async for item in self._items:
                    await self._send_item(send, item)
            await self._finish(send)
        except asyncio.CancelledError:
            if not watchdog.stalled:
                raise
            self._end_stalled(task)
        except Exception as error:
            error_frame = data_frame(failure_error(error, self._request_id, self._secrets).to_dict())
            await send({"type": "http.response.body", "body": error_frame + DONE, "more_body": False})
        finally:
            watchdog.disarm()

    def _end_stalled(self, task: asyncio.Task[Any]) -> None:
        # The watchdog stopped a client that reads nothing: end like a disconnect (the run is closed by send()).
        task.uncancel()
        logger.warning(
            "request %s: the client read nothing for %gs; the run was cancelled", self._request_id, self._send_timeout
        )

    async def _first_output(self) -> bytes | None:
        """The frames of the first item that shows the client anything; None if the items end first."""
        async for item in self._items:
            frames = self._frames(item)
            if frames:
                return frames
        return None

    async def _start(self, send: Send, *, text_follows: bool = True) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                    *self._id_header(),
                ],
            }
        )
        await self._write(send, self._framer.role("" if text_follows else None))

    async def _send_item(self, send: Send, item: Any) -> None:
        frames = self._frames(item)
        if frames:
            await self._write(send, frames)

    def _frames(self, item: Any) -> bytes:
        """What one item amounts to on this client's wire (empty when nothing of it is shown)."""
        frames = []
        for delta in self._client_deltas(item):
            if not isinstance(delta, Event):
                frames.append(self._framer.delta(delta))
            elif self._events:
                frames.append(data_frame({"event": {"type": delta.type, "data": delta.data}}))
        if not frames:
            return b""
        return frames[0] if len(frames) == 1 else b"".join(frames)

    def _client_deltas(self, item: Any) -> list[Delta | Event]:
        return client_deltas(self._mapper, item, self._style)

    async def _finish(self, send: Send) -> None:
        tool_deltas, finish_reason, usage = self._mapper.finish()
        frames = [self._framer.delta(delta) for delta in tool_deltas]
        frames.append(self._framer.finish(finish_reason))
        if self._request.include_usage and usage:  # no usage reported: none sent (zeros would be a lie)
            frames.append(self._framer.usage(usage))
        frames.append(DONE)
        await send({"type": "http.response.body", "body": b"".join(frames), "more_body": False})

    async def _write(self, send: Send, body: bytes) -> None:
        self._last_send = time.monotonic()
        self._sending = True
        await send({"type": "http.response.body", "body": body, "more_body": True})
        self._sending = False

    def _id_header(self) -> list[tuple[bytes, bytes]]:
        return [(b"x-request-id", self._request_id.encode())]


class _Watchdog:
    """One timer per stream, and a task only when there is something to send: it commits the headers of an answer
    whose first output is slower than the keep-alive interval, pings an idle stream, and cancels the stream of a
    client that has read nothing for the send timeout. Nothing runs per chunk: the timer looks at the time of the
    last write when it fires (about once per keep-alive interval), and sets itself again."""

    __slots__ = ("_commit_failed", "_job", "_loop", "_response", "_send", "_task", "_timer", "stalled")

    def __init__(self, response: ChatResponse, send: Send, task: asyncio.Task[Any]) -> None:
        self._response = response
        self._send = send
        self._task = task
        self._loop = asyncio.get_running_loop()
        self._job: asyncio.Task[None] | None = None  # the early commit, or a ping
        self._commit_failed: Exception | None = None
        self.stalled = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(response._keepalive, self._commit)

    async def committed(self) -> bool:
        """Whether the headers went out early (waiting for that to finish); if not, they never will."""
        if self._job is None:
            self.disarm()
            return False
        await self._job
        if self._commit_failed is not None:
            raise self._commit_failed
        return True

    def arm(self) -> None:
        """Watch the stream from now on (after its headers went out)."""
        self._set(self._response._keepalive)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._job is not None and not self._job.done():
            self._job.cancel()

    def _set(self, delay: float) -> None:
        self._timer = self._loop.call_later(delay, self._check)

    def _commit(self) -> None:
        self._timer = None
        self._job = self._loop.create_task(self._commit_headers())

    async def _commit_headers(self) -> None:
        try:
            await self._response._start(self._send)
        except Exception as error:  # the stream's own task raises it (see `committed`)
            self._commit_failed = error
            return
        self.arm()

    def _check(self) -> None:
        response = self._response
        waited = time.monotonic() - response._last_send
        if response._sending:
            if waited < response._send_timeout:
                self._set(response._send_timeout - waited)
            else:
                self.stalled = True
                self._timer = None
                self._task.cancel()
        elif waited < response._keepalive:
            self._set(response._keepalive - waited)
        else:
            self._timer = None
            self._job = self._loop.create_task(self._ping())

    async def _ping(self) -> None:
        try:
            async with asyncio.timeout(self._response._send_timeout):
                await self._response._write(self._send, PING)
        except TimeoutError:
            self._response._sending = True  # the ping is stuck: the next check stops the stream
        except Exception:  # the client left: the stream's own next write (or the disconnect watch) ends it
            return
        self.arm()


def client_deltas(mapper: DeltaMapper, item: Any, style: ClientStyle) -> list[Delta | Event]:
    """What an item amounts to for a client: deltas and events, an agent's tool activity rendered for it."""
    deltas = mapper.feed(item)
    if not any(isinstance(delta, ToolCallStarted | ToolActivity) for delta in deltas):
        return deltas  # type: ignore[return-value]  # the common case, without a copy
    shown: list[Delta | Event] = []
    for delta in deltas:
        if isinstance(delta, ToolCallStarted | ToolActivity):
            shown += activity.render(delta, style)
        else:
            shown.append(delta)
    return shown


async def aclose(items: AsyncIterator[Any]) -> None:
    """Close an item iterator if it can be closed (running a generator's finally blocks)."""
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
