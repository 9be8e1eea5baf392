"""The installed `budgetguard` command, run as a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "budgetguard"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "budgetguard"]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_check_config_summarises():
    out = run("check-config", "limits.yaml", env={"REDIS_URL": ""})
    assert out.returncode == 0, out.stderr
    assert "limits.yaml: OK" in out.stdout
    assert "tier       pro: hourly $2.0000, daily $10.0000, monthly $100.0000" in out.stdout
    assert "user       bob: tier pro, overrides monthly_usd" in out.stdout
    assert "pagerduty: off (routing_key is empty)" in out.stdout


def test_check_config_reports_the_bad_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers:\n  pro: {hourly_usd: -1}\n")
    out = run("check-config", str(bad))
    assert out.returncode == 2
    assert out.stderr.strip() == "budgetguard: tiers.pro.hourly_usd: Input should be greater than or equal to 0"
    assert out.stdout == ""


def test_demo_allows_routes_and_denies():
    out = run("demo", env={"REDIS_URL": ""})
    assert out.returncode == 0, out.stderr
    outcomes = re.findall(r"^(alice|carol)\s+\S+\s+(allowed|routed|denied)", out.stdout, re.M)
    assert outcomes[:9] == [("alice", "allowed")] * 9
    assert ("alice", "routed") in outcomes
    assert "denied: model 'gpt-4o' is not allowed for tier 'free'" in out.stdout
    assert re.search(r"carol .* denied: user.hourly cap \$0.1 would be exceeded", out.stdout)


def test_status_and_usage_errors():
    # The embedded store is per process: this command's own would be empty, so it says so.
    out = run("status", "alice", "--config", "limits.yaml", env={"REDIS_URL": ""})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "(embedded, per process)" in out.stderr, out.stderr
    assert run("status", "--colour").returncode == 2  # argparse: an unknown option
    out = run("status", "alice", "--config", "missing.yaml")
    assert out.returncode == 2 and "cannot read missing.yaml" in out.stderr


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_examples_run(example):
    out = subprocess.run([sys.executable, str(example)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "REDIS_URL": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


# -- secrets in URLs -----------------------------------------------------------------------

PASSWORD = "hunter2-store-secret"
SLACK_PATH = "slack-path-secret"
QUERY_TOKEN = "query-token-secret"


def _secret_free(out: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in secrets:
        assert secret not in out.stdout and secret not in out.stderr, secret


def test_check_config_never_prints_the_store_password_or_a_webhook_secret(tmp_path):
    config = tmp_path / "limits.yaml"
    config.write_text(f'redis_url: "redis://default:{PASSWORD}@127.0.0.1:1/0"\n'
                      "alerts:\n"
                      f'  slack: {{webhook_url: "https://hooks.slack.com/services/T0/B0/{SLACK_PATH}"}}\n'
                      f'  webhook: {{url: "https://alerts.example.com/hook?token={QUERY_TOKEN}"}}\n')
    out = run("check-config", str(config))
    assert out.returncode == 0, out.stderr
    assert "store      redis://default:***@127.0.0.1:1/0  (timeout" in out.stdout
    assert "alerts     slack: configured" in out.stdout and "alerts     webhook: configured" in out.stdout
    _secret_free(out, PASSWORD, SLACK_PATH, QUERY_TOKEN)
    # The store named by $REDIS_URL instead.
    config.write_text("fail_mode: closed\n")
    out = run("check-config", str(config), env={"REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:1/0"})
    assert out.returncode == 0, out.stderr
    assert "store      redis://:***@127.0.0.1:1/0  (timeout" in out.stdout
    _secret_free(out, PASSWORD)


@pytest.mark.parametrize("command", [["status", "alice"], ["report"], ["tail", "--timeout", "1"]],
                         ids=lambda c: c[0])
def test_store_errors_never_print_the_store_password(tmp_path, command):
    config = tmp_path / "limits.yaml"
    config.write_text(f'redis_url: "redis://default:{PASSWORD}@127.0.0.1:1/0"\n')  # nothing listens on port 1
    out = run(*command, "--config", str(config))
    assert out.returncode in (1, 2) and "127.0.0.1:1" in out.stderr, out.stderr
    _secret_free(out, PASSWORD)


def test_the_no_stream_error_never_prints_the_store_urls_query():
    # An embedded store has no usage stream: the error names the URL, without its query's values.
    out = run("report", env={"REDIS_URL": f"memory://shared?password={QUERY_TOKEN}"})
    assert out.returncode == 2 and "the store is memory://shared?password=*** (embedded" in out.stderr, out.stderr
    _secret_free(out, QUERY_TOKEN)


def test_demo_banner_never_prints_the_store_password(real_redis, real_redis_url):
    parts = urlsplit(real_redis_url)
    if parts.password:
        secret, url = parts.password, real_redis_url  # the test Redis has a password of its own
    else:
        # Redis accepts any password for its default user when that user has none.
        secret = PASSWORD
        url = urlunsplit(parts._replace(netloc=f"default:{secret}@{parts.netloc}"))
    out = run("demo", "--redis-url", url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("budgetguard demo: limits.yaml, store ")
    assert ":***@" in out.stdout.splitlines()[0] and "keys under bg-demo:" in out.stdout.splitlines()[0]
    _secret_free(out, secret)


# -- the proxy's read deadlines ------------------------------------------------------------


@pytest.mark.parametrize(("flags", "needle"), [
    (["--header-timeout", "0"], "--header-timeout 0: must be a number of seconds above 0"),
    (["--body-timeout", "-1"], "--body-timeout -1: must be a number of seconds above 0"),
    (["--body-deadline", "nan"], "--body-deadline nan: must be a number of seconds above 0"),
    (["--keep-alive-timeout", "inf"], "--keep-alive-timeout inf: must be a number of seconds above 0"),
    (["--body-timeout", "400"], "--body-deadline 300: must not be shorter than --body-timeout (400)"),
    (["--header-timeout", "soon"], "argument --header-timeout: invalid float value: 'soon'"),
])
def test_proxy_timeout_flags_are_checked_before_the_config_is_read(flags, needle):
    out = run("proxy", "--upstream", "http://127.0.0.1:9", "--config", "no-such-limits.yaml", *flags)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and needle in out.stderr, out.stderr


def test_proxy_help_shows_the_timeout_defaults():
    out = run("proxy", "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for flag, default in (("--header-timeout", 10), ("--body-timeout", 30), ("--body-deadline", 300),
                          ("--keep-alive-timeout", 5)):
        assert re.search(rf"{flag} \S+ .*?\(default {default}\)", text), flag
