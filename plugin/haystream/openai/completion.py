"""Aggregating deltas into one `chat.completion` object for `stream: false`."""

from __future__ import annotations

from typing import Any


class CompletionBuilder:
    """Collects the deltas of a response and builds the non-streaming `chat.completion`."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._tool_calls: dict[int, dict[str, Any]] = {}

    def add(self, delta: dict[str, Any]) -> None:
        """Fold one delta in."""
        if "content" in delta:
            self._content.append(delta["content"])
        if "reasoning_content" in delta:
            self._reasoning.append(delta["reasoning_content"])
        for call in delta.get("tool_calls", ()):
            target = self._tool_calls.setdefault(
                call["index"], {"id": call.get("id"), "type": "function", "function": {"name": "", "arguments": ""}}
            )
            function = call.get("function", {})
            target["function"]["name"] += function.get("name") or ""
            target["function"]["arguments"] += function.get("arguments") or ""

    def build(
        self,
        *,
        id: str,
        created: int,
        model: str,
        finish_reason: str,
        usage: dict[str, int],
    ) -> dict[str, Any]:
        """The `chat.completion` object (`usage` left out when the pipeline reported none: zeros would be a lie)."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self._content) or None, "refusal": None}
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        if self._tool_calls:
            message["tool_calls"] = [self._tool_calls[index] for index in sorted(self._tool_calls)]
        elif message["content"] is None:
            message["content"] = ""
        completion = {
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        }
        if usage:
            completion["usage"] = usage
        return completion
