"""The installed `budgetguard` command, run as a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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
    out = run("status", "alice", "--config", "limits.yaml", env={"REDIS_URL": ""})
    assert out.returncode == 0, out.stderr
    assert re.search(r"user.hourly\s+spent\s+\$0.0000", out.stdout)
    assert run("status", "--colour").returncode == 2  # argparse: an unknown option
    out = run("status", "alice", "--config", "missing.yaml")
    assert out.returncode == 2 and "cannot read missing.yaml" in out.stderr


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_examples_run(example):
    out = subprocess.run([sys.executable, str(example)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "REDIS_URL": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
