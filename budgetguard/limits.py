"""One budget value's effective limits: its windows, per-request caps, allow-list and routes.

Every budget (the user's, the org's, each one under ``budgets:``) is limited the same way.
A window is one of :data:`KINDS`; its cap is nano-USD for the money windows and a count for
the others (requests, tokens, calls in flight). ``d.limit`` names a window
``<budget>.<kind>``: ``user.hourly``, ``tenant.rpm``, ``org.monthly``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from types import MappingProxyType
from typing import Any

from .config import Downgrade, PerRequest
from .pricing import usd_to_nano

__all__ = ["KINDS", "Kind", "Limits", "WindowLimit", "build_limits"]


@dataclass(frozen=True, slots=True)
class Kind:
    name: str  # the suffix of the window's limit name: "hourly", "rpm"
    field: str  # its field in limits.yaml: "hourly_usd", "requests_per_minute"
    period: str  # "h" hour, "d" day, "w" ISO week, "m" month, "t" never resets, "q"/"k" minute, "c" none
    money: bool  # nano-USD (else a count)
    unit: str  # what a count counts ("" for money)


KINDS: tuple[Kind, ...] = (
    Kind("hourly", "hourly_usd", "h", True, ""),
    Kind("daily", "daily_usd", "d", True, ""),
    Kind("weekly", "weekly_usd", "w", True, ""),
    Kind("monthly", "monthly_usd", "m", True, ""),
    Kind("total", "total_usd", "t", True, ""),
    Kind("rpm", "requests_per_minute", "q", False, "requests"),
    Kind("tpm", "tokens_per_minute", "k", False, "tokens"),
    Kind("concurrent", "max_concurrent", "c", False, "requests"),
)
KIND_BY_NAME = {k.name: k for k in KINDS}
_EMPTY_ROUTES: MappingProxyType[str, str] = MappingProxyType({})
# The scripts compare amounts as Lua doubles, exact below 2**53: a money cap (a configured
# one plus grants and top-ups) stops at $9M, the most limits.yaml allows for one cap.
MAX_CAP_NANO = usd_to_nano(9_000_000)


def _trigger(cap: int | None, downgrade: Downgrade | None) -> int | None:
    """The spent+reserved level (nano-USD) at which routing starts, or None."""
    if cap is None or downgrade is None or not downgrade.routes:
        return None
    return int((Decimal(cap) * downgrade.at).to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True, slots=True)
class WindowLimit:
    kind: Kind
    cap: int | None  # nano-USD (money) or a count; None: tracked, not capped
    trigger: int | None  # money windows: the level at which the budget's routes start


@dataclass(frozen=True, slots=True)
class Limits:
    """A budget value's limits: a tier for a user, a plan for a tenant, the org's own."""

    budget: str
    plan: str | None  # the tier or plan they come from (None: the budget has no plans)
    windows: tuple[WindowLimit, ...]
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    max_cost_nano: int | None = None
    models: frozenset[str] | None = None
    routes: Mapping[str, str] = field(default_factory=lambda: _EMPTY_ROUTES)
    alert_at: tuple[Decimal, ...] = ()

    @property
    def tier(self) -> str:
        return self.plan or ""

    @property
    def caps(self) -> tuple[int | None, ...]:
        return tuple(w.cap for w in self.windows)

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def window(self, kind: str) -> WindowLimit | None:
        return next((w for w in self.windows if w.kind.name == kind), None)


def build_limits(budget: str, plan: str | None, fields: Mapping[str, Any], always: tuple[str, ...] = ()) -> Limits:
    """Limits from a budget's fields (a tier's, a plan's, with overrides merged in).

    ``always`` names windows kept even when uncapped (the user's hour, day and month, the
    org's day and month: their spend is reported whatever the caps).
    """
    downgrade: Downgrade | None = fields.get("downgrade")
    windows = []
    for kind in KINDS:
        value = fields.get(kind.field)
        if value is None and kind.name not in always:
            continue
        cap = None if value is None else (min(usd_to_nano(value), MAX_CAP_NANO) if kind.money else int(value))
        windows.append(WindowLimit(kind, cap, _trigger(cap, downgrade) if kind.money else None))
    per_request: PerRequest = fields.get("per_request") or PerRequest()
    models = fields.get("models")
    return Limits(
        budget=budget,
        plan=plan,
        windows=tuple(windows),
        max_input_tokens=per_request.max_input_tokens,
        max_output_tokens=per_request.max_output_tokens,
        max_cost_nano=None if per_request.max_cost_usd is None else usd_to_nano(per_request.max_cost_usd),
        models=frozenset(models) if models is not None else None,
        routes=MappingProxyType(dict(downgrade.routes)) if downgrade else _EMPTY_ROUTES,
        alert_at=tuple(sorted(fields.get("alert_at") or ())),
    )
