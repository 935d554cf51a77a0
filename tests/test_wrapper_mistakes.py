"""What a wrapper author's first-day mistakes get: a one-line error naming them, never a silent wrong answer."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from support import sse_events

USER = [{"role": "user", "content": "hello"}]


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.mark.parametrize("stream", [False, True])
def test_a_returned_chat_message_is_its_text(client, stream):
    # `pipeline.run(...)["llm"]["replies"][0]` is what a Haystack user returns first; it was an empty answer.
    body = {"mode": "message", "scenario": "fake?tokens=3"}
    if stream:
        chunks = client.chat.completions.create(model="fake_sync", messages=USER, stream=True, extra_body=body)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "t0 t1 t2 "
    else:
        answer = client.chat.completions.create(model="fake_sync", messages=USER, extra_body=body)
        assert answer.choices[0].message.content == "t0 t1 t2 "


def test_a_returned_chat_message_with_tool_calls_is_the_clients_call(client):
    body = {"mode": "message", "scenario": 'fake?tool=get_weather&args={"city": "Paris"}'}
    answer = client.chat.completions.create(model="fake_sync", messages=USER, extra_body=body)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_returned_pipeline_result_is_an_error_naming_it(http, stream):
    body = {"model": "fake_sync", "messages": USER, "mode": "run_result", "stream": stream}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    assert "a dict with keys ['llm']" in message and "Pipeline.run result" in message, message


def test_an_item_it_cannot_send_ends_the_stream_with_an_error_naming_it(http):
    body = {"model": "fake_sync", "messages": USER, "mode": "odd_item", "item": "bytes", "stream": True}
    events = sse_events(http.post("/v1/chat/completions", json=body).text.splitlines())
    assert json.loads(events[1])["choices"][0]["delta"] == {"content": "before "}
    error = json.loads(events[-2])["error"]
    assert "an item of type bytes" in error["message"] and events[-1] == "[DONE]"


def test_a_yielded_exception_fails_the_answer_as_if_raised(http, client):
    body = {"model": "fake_sync", "messages": USER, "mode": "odd_item", "item": "error"}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 500
    assert "ValueError: yielded, not raised" in response.json()["error"]["message"]
    with pytest.raises(openai.APIError, match="yielded, not raised"):
        extra = {"mode": "odd_item", "item": "error"}
        for _ in client.chat.completions.create(model="fake_sync", messages=USER, stream=True, extra_body=extra):
            pass
