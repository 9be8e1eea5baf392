"""Running the engine's script calls on Redis, sync and async, each bounded in time.

The two stores differ only in how they wait; what to send and how to read the reply
is the engine's. Failures surface as :class:`StoreUnavailable`, which the guard turns
into a fail-open or fail-closed decision.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from functools import cache
from importlib.resources import files
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from .config import Config
from .engine import Steps
from .errors import BudgetGuardError, ConfigError
from .protocol import ScriptCall

__all__ = ["AsyncStore", "StoreUnavailable", "SyncStore", "connect", "connect_async", "is_cluster"]

log = logging.getLogger("budgetguard.store")

SCRIPTS = ("reserve", "settle", "status", "lookup", "slice", "renew", "admin")


class StoreUnavailable(BudgetGuardError):
    """Redis did not answer in time or failed; the guard applies ``fail_mode``."""


class ScriptError(StoreUnavailable):
    """Redis answered with an error (out of memory, a foreign key of the wrong type).

    The guard applies ``fail_mode`` as for an outage, but every occurrence is logged:
    it does not heal by itself.
    """


def _script_error(call: ScriptCall, exc: ResponseError) -> ScriptError:
    log.error("the %s script failed: %s", call.script, exc)
    return ScriptError(f"the {call.script} script failed: {exc}")


@cache
def script_source(name: str) -> str:
    lua = files("budgetguard") / "lua"
    return (lua / "common.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


class Health:
    """Logs when the store goes down and comes back, not once per failed call."""

    REPEAT_S = 60.0

    def __init__(self) -> None:
        self._down_since: float | None = None
        self._last_log = 0.0
        self._lock = threading.Lock()

    def failed(self, error: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = now
            if not first and now - self._last_log < self.REPEAT_S:
                return
            self._last_log = now
        log.error("budget store unavailable (%s: %s); checks follow fail_mode until it is back",
                  type(error).__name__, error)

    def ok(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is None:
                return
            down_for = time.monotonic() - self._down_since
            self._down_since = None
        log.warning("budget store reachable again after %.1f s; enforcement resumed", down_for)

    @property
    def healthy(self) -> bool:
        return self._down_since is None


# -- clients ---------------------------------------------------------------------------

_memory_servers: dict[str, Any] = {}
_memory_lock = threading.Lock()


def _memory_server(url: str) -> Any:
    """One embedded server per ``memory://name`` per process, shared by sync and async clients."""
    import fakeredis

    with _memory_lock:
        server = _memory_servers.get(url)
        if server is None:
            server = _memory_servers[url] = fakeredis.FakeServer()
        return server


def _pool_options(config: Config, retry: Any, *, loop_bound: bool = False) -> dict[str, Any]:
    timeout = config.redis_timeout_ms / 1000
    if loop_bound:
        # The asyncio store bounds each call itself, sparing the loop's own lateness
        # (_Deadline); the client's timeouts are timers too, so they only back that up.
        timeout *= _MAX_EXTENSIONS + 2
    return {
        "max_connections": config.redis_max_connections,
        # Callers past the pool size wait for a connection (up to the timeout) instead
        # of failing with "Too many connections".
        "timeout": timeout,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry,
    }


def _retry(retry_class: Any) -> Any:
    # No retries: a retry would stretch a call past its bound. A restarted Redis leaves
    # stale sockets in the pool, but the pool itself notices those (a closed socket
    # reads as EOF) and reconnects before use. Were a script resent anyway, it is
    # idempotent per reservation id.
    return retry_class(NoBackoff(), 0)


def is_memory(url: str) -> bool:
    return url.startswith("memory://")


def is_cluster(url_or_client: Any) -> bool:
    """A ``redis+cluster://`` URL or a RedisCluster client: scripts run per hash slot."""
    if isinstance(url_or_client, str):
        return url_or_client.split("://", 1)[0] in ("redis+cluster", "rediss+cluster")
    return isinstance(url_or_client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster))


def _cluster_options(config: Config, retry: Any) -> dict[str, Any]:
    timeout = config.redis_timeout_ms / 1000
    # MOVED and ASK are followed by the client whatever the retry count. The retries
    # cover a primary that failed over: the client maps the cluster again and resends,
    # which is safe because every script applies once per reservation id. As on a
    # single Redis, callers past a node's pool size wait for a connection.
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": retry,
            "max_connections": config.redis_max_connections, "timeout": timeout,
            "connection_pool_class": redis.BlockingConnectionPool}


def _connect_cluster(config: Config, url: str) -> redis.cluster.RedisCluster:
    """``redis+cluster://[user:pass@]host:port[,host:port...]``: any listed node that answers maps the rest."""
    from redis.retry import Retry

    parts = urlsplit(url)
    auth, _, hosts = parts.netloc.rpartition("@")
    first, *others = hosts.split(",")
    # The first node, credentials, database and options (TLS files...) go through from_url.
    base = urlunsplit((parts.scheme.replace("+cluster", ""), f"{auth}@{first}" if auth else first, parts.path,
                       parts.query, ""))
    nodes = []
    for other in others:
        host, _, port = other.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"cluster node {other!r} is not host:port")
        nodes.append(redis.cluster.ClusterNode(host, int(port)))
    # Once connected the client keeps the whole cluster's nodes as its startup nodes,
    # so a long-lived guard survives the loss of the node it was given.
    return redis.cluster.RedisCluster.from_url(base, startup_nodes=nodes or None,
                                               **_cluster_options(config, _cluster_retry(Retry)))


def _cluster_retry(retry_class: Any) -> Any:
    # redis-py's cluster client takes only the count from it (it resends at once,
    # after mapping the cluster again).
    return retry_class(NoBackoff(), 3)


def connect(config: Config, url: str) -> redis.Redis:
    """A sync client for ``url`` (``memory://`` is embedded fakeredis)."""
    if is_memory(url):
        import fakeredis

        client = fakeredis.FakeRedis(server=_memory_server(url), connection_pool_class=redis.BlockingConnectionPool,
                                     max_connections=config.redis_max_connections)
        # In-process: a wait is never an outage, so no deadline (it would only turn
        # load into unenforced calls).
        client.connection_pool.timeout = None  # type: ignore[attr-defined]  # a BlockingConnectionPool
        return client
    from redis.retry import Retry

    try:
        if is_cluster(url):
            return _connect_cluster(config, url)  # type: ignore[return-value]
        pool = redis.BlockingConnectionPool.from_url(url, **_pool_options(config, _retry(Retry)))
    except ValueError as exc:
        raise ConfigError(f"redis_url: {exc}") from None
    except (RedisError, RedisClusterException) as exc:  # a cluster client maps the cluster as it starts
        raise StoreUnavailable(f"budget store unavailable: {exc}") from None
    return redis.Redis.from_pool(pool)  # the client owns the pool: close() closes its sockets


def connect_async(config: Config, url: str) -> redis.asyncio.Redis:
    """An asyncio client for ``url``, with the same pool rules as :func:`connect`."""
    if is_memory(url):
        import fakeredis

        aclient = fakeredis.FakeAsyncRedis(server=_memory_server(url),
                                           connection_pool_class=redis.asyncio.BlockingConnectionPool,
                                           max_connections=config.redis_max_connections)
        aclient.connection_pool.timeout = None  # type: ignore[attr-defined]
        return aclient
    from redis.asyncio.retry import Retry

    try:
        pool = redis.asyncio.BlockingConnectionPool.from_url(url, **_pool_options(config, _retry(Retry),
                                                                                  loop_bound=True))
    except ValueError as exc:
        raise ConfigError(f"redis_url: {exc}") from None
    return redis.asyncio.Redis.from_pool(pool)


# -- stores ----------------------------------------------------------------------------


Observer = Callable[[str, float, bool], None]  # (script, seconds, ok)


def _ignore(script: str, seconds: float, ok: bool) -> None:
    return None


class _Outcomes:
    """What both stores do after a script: time it, track health, turn failures into StoreUnavailable."""

    health: Health
    observe: Observer

    def _failure(self, call: ScriptCall, started: float, exc: BaseException) -> StoreUnavailable:
        self.observe(call.script, time.perf_counter() - started, False)
        if isinstance(exc, ResponseError):
            return _script_error(call, exc)
        self.health.failed(exc)
        return StoreUnavailable(f"budget store unavailable: {exc or type(exc).__name__}")

    def _success(self, call: ScriptCall, started: float) -> None:
        self.observe(call.script, time.perf_counter() - started, True)
        self.health.ok()


class SyncStore(_Outcomes):
    def __init__(self, client: redis.Redis, health: Health, observe: Observer = _ignore) -> None:
        self.client = client
        self.health = health
        self.observe = observe
        self._scripts = {name: client.register_script(script_source(name)) for name in SCRIPTS}

    def run(self, call: ScriptCall) -> Any:
        started = time.perf_counter()
        try:
            reply = self._scripts[call.script](keys=call.keys, args=call.args)
        except (RedisError, OSError) as exc:
            raise self._failure(call, started, exc) from exc
        self._success(call, started)
        return reply

    def drive(self, steps: Steps) -> Any:
        """Run an engine operation's calls in turn; a failure is raised into it (to compensate)."""
        try:
            call = next(steps)
        except StopIteration as done:  # nothing to send after all
            return done.value
        while True:
            try:
                try:
                    reply = self.run(call)
                except StoreUnavailable as exc:
                    call = steps.throw(exc)  # the operation compensates, or raises it back
                    continue
                call = steps.send(reply)
            except StopIteration as done:
                return done.value
            except BaseException:
                steps.close()  # interrupted: let the operation clean up (a refill it had out)
                raise


# How late a deadline timer may fire before the lateness is put down to the event loop
# (busy with other work) rather than to Redis: at least this, or a quarter of the timeout.
_LOOP_LAG_S = 0.02
# A loop that stays that late extends a wait at most this many timeouts, then it fails.
_MAX_EXTENSIONS = 20


class _Deadline:
    """``asyncio.timeout`` for a Redis call that blames Redis only for Redis' lateness.

    A plain timer fires when the loop next gets to it: after a stretch of CPU-bound work
    on the loop (a large request being tokenized, say), it fires late, while Redis' answer
    sits unread in the socket, and a healthy Redis would be taken for a failed one (and
    under ``fail_mode: open``, calls let through unenforced). So a timer that fires more
    than a little late starts the wait again (up to ``_MAX_EXTENSIONS`` times), and one that
    fires on time lets the loop read what has arrived (two more passes) before it cancels.
    """

    def __init__(self, timeout_s: float) -> None:
        self._timeout = timeout_s
        self._tolerance = max(_LOOP_LAG_S, timeout_s / 4)
        self._extensions = 0
        self._cm = asyncio.timeout(None)
        self._loop = asyncio.get_running_loop()
        self._when = 0.0
        self._handle: asyncio.Handle | None = None

    async def __aenter__(self) -> None:
        await self._cm.__aenter__()
        self._arm(self._loop.time() + self._timeout)

    async def __aexit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.cancel()
        await self._cm.__aexit__(*exc)  # our expiry's CancelledError becomes TimeoutError

    def _arm(self, when: float) -> None:
        self._when = when
        self._handle = self._loop.call_at(when, self._fired)

    def _fired(self) -> None:
        now = self._loop.time()
        if now - self._when > self._tolerance and self._extensions < _MAX_EXTENSIONS:
            self._extensions += 1
            self._arm(now + self._timeout)
            return
        self._handle = self._loop.call_soon(self._grace, 2)

    def _grace(self, passes: int) -> None:
        if passes:
            # Each pass lets the loop poll its sockets once: a reply that arrived is read.
            self._handle = self._loop.call_soon(self._grace, passes - 1)
            return
        self._cm.reschedule(self._loop.time())  # expire now: the task is cancelled, TimeoutError raised


class AsyncStore(_Outcomes):
    def __init__(self, client: redis.asyncio.Redis, health: Health, timeout_s: float | None,
                 observe: Observer = _ignore) -> None:
        self.client = client
        self.health = health
        self.observe = observe
        self._timeout = timeout_s
        self._scripts = {name: client.register_script(script_source(name)) for name in SCRIPTS}

    async def run(self, call: ScriptCall) -> Any:
        started = time.perf_counter()
        try:
            # One deadline over pool wait, connect and reply together.
            if self._timeout is None:
                reply = await self._scripts[call.script](keys=call.keys, args=call.args)
            else:
                async with _Deadline(self._timeout):
                    reply = await self._scripts[call.script](keys=call.keys, args=call.args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._failure(call, started, exc) from exc
        self._success(call, started)
        return reply

    async def drive(self, steps: Steps) -> Any:
        try:
            call = next(steps)
        except StopIteration as done:
            return done.value
        while True:
            try:
                try:
                    reply = await self.run(call)
                except StoreUnavailable as exc:
                    call = steps.throw(exc)
                    continue
                call = steps.send(reply)
            except StopIteration as done:
                return done.value
            except BaseException:
                steps.close()  # cancelled: let the operation clean up (a refill it had out)
                raise


class ThreadedStore:
    """Async face of a sync store, for a guard built with only a sync ``redis=`` client.

    Also serves async calls on a ``redis+cluster://`` URL: redis-py's asyncio cluster
    client (8.1) fails some concurrent first connections to a node with an
    AttributeError, so the sync cluster client is driven from ``executor`` instead.
    """

    def __init__(self, store: SyncStore, executor: concurrent.futures.Executor | None = None) -> None:
        self._store = store
        self._executor = executor
        self.client = None

    async def run(self, call: ScriptCall) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._store.run, call)

    async def drive(self, steps: Steps) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._store.drive, steps)
