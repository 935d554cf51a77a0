"""Tracing: the span hayhooks' OpenAI router records per chat request, recorded for haystream's own chat path.

hayhooks 2.1 records `hayhooks.openai.run` (tags `hayhooks.transport`, `hayhooks.openai.operation`,
`hayhooks.pipeline.name`, `hayhooks.openai.stream_requested`, `hayhooks.openai.execution_mode`,
`hayhooks.response.streaming`/`stream_type` for streams, and `hayhooks.success`/`error.*`/`http.status_code`/
`elapsed_ms` at the end) through Haystack's tracer, which its tracing setup and dashboard show. haystream's chat
route bypasses that router, so it records the same span with hayhooks' own public helpers, plus haystream's
attributes: `haystream.request_id`, `haystream.ttft_ms`, `haystream.chunks`, `haystream.cancelled`.

One span per request: nothing is done per chunk. None at all when nothing would see it: no Haystack tracer is
enabled (OpenTelemetry, Langfuse, ...) and hayhooks' trace dashboard is off, as it is by default under haystream
(see `create_app`). hayhooks' dashboard buffer costs ~100 µs per span on a busy server.
"""

from __future__ import annotations

import contextvars
from typing import Any

from fastapi import HTTPException
from haystack.tracing import is_tracing_enabled

from haystream._compat import hayhooks_settings, hayhooks_tracing

_tracing = hayhooks_tracing()
# hayhooks' settings object is one per process (`create_app` sets its attributes); importing it cost ~6 µs a request
_HAYHOOKS_SETTINGS = hayhooks_settings()
SPAN_OPENAI_RUN = _tracing.SPAN_OPENAI_RUN
build_streaming_trace_tags = _tracing.build_streaming_trace_tags
build_trace_tags = _tracing.build_trace_tags
start_trace_operation = _tracing.start_trace_operation

_FAILURE: contextvars.ContextVar[list[BaseException] | None] = contextvars.ContextVar(
    "haystream_trace_failure", default=None
)


def recording() -> bool:
    """Whether a span is seen by anyone: an enabled Haystack tracer, or hayhooks' trace dashboard."""
    return is_tracing_enabled() or bool(_HAYHOOKS_SETTINGS.tracing_enabled)


def note_failure(error: BaseException) -> None:
    """Remember why the current chat request failed, for its span (called where failures become error envelopes)."""
    failures = _FAILURE.get()
    if failures is not None and not failures:
        failures.append(error)


def _tags(model: str | None, *, stream: bool, mode: str | None = None) -> dict[str, Any]:
    tags = build_trace_tags(
        {
            "hayhooks.transport": "openai",
            "hayhooks.openai.operation": "run_chat_completion",
            "hayhooks.pipeline.name": model,
            "hayhooks.openai.stream_requested": stream,
            "hayhooks.openai.execution_mode": mode,
        }
    )
    return build_streaming_trace_tags(tags, stream_type="sse") if stream else tags


def record_refusal(status: int, message: str, *, stream: bool | None = None) -> None:
    """A span for a chat request refused before it ran (400, 404, 429, 503...), marked failed with its status."""
    if not recording():
        return
    operation = start_trace_operation(SPAN_OPENAI_RUN, tags=_tags(None, stream=bool(stream)))
    operation.finish(HTTPException(status_code=status, detail=message))


class ChatTrace:
    """The span of one chat request that runs; start it before the run so that pipeline spans nest under it."""

    def __init__(self, model: str, *, stream: bool, mode: str, request_id: str) -> None:
        self._operation: Any = None
        self._failures: list[BaseException] = []
        if not recording():
            return
        tags = _tags(model, stream=stream, mode=mode)
        tags["haystream.request_id"] = request_id
        _FAILURE.set(self._failures)  # the run's tasks inherit this context, so failures land here
        self._operation = start_trace_operation(SPAN_OPENAI_RUN, tags=tags)

    def finish(self, *, status: int, ttft: float | None, chunks: int, cancelled: bool, failed: bool) -> None:
        if self._operation is None:
            return
        span = self._operation.span
        span.set_tag("haystream.chunks", chunks)
        span.set_tag("haystream.cancelled", cancelled)
        if ttft is not None:
            span.set_tag("haystream.ttft_ms", round(ttft * 1000, 3))
        error: BaseException | None = None
        if self._failures:
            error = self._failures[0]
        elif failed or status >= 400:
            error = HTTPException(status_code=status or 500, detail="the chat request failed")
        if status >= 400 and error is not None and not isinstance(error, HTTPException):
            span.set_tag("hayhooks.http.status_code", status)
        self._operation.finish(error)
