"""The channels' hand-off order: a waiting consumer gets a stream's first items at once, not after a burst."""

from __future__ import annotations

import asyncio

from haystream.streaming.channel import END, AsyncChannel


async def run_burst(channel: AsyncChannel[int], count: int) -> list[str]:
    """A producer that puts `count` items without waiting for anything else (a socket full of chunks)."""
    log: list[str] = []

    async def consume() -> None:
        while (item := await channel.get()) is not END:
            log.append(f"got {item}")

    async def produce() -> None:
        for i in range(count):
            log.append(f"put {i}")
            await channel.put(i)
        channel.finish()

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)  # the consumer is now waiting
    await produce()
    await consumer
    return log


async def test_waiting_consumer_gets_each_of_the_first_items_before_the_next_is_put():
    log = await run_burst(AsyncChannel(64, eager_items=3, handoff_threshold=100), 10)
    for i in range(3):
        assert log.index(f"got {i}") < log.index(f"put {i + 1}"), log
    # After the eager items, a burst is handed over whole (no turn per item): 3..9 are all put before 3 is taken.
    assert log.index("put 9") < log.index("got 3"), log


async def test_producer_ahead_of_a_woken_consumer_lets_it_run_at_the_threshold():
    log = await run_burst(AsyncChannel(64, eager_items=0, handoff_threshold=4), 12)
    assert log.index("put 3") < log.index("got 0") < log.index("put 4"), log
    assert sorted(entry for entry in log if entry.startswith("got")) == sorted(f"got {i}" for i in range(12))


async def test_without_early_hand_off_a_burst_fills_the_buffer_first():
    # The behaviour the hand-off fixes: a consumer that was waiting sees nothing until the producer stops.
    log = await run_burst(AsyncChannel(64, eager_items=0, handoff_threshold=1000), 20)
    assert log.index("put 19") < log.index("got 0"), log


async def test_a_paced_stream_pays_no_extra_turn_after_its_first_items(monkeypatch):
    channel: AsyncChannel[int] = AsyncChannel(64, eager_items=2, handoff_threshold=8)
    yields = 0
    real_sleep = asyncio.sleep

    async def counting_sleep(delay: float, *args: object) -> None:
        nonlocal yields
        if delay == 0:
            yields += 1
        await real_sleep(delay, *args)

    received: list[int] = []
    taken = asyncio.Event()

    async def consume() -> None:
        while (item := await channel.get()) is not END:
            received.append(item)
            taken.set()  # ... and on to `get`, where it waits again before the producer runs

    consumer = asyncio.create_task(consume())
    await real_sleep(0)  # the consumer is now waiting
    monkeypatch.setattr(asyncio, "sleep", counting_sleep)
    for i in range(30):
        if i:
            await taken.wait()  # paced: the consumer has taken the previous item and waits again
            taken.clear()
        await channel.put(i)
    channel.finish()
    await consumer
    assert received == list(range(30))
    assert yields == 2
