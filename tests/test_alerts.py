"""Budget alerts: crossings claimed in Redis, delivered once, in the background."""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from budgetguard import BudgetGuard, Usage
from budgetguard.alerts.model import Alert
from budgetguard.config import parse_config

from .helpers import MSG, PRICES
from .receiver import Receiver, receiver

# $1.00 of output per 100k gpt-4o output tokens; 10 input tokens add $0.000025.
DOLLARS = 100_000


def spend(usd: int) -> Usage:
    return Usage(input_tokens=10, output_tokens=usd * DOLLARS)


def alerts_config(rx: Receiver, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "models": dict(PRICES),
        "reservation_ttl_s": 60,
        "org": {"daily_usd": 10, "alert_at": [0.5, 0.8, 1.0]},
        "alerts": {
            "slack": {"webhook_url": rx.url + "/slack/T000/B000/${SLACK_SECRET}"},
            "pagerduty": {"routing_key": "${PD_KEY}", "min_level": 0.8, "url": rx.url + "/pagerduty"},
            "webhook": {"url": rx.url + "/hook", "headers": {"Authorization": "Bearer ${TOKEN}"}},
            "backoff_s": 0.01,
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


ENV = {"SLACK_SECRET": "xoxSECRETxox", "PD_KEY": "pd-routing-key-1", "TOKEN": "tok-42"}


def make_guard(url: str, clock: Any, data: dict[str, Any], **kwargs: Any) -> BudgetGuard:
    return BudgetGuard(parse_config(data, env=ENV), redis_url=url, clock=clock, **kwargs)


def charge(g: BudgetGuard, user: str, usd: int) -> None:
    d = g.check(user, "gpt-4o", MSG, max_tokens=10)
    assert d.allowed, d.reason
    assert g.record(d, spend(usd)) is True


SLACK = "/slack/T000/B000/xoxSECRETxox"


def test_each_sink_gets_the_exact_message_once(backend_url, clock):
    with receiver() as rx:
        g = make_guard(backend_url, clock, alerts_config(rx))
        charge(g, "alice", 5)  # $5.000025 of $10: crosses 50%
        assert g.flush()
        charge(g, "bob", 1)  # 60%: nothing new
        assert g.flush()
        assert rx.bodies(SLACK) == [{
            "text": "budgetguard: org org.daily spend crossed 50%: $5.00 of $10.00 (50.0%)",
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": "Org: org.daily spend at 50%"}},
                {"type": "section", "fields": [
                    {"type": "mrkdwn", "text": "*Scope*\norg"},
                    {"type": "mrkdwn", "text": "*Window*\norg.daily `d:20260314`"},
                    {"type": "mrkdwn", "text": "*Spent / limit*\n$5.00 / $10.00"},
                    {"type": "mrkdwn", "text": "*Percent*\n50.0%"},
                ]},
                {"type": "section", "text": {"type": "mrkdwn", "text": "*Top spenders*\n1. alice: $5.00"}},
                {"type": "section", "text": {"type": "mrkdwn", "text":
                    "*What happens next*\nAt 100% requests that do not fit the org.daily cap are denied "
                    "until it resets at 2026-03-15 00:00 UTC."}},
                {"type": "context", "elements": [
                    {"type": "mrkdwn", "text": "budgetguard | info | 2026-03-14 15:09:26 UTC"}]},
            ],
        }]
        assert rx.bodies("/pagerduty") == []  # 50% is below its min_level of 0.8
        hook = rx.bodies("/hook")
        assert len(hook) == 1
        assert hook[0] | {"top_users": None} == {
            "kind": "threshold", "scope": "org", "user": None, "tier": None, "budget": None, "value": None,
            "window": "org.daily", "window_key": "d:20260314",
            "window_start": "2026-03-14T00:00:00+00:00", "window_end": "2026-03-15T00:00:00+00:00",
            "level": "0.5", "spent_usd": "5.000025", "limit_usd": "10", "percent": "50",
            "severity": "info", "summary": "budgetguard: org org.daily spend crossed 50%: $5.00 of $10.00 (50.0%)",
            "next_step": "At 100% requests that do not fit the org.daily cap are denied until it resets at "
                         "2026-03-15 00:00 UTC.",
            "detail": "", "top_users": None, "top_features": [],
            "dedup_key": "budgetguard/bg/org/org.daily/d:20260314/threshold/0.5",
            "at": "2026-03-14T15:09:26+00:00",
        }
        assert hook[0]["top_users"] == [{"user": "alice", "spent_usd": "5.000025"}]
        headers = next(r.headers for r in rx.requests if r.path == "/hook")
        assert headers["Authorization"] == "Bearer tok-42"

        charge(g, "bob", 2)  # $8.000075: crosses 80%
        assert g.flush()
        pd = rx.bodies("/pagerduty")
        assert len(pd) == 1
        details = pd[0]["payload"].pop("custom_details")
        assert pd[0] == {
            "routing_key": "pd-routing-key-1",
            "event_action": "trigger",
            "dedup_key": "budgetguard/bg/org/org.daily/d:20260314/threshold/0.8",
            "payload": {
                "summary": "budgetguard: org org.daily spend crossed 80%: $8.00 of $10.00 (80.0%)",
                "source": "budgetguard", "severity": "warning", "component": "org.daily", "group": "org",
                "class": "threshold", "timestamp": "2026-03-14T15:09:26+00:00",
            },
        }
        assert details["spent_usd"] == "8.000075" and details["level"] == "0.8"
        assert details["top_users"] == [{"user": "alice", "spent_usd": "5.000025"},
                                        {"user": "bob", "spent_usd": "3.00005"}]
        assert [b["text"].split(":")[1] for b in rx.bodies(SLACK)] == [" org org.daily spend crossed 50%",
                                                                      " org org.daily spend crossed 80%"]
        g.close()


def test_blocked_is_an_alert_once_and_resolves_when_a_new_day_opens(backend_url, clock):
    with receiver() as rx:
        g = make_guard(backend_url, clock, alerts_config(rx, org={"alert_at": []}))
        charge(g, "alice", 10)  # the day's budget is spent
        for _ in range(3):
            d = g.check("alice", "gpt-4o", MSG, max_tokens=10)
            assert not d.allowed and d.limit == "org.daily"
        assert g.flush()
        pd = rx.bodies("/pagerduty")
        assert [(b["event_action"], b["payload"]["class"], b["payload"]["severity"]) for b in pd] == [
            ("trigger", "blocked", "critical")]
        dedup = pd[0]["dedup_key"]
        assert dedup == "budgetguard/bg/org/org.daily/d:20260314/blocked"
        assert len(rx.bodies(SLACK)) == 1
        assert rx.bodies(SLACK)[0]["blocks"][0]["text"]["text"] == "Org blocked: org.daily cap reached"

        clock.advance(days=1)
        charge(g, "alice", 1)  # the first reservation of the new day
        assert g.flush()
        pd = rx.bodies("/pagerduty")
        assert pd[1:] == [{"routing_key": "pd-routing-key-1", "event_action": "resolve", "dedup_key": dedup}]
        charge(g, "alice", 1)
        assert g.flush()
        assert len(rx.bodies("/pagerduty")) == 2  # resolved once
        g.close()


def test_a_new_window_alerts_again(backend_url, clock):
    seen: list[Alert] = []
    g = BudgetGuard(parse_config({"models": dict(PRICES), "org": {"daily_usd": 10, "alert_at": [0.5]}}),
                    redis_url=backend_url, clock=clock, on_alert=seen.append)
    charge(g, "alice", 6)
    charge(g, "alice", 1)
    clock.advance(days=1)
    charge(g, "alice", 6)
    assert g.flush()
    assert [(a.kind, a.window_key, a.level) for a in seen] == [
        ("threshold", "d:20260314", Decimal("0.5")), ("threshold", "d:20260315", Decimal("0.5"))]
    g.close()


def test_user_alerts_are_opt_in_per_tier_and_skip_pagerduty_by_default(backend_url, clock):
    with receiver() as rx:
        data = alerts_config(rx, org={"alert_at": []}, tiers={
            "watched": {"hourly_usd": 4, "alert_at": [0.5]},
            "quiet": {"hourly_usd": 4},
        }, users={"alice": {"tier": "watched"}, "bob": {"tier": "quiet"}})
        # Slack hears of users only when asked (its scopes default to [org]).
        data["alerts"]["slack"] = {**data["alerts"]["slack"], "scopes": ["org", "user"]}
        g = make_guard(backend_url, clock, data)
        for user in ("alice", "bob"):
            charge(g, user, 2)  # 50% of the user's hour
            charge(g, user, 2)  # 100%: the next check is denied
            assert not g.check(user, "gpt-4o", MSG, max_tokens=10).allowed
            assert not g.check(user, "gpt-4o", MSG, max_tokens=10).allowed
        assert g.flush()
        titles = [b["blocks"][0]["text"]["text"] for b in rx.bodies(SLACK)]
        assert titles == ["User alice: user.hourly spend at 50%", "User alice blocked: user.hourly cap reached"]
        assert rx.bodies("/pagerduty") == []  # pagerduty.scopes defaults to [org]
        hook = rx.bodies("/hook")
        assert [(h["user"], h["tier"], h["dedup_key"]) for h in hook] == [
            ("alice", "watched", "budgetguard/bg/user/{u:alice}/user.hourly/h:202603141500/threshold/0.5"),
            ("alice", "watched", "budgetguard/bg/user/{u:alice}/user.hourly/h:202603141500/blocked"),
        ]
        g.close()


def test_retries_on_5xx_deliver_once(backend_url, clock):
    with receiver() as rx:
        rx.scripts[SLACK] = [(500, {}), (503, {"Retry-After": "0"})]
        g = make_guard(backend_url, clock, alerts_config(rx))
        charge(g, "alice", 5)
        assert g.flush()
        bodies = rx.bodies(SLACK)
        assert len(bodies) == 3 and bodies[0] == bodies[1] == bodies[2]  # two failures, one success
        assert len(rx.bodies("/hook")) == 1
        sample = g.metrics.registry.get_sample_value
        assert sample("budgetguard_alert_deliveries_total", {"sink": "slack", "outcome": "retried"}) == 2
        assert sample("budgetguard_alert_deliveries_total", {"sink": "slack", "outcome": "delivered"}) == 1
        g.close()


def test_4xx_is_not_retried_and_a_dead_sink_is_dropped_quietly(backend_url, clock, caplog):
    caplog.set_level(logging.WARNING, logger="budgetguard")
    with receiver() as rx:
        rx.scripts["/hook"] = [(400, {})]
        data = alerts_config(rx)
        data["alerts"]["slack"] = {"webhook_url": "http://127.0.0.1:9/slack/T000/B000/${SLACK_SECRET}"}
        data["alerts"]["retries"] = 2
        g = make_guard(backend_url, clock, data)
        d = g.check("alice", "gpt-4o", MSG, max_tokens=10)
        assert g.record(d, spend(5)) is True  # the caller sees nothing of the failures
        assert g.flush()
        assert len(rx.bodies("/hook")) == 1
        g.close()
    dropped = [r.getMessage() for r in caplog.records if "alert dropped" in r.getMessage()]
    assert any("slack at http://127.0.0.1:9 failed after 3 attempt(s) (ConnectError)" in m for m in dropped)
    assert any("webhook" in m and "after 1 attempt(s) (HTTP 400)" in m for m in dropped)
    assert "xoxSECRETxox" not in caplog.text and "tok-42" not in caplog.text and "pd-routing-key-1" not in caplog.text


def test_a_hanging_sink_does_not_hold_up_record(backend_url, clock):
    with receiver() as rx:
        rx.hold.clear()  # the server takes requests and never answers until released
        data = alerts_config(rx)
        data["alerts"]["timeout_s"] = 30
        g = make_guard(backend_url, clock, data)
        charge(g, "alice", 5)
        rx.wait_for(SLACK, 1)
        # The sink is now hanging on our request; calls still complete.
        for _ in range(5):
            charge(g, "bob", 0)
        with rx.lock:
            assert rx.waiting == 1
        rx.hold.set()
        assert g.flush()
        g.close()


def test_a_full_queue_drops_with_a_log_line(backend_url, clock, caplog):
    caplog.set_level(logging.ERROR, logger="budgetguard")
    with receiver() as rx:
        rx.hold.clear()
        data = alerts_config(rx)
        data["org"] = {"daily_usd": 10, "alert_at": [0.1, 0.2, 0.3, 0.4, 0.5]}
        data["alerts"]["queue_size"] = 1
        data["anomaly"] = {"enabled": False}  # its baseline job would take the one slot
        g = make_guard(backend_url, clock, data)
        charge(g, "alice", 1)  # 10%: taken by the thread, which then hangs on Slack
        rx.wait_for(SLACK, 1)
        charge(g, "alice", 1)  # 20%: queued
        charge(g, "alice", 1)  # 30%: the queue is full
        rx.hold.set()
        assert g.flush()
        g.close()
    assert any("queue full (1 items): dropped alert" in r.getMessage() and "30%" in r.getMessage()
               for r in caplog.records)
    assert g.metrics.registry.get_sample_value("budgetguard_alert_deliveries_total",
                                               {"sink": "queue", "outcome": "dropped"}) == 1


def test_close_flushes_within_its_bound(backend_url, clock, caplog):
    caplog.set_level(logging.ERROR, logger="budgetguard")
    with receiver() as rx:
        rx.hold.clear()
        data = alerts_config(rx)
        data["alerts"]["flush_timeout_s"] = 0.2
        data["alerts"]["timeout_s"] = 30
        g = make_guard(backend_url, clock, data)
        charge(g, "alice", 5)
        rx.wait_for(SLACK, 1)
        g.close()  # Slack never answers: close gives up after its bound instead of waiting 30 s
        assert any("flush timed out after 0.2 s" in r.getMessage() for r in caplog.records)
        rx.hold.set()


async def test_async_calls_deliver_from_a_task(backend_url, clock):
    got: list[Alert] = []
    main = threading.get_ident()
    threads: list[int] = []

    async def on_alert(alert: Alert) -> None:
        threads.append(threading.get_ident())
        got.append(alert)

    with receiver() as rx:
        g = make_guard(backend_url, clock, alerts_config(rx), on_alert=on_alert)
        d = await g.acheck("alice", "gpt-4o", MSG, max_tokens=10)
        await g.arecord(d, spend(9))
        assert await g.aflush()
        assert [a.level for a in got] == [Decimal("0.5"), Decimal("0.8")]
        assert threads == [main, main]  # ran on the event loop, not a thread
        assert len(rx.bodies(SLACK)) == 2 and len(rx.bodies("/pagerduty")) == 1
        await g.aclose()


def test_a_failing_callback_is_logged_and_other_sinks_still_deliver(backend_url, clock, caplog):
    def broken(alert: Alert) -> None:
        raise RuntimeError("callback bug")

    with receiver() as rx:
        g = make_guard(backend_url, clock, alerts_config(rx), on_alert=broken)
        charge(g, "alice", 5)
        assert g.flush()
        assert len(rx.bodies(SLACK)) == 1
        g.close()
    assert any("on_alert callback" in r.getMessage() and "callback bug" in r.getMessage() for r in caplog.records)


def test_forecast_alerts_once_a_month_when_the_rate_runs_out_early(backend_url, clock):
    seen: list[Alert] = []
    data = {"models": dict(PRICES), "org": {"monthly_usd": 1000, "forecast": True}}
    clock.now = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
    g = BudgetGuard(parse_config(data), redis_url=backend_url, clock=clock, on_alert=seen.append)
    # $2 an hour: $1000 lasts 500 hours, about 21 days, so it runs out on the 21st.
    for _ in range(30):
        charge(g, "alice", 2)
        assert g.flush()
        clock.advance(hours=1)
    forecasts = [a for a in seen if a.kind == "forecast"]
    assert len(forecasts) == 1
    f = forecasts[0]
    assert f.window == "org.monthly" and f.window_key == "m:202603"
    # It speaks once a day of history exists: the 25th hour, with $50 of $1000 spent.
    assert f.at == datetime(2026, 3, 2, 0, 30, tzinfo=UTC)
    assert f.spent_usd == Decimal("50.000625")
    assert "runs out on 2026-03-21 (the 21st)" in f.detail
    assert "$2.00/hour" in f.detail
    g.close()


def test_forecast_stays_quiet_when_the_budget_lasts(backend_url, clock):
    seen: list[Alert] = []
    data = {"models": dict(PRICES), "org": {"monthly_usd": 5000, "forecast": True}}
    clock.now = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
    g = BudgetGuard(parse_config(data), redis_url=backend_url, clock=clock, on_alert=seen.append)
    for _ in range(30):  # $2 an hour lasts 2500 hours, past the month's end
        charge(g, "alice", 2)
        assert g.flush()
        clock.advance(hours=1)
    assert [a for a in seen if a.kind == "forecast"] == []
    g.close()


@pytest.mark.slow
def test_four_processes_crossing_together_alert_exactly_once(real_redis, real_redis_url):
    import multiprocessing

    from .alert_workers import run_calls

    ctx = multiprocessing.get_context("spawn")
    with receiver() as rx:
        data = alerts_config(rx)
        start, results = ctx.Barrier(4), ctx.Queue()
        # Each call costs $0.060025 (10 input tokens, 6000 output): 200 of them want $12 of a $10 day.
        procs = [ctx.Process(target=run_calls, args=(data, ENV, real_redis_url, start, p, 50, (10, 6000), results))
                 for p in range(4)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        allowed = sum(a for a, _ in outcomes)
        denied = sum(d for _, d in outcomes)
        assert allowed + denied == 200 and denied > 0
        day = datetime.now(UTC).strftime("d:%Y%m%d")
        spent = Decimal(real_redis.hget(f"bg:{{org}}:{day}", "s").decode()) / 10**9
        assert spent >= 10  # the burst went through 100% and then hit the cap

        org = f"budgetguard/bg/org/org.daily/{day}"
        every = sorted([f"{org}/threshold/0.5", f"{org}/threshold/0.8", f"{org}/threshold/1", f"{org}/blocked"])
        assert sorted(b["dedup_key"] for b in rx.bodies("/hook")) == every
        paged = [k for k in every if not k.endswith("/0.5")]  # min_level 0.8
        assert sorted(b["dedup_key"] for b in rx.bodies("/pagerduty")) == paged
        assert len(rx.bodies(SLACK)) == 4


def test_a_resent_settle_reports_the_crossings_of_its_first_run(backend_url, clock):
    """A lost reply must not lose the alert: its marker was claimed by the first run."""
    g = BudgetGuard(parse_config({"models": dict(PRICES), "org": {"daily_usd": 10, "alert_at": [0.5]}}),
                    redis_url=backend_url, clock=clock)
    d = g.check("alice", "gpt-4o", MSG, max_tokens=10)
    plan = g._engine.settle_call(d, spend(6))
    first = g._engine.read_settle(plan, g._sync.drive(g._engine.settle_steps(plan)))
    resent = g._engine.read_settle(plan, g._sync.drive(g._engine.settle_steps(plan)))
    assert [(a.kind, a.level) for a in first.alerts] == [("threshold", Decimal("0.5"))]
    assert resent.applied and resent.alerts == first.alerts and resent.event == first.event
    other = g._engine.settle_call(d, spend(1))  # a second, different settle of the same decision
    assert g._engine.read_settle(other, g._sync.drive(g._engine.settle_steps(other))) == type(first)(False, [], None)
    g.close()


def test_alerts_for_any_user_id_reach_every_sink(backend_url, clock):
    odd = "caf\u00e9 \ud800 \u2028 user"  # not valid UTF-8 on its own, and a line separator
    with receiver() as rx:
        data = alerts_config(rx, org={"alert_at": []}, tiers={"t": {"hourly_usd": 4, "alert_at": [0.5]}},
                             default_tier="t")
        data["alerts"]["slack"] = {**data["alerts"]["slack"], "scopes": ["org", "user"]}  # users only when asked
        g = make_guard(backend_url, clock, data)
        charge(g, odd, 3)
        assert g.flush()
        assert [h["user"] for h in rx.bodies("/hook")] == [odd]
        assert len(rx.bodies(SLACK)) == 1
        g.close()


async def test_aclose_with_a_full_queue_returns_once_the_queue_drains(backend_url, clock, caplog):
    seen: list[Alert] = []
    data = {"models": dict(PRICES), "org": {"daily_usd": 10, "alert_at": [0.1, 0.2, 0.3]},
            "alerts": {"queue_size": 2}, "anomaly": {"enabled": False}}
    g = BudgetGuard(parse_config(data), redis_url=backend_url, clock=clock, on_alert=seen.append)
    d = await g.acheck("alice", "gpt-4o", MSG, max_tokens=10)
    await g.arecord(d, spend(3))  # three crossings at once: two fit the queue
    await g.aclose()
    assert len(seen) == 2
    assert not any("flush timed out" in r.getMessage() for r in caplog.records)


def test_interpreter_exit_flushes_what_is_queued(real_redis, real_redis_url, tmp_path):
    """A script that records a crossing and exits without close() still delivers its alert."""
    import subprocess
    import sys

    with receiver() as rx:
        script = tmp_path / "exits.py"
        script.write_text(
            "from budgetguard import BudgetGuard, Usage\n"
            "from budgetguard.config import parse_config\n"
            f"g = BudgetGuard(parse_config({{'models': {PRICES!r}, 'org': {{'daily_usd': 10, 'alert_at': [0.5]}},"
            f" 'alerts': {{'webhook': {{'url': '{rx.url}/hook'}}}}}}), redis_url='{real_redis_url}')\n"
            "d = g.check('alice', 'gpt-4o', [{'role': 'user', 'content': 'hi'}], max_tokens=10)\n"
            "g.record(d, Usage(input_tokens=10, output_tokens=600_000))\n"
        )
        subprocess.run([sys.executable, str(script)], check=True, timeout=60)
        assert [b["kind"] for b in rx.bodies("/hook")] == ["threshold"]


def test_a_forked_child_delivers_its_own_alerts(real_redis, real_redis_url):
    """A pre-forking server: the parent's dispatcher thread does not survive the fork."""
    import multiprocessing

    seen_in_parent: list[Alert] = []
    with receiver() as rx:
        data = alerts_config(rx, org={"daily_usd": 10, "alert_at": [0.2, 0.5]})
        g = make_guard(real_redis_url, None, data, on_alert=seen_in_parent.append)
        charge(g, "alice", 3)  # 20% + : the parent's thread starts and delivers
        assert g.flush()
        ctx = multiprocessing.get_context("fork")
        child = ctx.Process(target=_child_crosses_half, args=(g,))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert [b["level"] for b in rx.bodies("/hook")] == ["0.2", "0.5"]
        g.close()


def _child_crosses_half(g: BudgetGuard) -> None:
    charge(g, "bob", 3)  # 60%: the child's own thread must deliver the 50% alert
    g.close()


def test_a_hanging_sink_does_not_hold_up_usage_events(real_redis, real_redis_url, clock):
    import json
    import time

    with receiver() as rx:
        rx.hold.clear()
        data = alerts_config(rx)
        data["alerts"]["timeout_s"] = 30
        data["tiers"] = {"default": {"hourly_usd": 6}}
        g = make_guard(real_redis_url, clock, data)
        charge(g, "alice", 5)  # 50% of the org's day: the alert thread now hangs on Slack
        rx.wait_for(SLACK, 1)
        denied = g.check("alice", "gpt-4o", MSG, max_tokens=200_000)  # $2 worst case: over alice's hour
        assert not denied.allowed
        # The denial's event is written by the events lane, not behind the hanging delivery.
        deadline = time.monotonic() + 10
        kinds: list[str] = []
        while "denied" not in kinds and time.monotonic() < deadline:
            kinds = [json.loads(f[b"e"])["kind"] for _, f in real_redis.xrange("bg:{org}:events")]
        assert kinds == ["usage", "denied"]
        with rx.lock:
            assert rx.waiting == 1  # still hanging
        rx.hold.set()
        assert g.flush()
        g.close()


def test_a_callback_raising_systemexit_does_not_end_the_lane(backend_url, clock, caplog):
    seen: list[str] = []

    def rude(alert: Alert) -> None:
        seen.append(alert.window_key + "/" + str(alert.level))
        if len(seen) == 1:
            raise SystemExit(3)

    data = {"models": dict(PRICES), "org": {"daily_usd": 10, "alert_at": [0.2, 0.5]}, "anomaly": {"enabled": False}}
    g = BudgetGuard(parse_config(data), redis_url=backend_url, clock=clock, on_alert=rude)
    charge(g, "alice", 3)
    assert g.flush()
    charge(g, "alice", 3)
    assert g.flush()
    assert seen == ["d:20260314/0.2", "d:20260314/0.5"]
    assert any("on_alert callback" in r.getMessage() and "SystemExit" in r.getMessage() for r in caplog.records)
    g.close()


async def test_an_async_callback_cancelled_inside_does_not_end_the_lane(backend_url, clock):
    seen: list[Decimal] = []

    async def fragile(alert: Alert) -> None:
        seen.append(alert.level)
        if len(seen) == 1:
            never = asyncio.get_running_loop().create_future()
            never.cancel()
            await never  # raises CancelledError inside the callback, not in the lane

    data = {"models": dict(PRICES), "org": {"daily_usd": 10, "alert_at": [0.2, 0.5]}, "anomaly": {"enabled": False}}
    g = BudgetGuard(parse_config(data), redis_url=backend_url, clock=clock, on_alert=fragile)
    for _ in range(2):
        d = await g.acheck("alice", "gpt-4o", MSG, max_tokens=10)
        await g.arecord(d, spend(3))
        assert await g.aflush(timeout=5)
    assert seen == [Decimal("0.2"), Decimal("0.5")]
    await g.aclose()


async def test_work_after_aclose_is_refused_not_left_pending(backend_url, clock, caplog):
    seen: list[Alert] = []
    data = {"models": dict(PRICES), "org": {"daily_usd": 10, "alert_at": [0.5]}, "anomaly": {"enabled": False}}
    g = BudgetGuard(parse_config(data), redis_url=backend_url, clock=clock, on_alert=seen.append)
    d = await g.acheck("alice", "gpt-4o", MSG, max_tokens=10)
    await g.aclose()
    assert await g.arecord(d, spend(6)) is True  # the settle itself still works
    pending = [t for t in asyncio.all_tasks() if t.get_name() == "budgetguard-alerts" and not t.done()]
    assert pending == [] and seen == []
    assert any("guard is closed: alert" in r.getMessage() for r in caplog.records)
    await g.aclose()


def test_a_hanging_sync_callback_does_not_keep_asyncio_run_from_returning(backend_url, clock):
    release = threading.Event()
    finished = threading.Event()

    def stuck(event: dict[str, Any]) -> None:
        release.wait(60)

    data = {"models": dict(PRICES), "alerts": {"flush_timeout_s": 0.2}}
    g = BudgetGuard(parse_config(data), redis_url=backend_url, clock=clock, on_event=stuck)

    async def main() -> None:
        d = await g.acheck("alice", "gpt-4o", MSG, max_tokens=10)
        await g.arecord(d, spend(1))
        await g.aclose()  # gives up on the callback after its bound

    def run() -> None:
        asyncio.run(main())
        finished.set()

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        assert finished.wait(20), "asyncio.run() waited for the stuck callback"
    finally:
        release.set()
        runner.join(60)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"on_alert": 5}, "on_alert must be a callable or a list of callables, got int"),
    ({"on_event": [print, 3]}, "on_event must be a callable or a list of callables, got int"),
    ({"metrics": "prometheus"}, "metrics must be a budgetguard.metrics.Metrics, got str"),
])
def test_bad_guard_arguments_are_refused_clearly(kwargs, message):
    with pytest.raises(TypeError, match=message):
        BudgetGuard(parse_config({"models": dict(PRICES)}), redis_url="memory://bad-args", **kwargs)
