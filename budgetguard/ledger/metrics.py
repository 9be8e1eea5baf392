"""Prometheus metrics of a shipper, in a registry of their own (served by ``ship --metrics-port``).

| metric | type |
|---|---|
| ``budgetguard_ledger_events_total{result}`` | counter: ``inserted``, ``duplicate``, ``malformed``, ``lost`` |
| ``budgetguard_ledger_batches_total`` | counter |
| ``budgetguard_ledger_db_errors_total`` | counter: batches the database refused (retried) |
| ``budgetguard_ledger_lag_events`` | gauge: entries the group has not read (-1: unknown) |
| ``budgetguard_ledger_pending_events`` | gauge: read, not yet acknowledged |
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from .shipper import ShipStats

__all__ = ["ShipMetrics"]


class ShipMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.events = Counter("budgetguard_ledger_events", "Stream entries handled by the shipper, by result",
                              ["result"], registry=self.registry)
        self.batches = Counter("budgetguard_ledger_batches", "Batches committed and acknowledged",
                               registry=self.registry)
        self.db_errors = Counter("budgetguard_ledger_db_errors", "Batches the database refused",
                                 registry=self.registry)
        self.lag = Gauge("budgetguard_ledger_lag_events", "Stream entries the group has not read (-1: unknown)",
                         registry=self.registry)
        self.pending = Gauge("budgetguard_ledger_pending_events", "Entries read and not yet acknowledged",
                             registry=self.registry)
        self._seen = ShipStats()

    def observe(self, stats: ShipStats) -> None:
        """Bring the counters up to ``stats`` (cumulative counts; only the increase is added)."""
        for result, now, before in (("inserted", stats.inserted, self._seen.inserted),
                                    ("duplicate", stats.duplicates, self._seen.duplicates),
                                    ("malformed", stats.malformed, self._seen.malformed),
                                    ("lost", stats.lost, self._seen.lost)):
            if now > before:
                self.events.labels(result).inc(now - before)
        if stats.batches > self._seen.batches:
            self.batches.inc(stats.batches - self._seen.batches)
        if stats.db_errors > self._seen.db_errors:
            self.db_errors.inc(stats.db_errors - self._seen.db_errors)
        if stats.lag is not None:
            self.lag.set(-1 if stats.lag.behind is None else stats.lag.behind)
            self.pending.set(stats.lag.pending)
        self._seen = ShipStats(inserted=stats.inserted, duplicates=stats.duplicates, malformed=stats.malformed,
                               lost=stats.lost, batches=stats.batches, db_errors=stats.db_errors)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
