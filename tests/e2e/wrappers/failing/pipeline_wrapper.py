"""Streams three tokens from the fake upstream, which then fails: how does the client show it?"""

from hayhooks import BasePipelineWrapper

import haystream
from haystream.testing import fake_chat_generator


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        self.llm = fake_chat_generator("fake?tokens=20&fail_after=3&delay=0.05")

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict):
        return haystream.astream(self.llm, messages=haystream.chat_messages(messages))
