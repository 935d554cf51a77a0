"""Streams three tokens from the fake upstream, which then fails: how does the client show it?"""

import os

from hayhooks import BasePipelineWrapper
from haystack.components.generators.chat import OpenAIChatGenerator
from haystack.utils import Secret

import haystream


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        self.llm = OpenAIChatGenerator(
            api_key=Secret.from_token("x"),
            api_base_url=os.environ["FAKE_UPSTREAM_URL"],
            model="fake?tokens=20&fail_after=3&delay=0.05",
            max_retries=0,
        )

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict):
        return haystream.astream(self.llm, messages=haystream.chat_messages(messages))
