"""The OpenAI protocol as real clients see it: the openai SDK (sync and async) and raw httpx against a real server."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from support import sse_events

USER = [{"role": "user", "content": "hello"}]
WRAPPER_MODES = [
    ("fake_async", "astream"),
    ("fake_async", "hayhooks"),
    ("fake_sync", "stream"),
    ("fake_sync", "generator"),
    ("fake_sync", "hayhooks"),
]


def text(n: int, prefix: str = "t") -> str:
    return "".join(f"{prefix}{i} " for i in range(n))


def test_models_lists_chat_wrappers_only(client, server):
    ids = {model.id for model in client.models.list()}
    assert {"fake_async", "fake_sync"} <= ids
    assert "api_only" not in ids
    response = httpx.get(server.url + "/models")
    assert response.headers["content-type"] == "application/json"
    entry = next(m for m in response.json()["data"] if m["id"] == "fake_sync")
    assert entry == {
        "id": "fake_sync",
        "object": "model",
        "created": entry["created"],
        "owned_by": "haystream",
        "name": "fake_sync",
    }


def test_a_model_is_retrieved_by_id(client, server):
    model = client.models.retrieve("fake_sync")
    assert (model.id, model.object, model.owned_by) == ("fake_sync", "model", "haystream")
    listed = next(m for m in client.models.list() if m.id == "fake_sync")
    assert model.created == listed.created
    for missing in ("nope", "api_only"):  # api_only has no chat method: not a model
        with pytest.raises(openai.NotFoundError) as refused:
            client.models.retrieve(missing)
        assert refused.value.body["code"] == "model_not_found"
    assert httpx.get(server.url + "/models/fake_async").json()["id"] == "fake_async"


def test_a_base_url_with_a_trailing_slash_and_routes_with_one_are_served(server):
    """Open WebUI joins each `OPENAI_API_BASE_URLS` entry as `f"{url}/chat/completions"`, so a base URL written with a
    trailing slash asks for `/v1//chat/completions` (and `/v1//models`): they were 404s. `/v1/chat/completions/` got
    hayhooks' 307 with a Location built from the client's `Host`. Each is now the route it spells."""
    with openai.OpenAI(base_url=server.url + "/v1//", api_key="unused", max_retries=0) as sdk:
        assert {"fake_async", "fake_sync"} <= {model.id for model in sdk.models.list()}
        assert sdk.models.retrieve("fake_sync").id == "fake_sync"
        stream = sdk.chat.completions.create(
            model="fake_async", messages=USER, stream=True, extra_body={"scenario": "fake?tokens=3"}
        )
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == text(3)
    body = {"model": "fake_sync", "messages": USER, "scenario": "fake?tokens=2"}
    for path in (
        "/v1/chat/completions/",
        "//v1/chat/completions",
        "/chat/completions//",
        "/openwebui/v1//chat/completions",
    ):
        answered = httpx.post(server.url + path, json=body)
        assert answered.status_code == 200 and "location" not in answered.headers, (path, answered.status_code)
        assert answered.json()["choices"][0]["message"]["content"] == text(2), path
    for path in ("/v1/models/", "//models", "/v1//models/fake_sync/"):
        listed = httpx.get(server.url + path)
        assert listed.status_code == 200 and listed.json()["object"] in ("list", "model"), path
    created = httpx.post(server.url + "/v1/responses/", json={"model": "fake_sync", "input": "hi", "store": False})
    assert created.status_code == 200 and created.json()["object"] == "response"


@pytest.mark.parametrize(("model", "mode"), WRAPPER_MODES)
def test_streamed_text_equals_upstream_text(client, model, mode):
    stream = client.chat.completions.create(
        model=model, messages=USER, stream=True, extra_body={"mode": mode, "scenario": "fake?tokens=7"}
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == text(7)


@pytest.mark.parametrize(("model", "mode"), [("fake_async", "astream"), ("fake_sync", "stream")])
async def test_async_sdk_streams_and_reports_usage(aclient, model, mode):
    stream = await aclient.chat.completions.create(
        model=model,
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"mode": mode, "scenario": "fake?tokens=5"},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text(5)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 5


@pytest.mark.parametrize("model", ["fake_async", "fake_sync"])
def test_mid_stream_failure_raises_api_error_with_message(client, model):
    stream = client.chat.completions.create(
        model=model, messages=USER, stream=True, extra_body={"scenario": "fake?tokens=20&fail_after=3"}
    )
    received = []
    with pytest.raises(openai.APIError, match="upstream failed after 3 tokens"):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == text(3)


@pytest.mark.parametrize("model", ["fake_async", "fake_sync"])
def test_early_failure_is_a_typed_status_error(client, model):
    with pytest.raises(openai.InternalServerError, match="the wrapper refused this request") as raised:
        client.chat.completions.create(model=model, messages=USER, stream=True, extra_body={"mode": "fail_early"})
    body = raised.value.body
    assert set(body) == {"message", "type", "param", "code"} and "Traceback" not in body["message"]
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model=model, messages=USER, stream=True, extra_body={"scenario": "fake?status=429"}
        )


@pytest.mark.parametrize(
    ("model", "mode"), [("fake_async", "astream"), ("fake_sync", "stream"), ("fake_sync", "string")]
)
def test_non_streaming_completion(client, model, mode):
    completion = client.chat.completions.create(
        model=model, messages=USER, extra_body={"mode": mode, "scenario": "fake?tokens=4"}
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == text(4)
    assert completion.choices[0].finish_reason == "stop"
    if mode != "string":
        assert completion.usage.completion_tokens == 4


def test_exact_frame_sequence(server):
    body = {"model": "fake_async", "messages": USER, "stream": True, "scenario": "fake?tokens=3"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in response.headers
        events = sse_events(list(response.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "fake_async" for c in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finishes == ["stop"] and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert all(None not in d.values() and d for d in deltas)
    assert "".join(d.get("content", "") for d in deltas) == text(3)
    assert all("role" not in d for d in deltas)


def test_mixed_items_and_events_are_not_sent_to_plain_clients(server):
    body = {"model": "fake_async", "messages": USER, "stream": True, "mode": "mixed"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        events = sse_events(list(response.iter_lines()))
    payloads = [json.loads(e) for e in events[:-1]]
    assert all("event" not in p for p in payloads)
    deltas = [p["choices"][0]["delta"] for p in payloads]
    assert "".join(d.get("content", "") for d in deltas) == "plain chunk dict"
    assert [d["reasoning_content"] for d in deltas if "reasoning_content" in d] == ["thinking..."]


def test_agent_tool_activity_is_not_sent_as_client_tool_calls(client):
    stream = client.chat.completions.create(
        model="fake_async",
        messages=USER,
        stream=True,
        extra_body={"mode": "agent", "scenario": 'fake?tool=multiply&args={"a": 6, "b": 7}&tokens=1&text=ok'},
    )
    chunks = [c for c in stream if c.choices]
    assert all(not c.choices[0].delta.tool_calls for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "result=42 ok0 "
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_client_supplied_tools_round_trip_as_tool_calls(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    stream = client.chat.completions.create(
        model="fake_async",
        messages=USER,
        stream=True,
        tools=tools,
        extra_body={"mode": "client_tools", "scenario": 'fake?tool=get_weather&args={"city": "Paris"}'},
    )
    chunks = [c for c in stream if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content is None  # as OpenAI
    assert not any(c.choices[0].delta.content for c in chunks)
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or ()]
    assert calls[0].id == "call_fake_1" and calls[0].type == "function" and calls[0].function.name == "get_weather"
    assert all(tc.id is None and tc.function.name is None for tc in calls[1:])
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    completion = client.chat.completions.create(
        model="fake_async",
        messages=USER,
        tools=tools,
        extra_body={"mode": "client_tools", "scenario": 'fake?tool=get_weather&args={"city": "Paris"}'},
    )
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.choices[0].message.tool_calls[0].function.arguments == '{"city": "Paris"}'


def test_sync_wrappers_never_run_on_the_event_loop(client):
    completion = client.chat.completions.create(model="fake_sync", messages=USER, extra_body={"mode": "whoami"})
    assert completion.choices[0].message.content.startswith("haystream-producer")
