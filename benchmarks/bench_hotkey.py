"""What do the org's keys cost per request, and what do org budget slices save?

Run by hand (it starts its own servers; nothing else is touched)::

    python benchmarks/bench_hotkey.py [--users 500] [--n 1000] [--rounds 5] [--slice-usd 1]

Every check reserves on the user's keys and on the org's; every record settles both.
The org's keys share one hash slot (``{org}``), so on a Redis Cluster one node sees
every request of the org while user keys spread over all of them. ``org.slice_usd``
lets a process reserve a slice of the org's budget in one call and serve the org's part
of checks from memory, handing spend back in batches.

Four set-ups, each on servers of its own so that INFO commandstats counts its calls
alone: a single Redis with default settings and with slices (two private
``redis-server`` processes), and a 3-primary Redis Cluster (``tests.cluster.LocalCluster``)
with default settings and with slices (two clusters). Each round runs ``--n`` requests
(check, record, then one PING for reference) on every set-up, interleaved request by
request in a shuffled order, so the machine's noise hits all of them alike. All checks
are allowed (caps far away) and each record charges a fixed usage.

Redis 7.0 counts every command a script runs in INFO commandstats under the command's
own name (a SET inside a script adds 1 to ``cmdstat_set``), besides the ``EVALSHA``
itself: "scripts" below are EVALSHA calls, "commands" those run inside them, "Redis µs"
the EVALSHA time Redis reports (the commands inside included).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import benchutil  # noqa: F401  (sets the offline tokenizer cache before budgetguard loads one)
import redis
import redis.cluster
from benchutil import (
    IN_NANO,
    MAX_TOKENS,
    MESSAGES,
    MODEL,
    OUT_NANO,
    PRICES,
    CommandStats,
    PrivateRedis,
    median_us,
    p99_us,
    run_conditions,
    section,
)
from redis.crc import key_slot

from budgetguard import BudgetGuard, Usage
from budgetguard.config import Config, parse_config
from budgetguard.keys import user_tag
from budgetguard.store import connect
from budgetguard.tokens import estimate_input_tokens

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.*
from tests.cluster import LocalCluster

HIGH_CAP_USD = "1000000"  # every window capped (so every script checks it) but never reached
OUTPUT_TOKENS = 100  # what each record charges for output
SCRIPTS = ("reserve", "settle", "slice")
# A process idle this long has handed in its slice spend (slice_flush_s is 1 s): counting
# from and to such a moment charges each request with its own hand-in, no more, no less.
HAND_IN_S = 3.0


def make_config(prefix: str, slice_usd: str | None) -> Config:
    high = {"hourly_usd": HIGH_CAP_USD, "daily_usd": HIGH_CAP_USD, "monthly_usd": HIGH_CAP_USD}
    org: dict[str, Any] = {"daily_usd": HIGH_CAP_USD, "monthly_usd": HIGH_CAP_USD}
    if slice_usd is not None:
        org["slice_usd"] = slice_usd
    return parse_config({
        "key_prefix": prefix, "models": PRICES, "fail_mode": "open",
        # Generous: on a loaded machine a 250 ms deadline could turn a slow reply into an
        # unenforced decision; each is counted (and the run refused) below.
        "redis_timeout_ms": 2000, "reservation_ttl_s": 600,
        "tiers": {"default": high}, "org": org,
    }, env={})


@dataclass
class Setup:
    """One guard on servers of its own, and what was measured on it."""

    name: str
    kind: str  # "single" or "cluster": which PING is its reference
    guard: BudgetGuard
    url: str
    prefix: str
    nodes: dict[int, redis.Redis]  # primary port -> a plain client, for INFO
    users_on: dict[int, int]  # primary port -> how many of the users' slots it serves
    org_port: int
    ping: Callable[[str], Any]  # one PING round trip to the node of a user's keys
    samples: dict[str, list[int]] = field(default_factory=lambda: {"check": [], "record": [], "ping": []})
    per_round: list[dict[str, float]] = field(default_factory=list)  # median µs per step, each round
    stats: dict[int, CommandStats] = field(default_factory=dict)
    requests: int = 0
    unenforced: int = 0
    scripts_before: dict[str, float] = field(default_factory=dict)

    def script_calls(self) -> dict[str, float]:
        """Script calls per script name, counted on the client side (the guard's metrics)."""
        registry = self.guard.metrics.registry
        return {s: registry.get_sample_value("budgetguard_redis_script_seconds_count", {"script": s}) or 0.0
                for s in SCRIPTS}

    def snapshot(self) -> dict[int, CommandStats]:
        return {port: CommandStats.read(client) for port, client in self.nodes.items()}


def single_setup(name: str, server: PrivateRedis, slice_usd: str | None, users: list[str]) -> Setup:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    config = make_config(prefix, slice_usd)
    guard = BudgetGuard(config, redis_url=server.url)
    pinger = connect(config, server.url)  # the guard's kind of client, for the reference PING
    return Setup(name, "single", guard, server.url, prefix, {server.port: server.client}, {server.port: len(users)},
                 server.port, lambda user: pinger.ping())


def cluster_setup(name: str, cluster: LocalCluster, slice_usd: str | None, users: list[str]) -> Setup:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    config = make_config(prefix, slice_usd)
    url = "redis+cluster://" + cluster.url.split("://", 1)[1]
    guard = BudgetGuard(config, redis_url=url)
    pinger = connect(config, url)
    assert isinstance(pinger, redis.cluster.RedisCluster)
    slots = cluster.slot_map()

    def port_of(key: str) -> int:
        slot = key_slot(key.encode())
        return next(primary for (first, last), (primary, _) in slots.items() if first <= slot <= last)

    users_on = Counter(port_of(f"{prefix}:{user_tag(u)}:d") for u in users)
    # In slot order: both clusters split the slots alike, so their nodes pair up by position.
    primaries = [primary for _, (primary, _) in sorted(slots.items())]

    def ping(user: str) -> Any:
        # One node, through the cluster client's routing, like the scripts' round trips.
        return pinger.ping(target_nodes=pinger.get_node_from_key(f"{prefix}:{user_tag(user)}:d"))

    return Setup(name, "cluster", guard, url, prefix, {p: cluster.client(p) for p in primaries},
                 {p: users_on.get(p, 0) for p in primaries}, port_of(f"{prefix}:{{org}}:d"), ping)


def one_request(setup: Setup, user: str) -> None:
    """Check, record, then a PING for reference; each timed."""
    t0 = time.perf_counter_ns()
    d = setup.guard.check(user, MODEL, MESSAGES, max_tokens=MAX_TOKENS)
    t1 = time.perf_counter_ns()
    setup.guard.record(d, Usage(input_tokens=d.estimated_input_tokens, output_tokens=OUTPUT_TOKENS))
    t2 = time.perf_counter_ns()
    setup.ping(user)
    t3 = time.perf_counter_ns()
    if not (d.allowed and d.enforced):
        setup.unenforced += 1
    setup.samples["check"].append(t1 - t0)
    setup.samples["record"].append(t2 - t1)
    setup.samples["ping"].append(t3 - t2)
    setup.requests += 1


def run_round(setups: list[Setup], users: list[str], n: int, offset: int, rng: random.Random) -> None:
    """``n`` requests on every set-up, interleaved one by one in a shuffled order.

    Interleaving request by request (not set-up by set-up) keeps every server busy alike
    and lets a burst of the machine's noise hit all set-ups, not one.
    """
    starts = [len(s.samples["check"]) for s in setups]
    for i in range(n):
        user = users[(offset + i) % len(users)]
        for setup in rng.sample(setups, len(setups)):
            one_request(setup, user)
    for setup, start in zip(setups, starts, strict=True):
        setup.per_round.append({step: median_us(values[start:]) for step, values in setup.samples.items()})


def ledger_ok(setup: Setup, cost_nano: int) -> str:
    """After close(): the org's day holds exactly what was recorded, nothing reserved."""
    config = make_config(setup.prefix, None)
    with BudgetGuard(config, redis_url=setup.url) as reader:
        org = reader.status("anyone").windows["org.daily"]
    want = Decimal(setup.requests * cost_nano) / 10**9
    ok = org.spent_usd == want and org.reserved_usd == 0
    return (f"{setup.name}: org.daily spent ${org.spent_usd} (recorded ${want}), reserved ${org.reserved_usd}"
            f" -> {'ok' if ok else 'MISMATCH'}")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def report_single(single: Setup, sliced: Setup) -> None:
    section("single Redis: per request (check + record)")
    print(f"{'variant':<16} {'scripts':>8} {'reserve':>8} {'settle':>7} {'slice':>7} {'commands':>9} "
          f"{'Redis µs':>9} {'check p50/p99 µs':>17} {'record p50/p99 µs':>18} {'PING p50':>9}")
    rows = {}
    for s in (single, sliced):
        stats = next(iter(s.stats.values()))
        calls = s.script_calls()
        per = {k: (calls[k] - s.scripts_before.get(k, 0)) / s.requests for k in SCRIPTS}
        c, r, p = s.samples["check"], s.samples["record"], s.samples["ping"]
        rows[s.name] = (stats.scripts / s.requests, stats.inner / s.requests, stats.script_usec / s.requests,
                        median_us(c), p99_us(c), median_us(r), p99_us(r))
        print(f"{s.name:<16} {stats.scripts / s.requests:8.3f} {per['reserve']:8.3f} {per['settle']:7.3f} "
              f"{per['slice']:7.4f} {stats.inner / s.requests:9.2f} {stats.script_usec / s.requests:9.1f} "
              f"{median_us(c):8.0f} / {p99_us(c):6.0f} {median_us(r):9.0f} / {p99_us(r):6.0f} {median_us(p):9.0f}")
    a, b = rows[single.name], rows[sliced.name]
    print(f"{'ratio b/a':<16} {ratio(b[0], a[0]):>8} {'':>8} {'':>7} {'':>7} {ratio(b[1], a[1]):>9} "
          f"{ratio(b[2], a[2]):>9} {ratio(b[3], a[3]):>8} / {ratio(b[4], a[4]):>6} {ratio(b[5], a[5]):>9} / "
          f"{ratio(b[6], a[6]):>6}")
    for s in (single, sliced):
        stats = next(iter(s.stats.values()))
        top = ", ".join(f"{k} {v / s.requests:.2f}" for k, v in stats.inner_by_command().items())
        print(f"  commands per request, {s.name}: {top}")


def report_nodes(plain: Setup, sliced: Setup) -> None:
    section("Redis Cluster: per request, on each primary")
    print(f"{'primary':<8} {'serves':<22} | {'default: scripts':>16} {'commands':>9} {'Redis µs':>9} | "
          f"{'slices: scripts':>15} {'commands':>9} {'Redis µs':>9}")
    for a_port, b_port in zip(plain.nodes, sliced.nodes, strict=True):  # the same slots, pairwise
        cells = []
        for s, port in ((plain, a_port), (sliced, b_port)):
            st = s.stats[port]
            cells.append(f"{st.scripts / s.requests:>{15 if s is sliced else 16}.3f} {st.inner / s.requests:9.2f} "
                         f"{st.script_usec / s.requests:9.1f}")
        assert (a_port == plain.org_port) == (b_port == sliced.org_port)
        serves = ("{org} + " if a_port == plain.org_port else "") + f"{plain.users_on[a_port]} users"
        print(f"{'org' if a_port == plain.org_port else 'other':<8} {serves:<22} | {cells[0]} | {cells[1]}")
    for s in (plain, sliced):
        total = sum(s.stats.values(), CommandStats({}, {}))
        org = s.stats[s.org_port]
        calls = s.script_calls()
        per = ", ".join(f"{k} {(calls[k] - s.scripts_before.get(k, 0)) / s.requests:.4f}" for k in SCRIPTS)
        print(f"  {s.name}: all primaries {total.scripts / s.requests:.3f} scripts, {total.inner / s.requests:.2f}"
              f" commands, {total.script_usec / s.requests:.1f} Redis µs per request; the org's node has "
              f"{org.scripts / total.scripts:.0%} of the scripts and {org.script_usec / total.script_usec:.0%} of "
              f"the script time; client side per request: {per}")


def report_latency(setups: list[Setup]) -> None:
    section("latency per step, and as a multiple of a PING on the same kind of client")
    print(f"{'set-up':<16} {'PING p50/p99 µs':>16} {'check p50/p99 µs':>17} {'x PING':>7} "
          f"{'record p50/p99 µs':>18} {'x PING':>7}")
    for s in setups:
        c, r, p = s.samples["check"], s.samples["record"], s.samples["ping"]
        print(f"{s.name:<16} {median_us(p):7.0f} / {p99_us(p):6.0f} {median_us(c):8.0f} / {p99_us(c):6.0f} "
              f"{median_us(c) / median_us(p):7.2f} {median_us(r):9.0f} / {p99_us(r):6.0f} "
              f"{median_us(r) / median_us(p):7.2f}")
    by = {s.name: s for s in setups}
    base = by["single"]
    for name in ("single+slices", "cluster", "cluster+slices"):
        s = by[name]
        print(f"  {name} / single, p50: check {median_us(s.samples['check']) / median_us(base.samples['check']):.2f}"
              f", record {median_us(s.samples['record']) / median_us(base.samples['record']):.2f}")
    plain, sliced = by["cluster"], by["cluster+slices"]
    print(f"  cluster+slices / cluster, p50: check "
          f"{median_us(sliced.samples['check']) / median_us(plain.samples['check']):.2f}, record "
          f"{median_us(sliced.samples['record']) / median_us(plain.samples['record']):.2f}")
    # The same ratios round by round: how far the machine's noise moves them.
    for a, b in ((base, by["single+slices"]), (plain, sliced), (base, plain)):
        spans = []
        for step in ("check", "record"):
            ratios = [rb[step] / ra[step] for ra, rb in zip(a.per_round, b.per_round, strict=True)]
            spans.append(f"{step} {min(ratios):.2f} to {max(ratios):.2f}")
        print(f"  per round, {b.name} / {a.name} p50: {', '.join(spans)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--n", type=int, default=1000, help="requests per set-up per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=300, help="untimed requests per set-up first")
    parser.add_argument("--slice-usd", default="1")
    args = parser.parse_args()
    users = [f"user-{i:04d}" for i in range(args.users)]
    print(run_conditions())
    servers = [PrivateRedis(), PrivateRedis()]
    clusters: list[LocalCluster] = []
    setups: list[Setup] = []
    try:
        clusters = [LocalCluster(), LocalCluster()]
        print(f"redis-server {servers[0].client.info('server')['redis_version']}; single: two private servers; "
              f"cluster: two clusters of 3 primaries + 3 replicas; {args.users} users, {args.rounds} rounds x "
              f"{args.n} requests per set-up, slice_usd {args.slice_usd}")
        setups = [single_setup("single", servers[0], None, users),
                  single_setup("single+slices", servers[1], args.slice_usd, users),
                  cluster_setup("cluster", clusters[0], None, users),
                  cluster_setup("cluster+slices", clusters[1], args.slice_usd, users)]
        rng = random.Random(7)
        run_round(setups, users, args.warmup, 0, rng)  # connections, script loading, the first slice
        for s in setups:
            s.samples = {k: [] for k in s.samples}
            s.per_round = []
        time.sleep(HAND_IN_S)  # the warm-up's slice spend handed in before counting starts
        before = {s.name: s.snapshot() for s in setups}
        for s in setups:
            s.scripts_before = s.script_calls()
            s.requests = 0
        for r in range(args.rounds):
            run_round(setups, users, args.n, r * args.n, rng)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        # The last requests' spend is handed in before counting stops.
        time.sleep(HAND_IN_S)
        for s in setups:
            after = s.snapshot()
            s.stats = {port: after[port] - before[s.name][port] for port in after}
        if any(s.unenforced for s in setups):
            print("WARNING: unenforced or denied decisions: " + ", ".join(f"{s.name} {s.unenforced}" for s in setups))
        report_single(setups[0], setups[1])
        report_nodes(setups[2], setups[3])
        report_latency(setups)
        section("ledger after close()")
        cost = estimate_input_tokens(MODEL, MESSAGES) * IN_NANO + OUTPUT_TOKENS * OUT_NANO  # priced by hand
        while setups:
            s = setups.pop(0)
            s.guard.close()  # hands in the last slice spend
            s.requests += args.warmup
            print(ledger_ok(s, cost))
    finally:
        for s in setups:
            s.guard.close()
        for c in clusters:
            c.stop()
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
