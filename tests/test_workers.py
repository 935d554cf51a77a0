"""`haystream serve --workers 2`: every worker deploys the wrappers, and /metrics adds up all workers' samples."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from haystream.testing import FakeUpstream
from test_cli_serve import ServeLog, ServeProcess, free_port, start_serve, stop

OPS_WRAPPERS = Path(__file__).parent / "ops_wrappers"
REQUESTS = 12


def test_two_workers_serve_chats_and_aggregate_their_metrics(tmp_path):
    port = free_port()
    with FakeUpstream() as upstream:
        env = {
            **os.environ,
            "FAKE_UPSTREAM_URL": upstream.base_url,
            "HAYSTACK_TELEMETRY_ENABLED": "False",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
            "HAYSTREAM_DRAIN_GRACE_SECONDS": "0",  # stop() sends SIGTERM: no load balancer to wait for here
        }
        process = start_serve(["--port", str(port), "--pipelines-dir", str(OPS_WRAPPERS), "--workers", "2"], env)
        try:
            # Each worker deploys the wrappers in its own lifespan and reports it: wait for the second report.
            assert process.log.wait_for("Application startup complete", count=2)
            # Each connection is a new TCP connection: the kernel spreads them over both workers' accept calls.
            for _ in range(REQUESTS):
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                    body = {
                        "model": "scenario",
                        "stream": True,
                        "messages": [{"role": "user", "content": "fake?tokens=3"}],
                    }
                    answer = client.post("/v1/chat/completions", json=body)
                    assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                page = client.get("/metrics").text
        finally:
            stop(process)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }
    key = ("haystream_requests_total", (("model", "scenario"), ("route", "/v1/chat/completions"), ("status", "200")))
    assert samples[key] == REQUESTS  # the sum over both workers, whichever answered the scrape


def test_sigterm_while_the_workers_start_stops_them_and_exits_0(tmp_path):
    env = {
        **os.environ,
        "HAYSTACK_TELEMETRY_ENABLED": "False",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "HAYSTREAM_DRAIN_GRACE_SECONDS": "0",
    }
    args = ["--port", str(free_port()), "--pipelines-dir", str(OPS_WRAPPERS), "--workers", "2"]
    process = ServeProcess(
        [sys.executable, "-m", "haystream", "serve", *args], env=env, stderr=subprocess.PIPE, text=True
    )
    process.log = ServeLog(process.stderr)
    try:
        # The supervisor logs this just before it starts the workers: none of them can be ready yet.
        assert process.log.wait_for("Started parent process")
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, "".join(process.log.lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = "".join(process.log.lines)
    assert "Received SIGTERM" in log and "Stopping parent process" in log  # the supervisor's own way out
    assert "exited with" not in log and "died" not in log  # every worker stopped with code 0


WORKER_WRAPPERS = Path(__file__).parent / "worker_wrappers"


def test_a_worker_whose_event_loop_is_blocked_is_killed_and_replaced(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "HAYSTACK_TELEMETRY_ENABLED": "False",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "HAYSTREAM_DRAIN_GRACE_SECONDS": "0",
        "HAYSTREAM_WORKER_TIMEOUT": "3",
    }
    process = start_serve(["--port", str(port), "--pipelines-dir", str(WORKER_WRAPPERS), "--workers", "2"], env)
    hung: list[BaseException | httpx.Response] = []
    try:
        assert process.log.wait_for("Application startup complete", count=2)
        started = set(_worker_pids(process.log.lines))
        assert len(started) == 2
        sockets = sorted(_listening_sockets(port))

        def ask_the_hanging_wrapper() -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                try:
                    hung.append(client.post("/v1/chat/completions", json=_chat("hang")))
                except httpx.HTTPError as error:
                    hung.append(error)

        asker = threading.Thread(target=ask_the_hanging_wrapper)
        asker.start()
        assert process.log.wait_for("sent no heartbeat"), "".join(process.log.lines)
        (killed,) = [int(m) for line in process.log.lines for m in re.findall(r"Worker \[(\d+)\] sent no", line)]
        assert killed in started
        asker.join(60)
        assert len(hung) == 1 and isinstance(hung[0], httpx.TransportError)  # the connection ended, no hang

        assert process.log.wait_for("Application startup complete", count=3)  # the replacement serves
        replacement = set(_worker_pids(process.log.lines)) - started
        assert len(replacement) == 1
        # It took over the killed worker's socket (the supervisor kept it, and the connections in its queue).
        assert sorted(_listening_sockets(port)) == sockets
        for _ in range(6):  # fresh connections land on either worker: every one is answered
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                answer = client.post("/v1/chat/completions", json=_chat("pid", stream=False))
                assert answer.status_code == 200
                assert int(answer.json()["choices"][0]["message"]["content"]) in (started | replacement) - {killed}
    finally:
        stop(process)
    log = "".join(process.log.lines)
    assert log.count("sent no heartbeat") == 1, log  # the healthy worker was never taken for a hung one
    assert process.returncode == 0, log


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreads connections on Linux only")
def test_each_worker_listens_on_a_socket_of_its_own_and_a_burst_reaches_both(tmp_path):
    """With one socket shared by the workers, the worker that woke first accepted every waiting connection: a burst
    of 200 streams split 154/46. Each worker has its own SO_REUSEPORT socket now, and the kernel spreads them."""
    port = free_port()
    env = {**os.environ, "HAYSTACK_TELEMETRY_ENABLED": "False", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    process = start_serve(["--port", str(port), "--pipelines-dir", str(WORKER_WRAPPERS), "--workers", "2"], env)
    try:
        assert process.log.wait_for("Application startup complete", count=2)
        workers = set(_worker_pids(process.log.lines))
        assert len(_listening_sockets(port)) == 2
        # Connections opened together, each answered on its own: the kernel hashes each to one socket, so 64 of them
        # all reaching one worker would take odds of 2**-63.
        clients = [httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) for _ in range(64)]
        try:
            answers: list[int] = []
            threads = [
                threading.Thread(target=lambda c=client: answers.append(_served_by(c)), daemon=True)
                for client in clients
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        finally:
            for client in clients:
                client.close()
        assert len(answers) == 64 and set(answers) == workers
    finally:
        stop(process)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreads connections on Linux only")
def test_the_workers_sockets_refuse_another_server_on_their_port_from_the_start():
    """`haystream serve` checks its port with a plain bind, which Linux allows next to sockets that are bound but not
    listening yet: a second server started then would have joined the first one's SO_REUSEPORT group, the two
    sharing the port's connections without a word."""
    import uvicorn

    from haystream.server.workers import listening_sockets

    sockets = listening_sockets(uvicorn.Config("haystream.server.app:create_app", host="127.0.0.1", port=0), 2)
    try:
        port = sockets[0].getsockname()[1]
        assert len({sock.fileno() for sock in sockets}) == 2 and sockets[1].getsockname()[1] == port
        probe = socket.socket()
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the CLI's check does
        with probe, pytest.raises(OSError) as refused:
            probe.bind(("127.0.0.1", port))
        assert refused.value.errno == errno.EADDRINUSE
    finally:
        for sock in sockets:
            sock.close()


def _served_by(client: httpx.Client) -> int:
    answer = client.post("/v1/chat/completions", json=_chat("pid", stream=False))
    assert answer.status_code == 200
    return int(answer.json()["choices"][0]["message"]["content"])


def _listening_sockets(port: int) -> list[int]:
    """The inodes of the sockets listening on 127.0.0.1:`port` (from /proc/net/tcp)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    local = f"0100007F:{port:04X}"
    return [int(fields[9]) for fields in map(str.split, lines) if fields[1] == local and fields[3] == "0A"]


def _chat(model: str, *, stream: bool = True) -> dict[str, object]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


def _worker_pids(lines: list[str]) -> list[int]:
    return [int(pid) for line in lines for pid in re.findall(r"Started server process \[(?:\x1b\[\d+m)?(\d+)", line)]


def test_runtime_deploy_with_several_workers_refuses_to_start():
    """A wrapper deployed at runtime would reach one worker only (the others answer 404 for it, by turns): serve says
    so and exits 2 before it binds anything."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HAYSTREAM_")},
        "HAYSTREAM_ENABLE_DEPLOY": "true",
        "HAYSTREAM_API_KEYS": "deploy-key",
    }
    args = ["--workers", "2", "--port", str(free_port()), "--pipelines-dir", str(OPS_WRAPPERS)]
    result = subprocess.run(
        [sys.executable, "-m", "haystream", "serve", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "HAYSTREAM_ENABLE_DEPLOY needs a single worker" in message and "--workers 1" in message
    assert "Traceback" not in result.stderr


def test_sighup_to_the_supervisor_drains_the_workers_and_exits_0(tmp_path):
    """A closed terminal sends SIGHUP to the supervisor only (the workers have their own process group). Its default
    action killed the supervisor and left both workers serving, unsupervised, on the port."""
    env = {**os.environ, "HAYSTACK_TELEMETRY_ENABLED": "False", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    port = free_port()
    process = start_serve(["--port", str(port), "--pipelines-dir", str(WORKER_WRAPPERS), "--workers", "2"], env)
    try:
        assert process.log.wait_for("Application startup complete", count=2)
        process.send_signal(signal.SIGHUP)
        assert process.wait(60) == 0  # it waits for every worker to end first
    finally:
        if process.poll() is None:
            process.kill()
    assert process.log.wait_for("Received SIGHUP: draining the workers")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health")


def test_workers_drain_and_exit_when_their_supervisor_is_killed(tmp_path):
    """SIGKILL (the OOM killer, say) gives the supervisor no chance to stop its workers. Each one sees its lifeline
    pipe end, finishes its running streams and exits; the port is free again."""
    env = {
        **os.environ,
        "HAYSTACK_TELEMETRY_ENABLED": "False",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "HAYSTREAM_DRAIN_GRACE_SECONDS": "0",
    }
    port = free_port()
    with FakeUpstream() as upstream:
        env["FAKE_UPSTREAM_URL"] = upstream.base_url
        process = start_serve(["--port", str(port), "--pipelines-dir", str(OPS_WRAPPERS), "--workers", "2"], env)
        exits: dict[int, int] = {}
        try:
            assert process.log.wait_for("Application startup complete", count=2)
            exits = {pid: os.pidfd_open(pid) for pid in _worker_pids(process.log.lines)}
            assert len(exits) == 2
            content = "fake?tokens=6&delay=0.3"
            body = {"model": "scenario", "stream": True, "messages": [{"role": "user", "content": content}]}
            with (
                httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
                client.stream("POST", "/v1/chat/completions", json=body) as stream,
            ):
                lines = stream.iter_lines()
                received = [next(line for line in lines if '"content":"t0' in line)]
                process.kill()
                process.wait()
                received.extend(lines)
            assert [line for line in received if line.startswith("data: ")][-1] == "data: [DONE]"
            assert sum('"content":"t' in line for line in received) == 6  # the running stream was finished
            assert process.log.wait_for("The supervisor has gone", count=2)
            for pid, exited in exits.items():
                assert select.select([exited], [], [], 60)[0], f"worker {pid} still runs"
        finally:
            for pid, exited in exits.items():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.close(exited)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health")
