"""budgetguard: budget enforcement for LLM calls, reserved before the call, settled after."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config, load_config
    from .decision import Decision, Status, WindowStatus
    from .errors import BudgetExceeded, BudgetGuardError, ConfigError, InvalidArgument, InvalidArgumentType
    from .guard import BudgetGuard, Reservation
    from .store import ScriptError, StoreUnavailable
    from .usage import Usage

# The public names load on first use (PEP 562): `budgetguard --help` and `budgetguard
# init` then start without importing pydantic, redis and httpx.
_WHERE = {
    "Config": "config", "load_config": "config",
    "Decision": "decision", "Status": "decision", "WindowStatus": "decision",
    "BudgetExceeded": "errors", "BudgetGuardError": "errors", "ConfigError": "errors",
    "InvalidArgument": "errors", "InvalidArgumentType": "errors",
    "BudgetGuard": "guard", "Reservation": "guard",
    "ScriptError": "store", "StoreUnavailable": "store",
    "Usage": "usage",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'budgetguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])

__all__ = [
    "BudgetExceeded",
    "BudgetGuard",
    "BudgetGuardError",
    "Config",
    "ConfigError",
    "Decision",
    "InvalidArgument",
    "InvalidArgumentType",
    "Reservation",
    "ScriptError",
    "Status",
    "StoreUnavailable",
    "Usage",
    "WindowStatus",
    "load_config",
]

__version__ = "0.1.0"
