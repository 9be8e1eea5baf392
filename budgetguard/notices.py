"""What the scripts report, as alerts: crossings and first denials become :class:`Alert` (no I/O).

The reserve, settle and slice scripts claim each alert's marker in the same step that moves
the spend, and report what they claimed as short notices (see the scripts' headers):

- ``t|<window>|<level>|<spent>``: a threshold crossed (settle, slice);
- ``b|<window>``: a cap's first denial (reserve);
- ``r|<window>|<old suffix>``: an org window blocked before, its successor now open (reserve, slice);
- ``a|<hour>|<spent>``: the org's hour went anomalous (settle, slice).

Windows are numbered from 1 across the windows given (see :mod:`budgetguard.scopes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal

from .alerts.anomaly import Baseline
from .alerts.model import Alert
from .keys import scope_tag, user_tag
from .pricing import nano_to_usd
from .scopes import Scope, Window

__all__ = ["Notices"]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _cap_usd(window: Window) -> Decimal | None:
    cap = window.limit.cap
    return None if cap is None else nano_to_usd(cap)


class Notices:
    """Builds the alerts of one config's windows. ``baselines`` (per UTC hour) is read as it fills."""

    def __init__(self, key_prefix: str, baselines: Mapping[str, Baseline | None], sigmas: Decimal) -> None:
        self._prefix = key_prefix
        self._baselines = baselines
        self._sigmas = sigmas

    def alerts(self, notices: Sequence[str], windows: Sequence[Window], scopes: Sequence[Scope], user: str,
               now: datetime, spent: Sequence[int] = ()) -> list[Alert]:
        """The alerts of a script's notices; ``spent`` (per window) is a reserve reply's, for first denials."""
        found = []
        for notice in notices:
            kind, *rest = notice.split("|")
            if kind == "a":
                found.append(self.anomaly(now, int(rest[1])))
                continue
            window = windows[int(rest[0]) - 1]
            scope = scopes[window.scope]
            if kind == "t":
                found.append(self._window("threshold", window, scope, int(rest[2]), Decimal(rest[1]), user, now))
            elif kind == "b":
                found.append(self._window("blocked", window, scope, spent[int(rest[0]) - 1], Decimal(1), user, now))
            elif kind == "r":
                found.append(self._resolved(window, rest[1], now))
        return found

    def anomaly(self, now: datetime, spent: int) -> Alert:
        hour = now.replace(minute=0, second=0, microsecond=0)
        baseline = self._baselines.get(f"{now:%Y%m%d%H}")
        detail = baseline.describe(self._sigmas) if baseline else ""
        return Alert(
            kind="anomaly", scope="org", window="org.hour", window_key=f"h:{hour:%Y%m%d%H}00",
            window_start=hour, window_end=hour + timedelta(hours=1), level=Decimal(1),
            spent_usd=nano_to_usd(spent), limit_usd=None, at=now, key_prefix=self._prefix,
            detail=detail, next_step="Nothing is blocked by this alert; check the top users and features below.",
        )

    def _resolved(self, window: Window, old: str, now: datetime) -> Alert:
        return Alert(
            kind="resolved", scope="org", window=window.name, window_key=old,
            window_start=window.start, window_end=window.end, level=Decimal(1),
            spent_usd=Decimal(0), limit_usd=_cap_usd(window), at=now,
            key_prefix=self._prefix, next_step=f"the {window.name} window {window.suffix} is open",
        )

    def _window(self, kind: str, window: Window, scope: Scope, spent: int, level: Decimal, user: str,
                now: datetime) -> Alert:
        alert = Alert(
            kind="blocked" if kind == "blocked" else "threshold", scope="org",
            window=window.name, window_key=window.suffix, window_start=window.start, window_end=window.end,
            level=level, spent_usd=nano_to_usd(spent), limit_usd=_cap_usd(window), at=now,
            key_prefix=self._prefix, next_step=self._next_step(kind, window, scope, level),
        )
        if scope.budget == "user":
            return alert.with_(scope="user", user=user, user_key=user_tag(user), tier=scope.limits.tier)
        if not scope.org:
            return alert.with_(scope="budget", budget=scope.budget, value=scope.value, tier=scope.limits.plan,
                               value_key=scope.budget if scope.value is None else scope_tag(scope.budget, scope.value))
        return alert

    @staticmethod
    def _next_step(kind: str, window: Window, scope: Scope, level: Decimal) -> str:
        if window.end is None:
            blocked = f"requests that do not fit the {window.name} balance are denied until it is topped up"
        else:
            blocked = (f"requests that do not fit the {window.name} cap are denied until it resets at "
                       f"{window.end:%Y-%m-%d %H:%M %Z}")
        if kind == "blocked":
            return _sentence(blocked)
        routes = scope.limits.routes
        trigger, cap = window.limit.trigger, window.limit.cap
        steps = []
        if routes and trigger is not None and cap:
            pairs = ", ".join(f"{a} -> {b}" for a, b in routes.items())
            at = Decimal(trigger * 100) / cap
            now_or_then = "now" if level * 100 >= at else f"from {at:.0f}%"
            steps.append(f"requests are routed to cheaper models {now_or_then} ({pairs})")
        steps.append(f"at 100% {blocked}")
        return _sentence("; ".join(steps))
