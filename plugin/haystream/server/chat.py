"""`POST /v1/chat/completions`: one wrapper call, answered as exact OpenAI SSE or as one `chat.completion`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
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
from haystream.server.asgi import Send, send_error, send_json

logger = logging.getLogger("haystream.server")


def failure_error(error: BaseException, request_id: str) -> OpenAIError:
    """The client-facing error for a wrapper that raised (the traceback is logged, never sent)."""
    if isinstance(error, OpenAIError):
        return error
    logger.error("request %s: the pipeline failed", request_id, exc_info=error)
    status = status_for_failure(error)
    message = f"The pipeline failed: {describe_failure(error)} (request id {request_id})"
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
        events: bool = False,
        tool_style: str = "none",
    ) -> None:
        self._request = request
        self._items = items
        self._request_id = request_id
        self._keepalive = keepalive_seconds
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
            await send_error(send, failure_error(error, self._request_id), headers=self._id_header())
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
        # Headers wait for the first item a client can see (a role-only chunk, or an event this client does not
        # get, is not one), so that a failure before any visible output gets a real status and the error envelope.
        # A slow first output (longer than the keep-alive interval) commits them anyway, and pings keep the
        # connection alive from then on.
        first_output = asyncio.ensure_future(self._first_output())
        try:
            done, _ = await asyncio.wait({first_output}, timeout=self._keepalive)
            if done:
                first = first_output.result()
        except asyncio.CancelledError:
            first_output.cancel()
            await asyncio.wait({first_output})  # let the wrapper unwind before its iterator is closed
            raise
        except Exception as error:
            await send_error(send, failure_error(error, self._request_id), headers=self._id_header())
            return
        await self._start(send)
        pinger = asyncio.ensure_future(self._ping(send))
        try:
            if not done:
                first = await first_output
            if first is not None:
                await self._write(send, first)
                async for item in self._items:
                    await self._send_item(send, item)
            await self._finish(send)
        except Exception as error:
            error_frame = data_frame(failure_error(error, self._request_id).to_dict())
            await send({"type": "http.response.body", "body": error_frame + DONE, "more_body": False})
        finally:
            pinger.cancel()

    async def _first_output(self) -> bytes | None:
        """The frames of the first item that shows the client anything; None if the items end first."""
        async for item in self._items:
            frames = self._frames(item)
            if frames:
                return frames
        return None

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
        await send({"type": "http.response.body", "body": body, "more_body": True})

    async def _ping(self, send: Send) -> None:
        while True:
            idle = time.monotonic() - self._last_send
            if idle < self._keepalive:
                await asyncio.sleep(self._keepalive - idle)
                continue
            await self._write(send, PING)

    def _id_header(self) -> list[tuple[bytes, bytes]]:
        return [(b"x-request-id", self._request_id.encode())]


async def _aclose(items: AsyncIterator[Any]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
