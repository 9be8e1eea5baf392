"""The budget engine end to end, on embedded fakeredis and on a real Redis."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from budgetguard import BudgetExceeded, InvalidArgument, InvalidArgumentType, Usage
from budgetguard.config import parse_config
from budgetguard.guard import BudgetGuard

from .helpers import MSG, config, cost_usd, estimate_usd, guard, more_budgets  # noqa: F401

# Each test runs over two budgets and over four (helpers.more_budgets).
pytestmark = pytest.mark.usefixtures("more_budgets")


@pytest.fixture
def backend_url(any_backend_url: str) -> str:
    """These tests also run on a Redis Cluster, where checks and settles run per hash slot."""
    return any_backend_url



def test_allow_record_and_status_to_the_nano_dollar(backend_url, clock):
    g = guard(backend_url, clock, tiers={"default": {"hourly_usd": "1.00"}})
    d = g.check("alice", "gpt-4o", MSG, max_tokens=200)
    assert d.allowed and d.limit is None and not d.downgraded
    assert d.estimated_cost_usd == estimate_usd("gpt-4o", d.estimated_input_tokens, 200)
    st = g.status("alice").windows["user.hourly"]
    assert (st.spent_usd, st.reserved_usd, st.limit_usd) == (0, d.estimated_cost_usd, Decimal("1.00"))

    usage = Usage(input_tokens=1234, output_tokens=77, cached_input_tokens=1000)
    assert g.record(d, usage) is True
    expected = cost_usd("gpt-4o", 1234, 77, cached=1000)
    for name in ("user.hourly", "user.daily", "user.monthly", "org.daily", "org.monthly"):
        w = g.status("alice").windows[name]
        assert (w.spent_usd, w.reserved_usd) == (expected, 0), name
    assert g.status("alice").windows["user.hourly"].resets_at == datetime(2026, 3, 14, 16, tzinfo=UTC)


def test_record_and_release_apply_once(backend_url, clock):
    g = guard(backend_url, clock)
    d = g.check("alice", "gpt-4o", MSG, max_tokens=100)
    usage = Usage(input_tokens=10, output_tokens=10)
    assert g.record(d, usage) is True
    assert g.record(d, usage) is False
    assert g.release(d) is False
    assert g.status("alice").windows["user.daily"].spent_usd == cost_usd("gpt-4o", 10, 10)

    d2 = g.check("alice", "gpt-4o", MSG, max_tokens=100)
    assert g.release(d2) is True
    assert g.release(d2) is False
    assert g.record(d2, usage) is False
    w = g.status("alice").windows["user.daily"]
    assert (w.spent_usd, w.reserved_usd) == (cost_usd("gpt-4o", 10, 10), 0)


def test_denial_names_window_and_retry_after(backend_url, clock):
    g = guard(backend_url, clock, tiers={"default": {"hourly_usd": "0.01", "monthly_usd": "100"}})
    first = g.check("u1", "gpt-4o", MSG, max_tokens=600)  # ~$0.006
    assert first.allowed
    d = g.check("u1", "gpt-4o", MSG, max_tokens=600)
    assert not d.allowed and d.limit == "user.hourly"
    # Only the first call, in flight, stands in the way: it settles when it ends, or its lease
    # lapses within reservation_ttl_s (60 s here); the hour's reset is no wait to name.
    assert d.retry_after == 60
    assert "user.hourly" in d.reason
    # Nothing was reserved for the denied request.
    assert g.status("u1").windows["user.hourly"].reserved_usd == first.estimated_cost_usd
    g.record(first, Usage(first.estimated_input_tokens, 600))  # now spent, not in flight
    d = g.check("u1", "gpt-4o", MSG, max_tokens=600)
    # 15:09:26 -> the hour resets at 16:00:00.
    assert d.limit == "user.hourly" and d.retry_after == 50 * 60 + 34


def test_retry_after_is_none_when_waiting_cannot_help(backend_url, clock):
    g = guard(backend_url, clock, tiers={"default": {"daily_usd": "0.001"}})
    d = g.check("u1", "gpt-4o", MSG, max_tokens=1000)  # $0.01 > the whole daily cap
    assert not d.allowed and d.limit == "user.daily" and d.retry_after is None


def test_blocking_window_that_resets_last_is_reported(backend_url, clock):
    g = guard(backend_url, clock, tiers={"default": {"hourly_usd": "0.008", "monthly_usd": "0.008"}})
    first = g.check("u1", "gpt-4o", MSG, max_tokens=600)
    g.record(first, Usage(first.estimated_input_tokens, 600))
    d = g.check("u1", "gpt-4o", MSG, max_tokens=600)
    assert d.limit == "user.monthly"
    assert d.retry_after == math.ceil((datetime(2026, 4, 1, tzinfo=UTC) - clock.now).total_seconds())


def test_all_or_nothing_when_the_org_blocks(backend_url, clock):
    g = guard(backend_url, clock, tiers={"default": {"hourly_usd": "5"}}, org={"daily_usd": "0.009"})
    assert g.check("a", "gpt-4o", MSG, max_tokens=600).allowed
    d = g.check("b", "gpt-4o", MSG, max_tokens=600)
    assert not d.allowed and d.limit == "org.daily"
    for name in ("user.hourly", "user.daily", "user.monthly"):
        assert g.status("b").windows[name].reserved_usd == 0


def test_expired_lease_stops_counting_and_late_record_still_charges(backend_url, clock):
    g = guard(backend_url, clock, tiers={"default": {"hourly_usd": "0.01"}})
    d = g.check("u1", "gpt-4o", MSG, max_tokens=800)
    assert not g.check("u1", "gpt-4o", MSG, max_tokens=800).allowed
    clock.advance(seconds=61)  # reservation_ttl_s is 60 in the test config
    assert g.status("u1").windows["user.hourly"].reserved_usd == 0
    assert g.check("u1", "gpt-4o-mini", MSG, max_tokens=10).allowed
    assert g.record(d, Usage(input_tokens=100, output_tokens=100)) is True
    w = g.status("u1").windows["user.hourly"]
    assert w.spent_usd == cost_usd("gpt-4o", 100, 100)
    assert g.record(d, Usage(input_tokens=100, output_tokens=100)) is False


def test_request_id_makes_check_idempotent(backend_url, clock):
    g = guard(backend_url, clock)
    d1 = g.check("u1", "gpt-4o", MSG, max_tokens=100, request_id="req-42")
    d2 = g.check("u1", "gpt-4o", MSG, max_tokens=100, request_id="req-42")
    assert d1.allowed and d2.allowed and d1.reservation_id == d2.reservation_id
    assert g.status("u1").windows["user.daily"].reserved_usd == d1.estimated_cost_usd
    assert g.record(d2, Usage(input_tokens=5, output_tokens=5)) is True
    assert g.record(d1, Usage(input_tokens=5, output_tokens=5)) is False
    # Once settled, the same id is a new attempt (a retry after a failed call): it
    # reserves afresh and its record counts.
    d3 = g.check("u1", "gpt-4o", MSG, max_tokens=100, request_id="req-42")
    assert d3.allowed and d3.reason == "allowed"
    assert g.status("u1").windows["user.daily"].reserved_usd == d3.estimated_cost_usd
    assert g.record(d3, Usage(input_tokens=5, output_tokens=5)) is True
    w = g.status("u1").windows["user.daily"]
    assert (w.spent_usd, w.reserved_usd) == (2 * cost_usd("gpt-4o", 5, 5), 0)


def test_retry_after_release_with_the_same_request_id_is_charged(backend_url, clock):
    g = guard(backend_url, clock)
    first = g.check("u1", "gpt-4o", MSG, max_tokens=100, request_id="idem-1")
    assert g.release(first) is True  # the provider failed
    retry = g.check("u1", "gpt-4o", MSG, max_tokens=100, request_id="idem-1")
    assert retry.allowed and g.record(retry, Usage(input_tokens=50, output_tokens=50)) is True
    assert g.status("u1").windows["user.daily"].spent_usd == cost_usd("gpt-4o", 50, 50)


def test_request_ids_are_scoped_to_the_user(backend_url, clock):
    g = guard(backend_url, clock)
    a = g.check("alice", "gpt-4o", MSG, max_tokens=100, request_id="req-1")
    b = g.check("bob", "gpt-4o", MSG, max_tokens=100, request_id="req-1")
    assert a.reservation_id != b.reservation_id
    assert g.status("alice").windows["org.daily"].reserved_usd == a.estimated_cost_usd + b.estimated_cost_usd
    assert g.release(a) and g.release(b)
    assert g.status("alice").windows["org.daily"].reserved_usd == 0


def test_repeated_check_across_an_hour_settles_the_original(backend_url, clock):
    clock.now = clock.now.replace(minute=59, second=59)
    g = guard(backend_url, clock)
    d1 = g.check("u1", "gpt-4o", MSG, max_tokens=100, request_id="r")
    clock.advance(seconds=2)  # the retry lands in the next hour
    d2 = g.check("u1", "gpt-4o", MSG, max_tokens=100, request_id="r")
    assert d2.reservation_id == d1.reservation_id
    assert g.record(d2, Usage(input_tokens=10, output_tokens=10)) is True
    w = g.status("u1").windows["user.daily"]
    assert (w.spent_usd, w.reserved_usd) == (cost_usd("gpt-4o", 10, 10), 0)


def test_downgrade_when_utilization_reaches_at(backend_url, clock):
    g = guard(backend_url, clock, tiers={"default": {
        "hourly_usd": "0.10", "downgrade": {"at": "0.8", "routes": {"gpt-4o": "gpt-4o-mini"}}}})
    first = g.check("u1", "gpt-4o", MSG, max_tokens=100)
    g.record(first, Usage(input_tokens=8_000, output_tokens=6_000))  # $0.08 = 80%
    d = g.check("u1", "gpt-4o", MSG, max_tokens=100)
    assert d.allowed and d.downgraded and d.model == "gpt-4o-mini" and d.requested_model == "gpt-4o"
    assert d.limit == "user.hourly" and "80%" in d.reason
    assert d.estimated_cost_usd == estimate_usd("gpt-4o-mini", d.estimated_input_tokens, 100)


def test_route_when_only_the_cheaper_model_fits(backend_url, clock):
    g = guard(backend_url, clock, tiers={"default": {
        "hourly_usd": "0.02", "downgrade": {"at": "1", "routes": {"gpt-4o": "gpt-4o-mini"}}}})
    g.record(g.check("u1", "gpt-4o", MSG, max_tokens=10), Usage(input_tokens=4000, output_tokens=0))  # $0.01
    d = g.check("u1", "gpt-4o", MSG, max_tokens=2000)  # $0.02 would not fit; mini ($0.0012) does
    assert d.allowed and d.model == "gpt-4o-mini" and d.limit == "user.hourly"
    # Too big even routed: denied.
    d = g.check("u1", "gpt-4o", MSG, max_tokens=100_000)
    assert not d.allowed and d.limit == "user.hourly"


def test_org_downgrade_routes(backend_url, clock):
    g = guard(backend_url, clock, org={"daily_usd": "0.10",
                                        "downgrade": {"at": "0.5", "routes": {"gpt-4o": "gpt-4o-mini"}}})
    g.record(g.check("a", "gpt-4o", MSG, max_tokens=10), Usage(input_tokens=20_000, output_tokens=0))  # 50%
    d = g.check("b", "gpt-4o", MSG, max_tokens=100)
    assert d.model == "gpt-4o-mini" and d.limit == "org.daily"


def test_org_route_applies_when_the_tier_routes_the_same_model(backend_url, clock):
    route = {"routes": {"gpt-4o": "gpt-4o-mini"}}
    g = guard(backend_url, clock, tiers={"default": {"hourly_usd": "10", "downgrade": {"at": "0.8", **route}}},
              org={"daily_usd": "0.10", "downgrade": {"at": "0.5", **route}})
    g.record(g.check("a", "gpt-4o", MSG, max_tokens=10), Usage(input_tokens=20_000, output_tokens=0))  # org 50%
    d = g.check("b", "gpt-4o", MSG, max_tokens=100)
    assert d.model == "gpt-4o-mini" and d.limit == "org.daily"


def test_record_needs_usage_and_an_allowed_decision(backend_url, clock):
    g = guard(backend_url, clock, tiers={"default": {"models": ["gpt-4o-mini"]}})
    d = g.check("u1", "gpt-4o-mini", MSG, max_tokens=10)
    with pytest.raises(ValueError, match="got NoneType"):
        g.record(d, None)
    denied = g.check("u1", "gpt-4o", MSG, max_tokens=10)
    with pytest.raises(ValueError, match="denied decision"):
        g.record(denied, Usage(input_tokens=1, output_tokens=1))
    assert g.release(denied) is False
    w = g.status("u1").windows["user.daily"]
    assert (w.spent_usd, w.reserved_usd) == (0, d.estimated_cost_usd)


def test_retry_after_in_a_dst_timezone(backend_url):
    from zoneinfo import ZoneInfo

    from .conftest import FrozenClock

    paris = ZoneInfo("Europe/Paris")
    # 2026-10-25 02:30 CET (second pass, after clocks went back): the day has 25 hours.
    clock = FrozenClock(datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=paris))
    g = guard(backend_url, clock, timezone="Europe/Paris",
              tiers={"default": {"hourly_usd": "0.008", "daily_usd": "0.008"}})
    first = g.check("u1", "gpt-4o", MSG, max_tokens=600)
    g.record(first, Usage(first.estimated_input_tokens, 600))
    d = g.check("u1", "gpt-4o", MSG, max_tokens=600)
    assert d.limit == "user.daily"
    assert d.retry_after == 21 * 3600 + 30 * 60  # until midnight local, 21.5 real hours away
    d = g.check("u1", "gpt-4o", MSG, max_tokens=10**6)
    assert d.retry_after is None  # bigger than a whole window: waiting cannot help


def test_per_request_caps(backend_url, clock):
    g = guard(backend_url, clock, tiers={"default": {
        "per_request": {"max_input_tokens": 50, "max_output_tokens": 500, "max_cost_usd": "0.002"},
        "downgrade": {"routes": {"gpt-4o": "gpt-4o-mini"}}}})
    d = g.check("u1", "gpt-4o", MSG, max_tokens=501)
    assert not d.allowed and d.limit == "request.max_output_tokens" and d.retry_after is None
    d = g.check("u1", "gpt-4o", [{"role": "user", "content": "word " * 200}], max_tokens=10)
    assert not d.allowed and d.limit == "request.max_input_tokens"
    d = g.check("u1", "gpt-4o", MSG, max_tokens=400)  # $0.004 > $0.002, mini fits
    assert d.allowed and d.model == "gpt-4o-mini" and d.limit == "request.max_cost"
    g.release(d)
    g2 = guard(backend_url, clock, tiers={"default": {"per_request": {"max_cost_usd": "0.0001"}}})
    d = g2.check("u1", "gpt-4o", MSG, max_tokens=400)
    assert not d.allowed and d.limit == "request.max_cost" and d.retry_after is None
    assert g.status("u1").windows["user.daily"].reserved_usd == 0


def test_allow_list_and_unknown_models(backend_url, clock):
    g = guard(backend_url, clock, tiers={"default": {"models": ["gpt-4o-mini"]}})
    d = g.check("u1", "gpt-4o", MSG, max_tokens=10)
    assert not d.allowed and d.limit == "model.not_allowed"
    g = guard(backend_url, clock)
    d = g.check("u1", "no-such-model-xyz", MSG, max_tokens=10)
    assert not d.allowed and d.limit == "model.unknown_price"
    g = guard(backend_url, clock, unknown_model="gpt-4o")
    d = g.check("u1", "no-such-model-xyz", MSG, max_tokens=10)
    assert d.allowed and d.model == "no-such-model-xyz"
    assert d.estimated_cost_usd == estimate_usd("gpt-4o", d.estimated_input_tokens, 10)


def test_calendar_windows_roll_over(backend_url, clock):
    g = guard(backend_url, clock, tiers={"default": {"hourly_usd": "0.01"}})
    g.record(g.check("u1", "gpt-4o", MSG, max_tokens=10), Usage(input_tokens=4000, output_tokens=0))
    assert not g.check("u1", "gpt-4o", MSG, max_tokens=600).allowed
    clock.advance(hours=1)
    st = g.status("u1")
    assert st.windows["user.hourly"].spent_usd == 0
    assert st.windows["user.daily"].spent_usd == Decimal("0.01")
    assert g.check("u1", "gpt-4o", MSG, max_tokens=600).allowed


def test_timezone_day_window(backend_url, clock):
    clock.now = datetime(2026, 3, 14, 18, 0, tzinfo=UTC)  # 23:30 in Kolkata (UTC+5:30)
    g = guard(backend_url, clock, timezone="Asia/Kolkata", tiers={"default": {"daily_usd": "0.01"}})
    g.record(g.check("u1", "gpt-4o", MSG, max_tokens=10), Usage(input_tokens=4000, output_tokens=0))
    d = g.check("u1", "gpt-4o", MSG, max_tokens=600)
    assert d.limit == "user.daily" and d.retry_after == 30 * 60
    clock.advance(minutes=30)
    assert g.check("u1", "gpt-4o", MSG, max_tokens=600).allowed


@pytest.mark.parametrize("odd", ["a:b", "x}{y", "{org}", "é" * 5000, "a" * 10_240, "a|b", " spaced id "])
def test_user_ids_are_data(backend_url, clock, odd):
    g = guard(backend_url, clock, tiers={"default": {"hourly_usd": "0.01"}})
    g.record(g.check(odd, "gpt-4o", MSG, max_tokens=10), Usage(input_tokens=4000, output_tokens=0))
    assert not g.check(odd, "gpt-4o", MSG, max_tokens=600).allowed
    assert g.check("a", "gpt-4o", MSG, max_tokens=600).allowed  # nobody else is charged
    assert g.status(odd).windows["user.hourly"].spent_usd == Decimal("0.01")


def test_zero_priced_model(backend_url, clock):
    models = {"free-model": {"input_per_mtok": 0, "output_per_mtok": 0}}
    g = BudgetGuard(parse_config({"models": models, "tiers": {"default": {"hourly_usd": 0}}}, env={}),
                    redis_url=backend_url, clock=clock)
    d = g.check("u1", "free-model", MSG, max_tokens=10)
    assert d.allowed and d.estimated_cost_usd == 0
    clock.advance(seconds=601)  # the zero-amount lease expires and is swept cleanly
    assert g.release(d) is True
    assert g.status("u1").windows["user.hourly"].reserved_usd == 0


BAD_CALLS = [
    ({"user": ""}, InvalidArgument, "user must not be empty"),
    ({"user": 42}, InvalidArgumentType, "user must be a string"),
    ({"max_tokens": -5}, InvalidArgument, "max_tokens must be >= 1"),
    ({"max_tokens": 10**9}, InvalidArgument, "absurd"),
    ({"max_tokens": "5"}, InvalidArgumentType, "max_tokens must be an int"),
    ({"max_tokens": True}, InvalidArgumentType, "max_tokens must be an int"),
    ({"messages": "hello"}, InvalidArgumentType, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, InvalidArgumentType, "messages[0].content"),
    ({"model": ""}, InvalidArgument, "model must not be empty"),
    ({"tags": {"feature": 1}}, InvalidArgumentType, "tags['feature']"),
    ({"request_id": "x" * 300}, InvalidArgument, "request_id"),
]


@pytest.mark.parametrize(("bad", "error", "message"), BAD_CALLS)
async def test_bad_input_raises_and_reserves_nothing(backend_url, clock, bad, error, message):
    g = guard(backend_url, clock)
    kwargs = {"user": "u1", "model": "gpt-4o", "messages": MSG, "max_tokens": 10} | bad
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        g.check(**kwargs)
    with pytest.raises(ValueError):
        await g.acheck(**kwargs)
    assert g._sync.client.dbsize() == 0


def test_bad_usage_raises_and_keeps_the_reservation(backend_url, clock):
    g = guard(backend_url, clock)
    d = g.check("u1", "gpt-4o", MSG, max_tokens=10)
    for bad in ({"prompt_tokens": -1, "completion_tokens": 3}, {"completion_tokens": 3}, object()):
        with pytest.raises(ValueError):
            g.record(d, {"usage": bad} if isinstance(bad, dict) else bad)
    w = g.status("u1").windows["user.daily"]
    assert (w.spent_usd, w.reserved_usd) == (0, d.estimated_cost_usd)


def test_reserve_context_manager_records_or_releases(backend_url, clock):
    g = guard(backend_url, clock, tiers={"default": {"hourly_usd": "0.001"}})
    with g.reserve("u1", "gpt-4o-mini", MSG, max_tokens=10) as d:
        d.record({"usage": {"prompt_tokens": 100, "completion_tokens": 10}})
    assert g.status("u1").windows["user.hourly"].spent_usd == cost_usd("gpt-4o-mini", 100, 10)

    with pytest.raises(RuntimeError), g.reserve("u1", "gpt-4o-mini", MSG, max_tokens=10):
        raise RuntimeError("upstream failed")
    assert g.status("u1").windows["user.hourly"].reserved_usd == 0

    with pytest.raises(BudgetExceeded) as info, g.reserve("u1", "gpt-4o", MSG, max_tokens=1000):
        pass
    assert info.value.decision.limit == "user.hourly"


async def test_async_reserve_releases_on_cancellation(backend_url, clock):
    import asyncio

    g = guard(backend_url, clock)
    entered = asyncio.Event()

    async def call() -> None:
        async with g.reserve("u1", "gpt-4o", MSG, max_tokens=100):
            entered.set()
            await asyncio.Event().wait()  # an LLM call that never returns

    task = asyncio.create_task(call())
    await entered.wait()
    assert (await g.astatus("u1")).windows["user.daily"].reserved_usd > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await g.astatus("u1")).windows["user.daily"].reserved_usd == 0
    await g.aclose()


def test_limit_decorator_swaps_model_and_records(backend_url, clock):
    g = guard(backend_url, clock, tiers={"default": {
        "hourly_usd": "0.10", "downgrade": {"at": "0.5", "routes": {"gpt-4o": "gpt-4o-mini"}}}})
    seen = []

    @g.limit(user=lambda kw: kw["user"])
    def ask(*, user, model, messages, max_tokens=50):
        seen.append(model)
        return {"model": model, "usage": {"prompt_tokens": 20_000, "completion_tokens": 0}}

    ask(user="u1", model="gpt-4o", messages=MSG)   # $0.05: 50%
    ask(user="u1", model="gpt-4o", messages=MSG)   # routed
    assert seen == ["gpt-4o", "gpt-4o-mini"]
    assert g.status("u1").windows["user.hourly"].spent_usd == Decimal("0.05") + cost_usd("gpt-4o-mini", 20_000, 0)


async def test_limit_decorator_async_and_release_on_error(backend_url, clock):
    g = guard(backend_url, clock)

    @g.limit(user=lambda kw: kw["user"])
    async def ask(user, model, messages, max_tokens=50):
        raise ConnectionError("upstream down")

    with pytest.raises(ConnectionError):
        await ask("u1", "gpt-4o", MSG)
    w = (await g.astatus("u1")).windows["user.daily"]
    assert (w.spent_usd, w.reserved_usd) == (0, 0)
    await g.aclose()


def test_same_call_twice_applies_once(backend_url, clock):
    """redis-py may resend a script after a timeout; the scripts must absorb the repeat."""
    g = guard(backend_url, clock)
    plan = g._engine.plan_check("u1", "gpt-4o", MSG, max_tokens=100)
    first = g._engine.read_check(plan, g._sync.drive(g._engine.check_steps(plan)))
    again = g._engine.read_check(plan, g._sync.drive(g._engine.check_steps(plan)))
    assert first.allowed and again.allowed
    assert g.status("u1").windows["user.daily"].reserved_usd == first.estimated_cost_usd
    assert "repeat" in again.reason and again.reservation_id == first.reservation_id
    usage = Usage(input_tokens=100, output_tokens=10)
    cost = g._engine.cost_nano(first, usage)
    plan = g._engine.settle_call(first, usage)
    assert g._engine.read_settle(plan, g._sync.drive(g._engine.settle_steps(plan))).applied is True
    # The resend finds the state it would have written: applied once, reported as applied.
    assert g._engine.read_settle(plan, g._sync.drive(g._engine.settle_steps(plan))).applied is True
    other = g._engine.settle_call(first, Usage(input_tokens=9999, output_tokens=1))
    assert g._engine.read_settle(other, g._sync.drive(g._engine.settle_steps(other))).applied is False
    w = g.status("u1").windows["user.daily"]
    assert (w.spent_usd, w.reserved_usd) == (Decimal(cost) / 10**9, 0)


def test_noscript_is_handled(real_redis, real_redis_url, clock):
    g = guard(real_redis_url, clock)
    assert g.check("u1", "gpt-4o", MSG, max_tokens=10).allowed
    real_redis.script_flush()
    assert g.check("u1", "gpt-4o", MSG, max_tokens=10).allowed


def test_keys_expire_after_their_window(real_redis, real_redis_url, clock):
    g = guard(real_redis_url, clock)
    g.check("u1", "gpt-4o", MSG, max_tokens=10)  # left unsettled: an abandoned lease
    grace_ms = (60 + 86_400) * 1000

    def left_ms(end: datetime) -> float:
        return (end - clock.now) / timedelta(milliseconds=1)

    hour_left, month_left = left_ms(datetime(2026, 3, 14, 16, tzinfo=UTC)), left_ms(datetime(2026, 4, 1, tzinfo=UTC))
    assert real_redis.pttl(next(iter(real_redis.keys("*:h:*")))) == pytest.approx(hour_left + grace_ms, abs=2000)
    assert real_redis.pttl(next(iter(real_redis.keys("*{u:u1}:m:*")))) == pytest.approx(month_left + grace_ms,
                                                                                       abs=2000)
    # The lease sets live as long as the longest counters they may have to sweep: the user's
    # and the org's month (another budget's with only a day, the day's).
    day_left = left_ms(datetime(2026, 3, 15, tzinfo=UTC))
    for leases in real_redis.keys("*:leases"):
        longest = day_left if b"{b:tenant:" in leases else month_left
        assert real_redis.pttl(leases) == pytest.approx(longest + grace_ms, abs=2000), leases


def test_config_object_is_required():
    with pytest.raises(TypeError):
        BudgetGuard({"tiers": {}})  # type: ignore[arg-type]
    assert config().fail_mode == "open"


def test_a_lapsed_request_id_reserves_afresh(backend_url, clock):
    g = guard(backend_url, clock, tiers={"default": {"hourly_usd": "0.0015"}})
    first = g.check("u1", "gpt-4o", MSG, max_tokens=100, request_id="r1")  # ~$0.001045, then abandoned
    clock.advance(seconds=61)  # the lease lapsed
    other = g.check("u1", "gpt-4o", MSG, max_tokens=100)
    assert other.allowed
    retry = g.check("u1", "gpt-4o", MSG, max_tokens=100, request_id="r1")
    assert not retry.allowed and retry.limit == "user.hourly"  # not waved through as a repeat
    assert first.allowed


def test_a_live_request_id_reused_for_another_request_is_an_error(backend_url, clock):
    g = guard(backend_url, clock)
    g.check("u1", "gpt-4o-mini", MSG, max_tokens=100, request_id="r1")
    with pytest.raises(ValueError, match="different request"):
        g.check("u1", "gpt-4o", MSG, max_tokens=100, request_id="r1")
    assert g.status("u1").windows["user.daily"].reserved_usd == estimate_usd("gpt-4o-mini",
                                                                              g.check("x", "gpt-4o-mini", MSG,
                                                                                      max_tokens=100)
                                                                              .estimated_input_tokens, 100)


def test_lease_sets_recreated_in_the_same_hour_still_expire(real_redis, real_redis_url, clock):
    g = guard(real_redis_url, clock)
    g.record(g.check("u1", "gpt-4o", MSG, max_tokens=10), Usage(input_tokens=1, output_tokens=1))
    g.check("u1", "gpt-4o", MSG, max_tokens=10)  # the emptied lease sets are created again
    for leases in real_redis.keys("*:leases"):
        assert real_redis.pttl(leases) > 0


def test_absurd_usage_is_refused_and_changes_nothing(backend_url, clock):
    g = guard(backend_url, clock)
    d = g.check("u1", "gpt-4o", MSG, max_tokens=10)
    with pytest.raises(ValueError, match="absurd"):
        g.record(d, Usage(input_tokens=10**16, output_tokens=0))
    w = g.status("u1").windows["user.daily"]
    assert (w.spent_usd, w.reserved_usd) == (0, d.estimated_cost_usd)
    assert g.healthy


def test_unreadable_usage_in_a_reserve_block_charges_the_worst_case(backend_url, clock):
    g = guard(backend_url, clock)
    with pytest.raises(ValueError), g.reserve("u1", "gpt-4o", MSG, max_tokens=100) as d:
        d.record({"choices": []})  # the call happened; its usage is missing
    w = g.status("u1").windows["user.daily"]
    assert (w.spent_usd, w.reserved_usd) == (d.estimated_cost_usd, 0)


def test_async_client_alone_is_refused(clock, monkeypatch):
    import redis.asyncio

    monkeypatch.delenv("REDIS_URL", raising=False)  # the embedded default is what is refused

    with pytest.raises(ValueError, match="async_redis= needs redis="):
        BudgetGuard(config(), async_redis=redis.asyncio.Redis(), clock=clock)


def test_one_guard_serves_loops_in_several_threads_with_one_store_each(backend_url, clock):
    import threading

    g = guard(backend_url, clock)
    turns = [threading.Semaphore(1), threading.Semaphore(0)]
    stores: list[list[object]] = [[], []]

    def worker(me: int) -> None:
        async def run() -> None:
            for _ in range(10):
                turns[me].acquire()  # the two loops take turns, so each call finds the other loop last
                d = await g.acheck(f"user-{me}", "gpt-4o", MSG, max_tokens=10)
                await g.arecord(d, Usage(input_tokens=5, output_tokens=5))
                stores[me].append(g._async_store())
                turns[1 - me].release()

        asyncio.run(run())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Each loop kept one store: not a new client (and pool) on every switch.
    assert [len(s) for s in stores] == [10, 10]
    assert all(s is stores[i][0] for i in range(2) for s in stores[i]) and stores[0][0] is not stores[1][0]
    assert g.status("user-0").windows["user.daily"].reserved_usd == 0
    g.close()
