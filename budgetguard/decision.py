"""The values budgetguard hands back: :class:`Decision` and :class:`Status`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from .usage import Usage
from .windows import WindowSet

__all__ = ["Decision", "Status", "Ticket", "WindowStatus"]


@dataclass(frozen=True, slots=True)
class Ticket:
    """Where a request's reservation lives, so settling needs no lookup."""

    request_key: str
    user_prefix: str
    org_prefix: str
    windows: WindowSet  # the windows the reservation was taken on
    amount_nano: int
    candidate: int  # 1-based index of the chosen candidate (the Lua calling convention)
    # On a cluster the user's windows may hold more than the org's: the user part is
    # reserved before the org's routing picks a cheaper model. None: the same amount.
    user_amount_nano: int | None = None
    org_local: bool = False  # the org's part was held in this process's slice (org.slice_usd)
    org_own: bool = False  # a repeat holding an org reservation of its own (see Engine.check_steps)
    # The engine that took the decision: only it may settle it (its prices, its store).
    owner: object = None
    attempt: str = ""  # this check's attempt id, by which a reserve in doubt is voided
    # The reserve was sent but its reply never came (fail_mode applied): it may run later,
    # so settling voids it (see settle.lua).
    in_doubt: bool = False

    def members(self, rid: str) -> tuple[str, str]:
        w = self.windows
        user_amount = self.amount_nano if self.user_amount_nano is None else self.user_amount_nano
        return (f"{rid}|{user_amount}|{w.h.stamp}|{w.d.stamp}|{w.m.stamp}",
                f"{rid}|{self.amount_nano}|{w.d.stamp}|{w.m.stamp}")


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
    spent_usd: Decimal
    reserved_usd: Decimal
    limit_usd: Decimal | None
    resets_at: datetime

    @property
    def utilization(self) -> Decimal | None:
        if not self.limit_usd:
            return None
        return (self.spent_usd + self.reserved_usd) / self.limit_usd


@dataclass(frozen=True, slots=True)
class Status:
    user: str
    tier: str
    windows: dict[str, WindowStatus]
