"""Fault injection (docs/faults.md lists every fault, with the test that covers it): provider statuses and hangs,
and nothing leaked after a round of ok, failed, cancelled and refused requests."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import resource
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from haystream.testing import FakeUpstream, UpstreamRecord
from support import OPS_WRAPPERS, serving, start_server, unique


@pytest.fixture
def server(upstream):
    with serving(upstream, pipelines_dir=str(OPS_WRAPPERS)) as running:
        yield running


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
    scenario = unique("fake?tokens=3&ttft=30&timeout=0.5")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post("/v1/chat/completions", json=chat(scenario))
    # Nothing the client can see was sent yet (headers wait for the first visible delta): a real status.
    assert answer.status_code == 500
    assert "timeout" in answer.json()["error"]["message"].lower()
    assert upstream.wait_for_requests(1, model=scenario)[0].wait().client_hung_up


def test_a_provider_that_hangs_mid_stream_ends_the_stream_with_an_error_event_and_done(server, upstream):
    scenario = unique("fake?tokens=3&hold_after=1&timeout=0.5")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post("/v1/chat/completions", json=chat(scenario))
    assert answer.status_code == 200
    payloads = data_payloads(answer.text)
    assert payloads[-1] == "[DONE]"
    assert "timeout" in json.loads(payloads[-2])["error"]["message"].lower()
    assert upstream.wait_for_requests(1, model=scenario)[0].wait().client_hung_up


# --- leaks -----------------------------------------------------------------------------------------------------
#
# Every wait below is on an event: a thread's end (join), a task's end (a done callback on its own loop), and a
# socket's close, which the raw client below observes as EOF: it sends `Connection: close` (or half-closes to leave
# mid-stream) and reads until the server closes its end, and a socket's FIN goes out only when its last descriptor
# is closed. Pooled executor threads (named `PREFIX_N` by ThreadPoolExecutor) are reused, not leaked; their number
# is bounded by their executor.


@dataclass
class Resources:
    threads: set[threading.Thread]
    tasks: set[asyncio.Task]
    fds: dict[int, str]  # descriptor -> what it points at (`socket:[inode]`, a path, ...)

    def sockets(self, *, port: int) -> int:
        """Descriptors of TCP sockets with `port` at either end (loopback, IPv4)."""
        inodes = _tcp_inodes(port)
        return sum(1 for target in self.fds.values() if target in inodes)


def resources() -> Resources:
    """Threads, unfinished asyncio tasks (on any loop) and open file descriptors of this process."""
    gc.collect()
    tasks = {obj for obj in gc.get_objects() if isinstance(obj, asyncio.Task) and not obj.done()}
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone already
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return Resources(set(threading.enumerate()), tasks, fds)


def _tcp_inodes(port: int) -> set[str]:
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if port in (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)):
            inodes.add(f"socket:[{fields[9]}]")
    return inodes


def _pooled(thread: threading.Thread) -> bool:
    return re.fullmatch(r".+_\d+", thread.name) is not None  # a ThreadPoolExecutor's worker


def settle(baseline: Resources, timeout: float = 30) -> Resources:
    """Wait for the threads and tasks started since `baseline` to end; then the resources of this process."""
    for thread in threading.enumerate():
        if thread not in baseline.threads and not _pooled(thread):
            thread.join(timeout)
    gc.collect()
    new_tasks = [
        task
        for task in gc.get_objects()
        if isinstance(task, asyncio.Task) and not task.done() and task not in baseline.tasks
    ]
    done = threading.Semaphore(0)
    for task in new_tasks:
        with contextlib.suppress(RuntimeError):  # its loop is closed: the count below reports the task
            task.get_loop().call_soon_threadsafe(task.add_done_callback, lambda _: done.release())
    for _ in new_tasks:
        done.acquire(timeout=timeout)
    return resources()


def assert_no_leaks(baseline: Resources, after: Resources, *, ignore_port: int | None = None) -> None:
    def fds(res: Resources) -> int:
        return len(res.fds) - (res.sockets(port=ignore_port) if ignore_port else 0)

    threads = [t.name for t in after.threads - baseline.threads if t.is_alive() and not _pooled(t)]
    assert not threads, f"threads left running: {threads}"
    assert len(after.tasks - baseline.tasks) == 0, f"unfinished tasks: {after.tasks - baseline.tasks}"
    assert fds(after) <= fds(baseline), f"file descriptors {fds(baseline)} -> {fds(after)}"


def http_exchange(port: int, body: dict, *, leave_at: bytes | None = None) -> tuple[int, bytes]:
    """POST a chat request over a new socket with `Connection: close`; return the status and the raw body read
    until the server closed its end. With `leave_at`, half-close as soon as those bytes arrived (the client leaves
    mid-stream) and still read until the server has closed."""
    payload = orjson.dumps(body)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        received = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                received += data
                if leave_at is not None and leave_at in received:
                    sock.shutdown(socket.SHUT_WR)  # the server sees EOF: the client is gone
                    leave_at = None
    head, _, rest = bytes(received).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


# The same scenarios in every round (the wrapper keeps one client per scenario: new ones would look like leaks), named
# uniquely so that the rounds' records are told apart from late requests of other tests on the shared fake.
ROUND_OK, ROUND_FAILING, ROUND_REFUSED, ROUND_LEFT = (
    unique(s) for s in ("fake?tokens=5", "fake?tokens=5&fail_after=2", "fake?status=429", "fake?tokens=100&delay=0.1")
)


def a_round_of_faults(port: int) -> None:
    for _ in range(3):
        assert http_exchange(port, chat(ROUND_OK))[0] == 200
    assert b'"error"' in http_exchange(port, chat(ROUND_FAILING))[1]
    assert http_exchange(port, chat(ROUND_REFUSED))[0] == 429
    assert http_exchange(port, chat("x", model="nope"))[0] == 404
    for _ in range(2):  # the client leaves mid-stream
        assert http_exchange(port, chat(ROUND_LEFT), leave_at=b'"content":"t')[0] == 200


def round_records(upstream: FakeUpstream, nth: int) -> list[UpstreamRecord]:
    """The `nth` round's records (from 1), each once it ended: 3 ok, 1 failing, 1 refused (429) and 2 cancelled reached
    the provider (a cancelled one ends once the server cut it; the provider saw the cut only after the server closed
    its socket)."""
    counts = {ROUND_OK: 3, ROUND_FAILING: 1, ROUND_REFUSED: 1, ROUND_LEFT: 2}
    return [
        record.wait() for model, n in counts.items() for record in upstream.wait_for_requests(n * nth, model=model)[-n:]
    ]


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="counts file descriptors through /proc")
def test_nothing_leaks_after_ok_failed_refused_and_cancelled_requests(server, upstream):
    a_round_of_faults(server.port)  # warm-up: thread pools and connection pools reach their steady size
    round_records(upstream, 1)
    baseline = resources()
    a_round_of_faults(server.port)
    records = round_records(upstream, 2)
    assert sum(record.client_hung_up for record in records) == 2
    assert_no_leaks(baseline, settle(baseline))


N_STREAMS = 1000


async def a_stream(port: int, i: int) -> tuple[int, str]:
    """One chat stream over its own connection (raw HTTP/1.1, `Connection: close`): the status and the text of its
    content deltas, read until the server closed the connection; it must end with `[DONE]`."""
    body = {
        # A sync wrapper, and an async one with Haystack's generator or haystream's (see tests/wrappers).
        "model": "fake_sync" if i % 3 == 0 else "fake_async",
        "generator": "haystream" if i % 3 == 2 else "haystack",
        "messages": [{"role": "user", "content": f"m{i}-"}],  # the marker the fake upstream echoes
        "stream": True,
        "scenario": "fake?tokens=3&delay=0.01&echo=1",  # paced: the streams' chunks interleave
    }
    payload = orjson.dumps(body)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        raw = await reader.read()  # until EOF: the server has closed its socket
    finally:
        writer.close()
    head, _, body_bytes = raw.partition(b"\r\n\r\n")
    events = [line[6:] for line in dechunk(body_bytes).split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]", i
    chunks = [orjson.loads(event) for event in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    return int(head.split(b" ", 2)[1]), text


def dechunk(data: bytes) -> bytes:
    """The payload of a `Transfer-Encoding: chunked` body."""
    out = bytearray()
    at = 0
    while True:
        end = data.index(b"\r\n", at)
        size = int(data[at:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        at = end + 2 + size + 2


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="counts file descriptors through /proc")
async def test_1000_concurrent_streams_each_get_their_own_content_and_nothing_leaks(upstream):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 4 * N_STREAMS + 1000  # client, server, server-to-provider and provider ends of every stream
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    server = start_server(upstream)
    try:
        warm = await asyncio.gather(*(a_stream(server.port, i) for i in range(20)))
        assert all(status == 200 for status, _ in warm)
        baseline = resources()
        results = await asyncio.gather(*(a_stream(server.port, i) for i in range(N_STREAMS)))
        for i, (status, text) in enumerate(results):
            assert (status, text) == (200, "".join(f"m{i}-{k} " for k in range(3))), i
        after = settle(baseline)
        # Every client connection is closed on both ends; the provider connections stay pooled for reuse.
        assert after.sockets(port=server.port) == baseline.sockets(port=server.port)
        assert_no_leaks(baseline, after, ignore_port=upstream.port)
    finally:
        server.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


SLOW_TOKENS = 6000
TOKEN_TEXT = "x" * 16000  # ~16 kB per content delta, 96 MB in all: far more than every buffer on the way holds


def test_a_client_that_stops_reading_throttles_the_provider_and_gets_everything_later(upstream):
    """Back-pressure over real sockets: a client with a small receive buffer stops reading after its first chunk.
    The same stream, read at full speed by another client on the same server, completes meanwhile (so the server
    and the provider had every chance to run ahead); the stopped stream's provider is held far behind, and the
    client then gets the whole answer, in order."""
    server = start_server(upstream)
    scenario = f"slow?tokens={SLOW_TOKENS}&text={TOKEN_TEXT}"
    body = {
        "model": "fake_async",
        "generator": "haystream",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "scenario": scenario,
    }
    payload = orjson.dumps(body)
    try:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window stays small
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload)
            )
            received = bytearray()
            while b'"content":"x' not in received:  # the first content chunk; then the client stops reading
                data = sock.recv(4096)
                assert data, bytes(received)
                received += data
            slow = next(record for record in upstream.records if record.model == scenario)
            fast_body = {**body, "scenario": scenario.replace("slow?", "fast?")}
            with (
                httpx.Client(base_url=server.url, timeout=60) as client,
                client.stream("POST", "/v1/chat/completions", json=fast_body) as fast,
            ):
                assert sum(len(piece) for piece in fast.iter_bytes()) > SLOW_TOKENS * len(TOKEN_TEXT)
            fast_record = next(record for record in upstream.records if record.model == fast_body["scenario"])
            assert fast_record.wait().completed
            # The provider of the stopped stream is held: what it sent sits in bounded buffers (kernel socket
            # buffers, uvicorn's write buffer, HAYSTREAM_STREAM_BUFFER chunks), well below the whole answer.
            # Measured: 600-720 chunks (10-12 MB) held; a third of the answer is 32 MB.
            held = slow.tokens_sent
            assert held < SLOW_TOKENS // 3, f"{held} of {SLOW_TOKENS} chunks sent to a client that does not read"
            assert not slow.finished.is_set()
            while data := sock.recv(1 << 20):  # the client reads again: everything arrives
                received += data
        assert slow.wait().completed and slow.tokens_sent == SLOW_TOKENS
        _, _, chunked = bytes(received).partition(b"\r\n\r\n")
        events = [line[6:] for line in dechunk(chunked).split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        deltas = [orjson.loads(event)["choices"] for event in events[:-1]]
        contents = [choices[0]["delta"].get("content") for choices in deltas if choices]
        assert [c for c in contents if c] == [f"{TOKEN_TEXT}{i} " for i in range(SLOW_TOKENS)]
    finally:
        server.stop()
