"""Graceful drain of the Responses API (`/v1/responses`): new requests get 503, runs get the drain timeout to finish,
and what still runs then ends with a stored `response.failed` that every replica and follower sees. Real
`haystream serve` processes and SIGTERM, a real redis-server, the openai SDK; synchronised on the fake upstream's
held streams and the server's log, never on time."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal

import openai
import pytest

from haystream.server import metrics
from support import OPS_WRAPPERS, start_server, unique
from test_drain import serving_process

WAITING_FOR_RUNS = "Responses runs still running"  # the log line of a drain that waits for background runs
JSON_LOGS = {"HAYSTREAM_LOG_FORMAT": "json"}  # haystream's info lines (that one) reach stderr in this format


def held(tokens: int = 5) -> str:
    """A scenario whose upstream sends one token and then holds until released (or until its client leaves); the
    provider client's read timeout is long, so that nothing but the drain (or the release) ends the run."""
    return unique(f"fake?tokens={tokens}&hold_after=1&timeout=600")


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def until_first_text(events) -> list:
    """Events read up to and including the first text delta."""
    seen = []
    for event in events:
        seen.append(event)
        if event.type == "response.output_text.delta":
            return seen
    raise AssertionError(f"the stream ended before any text: {[event.type for event in seen]}")


def sigterm_while_a_background_response_runs(process, base: str, upstream):
    """Start a held background response on the served process, send SIGTERM, and return (the response, its upstream
    record) once the server's shutdown waits for it (with JSON logs, which say so)."""
    scenario = held()
    with sdk(base) as client:
        created = client.responses.create(model="scenario", input=scenario, background=True)
    record = upstream.wait_for_requests(1, model=scenario)[0]
    process.send_signal(signal.SIGTERM)
    assert process.log.wait_for(WAITING_FOR_RUNS, timeout=60)
    return created, record


@pytest.fixture(scope="module")
def replica(upstream, redis_url):
    """Another replica (in this process) sharing the Redis store with the `haystream serve` under test."""
    other = start_server(upstream, pipelines_dir=str(OPS_WRAPPERS), redis_url=redis_url)
    yield other
    other.stop()


def test_new_responses_requests_get_503_while_draining_and_polls_still_answer(upstream):
    server = start_server(upstream, pipelines_dir=str(OPS_WRAPPERS))
    try:
        with sdk(server.url) as client:
            created = client.responses.create(model="scenario", input=unique("fake?tokens=2"), background=True)
            assert [event.type for event in client.responses.retrieve(created.id, stream=True)][-1] == (
                "response.completed"
            )

            async def begin() -> None:
                server.app.app.app.drain.begin()  # what SIGTERM does first, on the server's loop

            assert server.loop is not None
            asyncio.run_coroutine_threadsafe(begin(), server.loop).result(10)
            with pytest.raises(openai.InternalServerError) as refused:
                client.responses.create(model="scenario", input=unique("fake?tokens=2"))
            with pytest.raises(openai.InternalServerError) as resume_refused:
                client.responses.retrieve(created.id, stream=True)  # a resume is a stream: another replica's
            for error in (refused.value, resume_refused.value):
                assert (error.status_code, error.response.headers["retry-after"]) == (503, "1")
                assert error.code == "server_shutting_down"
            # Polls, cancels and deletes are quick: they still answer.
            assert client.responses.retrieve(created.id).status == "completed"
            client.responses.delete(created.id)
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(created.id)
    finally:
        server.stop()
        metrics.draining(False)  # the gauge is process-wide: later tests expect a server that is not draining


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_background_response_gets_the_drain_timeout_to_finish(upstream, request, store):
    # No connection waits for a background run: the server went straight to its shutdown and cancelled it.
    env = {"HAYSTREAM_DRAIN_GRACE_SECONDS": "0", "HAYSTREAM_DRAIN_TIMEOUT": "600", **JSON_LOGS}
    if store == "redis":
        env["HAYSTREAM_REDIS_URL"] = request.getfixturevalue("redis_url")
    with serving_process(upstream, **env) as (process, base):
        created, record = sigterm_while_a_background_response_runs(process, base, upstream)
        record.release()
        assert record.wait().completed and not record.client_hung_up
        assert process.wait(30) == 0  # once the run is done, not at the 600 s drain timeout
        if store == "redis":
            with sdk(request.getfixturevalue("replica").url) as other:
                finished = other.responses.retrieve(created.id)
            assert finished.status == "completed"
            assert finished.output_text == "".join(f"t{i} " for i in range(5))


def test_a_background_response_running_at_the_drain_timeout_fails_for_every_replica(upstream, redis_url, replica):
    with serving_process(
        upstream, HAYSTREAM_DRAIN_GRACE_SECONDS="0", HAYSTREAM_DRAIN_TIMEOUT="1", HAYSTREAM_REDIS_URL=redis_url
    ) as (process, base):
        scenario = held(tokens=2000)
        with sdk(base) as draining, sdk(replica.url) as other:
            # Followed by its creator (background and streamed) here, and by a resume on the other replica.
            own = iter(draining.responses.create(model="scenario", input=scenario, background=True, stream=True))
            created = until_first_text(own)[0].response
            record = upstream.wait_for_requests(1, model=scenario)[0]
            resumed_elsewhere = iter(other.responses.retrieve(created.id, stream=True))
            until_first_text(resumed_elsewhere)
            process.send_signal(signal.SIGTERM)
            for events in (own, resumed_elsewhere):
                with pytest.raises(openai.APIError) as ended:
                    for event in events:
                        assert event.type != "response.cancelled"
                assert ended.value.code == "server_shutting_down"  # the SDK raises on `response.failed`'s error
                assert "shut down" in ended.value.message
            stored = other.responses.retrieve(created.id)  # and a poll anywhere sees the same end
            assert stored.status == "failed"
            assert stored.error is not None and stored.error.code == "server_error"  # the SDK's codes
            assert "shut down" in stored.error.message
            assert stored.output_text == "t0 "  # what it had written is kept
            # A resume after the end gets the terminal event at once (it is in the stored log).
            with pytest.raises(openai.APIError) as resumed:
                list(other.responses.retrieve(created.id, stream=True, starting_after=0))
            assert resumed.value.code == "server_shutting_down"
        assert process.wait(30) == 0
        assert record.wait().client_hung_up  # the provider call was closed, not left running


def test_foreground_responses_running_at_the_drain_timeout_end_with_a_shutdown_error(upstream):
    with serving_process(upstream, HAYSTREAM_DRAIN_GRACE_SECONDS="0", HAYSTREAM_DRAIN_TIMEOUT="1") as (process, base):
        streamed, waited = held(tokens=2000), held(tokens=2000)
        with sdk(base) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.responses.create, model="scenario", input=waited)  # stream: false
            with client.responses.stream(model="scenario", input=streamed) as stream:
                events = iter(stream)
                until_first_text(events)
                records = [upstream.wait_for_requests(1, model=scenario)[0] for scenario in (streamed, waited)]
                process.send_signal(signal.SIGTERM)
                with pytest.raises(openai.APIError) as ended:
                    for _ in events:
                        pass
            assert ended.value.code == "server_shutting_down"
            with pytest.raises(openai.InternalServerError) as refused:
                pending.result()
            assert refused.value.status_code == 503
            assert refused.value.code == "server_shutting_down"
        assert process.wait(30) == 0
        assert all(record.wait().client_hung_up for record in records)


def test_a_resume_on_a_draining_replica_ends_with_an_error_event_and_the_run_goes_on(upstream, redis_url, replica):
    with serving_process(
        upstream, HAYSTREAM_DRAIN_GRACE_SECONDS="0", HAYSTREAM_DRAIN_TIMEOUT="1", HAYSTREAM_REDIS_URL=redis_url
    ) as (process, base):
        scenario = held()
        with sdk(replica.url) as running, sdk(base) as draining:
            created = running.responses.create(model="scenario", input=scenario, background=True)
            record = upstream.wait_for_requests(1, model=scenario)[0]
            events = iter(draining.responses.retrieve(created.id, stream=True))
            last = until_first_text(events)[-1].sequence_number
            process.send_signal(signal.SIGTERM)
            rest = list(events)
            assert [event.type for event in rest] == ["error"]  # not a bare cut, and not the run's end
            assert rest[0].code == "server_shutting_down"
            assert f"starting_after={last}" in rest[0].message
            assert rest[0].sequence_number == last  # no event's number: a resume with it loses nothing
            assert process.wait(30) == 0
            record.release()  # the run, on the other replica, goes on
            resumed = list(running.responses.retrieve(created.id, stream=True, starting_after=last))
            assert resumed[-1].type == "response.completed"
            assert running.responses.retrieve(created.id).output_text == "".join(f"t{i} " for i in range(5))


def test_a_second_signal_ends_background_responses_at_once_with_their_end_stored(upstream, redis_url, replica):
    with serving_process(
        upstream,
        HAYSTREAM_DRAIN_GRACE_SECONDS="0",
        HAYSTREAM_DRAIN_TIMEOUT="600",
        HAYSTREAM_REDIS_URL=redis_url,
        **JSON_LOGS,
    ) as (process, base):
        created, record = sigterm_while_a_background_response_runs(process, base, upstream)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) != 0  # forced: it did not wait out the 600 s drain timeout
        assert record.wait().client_hung_up
        with sdk(replica.url) as other:
            stored = other.responses.retrieve(created.id)
        assert stored.status == "failed"
        assert stored.error is not None and "shut down" in stored.error.message
