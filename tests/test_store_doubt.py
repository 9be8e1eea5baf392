"""Checks whose outcome Redis leaves in doubt, and decisions settled by the wrong guard.

- A stalled event loop is not a failed Redis: a timer that fires late because the loop
  was busy must not turn a healthy Redis into ``store.unavailable`` (and, under
  ``fail_mode: open``, into unenforced calls).
- A check answered ``store.unavailable`` while Redis was paused must not leave a
  reservation behind when Redis resumes and runs the reserve script it had queued.
- A decision can only be settled by the guard that took it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from budgetguard import InvalidArgument, Usage

from .conftest import start_redis_server
from .helpers import MSG, guard


@pytest.fixture
def private_redis() -> Iterator[tuple[int, str]]:
    """A redis-server of this test's own, which it may pause (SIGSTOP) and resume."""
    try:
        proc, url = start_redis_server()
    except FileNotFoundError:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but redis-server is not on PATH")
        pytest.skip("redis-server is not on PATH")
    try:
        yield proc.pid, url
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(10)


def _busy(url: str, started: threading.Event, ms: int) -> None:
    """Keep a Redis busy for ``ms`` in one script: commands sent meanwhile wait for it."""
    client = redis.Redis.from_url(url)
    started.set()
    try:
        assert client.eval("local t = redis.call('TIME'); local stop = t[1] * 1e6 + t[2] + ARGV[1] * 1000 "
                           "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] >= stop return 1", 0, ms) == 1
    finally:
        client.close()


async def test_a_stalled_loop_is_not_a_failed_redis(private_redis, clock):
    # Redis is slow for 300 ms, but answers well before the check's deadline would pass on
    # an idle loop... except that the loop is busy (for 600 ms, as when a large request is
    # tokenized on it) from before the deadline until after the answer has arrived.
    _, url = private_redis
    g = guard(url, clock, fail_mode="open", redis_timeout_ms=100, tiers={"default": {"hourly_usd": 1}})
    await g.arelease(await g.acheck("warm", "gpt-4o", MSG, max_tokens=10))  # connection open, scripts loaded
    loop = asyncio.get_running_loop()
    outcomes = []
    for _ in range(3):
        started = threading.Event()
        busy = threading.Thread(target=_busy, args=(url, started, 300))
        busy.start()
        started.wait()
        await asyncio.sleep(0.02)  # the busy script has reached Redis
        check = asyncio.ensure_future(g.acheck("alice", "gpt-4o", MSG, max_tokens=10))
        # 50 ms on: the check's command is sent and its answer cannot have come (Redis is busy).
        loop.call_later(0.05, time.sleep, 0.6)
        d = await check
        await asyncio.to_thread(busy.join)
        outcomes.append((d.enforced, d.limit))
        await g.arelease(d)
    assert outcomes == [(True, None)] * 3
    assert g.healthy
    await g.aclose()


@pytest.mark.parametrize("side", ["sync", "async"])
async def test_fail_closed_checks_leave_no_reservation_after_redis_resumes(private_redis, clock, side):
    pid, url = private_redis
    g = guard(url, clock, fail_mode="closed", redis_timeout_ms=100, reservation_ttl_s=600,
              tiers={"default": {"hourly_usd": "0.05"}})
    one = g.check("alice", "gpt-4o", MSG, max_tokens=100)
    g.release(one)  # warm: connections open, scripts loaded
    os.kill(pid, signal.SIGSTOP)
    try:
        if side == "sync":
            denied = [g.check("alice", "gpt-4o", MSG, max_tokens=100) for _ in range(6)]
        else:
            denied = await asyncio.gather(*(g.acheck("alice", "gpt-4o", MSG, max_tokens=100) for _ in range(6)))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert {(d.allowed, d.limit) for d in denied} == {(False, "store.unavailable")}
    # Redis runs the reserve scripts it had queued; the voids, retried in the background
    # until Redis answers, make them take nothing or give back what they took.
    g.flush(timeout=30)
    if side == "async":
        await g.aclose()
        g = guard(url, clock, fail_mode="closed", redis_timeout_ms=1000, reservation_ttl_s=600,
                  tiers={"default": {"hourly_usd": "0.05"}})
    w = g.status("alice").windows["user.hourly"]
    assert (w.spent_usd, w.reserved_usd) == (0, 0)
    # The user has her whole cap: 0.05 / the estimate of one call, all allowed.
    allowed = 0
    while (d := g.check("alice", "gpt-4o", MSG, max_tokens=100)).allowed:
        allowed += 1
    assert allowed == int(w.limit_usd / d.estimated_cost_usd)
    g.close()


def test_a_decision_settles_only_with_the_guard_that_took_it(real_redis, real_redis_url, clock):
    mine = guard(real_redis_url, clock, key_prefix="bg-a")
    other = guard(real_redis_url, clock, key_prefix="bg-b", models={
        "gpt-4o": {"input_per_mtok": "250", "output_per_mtok": "1000"}})
    d = mine.check("alice", "gpt-4o", MSG, max_tokens=50)
    denied = mine.check("alice", "not-a-priced-model", MSG, max_tokens=50)
    assert d.allowed and not denied.allowed
    for settle in (lambda: other.record(d, Usage(100, 10)), lambda: other.release(d),
                   lambda: other.release(denied)):
        with pytest.raises(InvalidArgument, match="another BudgetGuard"):
            settle()
    for g in (mine, other):
        w = g.status("alice").windows["user.daily"]
        assert w.spent_usd == 0
    assert mine.status("alice").windows["user.daily"].reserved_usd == d.estimated_cost_usd
    assert other.status("alice").windows["user.daily"].reserved_usd == 0
    assert mine.record(d, Usage(100, 10))
    assert mine.status("alice").windows["user.daily"].reserved_usd == 0
    mine.close()
    other.close()


def test_a_retry_that_repeats_an_attempt_in_doubt_keeps_the_reservation(any_backend_url, clock):
    # Attempt A's reserve ran but its reply came too late (in doubt); the caller retries with
    # the same request id (B, a repeat of A's live reservation); then A is voided. B's record
    # must still apply: the void must not give the reservation back from under B.
    g = guard(any_backend_url, clock, tiers={"default": {"hourly_usd": "1"}})
    plan = g._engine.plan_check("u1", "gpt-4o", MSG, max_tokens=10, request_id="r1")
    g._sync.run(plan.call)  # A's script ran...
    a = g._engine.unavailable(plan, TimeoutError())  # ...and its reply came too late
    b = g.check("u1", "gpt-4o", MSG, max_tokens=10, request_id="r1")
    assert b.allowed and b.reservation_id == a.reservation_id
    g.release(a)  # the void of A
    assert g.status("u1").windows["user.hourly"].reserved_usd == b.estimated_cost_usd
    assert g.record(b, Usage(100, 10)) is True
    w = g.status("u1").windows["user.hourly"]
    assert (w.spent_usd > 0, w.reserved_usd) == (True, 0)
    g.close()


def test_caller_text_cannot_forge_a_log_record(backend_url, clock, caplog):
    # A model name or user id with a newline would start a second, forged log line.
    import logging

    g = guard(backend_url, clock)
    caplog.set_level(logging.DEBUG, logger="budgetguard")
    forged = "x\nINFO budgetguard: user=admin allowed"
    d = g.check(forged, "gpt-4o\r\nWARNING forged", MSG, max_tokens=10)  # no price: denied, and logged
    assert not d.allowed
    g.close()
    lines = [r.getMessage() for r in caplog.records]
    assert any("forged" in line for line in lines)
    assert not any("\n" in line or "\r" in line for line in lines)


def test_a_route_to_another_tokenizer_keeps_the_fetched_input_floor(backend_url, clock):
    g = guard(backend_url, clock, models={"gpt-4-turbo": {"input_per_mtok": "10", "output_per_mtok": "30"}},
              tiers={"default": {"hourly_usd": 1, "per_request": {"max_input_tokens": 100_000},
                                 "downgrade": {"at": 0.5, "routes": {"gpt-4-turbo": "gpt-4o-mini"}}}})
    files = [{"role": "user", "content": [{"type": "input_file", "file_id": "file-abc"}]}]
    d = g.check("u1", "gpt-4-turbo", files, max_tokens=100, fetched_input=True)
    assert d.allowed and d.model == "gpt-4o-mini"  # the dear model does not fit; its cl100k route does
    assert d.estimated_input_tokens == 100_000
    g.close()


@pytest.mark.parametrize("part", [{"type": "input_file", "file_id": "file-1"},
                                  {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                                  "data": "JVBERi0="}}])
def test_a_library_check_reserves_files_at_the_input_cap(backend_url, clock, part):
    # Not only through the middleware: a file in the messages is billed by its pages.
    files = [{"role": "user", "content": [part, {"type": "text", "text": "Summarise."}]}]
    capped = guard(backend_url, clock, tiers={"default": {"per_request": {"max_input_tokens": 40_000}}})
    held = capped.check("u1", "gpt-4o", files, max_tokens=10)
    assert held.estimated_input_tokens == 40_000
    capped.release(held)
    capped.close()
    uncapped = guard(backend_url, clock)
    d = uncapped.check("u1", "gpt-4o", files, max_tokens=10)
    assert (d.allowed, d.limit) == (False, "request.max_input_tokens")
    assert uncapped.status("u1").windows["user.daily"].reserved_usd == 0
    uncapped.close()
