"""The ledger's pure parts: events to rows and back, efficiency and weekly figures, and the
report formats that read only the ledger (efficiency, weekly, --send slack)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from budgetguard.cli import main
from budgetguard.ledger.insights import efficiency, weekly
from budgetguard.ledger.rows import RowError, clean, to_event, to_row
from budgetguard.ledger.store import open_ledger
from budgetguard.report import build_report, render

from .eventgen import make_event, workload
from .receiver import receiver

T0 = datetime(2026, 3, 10, 12, tzinfo=UTC)


def test_money_becomes_exact_nano_and_comes_back_unchanged():
    event = make_event(ts=T0, input_tokens=1234, cached=200, output_tokens=77, tags={"tenant": "acme"})
    row = to_row("1-0", event)
    assert row["cost_nano"] == int(Decimal(event["cost_usd"]) * 10**9)
    assert row["input_cost_nano"] + (row["cost_nano"] - row["input_cost_nano"]) == row["cost_nano"]
    assert row["kind"] == "usage" and row["tags"] == {"tenant": "acme"} and row["ts"] == T0
    back = to_event(row)
    for key in ("cost_usd", "input_cost_usd", "output_cost_usd", "estimated_cost_usd"):
        assert Decimal(back[key]) == Decimal(event[key])
    assert to_row("2-0", make_event(ts=T0, outcome="denied"))["kind"] == "denial"


def test_the_report_of_rows_read_back_equals_the_report_of_the_events():
    events = workload(800, T0)
    for i, e in enumerate(events[::3]):
        e["tags"]["api_key"] = f"key-{i % 4}"
    rows = [to_row(f"{i}-0", e) for i, e in enumerate(events)]
    for by in (None, "user", "tenant", "api_key", "hour"):
        want = build_report(events, by=by)
        got = build_report([to_event(r) for r in rows], by=by)
        assert render(got, "csv") == render(want, "csv")
    keys = {key for key, _ in build_report(events, by="api_key").groups}
    assert keys == {"key-0", "key-1", "key-2", "key-3", "(none)"}


@pytest.mark.parametrize(("change", "message"), [
    ({"cost_usd": 1.5}, "cost_usd is not a decimal string"),
    ({"cost_usd": "1e400"}, "cost_usd is out of range"),
    ({"cost_usd": "0.0000000005"}, "cost_usd is not a whole number of nano-USD"),
    ({"cost_usd": "NaN"}, "cost_usd is not a whole number"),
    ({"output_cost_usd": "9"}, "output_cost_usd is not cost_usd - input_cost_usd"),
    ({"input_tokens": True}, "input_tokens is not a count"),
    ({"input_tokens": 2**63}, "input_tokens is not a count"),
    ({"ts": "2026-03-10T12:00:00"}, "ts: ts has no timezone"),
    ({"kind": None}, "kind is not usage"),
    ({"kind": []}, "kind is not usage"),
    ({"cost_usd": "1e999999999"}, "cost_usd is not a decimal string"),
    ({"outcome": None}, "outcome is missing"),
    ({"user": 5}, "user is not a string"),
    ({"routed": "yes"}, "routed is not true or false"),
    ({"tags": {"a": 1}}, "tags must map strings to strings"),
    ({"tags": ["a"]}, "tags is not an object"),
    ({"raw_usage": {"x": float("nan")}}, "raw_usage is not plain JSON"),
    ({"raw_usage": {"x": "y" * 20_000}}, "raw_usage is larger than"),
])
def test_malformed_events_are_refused_naming_the_field(change, message):
    with pytest.raises(RowError, match=message):
        to_row("1-0", {**make_event(ts=T0), **change})


def test_caller_text_is_bounded_and_made_storable():
    event = make_event(ts=T0, user="u" * 10_000, tags={"k" * 100: "v" * 1000})
    event["error"] = "e" * 5000
    row = to_row("1-0", event)
    assert len(row["user_id"]) == 256 and len(row["error"]) == 500
    (key, value), = row["tags"].items()
    assert len(key) == 64 and len(value) == 256
    assert clean("plain ü") == "plain ü" and clean("a\x00b") == "a\\x00b" and clean("c\udc80") == "c\\udc80"


def _call(ts, *, model="gpt-4o", feature="chat", user="alice", inp=1000, out=100, finish="stop", latency=1000):
    return make_event(ts=ts, model=model, user=user, input_tokens=inp, output_tokens=out, tags={"feature": feature},
                      finish_reason=finish, latency_ms=latency)


def test_efficiency_figures():
    events = [_call(T0, inp=100 * (i + 1), out=10 * (i + 1), finish="length" if i < 5 else "stop",
                    user=f"u{i % 4}") for i in range(20)]
    events.append(_call(T0, model="gpt-4o-mini", out=50, finish=None, latency=None))
    events.append(make_event(ts=T0, outcome="denied"))
    (big, small) = efficiency(events, "model")
    row = big.row()
    assert (big.key, row["calls"], row["p95_input_tokens"], row["p95_output_tokens"]) == ("gpt-4o", 20, 1900, 190)
    assert row["mean_input_tokens"] == "1050.0000" and row["output_input_ratio"] == "0.1000"
    assert row["truncation_rate"] == "0.2500"  # 5 of 20 stopped at the length limit
    assert row["output_tokens_per_s"] == "105.0000"  # 2100 output tokens in 20 s
    assert row["active_users"] == 4
    assert Decimal(row["cost_per_active_user_usd"]) == Decimal(row["cost_usd"]) / 4
    assert small.row()["truncation_rate"] is None and small.row()["output_tokens_per_s"] is None
    assert [g.key for g in efficiency(events, "model+feature")] == ["gpt-4o / chat", "gpt-4o-mini / chat"]


def test_weekly_summary_and_projection():
    until = datetime(2026, 3, 21, tzinfo=UTC)  # 11 days of March left (the 21st to the 31st)
    events = [make_event(ts=until - timedelta(days=d, hours=1), input_tokens=1_000_000, output_tokens=0,
                         max_output=0) for d in range(14)]  # $2.50 a day for 14 days, then the 1st to the 6th
    events += [make_event(ts=datetime(2026, 3, 2, tzinfo=UTC), input_tokens=400_000, output_tokens=0)]
    w = weekly(events, until)
    assert w.week_cost == Decimal("17.5") and w.previous_cost == Decimal("17.5") and w.change_pct() == 0
    assert w.month_cost == Decimal("35") + 1  # 14 days, and the 2nd's $1
    assert w.projection == Decimal("36") + Decimal("2.5") * 11


def test_ledger_formats_through_the_command(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    ledger = open_ledger(url)
    events = [_call(T0 - timedelta(hours=i), user=f"u{i % 3}") for i in range(30)]
    ledger.insert([to_row(f"{i}-0", e) for i, e in enumerate(events)])
    ledger.close()
    limits = tmp_path / "limits.yaml"
    limits.write_text("timezone: UTC\n")
    assert main(["report", "--config", str(limits), "--format", "weekly"]) == 2
    assert "reads the SQL ledger: add --db" in capsys.readouterr().err
    until = (T0 + timedelta(hours=1)).isoformat()
    assert main(["report", "--db", url, "--until", until, "--since", "2d", "--format", "efficiency",
                 "--by", "feature"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:2] == ["chat", "30"]
    with receiver() as r:
        limits.write_text(f"alerts:\n  slack: {{webhook_url: '{r.url}/slack'}}\n")
        assert main(["report", "--config", str(limits), "--db", url, "--until", until, "--format", "weekly",
                     "--send", "slack"]) == 0
        text = capsys.readouterr().out
        (body,) = r.wait_for("/slack", 1)
    assert text.startswith("week to 2026-03-10 13:00 UTC:") and "over 30 calls" in text
    assert body["text"] == text.splitlines()[0] and "top users: " in body["blocks"][0]["text"]["text"]
