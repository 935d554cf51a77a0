"""From what wrappers yield to OpenAI `delta` objects.

Wrappers yield `str`, Haystack `StreamingChunk`s or `ChatMessage`s, hayhooks `PipelineEvent`s, Open WebUI event dicts
(`{"event": {...}}`) or ready OpenAI chunk dicts (`{"choices": [...]}`); `None` is nothing, anything else is the
wrapper's mistake and fails the response with a message naming it (never a silently empty answer). `DeltaMapper`
turns each into zero or more deltas (`{"content": ...}`, `{"reasoning_content": ...}`, `{"tool_calls": [...]}`) or
events, and keeps what the end of the response needs: one finish reason, summed usage, and tool calls that turned
out to be for the client.

Tool calls are held back until it is clear who they are for: an Agent's own calls are followed by their results
(`tool_call_result` chunks) and are never sent as client-side `tool_calls` (a client such as Open WebUI would try to
execute them); calls that end the run unanswered are the client's and are sent before the finish chunk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from haystack.dataclasses import ChatMessage, StreamingChunk

from haystream.openai.protocol import Delta, ToolCallDelta
from haystream.streaming.accumulate import ToolCallAccumulator, UsageAccumulator
from haystream.streaming.message import TOOL_CALL_RESULTS

OPENAI_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})


@dataclass
class Event:
    """An Open WebUI event (`{"type": ..., "data": ...}`); not an OpenAI chunk."""

    type: str
    data: Any


@dataclass
class ToolCallStarted:
    """A tool call whose name just arrived: who it is for is not known yet (shown as activity, never sent)."""

    id: str | None
    name: str


@dataclass
class ToolActivity:
    """A tool call that ran inside the run (an Agent's), with its result: shown to people, never a client call."""

    id: str | None
    name: str
    arguments: dict[str, Any]
    result: str
    error: bool


class DeltaMapper:
    """Stateful translation of one response's items into OpenAI deltas."""

    def __init__(self) -> None:
        self._finish_reason: str | None = None
        self._pending = ToolCallAccumulator()  # calls not yet known to be the client's
        self._usage = UsageAccumulator()

    def feed(self, item: Any) -> list[Delta | Event | ToolCallStarted | ToolActivity]:
        """The deltas (and events) that one item amounts to, in order."""
        if isinstance(item, StreamingChunk):
            return self._chunk(item)
        if isinstance(item, str):
            return [{"content": item}] if item else []
        if isinstance(item, dict):
            return self._dict(item)
        if isinstance(item, ChatMessage):
            return self._message(item)
        if callable(getattr(item, "to_event_dict", None)):
            # hayhooks' PipelineEvent and its subclasses (OpenWebUIEvent, ...), and anything shaped like them: the
            # duck typing hayhooks' own OpenAI router uses.
            event = item.to_event_dict()
            return [Event(str(event.get("type", "")), _plain(event.get("data")))]
        if item is None:
            return []
        if isinstance(item, BaseException):
            raise item  # yielded rather than raised: the wrapper's failure all the same
        raise TypeError(f"the wrapper gave {_describe(item)}; {_SUPPORTED}")

    def finish(self) -> tuple[list[Delta], str, dict[str, int]]:
        """At the end: client-facing tool-call deltas still pending, the finish reason, and the usage."""
        tool_deltas = self._release_pending()
        finish_reason = "tool_calls" if tool_deltas else self._finish_reason or "stop"
        if finish_reason == "tool_calls" and not tool_deltas:
            finish_reason = "stop"  # the calls were an agent's own, answered inside the run
        return tool_deltas, finish_reason, self._usage.total()

    def _chunk(self, chunk: StreamingChunk) -> list[Delta | Event | ToolCallStarted | ToolActivity]:
        out: list[Delta | Event | ToolCallStarted | ToolActivity] = []
        if chunk.meta:
            self._usage.add(chunk.meta.get("usage"))
        if chunk.tool_call_result is not None:
            return self._tool_result(chunk)
        if chunk.tool_calls:
            for delta in chunk.tool_calls:
                call, named = self._pending.add(delta.index, delta.id, delta.tool_name, delta.arguments)
                if named:
                    out.append(ToolCallStarted(call.id, call.name))
        elif self._pending and (chunk.content or chunk.reasoning):
            # The model went on talking after its calls without a result in between: they were not the client's.
            self._pending.clear()
        if chunk.content:
            out.append({"content": chunk.content})
        if chunk.reasoning is not None and chunk.reasoning.reasoning_text:
            out.append({"reasoning_content": chunk.reasoning.reasoning_text})
        if chunk.finish_reason:
            if chunk.finish_reason == TOOL_CALL_RESULTS:
                self._pending.clear()
            elif chunk.finish_reason in OPENAI_FINISH_REASONS:
                self._finish_reason = chunk.finish_reason
            self._usage.end_turn()
        return out

    def _tool_result(self, chunk: StreamingChunk) -> list[Delta | Event | ToolCallStarted | ToolActivity]:
        # Answered inside the run: that call was the agent's, not the client's.
        result = chunk.tool_call_result
        assert result is not None
        origin = result.origin
        self._pending.discard(origin.id, origin.tool_name)
        return [ToolActivity(origin.id, origin.tool_name, origin.arguments, str(result.result), bool(result.error))]

    def _message(self, message: ChatMessage) -> list[Delta | Event | ToolCallStarted | ToolActivity]:
        # A whole reply (`result["llm"]["replies"][0]`): its text, reasoning and tool calls, as one chunk's.
        out: list[Delta | Event | ToolCallStarted | ToolActivity] = []
        if message.text:
            out.append({"content": message.text})
        if message.reasoning is not None and message.reasoning.reasoning_text:
            out.append({"reasoning_content": message.reasoning.reasoning_text})
        for call in message.tool_calls:
            arguments = json.dumps(call.arguments)
            pending, named = self._pending.add(len(self._pending.calls), call.id, call.tool_name, arguments)
            if named:
                out.append(ToolCallStarted(pending.id, pending.name))
        return out

    def _dict(self, item: dict[str, Any]) -> list[Delta | Event | ToolCallStarted | ToolActivity]:
        if "event" in item and isinstance(item["event"], dict):
            event = item["event"]
            return [Event(str(event.get("type", "")), event.get("data"))]
        if "type" in item and "data" in item and "choices" not in item:
            return [Event(str(item["type"]), item["data"])]
        choices = item.get("choices")
        if choices is None and "usage" not in item:
            raise TypeError(f"the wrapper gave {_describe(item)}; {_SUPPORTED}")
        if choices is not None and not (isinstance(choices, list) and all(isinstance(c, dict) for c in choices)):
            raise TypeError("the wrapper gave an OpenAI chunk dict whose choices are not dicts")
        out: list[Delta | Event | ToolCallStarted | ToolActivity] = []
        for choice in choices or ():
            delta = choice.get("delta") or choice.get("message") or {}
            if delta.get("content"):
                out.append({"content": delta["content"]})
            if delta.get("reasoning_content"):
                out.append({"reasoning_content": delta["reasoning_content"]})
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                self._pending.add(call.get("index", 0), call.get("id"), function.get("name"), function.get("arguments"))
            if choice.get("finish_reason") in OPENAI_FINISH_REASONS:
                self._finish_reason = choice["finish_reason"]
        self._usage.add(item.get("usage"))
        return out

    def _release_pending(self) -> list[Delta]:
        deltas: list[Delta] = []
        for position, call in enumerate(self._pending):
            call_id = call.id or f"call_{position}"
            if not call.name:  # OpenAI's calls always name their function: a client could only fail to run it
                raise ValueError(f"the model's tool call {call_id} names no function")
            first: ToolCallDelta = {
                "index": position,
                "id": call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            deltas.append({"tool_calls": [first]})
            for piece in call.pieces:
                deltas.append({"tool_calls": [{"index": position, "function": {"arguments": piece}}]})
        self._pending.clear()
        return deltas


_SUPPORTED = "haystream sends str, StreamingChunk, ChatMessage, OpenAI chunk dicts and events"


def _describe(item: Any) -> str:
    if isinstance(item, dict):
        keys = ", ".join(repr(key) for key in list(item)[:5])
        return f"a dict with keys [{keys}], neither an OpenAI chunk nor an event (a Pipeline.run result?)"
    return f"an item of type {type(item).__name__}"


def _plain(data: Any) -> Any:
    return data.model_dump() if hasattr(data, "model_dump") else data
