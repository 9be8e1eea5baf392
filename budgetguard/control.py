"""Operators' changes to budget values while traffic runs, without I/O (``guard.admin``).

Each change is one atomic script on the value's hash slot (``lua/admin.lua``) that moves
the value's runtime state on (see :mod:`budgetguard.runtime`), then one audit event in the
usage stream: who (``by``), what, the state before and after.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .engine import validate_text
from .errors import InvalidArgument, InvalidArgumentType
from .events import EVENT_VERSION, MAX_TEXT, Event, shorten, timestamp, to_json
from .limits import KIND_BY_NAME, Kind
from .pricing import usd_to_nano
from .protocol import ScriptCall, text
from .runtime import FIELDS, MAX_GRANTS, Runtime, parse_limit
from .windows import epoch_ms

if TYPE_CHECKING:
    from .engine import Engine, Steps
    from .scopes import Scope

__all__ = ["Change", "Control"]

_MAX_BY = 128
# Top-ups of one balance in all: caps stay below 2**53 nano-USD, where the scripts compare exactly.
_MAX_TOPUP_NANO = 9_000_000 * 10**9


@dataclass(frozen=True, slots=True)
class Change:
    """What a change did: the value's runtime state before and after, and its audit event."""

    budget: str
    value: str | None
    before: Runtime
    after: Runtime
    event: Event | None  # None for show
    now_ms: int = 0  # when it was made (which grants were live)


def _kind(window: Any, budget: str) -> Kind:
    """A window of ``budget`` named "daily" or "<budget>.daily"."""
    owner, _, name = validate_text("window", window, max_len=64).rpartition(".")
    if owner and owner != budget:
        raise InvalidArgument(f"window {window!r} is not a window of budget {budget!r}")
    kind = KIND_BY_NAME.get(name)
    if kind is None:
        raise InvalidArgument(f"window {window!r} is not a window (windows: {', '.join(KIND_BY_NAME)})")
    return kind


def _usd(name: str, value: Any) -> Decimal:
    amount = parse_limit("total_usd", value, "")
    assert isinstance(amount, Decimal)
    if amount <= 0:
        raise InvalidArgument(f"{name} must be more than $0")
    return amount


class Control:
    """Builds the admin script's calls and reads their replies, for one engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _target(self, budget: Any, value: Any) -> tuple[str, str | None, str]:
        budget = validate_text("budget", budget, max_len=64)
        if value is not None:  # any length, as in checks: a long value is hashed into its key
            value = validate_text("value", value)
        return budget, value, self._engine.scopes.prefix_of(budget, value)

    def _scope(self, budget: str, value: str | None, now_ms: int) -> Scope:
        return self._engine.scopes.of_budget(budget, value, None, self._engine.known.get, now_ms)

    def steps(self, op: str, budget: Any, value: Any, by: Any = None, **params: Any) -> Steps:
        """Run one operation; returns a :class:`Change`. Bad input raises before anything changes."""
        engine = self._engine
        budget, value, prefix = self._target(budget, value)
        actor = "api" if by is None else validate_text("by", by, max_len=_MAX_BY)
        now = engine.now()
        now_ms = epoch_ms(now)
        keys = [prefix + "cfg"]
        if op in ("grant", "topup", "reset"):
            # Checked against the value's state as it is now, not as this process last saw it.
            raw = yield ScriptCall("admin", tuple(keys), (now_ms, "show", ""))
            engine.known.put(prefix, Runtime.parse([text(v) for v in raw[1:1 + int(raw[0])]]))
        args: list[str | int] = [now_ms, op, os.urandom(8).hex()]
        detail = ""
        if engine.slices is not None and budget == "org" and op == "override" and \
                set(params["limits"]) - {"daily_usd", "monthly_usd"}:
            raise InvalidArgument("override: org slices (org.slice_usd) hold the org's daily and monthly windows "
                                  "only; other org windows cannot be set while they are on")
        if op == "assign":
            plan = params["plan"]
            if plan is not None:
                engine.policies.check_plan(budget, validate_text("plan", plan, max_len=256))
            args.append(plan or "")
            detail = f"plan {plan}" if plan else "plan assignment removed"
        elif op == "override":
            limits: Mapping[str, Any] = params["limits"]
            if not limits:
                raise InvalidArgument("override: name at least one limit (e.g. monthly_usd=300; None removes one)")
            parts = []
            for field, raw in limits.items():
                if field not in FIELDS:
                    raise InvalidArgument(f"override: {str(field)[:64]!r} is not a window limit "
                                          f"(limits: {', '.join(FIELDS)})")
                parsed = None if raw is None else parse_limit(field, raw, "override: ")
                args += [field, "" if parsed is None else str(parsed)]
                parts.append(f"{field}={'removed' if parsed is None else parsed}")
            detail = "override " + ", ".join(parts)
        elif op == "grant":
            kind = _kind(params["window"], budget)
            if not kind.money:
                raise InvalidArgument(f"grant: window {kind.name!r} is not a money window (grants are in dollars)")
            if self._scope(budget, value, now_ms).limits.window(kind.name) is None:
                raise InvalidArgument(f"grant: {budget} has no {kind.name} window to raise")
            usd = _usd("grant: usd", params["usd"])
            until = params["until"]
            if not isinstance(until, datetime) or until.tzinfo is None:
                raise InvalidArgumentType("grant: until must be an aware datetime (when the increase ends)")
            if until <= now:
                raise InvalidArgument(f"grant: until {until.isoformat()} is in the past")
            grant_id = os.urandom(6).hex()
            args += [grant_id, f"{kind.field}|{usd}|{epoch_ms(until)}", MAX_GRANTS]
            detail = f"grant +${usd} on {budget}.{kind.name} until {until.astimezone(UTC).isoformat()}"
        elif op == "topup":
            usd = _usd("top_up: usd", params["usd"])
            if self._scope(budget, value, now_ms).limits.window("total") is None:
                raise InvalidArgument(f"top_up: {budget} has no total_usd balance to top up")
            if engine.known.get(prefix).topup_nano + usd_to_nano(usd) > _MAX_TOPUP_NANO:
                raise InvalidArgument(f"top_up: top-ups of {budget} would pass ${_MAX_TOPUP_NANO // 10**9:,} in all")
            args.append(usd_to_nano(usd))
            detail = f"top up +${usd}"
        elif op == "reset":
            kind = _kind(params["window"], budget)
            scope = self._scope(budget, value, now_ms)
            if scope.limits.window(kind.name) is None:
                raise InvalidArgument(f"reset: {budget} has no {kind.name} window")
            window = next(w for w in engine.scopes.windows((scope,), engine.windows_now(now), now)
                          if w.limit.kind is kind)
            keys.append(prefix + window.suffix)
            detail = f"reset {window.name} {window.suffix}"
        elif op != "show":
            raise InvalidArgument(f"unknown operation {op!r}")
        raw = yield ScriptCall("admin", tuple(keys), tuple(args))
        if int(raw[0]) == -1:
            raise InvalidArgument(f"grant: {budget} {value or ''} already holds {MAX_GRANTS} live grants")
        n = int(raw[0])
        before = Runtime.parse([text(v) for v in raw[1:1 + n]])
        after = Runtime.parse([text(v) for v in raw[1 + n:]])
        engine.known.put(prefix, after)  # this process needs no stale round trip to see it
        if op == "show":
            return Change(budget, value, before, after, None, now_ms)
        event: Event = {
            "v": EVENT_VERSION, "ts": timestamp(now), "kind": "admin", "outcome": op, "by": actor,
            "budget": budget, "value": None if value is None else shorten(value, 256),
            "reason": f"{actor}: {budget}{'' if value is None else ' ' + shorten(value, 64)}: {detail}"[:MAX_TEXT],
            "before": before.to_json(now_ms), "after": after.to_json(now_ms),
        }
        if engine.config.events.stream_maxlen:
            yield engine.log_call([to_json(event)])
        return Change(budget, value, before, after, event, now_ms)
