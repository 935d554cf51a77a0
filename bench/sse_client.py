"""The bench client: bursts of concurrent streaming chat requests over aiohttp, timed per SSE content event.

aiohttp reads SSE for a fraction of what the servers under test spend per chunk (an httpx client cost ~340 µs per
chunk here and was itself the bottleneck). One session per burst, created before the clock starts, with no
connection limit.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

_HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}


@dataclass
class StreamResult:
    """One stream as the client saw it. Times in seconds."""

    ttft: float | None = None  # request sent -> first event with non-empty delta.content
    gaps: list[float] = field(default_factory=list)  # between consecutive content events (0 within one read)
    chunks: int = 0  # content events
    completed: bool = False  # every token, the proper end, no error
    error: str | None = None


def _content(event: Any) -> str | None:
    if not isinstance(event, dict):
        return None
    choices = event.get("choices")
    if not choices:
        return None
    content = (choices[0].get("delta") or {}).get("content")
    return content if isinstance(content, str) else None


async def one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, tokens: int, sends_done: bool, timeout: float
) -> StreamResult:
    """POST one streaming request and time its content events; a broken stream is a data point, not an exception."""
    result = StreamResult()
    done = False
    last = 0.0
    start = time.perf_counter()
    try:
        async with session.post(
            url, data=body, headers=_HEADERS, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            if response.status != 200:
                text = (await response.read())[:200].decode(errors="replace")
                result.error = f"HTTP {response.status}: {text}"
                return result
            pending = b""
            async for data in response.content.iter_any():
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
                    elif _content(event):
                        if result.ttft is None:
                            result.ttft = now - start
                        else:
                            result.gaps.append(now - last)
                        last = now
                        result.chunks += 1
    except Exception as error:
        result.error = f"{type(error).__name__}: {str(error)[:200]}"
        return result
    if result.error is None and sends_done and not done:
        result.error = "no [DONE]"
    if result.error is None and result.chunks != tokens:
        result.error = f"got {result.chunks} of {tokens} tokens"
    result.completed = result.error is None
    return result


@dataclass
class Burst:
    results: list[StreamResult]
    wall: float  # first send -> last stream ended

    @property
    def chunks(self) -> int:
        return sum(r.chunks for r in self.results)

    @property
    def ttfts(self) -> list[float]:
        return [r.ttft for r in self.results if r.ttft is not None]


async def burst(
    url: str,
    body: bytes,
    streams: int,
    tokens: int,
    *,
    sends_done: bool,
    timeout: float,
    during: Callable[[], Any] | None = None,
) -> Burst:
    """`streams` concurrent streams; `during` (a coroutine function) runs alongside and is cancelled at the end."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        gc.collect()
        side = asyncio.ensure_future(during()) if during is not None else None
        try:
            start = time.perf_counter()
            results = await asyncio.gather(
                *(one_stream(session, url, body, tokens, sends_done, timeout) for _ in range(streams))
            )
            wall = time.perf_counter() - start
        finally:
            if side is not None:
                side.cancel()
                await asyncio.gather(side, return_exceptions=True)
    return Burst(list(results), wall)
