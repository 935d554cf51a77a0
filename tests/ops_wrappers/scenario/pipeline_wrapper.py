"""Streams whatever fake-upstream scenario the last user message names (e.g. `fake?tokens=10&delay=0.3`); a
`timeout=S` key in it sets the provider client's timeout."""

from functools import cache
from urllib.parse import parse_qsl

from hayhooks import BasePipelineWrapper

import haystream
from haystream.testing import fake_chat_generator


@cache
def llm(scenario: str):
    """One generator (and one HTTP client) per scenario, as a real wrapper holds one: requests reuse it."""
    timeout = dict(parse_qsl(scenario.partition("?")[2])).get("timeout")
    return fake_chat_generator(scenario, **({"timeout": float(timeout)} if timeout else {}))


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict):
        return haystream.astream(
            llm(messages[-1]["content"]), messages=haystream.chat_messages(messages[:-1] or messages)
        )
