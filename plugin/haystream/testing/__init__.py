"""Test helpers for haystream."""

from haystream.testing.fake_upstream import FakeUpstream, UpstreamRecord, parse_scenario

__all__ = ["FakeUpstream", "UpstreamRecord", "parse_scenario"]
