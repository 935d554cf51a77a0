"""`/v1/responses`: the OpenAI Responses API over the same wrappers, with stored and background responses.

Every response is a run (a task) that writes its events into an `EventLog`; the client that asked, and anyone
resuming later, follows that log. A foreground run belongs to its connection (a disconnect cancels it); a background
run belongs to the server until it ends or `POST /v1/responses/{id}/cancel`. Stored records and, with Redis, the
event logs live in the `ResponseStore`, so another replica can answer a `GET` or a resume.

When the server drains (`Drain`), new requests and resumes get 503; runs go on, background ones too (the app's
shutdown waits for them), until the drain times out. Then every run still going here ends with `response.failed`
(`server_shutting_down`), stored and in its log, so that every replica's `GET` and every follower see the end; a
resume that follows a run on another replica ends with an `error` event saying where to resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any
from urllib.parse import parse_qs

from haystream.openai import DeltaMapper, Event, OpenAIError
from haystream.openai.frames import PING
from haystream.openai.responses import (
    TERMINAL_EVENTS,
    ResponseEvents,
    ResponsesRequest,
    chat_response_format,
    chat_tool_choice,
    chat_tools,
    event_frame,
    input_item_page,
    input_messages,
    is_extension,
    output_messages,
    snapshot,
)
from haystream.openwebui.activity import ClientStyle
from haystream.server.asgi import Receive, Send, run_until_disconnect, send_error, send_json
from haystream.server.chat import aclose, client_deltas, failure_error
from haystream.server.drain import Drain, shutdown_error
from haystream.server.limits import Admission
from haystream.server.response_store import (
    RUNNING_STATUSES,
    Batch,
    EventLog,
    ResponseGone,
    ResponseStore,
    ResponseTakenOver,
    StoredResponse,
    StoreUnavailable,
    abandoned,
)

logger = logging.getLogger("haystream.server")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
CANCEL_WAIT_SECONDS = 10.0
#: Waits between attempts to store a background response's end while the store is unavailable: doubling from the
#: first up to the last, or until the store answers again (`ResponseStore.reachable_again`).
END_RETRY_FIRST_SECONDS = 0.5
END_RETRY_MAX_SECONDS = 30.0


class ResponseRun:
    """One response being produced: wrapper items → neutral deltas → Responses events → the event log (and store)."""

    def __init__(
        self,
        request: ResponsesRequest,
        open_items: Callable[[], Awaitable[AsyncIterator[Any]]],
        *,
        store: ResponseStore,
        key_id: str,
        conversation: list[dict[str, Any]],
        input_items: list[dict[str, Any]],
        request_id: str,
        keepalive_seconds: float,
        style: ClientStyle,
        secrets: Sequence[str],
    ) -> None:
        self.request = request
        self.events = ResponseEvents(request)
        self.log = EventLog()
        self.early_error: OpenAIError | None = None  # a failure before the first event: an HTTP error instead
        self.failure: OpenAIError | None = None  # why the run failed, if it did
        self.shutdown: OpenAIError | None = None  # set when the server ends the run (shutdown), before cancelling it
        self._open_items = open_items
        self._store = store
        self.key_id = key_id  # whose response it is: the store counts it in that key's bounds
        self._conversation = conversation
        self._input_items = input_items
        self._request_id = request_id
        self._keepalive = keepalive_seconds
        self._style = style
        self._secrets = secrets
        self._saved_final = False
        self.deleted = False  # a DELETE while running: nothing may store the record again
        self._started = False  # the run's task has taken its first step
        self._stop_at_start = False  # stopped before that: it ends (and stores its end) at its first step
        self._store_end_now: asyncio.Event | None = None  # while its end waits for the store: set to try at once

    @property
    def id(self) -> str:
        """The response id."""
        return self.events.id

    async def save(self, events: Sequence[Any] = ()) -> None:
        """Store the record as it stands (with the conversation once the response is done), and with it those of
        `events` that its stored log keeps (see `ResponseStore.save`)."""
        if not self.request.store or self.deleted:
            return
        response = snapshot(self.events.response)
        messages = self._conversation
        if response["status"] in ("completed", "incomplete"):
            messages = self._conversation + output_messages(response["output"])
        await self._store.save(
            StoredResponse(self.key_id, response, messages, self._input_items),
            self.log if self.request.background else None,
            self._kept(events),
        )

    async def run(self) -> None:
        """Produce the response; ends the log however it ends."""
        items: AsyncIterator[Any] | None = None
        first_item: asyncio.Future[list[Any]] | None = None
        mapper = DeltaMapper()
        self._started = True
        try:
            if self._stop_at_start:
                raise asyncio.CancelledError  # see `stop`
            if self.request.background:
                await self._emit(self.events.started())
                await self.save()  # in_progress for a GET on another replica too, not queued until the end
            items = await self._open_items()
            first_item = asyncio.ensure_future(self._first_output(mapper, items))
            # Like chat: wait for the first output a client can see before committing (a generator's role chunk, or
            # an event, is not one), so that a failure before it keeps its HTTP status. A slow first output commits
            # after the keep-alive interval anyway.
            await asyncio.wait({first_item}, timeout=None if self.request.background else self._keepalive)
            if first_item.done():
                first_item.result()  # raises an early failure here
            if not self.request.background:
                await self._emit(self.events.created())  # stored as in progress first (see _emit)
            first = await first_item
            if first:
                await self._emit(self._events_of(first))
                async for item in items:
                    await self._feed(mapper, item)
            await self._emit(self.events.finish(*mapper.finish()))
        except asyncio.CancelledError:
            if self.log.ended:  # it had ended; the shutdown gave up storing its end (the store was unavailable)
                logger.error("response %s: its end was not stored (the store is unavailable)", self.id)
                raise
            if first_item is not None and not first_item.done():
                first_item.cancel()
                await asyncio.wait({first_item})  # let the wrapper unwind before its iterator is closed
            if self.shutdown is None:  # a client's cancel, disconnect or delete
                if self.log.events:
                    with contextlib.suppress(Exception):
                        await self._emit(self.events.cancel())
                raise
            # The server shuts down: not a cancel anyone asked for, a failure to say (and store) like any other.
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            await self._fail(self.shutdown)
        except ResponseTakenOver as taken:  # an event it wrote was refused: the store says it failed
            self._saved_final = True
            self._end_taken_over(taken.failure)
        except Exception as error:
            await self._fail(failure_error(error, self._request_id, self._secrets))
        finally:
            self.log.end()
            if items is not None:
                await aclose(items)
            # Still running here: cancelled before its first event, so its client never saw the id. Stored, it would
            # be a running response (never dropped) for a TTL, outside its key's bounds.
            if not self._saved_final and self.events.response["status"] not in RUNNING_STATUSES:
                with contextlib.suppress(Exception):
                    await self.save()

    def end_for_shutdown(self, task: asyncio.Task[None]) -> None:
        """End this run (running in `task`) with `response.failed`: the server shuts down. Once: a second
        cancellation would interrupt the first one's unwinding, which stores the failure."""
        if self.shutdown is not None:
            return
        self.shutdown = shutdown_error(
            f"The server shut down before the response was complete (request id {self._request_id})."
        )
        self.stop(task)

    def stop(self, task: asyncio.Task[None]) -> None:
        """Stop this run (running in `task`): a cancel, a delete, the shutdown (`self.shutdown` set first).

        A task cancelled before its first step never runs its code, so a run not yet started is told instead and
        ends at its first step as if cancelled there: cancelled, its background response stayed `queued` (stored,
        running, outside its key's bounds) until the TTL, and its place among the streams stayed taken. A run that
        has ended and waits to store its end tries again at once (a cancel or delete has just reached the store)
        and goes on trying, but for the shutdown, which ends it."""
        if not self._started:
            self._stop_at_start = True
        elif self._store_end_now is None:
            _stop(task)
        elif self.shutdown is None:
            self._store_end_now.set()
        else:
            task.cancel()  # even while it unwinds from a cancel: it waits for the store in its unwinding

    async def _fail(self, failure: OpenAIError) -> None:
        """End with `failure`: an HTTP error if nothing was sent yet, else `response.failed` (stored, logged)."""
        self.failure = failure
        if not self.log.events:
            self.early_error = failure
            self.events.response["status"] = "failed"
            self.events.response["error"] = {"code": "server_error", "message": failure.message}
            return
        failed = self.events.fail(failure)
        try:
            await self._emit(failed)
        except StoreUnavailable:  # the store failed (again): this process' followers still get the end
            if not self.log.ended:
                self.log.append(failed)

    async def _first_output(self, mapper: DeltaMapper, items: AsyncIterator[Any]) -> list[Any]:
        """The deltas of the first item that shows the client anything (an event line, for a client that gets them:
        an agent's first status line shows while its tool runs); empty if the items end first."""
        async for item in items:
            deltas = self._deltas(mapper, item)
            if any(isinstance(delta, Event) or self.events.shows(delta) for delta in deltas):
                return deltas
        return []

    def _deltas(self, mapper: DeltaMapper, item: Any) -> list[Any]:
        deltas = client_deltas(mapper, item, self._style)
        if self._style.events:
            return deltas
        return [delta for delta in deltas if not isinstance(delta, Event)]

    def _events_of(self, deltas: list[Any]) -> list[Any]:
        """The stream entries of some deltas: Responses events, and Open WebUI's event lines as extension lines
        between them (Open WebUI reads a `data: {"event": ...}` line on a Responses stream as on chat completions)."""
        events: list[Any] = []
        for delta in deltas:
            if isinstance(delta, Event):
                events.append(self.events.extension({"event": {"type": delta.type, "data": delta.data}}))
            else:
                events += self.events.feed(delta)
        return events

    async def _feed(self, mapper: DeltaMapper, item: Any) -> None:
        events = self._events_of(self._deltas(mapper, item))
        if events:
            await self._emit(events)

    async def _emit(self, events: list[Any]) -> None:
        if events and events[-1]["type"] in TERMINAL_EVENTS:
            await self._store_end(events)
            return
        if self.request.store and not self.log.events:
            # Stored as in progress before anyone sees it: a GET finds it, and a store that is down is then an
            # HTTP 503, not a stream that fails at once.
            await self.save()
        self.log.append(events)
        kept = self._kept(events)
        if kept:
            await self._store.append(self.id, self.key_id, kept)

    async def _store_end(self, events: list[Any]) -> None:
        """Store the final record with its last events (one step), then end the log with them: stored before anyone
        can see the end, so that a GET after the terminal event finds the final response.

        A background response whose end the store does not take (Redis unreachable) ends here at once (its followers
        in this process get the end) and its end is stored again and again, waiting longer each time or until the
        store answers again, until it is stored (or deleted, or the shutdown ends the run, which stores nothing more):
        its record, `in_progress` meanwhile, is read on every replica, and a resume there follows it to its end once
        stored. A foreground one fails (`_fail`): its client is waiting for it."""
        self._saved_final = True
        wait = END_RETRY_FIRST_SECONDS
        while True:
            try:
                await self.save(events)
                break
            except ResponseTakenOver as taken:
                self._store_end_now = None
                self._end_taken_over(taken.failure, events)
                return
            except StoreUnavailable:
                if not self.request.background or self.shutdown is not None:
                    raise
            if not self.log.ended:
                self.log.append(events)
                logger.warning("response %s: its end could not be stored; storing it again until it is", self.id)
            self._store_end_now = now = asyncio.Event()
            woken = [asyncio.ensure_future(now.wait()), asyncio.ensure_future(self._store.reachable_again().wait())]
            try:
                await asyncio.wait(woken, timeout=wait, return_when=asyncio.FIRST_COMPLETED)  # `now`: see `stop`
            finally:
                for waiting in woken:
                    waiting.cancel()
            wait = min(wait * 2, END_RETRY_MAX_SECONDS)
        self._store_end_now = None
        if self.log.ended:
            logger.warning("response %s: its end is stored", self.id)
        else:
            self.log.append(events)

    def _end_taken_over(self, failure: OpenAIError, ending: Sequence[Any] = ()) -> None:
        """Another replica took this run's response over (this replica gave no sign of life for a lease: Redis was
        out of its reach) and stored it failed: the run stops, and its log here ends with `response.failed` as the
        store's does, not with an end (`ending`, its terminal events unwritten) that no other replica shows. Its
        numbers go on from this log's, which may hold events the store refused after the takeover."""
        self.failure = failure
        if self.log.ended:  # its end, stored nowhere, was already seen here (see `_store_end`)
            logger.error("response %s: its end was not stored: another replica reported it failed", self.id)
            return
        logger.warning("response %s: another replica reported it failed; its run stops", self.id)
        if ending:
            last = ending[-1]
            response = abandoned(last["response"], failure)
            error = dict(failure.to_dict()["error"])
            lost = {"type": "response.failed", "sequence_number": last["sequence_number"], "response": response}
            self.log.append([*ending[:-1], {**lost, "error": error}])
        else:
            self.log.append(self.events.fail(failure))

    def _kept(self, events: Sequence[Any]) -> list[Any]:
        """Those of `events` that the stored log keeps. Only a background response's events are kept: it is the one
        a client can resume (as with OpenAI). A foreground response's log would hold ~0.4 KB per token for the whole
        TTL, for nobody. Extension lines are for the client that asked only: a resume may come from any client."""
        if not (self.request.store and self.request.background):
            return []
        return [event for event in events if not is_extension(event)]


class ResponsesEndpoint:
    """The `/v1/responses` routes."""

    def __init__(
        self,
        store: ResponseStore,
        *,
        drain: Drain,
        keepalive_seconds: float,
        send_timeout_seconds: float,
    ) -> None:
        self.store = store
        self._drain = drain
        self._keepalive = keepalive_seconds
        self._send_timeout = send_timeout_seconds
        self._runs: dict[str, tuple[ResponseRun, asyncio.Task[None]]] = {}  # stored runs, by id, for GET and cancel
        self._running: dict[asyncio.Task[None], ResponseRun] = {}  # every run in this process, stored or not
        self._followers: set[asyncio.Task[Any]] = set()  # streams that follow a run through the store
        self._cut: set[asyncio.Task[Any]] = set()  # those of them the shutdown cancelled
        drain.at_timeout(self.end_for_shutdown)

    async def start(self) -> None:
        """Begin listening for cancel requests (from this or another replica)."""
        await self.store.start(self._cancel_local)

    async def finish_runs(self) -> None:
        """At the app's shutdown: while the server drains, wait for the runs still going here (background runs: no
        connection keeps uvicorn waiting for them) until the drain times out; then end whatever still runs."""
        running = set(self._running)
        if running and self._drain.draining and not self._drain.expired:
            left = self._drain.deadline - time.monotonic()
            logger.info("draining: %d Responses runs still running; waiting up to %.0fs for them", len(running), left)
            await asyncio.wait(running, timeout=max(left, 0))
        self.end_for_shutdown()
        if self._running:
            await asyncio.wait(set(self._running))

    async def close(self) -> None:
        """End the runs (see `finish_runs`) and release the store."""
        await self.finish_runs()
        await self.store.close()

    def end_for_shutdown(self) -> None:
        """The drain timed out, or the app stops: every run here ends with a stored `response.failed`, every stream
        that follows a run elsewhere with an `error` event."""
        if self._running or self._followers:
            logger.warning(
                "shutting down: ending %d Responses runs and %d resumed streams that are still running",
                len(self._running),
                len(self._followers),
            )
        for task, run in self._running.items():
            run.end_for_shutdown(task)
        for follower in self._followers - self._cut:
            self._cut.add(follower)
            follower.cancel()

    def new_run(self, request: ResponsesRequest, **kwargs: Any) -> ResponseRun:
        """A run for a validated request (see `ResponseRun`)."""
        return ResponseRun(request, store=self.store, keepalive_seconds=self._keepalive, **kwargs)

    async def conversation(self, request: ResponsesRequest, key_id: str) -> list[dict[str, Any]]:
        """The messages a request continues: the stored conversation of `previous_response_id`, then its input."""
        messages: list[dict[str, Any]] = []
        if request.previous_response_id:
            previous = await self.store.get(request.previous_response_id, key_id)
            if previous is None:
                raise OpenAIError(
                    404,
                    f"Previous response with id '{request.previous_response_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            messages += previous.messages
        return messages + input_messages(request.input)

    async def create(self, run: ResponseRun, receive: Receive, send: Send, admission: Admission) -> None:
        """Answer a `POST`: stream or not, foreground or background."""
        if run.request.background:
            await self._start_background(run, admission)
            if run.request.stream:
                follow = run.log.follow(-1, self._keepalive)
                await run_until_disconnect(self._stream(send, follow, extensions=True), receive)
            else:
                await send_json(send, 200, snapshot(run.events.response))
            return
        with admission:
            task = self._launch(run, run.run())
            if run.request.store:
                self._runs[run.id] = (run, task)
            try:
                left = await run_until_disconnect(self._foreground(run, task, send), receive)
            finally:
                if not task.done():
                    task.cancel()
                await asyncio.wait({task})
                self._runs.pop(run.id, None)
            if left:
                logger.info("response %s: client disconnected; the run was cancelled", run.id)

    async def retrieve(
        self,
        id: str,
        key_id: str,
        query: bytes,
        receive: Receive,
        send: Send,
        *,
        admission: Admission,
        head: bool = False,
    ) -> None:
        """`GET /v1/responses/{id}`: the response object, or (`stream=true`) its events after `starting_after`,
        followed under `admission` (a place among the running streams); `head`: only the headers (a `HEAD`
        request)."""
        params = parse_qs(query.decode("latin-1"))
        record = await self.store.get(id, key_id)
        if record is None:
            raise _not_found(id)
        if params.get("stream", ["false"])[0].lower() != "true":
            local = self._runs.get(id)
            await send_json(send, 200, snapshot(local[0].events.response) if local else record.response)
            return
        if not record.response.get("background"):
            raise OpenAIError(
                400,
                "Only background responses can be streamed again; create it with background=true to resume it.",
                param="stream",
                code="invalid_request",
            )
        try:
            after = int(params.get("starting_after", ["-1"])[0])
        except ValueError:
            raise OpenAIError(400, "starting_after must be an integer.", param="starting_after") from None
        # Within what a Redis stream id holds (a larger one was an error event saying the store was unavailable):
        # below -1 is from the start, and no response has 2**62 events.
        after = min(max(after, -1), _LAST_SEQUENCE)
        if head:  # no body to send, so nothing to wait for: following the run would hold the connection to its end
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        self._drain.check()  # a resume is a stream like any other: another replica's while this one drains
        # A resume lasts as long as the run it follows, and with Redis holds a connection in a blocking read: it
        # counts against the stream caps like the run itself (429 past them).
        with admission:
            local = self._runs.get(id)
            if local is not None:  # the run ends here, in its log, whatever ends it
                events = local[0].log.follow(after, self._keepalive)
            else:  # a run elsewhere (or ended): the shutdown must end this stream itself
                events = self.store.follow(id, after, self._keepalive)
            stream = self._stream(send, events, extensions=False, follower=local is None, after=after)
            await run_until_disconnect(stream, receive)

    async def input_items(self, id: str, key_id: str, query: bytes, send: Send) -> None:
        """`GET /v1/responses/{id}/input_items`: a page of the items the response was created with (`after`,
        `before`, `limit`, `order`, `include`), only for the key that created it."""
        params = parse_qs(query.decode("latin-1"), keep_blank_values=True)
        limit = _query_param(params, "limit", "20")
        if not (len(limit) <= 3 and limit.isascii() and limit.isdigit() and 1 <= int(limit) <= 100):
            raise OpenAIError(400, f"Invalid 'limit': expected an integer from 1 to 100, got '{limit}'.", param="limit")
        order = _query_param(params, "order", "desc")
        if order not in ("asc", "desc"):
            raise OpenAIError(400, f"Invalid 'order': expected 'asc' or 'desc', got '{order}'.", param="order")
        cursors = {name: _query_param(params, name, "") or None for name in ("after", "before")}
        include = params.get("include[]", []) + params.get("include", [])
        record = await self.store.get(id, key_id)
        if record is None:
            raise _not_found(id)
        page = input_item_page(
            record.input_items,
            limit=int(limit),
            order="asc" if order == "asc" else "desc",
            after=cursors["after"],
            before=cursors["before"],
            image_urls="message.input_image.image_url" in include,
        )
        await send_json(send, 200, page)

    async def delete(self, id: str, key_id: str, send: Send) -> None:
        """`DELETE /v1/responses/{id}`."""
        local = self._runs.get(id)
        if not await self.store.delete(id, key_id):
            raise _not_found(id)
        if local is not None:
            local[0].deleted = True  # its cancellation must not store it again
            local[0].stop(local[1])
        await send_json(send, 200, {"id": id, "object": "response.deleted", "deleted": True})

    async def cancel(self, id: str, key_id: str, send: Send, *, admission: Admission) -> None:
        """`POST /v1/responses/{id}/cancel`: stop a background run (wherever it runs) and return the response; the
        wait for a run on another replica's end takes a place among the running streams (`admission`), and without
        one the response is returned as it is (the cancel sent)."""
        record = await self.store.get(id, key_id)
        if record is None:
            raise _not_found(id)
        if not record.response.get("background"):
            raise OpenAIError(400, "Only background responses can be cancelled.", code="invalid_request")
        if record.response["status"] in RUNNING_STATUSES:
            local = self._runs.get(id)
            if local is not None:
                local[0].stop(local[1])
                await asyncio.wait({local[1]})
            else:
                await self.store.request_cancel(id)
                # The wait holds a Redis connection in a blocking read for up to CANCEL_WAIT_SECONDS (a run that never
                # ends: its replica died): uncounted, concurrent cancels took the connections of every key's streams.
                # At the stream caps the cancel is sent all the same (a key at its cap most needs it), unwaited for.
                try:
                    admission.__enter__()
                except OpenAIError:
                    logger.info("response %s: cancel sent; not waiting for its end (at the stream caps)", id)
                else:
                    try:
                        await self._wait_for_end(id)
                    finally:
                        admission.__exit__(None, None, None)
            record = await self.store.get(id, key_id) or record
        await send_json(send, 200, record.response)

    # internals ------------------------------------------------------------------------------------------------

    async def _wait_for_end(self, id: str) -> None:
        """Wait (up to CANCEL_WAIT_SECONDS) for the end of `id`, run by another replica."""
        # Wait for the run's end by the log's own idle timeout and a deadline checked between batches, not by
        # cancelling the follow: a cancellation inside a blocking Redis read surfaces as Redis' own TimeoutError.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_WAIT_SECONDS
        async with contextlib.aclosing(self.store.follow(id, -1, CANCEL_WAIT_SECONDS)) as batches:
            async for batch in batches:
                if batch is None or batch[-1]["type"] in TERMINAL_EVENTS or loop.time() >= deadline:
                    break

    async def _start_background(self, run: ResponseRun, admission: Admission) -> None:
        admission.__enter__()  # held until the run ends, not until this request ends
        try:
            created = run.events.created()
            # With the record: the store keeps events only for a record it holds (and counts them in its key's size).
            await run.save(created)
            run.log.append(created)
        except BaseException:
            admission.__exit__(None, None, None)
            raise

        async def background() -> None:
            try:
                await run.run()
            finally:
                admission.__exit__(None, None, None)
                self._runs.pop(run.id, None)

        self._runs[run.id] = (run, self._launch(run, background()))

    def _launch(self, run: ResponseRun, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` (the run's) in a task of its own, known until it ends (for the shutdown to end it)."""
        task = asyncio.ensure_future(work)
        self._running[task] = run
        task.add_done_callback(self._running.pop)
        return task

    async def _foreground(self, run: ResponseRun, task: asyncio.Task[None], send: Send) -> None:
        await run.log.wait_for_first()
        if run.early_error is not None:
            await send_error(send, run.early_error)
            return
        if run.request.stream:
            await self._stream(send, run.log.follow(-1, self._keepalive), extensions=True)
            return
        await asyncio.wait({task})
        response = snapshot(run.events.response)
        if response["status"] == "failed":
            # The failure's own status, as chat answers it: an upstream rate limit stays 429, an unavailable store or
            # upstream 503, a prompt over the context 400.
            await send_error(send, run.failure or OpenAIError(500, response["error"]["message"], code="pipeline_error"))
            return
        await send_json(send, 200, response)

    async def _stream(
        self,
        send: Send,
        events: AsyncIterator[Batch],
        *,
        extensions: bool,
        follower: bool = False,
        after: int = -1,
    ) -> None:
        """Send a log's events as SSE, pinging when idle; a client that reads nothing is dropped. `extensions`: with
        the log's extension lines (the run's own client, which the run made them for; not a resume). `follower`: the
        events come from a run that the shutdown does not end here, so the shutdown ends the stream itself. `after`:
        the sequence number the events start after (a resume's `starting_after`)."""
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        task = asyncio.current_task()
        assert task is not None
        if follower:
            self._followers.add(task)
        sequence_number = after  # the last event the client has: from the stream, or before it (a resume)
        ended_by: OpenAIError | None = None
        try:
            async for batch in events:
                if batch:
                    sequence_number = batch[-1]["sequence_number"]
                    if not extensions:
                        batch = [event for event in batch if not is_extension(event)]
                        if not batch:
                            continue
                body = PING if batch is None else b"".join(event_frame(event) for event in batch)
                try:
                    async with asyncio.timeout(self._send_timeout):
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                except TimeoutError:
                    logger.warning("a Responses client read nothing for %gs; dropped", self._send_timeout)
                    return
        except (StoreUnavailable, ResponseGone) as error:  # the stored log can no longer be read: say so, then end
            ended_by = error
        except asyncio.CancelledError:
            if task not in self._cut:
                raise
        finally:
            self._followers.discard(task)
            cut = task in self._cut
            self._cut.discard(task)
            await aclose(events)
        if cut:  # the shutdown cancelled this stream (the cancellation may surface from a Redis read as its error)
            if task.cancelling():
                task.uncancel()
            ended_by = shutdown_error(
                "This server is shutting down; the response goes on: resume its stream on another replica "
                f"with starting_after={sequence_number}."
            )
        if ended_by is not None:
            # Not an event of the log, so no number of its own: it repeats the last event's (as an extension line
            # does). With the next event's number, a client resuming with the last number it saw (the SDK's
            # `starting_after`, Open WebUI) skipped that event.
            error_event = {
                "type": "error",
                "code": ended_by.code,
                "message": ended_by.message,
                "param": None,
                "sequence_number": sequence_number,
            }
            await send({"type": "http.response.body", "body": event_frame(error_event), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _cancel_local(self, id: str) -> None:
        local = self._runs.get(id)
        if local is not None:
            local[0].stop(local[1])


def _stop(run: asyncio.Task[None]) -> None:
    """Cancel a run once: a second cancellation (two cancel requests) would interrupt the first one's unwinding, which
    stores the cancelled response and ends its log."""
    if not run.cancelling():
        run.cancel()


_LAST_SEQUENCE = 2**62


def _query_param(params: dict[str, list[str]], name: str, default: str) -> str:
    values = params.get(name)
    return values[-1] if values else default


def _not_found(id: str) -> OpenAIError:
    return OpenAIError(404, f"Response with id '{id}' not found.", param="response_id", code="response_not_found")


def wrapper_body(request: ResponsesRequest, body: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The body a chat wrapper sees: the Responses body plus chat-completions `messages`, `tools`, `tool_choice`,
    `response_format` (from `text.format`) and `max_tokens`, so that wrappers written for chat completions work
    unchanged."""
    chat = {**body, "messages": messages, "stream": True}
    # The chat limits exist in the Responses body only as `max_output_tokens`, checked against HAYSTREAM_MAX_TOKENS:
    # a client's own `max_tokens` reached the wrapper unchecked (any size past the cap, or a string: a 500).
    chat.pop("max_tokens", None)
    chat.pop("max_completion_tokens", None)
    if request.tools:
        chat["tools"] = chat_tools(request.tools)
    if "tool_choice" in body:
        chat["tool_choice"] = chat_tool_choice(request.tool_choice)
    response_format = chat_response_format(request.text)
    if response_format is not None:
        chat["response_format"] = response_format
    if request.max_output_tokens:
        chat["max_tokens"] = request.max_output_tokens
    return chat
