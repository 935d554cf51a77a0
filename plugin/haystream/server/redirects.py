"""hayhooks' redirects as relative references.

hayhooks' router answers a route spelled with a trailing slash too many or too few (`/status/`, `/{name}/run/`) with a
307 whose `Location` is an absolute URL built from the `Host` the client sent and the scheme uvicorn saw: any host a
client names comes back (`http://evil.example/status`), and behind a TLS-terminating proxy the URL says `http://`, to
which a client following the 307 re-sends its POST body in the clear. A relative reference (path and query) keeps the
scheme, host and port the client used; RFC 9110 §10.2.2 allows it.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from haystream.server.asgi import Message, Scope, Send, header

_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def relative_redirects(scope: Scope, send: Send) -> Send:
    """`send`, with the `Location` of a redirect to the request's own host made relative."""

    async def relative(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] in _REDIRECTS:
            own = _own_netlocs(scope)  # only for a redirect: not a cost on every answer
            headers = [
                (name, _relative(value, own) if name.lower() == b"location" else value)
                for name, value in message.get("headers", ())
            ]
            message = {**message, "headers": headers}
        await send(message)

    return relative


def _own_netlocs(scope: Scope) -> frozenset[str]:
    """What an absolute URL to this request's server names: its `Host`, or (Starlette's fallback when there is none,
    or it is not a host) the address the connection came in on."""
    names = {(header(scope, b"host") or b"").decode("latin-1").lower()}
    server = scope.get("server")
    if server:
        address, port = server
        address = f"[{address}]" if ":" in address else address
        names |= {address.lower(), f"{address}:{port}".lower()}
    return frozenset(names - {""})


def _relative(location: bytes, own: frozenset[str]) -> bytes:
    try:
        parts = urlsplit(location.decode("latin-1"))
    except ValueError:
        return location
    if parts.netloc.lower() not in own:
        return location  # already relative, or another server's URL (a mounted app's sign-in, say)
    # One leading slash: `//x` would be read as a URL on host `x`.
    return urlunsplit(("", "", "/" + parts.path.lstrip("/"), parts.query, parts.fragment)).encode("latin-1")
