"""Prometheus metrics for chat traffic, served at `/metrics` (behind the gate: it needs a key when keys are set).

Names follow what operators know from vLLM and LiteLLM (`haystream_time_to_first_token_seconds`,
`haystream_inter_token_latency_seconds`, `haystream_e2e_request_latency_seconds`). With several workers, set
`PROMETHEUS_MULTIPROC_DIR` (`haystream serve --workers N` does) and every worker's samples are aggregated.

Cost on the hot path: `ChatObservation.send` sees each message once; per chunk it takes one `perf_counter()` and
makes one `Histogram.observe()` (inter-token latency). Chunk and token counts are summed locally and added once per
request.
"""

from __future__ import annotations

import contextlib
import os
import time

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from haystream.openai import PING
from haystream.server.asgi import Message, Send

# Latency buckets as vLLM uses them (seconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)

REQUESTS = Counter(
    "haystream_requests", "Chat requests answered, by model, route and HTTP status.", ["model", "route", "status"]
)
ACTIVE = Gauge("haystream_active_streams", "Chat requests running now.", multiprocess_mode="livesum")
TTFT = Histogram("haystream_time_to_first_token_seconds", "Time to the first chunk.", ["model"], buckets=_TTFT_BUCKETS)
ITL = Histogram("haystream_inter_token_latency_seconds", "Time between chunks.", ["model"], buckets=_ITL_BUCKETS)
E2E = Histogram(
    "haystream_e2e_request_latency_seconds", "Time to the end of the answer.", ["model"], buckets=_E2E_BUCKETS
)
CHUNKS = Counter("haystream_chunks", "Chunks streamed to clients.", ["model"])
COMPLETION_TOKENS = Counter(
    "haystream_completion_tokens", "Completion tokens (the provider's usage, else the chunk count).", ["model"]
)
CANCELLED = Counter("haystream_client_cancellations", "Chat requests whose client left before the end.", ["model"])
UPSTREAM_ERRORS = Counter("haystream_upstream_errors", "Chat requests whose pipeline or provider failed.", ["model"])
REJECTED = Counter("haystream_admission_rejections", "Chat requests refused with 429 (admission caps).")
DRAINING = Gauge("haystream_draining", "1 while the server drains for shutdown.", multiprocess_mode="max")

_ERROR_FRAME = b'data: {"error"'
_USAGE = b'"usage":{'


def scrape() -> tuple[bytes, str]:
    """The metrics page and its content type (aggregated over workers in multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


class _ModelSeries:
    """One model's labelled series, looked up once: each `labels()` call takes a lock and builds a key (~10 µs of a
    request's CPU for the seven a request touched). The models are the deployed wrappers', so they are few."""

    __slots__ = (
        "_model",
        "_requests",
        "cancelled",
        "chunks",
        "completion_tokens",
        "e2e",
        "itl",
        "ttft",
        "upstream_errors",
    )

    def __init__(self, model: str) -> None:
        self._model = model
        self._requests: dict[tuple[str, int], Counter] = {}
        self.itl = ITL.labels(model)
        self.ttft = TTFT.labels(model)
        self.e2e = E2E.labels(model)
        self.chunks = CHUNKS.labels(model)
        self.completion_tokens = COMPLETION_TOKENS.labels(model)
        self.cancelled = CANCELLED.labels(model)
        self.upstream_errors = UPSTREAM_ERRORS.labels(model)

    def requests(self, route: str, status: int) -> Counter:
        child = self._requests.get((route, status))
        if child is None:
            child = self._requests[(route, status)] = REQUESTS.labels(self._model, route, str(status))
        return child


_SERIES: dict[str, _ModelSeries] = {}


def _series(model: str) -> _ModelSeries:
    series = _SERIES.get(model)
    if series is None:
        series = _SERIES[model] = _ModelSeries(model)
    return series


def refused(route: str, status: int, model: str = "") -> None:
    """Count a chat request refused before it ran (bad request, unknown model, admission, drain)."""
    REQUESTS.labels(model, route, str(status)).inc()
    if status == 429:
        REJECTED.inc()


class ChatObservation:
    """Watches the messages of one chat response (via `send`) and records it when `finish()` is called."""

    __slots__ = (
        "_last",
        "_route",
        "_send",
        "_series",
        "_start",
        "chunks",
        "failed",
        "status",
        "tokens",
        "ttft",
    )

    def __init__(self, send: Send, model: str, route: str) -> None:
        self._send = send
        self._route = route
        self._series = _series(model)
        self._start = self._last = time.perf_counter()
        self.ttft: float | None = None
        self.chunks = -1  # the first body message of a stream is the role chunk
        self.status = 0
        self.failed = False
        self.tokens: int | None = None
        ACTIVE.inc()

    async def send(self, message: Message) -> None:
        body = message.get("body")
        if body is not None and body is not PING:
            now = time.perf_counter()
            self.chunks += 1
            if self.ttft is None:
                if self.chunks == 1 or not message.get("more_body", False):
                    self.ttft = now - self._start
            else:
                self._series.itl.observe(now - self._last)
            self._last = now
            if not message.get("more_body", False):
                self._last_body(body)
        elif message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)

    def _last_body(self, body: bytes) -> None:
        if self.status >= 500 or _ERROR_FRAME in body:
            self.failed = True
        position = body.rfind(_USAGE)
        if position >= 0:
            start = body.rfind(b"data: ", 0, position) + len(b"data: ")
            end = body.find(b"\n", position)
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                self.tokens = orjson.loads(body[start:end])["usage"]["completion_tokens"]

    def finish(self, *, cancelled: bool) -> None:
        """Record the request (once)."""
        ACTIVE.dec()
        series = self._series
        series.requests(self._route, self.status or 499).inc()
        series.e2e.observe(time.perf_counter() - self._start)
        if self.ttft is not None and self.status < 400:
            series.ttft.observe(self.ttft)
        chunks = max(self.chunks, 0)
        if chunks:
            series.chunks.inc(chunks)
        series.completion_tokens.inc(self.tokens if self.tokens is not None else chunks)
        if cancelled:
            series.cancelled.inc()
        elif self.failed:
            series.upstream_errors.inc()


def draining(on: bool) -> None:
    """Record the drain state."""
    DRAINING.set(1 if on else 0)
