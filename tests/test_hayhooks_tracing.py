"""hayhooks 2.1's own tracing tests for chat completions, pointed at haystream's app.

hayhooks' `tests/test_tracing.py` ships in its sdist, not in the wheel. Unpack it and say where:

    pip download --no-deps --no-binary :all: hayhooks==2.1.0 && tar xzf hayhooks-2.1.0.tar.gz
    pip install trafilatura lxml_html_clean   # hayhooks' test pipeline (chat_with_website) imports them
    HAYSTREAM_HAYHOOKS_SDIST=$PWD/hayhooks-2.1.0 pytest tests/test_hayhooks_tracing.py

The test copies hayhooks' `tests/` folder and appends to its conftest two fixtures that replace hayhooks' app with
haystream's (`create_app()`, deploy enabled, a key that the test client sends), then runs hayhooks' chat-completion
tracing tests unchanged. Without the variable the test is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHAT_TESTS = [
    "test_openai_chat_completion_emits_openai_run_span",
    "test_openai_streaming_span_tags_reflect_actual_streaming",
    "test_openai_http_4xx_marks_span_failure",
]
# hayhooks' `test_openai_streaming_error_marks_span_failure` expects the wrapper's exception to escape the server
# (`pytest.raises(RuntimeError)` around the client): haystream ends a failing stream with an error event and
# `[DONE]` instead, by design. tests/test_tracing.py checks that its span is still marked failed.

HAYSTREAM_APP = """

# --- appended by haystream's tests/test_hayhooks_tracing.py: haystream's app instead of hayhooks' --------------
@pytest.fixture(scope="session", autouse=True)
def test_app():
    from haystream.server import ServerSettings, create_app as create_haystream_app

    return create_haystream_app(
        ServerSettings(pipelines_dir=settings.pipelines_dir, enable_deploy=True, api_keys="compat-key")
    )


@pytest.fixture
def client(test_app):
    return TestClient(test_app, headers={"authorization": "Bearer compat-key"})
"""


def test_hayhooks_chat_tracing_tests_pass_against_haystream(tmp_path):
    sdist = os.environ.get("HAYSTREAM_HAYHOOKS_SDIST")
    if not sdist:
        pytest.skip("set HAYSTREAM_HAYHOOKS_SDIST to an unpacked hayhooks 2.1 sdist (see this module's docstring)")
    copied = tmp_path / "tests"
    shutil.copytree(Path(sdist) / "tests", copied)
    (tmp_path / "__init__.py").write_text("")
    with (copied / "conftest.py").open("a") as conftest:
        conftest.write(HAYSTREAM_APP)
    env = {**os.environ, "OPENAI_API_KEY": "unused", "HAYSTACK_TELEMETRY_ENABLED": "False"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_tracing.py",
            "-k",
            " or ".join(CHAT_TESTS),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{len(CHAT_TESTS)} passed" in result.stdout
