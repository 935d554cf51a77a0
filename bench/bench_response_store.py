"""What a write to the Redis response store costs as one API key's stored responses grow, and how much memory Redis
uses per byte the per-key size bound counts; and what appending a streamed event to a running response costs.

    redis-server --port 6390 --save '' --appendonly no &
    python bench/bench_response_store.py redis://127.0.0.1:6390/15     # flushes that database first

Redis's own CPU per script call (`INFO commandstats`) is the steady figure; the client's round trip is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import redis

from haystream.server.response_store import RedisStore, StoredResponse

SIZES = (0, 1_000, 10_000, 100_000)
TIMED = 2_000
IN_FLIGHT = 64  # within redis-py's pool of 100 connections


def response(key_id: str, id: str, text: str = "x" * 200, status: str = "completed") -> StoredResponse:
    return StoredResponse(key_id, {"id": id, "status": status, "output": text}, [{"role": "user", "content": text}])


async def fill(store: RedisStore, key_id: str, count: int) -> None:
    for start in range(0, count, IN_FLIGHT):
        ids = range(start, min(start + IN_FLIGHT, count))
        await asyncio.gather(*(store.save(response(key_id, f"resp_{key_id}_{i}")) for i in ids))


async def save_cost(store: RedisStore, direct: redis.Redis, key_id: str) -> tuple[float, float]:
    """Median client round trip and Redis CPU per save, in µs, of `TIMED` saves of `key_id`."""
    direct.config_resetstat()
    times = []
    for i in range(TIMED):
        start = time.perf_counter()
        await store.save(response(key_id, f"resp_{key_id}_timed{i}"))
        times.append(time.perf_counter() - start)
    in_redis = direct.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]
    return statistics.median(times) * 1e6, in_redis


async def append_cost(store: RedisStore, direct: redis.Redis) -> tuple[float, float]:
    """Median client round trip and Redis CPU per append of one event to a running response's log, in µs (what a
    background response pays per streamed event)."""
    await store.save(response("appending", "resp_appending", "", "in_progress"))
    delta = {"type": "response.output_text.delta", "delta": "tok ", "item_id": "msg_0123456789abcdef"}
    direct.config_resetstat()
    times = []
    for n in range(TIMED):
        start = time.perf_counter()
        await store.append("resp_appending", "appending", [{**delta, "sequence_number": n}])
        times.append(time.perf_counter() - start)
    in_redis = direct.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]
    return statistics.median(times) * 1e6, in_redis


async def memory_per_counted_byte(store: RedisStore, direct: redis.Redis) -> None:
    cases = (("small", 5_000, "x" * 300, 0), ("large", 200, "x" * 40_000, 0), ("background", 50, "x" * 100, 500))
    for key_id, count, text, events in cases:
        before = direct.info("memory")["used_memory"]
        for i in range(count):
            id = f"resp_{key_id}_{i}"
            await store.save(response(key_id, id, text, "in_progress" if events else "completed"))
            for first in range(0, events, 10):
                delta = {"type": "response.output_text.delta", "delta": "tok ", "item_id": "msg_0123456789abcdef"}
                await store.append(id, key_id, [{**delta, "sequence_number": n} for n in range(first, first + 10)])
        counted = int(direct.hget(f"haystream:responses:key:{key_id}:sizes", "total") or 0)
        used = direct.info("memory")["used_memory"] - before
        print(f"{key_id:>10}: counted {counted / 1e6:6.2f} MB, Redis used {used / 1e6:6.2f} MB ({used / counted:.2f}x)")


async def main(url: str) -> None:
    direct = redis.Redis.from_url(url)
    direct.flushdb()
    unbounded = RedisStore(url, 3600, max_stored=10**9, max_bytes=10**15)
    bounded = RedisStore(url, 3600, max_stored=1_000, max_bytes=10**15)
    try:
        print("Redis memory per byte the size bound counts (first: memory freed later would be reused):")
        await memory_per_counted_byte(unbounded, direct)
        print("save, as one key's stored responses grow (median client round trip, Redis CPU per script call):")
        for size in SIZES:
            await fill(unbounded, f"holding{size}", size)
            client, in_redis = await save_cost(unbounded, direct, f"holding{size}")
            print(f"  {size:>7} records: {client:5.0f} µs, {in_redis:5.1f} µs in Redis")
        await fill(bounded, "bounded", 1_000)
        client, in_redis = await save_cost(bounded, direct, "bounded")
        print(f"  at the bound (1,000), each save dropping one: {client:5.0f} µs, {in_redis:5.1f} µs in Redis")
        client, in_redis = await append_cost(unbounded, direct)
        print(f"append of one event to a running response: {client:5.0f} µs, {in_redis:5.1f} µs in Redis")
    finally:
        await unbounded.close()
        await bounded.close()
        direct.flushdb()
        direct.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="a Redis database this may flush, e.g. redis://127.0.0.1:6390/15")
    asyncio.run(main(parser.parse_args().url))
