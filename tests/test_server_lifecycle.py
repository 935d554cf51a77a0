"""Disconnects cancel the work (before and after the first token); keep-alive pings while idle."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from haystream.server import ServerSettings
from haystream.streaming.producer import running_producers, wait_for_idle_producers
from support import start_server, unique

USER = [{"role": "user", "content": "hello"}]
HELD = "fake?tokens=300&hold_after=5"  # the fake upstream holds after 5 tokens until its client leaves


@pytest.mark.parametrize(
    ("model", "mode"), [("fake_async", "astream"), ("fake_sync", "stream"), ("fake_sync", "generator")]
)
def test_client_leaving_mid_stream_cuts_the_upstream(server, upstream, model, mode):
    scenario = unique(HELD)
    body = {"model": model, "messages": USER, "stream": True, "mode": mode, "scenario": scenario}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        contents = 0
        for line in response.iter_lines():
            if '"content":"t' in line:
                contents += 1
                if contents == 3:
                    break
    record = upstream.wait_for_requests(1, model=scenario)[0].wait(10)
    assert record.client_hung_up and record.tokens_sent == 5  # the run was cut while the upstream held
    assert wait_for_idle_producers(10), "a producer thread kept running after the client left"


@pytest.mark.parametrize("model", ["fake_async", "fake_sync"])
async def test_client_leaving_before_the_first_token_cancels_the_run(server, upstream, model):
    held = unique("fake?hold_after=0&tokens=5")  # the upstream holds before the first token until the client leaves
    body = json.dumps({"model": model, "messages": USER, "stream": True, "scenario": held}).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    record = (await asyncio.to_thread(lambda: upstream.wait_for_requests(1, model=held)))[0]  # it reached the upstream
    writer.close()
    await writer.wait_closed()
    await asyncio.to_thread(record.wait, 10)
    assert record.client_hung_up and record.tokens_sent == 0
    assert await asyncio.to_thread(wait_for_idle_producers, 10)


def test_idle_stream_gets_keepalive_pings_and_slow_first_token_commits_headers(upstream):
    scenario = unique("fake?hold_after=0&tokens=2")
    fast_pings = start_server(upstream, keepalive_seconds=0.2)
    try:
        # The first token never comes while the client listens: headers must be committed anyway, then pings.
        body = {"model": "fake_async", "messages": USER, "stream": True, "scenario": scenario}
        with httpx.stream("POST", fast_pings.url + "/v1/chat/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            pings = 0
            for line in response.iter_lines():
                assert not line.startswith('data: {"error'), line
                pings += line == ": ping"
                if pings == 2:
                    break
        record = upstream.wait_for_requests(1, model=scenario)[0].wait(30)
    finally:
        fast_pings.stop()
    assert pings == 2 and record.client_hung_up and record.tokens_sent == 0


async def test_sync_wrapper_streams_run_on_the_server_loop_without_a_thread_each(server, upstream):
    # A sync wrapper returning haystream.stream(): its thread is released when the method returns, and the run
    # (run_async-capable) goes on on the server's loop. Every stream is mid-flight (its upstream held after the first
    # token until the client leaves) when the threads are counted.
    scenario = unique("fake?tokens=30&hold_after=1")
    before = threading.active_count()
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with (
        httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as http,
        contextlib.AsyncExitStack() as streams,
    ):
        readers = []
        for _ in range(40):
            body = {"model": "fake_sync", "messages": USER, "stream": True, "scenario": scenario}
            response = await streams.enter_async_context(http.stream("POST", "/v1/chat/completions", json=body))
            readers.append(response.aiter_lines())
        for lines in readers:
            async for line in lines:
                if '"content":"t' in line:
                    break
        assert not any(record.finished.is_set() for record in upstream.wait_for_requests(40, model=scenario))
        assert running_producers() == 0
        assert threading.active_count() < before + 10, threading.active_count() - before


def test_startup_freezes_what_it_created_out_of_the_collectors_reach_and_spaces_its_passes(upstream):
    gc.unfreeze()
    thresholds = gc.get_threshold()
    running = start_server(upstream, gc_freeze=True, gc_threshold=ServerSettings().gc_threshold)
    try:
        assert gc.get_freeze_count() > 0  # frozen once the wrappers were deployed (lifespan start-up complete)
        assert gc.get_threshold() == (50_000, *thresholds[1:])
        with httpx.Client(base_url=running.url, timeout=30) as client:
            assert client.get("/v1/models").status_code == 200
    finally:
        running.stop()
        gc.unfreeze()  # this process starts many servers: give the collector back what it froze
        gc.set_threshold(*thresholds)


_SERVER_AFTER_SERVER = """
import httpx
from haystream.testing import FakeUpstream
from support import OPS_WRAPPERS, start_server

with FakeUpstream() as upstream:
    start_server(upstream, pipelines_dir=str(OPS_WRAPPERS)).stop()
    again = start_server(upstream)
    with httpx.Client(base_url=again.url, timeout=30) as http:
        models = sorted(model["id"] for model in http.get("/v1/models").json()["data"])
        answer = http.post("/api_only/run", json={"text": "x"})
    again.stop()
print(json.dumps({"models": models, "status": answer.status_code, "body": answer.json()}))
"""


def test_a_server_started_after_another_stopped_serves_its_own_wrappers():
    # hayhooks' registry is process-wide and its start-up deploy skips names already in it: the second server kept
    # the first one's wrappers ("scenario" from tests/ops_wrappers) and had no /{name}/run routes of its own. In a
    # process of its own: this test session keeps servers running, and servers side by side share the registry.
    script = "import json, sys; sys.path.insert(0, sys.argv[1])\n" + _SERVER_AFTER_SERVER
    done = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "scenario" not in seen["models"] and "fake_async" in seen["models"]
    assert seen["status"] == 200 and seen["body"] == {"result": "X"}
