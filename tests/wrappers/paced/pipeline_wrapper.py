"""A paced answer (5 tokens, 0.3 s apart) whatever the request says: for tests of clients that stream."""

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
            model="fake?tokens=5&delay=0.3",
            max_retries=0,
        )

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict):
        return haystream.astream(self.llm, messages=haystream.chat_messages(messages))
