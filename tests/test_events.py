"""Usage events: one per settled call or denial, in the Redis Stream, a JSON Lines file
and ``on_event`` callables; on embedded fakeredis and on a real Redis."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import re
import signal
import time
from decimal import Decimal
from typing import Any

from budgetguard import Usage
from budgetguard.events import MAX_ID, MAX_TAG_KEY, MAX_TAG_VALUE, shorten, to_json
from budgetguard.guard import BudgetGuard
from budgetguard.keys import user_tag
from budgetguard.store import StoreUnavailable, connect

from . import event_workers
from .helpers import MSG, PRICES, config, cost_usd, estimate_usd, guard

STREAM = "bg:{org}:events"
FIELDS = {
    "v", "ts", "kind", "request_id", "user", "tier", "budgets", "tags", "provider", "requested_model", "model",
    "routed", "limit", "reason", "input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens",
    "reasoning_tokens", "input_cost_usd", "output_cost_usd", "cost_usd", "estimated_input_tokens",
    "max_output_tokens", "estimated_cost_usd", "prices", "latency_ms", "error", "outcome",
    "finish_reason", "streamed", "endpoint", "raw_usage",
}
PLAIN_DECIMAL = re.compile(r"^\d+(\.\d+)?$")  # no exponent, no sign
USAGE = Usage(input_tokens=100, output_tokens=10)


def raw_stream(g: BudgetGuard) -> list[str]:
    """Every stream entry's JSON text, oldest first (each entry must hold exactly one field, e)."""
    client = connect(g.config, g._url)
    try:
        entries = client.xrange(STREAM)
    finally:
        client.close()
    out = []
    for _, fields in entries:
        assert list(fields) == [b"e"]
        out.append(fields[b"e"].decode())
    return out


def stream(g: BudgetGuard) -> list[dict[str, Any]]:
    return [json.loads(text) for text in raw_stream(g)]


# -- 1. one record, one event, every field -------------------------------------------------

SECRET_PROMPT = "PROMPT-SECRET-4f1c: the merger with Initech closes on Friday"
SECRET_COMPLETION = "COMPLETION-SECRET-9b2e: I cannot discuss the merger"


def test_one_record_is_one_event_with_every_field_exact(backend_url, clock):
    clock.advance(microseconds=123_456)  # 15:09:26.123456 -> the event says .123
    g = guard(backend_url, clock, tiers={"default": {
        "hourly_usd": "0.0005", "downgrade": {"at": 0.8, "routes": {"gpt-4o": "gpt-4o-mini"}}}})
    messages = [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": SECRET_PROMPT}]
    tags = {"feature": "chat", "tenant": "acme", "team": "search"}
    started = time.monotonic()
    d = g.check("alice", "gpt-4o", messages, max_tokens=100, tags=tags)
    # gpt-4o's worst case (~$0.0011) does not fit $0.0005; gpt-4o-mini's does.
    assert d.allowed and d.downgraded and (d.requested_model, d.model, d.limit) == ("gpt-4o", "gpt-4o-mini",
                                                                                   "user.hourly")
    response = {
        "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": SECRET_COMPLETION},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 300, "total_tokens": 1300,
                  "prompt_tokens_details": {"cached_tokens": 200},
                  "completion_tokens_details": {"reasoning_tokens": 50}},
    }
    assert g.record(d, response) is True
    elapsed_ms = (time.monotonic() - started) * 1000
    g.flush()

    raw = raw_stream(g)
    assert len(raw) == 1
    for secret in ("PROMPT-SECRET", "COMPLETION-SECRET", "merger", "Initech", "Answer tersely"):
        assert secret not in raw[0]
    event = json.loads(raw[0])

    # By hand from the pinned gpt-4o-mini prices: 800 plain + 200 cached input tokens,
    # 300 output tokens (the 50 reasoning tokens are part of them, billed as output).
    p = {k: Decimal(v) for k, v in PRICES["gpt-4o-mini"].items()}
    input_cost = (800 * p["input_per_mtok"] + 200 * p["cached_input_per_mtok"]) / 10**6
    output_cost = 300 * p["output_per_mtok"] / 10**6
    assert (input_cost, output_cost) == (Decimal("0.000135"), Decimal("0.00018"))
    assert input_cost + output_cost == cost_usd("gpt-4o-mini", 1000, 300, cached=200)

    assert set(event) == FIELDS
    assert 0 <= event["latency_ms"] <= elapsed_ms + 1
    prices = event["prices"]
    assert set(prices) == {"input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "cache_write_per_mtok",
                           "reasoning_per_mtok", "source"}
    assert {k: Decimal(prices[k]) for k in PRICES["gpt-4o-mini"]} == p
    assert Decimal(prices["reasoning_per_mtok"]) == p["output_per_mtok"]  # reasoning is billed as output
    assert "limits.yaml" in prices["source"]
    for name in ("input_cost_usd", "output_cost_usd", "cost_usd", "estimated_cost_usd"):
        assert PLAIN_DECIMAL.match(event[name]), (name, event[name])
    expected = {
        "v": 1,
        "ts": "2026-03-14T15:09:26.123Z",
        "kind": "usage",
        "request_id": d.reservation_id,
        "user": "alice",
        "tier": "default",
        "budgets": ["user", "org"],
        "tags": tags,
        "provider": "openai",
        "requested_model": "gpt-4o",
        "model": "gpt-4o-mini",
        "routed": True,
        "limit": "user.hourly",
        "reason": d.reason,
        "input_tokens": 1000,
        "cached_input_tokens": 200,
        "cache_write_tokens": 0,
        "output_tokens": 300,
        "reasoning_tokens": 50,
        "input_cost_usd": input_cost,
        "output_cost_usd": output_cost,
        "cost_usd": input_cost + output_cost,
        "estimated_input_tokens": d.estimated_input_tokens,
        "max_output_tokens": 100,
        "estimated_cost_usd": estimate_usd("gpt-4o-mini", d.estimated_input_tokens, 100),
        "prices": prices,
        "finish_reason": "stop",
        "streamed": None,
        "endpoint": None,
        "raw_usage": response["usage"],  # as reported: counts only, no text
        "latency_ms": event["latency_ms"],
        "error": None,
        "outcome": "ok",
    }
    money = ("input_cost_usd", "output_cost_usd", "cost_usd", "estimated_cost_usd")
    assert {k: Decimal(v) if k in money else v for k, v in event.items()} == expected
    assert d.estimated_cost_usd == expected["estimated_cost_usd"]
    # The event's cost is the spend the settle counted.
    assert g.status("alice").windows["user.hourly"].spent_usd == expected["cost_usd"]


def test_cost_split_sums_to_the_charged_cost_with_fractional_nano_prices(backend_url, clock):
    # $0.0375 and $0.0125 per million tokens: 37.5 and 12.5 nano-USD per token.
    prices = {"input_per_mtok": "0.0375", "output_per_mtok": "0.0125", "cached_input_per_mtok": "0.0125"}
    g = guard(backend_url, clock, models={**PRICES, "odd-model": {**prices, "tokenizer": "o200k_base"}})
    d = g.check("u1", "odd-model", MSG, max_tokens=10)
    assert g.record(d, Usage(input_tokens=3, output_tokens=3, cached_input_tokens=1)) is True
    [event] = stream(g)
    exact_input = (2 * Decimal("0.0375") + 1 * Decimal("0.0125")) / 10**6  # 87.5 nano
    exact_total = exact_input + 3 * Decimal("0.0125") / 10**6  # 125 nano
    nano_usd = Decimal("1e-9")
    assert Decimal(event["cost_usd"]) == exact_total.quantize(nano_usd, rounding="ROUND_CEILING") == Decimal(
        "0.000000125")
    assert Decimal(event["input_cost_usd"]) == exact_input.quantize(nano_usd, rounding="ROUND_CEILING")
    assert Decimal(event["input_cost_usd"]) + Decimal(event["output_cost_usd"]) == Decimal(event["cost_usd"])
    assert g.status("u1").windows["user.daily"].spent_usd == Decimal(event["cost_usd"])


# -- 2. outcomes ----------------------------------------------------------------------------


def test_outcomes_ok_released_expired_and_stream_incomplete(backend_url, clock):
    g = guard(backend_url, clock)  # reservation_ttl_s: 60
    ok = g.check("u1", "gpt-4o", MSG, max_tokens=50)
    assert g.record(ok, USAGE) is True
    released = g.check("u1", "gpt-4o", MSG, max_tokens=50)
    long_error = "upstream said: " + "x" * 1985
    assert g.release(released, error=RuntimeError(long_error)) is True
    incomplete = g.check("u1", "gpt-4o", MSG, max_tokens=50)
    assert g.record(incomplete, USAGE, incomplete=True) is True
    late_record = g.check("u1", "gpt-4o", MSG, max_tokens=50)
    late_release = g.check("u1", "gpt-4o", MSG, max_tokens=50)
    clock.advance(seconds=61)  # both leases lapse
    assert g.record(late_record, USAGE) is True  # late spend is still spend
    assert g.release(late_release, error="TimeoutError: gave up") is True
    g.flush()

    events = stream(g)
    assert [e["request_id"] for e in events] == [d.reservation_id for d in
                                                 (ok, released, incomplete, late_record, late_release)]
    by_id = {e["request_id"]: e for e in events}
    cost = cost_usd("gpt-4o", 100, 10)
    full_error = f"RuntimeError: {long_error}"
    assert len(full_error) == 2014
    expect = {
        ok.reservation_id: ("ok", cost, None),
        released.reservation_id: ("released", Decimal(0), full_error[:500]),
        incomplete.reservation_id: ("stream_incomplete", cost, None),
        late_record.reservation_id: ("expired", cost, None),
        late_release.reservation_id: ("expired", Decimal(0), "TimeoutError: gave up"),
    }
    assert {rid: (e["outcome"], Decimal(e["cost_usd"]), e["error"]) for rid, e in by_id.items()} == expect
    assert len(by_id[released.reservation_id]["error"]) == 500
    for d in (released, late_release):
        e = by_id[d.reservation_id]
        assert (e["kind"], e["input_tokens"], e["output_tokens"], e["input_cost_usd"], e["output_cost_usd"]) == (
            "usage", 0, 0, "0", "0")
    for e in events:
        assert set(e) == FIELDS and e["kind"] == "usage"
    assert by_id[late_record.reservation_id]["ts"] == "2026-03-14T15:10:27.000Z"
    # Events and spend agree: three charged calls, nothing left reserved.
    w = g.status("u1").windows["user.hourly"]
    assert (w.spent_usd, w.reserved_usd) == (3 * cost, 0)
    assert sum(Decimal(e["cost_usd"]) for e in events) == w.spent_usd


def test_a_fail_open_decision_keeps_its_outcome(backend_url, clock, monkeypatch):
    g = guard(backend_url, clock)
    run = g._sync.run

    def down(call):
        raise StoreUnavailable("simulated outage")

    monkeypatch.setattr(g._sync, "run", down)
    d = g.check("u1", "gpt-4o", MSG, max_tokens=50)
    assert d.allowed and not d.enforced and d.limit == "store.unavailable"
    monkeypatch.setattr(g._sync, "run", run)
    assert g.record(d, USAGE) is True  # no lease to find: that is no lapse
    g.flush()
    [event] = stream(g)
    assert (event["request_id"], event["outcome"], event["limit"]) == (d.reservation_id, "ok", "store.unavailable")
    assert Decimal(event["cost_usd"]) == cost_usd("gpt-4o", 100, 10)


def test_denials_are_events(backend_url, clock):
    received: list[dict[str, Any]] = []
    g = BudgetGuard(config(tiers={"default": {"hourly_usd": "0.001", "per_request": {"max_output_tokens": 500}}}),
                    redis_url=backend_url, clock=clock, on_event=received.append)
    tags = {"feature": "search", "tenant": "acme"}
    capped = g.check("u1", "gpt-4o", MSG, max_tokens=400, tags=tags)  # ~$0.004 > $0.001
    assert not capped.allowed and capped.limit == "user.hourly"
    local = g.check("u1", "gpt-4o", MSG, max_tokens=501, tags=tags)  # over the per-request cap, no Redis
    assert not local.allowed and local.limit == "request.max_output_tokens"
    g.flush()

    events = stream(g)
    assert events == received
    assert [(e["kind"], e["outcome"], e["limit"], e["request_id"]) for e in events] == [
        ("denied", "denied", "user.hourly", capped.reservation_id),
        ("denied", "denied", "request.max_output_tokens", local.reservation_id),
    ]
    for e, d in zip(events, (capped, local), strict=True):
        assert set(e) == FIELDS
        assert (e["user"], e["tier"], e["tags"], e["requested_model"], e["model"], e["routed"], e["reason"]) == (
            "u1", "default", tags, "gpt-4o", "gpt-4o", False, d.reason)
        assert (e["cost_usd"], e["input_tokens"], e["output_tokens"], e["prices"], e["latency_ms"]) == (
            "0", 0, 0, None, None)
        assert Decimal(e["estimated_cost_usd"]) == d.estimated_cost_usd
        assert e["max_output_tokens"] == d.max_output_tokens
        assert e["ts"] == "2026-03-14T15:09:26.000Z"
    assert Decimal(events[0]["estimated_cost_usd"]) == estimate_usd("gpt-4o", capped.estimated_input_tokens, 400)
    # Denials spend nothing.
    assert g.status("u1").windows["user.hourly"].spent_usd == 0


# -- 3. the stream's bound -------------------------------------------------------------------


def _node_size(client: Any) -> int:
    try:
        return int(client.config_get("stream-node-max-entries")["stream-node-max-entries"])
    except Exception:  # fakeredis has no CONFIG: Redis' default
        return 100


def test_stream_is_bounded(backend_url, clock):
    g = guard(backend_url, clock, events={"stream_maxlen": 10})
    rids = []
    for i in range(200):
        d = g.check(f"u{i % 7}", "gpt-4o", MSG, max_tokens=10)
        assert g.record(d, Usage(input_tokens=i + 1, output_tokens=1))
        rids.append(d.reservation_id)
    client = connect(g.config, backend_url)
    length, node = client.xlen(STREAM), _node_size(client)
    client.close()
    # MAXLEN ~ trims whole stream nodes only: the stream may exceed its bound by at
    # most one node, never keep what 200 records wrote.
    assert 10 <= length <= 10 + node < 200
    kept = [e["request_id"] for e in stream(g)]
    assert kept == rids[-len(kept):]  # the newest are kept, in order


def test_stream_maxlen_zero_writes_no_stream(backend_url, clock):
    received: list[dict[str, Any]] = []
    g = BudgetGuard(config(events={"stream_maxlen": 0}, tiers={"default": {"hourly_usd": "0.001"}}),
                    redis_url=backend_url, clock=clock, on_event=received.append)
    d = g.check("u1", "gpt-4o", MSG, max_tokens=10)
    assert g.record(d, USAGE) is True
    assert not g.check("u1", "gpt-4o", MSG, max_tokens=4000).allowed
    g.flush()
    client = connect(g.config, backend_url)
    assert client.exists(STREAM) == 0
    client.close()
    assert [e["outcome"] for e in received] == ["ok", "denied"]  # the other sinks still get them
    assert g.status("u1").windows["user.hourly"].spent_usd == cost_usd("gpt-4o", 100, 10)


# -- 4. JSON Lines from several processes ---------------------------------------------------


def test_jsonl_appends_from_several_processes(real_redis, real_redis_url, tmp_path):
    path = tmp_path / "events.jsonl"
    workers, per_worker = 3, 40
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(workers)
    procs = [ctx.Process(target=event_workers.jsonl_writer, args=(real_redis_url, str(path), w, per_worker, start))
             for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0

    data = path.read_bytes()
    assert data.endswith(b"\n")
    lines = data.split(b"\n")[:-1]
    assert len(lines) == workers * per_worker
    events = [json.loads(line) for line in lines]
    assert all(isinstance(e, dict) and set(e) == FIELDS for e in events)
    rids = [e["request_id"] for e in events]
    assert len(set(rids)) == len(rids)
    for w in range(workers):
        mine = [e for e in events if e["user"] == f"writer-{w}"]
        assert sorted(e["input_tokens"] for e in mine) == list(range(1, per_worker + 1))
        blob = chr(ord("a") + w) * event_workers.BLOB
        assert all(e["tags"] == {"feature": "jsonl", **{f"blob{j:02d}": blob for j in range(event_workers.BLOB_TAGS)}}
                   for e in mine)
    assert min(len(line) for line in lines) > 8192
    # The file and the stream hold the same events.
    entries = real_redis.xrange(STREAM)
    assert sorted(rids) == sorted(json.loads(f[b"e"])["request_id"] for _, f in entries)


# -- 5. on_event, sync and async; failing sinks ----------------------------------------------


def test_on_event_and_jsonl_get_the_stream_events(backend_url, clock, tmp_path):
    received: list[dict[str, Any]] = []
    path = tmp_path / "events.jsonl"
    g = BudgetGuard(config(events={"jsonl_path": str(path)}, tiers={"default": {"hourly_usd": "0.01"}}),
                    redis_url=backend_url, clock=clock, on_event=received.append)
    d1 = g.check("u1", "gpt-4o", MSG, max_tokens=50, tags={"feature": "chat"})
    assert g.record(d1, USAGE) is True
    d2 = g.check("u1", "gpt-4o", MSG, max_tokens=50)
    assert g.release(d2, error="boom") is True
    assert not g.check("u1", "gpt-4o", MSG, max_tokens=2000).allowed
    g.flush()
    events = stream(g)
    assert [e["outcome"] for e in events] == ["ok", "released", "denied"]
    assert received == events
    assert [json.loads(line) for line in path.read_text().splitlines()] == events


async def test_on_event_async_path(backend_url, clock, tmp_path):
    plain: list[dict[str, Any]] = []
    awaited: list[dict[str, Any]] = []

    async def collect(event: dict[str, Any]) -> None:
        awaited.append(event)

    path = tmp_path / "events.jsonl"
    g = BudgetGuard(config(events={"jsonl_path": str(path)}, tiers={"default": {"hourly_usd": "0.01"}}),
                    redis_url=backend_url, clock=clock, on_event=[plain.append, collect])
    d1 = await g.acheck("u1", "gpt-4o", MSG, max_tokens=50, tags={"feature": "chat"})
    assert await g.arecord(d1, USAGE, incomplete=True) is True
    d2 = await g.acheck("u1", "gpt-4o", MSG, max_tokens=50)
    assert await g.arelease(d2, error=ValueError("bad")) is True
    denied = await g.acheck("u1", "gpt-4o", MSG, max_tokens=2000)
    assert not denied.allowed
    assert await g.aflush() is True
    events = stream(g)
    assert [(e["request_id"], e["outcome"]) for e in events] == [
        (d1.reservation_id, "stream_incomplete"), (d2.reservation_id, "released"),
        (denied.reservation_id, "denied")]
    assert events[1]["error"] == "ValueError: bad"
    assert plain == events and awaited == events
    assert [json.loads(line) for line in path.read_text().splitlines()] == events
    await g.aclose()


def _failing_guard(url: str, clock: Any, tmp_path: Any, received: list[dict[str, Any]]) -> BudgetGuard:
    def explode(event: dict[str, Any]) -> None:
        raise RuntimeError("sink is down")

    missing = tmp_path / "no-such-dir" / "events.jsonl"
    return BudgetGuard(config(events={"jsonl_path": str(missing)}), redis_url=url, clock=clock,
                       on_event=[explode, received.append])


def _assert_sink_failures_logged(caplog: Any) -> None:
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("no-such-dir" in m and "not written" in m for m in messages), messages
    assert any("on_event callback" in m and "sink is down" in m for m in messages), messages


def test_failing_sinks_never_fail_the_call(backend_url, clock, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    received: list[dict[str, Any]] = []
    g = _failing_guard(backend_url, clock, tmp_path, received)
    d = g.check("u1", "gpt-4o", MSG, max_tokens=50)
    assert g.record(d, USAGE) is True
    assert g.flush() is True
    assert [e["request_id"] for e in received] == [d.reservation_id]  # the next callable still gets it
    assert [e["request_id"] for e in stream(g)] == [d.reservation_id]
    assert g.status("u1").windows["user.daily"].spent_usd == cost_usd("gpt-4o", 100, 10)
    _assert_sink_failures_logged(caplog)


async def test_failing_sinks_never_fail_the_async_call(backend_url, clock, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    received: list[dict[str, Any]] = []
    g = _failing_guard(backend_url, clock, tmp_path, received)
    d = await g.acheck("u1", "gpt-4o", MSG, max_tokens=50)
    assert await g.arecord(d, USAGE) is True
    assert await g.aflush() is True
    assert [e["request_id"] for e in received] == [d.reservation_id]
    _assert_sink_failures_logged(caplog)
    await g.aclose()


# -- unusual text ------------------------------------------------------------------------------

ODD_USER = "eve\u2028\x85\ud800"  # a line separator, NEL and a lone surrogate: all legal user ids


def test_denial_event_of_an_unusual_user_id_reaches_every_sink(backend_url, clock, tmp_path):
    received: list[dict[str, Any]] = []
    path = tmp_path / "events.jsonl"
    g = BudgetGuard(config(events={"jsonl_path": str(path)}, tiers={"default": {"hourly_usd": "0.001"}}),
                    redis_url=backend_url, clock=clock, on_event=received.append)
    d = g.check(ODD_USER, "gpt-4o", MSG, max_tokens=4000, tags={"feature": "odd\u2029"})
    assert not d.allowed
    g.flush()
    assert [e["user"] for e in stream(g)] == [ODD_USER]
    assert [e["user"] for e in received] == [ODD_USER]
    # One event, one line, whichever line splitting the reader uses.
    text = path.read_bytes().decode("utf-8")
    assert len(text.splitlines()) == 1
    assert json.loads(text)["user"] == ODD_USER


def test_usage_event_of_an_unusual_user_id_and_feature(backend_url, clock):
    g = guard(backend_url, clock)
    d = g.check(ODD_USER, "gpt-4o", MSG, max_tokens=10, tags={"feature": "f\ud801"})
    assert d.allowed
    assert g.record(d, USAGE) is True
    assert [(e["user"], e["tags"]) for e in stream(g)] == [(ODD_USER, {"feature": "f\ud801"})]
    assert g.status(ODD_USER).windows["user.daily"].spent_usd == cost_usd("gpt-4o", 100, 10)


# -- 6. a process killed between reserve and settle ------------------------------------------


def _observer(url: str) -> BudgetGuard:
    return guard(url, lambda: event_workers.MOMENT)


def test_killed_process_spend_and_event_agree(real_redis, real_redis_url):
    ctx = multiprocessing.get_context("spawn")
    runs = []
    for user, record in (("killed-before-record", False), ("killed-after-record", True)):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=event_workers.check_then_hang, args=(real_redis_url, user, record, child))
        p.start()
        runs.append((user, record, p, parent))
    rids = {}
    for user, _, p, parent in runs:
        assert parent.poll(60), f"{user}: the worker never reported"
        rids[user] = parent.recv()
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        assert p.exitcode == -signal.SIGKILL

    g = _observer(real_redis_url)
    events = stream(g)  # each worker reported only after its last command had returned
    for user, record, _, _ in runs:
        mine = [e for e in events if e["request_id"] == rids[user]]
        w = g.status(user).windows["user.daily"]
        if record:
            assert w.spent_usd == cost_usd("gpt-4o", 400, 30)
            assert [(e["outcome"], Decimal(e["cost_usd"])) for e in mine] == [("ok", w.spent_usd)]
        else:
            assert (w.spent_usd, mine) == (0, [])
            assert w.reserved_usd > 0  # the lease stays until reservation_ttl_s
    assert len(events) == 1


def test_kill_at_random_points_never_splits_spend_and_events(real_redis, real_redis_url):
    ctx = multiprocessing.get_context("spawn")
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    groups = [[f"racer-{w}-{t}" for t in range(4)] for w in range(3)]  # 3 processes x 4 threads
    users = [user for group in groups for user in group]
    procs = []
    for group in groups:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=event_workers.record_forever, args=(real_redis_url, group, child))
        p.start()
        procs.append((p, parent))
    for _, parent in procs:
        assert parent.poll(60) and parent.recv() == "started"
    # Kill each worker once its first thread has settled a random number of calls: the
    # kill lands wherever each of its threads happens to be (checking, recording, between).
    targets = [rng.randrange(10, 80) for _ in groups]
    day = f"{event_workers.MOMENT:%Y%m%d}"
    deadline = time.monotonic() + 60
    for group, (p, _), target in zip(groups, procs, targets, strict=True):
        key, settled_nano = f"bg:{user_tag(group[0])}:d:{day}", 2500 * target * (target + 1) // 2
        while int(real_redis.hget(key, "s") or 0) < settled_nano:
            assert time.monotonic() < deadline, f"seed {seed}: {group[0]} is too slow"
            time.sleep(0.001)
        os.kill(p.pid, signal.SIGKILL)
    for p, _ in procs:
        p.join(30)
        assert p.exitcode == -signal.SIGKILL

    # A killed worker's last command may still sit unread in Redis' socket buffer: read
    # the stream and the counters in one transaction, so both see the same moment.
    events, spent, org_spent = _snapshot(real_redis, users)
    unit = cost_usd("gpt-4o", 1, 0)  # call i costs i units: the spend identifies the calls settled
    assert unit == Decimal("0.0000025")
    for user in users:
        mine = [e for e in events if e["user"] == user]
        assert {e["outcome"] for e in mine} <= {"ok"}, seed
        settled = [e["input_tokens"] for e in mine]
        m = len(settled)
        assert settled == list(range(1, m + 1)), (seed, user)  # in order, none missing, none twice
        assert spent[user] == unit * (m * (m + 1) // 2), (seed, user, m, spent[user])
        assert sum(Decimal(e["cost_usd"]) for e in mine) == spent[user]
    assert org_spent == sum(spent.values())
    for group, target in zip(groups, targets, strict=True):
        assert spent[group[0]] >= unit * (target * (target + 1) // 2)


def _snapshot(client: Any, users: list[str]) -> tuple[list[dict[str, Any]], dict[str, Decimal], Decimal]:
    day = f"{event_workers.MOMENT:%Y%m%d}"
    pipe = client.pipeline(transaction=True)
    pipe.xrange(STREAM)
    for user in users:
        pipe.hget(f"bg:{user_tag(user)}:d:{day}", "s")
    pipe.hget(f"bg:{{org}}:d:{day}", "s")
    entries, *counters = pipe.execute()
    usd = [Decimal(int(c or 0)) / 10**9 for c in counters]
    return [json.loads(f[b"e"]) for _, f in entries], dict(zip(users, usd[:-1], strict=True)), usd[-1]


# -- bounded ids and tags --------------------------------------------------------------------


def test_shorten_keeps_short_text_and_fingerprints_long_text():
    assert shorten("alice", MAX_ID) == "alice"
    exact = "x" * MAX_ID
    assert shorten(exact, MAX_ID) is exact
    long_a, long_b = "a" * 10_000, "a" * 9_999 + "b"  # the same first characters
    a, b = shorten(long_a, MAX_ID), shorten(long_b, MAX_ID)
    assert len(a) == len(b) == MAX_ID and a != b
    assert a == shorten("a" * 10_000, MAX_ID) and shorten(a, MAX_ID) == a  # stable, and idempotent
    assert re.fullmatch("a{238}\u2026#[0-9a-f]{16}", a)
    assert shorten("\ud800" * 300, MAX_ID) != shorten("\ud801" * 300, MAX_ID)  # lone surrogates hash too


def test_long_ids_and_tags_are_shortened_in_every_copy(backend_url, clock, tmp_path):
    from budgetguard.report import build_report

    received: list[dict[str, Any]] = []
    path = tmp_path / "events.jsonl"
    g = BudgetGuard(config(events={"jsonl_path": str(path)}, tiers={"default": {"hourly_usd": "0.01"}}),
                    redis_url=backend_url, clock=clock, on_event=received.append)
    long_a = "a" * 10_000_000
    long_b = "a" * 9_999_999 + "b"
    mb = 1_000_000
    tags = {"feature": "f" * mb, "tenant": "acme", "k" * mb: "v" * mb}
    for user in (long_a, long_a, long_b, "alice"):
        d = g.check(user, "gpt-4o", MSG, max_tokens=50, tags=tags if user != "alice" else {"feature": "chat"})
        assert g.record(d, USAGE) is True
    assert not g.check(long_a, "gpt-4o", MSG, max_tokens=2000, tags=tags).allowed  # $0.02 worst case
    g.flush()

    raw = raw_stream(g)
    lines = path.read_text().splitlines()
    assert len(raw) == len(lines) == 5
    for text in raw + lines:
        assert len(text) < 4096, len(text)
    events = stream(g)
    assert received == events == [json.loads(line) for line in lines]

    users = [e["user"] for e in events]
    assert users[0] == users[1] == users[4] == shorten(long_a, MAX_ID) != users[2] == shorten(long_b, MAX_ID)
    assert users[3] == "alice" and events[3]["tags"] == {"feature": "chat"}
    assert len(users[0]) == MAX_ID and users[0].startswith("a" * 200)
    for e in (events[0], events[2], events[4]):
        assert e["tags"]["tenant"] == "acme"
        assert e["tags"]["feature"] == shorten("f" * mb, MAX_TAG_VALUE)
        assert e["tags"][shorten("k" * mb, MAX_TAG_KEY)] == shorten("v" * mb, MAX_TAG_VALUE)
        assert all(len(k) <= MAX_TAG_KEY and len(v) <= MAX_TAG_VALUE for k, v in e["tags"].items())

    # Reports group by the shortened ids: one row per long user, never one per event.
    report = build_report(events, by="user")
    groups = dict(report.groups)
    assert set(groups) == {users[0], users[2], "alice"}
    assert (groups[users[0]].requests, groups[users[0]].denials) == (2, 1)
    assert groups[users[2]].requests == 1
    g.close()


def test_event_size_does_not_depend_on_the_size_of_ids_and_tags(clock):
    """The worst case: 32 tags (the most a check takes) of non-ASCII text, which JSON
    escapes to 6 or 12 bytes a character. Bounded, and the same for 100 KB as for 200 KB."""
    received: list[dict[str, Any]] = []
    g = BudgetGuard(config(), redis_url="memory://", clock=clock, on_event=received.append)
    for size in (100_000, 200_000):
        tags = {f"{i:02d}" + "\u00e9" * size: "\U0001f600" * size for i in range(32)}
        g.record(g.check("\U0001f600" * size, "gpt-4o", MSG, max_tokens=10, tags=tags), USAGE)
    g.flush()
    sizes = [len(to_json(e)) for e in received]
    assert sizes[0] == sizes[1] < 3 * MAX_ID * 12 + 32 * (MAX_TAG_KEY * 6 + MAX_TAG_VALUE * 12) + 2048
    assert len({json.dumps(sorted(e["tags"])) for e in received}) == 2  # distinct keys stayed distinct
    assert all(len(e["tags"]) == 32 for e in received)
    g.close()
