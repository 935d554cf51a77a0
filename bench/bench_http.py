"""HTTP benchmark: `haystream serve` against stock `hayhooks run`, end to end over real sockets.

What is measured
----------------
One run starts four processes on 127.0.0.1, each with one uvicorn worker:

* the fake OpenAI-compatible upstream (``python -m haystream.testing``: a `FakeUpstream` child that prints
  its base URL and serves until its stdin is closed),
* stock hayhooks (``python -m hayhooks run --workers 1``),
* haystream (``python -m haystream serve --workers 1``),
* and this process, the load generator.

Both servers load the *same* wrapper folder, written by the benchmark into a temporary directory. Every wrapper
streams a one-component ``Pipeline`` whose ``llm`` is an ``OpenAIChatGenerator(api_key=Secret.from_token("x"),
api_base_url=<fake>, model=<scenario>, max_retries=0)``, cached per scenario; the scenario travels in the request body
as the extra field ``"scenario"`` (e.g. ``"fake?tokens=50&delay=0.02"``: 50 tokens, one every 20 ms):

=====================  ===================================================================  ======================
wrapper                chat method                                                          served by
=====================  ===================================================================  ======================
``sync_stream``        ``run_chat_completion`` -> ``hayhooks.streaming_generator(...)``      hayhooks and haystream
``async_stream``       ``run_chat_completion_async`` -> ``hayhooks.async_streaming_generator``  hayhooks and haystream
``haystream_native``   ``run_chat_completion_async`` -> ``haystream.astream(pipeline, ...)``  haystream (the
                                                                                            recommended way)
=====================  ===================================================================  ======================

The same client also talks to the fake directly (``POST {fake}/chat/completions`` with ``model`` = scenario): that
is the baseline, what a client would see without any server in between.

Load generator: asyncio in this process (uvloop when it is installed) with one ``httpx.AsyncClient`` per stream
(timeout 120 s, no proxies from the environment), all created before the clock starts. One client per stream, like
independent users, because one shared 1,000-connection client is itself the bottleneck: httpcore scans every pooled
connection whenever a response closes (O(n^2) per burst; ~90% of the client's CPU at 1,000 streams, which made even
the direct baseline take 20-30 s instead of ~2 s). Streams post ``stream: true`` and the SSE lines are parsed here.
Per stream it records

* TTFT: from just before the request is sent to the first ``data:`` line with a non-empty ``delta.content``;
* the gaps between consecutive content events (events that arrive in the same read have a gap of 0);
* the number of content chunks;
* completion: every token arrived, no error event, and the stream ended properly - ``data: [DONE]`` for haystream
  and the direct upstream, the end of the body for hayhooks (which sends no ``[DONE]``);
* errors (HTTP status, transport errors, ``data: {"error": ...}`` events, missing tokens).

Scenarios (``--quick`` in brackets):

1. 200 [50] concurrent paced streams, ``fake?tokens=50&delay=0.02``;
2. 1,000 [200] concurrent paced streams, same scenario (the open-file limit is raised to the hard limit before any
   child is spawned, so the children inherit it);
3. 20 concurrent fast streams, ``fake?tokens=500`` (no delay): aggregate content chunks/s.

Each target is warmed up first with one stream of every scenario string (imports, lazy OpenAI clients, connection
pools). Then targets are interleaved: for every scenario all targets run back to back, in reversed order on every
other scenario and round, so drift hits all of them alike. ``gc.collect()`` runs in the client before each burst.
Reported per target x scenario: completed/total, TTFT p50/p99 and the inter-chunk gap p99 over all streams (pooled
over rounds), aggregate chunks/s = content chunks / burst wall time, and the burst wall time (medians over rounds).

Readiness is never guessed: a reader thread per child reads its output line by line (the fake's base URL; uvicorn's
"Uvicorn running on" for the servers) and keeps draining it into a log file afterwards. All children are stopped in
``finally`` blocks (stdin closed / SIGTERM, then SIGKILL if they do not exit).

Caveats: the client, the fake upstream and the server under test share the machine's cores, and the client's own
event loop lag is part of every number, for all targets alike. Only ratios from one run are meaningful.

Run: ``python bench/bench_http.py`` (``--quick`` for a smoke run; ``--rounds N`` repeats the interleaved set, default 3,
1 with ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import importlib.metadata
import os
import platform
import re
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import orjson

PACED = "fake?tokens=50&delay=0.02"
PACED_TOKENS = 50
FAST = "fake?tokens=500"
FAST_TOKENS = 500
MESSAGES = [{"role": "user", "content": "Tell me something."}]
UPSTREAM_ENV = "HAYSTREAM_BENCH_UPSTREAM"
HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}
T = TypeVar("T")

_START_TIMEOUT = 120.0
_STOP_TIMEOUT = 20.0
_REQUEST_TIMEOUT = 120.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RUNNING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


# ------------------------------------------------------------------------------------------------------------------
# wrappers (written into a temp folder that both servers load)
# ------------------------------------------------------------------------------------------------------------------

_WRAPPER_HEAD = f'''
from __future__ import annotations

import os
from functools import cache
from typing import Any

from hayhooks import BasePipelineWrapper
from haystack import Pipeline
from haystack.components.generators.chat import OpenAIChatGenerator
from haystack.dataclasses import ChatMessage
from haystack.utils import Secret


@cache
def pipeline(scenario: str) -> Pipeline:
    """One pipeline (and generator) per scenario string, shared by all concurrent requests."""
    pipe = Pipeline()
    pipe.add_component(
        "llm",
        OpenAIChatGenerator(
            api_key=Secret.from_token("x"),
            api_base_url=os.environ["{UPSTREAM_ENV}"],
            model=scenario,
            max_retries=0,
        ),
    )
    return pipe


def history(messages: list[dict]) -> list[ChatMessage]:
    return [ChatMessage.from_openai_dict_format(m) for m in messages]
'''

WRAPPERS: dict[str, str] = {
    "sync_stream": '''
from hayhooks import streaming_generator


class PipelineWrapper(BasePipelineWrapper):
    """The idiomatic hayhooks sync streaming wrapper."""

    def setup(self) -> None:
        pass

    def run_chat_completion(self, model: str, messages: list[dict], body: dict) -> Any:
        msgs = history(messages)
        return streaming_generator(pipeline(body["scenario"]), pipeline_run_args={"llm": {"messages": msgs}})
''',
    "async_stream": '''
from hayhooks import async_streaming_generator


class PipelineWrapper(BasePipelineWrapper):
    """The idiomatic hayhooks async streaming wrapper."""

    def setup(self) -> None:
        pass

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict) -> Any:
        msgs = history(messages)
        return async_streaming_generator(pipeline(body["scenario"]), pipeline_run_args={"llm": {"messages": msgs}})
''',
    "haystream_native": '''
import haystream


class PipelineWrapper(BasePipelineWrapper):
    """The recommended haystream wrapper."""

    def setup(self) -> None:
        pass

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict) -> Any:
        return haystream.astream(pipeline(body["scenario"]), messages=history(messages))
''',
}


def write_wrappers(folder: Path) -> None:
    """Write every wrapper into ``folder/NAME/pipeline_wrapper.py``."""
    for name, body in WRAPPERS.items():
        (folder / name).mkdir(parents=True)
        source = textwrap.dedent(_WRAPPER_HEAD).lstrip() + textwrap.dedent(body)
        (folder / name / "pipeline_wrapper.py").write_text(source)


# ------------------------------------------------------------------------------------------------------------------
# child processes
# ------------------------------------------------------------------------------------------------------------------


class Child:
    """A child process whose output is read line by line until it is ready, then drained into a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_dir: Path,
        *,
        ready: Callable[[str], str | None],
        watch_stdout: bool,
        stdin: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("w", buffering=1)
        self._ready = ready
        self._event = threading.Event()
        self.value: str | None = None
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if watch_stdout else self._log,
            stderr=self._log if watch_stdout else subprocess.PIPE,
            text=True,
        )
        watched = self.process.stdout if watch_stdout else self.process.stderr
        assert watched is not None
        self._reader = threading.Thread(target=self._read, args=(watched,), name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self._log.write(line)
                if self.value is None:
                    found = self._ready(_ANSI.sub("", line))
                    if found is not None:
                        self.value = found
                        self._event.set()
        finally:
            self._event.set()  # the process ended (or closed its output) before or after becoming ready

    def wait_ready(self) -> str:
        """Block until the ready line appeared; raise with the log's tail if the child died or hung."""
        if not self._event.wait(_START_TIMEOUT) or self.value is None:
            raise RuntimeError(f"{self.name} did not start (exit code {self.process.poll()}):\n{self.tail()}")
        return self.value

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
        return ""

    def stop(self) -> None:
        """Close stdin (the fake's stop signal) or send SIGTERM; SIGKILL if the child does not exit in time."""
        process = self.process
        if process.poll() is None:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            else:
                process.terminate()
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(_STOP_TIMEOUT)
        self._reader.join(_STOP_TIMEOUT)
        self._log.close()


def hayhooks_script() -> str:
    """hayhooks' console script of this interpreter's environment (``python -m hayhooks`` does nothing)."""
    script = Path(sys.executable).with_name("hayhooks")
    found = str(script) if script.exists() else shutil.which("hayhooks")
    if found is None:
        raise RuntimeError("the hayhooks command is not installed next to this Python")
    return found


def free_port() -> int:
    """A free loopback port (bound and released; fine on a quiet loopback interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def uvicorn_ready(line: str) -> str | None:
    """The server's URL once uvicorn reports it is listening (printed after "Application startup complete")."""
    match = _RUNNING.search(line)
    return None if match is None else f"http://127.0.0.1:{match.group(1)}"


def fake_ready(line: str) -> str | None:
    return line.strip() if line.startswith("http://") else None


def raise_open_file_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE (inherited by children spawned afterwards); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(max(soft, wanted), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ------------------------------------------------------------------------------------------------------------------
# load generator
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Something the client streams from: the fake itself, or a wrapper on one of the servers."""

    name: str
    server: str  # "direct", "hayhooks" or "haystream"
    url: str
    wrapper: str | None
    sends_done: bool

    def body(self, scenario: str) -> bytes:
        if self.wrapper is None:
            return orjson.dumps({"model": scenario, "messages": MESSAGES, "stream": True})
        return orjson.dumps({"model": self.wrapper, "messages": MESSAGES, "stream": True, "scenario": scenario})


@dataclass(frozen=True)
class Scenario:
    label: str
    streams: int
    model: str
    tokens: int


@dataclass
class StreamResult:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    chunks: int = 0
    completed: bool = False
    error: str | None = None


@dataclass
class Burst:
    results: list[StreamResult]
    wall: float

    @property
    def chunks_per_s(self) -> float:
        return sum(r.chunks for r in self.results) / self.wall


def _content(event: Any) -> str | None:
    if not isinstance(event, dict):
        return None
    choices = event.get("choices")
    if not choices:
        return None
    delta = choices[0].get("delta") or {}
    content = delta.get("content")
    return content if isinstance(content, str) else None


async def one_stream(client: httpx.AsyncClient, target: Target, body: bytes, tokens: int) -> StreamResult:
    """POST one streaming request and time its SSE content events."""
    result = StreamResult()
    done = False
    last = 0.0
    start = time.perf_counter()
    try:
        async with client.stream("POST", target.url, content=body, headers=HEADERS) as response:
            if response.status_code != 200:
                text = (await response.aread())[:200].decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text}"
                return result
            pending = b""
            async for data in response.aiter_bytes():
                now = time.perf_counter()
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    event = orjson.loads(payload)
                    if isinstance(event, dict) and "error" in event:
                        result.error = f"error event: {str(event['error'])[:200]}"
                        continue
                    if _content(event):
                        if result.ttft is None:
                            result.ttft = now - start
                        else:
                            result.gaps.append(now - last)
                        last = now
                        result.chunks += 1
    except Exception as error:  # one broken stream is a data point, not the end of the benchmark
        result.error = f"{type(error).__name__}: {str(error)[:200]}"
        return result
    ended = done if target.sends_done else True
    if result.error is None and not ended:
        result.error = "no [DONE]"
    if result.error is None and result.chunks != tokens:
        result.error = f"got {result.chunks} of {tokens} tokens"
    result.completed = result.error is None
    return result


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Loopback plain HTTP needs no TLS, but httpx builds an SSL context per client: share one instead of
    # loading the CA bundle a thousand times.
    return ssl.create_default_context()


def new_client() -> httpx.AsyncClient:
    """A client for one stream (see the module docstring for why not one shared pool)."""
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    return httpx.AsyncClient(
        limits=limits, timeout=httpx.Timeout(_REQUEST_TIMEOUT), trust_env=False, verify=_ssl_context()
    )


async def burst(target: Target, scenario: Scenario) -> Burst:
    """All streams of a scenario at once, each on its own fresh client (created before the clock starts).

    The wall time runs from the first send to the last end.
    """
    body = target.body(scenario.model)
    clients = [new_client() for _ in range(scenario.streams)]
    gc.collect()
    try:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, target, body, scenario.tokens) for client in clients))
        wall = time.perf_counter() - start
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    return Burst(list(results), wall)


# ------------------------------------------------------------------------------------------------------------------
# statistics and output
# ------------------------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Row:
    target: Target
    scenario: Scenario
    completed: int
    total: int
    ttft_p50: float | None
    ttft_p99: float | None
    gap_p99: float | None
    chunks_per_s: float
    wall: float
    errors: Counter[str]


def summarise(target: Target, scenario: Scenario, bursts: Sequence[Burst]) -> Row:
    results = [r for b in bursts for r in b.results]
    ttfts = [r.ttft for r in results if r.ttft is not None]
    gaps = [g for r in results for g in r.gaps]
    errors = Counter(_error_kind(r.error) for r in results if r.error is not None)
    return Row(
        target=target,
        scenario=scenario,
        completed=sum(r.completed for r in results),
        total=len(results),
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        gap_p99=percentile(gaps, 99),
        chunks_per_s=statistics.median(b.chunks_per_s for b in bursts),
        wall=statistics.median(b.wall for b in bursts),
        errors=errors,
    )


def _error_kind(error: str) -> str:
    return re.sub(r"\d+", "N", error)[:120]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def print_table(scenario: Scenario, rows: Sequence[Row]) -> None:
    print(f"\n## {scenario.label}: {scenario.streams} concurrent streams of {scenario.model!r}")
    header = (
        f"{'target':<28} {'completed':>11} {'TTFT p50':>11} {'TTFT p99':>11} {'gap p99':>10} {'chunks/s':>10}"
        f" {'wall':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.target.name:<28} {f'{row.completed}/{row.total}':>11} {_ms(row.ttft_p50):>11} "
            f"{_ms(row.ttft_p99):>11} {_ms(row.gap_p99):>10} {row.chunks_per_s:>10,.0f} {row.wall:>7.2f}s"
        )
    for row in rows:
        for kind, count in row.errors.most_common(3):
            print(f"  ! {row.target.name}: {count} x {kind}")


def _best(rows: Sequence[Row], metric: Callable[[Row], float | None], higher: bool) -> tuple[float | None, str]:
    scored = [(v, r.target.name) for r in rows if (v := metric(r)) is not None]
    if not scored:
        return None, "-"
    return max(scored) if higher else min(scored)


def print_ratios(scenarios: Sequence[Scenario], table: dict[tuple[str, str], Row], big: Scenario) -> None:
    print("\n## haystream vs hayhooks (TTFT and gap: haystream/hayhooks, lower is better; chunks/s: higher is better)")
    header = f"{'scenario':<12} {'comparison':<44} {'TTFT p99':>9} {'gap p99':>9} {'chunks/s':>9}"
    print(header)
    print("-" * len(header))
    for scenario in scenarios:
        hayhooks_rows = [table[(t, scenario.label)] for t in ("hayhooks/sync_stream", "hayhooks/async_stream")]
        for wrapper in ("sync_stream", "async_stream"):
            ours, theirs = (
                table[(f"haystream/{wrapper}", scenario.label)],
                table[(f"hayhooks/{wrapper}", scenario.label)],
            )
            print(
                f"{scenario.label:<12} {f'{wrapper} (same wrapper)':<44}"
                f" {_x(_ratio(ours.ttft_p99, theirs.ttft_p99)):>9} {_x(_ratio(ours.gap_p99, theirs.gap_p99)):>9}"
                f" {_x(_ratio(ours.chunks_per_s, theirs.chunks_per_s)):>9}"
            )
        native = table[("haystream/haystream_native", scenario.label)]
        ttft, _ = _best(hayhooks_rows, lambda r: r.ttft_p99, higher=False)
        gap, _ = _best(hayhooks_rows, lambda r: r.gap_p99, higher=False)
        rate, _ = _best(hayhooks_rows, lambda r: r.chunks_per_s, higher=True)
        print(
            f"{scenario.label:<12} {'haystream_native vs hayhooks best (per metric)':<44} "
            f"{_x(_ratio(native.ttft_p99, ttft)):>9} {_x(_ratio(native.gap_p99, gap)):>9} "
            f"{_x(_ratio(native.chunks_per_s, rate)):>9}"
        )
    direct = table[("direct", big.label)]
    print(f"\n## {big.label}: TTFT p99 / direct-upstream TTFT p99 ({_ms(direct.ttft_p99)})")
    for name in ("haystream/haystream_native", "haystream/async_stream", "haystream/sync_stream"):
        row = table[(name, big.label)]
        print(f"{name:<28} {_x(_ratio(row.ttft_p99, direct.ttft_p99)):>8}")
    for name in ("hayhooks/async_stream", "hayhooks/sync_stream"):
        row = table[(name, big.label)]
        print(f"{name:<28} {_x(_ratio(row.ttft_p99, direct.ttft_p99)):>8}")


def print_targets(table: dict[tuple[str, str], Row], big: Scenario, fast: Scenario, quick: bool) -> bool:
    """Print PASS/FAIL for the issue's two targets (headline: haystream_native); return whether both pass."""
    note = f" [--quick: {big.streams} streams, not 1,000]" if quick else ""
    direct = table[("direct", big.label)]
    print("\n## targets")
    headline = True
    for name in ("haystream/haystream_native", "haystream/async_stream", "haystream/sync_stream"):
        row = table[(name, big.label)]
        ratio = _ratio(row.ttft_p99, direct.ttft_p99)
        ok = row.completed == row.total and ratio is not None and ratio <= 2.0
        tag = "" if name == "haystream/haystream_native" else " (info)"
        print(
            f"{'PASS' if ok else 'FAIL'}{tag}: {big.label}{note}: every stream completes and TTFT p99 <= 2x direct"
            f" -- {name}: {row.completed}/{row.total} completed, TTFT p99 {_ms(row.ttft_p99)} vs direct"
            f" {_ms(direct.ttft_p99)} = {_x(ratio)}"
        )
        if not tag:
            headline = headline and ok
    hayhooks_rows = [table[(t, fast.label)] for t in ("hayhooks/sync_stream", "hayhooks/async_stream")]
    best_rate, best_name = _best(hayhooks_rows, lambda r: r.chunks_per_s, higher=True)
    for name in ("haystream/haystream_native", "haystream/async_stream", "haystream/sync_stream"):
        row = table[(name, fast.label)]
        ratio = _ratio(row.chunks_per_s, best_rate)
        ok = ratio is not None and ratio >= 2.0 and row.completed == row.total
        tag = "" if name == "haystream/haystream_native" else " (info)"
        print(
            f"{'PASS' if ok else 'FAIL'}{tag}: {fast.label}: chunks/s >= 2x hayhooks' best -- {name}:"
            f" {row.chunks_per_s:,.0f}/s vs {best_name} {best_rate or 0:,.0f}/s = {_x(ratio)}"
            f" ({row.completed}/{row.total} completed)"
        )
        if not tag:
            headline = headline and ok
    return headline


def load_average() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def environment(nofile: int, loop: str, load_before: str) -> str:
    versions = ", ".join(
        f"{dist} {importlib.metadata.version(dist)}" for dist in ("hayhooks", "haystack-ai", "uvicorn", "httpx")
    )
    return (
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, {os.cpu_count()} cores;"
        f" {versions}; client loop: {loop}; open-file limit {nofile};"
        f" load average (1/5/15 min) before {load_before}, after {load_average()}"
    )


# ------------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------------


def interleaved(targets: Sequence[Target], turn: int) -> list[Target]:
    return list(targets) if turn % 2 == 0 else list(reversed(targets))


async def measure(
    targets: Sequence[Target], scenarios: Sequence[Scenario], rounds: int
) -> dict[tuple[str, str], list[Burst]]:
    for target in targets:
        for model, tokens in ((PACED, PACED_TOKENS), (FAST, FAST_TOKENS)):
            warm = await burst(target, Scenario("warm-up", 1, model, tokens))
            if not warm.results[0].completed:
                raise RuntimeError(f"warm-up of {target.name} with {model!r} failed: {warm.results[0].error}")
    print("warm-up done", flush=True)
    bursts: dict[tuple[str, str], list[Burst]] = {}
    turn = 0
    for round_no in range(rounds):
        for scenario in scenarios:
            for target in interleaved(targets, turn):
                result = await burst(target, scenario)
                bursts.setdefault((target.name, scenario.label), []).append(result)
                done = sum(r.completed for r in result.results)
                print(
                    f"  round {round_no + 1} {scenario.label:<12} {target.name:<28} {done}/{len(result.results)}"
                    f" in {result.wall:.2f}s",
                    flush=True,
                )
            turn += 1
    return bursts


def run_async(main: Coroutine[Any, Any, T]) -> tuple[T, str]:
    """Run ``main`` on uvloop when available (less client overhead), else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main), "asyncio"
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main), f"uvloop {importlib.metadata.version('uvloop')}"


@contextlib.contextmanager
def started(child: Child) -> Iterator[Child]:
    try:
        yield child
    finally:
        child.stop()


def make_targets(upstream: str, urls: dict[str, str]) -> list[Target]:
    """The direct baseline, both hayhooks-style wrappers on both servers, and haystream's own wrapper."""
    targets = [Target("direct", "direct", f"{upstream}/chat/completions", None, sends_done=True)]
    for server, wrappers in (
        ("hayhooks", ("sync_stream", "async_stream")),
        ("haystream", ("sync_stream", "async_stream", "haystream_native")),
    ):
        url = f"{urls[server]}/v1/chat/completions"
        targets += [Target(f"{server}/{w}", server, url, w, sends_done=server == "haystream") for w in wrappers]
    return targets


def start_children(stack: contextlib.ExitStack, root: Path, env: dict[str, str], children: list[Child]) -> list[Target]:
    """Start the fake upstream, then both servers on the same wrapper folder; wait until all of them listen."""
    wrappers = root / "wrappers"
    write_wrappers(wrappers)
    fake_argv = [sys.executable, "-m", "haystream.testing"]
    fake = stack.enter_context(
        started(Child("fake_upstream", fake_argv, env, root, ready=fake_ready, watch_stdout=True, stdin=True))
    )
    children.append(fake)
    upstream = fake.wait_ready()
    env[UPSTREAM_ENV] = upstream
    commands = {"hayhooks": [hayhooks_script(), "run"], "haystream": [sys.executable, "-m", "haystream", "serve"]}
    ports: dict[str, int] = {}
    for name, command in commands.items():
        ports[name] = port = free_port()
        argv = [
            *command,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--pipelines-dir",
            str(wrappers),
            "--workers",
            "1",
        ]
        children.append(
            stack.enter_context(started(Child(name, argv, env, root, ready=uvicorn_ready, watch_stdout=False)))
        )
    urls = {child.name: child.wait_ready() for child in children[1:]}
    for name, url in urls.items():
        if url != f"http://127.0.0.1:{ports[name]}":
            raise RuntimeError(f"{name} listens on {url}, not on the requested port {ports[name]}")
    pids = ", ".join(f"{c.name} {c.process.pid}" for c in children)
    print(f"children: {pids}; upstream {upstream}; servers {urls}", flush=True)
    return make_targets(upstream, urls)


def machine_busy_seconds() -> float | None:
    """CPU time (all cores) the whole machine spent busy so far, from /proc/stat; None where that is unavailable."""
    try:
        ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def own_cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the fake and both servers once stopped)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def cpu_report(busy_before: float | None, own_before: float, wall: float) -> str:
    busy_after = machine_busy_seconds()
    own = own_cpu_seconds() - own_before
    if busy_before is None or busy_after is None:
        return f"this benchmark used {own:.0f} core-s in {wall:.0f} s"
    other = max(0.0, busy_after - busy_before - own)
    share = other / (wall * (os.cpu_count() or 1))
    return (
        f"this benchmark used {own:.0f} core-s, other processes {other:.0f} core-s"
        f" ({share:.0%} of the machine) in {wall:.0f} s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smaller bursts (50 and 200 paced streams)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="repeat the interleaved set N times (default 3, 1 with --quick)"
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    small, big_n = (50, 200) if args.quick else (200, 1000)
    scenarios = [
        Scenario(f"{small} paced", small, PACED, PACED_TOKENS),
        Scenario(f"{big_n} paced", big_n, PACED, PACED_TOKENS),
        Scenario("20 fast", 20, FAST, FAST_TOKENS),
    ]
    big, fast = scenarios[1], scenarios[2]
    # client + server + upstream sockets for the largest burst, plus headroom; children inherit the raised limit.
    nofile = raise_open_file_limit(8 * big_n + 1024)
    load_before = load_average()
    busy_before, own_before, started_at = machine_busy_seconds(), own_cpu_seconds(), time.monotonic()
    env = {
        **os.environ,
        "HAYSTACK_TELEMETRY_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    children: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="haystream-bench-http-") as tmp, contextlib.ExitStack() as stack:
        try:
            targets = start_children(stack, Path(tmp), env, children)
            bursts, loop = run_async(measure(targets, scenarios, rounds))
        except BaseException:
            for child in children:
                print(f"\n--- {child.name} log tail ---\n{child.tail()}", file=sys.stderr)
            raise
    cpu = cpu_report(busy_before, own_before, time.monotonic() - started_at)  # children are reaped by now
    mode = " (quick)" if args.quick else ""
    print(f"\n# bench_http: {environment(nofile, loop, load_before)}; rounds {rounds}{mode}")
    print(f"# CPU: {cpu}")
    table: dict[tuple[str, str], Row] = {}
    for target in targets:
        for scenario in scenarios:
            key = (target.name, scenario.label)
            table[key] = summarise(target, scenario, bursts[key])
    for scenario in scenarios:
        print_table(scenario, [table[(t.name, scenario.label)] for t in targets])
    print_ratios(scenarios, table, big)
    print_targets(table, big, fast, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
