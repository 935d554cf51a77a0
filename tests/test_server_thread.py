"""`ServerThread`: start() returns once the app's lifespan has started, through uvicorn's public API only."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from haystream.server.asgi import send_json
from haystream.testing import ServerThread


class LifespanApp:
    """Records its lifespan and the loop its requests run on; `fail` makes its start-up fail."""

    def __init__(self, fail: str | None = None) -> None:
        self.events: list[str] = []
        self.request_loop: asyncio.AbstractEventLoop | None = None
        self._fail = fail

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            if self._fail == "raise":
                raise RuntimeError("no lifespan here")
            while (kind := (await receive())["type"]) == "lifespan.startup":
                self.events.append("startup")
                await send({"type": "lifespan.startup.failed" if self._fail else "lifespan.startup.complete"})
                if self._fail:
                    return
            self.events.append("shutdown")
            await send({"type": f"{kind}.complete"})
            return
        self.request_loop = asyncio.get_running_loop()
        await send_json(send, 200, {"events": self.events})


def test_start_returns_once_the_apps_lifespan_has_started():
    app = LifespanApp()
    server = ServerThread(app, lifespan="on").start()
    try:
        assert app.events == ["startup"]  # no request was needed to get here
        assert httpx.get(server.url).json() == {"events": ["startup"]}
        assert app.request_loop is server.loop
    finally:
        server.stop()
    assert app.events == ["startup", "shutdown"]
    assert server.loop is None


def test_with_lifespan_off_the_app_never_sees_one():
    app = LifespanApp(fail="raise")  # it would fail a lifespan start-up
    with ServerThread(app) as server:
        assert httpx.get(server.url).json() == {"events": []}
        assert app.request_loop is server.loop is not None


@pytest.mark.parametrize("fail", ["failed", "raise"])
def test_a_failed_startup_is_an_error(fail):
    with pytest.raises(RuntimeError, match="failed to start"):
        ServerThread(LifespanApp(fail=fail), lifespan="on").start()


def test_lifespan_auto_serves_an_app_without_one():
    with ServerThread(LifespanApp(fail="raise"), lifespan="auto") as server:
        assert httpx.get(server.url).status_code == 200
