"""Answers with the process id of the worker that served it."""

import os

from hayhooks import BasePipelineWrapper


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict) -> str:
        return str(os.getpid())
