"""The example wrappers in pipeline_wrappers/, served by haystream: remote ones against the fake upstream, and the
embedded local model for real."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from haystream.server import ServerSettings, create_app
from haystream.testing import ServerThread
from support import sse_events, unique

EXAMPLES = Path(__file__).parent.parent / "pipeline_wrappers"
OPENAI_MODEL = unique("fake?tokens=5")  # unique: the tests find their requests on the shared fake upstream
RAG_CHAT_MODEL = unique("fake?tokens=2&text=rag")
ENV = {
    "OPENAI_API_KEY": "test-key",
    "OPENAI_MODEL": OPENAI_MODEL,
    "HAYHOOKS_STYLE_MODEL": "fake?tokens=3&text=h",
    "RAG_CHAT_MODEL": RAG_CHAT_MODEL,
    "AGENT_TOOLS_MODEL": 'fake?tool=calculator&args={"expression": "6*7"}&tokens=1&text=ok',
}


@pytest.fixture(scope="module")
def examples(upstream):
    saved = {key: os.environ.get(key) for key in [*ENV, "OPENAI_BASE_URL"]}
    os.environ.update(ENV, OPENAI_BASE_URL=upstream.base_url)
    server = ServerThread(create_app(ServerSettings(pipelines_dir=str(EXAMPLES))), lifespan="on").start()
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def stream_events(server: ServerThread, model: str, content: str, prefix: str = "") -> list[dict]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": True}
    with httpx.stream("POST", f"{server.url}{prefix}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        events = sse_events(list(response.iter_lines()))
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def content_of(payloads: list[dict]) -> str:
    return "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if p.get("choices"))


def test_every_example_is_listed(examples):
    ids = {entry["id"] for entry in httpx.get(examples.url + "/v1/models").json()["data"]}
    assert {"local_chat", "openai_chat", "rag_chat", "agent_tools", "hayhooks_style"} <= ids


def test_openai_chat_streams_the_upstream_with_history(examples, upstream):
    sdk = openai.OpenAI(base_url=examples.url + "/v1", api_key="x", max_retries=0)
    history = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "second"},
    ]
    stream = sdk.chat.completions.create(
        model="openai_chat", messages=history, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "t0 t1 t2 t3 t4 "
    assert chunks[-1].usage.completion_tokens == 5
    sent = upstream.wait_for_requests(1, model=OPENAI_MODEL)[0].body["messages"]  # this module's only request
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]


def test_hayhooks_style_wrapper_is_served_unchanged(examples):
    assert content_of(stream_events(examples, "hayhooks_style", "hi")) == "h0 h1 h2 "
    # and hayhooks' own run_api route still works inside haystream
    assert httpx.post(examples.url + "/hayhooks_style/run", json={"question": "hi"}).json()["result"] == "h0 h1 h2 "


def test_rag_chat_streams_the_answer_and_sends_sources_only_to_open_webui(examples, upstream):
    plain = stream_events(examples, "rag_chat", "What is the default port of hayhooks?")
    assert content_of(plain) == "rag0 rag1 "
    assert all("event" not in p for p in plain)
    prompt = upstream.wait_for_requests(1, model=RAG_CHAT_MODEL)[0].body["messages"][0]["content"]  # the first
    assert "1416" in prompt  # BM25 retrieved hayhooks.md into the prompt
    webui = stream_events(examples, "rag_chat", "What is the default port of hayhooks?", prefix="/openwebui")
    sources = [p["event"]["data"] for p in webui if p.get("event", {}).get("type") == "source"]
    assert sources and sources[0]["source"]["name"] == "hayhooks.md"
    assert "1416" in sources[0]["document"][0]
    assert content_of(webui) == "rag0 rag1 "


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def test_rag_chat_searches_for_the_users_latest_text_and_refuses_a_turn_without_any(examples):
    # A last turn without text (an image) failed the run in the BM25 retriever: a 500 for the client's turn.
    url = examples.url + "/v1/chat/completions"
    question = {"role": "user", "content": "What is the default port of hayhooks?"}
    follow_up = {"role": "user", "content": [IMAGE]}
    answered = httpx.post(url, json={"model": "rag_chat", "messages": [question, follow_up]}, timeout=60)
    assert answered.status_code == 200, answered.text
    assert answered.json()["choices"][0]["message"]["content"] == "rag0 rag1 "
    refused = httpx.post(url, json={"model": "rag_chat", "messages": [follow_up]}, timeout=60)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "messages"


def test_agent_tools_answers_with_the_real_tool_and_shows_activity_as_status(examples):
    plain = stream_events(examples, "agent_tools", "What is 6*7?")
    assert content_of(plain) == "result=42 ok0 "
    assert all(not p["choices"][0]["delta"].get("tool_calls") for p in plain if p.get("choices"))
    assert all("event" not in p for p in plain)
    webui = stream_events(examples, "agent_tools", "What is 6*7?", prefix="/openwebui")
    statuses = [(p["event"]["data"]["description"], p["event"]["data"]["done"]) for p in webui if "event" in p]
    assert statuses == [("Using calculator…", False), ("calculator done", True)]
    text = content_of(webui)
    assert text.endswith("result=42 ok0 ")
    assert '<details type="tool_calls" done="true"' in text and 'name="calculator"' in text
    assert 'arguments="{&quot;expression&quot;:&quot;6*7&quot;}"' in text and 'result="&quot;42&quot;"' in text


def test_local_model_streams_and_completes_for_real(examples):
    payloads = stream_events(examples, "local_chat", "Say hello.")
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content_of(payloads).strip()
    assert [p["choices"][0]["finish_reason"] for p in payloads if p["choices"][0]["finish_reason"]] in (
        ["stop"],
        ["length"],
    )
    sdk = openai.OpenAI(base_url=examples.url + "/v1", api_key="x", max_retries=0)
    completion = sdk.chat.completions.create(
        model="local_chat", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=16
    )
    assert completion.choices[0].message.content.strip()
    assert completion.choices[0].finish_reason in ("stop", "length")


async def test_two_concurrent_local_requests_both_complete(examples):
    async with openai.AsyncOpenAI(base_url=examples.url + "/v1", api_key="x", max_retries=0) as sdk:

        async def ask(question: str) -> str:
            stream = await sdk.chat.completions.create(
                model="local_chat", messages=[{"role": "user", "content": question}], stream=True, max_tokens=24
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        answers = await asyncio.gather(ask("Name a fruit."), ask("Name an animal."))
    assert all(answer.strip() for answer in answers)


def test_cli_chat_shows_agent_activity_as_status_lines(examples):
    result = subprocess.run(
        [sys.executable, "-m", "haystream", "chat", "agent_tools", "What is 6*7?", "--url", examples.url],
        env={**os.environ, "HAYSTACK_TELEMETRY_ENABLED": "False", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["• Using calculator…", "• calculator done", "result=42 ok0 "]
