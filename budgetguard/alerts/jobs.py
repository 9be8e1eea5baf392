"""Background work as sans-IO generators: each yields the I/O it needs and gets its result.

A job yields :class:`~budgetguard.protocol.ScriptCall` (answered with the reply, or the
:class:`StoreUnavailable` it raised), :class:`Send` (answered with a :class:`Sent`),
:class:`Sleep`, or :class:`Invoke` (a user callback; answered with its exception or
None). The thread and asyncio dispatchers only perform those requests, so delivery,
retry and forecasting logic exist once.
"""

from __future__ import annotations

import email.utils
import logging
import random
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ..pricing import nano_to_usd
from ..protocol import ScriptCall
from .anomaly import baseline
from .messages import Delivery, deliveries
from .model import Alert

if TYPE_CHECKING:
    from ..engine import Engine

__all__ = ["Invoke", "RetryPolicy", "Send", "Sent", "Sleep", "alert_job", "baseline_job", "forecast_job",
           "steps_job"]

log = logging.getLogger("budgetguard.alerts")


@dataclass(frozen=True, slots=True)
class Send:
    delivery: Delivery


@dataclass(frozen=True, slots=True)
class Sent:
    status: int | None  # None: no HTTP answer (network error, timeout)
    retry_after: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Invoke:
    fn: Callable[[Any], Any]
    arg: Any


Job = Generator[Any, Any, None]


def steps_job(steps: Generator[ScriptCall, Any, Any]) -> Generator[Any, Any, Any]:
    """An engine operation (which has failures raised into it) as part of a job (which is
    answered them as values); returns the operation's result."""
    reply: Any = None
    while True:
        try:
            call = steps.throw(reply) if isinstance(reply, BaseException) else steps.send(reply)
        except StopIteration as done:
            return done.value
        reply = yield call


class RetryPolicy:
    """Exponential backoff with jitter on 429, 5xx and network errors; ``Retry-After`` wins."""

    def __init__(self, retries: int, base_s: float = 0.5, cap_s: float = 30.0) -> None:
        self.retries = retries
        self.base_s = base_s
        self.cap_s = cap_s

    def delay(self, attempt: int, sent: Sent) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``, or None to give up."""
        if sent.status is not None and sent.status != 429 and sent.status < 500:
            return None  # the request itself is wrong: repeating it cannot help
        if attempt >= self.retries:
            return None
        hinted = _retry_after_s(sent.retry_after)
        if hinted is not None:
            return min(hinted, self.cap_s)
        return min(self.cap_s, self.base_s * 2**attempt) * (0.5 + random.random() / 2)


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _deliver(delivery: Delivery, policy: RetryPolicy, alert: Alert,
             observe: Callable[[str, str], None]) -> Job:
    attempt = 0
    while True:
        sent: Sent = yield Send(delivery)
        if sent.ok:
            observe(delivery.sink, "delivered")
            return
        why = sent.error or f"HTTP {sent.status}"
        wait = policy.delay(attempt, sent)
        if wait is None:
            observe(delivery.sink, "dropped")
            log.error("alert dropped: %s at %s failed after %d attempt(s) (%s): %s", delivery.sink,
                      delivery.where, attempt + 1, why, alert.summary)
            return
        observe(delivery.sink, "retried")
        log.warning("alert to %s at %s failed (%s); retry %d in %.2f s", delivery.sink, delivery.where, why,
                    attempt + 1, wait)
        yield Sleep(wait)
        attempt += 1


def _ranking(raw: Any) -> tuple[tuple[str, Decimal], ...]:
    pairs = list(raw or ())
    out = []
    for i in range(0, len(pairs) - 1, 2):
        name = pairs[i].decode("utf-8", "replace") if isinstance(pairs[i], bytes) else str(pairs[i])
        out.append((name, nano_to_usd(int(float(pairs[i + 1])))))
    return tuple(out)


def alert_job(alert: Alert, engine: Engine, policy: RetryPolicy, callbacks: list[Callable[[Alert], Any]],
              observe: Callable[[str, str], None]) -> Job:
    """Name the top spenders when the alert is the org's, then deliver it to every sink."""
    users_key, features_key = engine.top_keys(alert)
    keys = tuple(k for k in (users_key, features_key) if k)
    if keys:
        reply = yield ScriptCall("lookup", keys, ("top",))
        if not isinstance(reply, BaseException):
            alert = alert.with_(top_users=_ranking(reply[0]),
                                top_features=_ranking(reply[1]) if features_key else ())
    log.info("%s", alert.summary)
    for fn in callbacks:
        error = yield Invoke(fn, alert)
        if error is not None:
            observe("callback", "dropped")
            log.error("on_alert callback %r failed: %r", fn, error)
        else:
            observe("callback", "delivered")
    for delivery in deliveries(alert, engine.config.alerts):
        yield from _deliver(delivery, policy, alert, observe)


def baseline_job(engine: Engine, hour: datetime, alert_of: Callable[[Alert], Job]) -> Job:
    """Load the spend of the same UTC hour on the trailing days; set this hour's anomaly threshold.

    Spend settled before the threshold was known is compared once it is: an hour whose
    whole spike came before the baseline loaded still alerts (the same marker claims it).
    """
    cfg = engine.config.anomaly
    stamp = f"{hour:%Y%m%d%H}"
    keys = tuple(engine.keys.history(hour - timedelta(days=k)) for k in range(1, cfg.baseline_days + 1))
    reply = yield ScriptCall("lookup", keys, ("hours", f"{hour:%H}"))
    if isinstance(reply, BaseException):
        engine.anomaly_baselines.pop(stamp, None)  # try again on a later settle
        return
    samples = [int(value or 0) if int(exists) else None for exists, value in reply]
    found = baseline(samples, sigmas=cfg.sigmas, min_days=cfg.min_history_days,
                     min_spend_nano=int(cfg.min_spend_usd * 10**9))
    engine.anomaly_baselines[stamp] = found
    if found is None:
        return
    spent = yield ScriptCall("lookup", (engine.keys.history(hour),), ("spike", f"{hour:%H}", found.threshold_nano))
    if not isinstance(spent, BaseException) and int(spent):
        yield from alert_of(engine.anomaly_alert(hour, int(spent)))


# Forecasts: the org's spend rate over the trailing week of whole hours (or the month so
# far), projected forward. It speaks only with a day of history since the month's first spend.
FORECAST_MIN_HISTORY = timedelta(hours=24)
FORECAST_RATE_WINDOW = timedelta(days=7)


def forecast_job(engine: Engine, now: datetime, alert_of: Callable[[Alert], Job]) -> Job:
    monthly = engine.policies.org.window("monthly")
    cap = None if monthly is None else monthly.cap
    if cap is None:
        return
    month = engine.windows_now(now).m
    first_day = month.start.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    days = []
    day = first_day
    while day <= now:
        days.append(day)
        day += timedelta(days=1)
    month_key = engine.keys.org_window(month.stamp)
    reply = yield ScriptCall("lookup", (*(engine.keys.history(d) for d in days), month_key), ("days",))
    if isinstance(reply, BaseException):
        return
    hours: dict[datetime, int] = {}
    for d, flat in zip(days, reply[:-1], strict=True):
        fields = _pairs(flat)
        for name, value in fields.items():
            if len(name) == 2 and name.isdigit():
                at = d + timedelta(hours=int(name))
                if month.start <= at < month.end:
                    hours[at] = int(value)
    spent = int(_pairs(reply[-1]).get("s", 0))
    outcome = forecast(hours, spent, cap, now, month.end)
    if outcome is None:
        return
    claimed = yield ScriptCall("lookup", (month_key,), ("claim", "f"))
    if claimed != 1:
        return
    runs_out, rate = outcome
    detail = (f"at the current rate (${nano_to_usd(rate):.2f}/hour over the last "
              f"{_rate_window(hours, now)}), the monthly budget runs out on {runs_out:%Y-%m-%d} "
              f"(the {_ordinal(runs_out.day)}), before the month ends on {month.end:%Y-%m-%d}")
    alert = Alert(kind="forecast", scope="org", window="org.monthly", window_key=month.stamp,
                  window_start=month.start, window_end=month.end,
                  level=(Decimal(spent) / cap).quantize(Decimal("0.001")), spent_usd=nano_to_usd(spent),
                  limit_usd=nano_to_usd(cap), at=now, key_prefix=engine.config.key_prefix, detail=detail,
                  next_step="Nothing is blocked yet; at 100% of org.monthly requests are denied.")
    yield from alert_of(alert)


def forecast(hours: Mapping[datetime, int], spent: int, cap: int, now: datetime,
             month_end: datetime) -> tuple[datetime, int] | None:
    """When the month's budget runs out at the recent hourly rate, if before ``month_end``.

    Returns (the moment, the rate in nano-USD per hour), or None when there is too little
    history, no spend, or the budget lasts the month.
    """
    if not hours or spent >= cap:
        return None
    spending = [at for at, value in hours.items() if value > 0]
    if not spending:
        return None
    # Only whole hours measure a rate: the current one has only begun.
    current = now.replace(minute=0, second=0, microsecond=0)
    since = max(min(spending), current - FORECAST_RATE_WINDOW)
    if current - since < FORECAST_MIN_HISTORY:
        return None
    span_hours = int((current - since).total_seconds() // 3600)
    recent = sum(value for at, value in hours.items() if since <= at < current)
    rate = -(-recent // span_hours)
    if rate <= 0:
        return None
    runs_out = now + timedelta(hours=(cap - spent) / rate)
    return (runs_out, rate) if runs_out < month_end else None


def _rate_window(hours: Mapping[datetime, int], now: datetime) -> str:
    current = now.replace(minute=0, second=0, microsecond=0)
    first = min(at for at, value in hours.items() if value > 0)
    span = min(current - first, FORECAST_RATE_WINDOW)
    return f"{span.days} days" if span.days >= 2 else f"{int(span.total_seconds() // 3600)} hours"


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _pairs(flat: Any) -> dict[str, Any]:
    items = list(flat or ())
    out = {}
    for i in range(0, len(items) - 1, 2):
        key = items[i].decode() if isinstance(items[i], bytes) else str(items[i])
        out[key] = items[i + 1].decode() if isinstance(items[i + 1], bytes) else items[i + 1]
    return out
