"""haystream's `OpenAIChatGenerator` against Haystack's, scenario by scenario, on the same fake upstream.

Each scenario runs through both generators, sync (`run`) and async (`run_async`); the folded messages (the replies
and `chunks_to_message` of the streamed chunks), the chunks' shape and the raised exception types must agree, except
for the documented improvements: reasoning is kept, usage is requested by default, a sync run that is abandoned
closes its upstream response at once.
"""

from __future__ import annotations

import asyncio
import copy
import json
import select
import socket
import threading
import tracemalloc
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import haystack.components.generators.chat.openai as haystack_openai_module
import openai
import pytest
from haystack import Pipeline
from haystack.components.generators.chat import OpenAIChatGenerator as HaystackGenerator
from haystack.dataclasses import ChatMessage, StreamingChunk
from haystack.tools import Tool
from haystack.utils import Secret

import haystream
from haystream._compat import fold_chunks_like_haystack
from haystream.components import OpenAIChatGenerator
from haystream.components._chunks import ChunkLog
from haystream.components._upstream import (
    _LINE_OVERHEAD,
    MAX_SSE_EVENT_BYTES,
    SSEDecoder,
    SSEEventTooLarge,
    env_proxy,
    loop_session,
)
from haystream.testing import FakeUpstream, fake_chat_generator
from support import unique

USER = [ChatMessage.from_user("hello there")]
USAGE = {"stream_options": {"include_usage": True}}
ARGS = '{"city": "Paris", "unit": "celsius"}'
KINDS = {"haystack": HaystackGenerator, "haystream": OpenAIChatGenerator}


@dataclass
class Outcome:
    chunks: list[StreamingChunk] = field(default_factory=list)
    replies: list[ChatMessage] | None = None
    error: BaseException | None = None

    @property
    def folded(self) -> ChatMessage:
        return haystream.chunks_to_message(self.chunks)


def make(kind: str, upstream: FakeUpstream, scenario: str, **kwargs: Any) -> HaystackGenerator:
    kwargs.setdefault("generation_kwargs", USAGE)
    kwargs.setdefault("timeout", 30)
    return fake_chat_generator(scenario, upstream.base_url, generator_class=KINDS[kind], **kwargs)


def run(generator: HaystackGenerator, mode: str, **kwargs: Any) -> Outcome:
    outcome = Outcome()
    try:
        if mode == "sync":
            result = generator.run(USER, streaming_callback=outcome.chunks.append, **kwargs)
        else:

            async def collect(chunk: StreamingChunk) -> None:
                outcome.chunks.append(chunk)

            async def main() -> dict[str, Any]:
                try:
                    return await generator.run_async(USER, streaming_callback=collect, **kwargs)
                finally:
                    if isinstance(generator, HaystackGenerator) and generator.async_client is not None:
                        await generator.close_async()  # Haystack's client must close on its own loop

            result = asyncio.run(main())
        outcome.replies = result["replies"]
    except Exception as exc:
        outcome.error = exc
    return outcome


def comparable(message: ChatMessage, *, reasoning: bool = True) -> dict[str, Any]:
    data = message.to_dict()
    data["meta"] = {k: v for k, v in data["meta"].items() if k != "completion_start_time"}
    if not reasoning:
        data["content"] = [part for part in data["content"] if "reasoning" not in part]
    return data


def chunk_shape(chunk: StreamingChunk) -> tuple[Any, ...]:
    calls = tuple((c.index, c.id, c.tool_name, c.arguments) for c in chunk.tool_calls or ())
    meta = {k: v for k, v in chunk.meta.items() if k not in ("received_at", "tool_calls")}
    name = chunk.component_info.name if chunk.component_info else None  # its type names each generator's class
    return (chunk.content, chunk.index, chunk.start, chunk.finish_reason, calls, meta, name)


def both(upstream: FakeUpstream, scenario: str, mode: str, **kwargs: Any) -> tuple[Outcome, Outcome]:
    return (
        run(make("haystack", upstream, scenario, **kwargs), mode),
        run(make("haystream", upstream, scenario, **kwargs), mode),
    )


# --- equivalence ---------------------------------------------------------------------------------------------------

SCENARIOS = {
    "text": "fake?tokens=6",
    "echo": "fake?echo=1&tokens=2",
    "tool_call": f"fake?tool=get_weather&args={quote(ARGS)}",
    "parallel_tool_calls": f"fake?tool=get_weather&tools=3&args={quote(ARGS)}",
    "finish_length": "fake?tokens=3&finish=length",
    "finish_content_filter": "fake?tokens=3&finish=content_filter",
    "finish_function_call": f"fake?tool=lookup&args={quote(ARGS)}&finish=function_call",
    "slow_first_token": "fake?tokens=3&ttft=0.2",
    "no_tokens": "fake?tokens=0",
}


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("scenario", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_same_chunks_and_replies_as_haystack(upstream, scenario, mode):
    theirs, ours = both(upstream, scenario, mode)
    assert theirs.error is None and ours.error is None, (theirs.error, ours.error)
    assert comparable(ours.replies[0]) == comparable(theirs.replies[0])
    assert comparable(ours.folded) == comparable(theirs.folded)
    assert [chunk_shape(c) for c in ours.chunks] == [chunk_shape(c) for c in theirs.chunks]
    assert {c.component_info.type for c in ours.chunks} == {"haystream.components.openai_chat.OpenAIChatGenerator"}


@pytest.mark.parametrize(
    "scenario", [*SCENARIOS.values(), "fake?tokens=3&reasoning=2", "fake?tokens=0&reasoning=2"], ids=str
)
def test_every_chunk_is_one_haystacks_own_constructor_accepts_and_equals(upstream, scenario):
    # Chunks are built without Haystack's tracked __init__ (for speed): each must still pass its checks and be equal.
    _, ours = both(upstream, scenario, "async")
    assert ours.chunks
    for chunk in [*ours.chunks, *kept_by_chunk_log(ours.chunks)]:
        assert StreamingChunk(**vars(chunk)) == chunk
    with pytest.warns(Warning, match="Mutating attribute 'meta'"):
        ours.chunks[-1].meta = {}  # mutation is tracked as on any other chunk


def kept_by_chunk_log(chunks: list[StreamingChunk]) -> list[StreamingChunk]:
    log = ChunkLog()
    for chunk in chunks:
        log.add(chunk)
    return log.chunks()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_tool_calls_arrive_in_pieces_and_fold_into_calls(upstream, mode):
    _, ours = both(upstream, SCENARIOS["parallel_tool_calls"], mode)
    deltas = [d for c in ours.chunks for d in c.tool_calls or ()]
    starts = [c for c in ours.chunks if c.start and c.tool_calls]
    assert [c.tool_calls[0].tool_name for c in starts] == ["get_weather", "get_weather_2", "get_weather_3"]
    assert len([d for d in deltas if d.arguments]) > 3  # arguments came in pieces
    calls = ours.replies[0].tool_calls
    assert [(c.id, c.tool_name, c.arguments) for c in calls] == [
        ("call_fake_1", "get_weather", {"city": "Paris", "unit": "celsius"}),
        ("call_fake_2", "get_weather_2", {"city": "Paris", "unit": "celsius"}),
        ("call_fake_3", "get_weather_3", {"city": "Paris", "unit": "celsius"}),
    ]
    assert ours.replies[0].meta["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("field_name", ["reasoning_content", "reasoning"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_reasoning_is_kept_where_haystack_drops_it(upstream, mode, field_name):
    theirs, ours = both(upstream, f"fake?tokens=3&reasoning=3&reasoning_field={field_name}", mode)
    assert ours.replies[0].reasoning.reasoning_text == "r0 r1 r2 "
    assert ours.folded.reasoning.reasoning_text == "r0 r1 r2 "
    assert theirs.replies[0].reasoning is None  # the improvement
    assert comparable(ours.replies[0], reasoning=False) == comparable(theirs.replies[0])
    reasoning_chunks = [c for c in ours.chunks if c.reasoning]
    assert [c.start for c in reasoning_chunks] == [True, False, False]
    text_chunks = [c for c in ours.chunks if c.content]
    assert text_chunks[0].start and text_chunks[0].index == 1  # the text block follows the reasoning block


@pytest.mark.parametrize(
    "scenario",
    [
        "fake?tokens=200",
        "fake?tokens=5&reasoning=4",
        f"fake?tool=get_weather&tools=2&args={quote(ARGS)}",
        "fake?tokens=4&finish=length",
    ],
)
def test_the_kept_chunks_fold_into_the_same_reply_in_a_fraction_of_the_chunks(upstream, scenario):
    outcome = run(make("haystream", upstream, scenario), "async")
    assert outcome.error is None
    kept = ChunkLog()
    for chunk in outcome.chunks:
        kept.add(chunk)
    compact = kept.chunks()
    assert fold_chunks_like_haystack(compact) == fold_chunks_like_haystack(outcome.chunks) == outcome.replies[0]
    plain_runs = 1 + sum(1 for c in outcome.chunks if c.reasoning or c.tool_calls or c.finish_reason)
    assert len(compact) <= plain_runs + 2  # each plain-text run is one chunk (usage arrives on its own chunk)
    if scenario == "fake?tokens=200":
        assert len(compact) <= 4 < len(outcome.chunks)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_usage_is_requested_by_default(upstream, mode):
    theirs, ours = both(upstream, "fake?tokens=4", mode, generation_kwargs={})
    assert theirs.replies[0].meta["usage"] is None
    usage = ours.replies[0].meta["usage"]
    assert usage["completion_tokens"] == 4 and usage["total_tokens"] == usage["prompt_tokens"] + 4
    assert set(usage) == {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "completion_tokens_details",
        "prompt_tokens_details",
    }
    # ... and a user's own stream_options win.
    _, explicit = both(upstream, "fake?tokens=4", mode, generation_kwargs={"stream_options": {"include_usage": False}})
    assert explicit.replies[0].meta["usage"] is None


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 429, 500, 503])
def test_http_errors_raise_the_sdks_exceptions(upstream, status, mode):
    theirs, ours = both(upstream, f"fake?status={status}", mode)
    assert type(ours.error) is type(theirs.error)
    assert isinstance(ours.error, openai.APIStatusError)
    assert ours.error.status_code == theirs.error.status_code == status
    assert ours.error.body == theirs.error.body
    assert str(ours.error) == str(theirs.error)
    assert ours.chunks == theirs.chunks == []


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("fail_mode", ["error", "drop", "garbage"])
def test_failure_mid_stream(upstream, mode, fail_mode):
    # An error event is the SDK's `APIError`, a dropped connection `APIConnectionError`; data that is not JSON is the
    # SDK's own `json.JSONDecodeError` (Haystack's generator does not wrap it), with the same message.
    theirs, ours = both(upstream, f"fake?tokens=6&fail_after=3&fail_mode={fail_mode}", mode)
    assert type(ours.error) is type(theirs.error)
    expected = {"error": openai.APIError, "drop": openai.APIConnectionError, "garbage": json.JSONDecodeError}
    assert type(ours.error) is expected[fail_mode]
    assert str(ours.error) == str(theirs.error)
    assert [chunk_shape(c)[:4] for c in ours.chunks] == [chunk_shape(c)[:4] for c in theirs.chunks]
    assert "".join(c.content for c in ours.chunks) == "t0 t1 t2 "


@pytest.mark.parametrize("where", ["init", "generation_kwargs"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_first_token_slower_than_the_timeout(upstream, mode, where):
    kwargs = {"timeout": 0.3} if where == "init" else {"generation_kwargs": {**USAGE, "timeout": 0.3}}
    theirs, ours = both(upstream, "fake?tokens=3&ttft=5", mode, **kwargs)
    assert type(ours.error) is type(theirs.error) is openai.APITimeoutError
    assert [chunk_shape(c) for c in ours.chunks] == [chunk_shape(c) for c in theirs.chunks]  # the role chunk


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_connection_refused(mode):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once it is closed
    outcomes = [
        run(cls(api_key=Secret.from_token("k"), api_base_url=f"http://127.0.0.1:{port}/v1", max_retries=0), mode)
        for cls in KINDS.values()
    ]
    assert [type(o.error) for o in outcomes] == [openai.APIConnectionError] * 2


@pytest.mark.parametrize("no_proxy", [False, True])
def test_the_environments_proxy_is_used_as_the_sdk_uses_it(upstream, monkeypatch, no_proxy):
    # The fake upstream stands in for the proxy: it answers the absolute-form request a proxy would forward. The
    # upstream's host does not resolve, so an answer proves the proxy was used, and NO_PROXY must make both fail.
    for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", upstream.base_url.removesuffix("/v1"))
    if no_proxy:
        monkeypatch.setenv("NO_PROXY", "upstream.invalid")
    env_proxy.cache_clear()
    try:
        for kind in KINDS:
            scenario = f"proxied-{uuid.uuid4().hex[:8]}?tokens=2"
            generator = KINDS[kind](
                api_key=Secret.from_token("k"), api_base_url="http://upstream.invalid/v1", model=scenario, max_retries=0
            )
            outcome = run(generator, "async")
            if no_proxy:
                assert type(outcome.error) is openai.APIConnectionError, kind
                assert not [r for r in upstream.records if r.model == scenario]
            else:
                assert outcome.error is None, (kind, outcome.error)
                assert outcome.replies[0].text == "t0 t1 "
    finally:
        env_proxy.cache_clear()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_retries_before_the_first_byte(upstream, mode):
    for kind in KINDS:
        scenario = f"retry-{uuid.uuid4().hex[:8]}?status=503&fail_first=1&tokens=2"
        generator = KINDS[kind](
            api_key=Secret.from_token("k"), api_base_url=upstream.base_url, model=scenario, max_retries=1
        )
        outcome = run(generator, mode)
        assert outcome.error is None, (kind, outcome.error)
        assert outcome.replies[0].text == "t0 t1 "
        attempts = [r for r in upstream.records if r.model == scenario]
        assert len(attempts) == 2, kind
    scenario = f"retry-{uuid.uuid4().hex[:8]}?status=429&fail_first=5"
    generator = OpenAIChatGenerator(
        api_key=Secret.from_token("k"), api_base_url=upstream.base_url, model=scenario, max_retries=1
    )
    assert type(run(generator, mode).error) is openai.RateLimitError  # retries exhausted: the last error


def test_request_body_is_the_sdks(upstream):
    tool = Tool(
        name="get_weather",
        description="Weather in a city",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}},
        function=lambda city: city,
    )
    bodies = []
    for kind in KINDS:
        scenario = unique("fake?tokens=1")
        generation_kwargs = {**USAGE, "temperature": 0.2, "max_completion_tokens": 50, "extra_body": {"top_k": 3}}
        generator = make(kind, upstream, scenario, tools=[tool], tools_strict=True)
        generator.run(USER, streaming_callback=lambda chunk: None, generation_kwargs=generation_kwargs)
        bodies.append({**upstream.wait_for_requests(1, model=scenario)[0].body, "model": "fake?tokens=1"})
    assert bodies[0] == bodies[1]
    assert bodies[1]["tools"][0]["function"]["strict"] is True
    assert bodies[1]["top_k"] == 3 and bodies[1]["stream"] is True


def test_extra_headers_and_query_reach_the_upstream(upstream):
    seen = []
    for kind in KINDS:
        scenario = unique("fake?tokens=1")
        generation_kwargs = {**USAGE, "extra_headers": {"X-Tenant": "blue"}, "extra_query": {"api-version": "2"}}
        make(kind, upstream, scenario, organization="org-1").run(
            USER, streaming_callback=lambda chunk: None, generation_kwargs=generation_kwargs
        )
        record = upstream.wait_for_requests(1, model=scenario)[0]
        names = ("x-tenant", "authorization", "openai-organization", "content-type")
        seen.append(({name: record.headers.get(name) for name in names}, record.query))
    assert seen[0] == seen[1]
    assert seen[1] == (
        {
            "x-tenant": "blue",
            "authorization": "Bearer fake-key",
            "openai-organization": "org-1",
            "content-type": "application/json",
        },
        "api-version=2",
    )


def test_non_streaming_call_is_haystacks(upstream):
    replies = [make(kind, upstream, "fake?tokens=3").run(USER)["replies"][0] for kind in KINDS]
    assert comparable(replies[0]) == comparable(replies[1])


async def test_streaming_builds_no_sdk_client_and_the_first_call_without_streaming_does(upstream):
    generator = make("haystream", upstream, "fake?tokens=2")
    pipeline = Pipeline()
    pipeline.add_component("llm", generator)
    # A Pipeline warms its components up in every run; Haystack's generator builds its SDK clients there.
    assert "".join([c.content async for c in haystream.astream(pipeline, messages=USER)]) == "t0 t1 "
    assert "".join(c.content for c in await asyncio.to_thread(haystream.stream, pipeline, messages=USER)) == "t0 t1 "
    generator.warm_up()
    await generator.warm_up_async()
    assert generator.async_client is None and generator.client is None

    reply = (await generator.run_async(USER))["replies"][0]
    assert reply.text == "t0 t1 " and generator.async_client is not None
    sync_reply = (await asyncio.to_thread(generator.run, USER))["replies"][0]
    assert sync_reply.text == "t0 t1 " and generator.client is not None


async def test_concurrent_first_calls_without_streaming_build_one_sdk_client(upstream, monkeypatch):
    built: list[object] = []

    class CountedAsyncOpenAI(openai.AsyncOpenAI):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    # Haystack's generator builds its client with the name its module imported.
    monkeypatch.setattr(haystack_openai_module, "AsyncOpenAI", CountedAsyncOpenAI)
    generator = make("haystream", upstream, "fake?tokens=2")
    # Every call finds no client before any of them has built one (nothing awaits before the build).
    results = await asyncio.gather(*(generator.run_async(USER) for _ in range(4)))
    assert [r["replies"][0].text for r in results] == ["t0 t1 "] * 4
    assert built == [generator.async_client]


# --- cancellation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
async def test_cancelled_task_closes_the_upstream_response(upstream, kind):
    scenario = unique("fake?tokens=50&hold_after=3")
    generator = make(kind, upstream, scenario)
    seen: list[StreamingChunk] = []
    third = asyncio.Event()

    async def collect(chunk: StreamingChunk) -> None:
        seen.append(chunk)
        if len([c for c in seen if c.content]) == 3:
            third.set()

    task = asyncio.create_task(generator.run_async(USER, streaming_callback=collect))
    await third.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = await asyncio.to_thread(lambda: upstream.wait_for_requests(1, model=scenario)[0].wait(10))
    assert record.client_hung_up and record.tokens_sent == 3
    if kind == "haystack":
        await generator.close_async()


@pytest.mark.parametrize("kind", list(KINDS))
async def test_cancelled_while_waiting_for_the_first_token(upstream, kind):
    scenario = unique("fake?tokens=5&hold_after=0")
    generator = make(kind, upstream, scenario)
    task = asyncio.create_task(generator.run_async(USER, streaming_callback=_ignore))
    record = (await asyncio.to_thread(lambda: upstream.wait_for_requests(1, model=scenario)))[0]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(record.wait, 10)
    assert record.client_hung_up and record.tokens_sent == 0
    if kind == "haystack":
        await generator.close_async()


async def _ignore(chunk: StreamingChunk) -> None:
    pass


def test_sync_callback_that_raises_closes_the_upstream_response_at_once(upstream):
    """Haystack's sync generator leaves the response open until a garbage collection; this one closes it."""
    scenario = unique("fake?tokens=50&hold_after=3")
    generator = make("haystream", upstream, scenario)

    def stop_at_third(chunk: StreamingChunk) -> None:
        if chunk.content == "t2 ":
            raise KeyboardInterrupt("enough")  # even a BaseException

    with pytest.raises(KeyboardInterrupt):
        generator.run(USER, streaming_callback=stop_at_third)
    record = upstream.wait_for_requests(1, model=scenario)[0].wait(10)  # held until the client leaves
    assert record.client_hung_up and record.tokens_sent == 3


def test_leaving_haystream_stream_closes_the_upstream_response(upstream):
    # Held after 5 tokens: the run is on the shared loop, so leaving cancels it even while the upstream is silent.
    scenario = unique("fake?tokens=50&hold_after=5")
    chunks = haystream.stream(make("haystream", upstream, scenario), messages=USER)
    texts = []
    with chunks:
        for chunk in chunks:
            texts.append(chunk.content)
            if chunk.content == "t2 ":
                break
    record = upstream.wait_for_requests(1, model=scenario)[0].wait(10)
    assert record.client_hung_up and record.tokens_sent <= 5, record.tokens_sent
    assert "".join(texts) == "t0 t1 t2 "


# --- pipelines, serialisation, plumbing ----------------------------------------------------------------------------


def _pipeline(upstream: FakeUpstream) -> Pipeline:
    pipe = Pipeline()
    pipe.add_component("llm", make("haystream", upstream, "fake?tokens=5&reasoning=1", generation_kwargs={}))
    return pipe


async def test_astream_over_a_pipeline(upstream):
    chunks = haystream.astream(_pipeline(upstream), messages=USER)
    received = [chunk async for chunk in chunks]
    assert "".join(c.content for c in received) == "t0 t1 t2 t3 t4 "
    assert chunks.reply.reasoning.reasoning_text == "r0 "
    assert chunks.reply.meta["usage"]["completion_tokens"] == 5
    assert {c.component_info.name for c in received} == {"llm"}


def test_stream_over_a_pipeline(upstream):
    chunks = haystream.stream(_pipeline(upstream), messages=USER)
    assert "".join(c.content for c in chunks) == "t0 t1 t2 t3 t4 "
    assert chunks.reply.text == "t0 t1 t2 t3 t4 "
    assert chunks.result["llm"]["replies"][0].meta["finish_reason"] == "stop"


def test_to_dict_from_dict_and_yaml_round_trip(monkeypatch, upstream):
    monkeypatch.setenv("FAKE_KEY", "secret")
    tool = Tool(name="add", description="Add", parameters={"type": "object", "properties": {}}, function=print)
    generator = OpenAIChatGenerator(
        api_key=Secret.from_env_var("FAKE_KEY"),
        model="fake?tokens=2",
        api_base_url=upstream.base_url,
        generation_kwargs={"temperature": 0.5},
        timeout=12.0,
        max_retries=2,
        tools=[tool],
        tools_strict=True,
    )
    data = generator.to_dict()
    assert data["type"] == "haystream.components.openai_chat.OpenAIChatGenerator"
    expected = HaystackGenerator.to_dict(generator)
    assert data["init_parameters"] == expected["init_parameters"]
    again = OpenAIChatGenerator.from_dict(copy.deepcopy(data))  # from_dict deserialises tools in place
    assert type(again) is OpenAIChatGenerator and again.to_dict() == data

    pipe = Pipeline()
    pipe.add_component("llm", generator)
    loaded = Pipeline.loads(pipe.dumps())
    llm = loaded.get_component("llm")
    assert type(llm) is OpenAIChatGenerator
    assert "".join(c.content for c in haystream.stream(loaded, messages=USER)) == "t0 t1 "


def test_session_per_loop_is_closed_with_its_loop():
    async def grab():
        first, second = await loop_session(), await loop_session()
        assert first is second
        return first

    session = asyncio.run(grab())
    assert session.closed
    assert asyncio.run(grab()) is not session


async def test_sync_run_inside_a_running_loop_falls_back_to_haystacks_path(upstream):
    seen: list[StreamingChunk] = []
    result = make("haystream", upstream, "fake?tokens=2").run(USER, streaming_callback=seen.append)
    assert result["replies"][0].text == "t0 t1 " and "".join(c.content for c in seen) == "t0 t1 "


def test_sync_runs_from_several_threads(upstream):
    generator = make("haystream", upstream, "fake?tokens=2&delay=0.01")
    results: list[str] = []

    def call() -> None:
        for _ in range(2):  # the second call reuses the thread's loop and pool
            results.append(generator.run(USER, streaming_callback=lambda chunk: None)["replies"][0].text)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["t0 t1 "] * 8


@pytest.mark.parametrize(
    "body",
    [
        b'data: {"a": 1}\n\ndata: {"a": 2}\n\ndata: [DONE]\n\n',
        b': ping\r\ndata: {"a": 1}\r\n\r\nevent: x\r\ndata:{"a": 2}\r\n\r\ndata: [DONE]\r\n\r\n',
        b'data: {"a":\ndata: 1}\n\n: comment\n\ndata: {"a": 2}\n\ndata: [DONE]',
    ],
)
def test_sse_decoder_handles_any_split(body):
    expected = None
    for cut in range(len(body) + 1):
        decoder = SSEDecoder()
        events = decoder.feed(body[:cut]) + decoder.feed(body[cut:]) + decoder.flush()
        if expected is None:
            expected = events
        assert events == expected, cut
    assert expected[-1] == b"[DONE]"
    assert [e for e in expected if e != b"[DONE]"][-1].replace(b" ", b"") == b'{"a":2}'


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("fail_mode", ["endless", "endless_event"])
def test_an_endless_event_is_an_api_error_and_closes_the_upstream(upstream, mode, fail_mode):
    # A broken or hostile upstream sends one line that never ends, or `data:` lines with no blank line to end their
    # event: the reader kept them until memory ran out. Past the bound, the response is closed (the fake sees the
    # hang-up) and the SDK's error family is raised.
    scenario = unique(f"fake?tokens=4&fail_after=2&fail_mode={fail_mode}")
    generator = make("haystream", upstream, scenario)
    generator.max_sse_event_bytes = 1 << 20  # the bound is per instance too; 16 MiB by default
    outcome = run(generator, mode)
    assert type(outcome.error) is openai.APIError
    assert str(outcome.error) == (
        "The upstream sent an event-stream event larger than 1048576 bytes; the stream was closed"
    )
    assert "".join(c.content for c in outcome.chunks) == "t0 t1 "
    record = upstream.wait_for_requests(1, model=scenario)[0].wait(10)
    assert record.client_hung_up and not record.completed


def test_sse_decoder_bounds_a_line_and_keeps_a_long_one_below_the_bound():
    piece = b"x" * (1 << 20)
    decoder = SSEDecoder()
    assert decoder.feed(b'data: "') == []
    for _ in range(MAX_SSE_EVENT_BYTES // len(piece) - 1):
        assert decoder.feed(piece) == []
    assert decoder.feed(b'"\n\n') == [b'"' + piece * (MAX_SSE_EVENT_BYTES // len(piece) - 1) + b'"']
    with pytest.raises(SSEEventTooLarge, match="exceeded 16777216 bytes"):
        for _ in range(MAX_SSE_EVENT_BYTES // len(piece) + 1):
            decoder.feed(piece)


def test_sse_decoder_bounds_the_data_lines_of_one_event_and_counts_each_event_afresh():
    limit = 1 << 16
    line = b"data: " + b"x" * 1017 + b"\n"  # 1 KiB
    fitting = limit // (len(line) - 1 + _LINE_OVERHEAD)  # each line counts its bytes and what keeping it costs
    decoder = SSEDecoder(limit)
    # Events just below the bound, many times over: each event is counted on its own.
    for _ in range(3):
        events = decoder.feed(line * fitting + b"\n")
        assert len(events) == 1 and events[0].count(b"\n") == fitting - 1
    # A line at a time, as a slow upstream sends them, and also all at once: past the bound either way.
    for block, pieces in ((line, fitting + 1), (line * (fitting + 1), 1)):
        decoder = SSEDecoder(limit)
        with pytest.raises(SSEEventTooLarge, match=f"exceeded {limit} bytes"):
            for _ in range(pieces):
                assert decoder.feed(block) == []
        # The decoder let go of what it held.
        assert decoder.feed(b"data: 1\n\n") == [b"1"]


def test_an_event_of_short_lines_is_bounded_by_the_memory_it_holds():
    # Counting only the lines' bytes let an event of `data: xy` lines hold ~5 times its bound in bytes objects.
    limit = 4 << 20
    decoder = SSEDecoder(limit)
    tracemalloc.start()
    try:
        with pytest.raises(SSEEventTooLarge):
            while True:
                decoder.feed(b"data: xy\n" * 4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= limit


def test_sse_decoder_copies_a_long_line_a_bounded_number_of_times():
    # An event of one long line (a big tool argument, an inline image) arrives in many reads. The decoder joined its
    # tail to each read: copies quadratic in the line's length (64 MB took 20 s of CPU, on the event loop). Counted
    # as the bytes each `feed` allocates at its peak, summed, against the line's length.
    line_size, piece = 1 << 20, b"x" * 8192
    decoder = SSEDecoder()
    allocated = 0
    tracemalloc.start()
    try:
        for block in [b'data: {"a": "', *[piece] * (line_size // len(piece)), b'"}\n\n']:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            events = decoder.feed(block)
            allocated += tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert len(events) == 1 and len(events[0]) == line_size + 9
    assert allocated < 4 * line_size


# --- served: the same client-visible answers through haystream's server ------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def served(client: openai.OpenAI, generator: str, scenario: str, mode: str = "astream", **kwargs: Any) -> Any:
    """What an OpenAI SDK client sees of one streamed answer: content, reasoning, tool calls, finish, usage."""
    stream = client.chat.completions.create(
        model="fake_async",
        messages=[{"role": "user", "content": "hello there"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"mode": mode, "scenario": scenario, "generator": generator},
        **kwargs,
    )
    seen: dict[str, Any] = {"content": "", "reasoning": "", "calls": [], "finish": [], "usage": None}
    for chunk in stream:
        seen["usage"] = chunk.usage.model_dump() if chunk.usage else seen["usage"]
        for choice in chunk.choices:
            seen["content"] += choice.delta.content or ""
            seen["reasoning"] += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            seen["calls"] += [tc.model_dump() for tc in choice.delta.tool_calls or ()]
            seen["finish"] += [choice.finish_reason] if choice.finish_reason else []
    return seen


@pytest.mark.parametrize(
    ("scenario", "mode"),
    [("fake?tokens=5", "astream"), (f"fake?tool=get_weather&tools=2&args={quote(ARGS)}", "client_tools")],
    ids=["text", "client_tools"],
)
def test_served_answers_are_the_same(client, scenario, mode):
    kwargs = {"tools": TOOLS} if mode == "client_tools" else {}
    theirs = served(client, "haystack", scenario, mode, **kwargs)
    ours = served(client, "haystream", scenario, mode, **kwargs)
    assert ours == theirs
    assert ours["usage"]["completion_tokens"] > 0


def test_served_reasoning_reaches_the_client(client):
    theirs = served(client, "haystack", "fake?tokens=2&reasoning=2")
    ours = served(client, "haystream", "fake?tokens=2&reasoning=2")
    assert ours["reasoning"] == "r0 r1 " and theirs["reasoning"] == ""
    assert {**ours, "reasoning": ""} == theirs


@pytest.mark.parametrize(
    ("scenario", "error"),
    [("fake?status=429", openai.RateLimitError), ("fake?tokens=5&fail_after=2", openai.APIError)],
    ids=["rate_limited", "fails_mid_stream"],
)
def test_served_errors_are_the_same(client, scenario, error):
    raised = []
    for generator in KINDS:
        with pytest.raises(error) as caught:
            served(client, generator, scenario)
        message = caught.value.message.split(" (request id")[0]  # each answer has its own request id
        raised.append((type(caught.value), getattr(caught.value, "status_code", None), message))
    assert raised[0] == raised[1]


# --- raw misbehaving upstreams -------------------------------------------------------------------------------------

SSE_HI = (
    b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
)


def read_request(conn: socket.socket, data: bytes) -> bytes | None:
    """Read one request (head and `Content-Length` body) from `conn`, `data` being what was already received; return
    what came after it, or None if the client closed the connection first."""
    while b"\r\n\r\n" not in data:
        if not (more := conn.recv(65536)):
            return None
        data += more
    head, _, data = data.partition(b"\r\n\r\n")
    length = next(int(line[15:]) for line in head.lower().split(b"\r\n") if line[:15] == b"content-length:")
    while len(data) < length:
        data += conn.recv(65536)
    return data[length:]


class RawUpstream:
    """A socket server answering every request with canned bytes; `answered` is set after each reply is sent and
    its connection closed (with no `Connection: close` header: a keep-alive timeout as the client sees it)."""

    def __init__(self, status: str, content_type: str, body: bytes) -> None:
        self.reply = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        self.answered = threading.Event()
        self.requests = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                read_request(conn, b"")
                self.requests += 1
                conn.sendall(self.reply)
            self.answered.set()

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def raw_upstream():
    servers: list[RawUpstream] = []

    def start(status: str = "200 OK", content_type: str = "text/event-stream", body: bytes = SSE_HI) -> RawUpstream:
        servers.append(RawUpstream(status, content_type, body))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_runs_after_the_upstream_closed_the_idle_connection(raw_upstream, mode):
    # Between calls the FIN of a pooled connection the upstream closed (its keep-alive timeout) went unread, and the
    # next request went out on it: APIConnectionError (or a retry). Sync: the thread's loop is idle between calls.
    # Async: the loop is busy (here: blocked on the wait) when the FIN arrives, and the next call comes at once.
    server = raw_upstream()
    generator = OpenAIChatGenerator(api_key=Secret.from_token("k"), api_base_url=server.base_url, max_retries=0)

    async def three_async() -> None:
        for _ in range(3):
            server.answered.clear()
            reply = (await generator.run_async(USER, streaming_callback=_ignore))["replies"][0]
            assert reply.text == "hi"
            assert server.answered.wait(10)  # blocks the loop: it reads the FIN only once it runs again

    if mode == "sync":
        for _ in range(3):
            server.answered.clear()
            reply = generator.run(USER, streaming_callback=lambda chunk: None)["replies"][0]
            assert reply.text == "hi"
            assert server.answered.wait(10)
    else:
        asyncio.run(three_async())
    assert server.requests == 3


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        (
            "text/html",
            b"<html>\n<body>502 Bad Gateway</body>\n</html>",
            "The upstream answered 200 with text/html, not an event stream: <html> <body>502 Bad Gateway",
        ),
        ("application/json", b'{"error": {"message": "quota exceeded", "type": "billing"}}', "quota exceeded"),
    ],
)
def test_a_200_that_is_not_an_event_stream_is_an_api_error(raw_upstream, mode, content_type, body, message):
    # A proxy's error page, or a gateway's JSON error, with status 200: Haystack's generator returns an empty reply.
    server = raw_upstream("200 OK", content_type, body)
    generator = OpenAIChatGenerator(api_key=Secret.from_token("k"), api_base_url=server.base_url, max_retries=0)
    outcome = run(generator, mode)
    assert type(outcome.error) is openai.APIError
    assert str(outcome.error).startswith(message)
    assert outcome.chunks == []


def test_data_the_stdlib_parses_and_orjson_refuses_is_read_as_the_sdk_reads_it(raw_upstream):
    # `NaN` is not JSON, but Python's json module (which the SDK uses) reads it; orjson refuses it.
    body = SSE_HI.replace(b'"finish_reason":"stop"}]', b'"finish_reason":"stop"}],"x":NaN')
    assert b',"x":NaN}' in body
    server = raw_upstream(body=body)
    for cls in KINDS.values():
        outcome = run(cls(api_key=Secret.from_token("k"), api_base_url=server.base_url, max_retries=0), "async")
        assert outcome.error is None, outcome.error
        assert outcome.replies is not None and outcome.replies[0].text == "hi"


@pytest.mark.parametrize("body", [b"data: [DONE]\n\n", b": ping\n\n"])
def test_an_event_stream_without_content_is_an_empty_reply_as_in_haystack(raw_upstream, body):
    server = raw_upstream(body=body)
    replies = [
        run(cls(api_key=Secret.from_token("k"), api_base_url=server.base_url, max_retries=0), "sync").replies
        for cls in KINDS.values()
    ]
    assert replies[0] is not None and replies[1] is not None
    assert [m.text for m in replies[0]] == [m.text for m in replies[1]] == [None]


class ChunkedUpstream:
    """A keep-alive socket server that streams `SSE_HI` in a chunked body and sends the body's end in a later write,
    as a provider does when `[DONE]` and the end leave in separate packets. It gives the client `end_after` seconds
    to read on (a client that stops at `[DONE]` closes the connection at once) before it ends the body."""

    def __init__(self, end_after: float = 0.02) -> None:
        self.end_after = end_after
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data: bytes | None = b""
            while (data := read_request(conn, data)) is not None:
                head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                conn.sendall(head + b"%x\r\n%s\r\n" % (len(SSE_HI), SSE_HI))
                readable, _, _ = select.select([conn], [], [], self.end_after)
                if readable and not conn.recv(1, socket.MSG_PEEK):
                    return  # the client closed the connection without reading the body's end
                conn.sendall(b"0\r\n\r\n")

    def close(self) -> None:
        self._sock.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_body_that_ends_after_done_still_leaves_the_connection_reusable(mode):
    # Reading stopped at `[DONE]`: aiohttp then closes a connection whose body it has not seen end, and each request
    # paid a new connection (a TLS handshake against a real provider). The OpenAI SDK reads on for up to 100 ms.
    server = ChunkedUpstream()
    generator = OpenAIChatGenerator(api_key=Secret.from_token("k"), api_base_url=server.base_url, max_retries=0)
    try:
        if mode == "sync":
            for _ in range(3):
                assert generator.run(USER, streaming_callback=lambda chunk: None)["replies"][0].text == "hi"
        else:

            async def three() -> None:
                for _ in range(3):
                    assert (await generator.run_async(USER, streaming_callback=_ignore))["replies"][0].text == "hi"

            asyncio.run(three())
    finally:
        server.close()
    assert server.connections == 1


async def _ignore(chunk: StreamingChunk) -> None:
    pass
