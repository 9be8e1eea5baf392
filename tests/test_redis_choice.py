"""The test suite's choice of Redis: $REDIS_URL, else a private redis-server, never a
server that merely happens to listen on 127.0.0.1:6379 (it may hold someone's data)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from .conftest import redis_choice

ROOT = Path(__file__).resolve().parent.parent

INNER = """
import os

def test_records_the_url(real_redis_url):
    with open(os.environ["BG_URL_OUT"], "w") as out:
        out.write(real_redis_url)
"""


def test_redis_choice_order() -> None:
    assert redis_choice({"REDIS_URL": "redis://h:1/2"}, "/usr/bin/redis-server") == ("url", "redis://h:1/2")
    assert redis_choice({}, "/usr/bin/redis-server") == ("start", "/usr/bin/redis-server")
    assert redis_choice({"REDIS_URL": ""}, "/usr/bin/redis-server")[0] == "start"
    assert redis_choice({}, None)[0] == "skip"
    assert redis_choice({"CI": "true"}, None)[0] == "fail"


def _run_inner(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], str | None]:
    """Run a one-test session using the suite's fixtures in a child pytest; return its result and URL."""
    inner = tmp_path / "test_inner.py"
    inner.write_text(INNER)
    out = tmp_path / "url.txt"
    env = {**env, "BG_URL_OUT": str(out)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(inner)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    return proc, out.read_text() if out.exists() else None


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CI")}


def test_without_redis_url_the_suite_starts_its_own_server_and_stops_it(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but redis-server is not on PATH")
        pytest.skip("redis-server is not on PATH")
    proc, url = _run_inner(tmp_path, _base_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert url is not None and url.startswith("redis://127.0.0.1:")
    assert not url.startswith("redis://127.0.0.1:6379/")  # a private port, not the shared one
    # The private server ended with the session.
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    with pytest.raises(redis.ConnectionError):
        client.ping()
    client.close()


def test_redis_url_is_used_as_given(tmp_path: Path, real_redis_url: str) -> None:
    proc, url = _run_inner(tmp_path, {**_base_env(), "REDIS_URL": real_redis_url})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert url == real_redis_url


@pytest.mark.parametrize(("ci", "code", "word"), [(None, 0, "1 skipped"), ("true", 1, "CI=true but no Redis")])
def test_without_any_redis_the_suite_skips_or_fails_under_ci(tmp_path: Path, ci: str | None, code: int,
                                                             word: str) -> None:
    env = _base_env()
    env["PATH"] = str(tmp_path / "empty-bin")  # no redis-server to be found
    if ci:
        env["CI"] = ci
    proc, url = _run_inner(tmp_path, env)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert url is None
    assert word in proc.stdout
