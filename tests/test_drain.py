"""Graceful drain of `haystream serve` (a real process) on SIGTERM: not ready, 503 for new chats, streams finish."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from haystream.server import metrics
from haystream.testing import FakeUpstream
from support import start_server, unique
from test_cli_serve import ServeLog, ServeProcess, free_port, start_serve

OPS_WRAPPERS = Path(__file__).parent / "ops_wrappers"


@pytest.fixture
def upstream():
    with FakeUpstream() as fake:
        yield fake


def serve(upstream: FakeUpstream, *args: str, **env: str):
    port = free_port()
    environment = {
        **os.environ,
        "FAKE_UPSTREAM_URL": upstream.base_url,
        "HAYSTACK_TELEMETRY_ENABLED": "False",
        **env,
    }
    process = start_serve(["--port", str(port), "--pipelines-dir", str(OPS_WRAPPERS), *args], environment)
    return process, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def serving_process(upstream: FakeUpstream, *args: str, **env: str) -> Iterator[tuple[ServeProcess, str]]:
    """`serve` for a `with` block: the process is killed at its end unless it has exited."""
    process, base = serve(upstream, *args, **env)
    try:
        yield process, base
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def chat(scenario: str) -> dict:
    return {"model": "scenario", "stream": True, "messages": [{"role": "user", "content": scenario}]}


def data_lines(lines) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def test_ready_says_draining_once_the_drain_has_begun(upstream):
    server = start_server(upstream, pipelines_dir=str(OPS_WRAPPERS))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.get("/ready").json() == {"status": "ready"}

            async def begin() -> None:
                server.app.app.app.drain.begin()  # what SIGTERM does first, on the server's loop

            assert server.loop is not None
            asyncio.run_coroutine_threadsafe(begin(), server.loop).result(10)
            ready = client.get("/ready")
            assert (ready.status_code, ready.json()) == (503, {"status": "draining"})  # not "starting"
            assert client.get("/health").status_code == 200  # alive: no restart wanted
            refused = client.post("/v1/chat/completions", json=chat("fake?tokens=1"))
            assert (refused.status_code, refused.headers["retry-after"]) == (503, "1")
    finally:
        server.stop()
        metrics.draining(False)  # the gauge is process-wide: later tests expect a server that is not draining


# SIGHUP (a closed terminal) too: uvicorn leaves it to its default action, which killed the process mid-stream.
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_drains_the_running_stream_refuses_new_chats_and_exits_0(upstream, stop_signal):
    process, base = serve(upstream, HAYSTREAM_DRAIN_GRACE_SECONDS="5", HAYSTREAM_DRAIN_TIMEOUT="60")
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            assert client.get("/ready").status_code == 200
            with client.stream("POST", "/v1/chat/completions", json=chat("fake?tokens=10&delay=0.3")) as stream:
                lines = stream.iter_lines()
                received = []
                for line in lines:  # up to the first content chunk
                    received.append(line)
                    if line.startswith("data: ") and '"content":"t' in line:
                        break
                process.send_signal(stop_signal)
                # The drain has begun once /ready says so (the handler runs on the server's loop).
                ready = client.get("/ready")
                while ready.status_code == 200:  # bounded by the grace window; each call is a real round trip
                    ready = client.get("/ready")
                assert ready.status_code == 503
                assert ready.json() == {"status": "draining"}
                refused = client.post("/v1/chat/completions", json=chat("fake?tokens=1"))
                assert refused.status_code == 503
                assert refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "server_shutting_down"
                received.extend(lines)
            payloads = data_lines(received)
            assert payloads[-1] == "[DONE]"
            text = "".join(
                (json.loads(p)["choices"][0]["delta"].get("content") or "")
                for p in payloads[:-1]
                if json.loads(p).get("choices")
            )
            assert text == "".join(f"t{i} " for i in range(10))
            assert not any("error" in json.loads(p) for p in payloads[:-1])
        assert process.wait(30) == 0
        # In the default text log format too (Python's last resort showed warnings only).
        assert process.log.wait_for("| INFO     | draining: 1 chat answers running")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_stream_longer_than_the_drain_timeout_ends_with_an_error_event_and_done(upstream):
    process, base = serve(upstream, HAYSTREAM_DRAIN_GRACE_SECONDS="0", HAYSTREAM_DRAIN_TIMEOUT="1")
    try:
        scenario = unique("fake?tokens=200&delay=0.2")
        body = chat(scenario)
        with (
            httpx.Client(base_url=base, timeout=30) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as stream,
        ):
            lines = stream.iter_lines()
            received = []
            for line in lines:
                received.append(line)
                if line.startswith("data: ") and '"content":"t' in line:
                    process.send_signal(signal.SIGTERM)
                    break
            received.extend(lines)
        payloads = data_lines(received)
        assert payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert error["code"] == "server_shutting_down"
        assert process.wait(20) == 0
        record = upstream.wait_for_requests(1, model=scenario)[0]
        assert record.wait().client_hung_up  # the provider call was closed, not left running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_second_sigterm_stops_waiting_for_running_streams(upstream):
    process, base = serve(upstream, HAYSTREAM_DRAIN_GRACE_SECONDS="0", HAYSTREAM_DRAIN_TIMEOUT="600")
    try:
        body = chat("fake?tokens=1000&delay=0.2")
        with (
            httpx.Client(base_url=base, timeout=30) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as stream,
        ):
            lines = stream.iter_lines()
            for line in lines:
                if line.startswith("data: ") and '"content":"t' in line:
                    process.send_signal(signal.SIGTERM)
                    break
            # The server stops listening at once (no grace): once /ready is refused, the drain has begun.
            with httpx.Client(base_url=base, timeout=5) as probe:
                while True:
                    try:
                        probe.get("/ready")
                    except httpx.TransportError:
                        break
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) != 0  # forced: it did not wait out the 600 s drain timeout
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def worker_pids(supervisor: int) -> set[int]:
    return {int(pid) for pid in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()}


def server_side_owner(response: httpx.Response, port: int, pids: set[int]) -> int:
    """The process that holds the server side of the TCP connection `response` came over (Linux /proc)."""
    client_port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    local, remote = f"0100007F:{port:04X}", f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            target = f"socket:[{fields[9]}]"
            for pid in pids:
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    try:
                        if os.readlink(fd) == target:
                            return pid
                    except OSError:
                        continue
    raise LookupError(f"no process holds the connection from port {client_port}")


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="finds each connection's worker through /proc")
def test_sigterm_to_the_supervisor_drains_every_worker(upstream, tmp_path):
    process, base = serve(
        upstream,
        "--workers",
        "2",
        HAYSTREAM_DRAIN_GRACE_SECONDS="3",
        HAYSTREAM_DRAIN_TIMEOUT="60",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
    )
    port = int(base.rsplit(":", 1)[1])
    clients: list[httpx.Client] = []
    try:
        assert process.log.wait_for("Application startup complete", count=2)  # the second worker's
        pids = worker_pids(process.pid)
        # Two kept-alive connections to each worker (the kernel hands each new connection to one of them): one
        # for a stream, one for probes.
        connections: dict[int, list[httpx.Client]] = {}
        for _ in range(60):
            client = httpx.Client(base_url=base, timeout=30)
            clients.append(client)
            ready = client.get("/ready")
            assert ready.status_code == 200
            connections.setdefault(server_side_owner(ready, port, pids), []).append(client)
            if len(connections) == 2 and all(len(pinned) >= 2 for pinned in connections.values()):
                break
        assert len(connections) == 2 and all(len(pinned) >= 2 for pinned in connections.values()), connections
        streams = []
        for stream_client, *_ in connections.values():
            stream = stream_client.stream("POST", "/v1/chat/completions", json=chat("fake?tokens=8&delay=0.3"))
            response = stream.__enter__()
            lines = response.iter_lines()
            received = []
            for line in lines:  # up to the first content chunk
                received.append(line)
                if line.startswith("data: ") and '"content":"t' in line:
                    break
            streams.append((stream, lines, received))
        process.send_signal(signal.SIGTERM)
        for _, probe, *_ in connections.values():  # each worker, over its own connection
            ready = probe.get("/ready")
            while ready.status_code == 200:  # bounded by the grace window; each call is a real round trip
                ready = probe.get("/ready")
            assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
            refused = probe.post("/v1/chat/completions", json=chat("fake?tokens=1"))
            assert (refused.status_code, refused.headers["retry-after"]) == (503, "1")
            assert refused.json()["error"]["code"] == "server_shutting_down"
        for stream, lines, received in streams:
            received.extend(lines)
            stream.__exit__(None, None, None)
            payloads = data_lines(received)
            assert payloads[-1] == "[DONE]"
            chunks = [json.loads(p) for p in payloads[:-1]]
            assert not any("error" in chunk for chunk in chunks)
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
            assert text == "".join(f"t{i} " for i in range(8))
        assert process.wait(30) == 0  # the supervisor exits 0 only if every worker did
    finally:
        for client in clients:
            client.close()
        if process.poll() is None:
            process.kill()
            process.wait()


def test_under_nohup_a_hang_up_is_ignored_and_sigterm_still_drains(upstream):
    """`nohup haystream serve` asks for hang-ups to be ignored: SIGHUP must not start a drain. Sent before SIGTERM,
    a handled SIGHUP would have made SIGTERM the second signal (exit at once, the stream cut)."""
    port = free_port()
    env = {**os.environ, "FAKE_UPSTREAM_URL": upstream.base_url, "HAYSTACK_TELEMETRY_ENABLED": "False"}
    env["HAYSTREAM_DRAIN_GRACE_SECONDS"] = "0"
    args = ["serve", "--port", str(port), "--pipelines-dir", str(OPS_WRAPPERS)]
    process = ServeProcess(
        ["nohup", sys.executable, "-m", "haystream", *args], env=env, stderr=subprocess.PIPE, text=True
    )
    process.log = ServeLog(process.stderr)
    try:
        assert process.log.wait_for("Application startup complete")
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
            client.stream("POST", "/v1/chat/completions", json=chat("fake?tokens=6&delay=0.3")) as stream,
        ):
            lines = stream.iter_lines()
            received = [next(line for line in lines if '"content":"t0' in line)]
            process.send_signal(signal.SIGHUP)
            process.send_signal(signal.SIGTERM)
            received.extend(lines)
        assert data_lines(received)[-1] == "[DONE]"
        assert sum('"content":"t' in line for line in received) == 6
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
