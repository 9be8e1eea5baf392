"""budgetguard: budget enforcement for LLM calls, reserved before the call, settled after."""

from .config import Config, load_config
from .decision import Decision, Status, WindowStatus
from .errors import BudgetExceeded, BudgetGuardError, ConfigError, InvalidArgument, InvalidArgumentType
from .guard import BudgetGuard, Reservation
from .store import ScriptError, StoreUnavailable
from .usage import Usage

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
