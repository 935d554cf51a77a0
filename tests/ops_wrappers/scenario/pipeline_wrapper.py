"""Streams whatever fake-upstream scenario the last user message names (e.g. `fake?tokens=10&delay=0.3`); a
`timeout=S` key in it sets the provider client's timeout."""

import os
from functools import cache
from urllib.parse import parse_qsl

from hayhooks import BasePipelineWrapper

import haystream
from haystream.testing import fake_chat_generator


def llm(scenario: str):
    """One generator (and one HTTP client) per scenario, as a real wrapper holds one: requests reuse it."""
    return _llm(scenario, os.environ["FAKE_UPSTREAM_URL"])


@cache  # per fake upstream too: a generator made for a fake that has stopped would fail to connect
def _llm(scenario: str, upstream: str):
    timeout = dict(parse_qsl(scenario.partition("?")[2])).get("timeout")
    return fake_chat_generator(scenario, upstream, **({"timeout": float(timeout)} if timeout else {}))


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict):
        return haystream.astream(
            llm(messages[-1]["content"]), messages=haystream.chat_messages(messages[:-1] or messages)
        )
