"""The fake upstream's holds, which cancellation tests synchronise on instead of on timing."""

from __future__ import annotations

import httpx
import orjson
import pytest

from haystream.testing import FakeUpstream
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


def test_a_hang_up_during_a_hold_on_a_reused_connection_is_recorded(upstream):
    """A keep-alive connection that served a whole answer first, as a server's pooled client reuses it: the hang-up
    during the next request's hold is still seen (uvicorn's disconnect reaches the held exchange)."""
    done, held = unique("fake?tokens=2"), unique("fake?tokens=4&hold_after=1")
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=1)) as client:
        first = client.post(upstream.base_url + "/chat/completions", json={"model": done, "messages": USER})
        assert first.status_code == 200 and upstream.wait_for_requests(1, model=done)[0].wait(10).completed
        body = {"model": held, "messages": USER, "stream": True}
        with client.stream("POST", upstream.base_url + "/chat/completions", json=body) as response:
            received: list[str] = []
            # Kept referenced: a line iterator dropped mid-body is finalized at once, and httpcore then closes the
            # connection (the stream was not read to its end), which would be the hang-up before the check below.
            lines = response.iter_lines()
            for line in lines:  # the role chunk, then the first token, then nothing: the hold
                received += _contents([line])
                if len(received) == 2:
                    break
            assert received == ["", "t0 "]
            record = upstream.wait_for_requests(1, model=held)[0]
            assert not record.finished.is_set()  # held after its first token
    assert record.wait(10).client_hung_up and not record.completed and record.tokens_sent == 1


def test_fail_mode_garbage_sends_an_event_whose_data_is_not_json(upstream):
    scenario = unique("fake?tokens=4&fail_after=2&fail_mode=garbage")
    body = {"model": scenario, "messages": USER, "stream": True}
    with httpx.stream("POST", upstream.base_url + "/chat/completions", json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line]
    assert _contents(lines[:3]) == ["", "t0 ", "t1 "]
    assert lines[3:] == ["data: <html>upstream hiccup</html>", "data: [DONE]"]
    record = upstream.wait_for_requests(1, model=scenario)[0].wait(10)
    assert record.completed and record.tokens_sent == 2


@pytest.mark.parametrize("fail_mode", ["endless", "endless_event"])
def test_fail_mode_endless_sends_an_event_without_end_until_the_client_leaves(upstream, fail_mode):
    scenario = unique(f"fake?tokens=4&fail_after=1&fail_mode={fail_mode}")
    body = {"model": scenario, "messages": USER, "stream": True}
    with httpx.stream("POST", upstream.base_url + "/chat/completions", json=body, timeout=30) as response:
        received = b""
        for block in response.iter_raw():
            received += block
            if len(received) > 4 << 20:  # far more than the fake's first writes: it goes on without ending the event
                break
    _, _, event = received.rpartition(b"\n\n")
    if fail_mode == "endless":  # one line
        assert event.startswith(b"data: xxx") and b"\n" not in event and len(event) > 3 << 20
    else:  # data lines
        lines = event.split(b"\n")
        assert len(lines) > (3 << 20) // 8 and set(lines[:-1]) == {b"data: x"}
    record = upstream.wait_for_requests(1, model=scenario)[0].wait(10)
    assert record.client_hung_up and not record.completed and record.tokens_sent == 1


def test_the_standalone_fake_keeps_no_records_and_serves():
    # `python -m haystream.testing` (the bench's fake) serves other processes: records would only grow there.
    with FakeUpstream(keep_records=False) as fake:
        body = {"model": "fake?tokens=2", "messages": USER}
        response = httpx.post(fake.base_url + "/chat/completions", json=body, timeout=30)
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == "t0 t1 "
        assert fake.records == []
