"""StreamingChatGenerator: a `stream` output socket that a downstream component consumes inside a pipeline."""

from __future__ import annotations

import pytest
from haystack import Pipeline, component
from haystack.components.generators.chat import MockChatGenerator
from haystack.dataclasses import ChatMessage
from haystack.utils import Secret

from haystream import LazyChunkStream, StreamingChatGenerator
from support import unique

USER = [ChatMessage.from_user("hello")]


@component
class UpperCaser:
    """An example stream processor: consumes the chunk stream and returns the upper-cased text."""

    @component.output_types(text=str, pieces=int)
    def run(self, stream: LazyChunkStream) -> dict:
        pieces = [chunk.content for chunk in stream if chunk.content]
        return {"text": "".join(pieces).upper(), "pieces": len(pieces)}

    @component.output_types(text=str, pieces=int)
    async def run_async(self, stream: LazyChunkStream) -> dict:
        pieces = [chunk.content async for chunk in stream if chunk.content]
        return {"text": "".join(pieces).upper(), "pieces": len(pieces)}


def test_generator_mode_returns_at_once_and_calls_when_consumed(make_llm, upstream):
    scenario = unique("fake?tokens=3")
    wrapped = StreamingChatGenerator(chat_generator=make_llm(scenario), streaming_mode="generator")
    output = wrapped.run(messages=USER)
    assert output["replies"] == [] and not [r for r in upstream.records if r.model == scenario]  # nothing called yet
    texts = [chunk.content for chunk in output["stream"]]
    assert "".join(texts) == "t0 t1 t2 "
    assert [r.text for r in output["replies"]] == ["t0 t1 t2 "]  # filled in place once consumed
    assert output["stream"].reply.text == "t0 t1 t2 "
    assert len([r for r in upstream.records if r.model == scenario]) == 1
    with pytest.raises(RuntimeError, match="already been consumed"):
        list(output["stream"])


async def test_generator_mode_is_async_iterable(make_llm):
    output = await StreamingChatGenerator(chat_generator=make_llm("fake?tokens=2")).run_async(messages=USER)
    assert "".join([c.content async for c in output["stream"]]) == "t0 t1 "
    assert output["replies"][0].text == "t0 t1 "


def test_callback_mode_behaves_like_the_wrapped_generator(make_llm):
    seen: list[str] = []
    llm = make_llm("fake?tokens=3", streaming_callback=lambda c: seen.append(c.content))
    output = StreamingChatGenerator(chat_generator=llm, streaming_mode="callback").run(messages=USER)
    assert output["stream"] is None
    assert output["replies"][0].text == "t0 t1 t2 "
    assert "".join(seen) == "t0 t1 t2 "


def test_no_streaming_mode_calls_without_callback(make_llm, upstream):
    scenario = unique("fake?tokens=3")
    seen: list[str] = []
    output = StreamingChatGenerator(chat_generator=make_llm(scenario), streaming_mode=None).run(
        messages=USER, streaming_callback=seen.append
    )
    assert output["stream"] is None and output["replies"][0].text == "t0 t1 t2 "
    assert seen == [] and upstream.wait_for_requests(1, model=scenario)[0].stream is False


def pipeline_with_processor(llm) -> Pipeline:
    pipe = Pipeline()
    pipe.add_component("chat", StreamingChatGenerator(chat_generator=llm))
    pipe.add_component("processor", UpperCaser())
    pipe.connect("chat.stream", "processor.stream")
    return pipe


def test_downstream_component_consumes_stream_in_pipeline(make_llm):
    pipe = pipeline_with_processor(make_llm("fake?tokens=4"))
    result = pipe.run({"chat": {"messages": USER}}, include_outputs_from={"chat"})
    assert result["processor"] == {"text": "T0 T1 T2 T3 ", "pieces": 4}
    assert result["chat"]["replies"][0].text == "t0 t1 t2 t3 "  # the same list, filled once the stream was consumed


async def test_downstream_component_consumes_stream_in_async_pipeline(make_llm):
    result = await pipeline_with_processor(make_llm("fake?tokens=4")).run_async({"chat": {"messages": USER}})
    assert result["processor"] == {"text": "T0 T1 T2 T3 ", "pieces": 4}


def test_serialisation_round_trip(make_llm, monkeypatch):
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "x")
    pipe = pipeline_with_processor(make_llm("fake?tokens=2", api_key=Secret.from_env_var("FAKE_UPSTREAM_KEY")))
    restored = Pipeline.from_dict(pipe.to_dict(), allowed_modules=[__name__])
    chat = restored.get_component("chat")
    assert isinstance(chat, StreamingChatGenerator)
    assert chat.streaming_mode == "generator"
    assert chat.chat_generator.model == "fake?tokens=2"
    assert restored.run({"chat": {"messages": USER}})["processor"]["text"] == "T0 T1 "
    mock = StreamingChatGenerator(chat_generator=MockChatGenerator(responses="x"), streaming_mode="callback")
    assert StreamingChatGenerator.from_dict(mock.to_dict()).streaming_mode == "callback"


def test_invalid_mode_is_rejected():
    with pytest.raises(ValueError, match="streaming_mode"):
        StreamingChatGenerator(chat_generator=MockChatGenerator(), streaming_mode="sometimes")
