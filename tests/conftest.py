"""Shared fixtures: a real fake OpenAI-compatible upstream on loopback, and generators pointed at it."""

from __future__ import annotations

import gc
import os

import openai
import pytest

# No telemetry from Haystack during tests (the machines have no network; retries would only add noise and delay).
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")

from haystack.components.generators.chat import OpenAIChatGenerator

from haystream.testing import FakeUpstream, ServerThread, fake_chat_generator
from support import RedisServer, start_server


@pytest.fixture(scope="session")
def upstream() -> FakeUpstream:
    with FakeUpstream() as server:
        yield server


@pytest.fixture
def make_llm(upstream: FakeUpstream):
    """Factory for an `OpenAIChatGenerator` whose behaviour is set by the fake's scenario string."""

    def make(scenario: str = "fake", **kwargs) -> OpenAIChatGenerator:
        kwargs.setdefault("generation_kwargs", {})
        return fake_chat_generator(scenario, upstream.base_url, timeout=30, **kwargs)

    return make


@pytest.fixture(autouse=True)
def _collect_garbage():
    yield
    gc.collect()


@pytest.fixture(scope="session")
def server(upstream: FakeUpstream) -> ServerThread:
    srv = start_server(upstream)
    yield srv
    srv.stop()


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def aclient(server: ServerThread) -> openai.AsyncOpenAI:
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def redis_url() -> str:
    """A real redis-server for a test module (the test is skipped without one)."""
    redis = RedisServer()
    try:
        yield redis.start().url
    finally:
        redis.close()
