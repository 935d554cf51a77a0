"""The first hour of a new user: what the CLI, the server and the local model show when things go wrong or odd."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from support import start_server

ENV = {**os.environ, "HAYSTACK_TELEMETRY_ENABLED": "False", "COLUMNS": "200"}


def haystream(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "haystream", *args], env=ENV, capture_output=True, text=True, timeout=120, **kwargs
    )


class ScriptedServer:
    """A loopback HTTP server that answers every request with `respond(socket)`: for clients facing a broken or
    unusual server (the connection dropped mid-answer, a cut finish reason)."""

    def __init__(self, respond: Callable[[socket.socket], None]) -> None:
        self._respond = respond
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with connection:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += connection.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                while len(body) < length:
                    body += connection.recv(65536)
                self._respond(connection)

    def close(self) -> None:
        self._listener.close()


def sse_head(connection: socket.socket) -> None:
    connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")


def sse_event(connection: socket.socket, payload: dict) -> None:
    frame = b"data: " + orjson.dumps(payload) + b"\n\n"
    connection.sendall(f"{len(frame):x}\r\n".encode() + frame + b"\r\n")


def delta(content: str | None = None, finish_reason: str | None = None) -> dict:
    body = {} if content is None else {"content": content}
    return {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": body, "finish_reason": finish_reason}]}  # fmt: skip


def test_a_server_dying_mid_answer_is_one_line_not_a_traceback():
    def respond(connection: socket.socket) -> None:
        sse_head(connection)
        sse_event(connection, delta("partial "))
        connection.shutdown(socket.SHUT_RDWR)  # the server process died

    server = ScriptedServer(respond)
    try:
        result = haystream("chat", "m", "hi", "--url", server.url)
    finally:
        server.close()
    assert result.returncode == 1
    assert "partial" in result.stdout
    assert "connection to haystream" in result.stderr and "was lost" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) <= 3


def test_a_length_cut_is_shown():
    def respond(connection: socket.socket) -> None:
        sse_head(connection)
        sse_event(connection, delta("a long answ"))
        sse_event(connection, delta(finish_reason="length"))
        connection.sendall(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")

    server = ScriptedServer(respond)
    try:
        result = haystream("chat", "m", "hi", "--url", server.url)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    assert "a long answ" in result.stdout and "token limit" in result.stderr


def test_ctrl_c_stops_the_answer_not_the_conversation():
    answers = iter(["first", "second"])

    def respond(connection: socket.socket) -> None:
        sse_head(connection)
        if next(answers) == "first":
            sse_event(connection, delta("t0 "))
            connection.recv(1)  # hold the answer open until the client hangs up (after its Ctrl-C)
            return
        sse_event(connection, delta("the second answer"))
        sse_event(connection, delta(finish_reason="stop"))
        connection.sendall(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")

    server = ScriptedServer(respond)
    process = subprocess.Popen(
        [sys.executable, "-m", "haystream", "chat", "m", "--url", server.url],
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        process.stdin.write("first question\n")
        process.stdin.flush()
        assert process.stdout.read(len("you> t0 ")) == "you> t0 "  # the first answer has started, and holds
        process.send_signal(signal.SIGINT)
        process.stdin.write("second question\n\n")
        process.stdin.flush()
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        server.close()
    assert process.returncode == 0, stderr
    assert "answer stopped" in stderr
    assert "the second answer" in stdout  # the conversation went on


def test_version():
    result = haystream("--version")
    assert result.returncode == 0 and result.stdout.strip().startswith("haystream 0.")


def test_serve_outside_a_project_says_what_to_do(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "haystream", "serve", "--port", "1"],
        env=ENV,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "No wrappers folder" in " ".join(result.stderr.split())
    assert not (tmp_path / "pipeline_wrappers").exists()


def test_a_busy_port_is_reported_before_loading_wrappers(tmp_path):
    (tmp_path / "pipeline_wrappers").mkdir()
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = haystream("serve", "--port", str(port), "--pipelines-dir", str(tmp_path / "pipeline_wrappers"))
    assert result.returncode == 1 and "Cannot listen on" in " ".join(result.stderr.split())
    assert "Deploying" not in result.stderr


def test_testing_module_help_does_not_start_a_server():
    result = subprocess.run(
        [sys.executable, "-m", "haystream.testing", "--help"], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "usage" in result.stdout.lower()
    assert "http://" not in result.stdout


def test_a_wrapper_that_fails_to_load_is_named_as_such(upstream, tmp_path):
    broken = tmp_path / "wrappers" / "broken"
    broken.mkdir(parents=True)
    (broken / "pipeline_wrapper.py").write_text("class PipelineWrapper(:\n    pass\n")
    server = start_server(upstream, pipelines_dir=str(tmp_path / "wrappers"))
    try:
        response = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": "broken", "messages": [{"role": "user", "content": "x"}]},
        )
    finally:
        server.stop()
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_loaded"
    assert "failed to load" in error["message"] and "SyntaxError" in error["message"] and "line 1" in error["message"]


def test_the_local_fallback_is_announced(monkeypatch, caplog):
    from haystream.local import LocalChatGenerator, chat_generator_from_env

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with caplog.at_level("WARNING", logger="haystream.local"):
        assert isinstance(chat_generator_from_env(), LocalChatGenerator)
    assert "embedded local model" in caplog.text


# --- what OpenAI clients see -----------------------------------------------------------------------------------


def test_non_stream_message_has_refusal_and_no_invented_usage(client):
    completion = client.chat.completions.create(
        model="fake_async", messages=[{"role": "user", "content": "x"}], extra_body={"mode": "string"}
    )
    raw = completion.model_dump()
    assert "refusal" in raw["choices"][0]["message"] and completion.choices[0].message.refusal is None
    assert completion.usage is None  # a plain string carries no usage: none is reported, never zeros
    chunks = list(
        client.chat.completions.create(
            model="fake_async",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"mode": "string"},
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(chunk.usage is None for chunk in chunks)


def test_chained_haystreams_say_the_failure_once():
    """haystream behind haystream: the upstream's error text already says the pipeline failed; say it once."""
    from haystream.server.chat import failure_error

    upstream_says = "The pipeline failed: ValueError: the wrapper refused (request id inner-1)"
    response = httpx.Response(500, request=httpx.Request("POST", "http://inner/v1/chat/completions"))
    error = openai.InternalServerError(upstream_says, response=response, body=None)
    message = failure_error(RuntimeError("outer"), "outer-2").message
    assert message == "The pipeline failed: RuntimeError: outer (request id outer-2)"
    chained = failure_error(error, "outer-2").message
    assert chained.count("The pipeline failed:") == 1
    assert "inner-1" in chained and chained.endswith("(request id outer-2)")


# --- the local model ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_server(upstream):
    # the session's fake upstream: start_server points FAKE_UPSTREAM_URL at it while this server runs
    server = start_server(upstream, pipelines_dir=str(Path(__file__).parents[1] / "pipeline_wrappers"))
    yield server
    server.stop()


def test_the_local_model_reports_real_usage(local_server):
    sdk = openai.OpenAI(base_url=local_server.url + "/v1", api_key="x", max_retries=0)
    chunks = list(
        sdk.chat.completions.create(
            model="local_chat",
            messages=[{"role": "user", "content": "Hello!"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    pieces = sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content)
    assert usage.completion_tokens == pieces > 0
    assert usage.prompt_tokens > 10 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    completion = sdk.chat.completions.create(model="local_chat", messages=[{"role": "user", "content": "Hello!"}])
    assert completion.usage.completion_tokens > 0 and completion.usage.prompt_tokens > 10


def test_the_local_model_answers_without_artefacts(local_server):
    sdk = openai.OpenAI(base_url=local_server.url + "/v1", api_key="x", max_retries=0)
    for prompt in ("Hello!", "hi", "Say hello."):
        # greedy decoding, so that the answer (and the test) does not depend on the sampler's luck
        answer = sdk.chat.completions.create(
            model="local_chat", messages=[{"role": "user", "content": prompt}], temperature=0
        )
        text = answer.choices[0].message.content
        assert text and "I's" not in text and answer.choices[0].finish_reason == "stop", text


def test_a_prompt_longer_than_the_context_is_a_400(local_server):
    sdk = openai.OpenAI(base_url=local_server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="local_chat", messages=[{"role": "user", "content": "word " * 5000}])
    assert refused.value.code == "context_length_exceeded"
