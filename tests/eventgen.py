"""Synthetic usage events in the producer's format, and independent sums over them.

The sums here deliberately take another road than budgetguard.report: integer
nano-USD and plain loops, so a report that agrees with them is right twice.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

PRICES = {  # USD per million tokens: (input, cached input, output, provider)
    "gpt-4o": (Decimal("2.5"), Decimal("1.25"), Decimal("10"), "openai"),
    "gpt-4o-mini": (Decimal("0.15"), Decimal("0.075"), Decimal("0.6"), "openai"),
    "claude-3-5-haiku": (Decimal("0.8"), Decimal("0.08"), Decimal("4"), "anthropic"),
    "gemini-2.0-flash": (Decimal("0.1"), Decimal("0.025"), Decimal("0.4"), "google"),
}
USERS = ["alice", "bob", "carol", "dave", "eve", "user:with:colons", "zoë"]
FEATURES = ["chat", "search", "summarise", None]
TENANTS = ["acme", "globex", None]
STREAM = "bg:{org}:events"


def _nano_up(usd: Decimal) -> Decimal:
    return Decimal(math.ceil(usd * 10**9)) / 10**9


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_event(*, ts: datetime, user: str = "alice", tier: str = "pro", model: str = "gpt-4o",
               requested_model: str | None = None, outcome: str = "ok", input_tokens: int = 1000,
               cached: int = 0, output_tokens: int = 200, reasoning: int = 0, max_output: int = 512,
               tags: Mapping[str, str] | None = None, limit: str | None = None, **extra: Any) -> dict[str, Any]:
    """One event exactly as the contract describes it."""
    p_in, p_cached, p_out, provider = PRICES[model]
    denied = outcome == "denied"
    if denied or outcome == "released":
        input_tokens = cached = output_tokens = reasoning = 0
    in_cost = _nano_up(((input_tokens - cached) * p_in + cached * p_cached) / 1_000_000)
    out_cost = _nano_up(output_tokens * p_out / 1_000_000)
    estimated_input = input_tokens + 10 if input_tokens else 900
    estimate = _nano_up((estimated_input * p_in + max_output * p_out) / 1_000_000)
    event = {
        "v": 1, "ts": iso(ts), "kind": "denied" if denied else "usage", "outcome": outcome,
        "request_id": uuid.uuid4().hex, "user": user, "tier": tier, "tags": dict(tags or {}),
        "provider": provider, "requested_model": requested_model or model, "model": model,
        "routed": requested_model not in (None, model), "limit": limit,
        "reason": "denied: user.hourly cap would be exceeded" if denied else "allowed",
        "input_tokens": input_tokens, "cached_input_tokens": cached, "cache_write_tokens": 0,
        "output_tokens": output_tokens, "reasoning_tokens": reasoning,
        "input_cost_usd": f"{in_cost:f}", "output_cost_usd": f"{out_cost:f}", "cost_usd": f"{in_cost + out_cost:f}",
        "estimated_input_tokens": estimated_input, "max_output_tokens": max_output,
        "estimated_cost_usd": f"{estimate:f}",
        "prices": {"input_per_mtok": str(p_in), "output_per_mtok": str(p_out),
                   "cached_input_per_mtok": str(p_cached), "cache_write_per_mtok": None},
        "latency_ms": None if denied else 850, "error": "upstream 500" if outcome == "released" else None,
    }
    event.update(extra)
    return event


def workload(n: int, start: datetime, seed: int = 5, spread: timedelta = timedelta(hours=20)) -> list[dict[str, Any]]:
    """``n`` events over ``spread`` from ``start``, in time order, across users, features, models, outcomes."""
    rng = random.Random(seed)
    step = spread / n
    events = []
    for i in range(n):
        model = rng.choice(list(PRICES))
        outcome = rng.choices(["ok", "released", "expired", "stream_incomplete", "denied"], [80, 5, 2, 3, 10])[0]
        tags = {k: v for k, v in (("feature", rng.choice(FEATURES)), ("tenant", rng.choice(TENANTS))) if v}
        if rng.random() < 0.1:
            tags["experiment"] = "b"
        input_tokens = rng.randint(10, 20_000)
        output_tokens = rng.randint(0, 2_000)
        events.append(make_event(
            ts=start + step * i, user=rng.choice(USERS), tier=rng.choice(["free", "pro"]), model=model,
            requested_model="gpt-4o" if model == "gpt-4o-mini" and rng.random() < 0.3 else None,
            outcome=outcome, input_tokens=input_tokens, cached=rng.randint(0, input_tokens // 2),
            output_tokens=output_tokens, reasoning=rng.randint(0, output_tokens // 3),
            max_output=output_tokens + rng.randint(0, 1000), tags=tags,
            limit="user.hourly" if outcome == "denied" else None))
    return events


def write_stream(client: Any, events: Iterable[Mapping[str, Any]], key: str = STREAM) -> None:
    pipe = client.pipeline(transaction=False)
    for event in events:
        pipe.xadd(key, {"e": json.dumps(event)})
    pipe.execute()


def write_jsonl(path: Path, events: Iterable[Mapping[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        for event in events:
            fh.write(json.dumps(event) + "\n")


def nano(value: str) -> int:
    if "e" in value.lower():  # exponent form, e.g. str(Decimal("0.0000008")) == "8E-7"
        value = format(Decimal(value), "f")
    whole, _, frac = value.partition(".")
    sign = -1 if whole.startswith("-") else 1
    return sign * (abs(int(whole or "0")) * 10**9 + int((frac + "0" * 9)[:9]))


def group_of(event: Mapping[str, Any], by: str | None) -> str:
    if by is None:
        return ""
    if by == "hour":
        return event["ts"][:13] + ":00Z"
    if by in ("feature", "tenant"):
        return event["tags"].get(by) or "(none)"
    return event[by] or "(none)"


def expected(events: Iterable[Mapping[str, Any]], by: str | None) -> dict[str, dict[str, int]]:
    """Per group: counts, token sums and nano-USD sums, by plain loops."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in events:
        g = out[group_of(e, by)]
        g["events"] += 1
        g["denials" if e["kind"] == "denied" else "requests"] += 1
        for k in ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens"):
            g[k] += e[k]
        g["total_tokens"] += e["input_tokens"] + e["output_tokens"]
        g["cost_nano"] += nano(e["cost_usd"])
        g["input_cost_nano"] += nano(e["input_cost_usd"])
        g["output_cost_nano"] += nano(e["output_cost_usd"])
        if e["outcome"] == "ok" and nano(e["estimated_cost_usd"]) > 0:
            g["estimated_requests"] += 1
            g["estimated_nano"] += nano(e["estimated_cost_usd"])
            g["estimated_actual_nano"] += nano(e["cost_usd"])
    return {k: dict(v) for k, v in out.items()}


def mape_pct(events: Iterable[Mapping[str, Any]]) -> Decimal:
    """Mean |actual - estimated| / estimated * 100 over settled calls (callers allow 1e-4 slack)."""
    import decimal

    with decimal.localcontext() as ctx:
        ctx.prec = 40
        errors = [Decimal(abs(nano(e["cost_usd"]) - nano(e["estimated_cost_usd"]))) / nano(e["estimated_cost_usd"])
                  for e in events if e["outcome"] == "ok" and nano(e["estimated_cost_usd"]) > 0]
        return sum(errors, Decimal(0)) * 100 / len(errors)
