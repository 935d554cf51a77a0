"""haystream's sync wrapper: `haystream.stream` over the Pipeline."""

from __future__ import annotations

from typing import Any

from bench_pipeline import history, pipeline
from hayhooks import BasePipelineWrapper

import haystream


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    def run_chat_completion(self, model: str, messages: list[dict], body: dict) -> Any:
        return haystream.stream(pipeline(body["scenario"]), messages=history(messages))
