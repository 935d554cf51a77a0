"""chunks_to_message on chunk sequences shaped like each provider integration's output."""

from __future__ import annotations

from haystack.dataclasses import (
    ComponentInfo,
    ReasoningContent,
    StreamingChunk,
    ToolCall,
    ToolCallDelta,
    ToolCallResult,
)

from haystream import chunks_to_message

OPENAI = ComponentInfo(type="haystack.components.generators.chat.openai.OpenAIChatGenerator", name="llm")


def test_openai_shaped_text_tool_calls_and_final_usage_chunk():
    chunks = [
        StreamingChunk(content="", meta={"model": "gpt", "received_at": "t0"}, component_info=OPENAI),
        StreamingChunk(content="Let me ", component_info=OPENAI, index=0, start=True),
        StreamingChunk(content="check.", component_info=OPENAI, index=0),
        StreamingChunk(
            content="",
            tool_calls=[ToolCallDelta(index=0, id="call_1", tool_name="weather", arguments="")],
            index=1,
            start=True,
        ),
        StreamingChunk(content="", tool_calls=[ToolCallDelta(index=0, arguments='{"city": ')], index=1),
        StreamingChunk(content="", tool_calls=[ToolCallDelta(index=0, arguments='"Paris"}')], index=1),
        StreamingChunk(
            content="", tool_calls=[ToolCallDelta(index=1, id="call_2", tool_name="clock", arguments="{}")], index=2
        ),
        StreamingChunk(content="", finish_reason="tool_calls", meta={"model": "gpt"}),
        StreamingChunk(content="", meta={"usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}}),
    ]
    message = chunks_to_message(chunks)
    assert message.text == "Let me check."
    assert message.tool_calls == [
        ToolCall(tool_name="weather", arguments={"city": "Paris"}, id="call_1"),
        ToolCall(tool_name="clock", arguments={}, id="call_2"),
    ]
    assert message.meta["finish_reason"] == "tool_calls"
    assert message.meta["usage"] == {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}
    assert message.meta["model"] == "gpt"
    assert message.meta["completion_start_time"] == "t0"


def test_anthropic_shaped_reasoning_split_usage_and_tool_use_blocks():
    chunks = [
        StreamingChunk(content="", meta={"usage": {"input_tokens": 25, "output_tokens": 1}, "model": "claude"}),
        StreamingChunk(content="", reasoning=ReasoningContent(reasoning_text="The user "), index=0, start=True),
        StreamingChunk(content="", reasoning=ReasoningContent(reasoning_text="wants weather."), index=0),
        StreamingChunk(content="Checking.", index=1, start=True),
        StreamingChunk(
            content="",
            tool_calls=[ToolCallDelta(index=2, id="toolu_01", tool_name="weather")],
            index=2,
            start=True,
        ),
        StreamingChunk(content="", tool_calls=[ToolCallDelta(index=2, arguments="")], index=2),
        StreamingChunk(content="", tool_calls=[ToolCallDelta(index=2, arguments='{"city": "Berlin"}')], index=2),
        StreamingChunk(content="", finish_reason="tool_calls", meta={"usage": {"output_tokens": 42}}),
    ]
    message = chunks_to_message(chunks)
    assert message.text == "Checking."
    assert message.reasoning.reasoning_text == "The user wants weather."
    assert message.tool_calls == [ToolCall(tool_name="weather", arguments={"city": "Berlin"}, id="toolu_01")]
    assert message.meta["usage"] == {"input_tokens": 25, "output_tokens": 42}
    assert message.meta["finish_reason"] == "tool_calls"


def test_ollama_shaped_whole_tool_calls_at_the_same_index():
    chunks = [
        StreamingChunk(content="", meta={"model": "llama3.2"}),
        StreamingChunk(
            content="",
            tool_calls=[ToolCallDelta(index=0, id="a", tool_name="weather", arguments='{"city": "Rome"}')],
            index=0,
        ),
        StreamingChunk(
            content="",
            tool_calls=[ToolCallDelta(index=0, id="b", tool_name="weather", arguments='{"city": "Oslo"}')],
            index=1,
        ),
        StreamingChunk(content="", finish_reason="stop", meta={"usage": {"prompt_tokens": 30, "completion_tokens": 9}}),
    ]
    message = chunks_to_message(chunks)
    assert [(c.id, c.arguments) for c in message.tool_calls] == [("a", {"city": "Rome"}), ("b", {"city": "Oslo"})]
    assert message.text is None
    assert message.meta["usage"] == {"prompt_tokens": 30, "completion_tokens": 9}


def test_llama_cpp_shaped_text_with_think_tags_and_length_finish():
    pieces = ["<think>", "hmm", "</think>", "Hello", ",", " world"]
    chunks = [StreamingChunk(content=p, meta={"model": "smollm2"}) for p in pieces]
    chunks.append(StreamingChunk(content="", finish_reason="length", meta={"model": "smollm2"}))
    message = chunks_to_message(chunks)
    assert message.text == "<think>hmm</think>Hello, world"
    assert message.meta["finish_reason"] == "length"
    assert message.meta["usage"] is None


def test_agent_stream_describes_the_last_model_turn():
    call = ToolCall(tool_name="calculator", arguments={"expression": "2+3"}, id="c1")
    chunks = [
        StreamingChunk(content="", tool_calls=[ToolCallDelta(index=0, id="c1", tool_name="calculator")], index=0),
        StreamingChunk(content="", tool_calls=[ToolCallDelta(index=0, arguments='{"expression": "2+3"}')], index=0),
        StreamingChunk(content="", finish_reason="tool_calls"),
        StreamingChunk(content="", tool_call_result=ToolCallResult(result="5", origin=call, error=False), index=0),
        StreamingChunk(content="", finish_reason="tool_call_results"),
        StreamingChunk(content="It is 5."),
        StreamingChunk(content="", finish_reason="stop"),
    ]
    message = chunks_to_message(chunks)
    assert message.text == "It is 5."
    assert message.tool_calls == []
    assert message.meta["finish_reason"] == "stop"


def test_malformed_tool_arguments_are_dropped_and_empty_stream_is_empty_message():
    chunks = [
        StreamingChunk(
            content="", tool_calls=[ToolCallDelta(index=0, id="x", tool_name="f", arguments="{oops")], index=0
        )
    ]
    assert chunks_to_message(chunks).tool_calls == []
    empty = chunks_to_message([])
    assert empty.text is None and empty.meta["finish_reason"] is None
