"""haystream behind the real Open WebUI 0.12: its API, and its page in headless Chromium driven by Playwright."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from haystream.openwebui.events import tool_call_block

OUTPUT = Path(__file__).parents[2] / "test-output"


def chat_lines(openwebui: str, token: str, model: str, prompt: str) -> list[str]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True}
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.stream("POST", openwebui + "/api/chat/completions", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [line for line in r.iter_lines() if line.startswith("data: ")]


def test_open_webui_lists_haystream_wrappers(openwebui, webui_token):
    response = httpx.get(openwebui + "/api/models", headers={"Authorization": f"Bearer {webui_token}"}, timeout=60)
    ids = {model["id"] for model in response.json()["data"]}
    assert {"agent_tools", "local_chat", "rag_chat", "failing"} <= ids


def test_chat_through_open_webui_streams_the_local_model(openwebui, webui_token):
    lines = chat_lines(openwebui, webui_token, "local_chat", "Say hello.")
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))
    assert text.strip()
    assert sum(1 for c in chunks if c.get("choices") and c["choices"][0]["delta"].get("content")) > 1  # streamed


def test_mid_stream_failure_surfaces_as_an_error_not_a_short_answer(openwebui, webui_token):
    lines = chat_lines(openwebui, webui_token, "failing", "hi")
    payloads = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    errors = [p["error"] for p in payloads if "error" in p]
    assert errors and "upstream failed after 3 tokens" in errors[0]["message"]
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if p.get("choices"))
    assert text == "t0 t1 t2 "


def test_browser_chat_with_the_agent_shows_answer_and_status(openwebui):
    text = browser_chat(openwebui, "agent_tools", "What is 6*7?", "ok2", "openwebui-agent.png")
    assert "result=42 ok0 ok1 ok2" in text
    assert "calculator done" in text  # the agent's status line, rendered by Open WebUI


def browser_chat(openwebui: str, model: str, prompt: str, answer: str, screenshot: str) -> str:
    """Open WebUI's page in headless Chromium: ask `model`, wait for `answer` and the end of the stream, save a
    screenshot in test-output/, and return the page's text."""
    sync_api = pytest.importorskip("playwright.sync_api")
    OUTPUT.mkdir(exist_ok=True)
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=args, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(openwebui)
            page.locator("#chat-input").wait_for(state="visible", timeout=90_000)
            welcome = page.get_by_role("button", name="Okay, Let's Go!")
            if welcome.count() or _appears(welcome):
                welcome.click()
                page.locator('div[role="dialog"]').wait_for(state="detached", timeout=15_000)
            page.locator("#model-selector-model-button").click()
            page.locator(f'[role="option"][aria-label="Select {model} model"]').click()
            page.wait_for_function(
                "model => document.querySelector('#model-selector-model-button')?.getAttribute('aria-label')"
                " === `Selected model: ${model}`",
                arg=model,
                timeout=15_000,
            )
            page.locator("#chat-input").click()
            page.keyboard.type(prompt)
            page.locator("button#send-message-button").click()
            # The streamed answer, then the finished message (its actions appear when the stream has ended).
            page.wait_for_function(
                "answer => [...document.querySelectorAll('#response-content-container')]"
                ".some(el => el.innerText.includes(answer))",
                arg=answer,
                timeout=120_000,
            )
            page.locator('[id^="message-"] button[aria-label="Regenerate"]').last.wait_for(
                state="visible", timeout=120_000
            )
            page.screenshot(path=str(OUTPUT / screenshot))
            return page.locator("body").inner_text()
        finally:
            browser.close()


def _appears(locator) -> bool:
    try:
        locator.wait_for(state="visible", timeout=5_000)
    except Exception:
        return False
    return True


def test_chat_through_a_responses_connection_streams(openwebui, webui_token):
    """The connection's API type set to "Responses": Open WebUI posts {base}/responses and streams its events."""
    with responses_connection(openwebui, webui_token):
        lines = chat_lines(openwebui, webui_token, "local_chat", "Say hello.")
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    types = [event.get("type") for event in events]
    assert types[0] == "response.created" and types[-1] == "response.completed", types
    deltas = [event["delta"] for event in events if event.get("type") == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas).strip()  # streamed, token by token
    assert [event["sequence_number"] for event in events] == list(range(len(events)))


def test_title_through_a_responses_connection_is_answered_without_the_pipeline(openwebui, webui_token, upstream):
    """Open WebUI sends its background tasks to {base}/responses too: each one ran the pipeline."""
    headers = {"Authorization": f"Bearer {webui_token}"}
    body = {"model": "openai_chat", "messages": [{"role": "user", "content": "How do I make a vegan flan?"}]}
    before = len(upstream.records)
    with responses_connection(openwebui, webui_token):
        httpx.get(openwebui + "/api/models", headers=headers, timeout=60)  # the task route finds only listed models
        response = httpx.post(openwebui + "/api/v1/tasks/title/completions", json=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    title = json.loads(response.json()["choices"][0]["message"]["content"])  # Open WebUI's chat shape, from Responses
    assert title == {"title": "How do I make a vegan flan"}  # not the pipeline's prose
    assert len(upstream.records) == before  # the pipeline never ran


def test_browser_chat_on_a_responses_connection_shows_status_lines_and_citations(openwebui, webui_token):
    """Open WebUI reads haystream's event lines on a Responses stream as on chat completions: the status lines and
    citations it shows on a chat-completions connection were missing on a Responses one."""
    with responses_connection(openwebui, webui_token):
        agent = browser_chat(openwebui, "agent_tools", "What is 6*7?", "ok2", "openwebui-responses-agent.png")
        rag = browser_chat(
            openwebui, "rag_chat", "How do I add haystream to Open WebUI?", "t3", "openwebui-responses-rag.png"
        )
    assert "result=42 ok0 ok1 ok2" in agent
    assert "calculator done" in agent  # the agent's status line
    assert "Answered from the documents" in rag  # rag_chat's last status line
    assert "2 Sources" in rag  # the citations of the two documents retrieved


def test_run_response_wrapper_on_a_responses_connection_gets_the_history_without_tool_blocks(openwebui, webui_token):
    """An agent's earlier answer comes back as Open WebUI showed it, tool block included: a `run_response` wrapper
    got that markup in its `input_items`."""
    block = tool_call_block("call_1", "calculator", {"expression": "6*7"}, "42")
    messages = [
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": block + "result=42"},
        {"role": "user", "content": "And times two?"},
    ]
    body = {"model": "responses_items", "messages": messages, "stream": True}
    headers = {"Authorization": f"Bearer {webui_token}"}
    with responses_connection(openwebui, webui_token):
        httpx.get(openwebui + "/api/models", headers=headers, timeout=60)  # the chat route finds only listed models
        with httpx.stream("POST", openwebui + "/api/chat/completions", json=body, headers=headers, timeout=120) as r:
            assert r.status_code == 200, r.read()
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    answer = "".join(e["delta"] for e in events if e.get("type") == "response.output_text.delta")
    items = json.loads(answer)  # the input items the wrapper was given, as Open WebUI converted the chat
    assistant = [item for item in items if item.get("role") == "assistant"]
    assert [part["text"] for item in assistant for part in item["content"]] == ["result=42"]
    assert [item["role"] for item in items] == ["user", "assistant", "user"]


@contextlib.contextmanager
def responses_connection(openwebui: str, token: str) -> Iterator[None]:
    """Open WebUI's connection to haystream with its API type set to "Responses", for the time of a block."""
    headers = {"Authorization": f"Bearer {token}"}
    config = httpx.get(openwebui + "/openai/config", headers=headers, timeout=60).json()
    original = {key: config[key] for key in ("ENABLE_OPENAI_API", "OPENAI_API_BASE_URLS", "OPENAI_API_KEYS")}
    original["OPENAI_API_CONFIGS"] = config.get("OPENAI_API_CONFIGS") or {}
    responses = {**original, "OPENAI_API_CONFIGS": {"0": {**original["OPENAI_API_CONFIGS"].get("0", {})}}}
    responses["OPENAI_API_CONFIGS"]["0"]["api_type"] = "responses"
    update = httpx.post(openwebui + "/openai/config/update", json=responses, headers=headers, timeout=60)
    assert update.status_code == 200, update.text
    try:
        yield
    finally:
        httpx.post(openwebui + "/openai/config/update", json=original, headers=headers, timeout=60)


def test_a_chat_with_an_attached_json_file_gets_the_pipelines_answer(openwebui, webui_token, upstream):
    """Open WebUI's RAG template also starts with `### Task:`: the file's `{"title": ...` made it a title task."""
    headers = {"Authorization": f"Bearer {webui_token}"}
    # Retrieval bypassed: the whole file goes into the prompt, and no embedding model is needed offline.
    bypass = {"BYPASS_EMBEDDING_AND_RETRIEVAL": True}
    assert httpx.post(openwebui + "/api/v1/retrieval/config/update", json=bypass, headers=headers).status_code == 200
    try:
        text = _ask_about_file(openwebui, headers, "report.json", {"title": "Quarterly report", "revenue": "12 M EUR"})
    finally:
        restore = {"BYPASS_EMBEDDING_AND_RETRIEVAL": False}
        httpx.post(openwebui + "/api/v1/retrieval/config/update", json=restore, headers=headers, timeout=60)
    assert text == "t0 t1 t2 t3 "  # the pipeline's answer, not {"title": "New Chat"}
    prompt = upstream.records[-1].body["messages"][-1]["content"]
    assert "Quarterly report" in prompt and "What was the revenue?" in prompt


def _ask_about_file(openwebui: str, headers: dict, name: str, content: dict) -> str:
    upload = httpx.post(
        openwebui + "/api/v1/files/",
        headers=headers,
        params={"process": "true", "process_in_background": "false"},
        files={"file": (name, json.dumps(content).encode(), "application/json")},
        timeout=120,
    )
    assert upload.status_code == 200, upload.text
    file = upload.json()
    body = {
        "model": "openai_chat",
        "messages": [{"role": "user", "content": "What was the revenue?"}],
        "files": [{"type": "file", "id": file["id"], "file": file}],
        "stream": True,
    }
    with httpx.stream("POST", openwebui + "/api/chat/completions", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith('data: {"id"')]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def test_autocompletion_is_answered_without_the_pipeline(openwebui, webui_token, upstream):
    headers = {"Authorization": f"Bearer {webui_token}"}
    config = httpx.get(openwebui + "/api/v1/tasks/config", headers=headers, timeout=60).json()
    update = httpx.post(
        openwebui + "/api/v1/tasks/config/update",
        json={**config, "ENABLE_AUTOCOMPLETE_GENERATION": True},
        headers=headers,
        timeout=60,
    )
    assert update.status_code == 200, update.text
    before = len(upstream.records)
    body = {"model": "openai_chat", "prompt": "The capital of France is", "type": "General", "messages": []}
    try:
        response = httpx.post(openwebui + "/api/v1/tasks/auto/completions", json=body, headers=headers, timeout=120)
    finally:
        httpx.post(openwebui + "/api/v1/tasks/config/update", json=config, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["choices"][0]["message"]["content"]) == {"text": ""}
    assert len(upstream.records) == before  # no pipeline run for a pause in typing
