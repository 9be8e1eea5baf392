"""Prometheus metrics, the metrics and stats ASGI apps (over HTTP), and `budgetguard status` bars."""

from __future__ import annotations

import random
import re
import string
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from budgetguard import Usage
from budgetguard.metrics import Metrics, config_models, metrics_app, stats_app

from .eventgen import expected, make_event, nano, write_stream
from .helpers import MSG, PRICES, config, guard
from .reportcheck import cli


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_event_hooks_count_spend_exactly_and_tokens(clock):
    m = Metrics()
    event = make_event(ts=clock(), model="gpt-4o-mini", tier="free", input_tokens=100, cached=40, output_tokens=7,
                       reasoning=3)
    for _ in range(1000):
        m.observe_event({**event, "cost_usd": "0.000000001"})
    m.observe_event(make_event(ts=clock(), outcome="denied"))
    s = samples(m)
    # A float running sum of 1000 nano-dollars drifts; the exact sum converted once does not.
    assert s[("budgetguard_spend_usd_total", (("model", "gpt-4o-mini"), ("provider", "openai"), ("tier", "free")))] \
        == float(Decimal("0.000001"))
    assert s[("budgetguard_tokens_total", (("kind", "cached_input"), ("model", "gpt-4o-mini")))] == 40_000
    assert s[("budgetguard_tokens_total", (("kind", "reasoning"), ("model", "gpt-4o-mini")))] == 3_000
    assert s[("budgetguard_events_total", (("outcome", "ok"),))] == 1000
    assert s[("budgetguard_events_total", (("outcome", "denied"),))] == 1
    assert not [k for k in s if k[0] == "budgetguard_spend_usd_total" and ("model", "gpt-4o") in k[1]]


def test_redis_and_alert_hooks():
    m = Metrics()
    m.observe_redis("reserve", 0.002, True)
    m.observe_redis("reserve", 0.3, False)
    m.observe_alert("slack", "delivered")
    m.observe_alert("slack", "retried")
    m.observe_alert("slack", "delivered")
    s = samples(m)
    assert s[("budgetguard_redis_script_seconds_count", (("script", "reserve"),))] == 2
    assert s[("budgetguard_redis_script_seconds_bucket", (("le", "0.0025"), ("script", "reserve")))] == 1
    assert s[("budgetguard_redis_errors_total", (("script", "reserve"),))] == 1
    assert s[("budgetguard_alert_deliveries_total", (("outcome", "delivered"), ("sink", "slack")))] == 2


def test_instances_keep_their_own_registries():
    a, b = Metrics(), Metrics()
    a.observe_alert("pagerduty", "dropped")
    assert ("budgetguard_alert_deliveries_total", (("outcome", "dropped"), ("sink", "pagerduty"))) in samples(a)
    assert not [k for k in samples(b) if k[0] == "budgetguard_alert_deliveries_total"]


def test_decisions_of_a_real_guard_by_outcome_and_limit(real_redis, real_redis_url, clock):
    tier = {"hourly_usd": "0.01", "downgrade": {"at": "0.5", "routes": {"gpt-4o": "gpt-4o-mini"}}}
    g = guard(real_redis_url, clock, tiers={"pro": tier}, default_tier="pro")
    m = Metrics()
    allowed = g.check("u1", "gpt-4o", MSG, max_tokens=100)
    g.record(allowed, Usage(input_tokens=20, output_tokens=600))  # $0.00605 of $0.01: past the 50% mark
    routed = g.check("u1", "gpt-4o", MSG, max_tokens=100)
    denied = g.check("u1", "gpt-4o", MSG, max_tokens=100_000)
    down = guard("redis://127.0.0.1:1/0", clock, fail_mode="open", redis_timeout_ms=100)
    unenforced = down.check("u1", "gpt-4o", MSG, max_tokens=10)
    for d in (allowed, routed, denied, unenforced):
        m.observe_decision(d)
    g.close()
    down.close()
    assert (allowed.allowed, routed.downgraded, denied.allowed, unenforced.enforced) == (True, True, False, False)
    s = {k: v for k, v in samples(m).items() if k[0] == "budgetguard_decisions_total"}
    assert s == {
        ("budgetguard_decisions_total", (("limit", "none"), ("outcome", "allowed"))): 1,
        ("budgetguard_decisions_total", (("limit", "user.hourly"), ("outcome", "routed"))): 1,
        ("budgetguard_decisions_total", (("limit", denied.limit), ("outcome", "denied"))): 1,
        ("budgetguard_decisions_total", (("limit", "store.unavailable"), ("outcome", "unenforced"))): 1,
    }


async def test_metrics_app_mounted_in_starlette():
    m = Metrics()
    m.observe_alert("webhook", "delivered")
    app = Starlette(routes=[Route("/metrics", metrics_app(m))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
        assert 'budgetguard_alert_deliveries_total{outcome="delivered",sink="webhook"} 1.0' in r.text
        assert (await client.post("/metrics")).status_code == 405


async def test_stats_app_reports_recent_spend_utilization_and_health(real_redis, real_redis_url, clock):
    g = guard(real_redis_url, clock, org={"daily_usd": "400", "monthly_usd": "5000"})
    d = g.check("alice", "gpt-4o", MSG, max_tokens=100)
    g.record(d, Usage(input_tokens=1000, output_tokens=100))  # $0.0035 spent on the org's windows
    held = g.check("bob", "gpt-4o", MSG, max_tokens=1000)  # reserved, not spent
    recent = [make_event(ts=clock() - timedelta(minutes=10 * i), model=m) for i, m in
              enumerate(["gpt-4o", "gpt-4o-mini", "claude-3-5-haiku", "gemini-2.0-flash"] * 20)]
    old = [make_event(ts=clock() - timedelta(hours=25), model="gpt-4o")] * 5
    write_stream(real_redis, sorted(old + recent, key=lambda e: e["ts"]))
    app = Starlette(routes=[Mount("/stats", app=stats_app(g))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.get("/stats/")
    g.close()
    assert r.status_code == 200
    doc = r.json()
    assert doc["redis"]["healthy"] is True and doc["redis"]["ping_ms"] >= 0
    for by in ("provider", "model"):
        want = expected(recent, by)
        got = doc["spend"][f"by_{by}"]
        assert {k: nano(v["cost_usd"]) for k, v in got.items()} == {k: w["cost_nano"] for k, w in want.items()}
        assert {k: v["requests"] for k, v in got.items()} == {k: w["requests"] for k, w in want.items()}
    assert nano(doc["spend"]["cost_usd"]) == sum(nano(e["cost_usd"]) for e in recent)
    daily = doc["budget"]["org.daily"]
    assert (daily["spent_usd"], daily["limit_usd"]) == ("0.0035", "400.00")
    assert Decimal(daily["reserved_usd"]) == held.estimated_cost_usd > 0
    assert Decimal(daily["utilization"]) == round((Decimal("0.0035") + held.estimated_cost_usd) / 400, 6)
    assert set(doc["budget"]) == {"org.daily", "org.monthly"}


async def test_stats_app_answers_503_when_redis_is_down(clock):
    g = guard("redis://127.0.0.1:1/0", clock, redis_timeout_ms=100)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=stats_app(g)), base_url="http://test") as client:
        r = await client.get("/")
    g.close()
    assert r.status_code == 503
    doc = r.json()
    assert doc["redis"]["healthy"] is False and "ConnectionError" in doc["redis"]["error"]
    assert doc["spend"] is None and doc["budget"] is None


# -- `budgetguard status` ------------------------------------------------------------------

LIMITS = """\
redis_url: ${REDIS_URL}
models:
  gpt-4o: {input_per_mtok: 2.50, output_per_mtok: 10.00}
default_tier: pro
tiers:
  pro: {hourly_usd: 2, daily_usd: 10}
org: {daily_usd: 400}
"""


@pytest.fixture
def limits(tmp_path):
    path = tmp_path / "limits.yaml"
    path.write_text(LIMITS)
    return path


def test_status_bars_for_a_user_and_the_org(real_redis, real_redis_url, limits):
    from budgetguard import BudgetGuard

    g = BudgetGuard.from_yaml(limits, redis_url=real_redis_url)  # the wall clock, as the command uses
    d = g.check("alice", "gpt-4o", MSG, max_tokens=20_000)
    g.record(d, Usage(input_tokens=10, output_tokens=20_000))  # $0.200025
    g.check("alice", "gpt-4o", MSG, max_tokens=10_000)  # about $0.10 reserved
    g.close()
    env = {"REDIS_URL": real_redis_url}
    out = cli("status", "alice", "--config", str(limits), env=env)
    assert out.returncode == 0, out.stderr
    hourly = next(line for line in out.stdout.splitlines() if "user.hourly" in line)
    # $0.200025 of $2 spent = 3 of 30 cells, 0.30 with the reservation = 4 cells, 15%.
    assert re.search(r"spent\s+0\.200025\s+reserved\s+0\.1000\d*\s+limit\s+2\.00\s+\[###\+\.{26}\]\s+15%", hourly)
    assert re.search(r"user.monthly .* limit\s+no cap\s+resets", out.stdout)  # no cap, no bar
    assert "org.daily" in out.stdout and out.stdout.startswith("alice (tier pro)\n")

    out = cli("status", "--config", str(limits), env=env)
    assert out.returncode == 0, out.stderr
    assert "user." not in out.stdout and out.stdout.startswith("org\n")
    daily = next(line for line in out.stdout.splitlines() if "org.daily" in line)
    assert re.search(r"spent\s+0\.200025\s+reserved\s+0\.1000\d*\s+limit\s+400\.00\s+\[\.{30}\]\s+0%", daily)


def test_the_guard_feeds_its_metrics(backend_url, clock):
    from budgetguard import Usage
    from tests.helpers import MSG, guard

    g = guard(backend_url, clock, tiers={"default": {"hourly_usd": 1}})
    d = g.check("alice", "gpt-4o", MSG, max_tokens=10)
    g.record(d, Usage(input_tokens=100, output_tokens=100))
    g.check("alice", "gpt-4o", MSG, max_tokens=200_000)  # $2 worst case: over the hourly cap
    registry = g.metrics.registry
    assert registry.get_sample_value("budgetguard_decisions_total", {"outcome": "allowed", "limit": "none"}) == 1
    assert registry.get_sample_value("budgetguard_decisions_total",
                                     {"outcome": "denied", "limit": "user.hourly"}) == 1
    assert registry.get_sample_value("budgetguard_events_total", {"outcome": "ok"}) == 1
    assert registry.get_sample_value("budgetguard_events_total", {"outcome": "denied"}) == 1
    assert registry.get_sample_value("budgetguard_tokens_total", {"model": "gpt-4o", "kind": "output"}) == 100
    assert registry.get_sample_value("budgetguard_redis_script_seconds_count", {"script": "reserve"}) == 2
    assert registry.get_sample_value("budgetguard_redis_script_seconds_count", {"script": "settle"}) == 1
    g.close()


# -- bounded label sets ----------------------------------------------------------------------


def series(metrics: Metrics) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {key for key in samples(metrics) if not key[0].endswith("_created")}


def model_labels(metrics: Metrics) -> set[str]:
    return {dict(labels)["model"] for _, labels in series(metrics) if "model" in dict(labels)}


def test_random_model_names_share_one_label(clock):
    m = Metrics()
    known = make_event(ts=clock(), model="gpt-4o-mini", input_tokens=100, output_tokens=10)
    m.observe_event(known)
    before = series(m)
    rng = random.Random(7)
    for _ in range(3000):
        name = "model-" + "".join(rng.choices(string.ascii_lowercase + string.digits, k=40))
        m.observe_event({**known, "model": name, "requested_model": name})
    m.observe_event({**known, "model": "GPT-4o-Mini"})  # the library ignores case; so does the label
    body, _ = m.render()
    # Every unknown name is one "other" series per metric: a handful of new series, not 3,000 x 3.
    assert len(series(m) - before) <= 3
    assert model_labels(m) == {"gpt-4o-mini", "other"}
    assert len(body) < 8_000
    s = samples(m)
    assert s[("budgetguard_tokens_total", (("kind", "input"), ("model", "other")))] == 3000 * 100
    assert s[("budgetguard_tokens_total", (("kind", "input"), ("model", "gpt-4o-mini")))] == 2 * 100


def test_configured_models_keep_their_own_label(clock):
    cfg = config(models={**PRICES, "house-model": {"input_per_mtok": 1, "output_per_mtok": 2}},
                 tiers={"pro": {"models": ["house-model", "gpt-4o", "gpt-4o-mini"],
                                "downgrade": {"at": "0.5", "routes": {"gpt-4o": "gpt-4o-mini"}}}},
                 unknown_model="gpt-4o-mini")
    assert config_models(cfg) == {"gpt-4o", "gpt-4o-mini", "house-model"}
    event = make_event(ts=clock(), model="gpt-4o", input_tokens=100, output_tokens=10)
    m = Metrics()
    m.observe_event({**event, "model": "house-model"})
    assert model_labels(m) == {"other"}  # not in the library, and not told
    m.know_models(config_models(cfg))
    m.observe_event({**event, "model": "house-model"})
    assert model_labels(m) == {"other", "house-model"}
    assert Metrics(models=["house-model"]).model_label("house-model") == "house-model"
    assert m.model_label("HOUSE-MODEL") == "other"  # configured names are matched exactly


def test_a_guard_pricing_unknown_models_keeps_labels_bounded(clock):
    g = guard("memory://", clock, unknown_model="gpt-4o-mini", tiers={"default": {"hourly_usd": 1000}})
    rng = random.Random(11)
    for i in range(300):
        name = "x-" + "".join(rng.choices(string.ascii_lowercase, k=30))
        d = g.check(f"u{i % 7}", name, MSG, max_tokens=10)
        assert d.allowed and d.model == name  # priced as gpt-4o-mini and allowed
        g.record(d, Usage(input_tokens=10, output_tokens=5))
    d = g.check("u1", "gpt-4o", MSG, max_tokens=10)
    g.record(d, Usage(input_tokens=10, output_tokens=5))
    g.close()
    assert model_labels(g.metrics) == {"gpt-4o", "other"}
    assert g.metrics.registry.get_sample_value("budgetguard_tokens_total", {"model": "other", "kind": "output"}) \
        == 300 * 5


def test_odd_http_statuses_share_one_label():
    m = Metrics()
    for status in (200, 599, 600, 1234, 99, -1):
        m.observe_proxy("chat", status)
    statuses = {dict(labels)["status"] for name, labels in series(m) if name == "budgetguard_proxy_requests_total"}
    assert statuses == {"200", "599", "other"}
