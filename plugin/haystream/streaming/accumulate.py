"""The one place where tool-call pieces and usage reports are added up, whatever provider sent them.

Used by `chunks_to_message` (Haystack chunks into a `ChatMessage`), by the OpenAI wire layer's delta mapper (an
Agent's calls held back from the client) and by its completion builder (`stream: false`), so that all three agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PartialToolCall:
    """A tool call being assembled from deltas."""

    index: int
    id: str | None = None
    name: str = ""
    pieces: list[str] = field(default_factory=list)

    @property
    def arguments(self) -> str:
        """The argument text received so far."""
        return "".join(self.pieces)


class ToolCallAccumulator:
    """Merges tool-call deltas into calls.

    Deltas are matched by `index`; a new `id` at an index already in use starts a new call (providers that send
    whole calls reuse index 0); the first name given wins (later deltas repeat it or send none); argument pieces
    are concatenated in order.
    """

    def __init__(self) -> None:
        self.calls: list[PartialToolCall] = []

    def __bool__(self) -> bool:
        return bool(self.calls)

    def __iter__(self) -> Iterator[PartialToolCall]:
        return iter(self.calls)

    def add(
        self, index: int | None, call_id: str | None = None, name: str | None = None, arguments: str | None = None
    ) -> tuple[PartialToolCall, bool]:
        """Fold one delta in; returns its call and whether this delta gave the call its name."""
        call = self._call_for(index or 0, call_id)
        named = bool(name) and not call.name
        if named:
            call.name = name or ""
        if arguments:
            call.pieces.append(arguments)
        return call, named

    def discard(self, call_id: str | None, name: str) -> None:
        """Forget the calls a tool result answered (matched by id, or by name when the result has no id)."""
        self.calls = [c for c in self.calls if not (c.id == call_id or (call_id is None and c.name == name))]

    def clear(self) -> None:
        """Forget every call."""
        self.calls.clear()

    def _call_for(self, index: int, call_id: str | None) -> PartialToolCall:
        for call in reversed(self.calls):
            if call.index == index:
                if call_id is None or call.id in (None, call_id):
                    call.id = call.id or call_id
                    return call
                break  # same index, new id: the next whole call
        self.calls.append(PartialToolCall(index=index, id=call_id))
        return self.calls[-1]


class UsageAccumulator:
    """Usage reports of one response: merged key by key within a model turn, summed across turns.

    Within a turn, split reports add up (Anthropic's input tokens at the start, output tokens at the end) and a
    cumulative one (OpenAI's final usage chunk) wins. An Agent's run has several turns: their tokens are summed.
    """

    def __init__(self) -> None:
        self.turn: dict[str, Any] = {}
        self._total: dict[str, int] = {}

    def add(self, usage: Any) -> None:
        """Merge one report (a dict or an SDK object) into the current turn."""
        report = usage_dict(usage)
        if report:
            self.turn.update({key: value for key, value in report.items() if value is not None})

    def end_turn(self) -> None:
        """Close the current turn: its tokens count towards the total."""
        if not self.turn:
            return
        prompt = self.turn.get("prompt_tokens", self.turn.get("input_tokens")) or 0
        completion = self.turn.get("completion_tokens", self.turn.get("output_tokens")) or 0
        for key, value in (("prompt_tokens", prompt), ("completion_tokens", completion)):
            self._total[key] = self._total.get(key, 0) + int(value)
        self._total["total_tokens"] = self._total["prompt_tokens"] + self._total["completion_tokens"]
        self.turn = {}

    def total(self) -> dict[str, int]:
        """OpenAI-style usage over every closed turn (empty when nothing was reported)."""
        self.end_turn()
        return dict(self._total)


def usage_dict(usage: Any) -> dict[str, Any] | None:
    """A provider's usage (dict or SDK object) as a plain dict."""
    if usage is None or isinstance(usage, dict):
        return usage
    if hasattr(usage, "model_dump"):
        return usage.model_dump()
    return dict(vars(usage)) if hasattr(usage, "__dict__") else None
