"""Blocks its worker's event loop (the bug a supervisor must survive: a sync call inside an async wrapper)."""

import time

from hayhooks import BasePipelineWrapper


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict) -> str:
        time.sleep(3600)  # on purpose: the loop stops
        return "never"
