"""A paced answer (5 tokens, 0.3 s apart) whatever the request says: for tests of clients that stream."""

from hayhooks import BasePipelineWrapper

import haystream
from haystream.testing import fake_chat_generator


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        self.llm = fake_chat_generator("fake?tokens=5&delay=0.3")

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict):
        return haystream.astream(self.llm, messages=haystream.chat_messages(messages))
