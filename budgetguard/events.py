"""Usage events: one JSON object per settled call or denial, for cost attribution.

An event carries who (user, tier, tags), what (provider, requested and used model),
how much (tokens, exact decimal costs, the prices used) and how it went (outcome,
latency, estimate). It never carries prompt or completion text. The Redis Stream copy
is written by the settle script itself, so an event exists exactly when its spend was
counted; the JSON Lines file and callbacks receive the same object in the background.
"""

from __future__ import annotations

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
    from .usage import Usage

__all__ = ["EVENT_VERSION", "MAX_TEXT", "JsonlSink", "denial_event", "stream_head", "to_json", "usage_event"]

log = logging.getLogger("budgetguard.events")

EVENT_VERSION = 1
MAX_TEXT = 500  # reasons and error messages are cut to this many characters

Event = dict[str, Any]


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _cut(text: str | None) -> str | None:
    return None if text is None else text[:MAX_TEXT]


def _usd(nano: int) -> str:
    return f"{nano_to_usd(nano).normalize():f}"


def _base(decision: Decision, now: datetime, kind: str, provider: str | None) -> Event:
    return {
        "v": EVENT_VERSION,
        "ts": _ts(now),
        "kind": kind,
        "request_id": decision.reservation_id,
        "user": decision.user,
        "tier": decision.tier,
        "tags": dict(decision.tags),
        "provider": provider,
        "requested_model": decision.requested_model,
        "model": decision.model,
        "routed": decision.downgraded,
        "limit": decision.limit,
        "reason": _cut(decision.reason),
    }


def usage_event(decision: Decision, now: datetime, *, usage: Usage | None, input_cost_nano: int,
                cost_nano: int, prices: Mapping[str, str] | None, provider: str | None,
                latency_ms: int | None, error: str | None) -> Event:
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
        prices=None, latency_ms=None, error=None, outcome="denied",
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
