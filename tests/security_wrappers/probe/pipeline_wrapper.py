"""Security test wrapper: a run_api route, a chat stream through the fake upstream, and probes for leaks."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import HTTPException
from hayhooks import BasePipelineWrapper
from haystack.dataclasses import ChatMessage
from starlette.datastructures import Headers

import haystream
from haystream.testing import fake_chat_generator

LEAK = (
    "upstream https://user:hunter2@llm.internal/v1/chat?api_key=sk-abcdef1234567890 refused "
    "'Authorization: Bearer tok-0123456789' for k-one-secret"
)


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    def run_api(self, text: str, headers: Headers | None = None) -> str:
        if text == "leak":
            raise RuntimeError(LEAK)
        if text.startswith("refuse:"):  # "refuse:N": a 400 whose detail is N characters
            raise HTTPException(400, detail="no " * (int(text[7:]) // 3))
        names = sorted(headers.keys()) if headers is not None else []
        return orjson.dumps({"text": text.upper(), "headers": names}).decode()

    async def run_chat_completion_async(
        self, model: str, messages: list[dict], body: dict, headers: Headers | None = None
    ) -> Any:
        mode = body.get("mode", "stream")
        if mode == "headers":
            return orjson.dumps(sorted(headers.keys()) if headers is not None else []).decode()
        if mode == "leak":
            raise RuntimeError(LEAK)
        history = [ChatMessage.from_openai_dict_format(m) for m in messages]
        return haystream.astream(fake_chat_generator(body.get("scenario", "fake")), messages=history)
