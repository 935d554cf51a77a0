"""How Responses streams and stored responses end when something goes wrong at the end: the number of an `error`
event that ends a stream, a terminal event that Redis did not take at once, a run ended before its first step. Real
servers on loopback sharing a real redis-server, the openai SDK and httpx; synchronised on the fake upstream's held
streams and on the events read, never on time."""

from __future__ import annotations

import asyncio

import openai
import pytest

from support import OPS_WRAPPERS, ServerThread, serving
from test_drain_responses import held, until_first_text


def text(tokens: int) -> str:
    return "".join(f"t{i} " for i in range(tokens))


def sdk(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def on_loop(server: ServerThread, call) -> None:
    """Run `call()` on the server's loop, and return once it has run."""

    async def run() -> None:
        call()

    assert server.loop is not None
    asyncio.run_coroutine_threadsafe(run(), server.loop).result(10)


def endpoint(server: ServerThread):
    """The server's `ResponsesEndpoint`."""
    return server.app.app.app.responses


@pytest.fixture(scope="module")
def replicas(upstream, redis_url):
    with (
        serving(upstream, pipelines_dir=str(OPS_WRAPPERS), redis_url=redis_url) as running,
        serving(upstream, pipelines_dir=str(OPS_WRAPPERS), redis_url=redis_url) as following,
    ):
        yield running, following


def test_a_resume_with_the_number_of_an_error_event_loses_and_repeats_nothing(upstream, replicas):
    """An `error` event that ends a stream (the store unreachable, the replica shutting down) is no event of the log:
    it carries the number of the last event the client has. It had the next event's number, so a client resuming
    with the last number it saw (the SDK's `starting_after`, Open WebUI) skipped that event; and a resume cut before
    any new event said to resume from -1 (everything again)."""
    running, following = replicas
    scenario = held()
    with sdk(running) as a, sdk(following) as b:
        created = a.responses.create(model="scenario", input=scenario, background=True)
        record = upstream.wait_for_requests(1, model=scenario)[0]
        # A resume on the other replica from the start, cut after the first text (the run holds there).
        events = iter(b.responses.retrieve(created.id, stream=True))
        seen = until_first_text(events)
        last = seen[-1].sequence_number
        on_loop(following, endpoint(following).end_for_shutdown)  # cuts the streams that follow a run elsewhere
        rest = list(events)
        assert [event.type for event in rest] == ["error"]
        assert rest[0].sequence_number == last
        assert f"starting_after={last}" in rest[0].message
        # A resume from there, cut before the run sent anything more: its error repeats the number it resumed after.
        again = b.responses.retrieve(created.id, stream=True, starting_after=rest[0].sequence_number)
        on_loop(following, endpoint(following).end_for_shutdown)
        cut = list(again)
        assert [(event.type, event.sequence_number) for event in cut] == [("error", last)]
        assert f"starting_after={last}" in cut[0].message
        record.release()
        resumed = list(a.responses.retrieve(created.id, stream=True, starting_after=cut[0].sequence_number))
        assert resumed[0].sequence_number == last + 1  # nothing lost, nothing repeated
        assert resumed[-1].type == "response.completed"
        deltas = [event.delta for event in seen + resumed if event.type == "response.output_text.delta"]
        assert "".join(deltas) == text(5)
