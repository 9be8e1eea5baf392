"""Which budgets apply to a call, and their windows at one instant (no I/O).

A *scope* is one budget value: the user ``alice``, the tenant ``acme``, the shared
``deep_analysis`` budget, the org. Each is a hash slot of its own and a *part* of every
script call: on a single Redis one call takes every part, on a Redis Cluster one call
per part, from the most specific (the user) to the org.

A check's *windows* are its scopes' windows in that order, numbered from 0: the scripts'
window numbers, the replies' ``spent``/``reserved`` and the alerts' notices all count them
so (see :mod:`budgetguard.protocol`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .config import Config
from .errors import InvalidArgument, InvalidArgumentType
from .keys import KeySpace
from .limits import Limits, WindowLimit
from .policy import Policies
from .runtime import Runtime
from .windows import WindowSet, epoch_ms, minute_at

__all__ = ["Scope", "Scopes", "Window", "member", "need"]


@dataclass(frozen=True, slots=True)
class Scope:
    budget: str  # "user", "tenant", "org"
    value: str | None  # "alice", "acme"; None for a budget with one shared set of counters
    prefix: str  # its keys' prefix, hash tag included
    limits: Limits
    route_bit: int  # the reserve script's bit for this scope's routes
    version: str = "0"  # the runtime state version its limits were built on (budgetguard.runtime)

    @property
    def org(self) -> bool:
        return self.budget == "org"


@dataclass(frozen=True, slots=True)
class Window:
    """One window of one scope, at one instant."""

    name: str  # "tenant.monthly": what d.limit says
    scope: int  # index of its scope in the check's scopes
    limit: WindowLimit
    suffix: str  # its key suffix: "m:202612", "q:202612020301", "t", "c"
    start: datetime | None  # None: no period (a balance, calls in flight)
    end: datetime | None
    end_ms: int  # 0: never ends

    @property
    def money(self) -> bool:
        return self.limit.kind.money

    @property
    def code(self) -> str:
        """The scripts' kind: "m" money, "q" requests, "k" tokens, "c" calls in flight."""
        period = self.limit.kind.period
        return period if period in ("q", "k", "c") else "m"


def need(window: Window, amount: int, tokens: int) -> int:
    """What a request of ``amount`` nano-USD and ``tokens`` takes from ``window`` (as reserve.lua)."""
    code = window.code
    return amount if code == "m" else tokens if code == "k" else 1


def member(rid: str, amount: int, tokens: int, windows: Sequence[Window]) -> str:
    """A part's lease member, as reserve.lua writes it: count windows carry their own amount."""
    fields = [rid, str(amount)]
    for w in windows:
        fields.append(w.suffix if w.code == "m" else f"{w.suffix}={need(w, amount, tokens)}")
    return "|".join(fields)


def plans_argument(tier: Any, plans: Any) -> dict[str, str]:
    """The call's plans per budget (``tier`` is the user budget's), validated as text."""
    out: dict[str, str] = {}
    if plans is not None:
        if not isinstance(plans, Mapping):
            raise InvalidArgumentType(f"plans must be a mapping of budget name to plan, got {type(plans).__name__}")
        if len(plans) > 64:
            raise InvalidArgument(f"plans has {len(plans)} entries; at most 64 are allowed")
        for budget, plan in plans.items():
            if not isinstance(budget, str) or not isinstance(plan, str):
                raise InvalidArgumentType(f"plans[{str(budget)[:64]!r}] must map a budget name (str) to a plan "
                                          f"name (str), got {type(budget).__name__} -> {type(plan).__name__}")
            if not plan.strip() or len(plan) > 256:
                raise InvalidArgument(f"plans[{budget[:64]!r}] must be a plan name of 1 to 256 characters")
            out[budget] = plan
    if tier is not None:
        if not isinstance(tier, str):
            raise InvalidArgumentType(f"tier must be a string, got {type(tier).__name__}")
        if not tier.strip() or len(tier) > 256:
            raise InvalidArgument("tier must be a plan name of 1 to 256 characters")
        if out.get("user", tier) != tier:
            raise InvalidArgument(f"tier={tier!r} and plans['user']={out['user']!r} disagree")
        out["user"] = tier
    return out


class Scopes:
    """The scopes of a call under one config, and their windows at an instant."""

    def __init__(self, config: Config, keys: KeySpace, policies: Policies) -> None:
        self._config = config
        self._keys = keys
        self._policies = policies
        self.org_prefix = keys.org
        with_plans = {"user", *(name for name, b in config.budgets.items() if b.plans)}
        self._with_plans = frozenset(with_plans)
        # Per-value budgets first (more specific), then shared ones; the org last.
        names = list(config.budgets)
        self._order = [n for n in names if config.budgets[n].per is not None] + \
                      [n for n in names if config.budgets[n].per is None]

    def check_plans(self, plans: Mapping[str, str]) -> None:
        for budget in plans:
            if budget not in self._with_plans:
                raise InvalidArgument(f"plans[{budget[:64]!r}]: no budget of that name has plans (budgets with "
                                      f"plans: {', '.join(sorted(self._with_plans))})")

    def of_call(self, user: str, plans: Mapping[str, str], tags: Mapping[str, str], model: str | None,
                provider: str | None, runtime: Callable[[str], Runtime], now_ms: int) -> tuple[Scope, ...]:
        """Every scope that applies to a call: the user's, each matching budget's, the org's.

        ``runtime`` gives the runtime state last seen for a key prefix."""
        prefix = self._keys.user(user)
        state = runtime(prefix)
        scopes = [Scope("user", user, prefix, self._policies.for_user(user, plans.get("user"), state, now_ms), 1,
                        state.version)]
        if self._order:
            # The call's own dimensions are the call's: a tag of the same name never stands in.
            dims = dict(tags)
            dims["user"] = user
            for name, own in (("model", model), ("provider", provider)):
                if own:
                    dims[name] = own
                else:
                    dims.pop(name, None)
            budgets = self._config.budgets
            for name in self._order:
                budget = budgets[name]
                if budget.when and not budget.matches(dims):
                    continue
                value = None
                if budget.per is not None:
                    value = dims.get(budget.per)
                    if value is None:  # the call does not name its value: the budget does not apply
                        continue
                prefix = self._keys.budget(name, value)
                state = runtime(prefix)
                limits = self._policies.for_value(name, value, plans.get(name), state, now_ms)
                scopes.append(Scope(name, value, prefix, limits, 1 << len(scopes), state.version))
        state = runtime(self.org_prefix)
        scopes.append(Scope("org", None, self.org_prefix, self._policies.for_org(state, now_ms), 1 << len(scopes),
                            state.version))
        return tuple(scopes)

    def prefix_of(self, budget: str, value: str | None) -> str:
        """The key prefix of a budget value (validated as :meth:`of_budget` does)."""
        if budget == "org":
            if value is not None:
                raise InvalidArgument("the org budget has one shared set of counters: give no value")
            return self.org_prefix
        if budget == "user":
            if value is None:
                raise InvalidArgument("budget 'user' is kept per user: name the user")
            return self._keys.user(value)
        config = self._config.budgets.get(budget)
        if config is None:
            known = ", ".join(["user", *self._config.budgets, "org"])
            raise InvalidArgument(f"no budget named {budget[:64]!r} (budgets: {known})")
        if config.per is None and value is not None:
            raise InvalidArgument(f"budget {budget!r} has one shared set of counters: give no value")
        if config.per is not None and value is None:
            raise InvalidArgument(f"budget {budget!r} is kept per {config.per}: name the value")
        return self._keys.budget(budget, value)

    def of_budget(self, budget: str, value: str | None, plan: str | None = None,
                  runtime: Callable[[str], Runtime] | None = None, now_ms: int = 0) -> Scope:
        """One budget value's scope (for status and admin)."""
        prefix = self.prefix_of(budget, value)
        state = runtime(prefix) if runtime is not None else Runtime()
        if budget == "org":
            return Scope("org", None, prefix, self._policies.for_org(state, now_ms), 1, state.version)
        if budget == "user":
            assert value is not None
            return Scope("user", value, prefix, self._policies.for_user(value, plan, state, now_ms), 1,
                         state.version)
        return Scope(budget, value, prefix, self._policies.for_value(budget, value, plan, state, now_ms), 1,
                     state.version)


    @staticmethod
    def windows(scopes: Sequence[Scope], at: WindowSet, now: datetime, first: int = 0) -> tuple[Window, ...]:
        """The check's windows: each scope's, in order (``first``: the first scope's index)."""
        out = []
        minute = None
        for i, scope in enumerate(scopes, start=first):
            for limit in scope.limits.windows:
                period = limit.kind.period
                name = f"{scope.budget}.{limit.kind.name}"
                if period in ("h", "d", "w", "m"):
                    p = at.of(period)
                    out.append(Window(name, i, limit, p.stamp, p.start, p.end, epoch_ms(p.end)))
                elif period in ("q", "k"):
                    minute = minute or minute_at(now)
                    out.append(Window(name, i, limit, f"{period}:{minute.stamp}", minute.start, minute.end,
                                      epoch_ms(minute.end)))
                else:  # "t" a balance, "c" calls in flight: no period
                    out.append(Window(name, i, limit, period, None, None, 0))
        return tuple(out)
