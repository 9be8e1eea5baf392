"""The hourly spend anomaly detector: its baseline arithmetic, and end to end on a frozen
clock (embedded fakeredis and a real Redis)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest

from budgetguard import Usage
from budgetguard.alerts.anomaly import baseline
from budgetguard.guard import BudgetGuard

from .helpers import MSG, config

USD = 10**9  # nano-USD


def expected_threshold(samples: list[int | None], sigmas: int = 3, min_spend: int = 0) -> int:
    """floor(mean + sigmas * population stdev) + 1, at least min_spend, in exact arithmetic."""
    known = [Fraction(s) for s in samples if s is not None]
    mean = sum(known) / len(known)
    spread = sigmas**2 * sum((s - mean) ** 2 for s in known) / len(known)  # (sigmas * stdev) ** 2

    def within(t: int) -> bool:  # t <= mean + sqrt(spread)
        return t - mean <= 0 or (t - mean) ** 2 <= spread

    t = math.floor(mean) + math.isqrt(math.floor(spread))
    while within(t + 1):
        t += 1
    while not within(t):
        t -= 1
    return max(t + 1, min_spend)


# -- the baseline, pure ------------------------------------------------------------------


def test_a_spike_is_above_the_threshold_and_ordinary_days_below():
    samples = [100, 112, 93, 104, 97, 99, 101, 108, 95, 100, 103, 96, 102, 98]
    samples = [s * 10_000_000 for s in samples]  # about $1 an hour
    b = baseline(samples, sigmas=Decimal(3), min_days=7, min_spend_nano=0)
    assert b is not None
    assert b.days == 14
    assert b.mean_nano == sum(samples) // 14 + (1 if sum(samples) % 14 * 2 >= 14 else 0)
    assert b.threshold_nano == expected_threshold(samples)
    assert max(samples) < b.threshold_nano < 2 * max(samples)  # the spike (2x) is above it


def test_a_steady_baseline_fires_just_above_its_mean_not_at_it():
    b = baseline([5 * USD] * 14, sigmas=Decimal(3), min_days=7, min_spend_nano=0)
    assert b is not None
    assert (b.mean_nano, b.stdev_nano, b.days, b.threshold_nano) == (5 * USD, 0, 14, 5 * USD + 1)


def test_sigmas_move_the_threshold():
    samples = [90 * USD, 110 * USD] * 7  # mean 100, stdev 10
    for sigmas in (1, 2, 3, 5):
        b = baseline(samples, sigmas=Decimal(sigmas), min_days=7, min_spend_nano=0)
        assert b is not None and b.threshold_nano == (100 + 10 * sigmas) * USD + 1


def test_too_little_history_means_no_baseline():
    six = [None] * 8 + [3 * USD] * 6
    assert baseline(six, sigmas=Decimal(3), min_days=7, min_spend_nano=0) is None
    seven = [None] * 7 + [3 * USD] * 7
    b = baseline(seven, sigmas=Decimal(3), min_days=7, min_spend_nano=0)
    assert b is not None and b.days == 7
    assert baseline([], sigmas=Decimal(3), min_days=2, min_spend_nano=0) is None


def test_min_spend_is_a_floor():
    b = baseline([10_000] * 14, sigmas=Decimal(3), min_days=7, min_spend_nano=USD)
    assert b is not None and b.threshold_nano == USD
    # Above the floor, the statistics decide.
    b = baseline([90 * USD, 110 * USD] * 7, sigmas=Decimal(3), min_days=7, min_spend_nano=USD)
    assert b is not None and b.threshold_nano == 130 * USD + 1


def test_days_without_history_are_skipped_days_without_spend_count_as_zero():
    spent = [4 * USD] * 7
    skipped = baseline([None] * 7 + spent, sigmas=Decimal(3), min_days=7, min_spend_nano=0)
    assert skipped is not None
    assert (skipped.days, skipped.mean_nano, skipped.threshold_nano) == (7, 4 * USD, 4 * USD + 1)
    zeros = baseline([0] * 7 + spent, sigmas=Decimal(3), min_days=7, min_spend_nano=0)
    assert zeros is not None
    assert (zeros.days, zeros.mean_nano, zeros.stdev_nano) == (14, 2 * USD, 2 * USD)
    assert zeros.threshold_nano == 8 * USD + 1


# -- end to end ---------------------------------------------------------------------------

START = datetime(2026, 3, 1, tzinfo=UTC)
TOKEN = 10_000  # nano-USD per gpt-4o output token ($10 per million)
# The org's daily cycle: per UTC hour, the calls (user, feature, dollars). Each day's
# amounts vary by -3%, 0 or +3%, in a pattern that shifts from day to day.
CYCLE = {
    9: [("ana", "chat", 2), ("carl", "search", 1), ("ana", "chat", Decimal("0.5"))],
    13: [("ana", "chat", 3), ("ben", "search", 4), ("ana", "chat", 3)],
    20: [("dora", "digest", 1), ("dora", "digest", 1)],
}
VARIATION = (Decimal("0.97"), Decimal(1), Decimal("1.03"))


class Org:
    """Spends through a guard on a frozen clock, keeping its own tally of every hour."""

    def __init__(self, url: str, clock: Any) -> None:
        self.alerts: list[Any] = []
        self.clock = clock
        self.url = url
        self.guard = self.new_guard()
        self.hours: dict[datetime, int] = {}  # hour -> nano-USD spent in it
        self.users: dict[datetime, dict[str, int]] = {}
        self.features: dict[datetime, dict[str, int]] = {}

    def new_guard(self) -> BudgetGuard:
        return BudgetGuard(config(), redis_url=self.url, clock=self.clock, on_alert=self.alerts.append)

    def at(self, day: int, hour: int, minute: int) -> datetime:
        self.clock.now = START + timedelta(days=day, hours=hour, minutes=minute)
        return self.clock.now.replace(minute=0)

    def spend(self, user: str, feature: str, dollars: Decimal | int, guard: BudgetGuard | None = None) -> None:
        g = guard or self.guard
        tokens = int(Decimal(dollars) * USD / TOKEN)
        d = g.check(user, "gpt-4o", MSG, max_tokens=10, tags={"feature": feature})
        assert d.allowed, d.reason
        assert g.record(d, Usage(input_tokens=0, output_tokens=tokens)) is True
        hour = self.clock.now.replace(minute=0, second=0, microsecond=0)
        cost = tokens * TOKEN
        self.hours[hour] = self.hours.get(hour, 0) + cost
        for table, name in ((self.users, user), (self.features, feature)):
            row = table.setdefault(hour, {})
            row[name] = row.get(name, 0) + cost
        g.flush()  # the first settle of an hour loads its baseline in the background

    def usual_day(self, day: int) -> None:
        for hour, calls in CYCLE.items():
            factor = VARIATION[(day + hour) % 3]
            for minute, (user, feature, dollars) in enumerate(calls):
                self.at(day, hour, 5 + 10 * minute)
                self.spend(user, feature, Decimal(dollars) * factor)

    def threshold(self, hour: datetime) -> int:
        """The anomaly threshold of ``hour``, from this tally (14 baseline days, 3 sigmas, $1 floor)."""
        days = [hour - timedelta(days=k) for k in range(1, 15)]
        # Before the first day there is no history at all; after it, an hour without spend is 0.
        samples = [None if at < START else self.hours.get(at, 0) for at in days]
        return expected_threshold(samples, min_spend=USD)

    def ranking(self, table: dict[datetime, dict[str, int]], hour: datetime) -> tuple[tuple[str, Decimal], ...]:
        ranked = sorted(table[hour].items(), key=lambda kv: -kv[1])[:5]
        return tuple((name, Decimal(nano) / USD) for name, nano in ranked)


def anomalies(org: Org) -> list[Any]:
    return [a for a in org.alerts if a.kind == "anomaly"]


def test_steady_daily_cycle_is_quiet_and_a_planted_spike_alerts_once(backend_url, clock):
    org = Org(backend_url, clock)
    for day in range(16):  # 15 days of history, then one more ordinary day
        org.usual_day(day)
    assert org.alerts == []
    # Every steady day with a baseline (7+ days of history) stayed below its threshold,
    # computed here from the tally alone.
    for hour in CYCLE:
        for day in range(7, 16):
            at = START + timedelta(days=day, hours=hour)
            assert org.hours[at] < org.threshold(at), at

    # Day 16, 13:00: an ordinary start, then two users of one feature spend ~25x the usual hour.
    spike = org.at(16, 13, 2)
    threshold = org.threshold(spike)
    org.spend("ana", "chat", 3)  # the hour's first settle: its baseline loads now
    assert anomalies(org) == []
    org.at(16, 13, 7)
    org.spend("spiker-1", "export", 150)
    assert org.hours[spike] >= threshold
    [alert] = anomalies(org)
    assert (alert.kind, alert.scope, alert.window, alert.window_key) == ("anomaly", "org", "org.hour",
                                                                         "h:202603171300")
    assert (alert.window_start, alert.window_end) == (spike, spike + timedelta(hours=1))
    assert alert.spent_usd == Decimal(153)
    assert alert.top_users == (("spiker-1", Decimal(150)), ("ana", Decimal(3)))
    assert alert.top_features == (("export", Decimal(150)), ("chat", Decimal(3)))
    assert "14 days" in alert.detail
    org.at(16, 13, 9)
    org.spend("spiker-2", "export", 90)

    # More spend in that hour, from this process and from another: no second alert.
    for minute, (user, feature, dollars) in enumerate(CYCLE[13]):
        org.at(16, 13, 20 + minute)
        org.spend(user, feature, dollars)
    other = org.new_guard()
    org.at(16, 13, 40)
    org.spend("spiker-1", "export", 50, other)  # the other guard loads its baseline here
    org.at(16, 13, 45)
    org.spend("spiker-1", "export", 50, other)  # over its threshold too, but already reported
    assert len(anomalies(org)) == 1
    # The rest of the day is ordinary.
    for minute, (user, feature, dollars) in enumerate(CYCLE[20]):
        org.at(16, 20, 5 + minute)
        org.spend(user, feature, dollars)
    assert len(anomalies(org)) == 1

    # Day 17, 13:00: a bigger spike is the hour's first spend, settled before the hour's
    # baseline (which now holds yesterday's spike) has loaded: it alerts once that loads.
    again = org.at(17, 13, 5)
    org.spend("spiker-2", "export", 700)
    assert org.hours[again] >= org.threshold(again) > org.threshold(spike)
    assert len(anomalies(org)) == 2
    second = anomalies(org)[1]
    assert second.window_key == "h:202603181300"
    assert second.spent_usd == Decimal(700)
    assert second.top_users == org.ranking(org.users, again) == (("spiker-2", Decimal(700)),)
    assert second.top_features == org.ranking(org.features, again) == (("export", Decimal(700)),)
    org.at(17, 13, 9)
    org.spend("spiker-3", "export", 300)
    org.at(17, 13, 12)
    org.spend("ana", "chat", 3)
    assert len(anomalies(org)) == 2
    assert [a.kind for a in org.alerts] == ["anomaly", "anomaly"]


def test_no_alert_below_min_spend_or_without_history(backend_url, clock):
    org = Org(backend_url, clock)
    for day in range(7):
        org.at(day, 9, 5)
        org.spend("ana", "chat", Decimal("0.05"))
    # 10:00 on day 6 has six days of history (each with no spend at 10:00): one short of
    # min_history_days, so even a 100x hour is quiet.
    org.at(6, 10, 5)
    org.spend("ana", "chat", Decimal("0.05"))
    org.at(6, 10, 10)
    org.spend("ana", "chat", 5)
    assert anomalies(org) == []
    # 09:00 on day 7 has seven days of $0.05, but an hour of $0.90 stays under the $1 floor.
    org.at(7, 9, 5)
    org.spend("ana", "chat", Decimal("0.05"))
    org.at(7, 9, 10)
    org.spend("ana", "chat", Decimal("0.85"))
    assert anomalies(org) == []
    # At the floor, it alerts.
    org.at(7, 9, 15)
    org.spend("ana", "chat", Decimal("0.10"))
    [alert] = anomalies(org)
    assert alert.spent_usd == Decimal("1.00")
    assert alert.top_users == (("ana", Decimal("1.00")),)
    assert alert.top_features == (("chat", Decimal("1.00")),)


def test_a_guard_without_alert_consumers_does_not_use_up_the_alert(backend_url, clock):
    org = Org(backend_url, clock)
    for day in range(8):
        org.at(day, 9, 5)
        org.spend("ana", "chat", 1)
    silent = BudgetGuard(config(), redis_url=backend_url, clock=clock)
    org.at(8, 9, 5)
    org.spend("ana", "chat", 1, silent)
    org.at(8, 9, 10)
    org.spend("ana", "chat", 100, silent)
    assert org.alerts == []
    # The hour's alert is still there for a guard that has a consumer: its first settle
    # loads the baseline, which finds the hour already over it.
    org.at(8, 9, 20)
    org.spend("ana", "chat", 1)
    [alert] = anomalies(org)
    assert alert.spent_usd == Decimal(102)
    org.at(8, 9, 25)
    org.spend("ana", "chat", 1)
    assert len(anomalies(org)) == 1


@pytest.mark.parametrize("sigmas", ["1", "6"])
def test_configured_sigmas_apply(backend_url, clock, sigmas):
    org = Org(backend_url, clock)
    org.guard = BudgetGuard(config(anomaly={"sigmas": sigmas, "min_spend_usd": 0}), redis_url=backend_url,
                            clock=clock, on_alert=org.alerts.append)
    for day in range(14):
        org.at(day, 9, 5)
        org.spend("ana", "chat", 9 if day % 2 else 11)  # mean $10, stdev $1
    org.at(14, 9, 5)
    org.spend("ana", "chat", 5)
    org.at(14, 9, 10)
    org.spend("ana", "chat", Decimal("6.5"))  # $11.50: above mean + 1 sigma, below mean + 6 sigma
    assert len(anomalies(org)) == (1 if sigmas == "1" else 0)


def test_a_spike_in_the_hours_only_settle_alerts(backend_url, clock):
    org = Org(backend_url, clock)
    for day in range(8):
        org.at(day, 9, 5)
        org.spend("ana", "chat", 2)
    org.at(8, 9, 5)
    org.spend("spiker-1", "export", 200)  # 100x the usual hour, its only call; spend() flushes
    assert [(a.spent_usd, a.top_users) for a in anomalies(org)] == [(Decimal(200), (("spiker-1", Decimal(200)),))]
    # Settles after the baseline loaded do not report the hour again.
    org.at(8, 9, 30)
    org.spend("ana", "chat", 50)
    assert len(anomalies(org)) == 1
