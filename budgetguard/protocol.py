"""The Lua scripts' calling convention: one typed definition per script.

Each script in ``budgetguard/lua/`` reads its KEYS and ARGV into named locals, in the
order its header documents. Each class here builds one script's call from named fields
(:meth:`call`) and reads its reply into named fields (``parse``), so that no other module
knows a KEYS or ARGV position, and no reply list is sliced anywhere else.

A check's windows are numbered across every budget that applies (see
:class:`budgetguard.scopes.Window`); a script called with some parts only (a Redis Cluster
runs each hash slot's part on its own) answers for those windows, and the replies here
place them among all of the check's windows (zero elsewhere), so that parts' replies merge
by adding.

The classes are plain slotted dataclasses, not frozen ones: one or two are built per call
on the hot path, and a frozen dataclass takes about twice as long to build. Nothing
changes them after they are built (``dataclasses.replace`` makes a new one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DENIED",
    "LOCAL",
    "REPEAT",
    "RESERVED",
    "STALE",
    "VOIDED",
    "Log",
    "Renew",
    "Reserve",
    "Reserved",
    "ScriptCall",
    "Settle",
    "SettleReply",
    "Slice",
    "SliceReply",
    "Status",
    "StatusReply",
]


@dataclass(slots=True)
class ScriptCall:
    """One script to run: what a store sends (``EVALSHA``)."""

    script: str  # "reserve" | "settle" | "status" | "lookup" | "slice" | "renew" | "admin"
    keys: tuple[str, ...]
    args: tuple[str | int, ...]


def text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _placed(values: Sequence[Any], first: int, total: int) -> tuple[int, ...]:
    """Values of the windows ``first``.. placed among ``total`` windows."""
    out = [0] * total
    for i, value in enumerate(values):
        out[first + i] = int(value)
    return tuple(out)


def _numbers(raw: Any, first: int) -> tuple[int, ...]:
    """A script's "3,5" (1-based window numbers) as 0-based window indices of the check."""
    return tuple(first + int(w) - 1 for w in text(raw).split(",") if w)


def renumbered(notice: str, first: int) -> str:
    """A script's notice with its window number counted across the check's windows."""
    kind, _, rest = notice.partition("|")
    if kind not in ("b", "r", "t") or first == 0:
        return notice
    w, _, tail = rest.partition("|")
    return f"{kind}|{int(w) + first}" + (f"|{tail}" if tail else "")


# -- reserve.lua -----------------------------------------------------------------------

RESERVED, DENIED, REPEAT, VOIDED, STALE = 1, 0, 2, 3, 4
LOCAL = 5  # not a script's: planned again on fresh runtime state, the check was decided locally


def _stale(raw: Sequence[Any], part: int) -> tuple[tuple[int, tuple[str, ...]], ...]:
    """A stale reply's parts (numbered across the check) and their runtime state's fields."""
    out = []
    i = 1
    while i < len(raw):
        index, count = int(raw[i]), int(raw[i + 1])
        out.append((part + index - 1, tuple(text(v) for v in raw[i + 2:i + 2 + count])))
        i += 2 + count
    return tuple(out)


@dataclass(slots=True)
class Reserve:
    """reserve.lua: reserve one request's worst case on every window of the parts given, or none."""

    state_key: str
    void_key: str  # this attempt's void marker
    part_keys: tuple[str, ...]  # per part: its lease set, its runtime state, then its windows' counters
    blocked_key: str | None  # the org's open "blocked" alerts (with the org part)
    now_ms: int
    lease_deadline_ms: int
    state_ttl_ms: int
    grace_ms: int
    rid: str
    attempt: str
    probe: bool  # report the blocking windows, reserve nothing
    routed: int  # route bits of the parts an earlier call found past their thresholds
    candidates: tuple[str | int, ...]  # 3 per candidate: amount (-1: not offered), tokens, route bits
    parts: tuple[str | int, ...]  # 5 per part: prefix, windows, route bit, org (1/0), runtime version
    windows: tuple[str | int, ...]  # 6 per window: suffix, kind, cap, trigger, end ms, alert (1/0)
    first: int  # the check's index of the first window given
    total: int  # the check's number of windows

    def call(self) -> ScriptCall:
        blocked = () if self.blocked_key is None else (self.blocked_key,)
        return ScriptCall(
            "reserve", (self.state_key, self.void_key, *self.part_keys, *blocked),
            (self.now_ms, self.lease_deadline_ms, self.state_ttl_ms, self.grace_ms, self.rid, self.attempt,
             _flag(self.probe), self.routed, len(self.candidates) // 3, len(self.parts) // 5, *self.candidates,
             *self.parts, *self.windows))


@dataclass(slots=True)
class Reserved:
    """A reserve reply over the check's windows (or several parts' replies merged)."""

    code: int  # RESERVED, DENIED, REPEAT (a live reservation of the request id), VOIDED
    chosen: int = 0  # 1-based index of the candidate reserved
    blockers: tuple[int, ...] = ()  # windows that block (the chosen candidate's, or the cheapest's)
    triggered: tuple[int, ...] = ()  # windows past their routing threshold
    spent: tuple[int, ...] = ()
    reserved: tuple[int, ...] = ()
    # "b|<w>" a window's first denial, "r|<w>|<suffix>" an org block resolved, and from a
    # slice refill, "t|..." threshold and "a|..." anomaly crossings (as in settle.lua);
    # <w> counts from 1 across the check's windows.
    notices: tuple[str, ...] = ()
    state: str = ""  # REPEAT: "L|<candidate>|<amount>|<reserved at ms>|<deadline ms>[|<attempt>]"
    stale: tuple[tuple[int, tuple[str, ...]], ...] = ()  # STALE: (scope, its runtime state's fields)

    @classmethod
    def parse(cls, raw: Sequence[Any], first: int, count: int, total: int, part: int = 0) -> Reserved:
        """A reply of a call given the check's windows ``first`` .. ``first + count - 1``
        and its scopes from ``part``."""
        code = int(raw[0])
        if code == STALE:
            return cls(code, stale=_stale(raw, part))
        if code == REPEAT:
            return cls(code, state=text(raw[1]), spent=(0,) * total, reserved=(0,) * total)
        if code == VOIDED:
            return cls(code, spent=(0,) * total, reserved=(0,) * total)
        return cls(code, int(raw[1]), _numbers(raw[2], first), _numbers(raw[3], first),
                   _placed(raw[4:4 + count], first, total), _placed(raw[4 + count:4 + 2 * count], first, total),
                   tuple(renumbered(text(v), first) for v in raw[4 + 2 * count:]))

    def plus(self, other: Reserved) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Spent and reserved of two replies on disjoint windows, together."""
        return (tuple(a + b for a, b in zip(self.spent, other.spent, strict=True)),
                tuple(a + b for a, b in zip(self.reserved, other.reserved, strict=True)))


# -- settle.lua ------------------------------------------------------------------------


@dataclass(slots=True)
class Settle:
    """settle.lua: give a lease back and, for a record, charge the cost, all once per request."""

    state_key: str
    void_key: str  # the void marker of the decision's attempt
    part_keys: tuple[str, ...]  # per part: its lease set, then its windows' counters
    org_keys: tuple[str, ...]  # with the org part: history, rankings (user h/d/m, feature h), events
    now_ms: int
    state_ttl_ms: int
    grace_ms: int
    parts: tuple[str | int, ...]  # 4 per part: prefix, windows, org (1/0), its lease member
    windows: tuple[str | int, ...]  # 3 per window: suffix, end ms, charge ('-': none)
    cost: int | None  # None: a release
    settled_state: str  # "S|<candidate>|<cost or released>|<nonce>"
    thresholds: tuple[str | int, ...]  # 3 per alert threshold: window, level, nano-USD
    history_field: str  # the UTC hour "HH"
    history_ttl_ms: int
    spender: str
    feature: str
    anomaly_nano: int | None  # the anomaly threshold of this org hour
    event_head: str  # the usage event's JSON up to its outcome ('' no event)
    outcome: str
    lapsed_outcome: str
    stream_maxlen: str
    void_ttl_ms: int | None  # voids the attempt (its reserve may not have run yet)
    attempt: str
    org_ends: tuple[int, int]  # end ms of the org's day and month (its rankings' lifetimes)
    first: int = 0  # the check's index of the first window given

    def call(self) -> ScriptCall:
        return ScriptCall(
            "settle", (self.state_key, self.void_key, *self.part_keys, *self.org_keys),
            (self.now_ms, self.state_ttl_ms, self.grace_ms, "" if self.cost is None else self.cost,
             self.settled_state, self.history_field, self.history_ttl_ms, self.spender, self.feature,
             "" if self.anomaly_nano is None else self.anomaly_nano, self.event_head, self.outcome,
             self.lapsed_outcome, self.stream_maxlen, "" if self.void_ttl_ms is None else self.void_ttl_ms,
             self.attempt, *self.org_ends, len(self.parts) // 4, len(self.thresholds) // 3, *self.thresholds,
             *self.parts, *self.windows))


@dataclass(slots=True)
class SettleReply:
    """A settle reply: applied by this call, or the state an earlier settle left."""

    applied: bool
    live: bool = False  # the lease was still held (not lapsed)
    crossings: tuple[str, ...] = ()  # "t|<w>|<level>|<spent>", "a|<hour>|<spent>" (<w> across the check)
    prior: str = ""  # not applied: the request's state

    @classmethod
    def parse(cls, raw: Sequence[Any], first: int = 0) -> SettleReply:
        if int(raw[0]) == 1:
            return cls(True, int(raw[1]) == 1, tuple(renumbered(text(v), first) for v in raw[2:]))
        return cls(False, prior=text(raw[1]))

    def own(self, state: str, first: int = 0) -> SettleReply:
        """This reply, or the one the settle that wrote ``state`` got: a resend (the first
        reply was lost) finds its own state, counts as applied and reports what it crossed."""
        if self.applied or not self.prior.startswith(state + "|"):
            return self
        flag, _, rest = self.prior[len(state) + 1:].partition("|")
        return SettleReply(True, flag == "1", tuple(renumbered(c, first) for c in rest.split(";") if c))


# -- renew.lua ------------------------------------------------------------------------


@dataclass(slots=True)
class Renew:
    """renew.lua: move a live reservation's lease deadline on (an answer still in flight)."""

    state_key: str
    lease_keys: tuple[str, ...]  # the lease set of each part given
    now_ms: int
    deadline_ms: int
    state_ttl_ms: int
    members: str  # each part's lease member, ';'-joined

    def call(self) -> ScriptCall:
        return ScriptCall("renew", (self.state_key, *self.lease_keys),
                          (self.now_ms, self.deadline_ms, self.state_ttl_ms, self.members))


# -- status.lua ------------------------------------------------------------------------


@dataclass(slots=True)
class Status:
    """status.lua: read the windows of the parts given after sweeping expired leases."""

    part_keys: tuple[str, ...]  # per part: its lease set, its runtime state, its windows' counters
    now_ms: int
    parts: tuple[str | int, ...]  # 3 per part: prefix, windows, runtime version
    windows: tuple[str, ...]  # each window's key suffix
    first: int
    total: int

    def call(self) -> ScriptCall:
        return ScriptCall("status", self.part_keys, (self.now_ms, len(self.parts) // 3, *self.parts, *self.windows))


@dataclass(slots=True)
class StatusReply:
    spent: tuple[int, ...]
    reserved: tuple[int, ...]
    stale: tuple[tuple[int, tuple[str, ...]], ...] = ()  # as Reserved's

    @classmethod
    def parse(cls, raw: Sequence[Any], first: int, count: int, total: int, part: int = 0) -> StatusReply:
        if int(raw[0]) == STALE:
            return cls((0,) * total, (0,) * total, _stale(raw, part))
        return cls(_placed(raw[1:1 + count], first, total), _placed(raw[1 + count:1 + 2 * count], first, total))

    def plus(self, other: StatusReply) -> StatusReply:
        return StatusReply(tuple(a + b for a, b in zip(self.spent, other.spent, strict=True)),
                           tuple(a + b for a, b in zip(self.reserved, other.reserved, strict=True)),
                           self.stale + other.stale)


# -- lookup.lua ------------------------------------------------------------------------


@dataclass(slots=True)
class Log:
    """lookup.lua's "log": append finished event JSON lines to the usage stream."""

    stream_key: str
    stream_maxlen: str
    lines: tuple[str, ...]

    def call(self) -> ScriptCall:
        return ScriptCall("lookup", (self.stream_key,), ("log", self.stream_maxlen, *self.lines))


# -- slice.lua -------------------------------------------------------------------------


@dataclass(slots=True)
class Slice:
    """slice.lua: renew one process's slice of the org's windows and hand in its spend."""

    state_key: str
    org_keys: tuple[str, ...]  # leases, day, month, history, rankings (u h/d/m, f h), events, blocked
    now_ms: int
    grace_ms: int
    state_ttl_ms: int
    org_prefix: str
    org_suffixes: str
    release: str  # slices to give back, joined by ','
    slice_id: str
    deadline_ms: int
    want: int
    need: int
    ends: str  # "end_d,end_m"
    caps: str  # "cap_d,cap_m" (-1: none)
    thresholds: str
    history_field: str
    history_ttl_ms: int
    anomaly_nano: int | None
    stream_maxlen: str
    items: tuple[str | int, ...]  # 4 per request: cost, spender, feature, event JSON

    def call(self) -> ScriptCall:
        return ScriptCall(
            "slice", (self.state_key, *self.org_keys),
            (self.now_ms, self.grace_ms, self.state_ttl_ms, self.org_prefix, self.org_suffixes, self.release,
             self.slice_id, self.deadline_ms, self.want, self.need, self.ends, self.caps, self.thresholds,
             self.history_field, self.history_ttl_ms, "" if self.anomaly_nano is None else self.anomaly_nano,
             self.stream_maxlen, *self.items))


@dataclass(slots=True)
class SliceReply:
    granted: int
    given_back: int
    spent: tuple[int, int]  # org day, month
    reserved: tuple[int, int]
    crossings: tuple[str, ...]

    @classmethod
    def parse(cls, raw: Sequence[Any]) -> SliceReply:
        granted, given_back, spent_d, spent_m, reserved_d, reserved_m = (int(v) for v in raw[:6])
        return cls(granted, given_back, (spent_d, spent_m), (reserved_d, reserved_m),
                   tuple(text(v) for v in raw[6:]))
