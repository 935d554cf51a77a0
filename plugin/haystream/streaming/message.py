"""Folding a sequence of `StreamingChunk`s into the final `ChatMessage`, whatever provider produced them."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from haystack.dataclasses import ChatMessage, ReasoningContent, StreamingChunk, ToolCall

from haystream.streaming.accumulate import ToolCallAccumulator, UsageAccumulator, usage_dict

__all__ = ["TOOL_CALL_RESULTS", "chunks_to_message", "usage_dict"]

logger = logging.getLogger(__name__)

#: Haystack's Agent marks the end of a tool round with this finish reason; it is not an LLM finish reason.
TOOL_CALL_RESULTS = "tool_call_results"


@dataclass
class _Turn:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: ToolCallAccumulator = field(default_factory=ToolCallAccumulator)
    finish_reason: str | None = None
    usage: UsageAccumulator = field(default_factory=UsageAccumulator)
    model: str | None = None
    started_at: str | None = None


def chunks_to_message(chunks: Iterable[StreamingChunk]) -> ChatMessage:
    """Build the assistant `ChatMessage` that a stream of chunks amounts to.

    Text and reasoning are concatenated; tool-call deltas are merged per call (by `index`, and a new `id` at an
    index already in use starts a new call, as some providers send whole calls); the finish reason is the last one
    given; usage dicts are merged key by key, so split usage (Anthropic's input tokens at the start, output tokens
    at the end) adds up, and a cumulative one (OpenAI's final usage chunk) wins. Chunks of an Agent's tool round
    (`tool_call_result`, finish reason `tool_call_results`) end a turn: the message describes the last model turn.
    Tool calls whose arguments are not valid JSON are dropped with a warning, as Haystack does.
    """
    turn = _Turn()
    for chunk in chunks:
        if chunk.tool_call_result is not None or chunk.finish_reason == TOOL_CALL_RESULTS:
            turn = _Turn()
            continue
        _add_chunk(turn, chunk)
    return _message_from_turn(turn)


def _add_chunk(turn: _Turn, chunk: StreamingChunk) -> None:
    if turn.started_at is None:
        turn.started_at = chunk.meta.get("received_at")
    if chunk.content:
        turn.text.append(chunk.content)
    if chunk.reasoning is not None and chunk.reasoning.reasoning_text:
        turn.reasoning.append(chunk.reasoning.reasoning_text)
    for delta in chunk.tool_calls or ():
        turn.tool_calls.add(delta.index, delta.id, delta.tool_name, delta.arguments)
    if chunk.finish_reason:
        turn.finish_reason = chunk.finish_reason
    turn.usage.add(chunk.meta.get("usage"))
    if chunk.meta.get("model"):
        turn.model = chunk.meta["model"]


def _message_from_turn(turn: _Turn) -> ChatMessage:
    tool_calls = []
    for call in turn.tool_calls:
        try:
            arguments = json.loads(call.arguments) if call.arguments.strip() else {}
        except json.JSONDecodeError:
            logger.warning("Dropping tool call %s (%s): its arguments are not valid JSON", call.id, call.name)
            continue
        tool_calls.append(ToolCall(tool_name=call.name, arguments=arguments, id=call.id))
    reasoning = ReasoningContent(reasoning_text="".join(turn.reasoning)) if turn.reasoning else None
    meta = {
        "model": turn.model,
        "index": 0,
        "finish_reason": turn.finish_reason,
        "completion_start_time": turn.started_at,
        "usage": turn.usage.turn or None,
    }
    return ChatMessage.from_assistant(
        text="".join(turn.text) or None, tool_calls=tool_calls, reasoning=reasoning, meta=meta
    )
