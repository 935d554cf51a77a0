"""Every error path answers with the OpenAI envelope and the right status; auth and deploy lock-down."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

import httpx
import openai
import pytest

from haystream.openai.request import MAX_JSON_DEPTH
from support import serving, start_server, unique

JSON = {"content-type": "application/json"}

USER = [{"role": "user", "content": "hello"}]
FIXTURES = Path(__file__).parent / "fixtures" / "openwebui"


def assert_envelope(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_unknown_model_is_404(http, client):
    assert_envelope(http.post("/v1/chat/completions", json={"model": "nope", "messages": USER}), 404, "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/responses"])
def test_an_unknown_models_long_name_is_cut_in_the_404(http, route):
    name = "m" * 1_000_000  # a client's, up to the body's size (a path's is capped by its route)
    error = assert_envelope(http.post(route, json={"model": name, "messages": USER, "input": "hi"}), 404)
    assert error["code"] == "model_not_found"
    assert len(error["message"]) < 300 and error["message"].startswith("The model 'mmm")


def test_wrapper_without_chat_method_is_404(http):
    error = assert_envelope(http.post("/v1/chat/completions", json={"model": "api_only", "messages": USER}), 404)
    assert "does not implement chat completions" in error["message"]


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "fake_async"}', "messages"),
        (b'{"model": "fake_async", "messages": []}', "messages"),
        (b'{"model": "fake_async", "messages": [{"content": "x"}]}', "messages.0.role"),
        (b'{"model": "fake_async", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
        # The field the client sent, not a member of its union type ("messages.0.content.str").
        (b'{"model": "fake_async", "messages": [{"role": "user", "content": 5}]}', "messages.0.content"),
        (b'{"model": "fake_async", "messages": [{"role": "user", "content": ["hi"]}]}', "messages.0.content"),
        (b'{"model": "fake_async", "messages": [{"role": "user", "content": "x"}], "user": 5}', "user"),
        # Wrappers get the body as sent: a string or a boolean where OpenAI takes a number is refused, not passed on.
        (
            b'{"model": "fake_async", "messages": [{"role": "user", "content": "x"}], "temperature": "0.5"}',
            "temperature",
        ),
        (b'{"model": "fake_async", "messages": [{"role": "user", "content": "x"}], "n": true}', "n"),
        (
            b'{"model": "fake_async", "messages": [{"role": "user", "content": "x"}], "stream": true,'
            b' "stream_options": {"include_usage": "yes"}}',
            "stream_options.include_usage",
        ),
        (
            b'{"model": "fake_async", "messages": [{"role": "user", "content": "x"}, {"role": "assistant",'
            b' "tool_calls": [{"id": "c1", "type": "function", "function": "f"}]}]}',
            "messages.1",
        ),
        # Shapes OpenAI refuses and Haystack's conversions fail on (wrappers got them, and answered 500).
        (
            b'{"model": "fake_async", "messages": [{"role": "user", "content": [{"type": "image_url",'
            b' "image_url": "https://example.com/cat.png"}]}]}',
            "messages.0.content",
        ),
        (
            b'{"model": "fake_async", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}',
            "tools",
        ),
        (
            b'{"model": "fake_async", "messages": [{"role": "user", "content": "x"}], "tools": {"type": "function"}}',
            "tools",
        ),
        (
            b'{"model": "fake_async", "messages": [{"role": "user", "content": "x"}], "parallel_tool_calls": "yes"}',
            "parallel_tool_calls",
        ),
        (b'{"model": "fake_async", "messages": [{"role": "user", "content": "x"}], "stop": [1, 2]}', "stop"),
        # The ids that pair a tool result with its call, which OpenAI requires (an OpenAI generator failed the run).
        (b'{"model": "fake_async", "messages": [{"role": "tool", "content": "42"}]}', "messages.0"),
        (
            b'{"model": "fake_async", "messages": [{"role": "user", "content": "x"}, {"role": "assistant",'
            b' "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}',
            "messages.1",
        ),
    ],
)
def test_malformed_and_invalid_bodies_are_400(http, content, param):
    response = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert assert_envelope(response, 400)["param"] == param


def test_content_parts_with_a_text_that_is_not_a_string_are_answered(http):
    # Open WebUI's task detection reads the last message's text parts; other parts' `text` is not its business.
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}, "text": None}
    user = [{"role": "user", "content": [image]}]
    body = {"model": "fake_async", "messages": user, "scenario": unique("fake?tokens=1")}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "t0 "


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_bodies_that_are_not_plain_json_say_so_and_keep_the_connection(server, path):
    """A compressed body, a form or an empty body gets a status and message naming the problem (it got "Malformed
    JSON body: str is not valid UTF-8"); the refused body is consumed, so the kept-alive connection serves the next
    request."""
    body = {"model": "fake_async", "messages": USER, "input": "hi", "scenario": unique("fake?tokens=1")}
    raw = json.dumps(body).encode()
    refused = [
        ({"content-type": "application/json", "content-encoding": "gzip"}, gzip.compress(raw), 415, "encoding"),
        ({"content-type": "application/x-www-form-urlencoded"}, b"model=fake_async&input=hi", 415, "Content-Type"),
        ({"content-type": "multipart/form-data; boundary=x"}, b"--x\r\n\r\nhi\r\n--x--", 415, "Content-Type"),
        ({"content-type": "application/json"}, b"", 400, "empty"),
        ({"content-type": "application/json"}, b"  \n", 400, "empty"),
    ]
    ports = set()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for headers, content, status, words in refused:
            response = http.post(path, content=content, headers=headers)
            error = assert_envelope(response, status)
            assert words.lower() in error["message"].lower()
            ports.add(response.extensions["network_stream"].get_extra_info("client_addr")[1])
        # curl -d labels JSON a form: still served, on the same connection as the refusals.
        response = http.post(path, content=raw, headers={"content-type": "application/x-www-form-urlencoded"})
        assert response.status_code == 200, response.text
        ports.add(response.extensions["network_stream"].get_extra_info("client_addr")[1])
    assert len(ports) == 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_a_utf8_body_with_a_byte_order_mark_is_served(http, path, content_type):
    # RFC 8259 lets a parser ignore a UTF-8 BOM; PowerShell and .NET clients send one. It was "Malformed JSON".
    body = {"model": "fake_async", "messages": USER, "input": "hello", "scenario": unique("fake?tokens=1")}
    response = http.post(
        path, content=b"\xef\xbb\xbf" + json.dumps(body).encode(), headers={"content-type": content_type}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    if path == "/v1/responses":
        assert answer["output"][-1]["content"][0]["text"] == "t0 "
    else:
        assert answer["choices"][0]["message"]["content"] == "t0 "


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
def test_a_utf16_or_utf32_body_is_a_400_that_asks_for_utf8(http, path, encoding):
    body = json.dumps({"model": "fake_async", "messages": USER, "input": "hello"})
    response = http.post(path, content=body.encode(encoding), headers={"content-type": "application/json"})
    error = assert_envelope(response, 400, "invalid_json")
    assert "must be JSON encoded as UTF-8" in error["message"]


def test_body_over_the_limit_is_413(upstream):
    small = start_server(upstream, max_body_bytes=2048)
    try:
        big = {"model": "fake_async", "messages": [{"role": "user", "content": "x" * 5000}]}
        assert_envelope(httpx.post(small.url + "/v1/chat/completions", json=big), 413, "body_too_large")
    finally:
        small.stop()


def test_wrapper_exception_is_500_without_traceback(http):
    body = {"model": "fake_sync", "messages": USER, "mode": "fail_early"}
    error = assert_envelope(http.post("/v1/chat/completions", json=body), 500, "pipeline_error")
    assert "ValueError: the wrapper refused this request" in error["message"]
    assert "request id" in error["message"]


@pytest.mark.parametrize("generator", ["haystack", "haystream"])
def test_an_upstream_refusal_is_a_500_the_sdk_does_not_retry(server, upstream, generator):
    # Each retry would run the pipeline again, and the upstream would refuse it again: the SDK retries a 500 twice
    # unless the answer says `x-should-retry: false`.
    scenario = unique("fake?status=400")
    with (
        openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=2) as sdk,
        pytest.raises(openai.InternalServerError) as caught,
    ):
        sdk.chat.completions.create(
            model="fake_async", messages=USER, extra_body={"scenario": scenario, "generator": generator}
        )
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len([record for record in upstream.records if record.model == scenario]) == 1


def test_a_failure_that_may_pass_leaves_retrying_to_the_client(http):
    body = {"model": "fake_async", "messages": USER, "scenario": unique("fake?status=503")}
    response = http.post("/v1/chat/completions", json=body)
    assert_envelope(response, 503, "pipeline_error")
    assert "x-should-retry" not in response.headers


def test_request_id_is_echoed_only_when_it_is_a_plain_token(http):
    body = {"model": "fake_sync", "messages": USER, "mode": "fail_early"}
    plain = http.post("/v1/chat/completions", json=body, headers={"X-Request-ID": "abc-123"})
    assert plain.headers["x-request-id"] == "abc-123" and "abc-123" in plain.json()["error"]["message"]
    odd = http.post("/v1/chat/completions", json=body, headers={"X-Request-ID": "a b<script>"})
    assert odd.headers["x-request-id"] != "a b<script>" and "<script>" not in odd.text


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("HEAD", "/v1/chat/completions", "POST"),
        ("OPTIONS", "/v1/chat/completions", "POST"),  # a preflight when CORS is off
        ("POST", "/v1/models", "GET, HEAD"),
        ("DELETE", "/v1/models", "GET, HEAD"),
        ("GET", "/v1/responses", "POST"),
        ("PUT", "/v1/responses/resp_x", "GET, HEAD, DELETE"),
        ("GET", "/v1/responses/resp_x/cancel", "POST"),
        ("POST", "/metrics", "GET, HEAD"),
        ("POST", "/health", "GET, HEAD"),
    ],
)
def test_wrong_method_is_405_with_allow(http, method, path, allow):
    # A 405 must say which methods the route takes (RFC 9110 15.5.6); hayhooks' own 405s do.
    response = http.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    if method != "HEAD":
        assert_envelope(response, 405)


def test_open_webui_requests_are_accepted(http):
    for name in ("chat_stream_history.json", "chat_image_params_usage.json", "chat_nonstream_history.json"):
        recorded = json.loads((FIXTURES / name).read_text())
        body = {**recorded["body"], "model": "fake_async", "scenario": "fake?tokens=2"}
        body["user"] = {"id": "u1", "name": "Ada", "role": "admin"}  # Open WebUI sends an object for pipelines
        response = http.post("/v1/chat/completions", json=body, headers={"X-OpenWebUI-Chat-Id": "c1"})
        assert response.status_code == 200, (name, response.text)
        if body.get("stream"):
            assert response.text.endswith("data: [DONE]\n\n")
        else:
            assert response.json()["choices"][0]["message"]["content"] == "t0 t1 "


# --- auth ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked(upstream):
    server = start_server(upstream, api_keys="k-one, k-two", enable_deploy=True)
    yield server
    server.stop()


def test_api_keys_guard_chat_and_models(locked):
    chat = {"model": "fake_async", "messages": USER, "scenario": "fake?tokens=1"}
    assert_envelope(httpx.get(locked.url + "/v1/models"), 401, "invalid_api_key")
    assert_envelope(httpx.post(locked.url + "/v1/chat/completions", json=chat), 401)
    wrong = {"Authorization": "Bearer k-three"}
    assert_envelope(httpx.post(locked.url + "/v1/chat/completions", json=chat, headers=wrong), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=locked.url + "/v1", api_key="bad", max_retries=0).models.list()
    sdk = openai.OpenAI(base_url=locked.url + "/v1", api_key="k-two", max_retries=0)
    assert "fake_async" in {m.id for m in sdk.models.list()}
    assert sdk.chat.completions.create(model="fake_async", messages=USER, extra_body=chat).choices[0].message.content
    # hayhooks' own routes (status) work with a key, and only with one
    assert_envelope(httpx.get(locked.url + "/status"), 401, "invalid_api_key")
    assert httpx.get(locked.url + "/status", headers={"Authorization": "Bearer k-one"}).status_code == 200


def test_deploy_routes_are_disabled_by_default(http):
    files = {"pipeline_wrapper.py": "print('owned')"}
    assert_envelope(http.post("/deploy_files", json={"name": "x", "files": files}), 403, "deploy_disabled")
    assert_envelope(http.post("/undeploy/fake_async"), 403, "deploy_disabled")


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"name": "evil", "files": {"../escape.py": "x"}}, "files"),
        ({"name": "evil", "files": {"/etc/cron.d/x": "x"}}, "files"),
        ({"name": "evil", "files": {"a/../../b.py": "x"}}, "files"),
        ({"name": "../evil", "files": {"pipeline_wrapper.py": "x"}}, "name"),
        ({"name": "evil name", "files": {"pipeline_wrapper.py": "x"}}, "name"),
    ],
)
def test_deploy_rejects_unsafe_names_before_writing(locked, tmp_path, payload, param):
    response = httpx.post(locked.url + "/deploy_files", json=payload, headers={"Authorization": "Bearer k-one"})
    assert assert_envelope(response, 400)["param"] == param


def test_deploy_needs_a_key_and_accepts_basic_auth_from_netrc(locked):
    payload = {"name": "evil", "files": {"../escape.py": "x"}}
    assert_envelope(httpx.post(locked.url + "/deploy_files", json=payload), 401)
    basic = "Basic " + base64.b64encode(b"anyone:k-one").decode()
    assert_envelope(httpx.post(locked.url + "/deploy_files", json=payload, headers={"Authorization": basic}), 400)


@pytest.mark.parametrize(("model", "mode"), [("fake_async", "astream"), ("fake_sync", "stream")])
def test_failure_after_the_role_chunk_is_still_a_typed_status_error(client, model, mode):
    # The upstream sends its role chunk (an empty StreamingChunk for Haystack), then fails: nothing visible has
    # been produced yet, so the client still gets a real status and the envelope, not an error frame mid-stream.
    with pytest.raises(openai.InternalServerError, match="upstream failed after 0 tokens") as raised:
        client.chat.completions.create(
            model=model, messages=USER, stream=True, extra_body={"mode": mode, "scenario": "fake?fail_after=0"}
        )
    assert set(raised.value.body) == {"message", "type", "param", "code"}


def test_events_a_plain_client_does_not_get_do_not_commit_the_headers(client):
    with pytest.raises(openai.RateLimitError, match="rate limiting"):
        client.chat.completions.create(
            model="fake_async", messages=USER, stream=True, extra_body={"mode": "role_then_rate_limit"}
        )


def test_events_an_openwebui_client_gets_commit_the_headers(server):
    body = {"model": "fake_async", "messages": USER, "stream": True, "mode": "role_then_rate_limit"}
    headers = {"x-haystream-events": "true"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[1]) == {"event": {"type": "status", "data": {"description": "working", "done": False}}}
    assert "rate limiting" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"


def test_a_path_or_method_nothing_serves_gets_the_openai_envelope(http, client):
    # hayhooks (FastAPI) answered these with `{"detail": "Not Found"}`, which OpenAI clients do not parse.
    error = assert_envelope(http.post("/v1/completions", json={"model": "fake_async", "prompt": "hi"}), 404)
    assert error["message"] == "Invalid URL (POST /v1/completions)"
    assert http.get("/nope/run").json()["detail"] == "Invalid URL (GET /nope/run)"  # what hayhooks' CLI shows
    with pytest.raises(openai.NotFoundError, match=r"Invalid URL \(POST /v1/embeddings\)"):
        client.embeddings.create(model="fake_async", input="hi")
    wrong_method = http.delete("/status")  # hayhooks routes GET only
    assert wrong_method.headers["allow"] == "GET"  # FastAPI's other headers are kept
    assert "DELETE" in assert_envelope(wrong_method, 405)["message"]
    # hayhooks' own answers pass as they are; its own refusals keep what they said and gain the envelope.
    assert http.get("/status").json()["status"] == "Up!"
    missing = http.get("/status/no_such_pipeline")
    assert (
        assert_envelope(missing, 404)["message"] == missing.json()["detail"] == "Pipeline 'no_such_pipeline' not found"
    )


def test_an_unforeseen_fault_is_a_500_envelope_and_logged(http, monkeypatch):
    import logging

    from haystream.server.app import HaystreamApp

    async def broken(self, scope, send):
        raise KeyError("a bug")

    class Kept(logging.Handler):
        records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    # On the server's own logger: once a server has set up its log output, that logger does not propagate.
    kept = Kept(logging.ERROR)
    logging.getLogger("haystream.server").addHandler(kept)
    monkeypatch.setattr(HaystreamApp, "_models", broken)
    try:
        error = assert_envelope(http.get("/v1/models"), 500, "internal_error")
    finally:
        logging.getLogger("haystream.server").removeHandler(kept)
    assert error["type"] == "server_error" and "bug" not in error["message"]  # the details stay in the log
    assert any(record.exc_info and "a bug" in str(record.exc_info[1]) for record in kept.records)
    monkeypatch.undo()
    assert http.get("/v1/models").status_code == 200


def test_more_messages_than_the_cap_are_refused_before_validation(http, client):
    # Validating and converting costs ~14 µs a message on the event loop, and a 4 MiB body holds ~100k of them:
    # 40,000 held every other request for 4-10 s. The cap (HAYSTREAM_MAX_MESSAGES, 2048 like OpenAI's) is checked
    # right after the JSON is read.
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 1024
    assert len(history) == 2048
    answer = client.chat.completions.create(model="fake_async", messages=history, extra_body={"mode": "string"})
    assert answer.choices[0].message.content == "a plain string answer"
    too_many = http.post("/v1/chat/completions", json={"model": "fake_async", "messages": [*history, *USER]})
    error = assert_envelope(too_many, 400, "array_above_max_length")
    assert error["param"] == "messages" and "2049" in error["message"] and "2048" in error["message"]
    items = [{"role": "user", "content": "hi"}] * 2049
    error = assert_envelope(http.post("/v1/responses", json={"model": "fake_async", "input": items}), 400)
    assert (error["param"], error["code"]) == ("input", "array_above_max_length")


def test_the_message_cap_is_the_operators(upstream):
    with serving(upstream, max_messages=2) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        three = {"model": "fake_async", "mode": "string", "messages": USER * 3}
        assert_envelope(http.post("/v1/chat/completions", json=three), 400, "array_above_max_length")
        two = {**three, "messages": USER * 2}
        assert http.post("/v1/chat/completions", json=two).status_code == 200


def test_content_parts_are_capped_in_all_messages_together(upstream):
    # 40,000 one-word parts fit in a 4 MiB body; through a Haystack Pipeline they held the event loop for ~4 s.
    def parts(n: int) -> list[dict]:
        return [{"type": "text", "text": "w"}] * n

    with serving(upstream, max_content_parts=4) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        three_and_two = [{"role": "user", "content": parts(3)}, {"role": "user", "content": parts(2)}]
        chat = {"model": "fake_async", "mode": "string", "messages": three_and_two}
        error = assert_envelope(http.post("/v1/chat/completions", json=chat), 400, "array_above_max_length")
        assert error["param"] == "messages" and "at most 4" in error["message"] and "got 5" in error["message"]
        responses = {"model": "fake_async", "mode": "string", "input": three_and_two}
        error = assert_envelope(http.post("/v1/responses", json=responses), 400, "array_above_max_length")
        assert error["param"] == "input"
        two_and_two = [{"role": "user", "content": parts(2)}, {"role": "user", "content": parts(2)}]
        assert http.post("/v1/chat/completions", json={**chat, "messages": two_and_two}).status_code == 200
        assert http.post("/v1/responses", json={**responses, "input": two_and_two}).status_code == 200


def test_an_assistants_tool_calls_count_against_the_content_parts_cap(upstream):
    # Each tool call is converted on its way to the model like a part: 40,000 calls in one assistant message (3 MB)
    # held the event loop 3.4 s, uncounted by either cap.
    def turn(calls: int, parts: int = 0) -> list[dict]:
        asked = [{"role": "user", "content": [{"type": "text", "text": "w"}] * parts or "w"}]
        ids = [f"call_{n}" for n in range(calls)]
        call = [{"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in ids]
        return [
            *asked,
            {"role": "assistant", "tool_calls": call},
            *({"role": "tool", "tool_call_id": i, "content": "r"} for i in ids),
        ]

    with serving(upstream, max_content_parts=4) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        for calls, parts in ((5, 0), (3, 2)):
            chat = {"model": "fake_async", "mode": "string", "messages": turn(calls, parts)}
            error = assert_envelope(http.post("/v1/chat/completions", json=chat), 400, "array_above_max_length")
            assert error["param"] == "messages" and "at most 4" in error["message"] and "got 5" in error["message"]
            assert "tool calls" in error["message"]
        fits = {"model": "fake_async", "mode": "string", "messages": turn(2, 2)}
        assert http.post("/v1/chat/completions", json=fits).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_arguments_nested_too_deep_are_a_400_not_a_500(http, upstream, stream):
    # Haystack parses an assistant's tool call arguments (a JSON string) with Python's json: 1,200 levels raised
    # RecursionError (a 500 on chat and Responses); from ~500 a Pipeline's deep copy of its inputs raises it instead.
    def chat(depth: int) -> httpx.Response:
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[" * depth + "]" * depth}}
        messages = [
            *USER,
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c", "content": "r"},
        ]
        body = {"model": "fake_async", "scenario": unique(), "stream": stream, "messages": messages}
        return http.post("/v1/chat/completions", json=body)

    for depth in (MAX_JSON_DEPTH + 1, 600, 1200, 100_000):
        error = assert_envelope(chat(depth), 400, "invalid_json")
        assert error["param"] == "messages.1" and f"more than {MAX_JSON_DEPTH} levels" in error["message"], error
    assert chat(MAX_JSON_DEPTH).status_code == 200
    call = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "[" * 1200 + "]" * 1200}
    items = [call, {"type": "function_call_output", "call_id": "c", "output": "r"}]
    responses = {"model": "fake_async", "mode": "string", "stream": stream, "input": items}
    assert_envelope(http.post("/v1/responses", json=responses), 400, "invalid_json")


def test_the_caps_hold_for_a_conversation_chained_by_previous_response_id(upstream):
    # Each request's own input was capped, but previous_response_id adds the stored conversation to it: 20 chained
    # requests of 2,000 items each made a 40,000-message conversation that held the event loop for 15 s.
    def parts(n: int) -> list[dict]:  # images: text parts are joined into one string on the way
        return [{"type": "input_image", "image_url": "data:image/png;base64,AA=="}] * n

    with (
        serving(upstream, max_messages=3, max_content_parts=4) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):

        def create(input, previous=None):
            body = {"model": "fake_async", "mode": "string", "input": input}
            return http.post("/v1/responses", json={**body, "previous_response_id": previous} if previous else body)

        first = create("hi")  # a conversation of 2 messages with the answer
        second = create("more", first.json()["id"])  # 3: at the cap
        assert second.status_code == 200, second.text
        error = assert_envelope(create("again", second.json()["id"]), 400, "array_above_max_length")  # 5
        assert error["param"] == "previous_response_id" and "maximum length 3" in error["message"]
        assert "got an array with length 5" in error["message"] and "conversation" in error["message"]
        three_parts = create([{"role": "user", "content": parts(3)}])
        assert three_parts.status_code == 200, three_parts.text
        error = assert_envelope(create([{"role": "user", "content": parts(2)}], three_parts.json()["id"]), 400)
        assert error["param"] == "previous_response_id" and "got 5" in error["message"]
        assert create([{"role": "user", "content": parts(1)}], three_parts.json()["id"]).status_code == 200


def test_a_chained_conversation_is_bounded_by_the_body_size_too(upstream):
    # A chat client sends its whole history in one body, within HAYSTREAM_MAX_BODY_BYTES; a previous_response_id
    # chain grew by a body's size a request, with no bound, each stored record holding all of it.
    with serving(upstream, max_body_bytes=2048) as server, httpx.Client(base_url=server.url, timeout=30) as http:

        def create(text: str, previous: str | None = None) -> httpx.Response:
            body = {"model": "fake_async", "mode": "string", "input": text, "previous_response_id": previous}
            return http.post("/v1/responses", json=body)

        first = create("x" * 1200)
        assert create("y" * 100, first.json()["id"]).status_code == 200
        error = assert_envelope(create("y" * 900, first.json()["id"]), 400, "conversation_too_large")
        assert error["param"] == "previous_response_id" and "at most 2048" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_body_nested_deeper_than_the_server_can_write_back_is_a_400(http, stream):
    # orjson reads 1,024 levels but writes 254: a Responses request's tool schema (or text.format schema) nested 254
    # levels deep was read, then failed every write of the response that holds it: a 500.
    def schema(depth: int) -> bytes:
        return b'{"a":' * depth + b"1" + b"}" * depth

    def responses(depth: int) -> httpx.Response:
        tool = b'{"type":"function","name":"f","parameters":%s}' % schema(
            depth - 3
        )  # the body, `tools` and the tool above it
        body = b'{"model":"fake_async","mode":"string","input":"hi","stream":%s,"tools":[%s]}' % (
            b"true" if stream else b"false",
            tool,
        )
        return http.post("/v1/responses", content=body, headers={"content-type": "application/json"})

    error = assert_envelope(responses(MAX_JSON_DEPTH + 1), 400, "invalid_json")
    assert f"more than {MAX_JSON_DEPTH} levels" in error["message"]
    assert responses(MAX_JSON_DEPTH).status_code == 200
    chat = b'{"model":"fake_async","mode":"string","messages":[{"role":"user","content":"hi"}],"metadata":%s}'
    too_deep = http.post("/v1/chat/completions", content=chat % schema(MAX_JSON_DEPTH), headers=JSON)
    assert_envelope(too_deep, 400, "invalid_json")
    assert http.post("/v1/chat/completions", content=chat % schema(MAX_JSON_DEPTH - 1), headers=JSON).status_code == 200


@pytest.mark.parametrize("path", ["/api_only/run", "/api_only/run/"])
def test_an_unpaired_surrogate_on_a_run_route_is_a_400_not_a_500(http, path):
    # hayhooks' JSON parser took "\ud800" into a str that no encoder accepts: echoing it back (or sending it
    # upstream) failed with a plain-text 500 and a traceback. The OpenAI routes already refused it with a 400.
    headers = {"content-type": "application/json"}
    lone = http.post(path, content=b'{"text": "a\\ud800"}', headers=headers)
    assert_envelope(lone, 400, "invalid_json")
    # A pair written as escapes, and an escaped backslash before "ud800", are text: hayhooks still answers them.
    paired = http.post("/api_only/run", content=b'{"text": "\\ud83d\\ude00 \\\\ud800"}', headers=headers)
    assert paired.status_code == 200 and paired.json()["result"] == "\U0001f600 \\UD800"


@pytest.mark.parametrize(
    "value", [b"NaN", b"-Infinity", b"Infinity", b"1e999", b"-1E+400", b"1" * 400 + b".5", b'["x", NaN]']
)
def test_nan_infinity_and_out_of_range_numbers_on_a_run_route_are_a_400_not_a_500(http, value):
    # Not JSON (RFC 8259), but hayhooks' parser (Python's json) takes them, as float nan and inf; its validation error
    # then failed to echo the value back ("Out of range float values are not JSON compliant"): a 500.
    answered = http.post("/api_only/run", content=b'{"text": %s}' % value, headers=JSON)
    assert "not JSON" in assert_envelope(answered, 400, "invalid_json")["message"]
    # Numbers in range, and the words inside strings, pass as before.
    for fine in (b'"NaN and Infinity"', b'"1e999"'):
        assert http.post("/api_only/run", content=b'{"text": %s}' % fine, headers=JSON).status_code == 200
    assert_envelope(http.post("/api_only/run", content=b'{"text": 1e300}', headers=JSON), 422)  # not a string


@pytest.mark.parametrize(
    "body",
    [
        b'{"text": "a\xed\xa0\x80"}',  # the surrogate as UTF-8 bytes (CESU-8), which Python's json takes
        '{"text": "a\\ud800"}'.encode("utf-16-le"),  # the escape in a UTF-16 body, which Python's json detects
        '{"text": "a"}'.encode("utf-16-le")[:-4] + b"\x00\xd8" + '"}'.encode("utf-16-le"),  # a raw one in UTF-16
        '{"text": "a\\udc00"}'.encode("utf-32-le"),
    ],
    ids=["utf8-bytes", "utf16-escape", "utf16-raw", "utf32-escape"],
)
def test_an_unpaired_surrogate_not_written_as_a_utf8_escape_is_a_400_too(http, body):
    # The check looked for the escape in UTF-8 text only; hayhooks' parser (Python's json) also reads UTF-16 and
    # UTF-32 bodies and surrogates encoded as bytes: each was a 500.
    lone = http.post("/api_only/run", content=body, headers={"content-type": "application/json"})
    assert_envelope(lone, 400, "invalid_json")
    text = http.post(
        "/api_only/run", content='{"text": "é"}'.encode("utf-16"), headers={"content-type": "application/json"}
    )
    assert text.status_code == 200 and text.json()["result"] == "É"  # a UTF-16 body of text still passes
