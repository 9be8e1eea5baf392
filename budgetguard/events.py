"""Usage events: one JSON object per settled call or denial, for cost attribution.

An event carries who (user, tier, tags), what (provider, requested and used model,
endpoint), how much (tokens, exact decimal costs, the prices used, the provider's usage
object as reported) and how it went (outcome, finish reason, streamed, latency,
estimate). It never carries prompt or completion text. The Redis Stream copy
is written by the settle script itself, so an event exists exactly when its spend was
counted; the JSON Lines file and callbacks receive the same object in the background.

Ids and tags come from callers and are kept in every event (up to ``stream_maxlen``
times in Redis, for good in the JSON Lines file), so their size is bounded: a user id,
request id or model name longer than :data:`MAX_ID` characters, a tag key longer than
:data:`MAX_TAG_KEY` and a tag value longer than :data:`MAX_TAG_VALUE` are replaced by
:func:`shorten`: their first characters, ``…#`` and the first 16 hex digits of the
SHA-256 of the whole text (UTF-8), exactly the bound long. The same text always gives
the same value, so reports still group one long id's events together, and distinct long
ids stay distinct. Text within its bound is kept as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .pricing import nano_to_usd

if TYPE_CHECKING:
    from .decision import Decision
    from .details import CallDetails
    from .usage import Usage

__all__ = ["EVENT_VERSION", "MAX_ID", "MAX_TAG_KEY", "MAX_TAG_VALUE", "MAX_TEXT", "JsonlSink", "denial_event",
           "shorten", "stream_head", "timestamp", "to_json", "usage_event"]

log = logging.getLogger("budgetguard.events")

EVENT_VERSION = 1
MAX_TEXT = 500  # reasons and error messages are cut to this many characters
MAX_ID = 256  # user ids, request ids and model names longer than this are shortened
MAX_TAG_KEY = 64
MAX_TAG_VALUE = 256

# What replaces the cut part: a marker, then the whole text's hash (64 bits: distinct
# ids that collide are vanishingly rare even among billions).
_MARK = "\u2026#"
_HASH_HEX = 16

Event = dict[str, Any]


def timestamp(moment: datetime) -> str:
    """An event's ``ts``: UTC, millisecond precision, ``Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _cut(text: str | None) -> str | None:
    return None if text is None else text[:MAX_TEXT]


def shorten(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters, else its first characters, ``…#``
    and 16 hex digits of its SHA-256, ``limit`` characters in all (so shortening twice
    changes nothing)."""
    if len(text) <= limit:
        return text
    if limit < len(_MARK) + _HASH_HEX:
        raise ValueError(f"limit must be at least {len(_MARK) + _HASH_HEX}")
    # surrogatepass: a lone surrogate (allowed in ids) still hashes, and distinctly.
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX]
    return text[:limit - len(_MARK) - _HASH_HEX] + _MARK + digest


def _id(text: str | None) -> str | None:
    return None if text is None else shorten(text, MAX_ID)


def _tags(tags: Mapping[str, str]) -> dict[str, str]:
    return {shorten(k, MAX_TAG_KEY): shorten(v, MAX_TAG_VALUE) for k, v in tags.items()}


def _usd(nano: int) -> str:
    return f"{nano_to_usd(nano).normalize():f}"


def _base(decision: Decision, now: datetime, kind: str, provider: str | None) -> Event:
    return {
        "v": EVENT_VERSION,
        "ts": timestamp(now),
        "kind": kind,
        "request_id": _id(decision.reservation_id),
        "user": _id(decision.user),
        "tier": decision.tier,
        "budgets": list(decision.budgets),  # every budget that applied: "user", "tenant", ..., "org"
        "tags": _tags(decision.tags),
        "provider": provider,
        "requested_model": _id(decision.requested_model),
        "model": _id(decision.model),
        "routed": decision.downgraded,
        "limit": decision.limit,
        "reason": _cut(decision.reason),
    }


def usage_event(decision: Decision, now: datetime, *, usage: Usage | None, input_cost_nano: int,
                cost_nano: int, prices: Mapping[str, str] | None, provider: str | None,
                latency_ms: int | None, error: str | None, details: CallDetails | None = None) -> Event:
    """The event of a settle, without its outcome (the settle script decides "expired")."""
    event = _base(decision, now, "usage", provider)
    event.update(
        input_tokens=usage.input_tokens if usage else 0,
        cached_input_tokens=usage.cached_input_tokens if usage else 0,
        cache_write_tokens=usage.cache_write_tokens if usage else 0,
        output_tokens=usage.output_tokens if usage else 0,
        reasoning_tokens=usage.reasoning_tokens if usage else 0,
        input_cost_usd=_usd(input_cost_nano),
        output_cost_usd=_usd(cost_nano - input_cost_nano),
        cost_usd=_usd(cost_nano),
        estimated_input_tokens=decision.estimated_input_tokens,
        max_output_tokens=decision.max_output_tokens,
        estimated_cost_usd=f"{decision.estimated_cost_usd.normalize():f}",
        prices=dict(prices) if prices else None,
        latency_ms=latency_ms,
        error=_cut(error),
        # Bounded by budgetguard.details: a short reason, an endpoint name, a capped usage object.
        finish_reason=details.finish_reason if details else None,
        streamed=details.streamed if details else None,
        endpoint=details.endpoint if details else None,
        raw_usage=details.raw_usage if details else None,
    )
    return event


def denial_event(decision: Decision, now: datetime, *, provider: str | None) -> Event:
    event = _base(decision, now, "denied", provider)
    event.update(
        input_tokens=0, cached_input_tokens=0, cache_write_tokens=0, output_tokens=0, reasoning_tokens=0,
        input_cost_usd="0", output_cost_usd="0", cost_usd="0",
        estimated_input_tokens=decision.estimated_input_tokens,
        max_output_tokens=decision.max_output_tokens,
        estimated_cost_usd=f"{decision.estimated_cost_usd.normalize():f}",
        prices=None, latency_ms=None, error=None, finish_reason=None, streamed=None, endpoint=None, raw_usage=None,
        outcome="denied",
    )
    return event


def to_json(event: Mapping[str, Any]) -> str:
    """The event as compact, pure-ASCII JSON.

    ASCII because user ids and tags may hold any string: a lone surrogate cannot be
    encoded as UTF-8 (neither for Redis nor for a file), and U+2028, U+0085 and friends
    would split a JSON Lines record for readers that break lines on them.
    """
    return json.dumps(event, separators=(",", ":"), ensure_ascii=True)


def stream_head(event: Event) -> str:
    """The event's JSON up to its outcome's value, which the settle script appends with '"}'."""
    return to_json(event)[:-1] + ',"outcome":"'


class JsonlSink:
    """Appends events to a JSON Lines file, one ``write`` per line.

    The file is opened with O_APPEND and each line goes out in a single write, so
    several processes can append to one file without interleaving their lines.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._fd: int | None = None

    def write(self, events: list[Event]) -> None:
        data = b"".join(to_json(e).encode("ascii") + b"\n" for e in events)
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            view = memoryview(data)
            while view:  # a regular file takes it all at once; loop for the odd short write
                view = view[os.write(self._fd, view):]

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
