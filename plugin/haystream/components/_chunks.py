"""OpenAI `chat.completion.chunk` dicts → Haystack `StreamingChunk`s, as Haystack's `OpenAIChatGenerator` builds
them (`_convert_chat_completion_chunk_to_streaming_chunk`), from plain dicts instead of SDK models.

Differences, on purpose: reasoning deltas (`reasoning_content`, or `reasoning` as vLLM and OpenRouter send it)
become chunks with `reasoning` (Haystack's drops them); `meta["tool_calls"]`, `meta["usage"]` and
`meta["logprobs"]` hold the upstream's dicts (usage completed to the SDK's shape) rather than SDK objects.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from haystack.dataclasses import ComponentInfo, ReasoningContent, StreamingChunk, ToolCallDelta
from openai.types import CompletionUsage
from pydantic import ValidationError

_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}
_EMPTY: dict[str, Any] = {}


def _field_defaults() -> dict[str, Any] | None:
    if not dataclasses.is_dataclass(StreamingChunk) or hasattr(StreamingChunk, "__slots__"):
        return None
    defaults = {}
    for field in dataclasses.fields(StreamingChunk):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.name not in ("content", "meta"):  # the two every chunk here is given
            return None
    return defaults


_CHUNK_DEFAULTS = _field_defaults()


def new_chunk(**fields: Any) -> StreamingChunk:
    """`StreamingChunk(**fields)` for fields that already satisfy its checks (one kind of payload; `index` with any
    non-text payload), and `content` and `meta` always given. Haystack's constructor sets each field through its
    mutation-tracking `__setattr__` and validates after: ~3 µs per chunk, a tenth of that here, for an equal chunk.
    Falls back to the constructor if `StreamingChunk` stops being a plain dataclass with those defaults."""
    if _CHUNK_DEFAULTS is None:
        return StreamingChunk(**fields)
    chunk = object.__new__(StreamingChunk)
    state = chunk.__dict__
    state.update(_CHUNK_DEFAULTS)
    state.update(fields)
    return chunk


def usage_meta(usage: Any) -> Any:
    """Usage as Haystack's generator reports it (`CompletionUsage.model_dump()`); once per stream, not per chunk."""
    if not isinstance(usage, dict):
        return usage
    try:
        return CompletionUsage.model_validate(usage).model_dump()
    except ValidationError:
        return usage


class ChunkBuilder:
    """Builds the `StreamingChunk`s of one streamed completion (it keeps the few facts that span chunks)."""

    __slots__ = ("_component_info", "_count", "_reasoning_seen", "_text_started")

    def __init__(self, component_info: ComponentInfo) -> None:
        self._component_info = component_info
        self._count = 0
        self._reasoning_seen = False
        self._text_started = False

    def build(self, data: dict[str, Any]) -> tuple[StreamingChunk, ...]:
        """The chunk(s) for one event: one, or two when a delta carries both reasoning and text."""
        usage = data.get("usage")
        if usage is not None:
            usage = usage_meta(usage)
        choices = data.get("choices")
        if not choices:
            self._count += 1
            meta = {"model": data.get("model"), "received_at": datetime.now().isoformat(), "usage": usage}
            return (new_chunk(content="", component_info=self._component_info, meta=meta),)

        choice = choices[0]
        delta = choice.get("delta") or _EMPTY
        raw_finish = choice.get("finish_reason")
        finish_reason = _FINISH_REASONS.get(raw_finish) if raw_finish else None
        received_at = datetime.now().isoformat()
        tool_calls = delta.get("tool_calls")
        if tool_calls:
            deltas = []
            for call in tool_calls:
                function = call.get("function")
                deltas.append(
                    ToolCallDelta(
                        index=call.get("index", 0),
                        id=call.get("id"),
                        tool_name=function.get("name") if function else None,
                        arguments=(function.get("arguments") or None) if function else None,
                    )
                )
            self._count += 1
            meta = {
                "model": data.get("model"),
                "index": choice.get("index", 0),
                "tool_calls": tool_calls,
                "finish_reason": raw_finish,
                "received_at": received_at,
                "usage": usage,
            }
            return (
                new_chunk(
                    content=delta.get("content") or "",
                    component_info=self._component_info,
                    index=deltas[0].index,
                    tool_calls=deltas,
                    start=deltas[0].tool_name is not None,
                    finish_reason=finish_reason,
                    meta=meta,
                ),
            )

        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        content = delta.get("content")
        reasoning_chunk = None
        if reasoning and isinstance(reasoning, str):
            reasoning_chunk = new_chunk(
                content="",
                component_info=self._component_info,
                index=0,
                reasoning=ReasoningContent(reasoning_text=reasoning),
                start=not self._reasoning_seen,
                finish_reason=None if content else finish_reason,
                meta={
                    "model": data.get("model"),
                    "index": choice.get("index", 0),
                    "tool_calls": None,
                    "finish_reason": None if content else raw_finish,
                    "received_at": received_at,
                    "usage": None if content else usage,
                },
            )
            self._reasoning_seen = True
            self._count += 1
            if not content:
                return (reasoning_chunk,)

        # Haystack: the role chunk and chunks without content have no content block; text is block 0 (here block 1
        # after a reasoning block), and the second chunk of the stream starts it.
        if content is None or delta.get("role") is not None:
            index = None
            start = self._count == 1 and not self._reasoning_seen
        elif self._reasoning_seen:
            index = 1
            start = not self._text_started
        else:
            index = 0
            start = self._count == 1
        if content:
            self._text_started = True
        meta = {
            "model": data.get("model"),
            "index": choice.get("index", 0),
            "tool_calls": None,
            "finish_reason": raw_finish,
            "received_at": received_at,
            "usage": usage,
        }
        logprobs = choice.get("logprobs")
        if logprobs:
            meta["logprobs"] = logprobs
        self._count += 1
        chunk = new_chunk(
            content=content or "",
            component_info=self._component_info,
            index=index,
            start=start,
            finish_reason=finish_reason,
            meta=meta,
        )
        return (chunk,) if reasoning_chunk is None else (reasoning_chunk, chunk)


class ChunkLog:
    """The chunks of one stream, kept for folding into the reply at its end, in a fraction of their memory.

    Haystack's generator keeps every chunk (~600 bytes each: a 2,000-token answer holds 1.2 MB until it ends). Here
    a run of plain-text chunks (no tool call, reasoning, finish reason, usage or logprobs) is kept as its strings and
    becomes one chunk again when the run ends: Haystack's folding (`_compat.fold_chunks_like_haystack`) joins the
    text, takes the first chunk's `received_at` and the last one's `model`, and reads nothing else of such chunks,
    so the reply is the same.
    """

    __slots__ = ("_chunks", "_run_first", "_run_last", "_run_texts")

    def __init__(self) -> None:
        self._chunks: list[StreamingChunk] = []
        self._run_first: StreamingChunk | None = None
        self._run_last: StreamingChunk | None = None
        self._run_texts: list[str] = []

    def add(self, chunk: StreamingChunk) -> None:
        meta = chunk.meta
        if (
            chunk.tool_calls
            or chunk.reasoning is not None
            or chunk.finish_reason is not None
            or chunk.tool_call_result is not None
            or meta.get("usage") is not None
            or meta.get("logprobs")
        ):
            self._end_run()
            self._chunks.append(chunk)
            return
        if self._run_first is None:
            self._run_first = chunk
        self._run_last = chunk
        self._run_texts.append(chunk.content)

    def chunks(self) -> list[StreamingChunk]:
        """The kept chunks (plain-text runs merged), ready for folding."""
        self._end_run()
        return self._chunks

    def _end_run(self) -> None:
        first, last = self._run_first, self._run_last
        if first is None or last is None:
            return
        if first is last:
            self._chunks.append(first)
        else:
            self._chunks.append(
                new_chunk(
                    content="".join(self._run_texts),
                    component_info=first.component_info,
                    index=first.index,
                    start=first.start,
                    meta={**first.meta, "model": last.meta.get("model")},
                )
            )
        self._run_first = self._run_last = None
        self._run_texts = []
