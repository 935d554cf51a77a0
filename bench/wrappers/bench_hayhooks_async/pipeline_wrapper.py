"""hayhooks' recommended async wrapper: `hayhooks.async_streaming_generator` over the Pipeline."""

from __future__ import annotations

from typing import Any

from bench_pipeline import history, pipeline
from hayhooks import BasePipelineWrapper, async_streaming_generator


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict) -> Any:
        run_args = {"llm": {"messages": history(messages)}}
        return async_streaming_generator(pipeline(body["scenario"]), pipeline_run_args=run_args)
