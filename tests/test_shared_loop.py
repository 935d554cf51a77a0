"""Sync streams without a thread per stream: run_async targets run on haystream's one shared loop; only sync-only
components get a producer thread, whose abandoned HTTP reads are cut per client library (HAYSTREAM_ABANDON_SOCKETS)."""

from __future__ import annotations

import http.client
import json
import threading
from urllib.parse import urlsplit

import httpx
import pytest
import requests
from haystack import component
from haystack.dataclasses import ChatMessage, StreamingChunk

import haystream
from haystream.streaming.producer import running_producers, wait_for_idle_producers
from support import unique

USER = [ChatMessage.from_user("hello")]


def haystream_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("haystream-")]


def test_many_sync_streams_share_one_loop_thread_and_no_producer(make_llm, upstream):
    llm = make_llm("fake?tokens=50&delay=0.02&echo=1")
    threads_before = threading.active_count()
    streams = [haystream.stream(llm, messages=[ChatMessage.from_user(f"s{i}-")]) for i in range(40)]
    firsts = [next(s) for s in streams]  # every run is under way (role chunks arrived)
    assert all(isinstance(chunk, StreamingChunk) for chunk in firsts)
    assert running_producers() == 0
    # One loop thread for all 40 at most: haystream's own, or none when a server earlier in this process handed
    # its loop over (`use_event_loop`).
    assert threading.active_count() - threads_before <= 1
    assert haystream_threads().count("haystream-loop") <= 1
    for i, chunks in enumerate(streams[:5]):
        assert "".join(c.content for c in chunks) == "".join(f"s{i}-{k} " for k in range(50))
    for chunks in streams[5:]:
        chunks.close()


def test_consumer_threads_each_get_their_own_tokens(make_llm):
    llm = make_llm("fake?tokens=8&delay=0.002&echo=1")
    results: dict[int, str] = {}

    def one(i: int) -> None:
        results[i] = "".join(c.content for c in haystream.stream(llm, messages=[ChatMessage.from_user(f"u{i}-")]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {i: "".join(f"u{i}-{k} " for k in range(8)) for i in range(30)}


@pytest.mark.parametrize("how", ["close", "with", "break_and_drop"])
def test_leaving_a_shared_loop_stream_cancels_its_task_and_cuts_the_upstream(make_llm, upstream, how):
    scenario = unique("fake?tokens=200&hold_after=5")
    llm = make_llm(scenario)
    if how == "close":
        chunks = haystream.stream(llm, messages=USER)
        for _ in range(3):
            next(chunks)
        chunks.close()  # returns once the cancelled run has unwound
        assert upstream.wait_for_requests(1, model=scenario)[0].wait(10).client_hung_up
    elif how == "with":
        with haystream.stream(llm, messages=USER) as chunks:
            for _ in range(3):
                next(chunks)
        assert upstream.wait_for_requests(1, model=scenario)[0].wait(10).client_hung_up
    else:
        for i, _ in enumerate(haystream.stream(llm, messages=USER)):
            if i == 2:
                break
    record = upstream.wait_for_requests(1, model=scenario)[0].wait(10)
    assert record.client_hung_up and record.tokens_sent <= 5, record.tokens_sent  # the upstream held after 5
    assert running_producers() == 0


def test_closing_from_another_thread_while_waiting_for_the_first_token(make_llm, upstream):
    scenario = unique("fake?hold_after=0&tokens=5")
    chunks = haystream.stream(make_llm(scenario), messages=USER)
    outcome: list = []
    consumer = threading.Thread(target=lambda: outcome.append(list(chunks)))
    consumer.start()
    record = upstream.wait_for_requests(1, model=scenario)[0]
    chunks.close()
    assert record.wait(10).client_hung_up and record.tokens_sent == 0
    consumer.join(10)
    assert len(outcome) == 1 and "".join(c.content for c in outcome[0]) == ""


def test_slow_consumer_throttles_a_shared_loop_run(upstream):
    # A run_async component that produces as fast as it can: the loop-side producer waits on a full buffer.
    @component
    class FastAsync:
        def __init__(self) -> None:
            self.produced = 0

        @component.output_types(replies=list[ChatMessage])
        def run(self, messages: list[ChatMessage], streaming_callback=None) -> dict:
            raise AssertionError("the sync run must not be used")

        @component.output_types(replies=list[ChatMessage])
        async def run_async(self, messages: list[ChatMessage], streaming_callback=None) -> dict:
            for i in range(10_000):
                await streaming_callback(StreamingChunk(content=f"{i} "))
                self.produced += 1
            return {"replies": [ChatMessage.from_assistant("done")]}

    fast = FastAsync()
    chunks = haystream.stream(fast, messages=USER, buffer_size=8)
    assert next(chunks).content == "0 "
    # Reading 100 chunks one by one: the producer is never more than the buffer ahead of what was read.
    for read in range(1, 100):
        assert next(chunks).content == f"{read} "
        assert fast.produced <= read + 1 + 8 + 1, (read, fast.produced)
    chunks.close()
    assert fast.produced < 200


# --- the abandon fallback for sync-only runs, per HTTP client library -----------------------------------------


def _sse_component(library: str, base_url: str, scenario: str):
    """A sync-only chat component reading the fake upstream's SSE with one HTTP client library."""

    @component
    class SyncReader:
        @component.output_types(replies=list[ChatMessage])
        def run(self, messages: list[ChatMessage], streaming_callback=None) -> dict:
            body = {"model": scenario, "messages": [{"role": "user", "content": "x"}], "stream": True}
            url = base_url + "/chat/completions"
            if library == "httpx":
                with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body) as response:
                    for line in response.iter_lines():
                        _forward(line, streaming_callback)
            elif library == "requests":
                with requests.post(url, json=body, stream=True, timeout=60) as response:
                    for line in response.iter_lines():
                        _forward(line.decode(), streaming_callback)
            else:  # http.client
                parts = urlsplit(url)
                connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
                try:
                    connection.request("POST", parts.path, json.dumps(body), {"content-type": "application/json"})
                    response = connection.getresponse()
                    for raw in response:
                        _forward(raw.decode().strip(), streaming_callback)
                finally:
                    connection.close()
            return {"replies": [ChatMessage.from_assistant("")]}

    return SyncReader()


def _forward(line: str, callback) -> None:
    if line.startswith("data: {"):
        callback(StreamingChunk(content=line))


def _sync_only_openai(make_llm, scenario: str):
    llm = make_llm(scenario)

    @component
    class SyncFacade:
        @component.output_types(replies=list[ChatMessage])
        def run(self, messages: list[ChatMessage], streaming_callback=None) -> dict:
            return llm.run(messages=messages, streaming_callback=streaming_callback)

    return SyncFacade()


LIBRARIES = ["openai-sdk", "httpx", "requests", "http.client"]


def _target(library, make_llm, upstream, scenario):
    if library == "openai-sdk":
        return _sync_only_openai(make_llm, scenario)
    return _sse_component(library, upstream.base_url, scenario)


def _consume_in_thread(chunks) -> threading.Thread:
    """Iterate `chunks` in another thread; return once the first chunk (the upstream's role chunk) arrived."""
    first = threading.Event()

    def consume() -> None:
        for _ in chunks:
            first.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert first.wait(10)
    return consumer


@pytest.mark.parametrize("library", LIBRARIES)
def test_abandoned_sync_only_run_blocked_on_the_first_token_is_cut(make_llm, upstream, library):
    scenario = unique("fake?hold_after=0&tokens=5")
    chunks = haystream.stream(_target(library, make_llm, upstream, scenario), messages=USER)
    consumer = _consume_in_thread(chunks)  # returns once the role chunk arrived: the producer now blocks in a read
    record = upstream.wait_for_requests(1, model=scenario)[0]
    chunks.close()
    assert record.wait(10).client_hung_up and record.tokens_sent == 0
    assert wait_for_idle_producers(10)
    consumer.join(10)


@pytest.mark.parametrize("library", LIBRARIES)
def test_abandoned_sync_only_run_mid_stream_is_cut(make_llm, upstream, library):
    scenario = unique("fake?tokens=200&hold_after=5")
    chunks = haystream.stream(_target(library, make_llm, upstream, scenario), messages=USER)
    for _ in range(3):
        next(chunks)
    chunks.close()
    record = upstream.wait_for_requests(1, model=scenario)[0].wait(10)
    assert record.client_hung_up and record.tokens_sent <= 5, record.tokens_sent  # the upstream held after 5
    assert wait_for_idle_producers(10)


def test_switched_off_the_producer_reads_on_until_its_next_chunk(make_llm, upstream, monkeypatch):
    monkeypatch.setenv("HAYSTREAM_ABANDON_SOCKETS", "false")
    scenario = unique("fake?hold_after=0&tokens=3")
    chunks = haystream.stream(_target("httpx", make_llm, upstream, scenario), messages=USER)
    consumer = _consume_in_thread(chunks)
    record = upstream.wait_for_requests(1, model=scenario)[0]
    chunks.close()
    record.release()  # the first token goes out only now, after the close
    # Nothing cut the read: the first token still reached the producer's socket, which then stopped at that chunk.
    assert record.wait(10).tokens_sent >= 1
    assert wait_for_idle_producers(10)
    consumer.join(10)
