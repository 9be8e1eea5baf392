"""The values budgetguard hands back: :class:`Decision`, :class:`Status` and :class:`BudgetStatus`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .usage import Usage

if TYPE_CHECKING:
    from .scopes import Scope, Window

__all__ = ["BudgetStatus", "CountStatus", "Decision", "Status", "Ticket", "WindowStatus"]


@dataclass(frozen=True, slots=True)
class Ticket:
    """Where a request's reservation lives, so settling needs no lookup."""

    request_key: str
    scopes: tuple[Scope, ...]  # the budget values it was reserved on, the user's first, the org's last
    windows: tuple[Window, ...]  # the windows it was reserved on
    ranges: tuple[tuple[int, int], ...]  # per scope: (its first window, how many)
    # Per scope what its lease holds: (amount nano-USD, tokens), or the member text itself (a
    # repeat's, as the original wrote it). The members are built when a settle needs them,
    # not on every check.
    holds: tuple[tuple[int, int] | str, ...]
    rid: str
    amount_nano: int
    candidate: int  # 1-based index of the chosen candidate (the Lua calling convention)
    org_local: bool = False  # the org's part was held in this process's slice (org.slice_usd)
    own: frozenset[int] = frozenset()  # a repeat's scopes holding a reservation of its own (Engine.check_steps)
    # The engine that took the decision: only it may settle it (its prices, its store).
    owner: object = None
    attempt: str = ""  # this check's attempt id, by which a reserve in doubt is voided
    # The reserve was sent but its reply never came (fail_mode applied): it may run later,
    # so settling voids it (see settle.lua).
    in_doubt: bool = False

    def members(self) -> tuple[str, ...]:
        """Each scope's lease member, as reserve.lua writes it (see :func:`budgetguard.scopes.member`)."""
        from .scopes import member

        out = []
        for (first, count), hold in zip(self.ranges, self.holds, strict=True):
            out.append(hold if isinstance(hold, str) else
                       member(self.rid, hold[0], hold[1], self.windows[first:first + count]))
        return tuple(out)


@dataclass(slots=True, eq=False)
class Decision:
    """The outcome of a budget check. ``check`` returns one for denials too; it never raises."""

    allowed: bool
    model: str
    requested_model: str
    reason: str
    limit: str | None
    retry_after: int | None
    estimated_input_tokens: int
    estimated_cost_usd: Decimal
    reservation_id: str
    user: str
    tier: str
    max_output_tokens: int
    tags: Mapping[str, str] = field(default_factory=dict)
    enforced: bool = True  # False when fail_mode=open let the call through without Redis
    remaining_usd: Decimal | None = None  # smallest headroom left across capped windows
    budgets: tuple[str, ...] = ("user", "org")  # the budgets that applied to the call
    _ticket: Ticket | None = field(default=None, repr=False)
    _usage: Usage | None = field(default=None, repr=False)
    _bound: bool = field(default=False, repr=False)
    _started: float = field(default=0.0, repr=False)  # monotonic time of the check, for latency

    @property
    def downgraded(self) -> bool:
        return self.allowed and self.model != self.requested_model

    def record(self, response_or_usage: Any) -> None:
        """Inside ``guard.reserve(...)``: note the usage; the block's exit settles it once."""
        if not self._bound:
            raise RuntimeError(
                "Decision.record() works inside `with guard.reserve(...)`; use guard.record(decision, usage)"
            )
        try:
            self._usage = Usage.from_response(response_or_usage)
        except (ValueError, TypeError):
            # The call happened but its usage is unreadable: charge the worst case
            # reserved for it rather than nothing, then let the caller see the error.
            self._usage = Usage(input_tokens=self.estimated_input_tokens, output_tokens=self.max_output_tokens)
            raise


@dataclass(frozen=True, slots=True)
class WindowStatus:
    """A money window: dollars spent, reserved by calls in flight, and its cap."""

    spent_usd: Decimal
    reserved_usd: Decimal
    limit_usd: Decimal | None
    resets_at: datetime | None  # None: a balance (total_usd), which never resets

    @property
    def utilization(self) -> Decimal | None:
        if not self.limit_usd:
            return None
        return (self.spent_usd + self.reserved_usd) / self.limit_usd


@dataclass(frozen=True, slots=True)
class CountStatus:
    """A count window (``.rpm``, ``.tpm``, ``.concurrent``): requests or tokens, never dollars."""

    used: int  # settled this window (for .concurrent: always 0, calls in flight are `reserved`)
    reserved: int  # held by calls in flight
    limit: int | None
    resets_at: datetime | None  # None: calls in flight have no period
    unit: str  # "requests" or "tokens"

    @property
    def utilization(self) -> Decimal | None:
        if not self.limit:
            return None
        return Decimal(self.used + self.reserved) / self.limit


@dataclass(frozen=True, slots=True)
class Status:
    """Every window of every budget that applies to a user's calls, keyed by limit name."""

    user: str
    tier: str
    windows: dict[str, WindowStatus | CountStatus]
    budgets: tuple[str, ...] = ("user", "org")
    # Per budget that applies: (budget, value, plan); value None for shared counters and the org.
    scopes: tuple[tuple[str, str | None, str | None], ...] = ()


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """One budget value's windows (``guard.budget_status``)."""

    budget: str
    value: str | None
    plan: str | None
    windows: dict[str, WindowStatus | CountStatus]
