"""Budgets for any scope (DESIGN section 6): tenants, features, keys, models, every window kind.

Each test runs on embedded fakeredis, a real Redis and the real Redis Cluster the suite
starts, where each budget value is a hash slot of its own and a check runs part by part.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import yaml

from budgetguard import InvalidArgument, InvalidArgumentType, Usage
from budgetguard.decision import CountStatus, WindowStatus
from budgetguard.errors import ConfigError

from .helpers import MSG, PRICES, config, cost_usd, estimate, guard


@pytest.fixture
def backend_url(any_backend_url: str) -> str:
    return any_backend_url


TENANT = {"per": "tenant", "default_plan": "standard", "plans": {
    "standard": {"monthly_usd": "10"},
    "enterprise": {"monthly_usd": "1000", "requests_per_minute": 600},
}}


def _reserved(g, user, tags) -> dict[str, Decimal | int]:
    out: dict[str, Decimal | int] = {}
    for name, w in g.status(user, tags=tags).windows.items():
        out[name] = w.reserved_usd if isinstance(w, WindowStatus) else w.reserved
    return out


# -- config ----------------------------------------------------------------------------


@pytest.mark.parametrize(("budgets", "message"), [
    ({"org": {"daily_usd": 1}}, "budgets.org: 'org' is a built-in name"),
    ({"user": {"daily_usd": 1}}, "budgets.user: 'user' is a built-in name"),
    ({"Tenant": {"daily_usd": 1}}, "budgets.Tenant: a budget name is [a-z][a-z0-9_]{0,31}"),
    ({"t": {"per": "tenant", "plans": {"a": {"daily_usd": 1}}}}, "budgets.t.default_plan: required"),
    ({"t": {"per": "tenant", "default_plan": "b", "plans": {"a": {"daily_usd": 1}}}},
     "budgets.t.default_plan: 'b' is not a plan of the budget (plans: a)"),
    ({"t": {"per": "tenant", "default_plan": "a", "daily_usd": 2, "plans": {"a": {"daily_usd": 1}}}},
     "budgets.t.daily_usd: a budget with plans carries its limits in its plans"),
    ({"t": {"when": {"Feature!": "x"}, "daily_usd": 1}}, "budgets.t.when: Value error, 'Feature!' is not a dimension"),
    ({"t": {"per": "Tenant Id", "daily_usd": 1}}, "budgets.t.per: Value error, 'Tenant Id' is not a dimension"),
    ({"t": {"requests_per_minute": 1.5}}, "budgets.t.requests_per_minute"),
    ({"t": {"tokens_per_minute": "many"}}, "budgets.t.tokens_per_minute"),
    ({"t": {"max_concurrent": True}}, "budgets.t.max_concurrent"),
    ({"t": {"requests_per_minute": 0}}, "budgets.t.requests_per_minute"),
    ({"t": {"daily_usd": 1, "values": {"acme": {"daily_usd": 2}}}},
     "budgets.t.values: the budget has one shared set of counters"),
    ({"t": {"per": "tenant", "default_plan": "a", "plans": {"a": {}}, "values": {"acme": {"plan": "gold"}}}},
     "budgets.t.values.acme.plan: 'gold' is not a plan of the budget (plans: a)"),
    ({"t": {"default_plan": "a"}}, "budgets.t.default_plan: the budget has no plans"),
])
def test_a_bad_budgets_section_is_refused_with_its_path(budgets, message):
    with pytest.raises(ConfigError) as raised:
        config(budgets=budgets)
    assert message in str(raised.value)


def test_api_key_plans_must_name_a_plan_of_a_budget():
    key = {"sha256": "a" * 64, "user": "svc"}
    with pytest.raises(ConfigError, match=r"api_keys\.0\.plans\.tenant: 'gold' is not a plan of budget 'tenant'"):
        config(budgets={"tenant": TENANT}, api_keys=[{**key, "plans": {"tenant": "gold"}}])
    with pytest.raises(ConfigError, match=r"api_keys\.0\.plans\.team: no budget of that name has plans"):
        config(budgets={"tenant": TENANT}, api_keys=[{**key, "plans": {"team": "a"}}])
    config(budgets={"tenant": TENANT}, api_keys=[{**key, "plans": {"tenant": "enterprise"}}])


def test_org_slices_refuse_other_org_windows():
    with pytest.raises(ConfigError, match=r"org\.requests_per_minute: org slices"):
        config(org={"slice_usd": 1, "requests_per_minute": 10})


# -- all budgets, all or none -------------------------------------------------------------


def test_every_matching_budget_applies_and_a_denial_reserves_nothing_anywhere(backend_url, clock):
    one = estimate(backend_url, clock, max_tokens=100)
    g = guard(backend_url, clock, tiers={"default": {"daily_usd": str(one * 10)}},
              budgets={"tenant": {"per": "tenant", "monthly_usd": str(one * 3)},
                       "chat": {"when": {"feature": "chat"}, "daily_usd": str(one * 50)}},
              org={"daily_usd": str(one * 100)})
    tags = {"tenant": "acme", "feature": "chat"}
    held = [g.check(f"u{i}", "gpt-4o", MSG, max_tokens=100, tags=tags) for i in range(3)]
    assert all(d.allowed for d in held)
    assert held[0].budgets == ("user", "tenant", "chat", "org")
    denied = g.check("u9", "gpt-4o", MSG, max_tokens=100, tags=tags)
    assert not denied.allowed and denied.limit == "tenant.monthly"
    assert denied.retry_after == 60  # only calls in flight stand in the way
    reserved = _reserved(g, "u9", tags)
    assert reserved["user.daily"] == 0  # the denied user's windows: nothing
    assert reserved["tenant.monthly"] == reserved["chat.daily"] == reserved["org.daily"] == 3 * one
    # Another tenant has its own counters; a call without the feature is not in `chat`.
    other = g.check("u9", "gpt-4o", MSG, max_tokens=100, tags={"tenant": "globex"})
    assert other.allowed and other.budgets == ("user", "tenant", "org")
    untagged = g.check("u9", "gpt-4o", MSG, max_tokens=100)
    assert untagged.budgets == ("user", "org")  # no tenant tag: the per-tenant budget does not apply
    for d in held:
        assert g.record(d, Usage(d.estimated_input_tokens, 100)) is True
    spent = g.budget_status("tenant", "acme").windows["tenant.monthly"]
    assert (spent.spent_usd, spent.reserved_usd, spent.limit_usd) == (3 * one, 0, 3 * one)
    assert g.budget_status("chat").windows["chat.daily"].spent_usd == 3 * one
    g.close()


def test_plans_at_run_time_and_static_values(backend_url, clock):
    g = guard(backend_url, clock, budgets={"tenant": {**TENANT, "values": {
        "acme": {"plan": "enterprise", "monthly_usd": "5000"}}}})
    assert g.budget_status("tenant", "acme").windows["tenant.monthly"].limit_usd == 5000
    assert g.budget_status("tenant", "acme").plan == "enterprise"
    assert g.budget_status("tenant", "initech").windows["tenant.monthly"].limit_usd == 10
    assert g.budget_status("tenant", "initech", plan="enterprise").windows["tenant.monthly"].limit_usd == 1000
    st = g.status("alice", tags={"tenant": "initech"}, plans={"tenant": "enterprise"})
    assert st.windows["tenant.monthly"].limit_usd == 1000
    assert st.windows["tenant.rpm"] == CountStatus(0, 0, 600, datetime(2026, 3, 14, 15, 10, tzinfo=UTC), "requests")
    with pytest.raises(InvalidArgument, match="plan 'gold' is not a plan of budget 'tenant'"):
        g.check("alice", "gpt-4o", MSG, tags={"tenant": "initech"}, plans={"tenant": "gold"})
    with pytest.raises(InvalidArgument, match="no budget of that name has plans"):
        g.check("alice", "gpt-4o", MSG, plans={"team": "gold"})
    with pytest.raises(InvalidArgumentType, match="plans"):
        g.check("alice", "gpt-4o", MSG, plans={"tenant": 3})
    with pytest.raises(InvalidArgumentType, match="tags"):
        g.check("alice", "gpt-4o", MSG, tags={"tenant": 3})
    # None of those refused calls reserved anything.
    assert g.budget_status("tenant", "initech").windows["tenant.monthly"].reserved_usd == 0
    assert g.status("alice").windows["user.hourly"].reserved_usd == 0
    d = g.check("alice", "gpt-4o", MSG, max_tokens=10, tags={"tenant": "initech"}, plans={"tenant": "enterprise"})
    assert d.allowed
    assert g.budget_status("tenant", "initech").windows["tenant.monthly"].reserved_usd == d.estimated_cost_usd
    g.close()


def test_status_names_only_real_budgets(backend_url, clock):
    g = guard(backend_url, clock, budgets={"tenant": TENANT})
    with pytest.raises(InvalidArgument, match="no budget named 'team'"):
        g.budget_status("team", "x")
    with pytest.raises(InvalidArgument, match="kept per tenant: name the value"):
        g.budget_status("tenant")
    assert set(g.budget_status("org").windows) == {"org.daily", "org.monthly"}
    g.close()


# -- window kinds -----------------------------------------------------------------------


def test_requests_per_minute_resets_with_the_minute(backend_url, clock):
    g = guard(backend_url, clock, budgets={"key": {"per": "api_key", "requests_per_minute": 3}})
    tags = {"api_key": "k1"}
    for _ in range(3):
        d = g.check("alice", "gpt-4o", MSG, max_tokens=10, tags=tags)
        assert d.allowed
        g.record(d, Usage(5, 5))
    denied = g.check("alice", "gpt-4o", MSG, max_tokens=10, tags=tags)
    assert not denied.allowed and denied.limit == "key.rpm"
    assert denied.retry_after == 34  # 15:09:26 -> the minute ends at 15:10:00
    assert "key.rpm cap 3 requests would be exceeded" in denied.reason
    assert g.budget_status("key", "k1").windows["key.rpm"].used == 3
    clock.advance(seconds=34)
    assert g.check("alice", "gpt-4o", MSG, max_tokens=10, tags=tags).allowed
    g.close()


def test_tokens_per_minute_reserve_the_bound_and_settle_to_the_total(backend_url, clock):
    g = guard(backend_url, clock, tiers={"default": {"tokens_per_minute": 1000}})
    d = g.check("alice", "gpt-4o", MSG, max_tokens=400)
    assert d.allowed
    bound = d.estimated_input_tokens + 400
    w = g.status("alice").windows["user.tpm"]
    assert (w.used, w.reserved, w.limit, w.unit) == (0, bound, 1000, "tokens")
    second = g.check("alice", "gpt-4o", MSG, max_tokens=1000 - bound)
    assert not second.allowed and second.limit == "user.tpm"
    g.record(d, Usage(input_tokens=d.estimated_input_tokens, output_tokens=20))
    w = g.status("alice").windows["user.tpm"]
    assert (w.used, w.reserved) == (d.estimated_input_tokens + 20, 0)
    assert g.check("alice", "gpt-4o", MSG, max_tokens=400).allowed
    g.close()


def test_max_concurrent_counts_calls_in_flight(backend_url, clock):
    g = guard(backend_url, clock, budgets={"feature": {"per": "feature", "max_concurrent": 2}})
    tags = {"feature": "export"}
    a, b = (g.check("alice", "gpt-4o", MSG, max_tokens=10, tags=tags) for _ in range(2))
    assert a.allowed and b.allowed
    third = g.check("bob", "gpt-4o", MSG, max_tokens=10, tags=tags)
    assert not third.allowed and third.limit == "feature.concurrent" and third.retry_after == 1
    g.release(a)
    g.record(b, Usage(5, 5))
    w = g.budget_status("feature", "export").windows["feature.concurrent"]
    assert (w.used, w.reserved, w.limit, w.resets_at) == (0, 0, 2, None)
    assert g.check("bob", "gpt-4o", MSG, max_tokens=10, tags=tags).allowed
    g.close()


def test_a_prepaid_balance_never_resets(backend_url, clock):
    g = guard(backend_url, clock, budgets={"prepaid": {"per": "tenant", "total_usd": "0.01"}})
    tags = {"tenant": "acme"}
    d = g.check("alice", "gpt-4o", MSG, max_tokens=500, tags=tags)
    g.record(d, Usage(d.estimated_input_tokens, 500))
    clock.advance(days=40)
    denied = g.check("alice", "gpt-4o", MSG, max_tokens=500, tags=tags)
    assert not denied.allowed and denied.limit == "prepaid.total" and denied.retry_after is None
    w = g.budget_status("prepaid", "acme").windows["prepaid.total"]
    assert w.spent_usd == cost_usd("gpt-4o", d.estimated_input_tokens, 500) and w.resets_at is None
    g.close()


def test_weekly_windows_reset_on_monday(backend_url, clock):
    g = guard(backend_url, clock, timezone="Europe/Paris", org={"weekly_usd": "100"})
    w = g.status("alice").windows["org.weekly"]
    # Saturday 2026-03-14 16:09 in Paris: the ISO week ends at Monday 00:00 Paris (23:00 UTC Sunday).
    assert w.resets_at == datetime(2026, 3, 15, 23, tzinfo=UTC)
    d = g.check("alice", "gpt-4o", MSG, max_tokens=10)
    g.record(d, Usage(5, 5))
    assert g.status("alice").windows["org.weekly"].spent_usd == cost_usd("gpt-4o", 5, 5)
    clock.advance(days=2)
    assert g.status("alice").windows["org.weekly"].spent_usd == 0
    g.close()


# -- routing and alerts -------------------------------------------------------------------


def test_a_budget_downgrade_routes_and_names_its_window(backend_url, clock):
    one = estimate(backend_url, clock, max_tokens=100)
    g = guard(backend_url, clock, budgets={"deep_analysis": {
        "when": {"feature": "deep_analysis"}, "daily_usd": str(one * 10),
        "downgrade": {"at": "0.5", "routes": {"gpt-4o": "gpt-4o-mini"}}}})
    tags = {"feature": "deep_analysis"}
    for _ in range(5):
        d = g.check("alice", "gpt-4o", MSG, max_tokens=100, tags=tags)
        assert d.allowed and not d.downgraded
        g.record(d, Usage(d.estimated_input_tokens, 100))
    routed = g.check("alice", "gpt-4o", MSG, max_tokens=100, tags=tags)
    assert routed.allowed and routed.model == "gpt-4o-mini" and routed.limit == "deep_analysis.daily"
    assert "deep_analysis.daily is at 50%" in routed.reason
    # Other features are not in the budget, so not routed by it.
    assert g.check("alice", "gpt-4o", MSG, max_tokens=100, tags={"feature": "chat"}).model == "gpt-4o"
    g.close()


def test_budget_alerts_fire_once_and_name_the_value(backend_url, clock):
    one = estimate(backend_url, clock, max_tokens=100)
    seen = []
    g = guard(backend_url, clock, budgets={"tenant": {
        "per": "tenant", "daily_usd": str(one * 2), "alert_at": ["0.5"]}})
    g._on_alert.append(seen.append)
    g._alerting = True
    for _ in range(2):
        d = g.check("alice", "gpt-4o", MSG, max_tokens=100, tags={"tenant": "acme"})
        g.record(d, Usage(d.estimated_input_tokens, 100))
    denied = g.check("alice", "gpt-4o", MSG, max_tokens=100, tags={"tenant": "acme"})
    g.check("bob", "gpt-4o", MSG, max_tokens=100, tags={"tenant": "acme"})
    assert not denied.allowed
    g.flush()
    kinds = sorted((a.kind, a.window, a.scope, a.budget, a.value, str(a.level)) for a in seen)
    assert kinds == [("blocked", "tenant.daily", "budget", "tenant", "acme", "1"),
                     ("threshold", "tenant.daily", "budget", "tenant", "acme", "0.5")]
    assert seen[0].subject == "tenant acme"
    g.close()


# -- keys and hostile values --------------------------------------------------------------


def test_each_value_is_its_own_hash_tag(real_redis, real_redis_url, clock):
    g = guard(real_redis_url, clock, budgets={"tenant": {"per": "tenant", "daily_usd": "5"}})
    g.record(g.check("alice", "gpt-4o", MSG, max_tokens=10, tags={"tenant": "acme"}), Usage(5, 5))
    hostile = "a}b{c" + "x" * 5000
    g.record(g.check("alice", "gpt-4o", MSG, max_tokens=10, tags={"tenant": hostile}), Usage(5, 5))
    keys = sorted(k.decode() for k in real_redis.keys("bg:{b:tenant*"))
    assert "bg:{b:tenant:acme}:d:20260314" in keys
    hashed = [k for k in keys if k.startswith("bg:{b:tenant:#")]
    assert hashed and all(len(k) < 100 and k.count("{") == 1 for k in hashed)
    assert g.budget_status("tenant", hostile).windows["tenant.daily"].spent_usd == cost_usd("gpt-4o", 5, 5)
    g.close()


# -- concurrency ------------------------------------------------------------------------------


async def test_200_checks_from_13_users_of_one_tenant_allow_exactly_100(backend_url, clock):
    one = estimate(backend_url, clock, max_tokens=100)
    g = guard(backend_url, clock, budgets={"tenant": {"per": "tenant", "daily_usd": str(one * 100)}},
              redis_timeout_ms=10_000)
    start = asyncio.Event()

    async def call(i: int):
        await start.wait()
        return await g.acheck(f"user-{i % 13}", "gpt-4o", MSG, max_tokens=100, tags={"tenant": "acme"})

    tasks = [asyncio.create_task(call(i)) for i in range(200)]
    start.set()
    decisions = await asyncio.gather(*tasks)
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 100 and all(d.enforced for d in decisions)
    assert {d.limit for d in decisions if not d.allowed} == {"tenant.daily"}
    w = (await g.abudget_status("tenant", "acme")).windows["tenant.daily"]
    assert (w.spent_usd, w.reserved_usd) == (0, one * 100)
    for d in allowed:
        assert await g.arecord(d, Usage(d.estimated_input_tokens, 100))
    w = (await g.abudget_status("tenant", "acme")).windows["tenant.daily"]
    assert (w.spent_usd, w.reserved_usd) == (one * 100, 0)
    await g.aclose()


def test_threaded_checks_over_two_budgets_reserve_nothing_when_denied(backend_url, clock):
    one = estimate(backend_url, clock, max_tokens=100)
    # Tenants share a feature budget that fits 60; each tenant's own fits 40: 2 x 40 > 60.
    g = guard(backend_url, clock, budgets={"tenant": {"per": "tenant", "daily_usd": str(one * 40)},
                                           "feature": {"per": "feature", "daily_usd": str(one * 60)}},
              redis_max_connections=16, redis_timeout_ms=10_000)
    barrier = threading.Barrier(100)

    def call(i: int):
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=5)
        tags = {"tenant": "acme" if i % 2 else "globex", "feature": "chat"}
        return tags["tenant"], g.check(f"u{i % 13}", "gpt-4o", MSG, max_tokens=100, tags=tags)

    with ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(call, range(100)))
    allowed = [(t, d) for t, d in results if d.allowed]
    assert len(allowed) == 60
    per_tenant = {t: sum(1 for x, _ in allowed if x == t) for t in ("acme", "globex")}
    assert all(n <= 40 for n in per_tenant.values())
    # Every counter holds exactly what the allowed calls hold: the denied reserved nothing anywhere.
    for tenant, n in per_tenant.items():
        assert g.budget_status("tenant", tenant).windows["tenant.daily"].reserved_usd == n * one
    assert g.budget_status("feature", "chat").windows["feature.daily"].reserved_usd == 60 * one
    users = {f"u{i}" for i in range(13)}
    held_by_user = {u: sum(1 for _, d in allowed if d.user == u) for u in users}
    for u in users:
        assert g.status(u).windows["user.daily"].reserved_usd == held_by_user[u] * one
    g.close()


def test_a_caller_s_tag_never_stands_in_for_the_call_s_provider(backend_url, clock):
    g = guard(backend_url, clock, models={"in-house": {"input_per_mtok": 1, "output_per_mtok": 1},
                                          "gpt-4o": {"input_per_mtok": "2.50", "output_per_mtok": "10.00"}},
              budgets={"openai": {"when": {"provider": "openai"}, "daily_usd": 1}})
    d = g.check("alice", "in-house", MSG, max_tokens=10, tags={"provider": "openai"})
    assert d.budgets == ("user", "org")
    assert g.check("alice", "gpt-4o", MSG, max_tokens=10).budgets == ("user", "openai", "org")
    g.close()


def test_the_status_command_shows_every_budget_that_applies(real_redis, real_redis_url, tmp_path):
    from budgetguard import BudgetGuard

    from .reportcheck import cli

    limits = tmp_path / "limits.yaml"
    limits.write_text(yaml.safe_dump({"models": PRICES, "tiers": {"default": {"daily_usd": 5}},
                                      "budgets": {"tenant": {"per": "tenant", "default_plan": "standard", "plans": {
                                          "standard": {"monthly_usd": 100, "requests_per_minute": 60}}}},
                                      "org": {"daily_usd": 400}}))
    g = BudgetGuard.from_yaml(limits, redis_url=real_redis_url)
    g.check("alice", "gpt-4o", MSG, max_tokens=10, tags={"tenant": "acme"})
    g.close()
    env = {"REDIS_URL": real_redis_url}
    out = cli("status", "alice", "--tag", "tenant=acme", "--config", str(limits), env=env)
    assert out.returncode == 0, out.stderr
    heads = [line for line in out.stdout.splitlines() if not line.startswith(" ")]
    assert heads == ["alice (tier default)", "tenant acme (plan standard)", "org"]
    assert re.search(r"tenant\.rpm\s+used\s+0\s+reserved\s+1\s+limit\s+60\s+\[\.*\]\s+2%\s+resets .*\(requests\)",
                     out.stdout)
    out = cli("status", "--budget", "tenant", "--value", "acme", "--config", str(limits), env=env)
    assert out.returncode == 0 and out.stdout.startswith("tenant acme (plan standard)\n"), out.stderr
    out = cli("status", "--budget", "team", "--value", "x", "--config", str(limits), env=env)
    assert out.returncode != 0 and "no budget named 'team'" in out.stderr
    out = cli("status", "alice", "--tag", "tenant", "--config", str(limits), env=env)
    assert out.returncode != 0 and "--tag 'tenant': expected KEY=VALUE" in out.stderr


def test_report_by_budget_counts_each_call_in_every_budget_that_applied(backend_url, clock, tmp_path):
    from budgetguard.report import build_report

    path = tmp_path / "usage.jsonl"
    g = guard(backend_url, clock, events={"jsonl_path": str(path)},
              budgets={"tenant": {"per": "tenant", "daily_usd": 10}, "chat": {"when": {"feature": "chat"},
                                                                               "daily_usd": 10}})
    g.record(g.check("a", "gpt-4o", MSG, max_tokens=10, tags={"tenant": "acme", "feature": "chat"}), Usage(10, 10))
    g.record(g.check("b", "gpt-4o", MSG, max_tokens=10, tags={"tenant": "acme"}), Usage(10, 10))
    g.record(g.check("c", "gpt-4o", MSG, max_tokens=10), Usage(10, 10))
    g.admin.override("tenant", "acme", daily_usd=20)  # an audit event: neither spend nor malformed
    g.flush()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["budgets"] for e in events if e["kind"] == "usage"] == [
        ["user", "tenant", "chat", "org"], ["user", "tenant", "org"], ["user", "org"]]
    report = build_report(events, by="budget")
    requests = {key: totals.requests for key, totals in report.groups}
    assert requests == {"user": 3, "org": 3, "tenant": 2, "chat": 1}
    assert report.skipped == 0
    g.close()


def test_check_config_summarises_budgets():
    from budgetguard.cli import summarize

    text = summarize(config(budgets={
        "tenant": {"per": "tenant", "default_plan": "s", "values": {"acme": {"plan": "e"}},
                   "plans": {"s": {"monthly_usd": 200, "requests_per_minute": 600},
                             "e": {"tokens_per_minute": 2000000}}},
        "deep": {"when": {"feature": ["deep", "deeper"]}, "daily_usd": 50, "max_concurrent": 3}}))
    assert "budget     tenant: per tenant\n             plan s (default): monthly $200.0000, rpm 600\n" \
           "             plan e: tpm 2,000,000\n             1 values listed" in text
    assert "budget     deep: shared, when feature in deep, deeper: daily $50.0000, concurrent 3" in text
