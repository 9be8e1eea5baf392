"""The ``budgetguard ship`` command's flags, kept apart from the shipper so that building the
CLI's parser (``budgetguard --help``) loads no database driver."""

from __future__ import annotations

import argparse

__all__ = ["DEFAULT_TABLE", "add_ship_arguments"]

DEFAULT_TABLE = "usage_events"


def add_ship_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, metavar="URL",
                   help="the ledger database: sqlite:///path.db or postgresql://user@host/db")
    p.add_argument("--table", default=DEFAULT_TABLE, help=f"table to write (default {DEFAULT_TABLE})")
    p.add_argument("--once", action="store_true", help="ship what the stream holds now, then exit")
    p.add_argument("--batch", default=5000, type=int, help="events per transaction (default 5000, at most 10000)")
    p.add_argument("--group", default="ledger", help="Redis consumer group (default ledger)")
    p.add_argument("--consumer", default="", help="this shipper's consumer name (default host-pid)")
    p.add_argument("--claim-idle", default=60.0, type=float,
                   help="seconds an entry may stay pending with a consumer before another claims it (default 60)")
    p.add_argument("--lag-warn", default=0.5, type=float,
                   help="warn when unshipped events reach this share of events.stream_maxlen (default 0.5)")
    p.add_argument("--spike-share", default=None, type=float, metavar="FRACTION",
                   help="alert once when a user or tenant spends more than this share of org.daily_usd in one "
                        "UTC hour, e.g. 0.01 (default: off)")
    p.add_argument("--metrics-port", default=None, type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
