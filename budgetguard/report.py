"""Usage reports: exact sums over usage events, grouped, rendered as a table, CSV or JSON.

Everything here is a pure function of a list of event dicts (see
:mod:`budgetguard.eventlog` for reading them). Money is ``Decimal`` throughout.

Definitions (also in the README):

* ``requests``: allowed calls, i.e. events of kind ``usage`` whatever their outcome
  (``ok``, ``released``, ``expired``, ``stream_incomplete``); ``denials``: events of
  kind ``denied``; ``events`` = both.
* ``total_tokens`` = input + output tokens (input includes cached, output includes reasoning).
* ``avg_cost_per_request_usd`` = cost / requests; ``cost_per_1k_tokens_usd`` =
  cost * 1000 / total_tokens; both rounded half-even to the nano-USD (9 places).
* Estimate accuracy, over settled calls (outcome ``ok``) with an estimate above zero:
  ``estimate_ratio`` = sum(actual cost) / sum(estimated cost), 6 places (1 means the
  reservations matched the spend exactly; below 1 is the usual over-reservation of a
  worst-case estimate), and ``estimate_mape_pct``, the mean absolute percentage error
  mean(|actual - estimated| / estimated) * 100, 4 places.
"""

from __future__ import annotations

import csv
import decimal
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from .errors import BudgetGuardError

__all__ = [
    "FORMATS",
    "GROUP_BY",
    "Report",
    "ReportError",
    "Totals",
    "build_report",
    "check_grouping",
    "format_usd",
    "parse_duration",
    "render",
]

# The event's own fields; any other name groups by the tag of that name (feature, tenant, ...).
GROUP_BY = ("user", "model", "provider", "feature", "tenant", "api_key", "hour", "budget")
_FIELDS = frozenset({"user", "model", "provider", "hour", "budget"})
_TAG_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
FORMATS = ("table", "csv", "json")
NONE_KEY = "(none)"

_NANO = Decimal("0.000000001")
_RATIO = Decimal("0.000001")
_PCT = Decimal("0.0001")
_DURATION = re.compile(r"(\d{1,6})([mhdw])")
_UNIT = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_TOKEN_FIELDS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")
_MONEY_FIELDS = ("cost_usd", "input_cost_usd", "output_cost_usd", "estimated_cost_usd")


class ReportError(BudgetGuardError, ValueError):
    """A bad report argument (a duration, a grouping, a format)."""


def parse_duration(text: str) -> timedelta:
    """``90m``, ``24h``, ``7d``, ``2w`` -> timedelta; ReportError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ReportError(f"bad duration {text!r}: use a positive number and a unit m, h, d or w (e.g. 24h, 7d, 30d)")
    delta = timedelta(**{_UNIT[match.group(2)]: int(match.group(1))})
    if delta > timedelta(days=3660):
        raise ReportError(f"bad duration {text!r}: at most ten years")
    return delta


def format_usd(value: Decimal) -> str:
    """Exact, at least two decimals: ``0.006``, ``12.00``, ``0.000000125``."""
    text = f"{value:.9f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


@dataclass(frozen=True, slots=True)
class _Event:
    """The fields a report reads, validated and typed."""

    ts: datetime
    kind: str
    outcome: str
    user: str
    provider: str
    model: str
    tags: Mapping[str, str]
    tokens: tuple[int, int, int, int]  # _TOKEN_FIELDS order
    money: tuple[Decimal, Decimal, Decimal, Decimal]  # _MONEY_FIELDS order
    budgets: tuple[str, ...] = ()  # the budgets that applied (events before budgets: none)


def _int(event: Mapping[str, Any], key: str) -> int:
    value = event.get(key, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} is not a count")
    return value


def _money(event: Mapping[str, Any], key: str) -> Decimal:
    value = event.get(key)
    if value is None:
        return Decimal(0)
    # Floats are refused: the format promises exact decimal strings.
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{key} is not a decimal string")
    try:
        amount = Decimal(value)
    except decimal.InvalidOperation:
        raise ValueError(f"{key} is not a decimal string") from None
    if not amount.is_finite():
        raise ValueError(f"{key} is not finite")
    return amount


def _text(event: Mapping[str, Any], key: str) -> str:
    value = event.get(key)
    return value if isinstance(value, str) and value else NONE_KEY


def _parse(event: Mapping[str, Any]) -> _Event:
    kind = event.get("kind")
    if kind not in ("usage", "denied"):
        raise ValueError("unknown kind")
    tags = event.get("tags") or {}
    if not isinstance(tags, Mapping):
        raise ValueError("tags is not an object")
    tokens = tuple(_int(event, k) for k in _TOKEN_FIELDS)
    money = tuple(_money(event, k) for k in _MONEY_FIELDS)
    # Read for --by budget only: an event whose list is unreadable still counts in every other
    # report, and in --by budget under "(none)".
    budgets = event.get("budgets")
    if not isinstance(budgets, list) or len(budgets) > 64 or not all(isinstance(b, str) and b for b in budgets):
        budgets = []
    from .eventlog import event_time  # late: eventlog imports redis, which `--help` need not load

    return _Event(ts=event_time(event.get("ts")), kind=kind, outcome=_text(event, "outcome"),
                  user=_text(event, "user"), provider=_text(event, "provider"), model=_text(event, "model"),
                  tags=tags, tokens=tokens, money=money, budgets=tuple(budgets))  # type: ignore[arg-type]


def _group_key(event: _Event, by: str) -> str:
    if by == "hour":
        return f"{event.ts:%Y-%m-%dT%H}:00Z"
    if by not in _FIELDS:  # a tag (api_key: the proxy's key name)
        value = event.tags.get(by)
        return value if isinstance(value, str) and value else NONE_KEY
    return str(getattr(event, by))


def _ratio(numerator: Decimal, denominator: Decimal, quantum: Decimal) -> Decimal | None:
    if not denominator:
        return None
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        return (numerator / denominator).quantize(quantum, rounding=ROUND_HALF_EVEN)


@dataclass
class Totals:
    """Sums over a set of events; derived figures are properties."""

    events: int = 0
    requests: int = 0
    denials: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    input_cost_usd: Decimal = Decimal(0)
    output_cost_usd: Decimal = Decimal(0)
    estimated_requests: int = 0  # settled ("ok") calls with an estimate > 0
    estimated_usd: Decimal = Decimal(0)  # their estimates
    estimated_actual_usd: Decimal = Decimal(0)  # their actual costs
    _error_sum: Decimal = Decimal(0)  # sum of |actual - estimated| / estimated

    def add(self, event: _Event) -> None:
        self.events += 1
        self.outcomes[event.outcome] = self.outcomes.get(event.outcome, 0) + 1
        if event.kind == "denied":
            self.denials += 1
        else:
            self.requests += 1
        i, c, o, r = event.tokens
        self.input_tokens += i
        self.cached_input_tokens += c
        self.output_tokens += o
        self.reasoning_tokens += r
        cost, in_cost, out_cost, estimate = event.money
        self.cost_usd += cost
        self.input_cost_usd += in_cost
        self.output_cost_usd += out_cost
        if event.outcome == "ok" and event.kind == "usage" and estimate > 0:
            self.estimated_requests += 1
            self.estimated_usd += estimate
            self.estimated_actual_usd += cost
            with decimal.localcontext() as ctx:
                ctx.prec = 60  # enough that a few million terms round like the exact sum
                self._error_sum += abs(cost - estimate) / estimate

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def avg_cost_per_request_usd(self) -> Decimal | None:
        return _ratio(self.cost_usd, Decimal(self.requests), _NANO)

    @property
    def cost_per_1k_tokens_usd(self) -> Decimal | None:
        return _ratio(self.cost_usd * 1000, Decimal(self.total_tokens), _NANO)

    @property
    def estimate_ratio(self) -> Decimal | None:
        return _ratio(self.estimated_actual_usd, self.estimated_usd, _RATIO)

    @property
    def estimate_mape_pct(self) -> Decimal | None:
        return _ratio(self._error_sum * 100, Decimal(self.estimated_requests), _PCT)

    def row(self) -> dict[str, Any]:
        """The flat figures, money and ratios as exact strings (None where undefined)."""

        def text(value: Decimal | None, money: bool = True) -> str | None:
            if value is None:
                return None
            return format_usd(value) if money else str(value)

        return {
            "events": self.events,
            "requests": self.requests,
            "denials": self.denials,
            "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "output_tokens": self.output_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "total_tokens": self.total_tokens,
            "cost_usd": text(self.cost_usd),
            "input_cost_usd": text(self.input_cost_usd),
            "output_cost_usd": text(self.output_cost_usd),
            "avg_cost_per_request_usd": text(self.avg_cost_per_request_usd),
            "cost_per_1k_tokens_usd": text(self.cost_per_1k_tokens_usd),
            "estimated_requests": self.estimated_requests,
            "estimated_usd": text(self.estimated_usd),
            "estimate_ratio": text(self.estimate_ratio, money=False),
            "estimate_mape_pct": text(self.estimate_mape_pct, money=False),
        }


@dataclass
class Report:
    since: datetime | None
    until: datetime | None
    by: str | None
    totals: Totals
    groups: list[tuple[str, Totals]]
    top_spenders: list[tuple[str, Totals]]
    skipped: int = 0
    source: str = ""


def check_grouping(by: str | None) -> None:
    """ReportError unless ``by`` is an event field (user, model, provider, hour) or a tag's name."""
    if by is not None and by not in _FIELDS and not _TAG_NAME.fullmatch(by):
        raise ReportError(f"cannot group by {by[:70]!r}: use one of {', '.join(sorted(_FIELDS))} or a tag's name "
                          "(letters, digits, '_', '.', '-'; at most 64)")


def build_report(events: Iterable[Mapping[str, Any]], *, by: str | None = None, top: int = 10,
                 since: datetime | None = None, until: datetime | None = None, skipped: int = 0,
                 source: str = "") -> Report:
    """Aggregate ``events`` (already limited to the range). Malformed events add to ``skipped``."""
    check_grouping(by)
    totals = Totals()
    groups: dict[str, Totals] = {}
    users: dict[str, Totals] = {}
    for raw in events:
        if isinstance(raw, Mapping) and raw.get("kind") == "admin":
            continue  # an operator's change (guard.admin): no spend, not malformed
        try:
            event = _parse(raw)
        except (ValueError, TypeError):
            skipped += 1
            continue
        totals.add(event)
        users.setdefault(event.user, Totals()).add(event)
        if by == "budget":
            # An event counts in the row of every budget that applied to it: rows overlap.
            for name in dict.fromkeys(event.budgets or (NONE_KEY,)):
                groups.setdefault(name, Totals()).add(event)
        elif by is not None:
            groups.setdefault(_group_key(event, by), Totals()).add(event)
    ranked = sorted(users.items(), key=lambda kv: (-kv[1].cost_usd, -kv[1].requests, kv[0]))
    if by == "hour":
        ordered = sorted(groups.items())
    else:
        ordered = sorted(groups.items(), key=lambda kv: (-kv[1].cost_usd, -kv[1].events, kv[0]))
    return Report(since=since, until=until, by=by, totals=totals, groups=ordered,
                  top_spenders=[kv for kv in ranked[:top] if kv[1].cost_usd > 0],
                  skipped=skipped, source=source)


# -- rendering ---------------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def render(report: Report, fmt: str) -> str:
    if fmt == "json":
        return render_json(report)
    if fmt == "csv":
        return render_csv(report)
    if fmt == "table":
        return render_table(report)
    raise ReportError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")


def render_json(report: Report) -> str:
    document = {
        "since": _iso(report.since),
        "until": _iso(report.until),
        "source": report.source,
        "skipped": report.skipped,
        "by": report.by,
        "totals": {**report.totals.row(), "outcomes": dict(sorted(report.totals.outcomes.items()))},
        "groups": [{"key": key, **t.row(), "outcomes": dict(sorted(t.outcomes.items()))}
                   for key, t in report.groups],
        "top_spenders": [{"user": user, "cost_usd": format_usd(t.cost_usd), "requests": t.requests,
                          "denials": t.denials} for user, t in report.top_spenders],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def render_csv(report: Report) -> str:
    """One row per group, then a ``total`` row; the ``scope`` column tells them apart."""
    out = io.StringIO()
    columns = list(Totals().row())
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["scope", report.by or "key", *columns])
    for key, t in report.groups:
        writer.writerow(["group", key, *("" if v is None else v for v in t.row().values())])
    writer.writerow(["total", "", *("" if v is None else v for v in report.totals.row().values())])
    return out.getvalue()


_TABLE_COLUMNS: Sequence[tuple[str, str]] = (
    ("requests", "requests"),
    ("denials", "denied"),
    ("input_tokens", "input tok"),
    ("cached_input_tokens", "cached tok"),
    ("output_tokens", "output tok"),
    ("reasoning_tokens", "reason tok"),
    ("cost_usd", "cost $"),
    ("avg_cost_per_request_usd", "$/request"),
    ("cost_per_1k_tokens_usd", "$/1k tok"),
    ("estimate_ratio", "actual/est"),
    ("estimate_mape_pct", "MAPE %"),
)
_TABLE_MONEY = frozenset({"cost_usd", "avg_cost_per_request_usd", "cost_per_1k_tokens_usd"})


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned first column, right-aligned figures, two spaces between columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [str(r[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines


def render_table(report: Report) -> str:
    span = f"{_iso(report.since) or 'start'} .. {_iso(report.until) or 'now'}"
    t = report.totals
    lines = [f"usage {span}  ({report.source}; {t.events} events)"]
    if report.skipped:
        lines.append(f"warning: skipped {report.skipped} entries that are not valid events")

    def cell(name: str, value: Any) -> str:
        if value is None:
            return "-"
        # Nine places line the dollar amounts up and are still exact (costs are whole nano-USD).
        return f"{Decimal(value):.9f}" if name in _TABLE_MONEY else str(value)

    def cells(key: str, totals: Totals) -> list[str]:
        row = totals.row()
        return [key, *(cell(name, row[name]) for name, _ in _TABLE_COLUMNS)]

    header = [report.by or "", *(title for _, title in _TABLE_COLUMNS)]
    rows = [cells(key, g) for key, g in report.groups]
    rows.append(cells("TOTAL", t))
    lines.append("")
    lines.extend(_table(header, rows))
    lines.append("")
    lines.append("top spenders")
    if report.top_spenders:
        lines.extend(_table(["user", "cost $", "requests", "denied"],
                            [[u, cell("cost_usd", s.cost_usd), str(s.requests), str(s.denials)]
                             for u, s in report.top_spenders]))
    else:
        lines.append("(no spend)")
    lines.append("")
    ratio, mape = t.estimate_ratio, t.estimate_mape_pct
    if ratio is None or mape is None:
        lines.append("estimate accuracy: no settled calls with an estimate")
    else:
        lines.append(f"estimate accuracy: actual/estimated {ratio} over {t.estimated_requests} settled calls, "
                     f"mean abs error {mape}%")
    return "\n".join(lines) + "\n"


def event_line(event: Mapping[str, Any]) -> str:
    """One human line per event, for ``budgetguard tail``; tolerant of missing fields."""

    def get(key: str, default: str = "?") -> str:
        value = event.get(key)
        return default if value is None else str(value)

    model = get("model")
    if event.get("routed") and event.get("requested_model") not in (None, model):
        model = f"{get('requested_model')}->{model}"
    tags = event.get("tags") if isinstance(event.get("tags"), Mapping) else {}
    parts = [get("ts"), f"{get('outcome'):<17}", f"{get('user')} ({get('tier')})", model]
    if event.get("kind") == "denied":
        parts.append(f"{get('limit', '-')}: {get('reason', '')}")
    else:
        parts.append(f"in {get('input_tokens', '0')} out {get('output_tokens', '0')} tok")
        parts.append(f"${get('cost_usd', '0')}")
        if event.get("latency_ms") is not None:
            parts.append(f"{get('latency_ms')} ms")
    if tags:
        parts.append(" ".join(f"{k}={v}" for k, v in sorted(tags.items())))
    if event.get("error"):
        parts.append(f"error: {get('error')}")
    return "  ".join(parts)
