"""What the scripts report, as alerts: crossings and first denials become :class:`Alert` (no I/O).

The reserve, settle and slice scripts claim each alert's marker in the same step that moves
the spend, and report what they claimed as short notices (see the scripts' headers):

- ``t|<window>|<level>|<spent>``: a threshold crossed (settle, slice);
- ``b|<window>``: a cap's first denial (reserve);
- ``r|<window>|<old suffix>``: an org window blocked before, its successor now open (reserve, slice);
- ``a|<hour>|<spent>``: the org's hour went anomalous (settle, slice).

Windows are numbered from 1 as in :data:`budgetguard.windows.WINDOWS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal

from .alerts.anomaly import Baseline
from .alerts.model import Alert
from .keys import user_tag
from .policy import OrgPolicy, UserPolicy
from .pricing import nano_to_usd
from .windows import WINDOWS, Period, WindowSet

__all__ = ["Notices"]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


class Notices:
    """Builds the alerts of one config's windows. ``baselines`` (per UTC hour) is read as it fills."""

    def __init__(self, key_prefix: str, org: OrgPolicy, baselines: Mapping[str, Baseline | None],
                 sigmas: Decimal) -> None:
        self._prefix = key_prefix
        self._org = org
        self._baselines = baselines
        self._sigmas = sigmas

    def alerts(self, notices: Sequence[str], windows: WindowSet, user: str, policy: UserPolicy, now: datetime,
               spent: Sequence[int] = ()) -> list[Alert]:
        """The alerts of a script's notices; ``spent`` (per window) is a reserve reply's, for first denials."""
        found = []
        for notice in notices:
            kind, *rest = notice.split("|")
            if kind == "a":
                found.append(self.anomaly(now, int(rest[1])))
                continue
            w = int(rest[0]) - 1
            if kind == "t":
                found.append(self._window("threshold", w, windows, int(rest[2]), Decimal(rest[1]), user, policy, now))
            elif kind == "b":
                found.append(self._window("blocked", w, windows, spent[w], Decimal(1), user, policy, now))
            elif kind == "r":
                found.append(self._resolved(w, rest[1], windows, policy, now))
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

    def _resolved(self, w: int, old: str, windows: WindowSet, policy: UserPolicy, now: datetime) -> Alert:
        spec = WINDOWS[w]
        current = windows.of(spec.period)
        return Alert(
            kind="resolved", scope="org", window=spec.name, window_key=old,
            window_start=current.start, window_end=current.end, level=Decimal(1),
            spent_usd=Decimal(0), limit_usd=self._cap_usd(policy, w), at=now,
            key_prefix=self._prefix, next_step=f"the {spec.name} window {current.stamp} is open",
        )

    def _cap_usd(self, policy: UserPolicy, w: int) -> Decimal | None:
        cap = (*policy.caps, *self._org.caps)[w]
        return None if cap is None else nano_to_usd(cap)

    def _window(self, kind: str, w: int, windows: WindowSet, spent: int, level: Decimal, user: str,
                policy: UserPolicy, now: datetime) -> Alert:
        spec = WINDOWS[w]
        period = windows.of(spec.period)
        scoped = spec.scope == "user"
        return Alert(
            kind="blocked" if kind == "blocked" else "threshold",
            scope="user" if scoped else "org",
            window=spec.name, window_key=period.stamp, window_start=period.start, window_end=period.end,
            level=level, spent_usd=nano_to_usd(spent), limit_usd=self._cap_usd(policy, w), at=now,
            key_prefix=self._prefix,
            user=user if scoped else None, user_key=user_tag(user) if scoped else None,
            tier=policy.tier if scoped else None,
            next_step=self._next_step(kind, w, level, policy, period),
        )

    def _next_step(self, kind: str, w: int, level: Decimal, policy: UserPolicy, period: Period) -> str:
        spec = WINDOWS[w]
        resets = f"{period.end:%Y-%m-%d %H:%M %Z}"
        blocked = f"requests that do not fit the {spec.name} cap are denied until it resets at {resets}"
        if kind == "blocked":
            return _sentence(blocked)
        user_scope = spec.scope == "user"
        routes = policy.routes if user_scope else self._org.routes
        trigger = (policy.triggers if user_scope else self._org.triggers)[w if user_scope else w - 3]
        cap = (*policy.caps, *self._org.caps)[w]
        steps = []
        if routes and trigger is not None and cap:
            pairs = ", ".join(f"{a} -> {b}" for a, b in routes.items())
            at = Decimal(trigger * 100) / cap
            now_or_then = "now" if level * 100 >= at else f"from {at:.0f}%"
            steps.append(f"requests are routed to cheaper models {now_or_then} ({pairs})")
        steps.append(f"at 100% {blocked}")
        return _sentence("; ".join(steps))
