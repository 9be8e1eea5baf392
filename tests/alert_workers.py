"""Runs in child processes: many concurrent calls from one process's own guard."""

from __future__ import annotations

import threading
from typing import Any

from budgetguard import BudgetGuard, Usage
from budgetguard.config import parse_config

from .helpers import MSG


def run_calls(data: dict[str, Any], env: dict[str, str], redis_url: str, start: Any, process: int,
              threads: int, usage: tuple[int, int], results: Any) -> None:
    g = BudgetGuard(parse_config(data, env=env), redis_url=redis_url)
    allowed = denied = 0
    lock = threading.Lock()
    gate = threading.Barrier(threads)

    def one(i: int) -> None:
        nonlocal allowed, denied
        gate.wait()
        d = g.check(f"user-{process}-{i % 5}", "gpt-4o", MSG, max_tokens=10)
        if d.allowed:
            g.record(d, Usage(input_tokens=usage[0], output_tokens=usage[1]))
        with lock:
            if d.allowed:
                allowed += 1
            else:
                denied += 1

    start.wait()  # every process starts its burst together
    workers = [threading.Thread(target=one, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    g.close()  # flushes this process's queued alerts
    results.put((allowed, denied))
