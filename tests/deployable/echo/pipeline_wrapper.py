"""Deployed through the real hayhooks CLI by the tests: streams the last user message back word by word."""

from hayhooks import BasePipelineWrapper
from haystack.components.generators.chat import MockChatGenerator
from haystack.dataclasses import ChatMessage

import haystream


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        self.generator = MockChatGenerator()  # echoes the last message

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict):
        history = [ChatMessage.from_openai_dict_format(m) for m in messages]
        return haystream.astream(self.generator, messages=history)
