"""HTTP benchmark: how close each way of serving a Haystack pipeline comes to the limit, end to end over sockets.

One run starts the fake OpenAI-compatible upstream (``python -m haystream.testing``) in its own process and then the
server of every row in its own process: ``haystream serve``, stock ``hayhooks run`` or the byte relay
(``bench/relay.py``), each on a pipelines folder holding only that row's wrapper from ``bench/wrappers/``. The aiohttp
client in this process (see `sse_client`) runs each scenario's bursts round by round, one burst per row in turn, so
that drift in the machine's speed hits every row alike; the server's CPU comes from /proc for its whole process
tree (see `procs`). Tables, targets, JSON and the plot are in `report`. See ``bench/README.md`` for what each row
and column means.

Run ``python bench/bench_http.py`` (about 10 minutes on 2 cores) or ``--quick`` (a quarter of the streams).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import importlib.util
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

import procs
import report
from sse_client import Burst, burst

BENCH = Path(__file__).resolve().parent
WRAPPERS = BENCH / "wrappers"
MESSAGES = [{"role": "user", "content": "Tell me something."}]
SAMPLE_EVERY = 0.1  # seconds between RSS/thread samples of the server during a burst


@dataclass(frozen=True)
class Scenario:
    key: str
    streams: int
    tokens: int
    delay: float  # seconds between tokens
    rounds: int = 1  # bursts, back to back; one fast burst is too short for /proc's 10 ms CPU ticks

    @property
    def model(self) -> str:
        return f"fake?tokens={self.tokens}&delay={self.delay:g}"

    @property
    def label(self) -> str:
        pace = f"at {self.delay * 1000:g} ms" if self.delay else "no delay"
        return f"{self.streams} {self.key} streams ({self.tokens} tokens {pace})"


# The order they run in on each server: the memory scenario first, on a server that has only been warmed up.
SCENARIOS = (
    Scenario("slow", 1000, 20, 0.2),
    # Three bursts: one burst's TTFT p99 varies up to 2x between identical bursts; the table shows their median.
    Scenario("paced", 200, 50, 0.02, rounds=3),
    Scenario("fast", 20, 200, 0.0, rounds=5),
    # One token each: the server's CPU per chunk is its CPU per request (parsing, wrapper, pipeline, upstream call).
    Scenario("setup", 200, 1, 0.0, rounds=3),
)


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    server: str  # "direct", "relay", "haystream" or "hayhooks"
    wrapper: str | None = None  # folder under bench/wrappers
    generator: str | None = None  # "haystack", "haystream" (skipped when missing) or "haystream?" (falls back)
    workers: int = 1

    @property
    def sends_done(self) -> bool:
        return self.server != "hayhooks"  # hayhooks ends its streams without `data: [DONE]`


ROWS = (
    Row("direct", "client straight to the fake upstream (the limit)", "direct"),
    Row("relay", "aiohttp byte relay (the floor of any parsing server)", "relay"),
    Row("hs-strings", "haystream, wrapper yielding paced strings", "haystream", "bench_strings"),
    Row("hh-strings", "hayhooks, same wrapper", "hayhooks", "bench_strings"),
    Row("hs-astream-haystack", "haystream, astream(Haystack generator)", "haystream", "bench_astream", "haystack"),
    Row("hs-stream-haystack", "haystream, stream(Haystack generator)", "haystream", "bench_stream", "haystack"),
    Row(
        "hh-async-haystack",
        "hayhooks, async_streaming_generator(Haystack gen)",
        "hayhooks",
        "bench_hayhooks_async",
        "haystack",
    ),
    Row(
        "hh-sync-haystack", "hayhooks, streaming_generator(Haystack gen)", "hayhooks", "bench_hayhooks_sync", "haystack"
    ),
    Row("hs-astream-fast", "haystream, astream(haystream generator)", "haystream", "bench_astream", "haystream"),
    Row("hs-stream-fast", "haystream, stream(haystream generator)", "haystream", "bench_stream", "haystream"),
    Row(
        "hs-astream-component",
        "haystream, astream(haystream generator), no Pipeline",
        "haystream",
        "bench_astream_component",
        "haystream",
    ),
    Row(
        "hs-astream-fast-w2",
        "haystream --workers 2, astream(haystream gen)",
        "haystream",
        "bench_astream",
        "haystream?",
        workers=2,
    ),
)


def haystream_generator_missing() -> str | None:
    """Why `haystream.components.OpenAIChatGenerator` cannot be used, or None if it can."""
    if importlib.util.find_spec("haystream.components") is None:
        return "haystream.components does not exist"
    try:
        from haystream.components import OpenAIChatGenerator  # noqa: F401
    except ImportError as error:
        return f"haystream.components.OpenAIChatGenerator is not importable ({error})"
    return None


def resolve(row: Row, missing: str | None) -> Row | str:
    """The row to run (the generator fallback applied), or why it is skipped."""
    if row.generator == "haystream" and missing:
        return f"skipped: {missing}"
    if row.generator == "haystream?":
        if missing:
            label = row.label.replace("haystream gen", "Haystack gen: haystream's is missing")
            return Row(row.key, label, row.server, row.wrapper, "haystack", row.workers)
        return Row(row.key, row.label, row.server, row.wrapper, "haystream", row.workers)
    return row


# ------------------------------------------------------------------------------------------------------------------
# the rows: start their servers, warm them up, measure their bursts
# ------------------------------------------------------------------------------------------------------------------


def start_server(row: Row, fake_url: str, env: dict[str, str], tmp: Path) -> procs.Child | None:
    """The row's server process (None for direct), ready to serve."""
    if row.server == "direct":
        return None
    if row.server == "relay":
        child = procs.Child(row.key, [sys.executable, str(BENCH / "relay.py"), fake_url], env, tmp, procs.url_line)
        child.wait_ready()
        return child
    pipelines = tmp / f"pipelines-{row.key}"
    pipelines.mkdir()
    assert row.wrapper is not None
    (pipelines / row.wrapper).symlink_to(WRAPPERS / row.wrapper, target_is_directory=True)
    command = [sys.executable, "-m", "haystream", "serve"] if row.server == "haystream" else [hayhooks_script(), "run"]
    port = procs.free_port()
    argv = [*command, "--host", "127.0.0.1", "--port", str(port), "--pipelines-dir", str(pipelines)]
    argv += ["--workers", str(row.workers)]
    # Wrappers import `bench_pipeline` from bench/wrappers (hayhooks loads each wrapper as a private package).
    path = os.pathsep.join(p for p in (str(WRAPPERS), env.get("PYTHONPATH", "")) if p)
    child_env = {**env, "BENCH_GENERATOR": row.generator or "haystack", "PYTHONPATH": path}
    child = procs.Child(row.key, argv, child_env, tmp, procs.UvicornReady(row.workers), group=True, cwd=tmp)
    try:
        child.wait_ready()
    except BaseException:
        child.stop()
        raise
    return child


def hayhooks_script() -> str:
    """hayhooks' console script next to this Python (``python -m hayhooks`` does not run the CLI)."""
    script = Path(sys.executable).with_name("hayhooks")
    if not script.exists():
        raise RuntimeError(f"hayhooks is not installed next to {sys.executable}")
    return str(script)


def endpoint(row: Row, fake_url: str, server: procs.Child | None) -> str:
    if server is None:
        return f"{fake_url}/chat/completions"
    return f"{server.url}/v1/chat/completions"


def request_body(row: Row, scenario: Scenario) -> bytes:
    if row.wrapper is None:  # the fake itself, directly or through the relay: the scenario is the model
        return orjson.dumps({"model": scenario.model, "messages": MESSAGES, "stream": True})
    body = {"model": row.wrapper, "messages": MESSAGES, "stream": True, "scenario": scenario.model}
    return orjson.dumps(body)


@dataclass
class Served:
    """A row's running server (None for `direct`), with the processes whose CPU it is charged."""

    row: Row
    server: procs.Child | None
    url: str
    server_pids: list[int]
    fake_pids: list[int]
    # Several workers: the processes under the supervisor, each loaded by the connections the kernel gave it.
    worker_pids: list[int]


def serve(row: Row, fake: procs.Child, env: dict[str, str], tmp: Path) -> Served:
    server = start_server(row, fake.url or "", env, tmp)
    server_pids = procs.process_tree(server.pid) if server is not None else []
    worker_pids = [pid for pid in server_pids if procs.is_spawned_worker(pid)] if row.workers > 1 else []
    if server is not None:
        port = int((server.url or "").rsplit(":", 1)[1])
        backlog = procs.listen_backlog(port)
        if backlog is not None and backlog < max(s.streams for s in SCENARIOS):
            print(f"  ! {row.key} listens with a backlog of {backlog}: SYNs may be dropped", flush=True)
    url = endpoint(row, fake.url or "", server)
    return Served(row, server, url, server_pids, procs.process_tree(fake.pid), worker_pids)


async def warm_up(served: Served, scenarios: Sequence[Scenario], timeout: float) -> None:
    """Imports, lazy clients, pools: a few streams of every scenario, so that every worker gets one."""
    row = served.row
    for scenario in scenarios:
        warm = await burst(
            served.url,
            request_body(row, scenario),
            4 * row.workers,
            scenario.tokens,
            sends_done=row.sends_done,
            timeout=timeout + scenario.tokens * scenario.delay,
        )
        if not all(r.completed for r in warm.results):
            error = next(r.error for r in warm.results if not r.completed)
            raise RuntimeError(f"warm-up of {row.key} with {scenario.model!r} failed: {error}")


@dataclass
class Tally:
    """One row x scenario, summed over its bursts: what the client saw and what /proc said during each burst."""

    served: Served
    scenario: Scenario
    bursts: list[Burst] = field(default_factory=list)
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    upstream_cpu: float = 0.0
    worker_cpu: list[float] = field(default_factory=list)
    rss_before: int | None = None
    threads_before: int | None = None
    peak: dict[str, int] = field(default_factory=lambda: {"rss": 0, "threads": 0})
    listen_drops: int | None = 0

    async def measure(self, timeout: float) -> None:
        """One burst, with the server's, the upstream's and this process's CPU read just before and just after."""
        served, scenario = self.served, self.scenario
        pids, peak = served.server_pids, self.peak

        async def sample() -> None:
            while True:
                now = procs.usage(pids)
                peak["rss"], peak["threads"] = max(peak["rss"], now.rss), max(peak["threads"], now.threads)
                await asyncio.sleep(SAMPLE_EVERY)

        drops_before = procs.listen_drops()
        server_before, fake_before = procs.usage(pids), procs.usage(served.fake_pids)
        if self.rss_before is None:
            self.rss_before, self.threads_before = server_before.rss, server_before.threads
        workers_before = [procs.usage([pid]).cpu for pid in served.worker_pids]
        client_before = time.process_time()
        self.bursts.append(
            await burst(
                served.url,
                request_body(served.row, scenario),
                scenario.streams,
                scenario.tokens,
                sends_done=served.row.sends_done,
                timeout=timeout + scenario.tokens * scenario.delay,
                during=sample if pids else None,
            )
        )
        self.client_cpu += time.process_time() - client_before
        server_after, fake_after = procs.usage(pids), procs.usage(served.fake_pids)
        self.server_cpu += server_after.cpu - server_before.cpu
        self.upstream_cpu += fake_after.cpu - fake_before.cpu
        workers = zip(served.worker_pids, workers_before, strict=True)
        spent = [procs.usage([pid]).cpu - before for pid, before in workers]
        self.worker_cpu = [a + b for a, b in zip(self.worker_cpu, spent, strict=True)] if self.worker_cpu else spent
        drops_after = procs.listen_drops()
        if drops_before is None or drops_after is None or self.listen_drops is None:
            self.listen_drops = None
        else:
            self.listen_drops += drops_after - drops_before

    def result(self) -> report.Result:
        row, has_server = self.served.row, bool(self.served.server_pids)
        done = Burst([r for b in self.bursts for r in b.results], sum(b.wall for b in self.bursts))
        workers = sum(self.worker_cpu)
        return report.Result(
            row=row.key,
            label=row.label,
            server=row.server,
            scenario=self.scenario.key,
            streams=len(done.results),
            concurrent=self.scenario.streams,
            burst=done,
            server_cpu=self.server_cpu if has_server else None,
            client_cpu=self.client_cpu,
            upstream_cpu=self.upstream_cpu,
            rss_before=self.rss_before if has_server else None,
            rss_peak=self.peak["rss"] if has_server else None,
            threads_before=self.threads_before if has_server else None,
            threads_peak=self.peak["threads"] if has_server else None,
            listen_drops=self.listen_drops,
            burst_ttft_p99s=[p for b in self.bursts if (p := report.percentile(b.ttfts, 99)) is not None],
            worker_cpu_shares=[cpu / workers for cpu in self.worker_cpu] if workers > 0 else None,
        )


# ------------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------------


def select(items: Sequence[Row] | Sequence[Scenario], patterns: str | None) -> list:
    if not patterns:
        return list(items)
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [item for item in items if any(fnmatch.fnmatch(item.key, p) for p in wanted)]
    if not chosen:
        raise SystemExit(f"nothing matches {patterns!r}; choose from {', '.join(i.key for i in items)}")
    return chosen


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--quick", action="store_true", help="a quarter of the streams per scenario (same as --scale 0.25)"
    )
    parser.add_argument("--scale", type=float, default=None, help="multiply every scenario's stream count")
    parser.add_argument("--rows", help=f"rows to run, comma-separated globs ({', '.join(r.key for r in ROWS)})")
    parser.add_argument("--scenarios", help=f"scenarios to run ({', '.join(s.key for s in SCENARIOS)})")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a stream may take beyond its pacing")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "http", help="results prefix (.json, .png)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    return parser.parse_args(argv)


async def run_all(
    rows: Sequence[Row | str],
    keys: Sequence[str],
    scenarios: Sequence[Scenario],
    env: dict[str, str],
    tmp: Path,
    timeout: float,
) -> list[report.Result]:
    """Start every row's server, then run each scenario's bursts row after row, in alternating order.

    All servers run for the whole bench, idle except for their own bursts, so that a round of bursts takes every
    row in turn: a drift in the machine's speed during the run hits every row alike, and the ratios between rows
    compare bursts minutes apart at most (a row-by-row run put the hayhooks and haystream rows of one ratio several
    minutes apart).
    """
    results: list[report.Result] = []
    fake = procs.Child("fake_upstream", [sys.executable, "-m", "haystream.testing"], env, tmp, procs.url_line)
    live: list[Served] = []
    try:
        fake_url = fake.wait_ready()
        backlog = procs.listen_backlog(int(fake_url.rsplit(":", 1)[1].split("/")[0]))
        print(f"fake upstream {fake_url} (pid {fake.pid}, listen backlog {backlog})", flush=True)
        env = {**env, "FAKE_UPSTREAM_URL": fake_url}
        for key, row in zip(keys, rows, strict=True):
            if isinstance(row, str):
                print(f"- {key}: {row}", flush=True)
                continue
            print(f"- {key}: {row.label}", flush=True)
            served = None
            try:
                served = await asyncio.to_thread(serve, row, fake, env, tmp)
                await warm_up(served, scenarios, timeout)
                live.append(served)
            except Exception as error:  # one broken row is reported, the others still run
                _drop(key, error, served)
        for scenario in scenarios:
            print(f"## {scenario.label}", flush=True)
            tallies = {served.row.key: Tally(served, scenario) for served in live}
            for round_ in range(scenario.rounds):
                for served in live if round_ % 2 == 0 else live[::-1]:
                    try:
                        await tallies[served.row.key].measure(timeout)
                    except Exception as error:
                        _drop(served.row.key, error, served)
                        del tallies[served.row.key]
                live = [served for served in live if served.row.key in tallies]
            for served in live:
                result = tallies[served.row.key].result()
                results.append(result)
                print(f"  {served.row.key:<22} {scenario.key:<6} {result.progress()}", flush=True)
    finally:
        for served in live:
            if served.server is not None:
                await asyncio.to_thread(served.server.stop)
        fake.stop()
    return results


def _drop(key: str, error: Exception, served: Served | None) -> None:
    """A broken row is reported and stopped; the others still run."""
    print(f"  ! {key} failed: {error}", flush=True)
    if served is not None and served.server is not None:
        print(served.server.tail(), file=sys.stderr)
        served.server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    scale = args.scale if args.scale is not None else (0.25 if args.quick else 1.0)
    scenarios = [
        Scenario(s.key, max(1, round(s.streams * scale)) if s.key != "fast" else s.streams, s.tokens, s.delay, s.rounds)
        for s in select(SCENARIOS, args.scenarios)
    ]
    missing = haystream_generator_missing()
    chosen = select(ROWS, args.rows)
    rows = [resolve(row, missing) for row in chosen]
    nofile = procs.raise_open_file_limit(8 * max(s.streams for s in scenarios) + 1024)
    env = {
        **os.environ,
        "HAYSTACK_TELEMETRY_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ in bench/wrappers
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind like Ctrl-C: the children get stopped
    context = report.Context(quick=scale != 1.0, scale=scale, nofile=nofile)
    with tempfile.TemporaryDirectory(prefix="haystream-bench-http-") as tmp, contextlib.ExitStack() as stack:
        stack.callback(procs.stop_all)
        loop_factory = None
        with contextlib.suppress(ImportError):
            import uvloop

            loop_factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            results = runner.run(run_all(rows, [r.key for r in chosen], scenarios, env, Path(tmp), args.timeout))
    context.finish()
    skipped = {row.key: r for row, r in zip(chosen, rows, strict=True) if isinstance(r, str)}
    return report.publish(results, scenarios, skipped, context, args.out, plot_png=not args.no_plot)


if __name__ == "__main__":
    sys.exit(main())
