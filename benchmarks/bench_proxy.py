"""Load test of the budget proxy: throughput, added latency, Redis calls, and the ledger after.

Run by hand (it starts its own servers; nothing else is touched)::

    python benchmarks/bench_proxy.py [--concurrency 32,1] [--block 500] [--rounds 6]
                                     [--variants single,cluster,cluster+slices] [--slice-usd 1]

Three processes besides this one: the fake OpenAI upstream of the tests
(``tests/upstream.py``, served by uvicorn), the proxy (``python -m budgetguard proxy``)
and Redis: a private ``redis-server`` (variant ``single``) or a 3-primary Redis Cluster
(``tests.cluster.LocalCluster``; variants ``cluster`` and ``cluster+slices``, the latter
with ``org.slice_usd``). This process is the load generator: one keep-alive connection
per concurrent caller on one asyncio loop, each sending its next request as soon as the
last one is answered; stage 1 runs at each ``--concurrency`` level in turn.

Requests are chat completions of about 1,000 input tokens and ``max_tokens`` 64, from
200 callers (one API key each): half JSON, a quarter streaming with
``stream_options.include_usage``, a quarter streaming without. Every fifth caller is on
a tier with small hourly and daily caps, which they reach early: their further requests
get 429. Stage 1 alternates blocks of ``--block`` requests through the proxy and the
same requests straight to the upstream, ``--rounds`` times, so the machine's noise hits
both alike: the added latency is the difference of the two in one run. Stage 2 then
sends requests through the proxy until the org's daily cap, set a few hundred requests
above what stage 1 can spend, has denied ``--org-denials`` of them.

Then the proxy is stopped (SIGTERM: it hands in its slice spend and gives the slice
back) and the ledger is read from Redis and checked against what the callers saw: every
window's spent within its cap, the org's spent equal to the usage of every 200 answer
priced here from pinned prices, each user's likewise, no reservation or lease left, and
one usage event per 200 answer and one denial event per 429.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import benchutil  # noqa: F401  (sets the offline tokenizer cache before budgetguard loads one)
import httpx
import redis
import yaml
from benchutil import (
    CommandStats,
    PrivateRedis,
    chat_messages,
    cpu_seconds,
    free_port,
    machine_jiffies,
    run_conditions,
    section,
)
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.*
from tests.cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[1]

MODEL = "gpt-4o"
# Pinned prices, USD per million tokens; the ledger is checked against these, priced here.
PRICES = {"input": Decimal("2.50"), "cached": Decimal("1.25"), "output": Decimal("10.00")}
MAX_TOKENS = 64
INPUT_TOKENS = 1000  # the request's size as budgetguard estimates it (at least)
# What the fake upstream reports for every chat completion (tests/upstream.py defaults):
# the proxy strips the usage chunk from streams that did not ask for it.
UPSTREAM_USAGE = (1000, 200, 50)  # prompt tokens, of which cached, completion tokens
USERS = 200
CAPPED_EVERY = 5  # every fifth user is on the small tier
# The small tier: reached after a handful of requests (hourly first, daily just above).
CAPPED_TIER = {"hourly_usd": "0.02", "daily_usd": "0.025", "monthly_usd": "0.1"}
STANDARD_TIER = {"hourly_usd": "5", "daily_usd": "10", "monthly_usd": "50"}
ORG_HEADROOM = 300  # requests the org cap allows beyond the most stage 1 can spend
KINDS = (("json", 2), ("stream_usage", 1), ("stream", 1))  # request kinds and their weights
SCRIPTS = ("reserve", "settle", "slice", "lookup")
# uvicorn closes keep-alive connections idle for 5 s; ours reconnect well before that.
IDLE_S = 2.0
# A proxy idle this long has handed in its slice spend (slice_flush_s is 1 s): counting Redis
# calls from and to such a moment charges each request with its own hand-in.
HAND_IN_S = 3.0


# -- pricing, by hand ------------------------------------------------------------------------


def cost_nano(prompt: int, cached: int, completion: int) -> int:
    """One answer's cost from the pinned prices, rounded up to the nano-USD (as the contract says)."""
    usd = ((prompt - cached) * PRICES["input"] + cached * PRICES["cached"]
           + completion * PRICES["output"]) / Decimal(1_000_000)
    return math.ceil(usd * 10**9)


def nano_of(usd: Decimal | str) -> int:
    return int(Decimal(usd) * 10**9)


# -- the fake upstream, in its own process -----------------------------------------------------


def serve_upstream(port: int) -> None:
    """Run the tests' fake OpenAI upstream on ``port`` until killed (the ``--serve-upstream`` mode)."""
    import uvicorn

    from tests.upstream import Upstream, create_upstream

    class QuietUpstream(Upstream):
        def record(self, request: Any, body: bytes) -> None:
            pass  # the tests keep every request; a load test would only grow the list

    uvicorn.run(create_upstream(QuietUpstream()), host="127.0.0.1", port=port, log_level="warning",
                access_log=False, lifespan="off")


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{what} did not answer at {url}")


def start_upstream() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(port)], stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v1/models", proc, "the fake upstream")
    return proc, url


def stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """SIGTERM, then wait (the proxy settles and hands in its slice on the way out)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


# -- callers and the proxy's config ------------------------------------------------------------


def api_key(user: int) -> str:
    return f"bg-bench-{user:03d}"


def user_name(user: int) -> str:
    return f"u{user:03d}"


def capped(user: int) -> bool:
    return user % CAPPED_EVERY == 0


def proxy_config(prefix: str, redis_url: str, org_cap_nano: int, slice_usd: str | None) -> dict[str, Any]:
    org: dict[str, Any] = {"daily_usd": str(Decimal(org_cap_nano) / 10**9),
                           "monthly_usd": str(Decimal(2 * org_cap_nano) / 10**9)}
    if slice_usd is not None:
        org["slice_usd"] = slice_usd
    return {
        "redis_url": redis_url, "key_prefix": prefix, "fail_mode": "open",
        # Generous, as in the other benchmarks: on a saturated machine a 250 ms deadline could
        # turn a slow reply into an unenforced decision (each is counted below).
        "redis_timeout_ms": 2000,
        "reservation_ttl_s": 600,
        "models": {MODEL: {"input_per_mtok": str(PRICES["input"]), "output_per_mtok": str(PRICES["output"]),
                           "cached_input_per_mtok": str(PRICES["cached"])}},
        "default_tier": "standard",
        "tiers": {"standard": STANDARD_TIER, "capped": CAPPED_TIER},
        "users": {user_name(u): {"tier": "capped"} for u in range(USERS) if capped(u)},
        "org": org,
        "api_keys": [{"sha256": hashlib.sha256(api_key(u).encode()).hexdigest(), "user": user_name(u),
                      "name": f"key-{u:03d}"} for u in range(USERS)],
        "proxy": {"passthrough": "none"},
    }


def start_proxy(config: dict[str, Any], upstream: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    path = workdir / f"proxy-{config['key_prefix']}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = workdir / f"proxy-{config['key_prefix']}.log"
    port = free_port()
    # This checkout's budgetguard, whatever else is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "budgetguard", "proxy", "--config", str(path), "--upstream",
                                 upstream, "--port", str(port), "--no-access-log"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc, "the proxy")
    return proc, url, log


def script_counts(proxy_url: str) -> dict[str, float]:
    """Script calls the proxy made so far, by script (its /metrics)."""
    text = httpx.get(proxy_url + "/metrics", timeout=10).text
    counts = dict.fromkeys(SCRIPTS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "budgetguard_redis_script_seconds_count":
                counts[sample.labels["script"]] = sample.value
    return counts


# -- load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    user: int
    kind: str


@dataclass
class Result:
    request: Request
    status: int
    seconds: float
    usage: tuple[int, int, int] | None  # as the caller saw it; None: not shown (a stream without include_usage)
    limit: str
    enforced: bool
    complete: bool  # a stream ended with [DONE], a JSON body parsed


def plan(n: int, rng: random.Random) -> list[Request]:
    kinds = [k for k, weight in KINDS for _ in range(weight)]
    return [Request(rng.randrange(USERS), rng.choice(kinds)) for _ in range(n)]


def bodies() -> dict[str, bytes]:
    messages = chat_messages(INPUT_TOKENS, MODEL)
    base = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS}
    return {"json": json.dumps(base).encode(),
            "stream_usage": json.dumps({**base, "stream": True, "stream_options": {"include_usage": True}}).encode(),
            "stream": json.dumps({**base, "stream": True}).encode()}


def read_usage(kind: str, status: int, body: bytes) -> tuple[tuple[int, int, int] | None, bool]:
    """(usage the caller saw, whether the answer was complete) of one answer."""
    if status != 200:
        return None, True
    if kind == "json":
        usage = json.loads(body)["usage"]
        return (usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"],
                usage["completion_tokens"]), True
    found = None
    lines = body.decode().split("\n")
    for line in lines:
        if line.startswith("data: {") and '"usage": {' in line:
            usage = json.loads(line[6:])["usage"]
            found = (usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"],
                     usage["completion_tokens"])
    return found, "data: [DONE]" in lines


class Connection:
    """A minimal HTTP/1.1 client on one keep-alive connection: one request at a time.

    The load generator shares the machine's two CPUs with the proxy, the upstream and
    Redis; httpx costs several times more CPU per request than this, and a generator
    short of CPU would add its own queueing to every latency measured.
    """

    def __init__(self, base: str) -> None:
        url = httpx.URL(base)
        self.host, self.port = url.host, url.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = 0.0

    async def post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.writer is not None and time.monotonic() - self.used > IDLE_S:
            await self.close()  # the server may be closing it: never send on an idle connection
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n{head}"
                          f"content-length: {len(body)}\r\n\r\n".encode() + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        fields = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
        if "content-length" in fields:
            data = await self.reader.readexactly(int(fields["content-length"]))
        elif fields.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")  # no trailers are sent: the last CRLF
                    break
                parts.append((await self.reader.readexactly(size + 2))[:-2])
            data = b"".join(parts)
        else:  # delimited by the connection's end
            data = await self.reader.read()
            fields["connection"] = "close"
        if fields.get("connection", "").lower() == "close":
            await self.close()
        self.used = time.monotonic()
        return status, fields, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None


async def send(connection: Connection, request: Request, body: bytes) -> Result:
    headers = {"authorization": f"Bearer {api_key(request.user)}", "content-type": "application/json"}
    started = time.perf_counter()
    status, fields, data = await connection.post("/v1/chat/completions", headers, body)
    seconds = time.perf_counter() - started
    usage, complete = read_usage(request.kind, status, data)
    return Result(request, status, seconds, usage, fields.get("x-budget-limit", ""),
                  fields.get("x-budget-enforced", "true") != "false", complete)


@dataclass
class Block:
    target: str  # "proxy" | "direct"
    results: list[Result]
    wall: float
    cpu: dict[str, float]  # process -> CPU seconds used during the block
    machine: tuple[int, int]  # busy, total jiffies during the block


async def run_block(target: str, connections: list[Connection], requests: list[Request],
                    payloads: dict[str, bytes], pids: dict[str, int]) -> Block:
    """Every request once, by one worker per connection, each sending its next as soon as it is answered."""
    pending: Iterator[Request] = iter(requests)
    results: list[Result] = []

    async def worker(connection: Connection) -> None:
        for request in pending:  # one shared iterator: each worker takes the next request
            results.append(await send(connection, request, payloads[request.kind]))

    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    jiffies0 = machine_jiffies()
    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    wall = time.perf_counter() - started
    jiffies1 = machine_jiffies()
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    return Block(target, results, wall, cpu, (jiffies1[0] - jiffies0[0], jiffies1[1] - jiffies0[1]))


# -- the ledger --------------------------------------------------------------------------------

_WINDOW = re.compile(r":(\{u:(?P<user>[^}]+)\}|\{org\}):(?P<period>[hdm]):\d+$")


@dataclass
class Ledger:
    lines: list[str] = field(default_factory=list)
    ok: bool = True

    def check(self, ok: bool, text: str) -> None:
        self.ok = self.ok and ok
        self.lines.append(("ok    " if ok else "FAIL  ") + text)


def cap_nano(user: str | None, period: str, org_cap: int) -> int:
    if user is None:
        return org_cap if period == "d" else 2 * org_cap
    tier = CAPPED_TIER if capped(int(user[1:])) else STANDARD_TIER
    return nano_of(tier[{"h": "hourly_usd", "d": "daily_usd", "m": "monthly_usd"}[period]])


def verify(nodes: list[redis.Redis], prefix: str, org_cap: int, results: list[Result]) -> Ledger:
    """Read every key under ``prefix`` on every primary and hold it against what the callers saw."""
    ledger = Ledger()
    answered = [r for r in results if r.status == 200]
    paid = {id(r): cost_nano(*(r.usage or UPSTREAM_USAGE)) for r in answered}
    by_user: Counter[str] = Counter()
    for r in answered:
        by_user[user_name(r.request.user)] += paid[id(r)]
    windows = leases = reserved_windows = over = 0
    live_leases = 0
    tightest = Decimal(0)
    org_day = 0
    user_day: Counter[str] = Counter()
    events: list[dict[str, Any]] = []
    for node in nodes:
        for key in node.scan_iter(match=f"{prefix}:*", count=1000):
            name = key.decode() if isinstance(key, bytes) else key
            m = _WINDOW.search(name)
            if m:
                spent, res = (int(v or 0) for v in node.hmget(name, "s", "r"))
                cap = cap_nano(m["user"], m["period"], org_cap)
                windows += 1
                over += spent > cap
                reserved_windows += res != 0
                tightest = max(tightest, Decimal(spent) / cap)
                if m["user"] is None and m["period"] == "d":
                    org_day += spent
                elif m["period"] == "d":
                    user_day[m["user"]] += spent
            elif name.endswith(":leases"):
                leases += 1
                live_leases += node.zcard(name)
            elif name.endswith(":events"):
                # The cluster's node clients decode replies; the single server's does not.
                events = [json.loads(fields.get(b"e") or fields["e"]) for _, fields in node.xrange(name) or []
                          if fields]
    total = sum(paid.values())
    ledger.check(over == 0, f"{windows} windows: spent within the cap in every one (highest spent/cap "
                            f"{tightest:.4f})")
    ledger.check(reserved_windows == 0 and live_leases == 0,
                 f"reserved 0 in every window ({reserved_windows} not); {live_leases} leases left "
                 f"({leases} lease sets)")
    ledger.check(org_day == total, f"org.daily spent {Decimal(org_day) / 10**9} = sum of {len(answered)} answers "
                                   f"priced here {Decimal(total) / 10**9}")
    wrong = [u for u in by_user.keys() | user_day.keys() if by_user[u] != user_day[u]]
    ledger.check(not wrong, f"user.daily spent = that user's answers priced here, for all {len(by_user)} users "
                            f"with answers ({len(wrong)} differ)")
    usage_events = [e for e in events if e.get("kind") == "usage"]
    outcomes = Counter(e.get("outcome") for e in usage_events)
    event_total = sum(nano_of(e["cost_usd"]) for e in usage_events)
    denied = sum(1 for r in results if r.status == 429)
    ledger.check(outcomes == Counter({"ok": len(answered)}) and event_total == total,
                 f"usage events {dict(outcomes)}, their cost {Decimal(event_total) / 10**9}")
    denials = sum(1 for e in events if e.get("kind") == "denied")
    ledger.check(denials == denied, f"{denials} denial events for {denied} answers 429")
    return ledger


# -- reporting ---------------------------------------------------------------------------------


def ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000


@dataclass
class Level:
    """Stage 1 at one concurrency: the blocks, and Redis' counters over them."""

    concurrency: int
    blocks: list[Block]
    stats: dict[int, CommandStats]  # per primary
    scripts: dict[str, float]  # script calls by name, as the proxy counted them

    def of(self, target: str) -> list[Block]:
        return [b for b in self.blocks if b.target == target]

    def count(self, target: str) -> int:
        return sum(len(b.results) for b in self.of(target))

    def wall(self, target: str) -> float:
        return sum(b.wall for b in self.of(target))

    def cpu_ms(self, target: str, process: str) -> float:
        """CPU milliseconds of ``process`` per request during ``target``'s blocks."""
        return sum(b.cpu[process] for b in self.of(target)) / self.count(target) * 1000

    def busy(self, target: str) -> float:
        blocks = self.of(target)
        return sum(b.machine[0] for b in blocks) / max(1, sum(b.machine[1] for b in blocks))

    def latency(self, target: str, kinds: set[str], status: int = 200) -> tuple[int, float, float]:
        times = [r.seconds for b in self.of(target) for r in b.results if r.status == status
                 and r.request.kind in kinds]
        return len(times), ms(times, 0.5), ms(times, 0.99)


JSON, STREAM = {"json"}, {"stream", "stream_usage"}


def report_level(name: str, level: Level, org_port: int | None) -> dict[str, Any]:
    n_proxy, n_direct = level.count("proxy"), level.count("direct")
    section(f"{name}, concurrency {level.concurrency}: {n_proxy} requests through the proxy, {n_direct} straight "
            "to the upstream")
    print(f"{'':<20} {'answers':>8} {'p50 ms':>8} {'p99 ms':>8}")
    rows = {"proxy json 200": level.latency("proxy", JSON), "proxy stream 200": level.latency("proxy", STREAM),
            "proxy 429": level.latency("proxy", JSON | STREAM, 429),
            "direct json 200": level.latency("direct", JSON), "direct stream 200": level.latency("direct", STREAM)}
    for label, (count, p50, p99) in rows.items():
        print(f"{label:<20} {count:8d} {p50:8.2f} {p99:8.2f}")
    added = {}
    for k in ("json", "stream"):
        proxy, direct = rows[f"proxy {k} 200"], rows[f"direct {k} 200"]
        added[k] = (proxy[1] - direct[1], proxy[2] - direct[2])
        print(f"added by the proxy, {k}: p50 {added[k][0]:+.2f} ms, p99 {added[k][1]:+.2f} ms "
              f"(p50 ratio {proxy[1] / direct[1]:.2f})")
    statuses = Counter(r.status for b in level.of("proxy") for r in b.results)
    wall_p, wall_d = level.wall("proxy"), level.wall("direct")
    print(f"throughput: proxy {n_proxy / wall_p:.0f} requests/s ({statuses[200] / wall_p:.0f} answers 200/s); "
          f"direct {n_direct / wall_d:.0f} requests/s; proxy statuses {dict(sorted(statuses.items()))}")
    # Redis per request through the proxy (the direct blocks touch no Redis).
    total = sum(level.stats.values(), CommandStats({}, {}))
    per_script = ", ".join(f"{k} {v / n_proxy:.3f}" for k, v in level.scripts.items() if v)
    print(f"Redis per proxied request: {total.scripts / n_proxy:.3f} script calls ({per_script}), "
          f"{total.inner / n_proxy:.1f} commands inside them, {total.script_usec / n_proxy:.0f} µs of script time")
    if len(level.stats) > 1:
        shares = " | ".join(f"{'{org} node' if port == org_port else 'node'} {s.scripts / n_proxy:.2f} scripts "
                            f"{s.script_usec / n_proxy:.0f} µs" for port, s in level.stats.items())
        print(f"  per primary: {shares}")
    gen_p = sum(b.cpu["loadgen"] for b in level.of("proxy")) / wall_p
    gen_d = sum(b.cpu["loadgen"] for b in level.of("direct")) / wall_d
    proxy_core = sum(b.cpu["proxy"] for b in level.of("proxy")) / wall_p
    print(f"CPU ms per request: proxy {level.cpu_ms('proxy', 'proxy'):.2f} (the proxy process at {proxy_core:.0%} "
          f"of one CPU); upstream {level.cpu_ms('proxy', 'upstream'):.2f} (via proxy) / "
          f"{level.cpu_ms('direct', 'upstream'):.2f} (direct); load generator {level.cpu_ms('proxy', 'loadgen'):.2f}"
          f" / {level.cpu_ms('direct', 'loadgen'):.2f}")
    print(f"machine CPU busy: {level.busy('proxy'):.0%} of {os.cpu_count()} CPUs during proxy blocks, "
          f"{level.busy('direct'):.0%} during direct blocks; load generator at {gen_p:.0%} / {gen_d:.0%} of one CPU")
    if max(level.busy("proxy"), level.busy("direct"), gen_p, gen_d, proxy_core) > 0.9:
        print("NOTE: saturated (a process at >90% of one CPU, or the machine at >90%): latencies include "
              "queueing for CPU")
    return {"rps": n_proxy / wall_p, "ok_rps": statuses[200] / wall_p, "direct_rps": n_direct / wall_d,
            "rows": rows, "added": added, "scripts": total.scripts / n_proxy, "commands": total.inner / n_proxy,
            "script_us": total.script_usec / n_proxy, "cpu_proxy_ms": level.cpu_ms("proxy", "proxy"),
            "proxy_core": proxy_core, "busy": level.busy("proxy"), "denied": statuses[429],
            "org_share": (level.stats[org_port].scripts / total.scripts) if org_port in level.stats else None}


def report_end(stage2: list[Block], proxied: list[Result], ledger: Ledger, proxy_log: Path) -> None:
    s2 = [r for b in stage2 for r in b.results]
    limits = Counter(r.limit for r in s2 if r.status == 429)
    print(f"\nstage 2 (until the org cap): {len(s2)} requests, {sum(r.status == 200 for r in s2)} answered 200, "
          f"429 by limit {dict(limits)}")
    print(f"all {len(proxied)} proxied requests: statuses {dict(sorted(Counter(r.status for r in proxied).items()))},"
          f" unenforced {sum(not r.enforced for r in proxied)}, incomplete {sum(not r.complete for r in proxied)}")
    print("ledger:")
    for line in ledger.lines:
        print("  " + line)
    problems = [line for line in proxy_log.read_text(errors="replace").splitlines()
                if " WARNING " in line or " ERROR " in line or "Traceback" in line]
    print(f"proxy log: {len(problems)} warning/error lines" + (f", first: {problems[0]}" if problems else ""))


# -- one variant -------------------------------------------------------------------------------


@dataclass
class Store:
    url: str  # redis_url for the proxy
    nodes: dict[int, redis.Redis]  # primaries: port -> plain client


@dataclass
class Target:
    name: str  # "proxy" | "direct"
    connections: list[Connection]


async def run_stage1(name: str, concurrency: int, requests: list[Request], targets: dict[str, Target],
                     store: Store, proxy_url: str, args: argparse.Namespace, payloads: dict[str, bytes],
                     pids: dict[str, int]) -> Level:
    await asyncio.sleep(HAND_IN_S)
    before = {port: CommandStats.read(c) for port, c in store.nodes.items()}
    scripts_before = script_counts(proxy_url)
    blocks = []
    for r in range(args.rounds):
        chunk = requests[r * args.block:(r + 1) * args.block]
        for target in ("proxy", "direct") if r % 2 == 0 else ("direct", "proxy"):
            blocks.append(await run_block(target, targets[target].connections[:concurrency], chunk, payloads, pids))
        print(f"{name}, concurrency {concurrency}: round {r + 1}/{args.rounds}", file=sys.stderr)
    await asyncio.sleep(HAND_IN_S)
    after = {port: CommandStats.read(c) for port, c in store.nodes.items()}
    scripts_after = script_counts(proxy_url)
    return Level(concurrency, blocks, {port: after[port] - before[port] for port in after},
                 {k: scripts_after[k] - scripts_before[k] for k in SCRIPTS})


async def run_variant(name: str, store: Store, org_port: int | None, slice_usd: str | None,
                      upstream: tuple[subprocess.Popen[bytes], str], args: argparse.Namespace, workdir: Path,
                      payloads: dict[str, bytes]) -> list[dict[str, Any]]:
    up_proc, up_url = upstream
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    rng = random.Random(args.seed)  # every variant sends the same requests
    warmup = plan(args.warmup, rng)
    stage1 = [plan(args.block * args.rounds, rng) for _ in args.concurrency]
    org_cap = org_cap_for(warmup + [r for requests in stage1 for r in requests])
    proc, proxy_url, log = start_proxy(proxy_config(prefix, store.url, org_cap, slice_usd), up_url, workdir)
    pids = {"proxy": proc.pid, "upstream": up_proc.pid, "loadgen": os.getpid()}
    most = max(args.concurrency)
    targets = {"proxy": Target("proxy", [Connection(proxy_url) for _ in range(most)]),
               "direct": Target("direct", [Connection(up_url) for _ in range(most)])}
    warm: list[Result] = []
    levels: list[Level] = []
    stage2: list[Block] = []
    try:
        # Warm-up: connections, the proxy's tokenizer and scripts, the first slice.
        warm = (await run_block("proxy", targets["proxy"].connections, warmup, payloads, pids)).results
        await run_block("direct", targets["direct"].connections, warmup, payloads, pids)
        for concurrency, requests in zip(args.concurrency, stage1, strict=True):
            levels.append(await run_stage1(name, concurrency, requests, targets, store, proxy_url, args, payloads,
                                           pids))
        for _ in range(args.max_stage2_blocks):
            stage2.append(await run_block("proxy", targets["proxy"].connections, plan(args.block, rng), payloads,
                                          pids))
            if sum(r.limit == "org.daily" for b in stage2 for r in b.results) >= args.org_denials:
                break
    finally:
        for target in targets.values():
            for connection in target.connections:
                await connection.close()
        code = stop(proc)
    if code not in (0, -signal.SIGTERM):
        print(f"the proxy exited with code {code}")
    proxied = warm + [r for level in levels for b in level.of("proxy") for r in b.results] + \
        [r for b in stage2 for r in b.results]
    ledger = verify(list(store.nodes.values()), prefix, org_cap, proxied)
    summaries = [report_level(name, level, org_port) for level in levels]
    report_end(stage2, proxied, ledger, log)
    for summary, level in zip(summaries, levels, strict=True):
        summary.update(ledger=ledger.ok, concurrency=level.concurrency, variant=name)
    return summaries


def estimate_nano() -> int:
    """The reservation of one request: its estimated input plus max_tokens, at the pinned prices."""
    from budgetguard.tokens import estimate_input_tokens

    tokens = estimate_input_tokens(MODEL, json.loads(bodies()["json"])["messages"])
    return math.ceil((tokens * PRICES["input"] + MAX_TOKENS * PRICES["output"]) * 1000)


def org_cap_for(requests: list[Request]) -> int:
    """The org's daily cap: the most these requests can spend, plus ORG_HEADROOM requests.

    A capped user can be answered at most as often as their daily cap allows (the last
    answer reserved at the full estimate, the others charged their actual cost).
    """
    estimate, actual = estimate_nano(), cost_nano(*UPSTREAM_USAGE)
    per_capped = (nano_of(CAPPED_TIER["daily_usd"]) - estimate) // actual + 1
    counts = Counter(r.user for r in requests)
    most = sum(min(n, per_capped) if capped(u) else n for u, n in counts.items())
    return (most + ORG_HEADROOM) * actual


# -- main --------------------------------------------------------------------------------------


def summary_table(summaries: list[dict[str, Any]]) -> None:
    section("summary")
    print("| variant | concurrency | proxy req/s | direct req/s | JSON p50 / p99 ms, proxy | direct | "
          "stream p50 / p99 ms, proxy | direct | added p50 JSON / stream ms | Redis scripts / req | commands / req "
          "| proxy CPU ms / req | ledger |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for s in summaries:
        rows = s["rows"]

        def cell(label: str, rows: dict[str, tuple[int, float, float]] = rows) -> str:
            return f"{rows[label][1]:.1f} / {rows[label][2]:.1f}"

        print(f"| {s['variant']} | {s['concurrency']} | {s['rps']:.0f} | {s['direct_rps']:.0f} | "
              f"{cell('proxy json 200')} | {cell('direct json 200')} | {cell('proxy stream 200')} | "
              f"{cell('direct stream 200')} | {s['added']['json'][0]:.1f} / {s['added']['stream'][0]:.1f} | "
              f"{s['scripts']:.2f} | {s['commands']:.1f} | {s['cpu_proxy_ms']:.2f} | "
              f"{'ok' if s['ledger'] else 'FAILED'} |")


async def amain(args: argparse.Namespace) -> int:
    variants = args.variants.split(",")
    print(run_conditions())
    payloads = bodies()
    print(f"{USERS} callers ({USERS // CAPPED_EVERY} on the capped tier), requests of {INPUT_TOKENS}+ input tokens, "
          f"max_tokens {MAX_TOKENS}; stage 1 per concurrency level: {args.rounds} rounds x {args.block} requests "
          f"each way; concurrency {args.concurrency}; slice_usd {args.slice_usd} where used")
    summaries: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    upstream = start_upstream()
    server: PrivateRedis | None = None
    cluster: LocalCluster | None = None
    try:
        if "single" in variants:
            server = PrivateRedis()
            print(f"redis-server {server.client.info('server')['redis_version']}")
            store = Store(server.url, {server.port: redis.Redis(host="127.0.0.1", port=server.port)})
            summaries += await run_variant("single", store, None, None, upstream, args, workdir, payloads)
            server.stop()
            server = None
        clustered = [v for v in variants if v.startswith("cluster")]
        if clustered:
            cluster = LocalCluster()
            primaries = [primary for _, (primary, _) in sorted(cluster.slot_map().items())]
            store = Store("redis+cluster://" + cluster.url.split("://", 1)[1],
                          {p: cluster.client(p) for p in primaries})
            org_port = cluster.primary_for_key("{org}")
            for name in clustered:
                summaries += await run_variant(name, store, org_port,
                                               args.slice_usd if name == "cluster+slices" else None, upstream, args,
                                               workdir, payloads)
    finally:
        stop(upstream[0], 10)
        if server is not None:
            server.stop()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    summary_table(summaries)
    return 0 if all(s["ledger"] for s in summaries) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=[32, 1],
                        help="concurrency levels, comma-separated (stage 1 runs at each)")
    parser.add_argument("--block", type=int, default=500, help="requests per block")
    parser.add_argument("--rounds", type=int, default=6, help="stage 1: proxy and direct blocks, alternating")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--variants", default="single,cluster,cluster+slices")
    parser.add_argument("--slice-usd", default="1")
    parser.add_argument("--org-denials", type=int, default=100, help="stage 2 ends after this many org.daily 429s")
    parser.add_argument("--max-stage2-blocks", type=int, default=6)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return
    sys.exit(asyncio.run(amain(args)))


if __name__ == "__main__":
    main()
