"""`haystream serve` as a real process, driven by the real hayhooks CLI (deploy-files, status) and the openai SDK."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import openai
import pytest

DEPLOYABLE = Path(__file__).parent / "deployable" / "echo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        **os.environ,
        "HAYSTREAM_ENABLE_DEPLOY": "true",
        "HAYSTREAM_API_KEYS": "secret-key",
        "HAYSTACK_TELEMETRY_ENABLED": "False",
        "HAYHOOKS_HOST": "127.0.0.1",
        "HAYHOOKS_PORT": str(port),
        "NETRC": str(netrc),  # hayhooks' CLI (requests) sends these credentials as Basic auth
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "haystream", "serve", "--port", str(port), "--pipelines-dir", str(pipelines)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in process.stderr:  # blocks until uvicorn reports it is up (or the process dies)
            if "Uvicorn running on" in line or "Application startup complete" in line:
                break
        else:
            pytest.fail(f"haystream serve exited with {process.wait()}")
        yield port, env
    finally:
        process.terminate()
        process.wait(20)


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
