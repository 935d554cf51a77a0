"""Helpers shared by the test modules (import them from here: every conftest.py is a module named `conftest`)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from haystream.server import ServerSettings, create_app
from haystream.testing import FakeUpstream, ServerThread

WRAPPERS_DIR = Path(__file__).parent / "wrappers"
OPS_WRAPPERS = Path(__file__).parent / "ops_wrappers"  # one wrapper, `scenario`, for the operations tests


def start_server(upstream: FakeUpstream, **settings) -> ServerThread:
    """haystream's app (hayhooks inside) under a real uvicorn on loopback, serving tests/wrappers."""
    os.environ["FAKE_UPSTREAM_URL"] = upstream.base_url
    settings.setdefault("pipelines_dir", str(WRAPPERS_DIR))
    settings.setdefault("gc_freeze", False)  # one process starts many servers: keep its garbage collectable
    settings.setdefault("access_log", False)
    return ServerThread(create_app(ServerSettings(**settings)), lifespan="on").start()


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


def unique(scenario: str = "fake") -> str:
    """`scenario` with a ``run=`` key the fake upstream ignores: `upstream.wait_for_requests(n, model=...)` then finds
    this test's requests only, never a late one of an earlier test on the session's shared fake."""
    return f"{scenario}{'&' if '?' in scenario else '?'}run={uuid.uuid4().hex[:8]}"
