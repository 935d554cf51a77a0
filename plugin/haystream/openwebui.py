"""Open WebUI event helpers: yield them from a wrapper next to chunks.

Each helper returns `{"event": {"type": ..., "data": ...}}`. haystream sends these lines only to clients that
render them (Open WebUI); plain OpenAI clients never see them.
"""

from __future__ import annotations

import html
from typing import Any

from haystack import Document


def event(type: str, data: Any) -> dict[str, Any]:
    """Any Open WebUI event."""
    return {"event": {"type": type, "data": data}}


def status(description: str, *, done: bool = False, hidden: bool = False) -> dict[str, Any]:
    """A status line above the answer (e.g. "Searching the docs…"); `done=True` marks it finished."""
    return event("status", {"description": description, "done": done, "hidden": hidden})


def notification(content: str, *, level: str = "info") -> dict[str, Any]:
    """A toast: `level` is info, success, warning or error."""
    return event("notification", {"type": level, "content": content})


def source(document: Document, *, snippet_chars: int = 500) -> dict[str, Any]:
    """A citation for a Haystack `Document`: its name (meta `name`/`file_path`/`title`), URL and a snippet."""
    meta = document.meta or {}
    name = str(meta.get("name") or meta.get("title") or meta.get("file_path") or document.id)
    url = meta.get("url") or meta.get("source") or meta.get("file_path") or name
    snippet = (document.content or "")[:snippet_chars]
    return event(
        "source",
        {
            "source": {"name": name, **({"url": url} if str(url).startswith("http") else {})},
            "document": [snippet],
            "metadata": [{"source": str(url), "name": name, **({"score": document.score} if document.score else {})}],
        },
    )


def message(content: str) -> dict[str, Any]:
    """Append `content` to the answer."""
    return event("message", {"content": content})


def replace(content: str) -> dict[str, Any]:
    """Replace the whole answer with `content`."""
    return event("replace", {"content": content})


def details(summary: str, body: str, *, type: str | None = None, **attributes: Any) -> str:
    """A collapsed `<details>` block (Markdown text to put into the answer), as Open WebUI renders tool activity."""
    attrs = "".join(f' {key}="{html.escape(str(value), quote=True)}"' for key, value in attributes.items())
    kind = f' type="{html.escape(type, quote=True)}"' if type else ""
    return f"\n<details{kind}{attrs}>\n<summary>{html.escape(summary)}</summary>\n\n{body}\n\n</details>\n"
