"""Subprocess bodies for tests/test_events.py (run under the ``spawn`` start method).

Each worker builds its own guard, so nothing is shared with the test process but the
Redis server (or the JSON Lines file) under test.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(__file__).parent / "data" / "tiktoken"))

# Every process prices and windows its calls at this moment, so the test process reads
# the same windows whatever the wall clock does.
MOMENT = datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC)
# Tags on every JSON Lines event: as many and as long as an event keeps (32 tags, values
# of 256 characters), about 9 kB a line, well past the 4 kB a pipe writes atomically.
BLOB = 256
BLOB_TAGS = 31  # with "feature", 32


def _guard(url: str, **overrides: Any) -> Any:
    from tests.helpers import guard

    return guard(url, lambda: MOMENT, **overrides)


def jsonl_writer(url: str, path: str, worker: int, count: int, start: Any) -> None:
    """Append ``count`` usage events to ``path`` once every worker is ready (``start``: a Barrier)."""
    from budgetguard import Usage
    from tests.helpers import MSG

    g = _guard(url, events={"jsonl_path": path})
    # Big tags make each line about 9 kB, so a line written in pieces would show.
    blobs = {f"blob{j:02d}": chr(ord("a") + worker) * BLOB for j in range(BLOB_TAGS)}
    g.check(f"writer-{worker}", "gpt-4o", MSG, max_tokens=10)  # warm up: load the tokenizer
    start.wait(60)
    for i in range(count):
        d = g.check(f"writer-{worker}", "gpt-4o", MSG, max_tokens=10, tags={"feature": "jsonl", **blobs})
        assert d.allowed, d.reason
        assert g.record(d, Usage(input_tokens=i + 1, output_tokens=1))
    g.close()


def check_then_hang(url: str, user: str, record: bool, ready: Any) -> None:
    """Check (and optionally record), report the request id, then wait to be killed."""
    from budgetguard import Usage
    from tests.helpers import MSG

    g = _guard(url)
    d = g.check(user, "gpt-4o", MSG, max_tokens=100)
    assert d.allowed, d.reason
    if record:
        assert g.record(d, Usage(input_tokens=400, output_tokens=30))
    ready.send(d.reservation_id)
    time.sleep(600)  # SIGKILLed long before this ends


def record_forever(url: str, users: list[str], ready: Any) -> None:
    """One thread per user records calls costing 1, 2, 3, ... units (input tokens) until killed.

    Several threads put several calls in flight at the moment of the kill.
    """
    import threading

    from budgetguard import Usage
    from tests.helpers import MSG

    g = _guard(url)

    def loop(user: str) -> None:
        for i in range(1, 1_000_000):
            d = g.check(user, "gpt-4o", MSG, max_tokens=10)
            assert d.allowed, d.reason
            g.record(d, Usage(input_tokens=i, output_tokens=0))

    threads = [threading.Thread(target=loop, args=(user,), daemon=True) for user in users]
    for t in threads:
        t.start()
    ready.send("started")
    for t in threads:
        t.join()
