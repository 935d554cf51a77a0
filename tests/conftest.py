"""Shared fixtures: a real fake OpenAI-compatible upstream on loopback, and generators pointed at it."""

from __future__ import annotations

import gc

import pytest
from haystack.components.generators.chat import OpenAIChatGenerator
from haystack.utils import Secret

from haystream.testing import FakeUpstream


@pytest.fixture(scope="session")
def upstream() -> FakeUpstream:
    with FakeUpstream() as server:
        yield server


@pytest.fixture
def make_llm(upstream: FakeUpstream):
    """Factory for an `OpenAIChatGenerator` whose behaviour is set by the fake's scenario string."""

    def make(scenario: str = "fake", **kwargs) -> OpenAIChatGenerator:
        kwargs.setdefault("api_key", Secret.from_token("test-key"))
        return OpenAIChatGenerator(api_base_url=upstream.base_url, model=scenario, max_retries=0, timeout=30, **kwargs)

    return make


@pytest.fixture(autouse=True)
def _collect_garbage():
    yield
    gc.collect()
