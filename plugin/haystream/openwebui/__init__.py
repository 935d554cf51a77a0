"""Everything Open WebUI: event helpers for wrappers, answers to its background tasks, and how an agent's activity
is shown to it (and to plain clients).

Wrappers yield the helpers' results next to their chunks (sync or async wrappers alike); each returns
`{"event": {"type": ..., "data": ...}}` (or, for `details`, Markdown text). haystream sends event lines only to
clients that render them (Open WebUI); plain OpenAI clients never see them.
"""

from haystream.openwebui.events import (
    details,
    event,
    message,
    notification,
    replace,
    source,
    status,
    tool_call_block,
)

__all__ = ["details", "event", "message", "notification", "replace", "source", "status", "tool_call_block"]
