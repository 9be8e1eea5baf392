"""Typed exceptions raised by budgetguard."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .decision import Decision


class BudgetGuardError(Exception):
    """Base class of every error budgetguard raises on purpose."""


class ConfigError(BudgetGuardError, ValueError):
    """limits.yaml (or a config object) is invalid; the message names the field's path."""


class InvalidArgument(BudgetGuardError, ValueError):
    """An argument of a public call has a bad value; nothing was reserved."""


class InvalidArgumentType(BudgetGuardError, TypeError, ValueError):
    """An argument of a public call has the wrong type; nothing was reserved.

    It is both a ``TypeError`` and a ``ValueError`` so that callers catching either
    (the contract promises ``ValueError`` for malformed input) see it.
    """


class BudgetExceeded(BudgetGuardError):
    """Raised by ``reserve`` and ``limit`` when the budget denies a call."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        super().__init__(decision.reason)
