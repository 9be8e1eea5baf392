"""A few thousand calls through the real guard on a frozen clock and a real Redis; the
report, in every grouping and format, equals sums computed from the raw events."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import timedelta
from decimal import Decimal

import redis
from prometheus_client.parser import text_string_to_metric_families

from budgetguard import BudgetGuard, Usage
from budgetguard.cli import main
from budgetguard.config import parse_config
from budgetguard.metrics import Metrics

from .eventgen import nano
from .reportcheck import FORMATS, GROUPINGS, check_report, run_all

CALLS = 3000
MODELS = {  # pinned prices, USD per million tokens; the providers come from the pricing library
    "gpt-4o": {"input_per_mtok": "2.50", "output_per_mtok": "10.00", "cached_input_per_mtok": "1.25"},
    "gpt-4o-mini": {"input_per_mtok": "0.15", "output_per_mtok": "0.60", "cached_input_per_mtok": "0.075"},
    "claude-3-5-haiku-latest": {"input_per_mtok": "0.80", "output_per_mtok": "4.00", "cached_input_per_mtok": "0.08"},
    "gemini-2.0-flash": {"input_per_mtok": "0.10", "output_per_mtok": "0.40", "cached_input_per_mtok": "0.025"},
}
FEATURES = ["chat", "search", "summarise", None]
TENANTS = ["acme", "globex", None]


def _config(jsonl_path):
    return parse_config({
        "models": MODELS,
        "reservation_ttl_s": 600,
        "default_tier": "free",
        "tiers": {
            "free": {"hourly_usd": "0.003", "per_request": {"max_output_tokens": 1500},
                     "models": ["gpt-4o-mini", "gemini-2.0-flash"]},
            "pro": {"hourly_usd": "0.03", "downgrade": {"at": "0.8", "routes": {"gpt-4o": "gpt-4o-mini"}}},
        },
        "users": {f"p{i}": {"tier": "pro"} for i in range(6)},
        "org": {"monthly_usd": "100000"},
        "events": {"stream_maxlen": 100_000, "jsonl_path": str(jsonl_path)},
    }, env={})


def test_workload_report_equals_the_raw_events(real_redis, real_redis_url, clock, tmp_path, monkeypatch, capsys):
    jsonl = tmp_path / "usage.jsonl"
    g = BudgetGuard(_config(jsonl), redis_url=real_redis_url, clock=clock)
    rng = random.Random(55)
    users = [f"p{i}" for i in range(6)] + [f"f{i}" for i in range(6)]
    done: Counter[str] = Counter()
    start = clock()
    for i in range(CALLS):
        clock.advance(seconds=20)  # 3000 calls over 16 h 40 min: many hours, across midnight
        user = rng.choice(users)
        model = rng.choice(list(MODELS))
        max_tokens = rng.randint(50, 2000)
        tags = {k: v for k, v in (("feature", rng.choice(FEATURES)), ("tenant", rng.choice(TENANTS))) if v}
        words = " ".join(rng.choice(["budget", "report", "quarter", "summary"]) for _ in range(rng.randint(5, 400)))
        d = g.check(user, model, [{"role": "user", "content": words}], max_tokens=max_tokens, tags=tags,
                    request_id=f"req-{i}")
        if not d.allowed:
            done["denied"] += 1
        elif rng.random() < 0.07:
            g.release(d, error="upstream 503: " + "x" * 600)
            done["released"] += 1
        else:
            inp = d.estimated_input_tokens + rng.randint(-3, 3)
            out = rng.randint(0, max_tokens)
            g.record(d, Usage(input_tokens=max(inp, 1), output_tokens=out, cached_input_tokens=rng.randint(0, inp // 3),
                              reasoning_tokens=rng.randint(0, out // 4)))
            done["ok"] += 1
    g.flush()
    org_month = g.status("p0").windows["org.monthly"].spent_usd
    g.close()

    client = redis.Redis.from_url(real_redis_url)
    raw = [json.loads(fields[b"e"]) for _, fields in client.xrange("bg:{org}:events")]
    client.close()
    file_events = [json.loads(line) for line in jsonl.read_text().splitlines()]
    key = lambda e: e["request_id"]  # noqa: E731
    # Settles reach the stream in the script, denials from a background queue: compare as sets.
    assert sorted(raw, key=key) == sorted(file_events, key=key)
    assert len(raw) == CALLS and Counter(e["outcome"] for e in raw) == done
    assert done["denied"] > 100 and done["released"] > 100 and done["ok"] > 1500
    limits = Counter((e["kind"], e["limit"]) for e in raw)
    assert limits[("denied", "user.hourly")] > 10 and limits[("denied", "model.not_allowed")] > 10
    assert limits[("usage", "user.hourly")] > 10  # routed near the cap
    assert sum(e["routed"] for e in raw) > 10 and {e["provider"] for e in raw} == {"openai", "anthropic", "google"}
    assert all(len(e["error"]) == 500 for e in raw if e["outcome"] == "released")
    # The ledger and the log agree: the org's month spent is the sum of the events' costs.
    assert nano(f"{org_month:f}") == sum(nano(e["cost_usd"]) for e in raw)
    for e in raw:
        assert nano(e["cost_usd"]) == nano(e["input_cost_usd"]) + nano(e["output_cost_usd"])

    # The metrics hook, fed the same events, holds the same spend per tier, provider and model.
    metrics = Metrics()
    for e in raw:
        metrics.observe_event(e)
    spend: dict[tuple[str, str, str], Decimal] = {}
    for e in raw:
        if Decimal(e["cost_usd"]):
            label = (e["tier"], e["provider"], e["model"])
            spend[label] = spend.get(label, Decimal(0)) + Decimal(e["cost_usd"])
    scraped = {(s.labels["tier"], s.labels["provider"], s.labels["model"]): s.value
               for f in text_string_to_metric_families(metrics.render()[0].decode())
               for s in f.samples if s.name == "budgetguard_spend_usd_total"}
    assert scraped == {label: float(total) for label, total in spend.items()}

    until = (clock() + timedelta(minutes=1)).isoformat()
    since = f"{int((clock() - start).total_seconds() // 3600) + 2}h"
    limits = tmp_path / "limits.yaml"
    limits.write_text("redis_url: ${REDIS_URL}\n")
    base = ("report", "--config", str(limits), "--since", since, "--until", until, "--top", "20")
    # Every grouping in every format through the command's entry point in this process (fast),
    # then each format through the installed command.
    monkeypatch.setenv("REDIS_URL", real_redis_url)
    for by in GROUPINGS:
        for fmt in FORMATS:
            assert main([*base, "--format", fmt, *(("--by", by) if by else ())]) == 0
            check_report(capsys.readouterr().out, fmt, by, raw)
    cases = [("user", "table"), ("hour", "csv"), ("tenant", "json")]
    outs = run_all([(*base, "--format", fmt, "--by", by) for by, fmt in cases], {"REDIS_URL": real_redis_url})
    for (by, fmt), out in zip(cases, outs, strict=True):
        assert out.returncode == 0, out.stderr
        check_report(out.stdout, fmt, by, raw)
