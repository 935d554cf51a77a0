"""Open WebUI event helpers for wrappers: yield them next to chunks (sync or async wrappers alike).

Each helper returns `{"event": {"type": ..., "data": ...}}` (or, for `details`, Markdown text). haystream sends
event lines only to clients that render them (Open WebUI); plain OpenAI clients never see them.
"""

from __future__ import annotations

from typing import Any

from haystack import Document

from haystream.openai.webui import details, event, message, notification, replace, status, tool_call_block

__all__ = ["details", "event", "message", "notification", "replace", "source", "status", "tool_call_block"]


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
