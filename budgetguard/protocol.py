"""The Lua scripts' calling convention: one typed definition per script.

Each script in ``budgetguard/lua/`` reads its KEYS and ARGV into named locals, in the
order its header documents. Each class here builds one script's call from named fields
(:meth:`call`) and reads its reply into named fields (``parse``), so that no other module
knows a KEYS or ARGV position, and no reply list is sliced anywhere else.

Windows are numbered as in :data:`budgetguard.windows.WINDOWS`: user hour, day, month (0-2),
org day, month (3-4). A script called with some parts only (``"u"``, ``"o"``; a Redis
Cluster runs each hash slot's part on its own) answers for those windows; the replies here
always carry all five, zero where a part was not called, so that two parts' replies merge
by window.

The classes are plain slotted dataclasses, not frozen ones: one or two are built per call
on the hot path, and a frozen dataclass takes about twice as long to build. Nothing
changes them after they are built (``dataclasses.replace`` makes a new one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BOTH",
    "DENIED",
    "ORG",
    "REPEAT",
    "RESERVED",
    "USER",
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

# The parts a script may be called with: a hash slot's worth of windows.
BOTH, USER, ORG = "uo", "u", "o"
_WINDOWS_OF = {BOTH: (0, 1, 2, 3, 4), USER: (0, 1, 2), ORG: (3, 4)}
_NONE = (0, 0, 0, 0, 0)


@dataclass(slots=True)
class ScriptCall:
    """One script to run: what a store sends (``EVALSHA``)."""

    script: str  # "reserve" | "settle" | "status" | "lookup" | "slice"
    keys: tuple[str, ...]
    args: tuple[str | int, ...]


def text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _by_window(parts: str, values: Sequence[Any]) -> tuple[int, ...]:
    """Values for the windows of ``parts``, placed among all five."""
    out = list(_NONE)
    for w, value in zip(_WINDOWS_OF[parts], values, strict=True):
        out[w] = int(value)
    return tuple(out)


# -- reserve.lua -----------------------------------------------------------------------

RESERVED, DENIED, REPEAT, VOIDED = 1, 0, 2, 3


@dataclass(slots=True)
class Reserve:
    """reserve.lua: reserve one request's worst case on every window of ``parts``, or none."""

    state_key: str
    void_key: str  # this attempt's void marker
    part_keys: tuple[str, ...]  # the lease set of each part, then its window counters
    blocked_key: str | None  # the org's open "blocked" alerts (with the org part)
    now_ms: int
    lease_deadline_ms: int
    state_ttl_ms: int
    grace_ms: int
    user_prefix: str
    org_prefix: str
    user_suffixes: str  # "|h:..|d:..|m:.."
    org_suffixes: str  # "|d:..|m:.."
    rid: str
    windows: str  # per window "cap,threshold,end_ms" x5 (-1: none)
    candidates: str  # "amount,route" per candidate (amount -1: not offered to this part)
    alert_mask: int  # windows whose first denial is an alert
    parts: str
    user_triggered: bool  # an earlier part (the user's) reached its routing threshold
    probe: bool  # report the blocking windows, reserve nothing
    attempt: str

    def call(self) -> ScriptCall:
        blocked = () if self.blocked_key is None else (self.blocked_key,)
        return ScriptCall(
            "reserve", (self.state_key, self.void_key, *self.part_keys, *blocked),
            (self.now_ms, self.lease_deadline_ms, self.state_ttl_ms, self.grace_ms, self.user_prefix,
             self.org_prefix, self.user_suffixes, self.org_suffixes, self.rid, self.windows, self.candidates,
             self.alert_mask, self.parts, _flag(self.user_triggered), _flag(self.probe), self.attempt))


@dataclass(slots=True)
class Reserved:
    """A reserve reply over the five windows (or two parts' replies merged)."""

    code: int  # RESERVED, DENIED, REPEAT (a live reservation of the request id), VOIDED
    chosen: int = 0  # 1-based index of the candidate reserved
    blockers: int = 0  # bit w: window w blocks (the chosen candidate's, or the cheapest's)
    triggered: int = 0  # bit w: window w reached its routing threshold
    spent: tuple[int, ...] = _NONE
    reserved: tuple[int, ...] = _NONE
    # "b|<w>" a window's first denial, "r|<w>|<suffix>" an org block resolved, and from a
    # slice refill, "t|..." threshold and "a|..." anomaly crossings (as in settle.lua).
    notices: tuple[str, ...] = ()
    state: str = ""  # REPEAT: "L|<candidate>|<amount>|<reserved at ms>|<deadline ms>[|<attempt>]"

    @classmethod
    def parse(cls, raw: Sequence[Any], parts: str) -> Reserved:
        code = int(raw[0])
        if code == REPEAT:
            return cls(code, state=text(raw[1]))
        if code == VOIDED:
            return cls(code)
        n = len(_WINDOWS_OF[parts])
        return cls(code, int(raw[1]), int(raw[2]), int(raw[3]), _by_window(parts, raw[4:4 + n]),
                   _by_window(parts, raw[4 + n:4 + 2 * n]), tuple(text(v) for v in raw[4 + 2 * n:]))

    def merged(self, org: Reserved, **changes: Any) -> Reserved:
        """The user part's windows (this reply's) with the org part's (``org``'s)."""
        return dataclasses.replace(
            org, spent=(*self.spent[:3], *org.spent[3:]), reserved=(*self.reserved[:3], *org.reserved[3:]),
            **changes)


# -- settle.lua ------------------------------------------------------------------------


@dataclass(slots=True)
class Settle:
    """settle.lua: give a lease back and, for a record, charge the cost, all once per request."""

    state_key: str
    void_key: str  # the void marker of the decision's attempt
    part_keys: tuple[str, ...]  # the lease set of each part, then the window counters to charge
    org_keys: tuple[str, ...]  # with the org part: history, rankings (user h/d/m, feature h), events
    now_ms: int
    state_ttl_ms: int
    grace_ms: int
    user_prefix: str
    org_prefix: str
    user_member: str
    org_member: str
    cost: int | None  # None: a release
    ends: str  # end ms of the five windows charged, joined by ','
    settled_state: str  # "S|<candidate>|<cost or released>|<nonce>"
    thresholds: str  # alert thresholds "window,level,nano" joined by ','
    history_field: str  # the UTC hour "HH"
    history_ttl_ms: int
    spender: str
    feature: str
    anomaly_nano: int | None  # the anomaly threshold of this org hour
    event_head: str  # the usage event's JSON up to its outcome ('' no event)
    outcome: str
    lapsed_outcome: str
    stream_maxlen: str
    parts: str
    void_ttl_ms: int | None  # voids the attempt (its reserve may not have run yet)
    attempt: str

    def call(self) -> ScriptCall:
        return ScriptCall(
            "settle", (self.state_key, self.void_key, *self.part_keys, *self.org_keys),
            (self.now_ms, self.state_ttl_ms, self.grace_ms, self.user_prefix, self.org_prefix, self.user_member,
             self.org_member, "" if self.cost is None else self.cost, self.ends, self.settled_state,
             self.thresholds, self.history_field, self.history_ttl_ms, self.spender, self.feature,
             "" if self.anomaly_nano is None else self.anomaly_nano, self.event_head, self.outcome,
             self.lapsed_outcome, self.stream_maxlen, self.parts,
             "" if self.void_ttl_ms is None else self.void_ttl_ms, self.attempt))


@dataclass(slots=True)
class SettleReply:
    """A settle reply: applied by this call, or the state an earlier settle left."""

    applied: bool
    live: bool = False  # the lease was still held (not lapsed)
    crossings: tuple[str, ...] = ()  # "t|<w>|<level>|<spent>", "a|<hour>|<spent>"
    prior: str = ""  # not applied: the request's state

    @classmethod
    def parse(cls, raw: Sequence[Any]) -> SettleReply:
        if int(raw[0]) == 1:
            return cls(True, int(raw[1]) == 1, tuple(text(v) for v in raw[2:]))
        return cls(False, prior=text(raw[1]))

    def own(self, state: str) -> SettleReply:
        """This reply, or the one the settle that wrote ``state`` got: a resend (the first
        reply was lost) finds its own state, counts as applied and reports what it crossed."""
        if self.applied or not self.prior.startswith(state + "|"):
            return self
        flag, _, rest = self.prior[len(state) + 1:].partition("|")
        return SettleReply(True, flag == "1", tuple(c for c in rest.split(";") if c))


# -- renew.lua ------------------------------------------------------------------------


@dataclass(slots=True)
class Renew:
    """renew.lua: move a live reservation's lease deadline on (an answer still in flight)."""

    state_key: str
    lease_keys: tuple[str, ...]  # the lease set of each part given
    now_ms: int
    deadline_ms: int
    state_ttl_ms: int
    user_member: str
    org_member: str
    parts: str

    def call(self) -> ScriptCall:
        return ScriptCall("renew", (self.state_key, *self.lease_keys),
                          (self.now_ms, self.deadline_ms, self.state_ttl_ms, self.user_member, self.org_member,
                           self.parts))


# -- status.lua ------------------------------------------------------------------------


@dataclass(slots=True)
class Status:
    """status.lua: read the windows of ``parts`` after sweeping expired leases."""

    part_keys: tuple[str, ...]
    now_ms: int
    user_prefix: str
    org_prefix: str
    parts: str

    def call(self) -> ScriptCall:
        return ScriptCall("status", self.part_keys, (self.now_ms, self.user_prefix, self.org_prefix, self.parts))


@dataclass(slots=True)
class StatusReply:
    spent: tuple[int, ...]
    reserved: tuple[int, ...]

    @classmethod
    def parse(cls, raw: Sequence[Any], parts: str) -> StatusReply:
        n = len(_WINDOWS_OF[parts])
        return cls(_by_window(parts, raw[:n]), _by_window(parts, raw[n:2 * n]))

    def merged(self, org: StatusReply) -> StatusReply:
        return StatusReply((*self.spent[:3], *org.spent[3:]), (*self.reserved[:3], *org.reserved[3:]))


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
