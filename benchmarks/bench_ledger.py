"""How fast does ``budgetguard ship`` move events from the usage stream into SQL?

Run by hand (never in the test suite)::

    python benchmarks/bench_ledger.py [--redis-url URL] [--pg URL] [--n 200000] [--batch 1000]
                                      [--targets sqlite,postgresql]

For each target: a stream of ``--n`` events in the producer's format (the tests' synthetic
workload: 7 users, 4 models, tags, every outcome) is written under a fresh key prefix, a
fresh consumer group and an empty ledger are made (a new SQLite file in a temporary
directory; a new PostgreSQL database, dropped at the end), and one shipper ships the
whole stream with ``run_once`` in this process, as ``budgetguard ship --once`` does. The
figure is events committed and acknowledged per second of that call (setup excluded),
then the table is checked: as many rows as events, the sum of ``cost_nano`` equal to the
events' own. Last, the time ``report --db --by model`` takes over every row. The
database runs on the same machine, sharing its CPUs with the shipper.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import redis
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from budgetguard.ledger.command import db_events
from budgetguard.ledger.shipper import ShipOptions, Shipper
from budgetguard.ledger.store import open_ledger
from budgetguard.report import build_report
from tests.eventgen import workload


def _fill(client: redis.Redis, key: str, n: int) -> int:
    """Write ``n`` events (the synthetic workload, repeated with new times); their total cost in nano-USD."""
    base = workload(5000, datetime(2026, 3, 1, tzinfo=UTC), seed=1, spread=timedelta(days=1))
    total = 0
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        event = dict(base[i % len(base)])
        event["ts"] = (datetime(2026, 3, 1, tzinfo=UTC) + timedelta(seconds=i * 10)).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
        total += int(Decimal(event["cost_usd"]) * 10**9)
        pipe.xadd(key, {"e": json.dumps(event, separators=(",", ":"))})
        if len(pipe) >= 5000:
            pipe.execute()
    pipe.execute()
    return total


def _pg_database(admin_url: str) -> tuple[str, str]:
    import psycopg

    name = f"bg_ledger_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return admin_url.rsplit("/", 1)[0] + "/" + name, name


def _drop_pg(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run(target: str, args: argparse.Namespace, client: redis.Redis) -> None:
    key = f"bench-{uuid.uuid4().hex[:8]}:{{org}}:events"
    print(f"\n== {target}: writing {args.n} events to {key} ...", flush=True)
    want = _fill(client, key, args.n)
    drop = None
    tmp = tempfile.TemporaryDirectory()
    if target == "postgresql":
        url, drop = _pg_database(args.pg)
    else:
        url = f"sqlite:///{tmp.name}/ledger.db"
    ledger = open_ledger(url)
    try:
        shipper = Shipper(client, key, ledger, options=ShipOptions(batch_size=args.batch, consumer="bench"),
                          stream_maxlen=0)
        started = time.perf_counter()
        cpu = time.process_time()
        stats = shipper.run_once()
        seconds = time.perf_counter() - started
        cpu_s = time.process_time() - cpu
        with ledger.engine.connect() as conn:
            rows, total = conn.execute(sa.text("SELECT count(*), sum(cost_nano) FROM usage_events")).one()
        assert rows == args.n and int(total) == want, (rows, total, want)
        print(f"{target}: {stats.inserted} events in {seconds:.2f} s = {stats.inserted / seconds:,.0f} events/s "
              f"(batches of {args.batch}; shipper CPU {cpu_s:.2f} s = {cpu_s / seconds:.0%} of one core); "
              f"rows {rows}, sum(cost_nano) equals the events'", flush=True)
        # The SQL report over every row: rows streamed through the report's arithmetic.
        started = time.perf_counter()
        events, _ = db_events(url, "usage_events", None, None)
        report = build_report(events, by="model")
        seconds = time.perf_counter() - started
        assert report.totals.events == args.n
        print(f"{target}: report --db --by model over {args.n} rows in {seconds:.2f} s "
              f"({args.n / seconds:,.0f} rows/s)", flush=True)
    finally:
        ledger.close()
        client.delete(key)
        if drop:
            _drop_pg(args.pg, drop)
        tmp.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14"))
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--n", default=200_000, type=int)
    parser.add_argument("--batch", default=5000, type=int)
    parser.add_argument("--targets", default="postgresql,sqlite")
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    print(f"Python {platform.python_version()}, Redis {client.info()['redis_version']}, SQLAlchemy {sa.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    for target in args.targets.split(","):
        run(target, args, client)


if __name__ == "__main__":
    main()
