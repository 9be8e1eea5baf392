"""The ledger's CLI parts: ``budgetguard ship`` and the SQL source of ``budgetguard report --db``.

``cli.py`` registers these and delegates; this module prints (it is the command), the
rest of the package logs.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import redis

from ..config import Config
from ..eventlog import stream_key
from ..redact import redact_url
from ..report import build_report, render
from .insights import EFFICIENCY_BY, Weekly, efficiency, render_efficiency, render_weekly, slack_message, weekly
from .rows import EVENT_COLUMNS, to_event
from .store import LedgerError, open_ledger

if TYPE_CHECKING:  # the shipper's modules need the [ledger] extra: imported when a command runs
    from ..alerts.model import Alert
    from .shipper import ShipStats

log = logging.getLogger("budgetguard.ledger")

__all__ = ["cmd_ship", "db_events", "db_report"]


def _progress(stats: ShipStats) -> str:
    elapsed = max(time.monotonic() - stats.started, 1e-9)
    lag = stats.lag
    behind = "?" if lag is None or lag.behind is None else str(lag.behind)
    pending = "?" if lag is None else str(lag.pending)
    return (f"shipped {stats.read} events ({stats.inserted} new, {stats.duplicates} already there, "
            f"{stats.malformed} malformed, {stats.lost} lost) in {elapsed:.1f} s, "
            f"{stats.read / elapsed:.0f}/s; behind {behind}, pending {pending}")


def cmd_ship(args: argparse.Namespace, config: Config, client: redis.Redis) -> int:
    """``budgetguard ship``: bad flags and an unusable database are refused before any entry is read."""
    from .metrics import ShipMetrics
    from .shipper import ShipOptions, Shipper

    if not math.isfinite(args.claim_idle) or not 0 <= args.claim_idle <= 7 * 86400:
        raise LedgerError("--claim-idle must be between 0 and 604800 seconds")
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        raise LedgerError("--metrics-port must be between 1 and 65535")
    if not math.isfinite(args.lag_warn):
        raise LedgerError("--lag-warn must be above 0 and at most 1")
    try:
        options = ShipOptions(group=args.group, consumer=args.consumer, batch_size=args.batch,
                              claim_idle_ms=int(args.claim_idle * 1000), lag_warn_fraction=args.lag_warn).validate()
    except ValueError as exc:
        raise LedgerError(str(exc)) from None
    if config.events.stream_maxlen == 0:
        raise LedgerError("events.stream_maxlen is 0: there is no usage stream to ship")
    spikes = _spike_share(args, config)
    ledger = open_ledger(args.to, args.table)
    metrics = ShipMetrics()
    last_print = [time.monotonic()]

    def on_batch(stats: ShipStats) -> None:
        metrics.observe(stats)
        if not args.quiet and time.monotonic() - last_print[0] >= 5:
            last_print[0] = time.monotonic()
            print(_progress(stats), file=sys.stderr, flush=True)

    on_commit = None
    if spikes is not None:
        from .spikes import SpikeWatch

        assert config.org.daily_usd is not None  # checked by _spike_share
        watch = SpikeWatch(ledger, client, key_prefix=config.key_prefix, share=spikes,
                           daily_usd=config.org.daily_usd, send=lambda alert: deliver_alert(alert, config))
        on_commit = watch.after_batch
    shipper = Shipper(client, stream_key(config), ledger, options=options,
                      stream_maxlen=config.events.stream_maxlen, on_batch=on_batch, on_commit=on_commit)
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port)
    print(f"budgetguard ship: {stream_key(config)} -> {redact_url(args.to)} table {args.table} "
          f"(group {options.group}, consumer {shipper.consumer})", file=sys.stderr, flush=True)
    try:
        if args.once:
            stats = shipper.run_once()
        else:
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            stats = shipper.run(stop)
    finally:
        ledger.close()
    metrics.observe(shipper.stats)
    if not args.quiet:
        print(_progress(stats), file=sys.stderr, flush=True)
    return 0


def _spike_share(args: argparse.Namespace, config: Config) -> Decimal | None:
    if args.spike_share is None:
        return None
    if not math.isfinite(args.spike_share) or not 0 < args.spike_share <= 1:
        raise LedgerError("--spike-share must be above 0 and at most 1 (0.01 is 1%)")
    if config.org.daily_usd is None:
        raise LedgerError("--spike-share is a share of org.daily_usd, which the config does not set")
    return Decimal(str(args.spike_share))


def deliver_alert(alert: Alert, config: Config) -> int:
    """Post ``alert`` to each configured sink that wants it, once; how many took it."""
    import httpx

    from ..alerts.dispatch import sink_traffic
    from ..alerts.messages import deliveries

    delivered = 0
    for d in deliveries(alert, config.alerts):
        try:
            with sink_traffic():  # httpx's request log would print the webhook URL, a secret
                answer = httpx.post(d.url, content=d.body, headers=d.headers, timeout=config.alerts.timeout_s)
        except httpx.HTTPError as exc:
            log.error("spike alert to %s at %s failed: %s", d.sink, d.where, type(exc).__name__)
            continue
        if answer.status_code >= 300:
            log.error("spike alert to %s at %s answered %d", d.sink, d.where, answer.status_code)
        else:
            delivered += 1
    log.warning("%s", alert.summary)
    return delivered


def db_report(args: argparse.Namespace, since: datetime, until: datetime, config: Config) -> str:
    """``budgetguard report --db URL``: the stream report's numbers from the ledger, and the
    ledger's own formats (``efficiency``, ``weekly``)."""
    from ..report import ReportError

    if args.db is None:
        raise ReportError(f"--format {args.format} reads the SQL ledger: add --db URL")
    if args.by == "budget":
        raise ReportError("--by budget reads the usage stream or file (drop --db): the ledger does not keep "
                          "which budgets applied to each call")
    if args.send is not None and args.format != "weekly":
        raise ReportError("--send goes with --format weekly")
    if args.format == "efficiency":
        by = args.by or "model+feature"
        if by not in EFFICIENCY_BY:
            raise ReportError(f"--format efficiency groups by model or feature (default both), not {by}")
        events, _ = db_events(args.db, args.table, since, until)
        return render_efficiency(efficiency(events, by), "table", by)
    if args.format == "weekly":
        month_start = until.replace(day=1, hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
        events, _ = db_events(args.db, args.table, min(until - timedelta(days=14), month_start), until)
        summary = weekly(events, until)
        if args.send == "slack":
            _send_slack(config, summary)
        return render_weekly(summary)
    events, source = db_events(args.db, args.table, since, until)
    report = build_report(events, by=args.by, top=args.top, since=since, until=until, source=source)
    return render(report, args.format)


def _send_slack(config: Config, summary: Weekly) -> None:
    import httpx

    from ..alerts.dispatch import sink_traffic

    sink = config.alerts.slack
    if sink is None or not sink.webhook_url:
        raise LedgerError("--send slack: alerts.slack.webhook_url is not set in the config")
    try:
        with sink_traffic():  # httpx's request log would print the webhook URL, a secret
            answer = httpx.post(sink.webhook_url, json=slack_message(summary), timeout=config.alerts.timeout_s)
    except httpx.HTTPError as exc:
        raise LedgerError(f"--send slack: {redact_url(sink.webhook_url)}: {type(exc).__name__}") from None
    if answer.status_code >= 300:
        raise LedgerError(f"--send slack: {redact_url(sink.webhook_url)} answered {answer.status_code}")


def db_events(url: str, table: str, since: datetime | None,
              until: datetime | None) -> tuple[Iterator[dict[str, Any]], str]:
    """The ledger's events in [since, until) in the event format the report reads, and a
    description of the source. Rows are streamed from the database as they are iterated."""
    ledger = open_ledger(url, table, create=False)

    def events() -> Iterator[dict[str, Any]]:
        try:
            for row in ledger.rows(since, until, columns=EVENT_COLUMNS):
                yield to_event(row)
        finally:
            ledger.close()

    return events(), f"ledger {redact_url(url)} table {table}"
