"""What an alert says: one crossing of one threshold, in one window, for one scope."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal

__all__ = ["Alert", "AlertKind"]

AlertKind = Literal["threshold", "blocked", "resolved", "anomaly", "forecast"]


@dataclass(frozen=True, slots=True)
class Alert:
    """A budget alert, as handed to every sink (and to an ``on_alert`` callback).

    ``level`` is the fraction of the cap it stands for (0.8 for "80% spent", 1 for a
    blocked scope); a forecast carries the month's utilization when it was made, an
    anomaly 1. ``dedup_key`` is stable per scope, window and threshold: PagerDuty
    merges repeats on it, and the "resolved" alert of a blocked window reuses it.
    """

    kind: AlertKind
    scope: Literal["org", "user", "budget"]
    window: str  # "user.hourly" ... "org.monthly", "tenant.daily"; "org.hour" for an anomaly
    window_key: str  # the window's key suffix, e.g. "d:20261123"; "t" for a balance that never resets
    window_start: datetime | None  # None: a balance (total_usd), which has no period
    window_end: datetime | None
    level: Decimal
    spent_usd: Decimal
    limit_usd: Decimal | None
    at: datetime
    key_prefix: str = "bg"
    user: str | None = None
    user_key: str | None = None  # the user's key tag: safe in keys and dedup keys
    tier: str | None = None  # the user's tier, or a budget value's plan
    budget: str | None = None  # scope "budget": its name ("tenant") and value ("acme"; None: shared)
    value: str | None = None
    value_key: str | None = None  # the value's key tag: safe in dedup keys
    next_step: str = ""  # what budgetguard does from here: route, block, nothing
    detail: str = ""  # forecast or anomaly explanation
    top_users: tuple[tuple[str, Decimal], ...] = ()
    top_features: tuple[tuple[str, Decimal], ...] = ()

    @property
    def percent(self) -> Decimal | None:
        if not self.limit_usd:
            return None
        return (self.spent_usd * 100 / self.limit_usd).quantize(Decimal("0.1"))

    @property
    def subject(self) -> str:
        if self.scope == "budget":
            return f"{self.budget} {self.value}" if self.value is not None else f"budget {self.budget}"
        return "org" if self.scope == "org" else f"user {self.user}"

    @property
    def dedup_key(self) -> str:
        who = {"org": "org", "user": f"user/{self.user_key}"}.get(self.scope) or f"budget/{self.value_key}"
        kind = "blocked" if self.kind in ("blocked", "resolved") else self.kind
        tail = f"{kind}/{self.level.normalize():f}" if kind in ("threshold",) else kind
        return f"budgetguard/{self.key_prefix}/{who}/{self.window}/{self.window_key}/{tail}"

    @property
    def severity(self) -> Literal["critical", "error", "warning", "info"]:
        if self.kind in ("blocked", "anomaly") or self.level >= 1:
            return "critical"
        if self.kind == "resolved":
            return "info"
        if self.level >= Decimal("0.9"):
            return "error"
        return "warning" if self.level >= Decimal("0.75") or self.kind == "forecast" else "info"

    @property
    def summary(self) -> str:
        """One line for a pager or a log."""
        money = f"${_usd(self.spent_usd)}" + (f" of ${_usd(self.limit_usd)}" if self.limit_usd else "")
        pct = f" ({self.percent}%)" if self.percent is not None else ""
        if self.kind == "blocked":
            return f"budgetguard: {self.subject} blocked by its {self.window} cap: {money}{pct} spent"
        if self.kind == "resolved":
            return f"budgetguard: {self.subject} {self.window} window {self.window_key} is over; new window open"
        if self.kind == "anomaly":
            return f"budgetguard: unusual {self.subject} spend this hour: {money}{pct}. {self.detail}"
        if self.kind == "forecast":
            return f"budgetguard: {self.subject} {self.window} budget forecast: {self.detail}"
        return (f"budgetguard: {self.subject} {self.window} spend crossed {self.level * 100:.0f}%: "
                f"{money}{pct}")

    def with_(self, **changes: object) -> Alert:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _usd(value: Decimal | None) -> str:
    if value is None:
        return "-"
    return f"{value.quantize(Decimal('0.01')):,}" if value >= 1 else f"{value.normalize():f}"
