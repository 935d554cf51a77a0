"""Open WebUI's background tasks (title, tags, follow-ups, queries, autocomplete, emoji), answered without the
user's pipeline.

Open WebUI sends them through the same chat endpoint as chat turns, as one user message built from a template that
starts with `### Task:`, and parses a JSON object out of the reply. Running a RAG pipeline or an agent for a chat
title wastes time and often returns prose that Open WebUI cannot parse; a fast deterministic answer in the expected
shape is the default (`HAYSTREAM_OPENWEBUI_TASKS=heuristic`). `wrapper` asks the wrapper's own
`run_task(task, messages, body)` (falling back to the heuristic), `pipeline` treats them as ordinary chat turns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

TASK_PREFIX = "### Task:"
KNOWN_TASKS = ("title", "tags", "follow_ups", "queries", "autocomplete", "emoji")

# Client input: every step below is a bounded scan with str.find, linear in the prompt, so a hostile prompt made of
# repeated markers cannot hold the event loop (a backtracking regex over the whole prompt did, for seconds).
_TEMPLATE_SCAN = 16_384  # the task template's instructions and output format sit near the start
_HISTORY_SCAN = 65_536  # how much of the chat history a title or query is taken from
_OUTPUT_SHAPE_WITHIN = 80  # where the JSON shape starts after `### Output:` in every task template (≤ 42 chars)
_KEY = re.compile(r'\{\s{0,20}"(\w{1,32})"')
_TURN = re.compile(r"(USER|ASSISTANT):\s?(.*)")
_GREETINGS = frozenset({"hi", "hello", "hey"})
_GREETED = frozenset({"there", "all", "everyone", "folks"})
_LEADING_FILLER = frozenset({"and", "so", "but", "also", "then", "ok", "okay", "well", "please", *_GREETINGS})
_KEY_TO_TASK = {
    "title": "title",
    "tags": "tags",
    "follow_ups": "follow_ups",
    "queries": "queries",
    "text": "autocomplete",
}


@dataclass(frozen=True)
class Task:
    """A recognised background task and the chat history it is about."""

    kind: str
    history: list[tuple[str, str]]  # (role, text) pairs, oldest first

    @property
    def user_texts(self) -> list[str]:
        """The user's messages in the history."""
        return [text for role, text in self.history if role == "user"]


def detect_task(messages: list[dict[str, Any]]) -> Task | None:
    """The Open WebUI task a request carries, or None for an ordinary chat turn."""
    if not messages or messages[-1].get("role") != "user":
        return None
    prompt = _text(messages[-1].get("content"))
    if not prompt[:1000].lstrip().startswith(TASK_PREFIX):
        return None
    kind = _output_kind(prompt[:_TEMPLATE_SCAN]) or _named_kind(prompt[:1000])
    if kind is None:
        return None
    return Task(kind=kind, history=_history(prompt))


def heuristic_answer(task: Task) -> str:
    """A fast, deterministic reply in the JSON shape Open WebUI parses for `task`."""
    if task.kind == "title":
        return _json({"title": _title(task)})
    if task.kind == "tags":
        return _json({"tags": ["General"]})  # the template's own rule for short or mixed chats
    if task.kind == "follow_ups":
        return _json({"follow_ups": []})  # nothing invented: Open WebUI then shows no suggestions
    if task.kind == "queries":
        last = task.user_texts[-1] if task.user_texts else ""
        return _json({"queries": [last] if last else []})
    if task.kind == "autocomplete":
        return _json({"text": ""})
    return "💬"


def answer_as_text(answer: Any) -> str:
    """A `run_task` return value (str or JSON-able object) as reply text."""
    return answer if isinstance(answer, str) else _json(answer)


def _title(task: Task) -> str:
    # The first thing the user asked, trimmed: what a person would call the chat, and never invented.
    source = task.user_texts[0] if task.user_texts else (task.history[0][1] if task.history else "")
    said = source.split("\n", 1)[0].split()
    words = list(said)
    while words and words[0].strip(",.!?;:").lower() in _LEADING_FILLER:
        greeting = words.pop(0).strip(",.!?;:").lower() in _GREETINGS
        if greeting and words and words[0].strip(",.!?;:").lower() in _GREETED:
            words.pop(0)  # "Hello there, how do I …": the title starts at the question, not at "There"
    title = " ".join((words or said)[:7]).strip(" ,.!?;:")  # only a greeting: the greeting is the title
    return (title[:1].upper() + title[1:])[:60] or "New Chat"


def _named_kind(head: str) -> str | None:
    """The task its first lines name, for templates without a JSON `### Output:` line: the emoji one, and
    autocompletion, whose JSON shape sits under `### **Output Rules**:` (its `#### Output:` ends the prompt)."""
    task_line = " ".join(head.strip().splitlines()[:2]).lower()
    if "emoji" in task_line:
        return "emoji"
    if "autocompletion" in task_line:
        return "autocomplete"
    return None


def _output_kind(template: str) -> str | None:
    """The task named by the JSON key that the template's `### Output:` line asks for."""
    at = template.find("Output:")
    while at >= 0:
        if template[max(0, at - 8) : at].rstrip().endswith("###"):
            # The JSON shape follows the marker at once ("JSON format: {", "Strictly return in JSON format:\n{").
            # Open WebUI's RAG template has an `### Output:` of prose instead, then the user's files: the first
            # brace found further on belongs to an attached document (a JSON file starting `{"title": ...`) and
            # made that chat turn a title task, answered without running the pipeline.
            brace = template.find("{", at, at + _OUTPUT_SHAPE_WITHIN)
            key = _KEY.match(template, brace) if brace >= 0 else None  # anchored at one position: constant work
            return _KEY_TO_TASK.get(key.group(1)) if key else None
        at = template.find("Output:", at + 7)
    return None


def _history(prompt: str) -> list[tuple[str, str]]:
    start = prompt.find("<chat_history>")
    if start < 0:
        return []
    start += len("<chat_history>")
    end = prompt.find("</chat_history>", start)
    body = prompt[start : end if end >= 0 else len(prompt)][:_HISTORY_SCAN]
    # A turn's lines are joined once at the end: appending each to the text so far copied the turn again for every
    # line, quadratic in a long multi-line turn (~60 ms of the event loop at the scan's limit).
    turns: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        stripped = line.strip()
        turn = _TURN.match(stripped)
        if turn:
            turns.append((turn.group(1).lower(), [turn.group(2).strip()]))
        elif turns and stripped:
            turns[-1][1].append(stripped)
    return [(role, "\n".join(lines)) for role, lines in turns]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # Only string `text` fields: any part may carry other keys (an image part's `"text": null` is the client's).
        return "".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()
