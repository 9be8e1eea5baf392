"""Runs in child processes: one guard with org slices, many threads of check + record."""

from __future__ import annotations

import os
import threading
from typing import Any

from budgetguard import BudgetGuard, Usage
from budgetguard.config import parse_config

from .helpers import MSG


def run_calls(data: dict[str, Any], redis_url: str, start: Any, process: int, threads: int, calls: int,
              results: Any, die: bool = False) -> None:
    """Each thread makes ``calls`` check + record calls; reports what was recorded, per user.

    ``die``: skip ``close()`` and leave with ``os._exit``, as a killed process would.
    """
    g = BudgetGuard(parse_config(data, env={}), redis_url=redis_url)
    lock = threading.Lock()
    allowed = denied = 0
    recorded: dict[str, int] = {}  # user -> nano-USD recorded (from the decisions' own figures)
    gate = threading.Barrier(threads)

    def one(t: int) -> None:
        nonlocal allowed, denied
        gate.wait()
        for i in range(calls):
            user = f"p{process}-u{(t + i) % 4}"
            d = g.check(user, "gpt-4o", MSG, max_tokens=50)
            if not d.allowed:
                with lock:
                    denied += 1
                continue
            # Half the worst case of output: actual spend differs from the estimate.
            usage = Usage(input_tokens=d.estimated_input_tokens, output_tokens=25)
            assert g.record(d, usage)
            with lock:
                allowed += 1
                recorded[user] = recorded.get(user, 0) + g._engine.cost_nano(d, usage)

    start.wait()
    workers = [threading.Thread(target=one, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if die:
        results.put((allowed, denied, recorded))
        results.close()
        results.join_thread()
        os._exit(0)
    g.close()
    results.put((allowed, denied, recorded))
