"""Fast in-process tests of the wire layer (`haystream.openai`) and of the gate, without sockets.

The frames are checked against the OpenAI SDK's own types (`ChatCompletionChunk`, `ChatCompletion`), so a field the
SDK requires or a shape it rejects fails here first.
"""

from __future__ import annotations

import base64

import httpx
import orjson
import pytest
from haystack.dataclasses import ReasoningContent, StreamingChunk, ToolCall, ToolCallDelta, ToolCallResult
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from haystream.openai import (
    DONE,
    ChunkFramer,
    CompletionBuilder,
    DeltaMapper,
    Event,
    OpenAIError,
    ToolActivity,
    classify_failure,
    describe_failure,
    parse_chat_request,
)
from haystream.openai.errors import redact
from haystream.server.auth import KeyCheck
from haystream.server.gate import Gate
from haystream.settings import ServerSettings

USAGE = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def parse_frame(frame: bytes) -> dict:
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    return orjson.loads(frame[6:])


# --- ChunkFramer ---------------------------------------------------------------------------------------------------


def test_frames_are_valid_sdk_chunks_sharing_id_and_created():
    framer = ChunkFramer("m")
    frames = [
        framer.role(),
        framer.delta({"content": "hi"}),
        framer.finish("stop"),
        framer.usage(USAGE),
    ]
    chunks = [ChatCompletionChunk.model_validate(parse_frame(frame)) for frame in frames]
    assert {chunk.id for chunk in chunks} == {framer.id} and {chunk.created for chunk in chunks} == {framer.created}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[1].choices[0].delta.content == "hi" and chunks[1].choices[0].finish_reason is None
    assert chunks[2].choices[0].finish_reason == "stop" and parse_frame(frames[2])["choices"][0]["delta"] == {}
    assert chunks[3].choices == [] and chunks[3].usage.total_tokens == 3
    assert b"null" not in frames[1].split(b'"delta":')[1].split(b"}")[0]  # no null fields inside a delta
    assert DONE == b"data: [DONE]\n\n"


# --- DeltaMapper ------------------------------------------------------------------------------------------------------


def test_text_reasoning_strings_and_usage():
    mapper = DeltaMapper()
    deltas = [
        *mapper.feed(StreamingChunk(content="", reasoning=ReasoningContent(reasoning_text="hmm"), index=0)),
        *mapper.feed("plain "),
        *mapper.feed(StreamingChunk(content="chunk", finish_reason="stop")),
        *mapper.feed(StreamingChunk(content="", meta={"usage": {"prompt_tokens": 4, "completion_tokens": 2}})),
    ]
    assert deltas == [{"reasoning_content": "hmm"}, {"content": "plain "}, {"content": "chunk"}]
    tool_deltas, finish_reason, usage = mapper.finish()
    assert tool_deltas == [] and finish_reason == "stop"
    assert usage == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_client_tool_calls_are_held_until_the_end_then_sent():
    mapper = DeltaMapper()
    out = mapper.feed(StreamingChunk(content="", tool_calls=[ToolCallDelta(index=0, id="c1", tool_name="f")], index=0))
    out += mapper.feed(StreamingChunk(content="", tool_calls=[ToolCallDelta(index=0, arguments='{"a":')], index=0))
    out += mapper.feed(StreamingChunk(content="", tool_calls=[ToolCallDelta(index=0, arguments="1}")], index=0))
    out += mapper.feed(StreamingChunk(content="", finish_reason="tool_calls", index=0))
    assert not any(isinstance(item, dict) and "tool_calls" in item for item in out)  # nothing sent yet
    tool_deltas, finish_reason, _ = mapper.finish()
    assert finish_reason == "tool_calls"
    first = tool_deltas[0]["tool_calls"][0]
    assert first["id"] == "c1" and first["function"] == {"name": "f", "arguments": ""}  # id and name once
    arguments = "".join(delta["tool_calls"][0]["function"]["arguments"] for delta in tool_deltas[1:])
    assert arguments == '{"a":1}' and all("id" not in delta["tool_calls"][0] for delta in tool_deltas[1:])


def test_an_agents_answered_calls_become_activity_never_client_calls():
    mapper = DeltaMapper()
    mapper.feed(
        StreamingChunk(
            content="", tool_calls=[ToolCallDelta(index=0, id="c1", tool_name="add", arguments="{}")], index=0
        )
    )
    result = ToolCallResult(result="3", origin=ToolCall(tool_name="add", arguments={}, id="c1"), error=False)
    out = mapper.feed(StreamingChunk(content="", tool_call_result=result, index=0))
    out += mapper.feed(StreamingChunk(content="", finish_reason="tool_call_results"))
    out += mapper.feed(StreamingChunk(content="3", finish_reason="stop"))
    assert any(isinstance(item, ToolActivity) and item.name == "add" and item.result == "3" for item in out)
    tool_deltas, finish_reason, _ = mapper.finish()
    assert tool_deltas == [] and finish_reason == "stop"  # never the Haystack-only "tool_call_results"


def test_events_from_dicts_and_from_any_to_event_dict_object():
    from hayhooks.events import create_status_event
    from hayhooks.open_webui import create_chat_completion_event

    mapper = DeltaMapper()
    events = mapper.feed({"event": {"type": "status", "data": {"description": "x"}}})
    events += mapper.feed(create_status_event("working"))
    events += mapper.feed(create_chat_completion_event({"content": "y"}))  # an OpenWebUIEvent (a subclass)
    assert [event.type for event in events if isinstance(event, Event)] == ["status", "status", "chat:completion"]


def test_ready_openai_chunk_dicts_pass_through():
    mapper = DeltaMapper()
    out = mapper.feed({"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "length"}]})
    assert out == [{"content": "x"}] and mapper.finish()[1] == "length"


# --- CompletionBuilder ------------------------------------------------------------------------------------------------


def test_completion_validates_against_the_sdk_and_keeps_tool_calls():
    builder = CompletionBuilder()
    builder.add({"content": "a"})
    builder.add({"reasoning_content": "r"})
    builder.add(
        {"tool_calls": [{"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}]}
    )
    builder.add({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "}"}}]})  # a repeated name
    raw = builder.build(
        id="chatcmpl-1",
        created=1,
        model="m",
        finish_reason="tool_calls",
        usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    )
    completion = ChatCompletion.model_validate(raw)
    message = completion.choices[0].message
    assert message.content == "a" and message.refusal is None and raw["choices"][0]["message"]["reasoning_content"]
    assert message.tool_calls[0].function.arguments == "{}"
    assert message.tool_calls[0].function.name == "f"  # the first name wins, as in chunks_to_message


def test_completion_without_usage_reports_none():
    raw = CompletionBuilder().build(id="chatcmpl-1", created=1, model="m", finish_reason="stop", usage={})
    assert "usage" not in raw and ChatCompletion.model_validate(raw).choices[0].message.content == ""


# --- request parsing and errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{", None),
        (b"[]", None),
        (orjson.dumps({"messages": [{"role": "user", "content": "x"}]}), "model"),
        (orjson.dumps({"model": "m", "messages": []}), "messages"),
        (orjson.dumps({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}), "messages.0.role"),
        (orjson.dumps({"model": "m", "messages": [{"role": "user"}]}), "messages.0"),
        (orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}), "stream"),
        (orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}), "n"),
    ],
)
def test_bad_requests_are_400_with_the_param(body, param):
    with pytest.raises(OpenAIError) as refused:
        parse_chat_request(body)
    assert refused.value.status == 400
    if param is not None:
        assert refused.value.param == param


def test_unknown_fields_and_open_webui_quirks_are_kept():
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "user": {"id": "u"}, "custom": 1}
    request, raw = parse_chat_request(orjson.dumps(body))
    assert request.model == "m" and raw["custom"] == 1


def test_envelope_and_failure_descriptions():
    error = OpenAIError(429, "slow down", code="c", headers={"retry-after": "1"})
    assert orjson.loads(error.to_json()) == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "c"}
    }
    try:
        try:
            raise ValueError("root cause with sk-abcdefghijkl1234\nsecond line")
        except ValueError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as outer:
        assert describe_failure(outer) == "ValueError: root cause with [redacted]"
        assert classify_failure(outer) == (500, "pipeline_error")
    assert classify_failure(ValueError("Requested tokens (5000) exceed context window of 2048")) == (
        400,
        "context_length_exceeded",
    )


def test_redaction():
    text = "GET https://u:p@h.example/v1/x?key=abc#f Bearer abc.def token=xyz my-key"
    assert redact(text, ["my-key"]) == "GET https://h.example/v1/x Bearer [redacted] token=[redacted] [redacted]"


# --- auth and gate (in process) ------------------------------------------------------------------------------------


def test_key_check_roles():
    keys = KeyCheck(["chat"], ["admin"])
    assert keys.identify(b"Bearer chat").can_deploy is False
    assert keys.identify(b"Bearer admin").can_deploy is True
    chat_id = keys.identify(b"Basic " + base64.b64encode(b"u:chat")).key_id
    assert chat_id == KeyCheck(["other", "chat"]).identify(b"Bearer chat").key_id  # the key's, not its place's
    assert chat_id.startswith("key-") and "chat" not in chat_id.removeprefix("key-")
    assert keys.identify(b"Bearer admin").key_id != chat_id
    for bad in (None, b"", b"Bearer", b"Bearer nope", b"Basic \xff", b"Digest chat"):
        assert keys.identify(bad) is None
    assert KeyCheck(["chat"]).identify(b"Bearer chat").can_deploy is True  # no deploy keys: API keys may deploy


async def test_gate_in_process():
    seen = []

    async def app(scope, receive, send):
        seen.append((scope["path"], (await receive())["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    gate = Gate(app, ServerSettings(api_keys="k", max_body_bytes=1024), root_paths=("/api",))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://t") as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.get("/anything")).status_code == 401
        assert (await client.post("/x", content=b"abc", headers={"Authorization": "Bearer k"})).text == "ok"
        assert (await client.post("/x", content=b"a" * 2048, headers={"Authorization": "Bearer k"})).status_code == 413
        deploy = await client.post("/api/deploy_files", json={}, headers={"Authorization": "Bearer k"})
        assert deploy.status_code == 403 and deploy.json()["detail"]
    assert seen == [("/x", b"abc")]  # only the one allowed request reached the app, with its body replayed
