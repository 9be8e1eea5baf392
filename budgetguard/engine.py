"""The budget engine without I/O: builds script calls and reads their replies.

``BudgetGuard`` (sync and async alike) asks the engine for a :class:`ScriptCall`, hands
it to a store to run, and gives the reply back to the engine to read. Everything that
decides (validation, per-request caps, pricing, routing candidates, reading Redis'
answer into a :class:`Decision`) lives here once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any

from .alerts.anomaly import Baseline
from .alerts.model import Alert
from .config import Config
from .decision import BudgetStatus, CountStatus, Decision, Status, Ticket, WindowStatus
from .details import CallDetails
from .errors import BudgetGuardError, InvalidArgument, InvalidArgumentType
from .events import Event, denial_event, stream_head, usage_event
from .keys import KeySpace
from .limits import Limits
from .notices import Notices
from .policy import Policies
from .pricing import ModelPrice, nano_to_usd, usd_to_nano
from .protocol import (
    DENIED,
    LOCAL,
    REPEAT,
    RESERVED,
    STALE,
    VOIDED,
    Log,
    Renew,
    Reserve,
    Reserved,
    ScriptCall,
    Settle,
    SettleReply,
    Slice,
    SliceReply,
    StatusReply,
    renumbered,
)
from .protocol import Status as StatusCall
from .redact import printable
from .runtime import Known, Runtime
from .scopes import Scope, Scopes, Window, member, need, plans_argument
from .slices import Item, OrgSlices, Refill
from .tokens import Tokenizer, estimate_input_tokens, tokenizer_for, uncountable_input
from .usage import Usage, check_token_count
from .windows import WindowClock, WindowSet, epoch_ms, windows_at

__all__ = ["MAX_OUTPUT_TOKENS_CEILING", "CheckPlan", "Engine", "ScriptCall", "SettlePlan", "Settled", "Steps"]

log = logging.getLogger("budgetguard")

# No model produces this many tokens in one call; a larger value is a bug upstream.
MAX_OUTPUT_TOKENS_CEILING = 10_000_000
_MAX_TAGS = 32
_MAX_REQUEST_ID = 256

# A candidate's route bits: 0 is the requested model; else the scopes whose routes lead to it.
_REQUESTED = 0
_DAY_MS = 86_400_000
# A void marker outlives the lease its reserve would take by this much (a reserve that runs
# later still would take a lease that has lapsed by then).
_VOID_MARGIN_MS = 60_000
# Long ids stay out of the per-user spend rankings' members (they are hashed instead).
_MAX_SPENDER = 200
# A check planned again this often on fresh runtime state meets operators changing the
# same budget faster than it can read it: it stops there.
_REPLANS = 8


# An operation as a sequence of script calls: each reply is sent back in, and the
# generator returns the result. A store raising into it lets it compensate first.
Steps = Generator[ScriptCall, Any, Any]


@dataclass(frozen=True, slots=True)
class Candidate:
    model: str
    price: ModelPrice
    input_tokens: int
    amount_nano: int
    route: int


@dataclass(frozen=True, slots=True)
class SettlePlan:
    calls: tuple[Settle, ...]  # one; on a cluster one per part, from the user's to the org's
    decision: Decision
    event: Event  # without "outcome" until the script's reply says whether the lease had lapsed
    state: str  # the settled state this call writes (its own resend finds it)
    outcome: str
    lapsed_outcome: str
    windows: tuple[Window, ...]  # the windows charged
    scopes: tuple[Scope, ...]
    now: datetime
    cost: int | None = None  # None: a release
    ranks: tuple[str, str] = ("", "")  # the spender and feature in the org's rankings
    own: tuple[Settle, ...] = ()  # a repeat's own parts: given back if the original settled


@dataclass(frozen=True, slots=True)
class Settled:
    """A settle's reply, read: did this call apply it, what did it cross, its event."""

    applied: bool
    alerts: list[Alert]
    event: Event | None  # None when an earlier settle had applied


@dataclass(slots=True)
class CheckPlan:
    """A check in flight: either decided locally (``decision``) or waiting on ``call``."""

    user: str
    requested: str
    policy: Limits  # the user's
    tags: Mapping[str, str]
    max_output_tokens: int
    rid: str
    now: datetime
    windows: WindowSet
    scopes: tuple[Scope, ...]
    wins: tuple[Window, ...] = ()  # every scope's windows, in order
    ranges: tuple[tuple[int, int], ...] = ()  # per scope: (its first window, how many)
    specs: tuple[tuple[str | int, ...], ...] = ()  # per window: its reserve arguments
    candidates: list[Candidate] = field(default_factory=list)
    dropped_for_cost: bool = False
    call: ScriptCall | None = None  # the first (on a single Redis, the only) reserve call
    decision: Decision | None = None
    # Per scope: the (candidate, amount) it holds. On a cluster a part reserved before a
    # later part routed to a cheaper model holds more than that one.
    choices: dict[int, tuple[int, int]] = field(default_factory=dict)
    held: list[int] = field(default_factory=list)  # on a cluster: the scopes this call reserved
    own: set[int] = field(default_factory=set)  # a repeat's scopes reserved afresh by this call
    stored: dict[int, str] = field(default_factory=dict)  # a repeat's lease members, as the original took them
    org_local: bool = False  # the org's part came from this process's slice
    # Names this attempt's void marker: a caller that gave up on the reply voids the reserve.
    attempt: str = field(default_factory=lambda: os.urandom(8).hex())
    args: dict[str, Any] = field(default_factory=dict)  # plan_check's arguments, to plan again

    @property
    def user_prefix(self) -> str:
        return self.scopes[0].prefix


def _ranked(name: str) -> str:
    """A name as a member of the spend rankings: itself, unless too long or not valid UTF-8."""
    if len(name) <= _MAX_SPENDER:
        try:
            name.encode("utf-8")
            return name
        except UnicodeEncodeError:
            pass
    return "#" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def _ceil_share(cap: int, level: Decimal) -> int:
    return int((Decimal(cap) * level).to_integral_value(rounding=ROUND_CEILING))


def _fmt(nano: int) -> str:
    return f"${nano_to_usd(nano).normalize():f}"


# A compensated user part: not a live reservation (a request id reserves afresh) and not
# settled (the decision's own record or release still applies).
_GIVEN_BACK = "C|0|released|"


_IN_USE = ("request_id is already in use by a live reservation for a different request (another model, size "
           "or budget); use a new request_id")


def _held(state: str) -> dict[str, str]:
    """A live request state's lease members by scope prefix (reserve.lua's "<held>")."""
    parts = state.split("|", 6)
    if len(parts) < 7:
        return {}
    return dict(entry.split(">", 1) for entry in parts[6].split(";") if ">" in entry)


def settled_state(candidate: int, cost_nano: int | None) -> str:
    # The nonce tells this call's own resend (same state) from a second settle call.
    return f"S|{candidate}|{'released' if cost_nano is None else cost_nano}|{os.urandom(4).hex()}"


def validate_text(name: str, value: Any, *, max_len: int | None = None) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentType(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidArgument(f"{name} must not be empty")
    if max_len is not None and len(value) > max_len:
        raise InvalidArgument(f"{name} is {len(value)} characters long; at most {max_len} are allowed")
    return value


def _token_ids(prompt: Any) -> int | None:
    """How many token ids ``prompt`` holds (a list of ints, or of lists of ints); None for text."""
    if not isinstance(prompt, list) or not prompt:
        return None
    if all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        ids = prompt
        count = len(prompt)
    elif all(isinstance(p, list) for p in prompt):
        ids = [i for p in prompt for i in p]
        count = len(ids)
    else:
        return None
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise InvalidArgumentType(f"prompt token ids must be non-negative integers, got {i!r:.40}")
    return count


def _validate_tags(tags: Any) -> Mapping[str, str]:
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise InvalidArgumentType(f"tags must be a mapping of str to str, got {type(tags).__name__}")
    if len(tags) > _MAX_TAGS:
        raise InvalidArgument(f"tags has {len(tags)} entries; at most {_MAX_TAGS} are allowed")
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgumentType(
                f"tags[{key!r}] must map a str to a str, got {type(key).__name__} -> {type(value).__name__}"
            )
    return dict(tags)


def _who(scope: Scope) -> str:
    """A scope as denial reasons name it: "tier 'pro'", "tenant 'acme' (plan 'standard')", "the org"."""
    if scope.budget == "user":
        return f"tier {scope.limits.tier!r}"
    if scope.org:
        return "the org"
    name = scope.budget if scope.value is None else f"{scope.budget} {printable(scope.value)[:64]!r}"
    return name + (f" (plan {scope.limits.plan!r})" if scope.limits.plan else "")


def _tightest(scopes: Sequence[Scope], attr: str) -> tuple[int | None, Scope | None]:
    """The smallest per-request cap ``attr`` among the scopes, and whose it is."""
    found: tuple[int | None, Scope | None] = (None, None)
    for scope in scopes:
        value = getattr(scope.limits, attr)
        if value is not None and (found[0] is None or value < found[0]):
            found = (value, scope)
    return found


class Engine:
    """``split``: run each operation per hash slot (one part per scope, the user's first), for Redis Cluster."""

    def __init__(self, config: Config, clock: Callable[[], datetime], *, split: bool = False,
                 before: Engine | None = None) -> None:
        """``before``: the engine this one replaces (``guard.reload``): its decisions stay
        this one's to settle, and its slices, runtime state and baselines carry over."""
        from .pricing import Pricebook

        self.config = config
        org = config.org
        # The org's part of checks from in-process slices (opt-in): its own hash slot's
        # calls become one per slice, so it runs split even on a single Redis.
        self.slices = OrgSlices(usd_to_nano(org.slice_usd), int(org.slice_flush_s * 1000),
                                config.reservation_ttl_s * 1000) if org.slice_usd else None
        if before is not None and before.slices is not None and self.slices is not None:
            self.slices = before.slices  # what this process holds of the org's windows stays held
        self.split = split or self.slices is not None
        # Decisions carry their owner: only the engine that took them (or its reloads) settles them.
        self.owner: object = before.owner if before is not None else object()
        # The runtime state (budgetguard.runtime) this process last saw, per budget value.
        self.known: Known = before.known if before is not None else Known()
        self.prices = Pricebook(config.models)
        self.policies = Policies(config)
        self._clock = clock
        self._windows = WindowClock(config.tz)
        self.keys = KeySpace(config.key_prefix)
        self.scopes = Scopes(config, self.keys, self.policies)
        self._org_prefix = self.keys.org
        # A settled request's state outlives its lease so that retries and late
        # records still find it; window keys outlive their window by a day.
        self._state_ms = (2 * config.reservation_ttl_s + 3600) * 1000
        self._grace_ms = (config.reservation_ttl_s + 86_400) * 1000
        self._lease_ms = config.reservation_ttl_s * 1000
        # Per (limits, scope index, hour, minute): a scope's windows and their packed reserve
        # arguments, built once. Each entry holds its Limits, so that no other Limits can take
        # its id while the entry lives.
        self._specs: dict[tuple[Any, ...], tuple[Limits, tuple[Window, ...], tuple[tuple[str | int, ...], ...]]] = {}
        # Spend history feeds anomaly baselines and forecasts: keep a baseline and a month.
        self._history_ms = (max(config.anomaly.baseline_days, 31) + 2) * _DAY_MS
        self._stream_maxlen = str(config.events.stream_maxlen)
        # Anomaly baselines per UTC hour ("YYYYMMDDHH"), filled in the background (alerts.anomaly).
        self.anomaly_baselines: dict[str, Baseline | None] = before.anomaly_baselines if before else {}
        self.notices = Notices(config.key_prefix, self.anomaly_baselines, config.anomaly.sigmas)
        self._snapshots: dict[str, tuple[dict[str, str], str | None]] = {}
        self._encodings = {name: m.tokenizer for name, m in config.models.items() if m.tokenizer}

    # -- time ------------------------------------------------------------------------

    def now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise InvalidArgument("clock() must return an aware datetime")
        # On the UTC line, differences are true durations even across a DST change.
        return now.astimezone(UTC)

    def windows_now(self, now: datetime) -> WindowSet:
        return self._windows.at(now)

    # -- scopes and their windows ----------------------------------------------------

    def _scope_windows(self, index: int, scope: Scope, at: WindowSet,
                       now: datetime) -> tuple[tuple[Window, ...], tuple[tuple[str | int, ...], ...]]:
        limits = scope.limits
        minute = now.replace(second=0, microsecond=0) if any(w.kind.period in "qk" for w in limits.windows) else None
        key = (id(limits), index, scope.org, at.h.stamp, minute)
        found = self._specs.get(key)
        if found is None:
            if len(self._specs) > 4096:  # a new hour (or many overridden values): start over
                self._specs.clear()
            wins = Scopes.windows((scope,), at, now, first=index)
            # A first denial alerts where the budget asks for alerts (alert_at); the org's always.
            alert = 1 if scope.org or limits.alert_at else 0
            specs = tuple((w.suffix, w.code, -1 if w.limit.cap is None else w.limit.cap,
                           -1 if w.limit.trigger is None else w.limit.trigger, w.end_ms, alert if w.money else 0)
                          for w in wins)
            found = self._specs[key] = (limits, wins, specs)
        return found[1], found[2]

    def _layout(self, scopes: Sequence[Scope], at: WindowSet, now: datetime) -> tuple[
            tuple[Window, ...], tuple[tuple[int, int], ...], tuple[tuple[str | int, ...], ...]]:
        """The check's windows, each scope's (first window, count), the windows' reserve arguments."""
        wins: list[Window] = []
        specs: list[tuple[str | int, ...]] = []
        ranges = []
        for i, scope in enumerate(scopes):
            w, s = self._scope_windows(i, scope, at, now)
            ranges.append((len(wins), len(w)))
            wins += w
            specs += s
        return tuple(wins), tuple(ranges), tuple(specs)

    def _part_keys(self, plan_scopes: Sequence[Scope], wins: Sequence[Window], ranges: Sequence[tuple[int, int]],
                   lo: int, hi: int, cfg: bool = False) -> tuple[str, ...]:
        """Per scope: its lease set, its runtime state (``cfg``: for reserve and status), its windows."""
        keys: list[str] = []
        for k in range(lo, hi):
            prefix = plan_scopes[k].prefix
            first, count = ranges[k]
            keys.append(prefix + "leases")
            if cfg:
                keys.append(prefix + "cfg")
            keys += [prefix + w.suffix for w in wins[first:first + count]]
        return tuple(keys)

    # -- check ---------------------------------------------------------------------

    def plan_check(
        self,
        user: Any,
        model: Any,
        messages: Any = None,
        *,
        max_tokens: Any = None,
        tags: Any = None,
        request_id: Any = None,
        tools: Any = None,
        prompt: Any = None,
        system: Any = None,
        fetched_input: bool = False,
        tier: Any = None,
        plans: Any = None,
    ) -> CheckPlan:
        """Validate, apply per-request rules and build the reserve call (no I/O).

        ``fetched_input``: part of the input is fetched by the provider (a file, a URL, a
        stored conversation), so its size is unknown here: the tightest
        ``per_request.max_input_tokens`` is reserved for the input, and without one the
        check is denied. ``tier`` (or ``plans={"user": ...}``) is the user's plan for this
        call and ``plans`` other budgets', decided at run time. Raises InvalidArgument /
        InvalidArgumentType on malformed input, before anything is reserved.
        """
        args = dict(user=user, model=model, messages=messages, max_tokens=max_tokens, tags=tags,
                    request_id=request_id, tools=tools, prompt=prompt, system=system, fetched_input=fetched_input,
                    tier=tier, plans=plans)
        user = validate_text("user", user)
        model = validate_text("model", model, max_len=256)
        if max_tokens is not None:
            max_tokens = check_token_count(max_tokens, "max_tokens", minimum=1, maximum=MAX_OUTPUT_TOKENS_CEILING)
        tags = _validate_tags(tags)
        if request_id is not None:
            request_id = validate_text("request_id", request_id, max_len=_MAX_REQUEST_ID)
        plans = plans_argument(tier, plans)
        self.scopes.check_plans(plans)
        for budget, plan_name in plans.items():  # every plan named is checked, whether its budget applies or not
            self.policies.check_plan(budget, plan_name)
        price = self._price(model)
        now = self.now()
        scopes = self.scopes.of_call(user, plans, tags, model, None if price is None else price.provider,
                                     self.known.get, epoch_ms(now))
        policy = scopes[0].limits
        max_output_cap, _ = _tightest(scopes, "max_output_tokens")
        max_out = max_tokens or max_output_cap or self.config.default_max_output_tokens
        # Estimating also validates messages/tools, so it runs before any early denial.
        input_tokens = self._estimate(model, messages, tools, prompt, system)

        user_prefix = scopes[0].prefix
        if request_id is None:
            rid = os.urandom(16).hex()
        else:  # scoped to the user: two users' "req-1" are two requests
            rid = hashlib.sha256(f"{user_prefix}\0{request_id}".encode("utf-8", "surrogatepass")).hexdigest()[:32]
        at = self._windows.at(now)
        plan = CheckPlan(user, model, policy, tags, max_out, rid, now, at, scopes, args=args)

        refusing = next((s for s in scopes if not s.limits.allows(model)), None)
        if refusing is not None:
            return self._deny_local(plan, input_tokens, "model.not_allowed",
                                    f"model {model!r} is not allowed for {_who(refusing)}")
        if price is None:
            return self._deny_local(plan, input_tokens, "model.unknown_price",
                                    f"no price is known for model {model!r} (unknown_model: deny)")
        if max_output_cap is not None and max_out > max_output_cap:
            return self._deny_local(plan, input_tokens, "request.max_output_tokens",
                                    f"max_tokens={max_out} exceeds the per-request cap of {max_output_cap}")
        max_input, _ = _tightest(scopes, "max_input_tokens")
        # Files and stored items in the messages are billed by what the provider makes of
        # them: whoever calls, they are reserved at the input cap like fetched input.
        fetched_input = fetched_input or uncountable_input(messages)
        if fetched_input:
            if max_input is None:
                return self._deny_local(plan, input_tokens, "request.max_input_tokens",
                                        "part of the input is fetched by the provider (a file, a URL, a stored "
                                        "conversation), so only a per-request input cap bounds it; "
                                        f"{_who(scopes[0])} sets none")
            input_tokens = max(input_tokens, max_input)
        if max_input is not None and input_tokens > max_input:
            return self._deny_local(plan, input_tokens, "request.max_input_tokens",
                                    f"the input is about {input_tokens} tokens; the per-request cap is {max_input}")

        candidates = [Candidate(model, price, input_tokens, price.estimate_nano(input_tokens, max_out), _REQUESTED)]
        for scope in scopes:
            target = scope.limits.routes.get(model)
            if target is None or target == model or not all(s.limits.allows(target) for s in scopes):
                continue
            same_target = next((i for i, c in enumerate(candidates) if c.model == target), None)
            if same_target is not None:  # routes of several scopes alike: any of them may trigger it
                c = candidates[same_target]
                if c.route != _REQUESTED:
                    candidates[same_target] = dataclasses.replace(c, route=c.route | scope.route_bit)
                continue
            target_price = self._price(target)
            if target_price is None:  # config validation makes this unreachable; stay safe
                continue
            # Most routes stay within a tokenizer family: count again only if it differs.
            same = self._tokenizer(target) == self._tokenizer(model)
            tokens = input_tokens if same else self._estimate(target, messages, tools, prompt, system)
            if fetched_input and max_input is not None:
                tokens = max(tokens, max_input)  # the floor holds for every model
            if max_input is not None and tokens > max_input:
                continue  # counted with its own tokenizer, the input is over the cap for this model
            amount = target_price.estimate_nano(tokens, max_out)
            candidates.append(Candidate(target, target_price, tokens, amount, scope.route_bit))
        max_cost, _ = _tightest(scopes, "max_cost_nano")
        if max_cost is not None:
            affordable = [c for c in candidates if c.amount_nano <= max_cost]
            if not affordable:
                cheapest = min(c.amount_nano for c in candidates)
                return self._deny_local(plan, input_tokens, "request.max_cost",
                                        f"the worst-case cost {_fmt(cheapest)} exceeds the per-request cap of "
                                        f"{_fmt(max_cost)}", cheapest)
            plan.dropped_for_cost = affordable[0] is not candidates[0]
            candidates = affordable
        plan.candidates = candidates
        plan.wins, plan.ranges, plan.specs = self._layout(scopes, at, now)
        plan.call = self._reserve(plan, 0, 1 if self.split else len(scopes)).call()
        return plan

    def _estimate(self, model: str, messages: Any, tools: Any, prompt: Any, system: Any) -> int:
        ids = _token_ids(prompt)
        if ids is not None:  # a prompt already in tokens counts as the tokens it is
            return ids + estimate_input_tokens(model, messages, tools=tools, system=system,
                                               encoding=self._encodings.get(model))
        return estimate_input_tokens(model, messages, tools=tools, prompt=prompt, system=system,
                                     encoding=self._encodings.get(model))

    def _tokenizer(self, model: str) -> Tokenizer:
        return tokenizer_for(model, self._encodings.get(model))

    def _price(self, model: str) -> ModelPrice | None:
        price = self.prices.resolve(model)
        if price is None and self.config.unknown_model != "deny":
            price = self.prices.resolve(self.config.unknown_model)
        return price

    def _tokens(self, plan: CheckPlan, c: Candidate) -> int:
        """What a candidate takes from a tokens-per-minute window: its input and output bound."""
        return c.input_tokens + plan.max_output_tokens

    def _reserve(self, plan: CheckPlan, lo: int, hi: int, offered: Sequence[bool] | None = None, routed: int = 0,
                 probe: bool = False) -> Reserve:
        """The reserve call of the scopes ``lo`` .. ``hi - 1``."""
        scopes, ranges, specs = plan.scopes, plan.ranges, plan.specs
        first = ranges[lo][0]
        last = ranges[hi - 1][0] + ranges[hi - 1][1]
        slot = scopes[lo].prefix
        now_ms = epoch_ms(plan.now)
        org = scopes[hi - 1].org
        return Reserve(
            state_key=KeySpace.request(slot, plan.rid), void_key=KeySpace.void(slot, plan.attempt),
            part_keys=self._part_keys(scopes, plan.wins, ranges, lo, hi, cfg=True),
            blocked_key=self.keys.blocked if org else None,
            now_ms=now_ms, lease_deadline_ms=now_ms + self._lease_ms, state_ttl_ms=self._state_ms,
            grace_ms=self._grace_ms, rid=plan.rid, attempt=plan.attempt, probe=probe, routed=routed,
            candidates=tuple(v for i, c in enumerate(plan.candidates)
                             for v in (c.amount_nano if offered is None or offered[i] else -1, self._tokens(plan, c),
                                       c.route)),
            parts=tuple(v for k in range(lo, hi)
                        for v in (scopes[k].prefix, ranges[k][1], scopes[k].route_bit, 1 if scopes[k].org else 0,
                                  scopes[k].version)),
            windows=tuple(v for spec in specs[first:last] for v in spec), first=first, total=len(plan.wins))

    def _parse(self, plan: CheckPlan, raw: Any, lo: int, hi: int) -> Reserved:
        first = plan.ranges[lo][0]
        count = plan.ranges[hi - 1][0] + plan.ranges[hi - 1][1] - first
        return Reserved.parse(raw, first, count, len(plan.wins), lo)

    def learn(self, scopes: Sequence[Scope], stale: Sequence[tuple[int, tuple[str, ...]]]) -> None:
        """Keep the runtime state a script answered with, for the scopes it names."""
        for index, fields in stale:
            self.known.put(scopes[index].prefix, Runtime.parse(fields))

    def check_steps(self, plan: CheckPlan) -> Steps:
        """The reserve calls of a planned check; returns the :class:`Reserved` over all windows.

        A budget value whose runtime state changed since this process last saw it (an
        operator's assignment, override, grant...) answers "stale" with the new state: the
        check is planned again on it and sent again.
        """
        for _ in range(_REPLANS):
            reply = yield from self._check_once(plan)
            if reply.code != STALE:
                return reply
            self.learn(plan.scopes, reply.stale)
            fresh = self.plan_check(**plan.args)
            for f in dataclasses.fields(CheckPlan):
                setattr(plan, f.name, getattr(fresh, f.name))
            if plan.decision is not None:
                return Reserved(LOCAL)
        raise BudgetGuardError(f"the runtime state of budgets of user {printable(plan.user)!r} changed on each of "
                               f"{_REPLANS} attempts to check a call; try again")

    def _check_once(self, plan: CheckPlan) -> Steps:
        """The reserve calls of a planned check; returns the :class:`Reserved` over all windows.

        On a cluster the scopes go one by one, the user's first, the org's last. Each later
        part is offered only the candidates the earlier ones could hold (no dearer than what
        they hold), so its choice is what one script would choose, and a denial gives the
        earlier parts back before returning. A denial still probes the parts after it, so
        that the denial names the window that resets last and claims their first-denial
        alerts, as one script would (not with org slices, which make the org's windows look
        full).
        """
        assert plan.call is not None
        n = len(plan.scopes)
        if not self.split:
            whole = self._parse(plan, (yield plan.call), 0, n)
            if whole.code == RESERVED:
                amount = plan.candidates[whole.chosen - 1].amount_nano
                plan.choices = dict.fromkeys(range(n), (whole.chosen, amount))
            return whole
        total = len(plan.wins)
        offered = [True] * len(plan.candidates)
        routed = 0
        spent, reserved = (0,) * total, (0,) * total
        blockers: tuple[int, ...] = ()
        triggered: tuple[int, ...] = ()
        notices: tuple[str, ...] = ()
        repeat: list[str] | None = None  # the first part's live reservation of this request id
        chosen = 0
        for k in range(n):
            scope = plan.scopes[k]
            reply: Reserved | None = None
            if scope.org and self.slices is not None:
                if repeat is not None:
                    held = self.slices.held_for(plan.rid)
                    if held is not None:  # held in this process's slice
                        plan.org_local = True
                        plan.choices[k] = held
                        return Reserved(REPEAT, state=f"L|{held[0]}|{held[1]}|{repeat[3]}|{repeat[4]}")
                else:
                    reply, crossings = yield from self._slice_part(plan, k, offered, routed)
                    notices += tuple(renumbered(c, plan.ranges[k][0]) for c in crossings)
            if reply is None:
                call = plan.call if k == 0 else self._reserve(plan, k, k + 1, offered, routed).call()
                try:
                    reply = self._parse(plan, (yield call), k, k + 1)
                except BudgetGuardError:
                    yield from self._give_back(plan)
                    raise
            if reply.code in (VOIDED, STALE):
                yield from self._give_back(plan)
                return reply
            if reply.code == REPEAT:
                f = reply.state.split("|")
                plan.choices[k] = (int(f[1]), int(f[2]))
                stored = _held(reply.state).get(scope.prefix)
                if stored is not None:
                    plan.stored[k] = stored
                if k > 0 and repeat is None:  # a later part's live reservation: it stands, as before
                    return reply
                repeat = repeat or f
                # The parts after it hold the model it chose, if it got that far: a live
                # reservation of this id there answers as a repeat; one held in another
                # process's slice is reserved again (the settle that applies the first part
                # charges the rest, once).
                offered = [o and c.amount_nano <= int(f[2]) for o, c in zip(offered, plan.candidates, strict=True)]
                if not any(offered):  # nothing this request could be fits what the original holds
                    yield from self._give_back(plan)
                    raise InvalidArgument(_IN_USE)
                continue
            spent, reserved = reply.plus(Reserved(0, spent=spent, reserved=reserved))
            triggered += reply.triggered
            notices += reply.notices
            if reply.code == DENIED:
                yield from self._give_back(plan)
                blockers += reply.blockers
                if repeat is None:
                    probed = yield from self._probe(plan, k + 1)
                    blockers += probed.blockers
                    triggered += probed.triggered
                    notices += probed.notices
                    spent, reserved = probed.plus(Reserved(0, spent=spent, reserved=reserved))
                return Reserved(DENIED, 0, blockers, triggered, spent, reserved, notices)
            c = plan.candidates[reply.chosen - 1]
            plan.choices[k] = (reply.chosen, c.amount_nano)
            chosen = reply.chosen
            if repeat is not None:
                plan.own.add(k)
            else:
                blockers += reply.blockers
            plan.held.append(k)
            first, count = plan.ranges[k]
            for w in reply.triggered:
                routed |= plan.scopes[plan.wins[w].scope].route_bit
            part = plan.wins[first:first + count]
            offered = [o and c2.amount_nano <= c.amount_nano and all(
                w.limit.cap is None or reply.spent[first + j] + reply.reserved[first + j]
                + need(w, c2.amount_nano, self._tokens(plan, c2)) <= w.limit.cap
                for j, w in enumerate(part)) for o, c2 in zip(offered, plan.candidates, strict=True)]
        if repeat is not None:
            last = plan.choices[n - 1]
            return Reserved(REPEAT, state=f"L|{last[0]}|{last[1]}|{repeat[3]}|{repeat[4]}")
        return Reserved(RESERVED, chosen, blockers, triggered, spent, reserved, notices)

    def _probe(self, plan: CheckPlan, lo: int) -> Steps:
        """After a part denied on a cluster: what the later parts say of the cheapest candidate."""
        total = len(plan.wins)
        out = Reserved(DENIED, spent=(0,) * total, reserved=(0,) * total)
        cheapest = min(range(len(plan.candidates)), key=lambda i: plan.candidates[i].amount_nano)
        only = [i == cheapest for i in range(len(plan.candidates))]
        for k in range(lo, len(plan.scopes)):
            if plan.scopes[k].org and self.slices is not None:
                # The org's windows hold every process's slice in full: probing them would name
                # (and alert on) an org cap that other calls may still have room under.
                continue
            try:
                probed = self._parse(plan, (yield self._reserve(plan, k, k + 1, only, probe=True).call()), k, k + 1)
            except BudgetGuardError:
                continue
            if probed.code != DENIED:  # a live reservation of this id, or voided: no news
                continue
            spent, reserved = out.plus(probed)
            out = Reserved(DENIED, 0, out.blockers + probed.blockers, out.triggered + probed.triggered, spent,
                           reserved, out.notices + probed.notices)
        return out

    def _slice_part(self, plan: CheckPlan, k: int, offered: Sequence[bool], routed: int) -> Steps:
        """The org's part from this process's slice, refilled once if short.

        Returns (reply or None: ask Redis, crossings a refill reported, in the org's own numbering).
        """
        slices = self.slices
        assert slices is not None
        w = plan.windows
        stamps = (w.d.stamp, w.m.stamp)
        now_ms = epoch_ms(plan.now)
        first, count = plan.ranges[k]
        org = plan.scopes[k]
        crossings: tuple[str, ...] = ()
        total = len(plan.wins)
        for attempt in (0, 1):
            spent_d, spent_m, reserved_d, reserved_m = slices.figures
            used = (spent_d + reserved_d, spent_m + reserved_m)
            triggered = tuple(first + j for j, (u, wl) in enumerate(zip(used, org.limits.windows, strict=True))
                              if wl.trigger is not None and u >= wl.trigger)
            picked = self._first_choice(plan, offered, routed | (org.route_bit if triggered else 0))
            if picked is None:
                break
            if slices.take(plan.rid, stamps, picked, now_ms, now_ms + self._lease_ms):
                plan.org_local = True
                spent_d, spent_m, reserved_d, reserved_m = slices.figures
                spent, reserved = [0] * total, [0] * total
                spent[first:first + count] = [spent_d, spent_m]
                reserved[first:first + count] = [reserved_d, reserved_m]
                return Reserved(RESERVED, picked[0], (), triggered, tuple(spent), tuple(reserved)), crossings
            refill = slices.begin(stamps, now_ms, extra=picked[1]) if attempt == 0 else None
            if refill is None:
                break
            crossings = yield from self._refill(refill)
        return None, crossings

    @staticmethod
    def _first_choice(plan: CheckPlan, offered: Sequence[bool], routed: int) -> tuple[int, int] | None:
        """The candidate (1-based index, amount) reserve.lua tries first: a triggered route, else
        the requested model, else another route."""
        def rank(c: Candidate) -> int:
            if c.route == _REQUESTED:
                return 1
            return 0 if c.route & routed else 2

        offered_ones = [(rank(c), i + 1, c.amount_nano) for i, c in enumerate(plan.candidates) if offered[i]]
        if not offered_ones:
            return None
        _, index, amount = min(offered_ones)  # ties keep reserve.lua's candidate order
        return index, amount

    def _refill(self, refill: Refill) -> Steps:
        """Run one slice call; returns the crossings it reported (none when it failed)."""
        slices = self.slices
        assert slices is not None
        # Built afresh on each attempt; a resend of one that had applied finds its state.
        call = self._slice(refill, self.now())
        try:
            reply = SliceReply.parse((yield call.call()))
        except BudgetGuardError as exc:
            slices.failed(refill)
            log.warning("org budget slice call failed (%s); it is resent with the next one", exc)
            return ()
        except BaseException:  # cancelled or closed mid-call: its outcome is unknown
            slices.failed(refill)
            raise
        slices.done(refill, reply.granted, reply.spent, reply.reserved, call.deadline_ms)
        return reply.crossings

    def _org_windows(self, now: datetime) -> tuple[Window, ...]:
        """The org's windows alone (numbered from 0): a slice call's numbering."""
        org = self.scopes.of_budget("org", None, None, self.known.get, epoch_ms(now))
        return self._scope_windows(0, org, self._windows.at(now), now)[0]

    def _slice(self, refill: Refill, now: datetime) -> Slice:
        org = self._org_prefix
        d, m = refill.stamps
        hour = f"{now:%Y%m%d%H}"
        wins = self._org_windows(now)
        baseline = self.anomaly_baselines.get(hour)
        now_ms = epoch_ms(now)
        return Slice(
            state_key=KeySpace.request(org, refill.id),
            org_keys=(KeySpace.leases(org), self.keys.org_window(d), self.keys.org_window(m),
                      *self.keys.rankings(now, d, m), self.keys.blocked),
            now_ms=now_ms, grace_ms=self._grace_ms, state_ttl_ms=self._state_ms, org_prefix=org,
            org_suffixes=f"|{d}|{m}", release=",".join(refill.release), slice_id=refill.id,
            deadline_ms=now_ms + self._lease_ms, want=refill.want, need=refill.need,
            ends=",".join(str(w.end_ms) for w in wins),
            caps=",".join("-1" if w.limit.cap is None else str(w.limit.cap) for w in wins),
            thresholds=",".join(f"{w + 1},{level},{nano}" for w, level, nano in self._levels(wins)),  # slice.lua's
            history_field=hour[8:], history_ttl_ms=self._history_ms,
            anomaly_nano=None if baseline is None else baseline.threshold_nano, stream_maxlen=self._stream_maxlen,
            items=tuple(v for item in refill.batch for v in (item.cost, item.spender, item.feature, item.event)))

    def flush_steps(self, *, final: bool = False) -> Steps:
        """Hand in this process's slice spend (``final``: and give its slices back); returns crossings."""
        crossings: tuple[str, ...] = ()
        if self.slices is None:
            return crossings
        # A final flush may first have to resend a refill whose outcome was unknown (which
        # takes a new slice), then give that back too.
        for _ in range(2):
            now = self.now()
            w = self._windows.at(now)
            refill = self.slices.begin((w.d.stamp, w.m.stamp), epoch_ms(now), final=final)
            if refill is None:
                break
            crossings += yield from self._refill(refill)
            if not final or refill.want == 0:
                break
        return crossings

    def slice_alerts(self, crossings: Sequence[str]) -> list[Alert]:
        """Alerts of the org thresholds, resolved blocks and anomalies a slice call reported."""
        now = self.now()
        org = self.scopes.of_budget("org", None, None, self.known.get, epoch_ms(now))
        return self.notices.alerts(crossings, self._org_windows(now), (org,), "", now)

    def flush_due(self) -> bool:
        if self.slices is None:
            return False
        now = self.now()
        w = self._windows.at(now)
        return self.slices.due((w.d.stamp, w.m.stamp), epoch_ms(now))

    def _release_call(self, scope: Scope, wins: Sequence[Window], rid: str, member_text: str, state: str,
                      attempt: str = "", void_ttl_ms: int | None = None, first: int = 0) -> Settle:
        """A settle call that gives one part's lease back (no charge, no event)."""
        return Settle(
            state_key=KeySpace.request(scope.prefix, rid), void_key=KeySpace.void(scope.prefix, attempt),
            part_keys=(scope.prefix + "leases", *(scope.prefix + w.suffix for w in wins)), org_keys=(),
            now_ms=epoch_ms(self.now()), state_ttl_ms=self._state_ms, grace_ms=self._grace_ms,
            parts=(scope.prefix, len(wins), 0, member_text),
            windows=tuple(v for w in wins for v in (w.suffix, w.end_ms, "-")), cost=None, settled_state=state,
            thresholds=(), history_field="", history_ttl_ms=self._history_ms, spender="", feature="",
            anomaly_nano=None, event_head="", outcome="released", lapsed_outcome="released",
            stream_maxlen=self._stream_maxlen, void_ttl_ms=void_ttl_ms, attempt=attempt, org_ends=(0, 0), first=first)

    def _hold(self, plan: CheckPlan, k: int, choice: tuple[int, int]) -> tuple[int, int] | str:
        """What scope ``k`` holds for ``choice`` (candidate, amount): (amount, tokens), or a repeat's member."""
        if k in plan.stored:
            return plan.stored[k]
        c = plan.candidates[choice[0] - 1] if 0 < choice[0] <= len(plan.candidates) else None
        return choice[1], self._tokens(plan, c) if c is not None else 0

    def _member(self, plan: CheckPlan, k: int, choice: tuple[int, int]) -> str:
        hold = self._hold(plan, k, choice)
        if isinstance(hold, str):
            return hold
        first, count = plan.ranges[k]
        return member(plan.rid, hold[0], hold[1], plan.wins[first:first + count])

    def _give_back(self, plan: CheckPlan) -> Steps:
        """Compensate a cluster check a later part denied (or failed): release the parts it took."""
        for k in reversed(plan.held):
            first, count = plan.ranges[k]
            call = self._release_call(plan.scopes[k], plan.wins[first:first + count], plan.rid,
                                      self._member(plan, k, plan.choices[k]), _GIVEN_BACK + os.urandom(4).hex())
            try:
                yield call.call()
            except BudgetGuardError as exc:
                log.error("could not give back the %s part of reservation %s of user %s (%s); it lapses after "
                          "reservation_ttl_s", plan.scopes[k].budget, plan.rid, printable(plan.user), exc)
        plan.held.clear()

    def _decision(self, plan: CheckPlan, candidate: Candidate | None, *, allowed: bool, reason: str,
                  limit: str | None, retry_after: int | None = None, amount: int | None = None,
                  input_tokens: int | None = None, enforced: bool = True, in_doubt: bool = False,
                  remaining: int | None = None, wins: tuple[Window, ...] | None = None) -> Decision:
        if amount is None:
            amount = candidate.amount_nano if candidate else 0
        index = (plan.candidates.index(candidate) + 1) if candidate in plan.candidates else 0
        wins = wins or plan.wins
        holds = tuple(self._hold(plan, k, plan.choices.get(k, (index, amount))) for k in range(len(plan.ranges)))
        ticket = Ticket(
            request_key=KeySpace.request(plan.user_prefix, plan.rid),
            scopes=plan.scopes,
            windows=wins,
            ranges=plan.ranges,
            holds=holds,
            rid=plan.rid,
            amount_nano=amount,
            candidate=index,
            org_local=plan.org_local,
            own=frozenset(plan.own),
            owner=self.owner,
            attempt=plan.attempt,
            in_doubt=in_doubt,
        )
        return Decision(
            allowed=allowed,
            model=candidate.model if candidate else plan.requested,
            requested_model=plan.requested,
            reason=reason,
            limit=limit,
            retry_after=retry_after,
            estimated_input_tokens=candidate.input_tokens if candidate else (input_tokens or 0),
            estimated_cost_usd=nano_to_usd(amount),
            reservation_id=plan.rid,
            user=plan.user,
            tier=plan.policy.tier,
            max_output_tokens=plan.max_output_tokens,
            tags=plan.tags,
            enforced=enforced,
            remaining_usd=None if remaining is None else nano_to_usd(remaining),
            budgets=tuple(s.budget for s in plan.scopes),
            _ticket=ticket,
        )

    def _deny_local(self, plan: CheckPlan, input_tokens: int, limit: str, reason: str,
                    amount: int | None = None) -> CheckPlan:
        plan.decision = self._decision(plan, None, allowed=False, reason=f"denied: {reason}", limit=limit,
                                       amount=amount, input_tokens=input_tokens)
        return plan

    def read_check(self, plan: CheckPlan, reply: Reserved) -> Decision:
        if reply.code == LOCAL:
            assert plan.decision is not None
            return plan.decision
        if reply.code == REPEAT:
            return self._repeat(plan, reply.state)
        if reply.code == VOIDED:  # only a reserve that ran after its caller gave up on it (and voided it) reads this
            return self._decision(plan, None, allowed=False, limit="store.unavailable",
                                  reason="denied: this check was voided after the budget store answered too late")
        wins, spent, reserved = plan.wins, reply.spent, reply.reserved

        if reply.code == DENIED:
            cheapest = min(plan.candidates, key=lambda c: c.amount_nano)
            tokens = self._tokens(plan, cheapest)
            w = self._latest_reset(reply.blockers, wins, plan.now)
            win = wins[w]
            cap = win.limit.cap
            assert cap is not None
            this = need(win, cheapest.amount_nano, tokens)
            if win.money:
                reason = (f"denied: {win.name} cap {_fmt(cap)} would be exceeded (spent {_fmt(spent[w])} + "
                          f"reserved {_fmt(reserved[w])} + this request {_fmt(this)})")
            else:
                reason = (f"denied: {win.name} cap {cap:,} {win.limit.kind.unit} would be exceeded (used "
                          f"{spent[w]:,} + reserved {reserved[w]:,} + this request {this:,})")
            # Waiting helps only if the request fits every capped window when empty, and
            # a balance (total) never empties by itself.
            fits_empty = all(x.limit.cap is None or need(x, cheapest.amount_nano, tokens) <= x.limit.cap for x in wins)
            blocking = set(reply.blockers)
            retry = None
            if fits_empty and not any(wins[i].code == "m" and wins[i].end is None for i in blocking):
                retry = max(1, math.ceil((win.end - plan.now).total_seconds())) if win.end is not None else 1
                only_in_flight = all(
                    spent[i] + need(wins[i], cheapest.amount_nano, tokens) <= (wins[i].limit.cap or 0)
                    for i in blocking)
                if only_in_flight and win.code != "c":
                    # Only calls in flight stand in the way: they settle when they end, and their
                    # leases lapse within reservation_ttl_s at the latest; the reset is no wait to name.
                    retry = min(retry, self.config.reservation_ttl_s)
                    reason += "; calls in flight hold the rest and settle when they end"
            return self._decision(plan, None, allowed=False, reason=reason, limit=win.name,
                                  retry_after=retry, amount=cheapest.amount_nano,
                                  input_tokens=cheapest.input_tokens)

        chosen = plan.candidates[reply.chosen - 1]
        remaining = min((x.limit.cap - spent[i] - reserved[i] - chosen.amount_nano for i, x in enumerate(wins)
                         if x.money and x.limit.cap is not None), default=None)
        if chosen.route == _REQUESTED:
            return self._decision(plan, chosen, allowed=True, reason="allowed", limit=None, remaining=remaining)
        if plan.dropped_for_cost:
            limit = "request.max_cost"
            why = f"the worst case for {plan.requested} exceeds the per-request cap"
        elif reply.blockers:
            limit = wins[self._latest_reset(reply.blockers, wins, plan.now)].name
            why = f"{plan.requested} would exceed {limit}, {chosen.model} fits"
        else:
            w = next(i for i in reply.triggered if plan.scopes[wins[i].scope].route_bit & chosen.route)
            limit = wins[w].name
            cap = wins[w].limit.cap
            assert cap is not None
            why = f"{limit} is at {Decimal((spent[w] + reserved[w]) * 100) / cap:.0f}% of {_fmt(cap)}"
        return self._decision(plan, chosen, allowed=True, limit=limit, remaining=remaining,
                              reason=f"routed {plan.requested} -> {chosen.model}: {why}")

    @staticmethod
    def reserved_now(reply: Reserved) -> bool:
        """Whether this reserve reply took a new reservation (not a denial, not a repeat)."""
        return reply.code == RESERVED

    def _repeat(self, plan: CheckPlan, state: str) -> Decision:
        """A retried check: rebuild the original reservation from its stored state."""
        _, index, amount, reserved_ms = state.split("|")[:4]
        i = int(index) - 1
        if not (0 <= i < len(plan.candidates) and plan.candidates[i].amount_nano == int(amount)):
            raise InvalidArgument(_IN_USE)
        held = _held(state)
        if held and not self.split:  # part by part, check_steps kept each part's own
            # The original's budgets are the ones held: a retry naming others (another
            # tenant, say) is another request, and its settle must release what was taken.
            if list(held) != [s.prefix for s in plan.scopes]:
                raise InvalidArgument(_IN_USE)
            plan.stored.update({k: held[s.prefix] for k, s in enumerate(plan.scopes)})
        candidate = plan.candidates[i]
        at = datetime.fromtimestamp(int(reserved_ms) / 1000, UTC)
        wins = self._layout(plan.scopes, windows_at(at, self.config.tz), at)[0]
        for k in range(len(plan.scopes)):
            plan.choices.setdefault(k, (i + 1, int(amount)))
        return self._decision(plan, candidate, allowed=True, limit=None, amount=int(amount), wins=wins,
                              reason="allowed: a repeat of a live reservation (same request id), which stands")

    @staticmethod
    def _latest_reset(blockers: Sequence[int], wins: Sequence[Window], now: datetime) -> int:
        """Of the blocking windows, the one that resets last: waiting for it is what helps.
        A balance never resets; calls in flight free up any moment."""
        def reset(i: int) -> tuple[float, int]:
            w = wins[i]
            if w.end is not None:
                return (w.end.timestamp(), i)
            return (math.inf if w.code == "m" else now.timestamp(), i)

        return max(blockers, key=reset)

    def unavailable(self, plan: CheckPlan, error: BaseException) -> Decision:
        """The decision when Redis cannot answer, per ``fail_mode``."""
        candidate = plan.candidates[0]
        amount = candidate.amount_nano
        plan.choices = {k: (1, amount) for k in range(len(plan.scopes))}
        # The reserve may still run once Redis catches up: settling the decision voids it.
        if self.config.fail_mode == "open":
            return self._decision(plan, candidate, allowed=True, enforced=False, limit="store.unavailable",
                                  in_doubt=True,
                                  reason=f"allowed unenforced: budget store unavailable ({type(error).__name__}); "
                                         "fail_mode is open")
        return self._decision(plan, candidate, allowed=False, limit="store.unavailable", in_doubt=True,
                              reason=f"denied: budget store unavailable ({type(error).__name__}); "
                                     "fail_mode is closed")

    # -- settle --------------------------------------------------------------------

    def cost_nano(self, decision: Decision, usage: Usage) -> int:
        price = self._price(decision.model)
        if price is None:
            raise InvalidArgument(f"cannot price usage: no price is known for model {decision.model!r}")
        return price.cost_nano(usage)

    def _snapshot(self, model: str) -> tuple[dict[str, str] | None, str | None]:
        """The prices (USD per MTok) and provider recorded with a model's events."""
        found = self._snapshots.get(model)
        if found is None:
            price = self._price(model)
            if price is None:
                return None, None
            if len(self._snapshots) > 4096:
                self._snapshots.clear()
            found = self._snapshots[model] = (price.snapshot(), price.provider)
        return found

    def ticket(self, decision: Any) -> Ticket:
        """The ticket of a decision this engine took; InvalidArgument(Type) for anything else."""
        if not isinstance(decision, Decision) or decision._ticket is None:
            raise InvalidArgumentType(f"expected a Decision from check(), got {type(decision).__name__}")
        t = decision._ticket
        if t.owner is not self.owner:
            # Another guard's decision would be charged at this guard's prices on this guard's
            # ledger, and its own reservation left to lapse.
            raise InvalidArgument(f"this decision (reservation {decision.reservation_id}) was taken by another "
                                  f"BudgetGuard (key prefix {t.request_key.split(':', 1)[0]!r}); settle it with "
                                  "the guard that took it")
        return t

    def _levels(self, wins: Sequence[Window], scopes: Sequence[Scope] | None = None) -> tuple[tuple[int, str, int],
                                                                                          ...]:
        """The alert thresholds of money windows: (window, level, nano-USD), from each scope's alert_at."""
        out = []
        for i, w in enumerate(wins):
            cap = w.limit.cap
            if not w.money or cap is None:
                continue
            levels = scopes[w.scope].limits.alert_at if scopes is not None else self.policies.org.alert_at
            out += [(i, f"{level.normalize():f}", _ceil_share(cap, level)) for level in levels]
        return tuple(out)

    def settle_call(self, decision: Decision, usage: Usage | None, *, outcome: str | None = None,
                    error: str | None = None, latency_ms: int | None = None, logged: bool = True,
                    details: CallDetails | None = None) -> SettlePlan:
        """Record ``usage`` against a decision's reservation, or release it (``usage`` None).

        A decision whose reserve is in doubt (sent, never answered) is voided as it settles.
        ``logged=False`` writes no usage event (a void nobody asked for).
        """
        t = self.ticket(decision)
        members = t.members()
        cost, input_cost, tokens = None, 0, 0
        if usage is not None:
            price = self._price(decision.model)
            if price is None:
                raise InvalidArgument(f"cannot price usage: no price is known for model {decision.model!r}")
            input_cost, cost = price.cost_parts_nano(usage)
            tokens = usage.input_tokens + usage.output_tokens
        now = self.now()
        now_ms = epoch_ms(now)
        # A record that arrives after the reservation's earliest window has expired charges
        # the current windows: late spend is still spend.
        ends = [w.end_ms for w in t.windows if w.end_ms]
        expired = bool(ends) and min(ends) + self._grace_ms <= now_ms
        charge = self._layout(t.scopes, self._windows.at(now), now)[0] if expired else t.windows
        hour = f"{now:%Y%m%d%H}"  # spend history is kept by UTC hour
        prices, provider = self._snapshot(decision.model)
        outcome = outcome or ("ok" if usage is not None else "released")
        event = usage_event(decision, now, usage=usage, input_cost_nano=input_cost, cost_nano=cost or 0,
                            prices=prices, provider=provider, latency_ms=latency_ms, error=error, details=details)
        baseline = self.anomaly_baselines.get(hour)
        spender = _ranked(decision.user)
        state = settled_state(t.candidate, cost)
        # Without a lease (fail_mode open let it through), a lapse is no news.
        lapsed = "expired" if decision.enforced and outcome in ("ok", "released") else outcome
        org_first, org_count = t.ranges[-1]
        org_wins = {w.limit.kind.name: w for w in charge[org_first:org_first + org_count]}
        org_day, org_month = org_wins["daily"], org_wins["monthly"]
        org_keys = self.keys.rankings(now, org_day.suffix, org_month.suffix)
        head = stream_head(event) if self._stream_maxlen != "0" and logged else ""
        feature = _ranked(decision.tags.get("feature", ""))
        # A record late enough to charge the current windows charges their money only: a
        # request from a day ago is not this minute's request or tokens.
        charges = [("-" if w.code == "c" or (expired and w.code in "qk") else str(cost) if w.code == "m"
                    else "1" if w.code == "q" else str(tokens)) for w in charge]
        levels = self._levels(charge, t.scopes)
        n = len(t.scopes)

        def part(lo: int, hi: int) -> Settle:
            first, last = t.ranges[lo][0], t.ranges[hi - 1][0] + t.ranges[hi - 1][1]
            scopes = t.scopes[lo:hi]
            org = scopes[-1].org
            prefix = scopes[0].prefix
            return Settle(
                state_key=t.request_key if lo == 0 else KeySpace.request(prefix, decision.reservation_id),
                void_key=KeySpace.void(prefix, t.attempt),
                part_keys=self._part_keys(t.scopes, charge, t.ranges, lo, hi), org_keys=org_keys if org else (),
                now_ms=now_ms, state_ttl_ms=self._state_ms, grace_ms=self._grace_ms,
                parts=tuple(v for i, s in enumerate(scopes)
                            for v in (s.prefix, t.ranges[lo + i][1], 1 if s.org else 0, members[lo + i])),
                windows=tuple(v for w, c in zip(charge[first:last], charges[first:last], strict=True)
                              for v in (w.suffix, w.end_ms, c)),
                cost=cost, settled_state=state,
                thresholds=tuple(v for w, level, nano in levels if first <= w < last
                                 for v in (w - first + 1, level, nano)),
                history_field=hour[8:], history_ttl_ms=self._history_ms, spender=spender, feature=feature,
                anomaly_nano=None if baseline is None else baseline.threshold_nano,
                event_head=head if org else "", outcome=outcome, lapsed_outcome=lapsed,
                stream_maxlen=self._stream_maxlen,
                void_ttl_ms=self._lease_ms + _VOID_MARGIN_MS if t.in_doubt else None, attempt=t.attempt,
                org_ends=(org_day.end_ms, org_month.end_ms), first=first)

        if not self.split:
            calls: tuple[Settle, ...] = (part(0, n),)
        else:
            # The user's part first: its request state decides whether this settle applies,
            # so the other parts (and the usage event with the org's) are charged once, by
            # whoever got there. The org's part is settled in memory when a slice held it.
            calls = tuple(part(k, k + 1) for k in range(n) if not (t.org_local and t.scopes[k].org))
        own = tuple(dataclasses.replace(calls[k], cost=None, event_head="", thresholds=())
                    for k in sorted(t.own) if k < len(calls))
        return SettlePlan(calls, decision, event, state, outcome, lapsed, charge, t.scopes, now, cost,
                          (spender, feature), own)

    def renew_steps(self, decision: Decision) -> Steps:
        """Move a live reservation's lease on by ``reservation_ttl_s``; returns whether it was live."""
        t = self.ticket(decision)
        if not decision.allowed or not decision.enforced or not t.ranges:
            return False
        members = t.members()
        now_ms = epoch_ms(self.now())
        deadline = now_ms + self._lease_ms
        rid = decision.reservation_id

        def renew(lo: int, hi: int) -> ScriptCall:
            state_key = t.request_key if lo == 0 else KeySpace.request(t.scopes[lo].prefix, rid)
            return Renew(state_key, tuple(s.prefix + "leases" for s in t.scopes[lo:hi]), now_ms, deadline,
                         self._state_ms, ";".join(members[lo:hi])).call()

        n = len(t.scopes)
        if not self.split:
            return int((yield renew(0, n))) == 1
        renewed = True
        for k in range(n):
            if t.scopes[k].org and t.org_local and self.slices is not None:
                renewed = self.slices.renew(rid, deadline) and renewed
            else:
                renewed = int((yield renew(k, k + 1))) == 1 and renewed
        return renewed

    @staticmethod
    def void_steps(plan: SettlePlan) -> Steps:
        """Void an in-doubt decision: every part of its release, each whatever the others
        answered, so that each hash slot its reserve could reach holds the void marker.
        A failure is raised; running the whole again is safe (each part applies once)."""
        for call in plan.calls:
            yield call.call()

    def settle_steps(self, plan: SettlePlan) -> Steps:
        """The settle calls of ``plan``; returns (each part's :class:`SettleReply`, the
        crossings of a slice flush it ran). The last reply is the one carrying the event.

        On a cluster the later parts run only when the user's applied for this call.
        """
        t = plan.decision._ticket
        first = plan.calls[0]
        replies = [SettleReply.parse((yield first.call()), first.first)]
        if not self.split:
            return replies, ()
        mine = replies[0].own(plan.state, first.first)
        crossings: tuple[str, ...] = ()
        if not mine.applied and plan.own:
            # The original call settled the first part (and charged the rest): give back
            # the reservations this repeat took for itself.
            for call in plan.own:
                with contextlib.suppress(BudgetGuardError):  # else it lapses with its lease
                    yield call.call()
        elif mine.applied:
            for call in plan.calls[1:]:
                try:
                    replies.append(SettleReply.parse((yield call.call()), call.first))
                except BudgetGuardError as exc:
                    # The user part is settled and a new settle would not run again: as if the
                    # process had died between the parts, this part misses this one request.
                    replies.append(SettleReply(False))
                    log.error("settling the %s part of reservation %s of user %s failed (%s): the user was "
                              "charged, that part's counters (and, for the org, the usage stream) miss this "
                              "request, and its reservation lapses after reservation_ttl_s",
                              call.parts[0], plan.decision.reservation_id,
                              printable(plan.decision.user), exc)
            if t is not None and t.org_local and self.slices is not None:
                outcome = plan.outcome if mine.live else plan.lapsed_outcome
                line = stream_head(plan.event) + outcome + '"}' if self._stream_maxlen != "0" else ""
                self.slices.settle(plan.decision.reservation_id,
                                   Item(plan.cost or 0, plan.ranks[0], plan.ranks[1], line))
                replies.append(SettleReply(True, mine.live))
                if self.flush_due():
                    crossings = yield from self.flush_steps()
        return replies, crossings

    def read_settle(self, plan: SettlePlan, replies: tuple[list[SettleReply], tuple[str, ...]]) -> Settled:
        """Whether this settlement applied, the alerts it crossed, and its event.

        ``replies`` is what :meth:`settle_steps` returns: each part's reply (the last carries
        the event), and the crossings of a slice flush.
        """
        parts, flushed = replies
        read = [r.own(plan.state, plan.calls[i].first) if i < len(plan.calls) else r for i, r in enumerate(parts)]
        if not any(r.applied for r in read):
            return Settled(False, [], None)
        crossed = tuple(c for r in read if r.applied for c in r.crossings)
        event_part = read[-1]
        event = dict(plan.event, outcome=plan.outcome if event_part.live else plan.lapsed_outcome) \
            if event_part.applied else None
        d = plan.decision
        alerts = self.notices.alerts(crossed, plan.windows, plan.scopes, d.user, plan.now)
        alerts += self.slice_alerts(flushed)  # a flush hands in spend on the windows of now
        return Settled(True, alerts, event)

    # -- alerts --------------------------------------------------------------------

    def check_alerts(self, plan: CheckPlan, reply: Reserved) -> list[Alert]:
        """The alerts a reserve reply reports: first denials by a cap, and resolved org blocks."""
        if reply.code in (REPEAT, VOIDED, LOCAL):
            return []
        return self.notices.alerts(reply.notices, plan.wins, plan.scopes, plan.user, plan.now, reply.spent)

    def anomaly_alert(self, now: datetime, spent: int) -> Alert:
        return self.notices.anomaly(now, spent)

    def top_keys(self, alert: Alert) -> tuple[str | None, str | None]:
        """The org rankings (users, features) that name who spent in an alert's window."""
        if alert.kind == "anomaly":
            stamp = alert.window_key[2:12]
            return self.keys.top_users_hour(stamp), self.keys.top_features_hour(stamp)
        if alert.scope == "org" and alert.kind in ("threshold", "blocked", "forecast") \
                and alert.window_key[:2] in ("d:", "m:"):
            return self.keys.top_users(alert.window_key), None
        return None, None

    def log_call(self, lines: list[str]) -> ScriptCall:
        """Append finished event JSON lines to the usage stream."""
        return Log(self.keys.events, self._stream_maxlen, tuple(lines)).call()

    def denial_event(self, decision: Decision) -> Event:
        return denial_event(decision, self.now(), provider=self._snapshot(decision.model)[1])

    # -- status --------------------------------------------------------------------

    def _read_windows(self, scopes_of: Callable[[int], tuple[Scope, ...]]) -> Steps:
        """Read the windows of the scopes ``scopes_of(now_ms)`` builds, planning them again
        on fresh runtime state when a part answers "stale"; returns (scopes, windows, reply)."""
        for _ in range(_REPLANS):
            now = self.now()
            scopes = scopes_of(epoch_ms(now))
            wins, ranges, _ = self._layout(scopes, self._windows.at(now), now)
            total = len(wins)
            groups = [(0, len(scopes))] if not self.split else [(k, k + 1) for k in range(len(scopes))]
            reply = StatusReply((0,) * total, (0,) * total)
            for lo, hi in groups:
                first, last = ranges[lo][0], ranges[hi - 1][0] + ranges[hi - 1][1]
                call = StatusCall(self._part_keys(scopes, wins, ranges, lo, hi, cfg=True), epoch_ms(now),
                                  tuple(v for i, s in enumerate(scopes[lo:hi])
                                        for v in (s.prefix, ranges[lo + i][1], s.version)),
                                  tuple(w.suffix for w in wins[first:last]), first, total)
                reply = reply.plus(StatusReply.parse((yield call.call()), first, last - first, total, lo))
            if not reply.stale:
                return scopes, wins, reply
            self.learn(scopes, reply.stale)
        raise BudgetGuardError(f"the runtime state of budgets changed on each of {_REPLANS} attempts to read them")

    def status_steps(self, user: Any, tier: Any = None, tags: Any = None, plans: Any = None) -> Steps:
        """Read the windows of every budget that applies to ``user`` with ``tags`` (the caps of
        the plans given, else the config's); returns a :class:`Status`."""
        user = validate_text("user", user)
        tags = _validate_tags(tags)
        plans = plans_argument(tier, plans)
        self.scopes.check_plans(plans)
        for budget, plan_name in plans.items():
            self.policies.check_plan(budget, plan_name)
        scopes, wins, reply = yield from self._read_windows(
            lambda now_ms: self.scopes.of_call(user, plans, tags, None, None, self.known.get, now_ms))
        return Status(user=user, tier=scopes[0].limits.tier, windows=_window_statuses(wins, reply),
                      budgets=tuple(s.budget for s in scopes),
                      scopes=tuple((s.budget, s.value, s.limits.plan) for s in scopes))

    def budget_status_steps(self, budget: Any, value: Any = None, plan: Any = None) -> Steps:
        """Read one budget value's windows; returns a :class:`BudgetStatus`."""
        budget = validate_text("budget", budget, max_len=64)
        if value is not None:
            value = validate_text("value", value)  # any length: long values are hashed into the key
        if plan is not None:
            plan = validate_text("plan", plan, max_len=256)
            self.policies.check_plan(budget, plan)
        self.scopes.prefix_of(budget, value)  # refuses an unknown budget before any I/O
        scopes, wins, reply = yield from self._read_windows(
            lambda now_ms: (self.scopes.of_budget(budget, value, plan, self.known.get, now_ms),))
        return BudgetStatus(budget=budget, value=value, plan=scopes[0].limits.plan,
                            windows=_window_statuses(wins, reply))


def _window_statuses(wins: Sequence[Window], reply: StatusReply) -> dict[str, WindowStatus | CountStatus]:
    out: dict[str, WindowStatus | CountStatus] = {}
    for i, w in enumerate(wins):
        cap = w.limit.cap
        if w.money:
            out[w.name] = WindowStatus(spent_usd=nano_to_usd(reply.spent[i]),
                                       reserved_usd=nano_to_usd(reply.reserved[i]),
                                       limit_usd=None if cap is None else nano_to_usd(cap), resets_at=w.end)
        else:
            out[w.name] = CountStatus(used=reply.spent[i], reserved=reply.reserved[i], limit=cap, resets_at=w.end,
                                      unit=w.limit.kind.unit)
    return out
