"""The ``budgetguard`` command: check a config, look at a user's budget, run a demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

from . import __version__
from .config import Config, load_config
from .errors import BudgetGuardError
from .guard import BudgetGuard
from .pricing import Pricebook
from .tokens import count_text_tokens
from .usage import Usage
from .windows import WINDOWS

DEFAULT_CONFIG = "limits.yaml"
DEMO_RUNAWAY_CALLS = 500


def _usd(value: Decimal | None) -> str:
    if value is None:
        return "no cap"
    return f"${value.quantize(Decimal('0.0001'))}"


def summarize(config: Config) -> str:
    """One screen describing what a config enforces."""
    url = config.redis_url or os.environ.get("REDIS_URL") or "memory://"
    lines = [
        f"store      {url}  (timeout {config.redis_timeout_ms} ms, fail_mode {config.fail_mode})",
        f"windows    calendar hour/day/month in {config.timezone}; reservations lapse after "
        f"{config.reservation_ttl_s} s",
        f"unknown    models without a price: {config.unknown_model}",
    ]
    prices = Pricebook(config.models)
    for name in sorted(config.models):
        p = prices.resolve(name)
        assert p is not None  # validated at load
        lines.append(f"model      {name}: in ${p.snapshot()['input_per_mtok']}/MTok, "
                     f"out ${p.snapshot()['output_per_mtok']}/MTok ({p.source})")
    tiers = dict(config.tiers)
    if config.default_tier not in tiers:
        lines.append(f"tier       {config.default_tier} (default, implicit): no caps")
    for name, tier in tiers.items():
        mark = " (default)" if name == config.default_tier else ""
        caps = ", ".join(f"{w} {_usd(getattr(tier, f'{w}_usd'))}" for w in ("hourly", "daily", "monthly"))
        lines.append(f"tier       {name}{mark}: {caps}")
        pr = tier.per_request
        if pr:
            lines.append(f"             per request: input <= {pr.max_input_tokens or '-'} tok, output <= "
                         f"{pr.max_output_tokens or '-'} tok, cost <= {_usd(pr.max_cost_usd)}")
        if tier.models is not None:
            lines.append(f"             models: {', '.join(tier.models)}")
        if tier.downgrade and tier.downgrade.routes:
            routes = ", ".join(f"{a} -> {b}" for a, b in tier.downgrade.routes.items())
            lines.append(f"             at {tier.downgrade.at:.0%} of a cap route {routes}")
    for name, user in config.users.items():
        overrides = sorted(user.model_fields_set - {"tier"})
        extra = f", overrides {', '.join(overrides)}" if overrides else ""
        lines.append(f"user       {name}: tier {user.tier or config.default_tier}{extra}")
    org = config.org
    lines.append(f"org        daily {_usd(org.daily_usd)}, monthly {_usd(org.monthly_usd)}"
                 + (f", alerts at {', '.join(f'{a:.0%}' for a in org.alert_at)}" if org.alert_at else ""))
    if org.downgrade and org.downgrade.routes:
        routes = ", ".join(f"{a} -> {b}" for a, b in org.downgrade.routes.items())
        lines.append(f"             at {org.downgrade.at:.0%} of a cap route {routes}")
    sinks = [(n, s) for n, s in (("slack", config.alerts.slack), ("pagerduty", config.alerts.pagerduty),
                                 ("webhook", config.alerts.webhook)) if s is not None]
    for name, sink in sinks:
        target = {"slack": "webhook_url", "pagerduty": "routing_key", "webhook": "url"}[name]
        lines.append(f"alerts     {name}: {'configured' if getattr(sink, target) else f'off ({target} is empty)'}")
    return "\n".join(lines)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: OK")
    print(summarize(config))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    guard = BudgetGuard.from_yaml(args.config)
    try:
        st = guard.status(args.user)
    finally:
        guard.close()
    print(f"{st.user} (tier {st.tier})")
    for spec in WINDOWS:
        w = st.windows[spec.name]
        print(f"  {spec.name:<13} spent {_usd(w.spent_usd):>10}  reserved {_usd(w.reserved_usd):>10}  "
              f"limit {_usd(w.limit_usd):>10}  resets {w.resets_at:%Y-%m-%d %H:%M %Z}")
    return 0


def _document(model: str, tokens: int) -> list[dict[str, str]]:
    """A one-message chat of about ``tokens`` input tokens, as the active tokenizer counts them."""
    unit = "budget enforcement "
    per_unit = count_text_tokens(model, unit * 100) / 100
    return [{"role": "user", "content": unit * max(1, int(tokens / per_unit))}]


def cmd_demo(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    guard = BudgetGuard(config, redis_url=args.redis_url or "memory://demo")
    print(f"budgetguard demo: {args.config}, store {args.redis_url or 'memory:// (embedded)'}")
    print(f"{'user':<6} {'asked':<12} {'outcome':<8} {'model':<12} {'reserved':>9} {'charged':>9}  reason")

    def call(user: str, model: str, input_tokens: int, max_tokens: int, quiet: bool = False) -> bool:
        d = guard.check(user, model, _document(model, input_tokens), max_tokens=max_tokens, tags={"feature": "demo"})
        charged = Decimal(0)
        if d.allowed:
            # The simulated LLM answers with 3/4 of max_tokens; we settle with the usage it reports.
            before = guard.status(user).windows["user.hourly"].spent_usd
            guard.record(d, Usage(input_tokens=d.estimated_input_tokens, output_tokens=max_tokens * 3 // 4))
            charged = guard.status(user).windows["user.hourly"].spent_usd - before
        if not quiet or not d.allowed:
            outcome = "routed" if d.downgraded else "allowed" if d.allowed else "denied"
            print(f"{user:<6} {model:<12} {outcome:<8} {d.model:<12} {d.estimated_cost_usd:>9.4f} "
                  f"{charged:>9.4f}  {d.reason}")
        return d.allowed

    for _ in range(10):  # pro tier: gpt-4o routes to gpt-4o-mini at 80% of the $2 hourly cap
        call("alice", "gpt-4o", 60_000, 4_000)
    call("alice", "gpt-4o", 1_000, 8_000)  # over the per-request output cap
    call("carol", "gpt-4o", 500, 200)  # free tier: gpt-4o is not on its allow-list
    runaway = 0
    while runaway < DEMO_RUNAWAY_CALLS and call("carol", "gpt-4o-mini", 7_000, 1_000, quiet=True):
        runaway += 1  # a runaway loop, stopped by the hourly cap when the config has one
    print(f"carol  (the {runaway} allowed gpt-4o-mini calls of her runaway loop are not listed)")
    print()
    for user in ("alice", "carol"):
        w = guard.status(user).windows["user.hourly"]
        print(f"{user}: spent {_usd(w.spent_usd)} of {_usd(w.limit_usd)} this hour, reserved {_usd(w.reserved_usd)}")
    guard.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="budgetguard", description="Budget enforcement for LLM calls.")
    parser.add_argument("--version", action="version", version=f"budgetguard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log budgetguard's decisions")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate limits.yaml and summarise what it enforces")
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, type=Path)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("status", help="spent / reserved / limit of a user's windows and the org's")
    p.add_argument("user")
    p.add_argument("--config", default=DEFAULT_CONFIG, type=Path)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="run a small simulated workload on the embedded store")
    p.add_argument("--config", default=DEFAULT_CONFIG, type=Path)
    p.add_argument("--redis-url", default=None, help="run against this Redis instead of memory://")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # a failing store becomes the one-line error below
        logging.getLogger("budgetguard.store").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args))
    except BudgetGuardError as exc:
        print(f"budgetguard: {exc}", file=sys.stderr)
        return 2
