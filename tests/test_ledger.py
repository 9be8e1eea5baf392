"""The SQL ledger: a real workload shipped into SQLite and PostgreSQL equals the Redis ledger to
the nano-dollar, exactly once (twice shipped, redelivered, claimed from a dead consumer,
shipped by two shippers at once, a shipper killed with SIGKILL), and reports from it equal
the stream's reports."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from budgetguard import BudgetGuard, Usage
from budgetguard.cli import main
from budgetguard.config import parse_config
from budgetguard.ledger.shipper import ShipOptions, Shipper
from budgetguard.ledger.store import LedgerError, open_ledger

from .eventgen import STREAM, nano, workload, write_stream
from .ledgerdb import ledger_database

ROOT = Path(__file__).resolve().parent.parent
KINDS = ["sqlite", "postgresql"]
CALLS = 5000
MODELS = {
    "gpt-4o": {"input_per_mtok": "2.50", "output_per_mtok": "10.00", "cached_input_per_mtok": "1.25"},
    "gpt-4o-mini": {"input_per_mtok": "0.15", "output_per_mtok": "0.60", "cached_input_per_mtok": "0.075"},
    "claude-3-5-haiku-latest": {"input_per_mtok": "0.80", "output_per_mtok": "4.00", "cached_input_per_mtok": "0.08"},
    "gemini-2.0-flash": {"input_per_mtok": "0.10", "output_per_mtok": "0.40", "cached_input_per_mtok": "0.025"},
}
USERS = [f"p{i}" for i in range(8)] + [f"f{i}" for i in range(8)] + ["user:with:colons", "zoë"]
TENANTS = ["acme", "globex", "initech", None]
FEATURES = ["chat", "search", "summarise", None]


def _sums(url: str, column: str) -> dict[str | None, int]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    expr = {"user": "user_id", "tenant": "json_extract(tags, '$.tenant')" if url.startswith("sqlite")
            else "tags->>'tenant'"}[column]
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT {expr}, sum(cost_nano) FROM usage_events GROUP BY {expr}")).all()
    finally:
        engine.dispose()
    return {key: int(total) for key, total in rows}


def _count(url: str) -> tuple[int, int]:
    """(rows, distinct event ids)."""
    ledger = open_ledger(url, create=False)
    try:
        with ledger.engine.connect() as conn:
            rows, distinct = conn.execute(sa.text(
                "SELECT count(*), count(DISTINCT event_id) FROM usage_events")).one()
        return int(rows), int(distinct)
    finally:
        ledger.close()


def _shipper(client: redis.Redis, url: str, **options: Any) -> Shipper:
    return Shipper(client, STREAM, open_ledger(url), options=ShipOptions(**options), stream_maxlen=100_000)


def _group(client: redis.Redis, group: str) -> dict[str, Any]:
    for g in client.xinfo_groups(STREAM):
        if g["name"] in (group, group.encode()):
            return g
    return {}


# -- the workload through the real guard -------------------------------------------------------


def _run_workload(url: str, clock: Any) -> tuple[BudgetGuard, list[dict[str, Any]]]:
    config = parse_config({
        "models": MODELS, "reservation_ttl_s": 600, "default_tier": "free",
        "tiers": {"free": {"hourly_usd": "0.004", "models": ["gpt-4o-mini", "gemini-2.0-flash"]},
                  "pro": {"hourly_usd": "0.05"}},
        "users": {u: {"tier": "pro"} for u in USERS if u.startswith("p")},
        "org": {"monthly_usd": "100000"},
    }, env={})
    guard = BudgetGuard(config, redis_url=url, clock=clock)
    rng = random.Random(7)
    for i in range(CALLS):
        clock.advance(seconds=15)  # 5000 calls over 20 h 50 min, inside one month
        tags = {k: v for k, v in (("tenant", rng.choice(TENANTS)), ("feature", rng.choice(FEATURES))) if v}
        messages = [{"role": "user", "content": "x " * rng.randint(5, 300)}]
        d = guard.check(rng.choice(USERS), rng.choice(list(MODELS)), messages,
                        max_tokens=rng.randint(20, 1500), tags=tags, request_id=f"r{i}")
        if not d.allowed:
            continue
        if rng.random() < 0.05:
            guard.release(d, error="upstream 503")
            continue
        out = rng.randint(0, 1500)
        guard.record(d, Usage(input_tokens=d.estimated_input_tokens, output_tokens=out,
                              cached_input_tokens=rng.randint(0, d.estimated_input_tokens // 3),
                              reasoning_tokens=rng.randint(0, out // 4)))
    guard.flush()
    client = redis.Redis.from_url(url)
    raw = [json.loads(fields[b"e"]) for _, fields in client.xrange(STREAM)]
    client.close()
    return guard, raw


def test_workload_in_sql_equals_the_redis_ledger(real_redis, real_redis_url, clock, tmp_path, monkeypatch,
                                                   capsys):
    guard, raw = _run_workload(real_redis_url, clock)
    assert len(raw) == CALLS
    outcomes = Counter(e["outcome"] for e in raw)
    assert outcomes["denied"] > 100 and outcomes["ok"] > 2000 and outcomes["released"] > 50
    spent = {u: nano(f"{guard.status(u).windows['user.monthly'].spent_usd:f}") for u in USERS}
    org = nano(f"{guard.status(USERS[0]).windows['org.monthly'].spent_usd:f}")
    guard.close()
    tenants: dict[str | None, int] = defaultdict(int)
    for e in raw:
        tenants[e["tags"].get("tenant")] += nano(e["cost_usd"])

    limits = tmp_path / "limits.yaml"
    limits.write_text("redis_url: ${REDIS_URL}\n")
    monkeypatch.setenv("REDIS_URL", real_redis_url)
    with ledger_database("sqlite", tmp_path) as lite, ledger_database("postgresql", tmp_path) as pg:
        for url, group in ((lite, "to-sqlite"), (pg, "to-pg")):
            for _ in range(2):  # --once twice: the second ships nothing new
                assert main(["ship", "--config", str(limits), "--to", url, "--group", group, "--once",
                             "--quiet"]) == 0
                assert _count(url) == (CALLS, CALLS)
            assert _group(real_redis, group)["pending"] == 0
            by_user = _sums(url, "user")
            assert {u: by_user.get(u, 0) for u in USERS} == spent  # every user, to the nano-dollar
            assert sum(by_user.values()) == org
            assert _sums(url, "tenant") == dict(tenants)
        capsys.readouterr()

        # The SQL report equals the stream's, in every grouping and format.
        until = (clock() + timedelta(minutes=1)).isoformat()
        base = ["report", "--config", str(limits), "--since", "2d", "--until", until, "--top", "30"]
        for by in (None, "user", "model", "provider", "feature", "tenant", "hour"):
            for fmt in ("table", "csv", "json"):
                args = [*base, "--format", fmt, *(("--by", by) if by else ())]
                assert main(args) == 0
                want = capsys.readouterr().out
                for url in (lite, pg):
                    assert main([*args, "--db", url]) == 0
                    got = capsys.readouterr().out
                    if fmt == "json":
                        w, g = json.loads(want), json.loads(got)
                        assert w.pop("source").startswith("stream") and g.pop("source").startswith("ledger")
                        assert g == w and w["totals"]["events"] == CALLS
                    elif fmt == "table":  # the first line names the source
                        assert got.splitlines()[1:] == want.splitlines()[1:]
                    else:
                        assert got == want


# -- delivery: redelivery, dead consumers, SIGKILL, two shippers --------------------------------


def _events(n: int, seed: int = 3) -> list[dict[str, Any]]:
    return workload(n, datetime(2026, 3, 1, tzinfo=UTC), seed=seed, spread=timedelta(days=20))


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_committed_but_never_acknowledged_is_claimed_and_not_counted_twice(real_redis, tmp_path, kind):
    events = _events(1200)
    write_stream(real_redis, events)
    want = sum(nano(e["cost_usd"]) for e in events)
    with ledger_database(kind, tmp_path) as url:
        dead = _shipper(real_redis, url, consumer="dead", batch_size=500)
        dead.setup()
        batch = dead.read(None)
        # The dead shipper committed its batch and died before XACK.
        from budgetguard.ledger.rows import to_row

        assert dead.ledger.insert([to_row(i.decode(), json.loads(f[b"e"])) for i, f in batch]) == 500
        dead.ledger.close()
        assert _group(real_redis, "ledger")["pending"] == 500
        alive = _shipper(real_redis, url, consumer="alive", claim_idle_ms=0, batch_size=300)
        stats = alive.run_once()
        alive.ledger.close()
        assert stats.duplicates == 500 and stats.inserted == 700 and stats.read == 1200
        # The dead consumer, left with nothing pending, is gone from the group.
        assert [c["name"] for c in real_redis.xinfo_consumers(STREAM, "ledger")] == [b"alive"]
        assert _count(url) == (1200, 1200)
        assert sum(_sums(url, "user").values()) == want
        assert _group(real_redis, "ledger")["pending"] == 0


def _ship_process(url: str, limits: Path, redis_url: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "budgetguard", "ship", "--config", str(limits), "--to", url,
                             "--quiet", *extra], cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(condition: Any, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.mark.parametrize("kind", KINDS)
def test_a_shipper_killed_mid_run_loses_nothing_and_doubles_nothing(real_redis, real_redis_url, tmp_path, kind):
    events = _events(20_000, seed=11)
    write_stream(real_redis, events)
    want = sum(nano(e["cost_usd"]) for e in events)
    limits = tmp_path / "limits.yaml"
    limits.write_text("redis_url: ${REDIS_URL}\n")
    with ledger_database(kind, tmp_path) as url:
        first = _ship_process(url, limits, real_redis_url, "--batch", "100", "--claim-idle", "600")

        def some_rows() -> bool:
            if first.poll() is not None:
                raise AssertionError(f"the shipper exited early: {first.stderr.read() if first.stderr else ''}")
            try:
                return _count(url)[0] > 0
            except LedgerError:
                return False  # the table is not there yet

        _wait(some_rows, 60, "the first rows")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        shipped, _ = _count(url)
        assert 0 < shipped < len(events)  # killed part-way
        # The dead consumer's entries are claimed by the next run (--claim-idle 0: at once).
        again = _ship_process(url, limits, real_redis_url, "--once", "--claim-idle", "0")
        _, err = again.communicate(timeout=120)
        assert again.returncode == 0, err
        assert _count(url) == (len(events), len(events))
        assert sum(_sums(url, "user").values()) == want
        group = _group(real_redis, "ledger")
        assert group["pending"] == 0 and group["lag"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_two_shippers_at_once(real_redis, real_redis_url, tmp_path, kind):
    events = _events(20_000, seed=12)
    write_stream(real_redis, events)
    limits = tmp_path / "limits.yaml"
    limits.write_text("redis_url: ${REDIS_URL}\n")
    with ledger_database(kind, tmp_path) as url:
        open_ledger(url).close()  # the table first: two creators would race on CREATE TABLE
        # --claim-idle 0: each may also take over what the other holds, which must not count twice.
        procs = [_ship_process(url, limits, real_redis_url, "--once", "--batch", "200", "--claim-idle", "0",
                               "--consumer", name) for name in ("one", "two")]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        assert _count(url) == (len(events), len(events))
        assert sum(_sums(url, "user").values()) == sum(nano(e["cost_usd"]) for e in events)
        assert _group(real_redis, "ledger")["pending"] == 0


# -- bad input ------------------------------------------------------------------------------------


def test_an_unreachable_database_is_a_clear_error_and_nothing_is_acknowledged(real_redis, real_redis_url,
                                                                               tmp_path, capsys, monkeypatch):
    write_stream(real_redis, _events(50))
    limits = tmp_path / "limits.yaml"
    limits.write_text("redis_url: ${REDIS_URL}\n")
    monkeypatch.setenv("REDIS_URL", real_redis_url)
    code = main(["ship", "--config", str(limits), "--to", "postgresql://postgres:s3cret@127.0.0.1:1/none", "--once"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot use the database postgresql://postgres:***@127.0.0.1:1/none" in err
    assert "s3cret" not in err
    assert not _group(real_redis, "ledger")  # not even a group: nothing was read


@pytest.mark.parametrize("kind", KINDS)
def test_a_database_failing_mid_run_acknowledges_nothing(real_redis, tmp_path, kind):
    write_stream(real_redis, _events(300))
    with ledger_database(kind, tmp_path) as url:
        shipper = _shipper(real_redis, url, batch_size=100)
        shipper.setup()
        with shipper.ledger.engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE usage_events"))  # the database refuses every insert now
        entries = shipper.read(None)
        with pytest.raises(sa.exc.SQLAlchemyError):
            shipper.ship(entries)
        shipper.ledger.close()
        assert _group(real_redis, "ledger")["pending"] == 100  # still pending: another run ships them
        fresh = _shipper(real_redis, url, claim_idle_ms=0)
        assert fresh.run_once().inserted == 300
        fresh.ledger.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("ddl", "named"), [
    ("CREATE TABLE usage_events (event_id VARCHAR(64) PRIMARY KEY, ts TIMESTAMP)", "'kind'"),
    ("CREATE TABLE usage_events AS SELECT 1 AS x", "'event_id'"),
])
def test_a_table_of_the_wrong_shape_is_refused_by_name(real_redis, real_redis_url, tmp_path, kind, ddl, named,
                                                        capsys, monkeypatch):
    write_stream(real_redis, _events(20))
    with ledger_database(kind, tmp_path) as url:
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.begin() as conn:
            conn.execute(sa.text(ddl))
        engine.dispose()
        limits = tmp_path / "limits.yaml"
        limits.write_text("redis_url: ${REDIS_URL}\n")
        monkeypatch.setenv("REDIS_URL", real_redis_url)
        assert main(["ship", "--config", str(limits), "--to", url, "--once"]) == 2
        err = capsys.readouterr().err
        assert f"has no column {named}" in err
        assert not _group(real_redis, "ledger")


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_column_types_and_a_key_that_is_not_unique_are_refused(tmp_path, kind):
    with ledger_database(kind, tmp_path) as url:
        ledger = open_ledger(url)
        ledger.close()
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE usage_events RENAME TO other_events"))
            conn.execute(sa.text("ALTER TABLE other_events RENAME COLUMN cost_nano TO cost_old"))
            conn.execute(sa.text("ALTER TABLE other_events ADD COLUMN cost_nano VARCHAR(20)"))
        engine.dispose()
        with pytest.raises(LedgerError, match="column 'cost_nano' is VARCHAR"):
            open_ledger(url, "other_events")


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_entries_are_counted_logged_and_skipped(real_redis, tmp_path, kind, caplog):
    good = _events(40)
    write_stream(real_redis, good[:20])
    bad = [{"e": "not json"}, {"other": "field"}, {"e": json.dumps([1, 2])},
           {"e": json.dumps({**good[0], "cost_usd": 0.1})},  # a float where a decimal string belongs
           {"e": json.dumps({**good[0], "ts": "yesterday"})},
           {"e": json.dumps({**good[0], "kind": "mystery"})},
           {"e": json.dumps({**good[0], "input_tokens": -5})},
           {"e": json.dumps({**good[0], "cost_usd": "0.0000000001"})},  # below a nano-dollar
           {"e": json.dumps({**good[0], "tags": {str(i): "x" for i in range(100)}})},
           {"e": json.dumps({**good[0], "prices": {"x": "y" * 20_000}})}]
    for fields in bad:
        real_redis.xadd(STREAM, fields)
    write_stream(real_redis, good[20:])
    with ledger_database(kind, tmp_path) as url:
        shipper = _shipper(real_redis, url, batch_size=7)
        with caplog.at_level(logging.WARNING, "budgetguard.ledger"):
            stats = shipper.run_once()
        shipper.ledger.close()
        assert stats.malformed == len(bad) and stats.inserted == len(good)
        assert _count(url) == (len(good), len(good))
        messages = [r.getMessage() for r in caplog.records]
        assert sum("skipped stream entry" in m for m in messages) == len(bad)
        assert any("cost_usd is not a decimal string" in m for m in messages)
        assert any("tags has more than 64 entries" in m for m in messages)
        assert _group(real_redis, "ledger")["pending"] == 0


def test_ids_with_nul_and_lone_surrogates_are_stored_in_postgresql(real_redis, tmp_path):
    odd = _events(2)
    odd[0]["user"] = "a\x00b"
    odd[1]["user"] = "c\udc80d"
    odd[1]["tags"] = {"tenant": "t\x00"}
    for e in odd:
        real_redis.xadd(STREAM, {"e": json.dumps(e)})  # ASCII JSON, as the producer writes it
    with ledger_database("postgresql", tmp_path) as url:
        shipper = _shipper(real_redis, url)
        assert shipper.run_once().inserted == 2
        shipper.ledger.close()
        assert set(_sums(url, "user")) == {"a\\x00b", "c\\udc80d"}


# -- lag --------------------------------------------------------------------------------------


def test_lag_near_the_stream_cap_warns_and_trimmed_pending_entries_are_counted_lost(real_redis, tmp_path, caplog):
    write_stream(real_redis, _events(80))
    with ledger_database("sqlite", tmp_path) as url:
        shipper = Shipper(real_redis, STREAM, open_ledger(url), options=ShipOptions(batch_size=30, consumer="a"),
                          stream_maxlen=100)
        shipper.setup()
        with caplog.at_level(logging.WARNING, "budgetguard.ledger"):
            lag = shipper.lag()
        assert lag.behind == 80 and lag.pending == 0
        assert any("80 events behind" in r.getMessage() for r in caplog.records)
        caplog.clear()
        shipper.read(None)  # 30 pending with consumer a, never shipped
        real_redis.xtrim(STREAM, maxlen=10, approximate=False)  # the cap trims them away, and 40 unread ones
        other = Shipper(real_redis, STREAM, shipper.ledger, options=ShipOptions(claim_idle_ms=0, consumer="b"),
                        stream_maxlen=100)
        with caplog.at_level(logging.ERROR, "budgetguard.ledger"):
            other.lag()
            assert any("40 events of bg:{org}:events were trimmed before they were read" in r.getMessage()
                       for r in caplog.records)
            caplog.clear()
            stats = other.run_once()
        shipper.ledger.close()
        assert stats.lost == 40 + 30 and stats.inserted == 10
        assert any("30 pending events were trimmed" in r.getMessage() for r in caplog.records)
        assert _group(real_redis, "ledger")["pending"] == 0
