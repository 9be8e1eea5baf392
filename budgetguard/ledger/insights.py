"""Figures beyond the spend report, from usage events (pure functions, no I/O).

* :func:`efficiency`: per group (model, feature, or both) over allowed calls that used
  tokens: mean and p95 (nearest rank) of input and output tokens, the output/input ratio
  (Σ output / Σ input), the truncation rate (the share of calls whose ``finish_reason``
  is ``length``, among calls that report a finish reason; None without any), output
  tokens per second (Σ output / Σ latency, over calls with a latency), and the cost per
  active user (cost / distinct users with at least one call in the group).
* :func:`weekly`: the week ending at ``until`` against the week before, the top users,
  features and models, and the month's projection: the month's spend so far plus the
  last seven days' daily mean for each day left.

Money stays ``Decimal`` (exact sums of the events' decimal strings); ratios are rounded
half-even to the places their renderers print.
"""

from __future__ import annotations

import calendar
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from ..eventlog import event_time
from ..report import NONE_KEY, format_usd

__all__ = ["EFFICIENCY_BY", "Efficiency", "Weekly", "efficiency", "render_efficiency", "render_weekly",
           "slack_message", "weekly"]

EFFICIENCY_BY = ("model", "feature", "model+feature")
_PLACES = Decimal("0.0001")


def _key(event: Mapping[str, Any], by: str) -> str:
    def part(name: str) -> str:
        value = (event.get("tags") or {}).get(name) if name == "feature" else event.get(name)
        return value if isinstance(value, str) and value else NONE_KEY

    return " / ".join(part(p) for p in by.split("+"))


def _p95(values: list[int]) -> int:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)] if ordered else 0


def _ratio(numerator: int | Decimal, denominator: int | Decimal) -> Decimal | None:
    if not denominator:
        return None
    return (Decimal(numerator) / Decimal(denominator)).quantize(_PLACES, rounding=ROUND_HALF_EVEN)


@dataclass
class Efficiency:
    key: str
    calls: int = 0
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    finished: int = 0  # calls reporting a finish reason
    truncated: int = 0  # of which "length"
    latency_ms: int = 0
    timed_output: int = 0  # output tokens of calls with a latency
    cost: Decimal = Decimal(0)
    users: set[str] = field(default_factory=set)

    def row(self) -> dict[str, Any]:
        n = len(self.inputs)
        rate = _ratio(self.truncated, self.finished)
        per_second = _ratio(self.timed_output * 1000, self.latency_ms)
        return {
            "key": self.key, "calls": self.calls,
            "mean_input_tokens": str(_ratio(sum(self.inputs), n)), "p95_input_tokens": _p95(self.inputs),
            "mean_output_tokens": str(_ratio(sum(self.outputs), n)), "p95_output_tokens": _p95(self.outputs),
            "output_input_ratio": None if (r := _ratio(sum(self.outputs), sum(self.inputs))) is None else str(r),
            "truncation_rate": None if rate is None else str(rate),
            "output_tokens_per_s": None if per_second is None else str(per_second),
            "cost_usd": format_usd(self.cost), "active_users": len(self.users),
            "cost_per_active_user_usd": format_usd(self.cost / len(self.users)) if self.users else None,
        }


def efficiency(events: Iterable[Mapping[str, Any]], by: str = "model") -> list[Efficiency]:
    """Per group, over allowed calls (kind ``usage``) with tokens; ordered by cost, then key."""
    if by not in EFFICIENCY_BY:
        raise ValueError(f"efficiency by {by!r}: use one of {', '.join(EFFICIENCY_BY)}")
    groups: dict[str, Efficiency] = {}
    for event in events:
        if event.get("kind") != "usage":
            continue
        inp, out = event.get("input_tokens") or 0, event.get("output_tokens") or 0
        if not isinstance(inp, int) or not isinstance(out, int) or inp + out == 0:
            continue
        g = groups.setdefault(_key(event, by), Efficiency(_key(event, by)))
        g.calls += 1
        g.inputs.append(inp)
        g.outputs.append(out)
        finish = event.get("finish_reason")
        if isinstance(finish, str) and finish:
            g.finished += 1
            g.truncated += finish in ("length", "max_tokens", "MAX_TOKENS")
        latency = event.get("latency_ms")
        if isinstance(latency, int) and latency > 0:
            g.latency_ms += latency
            g.timed_output += out
        g.cost += Decimal(str(event.get("cost_usd") or 0))
        user = event.get("user")
        if isinstance(user, str):
            g.users.add(user)
    return sorted(groups.values(), key=lambda g: (-g.cost, g.key))


def render_efficiency(rows: list[Efficiency], fmt: str, by: str) -> str:
    data = [r.row() for r in rows]
    if fmt == "json":
        return json.dumps({"by": by, "groups": data}, indent=2, ensure_ascii=False) + "\n"
    header = ["calls", "mean in", "p95 in", "mean out", "p95 out", "out/in", "trunc", "out tok/s", "cost $",
              "users", "$/user"]
    names = ["calls", "mean_input_tokens", "p95_input_tokens", "mean_output_tokens", "p95_output_tokens",
             "output_input_ratio", "truncation_rate", "output_tokens_per_s", "cost_usd", "active_users",
             "cost_per_active_user_usd"]
    table = [[by, *header]] + [[d["key"], *("-" if d[n] is None else str(d[n]) for n in names)] for d in data]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))])
             for r in table]
    return "\n".join(lines) + "\n"


@dataclass
class Weekly:
    until: datetime
    week_cost: Decimal
    previous_cost: Decimal
    week_requests: int
    week_denials: int
    month_cost: Decimal  # from the month's start to ``until``
    projection: Decimal  # the month's projected spend
    top: dict[str, list[tuple[str, Decimal]]]

    def change_pct(self) -> Decimal | None:
        return _ratio((self.week_cost - self.previous_cost) * 100, self.previous_cost)


def weekly(events: Iterable[Mapping[str, Any]], until: datetime, top: int = 5) -> Weekly:
    """The week ending at ``until`` (events from ``until - 14 days`` or the month's start,
    whichever is earlier, to ``until``)."""
    week_start, prev_start = until - timedelta(days=7), until - timedelta(days=14)
    month_start = until.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if until == month_start:  # the range ends at midnight of the 1st: report the month that ended
        month_start = (month_start - timedelta(days=1)).replace(day=1)
    week = prev = month = Decimal(0)
    requests = denials = 0
    tops: dict[str, dict[str, Decimal]] = {"user": {}, "feature": {}, "model": {}}
    for event in events:
        moment = event_time(event.get("ts"))
        cost = Decimal(str(event.get("cost_usd") or 0))
        if month_start <= moment < until:
            month += cost
        if week_start <= moment < until:
            week += cost
            if event.get("kind") == "denied":
                denials += 1
            else:
                requests += 1
            for name, table in tops.items():
                key = _key(event, name)
                table[key] = table.get(key, Decimal(0)) + cost
        elif prev_start <= moment < week_start:
            prev += cost
    days_in_month = calendar.monthrange(month_start.year, month_start.month)[1]
    month_end = month_start + timedelta(days=days_in_month)
    days_left = Decimal(max((month_end - until).total_seconds(), 0)) / 86400
    projection = month + week / 7 * days_left
    ranked = {name: sorted(t.items(), key=lambda kv: (-kv[1], kv[0]))[:top] for name, t in tops.items()}
    return Weekly(until=until, week_cost=week, previous_cost=prev, week_requests=requests, week_denials=denials,
                  month_cost=month, projection=projection.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN),
                  top=ranked)


def render_weekly(w: Weekly) -> str:
    change = w.change_pct()
    lines = [f"week to {w.until:%Y-%m-%d %H:%M} UTC: ${format_usd(w.week_cost)} over {w.week_requests} calls "
             f"({w.week_denials} denied); previous week ${format_usd(w.previous_cost)}"
             + ("" if change is None else f" ({'+' if change >= 0 else ''}{change}%)"),
             f"month so far ${format_usd(w.month_cost)}; at the last 7 days' rate the month ends near "
             f"${format_usd(w.projection)}"]
    for name, rows in w.top.items():
        if rows:
            lines.append(f"top {name}s: " + ", ".join(f"{k} ${format_usd(v)}" for k, v in rows))
    return "\n".join(lines) + "\n"


def slack_message(w: Weekly) -> dict[str, Any]:
    """An incoming-webhook payload carrying :func:`render_weekly`'s text."""
    text = render_weekly(w)
    return {"text": text.splitlines()[0],
            "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "*LLM spend, weekly*\n" + text}}]}
