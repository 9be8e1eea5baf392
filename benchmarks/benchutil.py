"""Helpers shared by the benchmark scripts (statistics, output, clean-up)."""

from __future__ import annotations

import math
import statistics

import redis


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
