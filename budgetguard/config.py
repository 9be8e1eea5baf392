"""limits.yaml: pydantic models, ``${VAR}`` expansion and cross-field checks.

Every mistake surfaces as one :class:`ConfigError` whose message starts with the
dotted path of the offending field (``tiers.pro.hourly_usd: ...``), so a bad file
never half-loads.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

__all__ = [
    "BUILTIN_BUDGETS",
    "AlertsConfig",
    "AnomalyConfig",
    "ApiKey",
    "BudgetConfig",
    "BudgetValue",
    "Config",
    "Downgrade",
    "EventsConfig",
    "ModelOverride",
    "OrgConfig",
    "PerRequest",
    "PlanConfig",
    "ProxyConfig",
    "TierConfig",
    "UserConfig",
    "load_config",
    "parse_config",
    "upstream_url",
]

# Bounds on what a limits.yaml may hold. A real file stays far below every one; they exist so a
# hostile or runaway file is refused with a ConfigError instead of hanging the loader, exhausting
# the stack or slowing every check. 10,000 users plus 10,000 api keys take about 1.5 MB and
# 130,000 YAML nodes, so that much fits with room to spare.
MAX_FILE_BYTES = 16 * 1024 * 1024  # checked before parsing, so an oversized file costs no YAML work
MAX_NODES = 250_000  # YAML nodes (keys, values, list items) counted as often as aliases repeat them
MAX_DEPTH = 64  # nested mappings and lists; the deepest field, tiers.<name>.downgrade.routes, is at 5
MAX_ALERT_LEVELS = 16  # alert_at: each level is a threshold that every check and record evaluates
MAX_MODELS = 1_000  # an allow-list, a downgrade route table, the price overrides under models
MAX_TIERS = 1_000
MAX_USERS = 10_000  # users without overrides need no entry: unlisted users get default_tier
MAX_API_KEYS = 10_000
MAX_HEADERS = 64  # alerts.webhook.headers
# Every budget that applies is a part of each check's one script: a few dozen windows at most.
MAX_BUDGETS = 16
MAX_PLANS = 100
MAX_BUDGET_VALUES = 10_000  # static `values:` of one budget; the rest are assigned at run time
_MAX_PROBLEMS = 20  # a ConfigError lists this many problems and counts the rest


# Caps stay below 2**53 nano-USD, the range where the Lua scripts compare exactly.
def _not_bool(value: Any) -> Any:
    # YAML's `true` would otherwise pass as the integer 1.
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Usd = Annotated[Decimal, Field(ge=0, le=9_000_000, decimal_places=9), BeforeValidator(_not_bool)]
Threshold = Annotated[Decimal, Field(gt=0, le=1), BeforeValidator(_not_bool)]
TokenCount = Annotated[int, Field(gt=0, le=100_000_000), BeforeValidator(_not_bool)]
Count = Annotated[int, BeforeValidator(_not_bool)]
# A rate or a concurrency cap: a whole number of requests or tokens, never a fraction.
Rate = Annotated[int, Field(gt=0, le=1_000_000_000_000), BeforeValidator(_not_bool)]
PerMTok = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=9), BeforeValidator(_not_bool)]
AlertLevels = Annotated[list[Threshold], Field(max_length=MAX_ALERT_LEVELS)]
ModelList = Annotated[list[str], Field(max_length=MAX_MODELS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PerRequest(_Strict):
    max_input_tokens: TokenCount | None = None
    max_output_tokens: TokenCount | None = None
    max_cost_usd: Usd | None = None


class Downgrade(_Strict):
    at: Threshold = Decimal(1)
    routes: dict[str, str] = Field(default_factory=dict, max_length=MAX_MODELS)  # at most 1,000 routes


class _Windows(_Strict):
    """The window limits any budget may carry (see :mod:`budgetguard.limits`)."""

    hourly_usd: Usd | None = None
    daily_usd: Usd | None = None
    weekly_usd: Usd | None = None  # the ISO week (from Monday 00:00) in `timezone`
    monthly_usd: Usd | None = None
    total_usd: Usd | None = None  # never resets: a prepaid balance
    requests_per_minute: Rate | None = None
    tokens_per_minute: Rate | None = None  # estimated input + max output, settled to the reported total
    max_concurrent: Rate | None = None  # reservations in flight


class _TierFields(_Windows):
    per_request: PerRequest | None = None
    models: ModelList | None = None  # allow-list, at most 1,000 models
    downgrade: Downgrade | None = None
    alert_at: AlertLevels | None = None  # at most 16 levels


class TierConfig(_TierFields):
    """One user tier: caps per window, per-request caps, allow-list, routing."""


class UserConfig(_TierFields):
    """A named user: its tier plus per-user overrides of any tier field."""

    tier: str | None = None


BUILTIN_BUDGETS = frozenset({"user", "org", "request", "model", "store"})
_BUDGET_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# A dimension a budget may be kept `per:` or filtered `when:` on: a tag name (the call's
# tags), or one of the call's own: the user, the requested model, the model's provider.
_DIMENSION = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
CALL_DIMENSIONS = frozenset({"user", "model", "provider"})


class PlanConfig(_TierFields):
    """One plan of a budget: like a tier, its windows, per-request caps, allow-list, routing."""


class BudgetValue(_TierFields):
    """A budget value listed in ``values:``: its plan and overrides of any plan field."""

    plan: str | None = None


WhenValues = Annotated[list[str], Field(min_length=1, max_length=MAX_MODELS)]


class BudgetConfig(_TierFields):
    """A named budget under ``budgets:`` (see DESIGN section 6)."""

    per: str | None = None
    when: dict[str, str | WhenValues] = Field(default_factory=dict, max_length=16)
    default_plan: str | None = None
    plans: dict[str, PlanConfig] = Field(default_factory=dict, max_length=MAX_PLANS)
    values: dict[str, BudgetValue] = Field(default_factory=dict, max_length=MAX_BUDGET_VALUES)

    @field_validator("per")
    @classmethod
    def _dimension(cls, value: str | None) -> str | None:
        if value is not None and not _DIMENSION.match(value):
            raise ValueError(f"{value[:64]!r} is not a dimension: a tag name ([a-z][a-z0-9_]*) or one of "
                             f"{', '.join(sorted(CALL_DIMENSIONS))}")
        return value

    @field_validator("when")
    @classmethod
    def _dimensions(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not _DIMENSION.match(name):
                raise ValueError(f"{name[:64]!r} is not a dimension: a tag name ([a-z][a-z0-9_]*) or one of "
                                 f"{', '.join(sorted(CALL_DIMENSIONS))}")
        return value

    def matches(self, dims: Mapping[str, str]) -> bool:
        """Whether a call with these dimensions (tags, user, model, provider) is in this budget."""
        for name, allowed in self.when.items():
            value = dims.get(name)
            if value is None or (value != allowed if isinstance(allowed, str) else value not in allowed):
                return False
        return True

    def limit_fields(self) -> set[str]:
        """The limit fields set on the budget itself (not in its plans)."""
        return self.model_fields_set - {"per", "when", "default_plan", "plans", "values"}


class OrgConfig(_Windows):
    alert_at: AlertLevels = Field(default_factory=list)  # at most 16 levels
    downgrade: Downgrade | None = None
    forecast: bool = False  # alert once a month when the spend rate would exhaust monthly_usd early
    # Opt-in: each process serves the org's part of checks from a slice of this size
    # (see budgetguard.slices), handing spend in at least every slice_flush_s.
    slice_usd: Usd | None = Field(default=None, gt=0)
    slice_flush_s: float = Field(default=1.0, gt=0, le=60)


class ModelOverride(_Strict):
    """Price override (USD per million tokens) or a model the pricing library lacks."""

    input_per_mtok: PerMTok | None = None
    output_per_mtok: PerMTok | None = None
    cached_input_per_mtok: PerMTok | None = None
    cache_write_per_mtok: PerMTok | None = None
    reasoning_per_mtok: PerMTok | None = None
    tokenizer: str | None = None


def _check_url(value: str) -> str:
    # An empty value (an unset ${VAR}) disables the sink instead of failing the load.
    if value == "":
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL with a host")
    return value


Scope = Literal["org", "user", "budget"]


class _Sink(_Strict):
    # Which alerts a sink receives: at or above min_level, for these scopes.
    min_level: Threshold | None = None
    # Three scopes exist (every budget under `budgets:` is "budget"), so a longer list only repeats them.
    scopes: list[Scope] = Field(default_factory=lambda: list[Scope](["org", "user", "budget"]), min_length=1,
                                max_length=3)


class SlackConfig(_Sink):
    webhook_url: str = ""
    # The org's channel would otherwise hear of every user reaching their own caps (and
    # read who): users only when asked, with scopes: [org, user].
    scopes: list[Scope] = Field(default_factory=lambda: list[Scope](["org"]), min_length=1, max_length=3)
    _url = field_validator("webhook_url")(_check_url)


class PagerDutyConfig(_Sink):
    routing_key: str = ""
    min_level: Threshold | None = Decimal("0.9")
    # Paging on every user that reaches its own cap would drown on-call: org only by default.
    scopes: list[Scope] = Field(default_factory=lambda: list[Scope](["org"]), min_length=1, max_length=3)
    url: str = "https://events.pagerduty.com/v2/enqueue"
    source: str = "budgetguard"
    _url = field_validator("url")(_check_url)


class WebhookConfig(_Sink):
    url: str = ""
    headers: dict[str, str] = Field(default_factory=dict, max_length=MAX_HEADERS)  # at most 64
    _url = field_validator("url")(_check_url)


class AlertsConfig(_Strict):
    slack: SlackConfig | None = None
    pagerduty: PagerDutyConfig | None = None
    webhook: WebhookConfig | None = None
    timeout_s: Annotated[float, Field(gt=0, le=60), BeforeValidator(_not_bool)] = 5.0
    retries: Annotated[int, Field(ge=0, le=10), BeforeValidator(_not_bool)] = 4
    backoff_s: Annotated[float, Field(gt=0, le=60), BeforeValidator(_not_bool)] = 0.5  # first retry's wait
    queue_size: Annotated[int, Field(gt=0, le=1_000_000), BeforeValidator(_not_bool)] = 1000
    # close() waits at most this long for queued alerts and events.
    flush_timeout_s: Annotated[float, Field(ge=0, le=600), BeforeValidator(_not_bool)] = 5.0


class EventsConfig(_Strict):
    """The usage log: one event per settled call or denial."""

    stream_maxlen: Annotated[int, Field(ge=0, le=100_000_000), BeforeValidator(_not_bool)] = 100_000  # 0: no stream
    jsonl_path: str | None = None


class AnomalyConfig(_Strict):
    """Alert on an hour of org spend far above the same hour of the trailing days."""

    enabled: bool = True
    sigmas: Annotated[Decimal, Field(gt=0, le=100), BeforeValidator(_not_bool)] = Decimal(3)
    baseline_days: Annotated[int, Field(ge=2, le=60), BeforeValidator(_not_bool)] = 14
    min_history_days: Annotated[int, Field(ge=2, le=60), BeforeValidator(_not_bool)] = 7
    min_spend_usd: Usd = Decimal(1)  # quieter hours than this never alert, however unusual


_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# RFC 9110 token characters: what a header name may contain.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers the proxy reads or rewrites itself; naming one as the user header would be a mistake.
_RESERVED_HEADERS = frozenset({"authorization", "x-api-key", "host", "content-length", "content-type",
                               "connection", "transfer-encoding", "accept-encoding", "cookie"})


class ApiKey(_Strict):
    """One caller key of the proxy, kept as the SHA-256 of the key (never the key itself)."""

    sha256: str
    user: str
    name: str | None = None  # a label for people and the usage log (tag ``api_key``)
    # The caller's plans (``{user: pro}``: its tier) and tags (``{tenant: acme}``) for every
    # call made with the key.
    plans: dict[str, str] = Field(default_factory=dict, max_length=8)
    tags: dict[str, str] = Field(default_factory=dict, max_length=16)
    # A key `budgetguard hash-key --generate` made (bg-...): worthless to a provider, so the
    # proxy warns at start when no upstream key would replace it.
    generated: bool = False

    @field_validator("sha256", mode="before")
    @classmethod
    def _hex_digest(cls, value: Any) -> Any:
        # The message never repeats the value: a pasted plaintext key must not reach a log.
        if not isinstance(value, str) or not _SHA256_HEX.match(value):
            raise ValueError("must be the key's SHA-256 as 64 lowercase hex characters "
                             "(`budgetguard hash-key` prints it)")
        return value

    @field_validator("user")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty user id")
        return value


def upstream_url(value: str) -> str:
    """An upstream base URL: http(s), a host, no query; without the ``/v1`` the requests bring."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL with a host, e.g. https://api.openai.com")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    if parts.username is not None or parts.password is not None:
        # It would be logged with the URL; credentials belong in upstream_api_key.
        raise ValueError("must not carry credentials (user:password@); use proxy.upstream_api_key")
    try:
        parts.port  # noqa: B018  # a bad port raises here
    except ValueError:
        raise ValueError("has an invalid port") from None
    if parts.path.rstrip("/").endswith("/v1"):
        raise ValueError("must be the base URL without /v1 (requests keep their /v1/... path), "
                         "e.g. https://api.openai.com")
    return value.rstrip("/")


def _optional_upstream(value: str | None) -> str | None:
    # An unset ${VAR} leaves the upstream to the command line.
    if value is None or value == "":
        return None
    return upstream_url(value)


def credential(value: str | None) -> str | None:
    """An upstream key as given (None: pass callers' keys through); refuses empty or padded ones."""
    if value is None:
        return None
    if value == "":
        # Most likely an unset ${VAR}: silently passing callers' keys through instead
        # would send budgetguard's virtual keys to the provider.
        raise ValueError("is empty (an unset environment variable?); remove the field to pass callers' keys "
                         "through instead")
    if value != value.strip() or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise ValueError("contains whitespace or control characters")
    return value


class ProxyConfig(_Strict):
    """``budgetguard proxy``: where requests go and how callers are known."""

    upstream: str | None = None
    anthropic_upstream: str | None = None  # /v1/messages and Anthropic SDK calls; default: upstream
    upstream_api_key: str | None = None  # set: callers hold budgetguard keys only, this one goes upstream
    anthropic_api_key: str | None = None
    user_header: str | None = None  # a trusted header naming the user (behind an auth gateway only)
    # Which unbudgeted /v1 requests are forwarded: GET /v1/models only, any read, anything, nothing.
    passthrough: Literal["models", "read", "all", "none"] = "models"
    timeout_s: Annotated[float, Field(gt=0, le=86_400), BeforeValidator(_not_bool)] = 600.0
    connect_timeout_s: Annotated[float, Field(gt=0, le=600), BeforeValidator(_not_bool)] = 10.0
    max_body_bytes: Annotated[int, Field(gt=0, le=1 << 30), BeforeValidator(_not_bool)] = 16 * 1024 * 1024
    max_connections: Annotated[int, Field(gt=0, le=100_000), BeforeValidator(_not_bool)] = 1000

    _upstreams = field_validator("upstream", "anthropic_upstream")(_optional_upstream)
    _keys = field_validator("upstream_api_key", "anthropic_api_key")(credential)

    @field_validator("user_header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not _HEADER_NAME.match(value):
            raise ValueError(f"{value!r} is not a valid HTTP header name")
        if value.lower() in _RESERVED_HEADERS or value.lower().startswith("proxy-"):
            raise ValueError(f"{value!r} is a header the proxy reads or rewrites itself; use a dedicated one "
                             "such as X-Budget-User")
        return value


class Config(_Strict):
    """The whole of limits.yaml. Build it with :func:`load_config` or :func:`parse_config`."""

    redis_url: str | None = None  # None: $REDIS_URL, else memory://
    key_prefix: str = Field(default="bg", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    timezone: str = "UTC"
    fail_mode: Literal["open", "closed"] = "open"
    redis_timeout_ms: Count = Field(default=250, gt=0, le=60_000)
    redis_max_connections: Count = Field(default=64, gt=0, le=10_000)
    reservation_ttl_s: Count = Field(default=600, gt=0, le=7 * 86_400)
    default_max_output_tokens: TokenCount = 4096
    unknown_model: str = "deny"
    models: dict[str, ModelOverride] = Field(default_factory=dict, max_length=MAX_MODELS)  # at most 1,000
    default_tier: str = "default"
    tiers: dict[str, TierConfig] = Field(default_factory=dict, max_length=MAX_TIERS)  # at most 1,000
    users: dict[str, UserConfig] = Field(default_factory=dict, max_length=MAX_USERS)  # at most 10,000
    org: OrgConfig = Field(default_factory=OrgConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    anomaly: AnomalyConfig = Field(default_factory=AnomalyConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    api_keys: list[ApiKey] = Field(default_factory=list, max_length=MAX_API_KEYS)  # at most 10,000
    budgets: dict[str, BudgetConfig] = Field(default_factory=dict, max_length=MAX_BUDGETS)  # at most 16

    def named_models(self) -> frozenset[str]:
        """Every model name the configuration mentions: ``models:``, ``unknown_model``, the
        tiers', users' and org's allowed models and both ends of their downgrade routes."""
        names = set(self.models)
        if self.unknown_model != "deny":
            names.add(self.unknown_model)
        scopes: list[Any] = [*self.tiers.values(), *self.users.values(), self.org]
        for budget in self.budgets.values():
            scopes += [budget, *budget.plans.values(), *budget.values.values()]
        for scope in scopes:
            names.update(getattr(scope, "models", None) or ())
            downgrade = getattr(scope, "downgrade", None)
            if downgrade is not None:
                names.update(downgrade.routes)
                names.update(downgrade.routes.values())
        return frozenset(names)

    @field_validator("redis_url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        scheme = urlsplit(value).scheme
        if scheme not in ("redis", "rediss", "unix", "memory", "redis+cluster", "rediss+cluster") \
                or "://" not in value:
            # The URL itself may carry a password: name only its scheme.
            raise ValueError("must be a redis://, rediss://, redis+cluster://, rediss+cluster://, unix:// or "
                             f"memory:// URL (scheme {scheme!r})")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r} (use an IANA name such as UTC or Europe/Paris)") from None
        return value

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(data: Any, env: Mapping[str, str]) -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in every string, as a shell would.

    :func:`parse_config` also takes data that never went through the YAML checks, so the walk
    bounds itself: nesting deeper than MAX_DEPTH (a structure that contains itself included) or
    more than MAX_NODES values is a ConfigError, never a RecursionError or an endless walk over
    shared references.
    """
    seen = 0

    def expand(node: Any, loc: tuple[str, ...]) -> Any:
        nonlocal seen
        seen += 1
        if seen > MAX_NODES:
            raise ConfigError(f"<root>: holds more than {MAX_NODES:,} values, the most a config may have")
        if isinstance(node, str):
            return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), node)
        if isinstance(node, dict | list) and len(loc) >= MAX_DEPTH:
            raise ConfigError(f"{_path(loc)}: nests deeper than {MAX_DEPTH} levels of mappings and lists")
        if isinstance(node, dict):
            return {key: expand(value, (*loc, str(key))) for key, value in node.items()}
        if isinstance(node, list):
            return [expand(value, (*loc, str(i))) for i, value in enumerate(node)]
        return node

    return expand(data, ())


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys instead of keeping the last one, and bounds the document.

    Composing counts nodes and nesting as it goes, so a huge or deep file stops early and the
    composer's recursion stays shallow; :func:`_check_expansion` then bounds what aliases make
    of the composed graph before anything is constructed.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._nodes += 1  # an alias counts once here; _check_expansion counts what it repeats
        if self._nodes > MAX_NODES:
            raise ConfigError(f"line {self._line()}: the file has more than {MAX_NODES:,} nodes "
                              "(keys, values and list items), the most a limits.yaml may have")
        return super().compose_node(parent, index)

    def compose_sequence_node(self, anchor: Any) -> yaml.SequenceNode:
        self._descend()
        try:
            return super().compose_sequence_node(anchor)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        self._descend()
        try:
            return super().compose_mapping_node(anchor)
        finally:
            self._depth -= 1

    def _descend(self) -> None:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise ConfigError(f"line {self._line()}: nests deeper than {MAX_DEPTH} levels of mappings and lists")

    def _line(self) -> int:
        return int(self.peek_event().start_mark.line) + 1

    def get_single_data(self) -> Any:
        # yaml.load's entry point: compose, bound the node graph, and only then construct.
        node = self.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return self.construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: a key must be a plain value, "
                                  f"not {type(key).__name__}") from None
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"duplicate key {key!r} at line {line}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a composed document that aliases take past MAX_NODES nodes or MAX_DEPTH levels.

    Constructing shares one object per anchor, but ``${VAR}`` expansion and validation walk the
    expanded tree, where nine levels of ten aliases (billion laughs) make 10**9 nodes of a
    1 KB file. Each node's expanded size and height are computed once, so this check is linear
    in the file however much the aliases multiply, and its recursion stops at MAX_DEPTH.
    """
    measured: dict[yaml.Node, tuple[int, int]] = {}  # node -> (expanded nodes, levels of mappings/lists)
    walking: set[yaml.Node] = set()  # collections being measured: meeting one again is a cycle

    def too_deep(node: yaml.Node) -> ConfigError:
        return ConfigError(f"line {node.start_mark.line + 1}: nests deeper than {MAX_DEPTH} levels of mappings "
                           "and lists once aliases are expanded")

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:
        # depth: how many mappings and lists enclose this node once aliases are expanded.
        known = measured.get(node)
        if known is None:
            if isinstance(node, yaml.ScalarNode):
                known = (1, 0)
            else:
                line = node.start_mark.line + 1
                if node in walking:
                    # PyYAML lets an alias name an enclosing anchor; expanded, it never ends.
                    raise ConfigError(f"line {line}: an alias refers to a mapping or list that contains it")
                if depth >= MAX_DEPTH:
                    raise too_deep(node)
                walking.add(node)
                children = node.value if isinstance(node, yaml.SequenceNode) else \
                    [part for pair in node.value for part in pair]
                size, height = 1, 0
                for child in children:
                    child_size, child_height = measure(child, depth + 1)
                    size += child_size
                    height = max(height, child_height)
                    if size > MAX_NODES:
                        # Composing already refused more nodes than this, so aliases did it.
                        raise ConfigError(f"line {line}: the file expands to more than {MAX_NODES:,} nodes "
                                          "through aliases (each *name repeats everything under &name)")
                walking.discard(node)
                known = (size, height + 1)
            measured[node] = known
        if depth + known[1] > MAX_DEPTH:
            raise too_deep(node)
        return known

    measure(root, 0)


def _path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<root>"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: its position and problem (PyYAML's own text spans lines,
    quoting the file with a caret under the culprit)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        return f"{at}{exc.problem or exc.context or 'syntax error'}{context}"
    return " ".join(str(exc).split())


def _unwrap(annotation: Any) -> Any:
    """``X`` of ``Annotated[X, ...]`` and ``X | None`` (the first non-None member)."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = members[0] if members else None
        else:
            return annotation


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The config model holding the last key of ``loc``, walking field types from Config."""
    current: Any = Config
    for part in loc[:-1]:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) in (dict, list):
            current = typing.get_args(current)[-1]  # a dict's value type, a list's item type
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _suggestion(err: Any) -> str:
    """" (did you mean hourly_usd?)" for a misspelt key; "" otherwise."""
    loc = tuple(err.get("loc", ()))
    if err.get("type") != "extra_forbidden" or not loc or not isinstance(loc[-1], str):
        return ""
    model = _model_at(loc)
    if model is None:
        return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def parse_config(data: Any, env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed mapping (e.g. from YAML) into a :class:`Config`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"<root>: must be a mapping, got {type(data).__name__}")
    try:
        data = _expand(data, os.environ if env is None else env)
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # Thousands of bad entries would make a message nobody reads: name the first ones, count the rest.
        problems = [f"{_path(err['loc'])}: {err['msg']}{_suggestion(err)}" for err in errors[:_MAX_PROBLEMS]]
        if len(errors) > _MAX_PROBLEMS:
            problems.append(f"and {len(errors) - _MAX_PROBLEMS:,} more problems")
        raise ConfigError("; ".join(problems)) from None
    except RecursionError:
        # _expand keeps the data within MAX_DEPTH; this only fires when called from a deep stack.
        raise ConfigError(f"<root>: nests too deeply to validate (at most {MAX_DEPTH} levels)") from None
    _check_references(config)
    return config


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate limits.yaml; raise :class:`ConfigError` naming the bad field."""
    where = os.fspath(path)
    try:
        with Path(path).open("rb") as file:
            # One byte past the bound tells an oversized file (or an endless device) apart.
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_FILE_BYTES >> 20} MiB, the most a limits.yaml may be")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        # The loader's bounds keep its recursion shallow; this only fires when called from a deep stack.
        raise ConfigError(f"{where} nests too deeply to load (at most {MAX_DEPTH} levels)") from None
    return parse_config(data, env)


def _check_references(config: Config) -> None:
    """Cross-field rules pydantic cannot see: tiers exist, routes and fallbacks are priced."""
    from .pricing import Pricebook  # pricing needs a Config; import late to avoid a cycle

    if config.default_tier != "default" and config.default_tier not in config.tiers:
        raise ConfigError(f"default_tier: tier {config.default_tier!r} is not defined under tiers")
    for name, user in config.users.items():
        if user.tier is not None and user.tier not in config.tiers:
            raise ConfigError(f"users.{name}.tier: tier {user.tier!r} is not defined under tiers")

    first_of: dict[str, int] = {}
    for i, entry in enumerate(config.api_keys):
        j = first_of.setdefault(entry.sha256, i)
        if j != i:
            # Two users for one key would make the charge depend on list order.
            raise ConfigError(f"api_keys.{i}.sha256: the same key as api_keys.{j}.sha256 (each key once)")
        for budget, plan in entry.plans.items():
            problem = plan_problem(config, budget, plan)
            if problem:
                raise ConfigError(f"api_keys.{i}.plans.{budget}: {problem}")
        if "api_key" in entry.tags:
            raise ConfigError(f"api_keys.{i}.tags.api_key: the proxy sets this tag itself (the key's name)")

    _check_budgets(config)
    if config.anomaly.min_history_days > config.anomaly.baseline_days:
        raise ConfigError(f"anomaly.min_history_days: {config.anomaly.min_history_days} exceeds baseline_days "
                          f"({config.anomaly.baseline_days}), so the detector could never speak")

    prices = Pricebook(config.models)
    for name, override in config.models.items():
        if override.tokenizer is not None:
            _check_encoding(f"models.{name}.tokenizer", override.tokenizer)
        if prices.resolve(name) is None:
            raise ConfigError(
                f"models.{name}: not in the pricing library, so input_per_mtok and output_per_mtok are required"
            )
    if config.unknown_model != "deny" and prices.resolve(config.unknown_model) is None:
        raise ConfigError(f"unknown_model: {config.unknown_model!r} has no known price (use 'deny' or a priced model)")

    def priced(model: str) -> bool:
        return prices.resolve(model) is not None or config.unknown_model != "deny"

    scopes: list[tuple[str, _TierFields | OrgConfig]] = [(f"tiers.{n}", t) for n, t in config.tiers.items()]
    scopes += [(f"users.{n}", u) for n, u in config.users.items()]
    scopes.append(("org", config.org))
    for budget_name, section in config.budgets.items():
        scopes.append((f"budgets.{budget_name}", section))
        scopes += [(f"budgets.{budget_name}.plans.{p}", plan) for p, plan in section.plans.items()]
        scopes += [(f"budgets.{budget_name}.values.{v}", value) for v, value in section.values.items()]
    for where, scope in scopes:
        allowed = getattr(scope, "models", None)
        for i, model in enumerate(allowed or ()):
            if not priced(model):
                raise ConfigError(f"{where}.models.{i}: {model!r} has no known price, so it could never be used")
        if scope.downgrade is None:
            continue
        for source, target in scope.downgrade.routes.items():
            here = f"{where}.downgrade.routes.{source}"
            source_price, target_price = prices.resolve(source), prices.resolve(target)
            if source_price is None:
                raise ConfigError(f"{here}: {source!r} has no known price, so no request for it is ever allowed")
            if target_price is None:
                raise ConfigError(f"{here}: route target {target!r} has no known price")
            if allowed is not None and target not in allowed:
                raise ConfigError(f"{here}: route target {target!r} is not in {where}.models")
            if (target_price.input.base > source_price.input.base
                    or target_price.output.base > source_price.output.base):
                raise ConfigError(f"{here}: route target {target!r} costs more than {source!r}")


def budgets_with_plans(config: Config) -> list[str]:
    return ["user", *(name for name, budget in config.budgets.items() if budget.plans)]


def plan_problem(config: Config, budget: str, plan: Any) -> str | None:
    """Why ``plan`` is not a plan of ``budget`` (None when it is). The user budget's plans are the tiers."""
    if not isinstance(plan, str):
        return f"a plan name is a string, got {type(plan).__name__}"
    if budget == "user":
        if plan in config.tiers or plan == config.default_tier:
            return None
        known = sorted({*config.tiers, config.default_tier})
        return f"tier {plan[:64]!r} is not defined under tiers (tiers: {', '.join(known)})"
    found = config.budgets.get(budget)
    if found is None or not found.plans:
        return (f"no budget of that name has plans (budgets with plans: "
                f"{', '.join(budgets_with_plans(config))})")
    if plan not in found.plans:
        return f"{plan[:64]!r} is not a plan of budget {budget!r} (plans: {', '.join(found.plans)})"
    return None


def _check_budgets(config: Config) -> None:
    if config.org.slice_usd is not None:
        other = sorted(config.org.model_fields_set & {"hourly_usd", "weekly_usd", "total_usd", "requests_per_minute",
                                                      "tokens_per_minute", "max_concurrent"})
        if other:
            raise ConfigError(f"org.{other[0]}: org slices (slice_usd) hold the org's daily and monthly windows "
                              "only; drop slice_usd to cap other org windows")
    for name, budget in config.budgets.items():
        where = f"budgets.{name}"
        if not _BUDGET_NAME.match(name):
            raise ConfigError(f"{where}: a budget name is [a-z][a-z0-9_]{{0,31}}")
        if name in BUILTIN_BUDGETS:
            raise ConfigError(f"{where}: {name!r} is a built-in name ({', '.join(sorted(BUILTIN_BUDGETS))}); "
                              "the user's and the org's budgets are `tiers:`/`users:` and `org:`")
        if budget.plans:
            direct = sorted(budget.limit_fields())
            if direct:
                raise ConfigError(f"{where}.{direct[0]}: a budget with plans carries its limits in its plans")
            if budget.default_plan is None:
                raise ConfigError(f"{where}.default_plan: required when the budget has plans "
                                  f"(plans: {', '.join(budget.plans)})")
            if budget.default_plan not in budget.plans:
                raise ConfigError(f"{where}.default_plan: {budget.default_plan!r} is not a plan of the budget "
                                  f"(plans: {', '.join(budget.plans)})")
        elif budget.default_plan is not None:
            raise ConfigError(f"{where}.default_plan: the budget has no plans")
        if budget.values and budget.per is None:
            raise ConfigError(f"{where}.values: the budget has one shared set of counters (no `per:`), "
                              "so it has no values to list")
        for value, entry in budget.values.items():
            if entry.plan is not None and entry.plan not in budget.plans:
                raise ConfigError(f"{where}.values.{value}.plan: {entry.plan!r} is not a plan of the budget"
                                  + (f" (plans: {', '.join(budget.plans)})" if budget.plans else
                                     " (it has no plans)"))


def _check_encoding(where: str, name: str) -> None:
    import tiktoken

    if name not in tiktoken.list_encoding_names():
        known = ", ".join(sorted(tiktoken.list_encoding_names()))
        raise ConfigError(f"{where}: unknown tiktoken encoding {name!r} (known: {known})")
