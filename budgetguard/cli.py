"""The ``budgetguard`` command: check a config, show budgets, report on and follow the usage log, run a demo,
run the budget proxy."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import math
import os
import secrets
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .errors import BudgetGuardError
from .proxy_defaults import (
    DEFAULT_BODY_IDLE_TIMEOUT,
    DEFAULT_BODY_TOTAL_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEP_ALIVE_TIMEOUT,
)
from .report import FORMATS, GROUP_BY, ReportError, check_grouping, format_usd, parse_duration

# Everything heavier (pydantic, redis, httpx, uvicorn) is imported by the command that
# needs it: `budgetguard --help` and usage errors stay fast, and the proxy's extra is
# needed only by `budgetguard proxy`.
if TYPE_CHECKING:
    import redis

    from .config import Config
    from .decision import CountStatus, WindowStatus
    from .guard import BudgetGuard

DEFAULT_CONFIG = "limits.yaml"
DEMO_RUNAWAY_CALLS = 500


def _usd(value: Decimal | None) -> str:
    if value is None:
        return "no cap"
    return f"${value.quantize(Decimal('0.0001'))}"


def _limits(fields: Any) -> str:
    """A budget's window limits in one line: "daily $50.0000, rpm 600"."""
    from .limits import KINDS

    parts = []
    for kind in KINDS:
        value = getattr(fields, kind.field, None)
        if value is not None:
            parts.append(f"{kind.name} {_usd(value) if kind.money else f'{value:,}'}")
    return ", ".join(parts) or "no window limits"


def summarize(config: Config) -> str:
    """One screen describing what a config enforces."""
    from .pricing import Pricebook
    from .redact import redact_url

    url = config.redis_url or os.environ.get("REDIS_URL") or "memory://"
    lines = [
        f"store      {redact_url(url)}  (timeout {config.redis_timeout_ms} ms, fail_mode {config.fail_mode})",
        f"windows    calendar hour/day/month in {config.timezone}; reservations lapse after "
        f"{config.reservation_ttl_s} s",
        f"unknown    models without a price: {config.unknown_model}",
    ]
    prices = Pricebook(config.models)
    # The models the config names, priced as a call would be: limits.yaml's overrides, else
    # the pricing library (genai-prices), whose source each line shows.
    for name in sorted(config.named_models()):
        p = prices.resolve(name)
        if p is None:
            fate = "denied" if config.unknown_model == "deny" else f"priced as {config.unknown_model}"
            lines.append(f"model      {name}: no price (calls are {fate})")
            continue
        lines.append(f"model      {name}: in ${p.snapshot()['input_per_mtok']}/MTok, "
                     f"out ${p.snapshot()['output_per_mtok']}/MTok ({p.source})")
    lines.append("             other models: the pricing library's price, else unknown_model "
                 f"({config.unknown_model})")
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
    for name, budget in config.budgets.items():
        scope = f"per {budget.per}" if budget.per else "shared"
        when = "; ".join(f"when {k} in {v if isinstance(v, str) else ', '.join(v)}" for k, v in budget.when.items())
        lines.append(f"budget     {name}: {scope}" + (f", {when}" if when else "")
                     + ("" if budget.plans else f": {_limits(budget)}"))
        for plan_name, plan in budget.plans.items():
            mark = " (default)" if plan_name == budget.default_plan else ""
            lines.append(f"             plan {plan_name}{mark}: {_limits(plan)}")
        if budget.values:
            lines.append(f"             {len(budget.values)} values listed")
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
    px = config.proxy
    if config.api_keys or px.model_fields_set:
        lines.append(f"proxy      upstream {px.upstream or '(from --upstream)'}, anthropic "
                     f"{px.anthropic_upstream or 'same'}; {len(config.api_keys)} api keys, user header "
                     f"{px.user_header or 'off'}, upstream keys "
                     f"{'set' if px.upstream_api_key or px.anthropic_api_key else 'callers own (pass-through)'}, "
                     f"passthrough {px.passthrough}")
    return "\n".join(lines)


def cmd_check_config(args: argparse.Namespace) -> int:
    from .config import load_config

    if args.config is not None and args.config_flag is not None and args.config != args.config_flag:
        raise BudgetGuardError(f"two configs given ({args.config} and --config {args.config_flag}): give one")
    path = args.config_flag or args.config or Path(DEFAULT_CONFIG)
    config = load_config(path)
    print(f"{path}: OK")
    print(summarize(config))
    return 0


BAR_WIDTH = 30


def bar(window: WindowStatus | CountStatus, width: int = BAR_WIDTH) -> str:
    """``[###++.....]  17%``: ``#`` spent, ``+`` reserved, ``.`` headroom; blank without a cap."""
    from .decision import CountStatus  # late: `budgetguard --help` need not load it

    limit: Decimal | int | None
    if isinstance(window, CountStatus):
        spent, reserved, limit = Decimal(window.used), Decimal(window.reserved), window.limit
    else:
        spent, reserved, limit = window.spent_usd, window.reserved_usd, window.limit_usd
    if not limit:
        return " " * (width + 8)
    used = spent + reserved
    spent_cells = min(width, int(spent * width / limit))
    used_cells = min(width, int(used * width / limit))
    cells = "#" * spent_cells + "+" * (used_cells - spent_cells) + "." * (width - used_cells)
    return f"[{cells}] {used / limit:>5.0%}"


def _amount(value: Decimal | None) -> str:
    """Exact to the nano-USD the counters keep, so a sub-cent spend does not show as $0.0000."""
    return "no cap" if value is None else format_usd(value)


def _window_line(name: str, w: WindowStatus | CountStatus) -> str:
    from .decision import CountStatus

    resets = "never" if w.resets_at is None else f"{w.resets_at:%Y-%m-%d %H:%M %Z}"
    if isinstance(w, CountStatus):
        limit = "no cap" if w.limit is None else f"{w.limit:,}"
        return (f"  {name:<18} used  {w.used:>12,}  reserved {w.reserved:>12,}  limit {limit:>10}  {bar(w)}  "
                f"{'resets ' + resets if w.resets_at else 'calls in flight' if w.unit == 'requests' else ''}"
                f"  ({w.unit})")
    return (f"  {name:<18} spent {_amount(w.spent_usd):>12}  reserved {_amount(w.reserved_usd):>12}  "
            f"limit {_amount(w.limit_usd):>10}  {bar(w)}  resets {resets}")


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BudgetGuardError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _hourly(guard: BudgetGuard, user: str) -> WindowStatus:
    from .decision import WindowStatus

    w = guard.status(user).windows["user.hourly"]
    assert isinstance(w, WindowStatus)  # a money window, never a count
    return w


def cmd_status(args: argparse.Namespace) -> int:
    from .config import load_config
    from .guard import BudgetGuard
    from .redact import redact_url
    from .store import is_memory

    path = _config_path(args, required=True)
    assert path is not None  # required
    config = load_config(path)
    tags, plans = _pairs(args.tag, "--tag"), _pairs(args.plan, "--plan")
    url = config.redis_url or os.environ.get("REDIS_URL") or "memory://"
    if is_memory(url):
        # This process's embedded store is new and empty: zeros would look like an answer.
        raise BudgetGuardError(f"the store is {redact_url(url)} (embedded, per process), so this command would "
                               "see only its own empty store, not the spend of the process that holds it: set "
                               "REDIS_URL or redis_url to a Redis")
    guard = BudgetGuard(config)
    try:
        if args.budget is not None:
            one = guard.budget_status(args.budget, args.value, plan=plans.get(args.budget))
            scopes: tuple[tuple[str, str | None, str | None], ...] = ((one.budget, one.value, one.plan),)
            windows = one.windows
        elif args.user is None:
            org = guard.budget_status("org")
            scopes, windows = (("org", None, None),), org.windows
        else:
            st = guard.status(args.user, tags=tags, plans=plans or None)
            scopes, windows = st.scopes, st.windows
    finally:
        guard.close()
    for budget, value, plan in scopes:
        # The user by name (as before budgets), other budgets with their value: "tenant acme".
        head = value if budget == "user" and value is not None else budget if value is None else f"{budget} {value}"
        print(head + (f" ({'tier' if budget == 'user' else 'plan'} {plan})" if plan else ""))
        for name, w in windows.items():
            if name.startswith(budget + "."):
                print(_window_line(name, w))
    return 0


# -- the usage log -------------------------------------------------------------------------


def _config_path(args: argparse.Namespace, *, required: bool) -> Path | None:
    """``--config``, else ./limits.yaml; None when that is absent and not ``required``."""
    if args.config is not None:
        return Path(args.config)
    default = Path(DEFAULT_CONFIG)
    return default if required or default.exists() else None


def _load(args: argparse.Namespace) -> Config:
    from .config import load_config, parse_config

    path = _config_path(args, required=False)
    return load_config(path) if path is not None else parse_config({})


def _stream_client(config: Config) -> redis.Redis:
    import redis

    from .eventlog import EventLogError
    from .redact import redact_url
    from .store import is_memory

    url = config.redis_url or os.environ.get("REDIS_URL") or "memory://"
    if is_memory(url):
        raise EventLogError(f"the store is {redact_url(url)} (embedded in one process), so there is no usage "
                            "stream to read: set REDIS_URL or redis_url, or read a JSON Lines file with --file")
    try:
        # Reads of a long stream and blocking XREADs outlast the guard's per-call deadline.
        return redis.Redis.from_url(url, socket_timeout=60, socket_connect_timeout=5)
    except ValueError as exc:
        raise EventLogError(f"redis_url: {exc}") from None


def _log_file(args: argparse.Namespace, config: Config) -> Path | None:
    """The JSON Lines file to read: ``--file``, else the config's when it keeps no stream; None: the stream."""
    from .eventlog import EventLogError

    if args.file is not None:
        return Path(args.file)
    if config.events.stream_maxlen == 0:
        if config.events.jsonl_path:
            return Path(config.events.jsonl_path)
        raise EventLogError("events.stream_maxlen is 0 and events.jsonl_path is unset: there is no usage log "
                            "to read (use --file)")
    return None


def _instant(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ReportError(f"bad --until {text!r}: use an ISO-8601 time such as 2026-03-14T15:00Z") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def cmd_report(args: argparse.Namespace) -> int:
    from .eventlog import read_jsonl, read_stream, stream_key
    from .report import build_report, render

    span = parse_duration(args.since)
    # Rounded up to the second: readable, and the last moment's events stay inside the range.
    until = _instant(args.until) if args.until else datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    if args.top < 0:
        raise ReportError("--top must be 0 or more")
    check_grouping(args.by)
    config = _load(args)
    since = until - span
    if args.db is not None or args.format in ("efficiency", "weekly"):
        from .ledger.command import db_report

        sys.stdout.write(db_report(args, since, until, config))
        return 0
    path = _log_file(args, config)
    if path is not None:
        loaded = read_jsonl(path, since, until)
    else:
        client = _stream_client(config)
        try:
            loaded = read_stream(client, stream_key(config), since, until)
        finally:
            client.close()
    report = build_report(loaded.events, by=args.by, top=args.top, since=since, until=until,
                          skipped=loaded.skipped, source=loaded.source)
    sys.stdout.write(render(report, args.format))
    return 0


def cmd_ship(args: argparse.Namespace) -> int:
    from .ledger.command import cmd_ship as ship

    config = _load(args)
    client = _stream_client(config)
    try:
        return ship(args, config, client)
    finally:
        client.close()


def cmd_tail(args: argparse.Namespace) -> int:
    from .eventlog import follow_jsonl, follow_stream, stream_key
    from .report import event_line

    if args.lines < 0 or (args.count is not None and args.count <= 0) or (args.timeout is not None
                                                                          and args.timeout <= 0):
        raise ReportError("--lines must be 0 or more, --count and --timeout above 0")
    config = _load(args)
    client = None
    events: Iterator[dict[str, Any] | None]
    path = _log_file(args, config)
    if path is not None:
        events = follow_jsonl(path, backlog=args.lines, idle_timeout=args.timeout)
    else:
        client = _stream_client(config)
        events = follow_stream(client, stream_key(config), backlog=args.lines, idle_timeout=args.timeout)
    shown = 0
    try:
        for event in events:
            if event is None:
                print("budgetguard: skipped an entry that is not a JSON object", file=sys.stderr, flush=True)
                continue
            line = json.dumps(event, ensure_ascii=False, separators=(",", ":")) if args.json else event_line(event)
            print(line, flush=True)
            shown += 1
            if args.count is not None and shown >= args.count:
                break
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a live tail ends
    finally:
        if client is not None:
            client.close()
    return 0


def _document(model: str, tokens: int) -> list[dict[str, str]]:
    """A one-message chat of about ``tokens`` input tokens, as the active tokenizer counts them."""
    from .tokens import count_text_tokens

    unit = "budget enforcement "
    per_unit = count_text_tokens(model, unit * 100) / 100
    return [{"role": "user", "content": unit * max(1, int(tokens / per_unit))}]


DEMO_KEY_PREFIX = "bg-demo"  # the demo's keys on a real Redis, apart from the budgets under key_prefix


def _sample_text() -> str:
    """The commented limits.yaml shipped in the package (what `init` writes, what `demo` runs on)."""
    from importlib import resources

    return resources.files(__package__).joinpath("sample_limits.yaml").read_text(encoding="utf-8")


def _demo_config(args: argparse.Namespace) -> tuple[Config, str]:
    """The demo's config and where it came from: --config, ./limits.yaml, else the shipped sample."""
    import yaml

    from .config import load_config, parse_config

    path = _config_path(args, required=False)
    if path is not None:
        return load_config(path), str(path)
    return parse_config(yaml.safe_load(_sample_text())), "the sample limits.yaml (no ./limits.yaml here)"


def _clear_prefix(client: Any, prefix: str) -> int:
    """Delete the keys under ``prefix:`` (the demo's own) so that each run starts from zero."""
    removed = 0
    for key in client.scan_iter(match=f"{prefix}:*", count=500):
        removed += int(client.delete(key))  # one key per call: on a cluster keys of many slots
    return removed


def cmd_demo(args: argparse.Namespace) -> int:
    from .guard import BudgetGuard
    from .redact import redact_url
    from .store import connect, is_memory
    from .usage import Usage

    config, source = _demo_config(args)
    url = args.redis_url or config.redis_url or os.environ.get("REDIS_URL") or "memory://"
    if is_memory(url):
        url, store = "memory://demo", "memory:// (embedded, this process only)"
    else:
        # A real Redis may hold real budgets of users named alice and carol: the demo keeps
        # to a prefix of its own, cleared at start, and never touches key_prefix's keys.
        # A demo is not latency-bound: a slow shared Redis should slow it, not fail it.
        config = config.model_copy(update={"key_prefix": DEMO_KEY_PREFIX,
                                           "redis_timeout_ms": max(config.redis_timeout_ms, 5000)})
        client = connect(config, url)
        try:
            _clear_prefix(client, DEMO_KEY_PREFIX)
        finally:
            client.close()
        store = f"{redact_url(url)}, keys under {DEMO_KEY_PREFIX}: only (cleared first; real budgets untouched)"
    # Token counts are loaded before the table, so that a warning about them does not split it.
    from .tokens import load_problems

    load_problems([("gpt-4o", None), ("gpt-4o-mini", None)])
    guard = BudgetGuard(config, redis_url=url)
    print(f"budgetguard demo: {source}, store {store}")
    print(f"{'user':<6} {'asked':<12} {'outcome':<8} {'model':<12} {'reserved':>9} {'charged':>9}  reason")

    def call(user: str, model: str, input_tokens: int, max_tokens: int, quiet: bool = False) -> bool:
        d = guard.check(user, model, _document(model, input_tokens), max_tokens=max_tokens, tags={"feature": "demo"})
        if d.allowed:
            # The simulated LLM answers with 3/4 of max_tokens; we settle with the usage it reports.
            before = _hourly(guard, user).spent_usd
            guard.record(d, Usage(input_tokens=d.estimated_input_tokens, output_tokens=max_tokens * 3 // 4))
            charged = _hourly(guard, user).spent_usd - before
            reserved, spent = f"{d.estimated_cost_usd:>9.4f}", f"{charged:>9.4f}"
        else:
            reserved, spent = f"{'-':>9}", f"{'-':>9}"  # a denial reserves and charges nothing
        if not quiet or not d.allowed:
            outcome = "routed" if d.downgraded else "allowed" if d.allowed else "denied"
            print(f"{user:<6} {model:<12} {outcome:<8} {d.model:<12} {reserved} {spent}  {d.reason}")
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
        w = _hourly(guard, user)
        print(f"{user}: spent {_amount(w.spent_usd)} of {_amount(w.limit_usd)} this hour, "
              f"reserved {_amount(w.reserved_usd)}")
    guard.close()
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    path: Path = args.path
    if path.exists() and not args.force:
        raise BudgetGuardError(f"{path} exists; not overwritten (use --force to replace it)")
    try:
        path.write_text(_sample_text(), encoding="utf-8")
    except OSError as exc:
        raise BudgetGuardError(f"cannot write {path}: {exc.strerror or exc}") from None
    print(f"wrote {path}: edit its tiers and users, then run `budgetguard check-config --config {path}` "
          "and `budgetguard doctor`")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check what a first run needs; print each finding with its fix; exit 1 if any is a problem."""
    problems = 0

    def report(ok: bool, what: str, fix: str = "") -> None:
        nonlocal problems
        problems += not ok
        print(f"{'ok     ' if ok else 'PROBLEM'}  {what}" + (f"\n         fix: {fix}" if fix and not ok else ""))

    from .config import load_config
    from .errors import ConfigError

    path = _config_path(args, required=True)
    assert path is not None
    try:
        config = load_config(path)
    except ConfigError as exc:
        report(False, f"config: {exc}", f"edit {path}, or write a new one with `budgetguard init`")
        return 1
    report(True, f"config: {path} is valid")

    import redis

    from .redact import redact_url
    from .store import connect, is_memory

    url = config.redis_url or os.environ.get("REDIS_URL") or "memory://"
    if is_memory(url):
        report(True, f"store: {redact_url(url)} is embedded: budgets live in one process and vanish with it; "
                     "set REDIS_URL or redis_url to share them")
    else:
        try:
            client = connect(config, url)
            try:
                client.ping()
            finally:
                client.close()
            report(True, f"store: {redact_url(url)} answers")
        except (redis.RedisError, BudgetGuardError, ValueError) as exc:
            report(False, f"store: {redact_url(url)} does not answer ({type(exc).__name__})",
                   f"start Redis there, or point REDIS_URL / redis_url at one (fail_mode {config.fail_mode} "
                   f"{'lets calls through unenforced' if config.fail_mode == 'open' else 'refuses calls'} meanwhile)")

    from .tokens import _clear_caches, bundled_encodings, load_problems

    wanted = [(name, m.tokenizer) for name, m in config.models.items()]
    wanted += [(name, None) for name in sorted(config.named_models()) if name not in config.models]
    wanted += [("gpt-4o", None), ("gpt-4", None)]
    missing = load_problems(wanted)
    if missing and args.fetch_encodings:
        import tiktoken

        for name in missing:
            try:
                tiktoken.get_encoding(name)  # downloads into TIKTOKEN_CACHE_DIR (or tiktoken's temp cache)
            except Exception as exc:
                print(f"         could not fetch {name} ({type(exc).__name__})")
        _clear_caches()
        missing = load_problems(wanted)
    if missing:
        report(False, f"encodings: {', '.join(missing)} cannot be loaded: estimates count UTF-8 bytes, several "
                      "times too many, and input caps may refuse prompts that fit",
               "run `budgetguard doctor --fetch-encodings` with TIKTOKEN_CACHE_DIR set, where the network "
               "reaches tiktoken's downloads, and keep TIKTOKEN_CACHE_DIR set when running")
    else:
        report(True, f"encodings: {', '.join(sorted(bundled_encodings()))} shipped; every configured model's loads")

    from .pricing import Pricebook

    prices = Pricebook(config.models)
    unpriced = sorted(n for n in config.named_models() if prices.resolve(n) is None)
    if unpriced and config.unknown_model != "deny":
        report(True, f"prices: {', '.join(unpriced)} have no price of their own and are charged as "
                     f"unknown_model ({config.unknown_model})")
    elif unpriced:
        report(False, f"prices: no price for {', '.join(unpriced)}, so their calls are denied",
               "add input_per_mtok and output_per_mtok under models: in limits.yaml")
    else:
        report(True, "prices: every model the config names has a price (`budgetguard check-config` lists them)")

    sinks = [("slack", config.alerts.slack, "webhook_url"), ("pagerduty", config.alerts.pagerduty, "routing_key"),
             ("webhook", config.alerts.webhook, "url")]
    configured = [(n, sink, f) for n, sink, f in sinks if sink is not None]
    for name, sink, field in configured:
        if getattr(sink, field):
            report(True, f"alerts: {name} configured (scopes {', '.join(sink.scopes)})")
        else:
            report(False, f"alerts: {name} is listed but its {field} is empty, so its alerts are dropped",
                   f"set alerts.{name}.{field} (or the variable it names), or remove alerts.{name}")
    if not configured:
        report(True, "alerts: no sinks configured (threshold crossings are only logged)")

    if config.events.stream_maxlen == 0 and not config.events.jsonl_path:
        report(False, "usage log: events.stream_maxlen is 0 and events.jsonl_path is unset, so `report` and "
                      "`tail` have nothing to read", "set events.jsonl_path or a stream_maxlen above 0")
    print(f"{problems} problem(s)" if problems else "all good")
    return 1 if problems else 0


# -- the proxy -----------------------------------------------------------------------------


def _flag_url(flag: str, value: str | None) -> str | None:
    from .config import upstream_url

    if value is None:
        return None
    try:
        return upstream_url(value)
    except ValueError as exc:
        raise BudgetGuardError(f"{flag}: {exc}") from None  # the URL itself may carry a token


def _seconds(flag: str, value: float) -> float:
    # float() also parses "nan" and "inf", which would disable a deadline without saying so.
    if not math.isfinite(value) or value <= 0:
        raise BudgetGuardError(f"{flag} {value:g}: must be a number of seconds above 0")
    return value


def cmd_proxy(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .proxy import proxy_app
        from .serving import ReadTimeouts, ServingConfig, raise_open_file_limit
    except ImportError as exc:
        raise BudgetGuardError(f"the proxy needs the [proxy] extra ({exc.name} is missing): "
                               "pip install 'budgetguard-redis[proxy]'") from None
    from .config import load_config
    from .guard import BudgetGuard
    from .redact import redact_url
    from .store import is_memory

    # Flags first: a bad flag is reported before the config file is read.
    upstream = _flag_url("--upstream", args.upstream)
    anthropic_upstream = _flag_url("--anthropic-upstream", args.anthropic_upstream)
    if not 0 < args.port < 65536:
        raise BudgetGuardError(f"--port {args.port}: must be between 1 and 65535")
    timeouts = ReadTimeouts(header=_seconds("--header-timeout", args.header_timeout),
                            body_idle=_seconds("--body-timeout", args.body_timeout),
                            body_total=_seconds("--body-deadline", args.body_deadline))
    if timeouts.body_total < timeouts.body_idle:
        raise BudgetGuardError(f"--body-deadline {timeouts.body_total:g}: must not be shorter than "
                               f"--body-timeout ({timeouts.body_idle:g})")
    keep_alive = _seconds("--keep-alive-timeout", args.keep_alive_timeout)
    path = _config_path(args, required=True)
    assert path is not None  # required
    config = load_config(path)
    url = config.redis_url or os.environ.get("REDIS_URL") or "memory://"
    guard = BudgetGuard(config)
    try:
        app = proxy_app(guard, upstream=upstream, anthropic_upstream=anthropic_upstream, close_guard=True)
    except BudgetGuardError:
        guard.close()
        raise
    target = upstream or config.proxy.upstream
    generated = sum(key.generated for key in config.api_keys)
    if generated and not config.proxy.upstream_api_key:
        # Pass-through would hand the provider a bg- key, which it rejects with 401 on every call.
        print(f"budgetguard: warning: {generated} of the api_keys are generated budgetguard keys (bg-...) but "
              "proxy.upstream_api_key is unset, so they would be sent upstream and rejected: set "
              "upstream_api_key: ${OPENAI_API_KEY} (and anthropic_api_key) under proxy:", file=sys.stderr, flush=True)
    # Encodings load now, so that a missing one is reported at start, not at the first request.
    from .tokens import load_problems

    load_problems([(name, m.tokenizer) for name, m in config.models.items()] + [("gpt-4o", None), ("gpt-4", None)])
    banner = (f"budgetguard proxy on http://{args.host}:{args.port} -> {redact_url(target) if target else '-'} "
              f"(budget store {'memory:// (embedded, this process only)' if is_memory(url) else 'Redis'}, "
              f"{len(config.api_keys)} api keys)")

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # listening: a busy port fails before any banner claims the proxy is up
                print(banner, file=sys.stderr, flush=True)
    # Each connection holds a file descriptor: at the usual soft limit of 1,024 a thousand slow
    # clients would stall accept() for everyone.
    raise_open_file_limit()
    _reload_on_sighup(guard, path)
    # No limit_concurrency: uvicorn counts every open connection against it, slow ones
    # included, so it would turn a slow-client flood into 503s for every caller; the read
    # deadlines bound how long such connections last instead. The listen backlog stays
    # uvicorn's (2048).
    server = _Server(ServingConfig(
        app, timeouts=timeouts, timeout_keep_alive=keep_alive, host=args.host, port=args.port, lifespan="on",
        log_config=None, access_log=not args.no_access_log, server_header=False, date_header=False,
        timeout_graceful_shutdown=args.shutdown_timeout))
    try:
        server.run()
    except SystemExit:
        # uvicorn logs why it could not listen (address in use, no permission), then exits.
        if server.started:
            raise
        raise BudgetGuardError(f"cannot listen on {args.host}:{args.port} (see the error above)") from None
    return 0


def _reload_on_sighup(guard: BudgetGuard, path: Path) -> None:
    """SIGHUP: read limits.yaml again and swap its limits in (``guard.reload``). A file that
    does not load is reported with the field's path and the running limits are kept. The
    proxy's own settings (``api_keys``, ``proxy:``) are read at start only."""
    import signal

    from .config import load_config
    from .errors import ConfigError

    if not hasattr(signal, "SIGHUP"):  # not on Windows
        return
    started = guard.config

    def reload(signum: int, frame: Any) -> None:
        try:
            config = load_config(path)
            guard.reload(config)
        except ConfigError as exc:
            print(f"budgetguard: limits not reloaded, the running ones are kept: {exc}", file=sys.stderr, flush=True)
            return
        later = [name for name in ("api_keys", "proxy") if getattr(config, name) != getattr(started, name)]
        note = f" ({' and '.join(later)} changed: they apply at the next start)" if later else ""
        print(f"budgetguard: limits reloaded from {path}{note}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGHUP, reload)


def _read_key(args: argparse.Namespace) -> str:
    if args.key is not None:
        return str(args.key)
    if sys.stdin.isatty():
        return getpass.getpass("API key (not echoed): ")
    return sys.stdin.readline()


def cmd_hash_key(args: argparse.Namespace) -> int:
    import yaml

    try:
        from .proxy import fingerprint, hash_key
    except ImportError as exc:
        raise BudgetGuardError(f"hash-key needs the [proxy] extra ({exc.name} is missing): "
                               "pip install 'budgetguard-redis[proxy]'") from None

    if args.generate:
        if args.key is not None:
            raise BudgetGuardError("--generate and --key exclude each other")
        key = "bg-" + secrets.token_urlsafe(32)
        print(f"# the new key (give it to its holder; it is not stored anywhere): {key}")
    else:
        key = _read_key(args).strip()
        if not key:
            raise BudgetGuardError("no key given: pipe it on stdin or pass --key")
    digest = hash_key(key)
    entry: dict[str, str | bool] = {"sha256": digest, "user": args.user}
    if args.name:
        entry["name"] = args.name
    if args.generate:
        entry["generated"] = True  # lets the proxy warn when no upstream key replaces it
    print(f"# api_keys entry (fingerprint {fingerprint(digest)}):")
    print(yaml.safe_dump([entry], default_flow_style=None, sort_keys=False, width=200).rstrip())
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit 2 (argparse would print the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="budgetguard", description="Budget enforcement for LLM calls.")
    parser.add_argument("--version", action="version", version=f"budgetguard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log budgetguard's decisions")
    sub = parser.add_subparsers(dest="command", required=True)
    config_help = f"limits.yaml to read (default ./{DEFAULT_CONFIG})"

    p = sub.add_parser("check-config", help="validate limits.yaml and summarise what it enforces")
    p.add_argument("config", nargs="?", default=None, type=Path, help=config_help)
    p.add_argument("--config", dest="config_flag", default=None, type=Path, help="the same, as every command takes it")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("status", help="spent / reserved / limit of every budget that applies, as bars",
                       description="Each window's spent, reserved, limit and reset time, with a bar "
                                   "(# spent, + reserved, . headroom), for every budget that applies to USER's "
                                   "calls with the --tag values. Without USER, the org's windows only; with "
                                   "--budget, that budget value's.")
    p.add_argument("user", nargs="?", default=None, help="a user id (omit for the org only)")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="a tag of the calls (repeatable)")
    p.add_argument("--plan", action="append", metavar="BUDGET=PLAN",
                   help="show the caps of this plan (repeatable; user=TIER for the tier)")
    p.add_argument("--budget", default=None, help="one budget's windows instead (with --value for its value)")
    p.add_argument("--value", default=None, help="the budget value (a tenant, a key...) with --budget")
    p.add_argument("--config", default=None, type=Path, help=config_help)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("report", help="spend, requests, tokens and estimate accuracy from the usage log",
                       description="Sum the usage events of a time range, from the Redis stream "
                                   "(REDIS_URL / redis_url) or a JSON Lines file.")
    p.add_argument("--since", default="24h", help="how far back from --until: 90m, 24h, 7d, 30d, 2w (default 24h)")
    p.add_argument("--until", default=None, help="end of the range, ISO-8601 (default now; naive means UTC)")
    p.add_argument("--by", default=None, metavar="DIMENSION",
                   help=f"group rows by {', '.join(GROUP_BY)} or any other tag (default: totals only)")
    p.add_argument("--format", choices=(*FORMATS, "efficiency", "weekly"), default="table",
                   help="output format (default table); efficiency and weekly read the ledger (--db)")
    p.add_argument("--file", default=None, type=Path,
                   help="read this JSON Lines usage log instead of the stream "
                        "(default: the stream, or events.jsonl_path when events.stream_maxlen is 0)")
    p.add_argument("--top", default=10, type=int, help="how many top spenders to list (default 10)")
    p.add_argument("--db", default=None, metavar="URL",
                   help="read the SQL ledger (sqlite:///path.db, postgresql://...) instead of the stream")
    p.add_argument("--table", default="usage_events", help="the ledger's table, with --db (default usage_events)")
    p.add_argument("--send", choices=("slack",), default=None,
                   help="also post the weekly summary to alerts.slack.webhook_url")
    p.add_argument("--config", default=None, type=Path, help=config_help)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("ship", help="ship the usage stream into a SQL ledger (SQLite or PostgreSQL)",
                       description="Read the usage stream through a Redis consumer group and write every event "
                                   "into a SQL table, exactly once. Needs the [ledger] extra.")
    p.add_argument("--config", default=None, type=Path, help=config_help)
    from .ledger.flags import add_ship_arguments

    add_ship_arguments(p)
    p.set_defaults(func=cmd_ship)

    p = sub.add_parser("tail", help="print usage events as they happen",
                       description="Print the last events of the usage log, then follow it (Ctrl-C stops).")
    p.add_argument("-n", "--lines", default=10, type=int, help="past events to print first (default 10)")
    p.add_argument("--count", default=None, type=int, help="stop after printing this many events")
    p.add_argument("--timeout", default=None, type=float, help="stop after this many seconds without an event")
    p.add_argument("--json", action="store_true", help="print each event as its JSON object")
    p.add_argument("--file", default=None, type=Path, help="follow this JSON Lines usage log instead of the stream")
    p.add_argument("--config", default=None, type=Path, help=config_help)
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("proxy", help="run the OpenAI/Anthropic-compatible budget proxy",
                       description="An HTTP proxy enforcing limits.yaml in front of an OpenAI- or "
                                   "Anthropic-compatible upstream. Callers use keys listed under api_keys.")
    p.add_argument("--config", default=None, type=Path, help=config_help)
    p.add_argument("--upstream", default=None, help="upstream base URL, e.g. https://api.openai.com "
                                                    "(default: proxy.upstream)")
    p.add_argument("--anthropic-upstream", default=None,
                   help="upstream of /v1/messages and Anthropic SDK calls, e.g. https://api.anthropic.com "
                        "(default: proxy.anthropic_upstream, else --upstream)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", default=8080, type=int, help="port to listen on (default 8080)")
    p.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    p.add_argument("--shutdown-timeout", default=30.0, type=float,
                   help="seconds open requests get to finish on SIGTERM/SIGINT (default 30)")
    p.add_argument("--header-timeout", default=DEFAULT_HEADER_TIMEOUT, type=float,
                   help="seconds a client has to send a request's headers, from connecting or from the "
                        f"request's first byte (default {DEFAULT_HEADER_TIMEOUT:g})")
    p.add_argument("--body-timeout", default=DEFAULT_BODY_IDLE_TIMEOUT, type=float,
                   help="seconds a request body may stall between two reads "
                        f"(default {DEFAULT_BODY_IDLE_TIMEOUT:g})")
    p.add_argument("--body-deadline", default=DEFAULT_BODY_TOTAL_TIMEOUT, type=float,
                   help="seconds a whole request body may take, after its headers "
                        f"(default {DEFAULT_BODY_TOTAL_TIMEOUT:g})")
    p.add_argument("--keep-alive-timeout", default=DEFAULT_KEEP_ALIVE_TIMEOUT, type=float,
                   help="seconds an idle connection is kept open between requests "
                        f"(default {DEFAULT_KEEP_ALIVE_TIMEOUT:g})")
    p.set_defaults(func=cmd_proxy, server=True)

    p = sub.add_parser("hash-key", help="print the api_keys entry of an API key (read from stdin)",
                       description="Print the api_keys entry (the key's SHA-256) for limits.yaml. The key is read "
                                   "from stdin (prompted for on a terminal); --key puts it in your shell history.")
    p.add_argument("--key", default=None, help="the key (prefer stdin)")
    p.add_argument("--user", default="CHANGE-ME", help="the user the key charges (default CHANGE-ME)")
    p.add_argument("--name", default=None, help="a label for the key, shown in the usage log")
    p.add_argument("--generate", action="store_true", help="make a new random key and print it with its entry")
    p.set_defaults(func=cmd_hash_key)

    p = sub.add_parser("demo", help="run a small simulated workload (embedded store unless REDIS_URL is set)",
                       description="Simulate calls of users alice and carol. On a real Redis (--redis-url, "
                                   "redis_url or REDIS_URL) the demo uses the key prefix "
                                   f"{DEMO_KEY_PREFIX}: (cleared at start), never your real budgets.")
    p.add_argument("--config", default=None, type=Path,
                   help=f"limits.yaml to read (default ./{DEFAULT_CONFIG}, else the shipped sample)")
    p.add_argument("--redis-url", default=None, help="run against this Redis (default: redis_url, REDIS_URL, "
                                                     "else memory://)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("init", help="write a commented limits.yaml to start from",
                       description="Write the sample limits.yaml (tiers, users, org caps, alerts), commented.")
    p.add_argument("path", nargs="?", default=Path(DEFAULT_CONFIG), type=Path,
                   help=f"where to write it (default ./{DEFAULT_CONFIG})")
    p.add_argument("--force", action="store_true", help="replace the file if it exists")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("doctor", help="check config, Redis, encodings, prices and alert sinks; say how to fix",
                       description="Check what a first run needs and print each problem with its fix. "
                                   "Exit code 1 when a problem was found.")
    p.add_argument("--config", default=None, type=Path, help=config_help)
    p.add_argument("--fetch-encodings", action="store_true",
                   help="download missing tiktoken encodings into TIKTOKEN_CACHE_DIR")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import redis
    server = getattr(args, "server", False)
    logging.basicConfig(level=logging.INFO if args.verbose or server else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if server
                        else "%(levelname)s %(name)s: %(message)s")
    if server and not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call otherwise
    if not args.verbose and not server:  # a failing store becomes the one-line error below
        # (a long-running server logs its outages instead)
        logging.getLogger("budgetguard.store").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args))
    except BudgetGuardError as exc:
        print(f"budgetguard: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(f"budgetguard: redis: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `budgetguard tail | head` closed the pipe: not an error of ours.
        sys.stderr.close()
        return 0
