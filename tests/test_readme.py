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


def configuration_rows() -> dict[str, list[str]]:
    """The README's configuration table: variable → its first cells (variable, flag, default)."""
    rows = {}
    for line in README.read_text().splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:4]]  # the meaning may hold a `|` of its own
        for name in re.findall(r"`(HAYSTREAM_[A-Z_]+)`", cells[0]) if line.startswith("| `") else ():
            rows[name] = cells
    return rows


def test_every_setting_is_in_the_configuration_table_with_its_true_default():
    from haystream.settings import LocalModelSettings, ServerSettings, StreamingSettings

    rows = configuration_rows()
    fields = {
        f"HAYSTREAM_{name.upper()}": field
        for settings in (ServerSettings, StreamingSettings, LocalModelSettings)
        for name, field in settings.model_fields.items()
    }
    # Documented, not settings: the CLI client's own variables.
    assert set(rows) - set(fields) == {"HAYSTREAM_URL", "HAYSTREAM_API_KEY"}
    for name, field in fields.items():
        documented = rows[name][2].strip("`").replace(",", "")
        default = field.default
        if default is None or default == "":
            assert documented == "(none)" or not documented[0].isdigit(), (name, documented)
        elif isinstance(default, bool):
            assert documented == str(default).lower(), (name, documented)
        elif isinstance(default, int | float):
            assert float(documented) == default, (name, documented, default)
        else:
            assert documented == default, (name, documented, default)


def test_every_serve_flag_is_in_the_configuration_table():
    import typer.main

    from haystream.cli import app

    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    documented = {flag for cells in configuration_rows().values() for flag in re.findall(r"`(-[-a-z]+)`", cells[1])}
    flags = {opt for param in serve.params for opt in param.opts if opt != "--help"}
    assert flags - {"--url", "--api-key"} <= documented, flags - documented
