"""Helpers shared by the test modules (import them from here: every conftest.py is a module named `conftest`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from haystream.server import ServerSettings, create_app
from haystream.testing import FakeUpstream, ServerThread

WRAPPERS_DIR = Path(__file__).parent / "wrappers"
OPS_WRAPPERS = Path(__file__).parent / "ops_wrappers"  # one wrapper, `scenario`, for the operations tests


class TestServer(ServerThread):
    """A `ServerThread` whose wrappers reach `upstream`: they read `FAKE_UPSTREAM_URL` at each request, and hayhooks'
    registry is one per process, so the variable is this process's, set while the server runs. `stop()` puts back
    what it was, so that a server started earlier (the session's) does not go on sending its requests to a fake that
    a test module started and has stopped since: which tests failed that way depended on the order they ran in."""

    __test__ = False  # not a test class, whatever pytest makes of its name

    def __init__(self, app: object, upstream: FakeUpstream, previous_url: str | None) -> None:
        super().__init__(app, lifespan="on")
        self._upstream_url = upstream.base_url
        self._previous_url = previous_url

    def start(self) -> TestServer:
        os.environ["FAKE_UPSTREAM_URL"] = self._upstream_url
        try:
            super().start()
        except BaseException:
            self._restore_url()
            raise
        return self

    def stop(self) -> None:
        running = self.loop is not None
        super().stop()
        if running:
            self._restore_url()

    def _restore_url(self) -> None:
        if self._previous_url is None:
            os.environ.pop("FAKE_UPSTREAM_URL", None)
        else:
            os.environ["FAKE_UPSTREAM_URL"] = self._previous_url


def start_server(upstream: FakeUpstream, **settings) -> TestServer:
    """haystream's app (hayhooks inside) under a real uvicorn on loopback, serving tests/wrappers."""
    settings.setdefault("pipelines_dir", str(WRAPPERS_DIR))
    settings.setdefault("gc_freeze", False)  # one process starts many servers: keep its garbage collectable
    settings.setdefault("gc_threshold", 0)  # and its collector as the test runner has it
    settings.setdefault("access_log", False)
    previous_url = os.environ.get("FAKE_UPSTREAM_URL")
    os.environ["FAKE_UPSTREAM_URL"] = upstream.base_url  # for wrappers that read it while the app is built
    return TestServer(create_app(ServerSettings(**settings)), upstream, previous_url).start()


@contextlib.contextmanager
def serving(upstream: FakeUpstream, **settings) -> Iterator[ServerThread]:
    """`start_server` for a `with` block (or a fixture): stopped at its end."""
    running = start_server(upstream, **settings)
    try:
        yield running
    finally:
        running.stop()


def sse_events(lines: list[str]) -> list[str]:
    """The `data:` payloads of an SSE body (comments and blank lines dropped)."""
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def sse(body: str) -> list[tuple[str, dict]]:
    """(event name, data) pairs of a Responses SSE body (a line without an `event:` name: "")."""
    pairs = []
    for block in body.split("\n\n"):
        lines = block.splitlines()
        names = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
        data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
        if data:
            pairs.append((names[0] if names else "", orjson.loads(data[0])))
    return pairs


def unique(scenario: str = "fake") -> str:
    """`scenario` with a ``run=`` key the fake upstream ignores: `upstream.wait_for_requests(n, model=...)` then finds
    this test's requests only, never a late one of an earlier test on the session's shared fake."""
    return f"{scenario}{'&' if '?' in scenario else '?'}run={uuid.uuid4().hex[:8]}"


class RedisServer:
    """A real `redis-server` on a loopback port (skips the test if it is not installed); `stop()` and `start()`
    again on the same port stand for an outage."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = tempfile.TemporaryDirectory()
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> RedisServer:
        assert self.binary is not None and self._process is None
        # Tests take a fresh database each (`fresh_database`): more than Redis' default 16.
        options = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", self._workdir.name, "--databases", "64"]
        self._process = subprocess.Popen(
            [self.binary, *options, "--save", "", "--appendonly", "no"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self._process.stdout is not None
        for line in self._process.stdout:  # wait for the server to say it is ready, not for a time
            if "Ready to accept connections" in line:
                return self
        pytest.fail("redis-server exited before it was ready")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def close(self) -> None:
        self.stop()
        self._workdir.cleanup()


@contextlib.contextmanager
def redis_client(url: str) -> Iterator[Any]:
    """A plain (sync) redis-py client of `url`, to look at what the store wrote."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        yield client
    finally:
        client.close()
