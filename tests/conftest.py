"""Shared fixtures: a real Redis found as DESIGN.md section 5 says, a frozen clock, guards."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from .cluster import LocalCluster

# The real tiktoken encodings, loaded offline from the rank files kept beside the tests.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(__file__).parent / "data" / "tiktoken"))

def _answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis_server(port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start a throwaway redis-server on 127.0.0.1 (no persistence) and wait for it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not on PATH")
    port = port or _free_port()
    workdir = tempfile.mkdtemp(prefix="budgetguard-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not _answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"redis-server on port {port} did not start")
        time.sleep(0.05)
    return proc, url


def redis_choice(env: Mapping[str, str], server_binary: str | None) -> tuple[str, str]:
    """How the tests get a Redis: ("url", $REDIS_URL), ("start", binary) for a private
    redis-server on a free port, or ("skip" | "fail", why).

    A Redis already listening on 127.0.0.1:6379 may be someone's real one: the tests flush
    what they use, so they touch it only when told to, through REDIS_URL.
    """
    url = env.get("REDIS_URL")
    if url:
        return "url", url
    if server_binary is not None:
        return "start", server_binary
    why = "no Redis: set REDIS_URL (a database the tests may flush) or put redis-server on PATH"
    return ("fail" if env.get("CI") == "true" else "skip"), why


@pytest.fixture(scope="session")
def real_redis_url() -> Iterator[str]:
    """$REDIS_URL, else a private redis-server started on a free port (see redis_choice)."""
    kind, value = redis_choice(os.environ, shutil.which("redis-server"))
    if kind == "url":
        yield value
        return
    if kind == "fail":
        pytest.fail(f"CI=true but {value}")
    if kind == "skip":
        pytest.skip(value)
    proc, url = start_redis_server()
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def real_redis(real_redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(real_redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A real 3-primary/3-replica Redis Cluster from redis-server, started once per session."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but redis-server is not on PATH: the cluster tests need it")
        pytest.skip("redis-server is not on PATH (needed to start a Redis Cluster)")
    cluster = LocalCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_client(redis_cluster: LocalCluster) -> Iterator[RedisCluster]:
    """A RedisCluster client on an empty cluster; nodes an earlier test killed are back."""
    redis_cluster.ensure_healthy()
    redis_cluster.flushall()
    client = RedisCluster.from_url(redis_cluster.url)
    yield client
    client.close()


@pytest.fixture
def cluster_url(redis_cluster: LocalCluster, cluster_client: RedisCluster) -> str:
    """A ``redis+cluster://`` URL of the (emptied) test cluster, for guards."""
    return "redis+cluster://" + redis_cluster.url.split("://", 1)[1]


@pytest.fixture(params=["memory", "redis", "cluster"])
def any_backend_url(request: pytest.FixtureRequest) -> str:
    """The engine's own tests also run on a Redis Cluster (user and org parts per slot)."""
    if request.param == "cluster":
        return request.getfixturevalue("cluster_url")
    return request.getfixturevalue("_backend_" + request.param)


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[tuple[Any, Any]]:
    """The fake LLM upstream (tests/upstream.py) on a free 127.0.0.1 port, and its switch."""
    from .upstream import Server, Switch

    switch = Switch()
    with Server(switch) as srv:
        yield srv, switch


@pytest.fixture(autouse=True)
def _flush_guards(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let each test's background work (alerts, denial events) finish before the next test's flush."""
    from budgetguard.guard import BudgetGuard

    made: list[BudgetGuard] = []
    original = BudgetGuard.__init__

    def tracking_init(self: BudgetGuard, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(self)

    monkeypatch.setattr(BudgetGuard, "__init__", tracking_init)
    yield
    for g in made:
        g.flush(timeout=10)


@pytest.fixture
def _backend_memory() -> str:
    return f"memory://test-{uuid.uuid4().hex}"


@pytest.fixture
def _backend_redis(real_redis: redis.Redis, real_redis_url: str) -> str:
    return real_redis_url


@pytest.fixture(params=["memory", "redis"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """Every engine test runs on embedded fakeredis and on a real Redis."""
    return request.getfixturevalue("_backend_" + request.param)


class FrozenClock:
    """A settable clock for ``BudgetGuard(clock=...)``."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC))
