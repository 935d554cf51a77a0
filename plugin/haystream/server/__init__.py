"""The ASGI server: haystream's OpenAI routes in front of hayhooks' app."""

from haystream.server.app import HaystreamApp, create_app
from haystream.settings import ServerSettings

__all__ = ["HaystreamApp", "ServerSettings", "create_app"]
