"""Forwarding one HTTP request to an upstream with httpx and streaming its answer back.

The ASGI app here knows nothing of budgets: :mod:`budgetguard.proxy` puts the
``BudgetMiddleware`` in front of it and tells it, through the request's scope, which
upstream a request goes to. Answers are relayed chunk by chunk as they arrive, never
buffered, so the middleware reads usage from SSE events as they pass.

Failures: an upstream that times out before answering becomes 504, one that cannot be
reached (or fails before answering) 502, both with an error JSON body. After the answer
has started no status can change: an SSE stream gets a final error event (which the
OpenAI and Anthropic SDKs raise as an error) and ends; any other body is aborted, so
the client sees a broken transfer rather than a truncated document.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

__all__ = ["SCOPE_KEY", "Forwarder", "Route", "Target", "error_body"]

log = logging.getLogger("budgetguard.proxy")

#: Where the proxy leaves its :class:`Route` for a request in the ASGI scope.
SCOPE_KEY = "budgetguard.route"

# Hop-by-hop headers (RFC 9110 7.6.1) plus the ones httpx and the server set themselves:
# host comes from the upstream URL, content-length is recomputed from the body sent,
# accept-encoding is forced to identity so the middleware can read usage, and expect:
# 100-continue is not something httpx can honour.
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"te", b"trailer", b"trailers", b"transfer-encoding",
                         b"upgrade", b"host", b"content-length", b"accept-encoding", b"expect"})


@dataclass(frozen=True)
class Target:
    """An upstream: its base URL and, optionally, the key that replaces the caller's."""

    url: str
    api_key: str | None = None
    anthropic: bool = False

    def request_url(self, scope: Scope) -> httpx.URL:
        base = httpx.URL(self.url)
        raw_path: bytes = scope.get("raw_path") or quote(scope["path"]).encode()
        query: bytes = scope.get("query_string") or b""
        # The base URL's own path (a gateway prefix) comes first; the request keeps its
        # path as the client sent it (percent-encoding included) and its query string.
        full = base.raw_path.rstrip(b"/") + raw_path + (b"?" + query if query else b"")
        return base.copy_with(raw_path=full)


@dataclass(frozen=True)
class Route:
    """What the proxy decided about one request before forwarding it."""

    target: Target
    drop_headers: frozenset[bytes]  # lower-case names not to forward (a trusted user header)


def error_body(status_code: str, message: str, *, kind: str, anthropic: bool) -> bytes:
    """An error document in the API's own shape (Anthropic's on Anthropic routes, OpenAI's elsewhere)."""
    if anthropic:
        doc: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message, "code": status_code}}
    else:
        doc = {"error": {"message": message, "type": kind, "param": None, "code": status_code}}
    return json.dumps(doc, ensure_ascii=True).encode()


async def send_error(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed in ``Connection``: hop-by-hop for this message only."""
    return {token.strip().lower() for name, value in headers if name.lower() == b"connection"
            for token in value.split(b",") if token.strip()}


def strip_hop_by_hop(headers: list[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()) -> list[tuple[bytes,
                                                                                                               bytes]]:
    named = _connection_tokens(headers)
    return [(name, value) for name, value in headers
            if (low := name.lower()) not in _HOP_BY_HOP and low not in named and low not in drop
            and not low.startswith(b"proxy-")]


class _ClientGone(Exception):
    """The client disconnected while its request body was being forwarded."""


class UpstreamCut(Exception):
    """The upstream failed in the middle of a non-streaming body: the connection is aborted."""


def _failure(exc: httpx.HTTPError) -> tuple[str, str]:
    """(error code, description) of an upstream failure, never with request headers in it."""
    if isinstance(exc, httpx.PoolTimeout):
        return "upstream_timeout", "no upstream connection became free in time (proxy.max_connections)"
    if isinstance(exc, httpx.ConnectTimeout):
        return "upstream_timeout", "connecting to the upstream timed out"
    if isinstance(exc, httpx.TimeoutException):
        return "upstream_timeout", "the upstream did not answer in time"
    # The exception's text is left out: some (a protocol error about a header value) quote
    # what was sent, and that includes the upstream key.
    if isinstance(exc, httpx.ConnectError):
        return "upstream_unreachable", f"the upstream could not be reached ({type(exc).__name__})"
    return "upstream_unreachable", f"the upstream connection failed ({type(exc).__name__})"


def _at_event_boundary(tail: bytes) -> bool:
    return tail == b"" or tail.endswith((b"\n\n", b"\r\n\r\n", b"\r\r"))


class Forwarder:
    """An ASGI app forwarding each request to the :class:`Route` the proxy put in its scope.

    One ``httpx.AsyncClient`` serves every request: :meth:`start` opens it (the proxy's
    lifespan does), :meth:`aclose` closes it. A request arriving before ``start`` (an app
    mounted where no lifespan runs) opens it then.
    """

    def __init__(self, *, timeout_s: float, connect_timeout_s: float, max_connections: int,
                 on_upstream_error: Callable[[str], None] | None = None) -> None:
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s, pool=connect_timeout_s)
        self.limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.on_upstream_error = on_upstream_error
        self._client: httpx.AsyncClient | None = None

    def start(self) -> httpx.AsyncClient:
        if self._client is None:
            # No redirects: a 3xx goes back to the client as the upstream sent it.
            self._client = httpx.AsyncClient(timeout=self.timeout, limits=self.limits, follow_redirects=False)
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- request -----------------------------------------------------------------------

    def _headers(self, scope: Scope, route: Route) -> list[tuple[bytes, bytes]]:
        raw: list[tuple[bytes, bytes]] = list(scope["headers"])
        drop = route.drop_headers
        key = route.target.api_key
        if key is not None:
            drop = drop | {b"authorization", b"x-api-key"}
        headers = strip_hop_by_hop(raw, drop)
        length = Headers(raw=raw).get("content-length")
        if length is not None:
            headers.append((b"content-length", length.encode("latin-1")))  # the same body goes upstream
        headers.append((b"accept-encoding", b"identity"))
        if key is not None:
            # The caller holds a budgetguard key; the provider gets the deployment's.
            if route.target.anthropic:
                headers.append((b"x-api-key", key.encode()))
            else:
                headers.append((b"authorization", b"Bearer " + key.encode()))
        return headers

    @staticmethod
    def _body(scope: Scope, receive: Receive) -> AsyncIterator[bytes] | None:
        headers = Headers(scope=scope)
        if "content-length" not in headers and "transfer-encoding" not in headers:
            return None  # HTTP/1.1: a request with neither has no body

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return

        return chunks()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: Route = scope[SCOPE_KEY]
        client = self.start()
        request = client.build_request(scope["method"], route.target.request_url(scope),
                                       headers=self._headers(scope, route), content=self._body(scope, receive))
        try:
            response = await client.send(request, stream=True)
        except _ClientGone:
            return  # nobody to answer
        except httpx.HTTPError as exc:
            code, description = _failure(exc)
            self._upstream_failed(code)
            log.warning("%s %s: %s", scope["method"], scope["path"], description)
            status = 504 if code == "upstream_timeout" else 502
            await send_error(send, status, error_body(code, description, kind="upstream_error",
                                                      anthropic=route.target.anthropic))
            return
        try:
            await self._relay(response, scope, receive, send, route)
        finally:
            await response.aclose()

    def _upstream_failed(self, code: str) -> None:
        if self.on_upstream_error is not None:
            self.on_upstream_error(code)

    # -- answer ------------------------------------------------------------------------

    async def _relay(self, response: httpx.Response, scope: Scope, receive: Receive, send: Send,
                     route: Route) -> None:
        headers = strip_hop_by_hop(list(response.headers.raw))
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        sse = response.headers.get("content-type", "").partition(";")[0].strip().lower() == "text/event-stream"
        if not sse:
            # Read to the end even if the client has gone: a JSON answer carries its usage
            # at the end, and the upstream has done (and billed) the work by now.
            await self._pump(response, scope, send, route, sse=False)
            return
        # A stream can run for minutes: stop it, and the upstream's work, when the client leaves.
        pump = asyncio.ensure_future(self._pump(response, scope, send, route, sse=True))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, gone):
                task.cancel()
            await asyncio.gather(pump, gone, return_exceptions=True)
        if pump.cancelled() or isinstance(pump.exception(), OSError):
            # Gone: uvicorn reports it through receive(), servers of ASGI spec 2.4 by failing send().
            log.info("%s %s: the client left mid-stream; closing the upstream stream", scope["method"], scope["path"])
            return
        pump.result()

    async def _pump(self, response: httpx.Response, scope: Scope, send: Send, route: Route, *, sse: bool) -> None:
        tail = b""
        try:
            async for chunk in response.aiter_raw():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    tail = (tail + chunk)[-4:]
        except httpx.HTTPError as exc:
            code, description = _failure(exc)
            code = code if code == "upstream_timeout" else "upstream_interrupted"
            self._upstream_failed(code)
            log.warning("%s %s: the upstream failed mid-answer: %s", scope["method"], scope["path"], description)
            if not sse:
                raise UpstreamCut(f"{scope['method']} {scope['path']}: {description}") from None
            message = f"the upstream stream was interrupted: {description}"
            event = error_body(code, message, kind="upstream_error", anthropic=route.target.anthropic)
            # A blank line first if the upstream stopped inside an event, so ours stands alone.
            prefix = b"" if _at_event_boundary(tail) else b"\n\n"
            name = b"event: error\n" if route.target.anthropic else b""
            await send({"type": "http.response.body", "body": prefix + name + b"data: " + event + b"\n\n",
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
