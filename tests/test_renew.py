"""``renew``: a reservation whose call is still answering keeps its lease (single Redis,
cluster, and with org slices)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from budgetguard import Usage

from .helpers import MSG, guard


@pytest.mark.parametrize("slices", [False, True])
async def test_a_renewed_lease_outlives_its_first_deadline(any_backend_url, clock, slices):
    org = {"daily_usd": 100, "slice_usd": 1} if slices else {"daily_usd": 100}
    g = guard(any_backend_url, clock, org=org)  # reservation_ttl_s is 60 in the test config
    d = g.check("alice", "gpt-4o", MSG, max_tokens=100)
    for _ in range(3):
        clock.advance(seconds=45)
        assert g.renew(d)  # sync
    clock.advance(seconds=45)
    assert await g.arenew(d)  # async
    clock.advance(seconds=45)  # 225 s after the check: long past its first deadline
    w = g.status("alice").windows
    assert w["user.daily"].reserved_usd == d.estimated_cost_usd
    assert w["org.daily"].reserved_usd >= (0 if slices else d.estimated_cost_usd)
    assert g.record(d, Usage(100, 10))
    assert not g.renew(d)  # settled: nothing to renew
    assert g.status("alice").windows["user.daily"].reserved_usd == 0
    await g.aclose()


def test_a_lapsed_lease_is_not_renewed(any_backend_url, clock):
    g = guard(any_backend_url, clock)
    d = g.check("alice", "gpt-4o", MSG, max_tokens=100)
    clock.advance(seconds=61)
    assert not g.renew(d)  # its headroom may be someone else's by now
    assert g.status("alice").windows["user.daily"].reserved_usd == 0
    g.close()


def test_a_decorated_stream_renews_its_lease_while_it_is_read(real_redis, real_redis_url):
    # The real clock, a 2 s lease and a stream read for about 3 s (a slow provider).
    g = guard(real_redis_url, None, reservation_ttl_s=2, tiers={"default": {"hourly_usd": "0.004"}})

    @g.limit(user=lambda a: a["user"])
    def ask(*, user: str, model: str, messages: list[Any], max_tokens: int = 300, stream: bool = True) -> Any:
        def events() -> Iterator[dict[str, Any]]:
            for _ in range(8):
                yield {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
                time.sleep(0.4)
            yield {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5}}

        return events()

    late = None
    for i, _ in enumerate(ask(user="alice", model="gpt-4o", messages=MSG)):
        if i == 7:  # 2.8 s in: the first lease's deadline is long past
            late = g.check("alice", "gpt-4o", MSG, max_tokens=300)
    assert late is not None and not late.allowed and late.limit == "user.hourly"
    assert g.status("alice").windows["user.hourly"].reserved_usd == 0
    g.close()
