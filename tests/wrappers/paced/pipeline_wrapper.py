"""An answer that stops after its first token and holds until the client leaves, whatever the request says: for
tests of clients that stream (they must show the first token while the upstream is still going)."""

from hayhooks import BasePipelineWrapper

import haystream
from haystream.testing import fake_chat_generator


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        self.llm = fake_chat_generator("fake?tokens=5&hold_after=1")

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict):
        return haystream.astream(self.llm, messages=haystream.chat_messages(messages))
