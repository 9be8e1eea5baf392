"""Per-user and per-tenant spikes: one alert when a user or a tenant spends more than a share
of the org's daily budget within one UTC hour ("more than 1% of the daily budget in one hour").

Detection runs in the shipper, on the ledger, after each committed batch: for every UTC
hour the batch touches, the hour's spend of each user and tenant the batch names is
summed in SQL (indexed by time, user and tenant), so it sees the whole hour whichever
shipper shipped which part. A crossing is claimed once per (user or tenant, hour) with
``SET NX`` on a Redis key beside the org's (``<prefix>:{org}:spike:...``, kept 3 days),
so several shippers alert once. The alert is an org-scope ``anomaly`` (the org's budget
is what is being eaten), its ``detail`` naming the user or tenant and its top features
and models in that hour; it is delivered to the configured sinks like other alerts
(:func:`budgetguard.alerts.messages.deliveries`), once, with a timeout, and a failed
delivery is logged, never retried and never blocks shipping.

The threshold arithmetic is exact: ``threshold_nano = ceil(share * daily_usd * 1e9)``
and a spike is spend strictly above it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import redis
import sqlalchemy as sa

from ..alerts.model import Alert
from ..pricing import nano_to_usd
from ..redact import printable
from .store import Ledger

__all__ = ["Spike", "SpikeWatch", "threshold_nano"]

log = logging.getLogger("budgetguard.ledger")

MARK_TTL_S = 3 * 86_400
_CHUNK = 500  # ids per IN (...) list
_TOP = 3


def threshold_nano(share: Decimal, daily_usd: Decimal) -> int:
    if not 0 < share <= 1:
        raise ValueError("the spike share must be above 0 and at most 1")
    return math.ceil(share * daily_usd * 10**9)


class Spike:
    """One user's or tenant's hour above the threshold."""

    def __init__(self, dimension: str, value: str, hour: datetime, spent_nano: int) -> None:
        self.dimension, self.value, self.hour, self.spent_nano = dimension, value, hour, spent_nano

    def __repr__(self) -> str:
        return f"Spike({self.dimension}={self.value!r}, {self.hour:%Y-%m-%dT%H}, {self.spent_nano})"


class SpikeWatch:
    """Checks the hours a shipped batch touched; ``send`` delivers each new spike's alert."""

    def __init__(self, ledger: Ledger, client: redis.Redis, *, key_prefix: str, share: Decimal,
                 daily_usd: Decimal, send: Callable[[Alert], object],
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.ledger = ledger
        self.client = client
        self.key_prefix = key_prefix
        self.share = share
        self.daily_usd = daily_usd
        self.threshold = threshold_nano(share, daily_usd)
        self.send = send
        self.clock = clock
        self.sent = 0

    def _expr(self, dimension: str) -> Any:
        table = self.ledger.table
        if dimension == "user":
            return table.c.user_id
        if self.ledger.engine.dialect.name == "postgresql":
            return sa.literal_column("tags->>'tenant'")  # the indexed expression
        return sa.func.json_extract(table.c.tags, "$.tenant")

    def find(self, rows: Sequence[dict[str, Any]]) -> list[Spike]:
        """Users and tenants of ``rows`` whose spend in an hour of ``rows`` exceeds the threshold."""
        touched: dict[datetime, dict[str, set[str]]] = {}
        for row in rows:
            if row["cost_nano"] <= 0:
                continue
            hour = row["ts"].astimezone(UTC).replace(minute=0, second=0, microsecond=0)
            names = touched.setdefault(hour, {"user": set(), "tenant": set()})
            if row["user_id"] is not None:
                names["user"].add(row["user_id"])
            tenant = (row["tags"] or {}).get("tenant")
            if tenant is not None:
                names["tenant"].add(tenant)
        spikes = []
        table = self.ledger.table
        with self.ledger.engine.connect() as conn:
            for hour, names in sorted(touched.items()):
                for dimension, values in names.items():
                    expr = self._expr(dimension)
                    ordered = sorted(values)
                    for i in range(0, len(ordered), _CHUNK):
                        query = (sa.select(expr, sa.func.sum(table.c.cost_nano))
                                 .where(table.c.ts >= hour, table.c.ts < hour + timedelta(hours=1),
                                        expr.in_(ordered[i:i + _CHUNK]))
                                 .group_by(expr)
                                 .having(sa.func.sum(table.c.cost_nano) > self.threshold))
                        spikes += [Spike(dimension, value, hour, int(total))
                                   for value, total in conn.execute(query).all()]
        return spikes

    def _claim(self, spike: Spike) -> bool:
        digest = hashlib.sha256(spike.value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        key = f"{self.key_prefix}:{{org}}:spike:{spike.dimension}:{digest}:{spike.hour:%Y%m%d%H}"
        return bool(self.client.set(key, b"1", nx=True, ex=MARK_TTL_S))

    def _top(self, spike: Spike, column: Any) -> list[tuple[str, Decimal]]:
        table = self.ledger.table
        expr = self._expr(spike.dimension)
        query = (sa.select(column, sa.func.sum(table.c.cost_nano).label("spent"))
                 .where(table.c.ts >= spike.hour, table.c.ts < spike.hour + timedelta(hours=1), expr == spike.value)
                 .group_by(column).order_by(sa.desc("spent")).limit(_TOP))
        with self.ledger.engine.connect() as conn:
            return [(str(name) if name is not None else "(none)", nano_to_usd(int(total)))
                    for name, total in conn.execute(query).all()]

    def alert(self, spike: Spike) -> Alert:
        features = self._top(spike, self._feature())
        models = self._top(spike, self.ledger.table.c.model)
        spent = nano_to_usd(spike.spent_nano)
        share = (spent / self.daily_usd * 100).quantize(Decimal("0.01"))

        def listed(pairs: Iterable[tuple[str, Decimal]]) -> str:
            return ", ".join(f"{printable(name, 64)} ${amount.normalize():f}" for name, amount in pairs) or "-"

        digest = hashlib.sha256(spike.value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        return Alert(
            kind="anomaly", scope="org", window="org.hour",
            window_key=f"h:{spike.hour:%Y%m%d%H}:{spike.dimension}:{digest}",
            window_start=spike.hour, window_end=spike.hour + timedelta(hours=1), level=Decimal(1),
            spent_usd=spent, limit_usd=self.daily_usd, at=self.clock(), key_prefix=self.key_prefix,
            detail=(f"{spike.dimension} {printable(spike.value, 64)} spent ${spent.normalize():f} in the hour from "
                    f"{spike.hour:%H:00} UTC, {share}% of the org's daily budget (alert above "
                    f"{(self.share * 100).normalize():f}%); top features: {listed(features)}; "
                    f"top models: {listed(models)}"),
            top_users=((spike.value, spent),) if spike.dimension == "user" else (),
            top_features=tuple(features),
        )

    def _feature(self) -> Any:
        if self.ledger.engine.dialect.name == "postgresql":
            return sa.literal_column("tags->>'feature'")
        return sa.func.json_extract(self.ledger.table.c.tags, "$.feature")

    def after_batch(self, rows: Sequence[dict[str, Any]]) -> int:
        """Alert on the new spikes of a committed batch; how many alerts were sent. Never raises:
        the ledger is the product, the alert a bonus."""
        sent = 0
        try:
            for spike in self.find(rows):
                if self._claim(spike):
                    self.send(self.alert(spike))
                    sent += 1
        except Exception:
            log.exception("checking the shipped batch for per-user and per-tenant spikes failed")
        self.sent += sent
        return sent
