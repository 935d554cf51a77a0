"""haystream's async wrapper over the generator itself, with no Pipeline around it: what a Pipeline costs."""

from __future__ import annotations

from typing import Any

from bench_pipeline import history, pipeline
from hayhooks import BasePipelineWrapper

import haystream


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict) -> Any:
        return haystream.astream(pipeline(body["scenario"]).get_component("llm"), messages=history(messages))
