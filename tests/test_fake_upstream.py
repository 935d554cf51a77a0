"""The fake upstream's holds, which cancellation tests synchronise on instead of on timing."""

from __future__ import annotations

import httpx
import orjson
import pytest

from support import unique

USER = [{"role": "user", "content": "hi"}]


def _contents(lines) -> list[str]:
    """Read SSE lines up to `[DONE]`: the content of each delta (the role chunk's is empty)."""
    contents = []
    for line in lines:
        if line == "data: [DONE]":
            break
        if line.startswith("data: "):
            choices = orjson.loads(line[len("data: ") :])["choices"]
            if choices and "content" in choices[0]["delta"]:
                contents.append(choices[0]["delta"]["content"])
    return contents


@pytest.mark.parametrize("held_after", [0, 2])
def test_a_held_stream_goes_on_when_released(upstream, held_after):
    scenario = unique(f"fake?tokens=4&hold_after={held_after}")
    body = {"model": scenario, "messages": USER, "stream": True}
    with httpx.stream("POST", upstream.base_url + "/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        received = []
        for line in lines:  # the role chunk, then `held_after` tokens, then nothing until the release
            received += _contents([line])
            if len(received) == 1 + held_after:
                break
        record = upstream.wait_for_requests(1, model=scenario)[0]
        assert record.tokens_sent == held_after and not record.finished.is_set()
        record.release()
        received += _contents(lines)
    assert received == ["", "t0 ", "t1 ", "t2 ", "t3 "]
    assert record.wait(10).completed and record.tokens_sent == 4


def test_a_held_stream_ends_when_the_client_leaves(upstream):
    scenario = unique("fake?tokens=4&hold_after=0")
    body = {"model": scenario, "messages": USER, "stream": True}
    with httpx.stream("POST", upstream.base_url + "/chat/completions", json=body, timeout=30) as response:
        assert _contents([next(response.iter_lines())]) == [""]  # the role chunk
    record = upstream.wait_for_requests(1, model=scenario)[0].wait(10)
    assert record.client_hung_up and not record.completed and record.tokens_sent == 0
