"""Run as a child process: a coroutine crosses an org alert threshold and returns at once.

``python -m tests.loop_end_worker REDIS_URL SLACK_URL KEY_PREFIX close|exit [PAUSE_S]``

The alert's delivery is still pending (or retrying) when ``asyncio.run`` cancels the
loop's tasks; ``asyncio.run`` must return all the same. ``PAUSE_S``: the coroutine
awaits that long after ``arecord`` (0: one pass of the loop), so that the loop ends in
different steps of the delivery; without it, it returns at once. ``close`` then calls
``guard.close()``; ``exit`` leaves it to the interpreter's exit. Logs go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from budgetguard import BudgetGuard, Usage
from budgetguard.config import parse_config

from .helpers import MSG, PRICES

log = logging.getLogger("tests.loop_end_worker")


def main(argv: list[str]) -> None:
    redis_url, slack_url, key_prefix, ending, *pause = argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    config = parse_config({
        "models": dict(PRICES),
        "key_prefix": key_prefix,
        "org": {"daily_usd": 10, "alert_at": [0.5]},
        "alerts": {"slack": {"webhook_url": slack_url}},
    })
    guard = BudgetGuard(config, redis_url=redis_url)

    async def crosses() -> None:
        decision = await guard.acheck("alice", "gpt-4o", MSG, max_tokens=10)
        assert decision.allowed, decision.reason
        await guard.arecord(decision, Usage(input_tokens=10, output_tokens=600_000))  # $6 of $10: 50% crossed
        if pause:
            await asyncio.sleep(float(pause[0]))

    asyncio.run(crosses())
    log.info("asyncio.run returned")
    if ending == "close":
        guard.close()


if __name__ == "__main__":
    main(sys.argv[1:])
