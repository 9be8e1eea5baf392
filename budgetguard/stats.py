"""A mountable JSON stats endpoint: recent spend, org budget utilization, Redis health."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import redis

from .decision import CountStatus, WindowStatus
from .errors import BudgetGuardError
from .eventlog import read_stream, stream_key
from .report import build_report, format_usd

if TYPE_CHECKING:
    from .guard import BudgetGuard

__all__ = ["ASGIApp", "GetApp", "aorg_status", "org_status", "stats_app", "stats_snapshot"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

def org_status(guard: BudgetGuard) -> dict[str, WindowStatus | CountStatus]:
    """The org's windows (``org.daily``, ``org.monthly``, ...): spent, reserved, cap, reset time."""
    return guard.budget_status("org").windows


async def aorg_status(guard: BudgetGuard) -> dict[str, WindowStatus | CountStatus]:
    """:func:`org_status` for async callers (one status script, bounded by ``redis_timeout_ms``)."""
    return (await guard.abudget_status("org")).windows


def _client(guard: BudgetGuard) -> redis.Redis:
    # The guard's own connection, so that an embedded (memory://) store is reachable too.
    return guard._sync.client


def _window_json(w: WindowStatus | CountStatus) -> dict[str, Any]:
    utilization = w.utilization
    resets = None if w.resets_at is None else w.resets_at.isoformat()
    if isinstance(w, CountStatus):
        return {"used": w.used, "reserved": w.reserved, "limit": w.limit, "unit": w.unit,
                "utilization": None if utilization is None else str(round(utilization, 6)), "resets_at": resets}
    return {
        "spent_usd": format_usd(w.spent_usd),
        "reserved_usd": format_usd(w.reserved_usd),
        "limit_usd": None if w.limit_usd is None else format_usd(w.limit_usd),
        "utilization": None if utilization is None else str(round(utilization, 6)),
        "resets_at": resets,
    }


def stats_snapshot(guard: BudgetGuard, window: timedelta = timedelta(hours=24)) -> tuple[int, dict[str, Any]]:
    """(HTTP status, document): 503 when Redis does not answer a PING."""
    now = guard._engine.now()  # the guard's clock, so the windows and the range agree
    client = _client(guard)
    health: dict[str, Any] = {"guard_healthy": guard.healthy, "ping_ms": None, "error": None}
    started = time.perf_counter()
    try:
        client.ping()
        health["ping_ms"] = round((time.perf_counter() - started) * 1000, 3)
    except redis.RedisError as exc:
        health["error"] = f"{type(exc).__name__}: {exc}"[:500]
    health["healthy"] = health["error"] is None and guard.healthy
    doc: dict[str, Any] = {"now": now.isoformat(), "since": (now - window).isoformat(), "spend": None,
                           "budget": None, "redis": health}
    if health["error"] is not None:
        return 503, doc
    try:
        loaded = read_stream(client, stream_key(guard.config), now - window, None)
        by_provider = build_report(loaded.events, by="provider", skipped=loaded.skipped)
        by_model = build_report(loaded.events, by="model")
        totals = by_provider.totals
        doc["spend"] = {
            "cost_usd": format_usd(totals.cost_usd),
            "requests": totals.requests,
            "denials": totals.denials,
            "skipped": by_provider.skipped,
            "by_provider": {k: {"cost_usd": format_usd(t.cost_usd), "requests": t.requests}
                            for k, t in by_provider.groups},
            "by_model": {k: {"cost_usd": format_usd(t.cost_usd), "requests": t.requests}
                         for k, t in by_model.groups},
        }
        doc["budget"] = {name: _window_json(w) for name, w in org_status(guard).items()}
    except (redis.RedisError, BudgetGuardError) as exc:
        health["error"] = f"{type(exc).__name__}: {exc}"[:500]
        health["healthy"] = False
        return 503, doc
    return 200, doc


async def _lifespan(receive: Receive, send: Send) -> None:
    # Served alone (not mounted), the app still speaks the lifespan protocol.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def respond(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode("latin-1")),
                            (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})


class GetApp:
    """A GET-only ASGI app answering every path with ``produce()``, run in a worker thread.

    A class rather than a closure: Starlette's ``Route`` treats a plain function as a
    request handler, but an instance as an ASGI app, so ``Route("/metrics", app)`` works.
    """

    def __init__(self, produce: Callable[[], tuple[int, bytes, str]]) -> None:
        self._produce = produce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await respond(send, 405, b"method not allowed\n", "text/plain; charset=utf-8")
            return
        # Redis calls block: keep them off the event loop.
        status, body, content_type = await asyncio.to_thread(self._produce)
        await respond(send, status, b"" if scope["method"] == "HEAD" else body, content_type)


def stats_app(guard: BudgetGuard, window: timedelta = timedelta(hours=24)) -> ASGIApp:
    """JSON: spend of the last ``window`` by provider and model, org utilization, Redis health."""

    def produce() -> tuple[int, bytes, str]:
        status, doc = stats_snapshot(guard, window)
        return status, json.dumps(doc, indent=2).encode(), "application/json"

    return GetApp(produce)
