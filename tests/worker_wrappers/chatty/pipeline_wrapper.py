"""Logs through hayhooks' logger (loguru) and prints on every request, as wrappers do; answers with its process id."""

import os

from hayhooks import BasePipelineWrapper, log


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict) -> str:
        log.info("chatty: answering {}", messages[-1]["content"])
        print(f"chatty: printed {messages[-1]['content']}")
        return str(os.getpid())
