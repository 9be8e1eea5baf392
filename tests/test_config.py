"""limits.yaml parsing: every mistake is a ConfigError naming the field's path."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from budgetguard import ConfigError, load_config
from budgetguard.config import UserConfig, parse_config
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


# Hostile files: each is refused with a ConfigError before it can hang the loader, exhaust the
# stack or make every check slow.


def test_billion_laughs_is_refused(tmp_path):
    # Nine levels of ten aliases: a 1 KB file that expands to 10**9 strings.
    lines = ['l0: &l0 ["lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]
    lines.append("tiers: {t: {models: *l9}}")
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"expands to more than [\d,]+ nodes through aliases"):
        load_config(laughs, env={})


@pytest.mark.parametrize(("opening", "closing"), [("[", "]"), ("{a: ", "}")], ids=["lists", "mappings"])
def test_deep_nesting_is_a_config_error_not_a_recursion_error(tmp_path, opening, closing):
    deep = tmp_path / "deep.yaml"
    deep.write_text("tiers: " + opening * 5000 + "1" * (opening == "{a: ") + closing * 5000 + "\n")
    with pytest.raises(ConfigError, match="line 1: nests deeper than 64 levels"):
        load_config(deep, env={})


def test_aliases_cannot_nest_past_the_depth_bound(tmp_path):
    # Every line is shallow, but each anchor wraps the one before: 2,000 levels once expanded.
    lines = ["l0: &l0 [1]"] + [f"l{i}: &l{i} [*l{i - 1}]" for i in range(1, 2000)]
    chain = tmp_path / "chain.yaml"
    chain.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="nests deeper than 64 levels of mappings and lists once aliases"):
        load_config(chain, env={})


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    loop = tmp_path / "loop.yaml"
    loop.write_text("tiers: &t {pro: *t}\n")
    with pytest.raises(ConfigError, match="line 1: an alias refers to a mapping or list that contains it"):
        load_config(loop, env={})


def test_parse_config_refuses_deep_or_self_containing_data():
    deep: dict[str, object] = {}
    inner = deep
    for _ in range(5000):
        inner["a"] = inner = {}
    with pytest.raises(ConfigError, match=r"^a\.a\.a.*: nests deeper than 64 levels"):
        parse_config(deep, env={})
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(ConfigError, match=r"^tiers\.0\.0.*: nests deeper than 64 levels"):
        parse_config({"tiers": loop}, env={})


def test_a_long_alert_at_list_is_refused(tmp_path):
    long_list = tmp_path / "alerts.yaml"
    long_list.write_text("org: {alert_at: [" + ", ".join(["0.5"] * 10_000) + "]}\n")
    with pytest.raises(ConfigError, match=r"^org\.alert_at: List should have at most 16 items"):
        load_config(long_list, env={})


def test_an_oversized_file_is_refused_before_parsing(tmp_path):
    # Valid YAML (one long comment), so only the size bound can refuse it.
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (16 * 1024 * 1024) + "\ntiers: {}\n")
    with pytest.raises(ConfigError, match=r"big\.yaml is larger than 16 MiB"):
        load_config(big, env={})


def _api_keys(n: int) -> list[dict[str, str]]:
    return [{"sha256": f"{i:064x}", "user": f"u{i}"} for i in range(n)]


OVERSIZED = [
    ({"org": {"alert_at": [0.5] * 17}}, "org.alert_at", 16),
    ({"tiers": {"t": {"alert_at": [0.5] * 17}}}, "tiers.t.alert_at", 16),
    ({"users": {"u": {"alert_at": [0.5] * 17}}}, "users.u.alert_at", 16),
    ({"tiers": {"t": {"models": ["gpt-4o-mini"] * 1001}}}, "tiers.t.models", 1000),
    ({"users": {"u": {"models": ["gpt-4o-mini"] * 1001}}}, "users.u.models", 1000),
    ({"org": {"downgrade": {"routes": {f"m{i}": "gpt-4o-mini" for i in range(1001)}}}},
     "org.downgrade.routes", 1000),
    ({"models": {f"m{i}": {"input_per_mtok": 1, "output_per_mtok": 1} for i in range(1001)}}, "models", 1000),
    ({"tiers": {f"t{i}": {} for i in range(1001)}}, "tiers", 1000),
    ({"users": {f"u{i}": {} for i in range(10_001)}}, "users", 10_000),
    ({"api_keys": _api_keys(10_001)}, "api_keys", 10_000),
    ({"alerts": {"webhook": {"url": "https://hooks.example/x", "headers": {f"X-H{i}": "v" for i in range(65)}}}},
     "alerts.webhook.headers", 64),
    ({"alerts": {"slack": {"scopes": ["org", "user", "budget", "org"]}}}, "alerts.slack.scopes", 3),
]


@pytest.mark.parametrize(("data", "path", "bound"), OVERSIZED, ids=[path for _, path, _ in OVERSIZED])
def test_oversized_collections_name_the_field_and_the_bound(data, path, bound):
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    assert str(info.value).startswith(f"{path}: ")
    assert f"at most {bound} items" in str(info.value)


def test_thousands_of_problems_make_a_short_message():
    with pytest.raises(ConfigError) as info:
        parse_config({"users": {f"u{i}": {"daily_usd": -1} for i in range(5000)}}, env={})
    message = str(info.value)
    assert message.startswith("users.u0.daily_usd: Input should be greater than or equal to 0; ")
    assert message.endswith("; and 4,980 more problems")
    assert message.count("users.u") == 20


def test_a_tier_shared_through_an_anchor_still_loads(tmp_path):
    # Anchors and aliases in ordinary use stay well inside the bounds.
    shared = tmp_path / "shared.yaml"
    shared.write_text(
        "tiers:\n"
        "  pro: &pro\n"
        "    daily_usd: 10\n"
        "    models: &allowed [gpt-4o, gpt-4o-mini]\n"
        "    alert_at: &levels [0.5, 0.9]\n"
        "  team: {daily_usd: 50, models: *allowed, alert_at: *levels}\n"
        "users:\n"
        "  alice: *pro\n"
        "  bob: {tier: team, models: *allowed}\n"
    )
    c = load_config(shared, env={})
    assert c.tiers["team"].daily_usd == Decimal(50)
    assert c.tiers["team"].models == c.tiers["pro"].models == ["gpt-4o", "gpt-4o-mini"]
    assert c.tiers["team"].alert_at == c.tiers["pro"].alert_at == [Decimal("0.5"), Decimal("0.9")]
    assert c.users["alice"] == UserConfig(**c.tiers["pro"].model_dump())
    assert c.users["bob"].models == ["gpt-4o", "gpt-4o-mini"]


def test_slack_hears_of_users_only_when_asked() -> None:
    # The org's channel would otherwise get every user's crossing: [org] unless scopes say more.
    assert parse_config({"alerts": {"slack": {"webhook_url": ""}}}).alerts.slack.scopes == ["org"]
    asked = parse_config({"alerts": {"slack": {"webhook_url": "", "scopes": ["org", "user"]}}})
    assert asked.alerts.slack.scopes == ["org", "user"]


@pytest.mark.parametrize(("data", "hint"), [
    ({"tiers": {"pro": {"hourly_usdd": 2}}}, "tiers.pro.hourly_usdd: Extra inputs are not permitted "
                                              "(did you mean hourly_usd?)"),
    ({"tiers": {"pro": {"per_request": {"max_input_token": 3}}}}, "(did you mean max_input_tokens?)"),
    ({"users": {"bob": {"tierr": "pro"}}}, "users.bob.tierr: Extra inputs are not permitted (did you mean tier?)"),
    ({"alerts": {"slak": {}}}, "(did you mean slack?)"),
    ({"default_tierr": "x"}, "(did you mean default_tier?)"),
])
def test_misspelt_keys_get_the_nearest_valid_one(data: dict, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert hint in str(info.value)


def test_unrelated_keys_get_no_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"zzzz": 1})
    assert "did you mean" not in str(info.value)


def test_yaml_syntax_errors_are_one_line(tmp_path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text("tiers:\n  pro:\n    hourly_usd: [1\n  x: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path} is not valid YAML: line 4, column 4: ")
