"""What a wrapper author's first-day mistakes get: a one-line error naming them, never a silent wrong answer."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from haystack import Pipeline
from haystack.components.builders import ChatPromptBuilder
from haystack.dataclasses import ChatMessage

import haystream
from support import sse_events, start_server, unique

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


WRAPPER = """
from hayhooks import BasePipelineWrapper
{head}

class {name}(BasePipelineWrapper):
    def setup(self) -> None:
        {setup}

    def run_chat_completion(self, model: str, messages: list[dict], body: dict) -> str:
        return "ok"
"""


def test_a_wrapper_that_failed_to_load_is_told_truthfully(upstream, tmp_path):
    folders = {
        "wrong_class": WRAPPER.format(head="", name="ChatWrapper", setup="pass"),
        "setup_fails": WRAPPER.format(head="", name="PipelineWrapper", setup="raise RuntimeError('key sk-XYZ bad')"),
        "import_fails": WRAPPER.format(head="import not_installed_xyz", name="PipelineWrapper", setup="pass"),
    }
    for name, source in folders.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "pipeline_wrapper.py").write_text(source)
    server = start_server(upstream, pipelines_dir=str(tmp_path))
    try:
        messages = {}
        for name in folders:
            response = httpx.post(server.url + "/v1/chat/completions", json={"model": name, "messages": USER})
            assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_loaded"
            messages[name] = response.json()["error"]["message"]
    finally:
        server.stop()
    assert "pipeline_wrapper.py defines no class named PipelineWrapper" in messages["wrong_class"]
    for name in ("setup_fails", "import_fails"):
        # hayhooks logs the reason, never the traceback: the message must not promise one, nor leak the reason.
        assert "import or setup() raised" in messages[name] and "traceback" not in messages[name]
    assert "sk-XYZ" not in messages["setup_fails"]


@pytest.mark.parametrize("stream_function", [haystream.stream, haystream.astream])
def test_a_pipeline_with_nothing_to_stream_is_refused_up_front(make_llm, stream_function):
    # It ran to its end and streamed nothing: every request got an empty answer.
    prompt_only = Pipeline()
    prompt_only.add_component("prompt", ChatPromptBuilder(template=[ChatMessage.from_user("hi")]))
    with pytest.raises(ValueError, match=r"no component takes a streaming_callback \(components: prompt\)"):
        stream_function(prompt_only, {"prompt": {}})
    with_llm = Pipeline()
    with_llm.add_component("llm", make_llm("fake?tokens=2"))
    with pytest.raises(ValueError, match="streaming_components is empty"):
        stream_function(with_llm, messages=[ChatMessage.from_user("hi")], streaming_components=[])


async def test_a_second_task_reading_the_same_astream_is_refused(make_llm, upstream):
    # Its channel wakes one reader: the second task waited for ever (or took the first one's chunks).
    model = unique("fake?tokens=3&hold_after=1")
    chunks = haystream.astream(make_llm(model), messages=[ChatMessage.from_user("hi")])
    seen = ""
    while seen != "t0 ":
        seen += (await anext(chunks)).content
    reading = asyncio.create_task(anext(chunks))
    await asyncio.sleep(0)  # one turn: the task is now waiting on the held upstream
    with pytest.raises(RuntimeError, match="already being read by another task"):
        await anext(chunks)
    upstream.wait_for_requests(1, model=model)[0].release()
    rest = [(await reading).content] + [chunk.content async for chunk in chunks]
    assert seen + "".join(rest) == "t0 t1 t2 "


SHAPES = """
import os

from hayhooks import BasePipelineWrapper
from haystack.dataclasses import ChatMessage

import haystream
from haystream.testing import fake_chat_generator


def generator(body):
    return fake_chat_generator(body["scenario"], os.environ["FAKE_UPSTREAM_URL"])


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

{method}
"""

METHODS = {
    # The natural way to write an async streaming wrapper: it was a 500 ("object async_generator can't be used in
    # 'await' expression").
    "async_generator": """
    async def run_chat_completion_async(self, model, messages, body):
        history = [ChatMessage.from_openai_dict_format(m) for m in messages]
        async for chunk in haystream.astream(generator(body), messages=history):
            yield chunk
""",
    # A plain function handing back an async stream (nothing blocks): it was a 500 too.
    "returns_astream": """
    def run_chat_completion_async(self, model, messages, body):
        history = [ChatMessage.from_openai_dict_format(m) for m in messages]
        return haystream.astream(generator(body), messages=history)
""",
    # `async def` under the sync name: its coroutine was answered as an empty reply.
    "async_def_sync_name": """
    async def run_chat_completion(self, model, messages, body):
        history = [ChatMessage.from_openai_dict_format(m) for m in messages]
        result = await generator(body).run_async(messages=history)
        return result["replies"][0].text
""",
}


def test_every_natural_shape_of_a_chat_method_answers(upstream, tmp_path):
    for name, method in METHODS.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "pipeline_wrapper.py").write_text(SHAPES.format(method=method))
    server = start_server(upstream, pipelines_dir=str(tmp_path))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        for name in METHODS:
            body = {"scenario": "fake?tokens=3"}
            answer = client.chat.completions.create(model=name, messages=USER, extra_body=body)
            assert answer.choices[0].message.content == "t0 t1 t2 ", name
            chunks = client.chat.completions.create(model=name, messages=USER, stream=True, extra_body=body)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "t0 t1 t2 ", name
    finally:
        server.stop()


def test_a_plain_function_named_async_answers_and_is_named_in_the_log(upstream, tmp_path, caplog):
    method = """
    def run_chat_completion_async(self, model, messages, body):
        return "ran on the loop"
"""
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "pipeline_wrapper.py").write_text(SHAPES.format(method=method))
    server = start_server(upstream, pipelines_dir=str(tmp_path))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        for _ in range(2):
            answer = client.chat.completions.create(model="plain", messages=USER)
            assert answer.choices[0].message.content == "ran on the loop"
    finally:
        server.stop()
    warnings = [r.getMessage() for r in caplog.records if "is a plain function" in r.getMessage()]
    assert len(warnings) == 1 and "PipelineWrapper.run_chat_completion_async" in warnings[0], warnings


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_that_names_no_function_is_an_error_not_a_call_named_empty(http, stream):
    # It reached the client as `"name": ""`, a call no client can run.
    body = {"model": "fake_sync", "messages": USER, "mode": "nameless_call", "stream": stream}
    response = http.post("/v1/chat/completions", json=body)
    if stream:
        events = sse_events(response.text.splitlines())
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert all('"tool_calls"' not in event for event in events)
    else:
        assert response.status_code == 500
        error = response.json()["error"]
    assert "tool call call_x names no function" in error["message"]
