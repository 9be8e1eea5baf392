"""What does a budget cost? A check and a record over two budgets (user, org) and over
three (user, tenant, org), against an older checkout's two, in one interleaved run.

Run by hand::

    git worktree add /tmp/bg-before <commit>      # optional: the code to compare against
    python benchmarks/bench_budgets.py [--before /tmp/bg-before] [--rounds 8] [--n 2000]

Each round runs every scenario in a fresh process (in shuffled order) against one private
``redis-server``, so that drift on a shared machine hits them alike; read the ratios. Per
scenario and round it measures:

- the client's sync ``check`` and ``record`` latency (median over ``--n`` calls, tokens
  counted as usual: a short chat message);
- the time inside Redis per reserve and per settle script (INFO commandstats, the
  EVALSHA's usec per call, measured on calls run apart from the timed ones);
- the commands each script runs (commandstats calls inside scripts, per call).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchutil import MAX_TOKENS, MESSAGES, MODEL, PRICES, CommandStats, PrivateRedis, section  # noqa: E402

SCENARIOS = {
    # name: (source tree: "now" or "before", budgets)
    "before: user+org": ("before", False),
    "now: user+org": ("now", False),
    "now: user+tenant+org": ("now", True),
}


def worker(args: argparse.Namespace) -> None:
    """One scenario in this process: print its figures as JSON."""
    import redis

    from budgetguard import BudgetGuard, Usage
    from budgetguard.config import parse_config

    data = {"models": PRICES, "key_prefix": f"bench{os.getpid()}", "reservation_ttl_s": 600,
            "tiers": {"default": {"hourly_usd": 1000, "daily_usd": 1000, "monthly_usd": 1000}},
            "org": {"daily_usd": 100000, "monthly_usd": 100000}, "events": {"stream_maxlen": 1000}}
    tags = None
    if args.budgets:
        data["budgets"] = {"tenant": {"per": "tenant", "monthly_usd": 100000}}
        tags = {"tenant": "acme"}
    guard = BudgetGuard(parse_config(data, env={}), redis_url=args.redis_url)
    admin = redis.Redis.from_url(args.redis_url)
    users = [f"u{i % 50}" for i in range(args.n)]

    def usage(d):
        return Usage(input_tokens=d.estimated_input_tokens, output_tokens=MAX_TOKENS // 2)

    for u in users[:200]:  # warm up: scripts loaded, connections open
        guard.record(guard.check(u, MODEL, MESSAGES, max_tokens=MAX_TOKENS, tags=tags), Usage(1, 1))

    check_ns, record_ns = [], []
    for u in users:
        t0 = time.perf_counter_ns()
        d = guard.check(u, MODEL, MESSAGES, max_tokens=MAX_TOKENS, tags=tags)
        t1 = time.perf_counter_ns()
        guard.record(d, usage(d))
        t2 = time.perf_counter_ns()
        check_ns.append(t1 - t0)
        record_ns.append(t2 - t1)

    # Redis' own time and commands: checks, then records, each phase alone.
    n = min(args.n, 1000)
    before = CommandStats.read(admin)
    decisions = [guard.check(u, MODEL, MESSAGES, max_tokens=MAX_TOKENS, tags=tags) for u in users[:n]]
    mid = CommandStats.read(admin)
    for d in decisions:
        guard.record(d, usage(d))
    after = CommandStats.read(admin)
    reserve, settle = mid - before, after - mid
    guard.close()
    print(json.dumps({
        "check_us": statistics.median(check_ns) / 1000, "record_us": statistics.median(record_ns) / 1000,
        "reserve_usec": reserve.script_usec / max(1, reserve.scripts),
        "settle_usec": settle.script_usec / max(1, settle.scripts),
        "reserve_cmds": reserve.inner / max(1, reserve.scripts), "settle_cmds": settle.inner / max(1, settle.scripts),
        "reserve_by": {k: round(v / n, 2) for k, v in reserve.inner_by_command().items()},
        "settle_by": {k: round(v / n, 2) for k, v in settle.inner_by_command().items()},
    }))


def run(args: argparse.Namespace) -> None:
    scenarios = {k: v for k, v in SCENARIOS.items() if v[0] == "now" or args.before}
    results: dict[str, list[dict[str, float]]] = {k: [] for k in scenarios}
    with PrivateRedis() as server:
        for r in range(args.rounds):
            order = list(scenarios)
            random.shuffle(order)
            for name in order:
                tree, budgets = scenarios[name]
                root = Path(args.before) if tree == "before" else HERE.parent
                env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{HERE}")
                cmd = [sys.executable, str(HERE / "bench_budgets.py"), "--worker", "--redis-url", server.url,
                       "--n", str(args.n)] + (["--budgets"] if budgets else [])
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd="/")
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
            server.client.flushall()

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name])

    section(f"budgets: medians over {args.rounds} interleaved rounds of {args.n} check+record each")
    print(f"{'scenario':24} {'check us':>9} {'record us':>10} {'reserve usec':>13} {'settle usec':>12} "
          f"{'cmds/reserve':>13} {'cmds/settle':>12}")
    for name in scenarios:
        print(f"{name:24} {med(name, 'check_us'):9.1f} {med(name, 'record_us'):10.1f} "
              f"{med(name, 'reserve_usec'):13.1f} {med(name, 'settle_usec'):12.1f} "
              f"{med(name, 'reserve_cmds'):13.1f} {med(name, 'settle_cmds'):12.1f}")
    section("ratios (per round, then the median of the rounds)")

    def ratio(a: str, b: str, key: str) -> str:
        per_round = [x[key] / y[key] for x, y in zip(results[a], results[b], strict=True)]
        return f"{statistics.median(per_round):.2f} (rounds {min(per_round):.2f}-{max(per_round):.2f})"

    three, two = "now: user+tenant+org", "now: user+org"
    print(f"three budgets / two, check:  {ratio(three, two, 'check_us')}")
    print(f"three budgets / two, record: {ratio(three, two, 'record_us')}")
    if args.before:
        old = "before: user+org"
        for key in ("check_us", "record_us", "reserve_usec", "settle_usec"):
            print(f"now / before (two budgets), {key}: {ratio(two, old, key)}")
        print(f"three budgets now / two before, reserve_usec: {ratio(three, old, 'reserve_usec')}")
        print(f"three budgets now / two before, settle_usec: {ratio(three, old, 'settle_usec')}")
    section("commands inside the scripts, per call (last round)")
    for name in scenarios:
        last = results[name][-1]
        print(f"{name}: reserve {last['reserve_by']}\n{' ' * len(name)}  settle {last['settle_by']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", help="a checkout of the code to compare against (e.g. a git worktree)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--budgets", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = p.parse_args()
    worker(args) if args.worker else run(args)


if __name__ == "__main__":
    main()
