"""budgetguard on a real Redis Cluster: per-slot steps, compensation, failover mid-traffic."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from budgetguard import BudgetGuard, Usage
from budgetguard.engine import ScriptCall

from .conftest import FrozenClock
from .helpers import MSG, config, estimate, guard

ORG_KEY = "bg:{org}:leases"


def test_a_check_runs_one_script_per_slot(cluster_url, redis_cluster, clock):
    g = guard(cluster_url, clock)
    nodes = []
    run = g._sync.run

    def spy(call: ScriptCall):
        nodes.append((call.script, {redis_cluster.keyslot(k) for k in call.keys}))
        return run(call)

    g._sync.run = spy
    d = g.check("alice", "gpt-4o", MSG, max_tokens=50)
    g.record(d, Usage(input_tokens=d.estimated_input_tokens, output_tokens=5))
    user_slot, org_slot = redis_cluster.keyslot("{u:alice}"), redis_cluster.keyslot("{org}")
    # Reserve and settle alike: the user's part, then the org's (the settle's carries the event).
    assert nodes == [("reserve", {user_slot}), ("reserve", {org_slot}), ("settle", {user_slot}),
                     ("settle", {org_slot})]


def test_an_org_denial_gives_the_user_part_back(cluster_url, clock, cluster_client):
    e = estimate(cluster_url, clock)
    g = guard(cluster_url, clock, org={"daily_usd": str(e * 2)})
    first = [g.check(f"u{i}", "gpt-4o", MSG, max_tokens=50) for i in range(3)]
    assert [d.allowed for d in first] == [True, True, False] and first[2].limit == "org.daily"
    w = g.status("u2").windows
    assert (w["user.daily"].reserved_usd, w["user.hourly"].reserved_usd) == (0, 0)
    assert w["org.daily"].reserved_usd == e * 2


def test_a_check_that_dies_between_its_steps_is_covered_by_the_lease(cluster_url, clock):
    """The org step never runs (the process died): the user part counts until its lease lapses."""
    g = guard(cluster_url, clock)
    plan = g._engine.plan_check("carol", "gpt-4o", MSG, max_tokens=50)
    steps = g._engine.check_steps(plan)
    g._sync.run(next(steps))  # the user part, and nothing after it
    w = g.status("carol").windows
    assert w["user.daily"].reserved_usd > 0 and w["org.daily"].reserved_usd == 0
    clock.advance(seconds=61)  # reservation_ttl_s is 60 in the test config
    assert g.status("carol").windows["user.daily"].reserved_usd == 0


def _traffic(g: BudgetGuard, stop: threading.Event, threads: int, tally: dict, lock: threading.Lock) -> list:
    def one(t: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            d = g.check(f"t{t}-u{i % 3}", "gpt-4o", MSG, max_tokens=50)
            with lock:
                tally["checks"] += 1
                tally["unenforced" if not d.enforced else "allowed" if d.allowed else "denied"] += 1
            if not d.allowed:
                continue
            usage = Usage(input_tokens=d.estimated_input_tokens, output_tokens=20)
            ok = g.record(d, usage)
            with lock:
                tally["recorded" if ok else "unrecorded"] += 1
                if ok:
                    tally["cost"] += g._engine.cost_nano(d, usage)

    workers = [threading.Thread(target=one, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    return workers


def test_traffic_through_failovers_keeps_the_books_exact(cluster_url, redis_cluster, clock):
    """Coordinated failovers of the org's node and a user's node while 6 threads check and record."""
    e = estimate(cluster_url, clock)
    cap = e * 50  # each call spends about half its estimate: the cap is reached within the traffic
    g = guard(cluster_url, clock, org={"daily_usd": str(cap)}, fail_mode="closed", redis_timeout_ms=5000)
    tally = dict.fromkeys(("checks", "allowed", "denied", "unenforced", "recorded", "unrecorded", "cost"), 0)
    lock, stop = threading.Lock(), threading.Event()
    workers = _traffic(g, stop, 6, tally, lock)

    def checks() -> int:
        with lock:
            return tally["checks"]

    def after(n: int) -> None:
        deadline = datetime.now(UTC) + timedelta(seconds=60)
        target = checks() + n
        while checks() < target and datetime.now(UTC) < deadline:
            stop.wait(0.01)

    after(60)
    redis_cluster.failover(redis_cluster.primary_for_key(ORG_KEY))
    after(60)
    redis_cluster.failover(redis_cluster.primary_for_key("bg:{u:t0-u1}:leases"))
    after(60)
    stop.set()
    for w in workers:
        w.join(60)
    assert tally["checks"] >= 180
    assert tally["unenforced"] == 0 and tally["unrecorded"] == 0  # a coordinated failover is never an outage
    assert tally["denied"] > 0  # the org cap was reached
    org = g.status("x").windows["org.daily"]
    assert org.reserved_usd == 0
    assert org.spent_usd == Decimal(tally["cost"]) / 10**9 <= cap


def test_a_killed_org_primary_fails_over_and_enforcement_resumes(cluster_url, redis_cluster):
    """A crash (not a coordinated failover): calls fail closed for ~2 s, then the replica serves."""
    g = BudgetGuard(config(fail_mode="closed", redis_timeout_ms=300, org={"daily_usd": "1000"}),
                    redis_url=cluster_url)
    tally = dict.fromkeys(("checks", "allowed", "denied", "unenforced", "recorded", "unrecorded", "cost"), 0)
    lock, stop = threading.Lock(), threading.Event()
    workers = _traffic(g, stop, 4, tally, lock)
    org_primary = redis_cluster.primary_for_key(ORG_KEY)
    redis_cluster.kill(org_primary)
    with lock:
        before = dict(tally)
    deadline = datetime.now(UTC) + timedelta(seconds=30)
    while datetime.now(UTC) < deadline:
        with lock:
            if tally["allowed"] >= before["allowed"] + 20:
                break
        stop.wait(0.01)
    stop.set()
    for w in workers:
        w.join(60)
    assert tally["allowed"] >= before["allowed"] + 20  # served again by the promoted replica
    assert tally["unenforced"] == 0  # fail_mode closed: nothing went through unchecked
    assert tally["denied"] > 0  # the outage (no cap is near): denied as store.unavailable
    # Whatever the crash cut short lapses with its lease: nothing stays reserved after it.
    # Any listed node that answers maps the cluster (the killed one is listed too).
    every_node = "redis+cluster://" + ",".join(f"{host}:{port}" for host, port in redis_cluster.startup_nodes)
    later = BudgetGuard(config(org={"daily_usd": "1000"}), redis_url=every_node,
                        clock=FrozenClock(datetime.now(UTC) + timedelta(seconds=61)))
    assert later.status("x").windows["org.daily"].reserved_usd == 0
    redis_cluster.restart(org_primary)


@pytest.mark.parametrize("url", ["redis+cluster://", "rediss+cluster://127.0.0.1:1/", "redis+cluster://127.0.0.1:1"])
def test_an_unreachable_cluster_is_a_clear_error(url):
    from budgetguard.errors import ConfigError
    from budgetguard.store import StoreUnavailable

    with pytest.raises((StoreUnavailable, ConfigError)):
        BudgetGuard(config(redis_timeout_ms=100), redis_url=url)


def _failing(g, script: str, part: str):
    """Make the guard's store fail one kind of call (as a node that does not answer would)."""
    from budgetguard.store import StoreUnavailable

    run = g._sync.run
    state = {"on": True}

    def failing(call):
        # Each part's call starts with its own request state: the user's or the org's hash tag.
        parts = "o" if "{org}" in call.keys[0] else "u"
        if state["on"] and call.script == script and parts == part:
            raise StoreUnavailable(f"budget store unavailable: {script} {part} (injected)")
        return run(call)

    g._sync.run = failing
    return state


def test_fail_open_after_the_org_part_failed_still_charges_both(cluster_url, clock):
    g = guard(cluster_url, clock, fail_mode="open", org={"daily_usd": "100"})
    org_down = _failing(g, "reserve", "o")
    d = g.check("alice", "gpt-4o", MSG, max_tokens=50)
    assert (d.allowed, d.enforced, d.limit) == (True, False, "store.unavailable")
    org_down["on"] = False
    usage = Usage(input_tokens=d.estimated_input_tokens, output_tokens=50)
    assert g.record(d, usage)
    w = g.status("alice").windows
    cost = Decimal(g._engine.cost_nano(d, usage)) / 10**9
    assert (w["user.daily"].spent_usd, w["org.daily"].spent_usd) == (cost, cost)
    assert (w["user.daily"].reserved_usd, w["org.daily"].reserved_usd) == (0, 0)


async def test_a_failed_give_back_is_a_denial_not_an_exception(cluster_url, clock):
    g = guard(cluster_url, clock, org={"daily_usd": "0.0001"})  # the org denies every request
    _failing(g, "settle", "u")
    assert g.check("alice", "gpt-4o", MSG, max_tokens=50).limit == "org.daily"
    d = await asyncio.wait_for(g.acheck("bob", "gpt-4o", MSG, max_tokens=50), 10)
    assert d.limit == "org.daily"



def test_an_org_settle_failure_keeps_the_users_charge_and_alerts(cluster_url, clock):
    g = guard(cluster_url, clock, tiers={"default": {"hourly_usd": "0.001", "alert_at": [0.1]}})
    alerts = []
    g._on_alert, g._alerting = [alerts.append], True
    d = g.check("alice", "gpt-4o", MSG, max_tokens=50)
    _failing(g, "settle", "o")
    usage = Usage(input_tokens=d.estimated_input_tokens, output_tokens=50)
    assert g.record(d, usage)  # applied: the user's part is charged
    g.flush(5)
    assert [(a.window, a.level) for a in alerts] == [("user.hourly", Decimal("0.1"))]
    assert g.status("alice").windows["user.hourly"].spent_usd == Decimal(g._engine.cost_nano(d, usage)) / 10**9


def test_a_failed_retry_leaves_the_originals_reservation(cluster_url, clock):
    e = estimate(cluster_url, clock)
    g = guard(cluster_url, clock, tiers={"default": {"hourly_usd": str(e * Decimal("1.5"))}})
    first = g.check("alice", "gpt-4o", MSG, max_tokens=50, request_id="req-1")
    _failing(g, "reserve", "o")
    retry = g.check("alice", "gpt-4o", MSG, max_tokens=50, request_id="req-1")
    assert retry.limit == "store.unavailable"
    assert g.status("alice").windows["user.hourly"].reserved_usd == first.estimated_cost_usd


def test_a_resent_org_part_stands_as_a_repeat_and_settles_clean(cluster_url, clock):
    """A cluster client resends a script whose reply it lost: the org part answers "repeat"."""
    g = guard(cluster_url, clock, org={"daily_usd": "100"})
    run = g._sync.run

    def resend(call):
        reply = run(call)
        if call.script == "reserve" and "{org}" in call.keys[0]:
            return run(call)  # the first reply was lost on its way back
        return reply

    g._sync.run = resend
    d = g.check("alice", "gpt-4o", MSG, max_tokens=50)
    g._sync.run = run
    assert d.allowed
    assert g.record(d, Usage(input_tokens=d.estimated_input_tokens, output_tokens=50)) is True
    w = g.status("alice").windows
    assert (w["user.daily"].reserved_usd, w["org.daily"].reserved_usd) == (0, 0)
    assert w["user.daily"].spent_usd == w["org.daily"].spent_usd > 0
