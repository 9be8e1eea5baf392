"""Usage events to ledger rows and back: validation and conversion, no I/O.

:func:`to_row` turns one decoded stream event (the producer's JSON object, see
:mod:`budgetguard.events`) and its stream entry id into the row of ``usage_events``, or
raises :class:`RowError` naming what is wrong; nothing is guessed. Money becomes exact
integer nano-USD (a decimal string with more than nine places, or out of range, is an
error, never rounded). Every text a caller could make large is bounded as the producer
bounds it (ids :data:`~budgetguard.events.MAX_ID`, tags, reasons :data:`~budgetguard.events.MAX_TEXT`),
and the JSON columns (tags, prices, raw usage) have a size cap: an event beyond it is
refused, so one hostile entry cannot bloat the ledger.

:func:`to_event` is the inverse for reporting: a row read back from SQL becomes an
event dict that :func:`budgetguard.report.build_report` sums exactly as it sums the
stream's event, so the SQL report and the stream report are one arithmetic.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from ..eventlog import event_time
from ..events import MAX_ID, MAX_TAG_KEY, MAX_TAG_VALUE, MAX_TEXT, shorten
from ..pricing import nano_to_usd

__all__ = ["COLUMNS", "EVENT_COLUMNS", "KIND_OF_EVENT", "MAX_JSON", "MAX_TAGS", "RowError", "clean", "to_event",
           "to_row"]

# The event's kind -> the ledger's (usage, denial, admin).
KIND_OF_EVENT = {"usage": "usage", "denied": "denial", "admin": "admin"}
_EVENT_OF_KIND = {v: k for k, v in KIND_OF_EVENT.items()}

MAX_TAGS = 64  # tags per event
MAX_JSON = 16_384  # characters of each JSON column (tags, prices, raw_usage)
MAX_SHORT = 64  # outcome, kind, provider, finish_reason, endpoint
_MAX_COUNT = 2**62  # tokens and latency: far beyond any real call, inside BIGINT
_MAX_NANO = 2**62  # about 4.6 billion USD in one event
_NANO = Decimal(10) ** 9

COLUMNS = (
    "event_id", "ts", "kind", "outcome", "user_id", "tier", "request_id", "provider", "model",
    "requested_model", "routed", "limit_name", "reason", "error", "endpoint", "finish_reason", "streamed",
    "input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens",
    "cost_nano", "input_cost_nano", "estimated_nano", "estimated_input_tokens", "max_output_tokens",
    "latency_ms", "tags", "prices", "raw_usage",
)


class RowError(ValueError):
    """An event that cannot become a ledger row; the message names the field."""


def clean(text: str) -> str:
    """``text`` as SQL text columns can hold it: PostgreSQL refuses NUL and lone surrogates
    (both valid in ids), so they are spelled out as ``\\x00`` / ``\\udc80``. Deterministic,
    and text without them is unchanged."""
    if "\x00" not in text:
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, Mapping):
        return {clean(str(k)): _clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_json(v) for v in value]
    return value


def _count(event: Mapping[str, Any], key: str, *, optional: bool = False) -> int | None:
    value = event.get(key)
    if value is None:
        if optional:
            return None
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_COUNT:
        raise RowError(f"{key} is not a count")
    return value


def _nano(event: Mapping[str, Any], key: str) -> int:
    value = event.get(key)
    if value is None:
        return 0
    # Floats are refused, as the report refuses them: the format promises decimal strings.
    if isinstance(value, bool) or not isinstance(value, str | int) or (isinstance(value, str) and len(value) > 40):
        raise RowError(f"{key} is not a decimal string")
    try:
        amount = Decimal(value) * _NANO
    except ArithmeticError:  # InvalidOperation, and the Overflow of an exponent like 1e999999999
        raise RowError(f"{key} is not a decimal string") from None
    if not amount.is_finite() or amount != amount.to_integral_value():
        raise RowError(f"{key} is not a whole number of nano-USD")
    nano = int(amount)
    if not -_MAX_NANO < nano < _MAX_NANO:
        raise RowError(f"{key} is out of range")
    return nano


def _text(event: Mapping[str, Any], key: str, limit: int) -> str | None:
    value = event.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowError(f"{key} is not a string")
    return clean(shorten(value, limit) if limit >= 32 else value[:limit])


def _cut(event: Mapping[str, Any], key: str) -> str | None:
    value = event.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowError(f"{key} is not a string")
    return clean(value[:MAX_TEXT])


def _flag(event: Mapping[str, Any], key: str) -> bool | None:
    value = event.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise RowError(f"{key} is not true or false")


def _json(value: Any, key: str) -> Any:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RowError(f"{key} is not an object")
    try:
        text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        raise RowError(f"{key} is not plain JSON") from None
    if len(text) > MAX_JSON:
        raise RowError(f"{key} is larger than {MAX_JSON} characters")
    return _clean_json(json.loads(text))  # a plain copy, detached from the event


def _tags(event: Mapping[str, Any]) -> dict[str, str]:
    tags = event.get("tags") or {}
    if not isinstance(tags, Mapping):
        raise RowError("tags is not an object")
    if len(tags) > MAX_TAGS:
        raise RowError(f"tags has more than {MAX_TAGS} entries")
    out = {}
    for k, v in tags.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise RowError("tags must map strings to strings")
        out[clean(shorten(k, MAX_TAG_KEY))] = clean(shorten(v, MAX_TAG_VALUE))
    return out


def _ts(event: Mapping[str, Any]) -> datetime:
    try:
        return event_time(event.get("ts"))
    except ValueError as exc:
        raise RowError(f"ts: {exc}") from None


def to_row(event_id: str, event: Mapping[str, Any]) -> dict[str, Any]:
    """The ``usage_events`` row of one event; RowError naming the field when it is malformed."""
    raw_kind = event.get("kind")
    kind = KIND_OF_EVENT.get(raw_kind) if isinstance(raw_kind, str) else None
    if kind is None:
        raise RowError("kind is not usage, denied or admin")
    outcome = _text(event, "outcome", MAX_SHORT)
    if outcome is None:
        raise RowError("outcome is missing")
    cost = _nano(event, "cost_usd")
    row: dict[str, Any] = {
        "event_id": event_id,
        "ts": _ts(event),
        "kind": kind,
        "outcome": outcome,
        "user_id": _text(event, "user", MAX_ID),
        "tier": _text(event, "tier", MAX_ID),
        "request_id": _text(event, "request_id", MAX_ID),
        "provider": _text(event, "provider", MAX_SHORT),
        "model": _text(event, "model", MAX_ID),
        "requested_model": _text(event, "requested_model", MAX_ID),
        "routed": _flag(event, "routed"),
        "limit_name": _text(event, "limit", MAX_ID),
        "reason": _cut(event, "reason"),
        "error": _cut(event, "error"),
        "endpoint": _text(event, "endpoint", MAX_SHORT),
        "finish_reason": _text(event, "finish_reason", MAX_SHORT),
        "streamed": _flag(event, "streamed"),
        "cost_nano": cost,
        "input_cost_nano": _nano(event, "input_cost_usd"),
        "estimated_nano": _nano(event, "estimated_cost_usd"),
        "latency_ms": _count(event, "latency_ms", optional=True),
        "estimated_input_tokens": _count(event, "estimated_input_tokens", optional=True),
        "max_output_tokens": _count(event, "max_output_tokens", optional=True),
        "tags": _tags(event),
        "prices": _json(event.get("prices"), "prices"),
        "raw_usage": _json(event.get("raw_usage"), "raw_usage"),
    }
    for key in ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens"):
        row[key] = _count(event, key)
    # The report sums output cost as its own field; the ledger keeps it as cost - input cost,
    # which is how the producer computes it, so a disagreeing event is refused, not stored.
    if "output_cost_usd" in event and _nano(event, "output_cost_usd") != cost - row["input_cost_nano"]:
        raise RowError("output_cost_usd is not cost_usd - input_cost_usd")
    return row


def _usd(nano: int | None) -> str:
    return f"{nano_to_usd(nano or 0).normalize():f}"


def _utc(moment: datetime) -> str:
    # SQLite hands naive datetimes back; the ledger stores UTC only.
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


# What to_event reads: a report need not fetch (nor decode) the prices and raw usage.
EVENT_COLUMNS = ("ts", "kind", "outcome", "user_id", "tier", "request_id", "provider", "model", "requested_model",
                 "tags", "input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens",
                 "reasoning_tokens", "cost_nano", "input_cost_nano", "estimated_nano", "latency_ms", "finish_reason",
                 "streamed")


def to_event(row: Mapping[str, Any]) -> dict[str, Any]:
    """A ledger row as an event dict in the producer's format (for the report's arithmetic)."""
    cost = row["cost_nano"] or 0
    in_cost = row["input_cost_nano"] or 0
    return {
        "ts": _utc(row["ts"]),
        "kind": _EVENT_OF_KIND.get(row["kind"], row["kind"]),
        "outcome": row["outcome"],
        "user": row["user_id"],
        "tier": row["tier"],
        "request_id": row["request_id"],
        "provider": row["provider"],
        "model": row["model"],
        "requested_model": row["requested_model"],
        "tags": row["tags"] or {},
        "input_tokens": row["input_tokens"],
        "cached_input_tokens": row["cached_input_tokens"],
        "cache_write_tokens": row["cache_write_tokens"],
        "output_tokens": row["output_tokens"],
        "reasoning_tokens": row["reasoning_tokens"],
        "cost_usd": _usd(cost),
        "input_cost_usd": _usd(in_cost),
        "output_cost_usd": _usd(cost - in_cost),
        "estimated_cost_usd": _usd(row["estimated_nano"]),
        "latency_ms": row["latency_ms"],
        "finish_reason": row["finish_reason"],
        "streamed": row["streamed"],
    }
