"""Deliver alerts and usage events off the request path: a thread, or an asyncio task.

``check``/``record`` hand work to :class:`Dispatcher` and return at once. Sync callers
are served by one daemon thread per guard, async callers by one task per event loop;
both run the same jobs (:mod:`budgetguard.alerts.jobs`). The queue is bounded: when it
is full, new work is dropped with a log line rather than slowing a caller down. On
``close()``/``aclose()`` (and at interpreter exit, for the thread) what is queued is
flushed within ``alerts.flush_timeout_s``; retries stop waiting once a flush begins.

A loop that ends without ``aclose()`` (``asyncio.run`` returning) cancels its lane's
task: the task ends at once and hands what it had left (the job it was running, where it
stopped, and the queue) to the lane's thread, which ``close()`` or interpreter exit
flushes. Libraries under a job (the HTTP and Redis clients) can lose a cancellation on
Python 3.11, so the task also stops by itself whenever a cancellation is pending.

Sink traffic is kept out of the ``httpx`` request log: it prints the whole URL, and a
webhook's path (Slack's) or query (a token) is a secret.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import inspect
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# httpcore loads here, not lazily in the first httpx.Client on a lane's thread: a fork
# while that thread is importing it leaves the child a half-initialized module, and the
# child's lanes die on their first job.
import httpcore  # noqa: F401
import httpx

from ..store import StoreUnavailable
from .jobs import Invoke, Job, RetryPolicy, Send, Sent, Sleep
from .messages import Delivery

if TYPE_CHECKING:
    from ..protocol import ScriptCall
    from ..store import AsyncStore, SyncStore, ThreadedStore

__all__ = ["AsyncDriver", "Dispatcher", "ThreadDriver", "sink_traffic"]

log = logging.getLogger("budgetguard.alerts")

JobFactory = Callable[[], Job]
Describe = str | Callable[[], str]  # what a job is, for a log line; a callable is only called when logged


def _said(what: Describe) -> str:
    return what if isinstance(what, str) else what()


class _Drops:
    """Counts dropped work and logs it at most once a minute."""

    def __init__(self, size: int, on_drop: Callable[[], None]) -> None:
        self.size = size
        self._on_drop = on_drop
        self._count = 0
        self._last = 0.0

    def dropped(self, what: Describe) -> None:
        self._on_drop()
        self._count += 1
        now = time.monotonic()
        if now - self._last >= 60 or self._count == 1:
            log.error("alert/event queue full (%d items): dropped %s (%d dropped so far)", self.size, _said(what),
                      self._count)
            self._last = now


# Set while this context sends to a sink: httpx's "HTTP Request: POST <url>" line (INFO)
# prints the URL whole, and a webhook's path or query is its credential.
_SINK_TRAFFIC: contextvars.ContextVar[bool] = contextvars.ContextVar("budgetguard_sink_traffic", default=False)


class _SinkTrafficFilter(logging.Filter):
    """Drops the ``httpx`` logger's records about alert deliveries, and only those.

    Installed on the ``httpx`` logger, where a record is filtered before any handler
    sees it; the host application's own httpx requests are logged as before. Our own
    lines name a sink by its endpoint only (:attr:`Delivery.where`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not _SINK_TRAFFIC.get()


_SINK_FILTER = _SinkTrafficFilter()
logging.getLogger("httpx").addFilter(_SINK_FILTER)


@contextlib.contextmanager
def sink_traffic() -> Iterator[None]:
    token = _SINK_TRAFFIC.set(True)
    try:
        yield
    finally:
        _SINK_TRAFFIC.reset(token)


# What sending can raise that is the sink's or the URL's fault: an answer of "no answer".
# InvalidURL is not an httpx.HTTPError.
_SEND_ERRORS = (httpx.HTTPError, httpx.InvalidURL)


def _http_result(response: httpx.Response) -> Sent:
    return Sent(response.status_code, response.headers.get("retry-after"))


def _http_error(exc: BaseException) -> Sent:
    # The exception's text can carry the URL, which may hold a secret: name the type only.
    return Sent(None, None, type(exc).__name__)


def _post(http: httpx.Client, d: Delivery) -> Sent:
    try:
        with sink_traffic():
            return _http_result(http.post(d.url, content=d.body, headers=d.headers))
    except _SEND_ERRORS as exc:
        return _http_error(exc)


async def _apost(http: httpx.AsyncClient, d: Delivery) -> Sent:
    try:
        with sink_traffic():
            return _http_result(await http.post(d.url, content=d.body, headers=d.headers))
    except _SEND_ERRORS as exc:
        return _http_error(exc)


class ThreadDriver:
    """Runs jobs on one daemon thread with a blocking HTTP client."""

    def __init__(self, store: SyncStore, timeout_s: float, queue_size: int, flush_timeout_s: float,
                 on_drop: Callable[[], None], name: str = "budgetguard-alerts") -> None:
        self._name = name
        self._store = store
        self._timeout = timeout_s
        self.flush_timeout_s = flush_timeout_s
        self._queue: collections.deque[JobFactory] = collections.deque()
        self._drops = _Drops(queue_size, on_drop)
        self._size = queue_size
        self._cond = threading.Condition()
        self._flushing = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = False
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forked(ref))

    def _forked(self) -> None:
        # A fork copies the queue but not the thread (a pre-forking server that made calls
        # before forking): the child starts afresh with its own lock, queue and thread. This
        # runs in the child right after the fork, while it has a single thread.
        self._cond = threading.Condition()
        self._queue = collections.deque()
        self._thread = None
        self._busy = False

    def submit(self, job: JobFactory, what: Describe) -> bool:
        with self._cond:
            if self._flushing.is_set():
                log.warning("guard is closed: %s not delivered", _said(what))
                return False
            if len(self._queue) >= self._size:
                self._drops.dropped(what)
                return False
            self._queue.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return True

    def _loop(self) -> None:
        with httpx.Client(timeout=self._timeout) as http:
            while True:
                with self._cond:
                    while not self._queue and not self._flushing.is_set():
                        self._cond.wait()
                    if not self._queue:
                        return
                    factory = self._queue.popleft()
                    self._busy = True
                try:
                    self._run(factory(), http)
                except BaseException:  # nothing a job does may end the lane
                    log.exception("background job failed")
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()

    def _run(self, job: Job, http: httpx.Client) -> None:
        result: Any = None
        while True:
            try:
                request = job.send(result)
            except StopIteration:
                return
            result = self._perform(request, http)

    def _perform(self, request: Any, http: httpx.Client) -> Any:
        if isinstance(request, Send):
            return _post(http, request.delivery)
        if isinstance(request, Sleep):
            self._flushing.wait(request.seconds)
            return None
        if isinstance(request, Invoke):
            try:
                outcome = request.fn(request.arg)
                if inspect.isawaitable(outcome):
                    asyncio.run(_awaited(outcome))
            except BaseException as exc:  # even a callback's SystemExit must not end the lane
                return exc
            return None
        try:
            return self._store.run(request)
        except StoreUnavailable as exc:
            return exc

    def wait_idle(self, timeout: float) -> bool:
        """Block until everything queued so far has run (tests and flushes use it)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float) -> None:
        with self._cond:
            self._flushing.set()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                with self._cond:
                    left = len(self._queue) + (1 if self._busy else 0)
                    self._queue.clear()
                log.error("alert/event flush timed out after %.1f s: %d item(s) not delivered", timeout, left)


def _forked(ref: weakref.ref[ThreadDriver]) -> None:
    driver = ref()
    if driver is not None:
        driver._forked()


class _CallbackThread:
    """Runs an async lane's sync callbacks (and file writes) on a daemon thread of its own.

    Not the loop's default executor: ``asyncio.run`` joins that at exit with no timeout,
    so one hanging callback would keep the program from ending.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.SimpleQueue[tuple[Callable[[Any], Any], Any, asyncio.Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def call(self, fn: Callable[[Any], Any], arg: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls.put((fn, arg, future))
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self._name + "-callbacks", daemon=True)
            self._thread.start()
        return future

    def _run(self) -> None:
        while True:
            fn, arg, future = self._calls.get()
            try:
                outcome = fn(arg)
                if inspect.isawaitable(outcome):
                    outcome = asyncio.run(_awaited(outcome))
            except BaseException as exc:
                _resolve(future, None, exc)
            else:
                _resolve(future, outcome, None)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    def settle() -> None:
        if future.done():  # the lane gave up waiting (closed)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
        future.get_loop().call_soon_threadsafe(settle)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


HandOver = Callable[[JobFactory, Describe], bool]  # gives a job to the lane's thread; False: refused
_NAMED = 5  # items a hand-over's log line names; it counts the rest


@dataclass
class _Running:
    """The job a lane's task is running, and where it stands: what it asked for last and,
    once that is done, the answer it is owed."""

    job: Job
    what: Describe
    request: Any = None  # in flight (None: none)
    answer: Any = None  # the finished request's result, not yet given to the job


def _resumed(job: Job, redo: Any, answer: Any) -> Job:
    """``job`` going on elsewhere: ``redo`` (its interrupted request) made again, or
    ``answer`` (what its last request got) given to it."""
    try:
        result = (yield redo) if redo is not None else answer
        while True:
            try:
                request = job.send(result)
            except StopIteration:
                return
            result = yield request
    finally:
        job.close()


def _unfinished(running: _Running) -> JobFactory:
    """A job cut off by its loop's end, ready to go on on the thread.

    What its interrupted request needs: a POST or a wait is made again (a repeated
    delivery is what a retry is anyway); a script's outcome is unknown, as after a
    timeout, and the engine knows how to treat that; a callback was cut off and is not
    called twice.
    """
    request, answer = running.request, running.answer
    if isinstance(request, (Send, Sleep)):
        return lambda: _resumed(running.job, request, None)
    if isinstance(request, Invoke):
        answer = asyncio.CancelledError("cut off by the end of its event loop")
    elif request is not None:
        answer = StoreUnavailable("budget store unavailable: the event loop ended during the call")
    return lambda: _resumed(running.job, None, answer)


class AsyncDriver:
    """Runs jobs in one task on the event loop with an asyncio HTTP client."""

    def __init__(self, store: AsyncStore | ThreadedStore, timeout_s: float, queue_size: int,
                 on_drop: Callable[[], None], name: str = "budgetguard-alerts",
                 hand_over: HandOver | None = None) -> None:
        self._name = name
        self._store = store
        self._timeout = timeout_s
        self._queue: asyncio.Queue[tuple[JobFactory, Describe]] = asyncio.Queue(queue_size)
        self._drops = _Drops(queue_size, on_drop)
        self._callbacks = _CallbackThread(name)
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Event()
        self._hand_over = hand_over
        self._running: _Running | None = None
        # Set when the task was cancelled without close(): the loop is ending (asyncio.run
        # returning), and work submitted from now on goes to the thread.
        self.ended = False

    def submit(self, job: JobFactory, what: Describe) -> bool:
        if self._flushing.is_set():
            log.warning("guard is closed: %s not delivered", _said(what))
            return False
        if self.ended:
            # A task started now would outlive the loop's shutdown, which only cancels
            # the tasks it already knows of.
            return self._give_away([(job, what)])
        try:
            self._queue.put_nowait((job, what))
        except asyncio.QueueFull:
            self._drops.dropped(what)
            return False
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=self._name)
            # A callback, not an except clause in _loop: a task cancelled before its first
            # step never runs any of its code.
            self._task.add_done_callback(self._task_done)
        return True

    async def _loop(self) -> None:
        async with httpx.AsyncClient(timeout=self._timeout) as http:
            while True:
                _stop_if_cancelled()
                factory, what = await self._queue.get()
                try:
                    await self._run_one(factory, what, http)
                finally:
                    self._queue.task_done()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            self._end()

    async def _run_one(self, factory: JobFactory, what: Describe, http: httpx.AsyncClient) -> None:
        try:
            self._running = _Running(factory(), what)
            await self._run(self._running, http)
        except asyncio.CancelledError:
            if _cancel_pending():
                raise  # the loop is ending, or close(): _end() takes the job over once the task is done
            log.exception("background job failed")
        except Exception:
            log.exception("background job failed")
        self._running = None

    async def _run(self, running: _Running, http: httpx.AsyncClient) -> None:
        result: Any = None
        while True:
            try:
                request = running.job.send(result)
            except StopIteration:
                return
            running.request, running.answer = request, None
            result = await self._perform(request, http)
            running.request, running.answer = None, result
            # The await may have lost a cancellation (see the module's docstring).
            _stop_if_cancelled()

    async def _perform(self, request: Any, http: httpx.AsyncClient) -> Any:
        if isinstance(request, Send):
            return await _apost(http, request.delivery)
        if isinstance(request, Sleep):
            if not self._flushing.is_set():
                # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancellation
                # that arrives as the event is set.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(request.seconds):
                        await self._flushing.wait()
            return None
        if isinstance(request, Invoke):
            try:
                if inspect.iscoroutinefunction(request.fn):
                    await request.fn(request.arg)
                else:
                    await self._callbacks.call(request.fn, request.arg)
            except asyncio.CancelledError as exc:
                if _cancel_pending():
                    raise  # our own cancellation: closing, or the loop is ending
                return exc  # the callback's own business (it awaited something cancelled)
            except Exception as exc:
                return exc
            return None
        call: ScriptCall = request
        try:
            return await self._store.run(call)
        except StoreUnavailable as exc:
            return exc

    def _end(self) -> None:
        """The task was cancelled: take out what it had left, and hand it to the thread.

        After close() timed out, what is left was logged by close() and is dropped.
        """
        left: list[tuple[JobFactory, Describe]] = []
        running, self._running = self._running, None
        if running is not None:
            left.append((_unfinished(running), running.what))
        while not self._queue.empty():
            left.append(self._queue.get_nowait())
            self._queue.task_done()
        if self._flushing.is_set():
            if running is not None:
                running.job.close()
            return
        self.ended = True
        if left:
            self._give_away(left)

    def _give_away(self, items: list[tuple[JobFactory, Describe]]) -> bool:
        what = ", ".join(_said(w) for _, w in items[:_NAMED])
        if len(items) > _NAMED:
            what += f" and {len(items) - _NAMED} more"
        if self._hand_over is None:
            log.error("event loop ended: %d background item(s) dropped: %s", len(items), what)
            return False
        log.info("event loop ended: %d background item(s) handed to the %s thread (close() or interpreter "
                 "exit flushes it): %s", len(items), self._name, what)
        taken = [self._hand_over(job, w) for job, w in items]  # each refusal is logged by the thread side
        return all(taken)

    async def wait_idle(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._queue.join()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float) -> None:
        self._flushing.set()  # retries stop waiting; new work is refused
        task = self._task
        if task is None:
            return
        if not await self.wait_idle(timeout):
            log.error("alert/event flush timed out after %.1f s: about %d item(s) not delivered", timeout,
                      self._queue.qsize() + 1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _cancel_pending() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _stop_if_cancelled() -> None:
    """Raise CancelledError if this task was asked to stop, even if the request got lost on the way."""
    if _cancel_pending():
        raise asyncio.CancelledError


class Dispatcher:
    """One lane of background work. Picks the driver for the caller: the thread for sync
    calls, the loop's task for async ones. A guard keeps two lanes, so that a slow alert
    sink never holds up the usage events behind it."""

    def __init__(self, policy: RetryPolicy, timeout_s: float, queue_size: int, flush_timeout_s: float,
                 on_drop: Callable[[], None], name: str) -> None:
        self.name = name
        self.closed = False  # set by close()/aclose(): later work is refused with a log line
        self.policy = policy
        self._on_drop = on_drop
        self._timeout = timeout_s
        self._size = queue_size
        self.flush_timeout_s = flush_timeout_s
        self._thread: ThreadDriver | None = None
        self._tasks: dict[asyncio.AbstractEventLoop, AsyncDriver] = {}
        self._lock = threading.Lock()

    def thread(self, store: SyncStore) -> ThreadDriver:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = ThreadDriver(store, self._timeout, self._size, self.flush_timeout_s,
                                                self._on_drop, self.name)
        return self._thread

    def task(self, store: AsyncStore | ThreadedStore, fallback: SyncStore | None = None) -> AsyncDriver:
        """This loop's driver. ``fallback`` serves the lane's thread, which takes over what
        the task has left when the loop ends without ``aclose()``; without it, that is dropped."""
        loop = asyncio.get_running_loop()
        driver = self._tasks.get(loop)
        if driver is None:
            with self._lock:  # loops in other threads add theirs too
                driver = self._tasks.get(loop)
                if driver is None:
                    for old in [lp for lp in self._tasks if lp.is_closed()]:
                        del self._tasks[old]
                    hand_over = None if fallback is None else functools.partial(self._take_over, fallback)
                    driver = self._tasks[loop] = AsyncDriver(store, self._timeout, self._size, self._on_drop,
                                                             self.name, hand_over)
        return driver

    def _take_over(self, store: SyncStore, job: JobFactory, what: Describe) -> bool:
        return self.submit(self.thread(store), job, what)

    def submit(self, driver: ThreadDriver | AsyncDriver, job: JobFactory, what: Describe) -> bool:
        if self.closed:
            log.warning("guard is closed: %s not delivered", _said(what))
            return False
        return driver.submit(job, what)

    def close(self, timeout: float | None = None) -> None:
        self.closed = True
        if self._thread is not None:
            self._thread.close(self.flush_timeout_s if timeout is None else timeout)

    def flush(self, timeout: float) -> bool:
        return self._thread is None or self._thread.wait_idle(timeout)

    async def aflush(self, timeout: float) -> bool:
        driver = self._tasks.get(asyncio.get_running_loop())
        if driver is None:
            return True
        started = time.monotonic()
        if not await driver.wait_idle(timeout):
            return False
        thread = self._thread
        if not driver.ended or thread is None:
            return True
        # This loop's task was cancelled and its work went to the thread: wait for that too.
        return await asyncio.to_thread(thread.wait_idle, max(0.0, timeout - (time.monotonic() - started)))

    async def aclose(self, timeout: float | None = None) -> None:
        self.closed = True
        limit = self.flush_timeout_s if timeout is None else timeout
        started = time.monotonic()
        # The closed driver stays: work submitted after aclose() is refused, not started anew.
        driver = self._tasks.get(asyncio.get_running_loop())
        if driver is not None:
            await driver.close(limit)
        await asyncio.to_thread(self.close, max(0.0, limit - (time.monotonic() - started)))
