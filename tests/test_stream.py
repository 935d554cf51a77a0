"""stream()/astream() over real components: OpenAIChatGenerator against the fake upstream, MockChatGenerator,
Pipelines, an Agent with a real tool, and a sync-only custom component."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import openai
import pytest
from haystack import Pipeline, component
from haystack.components.agents import Agent
from haystack.components.builders import ChatPromptBuilder
from haystack.components.generators.chat import MockChatGenerator
from haystack.core.errors import PipelineRuntimeError
from haystack.dataclasses import ChatMessage, StreamingChunk
from haystack.tools import Tool

import haystream
from haystream.components import OpenAIChatGenerator
from haystream.streaming.producer import wait_for_idle_producers
from support import unique

USER = [ChatMessage.from_user("hello")]
# 200 tokens, but the fake upstream holds after 5 until its client leaves: cancellation tests wait on that.
HELD = "fake?tokens=200&hold_after=5"


def expected_text(n: int, prefix: str = "t") -> str:
    return "".join(f"{prefix}{i} " for i in range(n))


def two_llm_pipeline(make_llm, first: str = "fake?tokens=3&text=a", second: str = "fake?tokens=4&text=b") -> Pipeline:
    pipe = Pipeline()
    pipe.add_component("draft", make_llm(first))
    pipe.add_component(
        "prompt",
        ChatPromptBuilder(template=[ChatMessage.from_user("Improve: {{ draft[0].text }}")], required_variables="*"),
    )
    pipe.add_component("final", make_llm(second))
    pipe.connect("draft.replies", "prompt.draft")
    pipe.connect("prompt.prompt", "final.messages")
    return pipe


@component
class SyncOnlyEcho:
    """A custom chat component with only a sync run(); it streams word by word and records its thread."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    @component.output_types(replies=list[ChatMessage])
    def run(self, messages: list[ChatMessage], streaming_callback=None) -> dict:
        self.threads.append(threading.current_thread().name)
        words = messages[-1].text.split()
        for word in words:
            if streaming_callback:
                streaming_callback(StreamingChunk(content=word + " "))
        return {"replies": [ChatMessage.from_assistant(" ".join(words))]}


# --- 1. the public API on each kind of target -------------------------------------------------------------------


def test_stream_chat_generator_yields_chunks_then_result(make_llm, upstream):
    chunks = haystream.stream(make_llm("fake?tokens=5"), messages=USER)
    texts = [chunk.content for chunk in chunks]
    assert "".join(texts) == expected_text(5)
    assert chunks.reply.text == expected_text(5)
    assert chunks.result["replies"][0].text == expected_text(5)


async def test_astream_chat_generator_yields_chunks_then_result(make_llm):
    chunks = haystream.astream(make_llm("fake?tokens=6"), messages=USER)
    texts = [chunk.content async for chunk in chunks]
    assert "".join(texts) == expected_text(6)
    assert chunks.reply.text == expected_text(6)


def test_result_before_exhaustion_is_an_error(make_llm):
    chunks = haystream.stream(make_llm("fake?tokens=5"), messages=USER)
    next(chunks)
    with pytest.raises(RuntimeError, match="fully consumed"):
        _ = chunks.result
    chunks.close()


def test_pipeline_streams_only_final_generator_by_default(make_llm):
    chunks = haystream.stream(two_llm_pipeline(make_llm), {"draft": {"messages": USER}})
    received = list(chunks)
    assert "".join(c.content for c in received) == expected_text(4, "b")
    assert {c.component_info.name for c in received if c.component_info} == {"final"}
    assert chunks.reply.text == expected_text(4, "b")
    assert chunks.result["final"]["replies"][0].text == expected_text(4, "b")


async def test_pipeline_all_and_named_components(make_llm):
    pipe = two_llm_pipeline(make_llm)
    everything = [c async for c in haystream.astream(pipe, {"draft": {"messages": USER}}, streaming_components="all")]
    assert "".join(c.content for c in everything) == expected_text(3, "a") + expected_text(4, "b")
    first_only = list(haystream.stream(pipe, {"draft": {"messages": USER}}, streaming_components=["draft"]))
    assert "".join(c.content for c in first_only) == expected_text(3, "a")


def test_pipeline_messages_go_to_unconnected_messages_input(make_llm):
    chunks = haystream.stream(two_llm_pipeline(make_llm), messages=USER)
    assert "".join(c.content for c in chunks) == expected_text(4, "b")


@pytest.mark.parametrize(
    ("names", "message"),
    [(["nope"], "Unknown components"), (["prompt"], "do not take a streaming_callback"), ("draft", "must be None")],
)
def test_bad_streaming_components_raise_up_front(make_llm, names, message):
    with pytest.raises(ValueError, match=message):
        haystream.stream(two_llm_pipeline(make_llm), {"draft": {"messages": USER}}, streaming_components=names)
    with pytest.raises(ValueError, match=message):
        haystream.astream(two_llm_pipeline(make_llm), {"draft": {"messages": USER}}, streaming_components=names)


def test_non_streamable_target_is_a_type_error():
    with pytest.raises(TypeError, match="Cannot stream"):
        haystream.stream(ChatPromptBuilder(template=USER))


@pytest.mark.parametrize("stream_function", [haystream.stream, haystream.astream])
@pytest.mark.parametrize(
    ("target", "kwargs", "error", "message"),
    [
        # A class's run() has a streaming_callback too: it failed at the first next() for want of `self`.
        (OpenAIChatGenerator, {}, TypeError, "pass an instance"),
        (Agent, {}, TypeError, "pass an instance"),
        ("llm", {"data": [USER]}, TypeError, "data must be a dict"),
        # These failed only at the first next(), deep inside the channel.
        ("llm", {"buffer_size": 0}, ValueError, "buffer_size must be at least 1"),
        ("llm", {"buffer_size": "8"}, TypeError, "buffer_size must be an int"),
    ],
)
def test_bad_targets_and_arguments_raise_up_front(make_llm, stream_function, target, kwargs, error, message):
    if target == "llm":
        target = make_llm("fake?tokens=2")
    with pytest.raises(error, match=message):
        stream_function(target, messages=USER, **kwargs)


def calculator(expression: str) -> str:
    """Evaluate a small arithmetic expression."""
    allowed = set("0123456789+-*/(). ")
    if not set(expression) <= allowed:
        raise ValueError("unsupported expression")
    return str(eval(expression))


CALCULATOR = Tool(
    name="calculator",
    description="Evaluate arithmetic",
    parameters={"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    function=calculator,
)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_agent_with_real_tool_streams_calls_results_and_answer(make_llm, mode):
    llm = make_llm('fake?tool=calculator&args={"expression": "2*3"}&tokens=2&text=ok')
    agent = Agent(chat_generator=llm, tools=[CALCULATOR])
    if mode == "sync":
        chunks = haystream.stream(agent, messages=USER)
        received = list(chunks)
    else:
        chunks = haystream.astream(agent, messages=USER)
        received = [c async for c in chunks]
    tool_deltas = [d for c in received for d in c.tool_calls or ()]
    assert tool_deltas[0].tool_name == "calculator"
    results = [c.tool_call_result for c in received if c.tool_call_result]
    assert [r.result for r in results] == ["6"]
    final_text = "".join(c.content for c in received if c.component_info is not None or c.content)
    assert final_text.endswith("result=6 ok0 ok1 ")
    assert chunks.reply.text == "result=6 ok0 ok1 "


async def test_sync_only_component_is_bridged_from_a_producer_thread():
    echo = SyncOnlyEcho()
    pipe = Pipeline()
    pipe.add_component("echo", echo)
    chunks = haystream.astream(pipe, {"echo": {"messages": [ChatMessage.from_user("one two three")]}})
    assert [c.content async for c in chunks] == ["one ", "two ", "three "]
    assert echo.threads[0].startswith("haystream-producer")
    assert chunks.reply.text == "one two three"


def test_mock_chat_generator_in_pipeline_and_alone():
    mock = MockChatGenerator(responses="alpha beta gamma")
    assert "".join(c.content for c in haystream.stream(mock, messages=USER)) == "alpha beta gamma"
    pipe = Pipeline()
    pipe.add_component("llm", MockChatGenerator(responses="alpha beta"))
    assert "".join(c.content for c in haystream.stream(pipe, messages=USER)) == "alpha beta"


# --- callbacks keep working next to the generator --------------------------------------------------------------


def test_init_and_runtime_callbacks_are_still_called(make_llm):
    seen_init: list[str] = []
    llm = make_llm("fake?tokens=3", streaming_callback=lambda c: seen_init.append(c.content))
    received = [c.content for c in haystream.stream(llm, messages=USER)]
    assert seen_init == received
    seen_runtime: list[str] = []
    received = [
        c.content
        for c in haystream.stream(llm, messages=USER, streaming_callback=lambda c: seen_runtime.append(c.content))
    ]
    assert seen_runtime == received
    assert len(seen_init) == len(received)  # unchanged: the runtime callback took precedence, as in Haystack


async def test_async_user_callback_in_astream(make_llm):
    seen: list[str] = []

    async def record(chunk: StreamingChunk) -> None:
        seen.append(chunk.content)

    received = [
        c.content async for c in haystream.astream(make_llm("fake?tokens=3"), messages=USER, streaming_callback=record)
    ]
    assert seen == received and "".join(received) == expected_text(3)


def test_async_user_callback_in_sync_stream(make_llm):
    seen: list[str] = []

    async def record(chunk: StreamingChunk) -> None:
        seen.append(chunk.content)

    # The generator has run_async: the sync stream runs it on the shared loop, where an async callback is fine.
    chunks = haystream.stream(make_llm("fake?tokens=3"), messages=USER, streaming_callback=record)
    received = [c.content for c in chunks]
    assert seen == received and "".join(received) == expected_text(3)
    # A sync-only component cannot await it.
    with pytest.raises(ValueError, match="astream"):
        list(haystream.stream(SyncOnlyEcho(), messages=USER, streaming_callback=record))


# --- 4. cancellation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_kind", ["component", "pipeline"])
def test_sync_break_cuts_the_upstream(make_llm, upstream, target_kind):
    scenario = unique(HELD)
    llm = make_llm(scenario)
    target = llm if target_kind == "component" else two_llm_pipeline(make_llm, second=scenario)
    chunks = haystream.stream(target, messages=USER)
    for i, _ in enumerate(chunks):
        if i == 2:
            break
    chunks.close()
    record = upstream.wait_for_requests(1, model=scenario)[0].wait(10)  # held after 5 tokens until the client leaves
    assert record.client_hung_up and record.tokens_sent <= 5
    assert wait_for_idle_producers(10)


def test_dropping_the_iterator_cuts_the_upstream(make_llm, upstream):
    scenario = unique(HELD)
    for i, _ in enumerate(haystream.stream(make_llm(scenario), messages=USER)):
        if i == 2:
            break  # the iterator has no other reference: dropping it closes it
    record = upstream.wait_for_requests(1, model=scenario)[0].wait(10)
    assert record.client_hung_up and record.tokens_sent <= 5


@component
class _Talker:
    """Streams three chunks, then a fourth once `go` is set; records how its run ended (where a provider's client
    would close its upstream stream)."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.ended_by: type[BaseException] | None = None

    @component.output_types(replies=list[ChatMessage])
    def run(self, messages: list[ChatMessage], streaming_callback=None):
        raise NotImplementedError

    @component.output_types(replies=list[ChatMessage])
    async def run_async(self, messages: list[ChatMessage], streaming_callback=None):
        try:
            for i in range(3):
                await streaming_callback(StreamingChunk(content=f"t{i} "))
            await self.go.wait()
            await streaming_callback(StreamingChunk(content="t3 "))
        except BaseException as ended:
            self.ended_by = type(ended)
            raise
        return {"replies": [ChatMessage.from_assistant("done")]}


async def test_a_pipeline_component_whose_consumer_left_is_stopped_as_a_cancellation():
    # A Pipeline runs its component in a task of its own, which the consumer's leaving does not cancel directly: a
    # component that is about to hand over its next chunk (here: woken just before the consumer leaves) is stopped by
    # that callback, and it must arrive as a cancellation: Haystack's OpenAIChatGenerator closes its upstream stream
    # only then (otherwise the upstream goes on until a garbage collection).
    talker = _Talker()
    pipe = Pipeline()
    pipe.add_component("llm", talker)
    chunks = haystream.astream(pipe, messages=USER)
    async for chunk in chunks:
        if chunk.content == "t2 ":
            break
    talker.go.set()  # the component's task is next in the loop's queue...
    await chunks.aclose()  # ...and runs before the pipeline's cancellation reaches it
    assert talker.ended_by is not None and issubclass(talker.ended_by, asyncio.CancelledError)
    assert issubclass(talker.ended_by, haystream.StreamCancelled)  # stopped by its callback, as described above


@pytest.mark.parametrize("bridged", [False, True])
async def test_async_aclose_cuts_the_upstream(make_llm, upstream, bridged):
    scenario = unique(HELD)
    llm = make_llm(scenario)
    chunks = haystream.astream(_sync_only(llm) if bridged else llm, messages=USER)
    count = 0
    async for _ in chunks:
        count += 1
        if count == 3:
            break
    await chunks.aclose()
    record = await asyncio.to_thread(upstream.wait_for_requests(1, model=scenario)[0].wait, 10)
    assert record.client_hung_up and record.tokens_sent <= 5


async def test_task_cancellation_cuts_the_upstream(make_llm, upstream):
    scenario = unique(HELD)
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in haystream.astream(make_llm(scenario), messages=USER):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = await asyncio.to_thread(upstream.wait_for_requests(1, model=scenario)[0].wait, 10)
    assert record.client_hung_up and record.tokens_sent <= 5


def _sync_only(llm):
    """The same generator seen through a sync-only facade, to force the thread bridge in astream()."""

    @component
    class SyncFacade:
        @component.output_types(replies=list[ChatMessage])
        def run(self, messages: list[ChatMessage], streaming_callback=None) -> dict:
            return llm.run(messages=messages, streaming_callback=streaming_callback)

    return SyncFacade()


# --- 2. back-pressure -----------------------------------------------------------------------------------------


@component
class Counter:
    """Produces many chunks as fast as it can and counts them."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.produced = 0
        self.consumed = 0  # counted by the test
        self.lead = 0  # how far production ever got ahead of consumption
        self.progress = threading.Condition()
        self.stopped = threading.Event()

    @component.output_types(replies=list[ChatMessage])
    def run(self, messages: list[ChatMessage], streaming_callback=None) -> dict:
        try:
            for i in range(self.total):
                streaming_callback(StreamingChunk(content=f"{i} "))
                with self.progress:
                    self.produced += 1
                    self.lead = max(self.lead, self.produced - self.consumed)
                    self.progress.notify_all()
        finally:
            self.stopped.set()
        return {"replies": [ChatMessage.from_assistant("done")]}


def test_slow_consumer_throttles_the_producer():
    counter = Counter(total=10_000)
    chunks = haystream.stream(counter, messages=USER, buffer_size=8)
    next(chunks)
    counter.consumed = 1
    with counter.progress:  # the consumer dawdles until the producer has filled the buffer...
        assert counter.progress.wait_for(lambda: counter.produced >= 8, timeout=30)
    for _ in range(50):  # ... then reads on, one chunk at a time
        next(chunks)
        counter.consumed += 1
    chunks.close()
    assert counter.stopped.wait(5)
    assert counter.lead <= 8 + 2, counter.lead  # never more than the buffer ahead (+ the chunk in hand)
    assert counter.produced <= 51 + 8 + 2


# --- 5. errors ------------------------------------------------------------------------------------------------


def test_failure_after_k_tokens_delivers_k_chunks_then_raises(make_llm):
    chunks = haystream.stream(make_llm("fake?tokens=20&fail_after=4"), messages=USER)
    received = []
    with pytest.raises(openai.APIError, match="upstream failed after 4 tokens"):
        for chunk in chunks:
            received.append(chunk.content)
    assert "".join(received) == expected_text(4)


async def _drain(chunks, mode: str) -> list[str]:
    if mode == "sync":
        return [chunk.content for chunk in chunks]
    return [chunk.content async for chunk in chunks]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_failed_stream_has_no_result_and_stays_over(make_llm, mode):
    # After the error, iterating again ended cleanly and `.result` was None, as if the run had succeeded.
    llm = make_llm("fake?tokens=20&fail_after=4")
    chunks = haystream.stream(llm, messages=USER) if mode == "sync" else haystream.astream(llm, messages=USER)
    with pytest.raises(openai.APIError):
        await _drain(chunks, mode)
    assert await _drain(chunks, mode) == []
    with pytest.raises(RuntimeError, match=r"The run failed \(APIError\)") as raised:
        _ = chunks.result
    assert isinstance(raised.value.__cause__, openai.APIError)
    with pytest.raises(RuntimeError, match="The run failed"):
        _ = chunks.reply


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_stream_closed_before_its_end_has_no_result(make_llm, upstream, mode):
    # After close(), iterating again ended at once and `.result` was None.
    llm = make_llm(unique(HELD))
    chunks = haystream.stream(llm, messages=USER) if mode == "sync" else haystream.astream(llm, messages=USER)
    first = next(chunks) if mode == "sync" else await anext(chunks)
    assert first is not None
    if mode == "sync":
        chunks.close()
    else:
        await chunks.aclose()
    assert await _drain(chunks, mode) == []
    with pytest.raises(RuntimeError, match="closed before its end"):
        _ = chunks.result


async def test_async_failure_in_pipeline_keeps_original_cause(make_llm):
    pipe = Pipeline()
    pipe.add_component("llm", make_llm("fake?tokens=20&fail_after=3"))
    received = []
    with pytest.raises(PipelineRuntimeError) as raised:
        async for chunk in haystream.astream(pipe, messages=USER):
            received.append(chunk.content)
    assert isinstance(raised.value.__cause__, openai.APIError)
    assert "".join(received) == expected_text(3)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_failure_before_first_chunk_raises_typed_error(make_llm, mode):
    llm = make_llm("fake?status=429")
    with pytest.raises(openai.RateLimitError):
        if mode == "sync":
            next(haystream.stream(llm, messages=USER))
        else:
            await anext(haystream.astream(llm, messages=USER))


def test_bridged_failure_is_raised_in_astream_too():
    @component
    class Broken:
        @component.output_types(replies=list[ChatMessage])
        def run(self, messages: list[ChatMessage], streaming_callback=None) -> dict:
            streaming_callback(StreamingChunk(content="partial"))
            raise KeyError("boom")

    async def consume() -> list[str]:
        received = []
        async for chunk in haystream.astream(Broken(), messages=USER):
            received.append(chunk.content)
        return received

    with pytest.raises(KeyError, match="boom"):
        asyncio.run(consume())


# --- 6. isolation ---------------------------------------------------------------------------------------------


async def test_200_concurrent_streams_over_one_pipeline_get_their_own_tokens(make_llm):
    pipe = Pipeline()
    pipe.add_component("llm", make_llm("fake?tokens=10&delay=0.005&echo=1"))

    async def one(i: int) -> str:
        return "".join([c.content async for c in haystream.astream(pipe, messages=[ChatMessage.from_user(f"s{i}-")])])

    texts = await asyncio.gather(*(one(i) for i in range(200)))
    for i, text in enumerate(texts):
        assert text == "".join(f"s{i}-{k} " for k in range(10)), (i, text)


def test_concurrent_sync_streams_over_one_pipeline_with_a_stateful_callback(make_llm):
    pipe = Pipeline()
    pipe.add_component("llm", make_llm("fake?tokens=8&delay=0.002&echo=1"))
    results: dict[int, str] = {}

    def one(i: int) -> None:
        results[i] = "".join(c.content for c in haystream.stream(pipe, messages=[ChatMessage.from_user(f"u{i}-")]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {i: "".join(f"u{i}-{k} " for k in range(8)) for i in range(40)}


def test_closing_while_waiting_for_the_first_token_cuts_the_upstream_at_once(make_llm, upstream):
    scenario = unique("fake?hold_after=0&tokens=5")
    chunks = haystream.stream(make_llm(scenario), messages=USER)
    outcome: list = []
    consumer = threading.Thread(target=lambda: outcome.append(list(chunks)))
    consumer.start()
    record = upstream.wait_for_requests(1, model=scenario)[0]  # the producer is now blocked reading the upstream
    chunks.close()
    assert record.wait(10).client_hung_up and record.tokens_sent == 0
    assert wait_for_idle_producers(10)
    consumer.join(10)
    # The consumer still iterating saw the stream end (at most the role chunk sent before the wait), not an error.
    assert len(outcome) == 1 and "".join(chunk.content for chunk in outcome[0]) == ""


def test_a_pipeline_reshaped_after_streaming_is_planned_again(make_llm):
    pipe = Pipeline()
    pipe.add_component("draft", make_llm("fake?tokens=3&text=a"))
    assert "".join(c.content for c in haystream.stream(pipe, messages=USER)) == expected_text(3, "a")
    pipe.add_component(
        "prompt",
        ChatPromptBuilder(template=[ChatMessage.from_user("Improve: {{ draft[0].text }}")], required_variables="*"),
    )
    pipe.add_component("final", make_llm("fake?tokens=4&text=b"))
    pipe.connect("draft.replies", "prompt.draft")
    pipe.connect("prompt.prompt", "final.messages")
    assert "".join(c.content for c in haystream.stream(pipe, messages=USER)) == expected_text(4, "b")


def test_a_pipelines_plan_is_worked_out_once_and_forgotten_with_it(make_llm):
    # Pipelines compare by value and are not hashable: the plan cache must still find them (by identity).
    class CountingPipeline(Pipeline):
        walks = 0

        def inputs(self, *args, **kwargs):
            type(self).walks += 1
            return super().inputs(*args, **kwargs)

    pipe = CountingPipeline()
    pipe.add_component("llm", make_llm("fake?tokens=2"))
    for _ in range(3):
        haystream.astream(pipe, messages=USER)
        haystream.stream(pipe, messages=USER)
    assert CountingPipeline.walks == 1
    gone = weakref.ref(pipe)
    del pipe
    gc.collect()
    assert gone() is None  # the cache holds no strong reference
    again = CountingPipeline()
    again.add_component("llm", make_llm("fake?tokens=2"))
    haystream.stream(again, messages=USER)
    assert CountingPipeline.walks == 2  # a new pipeline (even at a reused address) is planned for itself


def test_nested_inputs_are_not_modified(make_llm):
    pipe = two_llm_pipeline(make_llm)
    data = {"draft": {"messages": USER}}
    assert "".join(c.content for c in haystream.stream(pipe, data)) == expected_text(4, "b")
    assert data == {"draft": {"messages": USER}}


async def test_start_sends_the_upstream_request_before_the_first_read(make_llm, upstream):
    scenario = unique("fake?tokens=2")
    chunks = haystream.astream(make_llm(scenario), messages=USER).start()
    await asyncio.to_thread(lambda: upstream.wait_for_requests(1, model=scenario))  # nothing has read the stream yet
    assert "".join([c.content async for c in chunks]) == expected_text(2)
