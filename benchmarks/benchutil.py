"""Helpers shared by the benchmark scripts (statistics, output, clean-up)."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

import redis

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
