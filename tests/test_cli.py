"""The haystream CLI as a user runs it: subprocesses against a running server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from support import start_server


def haystream(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HAYSTACK_TELEMETRY_ENABLED": "False", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "haystream", *args], env=env, capture_output=True, text=True, timeout=120, **kwargs
    )


def test_chat_prints_the_streamed_answer(server):
    result = haystream("chat", "fake_async", "hi", "--url", server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "t0 t1 t2 t3 t4 t5 t6 t7"


def test_chat_prints_tokens_as_they_arrive(server, upstream):
    run = uuid.uuid4().hex[:8]  # the paced wrapper names its upstream request after the message
    process = subprocess.Popen(
        [sys.executable, "-m", "haystream", "chat", "paced", run, "--url", server.url],
        env={**os.environ, "HAYSTACK_TELEMETRY_ENABLED": "False"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.read(3) == "t0 "  # blocks until the CLI has printed (and flushed) the first token
        record = upstream.wait_for_requests(1, model=f"fake?tokens=5&hold_after=1&run={run}")[0]
        assert not record.completed and record.tokens_sent == 1  # ...while the upstream holds the rest
        process.send_signal(signal.SIGINT)  # Ctrl-C on a one-shot answer: stop it and exit
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and "answer stopped" in stderr
    assert record.wait(30).client_hung_up  # the server cancelled the run when the CLI left


def test_models_lists_chat_wrappers(server):
    result = haystream("models", "--url", server.url)
    assert result.returncode == 0 and "fake_async" in result.stdout and "api_only" not in result.stdout


def test_clear_errors(server, upstream, tmp_path):
    down = haystream("chat", "x", "hi", "--url", "http://127.0.0.1:9")
    assert down.returncode == 1 and "is `haystream serve` running?" in down.stderr
    unknown = haystream("chat", "nope", "hi", "--url", server.url)
    assert unknown.returncode == 1 and "Unknown model 'nope'" in unknown.stderr and "fake_async" in unknown.stderr
    locked = start_server(upstream, api_keys="right")
    try:
        refused = haystream("models", "--url", locked.url, "--api-key", "wrong")
        assert refused.returncode == 1 and "refused the API key" in refused.stderr
        assert "fake_async" in haystream("models", "--url", locked.url, "--api-key", "right").stdout
    finally:
        locked.stop()
    assert "Traceback" not in down.stderr + unknown.stderr + refused.stderr


def test_new_scaffolds_a_wrapper_that_passes_its_own_test(tmp_path):
    created = haystream("new", "demo", "--dir", str(tmp_path))
    assert created.returncode == 0, created.stderr
    assert "async def run_chat_completion_async" in (tmp_path / "demo" / "pipeline_wrapper.py").read_text()
    # after the README's first install there is no pytest: the test runs with plain Python too
    plain = subprocess.run(
        [sys.executable, str(tmp_path / "demo" / "test_demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HAYSTACK_TELEMETRY_ENABLED": "False"},
    )
    assert plain.returncode == 0 and "demo: ok" in plain.stdout, plain.stdout + plain.stderr
    own_test = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HAYSTACK_TELEMETRY_ENABLED": "False"},
    )
    assert own_test.returncode == 0, own_test.stdout + own_test.stderr
    again = haystream("new", "demo", "--dir", str(tmp_path))
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = haystream("new", "../evil", "--dir", str(tmp_path))
    assert bad.returncode == 1 and "Invalid name" in bad.stderr
    (tmp_path / "a_file").write_text("")
    on_a_file = haystream("new", "demo", "--dir", str(tmp_path / "a_file"))
    assert on_a_file.returncode == 1 and "Traceback" not in on_a_file.stderr
    assert on_a_file.stderr.startswith(f"error: Cannot create {tmp_path / 'a_file' / 'demo'}: Not a directory.")


def test_the_tests_of_several_scaffolds_run_in_one_pytest(tmp_path):
    # They were all test_pipeline_wrapper.py: pytest refused the second one ("import file mismatch").
    for name in ("support-bot", "class"):
        assert haystream("new", name, "--dir", str(tmp_path)).returncode == 0
    together = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HAYSTACK_TELEMETRY_ENABLED": "False"},
    )
    assert together.returncode == 0 and "2 passed" in together.stdout, together.stdout + together.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--port", "abc"], "error: Invalid value for '--port'"),
        (["serve", "--no-such-flag"], "error: No such option: --no-such-flag"),
        (["no-such-command"], "error: No such command 'no-such-command'."),
        (["new"], "error: Missing argument 'name'."),
    ],
)
def test_a_command_line_mistake_is_one_error_line_like_every_other_refusal(args, message):
    # typer drew a multi-line framed box for these, and a one-line "error: ..." for everything haystream refuses.
    refused = haystream(*args)
    assert refused.returncode == 2
    assert refused.stderr.startswith(message) and refused.stderr.count("\n") == 1, refused.stderr
    assert "--help" in refused.stderr and "╭" not in refused.stderr


def test_no_arguments_and_help_still_print_the_help():
    bare, asked = haystream(), haystream("--help")
    assert bare.returncode == 2 and asked.returncode == 0
    assert "[OPTIONS] COMMAND" in bare.stdout and "[OPTIONS] COMMAND" in asked.stdout and not bare.stderr


def test_the_help_states_the_limits_the_settings_enforce():
    # `serve --help` said "64 at most" while 1024 workers were accepted; `new --help` named the sync `stream`.
    from haystream.settings import ServerSettings

    (most,) = [rule.le for rule in ServerSettings.model_fields["workers"].metadata if hasattr(rule, "le")]
    assert f"{most} at most" in haystream("serve", "--help").stdout
    assert "haystream.astream" in haystream("new", "--help").stdout


def serve_refused(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`haystream serve` with operator mistakes in its flags or environment: it must refuse before serving."""
    (tmp_path / "wrappers").mkdir(exist_ok=True)
    clean = {key: value for key, value in os.environ.items() if not key.startswith("HAYSTREAM_")}
    return subprocess.run(
        [sys.executable, "-m", "haystream", "serve", "-d", str(tmp_path / "wrappers"), *args],
        env={**clean, "HAYSTACK_TELEMETRY_ENABLED": "False", "COLUMNS": "80", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ((), {"HAYSTREAM_PORT": "http"}, "HAYSTREAM_PORT='http': Input should be a valid integer"),
        (("--port", "70000"), {}, "--port=70000: Input should be less than or equal to 65535"),
        (("--port", "0"), {}, "--port=0: Input should be greater than or equal to 1"),
        (("--workers", "0"), {}, "--workers=0: Input should be greater than or equal to 1"),
        ((), {"HAYSTREAM_WORKERS": "-2"}, "HAYSTREAM_WORKERS='-2': Input should be greater than or equal to 1"),
        ((), {"HAYSTREAM_ENABLE_DOCS": "maybe"}, "HAYSTREAM_ENABLE_DOCS='maybe': Input should be a valid boolean"),
        ((), {"HAYSTREAM_DRAIN_TIMEOUT": "inf"}, "HAYSTREAM_DRAIN_TIMEOUT='inf': Input should be a finite number"),
        ((), {"HAYSTREAM_KEEPALIVE_SECONDS": "0"}, "HAYSTREAM_KEEPALIVE_SECONDS='0': Input should be greater than 0"),
        # finite but absurd durations: a drain grace of 1e300 s never ends
        ((), {"HAYSTREAM_DRAIN_GRACE_SECONDS": "1e300"}, "HAYSTREAM_DRAIN_GRACE_SECONDS='1e300': Input should be less"),
        (
            (),
            {"HAYSTREAM_DRAIN_TIMEOUT": "86401"},
            "HAYSTREAM_DRAIN_TIMEOUT='86401': Input should be less than or equal",
        ),
        ((), {"HAYSTREAM_SEND_TIMEOUT_SECONDS": "1e12"}, "HAYSTREAM_SEND_TIMEOUT_SECONDS='1e12': Input should be less"),
        ((), {"HAYSTREAM_WORKER_TIMEOUT": "1e300"}, "HAYSTREAM_WORKER_TIMEOUT='1e300': Input should be less than"),
        ((), {"HAYSTREAM_RESPONSES_TTL_SECONDS": "1e300"}, "less than or equal to 2592000"),
        ((), {"HAYSTREAM_LOCAL_QUEUE_TIMEOUT": "1e300"}, "HAYSTREAM_LOCAL_QUEUE_TIMEOUT='1e300': Input should be less"),
        ((), {"HAYSTREAM_LOG_LEVEL": "verbose"}, "HAYSTREAM_LOG_LEVEL='verbose': should be one of critical, error"),
        (("--log-level", "loud"), {}, "--log-level='loud': should be one of critical, error, warning, info, debug"),
        ((), {"HAYSTREAM_LOG_FORMAT": "xml"}, "HAYSTREAM_LOG_FORMAT='xml': Input should be 'text' or 'json'"),
        ((), {"HAYSTREAM_REDIS_URL": "localhost:6379"}, "HAYSTREAM_REDIS_URL: should be a Redis URL: redis://"),
        (("--workers", "1025"), {}, "--workers=1025: Input should be less than or equal to 1024"),
        ((), {"HAYSTREAM_GC_THRESHOLD": "10000000000"}, "HAYSTREAM_GC_THRESHOLD='10000000000': Input should be less"),
        ((), {"HAYSTREAM_CORS_ORIGINS": "chat.example.com"}, "write 'https://chat.example.com'"),
        ((), {"HAYSTREAM_CORS_ORIGINS": "http://a.example, https://b.example/"}, "write 'https://b.example'"),
        ((), {"HAYSTREAM_CORS_ORIGINS": "https://A.example:443"}, "write 'https://a.example'"),
        ((), {"HAYSTREAM_CORS_ORIGINS": "https://*.example"}, "write scheme://host[:port]"),
        ((), {"HAYSTREAM_API_KEYS": " , "}, "HAYSTREAM_API_KEYS is set but holds no key"),
        ((), {"HAYSTREAM_HOST": ""}, "HAYSTREAM_HOST='': is empty; write 127.0.0.1 (this machine only) or 0.0.0.0"),
        (("--host", "[::1]"), {}, "--host='[::1]': write the IPv6 address without brackets: ::1"),
        ((), {"HAYSTREAM_ALLOWED_HOSTS": "https://chat.example/"}, "not a host name: write 'chat.example'"),
        ((), {"HAYSTREAM_ALLOWED_HOSTS": "localhost, *.example"}, "'*.example' is not a host name: write '.example'"),
        ((), {"HAYSTREAM_ALLOWED_HOSTS": "localhost:1416"}, "'localhost:1416' is not a host name: write 'localhost'"),
        ((), {"HAYSTREAM_ALLOWED_HOSTS": "chat.example."}, "'chat.example.' is not a host name: write 'chat.example'"),
        # the other layers' settings, read lazily at the first request, are checked at startup too
        ((), {"HAYSTREAM_PRODUCER_THREADS": "0"}, "HAYSTREAM_PRODUCER_THREADS='0': Input should be greater"),
        ((), {"HAYSTREAM_LOCAL_QUEUE_TIMEOUT": "soon"}, "HAYSTREAM_LOCAL_QUEUE_TIMEOUT='soon': Input should be"),
        ((), {"HAYSTREAM_ABANDON_SOCKETS": "sometimes"}, "HAYSTREAM_ABANDON_SOCKETS='sometimes': Input should be"),
        (
            (),
            {"HAYSTREAM_LOCAL_MODEL": "/nowhere/model.gguf"},
            "HAYSTREAM_LOCAL_MODEL='/nowhere/model.gguf': not a file",
        ),
        (
            (),
            {"PROMETHEUS_MULTIPROC_DIR": "/nowhere/metrics"},
            "PROMETHEUS_MULTIPROC_DIR='/nowhere/metrics': not a dir",
        ),
    ],
)
def test_serve_names_the_bad_setting_and_what_it_accepts(tmp_path, args, env, expected):
    refused = serve_refused(tmp_path, *args, **env)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("error: refusing to start: ") and expected in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr


def test_every_duration_setting_has_a_documented_maximum():
    """A duration without an upper bound takes 1e300; each one's bound is the one the README states (a day, or 30 days
    for stored responses), and a day itself is accepted."""
    from pathlib import Path

    from haystream.settings import LocalModelSettings, ServerSettings, StreamingSettings

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for settings in (ServerSettings, StreamingSettings, LocalModelSettings):
        for name, field in settings.model_fields.items():
            if field.annotation is not float:
                continue
            (most,) = [rule.le for rule in field.metadata if hasattr(rule, "le")]
            row = next(line for line in readme.splitlines() if line.startswith(f"| `HAYSTREAM_{name.upper()}` |"))
            assert f"{most:,}" in row, (name, most, row)
            assert settings(**{name: most}), name


def test_serve_does_not_echo_secrets_it_refuses(tmp_path):
    refused = serve_refused(tmp_path, HAYSTREAM_REDIS_URL="http://:hunter2@cache:6379", HAYSTREAM_API_KEYS=",")
    assert (
        refused.returncode == 2 and "HAYSTREAM_REDIS_URL" in refused.stderr and "HAYSTREAM_API_KEYS" in refused.stderr
    )
    assert "hunter2" not in refused.stderr


def test_serve_explains_why_it_cannot_listen(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        in_use = serve_refused(tmp_path, "--port", str(taken.getsockname()[1]))
    assert in_use.returncode == 1 and "another server is listening there" in in_use.stderr
    not_here = serve_refused(tmp_path, "--host", "192.0.2.1")  # TEST-NET-1: never an address of this machine
    assert not_here.returncode == 1 and "the address is not one of this machine's" in not_here.stderr
    unresolvable = serve_refused(tmp_path, "--host", "no-such-host.invalid")
    assert unresolvable.returncode == 1 and "--host 'no-such-host.invalid': the name does not resolve" in (
        unresolvable.stderr
    )
    assert "Traceback" not in in_use.stderr + not_here.stderr + unresolvable.stderr
    assert "is another server running" not in not_here.stderr + unresolvable.stderr


@pytest.fixture
def foreign() -> Iterator[tuple[str, dict[str, Any]]]:
    """A plain HTTP server on 127.0.0.1 that is not haystream: `routes[path] = (status, content type, body)`, or a
    list of them given out in turn; it closes each connection after its body, so a body is whatever it sent. A
    content type ending in `;cut` sends the body as one chunk of a chunked body that never ends (a broken
    connection)."""
    routes: dict[str, Any] = {}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            route = routes.get(self.path, (404, "text/html", b"<h1>Not Found</h1>"))
            status, content_type, body = route.pop(0) if isinstance(route, list) else route
            content_type, cut, _ = content_type.partition(";cut")
            self.send_response(status)
            self.send_header("content-type", content_type)
            if cut:
                self.send_header("transfer-encoding", "chunked")
                body = b"%x\r\n%s\r\n" % (len(body), body)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", routes
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def chunk(content: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": content}}]}).encode() + b"\n\n"


def test_chat_refuses_a_url_or_key_it_cannot_use():
    for command in (("chat", "x", "hi"), ("models",)):
        result = haystream(*command, "--url", "127.0.0.1:1416")
        assert result.returncode == 1 and "'127.0.0.1:1416' is not an http:// or https:// URL" in result.stderr
        assert "write e.g. --url http://127.0.0.1:1416" in result.stderr and "lost" not in result.stderr
        assert "Traceback" not in result.stderr
    mistakes = {
        ("--url", "http://[::1"): "'http://[::1' is not a valid URL (Invalid port",
        ("--url", "http://127.0.0.1:99999"): "'http://127.0.0.1:99999': the port should be 1-65535",
        ("--url", "http://127.0.0.1:1416/v1"): "give the server's root, without /v1: --url http://127.0.0.1:1416.",
        ("--api-key", "clé"): "--api-key (HAYSTREAM_API_KEY) holds a character an HTTP header cannot carry",
    }
    for option, expected in mistakes.items():
        result = haystream("chat", "x", "hi", *option)
        assert result.returncode == 1 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_chat_and_models_say_when_the_server_is_not_haystream(foreign):
    url, routes = foreign
    answers = []
    for models in (b"<html><body>It works!</body></html>", b'{"status": "ok"}', b'{"data": {"a": 1}}', b"[1]"):
        routes["/v1/models"] = (200, "application/json", models)
        answers += [haystream("models", "--url", url), haystream("chat", "--url", url)]  # chat looks for the model
    for answer in answers:
        assert answer.returncode == 1 and "did not answer like haystream (no model list): check --url" in answer.stderr
    routes["/v1/chat/completions"] = (200, "text/html", b"<html>\n<body>\nWelcome\n</body>\n</html>")
    html = haystream("chat", "m", "hi", "--url", url)
    assert html.returncode == 1 and "answered text/html, not an event stream" in html.stderr
    routes["/v1/chat/completions"] = (502, "text/html", b"<html>\n<h1>502 Bad Gateway</h1>\n</html>")
    gateway = haystream("chat", "m", "hi", "--url", url)
    assert gateway.returncode == 1 and "Could not chat: <html> <h1>502 Bad Gateway</h1> </html> (HTTP 502)" in (
        gateway.stderr
    )
    routes["/v1/chat/completions"] = (200, "text/event-stream", chunk("Hel") + b'data: {"choices": "lo"}\n\n')
    odd = haystream("chat", "m", "hi", "--url", url)
    assert odd.returncode == 1 and odd.stdout == "Hel\n" and "an event haystream does not know" in odd.stderr
    for answer in (*answers, html, gateway, odd):
        assert len(answer.stderr.strip().splitlines()) == 1 and "Traceback" not in answer.stderr


def test_chat_fails_when_the_stream_ends_without_done(foreign):
    url, routes = foreign
    routes["/v1/chat/completions"] = (200, "text/event-stream", chunk("Hello") + chunk(" wor"))
    cut = haystream("chat", "m", "hi", "--url", url)
    assert cut.returncode == 1 and cut.stdout == "Hello wor\n"
    assert "The answer was cut: the stream ended without [DONE]" in cut.stderr and "Traceback" not in cut.stderr
    routes["/v1/chat/completions"] = (200, "text/event-stream", chunk("Hello") + chunk(" world") + b"data: [DONE]\n\n")
    whole = haystream("chat", "m", "hi", "--url", url)
    assert whole.returncode == 0 and whole.stdout == "Hello world\n" and whole.stderr == ""


def test_a_failed_answer_in_a_conversation_is_said_and_the_conversation_goes_on(foreign):
    # One prompt exits 1 on a failed answer; an interactive session said so and ended, losing the conversation.
    url, routes = foreign
    whole = (200, "text/event-stream", chunk("Hello") + chunk(" world") + b"data: [DONE]\n\n")
    routes["/v1/chat/completions"] = [
        (200, "text/event-stream", chunk("Hel")),  # ended without [DONE]
        (200, "text/event-stream;cut", chunk("Hel")),  # the connection broke
        (429, "application/json", b'{"error": {"message": "Too many streams", "type": "rate_limit"}}'),
        (200, "text/event-stream", chunk("Hel") + b'data: {"error": {"message": "upstream failed"}}\n\n'),
        whole,
    ]
    session = haystream("chat", "m", "--url", url, input="one\ntwo\nthree\nfour\nfive\n")
    assert session.returncode == 0, session.stderr
    assert session.stdout.count("Hello world") == 1
    for said in (
        "The answer was cut: the stream ended without [DONE]",
        "The answer was cut: the connection to haystream was lost (RemoteProtocolError)",
        "Could not chat: Too many streams (HTTP 429)",
        "upstream failed",
    ):
        assert said in session.stderr
    assert "Traceback" not in session.stderr and routes["/v1/chat/completions"] == []


def test_deploy_and_undeploy_say_when_the_server_is_not_haystream(foreign, tmp_path):
    # Any server answering 200 read as "Deployed": a wrong --url went unnoticed.
    url, routes = foreign
    wrapper = tmp_path / "demo"
    wrapper.mkdir()
    (wrapper / "pipeline_wrapper.py").write_text("# a wrapper\n")
    routes["/deploy_files"] = (200, "application/json", b'{"status": "ok"}')
    routes["/undeploy/demo"] = (200, "text/html", b"<html>ok</html>")
    deployed = haystream("deploy", str(wrapper), "--url", url)
    removed = haystream("undeploy", "demo", "--url", url)
    assert deployed.returncode == 1 and "no deployment of 'demo'" in deployed.stderr
    assert "Deployed" not in deployed.stdout
    assert removed.returncode == 1 and "no removal of 'demo'" in removed.stderr
    assert "Traceback" not in deployed.stderr + removed.stderr
