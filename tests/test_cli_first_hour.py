"""What a newcomer meets first: init, doctor, check-config, demo and status, as subprocesses."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import yaml

from budgetguard import BudgetGuard, Usage, load_config
from budgetguard.report import format_usd

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "budgetguard"


def run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    command = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "budgetguard"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line_error(out: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.count("\n") == 1, out.stderr
    return out.stderr


# -- check-config --------------------------------------------------------------------------


def test_check_config_takes_config_like_every_command():
    out = run("check-config", "--config", "limits.yaml", env={"REDIS_URL": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("limits.yaml: OK\n")
    both = run("check-config", "limits.yaml", "--config", "other.yaml")
    assert "two configs given" in one_line_error(both)


def test_check_config_shows_library_prices_of_the_models_it_names():
    out = run("check-config", "limits.yaml", env={"REDIS_URL": ""})
    assert out.returncode == 0, out.stderr
    # gpt-4o is priced in limits.yaml; gpt-4o-mini only through allow-lists and routes.
    assert re.search(r"^model +gpt-4o: in \$2\.5\d*/MTok.*\(\S*limits\.yaml\)", out.stdout, re.M), out.stdout
    assert re.search(r"^model +gpt-4o-mini: in \$\S+/MTok, out \$\S+/MTok \((?!limits)", out.stdout, re.M), out.stdout


def test_misspelt_key_is_one_line_with_a_suggestion(tmp_path):
    bad = tmp_path / "limits.yaml"
    bad.write_text("tiers:\n  pro: {hourly_usdd: 2}\n")
    err = one_line_error(run("check-config", "--config", str(bad)))
    assert "tiers.pro.hourly_usdd: Extra inputs are not permitted (did you mean hourly_usd?)" in err


def test_yaml_syntax_error_is_one_line(tmp_path):
    bad = tmp_path / "limits.yaml"
    bad.write_text("tiers:\n  pro: {hourly_usd: 2\nusers: {}\n")
    err = one_line_error(run("check-config", str(bad)))
    assert err.startswith(f"budgetguard: {bad} is not valid YAML: line ")


# -- init and the shipped sample -----------------------------------------------------------


def test_init_writes_a_commented_config_that_loads_and_never_overwrites(tmp_path):
    out = run("init", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    written = tmp_path / "limits.yaml"
    assert written.read_text().startswith("# budgetguard limits")
    load_config(written, env={})
    written.write_text("# mine\n")
    err = one_line_error(run("init", cwd=tmp_path))
    assert "exists" in err and "--force" in err
    assert written.read_text() == "# mine\n"  # bad input changes nothing
    assert run("init", "--force", cwd=tmp_path).returncode == 0
    assert written.read_text().startswith("# budgetguard limits")


def test_demo_runs_outside_a_checkout_on_the_shipped_sample(tmp_path):
    out = run("demo", cwd=tmp_path, env={"REDIS_URL": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("budgetguard demo: the sample limits.yaml")
    assert re.search(r"carol .* denied: user.hourly cap", out.stdout)


def test_demo_denied_rows_reserve_nothing_and_say_why():
    out = run("demo", env={"REDIS_URL": ""})
    assert out.returncode == 0, out.stderr
    denied = [line for line in out.stdout.splitlines() if re.match(r"^\w+\s+\S+\s+denied ", line)]
    assert len(denied) == 3
    for line in denied:
        assert re.search(r" +- +-  denied: \S", line), line


# -- the demo on a real Redis --------------------------------------------------------------


def _snapshot(client: redis.Redis) -> dict[bytes, object]:
    return {key: client.dump(key) for key in client.scan_iter(count=500) if not key.startswith(b"bg-demo:")}


def test_demo_honours_redis_url_and_keeps_to_its_own_prefix(real_redis, real_redis_url):
    # alice has a real budget under the real prefix: the demo must leave it as it is.
    config = load_config(ROOT / "limits.yaml", env={"REDIS_URL": real_redis_url})
    guard = BudgetGuard(config, redis_url=real_redis_url)
    d = guard.check("alice", "gpt-4o", [{"role": "user", "content": "hi"}], max_tokens=10)
    guard.record(d, Usage(input_tokens=10, output_tokens=10))
    guard.close()
    before = _snapshot(real_redis)
    assert before
    for _ in range(2):  # the second run starts from zero too: its prefix is cleared first
        out = run("demo", env={"REDIS_URL": real_redis_url})
        assert out.returncode == 0, out.stderr
        assert "keys under bg-demo:" in out.stdout.splitlines()[0]
        assert len(re.findall(r"^alice +gpt-4o +allowed", out.stdout, re.M)) == 9
    assert _snapshot(real_redis) == before
    assert any(key.startswith(b"bg-demo:") for key in real_redis.scan_iter(count=500))


# -- status --------------------------------------------------------------------------------


def test_status_shows_a_sub_cent_spend(real_redis, real_redis_url):
    config = load_config(ROOT / "limits.yaml", env={"REDIS_URL": real_redis_url})
    guard = BudgetGuard(config, redis_url=real_redis_url)
    d = guard.check("alice", "gpt-4o-mini", [{"role": "user", "content": "hi"}], max_tokens=10)
    guard.record(d, Usage(input_tokens=10, output_tokens=10))
    spent = guard.status("alice").windows["user.hourly"].spent_usd
    guard.close()
    assert 0 < spent < 0.0001
    out = run("status", "alice", "--config", "limits.yaml", env={"REDIS_URL": real_redis_url})
    assert out.returncode == 0, out.stderr
    assert re.search(rf"user.hourly\s+spent\s+{re.escape(format_usd(spent))}\s", out.stdout), out.stdout


# -- doctor --------------------------------------------------------------------------------


def test_doctor_passes_on_a_good_setup(tmp_path, real_redis, real_redis_url):
    config = tmp_path / "limits.yaml"
    config.write_text("tiers:\n  free: {hourly_usd: 1, models: [gpt-4o-mini]}\ndefault_tier: free\n")
    out = run("doctor", "--config", str(config), env={"REDIS_URL": real_redis_url})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PROBLEM" not in out.stdout and out.stdout.rstrip().endswith("all good")
    assert "encodings: cl100k_base, o200k_base shipped" in out.stdout


def test_doctor_names_each_problem_and_its_fix(tmp_path):
    config = tmp_path / "limits.yaml"
    config.write_text('redis_url: "redis://127.0.0.1:1/0"\n'  # nothing listens on port 1
                      "tiers:\n  free: {models: [no-such-model-xyz]}\ndefault_tier: free\n"
                      "unknown_model: gpt-4o-mini\n"
                      'alerts:\n  slack: {webhook_url: ""}\n')
    out = run("doctor", "--config", str(config))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "PROBLEM  store: redis://127.0.0.1:1/0 does not answer" in out.stdout
    assert "PROBLEM  alerts: slack is listed but its webhook_url is empty" in out.stdout
    assert out.stdout.count("fix: ") == 2
    assert out.stdout.rstrip().endswith("2 problem(s)")


def test_doctor_reports_a_bad_config_with_the_fix(tmp_path):
    config = tmp_path / "limits.yaml"
    config.write_text("default_tierr: x\n")
    out = run("doctor", "--config", str(config))
    assert out.returncode == 1
    assert "did you mean default_tier?" in out.stdout and "budgetguard init" in out.stdout


# -- the proxy at start --------------------------------------------------------------------


def _proxy_config(tmp_path: Path, generated: bool) -> Path:
    entry = {"sha256": "a" * 64, "user": "alice", "generated": generated}
    config = tmp_path / "limits.yaml"
    config.write_text(yaml.safe_dump({"api_keys": [entry]}))
    return config


def test_proxy_on_a_busy_port_prints_no_ready_banner_and_warns_of_generated_keys(tmp_path):
    pytest.importorskip("uvicorn")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run("proxy", "--config", str(_proxy_config(tmp_path, generated=True)), "--upstream",
                  "http://127.0.0.1:9", "--port", str(port), env={"REDIS_URL": ""}, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "budgetguard proxy on http" not in out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr.splitlines()[-1]
    assert "generated budgetguard keys (bg-...) but proxy.upstream_api_key is unset" in out.stderr


def test_hash_key_marks_generated_keys():
    out = run("hash-key", "--generate", "--user", "bob")
    assert out.returncode == 0, out.stderr
    entry = yaml.safe_load(out.stdout.split("\n", 2)[2])[0]
    assert entry["generated"] is True and entry["user"] == "bob"
    typed = run("hash-key", "--key", "sk-own-provider-key", "--user", "bob")
    assert "generated" not in typed.stdout
