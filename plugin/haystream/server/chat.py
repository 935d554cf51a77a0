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
    data_frame,
    describe_failure,
    status_for_failure,
    webui,
)
from haystream.server import tracing
from haystream.server.asgi import Send, send_error, send_json

logger = logging.getLogger("haystream.server")

_NOTHING: Any = object()


def failure_error(error: BaseException, request_id: str, secrets: Sequence[str] = ()) -> OpenAIError:
    """The client-facing error for a wrapper that raised: secrets redacted, the request id added; the traceback is
    logged, never sent."""
    tracing.note_failure(error)  # the request's span is marked failed with this error
    if isinstance(error, OpenAIError):
        return error
    logger.error("request %s: the pipeline failed", request_id, exc_info=error)
    status = status_for_failure(error)
    message = f"The pipeline failed: {describe_failure(error, secrets=secrets)} (request id {request_id})"
    return OpenAIError(status, message, type="server_error" if status >= 500 else None, code="pipeline_error")


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
        events: bool = False,
        tool_style: str = "none",
    ) -> None:
        self._request = request
        self._items = items
        self._request_id = request_id
        self._keepalive = keepalive_seconds
        self._send_timeout = send_timeout_seconds
        self._secrets = secrets
        self._sending = False  # a write is waiting for the client to read
        self._stalled = False
        self._events = events
        self._tool_style = tool_style
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
            await _aclose(self._items)

    async def _complete(self, send: Send) -> None:
        builder = CompletionBuilder()
        try:
            async for item in self._items:
                for delta in self._client_deltas(item):
                    if not isinstance(delta, Event):
                        builder.add(delta)
        except Exception as error:
            await send_error(send, failure_error(error, self._request_id, self._secrets), headers=self._id_header())
            return
        tool_deltas, finish_reason, usage = self._mapper.finish()
        for delta in tool_deltas:
            builder.add(delta)
        framer = self._framer
        completion = builder.build(
            id=framer.id, created=framer.created, model=framer.model, finish_reason=finish_reason, usage=usage
        )
        await send_json(send, 200, completion, headers=self._id_header())

    async def _stream(self, send: Send) -> None:
        # Headers wait for the first item, so that an early failure gets a real status; a slow first item (longer
        # than the keep-alive interval) commits them anyway, and pings keep the connection alive from then on.
        first_item = asyncio.ensure_future(anext(self._items, _NOTHING))
        try:
            done, _ = await asyncio.wait({first_item}, timeout=self._keepalive)
            if done:
                first = first_item.result()
        except asyncio.CancelledError:
            first_item.cancel()
            await asyncio.wait({first_item})  # let the wrapper unwind before its iterator is closed
            raise
        except Exception as error:
            await send_error(send, failure_error(error, self._request_id, self._secrets), headers=self._id_header())
            return
        await self._start(send)
        watchdog = asyncio.ensure_future(self._watch(send, asyncio.current_task()))
        try:
            if not done:
                first = await first_item
            if first is not _NOTHING:
                await self._send_item(send, first)
                async for item in self._items:
                    await self._send_item(send, item)
            await self._finish(send)
        except asyncio.CancelledError:
            if not self._stalled:
                raise
            # The watchdog stopped a client that reads nothing: end like a disconnect (the run is closed by send()).
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            logger.warning(
                "request %s: the client read nothing for %gs; the run was cancelled",
                self._request_id,
                self._send_timeout,
            )
        except Exception as error:
            error_frame = data_frame(failure_error(error, self._request_id, self._secrets).to_dict())
            await send({"type": "http.response.body", "body": error_frame + DONE, "more_body": False})
        finally:
            watchdog.cancel()

    async def _start(self, send: Send) -> None:
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
        await self._write(send, self._framer.role())

    async def _send_item(self, send: Send, item: Any) -> None:
        frames = []
        for delta in self._client_deltas(item):
            if not isinstance(delta, Event):
                frames.append(self._framer.delta(delta))
            elif self._events:
                frames.append(data_frame({"event": {"type": delta.type, "data": delta.data}}))
        if frames:
            await self._write(send, frames[0] if len(frames) == 1 else b"".join(frames))

    def _client_deltas(self, item: Any) -> list[dict[str, Any] | Event]:
        """What an item amounts to for this client: deltas and events, an agent's tool calls rendered or dropped."""
        deltas = self._mapper.feed(item)
        if not any(isinstance(delta, ToolActivity) for delta in deltas):
            return deltas  # type: ignore[return-value]  # the common case, without a copy
        rendered = (self._render_tool(d) if isinstance(d, ToolActivity) else d for d in deltas)
        return [delta for delta in rendered if delta is not None]

    def _render_tool(self, activity: ToolActivity) -> dict[str, Any] | None:
        """An agent's tool call as people see it: Open WebUI's tool block, a text line, or nothing."""
        if self._tool_style == "details":
            block = webui.tool_call_block(activity.id, activity.name, activity.arguments, activity.result)
            return {"content": block}
        if self._tool_style == "text":
            arguments = ", ".join(f"{key}={value!r}" for key, value in activity.arguments.items())
            return {"content": f"\n[{activity.name}({arguments}) → {activity.result}]\n"}
        return None

    async def _finish(self, send: Send) -> None:
        tool_deltas, finish_reason, usage = self._mapper.finish()
        frames = [self._framer.delta(delta) for delta in tool_deltas]
        frames.append(self._framer.finish(finish_reason))
        if self._request.include_usage:
            frames.append(self._framer.usage(usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}))
        frames.append(DONE)
        await send({"type": "http.response.body", "body": b"".join(frames), "more_body": False})

    async def _write(self, send: Send, body: bytes) -> None:
        self._last_send = time.monotonic()
        self._sending = True
        await send({"type": "http.response.body", "body": body, "more_body": True})
        self._sending = False

    async def _watch(self, send: Send, stream_task: asyncio.Task[Any] | None) -> None:
        """Keep an idle stream alive with pings, and stop one whose client has stopped reading.

        One timer per stream that wakes only when a ping or the send timeout is due: nothing per chunk.
        """
        while True:
            waited = time.monotonic() - self._last_send
            if self._sending:
                if waited < self._send_timeout:
                    await asyncio.sleep(self._send_timeout - waited)
                    continue
                self._stalled = True
                if stream_task is not None:
                    stream_task.cancel()
                return
            if waited < self._keepalive:
                await asyncio.sleep(self._keepalive - waited)
                continue
            try:
                async with asyncio.timeout(self._send_timeout):
                    await self._write(send, PING)
            except TimeoutError:
                self._sending = True  # the ping is stuck: the next turn stops the stream

    def _id_header(self) -> list[tuple[bytes, bytes]]:
        return [(b"x-request-id", self._request_id.encode())]


async def _aclose(items: AsyncIterator[Any]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
