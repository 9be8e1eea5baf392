"""Unusual hours: the org's spend in an hour against the same hour of the trailing days.

The baseline of an hour is the org's spend in the same UTC hour on each of the
previous ``baseline_days`` days (so a steady daily cycle is its own baseline: the busy
afternoon is compared with other afternoons, not with the night). The hour is
unusual once its spend exceeds ``mean + sigmas * stdev`` of that baseline (population
standard deviation), and also ``min_spend_usd``. The detector stays silent until at
least ``min_history_days`` of the baseline days have any recorded spend history.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

__all__ = ["Baseline", "baseline"]


@dataclass(frozen=True, slots=True)
class Baseline:
    mean_nano: int
    stdev_nano: int
    days: int  # baseline days that had history
    threshold_nano: int  # spend at or above this in the hour is an anomaly

    def describe(self, sigmas: Decimal) -> str:
        mean = Decimal(self.mean_nano) / 10**9
        stdev = Decimal(self.stdev_nano) / 10**9
        return (f"the same hour over the last {self.days} days averaged ${mean:.2f} "
                f"(standard deviation ${stdev:.2f}); the alert fires above mean + {sigmas.normalize():f} sigma")


def baseline(samples: Sequence[int | None], *, sigmas: Decimal, min_days: int, min_spend_nano: int) -> Baseline | None:
    """The anomaly threshold from the same hour on previous days (None: a day without history).

    A day whose history exists but has no spend in that hour counts as 0; a day with
    no history at all (before the org's first spend, or expired) is left out.
    """
    known = [s for s in samples if s is not None]
    if len(known) < min_days:
        return None
    n = len(known)
    mean = sum(known) / n  # floats here describe a distribution; no money moves on them
    stdev = math.sqrt(sum((s - mean) ** 2 for s in known) / n)
    # Strictly above the mean: a perfectly steady baseline (stdev 0) must not fire at its mean.
    threshold = max(math.floor(mean + float(sigmas) * stdev) + 1, min_spend_nano)
    return Baseline(round(mean), round(stdev), n, threshold)
