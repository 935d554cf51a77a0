"""How the activity inside a run (an Agent calling its tools) is shown: to Open WebUI as status lines and its own
collapsed tool blocks, to plain clients as nothing or a short text line. Never as client-side `tool_calls`, which
Open WebUI would try to execute."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from haystream.openai.deltas import Event, ToolActivity, ToolCallStarted
from haystream.openai.protocol import Delta
from haystream.openwebui.events import tool_call_block

ToolStyle = Literal["details", "text", "none"]
_ASKED = (b"1", b"true", b"yes")
_BLOCK_START = '<details type="tool_calls"'  # how `tool_call_block` starts
_BLOCK_END = "</details>"  # its attributes and summary are HTML-escaped: the first one after the start ends it


@dataclass(frozen=True)
class ClientStyle:
    """What one client gets: Open WebUI event lines or not, and how an agent's tool calls appear."""

    events: bool = False
    tool_style: ToolStyle = "none"

    def history(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A conversation from this client as a wrapper gets it, chat `messages` or Responses `input` items alike:
        without the tool blocks this client was shown in earlier answers (see `without_tool_blocks`)."""
        return without_tool_blocks(messages) if self.tool_style == "details" else messages


PLAIN_CLIENT = ClientStyle()  # an OpenAI client: no event lines, no tool activity


def client_style(
    headers: Iterable[tuple[bytes, bytes]], *, for_openwebui: bool, events_mode: str, tool_trace: str
) -> ClientStyle:
    """The style for a request: Open WebUI is recognised by its base path (`/openwebui/v1`) or its `X-OpenWebUI-*`
    headers; `X-Haystream-Events: true` asks for event lines; `events_mode` (auto, always, never) overrides."""
    is_openwebui = for_openwebui
    asked = False
    for name, value in headers:
        is_openwebui = is_openwebui or name.startswith(b"x-openwebui-")
        asked = asked or (name == b"x-haystream-events" and value.lower() in _ASKED)
    events = events_mode == "always" or (events_mode == "auto" and (is_openwebui or asked))
    tool_style: ToolStyle = "details" if events and is_openwebui else ("text" if tool_trace == "text" else "none")
    return ClientStyle(events=events, tool_style=tool_style)


def render(record: ToolCallStarted | ToolActivity, style: ClientStyle) -> list[Delta | Event]:
    """A tool call's start or its finished activity, as this client sees it."""
    if isinstance(record, ToolCallStarted):
        return [Event("status", {"description": f"Using {record.name}…", "done": False, "hidden": False})]
    shown: list[Delta | Event] = []
    if style.tool_style == "details":
        shown.append({"content": tool_call_block(record.id, record.name, record.arguments, record.result)})
    elif style.tool_style == "text":
        arguments = ", ".join(f"{key}={value!r}" for key, value in record.arguments.items())
        shown.append({"content": f"\n[{record.name}({arguments}) → {record.result}]\n"})
    verb = "failed" if record.error else "done"
    shown.append(Event("status", {"description": f"{record.name} {verb}", "done": True, "hidden": False}))
    return shown


def without_tool_blocks(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation without the tool blocks shown to Open WebUI in earlier answers.

    Open WebUI sends an answer back as it was shown, so the next turn's model read the block's markup (and could
    imitate it) where an OpenAI connection's history holds no such text: the agent's tool calls ran inside the
    pipeline and are not part of the chat. The answer's own text stays. Chat messages and Responses input items
    alike: an assistant's `content` as a string or as text parts (`output_text`); items without a role (function
    calls) are not touched. Messages without a block are kept as they are (the same objects); the scan is linear in
    the content (str.find only)."""
    cleaned = messages
    for at, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str) and _BLOCK_START in content:
            content = _strip_blocks(content)
        elif isinstance(content, list) and any(_has_block(part) for part in content):  # text parts (Responses)
            content = [{**part, "text": _strip_blocks(part["text"])} if _has_block(part) else part for part in content]
        else:
            continue
        if cleaned is messages:
            cleaned = list(messages)
        cleaned[at] = {**message, "content": content}
    return cleaned


def _has_block(part: Any) -> bool:
    return isinstance(part, dict) and isinstance(part.get("text"), str) and _BLOCK_START in part["text"]


def _strip_blocks(text: str) -> str:
    kept: list[str] = []
    position = 0
    while (start := text.find(_BLOCK_START, position)) >= 0:
        end = text.find(_BLOCK_END, start)
        if end < 0:
            break
        kept.append(text[position:start])
        position = end + len(_BLOCK_END)
    kept.append(text[position:])
    return "".join(kept).strip()
