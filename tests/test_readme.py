"""The README's complete examples run as written: each block is taken from README.md itself and run in a fresh
Python process, against the fake upstream (`OPENAI_BASE_URL`) or a real haystream server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def python_block(containing: str) -> str:
    """The README's one ```python block holding `containing`."""
    blocks = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if containing in block]
    assert len(blocks) == 1, (containing, len(blocks))
    return blocks[0]


def run(code: str, upstream) -> str:
    env = {
        **os.environ,
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": "test-key",
        "HAYSTACK_TELEMETRY_ENABLED": "False",
    }
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_generator_streaming_example_prints_the_answer_and_its_usage(upstream):
    # It printed `None`: Haystack's generator reports usage only when the request asks for it.
    printed = run(python_block("haystream.stream(llm"), upstream)
    assert printed.startswith("t0 t1 t2 ") and "'completion_tokens': 8" in printed, printed


def test_the_stream_socket_example_runs_as_written(upstream):
    # It was a fragment: `component`, `pipe` and `llm` were never defined.
    printed = run(python_block("StreamingChatGenerator(chat_generator=llm"), upstream)
    assert printed.startswith("t0 t1 t2 "), printed


def test_the_openai_sdk_example_streams_from_a_server(server, upstream):
    code = python_block("client.chat.completions.create(")
    assert 'base_url="http://127.0.0.1:1416/v1"' in code and 'model="local_chat"' in code
    # This server listens elsewhere and serves the test wrappers instead of the examples.
    code = code.replace("http://127.0.0.1:1416", server.url).replace('"local_chat"', '"fake_async"')
    assert run(code, upstream).startswith("t0 t1 t2 ")
