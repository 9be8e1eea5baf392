"""Plans decided at run time: a call names the user's tier (``tier=``, ``plans={"user": ...}``),
from the library, the decorator, the middleware's ``identify`` and the proxy's ``api_keys``."""

from __future__ import annotations

import hashlib
import time
from decimal import Decimal
from typing import Any

import httpx
import pytest

from budgetguard import BudgetExceeded, ConfigError, InvalidArgument, Usage
from budgetguard.alerts.model import Alert
from budgetguard.asgi import BudgetMiddleware
from budgetguard.config import parse_config
from budgetguard.guard import BudgetGuard

from .helpers import MSG, PRICES, config, guard
from .test_proxy import Env
from .upstream import MESSAGES, MODELS

TIERS = {"free": {"hourly_usd": "0.01"}, "pro": {"hourly_usd": "1", "alert_at": [0.5]}}


def caps(g: BudgetGuard, user: str, **kwargs: Any) -> Decimal | None:
    return g.status(user, **kwargs).windows["user.hourly"].limit_usd


def test_the_calls_tier_decides_the_caps(backend_url, clock):
    g = guard(backend_url, clock, tiers=TIERS, default_tier="free")
    assert not g.check("alice", "gpt-4o", MSG, max_tokens=2000).allowed  # $0.02 > free's $0.01
    d = g.check("alice", "gpt-4o", MSG, max_tokens=2000, tier="pro")
    assert d.allowed and d.tier == "pro" and d.budgets == ("user", "org")
    assert g.check("alice", "gpt-4o", MSG, max_tokens=2000, plans={"user": "pro"}).tier == "pro"
    assert (caps(g, "alice"), caps(g, "alice", tier="pro")) == (Decimal("0.01"), Decimal(1))
    g.close()


def test_a_listed_users_overrides_apply_on_the_calls_tier(backend_url, clock):
    g = guard(backend_url, clock, tiers=TIERS, default_tier="free",
              users={"bob": {"tier": "free", "hourly_usd": "0.5"}})
    assert caps(g, "bob", tier="pro") == Decimal("0.5")  # his own cap, whatever the plan
    assert g.check("bob", "gpt-4o", MSG, max_tokens=2000, tier="pro").tier == "pro"
    g.close()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tier": "gold"}, "not a tier"),
    ({"plans": {"user": "gold"}}, "not a tier"),
    ({"plans": {"tenant": "big"}}, "no budget of that name"),
    ({"tier": "pro", "plans": {"user": "free"}}, "disagree"),
    ({"plans": ["pro"]}, "mapping"),
])
def test_a_bad_plan_is_refused_and_reserves_nothing(backend_url, clock, kwargs, message):
    g = guard(backend_url, clock, tiers=TIERS, default_tier="free")
    with pytest.raises((InvalidArgument, TypeError), match=message):
        g.check("alice", "gpt-4o", MSG, max_tokens=10, **kwargs)
    assert g.status("alice").windows["user.hourly"].reserved_usd == 0
    g.close()


def test_alerts_follow_the_calls_tier(backend_url, clock):
    seen: list[Alert] = []
    g = BudgetGuard(config(tiers=TIERS, default_tier="free"), redis_url=backend_url, clock=clock,
                    on_alert=seen.append)
    d = g.check("alice", "gpt-4o", MSG, max_tokens=10, tier="pro")
    g.record(d, Usage(input_tokens=200_000, output_tokens=0))  # $0.50: half of pro's hour
    assert g.flush()
    assert [(a.kind, a.window, a.level, a.tier) for a in seen] == [("threshold", "user.hourly", Decimal("0.5"),
                                                                    "pro")]
    g.close()


def test_the_decorator_takes_the_tier_from_the_call(backend_url, clock):
    g = guard(backend_url, clock, tiers=TIERS, default_tier="free")

    @g.limit(user=lambda a: a["user"], tier=lambda a: a["plan"])
    def ask(*, user: str, plan: str, model: str, messages: list[Any], max_tokens: int = 2000) -> dict[str, Any]:
        return {"usage": {"prompt_tokens": 10, "completion_tokens": 5}}

    ask(user="alice", plan="pro", model="gpt-4o", messages=MSG)
    with pytest.raises(BudgetExceeded) as caught:
        ask(user="alice", plan="free", model="gpt-4o", messages=MSG)
    assert caught.value.decision.limit == "user.hourly"
    g.close()


def test_identify_may_name_the_users_plan(upstream_server, real_redis, real_redis_url, clock):
    srv, switch = upstream_server
    g = BudgetGuard(config(models=MODELS, tiers=TIERS, default_tier="free"), redis_url=real_redis_url, clock=clock)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        from starlette.requests import Request
        from starlette.responses import JSONResponse

        await Request(scope, receive).body()
        await JSONResponse({"usage": {"prompt_tokens": 10, "completion_tokens": 5}})(scope, receive, send)

    plan = {"alice": "pro", "carol": "free"}
    switch.app = BudgetMiddleware(app, guard=g, identify=lambda r: (r.headers["x-user"], {"user": plan[r.headers[
        "x-user"]]}))
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 2000}
    with httpx.Client(timeout=30) as http:
        pro = http.post(f"{srv.url}/v1/chat/completions", json=body, headers={"x-user": "alice"})
        free = http.post(f"{srv.url}/v1/chat/completions", json=body, headers={"x-user": "carol"})
    assert (pro.status_code, free.status_code) == (200, 429)
    switch.close_guard(g)


def test_an_api_key_carries_plans_and_tags(upstream_server, real_redis, real_redis_url, clock):
    key = "bg-pro-key-0001"
    env = Env(upstream_server, real_redis_url, clock)
    try:
        env.start(guard_overrides={"tiers": TIERS, "default_tier": "free", "api_keys": [
            {"sha256": hashlib.sha256(key.encode()).hexdigest(), "user": "dora", "name": "dora-ci",
             "plans": {"user": "pro"}, "tags": {"tenant": "acme"}}]})
        env.openai(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2000)
        env.settled("dora")
        deadline = time.monotonic() + 10
        while not env.events and time.monotonic() < deadline:
            time.sleep(0.01)
        event = env.events[0]
        assert (event["tier"], event["tags"]) == ("pro", {"tenant": "acme", "api_key": "dora-ci"})
    finally:
        env.close()


@pytest.mark.parametrize(("entry", "message"), [
    ({"plans": {"user": "gold"}}, "api_keys.0.plans.user"),
    ({"plans": {"tenant": "big"}}, "api_keys.0.plans.tenant"),
    ({"tags": {"api_key": "x"}}, "api_keys.0.tags.api_key"),
])
def test_bad_key_plans_are_config_errors(entry, message):
    data = {"models": dict(PRICES), "tiers": TIERS,
            "api_keys": [{"sha256": "0" * 64, "user": "u", **entry}]}
    with pytest.raises(ConfigError, match=message):
        parse_config(data, env={})
