"""What the HTTP bench prints and saves: a table per scenario, ratios, the issue's targets, JSON and a PNG plot."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

import procs
from sse_client import Burst

PAIRS = (  # (haystream row, hayhooks row) served with the same wrapper style and generator
    ("hs-strings", "hh-strings"),
    ("hs-astream-haystack", "hh-async-haystack"),
    ("hs-stream-haystack", "hh-sync-haystack"),
    ("hs-astream-fast", "hh-async-haystack"),
    ("hs-stream-fast", "hh-sync-haystack"),
    ("hs-astream-component", "hh-async-haystack"),
    ("hs-astream-fast-w2", "hh-async-haystack"),
)
FAST_ROWS = ("hs-astream-fast", "hs-stream-fast")
# The same Pipeline served by two workers: its CPU, TTFT and gap are checked too. Not its CPU against hayhooks',
# which runs one process: two workers on two cores pay more per chunk (fewer streams share each loop's wake-up).
WORKER_ROWS = ("hs-astream-fast-w2",)
HAYHOOKS_HAYSTACK_ROWS = ("hh-async-haystack", "hh-sync-haystack")
ASYNC_ROWS = ("hs-strings", "hs-astream-haystack", "hs-astream-fast", "hs-astream-component", "hs-astream-fast-w2")
SYNC_ROWS = ("hs-stream-haystack", "hs-stream-fast")


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Result:
    """One row x scenario: the burst as the client saw it, and what /proc said about the processes."""

    row: str
    label: str
    server: str
    scenario: str
    streams: int  # in all rounds together
    concurrent: int  # streams per burst
    burst: Burst
    server_cpu: float | None  # CPU seconds of the server's process tree during the burst
    client_cpu: float
    upstream_cpu: float
    rss_before: int | None
    rss_peak: int | None
    threads_before: int | None
    threads_peak: int | None
    listen_drops: int | None
    # Each burst's own TTFT p99. Bursts of one row differ by up to 2x on this machine, and a pooled p99 is set by the
    # worst of them, so the table's p99 is their median.
    burst_ttft_p99s: list[float] = field(default_factory=list)
    # With several workers: each worker's share of the workers' CPU during the bursts (how evenly they were loaded).
    worker_cpu_shares: list[float] | None = None

    @property
    def ttft_p99(self) -> float | None:
        if len(self.burst_ttft_p99s) > 1:
            return percentile(self.burst_ttft_p99s, 50)
        return percentile(self.ttfts, 99)

    @property
    def chunks(self) -> int:
        return self.burst.chunks

    @property
    def completed(self) -> int:
        return sum(r.completed for r in self.burst.results)

    @property
    def ttfts(self) -> list[float]:
        return self.burst.ttfts

    @property
    def gaps(self) -> list[float]:
        return [g for r in self.burst.results for g in r.gaps]

    def per_chunk_us(self, cpu: float | None) -> float | None:
        return None if cpu is None or not self.chunks else round(cpu / self.chunks * 1e6, 1)

    @property
    def rss_per_stream(self) -> float | None:
        if self.rss_before is None or self.rss_peak is None:
            return None
        return max(0, self.rss_peak - self.rss_before) / self.concurrent

    @property
    def errors(self) -> Counter[str]:
        return Counter(re.sub(r"\d+", "N", r.error)[:100] for r in self.burst.results if r.error is not None)

    def summary(self) -> dict[str, Any]:
        ttfts, gaps = self.ttfts, self.gaps
        return {
            "row": self.row,
            "label": self.label,
            "scenario": self.scenario,
            "streams": self.streams,
            "concurrent": self.concurrent,
            "completed": self.completed,
            "chunks": self.chunks,
            "wall_s": round(self.burst.wall, 3),
            "chunks_per_s": round(self.chunks / self.burst.wall, 1) if self.burst.wall else None,
            "server_cpu_us_per_chunk": self.per_chunk_us(self.server_cpu),
            "client_cpu_us_per_chunk": self.per_chunk_us(self.client_cpu),
            "upstream_cpu_us_per_chunk": self.per_chunk_us(self.upstream_cpu),
            "ttft_p50_ms": _to_ms(percentile(ttfts, 50)),
            "ttft_p99_ms": _to_ms(self.ttft_p99),
            "ttft_p99_per_burst_ms": [_to_ms(p) for p in self.burst_ttft_p99s],
            "gap_p50_ms": _to_ms(percentile(gaps, 50)),
            "gap_p99_ms": _to_ms(percentile(gaps, 99)),
            "rss_per_stream_kb": None if self.rss_per_stream is None else round(self.rss_per_stream / 1024, 2),
            "rss_before_mb": None if self.rss_before is None else round(self.rss_before / 2**20, 1),
            "threads_before": self.threads_before,
            "threads_peak": self.threads_peak,
            "listen_drops": self.listen_drops,
            "worker_cpu_shares": self.worker_cpu_shares,
            "errors": dict(self.errors.most_common(5)),
            # Distributions for plots, as percentiles 0..100 (the raw per-stream values would be megabytes).
            "ttft_percentiles_ms": [_to_ms(percentile(ttfts, q)) for q in range(101)] if ttfts else [],
            "gap_percentiles_ms": [_to_ms(percentile(gaps, q)) for q in range(101)] if gaps else [],
        }

    def progress(self) -> str:
        cpu = self.per_chunk_us(self.server_cpu)
        shares = "" if not self.worker_cpu_shares else "/".join(f"{share:.0%}" for share in self.worker_cpu_shares)
        return (
            f"{self.completed}/{self.streams} complete in {self.burst.wall:.1f}s"
            + ("" if cpu is None else f", server {cpu:.0f} µs/chunk")
            + (f", workers' CPU {shares}" if shares else "")
        )


def _to_ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


@dataclass
class Context:
    """The machine and software a run happened on, and how busy the machine was meanwhile."""

    quick: bool
    scale: float
    nofile: int
    started: float = field(default_factory=time.monotonic)
    busy_before: float | None = field(default_factory=procs.machine_busy_seconds)
    own_before: float = field(default_factory=lambda: _own_cpu())
    load_before: str = field(default_factory=lambda: _load())
    info: dict[str, Any] = field(default_factory=dict)

    def finish(self) -> None:
        wall = time.monotonic() - self.started
        own = _own_cpu() - self.own_before
        busy = procs.machine_busy_seconds()
        other = None if busy is None or self.busy_before is None else max(0.0, busy - self.busy_before - own)
        versions = {
            d: importlib.metadata.version(d) for d in ("haystack-ai", "hayhooks", "openai", "uvicorn", "aiohttp")
        }
        self.info = {
            "python": platform.python_version(),
            "cores": os.cpu_count(),
            "versions": versions,
            "quick": self.quick,
            "scale": self.scale,
            "open_file_limit": self.nofile,
            "wall_s": round(wall),
            "bench_core_s": round(own),
            "other_processes_core_s": None if other is None else round(other),
            "load_before": self.load_before,
            "load_after": _load(),
        }

    def line(self) -> str:
        i = self.info
        versions = ", ".join(f"{k} {v}" for k, v in i["versions"].items())
        share = ""
        other = i["other_processes_core_s"]
        if other is not None:
            fraction = other / max(1, i["wall_s"] * (i["cores"] or 1))
            share = f"; other processes used {other} core-s ({fraction:.0%} of the machine)"
        mode = f"; scale {i['scale']:g}" + (" (--quick)" if i["quick"] else "")
        return (
            f"# Python {i['python']}, {i['cores']} cores; {versions}{mode}\n"
            f"# {i['wall_s']} s; this bench and its children {i['bench_core_s']} core-s{share};"
            f" load average {i['load_before']} -> {i['load_after']}"
        )


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


# ------------------------------------------------------------------------------------------------------------------
# printing
# ------------------------------------------------------------------------------------------------------------------


def _f(value: float | None, fmt: str = ".0f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"


_COLUMNS = (
    ("row", 20),
    ("server µs/chunk", 15),
    ("chunks/s", 9),
    ("TTFT p50", 9),
    ("TTFT p99", 9),
    ("gap p50", 8),
    ("gap p99", 8),
    ("completed", 11),
    ("RSS/stream", 10),
    ("threads", 9),
    ("client µs", 9),
    ("upstr. µs", 9),
)


def print_scenario(title: str, summaries: Sequence[dict[str, Any]], results: Sequence[Result]) -> None:
    print(f"\n## {title}")
    header = " ".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, (name, w) in enumerate(_COLUMNS))
    print(header)
    print("-" * len(header))
    for s in summaries:
        threads = "-" if s["threads_peak"] is None else f"{s['threads_before']}→{s['threads_peak']}"
        cells = (
            s["row"],
            _f(s["server_cpu_us_per_chunk"]),
            _f(s["chunks_per_s"], ",.0f"),
            _f(s["ttft_p50_ms"], unit=" ms"),
            _f(s["ttft_p99_ms"], unit=" ms"),
            _f(s["gap_p50_ms"], ".1f", " ms"),
            _f(s["gap_p99_ms"], ".0f", " ms"),
            f"{s['completed']}/{s['streams']}",
            _f(s["rss_per_stream_kb"], ".1f", " KB"),
            threads,
            _f(s["client_cpu_us_per_chunk"]),
            _f(s["upstream_cpu_us_per_chunk"]),
        )
        print(
            " ".join(
                f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                for i, (c, (_, w)) in enumerate(zip(cells, _COLUMNS, strict=True))
            )
        )
    several = [s for s in summaries if len(s["ttft_p99_per_burst_ms"]) > 1]
    if several:
        bursts = len(several[0]["ttft_p99_per_burst_ms"])
        print(f"TTFT p99: the median of {bursts} bursts' own p99s; each burst's, in ms:")
        for s in several:
            print(f"  {s['row']:<20} " + " / ".join(_f(p, ",.0f") for p in s["ttft_p99_per_burst_ms"]))
    for result in results:
        for kind, count in result.errors.most_common(3):
            print(f"  ! {result.row}: {count} x {kind}")
        if result.listen_drops:
            print(f"  ! {result.row}: the kernel dropped {result.listen_drops} connects at full listen queues")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def print_ratios(by_row: dict[str, dict[str, Any]]) -> None:
    """haystream/hayhooks for the same wrapper style and vs the direct row; < 1 is better for every column."""
    direct = by_row.get("direct")
    lines = []
    for ours, theirs in PAIRS:
        a, b = by_row.get(ours), by_row.get(theirs)
        if a is None or b is None:
            continue
        lines.append(
            f"{ours + ' / ' + theirs:<42} {_x(_ratio(a['server_cpu_us_per_chunk'], b['server_cpu_us_per_chunk'])):>9}"
            f" {_x(_ratio(a['ttft_p99_ms'], b['ttft_p99_ms'])):>9} {_x(_ratio(a['gap_p50_ms'], b['gap_p50_ms'])):>9}"
        )
    if direct is not None:
        for name, s in by_row.items():
            if name != "direct":
                lines.append(
                    f"{name + ' / direct':<42} {'-':>9} {_x(_ratio(s['ttft_p99_ms'], direct['ttft_p99_ms'])):>9}"
                    f" {_x(_ratio(s['gap_p50_ms'], direct['gap_p50_ms'])):>9}"
                )
    if lines:
        print(f"\n{'ratios (lower is better)':<42} {'CPU/chunk':>9} {'TTFT p99':>9} {'gap p50':>9}")
        print("\n".join(lines))


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


@dataclass
class Target:
    name: str
    row: str
    passed: bool | None  # None: skipped
    detail: str

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        return f"{verdict}  {self.name} -- {self.row}: {self.detail}"


def check_targets(table: dict[tuple[str, str], dict[str, Any]], skipped: dict[str, str]) -> list[Target]:
    """The targets of issue 11 (they are stated for the full-size scenarios)."""
    targets: list[Target] = []

    def get(row: str, scenario: str) -> dict[str, Any] | None:
        return table.get((row, scenario))

    direct = get("direct", "paced")
    hayhooks_cpu = [s["server_cpu_us_per_chunk"] for r in HAYHOOKS_HAYSTACK_ROWS if (s := get(r, "paced")) is not None]
    for row in (*FAST_ROWS, *WORKER_ROWS):
        s = get(row, "paced")
        if s is None:
            if row in FAST_ROWS:
                why = skipped.get(row, "not run")
                for name in ("paced: CPU <= 150 µs/chunk", "paced: >= 4x less CPU/chunk than hayhooks + Haystack gen"):
                    targets.append(Target(name, row, None, why))
            continue
        cpu = s["server_cpu_us_per_chunk"]
        targets.append(Target("paced: CPU <= 150 µs/chunk", row, cpu is not None and cpu <= 150, f"{_f(cpu)} µs"))
        if direct is not None:
            ratio = _ratio(s["ttft_p99_ms"], direct["ttft_p99_ms"])
            targets.append(
                Target(
                    "paced: TTFT p99 <= 2x direct",
                    row,
                    ratio is not None and ratio <= 2,
                    f"{_f(s['ttft_p99_ms'])} ms vs {_f(direct['ttft_p99_ms'])} ms = {_x(ratio)}",
                )
            )
        pace_ms = 20.0
        gap = s["gap_p50_ms"]
        targets.append(
            Target(
                "paced: gap p50 <= 1.5x the pace",
                row,
                gap is not None and gap <= 1.5 * pace_ms,
                f"{_f(gap, '.1f')} ms vs pace {pace_ms:g} ms",
            )
        )
        if row in FAST_ROWS and hayhooks_cpu and None not in hayhooks_cpu and cpu:
            best = min(hayhooks_cpu)
            targets.append(
                Target(
                    "paced: >= 4x less CPU/chunk than hayhooks + Haystack gen",
                    row,
                    best / cpu >= 4,
                    f"{cpu:.0f} µs vs hayhooks' cheaper {best:.0f} µs = {best / cpu:.2f}x",
                )
            )
    for (row, scenario), s in table.items():
        if scenario != "slow" or not row.startswith("hs-"):
            continue
        targets.append(
            Target(
                "slow: all streams complete", row, s["completed"] == s["streams"], f"{s['completed']}/{s['streams']}"
            )
        )
        if row in ASYNC_ROWS and s["rss_per_stream_kb"] is not None:
            kb = s["rss_per_stream_kb"]
            targets.append(Target("slow: async wrapper <= 64 KB RSS per stream", row, kb <= 64, f"{kb:.1f} KB"))
        if row in SYNC_ROWS and s["threads_peak"] is not None:
            grew = s["threads_peak"] - s["threads_before"]
            limit = max(8, s["concurrent"] // 20)
            targets.append(
                Target(
                    "slow: sync wrapper's threads do not grow with streams",
                    row,
                    grew <= limit,
                    f"+{grew} threads for {s['concurrent']} streams (allowed: +{limit}, 5% of the streams)",
                )
            )
    return targets


# ------------------------------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------------------------------


def _style(row: str, index: int) -> dict[str, Any]:
    """direct black, relay grey, haystream solid, hayhooks dashed; 20 colours, so 11 rows never share one."""
    if row == "direct":
        return {"color": "black", "linewidth": 2.0}
    if row == "relay":
        return {"color": "0.55", "linewidth": 2.0}
    import matplotlib

    color = matplotlib.colormaps["tab20"](index % 20)
    return {"color": color, "linewidth": 1.3, "linestyle": "--" if row.startswith("hh-") else "-"}


def _minor_label(value: float, _: object) -> str:
    return f"{value:g}" if f"{value:.0e}"[0] in "25" else ""


def plot(results: Sequence[Result], scenarios: Sequence[Any], path: Path, title: str) -> None:
    """ECDFs of TTFT and inter-chunk gaps per row, one line of plots per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = list(dict.fromkeys(r.row for r in results))
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(14, 4.2 * len(scenarios)), squeeze=False)
    for line, scenario in zip(axes, scenarios, strict=True):
        for result in (r for r in results if r.scenario == scenario.key):
            style = _style(result.row, 2 * rows.index(result.row))
            for ax, values in ((line[0], result.ttfts), (line[1], result.gaps)):
                if values:
                    xs = sorted(max(v * 1000, 0.01) for v in values)  # a gap of 0 (same read) shows as 0.01 ms
                    ys = [(i + 1) / len(xs) for i in range(len(xs))]
                    ax.step(xs, ys, where="post", label=result.row, **style)
        for ax, what in ((line[0], "TTFT"), (line[1], "inter-chunk gap")):
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.xaxis.set_minor_formatter(FuncFormatter(_minor_label))  # data within one decade still gets labels
            ax.set_xlabel(f"{what} (ms, log scale)")
            ax.set_ylabel("fraction of " + ("streams" if what == "TTFT" else "gaps"))
            ax.set_title(f"{scenario.label}: {what}")
            ax.grid(True, which="both", alpha=0.3)
        line[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def publish(
    results: Sequence[Result],
    scenarios: Sequence[Any],
    skipped: dict[str, str],
    context: Context,
    out: Path,
    *,
    plot_png: bool = True,
) -> int:
    """Print everything, save JSON (and the plot); exit status 0 when every checked target passes."""
    print("\n" + context.line())
    for row, label in dict.fromkeys((r.row, r.label) for r in results):
        print(f"# {row:<20} {label}")
    for row, why in skipped.items():
        print(f"# {row:<20} {why}")
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for scenario in scenarios:
        chosen = [r for r in results if r.scenario == scenario.key]
        summaries = [r.summary() for r in chosen]
        table.update({(s["row"], scenario.key): s for s in summaries})
        print_scenario(scenario.label, summaries, chosen)
        print_ratios({s["row"]: s for s in summaries})
    targets = check_targets(table, skipped)
    print(
        "\n## targets (issue 11)" + (f" -- at scale {context.scale:g}, not the stated sizes" if context.quick else "")
    )
    for target in targets:
        print(target.line())
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "context": context.info,
        "scenarios": [{"key": s.key, "label": s.label, "streams": s.streams, "model": s.model} for s in scenarios],
        "skipped": skipped,
        "results": list(table.values()),
        "targets": [t.__dict__ for t in targets],
    }
    json_path = out.with_suffix(".json")
    json_path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    print(f"\nsaved {json_path}")
    if plot_png:
        plot(results, scenarios, out.with_suffix(".png"), context.line().replace("# ", ""))
        print(f"saved {out.with_suffix('.png')}")
    return 0 if all(t.passed is not False for t in targets) else 1
