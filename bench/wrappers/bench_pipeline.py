"""What the bench wrappers share: one Pipeline per scenario around the generator the bench selected.

The bench puts this folder on the servers' `PYTHONPATH`, so wrappers import this module by name. It passes the
fake upstream's URL in `FAKE_UPSTREAM_URL` and the generator in `BENCH_GENERATOR`: ``haystack`` (Haystack's
`OpenAIChatGenerator`, on the OpenAI SDK) or ``haystream`` (haystream's, `haystream.components.OpenAIChatGenerator`).
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from haystack import Pipeline
from haystack.dataclasses import ChatMessage
from haystack.utils import Secret


def _generator_class() -> Any:
    if os.environ.get("BENCH_GENERATOR", "haystack") == "haystream":
        from haystream.components import OpenAIChatGenerator
    else:
        from haystack.components.generators.chat import OpenAIChatGenerator
    return OpenAIChatGenerator


@cache
def pipeline(scenario: str) -> Pipeline:
    """One pipeline (and generator) per scenario string, shared by all concurrent requests."""
    llm = _generator_class()(
        api_key=Secret.from_token("x"),
        api_base_url=os.environ["FAKE_UPSTREAM_URL"],
        model=scenario,
        max_retries=0,
        generation_kwargs={"stream_options": {"include_usage": True}},
    )
    pipe = Pipeline()
    pipe.add_component("llm", llm)
    return pipe


def history(messages: list[dict[str, Any]]) -> list[ChatMessage]:
    return [ChatMessage.from_openai_dict_format(m) for m in messages]
