"""Does a hanging or dead alert sink slow ``BudgetGuard.record``?

Run by hand against a real Redis (never memory://)::

    python benchmarks/bench_alerts.py [--redis-url URL] [--n N] [--rounds R]

Three guards on the same Redis, with the same limits, differing only in their alert sinks:

- ``none``: no sinks (the settle script still claims the same thresholds and the guard
  still builds the Alert objects; nothing is handed to the dispatcher);
- ``hanging``: Slack and webhook sinks on a local HTTP server (127.0.0.1) that accepts
  every request and never answers until the benchmark ends (``timeout_s`` 60, the most
  the config allows, longer than a default run);
- ``dead``: the same sinks on a closed port of 127.0.0.1 (connection refused at once;
  retried with the configured backoff, then dropped).

How the alerts fire on every record: the tier's only cap is ``hourly_usd`` equal to one
request's worst case, with ``alert_at: [1.0]``, and every check/record uses a user id
never used before. The record charges exactly the estimate, so each record takes a fresh
user's hourly window to 100% and the settle script reports one new threshold crossing
(one alert, two deliveries: Slack and webhook). With a sink, every record submits one
alert to the guard's background dispatcher; its bounded queue (``queue_size``) fills
behind the hanging/dead delivery and later alerts are dropped (counted, logged once a
minute). The org has no alert levels, so no alert does a ranking lookup in Redis; the
anomaly detector keeps its defaults (without a week of history it never fires).

Timed: ``record`` only (the ``check`` before it is outside the timed region). Each
iteration runs the three variants once in shuffled order, so drift on a noisy machine
hits them alike; read the ratios. Keys live under a fresh ``bench-<hex>`` prefix that is
deleted at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis
from benchutil import (
    DEFAULT_URL,
    IN_NANO,
    MAX_TOKENS,
    MESSAGES,
    MODEL,
    OUT_NANO,
    PRICES,
    delete_prefix,
    median_us,
    p99_us,
)
from redis.utils import HIREDIS_AVAILABLE

from budgetguard import BudgetGuard, Usage
from budgetguard.config import Config, parse_config
from budgetguard.tokens import estimate_input_tokens

HIGH_USD = "1000000"
VARIANTS = ("none", "hanging", "dead")
SINKS = ("slack", "webhook")


# -- local sinks -------------------------------------------------------------------------


class HangingServer:
    """HTTP on 127.0.0.1: reads each POST, then holds the answer until ``release()``."""

    def __init__(self) -> None:
        self.hold = threading.Event()
        self.received = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server.lock:
                    server.received += 1
                server.hold.wait()
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def release(self) -> None:
        self.hold.set()

    def close(self) -> None:
        self.hold.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port_url() -> str:
    """A port on 127.0.0.1 that was just free: nothing listens there (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


# -- guards ------------------------------------------------------------------------------


def request_estimate_usd() -> Decimal:
    nano = estimate_input_tokens(MODEL, MESSAGES) * IN_NANO + MAX_TOKENS * OUT_NANO
    return Decimal(nano) / 10**9


def make_config(prefix: str, sink_url: str | None, args: argparse.Namespace) -> Config:
    alerts: dict[str, Any] = {
        "timeout_s": args.timeout_s,
        "retries": args.retries,
        "backoff_s": args.backoff_s,
        "queue_size": args.queue_size,
        # Shutting down must not wait on the hanging sink; what is left is logged.
        "flush_timeout_s": 0,
    }
    if sink_url is not None:
        alerts["slack"] = {"webhook_url": sink_url + "/slack/T000/B000/XXXX"}
        alerts["webhook"] = {"url": sink_url + "/hook"}
    return parse_config(
        {
            "key_prefix": prefix,
            "models": PRICES,
            "fail_mode": "open",
            "redis_timeout_ms": 2000,
            "reservation_ttl_s": 600,
            "tiers": {"default": {"hourly_usd": str(request_estimate_usd()), "alert_at": [1.0]}},
            "org": {"daily_usd": HIGH_USD, "monthly_usd": HIGH_USD},
            "alerts": alerts,
        },
        env={},
    )


class Counting(logging.Handler):
    """Counts budgetguard.alerts log lines by kind (queue full, retry, dropped after retries)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: dict[str, int] = {}
        self.last_queue_full: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        kind = ("queue full" if msg.startswith("alert/event queue full") else
                "retry" if msg.startswith("alert to ") else
                "dropped after retries" if msg.startswith("alert dropped") else
                "flush timed out" if msg.startswith("alert/event flush timed out") else
                record.levelname.lower())
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if kind == "queue full":
            self.last_queue_full = msg


class Variant:
    def __init__(self, name: str, guard: BudgetGuard, prefix_tag: str) -> None:
        self.name = name
        self.guard = guard
        self.tag = prefix_tag
        self.i = 0
        self.samples: list[int] = []
        self.queued_samples: list[int] = []  # records whose alert was accepted by the queue
        self.dropped_samples: list[int] = []  # records whose alert the full queue dropped
        self.per_round: list[list[int]] = []
        self.submitted = 0
        self.accepted = 0
        self.last_accepted: bool | None = None
        self.unexpected = 0
        if name != "none":
            driver = guard._dispatcher.thread(guard._sync)
            original = driver.submit

            def counting_submit(job: Callable[[], Any], what: Any) -> bool:
                ok = original(job, what)
                if getattr(job, "func", None) == guard._alert_job:
                    self.submitted += 1
                    self.accepted += ok
                    self.last_accepted = ok
                return ok

            driver.submit = counting_submit  # type: ignore[method-assign]

    def one(self, timed: bool) -> None:
        self.i += 1
        user = f"{self.tag}-{self.i}"
        decision = self.guard.check(user, MODEL, MESSAGES, max_tokens=MAX_TOKENS)
        usage = Usage(input_tokens=decision.estimated_input_tokens, output_tokens=decision.max_output_tokens)
        self.last_accepted = None
        t0 = time.perf_counter_ns()
        applied = self.guard.record(decision, usage)
        t1 = time.perf_counter_ns()
        if not (decision.allowed and decision.enforced and applied):
            self.unexpected += 1
        if timed:
            self.samples.append(t1 - t0)
            self.per_round[-1].append(t1 - t0)
            if self.last_accepted is True:
                self.queued_samples.append(t1 - t0)
            elif self.last_accepted is False:
                self.dropped_samples.append(t1 - t0)

    def deliveries(self) -> dict[tuple[str, str], float]:
        reg = self.guard.metrics.registry
        out = {}
        for sink in SINKS:
            for outcome in ("delivered", "retried", "dropped"):
                value = reg.get_sample_value("budgetguard_alert_deliveries_total",
                                             {"sink": sink, "outcome": outcome})
                out[sink, outcome] = value or 0.0
        return out


def cpu_of_threads() -> dict[str, float]:
    """CPU seconds per thread name of this process (Linux /proc), to see who burns the CPU."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        secs = (int(fields[11]) + int(fields[12])) / tick
        name = names.get(int(tid), f"tid {tid}")
        out[name] = out.get(name, 0.0) + secs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=DEFAULT_URL)
    parser.add_argument("--n", type=int, default=3000, help="timed records per variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=200, help="untimed records per variant first")
    parser.add_argument("--queue-size", type=int, default=1000, help="alerts.queue_size (default: the config's)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="alerts.timeout_s (60 is the maximum)")
    parser.add_argument("--retries", type=int, default=4, help="alerts.retries (default: the config's)")
    parser.add_argument("--backoff-s", type=float, default=0.5, help="alerts.backoff_s (default: the config's)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.redis_url.startswith("memory://"):
        parser.error("this benchmark needs a real Redis")
    rng = random.Random(args.seed)

    counter = Counting()
    alerts_log = logging.getLogger("budgetguard.alerts")
    alerts_log.addHandler(counter)
    alerts_log.setLevel(logging.DEBUG)
    alerts_log.propagate = False

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    hanging = HangingServer()
    dead_url = closed_port_url()
    urls = {"none": None, "hanging": hanging.url, "dead": dead_url}
    variants = {name: Variant(name, BudgetGuard(make_config(prefix, urls[name], args),
                                                redis_url=args.redis_url), f"{name}-{uuid.uuid4().hex[:6]}")
                for name in VARIANTS}
    admin = redis.Redis.from_url(args.redis_url)
    info = admin.info("server")
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    try:
        print("budgetguard record latency with hanging and dead alert sinks")
        print(f"  Redis {info['redis_version']} at {args.redis_url} (keys under {prefix}:*)")
        print(f"  Python {platform.python_version()}, redis-py {redis.__version__} "
              f"(hiredis: {'yes' if HIREDIS_AVAILABLE else 'no'}), {os.cpu_count()} CPUs")
        print(f"  hanging sink {hanging.url}, dead sink {dead_url}")
        print(f"  alerts: queue_size={args.queue_size} timeout_s={args.timeout_s:g} "
              f"retries={args.retries} backoff_s={args.backoff_s:g}; one alert per record")
        print(f"  N={args.n} timed records per variant over {args.rounds} rounds, "
              f"variants shuffled per iteration; {args.warmup} untimed warm-up records each")
        print(f"  load average at start: {' '.join(f'{x:.2f}' for x in load_before)}")

        for _ in range(args.warmup):
            for v in rng.sample(list(variants.values()), len(variants)):
                v.one(timed=False)
        cpu_before = cpu_of_threads()
        t_measure = time.perf_counter()
        per_round = max(1, args.n // args.rounds)
        for _ in range(args.rounds):
            for v in variants.values():
                v.per_round.append([])
            for _ in range(per_round):
                for v in rng.sample(list(variants.values()), len(variants)):
                    v.one(timed=True)
        measured_s = time.perf_counter() - t_measure
        cpu_after = cpu_of_threads()
        load_after = os.getloadavg()
        deliveries = {name: v.deliveries() for name, v in variants.items()}
        drops_count = {name: (v.guard._dispatcher._thread._drops._count
                              if v.guard._dispatcher._thread is not None else 0)
                       for name, v in variants.items()}
        held = hanging.received

        base = median_us(variants["none"].samples)
        print("\n== record latency (us) " + "=" * 56)
        print(f"  {'sinks':<10} {'n':>6} {'p50':>8} {'p99':>8} {'p50 / none':>11} {'p99 / none':>11}")
        base99 = p99_us(variants["none"].samples)
        for name, v in variants.items():
            med, p99 = median_us(v.samples), p99_us(v.samples)
            print(f"  {name:<10} {len(v.samples):6d} {med:8.1f} {p99:8.1f} {med / base:11.2f} {p99 / base99:11.2f}")
        print("  p50 ratio per round: " + "; ".join(
            f"{name} " + " ".join(
                f"{statistics.median(r) / statistics.median(b):.2f}"
                for r, b in zip(variants[name].per_round, variants["none"].per_round, strict=True))
            for name in ("hanging", "dead")))
        for name in ("hanging", "dead"):
            v = variants[name]
            print(f"  {name}: records whose alert was queued: n={len(v.queued_samples)} "
                  f"p50 {median_us(v.queued_samples):.1f} p99 {p99_us(v.queued_samples):.1f}; "
                  f"dropped (queue full): n={len(v.dropped_samples)} "
                  f"p50 {median_us(v.dropped_samples):.1f} p99 {p99_us(v.dropped_samples):.1f}")
        print("  (the queued ones are the first records of the run, so this split is not interleaved)")

        print("\n== alerts (whole run, warm-up included) " + "=" * 38)
        for name in ("hanging", "dead"):
            v = variants[name]
            d = deliveries[name]
            print(f"  {name}: {v.submitted} alerts submitted, {v.accepted} queued, "
                  f"{v.submitted - v.accepted} dropped by the full queue "
                  f"(driver count {drops_count[name]}); unexpected outcomes {v.unexpected}")
            print("    budgetguard_alert_deliveries_total: " + ", ".join(
                f"{sink}/{outcome}={int(d[sink, outcome])}" for sink in SINKS
                for outcome in ("delivered", "retried", "dropped")))
        print(f"  requests held open by the hanging server: {held}")
        print(f"  budgetguard.alerts log lines: {counter.counts}")
        if counter.last_queue_full:
            print(f"  last queue-full line: {counter.last_queue_full}")

        print("\n== CPU seconds by thread during the timed part "
              f"({measured_s:.1f} s wall) " + "=" * 20)
        for name in sorted(cpu_after, key=lambda k: -(cpu_after[k] - cpu_before.get(k, 0.0))):
            used = cpu_after[name] - cpu_before.get(name, 0.0)
            if used > 0:
                print(f"  {name:<40} {used:6.2f}")
        print("  (both dispatcher threads are named budgetguard-alerts; their CPU is summed)")
        print(f"  load average at end: {' '.join(f'{x:.2f}' for x in load_after)}")

        hang, dead = median_us(variants["hanging"].samples), median_us(variants["dead"].samples)
        print("\n== summary (markdown) " + "=" * 57)
        print("| sinks | record p50 µs | record p99 µs | p50 x no sink | p99 x no sink |")
        print("|---|---:|---:|---:|---:|")
        for name, v in variants.items():
            med, p99 = median_us(v.samples), p99_us(v.samples)
            print(f"| {name} | {med:.0f} | {p99:.0f} | {med / base:.2f} | {p99 / base99:.2f} |")
        verdict = "holds" if hang < 2 * base else "does NOT hold"
        print(f"\nacceptance (hanging sink p50 within 2x of no sink): {verdict} "
              f"({hang / base:.2f}x; dead sink {dead / base:.2f}x)")
    finally:
        hanging.release()
        for v in variants.values():
            v.guard.close()
        hanging.close()
        removed = delete_prefix(admin, prefix)
        admin.close()
        print(f"\n(removed {removed} benchmark keys; {time.perf_counter() - t_start:.1f} s)")


if __name__ == "__main__":
    main()
