"""``guard.admin``: change budgets while traffic runs (sync and async twins).

Each method changes one budget value's runtime state in Redis (see
:mod:`budgetguard.runtime`) and takes effect on the next check in every process. Every
change is an audit event in the usage stream (and the JSON Lines file, and ``on_event``):
``kind: "admin"``, the operation as ``outcome``, ``by``, and the state before and after.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .control import Change, Control

if TYPE_CHECKING:
    from .decision import BudgetStatus
    from .engine import Engine, Steps

__all__ = ["Admin"]


class Admin:
    """Operators' controls. ``value`` is None for a budget with one shared set of counters
    (and the org); ``by`` names who made a change in its audit event."""

    def __init__(self, engine: Callable[[], Engine], drive: Callable[[Steps], Any],
                 adrive: Callable[[Steps], Awaitable[Any]], emit: Callable[[Change, bool], None]) -> None:
        self._engine = engine
        self._drive = drive
        self._adrive = adrive
        self._emit = emit

    def _run(self, op: str, budget: str, value: str | None, by: str | None, **params: Any) -> Change:
        change: Change = self._drive(Control(self._engine()).steps(op, budget, value, by, **params))
        self._emit(change, True)
        return change

    async def _arun(self, op: str, budget: str, value: str | None, by: str | None, **params: Any) -> Change:
        change: Change = await self._adrive(Control(self._engine()).steps(op, budget, value, by, **params))
        self._emit(change, False)
        return change

    def assign(self, budget: str, value: str | None, plan: str | None, *, by: str | None = None) -> Change:
        """Put a value on a plan (None: back to its static plan). The call's own ``plans=`` still wins."""
        return self._run("assign", budget, value, by, plan=plan)

    def override(self, budget: str, value: str | None, *, by: str | None = None, **limits: Any) -> Change:
        """Set window limits on top of the plan: ``override("tenant", "acme", monthly_usd=300)``;
        a limit given as None removes its override."""
        return self._run("override", budget, value, by, limits=limits)

    def grant(self, budget: str, value: str | None, usd: Decimal | str | int, window: str, until: datetime, *,
              by: str | None = None) -> Change:
        """Raise a money window's cap by ``usd`` until ``until``, when the increase ends by itself."""
        return self._run("grant", budget, value, by, usd=usd, window=window, until=until)

    def top_up(self, budget: str, value: str | None, usd: Decimal | str | int, *, by: str | None = None) -> Change:
        """Add ``usd`` to a prepaid balance (``total_usd``)."""
        return self._run("topup", budget, value, by, usd=usd)

    def reset(self, budget: str, value: str | None, window: str, *, by: str | None = None) -> Change:
        """Forget a window's spend so far (what calls in flight hold stays held)."""
        return self._run("reset", budget, value, by, window=window)

    def show(self, budget: str, value: str | None = None) -> dict[str, Any]:
        """The value's plan, overrides, live grants and top-ups, and its windows."""
        change: Change = self._drive(Control(self._engine()).steps("show", budget, value))
        status: BudgetStatus = self._drive(self._engine().budget_status_steps(budget, value))
        return _shown(change, status)

    async def aassign(self, budget: str, value: str | None, plan: str | None, *, by: str | None = None) -> Change:
        return await self._arun("assign", budget, value, by, plan=plan)

    async def aoverride(self, budget: str, value: str | None, *, by: str | None = None, **limits: Any) -> Change:
        return await self._arun("override", budget, value, by, limits=limits)

    async def agrant(self, budget: str, value: str | None, usd: Decimal | str | int, window: str, until: datetime,
                     *, by: str | None = None) -> Change:
        return await self._arun("grant", budget, value, by, usd=usd, window=window, until=until)

    async def atop_up(self, budget: str, value: str | None, usd: Decimal | str | int, *,
                      by: str | None = None) -> Change:
        return await self._arun("topup", budget, value, by, usd=usd)

    async def areset(self, budget: str, value: str | None, window: str, *, by: str | None = None) -> Change:
        return await self._arun("reset", budget, value, by, window=window)

    async def ashow(self, budget: str, value: str | None = None) -> dict[str, Any]:
        change: Change = await self._adrive(Control(self._engine()).steps("show", budget, value))
        status: BudgetStatus = await self._adrive(self._engine().budget_status_steps(budget, value))
        return _shown(change, status)


def _shown(change: Change, status: BudgetStatus) -> dict[str, Any]:
    assigned = change.after.plan is not None and change.after.plan == status.plan
    return {"budget": status.budget, "value": status.value, "plan": status.plan,
            "plan_source": "assigned" if assigned else "config", "runtime": change.after.to_json(change.now_ms),
            "windows": status.windows}
