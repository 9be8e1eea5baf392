"""The Redis key space: every key budgetguard reads or writes is named here.

Layout (``bg`` is ``key_prefix``; ``<w>`` a window's stamp, see :mod:`budgetguard.windows`)::

    bg:{u:<user>}:h:202611231400   a user's hourly counters   hash {s: spent, r: reserved, b/a:*: alert markers}
    bg:{u:<user>}:d:20261123       daily counters             (likewise)
    bg:{u:<user>}:m:202611         monthly counters
    bg:{u:<user>}:leases           live reservations          zset "rid|amount|<w>..." scored by deadline ms
    bg:{u:<user>}:rq:<rid>         request state              "L|..." reserved, "S|..." settled, "C|..." given back
    bg:{u:<user>}:rv:<attempt>     a voided check attempt     (see settle.lua)
    bg:{org}:d:<day>, bg:{org}:m:<month>, bg:{org}:leases, bg:{org}:rq:<rid>, bg:{org}:rv:<attempt>
    bg:{org}:blocked               the org's open "blocked" alerts
    bg:{org}:hist:<UTC day>        the org's spend by UTC hour (anomalies, forecasts)
    bg:{org}:top:u:h:<UTC hour>, bg:{org}:top:u:<w>, bg:{org}:top:f:h:<UTC hour>   spend rankings
    bg:{org}:events                the usage stream
    bg:{b:<budget>:<value>}:...    a budget's counters per value (``per:``), like a user's
    bg:{b:<budget>}:...            a budget with one shared set of counters

Beside the hour, day and month a budget value may have ``w:<ISO week>``, ``t`` (a balance
that never resets), ``q:<UTC minute>`` and ``k:<UTC minute>`` (requests and tokens per
minute) and ``c`` (calls in flight): each a hash of the same fields.

The braces are Redis Cluster hash tags: a user's keys share one slot, the org's another,
each budget value's its own. Ids and values are data, not key syntax: those outside a safe
alphabet are hashed into the tag.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime

__all__ = ["KeySpace", "scope_tag", "user_tag"]

_SAFE_ID = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def scope_tag(kind: str, value: str) -> str:
    """A hash tag ``{<kind>:<value>}``. Values outside a safe alphabet are hashed, so any string is data."""
    if _SAFE_ID.fullmatch(value):
        return "{" + kind + ":" + value + "}"
    # '#' is outside the safe alphabet, so a hashed value can never equal a plain one.
    return "{" + kind + ":#" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:40] + "}"


def user_tag(user_id: str) -> str:
    """The user's hash tag."""
    return scope_tag("u", user_id)


class KeySpace:
    """The key names under one ``key_prefix``. A *prefix* is a hash slot's: the user's or the org's."""

    def __init__(self, key_prefix: str) -> None:
        self.key_prefix = key_prefix
        self.org = f"{key_prefix}:{{org}}:"

    def user(self, user_id: str) -> str:
        return f"{self.key_prefix}:{user_tag(user_id)}:"

    def budget(self, budget: str, value: str | None) -> str:
        """The prefix of a budget value's keys (``value`` None: the budget's shared counters)."""
        if value is None:
            return f"{self.key_prefix}:{{b:{budget}}}:"
        return f"{self.key_prefix}:{scope_tag('b:' + budget, value)}:"

    @staticmethod
    def request(prefix: str, rid: str) -> str:
        return prefix + "rq:" + rid

    @staticmethod
    def void(prefix: str, attempt: str) -> str:
        return prefix + "rv:" + attempt

    @staticmethod
    def leases(prefix: str) -> str:
        return prefix + "leases"

    def org_window(self, stamp: str) -> str:
        return self.org + stamp

    @property
    def blocked(self) -> str:
        return self.org + "blocked"

    @property
    def events(self) -> str:
        return self.org + "events"

    def history(self, utc: datetime) -> str:
        """The org's spend by UTC hour, for the UTC day of ``utc``."""
        return f"{self.org}hist:{utc:%Y%m%d}"

    def top_users_hour(self, utc_hour: str) -> str:
        return f"{self.org}top:u:h:{utc_hour}"

    def top_users(self, stamp: str) -> str:
        """Spend by user in an org window (``d:...`` or ``m:...``)."""
        return f"{self.org}top:u:{stamp}"

    def top_features_hour(self, utc_hour: str) -> str:
        return f"{self.org}top:f:h:{utc_hour}"

    def rankings(self, utc: datetime, day: str, month: str) -> tuple[str, ...]:
        """The settle and slice scripts' history and ranking keys, then the usage stream."""
        hour = f"{utc:%Y%m%d%H}"
        return (self.history(utc), self.top_users_hour(hour), self.top_users(day), self.top_users(month),
                self.top_features_hour(hour), self.events)
