"""The budget engine without I/O: builds script calls and reads their replies.

``BudgetGuard`` (sync and async alike) asks the engine for a :class:`ScriptCall`, hands
it to a store to run, and gives the reply back to the engine to read. Everything that
decides (validation, per-request caps, pricing, routing candidates, reading Redis'
answer into a :class:`Decision`) lives here once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from .decision import Decision, Status, Ticket, WindowStatus
from .details import CallDetails
from .errors import BudgetGuardError, InvalidArgument, InvalidArgumentType
from .events import Event, denial_event, stream_head, usage_event
from .keys import KeySpace
from .notices import Notices
from .policy import Policies, UserPolicy
from .pricing import ModelPrice, nano_to_usd, usd_to_nano
from .protocol import (
    BOTH,
    DENIED,
    ORG,
    REPEAT,
    RESERVED,
    USER,
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
)
from .protocol import Status as StatusCall
from .redact import printable
from .slices import Item, OrgSlices, Refill
from .tokens import Tokenizer, estimate_input_tokens, tokenizer_for, uncountable_input
from .usage import Usage, check_token_count
from .windows import WINDOWS, WindowClock, WindowSet, windows_at

__all__ = ["MAX_OUTPUT_TOKENS_CEILING", "CheckPlan", "Engine", "ScriptCall", "SettlePlan", "Settled", "Steps"]

log = logging.getLogger("budgetguard")

# No model produces this many tokens in one call; a larger value is a bug upstream.
MAX_OUTPUT_TOKENS_CEILING = 10_000_000
_MAX_TAGS = 32
_MAX_REQUEST_ID = 256

# Route kinds in the reserve script's calling convention.
_REQUESTED, _USER_ROUTE, _ORG_ROUTE, BOTH_ROUTES = 0, 1, 2, 3
_ORG_WINDOWS_MASK = 0b11000  # org.daily and org.monthly: their first denial always alerts
_USER_WINDOWS_MASK = 0b00111
_DAY_MS = 86_400_000
# A void marker outlives the lease its reserve would take by this much (a reserve that runs
# later still would take a lease that has lapsed by then).
_VOID_MARGIN_MS = 60_000
# Long ids stay out of the per-user spend rankings' members (they are hashed instead).
_MAX_SPENDER = 200


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
    calls: tuple[Settle, ...]  # one; on a cluster the user's part, then the org's
    decision: Decision
    event: Event  # without "outcome" until the script's reply says whether the lease had lapsed
    state: str  # the settled state this call writes (its own resend finds it)
    outcome: str
    lapsed_outcome: str
    windows: WindowSet  # the windows charged
    now: datetime
    cost: int | None = None  # None: a release
    ranks: tuple[str, str] = ("", "")  # the spender and feature in the org's rankings


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
    policy: UserPolicy
    tags: Mapping[str, str]
    max_output_tokens: int
    rid: str
    now: datetime
    windows: WindowSet
    user_prefix: str
    candidates: list[Candidate] = field(default_factory=list)
    dropped_for_cost: bool = False
    call: ScriptCall | None = None  # the first (on a single Redis, the only) reserve call
    parts: str = BOTH  # the parts ``call`` reserves
    decision: Decision | None = None
    user_amount: int | None = None  # on a cluster: what the user part holds
    org_local: bool = False  # the org's part came from this process's slice
    org_own: bool = False  # a repeat whose user part is the original's but whose org reservation is its own
    # Names this attempt's void marker: a caller that gave up on the reply voids the reserve.
    attempt: str = field(default_factory=lambda: os.urandom(8).hex())


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


def _epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


# A compensated user part: not a live reservation (a request id reserves afresh) and not
# settled (the decision's own record or release still applies).
_GIVEN_BACK = "C|0|released|"


def settled_state(candidate: int, cost_nano: int | None) -> str:
    # The nonce tells this call's own resend (same state) from a second settle call.
    return f"S|{candidate}|{'released' if cost_nano is None else cost_nano}|{os.urandom(4).hex()}"


def _validate_text(name: str, value: Any, *, max_len: int | None = None) -> str:
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


def _user_plan(tier: Any, plans: Any) -> str | None:
    """The user's plan for a call: ``tier``, or ``plans["user"]`` (the user budget's plan)."""
    if tier is not None:
        tier = _validate_text("tier", tier, max_len=256)
    if plans is None:
        return tier
    if not isinstance(plans, Mapping):
        raise InvalidArgumentType(f"plans must be a mapping of budget name to plan, got {type(plans).__name__}")
    for budget, plan in plans.items():
        if budget != "user":
            raise InvalidArgument(f"plans[{str(budget)[:64]!r}]: no budget of that name has plans (budgets with "
                                  "plans: user)")
        plan = _validate_text("plans['user']", plan, max_len=256)
        if tier is not None and plan != tier:
            raise InvalidArgument(f"tier={tier!r} and plans['user']={plan!r} disagree")
        tier = plan
    return tier


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


class Engine:
    """``split``: run each operation per hash slot (user part, then org part), for Redis Cluster."""

    def __init__(self, config: Config, clock: Callable[[], datetime], *, split: bool = False) -> None:
        from .pricing import Pricebook

        self.config = config
        org = config.org
        # The org's part of checks from in-process slices (opt-in): its own hash slot's
        # calls become one per slice, so it runs split even on a single Redis.
        self.slices = OrgSlices(usd_to_nano(org.slice_usd), int(org.slice_flush_s * 1000),
                                config.reservation_ttl_s * 1000) if org.slice_usd else None
        self.split = split or self.slices is not None
        self.prices = Pricebook(config.models)
        self.policies = Policies(config)
        self._clock = clock
        self._windows = WindowClock(config.tz)
        self._prefix = config.key_prefix
        self.keys = KeySpace(config.key_prefix)
        self._org_prefix = self.keys.org
        # A settled request's state outlives its lease so that retries and late
        # records still find it; window keys outlive their window by a day.
        self._state_ms = (2 * config.reservation_ttl_s + 3600) * 1000
        self._grace_ms = (config.reservation_ttl_s + 86_400) * 1000
        self._lease_ms = config.reservation_ttl_s * 1000
        # Per (policy, hour): the packed "cap,threshold,end" argument, built once.
        self._specs: dict[tuple[int, str], str] = {}
        self._thresholds: dict[int, str] = {}  # per policy: the settle script's alert thresholds
        # Spend history feeds anomaly baselines and forecasts: keep a baseline and a month.
        self._history_ms = (max(config.anomaly.baseline_days, 31) + 2) * _DAY_MS
        self._stream_maxlen = str(config.events.stream_maxlen)
        # Anomaly baselines per UTC hour ("YYYYMMDDHH"), filled in the background (alerts.anomaly).
        self.anomaly_baselines: dict[str, Baseline | None] = {}
        self.notices = Notices(config.key_prefix, self.policies.org, self.anomaly_baselines, config.anomaly.sigmas)
        self._snapshots: dict[str, tuple[dict[str, str], str | None]] = {}
        self._ends: dict[str, list[int]] = {}
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

    def _ends_ms(self, windows: WindowSet) -> list[int]:
        # The hour names the whole set (the day and month contain it): compute once per hour.
        ends = self._ends.get(windows.h.stamp)
        if ends is None:
            if len(self._ends) > 64:
                self._ends.clear()
            ends = self._ends[windows.h.stamp] = [_epoch_ms(windows.of(spec.period).end) for spec in WINDOWS]
        return ends

    def _user_prefix(self, user: str) -> str:
        return self.keys.user(user)

    def _part_keys(self, user_prefix: str, windows: WindowSet, parts: str) -> tuple[str, ...]:
        return self.keys.parts(user_prefix, windows, parts)

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
        stored conversation), so its size is unknown here: the tier's
        ``per_request.max_input_tokens`` is reserved for the input, and without one the
        check is denied. ``tier`` (or ``plans={"user": ...}``) is the user's plan for this
        call, decided at run time. Raises InvalidArgument / InvalidArgumentType on malformed
        input, before anything is reserved.
        """
        user = _validate_text("user", user)
        model = _validate_text("model", model, max_len=256)
        if max_tokens is not None:
            max_tokens = check_token_count(max_tokens, "max_tokens", minimum=1, maximum=MAX_OUTPUT_TOKENS_CEILING)
        tags = _validate_tags(tags)
        if request_id is not None:
            request_id = _validate_text("request_id", request_id, max_len=_MAX_REQUEST_ID)
        policy = self.policies.for_user(user, _user_plan(tier, plans))
        max_out = max_tokens or policy.max_output_tokens or self.config.default_max_output_tokens
        # Estimating also validates messages/tools, so it runs before any early denial.
        input_tokens = self._estimate(model, messages, tools, prompt, system)

        user_prefix = self._user_prefix(user)
        if request_id is None:
            rid = os.urandom(16).hex()
        else:  # scoped to the user: two users' "req-1" are two requests
            rid = hashlib.sha256(f"{user_prefix}\0{request_id}".encode("utf-8", "surrogatepass")).hexdigest()[:32]
        now = self.now()
        plan = CheckPlan(user, model, policy, tags, max_out, rid, now, self._windows.at(now), user_prefix)

        if not policy.allows(model):
            return self._deny_local(plan, input_tokens, "model.not_allowed",
                                    f"model {model!r} is not allowed for tier {policy.tier!r}")
        price = self._price(model)
        if price is None:
            return self._deny_local(plan, input_tokens, "model.unknown_price",
                                    f"no price is known for model {model!r} (unknown_model: deny)")
        if policy.max_output_tokens is not None and max_out > policy.max_output_tokens:
            return self._deny_local(plan, input_tokens, "request.max_output_tokens",
                                    f"max_tokens={max_out} exceeds the per-request cap of "
                                    f"{policy.max_output_tokens}")
        # Files and stored items in the messages are billed by what the provider makes of
        # them: whoever calls, they are reserved at the tier's input cap like fetched input.
        fetched_input = fetched_input or uncountable_input(messages)
        if fetched_input:
            if policy.max_input_tokens is None:
                return self._deny_local(plan, input_tokens, "request.max_input_tokens",
                                        "part of the input is fetched by the provider (a file, a URL, a stored "
                                        "conversation), so only a per-request input cap bounds it; tier "
                                        f"{policy.tier!r} sets none")
            input_tokens = max(input_tokens, policy.max_input_tokens)
        if policy.max_input_tokens is not None and input_tokens > policy.max_input_tokens:
            return self._deny_local(plan, input_tokens, "request.max_input_tokens",
                                    f"the input is about {input_tokens} tokens; the per-request cap is "
                                    f"{policy.max_input_tokens}")

        candidates = [Candidate(model, price, input_tokens, price.estimate_nano(input_tokens, max_out), _REQUESTED)]
        routes = ((_USER_ROUTE, policy.routes.get(model)), (_ORG_ROUTE, self.policies.org.routes.get(model)))
        for route, target in routes:
            if target is None or not policy.allows(target) or target == model:
                continue
            same_target = next((i for i, c in enumerate(candidates) if c.model == target), None)
            if same_target is not None:  # the tier and the org route alike: either may trigger it
                candidates[same_target] = dataclasses.replace(candidates[same_target], route=BOTH_ROUTES)
                continue
            target_price = self._price(target)
            if target_price is None:  # config validation makes this unreachable; stay safe
                continue
            # Most routes stay within a tokenizer family: count again only if it differs.
            same = self._tokenizer(target) == self._tokenizer(model)
            tokens = input_tokens if same else self._estimate(target, messages, tools, prompt, system)
            if fetched_input and policy.max_input_tokens is not None:
                tokens = max(tokens, policy.max_input_tokens)  # the floor holds for every model
            if policy.max_input_tokens is not None and tokens > policy.max_input_tokens:
                continue  # counted with its own tokenizer, the input is over the cap for this model
            amount = target_price.estimate_nano(tokens, max_out)
            candidates.append(Candidate(target, target_price, tokens, amount, route))
        if policy.max_cost_nano is not None:
            affordable = [c for c in candidates if c.amount_nano <= policy.max_cost_nano]
            if not affordable:
                cheapest = min(c.amount_nano for c in candidates)
                return self._deny_local(plan, input_tokens, "request.max_cost",
                                        f"the worst-case cost {_fmt(cheapest)} exceeds the per-request cap of "
                                        f"{_fmt(policy.max_cost_nano)}", cheapest)
            plan.dropped_for_cost = affordable[0] is not candidates[0]
            candidates = affordable
        plan.candidates = candidates
        plan.parts = USER if self.split else BOTH
        plan.call = self._reserve(plan, plan.parts).call()
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

    def _window_spec(self, policy: UserPolicy, windows: WindowSet) -> str:
        key = (id(policy), windows.h.stamp)  # the hour fixes the day and month too
        spec = self._specs.get(key)
        if spec is None:
            if len(self._specs) > 4096:  # a new hour (or many overridden users): start over
                self._specs.clear()
            caps = (*policy.caps, *self.policies.org.caps)
            triggers = (*policy.triggers, *self.policies.org.triggers)
            spec = self._specs[key] = ",".join(
                f"{-1 if cap is None else cap},{-1 if trigger is None else trigger},{end}"
                for cap, trigger, end in zip(caps, triggers, self._ends_ms(windows), strict=True)
            )
        return spec

    def _reserve(self, plan: CheckPlan, parts: str, offered: Sequence[bool] | None = None,
                 user_triggered: bool = False, probe: bool = False) -> Reserve:
        prefix, w = plan.user_prefix, plan.windows
        now_ms = _epoch_ms(plan.now)
        slot = self._org_prefix if parts == ORG else prefix
        return Reserve(
            state_key=KeySpace.request(slot, plan.rid), void_key=KeySpace.void(slot, plan.attempt),
            part_keys=self._part_keys(prefix, w, parts),
            blocked_key=None if parts == USER else self.keys.blocked,
            now_ms=now_ms, lease_deadline_ms=now_ms + self._lease_ms, state_ttl_ms=self._state_ms,
            grace_ms=self._grace_ms, user_prefix=prefix, org_prefix=self._org_prefix,
            user_suffixes=f"|{w.h.stamp}|{w.d.stamp}|{w.m.stamp}", org_suffixes=f"|{w.d.stamp}|{w.m.stamp}",
            rid=plan.rid, windows=self._window_spec(plan.policy, w),
            candidates=",".join(f"{c.amount_nano if offered is None or offered[i] else -1},{c.route}"
                                for i, c in enumerate(plan.candidates)),
            # A tier opts its users into alerts with alert_at; the org's blocks always alert.
            alert_mask=_ORG_WINDOWS_MASK | (_USER_WINDOWS_MASK if plan.policy.alert_at else 0),
            parts=parts, user_triggered=user_triggered, probe=probe, attempt=plan.attempt)

    def check_steps(self, plan: CheckPlan) -> Steps:
        """The reserve calls of a planned check; returns the :class:`Reserved` over all windows.

        On a cluster the user part goes first. The org part is offered only the candidates
        the user part could hold (no dearer than what it holds), so its choice is what one
        script would choose, and a denial there gives the user part back before returning.
        A denial by the user part still probes the org part, so that the denial names the
        window that resets last and claims the org's first-denial alert, as one script would
        (not with org slices, which make the org's windows look full).
        """
        assert plan.call is not None
        if not self.split:
            return Reserved.parse((yield plan.call), plan.parts)
        user = Reserved.parse((yield plan.call), USER)
        if user.code == VOIDED:
            return user
        if user.code == DENIED and self.slices is not None:
            # The org's windows hold every process's slice in full: probing them would name
            # (and alert on) an org cap that other calls may still have room under.
            return user
        if user.code == DENIED:
            cheapest = min(range(len(plan.candidates)), key=lambda i: plan.candidates[i].amount_nano)
            try:
                raw = yield self._reserve(plan, ORG, [i == cheapest for i in range(len(plan.candidates))],
                                          probe=True).call()
                probed = Reserved.parse(raw, ORG)
            except BudgetGuardError:
                probed = None
            if probed is None or probed.code == REPEAT:  # unreachable, or a live reservation of this id: no news
                probed = Reserved(DENIED)
            return user.merged(probed, code=DENIED, chosen=0, blockers=user.blockers | probed.blockers,
                               triggered=user.triggered | probed.triggered, notices=user.notices + probed.notices)
        if user.code == REPEAT:  # a live request id: the org part holds the model it chose, if it got that far
            state = user.state.split("|")
            plan.user_amount = int(state[2])
            held = self.slices.held_for(plan.rid) if self.slices is not None else None
            if held is not None:  # held in this process's slice
                plan.org_local = True
                return Reserved(REPEAT, state=f"L|{held[0]}|{held[1]}|{state[3]}|{state[4]}")
            # Otherwise the org part is asked in Redis: a live org reservation of this id
            # answers as a repeat; one held in another process's slice is reserved again
            # (the settle that applies the user part charges the org, once).
            offered = [c.amount_nano <= plan.user_amount for c in plan.candidates]
        else:
            plan.user_amount = plan.candidates[user.chosen - 1].amount_nano
            used = [s + r for s, r in zip(user.spent[:3], user.reserved[:3], strict=True)]
            offered = [c.amount_nano <= plan.user_amount
                       and all(cap is None or u + c.amount_nano <= cap
                               for cap, u in zip(plan.policy.caps, used, strict=True))
                       for c in plan.candidates]
        user_triggered = user.code == RESERVED and user.triggered & _USER_WINDOWS_MASK != 0
        org = None
        crossings: tuple[str, ...] = ()
        if self.slices is not None and user.code == RESERVED:
            org, crossings = yield from self._slice_part(plan, offered, user_triggered)
        if org is None:
            try:
                org = Reserved.parse((yield self._reserve(plan, ORG, offered, user_triggered).call()), ORG)
            except BudgetGuardError:
                if user.code == RESERVED:  # a repeat's user part belongs to the call that reserved it
                    yield from self._give_back_user_part(plan)
                raise
        if org.code == VOIDED:
            if user.code == RESERVED:
                yield from self._give_back_user_part(plan)
            return org
        if org.code == REPEAT:
            return org
        if user.code == REPEAT and org.code == RESERVED:
            # A repeat whose org part was held elsewhere (another process's slice, or a
            # process that died between the parts): it stands as a repeat, with an org
            # reservation of its own that its settle gives back if the user part was
            # settled by the original call.
            plan.org_own = True
            state = user.state.split("|")
            return Reserved(REPEAT, state=f"L|{org.chosen}|{plan.candidates[org.chosen - 1].amount_nano}|"
                                          f"{state[3]}|{state[4]}")
        if org.code == DENIED and user.code == RESERVED:
            yield from self._give_back_user_part(plan)
        mine = user if user.code == RESERVED else Reserved(DENIED)  # a repeat's user figures are not news
        return mine.merged(org, blockers=org.blockers | (user.blockers if mine is user and org.code == RESERVED
                                                          else 0),
                           triggered=org.triggered | mine.triggered, notices=org.notices + crossings)

    def _slice_part(self, plan: CheckPlan, offered: Sequence[bool], user_triggered: bool) -> Steps:
        """The org's part from this process's slice, refilled once if short.

        Returns (reply or None: ask Redis, crossings a refill reported).
        """
        slices = self.slices
        assert slices is not None
        w = plan.windows
        stamps = (w.d.stamp, w.m.stamp)
        now_ms = _epoch_ms(plan.now)
        crossings: tuple[str, ...] = ()
        for attempt in (0, 1):
            spent_d, spent_m, reserved_d, reserved_m = slices.figures
            triggered = 0
            for bit, (used, trigger) in enumerate(zip((spent_d + reserved_d, spent_m + reserved_m),
                                                      self.policies.org.triggers, strict=True), start=3):
                if trigger is not None and used >= trigger:
                    triggered |= 1 << bit
            first = self._first_choice(plan, offered, user_triggered, triggered != 0)
            if first is None:
                break
            if slices.take(plan.rid, stamps, first, now_ms, now_ms + self._lease_ms):
                plan.org_local = True
                spent_d, spent_m, reserved_d, reserved_m = slices.figures
                return Reserved(RESERVED, first[0], 0, triggered, (0, 0, 0, spent_d, spent_m),
                                (0, 0, 0, reserved_d, reserved_m)), crossings
            refill = slices.begin(stamps, now_ms, extra=first[1]) if attempt == 0 else None
            if refill is None:
                break
            crossings = yield from self._refill(refill)
        return None, crossings

    @staticmethod
    def _first_choice(plan: CheckPlan, offered: Sequence[bool], user_triggered: bool,
                      org_triggered: bool) -> tuple[int, int] | None:
        """The candidate (1-based index, amount) reserve.lua tries first: a triggered route, else
        the requested model, else another route."""
        def rank(c: Candidate) -> int:
            if c.route == _REQUESTED:
                return 1
            triggered = ((c.route in (_USER_ROUTE, BOTH_ROUTES) and user_triggered)
                         or (c.route in (_ORG_ROUTE, BOTH_ROUTES) and org_triggered))
            return 0 if triggered else 2

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

    def _slice(self, refill: Refill, now: datetime) -> Slice:
        org = self._org_prefix
        windows = self._windows.at(now)
        d, m = refill.stamps
        hour = f"{now:%Y%m%d%H}"
        ends = self._ends_ms(windows)
        caps = self.policies.org.caps
        baseline = self.anomaly_baselines.get(hour)
        now_ms = _epoch_ms(now)
        return Slice(
            state_key=KeySpace.request(org, refill.id),
            org_keys=(KeySpace.leases(org), self.keys.org_window(d), self.keys.org_window(m),
                      *self.keys.rankings(now, d, m), self.keys.blocked),
            now_ms=now_ms, grace_ms=self._grace_ms, state_ttl_ms=self._state_ms, org_prefix=org,
            org_suffixes=f"|{d}|{m}", release=",".join(refill.release), slice_id=refill.id,
            deadline_ms=now_ms + self._lease_ms, want=refill.want, need=refill.need, ends=f"{ends[3]},{ends[4]}",
            caps=",".join("-1" if cap is None else str(cap) for cap in caps), thresholds=self._org_thresholds(),
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
            refill = self.slices.begin((w.d.stamp, w.m.stamp), _epoch_ms(now), final=final)
            if refill is None:
                break
            crossings += yield from self._refill(refill)
            if not final or refill.want == 0:
                break
        return crossings

    def slice_alerts(self, crossings: Sequence[str]) -> list[Alert]:
        """Alerts of the org thresholds, resolved blocks and anomalies a slice call reported."""
        now = self.now()
        # Org windows only: no user or tier in them.
        return self.notices.alerts(crossings, self._windows.at(now), "", self.policies.for_user(""), now)

    def flush_due(self) -> bool:
        if self.slices is None:
            return False
        now = self.now()
        w = self._windows.at(now)
        return self.slices.due((w.d.stamp, w.m.stamp), _epoch_ms(now))

    def _give_back_user_part(self, plan: CheckPlan) -> Steps:
        """Compensate a cluster check whose org part denied or failed: release the user part."""
        assert plan.user_amount is not None
        w = plan.windows
        member = f"{plan.rid}|{plan.user_amount}|{w.h.stamp}|{w.d.stamp}|{w.m.stamp}"
        call = Settle(
            state_key=KeySpace.request(plan.user_prefix, plan.rid),
            void_key=KeySpace.void(plan.user_prefix, plan.attempt),
            part_keys=self._part_keys(plan.user_prefix, w, USER), org_keys=(), now_ms=_epoch_ms(self.now()),
            state_ttl_ms=self._state_ms, grace_ms=self._grace_ms, user_prefix=plan.user_prefix,
            org_prefix=self._org_prefix, user_member=member, org_member="", cost=None,
            ends=",".join(map(str, self._ends_ms(w))), settled_state=_GIVEN_BACK + os.urandom(4).hex(),
            thresholds="", history_field="", history_ttl_ms=self._history_ms, spender="", feature="",
            anomaly_nano=None, event_head="", outcome="released", lapsed_outcome="released",
            stream_maxlen=self._stream_maxlen, parts=USER, void_ttl_ms=None, attempt="")
        try:
            yield call.call()
        except BudgetGuardError as exc:
            log.error("could not give back the user part of reservation %s of user %s (%s); it lapses after "
                      "reservation_ttl_s", plan.rid, printable(plan.user), exc)

    def _decision(self, plan: CheckPlan, candidate: Candidate | None, *, allowed: bool, reason: str,
                  limit: str | None, retry_after: int | None = None, amount: int | None = None,
                  input_tokens: int | None = None, enforced: bool = True, in_doubt: bool = False,
                  remaining: int | None = None, windows: WindowSet | None = None) -> Decision:
        if amount is None:
            amount = candidate.amount_nano if candidate else 0
        ticket = Ticket(
            request_key=KeySpace.request(plan.user_prefix, plan.rid),
            user_prefix=plan.user_prefix,
            org_prefix=self._org_prefix,
            windows=windows or plan.windows,
            amount_nano=amount,
            candidate=(plan.candidates.index(candidate) + 1) if candidate in plan.candidates else 0,
            user_amount_nano=plan.user_amount,
            org_local=plan.org_local,
            org_own=plan.org_own,
            owner=self,
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
            _ticket=ticket,
        )

    def _deny_local(self, plan: CheckPlan, input_tokens: int, limit: str, reason: str,
                    amount: int | None = None) -> CheckPlan:
        plan.decision = self._decision(plan, None, allowed=False, reason=f"denied: {reason}", limit=limit,
                                       amount=amount, input_tokens=input_tokens)
        return plan

    def read_check(self, plan: CheckPlan, reply: Reserved) -> Decision:
        if reply.code == REPEAT:
            return self._repeat(plan, reply.state)
        if reply.code == VOIDED:  # only a reserve that ran after its caller gave up on it (and voided it) reads this
            return self._decision(plan, None, allowed=False, limit="store.unavailable",
                                  reason="denied: this check was voided after the budget store answered too late")
        mask, triggered, spent, reserved = reply.blockers, reply.triggered, reply.spent, reply.reserved
        used = [s + r for s, r in zip(spent, reserved, strict=True)]
        caps = (*plan.policy.caps, *self.policies.org.caps)

        if reply.code == DENIED:
            cheapest = min(plan.candidates, key=lambda c: c.amount_nano)
            w = self._latest_reset(mask, plan.windows)
            spec = WINDOWS[w]
            cap = caps[w]
            assert cap is not None
            end = plan.windows.of(spec.period).end
            # Waiting helps only if the request fits every capped window when empty.
            fits_empty = all(c is None or cheapest.amount_nano <= c for c in caps)
            retry = math.ceil((end - plan.now).total_seconds()) if fits_empty else None
            reason = (f"denied: {spec.name} cap {_fmt(cap)} would be exceeded "
                      f"(spent {_fmt(spent[w])} + reserved {_fmt(reserved[w])} + this request "
                      f"{_fmt(cheapest.amount_nano)})")
            blocking = [i for i in range(len(WINDOWS)) if mask >> i & 1]
            if retry is not None and all(spent[i] + cheapest.amount_nano <= (caps[i] or 0) for i in blocking):
                # Only calls in flight stand in the way: they settle when they end, and their
                # leases lapse within reservation_ttl_s at the latest; the reset is no wait to name.
                retry = min(retry, self.config.reservation_ttl_s)
                reason += "; calls in flight hold the rest and settle when they end"
            return self._decision(plan, None, allowed=False, reason=reason, limit=spec.name,
                                  retry_after=retry, amount=cheapest.amount_nano,
                                  input_tokens=cheapest.input_tokens)

        chosen = plan.candidates[reply.chosen - 1]
        remaining = min((cap - u - chosen.amount_nano for cap, u in zip(caps, used, strict=True) if cap is not None),
                        default=None)
        if chosen.route == _REQUESTED:
            return self._decision(plan, chosen, allowed=True, reason="allowed", limit=None, remaining=remaining)
        if plan.dropped_for_cost:
            limit = "request.max_cost"
            why = f"the worst case for {plan.requested} exceeds the per-request cap"
        elif mask > 0:
            limit = WINDOWS[self._latest_reset(mask, plan.windows)].name
            why = f"{plan.requested} would exceed {limit}, {chosen.model} fits"
        else:
            scopes = {_USER_ROUTE: ("user",), _ORG_ROUTE: ("org",)}.get(chosen.route, ("user", "org"))
            w = next(i for i, spec in enumerate(WINDOWS) if spec.scope in scopes and triggered >> i & 1)
            limit = WINDOWS[w].name
            cap = caps[w]
            assert cap is not None
            why = f"{limit} is at {Decimal(used[w] * 100) / cap:.0f}% of {_fmt(cap)}"
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
            raise InvalidArgument("request_id is already in use by a live reservation for a different request "
                                  "(another model or size); use a new request_id")
        candidate = plan.candidates[i]
        windows = windows_at(datetime.fromtimestamp(int(reserved_ms) / 1000, UTC), self.config.tz)
        return self._decision(plan, candidate, allowed=True, limit=None, amount=int(amount), windows=windows,
                              reason="allowed: a repeat of a live reservation (same request id), which stands")

    @staticmethod
    def _latest_reset(mask: int, windows: WindowSet) -> int:
        """Of the windows in ``mask``, the one that resets last: waiting for it is what helps."""
        blocking = [i for i in range(len(WINDOWS)) if mask >> i & 1]
        return max(blocking, key=lambda i: (windows.of(WINDOWS[i].period).end, i))

    def unavailable(self, plan: CheckPlan, error: BaseException) -> Decision:
        """The decision when Redis cannot answer, per ``fail_mode``."""
        candidate = plan.candidates[0]
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
        if t.owner is not self:
            # Another guard's decision would be charged at this guard's prices on this guard's
            # ledger, and its own reservation left to lapse.
            raise InvalidArgument(f"this decision (reservation {decision.reservation_id}) was taken by another "
                                  f"BudgetGuard (key prefix {t.user_prefix.split(':', 1)[0]!r}); settle it with "
                                  "the guard that took it")
        return t

    def settle_call(self, decision: Decision, usage: Usage | None, *, outcome: str | None = None,
                    error: str | None = None, latency_ms: int | None = None, logged: bool = True,
                    details: CallDetails | None = None) -> SettlePlan:
        """Record ``usage`` against a decision's reservation, or release it (``usage`` None).

        A decision whose reserve is in doubt (sent, never answered) is voided as it settles.
        ``logged=False`` writes no usage event (a void nobody asked for).
        """
        t = self.ticket(decision)
        cost, input_cost = None, 0
        if usage is not None:
            price = self._price(decision.model)
            if price is None:
                raise InvalidArgument(f"cannot price usage: no price is known for model {decision.model!r}")
            input_cost, cost = price.cost_parts_nano(usage)
        now = self.now()
        now_ms = _epoch_ms(now)
        user_member, org_member = t.members(decision.reservation_id)
        # A record that arrives after the reservation's hour key has expired charges the
        # current windows: late spend is still spend.
        expired = self._ends_ms(t.windows)[0] + self._grace_ms <= now_ms
        charge = self._windows.at(now) if expired else t.windows
        policy = self.policies.for_user(decision.user, decision.tier)
        org = t.org_prefix
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
        org_keys = self.keys.rankings(now, charge.d.stamp, charge.m.stamp)
        head = stream_head(event) if self._stream_maxlen != "0" and logged else ""
        feature = _ranked(decision.tags.get("feature", ""))
        part = functools.partial(
            Settle, org_keys=(), now_ms=now_ms, state_ttl_ms=self._state_ms, grace_ms=self._grace_ms,
            user_prefix=t.user_prefix, org_prefix=org, user_member=user_member, org_member=org_member, cost=cost,
            ends=",".join(map(str, self._ends_ms(charge))), settled_state=state,
            thresholds=self._alert_thresholds(policy), history_field=hour[8:], history_ttl_ms=self._history_ms,
            spender=spender, feature=feature, anomaly_nano=None if baseline is None else baseline.threshold_nano,
            event_head="", outcome=outcome, lapsed_outcome=lapsed, stream_maxlen=self._stream_maxlen,
            void_ttl_ms=self._lease_ms + _VOID_MARGIN_MS if t.in_doubt else None, attempt=t.attempt)
        ranks = (spender, feature)
        user_void, org_void = KeySpace.void(t.user_prefix, t.attempt), KeySpace.void(org, t.attempt)
        user_call = part(state_key=t.request_key, void_key=user_void,
                         part_keys=self._part_keys(t.user_prefix, charge, USER), parts=USER)
        if t.org_local:  # the org's part is settled in memory, after the user's
            return SettlePlan((user_call,), decision, event, state, outcome, lapsed, charge, now, cost, ranks)
        if not self.split:
            calls: tuple[Settle, ...] = (part(
                state_key=t.request_key, void_key=user_void, part_keys=self._part_keys(t.user_prefix, charge, BOTH),
                org_keys=org_keys, event_head=head, parts=BOTH),)
        else:
            # The user's part first: its request state decides whether this settle applies,
            # so the org (and the usage event with it) is charged once, by whoever got there.
            calls = (user_call, part(
                state_key=KeySpace.request(org, decision.reservation_id), void_key=org_void,
                part_keys=self._part_keys(t.user_prefix, charge, ORG), org_keys=org_keys, event_head=head,
                parts=ORG))
        return SettlePlan(calls, decision, event, state, outcome, lapsed, charge, now, cost, ranks)

    def renew_steps(self, decision: Decision) -> Steps:
        """Move a live reservation's lease on by ``reservation_ttl_s``; returns whether it was live."""
        t = self.ticket(decision)
        if not decision.allowed or not decision.enforced:
            return False
        now_ms = _epoch_ms(self.now())
        user_member, org_member = t.members(decision.reservation_id)
        org = t.org_prefix

        def renew(state_key: str, lease_keys: tuple[str, ...], parts: str) -> ScriptCall:
            return Renew(state_key, lease_keys, now_ms, now_ms + self._lease_ms, self._state_ms, user_member,
                         org_member, parts).call()

        if not self.split:
            return int((yield renew(t.request_key, (KeySpace.leases(t.user_prefix), KeySpace.leases(org)), BOTH))) == 1
        renewed = int((yield renew(t.request_key, (KeySpace.leases(t.user_prefix),), USER))) == 1
        if t.org_local and self.slices is not None:
            return self.slices.renew(decision.reservation_id, now_ms + self._lease_ms) and renewed
        org_renewed = int((yield renew(KeySpace.request(org, decision.reservation_id), (KeySpace.leases(org),),
                                       ORG))) == 1
        return renewed and org_renewed

    @staticmethod
    def void_steps(plan: SettlePlan) -> Steps:
        """Void an in-doubt decision: every part of its release, each whatever the others
        answered, so that each hash slot its reserve could reach holds the void marker.
        A failure is raised; running the whole again is safe (each part applies once)."""
        for call in plan.calls:
            yield call.call()

    def settle_steps(self, plan: SettlePlan) -> Steps:
        """The settle calls of ``plan``; returns (the event-carrying part's :class:`SettleReply`,
        the user part's or None on a single Redis, crossings of a slice flush it ran).

        On a cluster the org's part runs only when the user's applied for this call.
        """
        t = plan.decision._ticket
        if not self.split:
            return SettleReply.parse((yield plan.calls[0].call())), None, ()
        user = SettleReply.parse((yield plan.calls[0].call()))
        mine = user.own(plan.state)
        org = SettleReply(False)  # settled before: the org's part went with that settle
        crossings: tuple[str, ...] = ()
        if not mine.applied and t is not None and t.org_own:
            # The original call settled the user part (and charged the org): give back
            # the org reservation this repeat took for itself.
            org_release = dataclasses.replace(plan.calls[1], cost=None, event_head="")
            with contextlib.suppress(BudgetGuardError):  # else it lapses with its lease
                yield org_release.call()
        elif mine.applied and (t is None or not t.org_local or self.slices is None):
            try:
                org = SettleReply.parse((yield plan.calls[1].call()))
            except BudgetGuardError as exc:
                # The user part is settled and a new settle would not run again: as if the
                # process had died between the parts, the org misses this one request.
                log.error("settling the org part of reservation %s of user %s failed (%s): the user was "
                          "charged, the org's counters and the usage stream miss this request, and its org "
                          "reservation lapses after reservation_ttl_s", plan.decision.reservation_id,
                          printable(plan.decision.user), exc)
        elif mine.applied and self.slices is not None:
            outcome = plan.outcome if mine.live else plan.lapsed_outcome
            line = stream_head(plan.event) + outcome + '"}' if self._stream_maxlen != "0" else ""
            self.slices.settle(plan.decision.reservation_id,
                               Item(plan.cost or 0, plan.ranks[0], plan.ranks[1], line))
            org = SettleReply(True, mine.live)
            if self.flush_due():
                crossings = yield from self.flush_steps()
        return org, user, crossings

    def _org_thresholds(self) -> str:
        org = self.policies.org
        return ",".join(f"{w + 4},{level.normalize():f},{_ceil_share(cap, level)}"
                        for w, cap in enumerate(org.caps) if cap is not None for level in org.alert_at)

    def _alert_thresholds(self, policy: UserPolicy) -> str:
        packed = self._thresholds.get(id(policy))
        if packed is None:
            caps = (*policy.caps, *self.policies.org.caps)
            levels = (policy.alert_at,) * 3 + (self.policies.org.alert_at,) * 2
            packed = self._thresholds[id(policy)] = ",".join(
                f"{w + 1},{level.normalize():f},{_ceil_share(cap, level)}"
                for w, (cap, at) in enumerate(zip(caps, levels, strict=True)) if cap is not None
                for level in at
            )
        return packed

    def read_settle(self, plan: SettlePlan,
                    replies: tuple[SettleReply, SettleReply | None, tuple[str, ...]]) -> Settled:
        """Whether this settlement applied, the alerts it crossed, and its event.

        ``replies`` is what :meth:`settle_steps` returns: the part that carries the event,
        the user's part (None on a single Redis), and the crossings of a slice flush.
        """
        first, user, flushed = replies
        event_part = first.own(plan.state)
        user_part = user.own(plan.state) if user is not None else SettleReply(False)
        if not (event_part.applied or user_part.applied):
            return Settled(False, [], None)
        crossed = (event_part.crossings if event_part.applied else ()) + (
            user_part.crossings if user_part.applied else ())
        live = event_part.live
        event = dict(plan.event, outcome=plan.outcome if live else plan.lapsed_outcome) if event_part.applied else None
        d = plan.decision
        alerts = self.notices.alerts(crossed, plan.windows, d.user, self.policies.for_user(d.user, d.tier), plan.now)
        alerts += self.slice_alerts(flushed)  # a flush hands in spend on the windows of now
        return Settled(True, alerts, event)

    # -- alerts --------------------------------------------------------------------

    def check_alerts(self, plan: CheckPlan, reply: Reserved) -> list[Alert]:
        """The alerts a reserve reply reports: first denials by a cap, and resolved org blocks."""
        if reply.code in (REPEAT, VOIDED):
            return []
        return self.notices.alerts(reply.notices, plan.windows, plan.user, plan.policy, plan.now, reply.spent)

    def anomaly_alert(self, now: datetime, spent: int) -> Alert:
        return self.notices.anomaly(now, spent)

    def top_keys(self, alert: Alert) -> tuple[str | None, str | None]:
        """The org rankings (users, features) that name who spent in an alert's window."""
        if alert.kind == "anomaly":
            stamp = alert.window_key[2:12]
            return self.keys.top_users_hour(stamp), self.keys.top_features_hour(stamp)
        if alert.scope == "org" and alert.kind in ("threshold", "blocked", "forecast"):
            return self.keys.top_users(alert.window_key), None
        return None, None

    def log_call(self, lines: list[str]) -> ScriptCall:
        """Append finished event JSON lines to the usage stream."""
        return Log(self.keys.events, self._stream_maxlen, tuple(lines)).call()

    def denial_event(self, decision: Decision) -> Event:
        return denial_event(decision, self.now(), provider=self._snapshot(decision.model)[1])

    # -- status --------------------------------------------------------------------

    def status_steps(self, user: Any, tier: Any = None) -> Steps:
        """Read a user's and the org's windows (the caps of ``tier``, else the user's); returns a :class:`Status`."""
        user = _validate_text("user", user)
        policy = self.policies.for_user(user, _user_plan(tier, None))
        now = self.now()
        windows = self._windows.at(now)
        user_prefix = self._user_prefix(user)
        def status(parts: str) -> ScriptCall:
            return StatusCall(self._part_keys(user_prefix, windows, parts), _epoch_ms(now), user_prefix,
                              self._org_prefix, parts).call()

        if not self.split:
            reply = StatusReply.parse((yield status(BOTH)), BOTH)
        else:
            u = StatusReply.parse((yield status(USER)), USER)
            reply = u.merged(StatusReply.parse((yield status(ORG)), ORG))
        return self._read_status(user, windows, policy, reply)

    def _read_status(self, user: str, windows: WindowSet, policy: UserPolicy, reply: StatusReply) -> Status:
        caps = (*policy.caps, *self.policies.org.caps)
        result = {}
        for i, spec in enumerate(WINDOWS):
            cap = caps[i]
            result[spec.name] = WindowStatus(
                spent_usd=nano_to_usd(reply.spent[i]),
                reserved_usd=nano_to_usd(reply.reserved[i]),
                limit_usd=None if cap is None else nano_to_usd(cap),
                resets_at=windows.of(spec.period).end,
            )
        return Status(user=user, tier=policy.tier, windows=result)
