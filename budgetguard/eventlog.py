"""Reading the usage log: the Redis Stream and JSON Lines files, once or following.

The event format is the producer's: one JSON object per event, stored in the stream
``<key_prefix>:{org}:events`` under the single field ``e``, or one per line in a file.
These functions only fetch and decode; :mod:`budgetguard.report` does the arithmetic.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import redis

from .config import Config
from .errors import BudgetGuardError
from .keys import KeySpace

__all__ = [
    "EVENT_FIELD",
    "EventLogError",
    "Loaded",
    "decode_event",
    "event_time",
    "follow_jsonl",
    "follow_stream",
    "read_jsonl",
    "read_stream",
    "stream_key",
]

log = logging.getLogger("budgetguard.eventlog")

EVENT_FIELD = b"e"
_PAGE = 500
# Events reach the stream in settle order, but the ``ts`` in them comes from each
# process's clock: a scan from the newest entry backwards stops only once it sees an
# event this much older than the range start, so a host whose clock lags still counts.
CLOCK_SKEW = timedelta(minutes=5)


Entry = tuple[bytes, dict[bytes, bytes]]


def _xrevrange(client: redis.Redis, key: str, upper: bytes | str, count: int) -> list[Entry]:
    # redis-py's annotations cover every reply shape; with bytes replies it is this one.
    return cast(list[Entry], client.xrevrange(key, max=upper, min="-", count=count) or [])


def _xread(client: redis.Redis, key: str, after: bytes, block_ms: int) -> list[Entry]:
    reply = cast(list[tuple[bytes, list[Entry]]], client.xread({key: after}, count=100, block=block_ms) or [])
    return [entry for _, entries in reply for entry in entries]


def _payload(fields: dict[Any, Any]) -> bytes | str | None:
    # b"e" from a client returning bytes (the guard's), "e" from one built with decode_responses=True.
    value = fields.get(EVENT_FIELD)
    return fields.get("e") if value is None else value


class EventLogError(BudgetGuardError):
    """The usage log cannot be read (a missing file, a store without a stream)."""


def stream_key(config: Config) -> str:
    return KeySpace(config.key_prefix).events


def event_time(text: Any) -> datetime:
    """An event's ``ts`` (ISO-8601, ``Z`` or an offset) as an aware UTC datetime; ValueError if not one."""
    if not isinstance(text, str):
        raise ValueError("ts must be a string")
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("ts has no timezone")
    return moment.astimezone(UTC)


def decode_event(raw: bytes | str) -> dict[str, Any] | None:
    """One event, or None when ``raw`` is not a JSON object (the caller counts it as skipped)."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class Loaded:
    """Events read from a log, and how many entries were not JSON objects."""

    events: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    source: str = ""

    def add(self, raw: bytes | str | None) -> dict[str, Any] | None:
        event = None if raw is None else decode_event(raw)
        if event is None:
            self.skipped += 1
        return event


def _in_range(event: dict[str, Any], start: datetime | None, end: datetime | None) -> bool | None:
    """True/False for an event inside/outside [start, end); None when its ts is unreadable."""
    try:
        moment = event_time(event.get("ts"))
    except ValueError:
        return None
    return (start is None or moment >= start) and (end is None or moment < end)


def read_stream(client: redis.Redis, key: str, start: datetime | None = None, end: datetime | None = None,
                page: int = _PAGE) -> Loaded:
    """Events of the stream whose ``ts`` lies in [start, end), oldest first.

    Walks back from the newest entry with XREVRANGE and stops after the first event
    older than ``start - CLOCK_SKEW``, so a report on the last day of a long stream
    reads about a day of entries. Entries with an unreadable ``ts`` are skipped.
    """
    loaded = Loaded(source=f"stream {key}")
    floor = None if start is None else start - CLOCK_SKEW
    upper: bytes | str = "+"
    newest_first: list[dict[str, Any]] = []
    while True:
        entries = _xrevrange(client, key, upper, page)
        for _, fields in entries:
            event = loaded.add(_payload(fields))
            if event is None:
                continue
            inside = _in_range(event, start, end)
            if inside is None:
                loaded.skipped += 1
                continue
            if inside:
                newest_first.append(event)
            elif floor is not None and event_time(event["ts"]) < floor:
                loaded.events = newest_first[::-1]
                return loaded
        if len(entries) < page:
            break
        upper = b"(" + entries[-1][0]
    loaded.events = newest_first[::-1]
    return loaded


def read_jsonl(path: str | os.PathLike[str], start: datetime | None = None, end: datetime | None = None) -> Loaded:
    """Events of a JSON Lines file whose ``ts`` lies in [start, end), in file order."""
    loaded = Loaded(source=f"file {os.fspath(path)}")
    try:
        with open(path, "rb") as fh:
            for line in fh:
                if not line.strip():
                    continue  # a blank line carries no event; not worth a warning
                event = loaded.add(line)
                if event is None:
                    continue
                inside = _in_range(event, start, end)
                if inside is None:
                    loaded.skipped += 1
                elif inside:
                    loaded.events.append(event)
    except OSError as exc:
        raise EventLogError(f"cannot read {os.fspath(path)}: {exc.strerror or exc}") from None
    return loaded


# -- following ---------------------------------------------------------------------------


def _last_ids(client: redis.Redis, key: str, backlog: int) -> tuple[list[Entry], bytes]:
    """The last ``backlog`` entries (oldest first) and the id to follow from."""
    newest = _xrevrange(client, key, "+", max(backlog, 1))
    if not newest:
        return [], b"0-0"
    return newest[:backlog][::-1], newest[0][0]


def follow_stream(client: redis.Redis, key: str, backlog: int = 10, block_ms: int = 1000,
                  idle_timeout: float | None = None,
                  clock: Callable[[], float] = time.monotonic) -> Iterator[dict[str, Any] | None]:
    """Yield the last ``backlog`` events, then each new one as it arrives (None for a bad entry).

    The position is fixed before anything is yielded, so an event added after the call
    starts is never missed. Ends after ``idle_timeout`` seconds without a new entry.
    """
    backlog_entries, last_id = _last_ids(client, key, backlog)
    for _, fields in backlog_entries:
        yield decode_event(_payload(fields) or b"")
    idle_since = clock()
    while True:
        wait = block_ms
        if idle_timeout is not None:
            left = idle_timeout - (clock() - idle_since)
            if left <= 0:
                return
            wait = max(1, min(block_ms, int(left * 1000)))
        for entry_id, fields in _xread(client, key, last_id, wait):
            last_id = entry_id
            idle_since = clock()
            yield decode_event(_payload(fields) or b"")


def follow_jsonl(path: str | os.PathLike[str], backlog: int = 10, poll_s: float = 0.2,
                 idle_timeout: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> Iterator[dict[str, Any] | None]:
    """Like :func:`follow_stream` for a JSON Lines file that other processes append to.

    Only complete lines are read, so a writer caught mid-line is read on the next poll.
    A file that shrinks (truncated or replaced) is read again from its start.
    """
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise EventLogError(f"cannot read {os.fspath(path)}: {exc.strerror or exc}") from None
    complete = data[: data.rfind(b"\n") + 1]
    position = len(complete)
    lines = [line for line in complete.splitlines() if line.strip()]
    for line in lines[-backlog:] if backlog else []:
        yield decode_event(line)
    idle_since = clock()
    while True:
        try:
            size = file.stat().st_size
        except OSError:
            size = 0  # being replaced: wait for the new file
        if size < position:
            position = 0
        if size > position:
            with file.open("rb") as fh:
                fh.seek(position)
                chunk = fh.read(size - position)
            complete = chunk[: chunk.rfind(b"\n") + 1]
            position += len(complete)
            for line in complete.splitlines():
                if line.strip():
                    idle_since = clock()
                    yield decode_event(line)
        if idle_timeout is not None and clock() - idle_since >= idle_timeout:
            return
        time.sleep(poll_s)
