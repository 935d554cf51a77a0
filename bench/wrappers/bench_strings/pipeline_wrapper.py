"""Serving layer only: yields paced strings as the fake upstream would send tokens, with no upstream and no Haystack."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from hayhooks import BasePipelineWrapper

from haystream.testing import parse_scenario


async def paced(tokens: int, delay: float) -> AsyncIterator[str]:
    for i in range(tokens):
        if delay:
            await asyncio.sleep(delay)
        yield f"t{i} "


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict) -> Any:
        scenario = parse_scenario(body["scenario"])
        return paced(scenario["tokens"], scenario["delay"])
