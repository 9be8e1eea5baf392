"""A user's effective limits: tier merged with per-user overrides, money as nano-USD."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from types import MappingProxyType
from typing import Any

from .config import Config, Downgrade, OrgConfig, PerRequest, TierConfig, UserConfig
from .errors import InvalidArgument
from .pricing import usd_to_nano

__all__ = ["OrgPolicy", "Policies", "UserPolicy"]

_EMPTY_ROUTES: MappingProxyType[str, str] = MappingProxyType({})


def _nano(usd: Decimal | None) -> int | None:
    return None if usd is None else usd_to_nano(usd)


def _trigger(cap: int | None, downgrade: Downgrade | None) -> int | None:
    """The spent+reserved level (nano-USD) at which routing starts, or None."""
    if cap is None or downgrade is None or not downgrade.routes:
        return None
    return int((Decimal(cap) * downgrade.at).to_integral_value(rounding=ROUND_CEILING))


def _routes(downgrade: Downgrade | None) -> MappingProxyType[str, str]:
    return MappingProxyType(dict(downgrade.routes)) if downgrade else _EMPTY_ROUTES


@dataclass(frozen=True, slots=True)
class UserPolicy:
    tier: str
    caps: tuple[int | None, int | None, int | None]  # hourly, daily, monthly
    triggers: tuple[int | None, int | None, int | None]
    max_input_tokens: int | None
    max_output_tokens: int | None
    max_cost_nano: int | None
    models: frozenset[str] | None
    routes: MappingProxyType[str, str]
    alert_at: tuple[Decimal, ...]

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class OrgPolicy:
    caps: tuple[int | None, int | None]  # daily, monthly
    triggers: tuple[int | None, int | None]
    routes: MappingProxyType[str, str]
    alert_at: tuple[Decimal, ...]

    @classmethod
    def from_config(cls, org: OrgConfig) -> OrgPolicy:
        caps = (_nano(org.daily_usd), _nano(org.monthly_usd))
        return cls(
            caps=caps,
            triggers=(_trigger(caps[0], org.downgrade), _trigger(caps[1], org.downgrade)),
            routes=_routes(org.downgrade),
            alert_at=tuple(sorted(org.alert_at)),
        )


def _merge(tier: TierConfig, user: UserConfig | None) -> dict[str, Any]:
    fields = {name: getattr(tier, name) for name in TierConfig.model_fields}
    if user is None:
        return fields
    for name in user.model_fields_set - {"tier"}:
        value = getattr(user, name)
        if name == "per_request" and value is not None and fields["per_request"] is not None:
            # Per-request caps merge field by field: a user can lift one without dropping the rest.
            value = fields["per_request"].model_copy(update=value.model_dump(exclude_unset=True))
        fields[name] = value
    return fields


class Policies:
    """Resolves and caches each user's :class:`UserPolicy` (most users share their tier's)."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self.org = OrgPolicy.from_config(config.org)
        self._by_tier: dict[str, UserPolicy] = {}
        self._by_user: dict[str, UserPolicy] = {}
        # A listed user on a tier given at run time: bounded by users x tiers in the config.
        self._by_user_tier: dict[tuple[str, str], UserPolicy] = {}
        self.tiers = frozenset(config.tiers) | {config.default_tier}

    def for_user(self, user: str, tier: str | None = None) -> UserPolicy:
        """The user's limits: ``tier``'s (a plan decided at run time) or the one the config
        gives the user, with the user's own overrides from ``users:`` on top either way."""
        if tier is not None:
            return self._on_tier(user, tier)
        policy = self._by_user.get(user)
        if policy is not None:
            return policy
        override = self._config.users.get(user)
        if override is None:
            return self._tier(self._config.default_tier)
        policy = self._build(override.tier or self._config.default_tier, override)
        self._by_user[user] = policy
        return policy

    def _on_tier(self, user: str, tier: str) -> UserPolicy:
        if tier not in self.tiers:
            raise InvalidArgument(f"tier {tier[:64]!r} is not a tier of the config "
                                  f"(tiers: {', '.join(sorted(self.tiers))})")
        override = self._config.users.get(user)
        if override is None:
            return self._tier(tier)
        policy = self._by_user_tier.get((user, tier))
        if policy is None:
            policy = self._by_user_tier[(user, tier)] = self._build(tier, override)
        return policy

    def _tier(self, name: str) -> UserPolicy:
        policy = self._by_tier.get(name)
        if policy is None:
            policy = self._by_tier[name] = self._build(name, None)
        return policy

    def _build(self, tier_name: str, user: UserConfig | None) -> UserPolicy:
        tier = self._config.tiers.get(tier_name) or TierConfig()
        f = _merge(tier, user)
        per_request: PerRequest = f["per_request"] or PerRequest()
        caps = (_nano(f["hourly_usd"]), _nano(f["daily_usd"]), _nano(f["monthly_usd"]))
        downgrade: Downgrade | None = f["downgrade"]
        return UserPolicy(
            tier=tier_name,
            caps=caps,
            triggers=(_trigger(caps[0], downgrade), _trigger(caps[1], downgrade), _trigger(caps[2], downgrade)),
            max_input_tokens=per_request.max_input_tokens,
            max_output_tokens=per_request.max_output_tokens,
            max_cost_nano=_nano(per_request.max_cost_usd),
            models=frozenset(f["models"]) if f["models"] is not None else None,
            routes=_routes(downgrade),
            alert_at=tuple(sorted(f["alert_at"] or ())),
        )
