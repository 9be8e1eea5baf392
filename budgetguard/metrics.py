"""Prometheus metrics for a guard, and ASGI apps serving them and a JSON stats view.

Each :class:`Metrics` owns its registry, so several guards in one process (or one test
run) never collide. The guard calls the ``observe_*`` hooks; a failing hook is its
caller's to contain, so they only do arithmetic and never touch I/O.

Every label takes its values from a bounded set, since each distinct value is a series
kept in memory and on every scrape for the life of the process. Model names come from
callers, so a model has a label value of its own only when it is known: named in the
configuration (see :meth:`Metrics.know_models` and :func:`config_models`) or listed by
name in the pricing library. Every other name is counted under ``model="other"``. The
other labels (outcome, limit, script, sink, endpoint, error code, tier, provider) come
from budgetguard itself, the configuration or the price book; an HTTP status outside
100-599 is counted as ``status="other"``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from .decision import Decision
from .pricing import library_model_names
from .stats import ASGIApp, GetApp, stats_app

if TYPE_CHECKING:
    from .config import Config

__all__ = ["OTHER", "Metrics", "config_models", "metrics_app", "stats_app"]

_TOKEN_KINDS = (("input_tokens", "input"), ("cached_input_tokens", "cached_input"),
                ("cache_write_tokens", "cache_write"), ("output_tokens", "output"),
                ("reasoning_tokens", "reasoning"))
_NONE = "none"
#: The label value of every model name that is neither configured nor in the library.
OTHER = "other"


def _label(value: Any) -> str:
    return value if isinstance(value, str) and value else _NONE


def config_models(config: Config) -> frozenset[str]:
    """Every model name a configuration mentions (:meth:`Config.named_models`)."""
    return config.named_models()


class _SpendCollector(Collector):
    """Spend kept as exact Decimal sums and turned into floats only when scraped,
    so millions of small costs do not accumulate float rounding error."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sums: dict[tuple[str, str, str], Decimal] = {}

    def add(self, labels: tuple[str, str, str], amount: Decimal) -> None:
        with self._lock:
            self._sums[labels] = self._sums.get(labels, Decimal(0)) + amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("budgetguard_spend_usd", "Settled spend in USD.",
                                     labels=("tier", "provider", "model"))
        with self._lock:
            items = sorted(self._sums.items())
        for labels, amount in items:
            family.add_metric(labels, float(amount))
        yield family


class Metrics:
    """The guard's metrics. Pass one to the guard; mount :func:`metrics_app` to expose it."""

    def __init__(self, registry: CollectorRegistry | None = None, *, models: Iterable[str] = ()) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        # Configured model names: labelled as they are. Replaced whole (never mutated) so
        # that observers read it without a lock.
        self._models: frozenset[str] = frozenset(models)
        self.decisions = Counter("budgetguard_decisions", "Budget decisions by outcome and the limit involved.",
                                 ("outcome", "limit"), registry=self.registry)
        self.events = Counter("budgetguard_events", "Usage events by outcome.", ("outcome",),
                              registry=self.registry)
        self.tokens = Counter("budgetguard_tokens", "Tokens of settled calls by model and kind.",
                              ("model", "kind"), registry=self.registry)
        self.redis_seconds = Histogram("budgetguard_redis_script_seconds", "Latency of budget scripts on Redis.",
                                       ("script",), registry=self.registry,
                                       buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.redis_errors = Counter("budgetguard_redis_errors", "Budget scripts that failed or timed out.",
                                    ("script",), registry=self.registry)
        self.alerts = Counter("budgetguard_alert_deliveries", "Alert deliveries by sink and outcome.",
                              ("sink", "outcome"), registry=self.registry)
        # Filled only by the HTTP proxy (budgetguard.proxy); empty otherwise.
        self.proxy_requests = Counter("budgetguard_proxy_requests", "Proxy answers by endpoint and HTTP status.",
                                      ("endpoint", "status"), registry=self.registry)
        self.proxy_upstream_errors = Counter("budgetguard_proxy_upstream_errors",
                                             "Proxied requests the upstream failed (timeouts, refused or cut "
                                             "connections), by error code.", ("code",), registry=self.registry)
        self._spend = _SpendCollector()
        self.registry.register(self._spend)

    def know_models(self, names: Iterable[str]) -> None:
        """Give these model names (a configuration's, see :func:`config_models`) labels of
        their own. Only ever pass names from configuration, never from callers."""
        self._models = self._models | frozenset(names)

    def model_label(self, model: Any) -> str:
        """The label value for a model name: the name itself when configured, its lowercase
        form when the pricing library lists it (the library ignores case, and keeping the
        caller's spelling would make one series per spelling), else :data:`OTHER`."""
        if not isinstance(model, str) or not model:
            return _NONE
        if model in self._models:
            return model
        lowered = model.lower()
        return lowered if lowered in library_model_names() else OTHER

    def observe_decision(self, decision: Decision) -> None:
        if not decision.enforced and decision.allowed:
            outcome = "unenforced"
        elif not decision.allowed:
            outcome = "denied"
        elif decision.downgraded:
            outcome = "routed"
        else:
            outcome = "allowed"
        self.decisions.labels(outcome, decision.limit or _NONE).inc()

    def observe_event(self, event: Mapping[str, Any]) -> None:
        self.events.labels(_label(event.get("outcome"))).inc()
        model = self.model_label(event.get("model"))
        for key, kind in _TOKEN_KINDS:
            count = event.get(key)
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                self.tokens.labels(model, kind).inc(count)
        try:
            cost = Decimal(str(event.get("cost_usd") or 0))
        except InvalidOperation:
            return
        if cost.is_finite() and cost > 0:
            self._spend.add((_label(event.get("tier")), _label(event.get("provider")), model), cost)

    def observe_redis(self, script: str, seconds: float, ok: bool) -> None:
        self.redis_seconds.labels(script).observe(seconds)
        if not ok:
            self.redis_errors.labels(script).inc()

    def observe_alert(self, sink: str, outcome: str) -> None:
        self.alerts.labels(sink, outcome).inc()

    def observe_proxy(self, endpoint: str, status: int) -> None:
        # The status may be the upstream's, which can send any number.
        code = str(status) if isinstance(status, int) and 100 <= status <= 599 else OTHER
        self.proxy_requests.labels(endpoint, code).inc()

    def observe_upstream_error(self, code: str) -> None:
        self.proxy_upstream_errors.labels(code).inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def metrics_app(metrics: Metrics) -> ASGIApp:
    """An ASGI app serving ``metrics`` in the Prometheus text format (mount it at ``/metrics``)."""

    def produce() -> tuple[int, bytes, str]:
        body, content_type = metrics.render()
        return 200, body, content_type

    return GetApp(produce)
