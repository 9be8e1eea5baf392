"""BudgetGuard: the public API, a thin sync and async shell over the engine and stores."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

import redis as redis_sync
import redis.asyncio as redis_async

from .admin import Admin
from .alerts.dispatch import Describe, Dispatcher
from .alerts.jobs import Invoke, Job, RetryPolicy, Sleep, alert_job, baseline_job, forecast_job, steps_job
from .alerts.model import Alert
from .config import Config, load_config
from .control import Change
from .decision import BudgetStatus, Decision, Status
from .details import CallDetails, details_from_response
from .engine import CheckPlan, Engine, Settled, SettlePlan
from .errors import BudgetExceeded, ConfigError, InvalidArgument, InvalidArgumentType
from .events import Event, JsonlSink, to_json
from .metrics import Metrics, config_models
from .redact import printable
from .store import (
    AsyncStore,
    Health,
    StoreUnavailable,
    SyncStore,
    ThreadedStore,
    connect,
    connect_async,
    is_cluster,
    is_memory,
)
from .streams import is_stream, wrap_stream
from .tokens import input_size
from .usage import Usage

__all__ = ["OFF_LOOP_CHARS", "BudgetGuard"]

#: An ``acheck`` whose input holds at least this much text estimates it in a worker thread.
OFF_LOOP_CHARS = 32_768

log = logging.getLogger("budgetguard")

F = TypeVar("F", bound=Callable[..., Any])
Submit = Callable[[Callable[[], Job], Describe], bool]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class BudgetGuard:
    """Reserve an LLM call's worst-case cost before it runs; settle the real cost after.

    ``check``/``record``/``release`` and their ``a``-prefixed twins share one engine,
    so the sync and async paths decide identically.
    """

    def __init__(
        self,
        config: Config,
        *,
        redis: redis_sync.Redis | None = None,
        async_redis: redis_async.Redis | None = None,
        redis_url: str | None = None,
        clock: Callable[[], datetime] | None = None,
        on_alert: Callable[[Alert], Any] | Sequence[Callable[[Alert], Any]] | None = None,
        on_event: Callable[[Event], Any] | Sequence[Callable[[Event], Any]] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if not isinstance(config, Config):
            raise InvalidArgumentType(f"config must be a budgetguard Config, got {type(config).__name__}")
        self.config = config
        self._url = redis_url or config.redis_url or os.environ.get("REDIS_URL") or "memory://"
        if async_redis is not None and redis is None and is_memory(self._url):
            raise InvalidArgument("async_redis= needs redis= (or a redis_url) for the sync calls too; "
                                  "otherwise they would keep a separate, embedded ledger")
        cluster = is_cluster(redis if redis is not None else async_redis if async_redis is not None else self._url)
        self._cluster = cluster
        self._clock = clock or _utcnow
        self._engine = Engine(config, self._clock, split=cluster)
        self._health = Health()
        # Prometheus counters for this guard; mount budgetguard.metrics.metrics_app(guard.metrics).
        if metrics is not None and not isinstance(metrics, Metrics):
            raise InvalidArgumentType(f"metrics must be a budgetguard.metrics.Metrics, got {type(metrics).__name__}")
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.know_models(config_models(config))  # the config's models get labels of their own
        self._owns_sync = redis is None
        self._sync = SyncStore(redis if redis is not None else connect(config, self._url), self._health,
                               self.metrics.observe_redis)
        self._owns_async = async_redis is None
        self._given_async = async_redis
        self._cluster_threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._async_stores: dict[asyncio.AbstractEventLoop, AsyncStore | ThreadedStore] = {}
        self._async_lock = threading.Lock()
        self._orphans: set[asyncio.Future[Any]] = set()  # cancelled checks and their releases, in flight
        self._on_alert = _callables("on_alert", on_alert)
        self._on_event = _callables("on_event", on_event)
        alerts = config.alerts
        lane = functools.partial(Dispatcher, RetryPolicy(alerts.retries, alerts.backoff_s), alerts.timeout_s,
                                 alerts.queue_size, alerts.flush_timeout_s,
                                 on_drop=functools.partial(self.metrics.observe_alert, "queue", "dropped"))
        self._dispatcher = lane(name="budgetguard-alerts")  # deliveries, forecasts, baselines
        self._events_lane = lane(name="budgetguard-events")  # denial events, JSONL, on_event
        # Its own lane: the slice flush sleeps between rounds and must not hold up alerts.
        self._slices_lane = lane(name="budgetguard-slices") if self._engine.slices is not None else None
        self._alerting = bool(self._on_alert or _any_sink(config))
        self._jsonl = JsonlSink(config.events.jsonl_path) if config.events.jsonl_path else None
        self._events_wanted = bool(self._on_event or self._jsonl)
        self._next_forecast: datetime | None = None
        # Per driver (this process's thread, or an event loop): when its scheduled slice
        # flush runs (monotonic s). Per driver, so that a flush stranded on a loop that
        # ended does not stop the others; a forked child starts with none.
        self._slice_flushes: dict[object, float] = {}
        # Operators' controls: assign plans, override limits, grant, top up, reset (budgetguard.admin).
        self.admin = Admin(lambda: self._engine, self._sync.drive, lambda steps: self._async_store().drive(steps),
                           self._admin_changed)
        os.register_at_fork(after_in_child=functools.partial(_forget_slice_flushes, weakref.ref(self)))
        atexit.register(_close_lanes_at_exit, weakref.ref(self))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **kwargs: Any) -> BudgetGuard:
        """Load limits.yaml and connect to its ``redis_url`` (or ``$REDIS_URL``, else embedded)."""
        return cls(load_config(path), **kwargs)

    @property
    def healthy(self) -> bool:
        """False while the budget store is failing (calls run under ``fail_mode``)."""
        return self._health.healthy

    def _async_store(self) -> AsyncStore | ThreadedStore:
        # asyncio connections belong to the loop that opened them: one store per loop,
        # kept while the loop lives (loops in several threads may use one guard).
        loop = asyncio.get_running_loop()
        store = self._async_stores.get(loop)
        if store is None:
            with self._async_lock:
                store = self._async_stores.get(loop)
                if store is None:
                    for closed in [lp for lp in self._async_stores if lp.is_closed()]:
                        del self._async_stores[closed]
                    store = self._async_stores[loop] = self._new_async_store()
        return store

    def _new_async_store(self) -> AsyncStore | ThreadedStore:
        if self._given_async is None and not self._owns_sync:
            return ThreadedStore(self._sync)
        if self._given_async is None and is_cluster(self._url):
            if self._cluster_threads is None:
                self._cluster_threads = concurrent.futures.ThreadPoolExecutor(
                    self.config.redis_max_connections, thread_name_prefix="budgetguard-cluster")
            return ThreadedStore(self._sync, self._cluster_threads)
        client = self._given_async or connect_async(self.config, self._url)
        embedded = self._given_async is None and is_memory(self._url)
        timeout = None if embedded else self.config.redis_timeout_ms / 1000
        return AsyncStore(client, self._health, timeout, self.metrics.observe_redis)

    # -- check -------------------------------------------------------------------------

    def check(self, user: str, model: str, messages: list[Any] | None = None, *,
              max_tokens: int | None = None, tags: Mapping[str, str] | None = None,
              request_id: str | None = None, tools: list[Any] | None = None,
              prompt: str | list[str] | None = None, system: Any = None,
              fetched_input: bool = False, tier: str | None = None,
              plans: Mapping[str, str] | None = None) -> Decision:
        """Reserve the call's worst case on every budget that applies. Never raises on a denial.

        ``tier`` (or ``plans={"user": ...}``) is the user's plan for this call, decided at
        run time (the application's own record of who pays for what); the user's overrides
        under ``users:`` apply on top. Unset, the config's ``users:``/``default_tier`` decide.
        """
        plan = self._engine.plan_check(user, model, messages, max_tokens=max_tokens, tags=tags,
                                       request_id=request_id, tools=tools, prompt=prompt, system=system,
                                       fetched_input=fetched_input, tier=tier, plans=plans)
        if plan.call is None:
            return self._checked(plan, None, sync=True)
        try:
            reply = self._sync.drive(self._engine.check_steps(plan))
        except StoreUnavailable as exc:
            reply = exc
        return self._checked(plan, reply, sync=True)

    async def acheck(self, user: str, model: str, messages: list[Any] | None = None, *,
                     max_tokens: int | None = None, tags: Mapping[str, str] | None = None,
                     request_id: str | None = None, tools: list[Any] | None = None,
                     prompt: str | list[str] | None = None, system: Any = None,
                     fetched_input: bool = False, tier: str | None = None,
                     plans: Mapping[str, str] | None = None) -> Decision:
        plan_check = functools.partial(self._engine.plan_check, user, model, messages, max_tokens=max_tokens,
                                       tags=tags, request_id=request_id, tools=tools, prompt=prompt, system=system,
                                       fetched_input=fetched_input, tier=tier, plans=plans)
        if input_size(messages, tools, prompt, system, limit=OFF_LOOP_CHARS) >= OFF_LOOP_CHARS:
            # Counting this much text takes milliseconds to seconds: not on the event loop,
            # where it would hold up every other request (and their Redis deadlines).
            plan = await asyncio.to_thread(plan_check)
        else:
            plan = plan_check()
        if plan.call is None:
            return self._checked(plan, None, sync=False)
        running = asyncio.ensure_future(self._async_store().drive(self._engine.check_steps(plan)))
        try:
            reply = await asyncio.shield(running)
        except StoreUnavailable as exc:
            reply = exc
        except asyncio.CancelledError:
            # The caller gave up, but the script may still reserve: give that back.
            self._track(running)
            running.add_done_callback(functools.partial(self._release_orphan, plan))
            raise
        return self._checked(plan, reply, sync=False)

    def _track(self, future: asyncio.Future[Any]) -> None:
        """Keep ``future`` (a settle the caller no longer awaits) until it is done; aclose() waits."""
        self._orphans.add(future)
        future.add_done_callback(self._orphans.discard)

    def _release_orphan(self, plan: CheckPlan, running: asyncio.Future[Any]) -> None:
        if running.cancelled() or running.exception() is not None:
            return
        reply = running.result()
        # A denial holds nothing; a repeat's reservation belongs to the original call.
        if self._engine.reserved_now(reply):
            self._track(asyncio.ensure_future(self.arelease(self._engine.read_check(plan, reply))))

    def _decided(self, plan: CheckPlan, reply: Any) -> Decision:
        if plan.decision is not None:
            decision = plan.decision
        elif isinstance(reply, StoreUnavailable):
            decision = self._engine.unavailable(plan, reply)
        else:
            decision = self._engine.read_check(plan, reply)
        decision._started = time.monotonic()
        self.metrics.observe_decision(decision)
        level = logging.DEBUG if decision.allowed and not decision.downgraded else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "user=%s model=%s %s", printable(decision.user), printable(decision.model),
                    printable(decision.reason, 1000))
        return decision

    # -- reload and admin ----------------------------------------------------------------

    def reload(self, config: Config) -> None:
        """Swap the limits for ``config``'s while traffic runs.

        Checks from now on use the new limits; reservations taken before settle on exactly
        what they reserved (each decision carries its windows and what each one holds).
        ``redis_url``, ``key_prefix`` and the org's slices (``slice_usd``, ``slice_flush_s``)
        need a restart and raise :class:`ConfigError`; the alert lanes' sizes and timeouts and the JSON Lines
        path keep their first values.
        """
        if not isinstance(config, Config):
            raise InvalidArgumentType(f"config must be a budgetguard Config, got {type(config).__name__}")
        for name in ("redis_url", "key_prefix"):
            if getattr(config, name) != getattr(self.config, name):
                raise ConfigError(f"{name}: cannot change while running (restart to use the new value)")
        for name in ("slice_usd", "slice_flush_s"):
            if getattr(config.org, name) != getattr(self.config.org, name):
                raise ConfigError(f"org.{name}: the org's slices keep their size while running (restart to change it)")
        self._engine = Engine(config, self._clock, split=self._cluster, before=self._engine)
        self.config = config
        self.metrics.know_models(config_models(config))
        self._alerting = bool(self._on_alert or _any_sink(config))
        log.info("limits reloaded: %d tiers, %d budgets", len(config.tiers), len(config.budgets))

    def _admin_changed(self, change: Change, sync: bool) -> None:
        # The stream has the audit event already (the admin steps wrote it); the file and callbacks follow.
        if change.event is not None and self._events_wanted:
            self._submit(self._events_lane, sync, functools.partial(self._events_job, [change.event], False),
                         "an audit event")

    # -- background work -----------------------------------------------------------------

    def _submit(self, lane: Dispatcher, sync: bool, job: Callable[[], Job], what: Describe) -> bool:
        return lane.submit(lane.thread(self._sync) if sync else lane.task(self._async_store(), self._sync), job, what)

    def _alert_job(self, alert: Alert) -> Job:
        return alert_job(alert, self._engine, self._dispatcher.policy, self._on_alert, self.metrics.observe_alert)

    def _submit_alerts(self, alerts: list[Alert], sync: bool) -> None:
        if not self._alerting:
            return
        for alert in alerts:
            self._submit(self._dispatcher, sync, functools.partial(self._alert_job, alert),
                         functools.partial(_describe, alert))

    def _checked(self, plan: CheckPlan, reply: Any, sync: bool) -> Decision:
        """The decision for a reserve reply (None: decided locally), its alerts and denial event handed on."""
        decision = self._decided(plan, reply)
        if decision.allowed and self._engine.slices is not None:
            self._schedule_slice_flush(sync)
        if reply is not None and not isinstance(reply, StoreUnavailable):
            self._submit_alerts(self._engine.check_alerts(plan, reply), sync)
        if isinstance(reply, StoreUnavailable) and not decision.allowed:
            # Refused, but the reserve was sent and may still run when Redis catches up:
            # void it now rather than let it hold budget until its lease lapses.
            self._void(decision, sync)
        if not decision.allowed and decision.limit != "store.unavailable":
            event = self._engine.denial_event(decision)
            self.metrics.observe_event(event)
            self._submit(self._events_lane, sync, functools.partial(self._events_job, [event], True),
                         "a denial event")
        return decision

    def _after_settle(self, settled: Settled, sync: bool) -> bool:
        self._submit_alerts(settled.alerts, sync)
        if settled.event is not None:
            self.metrics.observe_event(settled.event)
        if settled.event is not None and self._events_wanted:
            self._submit(self._events_lane, sync, functools.partial(self._events_job, [settled.event], False),
                         "a usage event")
        if self._alerting and settled.event is not None:
            self._schedule_periodic(functools.partial(self._submit, self._dispatcher, sync))
        if self._engine.slices is not None and self._engine.slices.holding:
            self._schedule_slice_flush(sync)
        return settled.applied

    def _schedule_slice_flush(self, sync: bool) -> None:
        """While this process holds an org slice, renew it and hand in its spend every slice_flush_s."""
        lane = self._slices_lane
        assert lane is not None
        if lane.closed:
            return
        driver: object = "thread" if sync else asyncio.get_running_loop()
        now = time.monotonic()
        due = self._slice_flushes.get(driver)
        if due is not None and now < due + 2 * self.config.org.slice_flush_s + 1:
            return  # one is scheduled (a stale entry is one that never ran)
        self._slice_flushes[driver] = now + self.config.org.slice_flush_s
        if not self._submit(lane, sync, functools.partial(self._slice_job, sync, driver), "a slice flush"):
            self._slice_flushes.pop(driver, None)

    def _slice_job(self, sync: bool, driver: object) -> Job:
        slices = self._engine.slices
        assert slices is not None
        try:
            yield Sleep(self.config.org.slice_flush_s)
            crossings = yield from steps_job(self._engine.flush_steps())
            # A loop that ended hands its lane's work to the lane's thread: go on from there.
            sync = sync or not _loop_running()
            self._submit_alerts(self._engine.slice_alerts(crossings), sync)
        finally:
            self._slice_flushes.pop(driver, None)
        if slices.holding:
            self._schedule_slice_flush(sync or not _loop_running())

    def _schedule_periodic(self, submit: Submit) -> None:
        """Per process: this hour's anomaly baseline once, and a forecast at most hourly."""
        now = self._engine.now()
        stamp = f"{now:%Y%m%d%H}"
        engine = self._engine
        if self.config.anomaly.enabled and stamp not in engine.anomaly_baselines:
            if len(engine.anomaly_baselines) > 48:
                engine.anomaly_baselines.clear()
            engine.anomaly_baselines[stamp] = None  # requested: no threshold until it is loaded
            hour = now.replace(minute=0, second=0, microsecond=0)
            if not submit(functools.partial(baseline_job, engine, hour, self._alert_job), "an anomaly baseline"):
                engine.anomaly_baselines.pop(stamp, None)  # ask again on a later settle
        if self.config.org.forecast and (self._next_forecast is None or now >= self._next_forecast):
            self._next_forecast = now + timedelta(hours=1)
            submit(functools.partial(forecast_job, engine, now, self._alert_job), "a forecast")

    def _events_job(self, events: list[Event], denial: bool) -> Job:
        if denial and self.config.events.stream_maxlen:
            # Settled events are logged by the settle script itself; denials have no script to ride.
            yield self._engine.log_call([to_json(e) for e in events])
        if self._jsonl is not None:
            error = yield Invoke(self._jsonl.write, events)  # a file write: off the event loop
            if error is not None:
                log.error("usage events not written to %s: %s", self._jsonl.path, error)
        for fn in self._on_event:
            for event in events:
                error = yield Invoke(fn, event)
                if error is not None:
                    log.error("on_event callback %r failed: %r", fn, error)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until alerts and events queued by sync calls so far are handled (each lane within ``timeout``)."""
        limit = self.config.alerts.flush_timeout_s if timeout is None else timeout
        events_done = self._events_lane.flush(limit)
        return self._dispatcher.flush(limit) and events_done

    async def aflush(self, timeout: float | None = None) -> bool:
        """Wait until alerts and events queued by this loop's async calls so far are handled."""
        limit = self.config.alerts.flush_timeout_s if timeout is None else timeout
        events_done = await self._events_lane.aflush(limit)
        return await self._dispatcher.aflush(limit) and events_done

    # -- settle ------------------------------------------------------------------------

    def _record_plan(self, decision: Decision, response_or_usage: Any, incomplete: bool,
                     details: CallDetails | None = None) -> SettlePlan:
        if isinstance(decision, Decision) and not decision.allowed:
            raise InvalidArgument(f"cannot record usage for a denied decision (limit {decision.limit}); "
                                  "nothing was reserved for it")
        usage = Usage.from_response(response_or_usage)
        found = details_from_response(response_or_usage).merged(details)
        return self._engine.settle_call(decision, usage, outcome="stream_incomplete" if incomplete else "ok",
                                        latency_ms=_latency_ms(decision), details=found)

    def _release_plan(self, decision: Decision, error: BaseException | str | None) -> SettlePlan | None:
        # A denial reserved nothing, except a fail-closed one: its script may have run
        # after the deadline, and releasing is harmless when it did not.
        self._engine.ticket(decision)  # refuses another guard's decision, even a denial
        if not decision.allowed and decision.limit != "store.unavailable":
            return None
        text = None if error is None else (error if isinstance(error, str) else f"{type(error).__name__}: {error}")
        return self._engine.settle_call(decision, None, error=text, latency_ms=_latency_ms(decision))

    def renew(self, decision: Decision) -> bool:
        """Keep a reservation whose call is still answering: move its lease on by reservation_ttl_s.

        A lease that lapsed mid-answer would hand its headroom to new requests while the
        answer goes on spending it; the middleware and the proxy renew theirs while an answer
        is in flight. False when the reservation was settled, released or had lapsed, or
        when the store did not answer.
        """
        try:
            return bool(self._sync.drive(self._engine.renew_steps(decision)))
        except StoreUnavailable:
            return False

    async def arenew(self, decision: Decision) -> bool:
        try:
            return bool(await self._async_store().drive(self._engine.renew_steps(decision)))
        except StoreUnavailable:
            return False

    def record(self, decision: Decision, response_or_usage: Any, *, incomplete: bool = False,
               details: CallDetails | None = None) -> bool:
        """Replace the reservation with the actual cost. Applies once; True if this call applied it.

        ``incomplete=True`` marks usage counted from a stream that ended early. The usage
        event takes the finish reason and usage object of a response; ``details`` adds or
        overrides them (``streamed``, ``endpoint``).
        """
        return self._settled(decision, self._record_plan(decision, response_or_usage, incomplete, details))

    def release(self, decision: Decision, *, error: BaseException | str | None = None) -> bool:
        """Give the reservation back (the call failed). Applies once; True if this call applied it.

        ``error`` (the failure) is kept in the usage event, cut to 500 characters.
        """
        plan = self._release_plan(decision, error)
        return plan is not None and self._settled(decision, plan)

    async def arecord(self, decision: Decision, response_or_usage: Any, *, incomplete: bool = False,
                      details: CallDetails | None = None) -> bool:
        return await self._asettled(decision, self._record_plan(decision, response_or_usage, incomplete, details))

    async def arelease(self, decision: Decision, *, error: BaseException | str | None = None) -> bool:
        plan = self._release_plan(decision, error)
        return plan is not None and await self._asettled(decision, plan)

    def _settled(self, decision: Decision, plan: SettlePlan) -> bool:
        try:
            replies = self._sync.drive(self._engine.settle_steps(plan))
        except StoreUnavailable:
            return self._unsettled(decision, sync=True)
        return self._after_settle(self._engine.read_settle(plan, replies), sync=True)

    async def _asettled(self, decision: Decision, plan: SettlePlan) -> bool:
        settling: Awaitable[Any] = self._async_store().drive(self._engine.settle_steps(plan))
        if self._engine.split:
            # Shielded and tracked: a settle runs to its end even if the caller is
            # cancelled, so that a cluster's or a slice's second part is never cut from
            # the first. One script needs none of it (about 70 µs an arecord).
            running = asyncio.ensure_future(settling)
            self._track(running)
            settling = asyncio.shield(running)
        try:
            replies = await settling
        except StoreUnavailable:
            return self._unsettled(decision, sync=False)
        except asyncio.CancelledError:
            if self._engine.split:
                running.add_done_callback(functools.partial(self._settled_late, decision, plan))
            raise
        return self._after_settle(self._engine.read_settle(plan, replies), sync=False)

    def _settled_late(self, decision: Decision, plan: SettlePlan, running: asyncio.Future[Any]) -> None:
        """The end of a settle whose caller was cancelled: its alerts and events still go out."""
        if running.cancelled():
            return
        if running.exception() is not None:
            self._unsettled(decision, sync=False)
            return
        self._after_settle(self._engine.read_settle(plan, running.result()), sync=False)

    def _unsettled(self, decision: Decision, sync: bool) -> bool:
        log.error("budget store unavailable: settling reservation %s of user %s failed; its spend is not "
                  "counted and the reservation lapses after reservation_ttl_s", decision.reservation_id,
                  printable(decision.user))
        if decision._ticket is not None and decision._ticket.in_doubt:
            self._void(decision, sync)
        return False

    def _void(self, decision: Decision, sync: bool) -> None:
        """Void an in-doubt check in the background, retrying until its lease would have lapsed."""
        plan = self._engine.settle_call(decision, None, logged=False)
        self._submit(self._events_lane, sync, functools.partial(self._void_job, plan),
                     f"voiding reservation {decision.reservation_id}")

    def _void_job(self, plan: SettlePlan) -> Job:
        until = time.monotonic() + self.config.reservation_ttl_s
        delay = 0.05
        while True:
            try:
                yield from steps_job(self._engine.void_steps(plan))
                return
            except StoreUnavailable:
                if time.monotonic() + delay > until:
                    log.error("could not void reservation %s (the budget store did not answer); if its reserve "
                              "ran, it lapses after reservation_ttl_s", plan.decision.reservation_id)
                    return
            yield Sleep(delay)
            delay = min(2 * delay, 5.0)

    # -- reserve / limit ---------------------------------------------------------------

    def reserve(self, user: str, model: str, messages: list[Any] | None = None, **kwargs: Any) -> Reservation:
        """A context manager (``with`` or ``async with``) that raises BudgetExceeded when denied.

        Call ``d.record(response)`` inside the block; on exit the usage is recorded, or
        the reservation released when the block recorded nothing (an exception, a cancel).
        """
        return Reservation(self, user, model, messages, kwargs)

    def limit(self, user: Callable[[dict[str, Any]], str], *, model: str = "model",
              messages: str = "messages", max_tokens: str = "max_tokens",
              tags: Callable[[dict[str, Any]], Mapping[str, str]] | None = None,
              tier: Callable[[dict[str, Any]], str | None] | None = None) -> Callable[[F], F]:
        """Decorate a sync or async function that calls an LLM.

        ``user`` (and ``tags``, and ``tier``: the user's plan for the call) receive the
        call's arguments by name. The function's
        ``model``, ``messages`` and ``max_tokens`` arguments are read for the check, a
        downgraded model is swapped in, and the usage of the returned response is recorded.
        A returned stream (``stream=True``: any iterator or async iterator of events) is
        wrapped instead and settled when it ends, fails or is closed (see ``streams``).
        The ``max_tokens`` argument the function receives is at most what was reserved:
        left out (None), it is the tier's output cap, so the call cannot spend past its
        reservation. ``max_completion_tokens``, ``n`` and ``best_of`` (parameters or
        keyword arguments) count as in the OpenAI API: the larger cap, times the choices,
        is reserved, and each cap given is bounded by its share. A function without a
        ``max_tokens`` parameter (nor ``**kwargs``) is refused.
        """

        def decorate(fn: F) -> F:
            signature = inspect.signature(fn)
            for name in (model, messages):
                if name not in signature.parameters:
                    raise InvalidArgumentType(f"@limit: {fn.__qualname__} has no parameter {name!r}")
            var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
            if max_tokens not in signature.parameters and var_kw is None:
                raise InvalidArgumentType(f"@limit: {fn.__qualname__} has no parameter {max_tokens!r}, so the output "
                                          "of its calls could not be bounded by what is reserved for them")

            def arguments(bound: inspect.BoundArguments) -> tuple[dict[str, Any], dict[str, Any]]:
                """(the named arguments, the ``**kwargs`` dict, created if the function has one)."""
                args = bound.arguments
                extra = args.setdefault(var_kw, {}) if var_kw is not None else {}
                return args, extra

            def get(bound: inspect.BoundArguments, name: str) -> Any:
                args, extra = arguments(bound)
                return args[name] if name in signature.parameters else extra.get(name)

            def output(bound: inspect.BoundArguments) -> tuple[int | None, int]:
                """(the output cap over all choices, or None when the call sets none; the choices)."""
                caps = [v for v in (get(bound, max_tokens), get(bound, "max_completion_tokens"))
                        if isinstance(v, int) and not isinstance(v, bool)]
                choices = 1
                for name in ("n", "best_of"):
                    v = get(bound, name)
                    if isinstance(v, int) and not isinstance(v, bool) and v > 1:
                        choices *= v
                return (max(caps) * choices if caps else None), choices

            def bound_output(bound: inspect.BoundArguments, d: Decision) -> None:
                # What was reserved bounds what the call may produce (None would be unbounded).
                per_choice = d.max_output_tokens // output(bound)[1]
                if per_choice < 1:
                    raise InvalidArgument(f"the choices asked for cannot share the {d.max_output_tokens} output "
                                          "tokens reserved; ask for fewer or set max_tokens")
                args, extra = arguments(bound)
                given = False
                for name in (max_tokens, "max_completion_tokens"):
                    target = args if name in signature.parameters else extra
                    value = target.get(name)
                    if value is not None:
                        given = True
                        if not isinstance(value, int) or value > per_choice:
                            target[name] = per_choice
                if not given:
                    (args if max_tokens in signature.parameters else extra)[max_tokens] = per_choice

            def open_reservation(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[inspect.BoundArguments,
                                                                                          Reservation]:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                a = bound.arguments
                reservation = self.reserve(user(a), a[model], a.get(messages), max_tokens=output(bound)[0],
                                           tags=tags(a) if tags else None, tier=tier(a) if tier else None)
                return bound, reservation

            if inspect.iscoroutinefunction(fn):
                @functools.wraps(fn)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    bound, reservation = open_reservation(args, kwargs)
                    async with reservation as d:
                        bound.arguments[model] = d.model
                        bound_output(bound, d)
                        # Returned straight away, never held in a local: a frame kept alive
                        # elsewhere must not keep a stream from being finalized (and settled).
                        return reservation.note_result(await fn(*bound.args, **bound.kwargs))

                return async_wrapper  # type: ignore[return-value]

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                bound, reservation = open_reservation(args, kwargs)
                with reservation as d:
                    bound.arguments[model] = d.model
                    bound_output(bound, d)
                    return reservation.note_result(fn(*bound.args, **bound.kwargs))

            return wrapper  # type: ignore[return-value]

        return decorate

    # -- status / lifecycle ------------------------------------------------------------

    def status(self, user: str, *, tier: str | None = None, tags: Mapping[str, str] | None = None,
               plans: Mapping[str, str] | None = None) -> Status:
        """Spent, reserved, cap and reset time of every window of every budget that applies
        to ``user``'s calls with ``tags``: the user's, each matching budget's, the org's,
        keyed by limit name (``"user.hourly"``, ``"tenant.monthly"``).

        ``tier`` / ``plans``: show the caps of those plans (the ones the calls pass), not the config's.
        """
        return self._sync.drive(self._engine.status_steps(user, tier, tags, plans))  # type: ignore[no-any-return]

    async def astatus(self, user: str, *, tier: str | None = None, tags: Mapping[str, str] | None = None,
                      plans: Mapping[str, str] | None = None) -> Status:
        return await self._async_store().drive(  # type: ignore[no-any-return]
            self._engine.status_steps(user, tier, tags, plans))

    def budget_status(self, budget: str, value: str | None = None, *, plan: str | None = None) -> BudgetStatus:
        """One budget value's windows: ``budget_status("tenant", "acme")``, ``budget_status("org")``.

        ``value`` is None for a budget with one shared set of counters (and the org);
        ``plan`` shows that plan's caps instead of the value's own.
        """
        return self._sync.drive(self._engine.budget_status_steps(budget, value, plan))  # type: ignore[no-any-return]

    async def abudget_status(self, budget: str, value: str | None = None, *, plan: str | None = None) -> BudgetStatus:
        return await self._async_store().drive(  # type: ignore[no-any-return]
            self._engine.budget_status_steps(budget, value, plan))

    def _close_lanes(self) -> None:
        # Both lanes share one flush bound.
        started = time.monotonic()
        self._events_lane.close()
        self._dispatcher.close(max(0.0, self.config.alerts.flush_timeout_s - (time.monotonic() - started)))

    def _slices_given_back(self, crossings: list[str], sync: bool) -> None:
        # In the caller's thread (an async store may have run the steps in another).
        self._submit_alerts(self._engine.slice_alerts(crossings), sync)
        slices = self._engine.slices
        if slices is not None and slices.unreturned:
            log.error("org budget slices not handed back (the store did not answer): their unhanded spend is "
                      "lost to the org's counters, and they lapse after reservation_ttl_s")

    def _close_slices(self) -> None:
        """Stop the periodic flush, then hand in the last spend and give the slices back."""
        if self._slices_lane is None:
            return
        self._slices_lane.close(self.config.alerts.flush_timeout_s)
        self._slices_given_back(self._sync.drive(self._engine.flush_steps(final=True)), sync=True)

    def close(self) -> None:
        """Flush queued alerts and events (within ``alerts.flush_timeout_s``), then disconnect."""
        self._close_slices()
        self._close_lanes()
        self._disconnect()

    def _disconnect(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._owns_sync:
            self._sync.client.close()
        if self._cluster_threads is not None:
            self._cluster_threads.shutdown(wait=False)

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        # This loop's settles and cancelled checks still in flight (other loops' are theirs).
        while mine := [f for f in list(self._orphans) if f.get_loop() is loop]:
            await asyncio.gather(*mine, return_exceptions=True)
        if self._slices_lane is not None:
            await self._slices_lane.aclose(self.config.alerts.flush_timeout_s)
            self._slices_given_back(await self._async_store().drive(self._engine.flush_steps(final=True)),
                                    sync=False)
        started = time.monotonic()
        await self._events_lane.aclose()
        await self._dispatcher.aclose(max(0.0, self.config.alerts.flush_timeout_s - (time.monotonic() - started)))
        store = self._async_stores.pop(asyncio.get_running_loop(), None)
        if store is not None and self._owns_async and store.client is not None:
            await store.client.aclose()
        self._disconnect()

    def __enter__(self) -> BudgetGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> BudgetGuard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _callables(name: str, value: Any) -> list[Callable[[Any], Any]]:
    if value is None:
        return []
    if not callable(value) and not isinstance(value, (list, tuple)):
        raise InvalidArgumentType(f"{name} must be a callable or a list of callables, got {type(value).__name__}")
    items = [value] if callable(value) else list(value)
    for fn in items:
        if not callable(fn):
            raise InvalidArgumentType(f"{name} must be a callable or a list of callables, got {type(fn).__name__}")
    return items


def _any_sink(config: Config) -> bool:
    a = config.alerts
    return bool((a.slack and a.slack.webhook_url) or (a.pagerduty and a.pagerduty.routing_key)
                or (a.webhook and a.webhook.url))


def _forget_slice_flushes(ref: weakref.ref[BudgetGuard]) -> None:
    guard = ref()
    if guard is not None:
        guard._slice_flushes = {}


def _close_lanes_at_exit(ref: weakref.ref[BudgetGuard]) -> None:
    guard = ref()
    if guard is not None:
        guard._close_slices()  # a script that never called close() still hands in its spend
        guard._close_lanes()


def _describe(alert: Alert) -> str:
    return f"alert {alert.summary!r}"


def _latency_ms(decision: Decision) -> int | None:
    started = getattr(decision, "_started", 0.0)
    return round((time.monotonic() - started) * 1000) if started else None


class Reservation:
    """What ``guard.reserve(...)`` returns: a sync and async context manager around one call."""

    def __init__(self, guard: BudgetGuard, user: str, model: str, messages: Any, kwargs: dict[str, Any]) -> None:
        self._guard = guard
        self._args = (user, model, messages)
        self._kwargs = kwargs
        self.decision: Decision | None = None
        self._handed_off = False  # a stream settles the reservation, not the block's exit

    def _enter(self, decision: Decision) -> Decision:
        if not decision.allowed:
            raise BudgetExceeded(decision)
        decision._bound = True
        self.decision = decision
        return decision

    def note_result(self, result: Any) -> Any:
        """Record ``result``'s usage; without one, charge the worst case rather than nothing.

        A stream is returned wrapped: its usage is only known when it ends, so the
        wrapper, not this block's exit, settles the reservation.
        """
        d = self.decision
        assert d is not None
        if is_stream(result):
            self._handed_off = True
            return wrap_stream(result, self._guard, d)
        try:
            d.record(result)
        except (ValueError, TypeError) as exc:
            log.warning("no usage in the result of a guarded call (%s); charging the reserved worst case", exc)
        return result

    def _pending(self, exc_type: type[BaseException] | None) -> Usage | None:
        d = self.decision
        assert d is not None
        if d._usage is None and exc_type is None:
            log.warning("reserve block for user %s ended without d.record(); reservation released",
                        printable(d.user))
        return d._usage

    def __enter__(self) -> Decision:
        return self._enter(self._guard.check(*self._args, **self._kwargs))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self.decision is not None
        if self._handed_off:
            return
        usage = self._pending(exc_type)
        if usage is not None:
            self._guard.record(self.decision, usage)
        else:
            self._guard.release(self.decision, error=exc)

    async def __aenter__(self) -> Decision:
        return self._enter(await self._guard.acheck(*self._args, **self._kwargs))

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self.decision is not None
        if self._handed_off:
            return
        usage = self._pending(exc_type)
        settle = asyncio.ensure_future(self._guard.arecord(self.decision, usage) if usage is not None
                                       else self._guard.arelease(self.decision, error=exc))
        # Shielded and tracked: a second cancellation must not leave the reservation
        # behind, and aclose() waits for it.
        self._guard._track(settle)
        await asyncio.shield(settle)
