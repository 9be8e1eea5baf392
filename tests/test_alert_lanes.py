"""Alert lanes at the edges: an event loop that ends under them, and what their traffic logs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from budgetguard.alerts.dispatch import Dispatcher
from budgetguard.alerts.jobs import Invoke, Job, RetryPolicy, Sleep
from budgetguard.engine import ScriptCall

from .helpers import MSG
from .receiver import receiver
from .test_alerts import alerts_config, charge, make_guard, spend

ROOT = Path(__file__).resolve().parent.parent

# -- an event loop that ends with alerts still pending ----------------------------------------


def _run_worker(redis_url: str, slack_url: str, key_prefix: str, ending: str,
                pause: str | None) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "tests.loop_end_worker", redis_url, slack_url, key_prefix, ending]
    return subprocess.run(args + ([pause] if pause is not None else []), cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("ending", "pauses"), [
    # The coroutine lets the loop run once more, then returns: the lane's task is in its
    # first store call when asyncio.run cancels it. asyncio.run used to hang here.
    ("close", ["0"] * 5),
    # The loop ends before the job's first step, during the POST, during the retry's backoff.
    ("close", [None, "0.01", "0.1"]),
    ("exit", ["0", None]),
])
def test_asyncio_run_returns_while_a_delivery_is_retrying(real_redis, real_redis_url, ending, pauses):
    """A coroutine crosses a threshold and returns while Slack answers 500 once: asyncio.run
    must end every time, and the alert still goes out (by close(), or at interpreter exit)."""
    with receiver() as rx:
        for run, pause in enumerate(pauses):
            path = f"/slack/T000/B000/loop-end-{ending}-{pause}-{run}"
            rx.scripts[path] = [(500, {})]
            prefix = f"loopend-{ending}-{run}-{pause}".replace(".", "_")
            try:
                done = _run_worker(real_redis_url, rx.url + path, prefix, ending, pause)
            except subprocess.TimeoutExpired as exc:
                pytest.fail(f"run {run + 1} (pause {pause}): asyncio.run() did not return within 30 s\n{exc.stderr!r}")
            assert done.returncode == 0, done.stderr
            assert "asyncio.run returned" in done.stderr
            bodies = rx.bodies(path)
            # The failed POST and its retry, the same message both times.
            assert len(bodies) == 2 and bodies[0] == bodies[1], (pause, bodies, done.stderr)
            assert "spend crossed 50%" in bodies[0]["text"]


class _LosesCancellation:
    """A store whose call loses a cancellation, as client libraries can on Python 3.11
    (``asyncio.wait_for`` returning a result that came in as the task was cancelled)."""

    def __init__(self) -> None:
        self.called = threading.Event()

    async def run(self, call: ScriptCall) -> Any:
        self.called.set()
        with contextlib.suppress(asyncio.CancelledError):  # swallowed
            await asyncio.sleep(30)
        return "reply of " + call.script


class _SyncStore:
    def run(self, call: ScriptCall) -> Any:
        return "sync reply of " + call.script


def _run_ending_loop(dispatcher: Dispatcher, job: Any, fallback: Any) -> None:
    """asyncio.run of a coroutine that hands the lane a job and returns; fails if it hangs."""
    store = _LosesCancellation()

    async def main() -> None:
        driver = dispatcher.task(store) if fallback is None else dispatcher.task(store, fallback)  # type: ignore[arg-type]
        assert dispatcher.submit(driver, job, "a test job")
        await asyncio.to_thread(store.called.wait, 10)  # the job is in its store call

    finished = threading.Event()

    def run() -> None:
        asyncio.run(main())
        finished.set()

    threading.Thread(target=run, daemon=True).start()
    assert finished.wait(20), "asyncio.run() did not return: the lane's task outlived its cancellation"


def test_a_lost_cancellation_still_ends_the_task_and_the_thread_finishes_the_job(caplog):
    caplog.set_level(logging.INFO, logger="budgetguard")
    seen: list[Any] = []

    def job() -> Job:
        reply = yield ScriptCall("lookup", ("k",), ())  # on the loop, which ends during it
        seen.append(reply)
        seen.append((yield ScriptCall("lookup", ("k",), ())))  # on the thread
        yield Sleep(0.01)
        yield Invoke(lambda _: seen.append(threading.current_thread().name), None)

    lane = Dispatcher(RetryPolicy(0), 5, 10, 5, lambda: None, "test-lane")
    _run_ending_loop(lane, job, _SyncStore())
    lane.close(10)
    assert seen == ["reply of lookup", "sync reply of lookup", "test-lane"]
    assert any("event loop ended: 1 background item(s) handed to the test-lane thread" in r.getMessage()
               and "a test job" in r.getMessage() for r in caplog.records)


def test_queued_work_and_work_submitted_after_the_end_go_to_the_thread(caplog):
    caplog.set_level(logging.INFO, logger="budgetguard")
    seen: list[Any] = []

    def job(name: str) -> Any:
        def steps() -> Job:
            seen.append((name, (yield ScriptCall("lookup", ("k",), ())), threading.current_thread().name))
        return steps

    lane = Dispatcher(RetryPolicy(0), 5, 10, 5, lambda: None, "test-lane")

    async def main() -> None:
        driver = lane.task(_LosesCancellation(), _SyncStore())  # type: ignore[arg-type]

        async def settles_late() -> None:
            # Like a shielded settle that finishes while asyncio.run cancels the loop's tasks.
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                for _ in range(100):
                    if driver.ended:
                        break
                    await asyncio.sleep(0)
                assert lane.submit(driver, job("after"), "a job after the end")
                raise

        asyncio.get_running_loop().create_task(settles_late())
        await asyncio.sleep(0)
        assert lane.submit(driver, job("first"), "a job")  # its store call loses the cancellation
        assert lane.submit(driver, job("queued"), "a queued job")

    asyncio.run(main())
    assert lane.flush(10)
    lane.close(10)
    assert seen == [("first", "reply of lookup", "test-lane"), ("queued", "sync reply of lookup", "test-lane"),
                    ("after", "sync reply of lookup", "test-lane")]
    messages = [r.getMessage() for r in caplog.records]
    assert any("event loop ended: 2 background item(s) handed to the test-lane thread" in m
               and "a job, a queued job" in m for m in messages)
    assert any("event loop ended: 1 background item(s) handed to the test-lane thread" in m
               and "a job after the end" in m for m in messages)


def test_without_a_thread_to_take_over_what_is_left_is_dropped_with_a_log_line(caplog):
    seen: list[Any] = []

    def job() -> Job:
        seen.append((yield ScriptCall("lookup", ("k",), ())))
        seen.append("went on")

    lane = Dispatcher(RetryPolicy(0), 5, 10, 5, lambda: None, "test-lane")
    _run_ending_loop(lane, job, None)
    lane.close(10)
    assert seen == []
    assert any(r.levelno == logging.ERROR and "event loop ended: 1 background item(s) dropped: a test job"
               in r.getMessage() for r in caplog.records)


# -- sink URLs stay out of the log ---------------------------------------------------------------

SLACK_SECRET = "pathSECRET-8f2c1a"
QUERY_SECRET = "qrySECRET-77d0e3"
HOOK_SECRET = "hookSECRET-4b91aa"
SECRETS = (SLACK_SECRET, QUERY_SECRET, HOOK_SECRET)


def _secret_sinks(rx: Any) -> tuple[dict[str, Any], str, str]:
    slack = f"/services/T0/B0/{SLACK_SECRET}?token={QUERY_SECRET}"
    hook = f"/hook?token={HOOK_SECRET}&team=ops"
    data = alerts_config(rx)
    data["alerts"]["slack"] = {"webhook_url": rx.url + slack}
    data["alerts"]["webhook"] = {"url": rx.url + hook}
    rx.scripts[slack] = [(500, {})]  # the failure and retry log lines are checked too
    rx.scripts[hook] = [(503, {"Retry-After": "0"})]
    return data, slack, hook


def _assert_no_secret_logged(records: list[logging.LogRecord]) -> None:
    for r in records:
        text = f"{r.name} {r.getMessage()} {r.exc_text or ''}"
        for secret in SECRETS:
            assert secret not in text, text


def _assert_app_traffic_still_logged(rx: Any, records: list[logging.LogRecord]) -> None:
    # The host application's own httpx requests keep their INFO line.
    httpx.post(rx.url + "/app?page=2", content=b"{}")
    assert any(r.name == "httpx" and "/app?page=2" in r.getMessage() for r in records)


def test_sync_deliveries_log_no_part_of_a_sink_url_secret(backend_url, clock, caplog):
    caplog.set_level(logging.DEBUG)
    with receiver() as rx:
        data, slack, hook = _secret_sinks(rx)
        g = make_guard(backend_url, clock, data)
        charge(g, "alice", 5)
        assert g.flush()
        assert len(rx.bodies(slack)) == 2 and len(rx.bodies(hook)) == 2
        g.close()
        _assert_no_secret_logged(caplog.records)
        assert any("alert to slack at " + rx.url + " failed (HTTP 500)" in r.getMessage() for r in caplog.records)
        _assert_app_traffic_still_logged(rx, caplog.records)


async def test_async_deliveries_log_no_part_of_a_sink_url_secret(backend_url, clock, caplog):
    caplog.set_level(logging.DEBUG)
    with receiver() as rx:
        data, slack, hook = _secret_sinks(rx)
        g = make_guard(backend_url, clock, data)
        d = await g.acheck("alice", "gpt-4o", MSG, max_tokens=10)
        await g.arecord(d, spend(5))
        assert await g.aflush()
        assert len(rx.bodies(slack)) == 2 and len(rx.bodies(hook)) == 2
        await g.aclose()
        _assert_no_secret_logged(caplog.records)
        await asyncio.to_thread(_assert_app_traffic_still_logged, rx, caplog.records)


def test_a_sink_that_cannot_be_reached_is_named_without_its_secrets(backend_url, clock, caplog):
    caplog.set_level(logging.DEBUG)
    with receiver() as rx:
        data, _, _ = _secret_sinks(rx)
    # The receiver is gone: every attempt fails to connect, and the drop is logged.
    data["alerts"]["retries"] = 1
    data["alerts"]["webhook"] = {"url": f"http://user:{HOOK_SECRET}@{rx.url.split('://')[1]}/h?k={QUERY_SECRET}"}
    g = make_guard(backend_url, clock, data)
    charge(g, "alice", 5)
    assert g.flush()
    g.close()
    _assert_no_secret_logged(caplog.records)
    dropped = [r.getMessage() for r in caplog.records if "alert dropped" in r.getMessage()]
    assert len(dropped) == 2 and any("webhook at http://user:***@127.0.0.1:" in m for m in dropped)



def test_a_slice_flush_handed_to_the_thread_goes_on_there(real_redis, real_redis_url, caplog):
    """A loop ends while its org slice's flush is scheduled on it: the lane's thread runs the
    flush, and schedules the next one for itself rather than for the loop that is gone."""
    from budgetguard import Usage

    from .helpers import guard

    g = guard(real_redis_url, org={"daily_usd": 100, "slice_usd": 1, "slice_flush_s": 0.2})

    async def main() -> None:
        d = await g.acheck("alice", "gpt-4o", MSG, max_tokens=20)
        await g.arecord(d, Usage(100, 20))

    caplog.set_level(logging.ERROR, logger="budgetguard")
    asyncio.run(main())  # ends with the slice's flush scheduled on its loop
    # The handed-over flush hands the spend in from the thread, then the next one is due.
    deadline = time.monotonic() + 10
    while g.status("bob").windows["org.daily"].spent_usd == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert g.status("bob").windows["org.daily"].spent_usd > 0
    d = g.check("bob", "gpt-4o", MSG, max_tokens=20)
    g.record(d, Usage(100, 20))
    g.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
