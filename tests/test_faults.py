"""Fault injection (docs/faults.md lists every fault, with the test that covers it): provider statuses and hangs,
and nothing leaked after a round of ok, failed, cancelled and refused requests."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from support import start_server

OPS_WRAPPERS = Path(__file__).parent / "ops_wrappers"


@pytest.fixture
def server(upstream):
    running = start_server(upstream, pipelines_dir=str(OPS_WRAPPERS))
    try:
        yield running
    finally:
        running.stop()


def chat(scenario: str, *, model: str = "scenario") -> dict:
    return {"model": model, "stream": True, "messages": [{"role": "user", "content": scenario}]}


def data_payloads(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize(("status", "expected"), [(429, 429), (503, 503), (500, 500), (502, 500)])
def test_a_provider_status_before_the_first_token_is_an_error_envelope(server, status, expected):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post("/v1/chat/completions", json=chat(f"fake?status={status}"))
    assert answer.status_code == expected
    assert answer.json()["error"]["message"]


def test_a_provider_that_hangs_before_the_first_token_is_an_http_error(server, upstream):
    upstream.reset()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post("/v1/chat/completions", json=chat("fake?tokens=3&ttft=30&timeout=0.5"))
    # Nothing the client can see was sent yet (headers wait for the first visible delta): a real status.
    assert answer.status_code == 500
    assert "timeout" in answer.json()["error"]["message"].lower()
    assert upstream.wait_for_requests(1)[0].wait().client_hung_up


def test_a_provider_that_hangs_mid_stream_ends_the_stream_with_an_error_event_and_done(server, upstream):
    upstream.reset()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post("/v1/chat/completions", json=chat("fake?tokens=3&hold_after=1&timeout=0.5"))
    assert answer.status_code == 200
    payloads = data_payloads(answer.text)
    assert payloads[-1] == "[DONE]"
    assert "timeout" in json.loads(payloads[-2])["error"]["message"].lower()
    assert upstream.wait_for_requests(1)[0].wait().client_hung_up


def resources() -> tuple[int, int, int]:
    """Threads, open file descriptors, and unfinished asyncio tasks (on any loop) of this process."""
    gc.collect()
    tasks = sum(1 for obj in gc.get_objects() if isinstance(obj, asyncio.Task) and not obj.done())
    return threading.active_count(), len(os.listdir("/proc/self/fd")), tasks


def a_round_of_faults(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(3):
            assert client.post("/v1/chat/completions", json=chat("fake?tokens=5")).status_code == 200
        assert '"error"' in client.post("/v1/chat/completions", json=chat("fake?tokens=5&fail_after=2")).text
        assert client.post("/v1/chat/completions", json=chat("fake?status=429")).status_code == 429
        assert client.post("/v1/chat/completions", json=chat("x", model="nope")).status_code == 404
        for _ in range(2):
            with client.stream("POST", "/v1/chat/completions", json=chat("fake?tokens=100&delay=0.1")) as stream:
                for line in stream.iter_lines():
                    if '"content":"t' in line:
                        break  # the client leaves mid-stream


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts file descriptors through /proc")
def test_nothing_leaks_after_ok_failed_refused_and_cancelled_requests(server, upstream):
    a_round_of_faults(server.url)  # warm-up: thread pools and connection pools reach their steady size
    upstream.wait_for_requests(len(upstream.records))
    for record in upstream.records:
        record.wait()
    baseline = resources()
    upstream.reset()
    a_round_of_faults(server.url)
    for record in upstream.wait_for_requests(6):  # 3 ok + 1 failing + 2 cancelled reached the provider
        record.wait()
    # The server releases a cancelled request's connection and task just after the provider saw the hang-up:
    # wait (bounded) for the counts to come back, then compare.
    deadline = time.monotonic() + 10
    current = resources()
    while any(now > before for now, before in zip(current, baseline, strict=True)) and time.monotonic() < deadline:
        time.sleep(0.05)
        current = resources()
    threads, fds, tasks = current
    assert threads <= baseline[0], f"threads {baseline[0]} -> {threads}"
    assert fds <= baseline[1], f"file descriptors {baseline[1]} -> {fds}"
    assert tasks <= baseline[2], f"asyncio tasks {baseline[2]} -> {tasks}"
