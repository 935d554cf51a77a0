"""Any OpenAI-compatible upstream, streamed through haystream — the wrapper to copy first."""

from collections.abc import AsyncIterator

from hayhooks import BasePipelineWrapper

import haystream
from haystream.local import chat_generator_from_env


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        # OPENAI_BASE_URL / OPENAI_API_KEY / OPENAI_MODEL (or OPENAI_CHAT_MODEL); the local model when none is set.
        # One generator needs no Pipeline around it: streamed directly it costs a stream about 0.55 ms of CPU and
        # 21 KB of memory less (bench/: hs-astream-component against hs-astream-fast). Once there is more than one
        # component, build a Pipeline and stream that (see rag_chat).
        self.llm = chat_generator_from_env("OPENAI_CHAT_MODEL")

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict) -> AsyncIterator:
        return haystream.astream(self.llm, messages=haystream.chat_messages(messages))
