"""Fixtures for the end-to-end tests: haystream serve and the real Open WebUI, both as processes on loopback."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).parents[2]
AGENT_SCENARIO = 'fake?tool=calculator&args={"expression": "6*7"}&tokens=3&text=ok&delay=0.05'


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.e2e)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def open_webui_executable() -> Path:
    venv = Path(os.environ.get("HAYSTREAM_E2E_OPENWEBUI", REPO / ".e2e" / "openwebui"))
    executable = venv / "bin" / "open-webui"
    if not executable.exists():
        message = f"Open WebUI is not installed at {venv}: run `bash tests/e2e/install.sh` (or deselect: -m 'not e2e')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return executable


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    # Open WebUI prints no readiness line (it reroutes uvicorn's logging), so its /health is asked, bounded.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[0]} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"{url} not healthy after {timeout}s")


@pytest.fixture(scope="session")
def haystream_url(upstream, tmp_path_factory) -> str:
    """`haystream serve` with example wrappers (agent_tools talks to the fake upstream's tool scenario)."""
    pipelines = tmp_path_factory.mktemp("e2e-wrappers")
    for name in ("agent_tools", "local_chat", "openai_chat", "rag_chat"):
        shutil.copytree(REPO / "pipeline_wrappers" / name, pipelines / name)
    shutil.copytree(Path(__file__).parent / "wrappers" / "failing", pipelines / "failing")
    shutil.copytree(REPO / "tests" / "wrappers" / "responses_items", pipelines / "responses_items")  # run_response
    port = free_port()
    env = {
        **os.environ,
        "HAYSTACK_TELEMETRY_ENABLED": "False",
        "FAKE_UPSTREAM_URL": upstream.base_url,
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": "x",
        "OPENAI_MODEL": "fake?tokens=4",
        "AGENT_TOOLS_MODEL": AGENT_SCENARIO,
    }
    command = [sys.executable, "-m", "haystream", "serve", "--port", str(port), "--pipelines-dir", str(pipelines)]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:
            if "Application startup complete" in line:
                break
        else:
            pytest.fail(f"haystream serve exited with {process.wait()}")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(20)


@pytest.fixture(scope="session")
def openwebui(haystream_url, tmp_path_factory) -> str:
    """The real Open WebUI, headless and offline, with haystream as its OpenAI connection."""
    executable = open_webui_executable()
    port = free_port()
    data = tmp_path_factory.mktemp("openwebui-data")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "VIRTUAL_ENV"))},
        "WEBUI_AUTH": "False",
        "ENABLE_OLLAMA_API": "False",
        "OLLAMA_BASE_URL": "http://127.0.0.1:9",
        "OPENAI_API_BASE_URL": f"{haystream_url}/openwebui/v1",
        "OPENAI_API_KEY": "x",
        "OFFLINE_MODE": "True",
        "HF_HUB_OFFLINE": "1",
        "RAG_EMBEDDING_ENGINE": "openai",
        "ENABLE_VERSION_UPDATE_CHECK": "False",
        "DATA_DIR": str(data),
        "WEBUI_SECRET_KEY": secrets.token_hex(16),
        "ANONYMIZED_TELEMETRY": "False",
        "DO_NOT_TRACK": "True",
        "SCARF_NO_ANALYTICS": "true",
    }
    log = open(data / "openwebui.log", "w")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(
        [str(executable), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=data,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/health", process, timeout=240)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="session")
def webui_token(openwebui) -> str:
    response = httpx.post(
        openwebui + "/api/v1/auths/signin", json={"email": "admin@localhost", "password": "admin"}, timeout=60
    )
    response.raise_for_status()
    return response.json()["token"]
