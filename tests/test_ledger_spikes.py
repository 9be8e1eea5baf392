"""Per-user and per-tenant spikes: one alert when one spends more than a share of the org's
daily budget in one UTC hour, named with its top features and models; found by the shipper
on the ledger, claimed once across shippers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from budgetguard.cli import main
from budgetguard.ledger.spikes import threshold_nano

from .eventgen import make_event, write_stream
from .ledgerdb import ledger_database
from .receiver import receiver

H = datetime(2026, 3, 10, 14, tzinfo=UTC)
PER_USD = 400_000  # gpt-4o input tokens per dollar at the tests' $2.50 per million


def _spend(user: str, usd: float, *, minute: int, feature: str, tenant: str | None = None,
           model: str = "gpt-4o", hour: datetime = H) -> dict:
    tags = {"feature": feature} | ({"tenant": tenant} if tenant else {})
    return make_event(ts=hour + timedelta(minutes=minute), user=user, model=model,
                      input_tokens=int(usd * PER_USD), output_tokens=0, max_output=0, tags=tags)


def test_threshold_is_exact():
    from decimal import Decimal

    assert threshold_nano(Decimal("0.01"), Decimal("100")) == 1_000_000_000
    assert threshold_nano(Decimal("0.003"), Decimal("0.000000333")) == 1  # rounded up, never down
    with pytest.raises(ValueError):
        threshold_nano(Decimal(0), Decimal(100))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_one_alert_per_user_and_tenant_hour_above_the_share(real_redis, real_redis_url, tmp_path, kind,
                                                             monkeypatch, capsys):
    events = [
        _spend("alice", 0.6, minute=1, feature="chat", tenant="acme"),
        _spend("alice", 0.5, minute=20, feature="search", tenant="acme"),  # $1.1: over $1
        _spend("bob", 0.9, minute=5, feature="chat"),  # under
        _spend("dave", 1.0, minute=7, feature="chat"),  # exactly the threshold: not above it
        _spend("carol", 0.2, minute=30, feature="chat", tenant="acme"),  # acme: $1.3 (with alice's)
        _spend("alice", 0.4, minute=5, feature="chat", hour=H + timedelta(hours=1)),  # the next hour: under
    ]
    events[1]["model"] = "gpt-4o-2"  # priced as gpt-4o by make_event, named apart
    write_stream(real_redis, events)
    monkeypatch.setenv("REDIS_URL", real_redis_url)
    with ledger_database(kind, tmp_path) as url, receiver() as r:
        limits = tmp_path / "limits.yaml"
        limits.write_text("redis_url: ${REDIS_URL}\norg: {daily_usd: 100}\n"
                          f"alerts:\n  webhook: {{url: '{r.url}/hook', scopes: [org]}}\n")
        args = ["ship", "--config", str(limits), "--to", url, "--once", "--quiet", "--spike-share", "0.01"]
        assert main(args) == 0
        bodies = r.wait_for("/hook", 2)
        text = [json.dumps(b) for b in bodies]
        assert len(bodies) == 2
        (user,) = [t for t in text if "user alice" in t]
        (tenant,) = [t for t in text if "tenant acme" in t]
        assert "1.10% of the org's daily budget" in user and "1.30% of the org's daily budget" in tenant
        assert "top features: chat $0.6, search $0.5" in user and "gpt-4o $0.6, gpt-4o-2 $0.5" in user
        assert "bob" not in "".join(text) and "dave" not in "".join(text)
        # More of alice's spend in the same hour, shipped later (by another shipper): no second alert.
        write_stream(real_redis, [_spend("alice", 0.3, minute=40, feature="chat", tenant="acme")])
        assert main([*args, "--consumer", "other"]) == 0
        assert len(r.bodies("/hook")) == 2
        assert main([*args[:-2], "--spike-share", "0"]) == 2
        assert "--spike-share must be above 0" in capsys.readouterr().err
