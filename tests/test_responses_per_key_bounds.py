"""Stored Responses are bounded per API key: one key's flood drops only its own records, in memory and in a real Redis
shared by two replicas, through the openai SDK; Redis' index stays exact under concurrent writers and costs the same
per write however many records a key holds."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from haystream.server.response_store import EventLog, MemoryStore, RedisStore, ResponseTakenOver, StoredResponse
from support import RedisServer, redis_client, start_server, unique

# See tests/test_responses.py: servers started after the session's use the sync wrapper.
SYNC = {"mode": "stream", "scenario": "fake?tokens=1"}
FLOOD, QUIET = "key-flood-aaaaaaaa", "key-quiet-bbbbbbbb"


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


_databases = itertools.count(1)


def fresh_database(redis: RedisServer) -> str:
    """A URL of an empty database on `redis`: each test its own records and indexes."""
    return redis.url.rsplit("/", 1)[0] + f"/{next(_databases)}"


@contextlib.contextmanager
def replicas(upstream, redis_url: str | None, **settings: Any) -> Iterator[list[Any]]:
    """Two servers on one Redis, or one server with the memory store (listed twice): requests alternate between them."""
    settings = {"api_keys": f"{FLOOD},{QUIET}", **settings}
    if redis_url is not None:
        settings["redis_url"] = redis_url
    servers = [start_server(upstream, **settings)]
    try:
        servers.append(start_server(upstream, **settings) if redis_url is not None else servers[0])
        yield servers
    finally:
        for server in dict.fromkeys(servers):
            server.stop()


@contextlib.contextmanager
def clients(servers: list[Any], key: str) -> Iterator[list[openai.OpenAI]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0))
            for server in servers
        ]


@pytest.fixture(params=["memory", "redis"])
def redis_url(request) -> str | None:
    """None (the memory store), or an empty database of the module's redis-server."""
    return fresh_database(request.getfixturevalue("redis")) if request.param == "redis" else None


def test_one_keys_flood_drops_only_its_own_responses(upstream, redis_url):
    # Both stores were bounded for all keys together (memory), or not at all (Redis, whose maxmemory eviction then
    # chose among every key's records): a key that stored 1,000 responses dropped every other key's, and their
    # conversations broke with 404 previous_response_id.
    with (
        replicas(upstream, redis_url, responses_max_stored=3) as servers,
        clients(servers, QUIET) as quiet,
        clients(servers, FLOOD) as flood,
    ):
        first = quiet[0].responses.create(model="fake_sync", input="remember 42", extra_body=SYNC)
        second = quiet[1].responses.create(
            model="fake_sync", input="and 43", previous_response_id=first.id, extra_body=SYNC
        )
        early = flood[0].responses.create(model="fake_sync", input="hi", background=True, extra_body=SYNC)
        assert [event.type for event in flood[1].responses.retrieve(early.id, stream=True)][-1] == (
            "response.completed"
        )
        flooded = [flood[i % 2].responses.create(model="fake_sync", input="x", extra_body=SYNC) for i in range(9)]

        # The quiet key keeps every response, its input items, and its conversation.
        for client, response in zip(quiet, (first, second), strict=True):
            assert client.responses.retrieve(response.id).status == "completed"
        assert quiet[0].responses.input_items.list(second.id).data[0].content[0].text == "and 43"
        scenario = unique("fake?tokens=1")
        third = quiet[1].responses.create(
            model="fake_sync",
            input="sum?",
            previous_response_id=second.id,
            extra_body={"mode": "stream", "scenario": scenario},
        )
        assert third.status == "completed"
        sent = upstream.wait_for_requests(1, model=scenario)[0].body["messages"]
        assert [m["content"] for m in sent if m["role"] == "user"] == ["remember 42", "and 43", "sum?"]

        # The flooding key keeps its newest 3, across both replicas, and its dropped ones are clear 404s.
        for client, response in zip(itertools.cycle(flood), flooded[-3:], strict=False):
            assert client.responses.retrieve(response.id).status == "completed"
        for dropped in (early, *flooded[:-3]):
            with pytest.raises(openai.NotFoundError) as missing:
                flood[0].responses.retrieve(dropped.id)
            assert missing.value.body["message"] == f"Response with id '{dropped.id}' not found."
        with pytest.raises(openai.NotFoundError) as missing:
            flood[1].responses.input_items.list(flooded[0].id)
        assert missing.value.body["code"] == "response_not_found"
        with pytest.raises(openai.NotFoundError) as missing:
            flood[1].responses.retrieve(early.id, stream=True)  # the resume of a dropped background response
        with pytest.raises(openai.NotFoundError) as missing:
            flood[0].responses.create(model="fake_sync", input="x", previous_response_id=flooded[0].id, extra_body=SYNC)
        assert (missing.value.body["code"], missing.value.body["param"]) == (
            "previous_response_not_found",
            "previous_response_id",
        )
    if redis_url is not None:
        with redis_client(redis_url) as direct:
            stored = {key for key in direct.scan_iter("haystream:responses:resp_*") if not key.endswith(b":events")}
            assert len(stored) == 3 + 3  # the quiet key's three, the flooding key's three; no orphaned event log
            assert not direct.exists(f"haystream:responses:{early.id}:events")


def test_one_keys_large_responses_drop_only_its_own_by_size(upstream, redis_url):
    with (
        replicas(upstream, redis_url, responses_max_stored_bytes=64 * 1024) as servers,
        clients(servers, QUIET) as quiet,
        clients(servers, FLOOD) as flood,
    ):
        big = "x" * 40_000
        kept = quiet[0].responses.create(model="fake_sync", input=big, extra_body=SYNC)
        older = flood[0].responses.create(model="fake_sync", input=big, extra_body=SYNC)
        newer = flood[1].responses.create(model="fake_sync", input=big, extra_body=SYNC)  # 80 KB of this key's
        with pytest.raises(openai.NotFoundError):
            flood[0].responses.retrieve(older.id)
        assert flood[0].responses.retrieve(newer.id).status == "completed"
        assert quiet[1].responses.retrieve(kept.id).status == "completed"  # 120 KB in all: the bound is per key


def test_a_running_background_response_of_the_flooding_key_is_kept(upstream, redis_url):
    # A running response is never dropped (its GET and cancel would 404 while it runs): the key's finished ones go
    # instead, and once it ends it is the newest and counts like any other.
    with (
        replicas(upstream, redis_url, responses_max_stored=2) as servers,
        clients(servers, FLOOD) as flood,
    ):
        scenario = unique("fake?tokens=2000&hold_after=1")
        running = flood[0].responses.create(
            model="fake_async", input="hi", background=True, extra_body={"scenario": scenario}
        )
        record = upstream.wait_for_requests(1, model=scenario)[0]
        finished = [flood[i % 2].responses.create(model="fake_sync", input="x", extra_body=SYNC) for i in range(3)]
        assert flood[1].responses.retrieve(running.id).status == "in_progress"
        for dropped in finished[:-1]:
            with pytest.raises(openai.NotFoundError):
                flood[0].responses.retrieve(dropped.id)
        assert flood[1].responses.cancel(running.id).status == "cancelled"
        assert record.wait().client_hung_up
        assert flood[0].responses.retrieve(running.id).status == "cancelled"
        assert flood[1].responses.retrieve(finished[-1].id).status == "completed"
        later = flood[0].responses.create(model="fake_sync", input="x", extra_body=SYNC)
        with pytest.raises(openai.NotFoundError):  # two at most: the oldest finished one went
            flood[1].responses.retrieve(finished[-1].id)
        statuses = {flood[0].responses.retrieve(id).status for id in (running.id, later.id)}
        assert statuses == {"cancelled", "completed"}


@pytest.mark.parametrize("deleting", [0, 1], ids=["on-the-runs-replica", "on-another-replica"])
def test_a_deleted_running_background_response_leaves_nothing_in_redis(upstream, redis, deleting):
    # Its run, cancelled by the DELETE, appends `response.cancelled` as it unwinds: that XADD made the deleted
    # response's event log again, outside every bound, for a TTL. A DELETE through another replica stopped nothing:
    # the run went on (holding a place of its key's stream caps, and its provider), and its last save stored the
    # deleted response again.
    url = fresh_database(redis)
    with replicas(upstream, url) as servers, clients(servers, FLOOD) as flood:
        scenario = unique("fake?tokens=2000&hold_after=1")
        created = flood[0].responses.create(
            model="fake_async", input="hi", background=True, extra_body={"scenario": scenario}
        )
        record = upstream.wait_for_requests(1, model=scenario)[0]
        flood[deleting].responses.delete(created.id)
        assert record.wait().client_hung_up  # the provider is cut after the run's last save and append
        for client in flood:
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(created.id)
    with redis_client(url) as direct:
        assert not direct.exists(f"haystream:responses:{created.id}", f"haystream:responses:{created.id}:events")
        assert int(direct.hget(f"haystream:responses:key:{FLOOD}:sizes", "total") or 0) == 0


def test_a_replay_on_another_replica_of_a_response_deleted_meanwhile_ends_with_an_error_event(upstream, redis):
    # The run's last append (`response.cancelled`) made a deleted response's log again, and a replay on another
    # replica read it; now that a removed response gets no events, that replay would end without a word, which reads
    # as a complete stream. It ends with an `error` event (`response_not_found`) instead.
    url = fresh_database(redis) + "?socket_timeout=1"  # blocking reads of half a second: the removal is seen soon
    with replicas(upstream, url, keepalive_seconds=1) as servers, httpx.Client(timeout=30) as http:
        headers = {"authorization": f"Bearer {FLOOD}"}
        scenario = unique("fake?tokens=2000&hold_after=1")
        body = {"model": "fake_async", "input": "hi", "background": True, "scenario": scenario}
        created = http.post(servers[0].url + "/v1/responses", json=body, headers=headers).json()
        record = upstream.wait_for_requests(1, model=scenario)[0]
        replay_url = f"{servers[1].url}/v1/responses/{created['id']}?stream=true"
        with http.stream("GET", replay_url, headers=headers) as replay:
            lines = replay.iter_lines()
            next(line for line in lines if line == "event: response.output_text.delta")
            assert http.delete(f"{servers[0].url}/v1/responses/{created['id']}", headers=headers).status_code == 200
            rest = [orjson.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
        assert record.wait().client_hung_up
    assert [event["type"] for event in rest][1:] == ["error"]  # after the delta whose name line was read
    assert (rest[-1]["code"], rest[-1]["param"]) == ("response_not_found", None)
    assert created["id"] in rest[-1]["message"]


# The Redis index, at the store ------------------------------------------------------------------------------------


def record(key_id: str, id: str, status: str = "completed", text: str = "x") -> StoredResponse:
    return StoredResponse(key_id, {"id": id, "status": status, "output": text}, [{"role": "user", "content": text}])


async def test_concurrent_writers_on_two_replicas_hold_each_keys_bound_exactly(redis):
    # Two stores (two connection pools: two replicas) save 400 records of one key at once, 64 in flight; the key's
    # bound must hold exactly and its index agree with what Redis holds, the other key untouched.
    url = fresh_database(redis)
    one, two = (RedisStore(url, 60, max_stored=10, max_bytes=10**9) for _ in range(2))
    in_flight = asyncio.Semaphore(64)  # per process, within redis-py's pool (100 connections)

    async def save(store: RedisStore, response: StoredResponse) -> None:
        async with in_flight:
            await store.save(response)

    try:
        await asyncio.gather(*(one.save(record(QUIET, f"resp_quiet{i}")) for i in range(5)))
        await asyncio.gather(
            *(save((one, two)[i % 2], record(FLOOD, f"resp_flood{i:03}", text="y" * (i % 7))) for i in range(400))
        )
        with redis_client(url) as direct:
            for i in range(5):
                assert direct.exists(f"haystream:responses:resp_quiet{i}")
            stored = [key.decode() for key in direct.scan_iter("haystream:responses:resp_flood*")]
            assert len(stored) == 10
            index = f"haystream:responses:key:{FLOOD}:"
            assert {member.decode() for member in direct.zrange(index + "finished", 0, -1)} == {
                key.removeprefix("haystream:responses:") for key in stored
            }
            sizes = direct.hgetall(index + "sizes")
            assert int(sizes.pop(b"total")) == sum(len(direct.get(key)) for key in stored)
            assert len(sizes) == 10
    finally:
        await one.close()
        await two.close()


async def test_a_redis_write_costs_the_same_commands_however_many_records_a_key_holds(redis):
    # Per write: a fixed number of O(1) and O(log n) commands, nothing that scans the key's records or Redis' keys.
    url = fresh_database(redis)
    store = RedisStore(url, 60, max_stored=100_000, max_bytes=10**12)
    try:

        async def commands_per_save(key_id: str, holding: int) -> dict[str, int]:
            for start in range(0, holding, 64):  # within redis-py's pool (100 connections)
                batch = range(start, min(start + 64, holding))
                await asyncio.gather(*(store.save(record(key_id, f"resp_{key_id}_{i}")) for i in batch))
            with redis_client(url) as direct:
                direct.config_resetstat()
                await store.save(record(key_id, f"resp_{key_id}_new"))
                await store.append(f"resp_{key_id}_new", key_id, [{"type": "x", "sequence_number": 0}])
                stats = direct.info("commandstats")
            stats = {name: stat for name, stat in stats.items() if name not in ("cmdstat_config", "cmdstat_info")}
            return {name: stat["calls"] for name, stat in stats.items()}

        small = await commands_per_save("small", 10)
        large = await commands_per_save("large", 5_000)
        assert small == large
        assert "cmdstat_zrangebyscore" in small  # the commands inside the scripts are counted
        assert not {"cmdstat_keys", "cmdstat_scan", "cmdstat_hgetall", "cmdstat_hkeys"} & set(small)
    finally:
        await store.close()


async def test_a_running_record_deleted_before_its_runs_last_save_stays_deleted(redis):
    # The run of another replica saves its end after the DELETE (it ended before the cancel reached it).
    url = fresh_database(redis)
    store = RedisStore(url, 60, max_stored=10, max_bytes=10**9)
    try:
        await store.save(record(FLOOD, "resp_running", status="in_progress"))
        assert await store.delete("resp_running", FLOOD)
        await store.save(record(FLOOD, "resp_running", status="completed"))
        await store.append("resp_running", FLOOD, [{"type": "response.completed", "sequence_number": 0}])
        assert await store.get("resp_running", FLOOD) is None
        with redis_client(url) as direct:
            index = f"haystream:responses:key:{FLOOD}:"
            assert not direct.zcard(index + "finished") and not direct.zcard(index + "running")
            assert int(direct.hget(index + "sizes", "total") or 0) == 0
        # A finished record deleted leaves nothing behind (only a running one's run can still save it).
        await store.save(record(FLOOD, "resp_done"))
        assert await store.delete("resp_done", FLOOD)
        with redis_client(url) as direct:
            assert {key.decode() for key in direct.scan_iter("haystream:responses:resp_*")} == {
                "haystream:responses:resp_running:deleted"  # the running one's marker, for a TTL
            }
    finally:
        await store.close()


async def test_a_running_record_whose_replica_died_is_dropped_to_make_room(redis):
    """A running record whose replica died will not end, and counted in its key's bounds, never dropped, until its
    TTL: a key whose replicas died mid-run filled its bounds with records nobody could end. Past the bounds, one whose
    owner's lease expired goes when no finished one is left to drop; a running one whose replica lives stays."""
    url = fresh_database(redis)
    dead = RedisStore(url, 60, max_stored=2, max_bytes=10**9, owner="dead")
    live = RedisStore(url, 60, max_stored=2, max_bytes=10**9, owner="live")
    try:
        await dead.save(record(FLOOD, "resp_abandoned", status="in_progress"))
        await live.save(record(FLOOD, "resp_running", status="in_progress"))
        with redis_client(url) as direct:
            direct.delete("haystream:responses:replica:dead")  # its lease ran out
        await live.save(record(FLOOD, "resp_new"))
        await live.save(record(FLOOD, "resp_newer"))
        assert await live.get("resp_abandoned", FLOOD) is None
        assert [await live.get(id, FLOOD) is not None for id in ("resp_running", "resp_new", "resp_newer")] == [
            True,
            False,  # the oldest finished, next: none was left to drop before it
            True,
        ]
    finally:
        await dead.close()
        await live.close()


async def test_a_replica_alive_after_all_cannot_bring_back_its_dropped_running_record(redis):
    """A replica cut off from Redis for longer than its lease is only taken for dead: its running record, dropped to
    make room, came back whole at its next save (its end, stored once Redis was back), over a log holding only its
    last events, and its writes before that were dropped without a word, its run going on for nobody. Now its
    writes are refused and it is told (`ResponseTakenOver`): its run stops, and the record stays dropped."""
    url = fresh_database(redis)
    cut_off = RedisStore(url, 60, max_stored=1, max_bytes=10**9, owner="cut-off")
    other = RedisStore(url, 60, max_stored=1, max_bytes=10**9, owner="other")
    try:
        await cut_off.save(record(FLOOD, "resp_dropped", status="in_progress"))
        with redis_client(url) as direct:
            direct.delete("haystream:responses:replica:cut-off")  # its lease ran out
        await other.save(record(FLOOD, "resp_new"))
        assert await other.get("resp_dropped", FLOOD) is None
        with pytest.raises(ResponseTakenOver):
            await cut_off.append("resp_dropped", FLOOD, [{"type": "response.in_progress", "sequence_number": 1}])
        with pytest.raises(ResponseTakenOver):
            await cut_off.save(record(FLOOD, "resp_dropped", status="completed"))
        assert await other.get("resp_dropped", FLOOD) is None
        assert await other.get("resp_new", FLOOD) is not None  # not dropped for it either
    finally:
        await cut_off.close()
        await other.close()


@pytest.mark.parametrize("id", ["resp_x:events", f"key:{FLOOD}:sizes", f"key:{FLOOD}:finished"])
async def test_an_id_naming_another_redis_key_is_not_found(redis, id):
    # `previous_response_id` comes from the body unchecked: an id naming an event log or a key's index read a stream,
    # hash or sorted set as a record (WRONGTYPE: a 503 "store unavailable", logged as an outage).
    url = fresh_database(redis)
    store = RedisStore(url, 60, max_stored=10, max_bytes=10**9)
    try:
        await store.save(record(FLOOD, "resp_x", status="in_progress"))
        await store.save(record(FLOOD, "resp_y"))
        await store.append("resp_x", FLOOD, [{"type": "response.created", "sequence_number": 0}])
        assert await store.get(id, FLOOD) is None
        assert not await store.delete(id, FLOOD)
    finally:
        await store.close()


async def test_a_background_responses_events_count_after_its_last_save_too(redis_url):
    # A run saves its record before its terminal events (a GET after the end finds the final response), then appends
    # them: Redis counted them, the memory store counted its log only at each save, so the terminal events (the
    # output text four times over: `output_text.done`, `content_part.done`, `output_item.done`, `completed`), 11-25%
    # of a background response, went uncounted and the memory bound held that much more than Redis.
    bounds = {"max_stored": 10, "max_bytes": 20_000}
    store = MemoryStore(60, **bounds) if redis_url is None else RedisStore(redis_url, 60, **bounds)
    try:
        log = EventLog()
        created = [{"type": "response.created", "sequence_number": 0}]
        log.append(created)
        await store.save(record(FLOOD, "resp_bg", status="in_progress"), log)
        await store.append("resp_bg", FLOOD, created)
        await store.save(record(FLOOD, "resp_bg"), log)
        done = [{"type": "response.completed", "sequence_number": 1, "text": "y" * 12_000}]
        log.append(done)
        await store.append("resp_bg", FLOOD, done)
        await store.save(record(FLOOD, "resp_next", text="z" * 5_000))  # 10 KB: 22 KB with the background one
        assert await store.get("resp_bg", FLOOD) is None
        assert await store.get("resp_next", FLOOD) is not None
    finally:
        await store.close()


def test_a_request_left_before_its_first_output_stores_nothing(upstream, redis_url):
    # Its run ended (cancelled) before any event, so nothing marked it cancelled, and its last save stored it
    # `in_progress`: a running response, never dropped, for a TTL, that no client could see (it never got the id),
    # outside the key's bounds. A key that left 3 requests so kept 3 conversations (up to a body each) beyond its bound
    # of 2, and its own next 2 responses left room for 1.
    with replicas(upstream, redis_url, responses_max_stored=2) as servers, clients(servers, FLOOD) as flood:
        host, port = servers[0].url.removeprefix("http://").split(":")
        for _ in range(3):
            scenario = unique("fake?tokens=1&ttft=30")
            body = orjson.dumps({"model": "fake_async", "input": "x" * 1000, "stream": True, "scenario": scenario})
            with socket.create_connection((host, int(port))) as leaving:
                leaving.sendall(
                    f"POST /v1/responses HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {FLOOD}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                record = upstream.wait_for_requests(1, model=scenario)[0]
            assert record.wait().client_hung_up
        kept = [flood[i].responses.create(model="fake_sync", input="x", extra_body=SYNC) for i in range(2)]
        for client, response in zip(flood, kept, strict=True):
            assert client.responses.retrieve(response.id).status == "completed"
    if redis_url is not None:
        with redis_client(redis_url) as direct:
            assert not direct.exists(f"haystream:responses:key:{FLOOD}:running")
