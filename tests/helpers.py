"""Test helpers: building guards from dict configs and computing costs independently."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import pytest

from budgetguard import BudgetGuard
from budgetguard.config import parse_config

# Prices the tests pin in their configs (USD per million tokens), so expected costs
# below are computed from these numbers, not from the library's code.
PRICES = {
    "gpt-4o": {"input_per_mtok": "2.50", "output_per_mtok": "10.00", "cached_input_per_mtok": "1.25"},
    "gpt-4o-mini": {"input_per_mtok": "0.15", "output_per_mtok": "0.60", "cached_input_per_mtok": "0.075"},
}

MSG = [{"role": "user", "content": "Summarise the quarterly report in three bullet points."}]


def config(**overrides: Any) -> Any:
    data: dict[str, Any] = {"models": dict(PRICES), "reservation_ttl_s": 60}
    data.update(overrides)
    return parse_config(data, env={})


def guard(url: str, clock: Any = None, **overrides: Any) -> BudgetGuard:
    return BudgetGuard(config(**overrides), redis_url=url, clock=clock)


def usd(value: str | int) -> Decimal:
    return Decimal(value)


def cost_usd(model: str, input_tokens: int, output_tokens: int, cached: int = 0) -> Decimal:
    """Independent price arithmetic: Decimal USD, rounded up to the nano-dollar."""
    p = {k: Decimal(v) for k, v in PRICES[model].items()}
    exact = ((input_tokens - cached) * p["input_per_mtok"] + cached * p["cached_input_per_mtok"]
             + output_tokens * p["output_per_mtok"]) / Decimal(1_000_000)
    return Decimal(math.ceil(exact * 10**9)) / 10**9


def estimate_usd(model: str, input_tokens: int, max_tokens: int) -> Decimal:
    return cost_usd(model, input_tokens, max_tokens)


def estimate(url: str, clock: Any = None, max_tokens: int = 50) -> Decimal:
    """The worst-case cost of one ``MSG`` request to gpt-4o, read from a probe that reserves and releases."""
    probe = guard(url, clock)
    d = probe.check("probe", "gpt-4o", MSG, max_tokens=max_tokens)
    probe.release(d)
    probe.close()
    return d.estimated_cost_usd


@pytest.fixture(params=["user+org", "user+tenant+everyone+org"])
def more_budgets(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module that imports this (autouse) runs each test twice: as written, and with two
    more budgets that apply to every call and never bind (one kept per user, one shared)."""
    if request.param == "user+org":
        return

    def with_budgets(**overrides: Any) -> Any:
        overrides.setdefault("budgets", {"tenant": {"per": "user", "daily_usd": "900000"},
                                         "everyone": {"monthly_usd": "9000000", "requests_per_minute": 10**9}})
        return _config(**overrides)

    monkeypatch.setitem(globals(), "config", with_budgets)


_config = config


def run_machine(machine: Any, examples: int, steps: int = 30) -> None:
    """Run a hypothesis state machine class (no deadline: the store's latency is not under test)."""
    from hypothesis import HealthCheck, settings

    machine.TestCase.settings = settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
    machine.TestCase().runTest()
