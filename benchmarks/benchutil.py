"""Helpers shared by the benchmark scripts (statistics, output, clean-up)."""

from __future__ import annotations

import math
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.utils import HIREDIS_AVAILABLE

# Offline tokenizer files shipped with the tests (tiktoken reads this when it first loads).
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[1] / "tests" / "data" / "tiktoken"))

DEFAULT_URL = "redis://127.0.0.1:6379/14"
MODEL = "gpt-4o"
# Pinned prices: 2.50 and 10.00 USD per million tokens = 2500 and 10000 nano-USD per token.
PRICES = {MODEL: {"input_per_mtok": "2.50", "output_per_mtok": "10.00"}}
IN_NANO, OUT_NANO = 2500, 10000
MESSAGES = [{"role": "user", "content": "Summarise the quarterly report in three bullet points."}]
MAX_TOKENS = 256


def median_us(ns: list[int]) -> float:
    return statistics.median(ns) / 1000 if ns else float("nan")


def p99_us(ns: list[int]) -> float:
    if not ns:
        return float("nan")
    ordered = sorted(ns)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)] / 1000


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 76 - len(title)))


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Unlink every key under ``prefix:``, in batches."""
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += client.unlink(*batch)
    return deleted


# Filler words for requests of a given size (about one token each).
WORDS = ["budget", "spend", "token", "model", "request", "stream", "usage", "reserve", "settle", "cap", "window",
         "user", "org", "price", "latency", "redis", "script", "chunk", "answer", "client"]


def chat_messages(tokens: int, model: str = MODEL) -> list[dict[str, str]]:
    """One user message of at least ``tokens`` input tokens as budgetguard estimates them."""
    from budgetguard.tokens import estimate_input_tokens

    # About one token per word plus the chat format's overhead: start a little short, grow, re-count.
    n = max(1, tokens - 16)
    while True:
        text = " ".join(WORDS[i % len(WORDS)] for i in range(n))
        if estimate_input_tokens(model, [{"role": "user", "content": text}]) >= tokens:
            return [{"role": "user", "content": text}]
        n += 4


# -- private servers and counters ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A throwaway ``redis-server`` on a free loopback port, so that its counters are ours alone."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not on PATH")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client.ping():
                    break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit("the private redis-server did not start") from None
                time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# What a client sends itself (script calls, connection set-up, our own INFO and PING);
# every other command in INFO commandstats ran inside a script. Redis 7.0 counts the
# commands a script runs (redis.call) under their own names, besides the EVALSHA itself.
_CLIENT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "info", "ping", "hello", "select",
                    "readonly", "command", "script|", "cluster|", "client|", "config|", "command|")


def is_client_command(name: str) -> bool:
    return any(name == c or (c.endswith("|") and name.startswith(c)) for c in _CLIENT_COMMANDS)


@dataclass(frozen=True)
class CommandStats:
    """INFO commandstats of one server: calls and microseconds per command."""

    calls: dict[str, int]
    usec: dict[str, int]

    @classmethod
    def read(cls, client: redis.Redis) -> CommandStats:
        raw = client.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in raw.items()}
        usec = {k.removeprefix("cmdstat_"): int(v["usec"]) for k, v in raw.items()}
        return cls(calls, usec)

    def __sub__(self, before: CommandStats) -> CommandStats:
        return CommandStats({k: v - before.calls.get(k, 0) for k, v in self.calls.items()},
                            {k: v - before.usec.get(k, 0) for k, v in self.usec.items()})

    def __add__(self, other: CommandStats) -> CommandStats:
        keys = self.calls.keys() | other.calls.keys()
        return CommandStats({k: self.calls.get(k, 0) + other.calls.get(k, 0) for k in keys},
                            {k: self.usec.get(k, 0) + other.usec.get(k, 0) for k in keys})

    @property
    def scripts(self) -> int:
        """Script calls (EVALSHA; EVAL when a script had to be sent whole)."""
        return self.calls.get("evalsha", 0) + self.calls.get("eval", 0)

    @property
    def script_usec(self) -> int:
        """Time Redis spent running scripts (the commands inside included)."""
        return self.usec.get("evalsha", 0) + self.usec.get("eval", 0)

    @property
    def inner(self) -> int:
        """Commands run inside scripts."""
        return sum(v for k, v in self.calls.items() if not is_client_command(k))

    def inner_by_command(self) -> dict[str, int]:
        return {k: v for k, v in sorted(self.calls.items(), key=lambda kv: -kv[1])
                if v and not is_client_command(k)}


# -- CPU time from /proc (Linux) ------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15 of stat)


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine so far, from /proc/stat."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return 0, 0
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def run_conditions() -> str:
    """One line: the machine and versions a run was made on."""
    import platform

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{os.cpu_count()} CPUs, load average {load} (1/5/15 min) at start, python {platform.python_version()},"
            f" redis-py {redis.__version__} (hiredis {'yes' if HIREDIS_AVAILABLE else 'no'})")
