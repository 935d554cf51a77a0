"""The haystream CLI as a user runs it: subprocesses against a running server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

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
        [sys.executable, str(tmp_path / "demo" / "test_pipeline_wrapper.py")],
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
