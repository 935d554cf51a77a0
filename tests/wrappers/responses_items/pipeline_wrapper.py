"""A wrapper with hayhooks' `run_response_async`: it answers with the input items it was given, as JSON, after a
status line. Its chat method lists it as a model (and answers with the chat messages it was given)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from hayhooks import BasePipelineWrapper

from haystream import openwebui


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict) -> str:
        return json.dumps(messages)

    async def run_response_async(self, model: str, input_items: list[dict], body: dict) -> AsyncIterator[Any]:
        yield openwebui.status("Reading the input items", done=True)
        yield json.dumps(input_items)
