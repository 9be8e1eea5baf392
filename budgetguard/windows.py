"""Calendar windows (hour, day, ISO week, month; and the minute) in the configured timezone.

A window's *stamp* (``h:202611231400``, ``d:20261123``, ``w:2026W48``, ``m:202611``) names
its counters in Redis (see :mod:`budgetguard.keys`); the hour's names its UTC start. The
minute windows of the rate limits (``q:``/``k:`` and the UTC minute) are not memoized:
:func:`minute_at` is cheap. ``t`` (a balance that never resets) and ``c`` (calls in flight)
have no period.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

__all__ = ["Period", "WindowClock", "WindowSet", "epoch_ms", "minute_at", "windows_at"]

@dataclass(frozen=True, slots=True)
class Period:
    stamp: str  # key suffix, e.g. "h:202611231400"
    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class WindowSet:
    """The hour, day, ISO week and month containing one instant."""

    h: Period
    d: Period
    m: Period
    w: Period

    @property
    def valid_until(self) -> datetime:
        return self.h.end  # the hour always ends first

    def of(self, period: str) -> Period:
        return getattr(self, period)


def epoch_ms(moment: datetime) -> int:
    """An aware datetime as Unix milliseconds (the scripts' clock)."""
    return int(moment.timestamp() * 1000)


def _local_midnight(day: datetime, tz: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=tz)


def windows_at(now: datetime, tz: ZoneInfo) -> WindowSet:
    """The calendar windows containing ``now`` (an aware datetime) in ``tz``."""
    utc = now.astimezone(UTC)
    local = utc.astimezone(tz)
    # The hour is taken on the UTC line, so it is always 3600 s long and contains now,
    # even across a DST change (also the half-hour ones); its key names its UTC start.
    hour_start = utc - timedelta(minutes=local.minute, seconds=local.second, microseconds=local.microsecond)
    day_start = _local_midnight(local, tz)
    day_end = _local_midnight(local + timedelta(days=1), tz)
    week_start = _local_midnight(local - timedelta(days=local.weekday()), tz)
    week_end = _local_midnight(local + timedelta(days=7 - local.weekday()), tz)
    iso_year, iso_week, _ = local.isocalendar()
    month_start = datetime(local.year, local.month, 1, tzinfo=tz)
    next_month = datetime(local.year + local.month // 12, local.month % 12 + 1, 1, tzinfo=tz)
    return WindowSet(
        h=Period(f"h:{hour_start:%Y%m%d%H%M}", hour_start, hour_start + timedelta(hours=1)),
        d=Period(f"d:{local:%Y%m%d}", day_start, day_end),
        m=Period(f"m:{local:%Y%m}", month_start, next_month),
        w=Period(f"w:{iso_year}W{iso_week:02d}", week_start, week_end),
    )


def minute_at(now: datetime) -> Period:
    """The UTC minute containing ``now``, named ``n:YYYYmmddHHMM`` (a rate window's stamp ends it)."""
    utc = now.astimezone(UTC)
    start = utc.replace(second=0, microsecond=0)
    return Period(f"{start:%Y%m%d%H%M}", start, start + timedelta(minutes=1))


class WindowClock:
    """Memoizes :func:`windows_at` until the current hour ends (the hot path asks per call)."""

    def __init__(self, tz: ZoneInfo) -> None:
        self._tz = tz
        self._current: WindowSet | None = None

    def at(self, now: datetime) -> WindowSet:
        current = self._current
        if current is None or not (current.h.start <= now < current.valid_until):
            current = self._current = windows_at(now, self._tz)
        return current
