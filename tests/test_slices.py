"""Org budget slices (org.slice_usd): exact org ledger, caps held, bounded loss on a crash."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from budgetguard import Usage
from budgetguard.pricing import nano_to_usd

from .conftest import FrozenClock
from .helpers import MSG, PRICES, estimate, guard


@pytest.fixture(params=["redis", "cluster"])
def slice_url(request: pytest.FixtureRequest) -> str:
    """Slices run split (user part in Redis, org part in memory) on a single Redis and on a cluster."""
    if request.param == "redis":
        request.getfixturevalue("real_redis")
        return request.getfixturevalue("real_redis_url")
    return request.getfixturevalue("cluster_url")


def _org(g, user="x"):
    w = g.status(user).windows
    return w["org.daily"], w["org.monthly"]


def test_one_process_fills_the_cap_exactly_and_hands_in_every_cent(slice_url, clock):
    e = estimate(slice_url, clock)
    cap = e * 10
    g = guard(slice_url, clock, org={"daily_usd": str(cap), "slice_usd": str(e * 3)})
    decisions = [g.check(f"u{i % 3}", "gpt-4o", MSG, max_tokens=50) for i in range(15)]
    assert [d.allowed for d in decisions] == [True] * 10 + [False] * 5
    assert {d.limit for d in decisions[10:]} == {"org.daily"}
    day, _ = _org(g)
    assert day.spent_usd + day.reserved_usd == cap  # the slices hold the whole room, nothing more
    spent = Decimal(0)
    for d in decisions[:10]:
        usage = Usage(input_tokens=d.estimated_input_tokens, output_tokens=7)
        assert g.record(d, usage)
        spent += nano_to_usd(g._engine.cost_nano(d, usage))
    g.close()  # hands in the last batch and gives the slice back
    day, month = _org(g)
    assert (day.spent_usd, day.reserved_usd) == (spent, 0)
    assert (month.spent_usd, month.reserved_usd) == (spent, 0)
    users = [g.status(f"u{i}").windows["user.daily"] for i in range(3)]
    assert sum(u.spent_usd for u in users) == spent and all(u.reserved_usd == 0 for u in users)


def test_spend_and_events_are_handed_in_on_time(slice_url, clock, real_redis):
    """Without close(): a record past slice_flush_s hands the batch in, events included."""
    e = estimate(slice_url, clock)
    g = guard(slice_url, clock, org={"daily_usd": "100", "slice_usd": str(e * 100), "slice_flush_s": 5})
    d1 = g.check("alice", "gpt-4o", MSG, max_tokens=50)
    g.record(d1, Usage(input_tokens=d1.estimated_input_tokens, output_tokens=10))
    day, _ = _org(g)
    assert day.spent_usd == 0  # still in this process
    clock.advance(seconds=6)
    d2 = g.check("bob", "gpt-4o", MSG, max_tokens=50)
    g.record(d2, Usage(input_tokens=d2.estimated_input_tokens, output_tokens=20))
    day, _ = _org(g)
    want = sum(nano_to_usd(g._engine.cost_nano(d, Usage(input_tokens=d.estimated_input_tokens, output_tokens=n)))
               for d, n in ((d1, 10), (d2, 20)))
    assert day.spent_usd == want
    events = [json.loads(fields[b"e"]) for _, fields in g._sync.client.xrange(g._engine._org_prefix + "events")]
    assert [(ev["user"], ev["outcome"]) for ev in events if ev["user"] != "probe"] == [("alice", "ok"), ("bob", "ok")]
    g.close()


async def test_concurrent_async_checks_never_pass_the_cap(slice_url, clock):
    e = estimate(slice_url, clock)
    fits = 60
    slice_usd = e * 8
    g = guard(slice_url, clock, org={"daily_usd": str(e * fits), "slice_usd": str(slice_usd)},
              redis_timeout_ms=10_000)
    start = asyncio.Event()

    async def one(i):
        await start.wait()
        return await g.acheck(f"u{i % 7}", "gpt-4o", MSG, max_tokens=50)

    tasks = [asyncio.ensure_future(one(i)) for i in range(150)]
    start.set()
    decisions = await asyncio.gather(*tasks)
    allowed = [d for d in decisions if d.allowed]
    # Never more than the cap; fewer only by what a slice held while a call was turned away.
    assert fits - slice_usd / e <= len(allowed) <= fits
    for d in allowed:
        await g.arecord(d, Usage(input_tokens=d.estimated_input_tokens, output_tokens=50))
    await g.aclose()
    day, _ = _org(g)
    assert day.reserved_usd == 0
    assert day.spent_usd == e * len(allowed) <= e * fits


def test_processes_share_the_org_exactly(slice_url, real_redis_url):
    """4 processes x 8 threads with their own slices: caps hold and the org ledger is exact."""
    from .slice_workers import run_calls

    probe_e = estimate(slice_url, None)
    cap = probe_e * 150
    data = {"models": dict(PRICES), "reservation_ttl_s": 60, "redis_timeout_ms": 10_000,
            "org": {"daily_usd": str(cap), "slice_usd": str(probe_e * 5)}}
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=run_calls, args=(data, slice_url, start, p, 8, 15, results)) for p in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
    allowed = sum(o[0] for o in outcomes)
    recorded = {u: n for o in outcomes for u, n in o[2].items()}
    denied = sum(o[1] for o in outcomes)
    assert allowed + denied == 4 * 8 * 15
    assert denied > 0  # 480 calls against room for 150 estimates (each spends about half its estimate)
    g = guard(slice_url, None, org={"daily_usd": str(cap)})
    day, _ = _org(g)
    assert day.reserved_usd == 0
    assert day.spent_usd == nano_to_usd(sum(recorded.values())) <= cap
    for user, nano in recorded.items():
        w = g.status(user).windows["user.daily"]
        assert (w.spent_usd, w.reserved_usd) == (nano_to_usd(nano), 0)


def test_a_dead_process_loses_at_most_its_unhanded_spend(slice_url):
    """Killed without close(): the org misses less than one slice; the slice lapses with its lease."""
    from .slice_workers import run_calls

    e = estimate(slice_url, None)
    slice_usd = e * 6
    data = {"models": dict(PRICES), "reservation_ttl_s": 60,
            "org": {"daily_usd": "1000", "slice_usd": str(slice_usd), "slice_flush_s": 60}}
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(1), ctx.Queue()
    proc = ctx.Process(target=run_calls, args=(data, slice_url, start, 0, 1, 20, results, True))
    proc.start()
    allowed, _, recorded = results.get(timeout=120)
    proc.join(30)
    assert allowed == 20
    truth = nano_to_usd(sum(recorded.values()))
    g = guard(slice_url, None, org={"daily_usd": "1000"})
    day, _ = _org(g)
    assert truth - slice_usd < day.spent_usd < truth  # a batch was lost, never more than a slice
    assert day.reserved_usd > 0  # the dead process's slice, until its lease lapses
    for user, nano in recorded.items():  # the users' counters lost nothing
        assert g.status(user).windows["user.daily"].spent_usd == nano_to_usd(nano)
    # The worker ran on the real clock: a minute past its lease, its slice has lapsed.
    later = FrozenClock(datetime.now(UTC) + timedelta(seconds=61))
    day, _ = _org(guard(slice_url, later, org={"daily_usd": "1000"}))
    assert day.reserved_usd == 0


def test_slices_cut_the_org_calls(real_redis, real_redis_url, clock):
    """Script calls per request: on a single Redis one per step; with slices the org's part is rare."""
    e = estimate(real_redis_url, clock)
    counts = {}
    for name, org in (("plain", {"daily_usd": "100"}), ("sliced", {"daily_usd": "100", "slice_usd": str(e * 50)})):
        g = guard(real_redis_url, clock, org=org)
        calls = []
        g.metrics.observe_redis = lambda script, seconds, ok, calls=calls: calls.append(script)
        g._sync.observe = g.metrics.observe_redis
        for i in range(100):
            d = g.check(f"u{i % 5}", "gpt-4o", MSG, max_tokens=50)
            g.record(d, Usage(input_tokens=d.estimated_input_tokens, output_tokens=50))
        g.close()
        counts[name] = {s: calls.count(s) for s in set(calls)}
    assert counts["plain"] == {"reserve": 100, "settle": 100}
    sliced = counts["sliced"]
    assert sliced["reserve"] == 100 and sliced["settle"] == 100  # the user's parts
    # 100 estimates of spend and a slice of 50: spend is handed in each half slice (4), a
    # slice runs short now and then, plus the first and the last call: a handful, not 200.
    assert 2 <= sliced["slice"] <= 10


def test_a_repeated_request_id_finds_its_hold_in_the_slice(slice_url, clock):
    e = estimate(slice_url, clock)
    g = guard(slice_url, clock, org={"daily_usd": "100", "slice_usd": str(e * 10)})
    first = g.check("dora", "gpt-4o", MSG, max_tokens=50, request_id="req-1")
    again = g.check("dora", "gpt-4o", MSG, max_tokens=50, request_id="req-1")
    assert again.allowed and "repeat" in again.reason
    assert g._engine.slices.held_total == first._ticket.amount_nano  # held once, not twice
    assert g.record(again, Usage(input_tokens=again.estimated_input_tokens, output_tokens=50))
    assert g.record(first, Usage(input_tokens=first.estimated_input_tokens, output_tokens=50)) is False
    g.close()
    day, _ = _org(g)
    assert (day.spent_usd, day.reserved_usd) == (e, 0)


def _poll(predicate, seconds: float = 10.0) -> bool:
    deadline = datetime.now(UTC) + timedelta(seconds=seconds)
    while datetime.now(UTC) < deadline:
        if predicate():
            return True
        threading.Event().wait(0.02)
    return predicate()


def test_an_idle_process_hands_in_its_spend_and_gives_its_slice_back(slice_url):
    """No further calls: the background flush hands the spend in, then returns the idle slice."""
    g = guard(slice_url, None, org={"daily_usd": "100", "slice_usd": "1", "slice_flush_s": 0.2})
    d = g.check("erin", "gpt-4o", MSG, max_tokens=50)
    usage = Usage(input_tokens=d.estimated_input_tokens, output_tokens=30)
    g.record(d, usage)
    cost = nano_to_usd(g._engine.cost_nano(d, usage))
    assert _org(g)[0].spent_usd == 0  # not handed in yet
    assert _poll(lambda: _org(g)[0].spent_usd == cost)
    assert _poll(lambda: _org(g)[0].reserved_usd == 0)  # the idle slice went back
    assert not g._engine.slices.holding


# -- regressions: each of these failed before its fix ---------------------------------------


def _full(d):
    return Usage(input_tokens=d.estimated_input_tokens, output_tokens=d.max_output_tokens)


def _events(g):
    return [json.loads(f[b"e"]) for _, f in g._sync.client.xrange(g._engine._org_prefix + "events")]


def test_a_slice_that_lapsed_is_not_counted_again(real_redis, real_redis_url, clock):
    e = estimate(real_redis_url, clock)
    cap = e * 10
    g = guard(real_redis_url, clock, org={"daily_usd": str(cap), "slice_usd": str(e * 3), "slice_flush_s": 60})
    d = g.check("u0", "gpt-4o", MSG, max_tokens=50)
    g.record(d, _full(d))
    clock.advance(seconds=61)  # the slice's lease lapses in Redis (a long pause)
    allowed = [x for x in (g.check(f"u{i % 5}", "gpt-4o", MSG, max_tokens=50) for i in range(20)) if x.allowed]
    for x in allowed:
        g.record(x, _full(x))
    g.close()
    assert 1 + len(allowed) == 10 and _org(g)[0].spent_usd == cap


def test_a_resent_user_settle_still_charges_the_org(real_redis, real_redis_url, clock):
    e = estimate(real_redis_url, clock)
    g = guard(real_redis_url, clock, org={"daily_usd": "100", "slice_usd": str(e * 10)})
    run = g._sync.run

    def lost_reply(call):
        if call.script == "settle" and call.args[-1] == "u":
            run(call)  # applied, its reply lost, and the client resends
        return run(call)

    g._sync.run = lost_reply
    d = g.check("alice", "gpt-4o", MSG, max_tokens=50)
    assert g.record(d, _full(d))
    g._sync.run = run
    g.close()
    assert _org(g)[0].spent_usd == nano_to_usd(g._engine.cost_nano(d, _full(d)))
    assert [ev["outcome"] for ev in _events(g) if ev["user"] == "alice"] == ["ok"]


def test_a_request_id_retried_by_another_process_is_charged_once(real_redis, real_redis_url, clock):
    e = estimate(real_redis_url, clock)
    org = {"daily_usd": "100", "slice_usd": str(e * 10)}
    a, b = guard(real_redis_url, clock, org=org), guard(real_redis_url, clock, org=org)
    d1 = a.check("dora", "gpt-4o", MSG, max_tokens=50, request_id="req-1")
    d2 = b.check("dora", "gpt-4o", MSG, max_tokens=50, request_id="req-1")
    # A repeat; its org part is checked in Redis (the original's hold is in a's memory).
    assert d2.allowed and "repeat" in d2.reason
    assert [a.record(d1, _full(d1)), b.record(d2, _full(d2))] == [True, False]
    a.close()
    b.close()
    assert _org(a)[0].spent_usd == a.status("dora").windows["user.daily"].spent_usd == e
    assert _org(a)[0].reserved_usd == 0  # the repeat gave its own org reservation back


def test_a_second_record_reports_false_even_when_a_flush_runs(real_redis, real_redis_url, clock):
    e = estimate(real_redis_url, clock)
    g = guard(real_redis_url, clock, org={"daily_usd": "100", "slice_usd": str(e * 10), "slice_flush_s": 1})
    a = g.check("alice", "gpt-4o", MSG, max_tokens=50)
    assert g.record(a, _full(a))
    b = g.check("bob", "gpt-4o", MSG, max_tokens=50)
    g.record(b, _full(b))
    clock.advance(seconds=2)  # the next settle runs a flush
    assert g.record(a, _full(a)) is False
    g.close()


def test_releases_reach_the_usage_stream(real_redis, real_redis_url, clock):
    g = guard(real_redis_url, clock, org={"daily_usd": "100", "slice_usd": "1"})
    ok = g.check("alice", "gpt-4o", MSG, max_tokens=50)
    g.record(ok, _full(ok))
    bad = g.check("alice", "gpt-4o", MSG, max_tokens=50)
    g.release(bad, error="upstream 500")
    g.close()
    assert [ev["outcome"] for ev in _events(g)] == ["ok", "released"]


def test_a_short_slice_takes_no_route_nothing_triggered(real_redis, real_redis_url, clock):
    """The requested model does not fit the slice: ask Redis, do not route to a cheaper model."""
    e = estimate(real_redis_url, clock)
    g = guard(real_redis_url, clock, org={"daily_usd": "100", "slice_usd": str(e * 3), "slice_flush_s": 60,
                                          "downgrade": {"at": 0.9, "routes": {"gpt-4o": "gpt-4o-mini"}}})
    held = [g.check(f"u{i}", "gpt-4o", MSG, max_tokens=50) for i in range(4)]
    g.record(held[0], Usage(input_tokens=held[0].estimated_input_tokens, output_tokens=1))
    d = g.check("u9", "gpt-4o", MSG, max_tokens=50)
    assert (d.allowed, d.model) == (True, "gpt-4o")
    g.close()


def test_spend_of_100k_dollars_and_more_is_read_exactly(real_redis, real_redis_url, clock):
    g = guard(real_redis_url, clock, org={"daily_usd": "400000", "alert_at": [0.5], "slice_usd": "5",
                                          "slice_flush_s": 1})
    day = g._engine._org_prefix + g._engine.windows_now(clock()).d.stamp
    real_redis.hset(day, "s", 200_000 * 10**9 - 1)  # just under $200k spent today
    alerts = []
    g._on_alert, g._alerting = [alerts.append], True
    d = g.check("alice", "gpt-4o", MSG, max_tokens=50)
    clock.advance(seconds=2)
    assert g.record(d, _full(d))  # hands the spend in: crosses 50% at over 2e14 nano-USD
    g.close()
    assert [(a.window, a.level) for a in alerts] == [("org.daily", Decimal("0.5"))]
    assert alerts[0].spent_usd == Decimal(200_000) - Decimal("1e-9") + nano_to_usd(g._engine.cost_nano(d, _full(d)))


def test_the_org_block_is_resolved_on_the_next_day(real_redis, real_redis_url, clock):
    e = estimate(real_redis_url, clock)
    g = guard(real_redis_url, clock, org={"daily_usd": str(e * 2), "slice_usd": str(e)})
    alerts = []
    g._on_alert, g._alerting = [alerts.append], True
    for d in [g.check(f"u{i}", "gpt-4o", MSG, max_tokens=50) for i in range(3)]:
        if d.allowed:
            g.record(d, _full(d))
    clock.advance(days=1)
    d = g.check("v", "gpt-4o", MSG, max_tokens=50)
    g.record(d, _full(d))
    g.flush(5)
    g.close()
    kinds = [(a.kind, a.window) for a in alerts]
    assert ("blocked", "org.daily") in kinds and ("resolved", "org.daily") in kinds


async def test_a_record_cancelled_during_a_flush_loses_no_spend(real_redis, real_redis_url, clock):
    e = estimate(real_redis_url, clock)
    g = guard(real_redis_url, clock, org={"daily_usd": "100", "slice_usd": str(e * 10), "slice_flush_s": 1})
    store = g._async_store()
    run = store.run
    slow = asyncio.Event()

    async def slow_slice(call):
        if call.script == "slice" and not slow.is_set():
            await asyncio.sleep(0.5)
        return await run(call)

    store.run = slow_slice
    ds = [await g.acheck(f"u{i}", "gpt-4o", MSG, max_tokens=50) for i in range(3)]
    clock.advance(seconds=2)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(g.arecord(ds[0], _full(ds[0])), 0.05)
    slow.set()
    for d in ds[1:]:
        await g.arecord(d, _full(d))
    await g.aclose()
    assert _org(g)[0].spent_usd == sum(nano_to_usd(g._engine.cost_nano(d, _full(d))) for d in ds)


def test_a_forked_child_flushes_in_the_background(real_redis, real_redis_url):
    e = estimate(real_redis_url, None)
    g = guard(real_redis_url, None, org={"daily_usd": "100", "slice_usd": str(e * 10), "slice_flush_s": 0.2})
    d = g.check("parent", "gpt-4o", MSG, max_tokens=50)
    g.record(d, _full(d))
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_child_records_and_idles, args=(g,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    g.close()


def _child_records_and_idles(g) -> None:
    d = g.check("child", "gpt-4o", MSG, max_tokens=50)
    g.record(d, _full(d))
    want = g._engine.cost_nano(d, _full(d))
    # No close(): the child's background flush must hand its spend in by itself.
    handed = _poll(lambda: g.status("child").windows["org.daily"].spent_usd >= nano_to_usd(2 * want))
    os._exit(0 if handed else 1)


def test_asyncio_run_without_aclose_leaves_the_flush_working(real_redis, real_redis_url):
    e = estimate(real_redis_url, None)
    g = guard(real_redis_url, None, org={"daily_usd": "100", "slice_usd": str(e * 10), "slice_flush_s": 0.2})

    async def one():
        d = await g.acheck("async", "gpt-4o", MSG, max_tokens=50)
        await g.arecord(d, _full(d))
        return d

    first = asyncio.run(one())  # the loop ends before its flush could run
    d = g.check("sync", "gpt-4o", MSG, max_tokens=50)
    g.record(d, _full(d))
    want = nano_to_usd(g._engine.cost_nano(first, _full(first)) + g._engine.cost_nano(d, _full(d)))
    assert _poll(lambda: _org(g)[0].spent_usd == want)
    g.close()



def test_a_retried_request_id_is_checked_against_the_org(real_redis, real_redis_url, clock):
    """The original died between its parts; with the org cap spent, its retry is denied."""
    e = estimate(real_redis_url, clock)
    g = guard(real_redis_url, clock, org={"daily_usd": str(e * 2), "slice_usd": str(e)})
    plan = g._engine.plan_check("dora", "gpt-4o", MSG, max_tokens=50, request_id="req-1")
    g._sync.run(next(g._engine.check_steps(plan)))  # the user part, then the process "dies"
    for i in range(2):
        d = g.check(f"u{i}", "gpt-4o", MSG, max_tokens=50)
        g.record(d, _full(d))
    retry = g.check("dora", "gpt-4o", MSG, max_tokens=50, request_id="req-1")
    g.close()
    assert (retry.allowed, retry.limit) == (False, "org.daily")
    assert _org(g)[0].spent_usd == e * 2


def test_a_block_resolved_by_a_records_flush_is_announced(real_redis, real_redis_url, clock):
    """The first slice call of the new day is a record's flush: its resolve is still an alert."""
    e = estimate(real_redis_url, clock)
    g = guard(real_redis_url, clock, org={"daily_usd": str(e * 2), "slice_usd": str(e), "slice_flush_s": 1})
    alerts = []
    g._on_alert, g._alerting = [alerts.append], True
    late = g.check("u0", "gpt-4o", MSG, max_tokens=50)  # held in the slice over midnight
    g.record(g.check("u1", "gpt-4o", MSG, max_tokens=50), Usage(input_tokens=1, output_tokens=1))
    assert not g.check("u2", "gpt-4o", MSG, max_tokens=50).allowed  # blocked: alert
    clock.advance(days=1)
    g.record(late, _full(late))  # hands the spend in on the new day: resolves the block
    g.flush(5)
    kinds = [(a.kind, a.window, a.window_key) for a in alerts]
    g.close()
    yesterday = g._engine.windows_now(clock() - timedelta(days=1)).d.stamp
    assert ("blocked", "org.daily", yesterday) in kinds and ("resolved", "org.daily", yesterday) in kinds



def test_a_user_denial_does_not_blame_the_org_for_the_slices_it_holds(real_redis, real_redis_url, clock):
    """The slice holds the org's remaining room; a user over their own cap is told so."""
    e = estimate(real_redis_url, clock)
    g = guard(real_redis_url, clock, tiers={"default": {"hourly_usd": str(e)}},
              org={"daily_usd": str(e * 3), "alert_at": [], "slice_usd": str(e * 10)})
    alerts = []
    g._on_alert, g._alerting = [alerts.append], True
    assert g.check("alice", "gpt-4o", MSG, max_tokens=50).allowed  # the slice takes all the org's room
    d = g.check("alice", "gpt-4o", MSG, max_tokens=50)
    g.flush(5)
    g.close()
    assert (d.allowed, d.limit) == (False, "user.hourly")
    assert [a.window for a in alerts if a.kind == "blocked"] == []


def test_close_says_when_the_slices_could_not_be_handed_back(real_redis, real_redis_url, clock, caplog):
    from budgetguard.store import StoreUnavailable

    g = guard(real_redis_url, clock, org={"daily_usd": "100", "slice_usd": "1"})
    d = g.check("alice", "gpt-4o", MSG, max_tokens=50)
    g.record(d, _full(d))
    run = g._sync.run

    def down(call):
        if call.script == "slice":
            raise StoreUnavailable("budget store unavailable: injected")
        return run(call)

    g._sync.run = down
    g.close()
    assert any("org budget slices not handed back" in r.getMessage() for r in caplog.records
               if r.levelname == "ERROR")



def test_closing_with_a_call_in_flight_is_not_an_error(real_redis, real_redis_url, clock, caplog):
    g = guard(real_redis_url, clock, org={"daily_usd": "100", "slice_usd": "1"})
    g.check("alice", "gpt-4o", MSG, max_tokens=50)  # still in flight at close
    g.close()
    assert _org(g)[0].reserved_usd == 0  # the slice went back
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
