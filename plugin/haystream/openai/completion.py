"""Aggregating deltas into one `chat.completion` object for `stream: false`."""

from __future__ import annotations

from haystream.openai.protocol import AssistantMessage, ChatCompletion, Delta, Usage
from haystream.streaming.accumulate import ToolCallAccumulator


class CompletionBuilder:
    """Collects the deltas of a response and builds the non-streaming `chat.completion`."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._tool_calls = ToolCallAccumulator()

    def add(self, delta: Delta) -> None:
        """Fold one delta in."""
        if delta.get("content"):
            self._content.append(delta["content"] or "")
        if "reasoning_content" in delta:
            self._reasoning.append(delta["reasoning_content"])
        for call in delta.get("tool_calls", ()):
            function = call["function"]
            self._tool_calls.add(call["index"], call.get("id"), function.get("name"), function.get("arguments"))

    def build(
        self,
        *,
        id: str,
        created: int,
        model: str,
        finish_reason: str,
        usage: Usage | dict[str, int],
    ) -> ChatCompletion:
        """The `chat.completion` object (`usage` left out when the pipeline reported none: zeros would be a lie)."""
        message: AssistantMessage = {"role": "assistant", "content": "".join(self._content) or None, "refusal": None}
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        if self._tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call in self._tool_calls
            ]
        elif message["content"] is None:
            message["content"] = ""
        completion: ChatCompletion = {
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        }
        if usage:
            completion["usage"] = usage  # type: ignore[typeddict-item]  # a complete Usage, summed by the mapper
        return completion
