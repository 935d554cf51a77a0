"""`OpenAIChatGenerator`: Haystack's OpenAI chat generator with a streaming path that skips the OpenAI SDK."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import orjson
from haystack import component
from haystack.components.generators.chat import OpenAIChatGenerator as HaystackOpenAIChatGenerator
from haystack.core.serialization_security import allow_deserialization_module
from haystack.dataclasses import (
    ChatMessage,
    ComponentInfo,
    StreamingCallbackT,
    select_streaming_callback,
)
from haystack.tools import ToolsType
from pydantic import BaseModel

from haystream._compat import check_finish_reason, fold_chunks_like_haystack, normalize_messages
from haystream.components._chunks import ChunkBuilder, ChunkLog
from haystream.components._upstream import (
    MAX_SSE_EVENT_BYTES,
    SSEDecoder,
    SSEEventTooLarge,
    env_proxy,
    event_too_large,
    loop_session,
    not_an_event_stream,
    retry_delay,
    should_retry,
    status_error,
    stream_error,
    thread_loop,
    transport_error,
)

# Haystack 3.4 only rebuilds components from allow-listed modules (YAML pipelines, `from_dict`).
allow_deserialization_module("haystream.components")

_DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Arguments of the SDK's `create()` that are not part of the request body.
_SDK_ONLY = ("extra_headers", "extra_query", "extra_body", "timeout")
# How much of a body that is not an event stream is kept for the error it raises.
_HEAD_KEPT = 4096
_END_WAIT = 0.1  # seconds to wait for the body's end after `[DONE]` (the OpenAI SDK waits as long)


@dataclass(frozen=True)
class _Endpoint:
    """What every request of one generator shares, resolved once (like the SDK client Haystack builds lazily)."""

    url: str
    headers: dict[str, str]
    timeout: float
    max_retries: int


@dataclass
class _Request:
    url: str
    headers: dict[str, str]
    body: bytes
    params: dict[str, Any] | None
    timeout: aiohttp.ClientTimeout
    max_retries: int


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_unset=True)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


@component
class OpenAIChatGenerator(HaystackOpenAIChatGenerator):
    """Haystack's `OpenAIChatGenerator`, with streaming that is several times cheaper per chunk.

    A drop-in replacement: same constructor, same outputs, same exceptions, same `to_dict`/`from_dict` (the type
    path is this class, so YAML pipelines load it). When a `streaming_callback` is set (on init or per run), it talks
    to the OpenAI-compatible upstream itself — one pooled `aiohttp` session per event loop, a byte-level SSE reader,
    `orjson`, `StreamingChunk`s built directly — instead of through the OpenAI SDK. Beyond Haystack's generator:

    - reasoning deltas (`reasoning_content`, or `reasoning`) are kept, as chunks with `reasoning` and in the reply;
    - usage is requested by default (`stream_options: {"include_usage": true}` unless `generation_kwargs` sets
      `stream_options`), so `reply.meta["usage"]` is filled;
    - leaving a stream (task cancelled, or a sync callback raising) closes the upstream response at once.

    HTTP errors raise the OpenAI SDK's own exception types (`openai.RateLimitError`, `openai.BadRequestError`, ...),
    transport failures `openai.APIConnectionError` / `openai.APITimeoutError`; `max_retries` retries with the SDK's
    backoff until the response starts. Calls without streaming, and generators configured with
    `http_client_kwargs`, use Haystack's SDK path unchanged. The sync `run` drives the same implementation on an
    event loop private to the calling thread (the callback runs in that thread), unless that thread is already
    running an event loop, where it falls back to Haystack's SDK path.

    An upstream that sends one event-stream event larger than `max_sse_event_bytes` (16 MiB; a line without end, or
    `data:` lines without the blank line that ends their event; a class attribute, set it on a subclass or an
    instance) gets its response closed and raises `openai.APIError`, instead of filling memory.
    """

    max_sse_event_bytes: int = MAX_SSE_EVENT_BYTES

    def warm_up(self) -> None:
        """Prepare nothing: streaming needs no OpenAI SDK client (see `warm_up_async`)."""

    async def warm_up_async(self) -> None:
        """Prepare nothing. The OpenAI SDK clients (`client`, `async_client`) are built by the first call that uses
        them (one without streaming, or with `http_client_kwargs`), the async one in a worker thread."""
        # Building an SDK client loads the CA bundle: 30-90 ms of CPU and ~1 MB here. A Pipeline warms its
        # components up inside the first run, so Haystack's warm-up held the event loop, and every stream on it,
        # for that long, for a client the streaming path never uses.

    @component.output_types(replies=list[ChatMessage])
    def run(
        self,
        messages: list[ChatMessage] | str,
        streaming_callback: StreamingCallbackT | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        *,
        tools: ToolsType | None = None,
        tools_strict: bool | None = None,
    ) -> dict[str, list[ChatMessage]]:
        """Generate replies; see Haystack's `OpenAIChatGenerator.run`."""
        callback = select_streaming_callback(
            init_callback=self.streaming_callback, runtime_callback=streaming_callback, requires_async=False
        )
        if callback is None or self.http_client_kwargs or _loop_running():
            if self.client is None:
                _build_client(self)
            return HaystackOpenAIChatGenerator.run(
                self, messages, streaming_callback, generation_kwargs, tools=tools, tools_strict=tools_strict
            )
        messages = normalize_messages(messages)
        if not messages:
            return {"replies": []}
        request = self._request(messages, callback, generation_kwargs, tools, tools_strict)
        loop = thread_loop()
        task = loop.create_task(self._stream(request, callback, awaits=False))
        try:
            replies = loop.run_until_complete(task)
        except BaseException:
            # A KeyboardInterrupt may leave the task running, and a closed transport releases its socket on the
            # next loop turn: give the loop that turn, so the upstream is cut now rather than at the next call.
            if not task.done():
                task.cancel()
            loop.run_until_complete(asyncio.wait([task]))
            raise
        return {"replies": replies}

    @component.output_types(replies=list[ChatMessage])
    async def run_async(
        self,
        messages: list[ChatMessage] | str,
        streaming_callback: StreamingCallbackT | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        *,
        tools: ToolsType | None = None,
        tools_strict: bool | None = None,
    ) -> dict[str, list[ChatMessage]]:
        """Generate replies asynchronously; see Haystack's `OpenAIChatGenerator.run_async`."""
        callback = self.streaming_callback if streaming_callback is None else streaming_callback
        if callback is None or self.http_client_kwargs:
            if self.async_client is None:
                await asyncio.to_thread(_build_async_client, self)
            return await HaystackOpenAIChatGenerator.run_async(
                self, messages, streaming_callback, generation_kwargs, tools=tools, tools_strict=tools_strict
            )
        callback = select_streaming_callback(
            init_callback=self.streaming_callback, runtime_callback=streaming_callback, requires_async=True
        )
        assert callback is not None
        messages = normalize_messages(messages)
        if not messages:
            return {"replies": []}
        request = self._request(messages, callback, generation_kwargs, tools, tools_strict)
        return {"replies": await self._stream(request, callback, awaits=True)}

    # --- request ---------------------------------------------------------------------------------------------------

    def _endpoint(self) -> _Endpoint:
        endpoint: _Endpoint | None = self.__dict__.get("_haystream_endpoint")
        if endpoint is None:
            # The same settings and environment variables the OpenAI client would use.
            settings = self._client_kwargs()
            base_url = settings["base_url"] or os.environ.get("OPENAI_BASE_URL") or _DEFAULT_BASE_URL
            api_key = settings["api_key"] or os.environ.get("OPENAI_API_KEY")
            if not api_key:  # as the OpenAI client refuses to be built without one
                raise openai.OpenAIError(
                    "The api_key client option must be set either by passing api_key to the client or by setting "
                    "the OPENAI_API_KEY environment variable"
                )
            headers = {
                "Content-Type": "application/json",
                "Accept": "application/json",
                "Authorization": f"Bearer {api_key}",
            }
            organization = settings["organization"] or os.environ.get("OPENAI_ORG_ID")
            if organization:
                headers["OpenAI-Organization"] = organization
            if project := os.environ.get("OPENAI_PROJECT_ID"):
                headers["OpenAI-Project"] = project
            endpoint = _Endpoint(
                url=base_url.rstrip("/") + "/chat/completions",
                headers=headers,
                timeout=float(settings["timeout"]),
                max_retries=int(settings["max_retries"]),
            )
            self.__dict__["_haystream_endpoint"] = endpoint
        return endpoint

    def _request(
        self,
        messages: list[ChatMessage],
        callback: StreamingCallbackT,
        generation_kwargs: dict[str, Any] | None,
        tools: ToolsType | None,
        tools_strict: bool | None,
    ) -> _Request:
        # Haystack's own request preparation: merged generation kwargs, n, tools and tools_strict, response_format.
        args = self._prepare_api_call(
            messages=messages,
            streaming_callback=callback,
            generation_kwargs=generation_kwargs,
            tools=tools,
            tools_strict=tools_strict,
        )
        args.pop("openai_endpoint", None)
        endpoint = self._endpoint()
        headers, params, timeout = endpoint.headers, None, endpoint.timeout
        if any(key in args for key in _SDK_ONLY):
            if extra_headers := args.pop("extra_headers", None):
                headers = {**headers, **{k: v for k, v in extra_headers.items() if isinstance(v, str)}}
            params = args.pop("extra_query", None)
            args.update(args.pop("extra_body", None) or {})
            override = args.pop("timeout", None)
            if isinstance(override, int | float):
                timeout = override
            elif override is not None:  # an httpx.Timeout: its read timeout is what a stream waits on
                timeout = getattr(override, "read", None) or timeout
        response_format = args.get("response_format")
        if isinstance(response_format, type) and issubclass(response_format, BaseModel):
            # As the SDK's create(): a Pydantic model needs parse(), which does not stream.
            raise TypeError(
                "You tried to pass a `BaseModel` class to `chat.completions.create()`; You must use "
                "`chat.completions.parse()` instead"
            )
        args.setdefault("stream_options", {"include_usage": True})
        return _Request(
            url=endpoint.url,
            headers=headers,
            # A copy: orjson's result keeps its 4 KB buffer, and the body lives as long as the stream.
            body=bytes(memoryview(orjson.dumps(args, default=_json_default))),
            params=params,
            timeout=aiohttp.ClientTimeout(total=None, connect=float(timeout), sock_read=float(timeout)),
            max_retries=endpoint.max_retries,
        )

    async def _open(self, request: _Request) -> aiohttp.ClientResponse:
        """POST the request; retry connection errors and retryable statuses (the SDK's rules) until it starts."""
        session = await loop_session()
        proxy, proxy_auth = env_proxy(request.url)
        retries_taken = 0
        while True:
            try:
                response = await session.post(
                    request.url,
                    data=request.body,
                    headers=request.headers,
                    params=request.params,
                    timeout=request.timeout,
                    proxy=proxy,
                    proxy_auth=proxy_auth,
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                if retries_taken >= request.max_retries:
                    raise transport_error(request.url, exc) from exc
                await asyncio.sleep(retry_delay(retries_taken))
                retries_taken += 1
                continue
            if response.status < 400:
                return response
            try:
                raw = await response.read()
            except (aiohttp.ClientError, TimeoutError):
                raw = b""
            finally:
                response.release()
            if retries_taken < request.max_retries and should_retry(response.status, response.headers):
                await asyncio.sleep(retry_delay(retries_taken, response.headers))
                retries_taken += 1
                continue
            raise status_error(request.url, response.status, response.headers, raw)

    # --- streaming -------------------------------------------------------------------------------------------------

    async def _stream(self, request: _Request, callback: StreamingCallbackT, *, awaits: bool) -> list[ChatMessage]:
        is_async = awaits and inspect.iscoroutinefunction(callback)
        # Give the loop a turn to read the FINs of pooled connections the upstream closed since they were last used
        # (a keep-alive timeout), or the request goes out on one of them and fails. A sync caller's loop sat idle
        # since its last call; an async caller's loop may not have polled its sockets since the FIN arrived (a busy
        # loop, or a task that went on without yielding). httpx checks an idle connection before reusing it;
        # aiohttp relies on the loop having read its EOF. Two turns: in the first, the loop polls the sockets and queues
        # the EOF's callback behind this task, which already waits to run; in the second, that callback has marked the
        # connection closed. Two turns per request, nothing per chunk.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        response = await self._open(request)
        builder = ChunkBuilder(ComponentInfo.from_component(self))
        decoder = SSEDecoder(self.max_sse_event_bytes)
        kept = ChunkLog()
        loads = orjson.loads
        content = response.content
        done = False
        # The start of a body with no event yet: if it ends so, and is not an event stream at all (a proxy's HTML
        # error page or a JSON error with status 200), that body is the error, not an empty answer.
        head: bytes | None = b""
        try:
            while not done:
                try:
                    block = await content.readany()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise transport_error(request.url, exc) from exc
                try:
                    events = decoder.feed(block) if block else decoder.flush()
                except SSEEventTooLarge as exc:  # a broken or hostile upstream: an event without end
                    raise event_too_large(request.url, exc.limit) from None
                if head is not None:
                    if events:
                        head = None
                    elif block:
                        head = (head + block)[:_HEAD_KEPT]
                    elif response.content_type != "text/event-stream":
                        raise not_an_event_stream(request.url, response.status, response.content_type, head)
                for payload in events:
                    if payload.startswith(b"[DONE]"):
                        done = True
                        break
                    try:
                        data = loads(payload)
                    except orjson.JSONDecodeError:
                        data = _sdk_json(payload)
                    if isinstance(data, dict) and data.get("error"):
                        raise stream_error(request.url, data["error"])
                    for chunk in builder.build(data):
                        kept.add(chunk)
                        if is_async:
                            await callback(chunk)  # type: ignore[misc]
                        else:
                            result = callback(chunk)
                            if awaits and inspect.isawaitable(result):  # an object with an async __call__
                                await result
                if not block:
                    break
            if done and not content.is_eof():
                await _read_to_end(content)
        except BaseException:
            response.close()  # at once: the upstream stops generating for a reader that has left
            raise
        # Fully read: the connection goes back to the pool (otherwise it is closed).
        response.release()
        replies = [fold_chunks_like_haystack(kept.chunks())]
        for reply in replies:
            check_finish_reason(reply.meta)
        return replies


async def _read_to_end(content: aiohttp.StreamReader) -> None:
    """Read what follows `[DONE]` (the end of the chunked body, normally at once): only a body read to its end lets
    aiohttp reuse the connection, so each request would otherwise pay a new connection (and TLS handshake). An
    upstream that does not end the body within `_END_WAIT` seconds gets its connection closed, as the SDK does."""
    try:
        async with asyncio.timeout(_END_WAIT):
            while await content.readany():
                pass
    except (aiohttp.ClientError, TimeoutError):
        pass  # the answer is complete; the connection is closed instead of pooled


def _sdk_json(payload: bytes) -> Any:
    """An event's data as the OpenAI SDK reads it (`ServerSentEvent.json()`), for what orjson refused: the SDK's
    `json.JSONDecodeError` (same type and message as Haystack's generator raises) for data that is not JSON, and the
    values the stdlib accepts and orjson does not (`NaN`, `Infinity`) parsed as the SDK parses them."""
    return json.loads(payload.decode("utf-8"))


# Concurrent first calls each find no SDK client: they build it one at a time, and all but the first find it built
# (each build costs 30-90 ms of CPU and ~1 MB, and a client built twice is dropped unclosed).
_SDK_CLIENT_BUILD = threading.Lock()


def _build_client(generator: OpenAIChatGenerator) -> None:
    """Haystack's `warm_up` for `generator`: builds its sync SDK client unless another call has."""
    with _SDK_CLIENT_BUILD:
        HaystackOpenAIChatGenerator.warm_up(generator)


def _build_async_client(generator: OpenAIChatGenerator) -> None:
    """Haystack's `warm_up_async` for `generator`, run to its end in this (worker) thread: it builds the async SDK
    client unless another call has, awaits nothing, and the client binds to no loop until its first request."""
    with _SDK_CLIENT_BUILD:
        asyncio.run(HaystackOpenAIChatGenerator.warm_up_async(generator))


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
