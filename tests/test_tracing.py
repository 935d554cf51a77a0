"""The `hayhooks.openai.run` span for haystream's chat route: hayhooks' tags, failures marked, haystream's attributes.

hayhooks' own `tests/test_tracing.py` (in its sdist) is run against haystream's app by `tests/hayhooks_tracing/`
when that file is available; these tests make the same checks with haystream's wrappers.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hayhooks.server.utils.live_trace_buffer import clear_live_traces, get_recent_traces
from haystack.tracing import Span, Tracer, disable_tracing, enable_tracing

from support import OPS_WRAPPERS, serving

SPAN = "hayhooks.openai.run"


@dataclass
class RecordedSpan(Span):
    operation_name: str
    tags: dict[str, Any] = field(default_factory=dict)
    parent: RecordedSpan | None = None

    def set_tag(self, key: str, value: Any) -> None:
        self.tags[key] = value


class RecordingTracer(Tracer):
    """Records spans with their tags and parents (like the recording tracer of hayhooks' tests)."""

    def __init__(self) -> None:
        self.spans: list[RecordedSpan] = []
        self.closed: list[RecordedSpan] = []
        self._changed = threading.Condition()
        self._active: contextvars.ContextVar[RecordedSpan | None] = contextvars.ContextVar("active", default=None)

    @contextlib.contextmanager
    def trace(self, operation_name: str, tags: dict[str, Any] | None = None, parent_span: Span | None = None):
        parent = parent_span if isinstance(parent_span, RecordedSpan) else self._active.get()
        span = RecordedSpan(operation_name, dict(tags or {}), parent)
        self.spans.append(span)
        token = self._active.set(span)
        try:
            yield span
        finally:
            self._active.reset(token)
            with self._changed:
                self.closed.append(span)
                self._changed.notify_all()

    def wait_closed(self, operation_name: str, count: int = 1) -> list[RecordedSpan]:
        """The first `count` closed spans named `operation_name`, once they are closed (the server closes a span
        just after the response's last byte, so a client can see the response first)."""

        def named() -> list[RecordedSpan]:
            return [span for span in self.closed if span.operation_name == operation_name]

        with self._changed:
            assert self._changed.wait_for(lambda: len(named()) >= count, timeout=10)
            return named()[:count]

    def current_span(self) -> Span | None:
        return self._active.get()


@pytest.fixture
def tracer() -> Iterator[RecordingTracer]:
    recording = RecordingTracer()
    enable_tracing(recording)
    try:
        yield recording
    finally:
        disable_tracing()


@pytest.fixture
def server(upstream):
    with serving(upstream, pipelines_dir=str(OPS_WRAPPERS)) as running:
        yield running


def chat(scenario: str, *, stream: bool = True, model: str = "scenario") -> dict:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": scenario}]}


def chat_spans(tracer: RecordingTracer) -> list[RecordedSpan]:
    spans = tracer.wait_closed(SPAN)
    assert len([span for span in tracer.spans if span.operation_name == SPAN]) == 1
    return spans


def test_a_stream_records_hayhooks_span_with_haystream_attributes(server, tracer):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post("/v1/chat/completions", json=chat("fake?tokens=4"), headers={"x-request-id": "trace-1"})
        assert answer.status_code == 200
    (span,) = chat_spans(tracer)
    assert span.tags["hayhooks.transport"] == "openai"
    assert span.tags["hayhooks.openai.operation"] == "run_chat_completion"
    assert span.tags["hayhooks.pipeline.name"] == "scenario"
    assert span.tags["hayhooks.openai.stream_requested"] is True
    assert span.tags["hayhooks.openai.execution_mode"] == "async"
    assert span.tags["hayhooks.response.streaming"] is True
    assert span.tags["hayhooks.response.stream_type"] == "sse"
    assert span.tags["hayhooks.success"] is True
    assert span.tags["haystream.request_id"] == "trace-1"
    assert span.tags["haystream.chunks"] >= 4
    assert span.tags["haystream.cancelled"] is False
    assert span.tags["haystream.ttft_ms"] > 0


def test_a_non_streaming_request_has_no_streaming_tags(server, tracer):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/v1/chat/completions", json=chat("fake?tokens=2", stream=False)).status_code == 200
    (span,) = chat_spans(tracer)
    assert "hayhooks.response.streaming" not in span.tags
    assert span.tags["hayhooks.success"] is True


def test_a_stream_that_fails_marks_the_span_failed(server, tracer):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        failed = client.post("/v1/chat/completions", json=chat("fake?tokens=5&fail_after=2"))
        assert '"error"' in failed.text
    (span,) = chat_spans(tracer)
    assert span.tags["hayhooks.success"] is False
    assert span.tags["hayhooks.error.type"] == "APIError"  # the provider's failure, as the openai SDK raised it


def test_an_unknown_model_marks_the_span_failed_with_its_status(server, tracer):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/v1/chat/completions", json=chat("x", model="nope")).status_code == 404
    (span,) = chat_spans(tracer)
    assert span.tags["hayhooks.success"] is False
    assert span.tags["hayhooks.http.status_code"] == 404


def chat_traces() -> list[dict[str, Any]]:
    """The chat traces in hayhooks' dashboard buffer (its startup's deploy traces left out)."""
    return [trace for trace in get_recent_traces(limit=100) if trace["root_span"]["name"] == SPAN]


def test_with_no_tracer_and_no_dashboard_nothing_is_recorded_and_traces_is_not_served(upstream, monkeypatch):
    monkeypatch.delenv("HAYHOOKS_TRACING_ENABLED", raising=False)
    clear_live_traces()
    with serving(upstream, pipelines_dir=str(OPS_WRAPPERS)) as server, httpx.Client(base_url=server.url) as client:
        assert client.post("/v1/chat/completions", json=chat("fake?tokens=2")).status_code == 200
        assert client.get("/traces").status_code == 404
    # The span (had there been one) enters hayhooks' buffer before the response's first byte.
    assert chat_traces() == []


def test_hayhooks_trace_dashboard_shows_chat_requests_when_turned_on(upstream, monkeypatch):
    monkeypatch.setenv("HAYHOOKS_TRACING_ENABLED", "true")
    clear_live_traces()
    with serving(upstream, pipelines_dir=str(OPS_WRAPPERS)) as server, httpx.Client(base_url=server.url) as client:
        answer = client.post("/v1/chat/completions", json=chat("fake?tokens=2"))
        assert answer.status_code == 200
        assert client.get("/traces").status_code != 404
    (trace,) = chat_traces()
    assert {"key": "hayhooks.pipeline.name", "value": "scenario"} in trace["root_span"]["tags"]
