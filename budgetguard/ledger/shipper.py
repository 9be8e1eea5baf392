"""Shipping the usage stream into the SQL ledger through a Redis consumer group.

Delivery contract:

* **At least once from the stream.** Entries are read with ``XREADGROUP`` in the group
  (default ``ledger``); an entry stays pending for its consumer until acknowledged.
* **Acknowledged only after the batch commits.** A batch is converted
  (:func:`budgetguard.ledger.rows.to_row`), inserted in one transaction, committed, and
  only then ``XACK``-ed. A shipper that dies anywhere in between leaves the batch
  pending; a database that fails leaves it pending and nothing is acknowledged.
* **Exactly once in the table.** The row key is the entry id, and an insert of an id
  already present changes nothing, so a redelivered batch (claimed after a crash, or
  read by two shippers at once) adds no row.
* **Dead consumers' entries are claimed.** Before reading new entries a shipper takes
  over (``XAUTOCLAIM``) entries pending longer than ``claim_idle_ms`` in any consumer,
  its own included. Entries that were trimmed from the stream while pending cannot be
  shipped: they are acknowledged, counted as ``lost`` and logged at ERROR.
* **Malformed entries never block the rest.** An entry that is not a JSON object or not
  a valid event is counted, logged (id and reason, never the payload) and acknowledged
  with its batch.
* **Lag.** The group's lag (entries not yet read) plus its pending count is compared with
  the stream's ``stream_maxlen``: past ``lag_warn_fraction`` of it a warning says that
  trimming is about to drop unshipped events.

Several shippers may run at once, each its own consumer in the group. :class:`Shipper`
does the I/O; :class:`ShipStats` is what it reports (the CLI prints it, the metrics
export it).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from sqlalchemy.exc import SQLAlchemyError

from ..eventlog import EVENT_FIELD, decode_event
from ..redact import printable
from .rows import RowError, to_row
from .store import Ledger

__all__ = ["Lag", "ShipOptions", "ShipStats", "Shipper"]

log = logging.getLogger("budgetguard.ledger")

Entry = tuple[bytes, dict[bytes, bytes] | None]

MAX_BATCH = 10_000


@dataclass(frozen=True)
class ShipOptions:
    """How a shipper reads; every field bounded (``validate``)."""

    group: str = "ledger"
    consumer: str = ""  # default: host-pid, so a restarted shipper is a new consumer
    batch_size: int = 5000
    block_ms: int = 1000
    claim_idle_ms: int = 60_000
    lag_warn_fraction: float = 0.5
    retry_s: float = 5.0  # wait before retrying a batch the database refused

    def validate(self) -> ShipOptions:
        for name, value, low, high in (("batch size", self.batch_size, 1, MAX_BATCH),
                                       ("block_ms", self.block_ms, 1, 60_000),
                                       ("claim idle", self.claim_idle_ms, 0, 7 * 86_400_000)):
            if not low <= value <= high:
                raise ValueError(f"{name} {value}: must be between {low} and {high}")
        if not 0 < self.lag_warn_fraction <= 1:
            raise ValueError("lag warning fraction must be above 0 and at most 1")
        for name, text in (("group", self.group), ("consumer", self.consumer)):
            if len(text) > 128 or any(c.isspace() for c in text):
                raise ValueError(f"{name} name must be at most 128 characters without white space")
        if not self.group:
            raise ValueError("group name must not be empty")
        return self


@dataclass(frozen=True)
class Lag:
    behind: int | None  # entries the group has not read yet (None: Redis cannot tell)
    pending: int  # read but not acknowledged
    maxlen: int  # 0: the stream is not capped here

    @property
    def unshipped(self) -> int | None:
        return None if self.behind is None else self.behind + self.pending

    def at_risk(self, fraction: float) -> bool:
        return bool(self.maxlen) and (self.unshipped is None or self.unshipped >= fraction * self.maxlen)


@dataclass
class ShipStats:
    """Counts since the shipper started."""

    read: int = 0
    inserted: int = 0
    duplicates: int = 0  # redelivered entries already in the table
    malformed: int = 0
    lost: int = 0  # trimmed from the stream while pending
    batches: int = 0
    db_errors: int = 0
    started: float = field(default_factory=time.monotonic)
    lag: Lag | None = None


def _default_consumer() -> str:
    return f"{socket.gethostname()[:64]}-{os.getpid()}"


class Shipper:
    """Ships one stream into one ledger table. Not thread-safe: one loop per instance."""

    def __init__(self, client: redis.Redis, stream: str, ledger: Ledger, *, options: ShipOptions | None = None,
                 stream_maxlen: int = 0, on_batch: Callable[[ShipStats], None] | None = None,
                 on_commit: Callable[[list[dict[str, Any]]], object] | None = None) -> None:
        self.client = client
        self.stream = stream
        self.ledger = ledger
        self.options = (options or ShipOptions()).validate()
        self.consumer = self.options.consumer or _default_consumer()
        self.stream_maxlen = stream_maxlen
        self.stats = ShipStats()
        self._on_batch = on_batch
        self._on_commit = on_commit  # sees each batch's rows once they are committed and acknowledged
        self._claim_cursor = b"0-0"
        self._warned_lag = False
        self._reported_trim = 0  # unread entries found trimmed so far

    # -- steps -------------------------------------------------------------------------

    def setup(self) -> None:
        """Create the consumer group (from the stream's first entry) when missing."""
        try:
            self.client.xgroup_create(self.stream, self.options.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def claim(self) -> list[Entry]:
        """Entries pending longer than ``claim_idle_ms`` (one page), now this consumer's."""
        reply = cast(list[Any], self.client.xautoclaim(
            self.stream, self.options.group, self.consumer, self.options.claim_idle_ms,
            start_id=self._claim_cursor, count=self.options.batch_size))
        self._claim_cursor = reply[0]
        entries = [(i, f) for i, f in reply[1] if i is not None]
        deleted = reply[2] if len(reply) > 2 else []
        if deleted:
            # XAUTOCLAIM already dropped them from the pending list (Redis 7); acknowledge
            # anyway for servers that keep them, and say loudly that they are gone.
            self.client.xack(self.stream, self.options.group, *deleted)
            self.stats.lost += len(deleted)
            log.error("%d pending events were trimmed from %s before they were shipped (first %s): they are "
                      "missing from the ledger; raise events.stream_maxlen or ship more often",
                      len(deleted), self.stream, _text(deleted[0]))
        return entries

    def read(self, block_ms: int | None) -> list[Entry]:
        """New entries for this consumer (``block_ms`` None: do not wait)."""
        reply = cast(list[Any], self.client.xreadgroup(
            self.options.group, self.consumer, {self.stream: ">"}, count=self.options.batch_size,
            block=block_ms) or [])
        return [entry for _, entries in reply for entry in entries]

    def ship(self, entries: list[Entry]) -> int:
        """Write ``entries`` in one transaction, then acknowledge them all; the rows inserted.

        Raises (nothing acknowledged) when the database refuses the batch.
        """
        if not entries:
            return 0
        rows = []
        for entry_id, fields in entries:
            event_id = _text(entry_id)
            payload = None if fields is None else fields.get(EVENT_FIELD)
            event = None if payload is None else decode_event(payload)
            if event is None:
                self._malformed(event_id, "not a JSON object")
                continue
            try:
                rows.append(to_row(event_id, event))
            except RowError as exc:
                self._malformed(event_id, str(exc))
            except Exception as exc:  # whatever else an entry holds, it must not stop the rest
                self._malformed(event_id, f"unreadable ({type(exc).__name__})")
        started = time.monotonic()
        inserted = self.ledger.insert(rows)
        self.client.xack(self.stream, self.options.group, *[entry_id for entry_id, _ in entries])
        self.stats.read += len(entries)
        self.stats.inserted += inserted
        self.stats.duplicates += len(rows) - inserted
        self.stats.batches += 1
        log.debug("shipped %d entries (%d new) in %.3f s", len(entries), inserted, time.monotonic() - started)
        if self._on_commit is not None and rows:
            self._on_commit(rows)
        if self._on_batch is not None:
            self._on_batch(self.stats)
        return inserted

    def _malformed(self, event_id: str, why: str) -> None:
        self.stats.malformed += 1
        log.warning("skipped stream entry %s of %s: %s", event_id, self.stream, printable(why))

    def lag(self) -> Lag:
        """The group's lag; warns when near the stream's cap, errs when unread entries were trimmed."""
        pipe = self.client.pipeline(transaction=True)  # one snapshot of the group and the stream
        pipe.xinfo_groups(self.stream)
        pipe.xinfo_stream(self.stream)
        groups, info = cast(tuple[list[dict[str, Any]], dict[str, Any]], tuple(pipe.execute()))
        mine = next((g for g in groups if _text(g.get("name", b"")) == self.options.group), None)
        if mine is None:
            return Lag(None, 0, self.stream_maxlen)
        behind = mine.get("lag")
        lag = Lag(None if behind is None else int(behind), int(mine.get("pending", 0)), self.stream_maxlen)
        self.stats.lag = lag
        # Every entry added and not yet read by the group is in the stream, unless trimming
        # removed it: the excess is what the ledger will never see.
        added, read, length = info.get("entries-added"), mine.get("entries-read") or 0, info.get("length", 0)
        trimmed = 0 if added is None else int(added) - int(read) - int(length)
        if trimmed > self._reported_trim:
            log.error("%d events of %s were trimmed before they were read (the group had read up to %s): they "
                      "are missing from the ledger; raise events.stream_maxlen or run more shippers",
                      trimmed - self._reported_trim, self.stream, _text(mine.get("last-delivered-id", b"?")))
            self.stats.lost += trimmed - self._reported_trim
            self._reported_trim = trimmed
        at_risk = lag.at_risk(self.options.lag_warn_fraction)
        if at_risk and not self._warned_lag:
            log.warning("the ledger is %s events behind %s, whose stream_maxlen is %d: trimming will drop "
                        "events before they are shipped; run more shippers or raise events.stream_maxlen",
                        "an unknown number of" if lag.unshipped is None else lag.unshipped, self.stream,
                        self.stream_maxlen)
        self._warned_lag = at_risk
        return lag

    # -- loops -------------------------------------------------------------------------

    def drain_claims(self) -> None:
        """Ship every entry pending longer than ``claim_idle_ms``, in pages; then forget the
        consumers left with nothing pending."""
        self._claim_cursor = b"0-0"
        while True:
            entries = self.claim()
            self.ship(entries)
            if self._claim_cursor in (b"0-0", "0-0"):
                break
        self._forget_idle_consumers()

    def _forget_idle_consumers(self) -> None:
        # Each restart is a new consumer (host-pid): without this the group would list every
        # shipper that ever ran. Only consumers with nothing pending go, so no entry loses its
        # owner; a live one that is removed is recreated by its next XREADGROUP.
        consumers = cast(list[dict[str, Any]], self.client.xinfo_consumers(self.stream, self.options.group))
        for c in consumers:
            name = _text(c.get("name", b""))
            if name != self.consumer and int(c.get("pending", 0)) == 0 and \
                    int(c.get("idle", 0)) >= self.options.claim_idle_ms:
                self.client.xgroup_delconsumer(self.stream, self.options.group, name)

    def run_once(self) -> ShipStats:
        """Claim what is stale, ship everything there is now, and return (for cron and tests)."""
        self.setup()
        self.drain_claims()
        while entries := self.read(None):
            self.ship(entries)
        self.lag()
        return self.stats

    def run(self, stop: threading.Event, *, lag_every_s: float = 5.0, claim_every_s: float | None = None) -> ShipStats:
        """Ship until ``stop`` is set. A batch the database refuses is retried (it stays
        pending, unacknowledged) every ``retry_s`` until it goes in or ``stop`` is set."""
        self.setup()
        claim_every = claim_every_s if claim_every_s is not None else max(1.0, self.options.claim_idle_ms / 2000)
        next_claim = next_lag = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_claim:
                self._retrying(stop, self.drain_claims)
                next_claim = now + claim_every
            if now >= next_lag:
                self.lag()
                next_lag = now + lag_every_s
            entries = self.read(self.options.block_ms)
            if entries:
                self._retrying(stop, lambda e=entries: self.ship(e))  # type: ignore[misc]
        return self.stats

    def _retrying(self, stop: threading.Event, step: Callable[[], object]) -> None:
        while not stop.is_set():
            try:
                step()
                return
            except SQLAlchemyError as exc:
                self.stats.db_errors += 1
                log.error("the ledger database %s refused a batch (%s); nothing was acknowledged, retrying in "
                          "%.0f s", self.ledger.url, _db_why(exc), self.options.retry_s)
                stop.wait(self.options.retry_s)


def _db_why(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    lines = str(orig if orig is not None else exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

