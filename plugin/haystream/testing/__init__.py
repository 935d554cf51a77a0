"""Test helpers for haystream: a fake OpenAI-compatible upstream and a uvicorn server thread."""

from haystream.testing.fake_upstream import FakeUpstream, UpstreamRecord, parse_scenario
from haystream.testing.server_thread import ServerThread

__all__ = ["FakeUpstream", "ServerThread", "UpstreamRecord", "parse_scenario"]
