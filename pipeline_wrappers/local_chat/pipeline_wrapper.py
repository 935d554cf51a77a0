"""Chat with the embedded local model (SmolLM2-135M-Instruct on llama.cpp): no API key, no network."""

from collections.abc import AsyncIterator

from hayhooks import BasePipelineWrapper
from haystack.dataclasses import ChatMessage, StreamingChunk

import haystream
from haystream.local import LocalChatGenerator, local_model_turn


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        self.llm = LocalChatGenerator()
        self.llm.warm_up()  # load the model once, at startup

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict) -> AsyncIterator:
        # The whole conversation goes to the model; images become text placeholders for this text-only model.
        return self._answer(haystream.chat_messages(messages, images=False), body)

    async def _answer(self, history: list[ChatMessage], body: dict) -> AsyncIterator[StreamingChunk]:
        generation = {key: body[key] for key in ("max_tokens", "temperature", "top_p") if body.get(key) is not None}
        # One generation at a time on the shared model; waiting happens here, on the event loop.
        chunks = haystream.astream(self.llm, messages=history, generation_kwargs=generation)
        async with local_model_turn(), chunks:
            async for chunk in chunks:
                yield chunk
