"""haystream's async wrapper: `haystream.astream` over the Pipeline."""

from __future__ import annotations

from typing import Any

from bench_pipeline import history, pipeline
from hayhooks import BasePipelineWrapper

import haystream


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict) -> Any:
        return haystream.astream(pipeline(body["scenario"]), messages=history(messages))
