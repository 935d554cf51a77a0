"""Open WebUI as a client: event lines only for it, reasoning, agent activity, background tasks."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from haystack import Document

from haystream import openwebui
from haystream.openwebui.tasks import detect_task, heuristic_answer
from support import sse, sse_events, start_server, unique

USER = [{"role": "user", "content": "hello"}]
FIXTURES = Path(__file__).parent / "fixtures" / "openwebui"
TASKS = {
    "task_title.json": ("title", {"title": "How long does it need to set"}),
    "task_tags.json": ("tags", {"tags": ["General"]}),
    "task_follow_ups.json": ("follow_ups", {"follow_ups": []}),
    "task_queries.json": ("queries", {"queries": ["And how long does it need to set?"]}),
    "task_autocomplete.json": ("autocomplete", {"text": ""}),
}


def recorded(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def stream(url: str, body: dict, headers: dict | None = None) -> list[dict]:
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=headers or {}, timeout=30) as response:
        assert response.status_code == 200, response.read()
        events = sse_events(list(response.iter_lines()))
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def event_types(payloads: list[dict]) -> list[str]:
    return [p["event"]["type"] for p in payloads if "event" in p]


MIXED = {"model": "fake_async", "messages": USER, "mode": "mixed"}


@pytest.mark.parametrize(
    ("path", "headers", "expected"),
    [
        ("/v1/chat/completions", {}, []),
        ("/openwebui/v1/chat/completions", {}, ["status", "status"]),
        ("/v1/chat/completions", {"X-OpenWebUI-Chat-Id": "c1", "X-OpenWebUI-User-Id": "u1"}, ["status", "status"]),
        ("/v1/chat/completions", {"X-Haystream-Events": "true"}, ["status", "status"]),
    ],
)
def test_event_lines_reach_only_clients_that_render_them(server, path, headers, expected):
    payloads = stream(server.url + path, MIXED, headers)
    assert event_types(payloads) == expected
    content = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if "choices" in p)
    assert content == "plain chunk dict"


def test_openwebui_models_path(server):
    ids = {m["id"] for m in httpx.get(server.url + "/openwebui/v1/models").json()["data"]}
    assert "fake_async" in ids


@pytest.mark.parametrize(
    ("mode", "plain", "openwebui"), [("never", [], []), ("always", ["status", "status"], ["status", "status"])]
)
def test_events_setting_overrides_detection(upstream, mode, plain, openwebui):
    srv = start_server(upstream, openwebui_events=mode)
    try:
        assert event_types(stream(srv.url + "/v1/chat/completions", MIXED)) == plain
        assert event_types(stream(srv.url + "/openwebui/v1/chat/completions", MIXED)) == openwebui
    finally:
        srv.stop()


def test_think_tags_pass_through_for_open_webui_to_fold(server):
    payloads = stream(
        server.url + "/openwebui/v1/chat/completions", {"model": "fake_async", "messages": USER, "mode": "think"}
    )
    content = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if "choices" in p)
    assert content == "<think>weighing it</think>The answer."


def test_agent_tool_calls_as_a_text_trace_for_plain_clients_when_configured(upstream):
    srv = start_server(upstream, tool_trace="text")
    try:
        body = {
            "model": "fake_async",
            "messages": USER,
            "mode": "agent",
            # Its own scenario: the test wrapper caches an agent per scenario, bound to the loop of the server that
            # made it (test_server_protocol runs the same agent on the session's server).
            "scenario": unique('fake?tool=multiply&args={"a": 6, "b": 7}&tokens=1&text=ok'),
        }
        payloads = stream(srv.url + "/v1/chat/completions", body)
    finally:
        srv.stop()
    content = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads)
    assert content == "\n[multiply(a=6, b=7) → 42]\nresult=42 ok0 "
    assert all("tool_calls" not in p["choices"][0]["delta"] for p in payloads)


@pytest.mark.parametrize("fixture", sorted(TASKS))
def test_background_tasks_get_a_fast_answer_without_running_the_pipeline(server, upstream, fixture):
    scenario = unique()
    body = {**recorded(fixture)["body"], "model": "fake_async", "scenario": scenario}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200
    _, expected = TASKS[fixture]
    assert json.loads(response.json()["choices"][0]["message"]["content"]) == expected
    assert not [r for r in upstream.records if r.model == scenario]  # the wrapper's pipeline never ran


@pytest.mark.parametrize("fixture", sorted(TASKS))
def test_background_tasks_through_a_responses_connection_do_not_run_the_pipeline(server, upstream, fixture):
    # Open WebUI's connection set to the Responses API sends its tasks to {base}/responses, at the same time as the
    # chat turn: each one ran the wrapper's pipeline (an agent, a RAG search) and its prose became the title.
    scenario = unique()
    messages = recorded(fixture)["body"]["messages"]
    body = {"model": "fake_async", "input": messages, "stream": False, "store": False, "scenario": scenario}
    response = httpx.post(server.url + "/openwebui/v1/responses", json=body, timeout=30)
    assert response.status_code == 200, response.text
    _, expected = TASKS[fixture]
    assert json.loads(response.json()["output"][0]["content"][0]["text"]) == expected
    assert not [r for r in upstream.records if r.model == scenario]  # the wrapper's pipeline never ran


@pytest.mark.parametrize(
    ("first", "title"),
    [
        ("Hello there, how do I bake bread?", "How do I bake bread"),  # was "There, how do I bake bread"
        ("hello there", "Hello there"),  # was "There"
        ("Hey all! What is the capital of France?", "What is the capital of France"),
        ("ok so what now", "What now"),
    ],
)
def test_title_task_starts_at_the_question_not_in_the_greeting(server, first, title):
    body = recorded("task_title.json")["body"]
    prompt = body["messages"][-1]["content"]
    start = prompt.index("<chat_history>")
    prompt = prompt[:start] + f"<chat_history>\nUSER: {first}\n</chat_history>"
    body = {**body, "model": "fake_async", "messages": [{"role": "user", "content": prompt}]}
    response = httpx.post(server.url + "/openwebui/v1/chat/completions", json=body, timeout=30)
    assert json.loads(response.json()["choices"][0]["message"]["content"]) == {"title": title}


def test_streamed_task_request_is_answered_as_sse(server, upstream):
    scenario = unique()
    payloads = stream(
        server.url + "/v1/chat/completions",
        {**recorded("task_tags.json")["body"], "model": "fake_async", "scenario": scenario},
    )
    assert json.loads("".join(p["choices"][0]["delta"].get("content", "") for p in payloads)) == {"tags": ["General"]}
    assert not [r for r in upstream.records if r.model == scenario]


def test_task_modes_wrapper_and_pipeline(upstream):
    scenario = unique("fake?tokens=2")
    title = {**recorded("task_title.json")["body"], "model": "fake_async", "scenario": scenario}
    tags = {**recorded("task_tags.json")["body"], "model": "fake_async"}
    by_wrapper = start_server(upstream, openwebui_tasks="wrapper")
    try:
        reply = httpx.post(by_wrapper.url + "/v1/chat/completions", json=title).json()
        assert json.loads(reply["choices"][0]["message"]["content"]) == {"title": "From the wrapper"}
        reply = httpx.post(by_wrapper.url + "/v1/chat/completions", json=tags).json()  # run_task declined
        assert json.loads(reply["choices"][0]["message"]["content"]) == {"tags": ["General"]}
    finally:
        by_wrapper.stop()
    assert not [r for r in upstream.records if r.model == scenario]  # the wrapper answered the title itself
    by_pipeline = start_server(upstream, openwebui_tasks="pipeline")
    try:
        reply = httpx.post(by_pipeline.url + "/v1/chat/completions", json=title).json()
        assert reply["choices"][0]["message"]["content"] == "t0 t1 "
        assert len([r for r in upstream.records if r.model == scenario]) == 1
    finally:
        by_pipeline.stop()


def test_task_detection_leaves_chat_turns_alone():
    for name in ("chat_stream_history.json", "chat_nonstream_history.json", "chat_image_params_usage.json"):
        assert detect_task(recorded(name)["body"]["messages"]) is None
    assert detect_task([{"role": "user", "content": "### Task: but not a template"}]) is None
    emoji = detect_task([{"role": "user", "content": "### Task:\nReply with a relevant emoji for the chat.\n"}])
    assert emoji is not None and heuristic_answer(emoji) == "💬"


def test_a_chat_turn_with_an_attached_json_file_runs_the_pipeline(server, upstream):
    # Open WebUI's RAG template also starts with `### Task:`, and its `### Output:` is prose; the attached file's
    # `{"title": ...}` further on was taken for a title task's output shape: the turn got `{"title": ...}`.
    recorded_body = recorded("chat_rag_json_file.json")["body"]
    assert '{"title": "Quarterly report"' in recorded_body["messages"][-1]["content"]
    assert detect_task(recorded_body["messages"]) is None
    scenario = unique("fake?tokens=2")
    payloads = stream(
        server.url + "/openwebui/v1/chat/completions", {**recorded_body, "model": "fake_async", "scenario": scenario}
    )
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if "choices" in p) == "t0 t1 "
    assert upstream.wait_for_requests(1, model=scenario)[0].body["messages"][-1] == recorded_body["messages"][-1]


def test_tool_blocks_shown_to_open_webui_do_not_reach_the_model_on_the_next_turn(server, upstream):
    # Open WebUI sends an answer back as it showed it: the agent's tool block came back as markup in the history.
    agent = unique('fake?tool=multiply&args={"a": 6, "b": 7}&tokens=1&text=ok')
    first = stream(server.url + "/openwebui/v1/chat/completions", {**MIXED, "mode": "agent", "scenario": agent})
    shown = "".join(p["choices"][0]["delta"].get("content", "") for p in first if "choices" in p)
    assert '<details type="tool_calls"' in shown and shown.rstrip().endswith("result=42 ok0")
    scenario = unique("fake?tokens=1")
    history = [*USER, {"role": "assistant", "content": shown.strip()}, {"role": "user", "content": "And times two?"}]
    stream(
        server.url + "/openwebui/v1/chat/completions",
        {"model": "fake_async", "messages": history, "scenario": scenario},
    )
    sent = upstream.wait_for_requests(1, model=scenario)[0].body["messages"]
    assert [m["content"] for m in sent] == ["hello", "result=42 ok0", "And times two?"]
    # The same history from a connection set to the Responses API: the answer as an `output_text` part.
    scenario = unique("fake?tokens=1")
    answer = {"role": "assistant", "content": [{"type": "output_text", "text": shown.strip()}]}
    body = {"model": "fake_async", "input": [*USER, answer, history[-1]], "store": False, "scenario": scenario}
    assert httpx.post(server.url + "/openwebui/v1/responses", json=body, timeout=30).status_code == 200
    sent = upstream.wait_for_requests(1, model=scenario)[0].body["messages"]
    assert [m["content"] for m in sent] == ["hello", "result=42 ok0", "And times two?"]


def test_event_helpers_shapes():
    assert openwebui.status("Searching", done=True) == {
        "event": {"type": "status", "data": {"description": "Searching", "done": True, "hidden": False}}
    }
    assert openwebui.notification("Saved", level="success")["event"]["data"] == {"type": "success", "content": "Saved"}
    doc = Document(content="x" * 900, meta={"name": "guide.md", "url": "https://example.org/guide"}, score=0.5)
    data = openwebui.source(doc)["event"]["data"]
    assert data["source"] == {"name": "guide.md", "url": "https://example.org/guide"}
    assert len(data["document"][0]) == 500 and data["metadata"][0]["score"] == 0.5
    block = openwebui.details("Why", "Because <reasons>", type="reasoning", done="true")
    assert block.startswith('\n<details type="reasoning" done="true">\n<summary>Why</summary>')
    assert "Because <reasons>" in block and block.endswith("</details>\n")


def test_sync_wrappers_yield_events_next_to_chunks(server):
    body = {"model": "fake_sync", "messages": USER, "mode": "events", "scenario": "fake?tokens=2"}
    payloads = stream(server.url + "/openwebui/v1/chat/completions", body)
    assert [p["event"]["type"] for p in payloads if "event" in p] == ["status", "source", "status"]
    assert [p["event"]["data"].get("description") for p in payloads if "event" in p] == ["Thinking…", None, "Done"]
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if "choices" in p) == "t0 t1 "


def test_rag_context_from_open_webui_reaches_the_wrapper_unchanged(server, upstream):
    scenario = unique()
    recorded_body = recorded("chat_stream_history.json")["body"]
    context = '<source id="1" name="flan.md">Agar sets in 2 hours at room temperature.</source>'
    system = {"role": "system", "content": f"Use the context below.\n<context>\n{context}\n</context>"}
    body = {
        **recorded_body,
        "model": "fake_async",
        "messages": [system, *recorded_body["messages"]],
        "scenario": scenario,
    }
    payloads = stream(server.url + "/openwebui/v1/chat/completions", body)
    assert payloads[-1]["choices"][0]["finish_reason"] == "stop"
    sent = upstream.wait_for_requests(1, model=scenario)[0].body["messages"]
    assert sent[0] == system and [m["role"] for m in sent] == [m["role"] for m in body["messages"]]


# On a connection set to the Responses API ----------------------------------------------------------------------------

# Open WebUI 0.12.4 reads a `data: {"event": ...}` line of a Responses stream as it does on chat completions: its
# stream handler (utils/middleware.py, `stream_body_handler`) emits a line's `event` before it looks at its `type`.
WITH_EVENTS = {"model": "fake_sync", "input": "hello", "stream": True, "mode": "events", "scenario": "fake?tokens=2"}
SHOWN = ["status", "source", "status"]


@pytest.mark.parametrize(
    ("path", "headers", "expected"),
    [
        ("/v1/responses", {}, []),
        ("/openwebui/v1/responses", {}, SHOWN),
        ("/v1/responses", {"X-OpenWebUI-Chat-Id": "c1", "X-OpenWebUI-User-Id": "u1"}, SHOWN),
        ("/v1/responses", {"X-Haystream-Events": "true"}, SHOWN),
    ],
)
def test_event_lines_on_a_responses_stream_reach_only_clients_that_render_them(server, path, headers, expected):
    response = httpx.post(server.url + path, json=WITH_EVENTS, headers=headers, timeout=30)
    assert response.status_code == 200
    pairs = sse(response.text)
    lines = [data for name, data in pairs if not name]  # no `event:` name: not a Responses event
    assert [list(line) for line in lines] == [["event"]] * len(expected)  # the chat-completions line, as it is
    assert [line["event"]["type"] for line in lines] == expected
    events = [data for name, data in pairs if name]
    assert all(name == data["type"] for name, data in pairs if name)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))  # as without the lines
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "t0 t1 "
    if expected:  # each line where the wrapper yielded it: the status before the answer, the citation after it
        kinds = [name or data["event"]["type"] for name, data in pairs]
        assert kinds.index("status") == kinds.index("response.in_progress") + 1
        assert kinds.index("response.output_text.delta") < kinds.index("source")
        assert kinds.index("source") < kinds.index("response.output_text.done")
        assert lines[1]["event"]["data"]["source"] == {"name": "flan.md"}


def test_the_openai_sdk_parses_every_responses_event_of_a_wrapper_that_yields_event_lines(client):
    stream = client.responses.create(
        model="fake_sync", input="hello", stream=True, extra_body={"mode": "events", "scenario": "fake?tokens=2"}
    )
    events = list(stream)
    assert all(event.type.startswith("response.") for event in events)
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[-1].type == "response.completed" and events[-1].response.output_text == "t0 t1 "
    with client.responses.stream(
        model="fake_sync", input="hello", extra_body={"mode": "events", "scenario": "fake?tokens=2"}
    ) as helper:
        assert helper.get_final_response().output_text == "t0 t1 "


def test_a_status_line_on_a_responses_stream_shows_before_the_answer_starts(server, upstream):
    # A retriever searching, an agent's tool running: the line says so while the upstream has sent nothing yet.
    scenario = unique("fake?tokens=2&hold_after=0")
    body = {**WITH_EVENTS, "scenario": scenario}
    with httpx.stream("POST", server.url + "/openwebui/v1/responses", json=body, timeout=30) as response:
        lines = response.iter_lines()
        first: list[str] = []
        for line in lines:
            if line.startswith(("data: ", ":")):  # a ping (`: ping`) here would mean the line was held back
                first.append(line)
                if len(first) == 3:
                    break
        record = upstream.wait_for_requests(1, model=scenario)[0]
        assert record.tokens_sent == 0
        assert [json.loads(line[len("data: ") :])["type"] for line in first[:2]] == [
            "response.created",
            "response.in_progress",
        ]
        assert json.loads(first[2][len("data: ") :])["event"]["data"]["description"] == "Thinking…"
        record.release()
        rest = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
    assert rest[-1]["type"] == "response.completed"


def test_a_resumed_responses_stream_has_no_event_lines(server):
    # The lines are for the client that made the response; a resume may come from any client (an OpenAI SDK).
    created = sse(httpx.post(server.url + "/openwebui/v1/responses", json={**WITH_EVENTS, "background": True}).text)
    assert [data["event"]["type"] for name, data in created if not name] == SHOWN
    response_id = created[0][1]["response"]["id"]
    resumed = sse(httpx.get(f"{server.url}/v1/responses/{response_id}", params={"stream": "true"}, timeout=30).text)
    assert resumed == [(name, data) for name, data in created if name]


def test_run_response_wrappers_get_open_webuis_input_items_without_tool_blocks(server):
    # Open WebUI sends an answer back as it showed it: on a Responses connection, as an `output_text` part.
    block = openwebui.tool_call_block("call_1", "multiply", {"a": 6, "b": 7}, "42")
    answer = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": block + "42."}]}
    items = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "6*7?"}]},
        answer,
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And times two?"}]},
    ]
    body = {"model": "responses_items", "input": items, "store": False}
    response = httpx.post(server.url + "/openwebui/v1/responses", json=body, timeout=30)
    seen = json.loads(response.json()["output"][0]["content"][0]["text"])
    assert seen == [items[0], {**answer, "content": [{"type": "output_text", "text": "42."}]}, items[2]]
    # Any other client's items reach the wrapper as they were sent.
    response = httpx.post(server.url + "/v1/responses", json=body, timeout=30)
    assert json.loads(response.json()["output"][0]["content"][0]["text"]) == items
