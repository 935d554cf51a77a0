"""Streams whatever fake-upstream scenario the last user message names (e.g. `fake?tokens=10&delay=0.3`)."""

from hayhooks import BasePipelineWrapper

import haystream
from haystream.testing import fake_chat_generator


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict):
        llm = fake_chat_generator(messages[-1]["content"])
        return haystream.astream(llm, messages=haystream.chat_messages(messages[:-1] or messages))
