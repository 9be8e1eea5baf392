"""Runtime control of a budget value: its assigned plan, overrides, grants and top-ups (no I/O).

Operators change budgets while traffic runs (``guard.admin``). What they set lives in
Redis, in one hash per budget value, beside the value's counters (same hash slot)::

    bg:{b:tenant:acme}:cfg   v: version (the last change's random id)   plan: assigned plan
                             o:<field>: an override ("o:monthly_usd" -> "300")
                             g:<id>: a grant "<field>|<amount>|<until ms>"
                             topup: nano-USD added to total_usd (a prepaid balance)

Each process keeps the state it last saw per value, and every reserve call carries the
version it assumed: the script compares it with the hash's in the same step, and answers
"stale" with the current state when they differ. The check is then planned again on that
state (one more round trip, once per change and process). So a change applies to the
next check in every process, without a cache to expire and without a read per check.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from .config import MAX_BUDGET_VALUES
from .errors import InvalidArgument, InvalidArgumentType
from .limits import KINDS, Kind
from .pricing import nano_to_usd
from .protocol import text

__all__ = ["FIELDS", "NONE", "Grant", "Runtime", "parse_limit"]

FIELDS: dict[str, Kind] = {k.field: k for k in KINDS}  # the window limits a change may set
MAX_GRANTS = 32  # live grants per value: each one is read on every replan
_USD_MAX = Decimal(9_000_000)
_RATE_MAX = 1_000_000_000_000
# ASCII only: int() and Decimal() read other scripts' digits too, and whatever an
# operator types must mean what it shows.
_USD_TEXT = re.compile(r"[0-9]{1,7}(\.[0-9]{1,9})?", re.ASCII)
_COUNT_TEXT = re.compile(r"[0-9]{1,13}", re.ASCII)


def parse_limit(field: str, value: Any, where: str = "") -> Decimal | int:
    """A window limit from an operator (a dollar amount or a count), checked like limits.yaml's."""
    kind = FIELDS.get(field)
    if kind is None:
        raise InvalidArgument(f"{where}{field!s:.64}: not a window limit (limits: {', '.join(FIELDS)})")
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise InvalidArgumentType(f"{where}{field}: must be a number, got {type(value).__name__}")
    text = format(value, "f") if isinstance(value, (float, Decimal)) else str(value)
    if kind.money:
        if text.startswith("-"):
            raise InvalidArgument(f"{where}{field}: must be between 0 and {_USD_MAX} dollars")
        text = text.rstrip("0").rstrip(".") if "." in text else text
        if not _USD_TEXT.fullmatch(text or "0"):
            raise InvalidArgument(f"{where}{field}: {text[:32]!r} is not a dollar amount between 0 and "
                                  f"{_USD_MAX} with at most 9 decimal places")
        try:
            usd = Decimal(text or "0")
        except InvalidOperation:  # the pattern makes this unreachable; stay safe
            raise InvalidArgument(f"{where}{field}: {text[:32]!r} is not a dollar amount") from None
        if usd > _USD_MAX:
            raise InvalidArgument(f"{where}{field}: must be between 0 and {_USD_MAX} dollars")
        return usd
    if isinstance(value, float) and value.is_integer():
        text = str(int(value))
    if not _COUNT_TEXT.fullmatch(text) or not 0 < int(text) <= _RATE_MAX:
        raise InvalidArgument(f"{where}{field}: must be a whole number of {kind.unit} between 1 and {_RATE_MAX:,}")
    return int(text)


@dataclass(frozen=True, slots=True)
class Grant:
    """A temporary increase of one window's cap, which ends by itself at ``until_ms``."""

    id: str
    field: str  # "daily_usd"
    amount: Decimal | int  # dollars (money windows) or a count
    until_ms: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "window": FIELDS[self.field].name, "field": self.field,
                "amount": str(self.amount), "until_ms": self.until_ms}


@dataclass(frozen=True, slots=True)
class Runtime:
    """What operators set on one budget value, as last read from Redis."""

    version: str = "0"  # the last change's id ("0": never changed)
    plan: str | None = None
    overrides: tuple[tuple[str, Decimal | int], ...] = ()
    grants: tuple[Grant, ...] = ()
    topup_nano: int = 0

    @classmethod
    def parse(cls, flat: Sequence[Any] | Mapping[Any, Any]) -> Runtime:
        """The state from the hash (HGETALL's flat list or a mapping). Entries it cannot read
        are skipped: the hash is written by budgetguard only, and one bad field must not
        stop every check of the value."""
        items = list(flat.items()) if isinstance(flat, Mapping) else list(zip(flat[::2], flat[1::2], strict=True))
        version, plan, topup = "0", None, 0
        overrides: list[tuple[str, Decimal | int]] = []
        grants: list[Grant] = []
        for raw_key, raw_value in items:
            key, value = text(raw_key), text(raw_value)
            try:
                if key == "v":
                    version = value
                elif key == "plan":
                    plan = value
                elif key == "topup":
                    topup = int(value)
                elif key.startswith("o:"):
                    overrides.append((key[2:], parse_limit(key[2:], value)))
                elif key.startswith("g:"):
                    field, amount, until = value.split("|")
                    grants.append(Grant(key[2:], field, parse_limit(field, amount), int(until)))
            except (ValueError, InvalidArgument):
                continue
        return cls(version, plan, tuple(sorted(overrides)), tuple(sorted(grants, key=lambda g: g.id)), topup)

    @property
    def empty(self) -> bool:
        return not (self.plan or self.overrides or self.grants or self.topup_nano)

    def live_grants(self, now_ms: int) -> tuple[Grant, ...]:
        return tuple(g for g in self.grants if g.until_ms > now_ms)

    def applied(self, fields: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
        """Limit fields with the overrides, the live grants and the top-ups applied."""
        out = dict(fields)
        for field, value in self.overrides:
            out[field] = value
        for grant in self.live_grants(now_ms):
            if out.get(grant.field) is not None:  # a grant raises a cap; it adds none
                out[grant.field] = out[grant.field] + grant.amount
        if self.topup_nano and out.get("total_usd") is not None:
            out["total_usd"] = out["total_usd"] + nano_to_usd(self.topup_nano)
        return out

    def to_json(self, now_ms: int) -> dict[str, Any]:
        return {"version": self.version, "plan": self.plan,
                "overrides": {f: str(v) for f, v in self.overrides},
                "grants": [g.to_json() for g in self.live_grants(now_ms)],
                "topup_usd": str(nano_to_usd(self.topup_nano))}


NONE = Runtime()


class Known:
    """The runtime state this process last saw per value (by key prefix), bounded.

    Evicting an entry only costs a replan: the next check assumes version 0 and the
    script answers with the state if the value has one."""

    def __init__(self, limit: int = 10 * MAX_BUDGET_VALUES) -> None:
        self._limit = limit
        self._by_prefix: dict[str, Runtime] = {}

    def get(self, prefix: str) -> Runtime:
        return self._by_prefix.get(prefix, NONE)

    def put(self, prefix: str, state: Runtime) -> None:
        if state.empty and state.version == "0":
            self._by_prefix.pop(prefix, None)
            return
        if len(self._by_prefix) >= self._limit and prefix not in self._by_prefix:
            self._by_prefix.pop(next(iter(self._by_prefix)))  # the oldest entry
        self._by_prefix[prefix] = state

