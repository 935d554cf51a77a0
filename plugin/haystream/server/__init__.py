"""The ASGI server: haystream's OpenAI routes in front of hayhooks' app."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from haystream.settings import ServerSettings

if TYPE_CHECKING:
    from haystream.server.app import HaystreamApp, create_app

__all__ = ["HaystreamApp", "ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    # The app imports hayhooks, whose logger takes `sys.stderr` as it is at import. Importing a submodule of this
    # package (the worker entry point, say) must not import it before the process has set its output up.
    if name in ("HaystreamApp", "create_app"):
        from haystream.server import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
