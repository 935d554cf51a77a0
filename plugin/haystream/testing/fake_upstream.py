"""Honest fake OpenAI-compatible chat-completions server for tests and benchmarks.

`FakeUpstream` serves a pure ASGI app with uvicorn on a loopback socket, in a daemon thread that runs its own
event loop. It speaks real HTTP/1.1 and real SSE, so clients exercise their genuine network stack. The behaviour of
each request is encoded in the ``model`` string, e.g. ``"fake?tokens=20&delay=0.01&fail_after=3"`` (see
`parse_scenario`; ``fail_mode`` is ``error``, ``drop``, ``garbage``, ``endless`` or ``endless_event``, the last three
streamed only).
Every chat-completions request is recorded as an `UpstreamRecord`, including whether the client hung up before the
response finished and how many content tokens really reached the socket.

One fake is usually shared by many tests, and a request of an earlier test may still arrive late. A test that looks
at records therefore names its requests uniquely with the ``run`` key, which the fake ignores (``"fake?tokens=5&
run=3f9a1c2e"``), and waits with ``wait_for_requests(n, model=...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TypedDict
from urllib.parse import parse_qsl

import orjson

from haystream.server.asgi import Message, Receive, Send, send_json, wait_for_disconnect
from haystream.testing.server_thread import ServerThread

__all__ = ["FakeUpstream", "Scenario", "UpstreamRecord", "parse_scenario"]


_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
_MODELS_PATHS = frozenset({"/v1/models", "/models"})
_MODELS = {"object": "list", "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "fake"}]}
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"
_TOOL_CALL_ID = "call_fake_1"
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_GRACEFUL_SHUTDOWN = 5
# How a stream fails after ``fail_after`` tokens: an error event, a dropped connection, an event whose data is not
# JSON, one endless line (no line break), or one endless event (`data:` lines, no blank line), sent until the client
# hangs up.
_FAIL_MODES = ("error", "drop", "garbage", "endless", "endless_event")
_GARBAGE = b"data: <html>upstream hiccup</html>\n\n"
_ENDLESS_PIECE = b"data: " + b"x" * (64 * 1024 - 6)
_ENDLESS_EVENT_PIECE = b"data: x\n" * (64 * 1024 // 8)


class Scenario(TypedDict):
    """Behaviour of one request, parsed from the ``model`` string by `parse_scenario`."""

    name: str
    tokens: int
    delay: float
    ttft: float
    text: str
    echo: bool
    fail_after: int | None
    fail_mode: str
    status: int | None
    tool: str | None
    args: str
    reasoning: int
    reasoning_field: str
    tools: int
    finish: str | None
    hold_after: int | None
    fail_first: int


def parse_scenario(model: str) -> Scenario:
    """Parse ``"name?key=value&..."`` into a `Scenario`; unknown keys are ignored, bad values raise ValueError.

    ``run`` is reserved for that: any value, ignored, so that a test can make its model string unique."""
    name, _, query = model.partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True))

    def _int(key: str, default: int | None) -> int | None:
        raw = params.get(key)
        if raw is None or raw == "":
            return default
        value = int(raw)
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
        return value

    def _float(key: str) -> float:
        raw = params.get(key)
        value = float(raw) if raw else 0.0
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{key} must be a finite number >= 0, got {raw}")
        return value

    fail_mode = params.get("fail_mode") or "error"
    if fail_mode not in _FAIL_MODES:
        raise ValueError(f"fail_mode must be one of {', '.join(_FAIL_MODES)}, got {fail_mode!r}")
    status = _int("status", None)
    if status is not None and not 100 <= status <= 599:
        raise ValueError(f"status must be an HTTP status code, got {status}")
    return Scenario(
        name=name,
        tokens=_int("tokens", 8) or 0,
        delay=_float("delay"),
        ttft=_float("ttft"),
        text=params.get("text", "t"),
        echo=params.get("echo", "0").lower() in ("1", "true", "yes"),
        fail_after=_int("fail_after", None),
        fail_mode=fail_mode,
        status=status,
        tool=params.get("tool") or None,
        args=params.get("args") or "{}",
        reasoning=_int("reasoning", 0) or 0,
        reasoning_field=params.get("reasoning_field") or "reasoning_content",
        tools=_int("tools", 1) or 1,
        finish=params.get("finish") or None,
        hold_after=_int("hold_after", None),
        fail_first=_int("fail_first", 0) or 0,
    )


@dataclass
class UpstreamRecord:
    """What the fake saw and did for one chat-completions request (mutated live by the server thread)."""

    id: str
    model: str
    body: dict[str, Any]
    stream: bool
    planned_tokens: int
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names, as received
    query: str = ""
    tokens_sent: int = 0
    client_hung_up: bool = False
    completed: bool = False
    finished: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    released: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    _wake: Any = field(default=None, repr=False, compare=False)  # the held stream's wake-up, on the server loop

    def release(self) -> None:
        """Let a stream held by ``hold_after`` go on (it is held until the client leaves otherwise)."""
        self.released.set()
        if self._wake is not None:
            self._wake()

    def wait(self, timeout: float = 10) -> UpstreamRecord:
        """Block until the response ended for any reason; raise TimeoutError otherwise."""
        if not self.finished.wait(timeout):
            raise TimeoutError(f"{self.id}: response still running after {timeout}s ({self.tokens_sent} tokens sent)")
        return self


class _UpstreamDrop(Exception):
    """Raised inside the ASGI app so uvicorn aborts the connection mid-body (``fail_mode=drop``)."""


class _HideDropTracebacks(logging.Filter):
    """Keeps uvicorn from logging a traceback for deliberate ``fail_mode=drop`` aborts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _UpstreamDrop))


def _install_log_filter() -> None:
    uvicorn_error = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideDropTracebacks) for f in uvicorn_error.filters):
        uvicorn_error.addFilter(_HideDropTracebacks())


def _content_text(content: Any) -> str:
    """Text of a message ``content``: the string itself, or its concatenated ``text`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, dict)]


def _error_body(message: str, type_: str, code: int | str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}


def _split_args(args: str) -> list[str]:
    """Split tool-call arguments into 2-3 pieces, as real streams do."""
    if len(args) < 2:
        return [args]
    step = math.ceil(len(args) / min(3, len(args)))
    return [args[i : i + step] for i in range(0, len(args), step)]


@dataclass
class _Plan:
    """The deltas a scenario will stream: ``(delta, is_content_token)`` plus the final message."""

    steps: list[tuple[dict[str, Any], bool]]
    finish_reason: str
    message: dict[str, Any]

    @property
    def planned_tokens(self) -> int:
        return sum(1 for _, is_token in self.steps if is_token)


def _plan(scenario: Scenario, body: dict[str, Any]) -> _Plan:
    messages = _messages(body)
    field_name = scenario["reasoning_field"]
    steps: list[tuple[dict[str, Any], bool]] = [({field_name: f"r{i} "}, False) for i in range(scenario["reasoning"])]
    reasoning = "".join(delta[field_name] for delta, _ in steps)
    tool = scenario["tool"]
    if tool is not None and not (messages and messages[-1].get("role") == "tool"):
        calls = []
        for index in range(scenario["tools"]):  # parallel calls stream one after the other
            call_id = _TOOL_CALL_ID if index == 0 else f"call_fake_{index + 1}"
            name = tool if index == 0 else f"{tool}_{index + 1}"
            header = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
            steps.append(({"tool_calls": [header]}, False))
            steps.extend(
                ({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}, True)
                for piece in _split_args(scenario["args"])
            )
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": scenario["args"]}})
        message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": calls}
        finish_reason = "tool_calls"
    else:
        prefix = scenario["text"]
        if scenario["echo"]:
            user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
            if user is not None:
                prefix = _content_text(user.get("content"))
        tokens = [f"{prefix}{i} " for i in range(scenario["tokens"])]
        if tool is not None:
            tokens.insert(0, f"result={_content_text(messages[-1].get('content'))} ")
        steps.extend(({"content": token}, True) for token in tokens)
        message = {"role": "assistant", "content": "".join(tokens)}
        finish_reason = "stop"
    if reasoning:
        message[field_name] = reasoning
    finish_reason = scenario["finish"] or finish_reason
    return _Plan(steps=steps, finish_reason=finish_reason, message=message)


def _prompt_tokens(body: dict[str, Any]) -> int:
    return sum(len(_content_text(m.get("content")).split()) for m in _messages(body))


async def _watch_disconnect(receive: Receive, disconnected: asyncio.Event) -> None:
    """Wait for ``http.disconnect`` (uvicorn also sends it once the response completes)."""
    await wait_for_disconnect(receive)
    disconnected.set()


def _failure(tokens: int) -> dict[str, Any]:
    return _error_body(f"upstream failed after {tokens} tokens", "server_error", "upstream_failure")


class _Exchange:
    """One chat-completions request/response, driven by its scenario."""

    def __init__(
        self, record: UpstreamRecord, scenario: Scenario, plan: _Plan, send: Send, disconnected: asyncio.Event
    ) -> None:
        self.record = record
        self.scenario = scenario
        self.plan = plan
        self.send = send
        self.disconnected = disconnected
        self.created = int(time.time())
        self.aborted = False
        self._released = asyncio.Event()
        record._wake = functools.partial(asyncio.get_running_loop().call_soon_threadsafe, self._released.set)
        if record.released.is_set():  # released before this exchange could hear of it
            self._released.set()

    def abort(self) -> None:
        """Drop the connection at the next checkpoint (the server is stopping); wakes a pending pause."""
        self.aborted = True
        self.disconnected.set()

    def _hung_up(self) -> bool:
        """Checkpoint: True once the client is gone; raises `_UpstreamDrop` if the server is stopping."""
        if self.aborted:
            raise _UpstreamDrop(f"{self.record.id}: fake upstream stopped")
        if self.disconnected.is_set():
            self.record.client_hung_up = True
        return self.record.client_hung_up

    async def _pause(self, seconds: float) -> bool:
        """Pace output; return False (client hung up) as soon as a disconnect is seen."""
        if seconds > 0 and not self.disconnected.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.disconnected.wait(), timeout=seconds)
        return not self._hung_up()

    async def _hold(self) -> bool:
        """Hold the stream open until the client leaves (or the server stops) or the test releases it; True to go on.
        Cancellation tests synchronise on this instead of on timing."""
        waits = {asyncio.ensure_future(self.disconnected.wait()), asyncio.ensure_future(self._released.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        return not self._hung_up()

    async def _write(self, data: bytes, *, more_body: bool = True) -> bool:
        """Hand ``data`` to the socket; return False if the client is gone."""
        if self._hung_up():
            return False
        try:
            await self.send({"type": "http.response.body", "body": data, "more_body": more_body})
        except OSError:  # includes uvicorn's ClientDisconnected
            self.record.client_hung_up = True
            return False
        # A send blocked on back-pressure returns silently, without writing, if the client left meanwhile.
        return not self._hung_up()

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._event({"choices": [choice]})

    def _event(self, extra: dict[str, Any]) -> bytes:
        payload = {
            "id": self.record.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.scenario["name"],
            **extra,
        }
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        prompt = _prompt_tokens(self.record.body)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }

    async def run(self, attempt: int = 1) -> None:
        status = self.scenario["status"]
        if status is not None and (not self.scenario["fail_first"] or attempt <= self.scenario["fail_first"]):
            await send_json(self.send, status, _error_body(f"fake upstream status {status}", "fake_error", status))
            self.record.completed = True
        elif self.record.stream:
            await self._stream()
        else:
            await self._complete()

    async def _stream(self) -> None:
        fail_after = self.scenario["fail_after"]
        try:
            await self.send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        except OSError:  # includes uvicorn's ClientDisconnected
            self.record.client_hung_up = True
            return
        if not await self._write(self._chunk({"role": "assistant", "content": ""})):
            return
        if self.scenario["hold_after"] == 0 and not await self._hold():
            return
        first = True
        for delta, is_token in self.plan.steps:
            if not await self._pause(self.scenario["delay"] + (self.scenario["ttft"] if first else 0.0)):
                return
            first = False
            if is_token and self.record.tokens_sent == fail_after:
                break
            if not await self._write(self._chunk(delta)):
                return
            if is_token:
                self.record.tokens_sent += 1
                if self.record.tokens_sent == self.scenario["hold_after"] and not await self._hold():
                    return
        if fail_after is not None:
            mode = self.scenario["fail_mode"]
            if mode == "drop":
                raise _UpstreamDrop(f"{self.record.id}: dropped after {self.record.tokens_sent} tokens")
            if mode == "garbage":
                if await self._write(_GARBAGE) and await self._write(_DONE, more_body=False):
                    self.record.completed = True
                return
            if mode in ("endless", "endless_event"):
                # A line (or an event) that never ends, written as fast as the client reads; only its hang-up stops it.
                piece = _ENDLESS_PIECE if mode == "endless" else _ENDLESS_EVENT_PIECE
                while await self._write(piece):
                    # A send into a transport whose peer is gone neither raises nor waits: without a turn of the
                    # loop, the hang-up would never be seen and this loop would spin.
                    await asyncio.sleep(0)
                return
            await self._write(b"data: " + orjson.dumps(_failure(self.record.tokens_sent)) + b"\n\n", more_body=False)
            return
        if not await self._write(self._chunk({}, self.plan.finish_reason)):
            return
        options = self.record.body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            usage = self._event({"choices": [], "usage": self._usage(self.record.tokens_sent)})
            if not await self._write(usage):
                return
        if await self._write(_DONE, more_body=False):
            self.record.completed = True

    async def _complete(self) -> None:
        fail_after = self.scenario["fail_after"]
        planned = self.plan.planned_tokens
        steps = len(self.plan.steps)
        if fail_after is not None and fail_after < planned:
            token_positions = [i for i, (_, is_token) in enumerate(self.plan.steps) if is_token]
            steps = token_positions[fail_after] + 1
        if not await self._pause(self.scenario["ttft"] + self.scenario["delay"] * steps):
            return
        if fail_after is None:
            choice = {
                "index": 0,
                "message": self.plan.message,
                "logprobs": None,
                "finish_reason": self.plan.finish_reason,
            }
            payload = {
                "id": self.record.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.scenario["name"],
                "choices": [choice],
                "usage": self._usage(planned),
            }
            await send_json(self.send, 200, payload)
            self.record.tokens_sent = planned
            self.record.completed = True
        elif self.scenario["fail_mode"] == "error":
            await send_json(self.send, 500, _failure(min(fail_after, planned)))
        else:
            data = orjson.dumps({"id": self.record.id, "object": "chat.completion", "choices": []})
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
            await self.send({"type": "http.response.start", "status": 200, "headers": headers})
            await self._write(data[: len(data) // 2])
            raise _UpstreamDrop(f"{self.record.id}: dropped mid-body")


class _FakeApp:
    """Pure ASGI callable implementing the OpenAI routes the fake supports."""

    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self.active: set[_Exchange] = set()  # touched only on the server loop
        self.attempts: dict[str, int] = {}  # requests per model string, for ``fail_first``
        self.stopping = False

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method == "POST" and path in _CHAT_PATHS:
            await self._chat(scope, receive, send)
        elif method == "GET" and path in _MODELS_PATHS:
            await send_json(send, 200, _MODELS)
        else:
            await send_json(send, 404, _error_body(f"no route for {method} {path}", "not_found", 404))

    async def _chat(self, scope: Message, receive: Receive, send: Send) -> None:
        raw = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            raw += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            body = orjson.loads(raw)
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                raise ValueError("request body must be a JSON object with a string 'model'")
            scenario = parse_scenario(body["model"])
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            await send_json(send, 400, _error_body(str(exc), "invalid_request_error", None))
            return
        plan = _plan(scenario, body)
        record = self.upstream._new_record(body, plan.planned_tokens)
        record.headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        record.query = scope.get("query_string", b"").decode("latin-1")
        disconnected = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, disconnected))
        exchange = _Exchange(record, scenario, plan, send, disconnected)
        self.active.add(exchange)
        if self.stopping:
            exchange.abort()
        try:
            attempt = self.attempts[body["model"]] = self.attempts.get(body["model"], 0) + 1
            await exchange.run(attempt)
        finally:
            self.active.discard(exchange)
            watcher.cancel()
            record.finished.set()

    def abort_all(self) -> None:
        """Make every in-flight and future exchange drop its connection (called on the server loop)."""
        self.stopping = True
        for exchange in self.active:
            exchange.abort()


class FakeUpstream:
    """Fake OpenAI-compatible chat-completions server on a loopback socket; use as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, keep_records: bool = True) -> None:
        """`keep_records=False`: requests are not kept in `records` (for a fake that serves other processes, where
        nobody reads them and they would only grow)."""
        self.host = host
        self.keep_records = keep_records
        self.records: list[UpstreamRecord] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._app = _FakeApp(self)
        # Streams still running at stop() are dropped mid-body instead of delaying the shutdown.
        self._server = ServerThread(
            self._app, host, port, graceful_shutdown=_GRACEFUL_SHUTDOWN, before_stop=self._app.abort_all
        )

    @property
    def port(self) -> int:
        """Listening port (the requested one until `start` binds a free port for ``port=0``)."""
        return self._server.port

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        if self.port == 0:
            raise RuntimeError("FakeUpstream is not started; the port is not known yet")
        return self._server.url + "/v1"

    def start(self) -> FakeUpstream:
        """Serve in a daemon thread with its own event loop; return once the socket is listening."""
        _install_log_filter()
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop uvicorn gracefully and join its thread; responses still streaming are dropped mid-body."""
        self._server.stop()

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _new_record(self, body: dict[str, Any], planned_tokens: int) -> UpstreamRecord:
        with self._cond:
            record = UpstreamRecord(
                id=f"chatcmpl-fake-{next(self._ids)}",
                model=body["model"],
                body=body,
                stream=bool(body.get("stream")),
                planned_tokens=planned_tokens,
            )
            if self.keep_records:
                self.records.append(record)
                self._cond.notify_all()
        return record

    def wait_for_requests(self, n: int, timeout: float = 10, *, model: str | None = None) -> list[UpstreamRecord]:
        """Block until at least ``n`` requests arrived (for ``model`` only, if given: a shared fake may still see a
        late request of an earlier test); return the first ``n`` records."""

        def matching() -> list[UpstreamRecord]:
            return [r for r in self.records if model is None or r.model == model]

        with self._cond:
            if not self._cond.wait_for(lambda: len(matching()) >= n, timeout):
                raise TimeoutError(f"expected {n} upstream requests within {timeout}s, got {len(matching())}")
            return matching()[:n]

    def reset(self) -> None:
        """Forget all records (ids keep counting so they stay unique)."""
        with self._cond:
            self.records.clear()


def fake_chat_generator(
    scenario: str = "fake", base_url: str | None = None, *, generator_class: type | None = None, **kwargs: Any
) -> Any:
    """An `OpenAIChatGenerator` pointed at a `FakeUpstream`, with its behaviour set by `scenario`.

    `base_url` defaults to the `FAKE_UPSTREAM_URL` environment variable, so that wrappers deployed into a server
    under test can find the fake its test started. Usage is requested, as a well-configured wrapper would.
    `generator_class` defaults to Haystack's `OpenAIChatGenerator`; pass `haystream.components.OpenAIChatGenerator`
    (or any subclass with the same constructor) to test that one.
    """
    from haystack.components.generators.chat import OpenAIChatGenerator
    from haystack.utils import Secret

    kwargs.setdefault("api_key", Secret.from_token("fake-key"))
    kwargs.setdefault("generation_kwargs", {"stream_options": {"include_usage": True}})
    return (generator_class or OpenAIChatGenerator)(
        api_base_url=base_url or os.environ["FAKE_UPSTREAM_URL"], model=scenario, max_retries=0, **kwargs
    )


def serve_until_stdin_closes() -> None:
    """Serve a `FakeUpstream` in this process, print its base URL, and stop when stdin closes.

    `python -m haystream.testing` runs this: benchmarks start the fake in its own process so that its
    work does not share the GIL with the code they measure. It keeps no records (nobody in another process reads
    them), and what start-up made is kept out of the garbage collector's reach, as `haystream serve` does: full
    collections that walked it held the first tokens of a burst's streams for ~80 ms in the bench's direct row.
    """
    import gc
    import sys

    with FakeUpstream(keep_records=False) as upstream:
        gc.freeze()
        print(upstream.base_url, flush=True)
        sys.stdin.read()
