"""What each sink receives: Slack Block Kit, PagerDuty Events API v2, generic JSON.

Pure functions from an :class:`Alert` to the request to send, so the thread and the
asyncio dispatchers deliver identical bytes and tests can assert on them exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..config import AlertsConfig, PagerDutyConfig
from ..redact import redact_url
from .model import Alert

__all__ = ["Delivery", "alert_json", "deliveries", "pagerduty_body", "slack_body"]


@dataclass(frozen=True, slots=True)
class Delivery:
    sink: str  # "slack" | "pagerduty" | "webhook"
    url: str = field(repr=False)  # may embed a secret (Slack's does)
    body: bytes = field(repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def where(self) -> str:
        """The endpoint (scheme, host, port) for a log line: no path or query, no password.

        Any sink's path may be its secret (Slack's is; so are many chat webhooks'), so
        none is printed, whatever :func:`redact_url` would keep.
        """
        try:
            parts = urlsplit(self.url)
        except ValueError:
            return "<unparseable URL>"
        return redact_url(urlunsplit((parts.scheme, parts.netloc, "", "", "")))


def _money(value: Decimal | None) -> str | None:
    return None if value is None else f"{value.normalize():f}"


def alert_json(alert: Alert) -> dict[str, Any]:
    """The alert as a JSON object (the generic webhook's body, and PagerDuty's details)."""
    return {
        "kind": alert.kind,
        "scope": alert.scope,
        "user": alert.user,
        "tier": alert.tier,
        "budget": alert.budget,
        "value": alert.value,
        "window": alert.window,
        "window_key": alert.window_key,
        "window_start": None if alert.window_start is None else alert.window_start.isoformat(),
        "window_end": None if alert.window_end is None else alert.window_end.isoformat(),
        "level": _money(alert.level),
        "spent_usd": _money(alert.spent_usd),
        "limit_usd": _money(alert.limit_usd),
        "percent": _money(alert.percent),
        "severity": alert.severity,
        "summary": alert.summary,
        "next_step": alert.next_step,
        "detail": alert.detail,
        "top_users": [{"user": u, "spent_usd": _money(v)} for u, v in alert.top_users],
        "top_features": [{"feature": f, "spent_usd": _money(v)} for f, v in alert.top_features],
        "dedup_key": alert.dedup_key,
        "at": alert.at.isoformat(),
    }


def _usd(value: Decimal | None) -> str:
    return "no cap" if value is None else f"${value.quantize(Decimal('0.01')):,}"


def _title(alert: Alert) -> str:
    who = alert.subject[:1].upper() + alert.subject[1:]
    if alert.kind == "blocked":
        text = f"{who} blocked: {alert.window} cap reached"
    elif alert.kind == "resolved":
        text = f"{who}: {alert.window} window {alert.window_key} ended, new window open"
    elif alert.kind == "anomaly":
        text = f"{who}: unusual spend this hour"
    elif alert.kind == "forecast":
        text = f"{who}: {alert.window} budget forecast"
    else:
        text = f"{who}: {alert.window} spend at {alert.level * 100:.0f}%"
    return text[:150]  # Slack's header limit


def slack_body(alert: Alert) -> dict[str, Any]:
    fields = [
        f"*Scope*\n{alert.subject}" + (f" ({'plan' if alert.scope == 'budget' else 'tier'} {alert.tier})"
                                       if alert.tier else ""),
        f"*Window*\n{alert.window} `{alert.window_key}`",
        f"*Spent / limit*\n{_usd(alert.spent_usd)} / {_usd(alert.limit_usd)}",
        f"*Percent*\n{alert.percent}%" if alert.percent is not None else "*Percent*\n-",
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _title(alert)}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in fields]},
    ]
    if alert.detail:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": alert.detail}})
    if alert.top_users:
        lines = "\n".join(f"{i}. {u}: {_usd(v)}" for i, (u, v) in enumerate(alert.top_users, 1))
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*Top spenders*\n{lines}"}})
    if alert.top_features:
        lines = "\n".join(f"{i}. {f}: {_usd(v)}" for i, (f, v) in enumerate(alert.top_features, 1))
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*Top features*\n{lines}"}})
    if alert.next_step:
        text = f"*What happens next*\n{alert.next_step}"
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text}})
    blocks.append({"type": "context", "elements": [
        {"type": "mrkdwn", "text": f"budgetguard | {alert.severity} | {alert.at:%Y-%m-%d %H:%M:%S %Z}"}]})
    return {"text": alert.summary, "blocks": blocks}


def pagerduty_body(alert: Alert, config: PagerDutyConfig) -> dict[str, Any]:
    if alert.kind == "resolved":
        return {"routing_key": config.routing_key, "event_action": "resolve", "dedup_key": alert.dedup_key}
    return {
        "routing_key": config.routing_key,
        "event_action": "trigger",
        "dedup_key": alert.dedup_key,
        "payload": {
            "summary": alert.summary[:1024],
            "source": config.source,
            "severity": alert.severity,
            "component": alert.window,
            "group": alert.scope,
            "class": alert.kind,
            "timestamp": alert.at.isoformat(),
            "custom_details": alert_json(alert),
        },
    }


def _wanted(alert: Alert, min_level: Decimal | None, scopes: Sequence[str]) -> bool:
    return alert.scope in scopes and (min_level is None or alert.level >= min_level)


def _encode(body: dict[str, Any]) -> bytes:
    # ASCII escapes: a user id may hold anything, a lone surrogate included.
    return json.dumps(body, separators=(",", ":"), ensure_ascii=True).encode()


def deliveries(alert: Alert, config: AlertsConfig) -> list[Delivery]:
    """The HTTP requests that deliver ``alert`` to each configured sink that wants it."""
    out = []
    json_headers = {"Content-Type": "application/json"}
    slack, pd, hook = config.slack, config.pagerduty, config.webhook
    if slack and slack.webhook_url and _wanted(alert, slack.min_level, slack.scopes):
        out.append(Delivery("slack", slack.webhook_url, _encode(slack_body(alert)), json_headers))
    if pd and pd.routing_key and _wanted(alert, pd.min_level, pd.scopes):
        out.append(Delivery("pagerduty", pd.url, _encode(pagerduty_body(alert, pd)), json_headers))
    if hook and hook.url and _wanted(alert, hook.min_level, hook.scopes):
        out.append(Delivery("webhook", hook.url, _encode(alert_json(alert)), {**json_headers, **hook.headers}))
    return out
