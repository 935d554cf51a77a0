"""Open WebUI's extensions to the stream: event objects, citations, and the markup it renders."""

from __future__ import annotations

import html
from typing import Any

import orjson
from haystack import Document


def event(type: str, data: Any) -> dict[str, Any]:
    """Any Open WebUI event, as a wrapper yields it: `{"event": {"type": ..., "data": ...}}`."""
    return {"event": {"type": type, "data": data}}


def status(description: str, *, done: bool = False, hidden: bool = False) -> dict[str, Any]:
    """A status line above the answer (e.g. "Searching the docs…"); `done=True` marks it finished."""
    return event("status", {"description": description, "done": done, "hidden": hidden})


def notification(content: str, *, level: str = "info") -> dict[str, Any]:
    """A toast: `level` is info, success, warning or error."""
    return event("notification", {"type": level, "content": content})


def message(content: str) -> dict[str, Any]:
    """Append `content` to the answer."""
    return event("message", {"content": content})


def replace(content: str) -> dict[str, Any]:
    """Replace the whole answer with `content`."""
    return event("replace", {"content": content})


def details(summary: str, body: str = "", *, type: str | None = None, **attributes: Any) -> str:
    """A collapsed `<details>` block (Markdown to put into the answer), the way Open WebUI renders tool activity."""
    attrs = "".join(f' {key}="{html.escape(str(value), quote=True)}"' for key, value in attributes.items())
    kind = f' type="{html.escape(type, quote=True)}"' if type else ""
    inner = f"\n{body}\n" if body else ""
    return f"\n<details{kind}{attrs}>\n<summary>{html.escape(summary)}</summary>{inner}\n</details>\n"


def tool_call_block(call_id: str | None, name: str, arguments: dict[str, Any], result: str) -> str:
    """An executed tool call as Open WebUI shows its own: a collapsed block with the arguments and the result."""
    return details(
        "Tool Executed",
        type="tool_calls",
        done="true",
        id=call_id or "",
        name=name,
        arguments=orjson.dumps(arguments).decode(),
        result=orjson.dumps(result).decode(),
    )


def source(document: Document, *, snippet_chars: int = 500) -> dict[str, Any]:
    """A citation for a Haystack `Document`: its name (meta `name`/`title`/`file_path`), URL and a snippet."""
    meta = document.meta or {}
    name = str(meta.get("name") or meta.get("title") or meta.get("file_path") or document.id)
    url = str(meta.get("url") or meta.get("source") or meta.get("file_path") or name)
    metadata: dict[str, Any] = {"source": url, "name": name}
    if document.score is not None:
        metadata["score"] = document.score
    return event(
        "source",
        {
            "source": {"name": name, **({"url": url} if url.startswith(("http://", "https://")) else {})},
            "document": [(document.content or "")[:snippet_chars]],
            "metadata": [metadata],
        },
    )
