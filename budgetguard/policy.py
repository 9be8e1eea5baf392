"""Which limits apply to a budget value: plan resolution, with overrides merged in.

A budget value's plan is, first that exists: the call's (``tier=``/``plans=``), the static
``values:``/``users:`` entry's, the budget's ``default_plan`` (the user budget's
``default_tier``). Its limits are the plan's fields with the entry's own fields on top.
The user budget's plans are the tiers; the org has no plans.
"""

from __future__ import annotations

from typing import Any

from .config import BudgetConfig, BudgetValue, Config, PlanConfig, TierConfig, UserConfig, _TierFields
from .errors import InvalidArgument
from .limits import Limits, build_limits
from .runtime import NONE, Runtime

__all__ = ["Policies", "UserPolicy"]

UserPolicy = Limits  # the user budget's limits (a tier with the user's overrides)
_USER_WINDOWS = ("hourly", "daily", "monthly")
_ORG_WINDOWS = ("daily", "monthly")
_CACHE_MAX = 65_536  # runtime plans of listed values: bounded by the config, but keep a lid on it


def _merge(base: _TierFields, entry: _TierFields | None) -> dict[str, Any]:
    fields = {name: getattr(base, name) for name in _TierFields.model_fields}
    if entry is None:
        return fields
    for name in entry.model_fields_set & set(_TierFields.model_fields):
        value = getattr(entry, name)
        if name == "per_request" and value is not None and fields["per_request"] is not None:
            # Per-request caps merge field by field: a user can lift one without dropping the rest.
            value = fields["per_request"].model_copy(update=value.model_dump(exclude_unset=True))
        fields[name] = value
    return fields


class Policies:
    """Resolves and caches limits per budget value (most values share their plan's)."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._cache: dict[tuple[Any, ...], Limits] = {}
        self.org = build_limits("org", None, self._org_fields(), _ORG_WINDOWS)
        self.tiers = frozenset(config.tiers) | {config.default_tier}

    # -- the user budget ------------------------------------------------------------

    def for_user(self, user: str, tier: str | None = None, runtime: Runtime = NONE, now_ms: int = 0) -> Limits:
        """The user's limits: ``tier``'s (a plan decided at run time), else the one assigned
        at run time (``runtime``), else the one the config gives the user, with the user's
        own overrides from ``users:`` on top, and the runtime overrides and grants on top of all."""
        entry = self._config.users.get(user)
        if tier is not None:
            self.check_plan("user", tier)
        assigned = runtime.plan if runtime.plan in self.tiers else None
        plan = tier or assigned or (entry.tier if entry is not None and entry.tier else None) or \
            self._config.default_tier
        if runtime.empty:
            return self._cached(("user", plan, user if entry is not None else None),
                                lambda: self._build_user(plan, entry, runtime, now_ms))
        return self._cached(("user", plan, user, runtime, *(g.id for g in runtime.live_grants(now_ms))),
                            lambda: self._build_user(plan, entry, runtime, now_ms))

    def _build_user(self, tier_name: str, entry: UserConfig | None, runtime: Runtime, now_ms: int) -> Limits:
        tier = self._config.tiers.get(tier_name) or TierConfig()
        return build_limits("user", tier_name, runtime.applied(_merge(tier, entry), now_ms), _USER_WINDOWS)

    def check_plan(self, budget: str, plan: str) -> None:
        """InvalidArgument unless ``plan`` is a plan of ``budget`` (the user budget's are the tiers)."""
        if budget == "user":
            if plan not in self.tiers:
                raise InvalidArgument(f"tier {plan[:64]!r} is not a tier of the config "
                                      f"(tiers: {', '.join(sorted(self.tiers))})")
            return
        config = self._config.budgets.get(budget)
        if config is None or plan not in config.plans:
            known = ", ".join(config.plans) if config is not None and config.plans else "none"
            raise InvalidArgument(f"plan {plan[:64]!r} is not a plan of budget {budget!r} (plans: {known})")

    # -- budgets under `budgets:` --------------------------------------------------

    def for_value(self, budget: str, value: str | None, plan: str | None = None, runtime: Runtime = NONE,
                  now_ms: int = 0) -> Limits:
        """A budget value's limits, on ``plan`` (decided at run time), else the one assigned
        at run time, else its static one; the runtime overrides and grants on top."""
        config: BudgetConfig = self._config.budgets[budget]
        entry: BudgetValue | None = config.values.get(value) if value is not None else None
        if plan is not None:
            self.check_plan(budget, plan)
        elif config.plans:
            assigned = runtime.plan if runtime.plan in config.plans else None
            plan = assigned or (entry.plan if entry is not None else None) or config.default_plan
        if runtime.empty:
            return self._cached((budget, plan, value if entry is not None else None),
                                lambda: self._build_value(config, budget, plan, entry, runtime, now_ms))
        return self._cached((budget, plan, value, runtime, *(g.id for g in runtime.live_grants(now_ms))),
                            lambda: self._build_value(config, budget, plan, entry, runtime, now_ms))

    @staticmethod
    def _build_value(config: BudgetConfig, budget: str, plan: str | None, entry: BudgetValue | None,
                     runtime: Runtime, now_ms: int) -> Limits:
        base: _TierFields = config.plans[plan] if plan is not None else config
        if plan is None:  # the budget's own fields are its limits
            base = PlanConfig(**{name: getattr(config, name) for name in config.limit_fields()})
        return build_limits(budget, plan, runtime.applied(_merge(base, entry), now_ms))

    def for_org(self, runtime: Runtime = NONE, now_ms: int = 0) -> Limits:
        """The org's limits, with the runtime overrides and grants on top."""
        if runtime.empty:
            return self.org
        return self._cached(("org", None, None, runtime, *(g.id for g in runtime.live_grants(now_ms))),
                            lambda: build_limits("org", None, runtime.applied(self._org_fields(), now_ms),
                                                 _ORG_WINDOWS))

    def _org_fields(self) -> dict[str, Any]:
        org = self._config.org
        return {name: getattr(org, name, None) for name in _TierFields.model_fields} | {
            "alert_at": org.alert_at, "downgrade": org.downgrade}

    def _cached(self, key: tuple[Any, ...], build: Any) -> Limits:
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            found = self._cache[key] = build()
        return found
