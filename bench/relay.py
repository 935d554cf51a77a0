"""The byte-relay row: a tiny aiohttp server that forwards each request to the upstream and relays its bytes untouched.

No parsing, no re-encoding: what it costs per chunk is the floor any server that parses the upstream sits on.
Run as ``python bench/relay.py UPSTREAM_BASE_URL``: prints its own base URL once it listens, serves until stdin
closes.
"""

from __future__ import annotations

import asyncio
import socket
import sys

import aiohttp
from aiohttp import web

_PASSED_HEADERS = ("content-type", "cache-control")


async def _relay(request: web.Request) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app["session"]
    body = await request.read()
    url = request.app["upstream"] + "/chat/completions"
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as upstream:
        headers = {name: upstream.headers[name] for name in _PASSED_HEADERS if name in upstream.headers}
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        async for data in upstream.content.iter_any():
            await response.write(data)
        await response.write_eof()
    return response


async def _serve(upstream: str) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        app = web.Application()
        app["session"] = session
        app["upstream"] = upstream.rstrip("/")
        app.router.add_post("/v1/chat/completions", _relay)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock, backlog=2048).start()
        print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes our stdin
        await runner.cleanup()


def main() -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(sys.argv[1]))
    else:
        uvloop.run(_serve(sys.argv[1]))


if __name__ == "__main__":
    main()
