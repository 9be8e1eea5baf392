"""Concurrent checks can never push committed + reserved spend past a cap."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest

from budgetguard import Usage

from .helpers import MSG, guard, more_budgets  # noqa: F401

CALLERS = 200
FITS = 100


# Each test runs over two budgets and over four (helpers.more_budgets).
pytestmark = pytest.mark.usefixtures("more_budgets")


@pytest.fixture
def backend_url(any_backend_url: str) -> str:
    """These tests also run on a Redis Cluster, where checks and settles run per hash slot."""
    return any_backend_url



def _estimate(url, clock) -> Decimal:
    """The worst-case cost of one test request, read from an uncapped probe."""
    probe = guard(url, clock)
    d = probe.check("probe", "gpt-4o", MSG, max_tokens=100)
    probe.release(d)
    return d.estimated_cost_usd


def _settle_all_at_estimate(g, decisions) -> None:
    for d in decisions:
        # Usage that costs exactly the estimate: the estimated input and max_tokens of output.
        assert g.record(d, Usage(input_tokens=d.estimated_input_tokens, output_tokens=100)) is True


async def test_200_async_checks_allow_exactly_100(backend_url, clock):
    cap = _estimate(backend_url, clock) * FITS
    # A generous timeout: this test is about exact counting, not about a loaded machine's latency.
    g = guard(backend_url, clock, tiers={"default": {"hourly_usd": str(cap)}}, redis_timeout_ms=10_000)
    start = asyncio.Event()

    async def one():
        await start.wait()
        return await g.acheck("alice", "gpt-4o", MSG, max_tokens=100)

    tasks = [asyncio.create_task(one()) for _ in range(CALLERS)]
    start.set()
    decisions = await asyncio.gather(*tasks)
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == FITS
    assert all(d.enforced for d in decisions)
    assert {d.limit for d in decisions if not d.allowed} == {"user.hourly"}
    _settle_all_at_estimate(g, allowed)
    w = (await g.astatus("alice")).windows["user.hourly"]
    assert (w.spent_usd, w.reserved_usd) == (cap, 0)
    await g.aclose()


def test_200_threaded_checks_allow_exactly_100(backend_url, clock):
    cap = _estimate(backend_url, clock) * FITS
    g = guard(backend_url, clock, tiers={"default": {"hourly_usd": str(cap)}}, redis_max_connections=16,
              redis_timeout_ms=10_000)
    barrier = threading.Barrier(CALLERS)

    def one(_):
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=5)
        return g.check("alice", "gpt-4o", MSG, max_tokens=100)

    with ThreadPoolExecutor(max_workers=CALLERS) as pool:  # 200 threads, released together
        decisions = list(pool.map(one, range(CALLERS)))
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == FITS
    assert all(d.enforced for d in decisions)
    _settle_all_at_estimate(g, allowed)
    w = g.status("alice").windows["user.hourly"]
    assert (w.spent_usd, w.reserved_usd) == (cap, 0)


async def test_org_cap_shared_by_many_users(backend_url, clock):
    cap = _estimate(backend_url, clock) * FITS
    g = guard(backend_url, clock, org={"daily_usd": str(cap)}, redis_timeout_ms=10_000)
    decisions = await asyncio.gather(
        *(g.acheck(f"user-{i % 37}", "gpt-4o", MSG, max_tokens=100) for i in range(CALLERS))
    )
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == FITS
    assert {d.limit for d in decisions if not d.allowed} == {"org.daily"}
    _settle_all_at_estimate(g, allowed)
    w = (await g.astatus("user-0")).windows["org.daily"]
    assert (w.spent_usd, w.reserved_usd) == (cap, 0)
    await g.aclose()


async def test_pool_queues_callers_beyond_its_size(backend_url, clock):
    """300 callers on an 8-connection pool wait their turn instead of failing."""
    g = guard(backend_url, clock, redis_max_connections=8, redis_timeout_ms=5000)
    decisions = await asyncio.gather(*(g.acheck(f"u{i}", "gpt-4o", MSG, max_tokens=10) for i in range(300)))
    assert all(d.allowed and d.enforced for d in decisions)
    await g.aclose()
