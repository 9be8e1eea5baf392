"""A check blocked by a user window and an org window names the one that resets last, split or not.

A check is split (user part, then org part) on a Redis Cluster. One script sees every window at
once; a split check whose user part denies probes the org part, so that it names the same
window (here ``org.daily``, not ``user.hourly``, which resets first and after which the request
would be denied again). With org slices it does not probe (see test_slices).
"""

from __future__ import annotations

import pytest

from budgetguard import Usage

from .helpers import MSG, guard


@pytest.fixture
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "cluster":
        return request.getfixturevalue("cluster_url")
    request.getfixturevalue("real_redis")
    return request.getfixturevalue("real_redis_url")


@pytest.mark.parametrize("url", [
    pytest.param("redis", id="one-script"),
    pytest.param("cluster", id="cluster"),
], indirect=["url"])
def test_a_check_blocked_by_a_user_and_an_org_window_names_the_one_that_resets_last(url, clock):
    org = {"daily_usd": "0.01"}
    settings = {"tiers": {"default": {"hourly_usd": "0.01"}}, "org": org}
    first = guard(url, clock, **settings)
    d = first.check("alice", "gpt-4o", MSG, max_tokens=900)  # about $0.009 of the $0.01 of both caps
    assert d.allowed
    first.record(d, Usage(input_tokens=d.estimated_input_tokens, output_tokens=900))
    first.close()

    g = guard(url, clock, **settings)
    windows = g.status("alice").windows
    assert windows["user.hourly"].spent_usd == windows["org.daily"].spent_usd > 0
    denied = g.check("alice", "gpt-4o", MSG, max_tokens=900)  # fits neither cap
    g.close()
    assert not denied.allowed
    # The clock stands at 15:09:26 UTC: the day ends 31834 s later, the hour 3034 s later.
    assert (denied.limit, denied.retry_after) == ("org.daily", 31834)
