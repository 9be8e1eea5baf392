"""Org budget slices: the org's part of checks served from memory (opt-in, ``org.slice_usd``).

Every check and record otherwise runs a script on the org's keys, which share one hash
slot: on a cluster, one node sees every request of the org. With slices, a process
reserves a slice of the org's windows in one call (``slice.lua``), admits the org's part
of each check against it in memory, and hands the settled spend and usage events back in
batches, renewing the slice in the same call.

What it costs in precision, both bounded by the slice size:

* The org's counters never count more than its caps allow (a slice is an ordinary
  reservation), but a process can be denied while others hold unused slices: up to
  ``(processes - 1) * slice_usd`` of the cap can sit idle in other processes.
* A process that dies loses the spend it had not handed in yet (at most ``slice_usd``,
  or ``slice_flush_s`` of its spend): the org's counters and usage stream miss it, the
  user's counters do not. Its slice lapses after ``reservation_ttl_s``.

This module only keeps the state; the engine builds the script calls.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from dataclasses import dataclass, field

__all__ = ["Item", "OrgSlices", "Refill"]

# Renew a slice while this much of its lease is left, so that it never lapses in Redis
# while the process still admits calls against it.
_RENEW_MARGIN = 0.5


@dataclass(frozen=True, slots=True)
class Item:
    """One settled request's spend, waiting to be handed in."""

    cost: int
    spender: str
    feature: str
    event: str  # the finished usage event JSON ('' when the stream is off)


@dataclass(slots=True)
class Refill:
    """One slice call: give back ``release``, hand in ``batch``, take a slice of ``want``."""

    id: str
    stamps: tuple[str, str]  # the org day and month the new slice is taken on
    release: tuple[str, ...]
    batch: list[Item]
    need: int  # held by calls in flight: the new slice covers at least this
    want: int
    batch_total: int = field(default=0)


def _reset_in_child(ref: weakref.ref[OrgSlices]) -> None:
    slices = ref()
    if slices is not None:
        slices._reset()


class OrgSlices:
    """This process's slices of the org's budget, shared by its threads and event loops."""

    def __init__(self, size_nano: int, flush_ms: int, lease_ms: int) -> None:
        self.size = size_nano
        self.flush_ms = flush_ms
        self.lease_ms = lease_ms
        self._lock = threading.Lock()
        self._reset()
        # A forked child must not spend its parent's slices: it starts with none.
        os.register_at_fork(after_in_child=functools.partial(_reset_in_child, weakref.ref(self)))

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self.members: dict[str, int] = {}  # slice member -> amount
        self.granted = 0
        self.stamps: tuple[str, str] | None = None
        self.deadline_ms = 0
        self.held: dict[str, tuple[int, int, int]] = {}  # reservation id -> (amount, deadline ms, candidate)
        self.held_total = 0
        self.pending: list[Item] = []
        self.pending_total = 0
        self.unsent_total = 0  # spend of a refill in flight or in doubt, not yet handed in
        self.in_flight: Refill | None = None
        self.in_doubt: Refill | None = None
        self.figures: tuple[int, int, int, int] = (0, 0, 0, 0)  # org spent d, m, reserved d, m
        self.flushed_ms = 0

    # -- admitting ---------------------------------------------------------------------

    def _sweep(self, now_ms: int) -> None:
        lapsed = [rid for rid, (_, deadline, _) in self.held.items() if deadline <= now_ms]
        for rid in lapsed:
            self.held_total -= self.held.pop(rid)[0]

    def usable(self, stamps: tuple[str, str], now_ms: int) -> bool:
        return self.stamps == stamps and now_ms < self.deadline_ms - self.lease_ms * _RENEW_MARGIN

    def take(self, rid: str, stamps: tuple[str, str], first: tuple[int, int], now_ms: int,
             deadline_ms: int) -> bool:
        """Hold ``first`` (candidate index, amount) if it fits the slice; False: refill or ask Redis.

        Only the candidate one script would try first: whether a later one should be chosen
        depends on the org's caps, which the slice does not show.
        """
        with self._lock:
            self._sweep(now_ms)
            # While a refill is out (or its outcome unknown) the slice Redis counts is about
            # to change: calls then take the org's part from Redis, per request.
            if self.in_flight is not None or self.in_doubt is not None or not self.usable(stamps, now_ms):
                return False
            index, amount = first
            if amount > self.granted - self.held_total - self.pending_total - self.unsent_total:
                return False
            self.held[rid] = (amount, deadline_ms, index)
            self.held_total += amount
            return True

    def renew(self, rid: str, deadline_ms: int) -> bool:
        """Move a live hold's deadline on (its call is still answering); False when there is none."""
        with self._lock:
            held = self.held.get(rid)
            if held is None:
                return False
            self.held[rid] = (held[0], max(held[1], deadline_ms), held[2])
            return True

    def held_for(self, rid: str) -> tuple[int, int] | None:
        """The (candidate, amount) a live hold of ``rid`` took, if any (a repeated request id)."""
        with self._lock:
            held = self.held.get(rid)
            return None if held is None else (held[2], held[0])

    def settle(self, rid: str, item: Item) -> None:
        """Let go of ``rid``'s hold and queue its spend and event, in one step (no room in between)."""
        with self._lock:
            held = self.held.pop(rid, None)
            if held is not None:
                self.held_total -= held[0]
            self.pending.append(item)
            self.pending_total += item.cost

    # -- refilling ---------------------------------------------------------------------

    def due(self, stamps: tuple[str, str], now_ms: int) -> bool:
        """Whether spend waits too long or too much, or the slice needs renewing."""
        with self._lock:
            if self.in_flight is not None:
                return False
            if self.in_doubt is not None or self.pending_total * 2 >= self.size:
                return True
            if self.pending and now_ms - self.flushed_ms >= self.flush_ms:
                return True
            return bool(self.members) and not self.usable(stamps, now_ms)

    def begin(self, stamps: tuple[str, str], now_ms: int, *, extra: int = 0, final: bool = False) -> Refill | None:
        """The next refill, or None while one is in flight. ``final`` gives everything back."""
        with self._lock:
            if self.in_flight is not None:
                return None
            if final and not (self.members or self.pending or self.in_doubt):
                return None  # nothing held, nothing to hand in
            self._sweep(now_ms)
            refill = self.in_doubt
            if refill is None:
                idle = not self.held and not self.pending and extra == 0
                want = 0 if final or idle else self.held_total + extra + self.size
                refill = Refill(os.urandom(12).hex(), stamps, tuple(self.members), self.pending,
                                need=0 if final else self.held_total, want=want)
                refill.batch_total = self.pending_total
                self.unsent_total += self.pending_total
                self.pending, self.pending_total = [], 0
            self.in_flight = refill
            return refill

    def done(self, refill: Refill, granted: int, spent: tuple[int, int], reserved: tuple[int, int],
             deadline_ms: int) -> None:
        """The refill ran: ``granted`` is the new slice, ``spent`` and ``reserved`` the org's
        day and month after it."""
        (spent_d, spent_m), (reserved_d, reserved_m) = spent, reserved
        with self._lock:
            self.in_flight = self.in_doubt = None
            self.unsent_total -= refill.batch_total
            # What Redis gave back may be less (a slice whose lease lapsed was swept there):
            # either way none of it is held any more.
            for member in refill.release:
                self.granted -= self.members.pop(member, 0)
            if granted > 0:
                self.members[f"{refill.id}|{granted}|{refill.stamps[0]}|{refill.stamps[1]}"] = granted
                self.granted += granted
            self.granted = max(self.granted, 0)
            self.stamps = refill.stamps
            self.deadline_ms = deadline_ms
            self.figures = (spent_d, spent_m, reserved_d, reserved_m)
            self.flushed_ms = deadline_ms - self.lease_ms

    def failed(self, refill: Refill) -> None:
        """The call may or may not have run: resend the same one next time."""
        with self._lock:
            self.in_flight = None
            self.in_doubt = refill

    @property
    def unreturned(self) -> bool:
        """Slices still reserved in Redis, or a refill whose outcome is unknown."""
        with self._lock:
            return bool(self.members or self.in_doubt)

    @property
    def holding(self) -> bool:
        with self._lock:
            return bool(self.members or self.held or self.pending or self.in_doubt)
