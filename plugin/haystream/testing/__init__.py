"""Test helpers for haystream: a fake OpenAI-compatible upstream and a uvicorn server thread."""

from haystream.testing.fake_upstream import FakeUpstream, UpstreamRecord, fake_chat_generator, parse_scenario
from haystream.testing.server_thread import ServerThread

__all__ = ["FakeUpstream", "ServerThread", "UpstreamRecord", "fake_chat_generator", "parse_scenario"]
