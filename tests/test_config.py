"""limits.yaml parsing: every mistake is a ConfigError naming the field's path."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from budgetguard import ConfigError, load_config
from budgetguard.config import parse_config
from budgetguard.policy import Policies

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_limits_yaml_loads():
    c = load_config(ROOT / "limits.yaml", env={"REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert c.redis_url == "redis://127.0.0.1:6379/0"
    assert c.tiers["pro"].hourly_usd == Decimal("2.00")
    assert c.tiers["free"].per_request.max_cost_usd == Decimal("0.02")
    assert c.org.alert_at == [Decimal("0.5"), Decimal("0.8"), Decimal("0.9"), Decimal("1.0")]
    assert c.alerts.slack.webhook_url == ""  # unset ${SLACK_WEBHOOK_URL}: the sink is off
    assert load_config(ROOT / "limits.yaml", env={}).redis_url == "memory://"


def test_env_expansion():
    c = parse_config({"redis_url": "${R}", "timezone": "${TZ_NAME:-Europe/Paris}",
                      "tiers": {"t": {"hourly_usd": "${CAP:-1.5}"}}, "default_tier": "t"},
                     env={"R": "redis://127.0.0.1:6380/2"})
    assert (c.redis_url, c.timezone, c.tiers["t"].hourly_usd) == ("redis://127.0.0.1:6380/2", "Europe/Paris",
                                                                  Decimal("1.5"))


def test_user_overrides_merge_onto_the_tier():
    c = load_config(ROOT / "limits.yaml", env={})
    p = Policies(c)
    bob, alice, stranger = p.for_user("bob"), p.for_user("alice"), p.for_user("someone-else")
    assert bob.caps == (2_000_000_000, 10_000_000_000, 250_000_000_000)
    assert alice.caps == (2_000_000_000, 10_000_000_000, 100_000_000_000)
    assert stranger.tier == "free" and stranger.models == frozenset({"gpt-4o-mini"})
    # Per-request caps merge field by field.
    c2 = parse_config({"tiers": {"t": {"per_request": {"max_input_tokens": 10, "max_cost_usd": 1}}},
                       "users": {"u": {"tier": "t", "per_request": {"max_input_tokens": 99}}}}, env={})
    u = Policies(c2).for_user("u")
    assert (u.max_input_tokens, u.max_cost_nano) == (99, 1_000_000_000)


BAD = [
    ({"tiers": {"pro": {"hourly_usd": -1}}}, "tiers.pro.hourly_usd"),
    ({"tiers": {"pro": {"hourly": 1}}}, "tiers.pro.hourly"),
    ({"tierz": {}}, "tierz"),
    ({"tiers": {"pro": {"downgrade": {"at": 0.8, "routes": {"gpt-4o": "no-such-model-zz"}}}}},
     "tiers.pro.downgrade.routes.gpt-4o"),
    ({"org": {"downgrade": {"routes": {"gpt-4o": "nope-model"}}}}, "org.downgrade.routes.gpt-4o"),
    ({"default_tier": "gold"}, "default_tier"),
    ({"users": {"alice": {"tier": "gold"}}}, "users.alice.tier"),
    ({"timezone": "Mars/Olympus"}, "timezone"),
    ({"tiers": {"pro": {"downgrade": {"at": 1.5}}}}, "tiers.pro.downgrade.at"),
    ({"tiers": {"pro": {"downgrade": {"at": 0}}}}, "tiers.pro.downgrade.at"),
    ({"org": {"alert_at": [0.5, 1.2]}}, "org.alert_at.1"),
    ({"alerts": {"pagerduty": {"routing_key": "k", "min_level": 0}}}, "alerts.pagerduty.min_level"),
    ({"alerts": {"slack": {"webhook_url": "not a url"}}}, "alerts.slack.webhook_url"),
    ({"alerts": {"webhook": {"url": "ftp://x"}}}, "alerts.webhook.url"),
    ({"fail_mode": "sometimes"}, "fail_mode"),
    ({"redis_timeout_ms": 0}, "redis_timeout_ms"),
    ({"unknown_model": "nope-model"}, "unknown_model"),
    ({"models": {"mine": {"input_per_mtok": 1}}}, "models.mine"),
    ({"models": {"mine": {"input_per_mtok": 1, "output_per_mtok": 2, "tokenizer": "nope"}}}, "models.mine.tokenizer"),
    ({"tiers": {"pro": {"per_request": {"max_output_tokens": -3}}}}, "tiers.pro.per_request.max_output_tokens"),
    ({"tiers": {"pro": {"hourly_usd": "lots"}}}, "tiers.pro.hourly_usd"),
    ([1, 2], "<root>"),
    ({"tiers": {"t": {"models": ["gpt4o-mini-typo"]}}}, "tiers.t.models.0"),
    ({"tiers": {"t": {"models": ["gpt-4o"], "downgrade": {"routes": {"gpt-4o": "gpt-4o-mini"}}}}},
     "tiers.t.downgrade.routes.gpt-4o"),
    ({"org": {"downgrade": {"routes": {"gpt-4o-mini": "gpt-4o"}}}}, "org.downgrade.routes.gpt-4o-mini"),
    ({"org": {"downgrade": {"routes": {"no-such-source": "gpt-4o-mini"}}}}, "org.downgrade.routes.no-such-source"),
    ({"redis_url": "redis//localhost"}, "redis_url"),
    ({"redis_timeout_ms": True}, "redis_timeout_ms"),
    ({"tiers": {"t": {"hourly_usd": True}}}, "tiers.t.hourly_usd"),
    ({"tiers": {"t": {"hourly_usd": 10_000_000}}}, "tiers.t.hourly_usd"),
    ({"org": {"forecast": "often"}}, "org.forecast"),
    ({"alerts": {"pagerduty": {"routing_key": "k", "min_level": 1.5}}}, "alerts.pagerduty.min_level"),
    ({"alerts": {"slack": {"webhook_url": "http://127.0.0.1:9/x", "min_level": -0.1}}}, "alerts.slack.min_level"),
    ({"alerts": {"slack": {"webhook_url": "https://"}}}, "alerts.slack.webhook_url"),
    ({"alerts": {"slack": {"scopes": ["team"]}}}, "alerts.slack.scopes.0"),
    ({"alerts": {"pagerduty": {"url": "pagerduty.example"}}}, "alerts.pagerduty.url"),
    ({"alerts": {"retries": 11}}, "alerts.retries"),
    ({"events": {"stream_maxlen": -1}}, "events.stream_maxlen"),
    ({"anomaly": {"sigmas": 0}}, "anomaly.sigmas"),
    ({"anomaly": {"baseline_days": 7, "min_history_days": 8}}, "anomaly.min_history_days"),
]


@pytest.mark.parametrize(("data", "path"), BAD)
def test_bad_config_names_the_field(data, path):
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    assert str(info.value).startswith(path + ":") or f" {path}:" in str(info.value) or f"; {path}:" in str(info.value)


def test_yaml_errors(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("tiers:\n  pro: {hourly_usd: 1}\n  pro: {hourly_usd: 2}\n")
    with pytest.raises(ConfigError, match="duplicate key 'pro' at line 3"):
        load_config(dup)
    broken = tmp_path / "broken.yaml"
    broken.write_text("tiers: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    odd_key = tmp_path / "odd.yaml"
    odd_key.write_text("? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match="line 1: a key must be a plain value"):
        load_config(odd_key)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("timezone: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin)
