"""Any OpenAI-compatible upstream, streamed through haystream — the wrapper to copy first."""

from collections.abc import AsyncIterator

from hayhooks import BasePipelineWrapper
from haystack import Pipeline

import haystream
from haystream.local import chat_generator_from_env


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        # OPENAI_BASE_URL / OPENAI_API_KEY / OPENAI_MODEL (or OPENAI_CHAT_MODEL); the local model when none is set.
        self.pipeline = Pipeline()
        self.pipeline.add_component("llm", chat_generator_from_env("OPENAI_CHAT_MODEL"))

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict) -> AsyncIterator:
        return haystream.astream(self.pipeline, messages=haystream.chat_messages(messages))
