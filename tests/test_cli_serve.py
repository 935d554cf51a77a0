"""`haystream serve` as a real process, driven by the real hayhooks CLI (deploy-files, status) and the openai SDK."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import httpx
import openai
import pytest

DEPLOYABLE = Path(__file__).parent / "deployable" / "echo"
REPO = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeLog:
    """Every stderr line of a `haystream serve` process, read to its end by a thread: a server writing more than the
    pipe holds (its access log) would otherwise block once the test stops reading."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), name="serve-stderr", daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        finally:
            with self._changed:
                self.ended = True
                self._changed.notify_all()

    def wait_for(self, text: str, count: int = 1, timeout: float = 120) -> bool:
        """Block until `count` lines contain `text` (True), or the stream ended or `timeout` passed first (False)."""

        def seen() -> int:
            return sum(text in line for line in self.lines)

        with self._changed:
            self._changed.wait_for(lambda: seen() >= count or self.ended, timeout)
            return seen() >= count


class ServeProcess(subprocess.Popen):
    """A `haystream serve` process whose stderr `log` is drained by a thread from the start."""

    log: ServeLog


def start_serve(args: list[str], env: dict, cwd: Path | None = None, *, prefix: Sequence[str] = ()) -> ServeProcess:
    """Start `haystream serve ARGS` (after `prefix`, a command that runs it); returns once uvicorn reports the app
    started (fails if the process dies)."""
    env = {"HAYSTREAM_DRAIN_GRACE_SECONDS": "0", **env}  # stop() needs no load-balancer grace (test_drain.py has it)
    process = ServeProcess(
        [*prefix, sys.executable, "-m", "haystream", "serve", *args],
        env=env,
        cwd=cwd,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.log = ServeLog(process.stderr)
    if not process.log.wait_for("Application startup complete"):
        process.kill()
        pytest.fail(f"haystream serve did not start (exit code {process.wait()}):\n{''.join(process.log.lines)}")
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(20)


@pytest.fixture
def served(tmp_path):
    """`haystream serve` with deploy enabled and a key; yields (port, env for CLI clients)."""
    port = free_port()
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    netrc = tmp_path / "netrc"
    netrc.write_text(
        "machine 127.0.0.1 login haystream password secret-key\nmachine localhost login haystream password secret-key\n"
    )
    netrc.chmod(0o600)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")},
        "HAYSTREAM_ENABLE_DEPLOY": "true",
        "HAYSTREAM_API_KEYS": "secret-key",
        "HAYSTACK_TELEMETRY_ENABLED": "False",
        "HAYHOOKS_HOST": "127.0.0.1",
        "HAYHOOKS_PORT": str(port),
        "NETRC": str(netrc),  # hayhooks' CLI (requests) sends these credentials as Basic auth
    }
    process = start_serve(["--port", str(port), "--pipelines-dir", str(pipelines)], env)
    try:
        yield port, env
    finally:
        stop(process)


def hayhooks(*args: str, env: dict) -> subprocess.CompletedProcess:
    executable = shutil.which("hayhooks", path=os.path.dirname(sys.executable)) or "hayhooks"
    return subprocess.run([executable, *args], env=env, capture_output=True, text=True, timeout=120)


def test_hayhooks_cli_deploys_to_haystream_serve_and_the_wrapper_streams(served):
    port, env = served
    deployed = hayhooks("pipeline", "deploy-files", "-n", "echo", str(DEPLOYABLE), env=env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    status = hayhooks("status", env=env)
    assert status.returncode == 0 and "echo" in status.stdout, status.stdout + status.stderr
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret-key", max_retries=0)
    assert "echo" in {model.id for model in sdk.models.list()}
    stream = sdk.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "streams through haystream"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "streams through haystream"


def test_hayhooks_cli_without_credentials_is_refused(served):
    port, env = served
    env = {**env, "NETRC": "/nonexistent"}
    deployed = hayhooks("pipeline", "deploy-files", "-n", "echo", str(DEPLOYABLE), env=env)
    assert deployed.returncode != 0 or "401" in deployed.stdout + deployed.stderr
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret-key", max_retries=0)
    assert "echo" not in {model.id for model in sdk.models.list()}


def test_hayhooks_cli_shows_haystreams_refusal(served):
    """hayhooks' CLI prints a refusal's `detail` (else "Unknown error"): the gate gives it the message."""
    _, env = served
    status = hayhooks("status", env={**env, "NETRC": "/nonexistent"})
    output = " ".join((status.stdout + status.stderr).split())
    assert "Unknown error" not in output and "API key" in output, output


def haystream_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "haystream", *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_new_wrapper_deploys_with_haystream_deploy_and_streams(served, tmp_path):
    port, env = served
    url = f"http://127.0.0.1:{port}"
    assert haystream_cli("new", "demo", "--dir", str(tmp_path / "mine"), env=env).returncode == 0
    key = ("--url", url, "--api-key", "secret-key")
    deployed = haystream_cli("deploy", str(tmp_path / "mine" / "demo"), *key, env=env)
    assert deployed.returncode == 0, deployed.stderr
    answer = haystream_cli("chat", "demo", "Say hello.", *key, env=env)
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr  # the local model answered
    removed = haystream_cli("undeploy", "demo", *key, env=env)
    assert removed.returncode == 0, removed.stderr
    assert "demo" not in haystream_cli("models", *key, env=env).stdout


def test_readme_first_command_serves_the_local_model(tmp_path):
    """`haystream serve` from the repository root, with no configuration, answers `haystream chat local_chat`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "HAYSTREAM_"))}
    env["HAYSTREAM_PORT"] = str(port)
    process = start_serve([], env, cwd=REPO)
    try:
        answer = haystream_cli("chat", "local_chat", "hi", "--url", f"http://127.0.0.1:{port}", env=env)
    finally:
        stop(process)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_log_reader_that_stops_reading_does_not_stop_the_server(workers):
    """stdout and stderr are pipes that nobody reads once the server has started (a stalled log collector). Every
    request writes an access-log line, a line through hayhooks' logger (loguru) and a `print`. Written from the event
    loop, that output filled the 64 KiB pipe after a few hundred requests and then blocked every route; now 1,000
    requests are answered, and every line arrives once the pipes are read again."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "HAYSTREAM_"))},
        "HAYSTACK_TELEMETRY_ENABLED": "False",
        "HAYSTREAM_DRAIN_GRACE_SECONDS": "0",
    }
    wrappers = Path(__file__).parent / "worker_wrappers"
    args = ["--port", str(port), "--workers", str(workers), "--pipelines-dir", str(wrappers)]
    process = subprocess.Popen(
        [sys.executable, "-m", "haystream", "serve", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None and process.stdout is not None
        started = 0
        while started < workers:  # read up to the start, then stop reading
            line = process.stderr.readline()
            assert line, f"haystream serve exited with {process.wait()}"
            started += "Application startup complete" in line
        requests = 1_000  # about 100 kB on stdout and 250 kB on stderr: more than the pipes hold
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for number in range(requests):
                body = {"model": "chatty", "messages": [{"role": "user", "content": f"request {number}"}]}
                assert client.post("/v1/chat/completions", json=body).status_code == 200
        log, printed = ServeLog(process.stderr), ServeLog(process.stdout)  # reading again
    finally:
        stop(process)
    assert log.wait_for('"POST /v1/chat/completions HTTP/1.1" 200', count=requests)
    assert log.wait_for("chatty: answering request", count=requests)
    assert printed.wait_for("chatty: printed request", count=requests)
    assert any(f"chatty: answering request {requests - 1}" in line for line in log.lines)


@pytest.mark.parametrize(("level", "logged"), [("info", True), ("warning", False)])
def test_log_level_flag_reaches_the_server(tmp_path, level, logged):
    """`--log-level` (the README's way to turn the access log off) is a flag of `serve`, like HAYSTREAM_LOG_LEVEL."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "HAYSTREAM_"))},
        "HAYSTACK_TELEMETRY_ENABLED": "False",
    }
    wrappers = Path(__file__).parent / "worker_wrappers"
    process = start_serve(["--port", str(port), "--pipelines-dir", str(wrappers), "--log-level", level], env)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
    finally:
        stop(process)  # the log ends with the process: every line it wrote is in
    assert process.log.wait_for('"GET /health HTTP/1.1" 200') is logged


# As root, file permissions do not apply: the server runs without the capabilities that override them, as any other
# user's server would.
AS_AN_ORDINARY_USER = (
    ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    if os.geteuid() == 0
    else []
)


@pytest.mark.parametrize("unreadable", ["file", "folder"])
def test_a_wrapper_the_server_may_not_read_is_named_and_the_server_starts(tmp_path, unreadable):
    pipelines = tmp_path / "pipelines"
    (pipelines / "secret").mkdir(parents=True)
    (pipelines / "secret" / "pipeline_wrapper.py").write_text("raise SystemExit('never read')\n")
    shutil.copytree(DEPLOYABLE, pipelines / "echo")
    locked = pipelines / "secret" / "pipeline_wrapper.py" if unreadable == "file" else pipelines / "secret"
    locked.chmod(0)
    port = free_port()
    env = {**os.environ, "HAYSTACK_TELEMETRY_ENABLED": "False"}
    try:
        process = start_serve(["--port", str(port), "--pipelines-dir", str(pipelines)], env, prefix=AS_AN_ORDINARY_USER)
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            refused = httpx.post(url, json={"model": "secret", "messages": [{"role": "user", "content": "x"}]})
            served = httpx.post(url, json={"model": "echo", "messages": [{"role": "user", "content": "x"}]})
        finally:
            stop(process)
    finally:
        locked.chmod(0o755)
    assert refused.status_code == 404, refused.text
    error = refused.json()["error"]
    assert error["code"] == "model_not_loaded"
    assert "pipeline_wrapper.py cannot be read (Permission denied)" in error["message"]
    assert served.status_code == 200, served.text
    assert "Traceback" not in "".join(process.log.lines)


def test_a_wrappers_folder_the_server_may_not_read_is_one_line(tmp_path):
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    pipelines.chmod(0)
    env = {**os.environ, "HAYSTACK_TELEMETRY_ENABLED": "False", "HAYSTREAM_PIPELINES_DIR": str(pipelines)}
    try:
        result = subprocess.run(
            [*AS_AN_ORDINARY_USER, sys.executable, "-m", "haystream", "serve", "--port", str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        pipelines.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert "Cannot read the wrappers folder" in result.stderr and "Permission denied" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_wrappers_path_that_is_a_file_is_named_as_such(tmp_path):
    not_a_folder = tmp_path / "wrappers.py"
    not_a_folder.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "haystream", "serve", "--port", str(free_port()), "--pipelines-dir", str(not_a_folder)],
        env={**os.environ, "HAYSTACK_TELEMETRY_ENABLED": "False", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "is a file, not a folder" in result.stderr
