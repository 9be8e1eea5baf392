"""Budgets changed while traffic runs: guard.admin (assign, override, grant, top up, reset, show)
and guard.reload, seen by every process's next check, on fakeredis, Redis and a Redis Cluster."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from budgetguard import InvalidArgument, InvalidArgumentType, Usage
from budgetguard.errors import ConfigError

from .helpers import MSG, PRICES, config, estimate, guard


@pytest.fixture
def backend_url(any_backend_url: str) -> str:
    return any_backend_url


def _budgets(one: Decimal) -> dict:
    return {"tenant": {"per": "tenant", "default_plan": "standard", "plans": {
        "standard": {"daily_usd": str(one * 2)},
        "enterprise": {"daily_usd": str(one * 5), "total_usd": str(one * 100)},
    }}, "prepaid": {"per": "account", "total_usd": str(one * 2)}}


def _spend(g, user: str, tenant: str, n: int = 1, dimension: str = "tenant"):
    out = []
    for _ in range(n):
        d = g.check(user, "gpt-4o", MSG, max_tokens=100, tags={dimension: tenant})
        if d.allowed:
            g.record(d, Usage(d.estimated_input_tokens, 100))
        out.append(d)
    return out


def test_an_assignment_in_one_process_applies_to_the_next_check_in_another(backend_url, clock):
    one = estimate(backend_url, clock, max_tokens=100)
    a = guard(backend_url, clock, budgets=_budgets(one))
    b = guard(backend_url, clock, budgets=_budgets(one))  # another process: its own engine and memory
    assert [d.allowed for d in _spend(b, "alice", "acme", 3)] == [True, True, False]
    assert b.budget_status("tenant", "acme").plan == "standard"
    change = a.admin.assign("tenant", "acme", "enterprise", by="ops@example.com")
    assert (change.before.plan, change.after.plan) == (None, "enterprise")
    # b last saw version 0: its next check finds the state stale, plans again, and is allowed.
    d = b.check("alice", "gpt-4o", MSG, max_tokens=100, tags={"tenant": "acme"})
    assert d.allowed and d.budgets == ("user", "tenant", "org")
    assert b.budget_status("tenant", "acme").windows["tenant.daily"].limit_usd == one * 5
    assert b.status("alice", tags={"tenant": "acme"}).windows["tenant.total"].limit_usd == one * 100
    # The call's own plan still wins over the assignment.
    pinned = b.check("alice", "gpt-4o", MSG, max_tokens=100, tags={"tenant": "acme"}, plans={"tenant": "standard"})
    assert not pinned.allowed and pinned.limit == "tenant.daily"
    a.admin.assign("tenant", "acme", None)
    assert b.budget_status("tenant", "acme").plan == "standard"
    for g in (a, b):
        g.close()


def test_overrides_grants_that_end_by_themselves_and_resets(backend_url, clock):
    one = estimate(backend_url, clock, max_tokens=100)
    g = guard(backend_url, clock, budgets=_budgets(one))
    other = guard(backend_url, clock, budgets=_budgets(one))
    _spend(g, "alice", "acme", 2)
    assert not other.check("bob", "gpt-4o", MSG, max_tokens=100, tags={"tenant": "acme"}).allowed
    g.admin.override("tenant", "acme", daily_usd=str(one * 3))
    assert [d.allowed for d in _spend(other, "bob", "acme", 2)] == [True, False]
    g.admin.override("tenant", "acme", daily_usd=None)  # back to the plan's
    assert other.budget_status("tenant", "acme").windows["tenant.daily"].limit_usd == one * 2

    until = clock.now + timedelta(hours=1)
    g.admin.grant("tenant", "acme", one * 2, "tenant.daily", until, by="oncall")
    assert other.budget_status("tenant", "acme").windows["tenant.daily"].limit_usd == one * 4
    assert [d.allowed for d in _spend(other, "bob", "acme", 2)] == [True, False]
    clock.advance(hours=1)
    # The grant ended by itself: no change was made, and every process sees the plan's cap.
    assert other.budget_status("tenant", "acme").windows["tenant.daily"].limit_usd == one * 2
    assert g.admin.show("tenant", "acme")["runtime"]["grants"] == []

    daily = other.budget_status("tenant", "acme").windows["tenant.daily"]
    assert daily.spent_usd == one * 4
    held = other.check("bob", "gpt-4o", MSG, max_tokens=100, tags={"tenant": "acme"})
    assert not held.allowed
    g.admin.reset("tenant", "acme", "daily")
    daily = other.budget_status("tenant", "acme").windows["tenant.daily"]
    assert daily.spent_usd == 0
    assert other.check("bob", "gpt-4o", MSG, max_tokens=100, tags={"tenant": "acme"}).allowed
    for x in (g, other):
        x.close()


def test_top_up_raises_a_prepaid_balance(backend_url, clock):
    one = estimate(backend_url, clock, max_tokens=100)
    g = guard(backend_url, clock, budgets=_budgets(one))
    assert [d.allowed for d in _spend(g, "alice", "initech", 3, "account")] == [True, True, False]
    clock.advance(days=3)  # a balance never resets
    denied = _spend(g, "alice", "initech", 1, "account")[0]
    assert denied.limit == "prepaid.total" and denied.retry_after is None
    g.admin.top_up("prepaid", "initech", one * 1)
    assert [d.allowed for d in _spend(g, "alice", "initech", 2, "account")] == [True, False]
    shown = g.admin.show("prepaid", "initech")
    assert shown["runtime"]["topup_usd"] == str(one.normalize())
    assert shown["windows"]["prepaid.total"].limit_usd == one * 3
    with pytest.raises(InvalidArgument, match="has no total_usd balance to top up"):
        g.admin.top_up("tenant", "initech", 5)
    g.close()


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda a, now: a.assign("team", "x", "gold"), InvalidArgument, "no budget named 'team'"),
    (lambda a, now: a.assign("tenant", "acme", "gold"), InvalidArgument, "'gold' is not a plan of budget 'tenant'"),
    (lambda a, now: a.assign("tenant", None, "standard"), InvalidArgument, "kept per tenant: name the value"),
    (lambda a, now: a.override("tenant", "acme", daily_usd="-1"), InvalidArgument, "between 0 and"),
    (lambda a, now: a.override("tenant", "acme", requests_per_minute=2.5), InvalidArgument, "whole number"),
    (lambda a, now: a.override("tenant", "acme", colour=3), InvalidArgument, "'colour' is not a window limit"),
    (lambda a, now: a.override("tenant", "acme"), InvalidArgument, "name at least one limit"),
    (lambda a, now: a.grant("tenant", "acme", 5, "daily", now - timedelta(seconds=1)), InvalidArgument,
     "is in the past"),
    (lambda a, now: a.grant("tenant", "acme", -5, "daily", now + timedelta(hours=1)), InvalidArgument,
     "between 0 and"),
    (lambda a, now: a.grant("tenant", "acme", 5, "rpm", now + timedelta(hours=1)), InvalidArgument,
     "not a money window"),
    (lambda a, now: a.grant("tenant", "acme", 5, "daily", "tomorrow"), InvalidArgumentType, "aware datetime"),
    (lambda a, now: a.top_up("prepaid", "acme", 0), InvalidArgument, r"more than \$0"),
    (lambda a, now: a.reset("tenant", "acme", "weekly"), InvalidArgument, "has no weekly window"),
    (lambda a, now: a.assign("tenant", 7, "standard"), InvalidArgumentType, "value must be a string"),
])
def test_bad_admin_input_is_refused_and_changes_nothing(backend_url, clock, call, error, message):
    one = estimate(backend_url, clock, max_tokens=100)
    events = []
    g = guard(backend_url, clock, budgets=_budgets(one))
    g._on_event.append(events.append)
    g._events_wanted = True
    before = g.admin.show("tenant", "acme")["runtime"]
    with pytest.raises(error, match=message):
        call(g.admin, clock.now)
    assert g.admin.show("tenant", "acme")["runtime"] == before
    g.flush()
    assert events == []
    g.close()


def test_every_change_is_an_audit_event(real_redis, real_redis_url, clock, tmp_path):
    one = estimate(real_redis_url, clock, max_tokens=100)
    path = tmp_path / "usage.jsonl"
    g = guard(real_redis_url, clock, budgets=_budgets(one), events={"jsonl_path": str(path)})
    g.admin.assign("tenant", "acme", "enterprise", by="ops@example.com")
    g.admin.override("tenant", "acme", daily_usd="7")
    g.flush()
    stream = [json.loads(fields[b"e"]) for _, fields in real_redis.xrange("bg:{org}:events")]
    stream = [e for e in stream if e["kind"] == "admin"]  # the estimate's probe logged a release
    assert [(e["kind"], e["outcome"], e["by"]) for e in stream] == [
        ("admin", "assign", "ops@example.com"), ("admin", "override", "api")]
    assert stream[0]["before"]["plan"] is None and stream[0]["after"]["plan"] == "enterprise"
    assert stream[1]["after"]["overrides"] == {"daily_usd": "7"}
    assert "tenant acme: override daily_usd=7" in stream[1]["reason"]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["outcome"] for e in lines] == ["assign", "override"]
    g.close()


async def test_async_twins(backend_url, clock):
    one = estimate(backend_url, clock, max_tokens=100)
    g = guard(backend_url, clock, budgets=_budgets(one))
    await g.admin.aassign("tenant", "acme", "enterprise")
    await g.admin.aoverride("tenant", "acme", requests_per_minute=2)
    shown = await g.admin.ashow("tenant", "acme")
    assert shown["plan"] == "enterprise" and shown["plan_source"] == "assigned"
    assert shown["windows"]["tenant.rpm"].limit == 2
    results = await asyncio.gather(*(g.acheck("u", "gpt-4o", MSG, max_tokens=10, tags={"tenant": "acme"})
                                     for _ in range(3)))
    assert sorted(d.allowed for d in results) == [False, True, True]
    assert {d.limit for d in results if not d.allowed} == {"tenant.rpm"}
    await g.aclose()


def test_reload_keeps_reservations_taken_before(backend_url, clock):
    one = estimate(backend_url, clock, max_tokens=100)
    g = guard(backend_url, clock, tiers={"default": {"daily_usd": str(one * 2)}})
    held = g.check("alice", "gpt-4o", MSG, max_tokens=100)
    assert held.allowed
    new = config(tiers={"default": {"daily_usd": str(one * 1)}}, budgets={"tenant": {
        "per": "tenant", "daily_usd": str(one * 10)}})
    g.reload(new)
    assert g.config is new
    st = g.status("alice").windows["user.daily"]
    assert (st.reserved_usd, st.limit_usd) == (one, one)
    assert not g.check("alice", "gpt-4o", MSG, max_tokens=100).allowed  # the new, lower cap
    assert g.record(held, Usage(held.estimated_input_tokens, 100)) is True  # taken before, settled after
    st = g.status("alice").windows["user.daily"]
    assert (st.spent_usd, st.reserved_usd) == (one, 0)
    d = g.check("bob", "gpt-4o", MSG, max_tokens=100, tags={"tenant": "acme"})
    assert d.budgets == ("user", "tenant", "org")
    with pytest.raises(ConfigError, match="key_prefix: cannot change while running"):
        g.reload(config(key_prefix="other"))
    with pytest.raises(InvalidArgumentType):
        g.reload({"tiers": {}})
    g.close()


# -- found by review: each of these failed before its fix -------------------------------------


def test_window_caps_never_leak_between_values_when_the_limits_cache_starts_over(backend_url, clock, monkeypatch):
    from budgetguard import policy

    monkeypatch.setattr(policy, "_CACHE_MAX", 8)  # start over often: freed Limits objects get reused ids
    g = guard(backend_url, clock, budgets={"tenant": {"per": "tenant", "daily_usd": 1000, "values": {
        f"t{i}": {"daily_usd": i + 1} for i in range(40)}}})
    for _ in range(2):
        for i in range(40):
            assert g.budget_status("tenant", f"t{i}").windows["tenant.daily"].limit_usd == i + 1, i
    g.close()


def test_a_retry_naming_other_budgets_is_another_request(backend_url, clock):
    g = guard(backend_url, clock, budgets={"tenant": {"per": "tenant", "max_concurrent": 1}})
    a = g.check("alice", "gpt-4o", MSG, max_tokens=10, tags={"tenant": "A"}, request_id="r1")
    assert g.check("bob", "gpt-4o", MSG, max_tokens=10, tags={"tenant": "B"}).allowed  # B's one slot taken
    if backend_url.startswith("redis+cluster"):
        # Part by part, the user's part is a repeat but B's has no reservation of it: the
        # retry is checked against B's own cap there, which is full.
        retry = g.check("alice", "gpt-4o", MSG, max_tokens=10, tags={"tenant": "B"}, request_id="r1")
        assert not retry.allowed and retry.limit == "tenant.concurrent"
    else:
        with pytest.raises(InvalidArgument, match="request_id is already in use"):
            g.check("alice", "gpt-4o", MSG, max_tokens=10, tags={"tenant": "B"}, request_id="r1")
    assert g.record(a, Usage(5, 5)) is True
    assert g.budget_status("tenant", "A").windows["tenant.concurrent"].reserved == 0
    g.close()


def test_a_retry_after_a_change_settles_what_the_original_took(backend_url, clock):
    g = guard(backend_url, clock, budgets={"tenant": {"per": "tenant", "max_concurrent": 5}})
    tags = {"tenant": "acme"}
    a = g.check("alice", "gpt-4o", MSG, max_tokens=10, tags=tags, request_id="r1")
    g.admin.override("tenant", "acme", requests_per_minute=100)  # the retry's windows differ
    again = g.check("alice", "gpt-4o", MSG, max_tokens=10, tags=tags, request_id="r1")
    assert again.allowed and "repeat" in again.reason
    assert g.record(again, Usage(5, 5)) is True
    assert g.record(a, Usage(5, 5)) is False  # one request, settled once
    assert g.budget_status("tenant", "acme").windows["tenant.concurrent"].reserved == 0
    g.close()


def test_org_windows_outside_the_slices_cannot_be_set_while_they_are_on(backend_url, clock):
    g = guard(backend_url, clock, org={"slice_usd": 1, "daily_usd": 100})
    with pytest.raises(InvalidArgument, match="org slices"):
        g.admin.override("org", None, hourly_usd=5)
    assert g.check("alice", "gpt-4o", MSG, max_tokens=10).allowed
    with pytest.raises(ConfigError, match=r"org\.slice_usd"):
        g.reload(config(org={"slice_usd": 2, "daily_usd": 100}))
    g.close()


def test_a_resent_change_applies_once(backend_url, clock):
    one = estimate(backend_url, clock, max_tokens=100)
    g = guard(backend_url, clock, budgets=_budgets(one))
    run = g._sync.run
    sent = []

    def twice(call):
        sent.append(call)
        reply = run(call)
        return run(call) if call.script == "admin" and call.args[1] == "topup" else reply

    g._sync.run = twice
    g.admin.top_up("prepaid", "acme", 5)
    g._sync.run = run
    assert g.admin.show("prepaid", "acme")["runtime"]["topup_usd"] == "5"
    g.close()


def test_another_process_s_change_is_read_before_validating(backend_url, clock):
    one = estimate(backend_url, clock, max_tokens=100)
    a = guard(backend_url, clock, budgets=_budgets(one))
    b = guard(backend_url, clock, budgets=_budgets(one))
    b.budget_status("tenant", "acme")  # b has seen the value without a balance
    a.admin.assign("tenant", "acme", "enterprise")  # whose plan has total_usd
    b.admin.top_up("tenant", "acme", 1)
    assert a.budget_status("tenant", "acme").windows["tenant.total"].limit_usd == one * 100 + 1
    with pytest.raises(InvalidArgument, match="no weekly window to raise"):
        b.admin.grant("tenant", "acme", 1, "weekly", clock.now + timedelta(hours=1))
    with pytest.raises(InvalidArgument, match="not a window of budget 'tenant'"):
        b.admin.grant("tenant", "acme", 1, "org.daily", clock.now + timedelta(hours=1))
    for g in (a, b):
        g.close()


@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "9" * 5000, "1e3", "0x10", " 5", "-3"])
def test_limits_must_be_plain_ascii_numbers(backend_url, clock, value):
    g = guard(backend_url, clock, budgets={"tenant": {"per": "tenant", "daily_usd": 1}})
    with pytest.raises(InvalidArgument, match="requests_per_minute"):
        g.admin.override("tenant", "acme", requests_per_minute=value)
    with pytest.raises(InvalidArgument, match="daily_usd"):
        g.admin.override("tenant", "acme", daily_usd=value)
    g.close()


def test_a_version_is_never_reused_after_redis_loses_the_state(real_redis, real_redis_url, clock):
    a = guard(real_redis_url, clock, budgets={"tenant": {"per": "tenant", "daily_usd": 1000}})
    b = guard(real_redis_url, clock, budgets={"tenant": {"per": "tenant", "daily_usd": 1000}})
    a.admin.override("tenant", "acme", daily_usd="0.000001")
    assert b.budget_status("tenant", "acme").windows["tenant.daily"].limit_usd == Decimal("0.000001")
    real_redis.delete("bg:{b:tenant:acme}:cfg")  # lost (a restart without persistence)
    a.admin.override("tenant", "acme", daily_usd="500")
    assert b.budget_status("tenant", "acme").windows["tenant.daily"].limit_usd == 500
    for g in (a, b):
        g.close()


def test_minute_counters_do_not_outlive_their_leases_by_a_day(real_redis, real_redis_url, clock):
    g = guard(real_redis_url, clock, budgets={"key": {"per": "api_key", "requests_per_minute": 5,
                                                      "total_usd": 100}})
    g.check("alice", "gpt-4o", MSG, max_tokens=10, tags={"api_key": "k"})
    ttl = real_redis.pttl("bg:{b:key:k}:q:202603141509")
    assert 0 < ttl <= (34 + 60 + 60) * 1000  # the minute's end, a lease's 60 s, a minute's margin
    assert real_redis.pttl("bg:{b:key:k}:leases") == -1  # leases on a balance never expire
    g.close()


# -- found by a second review ------------------------------------------------------------------


@pytest.fixture(params=["one script", "part by part"])
def split(request):
    return request.param == "part by part"


def _guard(clock, split, **overrides):
    import uuid

    g = guard(f"memory://{uuid.uuid4().hex}", clock, **overrides)
    g._engine.split = split  # what a Redis Cluster URL sets: every scope a call of its own
    return g


def test_calls_in_flight_are_counted_as_long_as_their_leases(split, clock, real_redis, real_redis_url):
    g = guard(real_redis_url, clock, tiers={"default": {"daily_usd": 5, "max_concurrent": 1}})
    g._engine.split = split
    g.check("alice", "gpt-4o", MSG, max_tokens=10)  # abandoned: never settled
    leases, counter = real_redis.pttl("bg:{u:alice}:leases"), real_redis.pttl("bg:{u:alice}:c")
    assert counter >= leases - 1000 and leases > 86_400_000  # read a moment apart; more than a day
    g.close()


def test_a_request_id_reused_after_its_lease_lapsed_holds_one_reservation(split, clock):
    g = _guard(clock, split, budgets={"pre": {"per": "account", "total_usd": 1}})
    tags = {"account": "a"}
    g.check("alice", "gpt-4o", MSG, max_tokens=10, tags=tags, request_id="r1")  # lapses unsettled
    clock.advance(seconds=61)
    again = g.check("alice", "gpt-4o", MSG, max_tokens=10, tags=tags, request_id="r1")
    assert again.allowed and "repeat" not in again.reason
    assert g.record(again, Usage(5, 5)) is True
    assert g.budget_status("pre", "a").windows["pre.total"].reserved_usd == 0
    assert g.status("alice").windows["user.daily"].reserved_usd == 0
    g.close()


def test_a_lost_reply_of_a_routed_reserve_is_settled_on_what_it_holds(split, clock):
    g = _guard(clock, split, fail_mode="open",
               tiers={"default": {"daily_usd": "0.01", "downgrade": {"at": 0.1, "routes": {"gpt-4o": "gpt-4o-mini"}}}})
    first = g.check("alice", "gpt-4o", MSG, max_tokens=100)
    g.record(first, Usage(100, 100))  # past 10%: the next reserve routes
    plan = g._engine.plan_check("alice", "gpt-4o", MSG, max_tokens=100)
    g._sync.drive(g._engine.check_steps(plan))  # the script ran and routed, but its reply was lost:
    lost = g._engine.unavailable(plan, TimeoutError())  # the caller went ahead unenforced, as asked
    assert lost.allowed and not lost.enforced and lost.model == "gpt-4o"
    assert g.record(lost, Usage(100, 100)) is True
    assert g.status("alice").windows["user.daily"].reserved_usd == 0
    g.close()


def test_lapsed_leases_never_push_a_part_to_a_worse_route(split, clock):
    models = {**PRICES, "nano": {"input_per_mtok": "0.05", "output_per_mtok": "0.20"}}
    g = _guard(clock, split, models=models,
               tiers={"default": {"daily_usd": "0.002", "downgrade": {"at": 0.5, "routes": {"gpt-4o": "gpt-4o-mini"}}}},
               budgets={"tenant": {"per": "tenant", "daily_usd": "0.0001"}},
               org={"daily_usd": "100", "downgrade": {"at": 0.99, "routes": {"gpt-4o": "nano"}}})
    tags = {"tenant": "acme"}
    g.record(g.check("alice", "gpt-4o", MSG, max_tokens=100), Usage(100, 100))  # alice past 50%
    g.check("bob", "gpt-4o-mini", MSG, max_tokens=100, tags=tags)  # abandoned
    clock.advance(seconds=61)  # its lease lapsed
    d = g.check("alice", "gpt-4o", MSG, max_tokens=100, tags=tags)
    assert d.model == "gpt-4o-mini" and "user.daily is at" in d.reason
    g.close()


def test_a_record_a_day_late_charges_no_minute_of_today(split, clock):
    g = _guard(clock, split, tiers={"default": {"requests_per_minute": 5, "tokens_per_minute": 100000}})
    d = g.check("alice", "gpt-4o", MSG, max_tokens=10)
    clock.advance(days=1, minutes=2)  # past the windows' grace: the record charges today's windows
    assert g.record(d, Usage(5, 5)) is True
    w = g.status("alice").windows
    assert (w["user.rpm"].used, w["user.tpm"].used) == (0, 0)
    assert w["user.daily"].spent_usd > 0  # late spend is still spend
    g.close()


def test_an_unreadable_budgets_field_still_counts_in_reports():
    from budgetguard.report import build_report

    from .eventgen import make_event

    events = [{**make_event(ts=datetime(2026, 3, 14, tzinfo=UTC)), "budgets": bad} for bad in ("x", 3, [1], None)]
    report = build_report(events, by="budget")
    assert report.totals.requests == 4 and report.skipped == 0
    assert [(key, totals.requests) for key, totals in report.groups] == [("(none)", 4)]
    assert build_report(events).totals.requests == 4


def test_grants_never_lift_a_cap_past_what_the_scripts_compare_exactly(clock):
    g = _guard(clock, False, budgets={"tenant": {"per": "tenant", "daily_usd": 9_000_000}})
    for _ in range(3):
        g.admin.grant("tenant", "acme", 9_000_000, "daily", clock.now + timedelta(hours=1))
    assert g.budget_status("tenant", "acme").windows["tenant.daily"].limit_usd == 9_000_000
    g.close()
