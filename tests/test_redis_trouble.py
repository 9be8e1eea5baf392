"""Redis down, slow or restarted: fail_mode applies, nothing hangs or raises, recovery is automatic."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from budgetguard import Usage

from .conftest import _free_port, start_redis_server
from .helpers import MSG, guard

# A hang guard, not a performance assertion: a call bounded by a 100 ms timeout that
# takes seconds means the bound does not hold.
HANG_S = 3.0


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A TCP server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                accepted.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def refused_url() -> str:
    return f"redis://127.0.0.1:{_free_port()}/0"


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_unreachable_redis_applies_fail_mode(mode, clock, caplog):
    g = guard(refused_url(), clock, fail_mode=mode, redis_timeout_ms=100)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="budgetguard.store"):
        decisions = [g.check("u1", "gpt-4o", MSG, max_tokens=10) for _ in range(5)]
        decisions.append(await g.acheck("u1", "gpt-4o", MSG, max_tokens=10))
    assert time.monotonic() - started < HANG_S
    for d in decisions:
        assert d.limit == "store.unavailable"
        assert d.allowed is (mode == "open")
        assert d.enforced is False or not d.allowed
    # One log line for the outage, not one per call.
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    # Settling during the outage neither raises nor hangs; it reports that nothing applied.
    if mode == "open":
        assert g.record(decisions[0], Usage(input_tokens=1, output_tokens=1)) is False
    assert g.release(decisions[1]) is False
    assert await g.arelease(decisions[-1]) is False
    await g.aclose()


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_silent_redis_times_out(mode, clock, blackhole):
    g = guard(blackhole, clock, fail_mode=mode, redis_timeout_ms=100)
    started = time.monotonic()
    d = g.check("u1", "gpt-4o", MSG, max_tokens=10)
    ad = await g.acheck("u1", "gpt-4o", MSG, max_tokens=10)
    assert time.monotonic() - started < HANG_S
    assert d.limit == ad.limit == "store.unavailable"
    assert d.allowed is ad.allowed is (mode == "open")
    await g.aclose()


@pytest.mark.skipif(not shutil.which("redis-server") and os.environ.get("CI") != "true",
                    reason="needs redis-server on PATH")
async def test_fail_closed_release_gives_back_a_late_reservation(clock):
    """A check that timed out may still have reserved; releasing the denial undoes it."""
    port = _free_port()
    proc, url = start_redis_server(port)
    try:
        g = guard(url, clock, fail_mode="closed", tiers={"default": {"hourly_usd": "1"}})
        plan = g._engine.plan_check("u1", "gpt-4o", MSG, max_tokens=10)
        g._sync.run(plan.call)  # the script ran...
        denied = g._engine.unavailable(plan, TimeoutError())  # ...but the reply came too late
        assert not denied.allowed and denied.limit == "store.unavailable"
        assert g.status("u1").windows["user.hourly"].reserved_usd == denied.estimated_cost_usd
        assert g.release(denied) is True
        assert g.status("u1").windows["user.hourly"].reserved_usd == 0
    finally:
        proc.terminate()
        proc.wait(10)


async def test_cancelled_acheck_leaves_no_reservation(real_redis, real_redis_url, clock):
    import asyncio

    g = guard(real_redis_url, clock)
    for i in range(60):
        task = asyncio.create_task(g.acheck("u1", "gpt-4o", MSG, max_tokens=10))
        for _ in range(i % 4):  # land the cancel before, while and after the script is sent
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:  # it finished before the cancel landed: an ordinary release
            await g.arelease(task.result())
    await g.aclose()  # waits for the releases of cancelled checks
    assert g.status("u1").windows["user.hourly"].reserved_usd == 0


async def test_cancelled_repeat_keeps_the_original_reservation(real_redis, real_redis_url, clock):
    import asyncio

    g = guard(real_redis_url, clock)
    original = await g.acheck("u1", "gpt-4o", MSG, max_tokens=10, request_id="R")
    for i in range(20):
        task = asyncio.create_task(g.acheck("u1", "gpt-4o", MSG, max_tokens=10, request_id="R"))
        for _ in range(i % 4):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await g.aclose()
    assert g.record(original, Usage(input_tokens=10, output_tokens=10)) is True
    assert g.status("u1").windows["user.daily"].spent_usd > 0


async def test_enforcement_resumes_after_a_restart(clock):
    port = _free_port()
    proc, url = start_redis_server(port)
    try:
        g = guard(url, clock, redis_timeout_ms=200, tiers={"default": {"hourly_usd": "1"}})
        assert g.check("u1", "gpt-4o", MSG, max_tokens=10).enforced
        assert (await g.acheck("u1", "gpt-4o", MSG, max_tokens=10)).enforced

        proc.terminate()
        proc.wait(10)
        down = g.check("u1", "gpt-4o", MSG, max_tokens=10)
        adown = await g.acheck("u1", "gpt-4o", MSG, max_tokens=10)
        assert (down.enforced, adown.enforced) == (False, False)
        assert not g.healthy

        proc, url = start_redis_server(port)
        # The pooled connections are stale now; the first call on each must still succeed.
        back = [g.check("u1", "gpt-4o", MSG, max_tokens=10) for _ in range(3)]
        aback = await g.acheck("u1", "gpt-4o", MSG, max_tokens=10)
        assert all(d.enforced and d.allowed for d in back) and aback.enforced
        assert g.healthy
        assert g.status("u1").windows["user.hourly"].reserved_usd == sum(
            d.estimated_cost_usd for d in [*back, aback])
        await g.aclose()
    finally:
        proc.terminate()
        proc.wait(10)
