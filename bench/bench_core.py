"""Streaming-core benchmark: haystream's `stream`/`astream` against hayhooks' `streaming_generator` twins.

What is measured
----------------
Every contender consumes the *same* Haystack `Pipeline` (one component, ``llm``, an `OpenAIChatGenerator`) talking
to the *same* fake OpenAI-compatible upstream (`haystream.testing.FakeUpstream`, real HTTP and SSE on loopback):

=========================================  =====  ==================================================================
contender                                  mode   how it is driven
=========================================  =====  ==================================================================
``haystream.stream``                       sync   ``for chunk in haystream.stream(pipe, data)``
``hayhooks.streaming_generator``           sync   ``for chunk in streaming_generator(pipe, pipeline_run_args=data)``
``haystream.astream``                      async  ``async for chunk in haystream.astream(pipe, data)``
``hayhooks.async_streaming_generator``     async  ``async for chunk in async_streaming_generator(pipe, ...)``
``callback (reference)``                   sync   ``pipe.run(...)`` with a plain ``streaming_callback``, no iterator
``async callback (reference)``             async  ``await pipe.run_async(...)`` with an async ``streaming_callback``
=========================================  =====  ==================================================================

The two reference rows have no iterator bridge at all: they show what Haystack and the upstream cost by themselves,
i.e. the ceiling the four iterators can approach. They are not part of the ratios.

Scenarios (the fake's behaviour is set by the model string of the generator, so each scenario has its own pipeline):

* **A "fast"** - ``fake?tokens=500`` without delay, N sequential streams per contender (20; 5 with ``--quick``).
  Per stream: chunks/s = content chunks / (iterator exhausted - generator called) and time-to-first-chunk (TTFC,
  from calling the generator function to the first chunk with content). Reported: medians over the N streams.
* **B "concurrent"** - 100 concurrent streams of ``fake?tokens=50&delay=0.01`` (async contenders: one
  ``asyncio.gather``; sync contenders: one thread per stream, released together by an event once all are ready),
  repeated 15 times (1 with ``--quick``). TTFC is taken from the common start of the burst, so it includes the
  time a stream waits for its turn. Reported: median wall time and median aggregate chunks/s over the repetitions,
  TTFC p50/p99 over all streams of all repetitions.

In both scenarios the CPU time of this process (all threads; the fake upstream is another process) is divided by the
content chunks: CPU us/chunk is the steadiest number on a shared machine, as time spent descheduled does not count.

Only chunks that are `StreamingChunk`s with non-empty ``content`` are counted, and every stream must deliver exactly
the number of tokens the fake sends, otherwise the benchmark fails.

How
---
* The fake upstream runs in a separate *process* (``python -m haystream.testing``, shut down by closing its
  stdin), so its own CPU work does not compete for the GIL of the code under test (it still competes for the
  machine's cores).
* Each contender is warmed up once per scenario (HTTP connection pool, thread pools, imports, lazy clients).
* Contenders are interleaved: every repetition runs each contender once, and the order is reversed on every other
  repetition, so machine noise and drift hit all of them alike. ``gc.collect()`` runs before every measured stream
  (outside the timing) so no contender pays for another's garbage.
* Async contenders run on one event loop that lives for the whole benchmark (the generator's async OpenAI client is
  bound to the loop it was created on). Nothing waits by sleeping: threads are lined up with a barrier and released
  with an event.

Run ``python bench/bench_core.py`` (``--quick`` for a smoke run). Only ratios from one run are meaningful.
"""

from __future__ import annotations

import os

# Before haystack is imported: no PostHog telemetry thread doing network I/O in the middle of the measurements.
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")

import argparse
import asyncio
import gc
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from types import TracebackType
from typing import Any, Literal

import hayhooks
from haystack import Pipeline
from haystack.components.generators.chat import OpenAIChatGenerator
from haystack.dataclasses import ChatMessage, StreamingChunk
from haystack.utils import Secret

import haystream

Mode = Literal["sync", "async"]
RunData = dict[str, dict[str, Any]]

FAST_SCENARIO = "fake?tokens=500"
FAST_TOKENS = 500
CONCURRENT_SCENARIO = "fake?tokens=50&delay=0.01"
CONCURRENT_TOKENS = 50
CONCURRENT_STREAMS = 100
_FAKE_STOP_TIMEOUT = 15.0


# --------------------------------------------------------------------------------------------------------------------
# The fake upstream, in its own process
# --------------------------------------------------------------------------------------------------------------------


class FakeUpstreamProcess:
    """`FakeUpstream` served by a child Python process; `base_url` is known once the context is entered."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> FakeUpstreamProcess:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "haystream.testing"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()  # "" if the child died before listening
        if not line.startswith("http"):
            self.__exit__(None, None, None)
            raise RuntimeError("the fake upstream process did not start (see its error output above)")
        self.base_url = line.strip()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(_FAKE_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --------------------------------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------------------------------

SyncOpener = Callable[[Pipeline, RunData], Iterator[Any]]
AsyncOpener = Callable[[Pipeline, RunData], AsyncIterator[Any]]


@dataclass(frozen=True)
class Contender:
    """One way of consuming a pipeline's stream; exactly one of `open_sync` / `open_async` is set."""

    name: str
    library: Literal["haystream", "hayhooks", "reference"]
    mode: Mode
    open_sync: SyncOpener | None = None
    open_async: AsyncOpener | None = None


@dataclass(frozen=True)
class _Timestamped:
    """A chunk seen by a reference callback, with the time the callback saw it."""

    at: float
    chunk: StreamingChunk


def _haystream_sync(pipe: Pipeline, data: RunData) -> Iterator[Any]:
    return haystream.stream(pipe, data)


def _hayhooks_sync(pipe: Pipeline, data: RunData) -> Iterator[Any]:
    return hayhooks.streaming_generator(pipe, pipeline_run_args=data)


def _haystream_async(pipe: Pipeline, data: RunData) -> AsyncIterator[Any]:
    return haystream.astream(pipe, data)


def _hayhooks_async(pipe: Pipeline, data: RunData) -> AsyncIterator[Any]:
    return hayhooks.async_streaming_generator(pipe, pipeline_run_args=data)


def _callback_sync(pipe: Pipeline, data: RunData) -> Iterator[Any]:
    """Reference: `Pipeline.run` in the calling thread, chunks collected by a plain callback, then replayed."""
    chunks: list[tuple[float, StreamingChunk]] = []

    def collect(chunk: StreamingChunk) -> None:
        chunks.append((time.perf_counter(), chunk))

    pipe.run({"llm": {**data["llm"], "streaming_callback": collect}})
    return iter(_Timestamped(at, chunk) for at, chunk in chunks)


async def _callback_async_run(pipe: Pipeline, data: RunData) -> list[_Timestamped]:
    chunks: list[_Timestamped] = []

    async def collect(chunk: StreamingChunk) -> None:
        chunks.append(_Timestamped(time.perf_counter(), chunk))

    await pipe.run_async({"llm": {**data["llm"], "streaming_callback": collect}})
    return chunks


async def _callback_async(pipe: Pipeline, data: RunData) -> AsyncIterator[Any]:
    """Reference: `Pipeline.run_async` with an async callback, chunks replayed afterwards with their timestamps."""
    for item in await _callback_async_run(pipe, data):
        yield item


CONTENDERS: tuple[Contender, ...] = (
    Contender("haystream.stream", "haystream", "sync", open_sync=_haystream_sync),
    Contender("hayhooks.streaming_generator", "hayhooks", "sync", open_sync=_hayhooks_sync),
    Contender("haystream.astream", "haystream", "async", open_async=_haystream_async),
    Contender("hayhooks.async_streaming_generator", "hayhooks", "async", open_async=_hayhooks_async),
    Contender("callback (reference)", "reference", "sync", open_sync=_callback_sync),
    Contender("async callback (reference)", "reference", "async", open_async=_callback_async),
)


# --------------------------------------------------------------------------------------------------------------------
# Consuming one stream
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StreamStats:
    """Timings of one stream (perf_counter seconds)."""

    start: float
    first: float
    end: float
    chunks: int

    @property
    def rate(self) -> float:
        return self.chunks / (self.end - self.start)


class _Tally:
    """Counts the content chunks of one stream and notes when the first one arrived."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.first: float | None = None
        self.chunks = 0

    def see(self, item: Any) -> None:
        chunk = item.chunk if isinstance(item, _Timestamped) else item
        if isinstance(chunk, StreamingChunk) and chunk.content:
            self.chunks += 1
            if self.first is None:
                self.first = item.at if isinstance(item, _Timestamped) else time.perf_counter()

    def stats(self, expected: int, name: str) -> StreamStats:
        end = time.perf_counter()
        if self.first is None or self.chunks != expected:
            raise RuntimeError(f"{name}: expected {expected} content chunks, got {self.chunks}")
        return StreamStats(self.start, self.first, end, self.chunks)


def consume_sync(contender: Contender, pipe: Pipeline, data: RunData, expected: int, start: float) -> StreamStats:
    """Open the contender's iterator and drain it; `start` is when the clock started for this stream."""
    assert contender.open_sync is not None
    tally = _Tally(start)
    for item in contender.open_sync(pipe, data):
        tally.see(item)
    return tally.stats(expected, contender.name)


async def consume_async(
    contender: Contender, pipe: Pipeline, data: RunData, expected: int, start: float
) -> StreamStats:
    """Async twin of `consume_sync`."""
    assert contender.open_async is not None
    tally = _Tally(start)
    async for item in contender.open_async(pipe, data):
        tally.see(item)
    return tally.stats(expected, contender.name)


# --------------------------------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Measurements:
    """Everything measured for one contender in one scenario."""

    rates: list[float] = field(default_factory=list)  # per stream (A) or aggregate per repetition (B)
    ttfcs: list[float] = field(default_factory=list)  # per stream
    cpu_per_chunk: list[float] = field(default_factory=list)  # per stream (A) or per repetition (B)
    walls: list[float] = field(default_factory=list)  # per repetition (B only)


class Bench:
    """Runs the scenarios for all contenders on one pipeline per scenario and one long-lived event loop."""

    def __init__(self, base_url: str, loop: asyncio.AbstractEventLoop) -> None:
        self.base_url = base_url
        self.loop = loop
        self.data: RunData = {"llm": {"messages": [ChatMessage.from_user("Count, please.")]}}
        self._pipelines: list[Pipeline] = []

    def pipeline(self, scenario: str) -> Pipeline:
        """The one pipeline every contender of a scenario uses."""
        pipe = Pipeline()
        llm = OpenAIChatGenerator(
            api_key=Secret.from_token("x"), api_base_url=self.base_url, model=scenario, max_retries=0
        )
        pipe.add_component("llm", llm)
        self._pipelines.append(pipe)
        return pipe

    def close(self) -> None:
        """Release the generators' HTTP clients (the async ones on the loop they were created on)."""
        for pipe in self._pipelines:
            pipe.close()
            self.loop.run_until_complete(pipe.close_async())

    # A: sequential streams -------------------------------------------------------------------------------------------

    def one_stream(self, contender: Contender, pipe: Pipeline, expected: int) -> StreamStats:
        if contender.mode == "sync":
            return consume_sync(contender, pipe, self.data, expected, time.perf_counter())
        return self.loop.run_until_complete(self._one_stream_async(contender, pipe, expected))

    async def _one_stream_async(self, contender: Contender, pipe: Pipeline, expected: int) -> StreamStats:
        return await consume_async(contender, pipe, self.data, expected, time.perf_counter())

    def fast(self, contenders: Sequence[Contender], runs: int) -> dict[str, Measurements]:
        pipe = self.pipeline(FAST_SCENARIO)
        results = {c.name: Measurements() for c in contenders}
        for contender in contenders:  # warm-up
            self.one_stream(contender, pipe, FAST_TOKENS)
        for contender in _interleaved(contenders, runs):
            gc.collect()
            cpu = time.process_time()
            stats = self.one_stream(contender, pipe, FAST_TOKENS)
            cpu = time.process_time() - cpu
            measured = results[contender.name]
            measured.rates.append(stats.rate)
            measured.ttfcs.append(stats.first - stats.start)
            measured.cpu_per_chunk.append(cpu / stats.chunks)
        return results

    # B: concurrent streams -------------------------------------------------------------------------------------------

    def burst(self, contender: Contender, pipe: Pipeline, streams: int) -> list[StreamStats]:
        if contender.mode == "sync":
            return self._burst_threads(contender, pipe, streams)
        return self.loop.run_until_complete(self._burst_async(contender, pipe, streams))

    def _burst_threads(self, contender: Contender, pipe: Pipeline, streams: int) -> list[StreamStats]:
        ready = threading.Barrier(streams + 1)
        go = threading.Event()
        start = 0.0
        results: list[StreamStats] = []
        errors: list[BaseException] = []

        def worker() -> None:
            ready.wait()
            go.wait()
            try:
                results.append(consume_sync(contender, pipe, self.data, CONCURRENT_TOKENS, start))
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=worker, name=f"bench-{i}") for i in range(streams)]
        for thread in threads:
            thread.start()
        ready.wait()
        start = time.perf_counter()
        go.set()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results

    async def _burst_async(self, contender: Contender, pipe: Pipeline, streams: int) -> list[StreamStats]:
        start = time.perf_counter()
        coroutines = [consume_async(contender, pipe, self.data, CONCURRENT_TOKENS, start) for _ in range(streams)]
        return await asyncio.gather(*coroutines)

    def concurrent(self, contenders: Sequence[Contender], repetitions: int) -> dict[str, Measurements]:
        pipe = self.pipeline(CONCURRENT_SCENARIO)
        results = {c.name: Measurements() for c in contenders}
        for contender in contenders:  # warm-up: fills the connection pools and thread pools
            self.burst(contender, pipe, CONCURRENT_STREAMS)
        for contender in _interleaved(contenders, repetitions):
            gc.collect()
            cpu = time.process_time()
            streams = self.burst(contender, pipe, CONCURRENT_STREAMS)
            cpu = time.process_time() - cpu
            start = streams[0].start
            wall = max(s.end for s in streams) - start
            chunks = sum(s.chunks for s in streams)
            measured = results[contender.name]
            measured.walls.append(wall)
            measured.rates.append(chunks / wall)
            measured.ttfcs.extend(s.first - start for s in streams)
            measured.cpu_per_chunk.append(cpu / chunks)
        return results


def _interleaved(contenders: Sequence[Contender], repetitions: int) -> Iterator[Contender]:
    """Each contender once per repetition; the order is reversed on every other repetition."""
    for repetition in range(repetitions):
        yield from contenders if repetition % 2 == 0 else reversed(contenders)


# --------------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Row:
    """One line of the results table: a contender in a scenario."""

    contender: Contender
    scenario: str
    samples: int
    rate: float
    ttfc_p50: float
    ttfc_p99: float | None
    cpu_per_chunk: float
    wall: float | None
    wall_range: tuple[float, float] | None


def summarise(contenders: Sequence[Contender], scenario: str, results: dict[str, Measurements]) -> list[Row]:
    """Medians (and TTFC percentiles) of each contender's measurements."""
    rows = []
    for contender in contenders:
        measured = results[contender.name]
        concurrent = bool(measured.walls)
        rows.append(
            Row(
                contender=contender,
                scenario=scenario,
                samples=len(measured.walls) if concurrent else len(measured.rates),
                rate=statistics.median(measured.rates),
                ttfc_p50=percentile(measured.ttfcs, 50),
                ttfc_p99=percentile(measured.ttfcs, 99) if concurrent else None,
                cpu_per_chunk=statistics.median(measured.cpu_per_chunk),
                wall=statistics.median(measured.walls) if concurrent else None,
                wall_range=(min(measured.walls), max(measured.walls)) if concurrent else None,
            )
        )
    return rows


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def print_table(rows: Sequence[Row]) -> None:
    header = (
        f"{'contender':<36} {'mode':<5} {'scenario':<11} {'n':>3} {'chunks/s':>9} {'TTFC p50 ms':>12} "
        f"{'TTFC p99 ms':>12} {'CPU us/chunk':>13} {'wall s':>7} {'wall min-max':>13}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        wall = "-" if row.wall is None else f"{row.wall:.3f}"
        spread = "-" if row.wall_range is None else f"{row.wall_range[0]:.2f}-{row.wall_range[1]:.2f}"
        print(
            f"{row.contender.name:<36} {row.contender.mode:<5} {row.scenario:<11} {row.samples:>3} {row.rate:>9,.0f} "
            f"{_ms(row.ttfc_p50):>12} {_ms(row.ttfc_p99):>12} {row.cpu_per_chunk * 1e6:>13.1f} {wall:>7} {spread:>13}"
        )


@dataclass(frozen=True)
class Ratios:
    """haystream vs hayhooks for one mode and scenario; every ratio > 1 means haystream is better."""

    mode: Mode
    scenario: str
    rate: float  # chunks/s haystream / hayhooks
    ttfc_p50: float  # hayhooks / haystream
    ttfc_p99: float | None
    cpu: float  # client CPU time per chunk hayhooks / haystream


def ratios(rows: Sequence[Row]) -> list[Ratios]:
    """haystream vs hayhooks for every scenario, sync and async."""
    found = []
    for scenario in dict.fromkeys(row.scenario for row in rows):
        for mode in ("sync", "async"):
            pick = {r.contender.library: r for r in rows if r.scenario == scenario and r.contender.mode == mode}
            ours, theirs = pick["haystream"], pick["hayhooks"]
            found.append(
                Ratios(
                    mode=mode,
                    scenario=scenario,
                    rate=ours.rate / theirs.rate,
                    ttfc_p50=theirs.ttfc_p50 / ours.ttfc_p50,
                    ttfc_p99=None
                    if ours.ttfc_p99 is None or theirs.ttfc_p99 is None
                    else theirs.ttfc_p99 / ours.ttfc_p99,
                    cpu=theirs.cpu_per_chunk / ours.cpu_per_chunk,
                )
            )
    return found


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_ratios(found: Sequence[Ratios]) -> None:
    print("Ratios haystream vs hayhooks (> 1 means haystream is better):")
    print(
        f"  {'mode':<5} {'scenario':<11} {'chunks/s hs/hh':>15} {'TTFC p50 hh/hs':>15} {'TTFC p99 hh/hs':>15} "
        f"{'CPU/chunk hh/hs':>16}"
    )
    for r in found:
        print(
            f"  {r.mode:<5} {r.scenario:<11} {_x(r.rate):>15} {_x(r.ttfc_p50):>15} {_x(r.ttfc_p99):>15} {_x(r.cpu):>16}"
        )
    total = CONCURRENT_STREAMS * CONCURRENT_TOKENS
    print(f"  (concurrent: aggregate chunks/s = {total} chunks / wall time, so its ratio is also the wall-time ratio)")


def summary_line(found: Sequence[Ratios], cores: int) -> str:
    parts = []
    for r in found:
        text = f"{r.scenario} {r.mode}: {r.rate:.2f}x chunks/s, {r.ttfc_p50:.2f}x TTFC p50"
        if r.ttfc_p99 is not None:
            text += f", {r.ttfc_p99:.2f}x TTFC p99"
        text += f", {r.cpu:.2f}x CPU/chunk"
        parts.append(text)
    return f"haystream vs hayhooks 2.1 (one run, {cores} cores, >1 = haystream better): " + "; ".join(parts)


def environment() -> str:
    """Versions and core count, for the header of the report."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"Python {platform.python_version()} ({platform.python_implementation()}) on {platform.system()} "
        f"{platform.machine()}, {os.cpu_count()} cores ({usable} usable) | haystack-ai {version('haystack-ai')}, "
        f"hayhooks {version('hayhooks')}, haystream {version('haystream')}, openai {version('openai')}"
    )


def _load() -> str:
    """The 1-minute load average: other processes on the machine disturb the wall-clock numbers."""
    return f"load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "load average n/a"


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="5 fast streams and 1 burst per contender")
    args = parser.parse_args(argv)
    fast_runs, bursts = (5, 1) if args.quick else (20, 15)
    cores = os.cpu_count() or 0

    load_before = _load()
    print(environment())
    print(
        f"Scenario A 'fast': {FAST_SCENARIO}, {fast_runs} sequential streams per contender (medians). "
        f"Scenario B 'concurrent': {CONCURRENT_STREAMS} x {CONCURRENT_SCENARIO}, {bursts} burst(s) per contender."
    )
    print("Fake upstream in its own process; contenders interleaved, order reversed every other repetition.")
    print()

    loop = asyncio.new_event_loop()
    try:
        with FakeUpstreamProcess() as upstream:
            bench = Bench(upstream.base_url, loop)
            try:
                started = time.perf_counter()
                rows = summarise(CONTENDERS, "fast", bench.fast(CONTENDERS, fast_runs))
                rows += summarise(CONTENDERS, "concurrent", bench.concurrent(CONTENDERS, bursts))
                elapsed = time.perf_counter() - started
            finally:
                bench.close()
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    print_table(rows)
    print()
    found = ratios(rows)
    print_ratios(found)
    print()
    print(f"(benchmark took {elapsed:.0f} s; {_load()} at the end, {load_before} at the start)")
    print(summary_line(found, cores))


if __name__ == "__main__":
    main()
