"""Running `budgetguard report` and checking its numbers, in every format, against independent sums."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

from .eventgen import expected, group_of, mape_pct, nano

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "budgetguard"
GROUPINGS: tuple[str | None, ...] = (None, "user", "model", "provider", "feature", "tenant", "hour")
FORMATS = ("table", "csv", "json")
TABLE_COLUMNS = ("requests", "denials", "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
                 "cost_usd", "avg_cost_per_request_usd", "cost_per_1k_tokens_usd", "estimate_ratio",
                 "estimate_mape_pct")


def cli(*args: str, env: Mapping[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    command = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "budgetguard"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def run_all(arg_lists: Sequence[Sequence[str]], env: Mapping[str, str]) -> list[subprocess.CompletedProcess[str]]:
    # Independent read-only runs: in parallel, to keep the suite quick.
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda a: cli(*a, env=env), arg_lists))


def _round_div(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half to even, in integers."""
    q, r = divmod(numerator, denominator)
    if 2 * r > denominator or (2 * r == denominator and q % 2):
        q += 1
    return q


def parse_rows(text: str, fmt: str, by: str | None) -> dict[str, dict[str, Any]]:
    """{group key (or "TOTAL"): {column: value}} from any output format."""
    if fmt == "json":
        doc = json.loads(text)
        assert doc["by"] == by
        rows = {g["key"]: g for g in doc["groups"]}
        rows["TOTAL"] = doc["totals"]
        return rows
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        assert reader.fieldnames is not None and reader.fieldnames[1] == (by or "key")
        rows = {}
        for row in reader:
            key = "TOTAL" if row["scope"] == "total" else row[by or "key"]
            rows[key] = {k: (None if v == "" else v) for k, v in row.items()}
        return rows
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() and line.split()[-2:] == ["MAPE", "%"])
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        key, *values = line.rsplit(None, len(TABLE_COLUMNS))
        rows[key.strip()] = {c: (None if v == "-" else v) for c, v in zip(TABLE_COLUMNS, values, strict=True)}
    return rows


def check_row(row: Mapping[str, Any], want: Mapping[str, int], events: list[Mapping[str, Any]]) -> None:
    for name in ("requests", "denials", "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens"):
        assert int(row[name]) == want.get(name, 0), name
    assert nano(row["cost_usd"]) == want.get("cost_nano", 0)
    if "events" in row:  # not a table column
        assert int(row["events"]) == want["events"]
        assert int(row["total_tokens"]) == want.get("total_tokens", 0)
        assert nano(row["input_cost_usd"]) == want.get("input_cost_nano", 0)
        assert nano(row["output_cost_usd"]) == want.get("output_cost_nano", 0)
    if want.get("requests"):
        assert nano(row["avg_cost_per_request_usd"]) == _round_div(want.get("cost_nano", 0), want["requests"])
    else:
        assert row["avg_cost_per_request_usd"] is None
    if want.get("total_tokens"):
        assert nano(row["cost_per_1k_tokens_usd"]) == _round_div(want.get("cost_nano", 0) * 1000,
                                                                 want["total_tokens"])
    if want.get("estimated_requests"):
        ratio = _round_div(want["estimated_actual_nano"] * 10**6, want["estimated_nano"])
        assert Decimal(row["estimate_ratio"]) == Decimal(ratio) / 10**6
        assert abs(Decimal(row["estimate_mape_pct"]) - mape_pct(events)) <= Decimal("0.0001")
    else:
        assert row["estimate_ratio"] is None and row["estimate_mape_pct"] is None


def check_report(text: str, fmt: str, by: str | None, events: list[Mapping[str, Any]]) -> None:
    """The report ``text`` agrees with sums computed from ``events`` in every row, and the total."""
    rows = parse_rows(text, fmt, by)
    want = expected(events, by)
    if by is not None:
        assert set(rows) - {"TOTAL"} == set(want), (fmt, by)
        for key, row in rows.items():
            if key != "TOTAL":
                check_row(row, want[key], [e for e in events if group_of(e, by) == key])
    check_row(rows["TOTAL"], expected(events, None)[""], events)
