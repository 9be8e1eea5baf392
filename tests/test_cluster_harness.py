"""The LocalCluster harness: a real Redis Cluster, and redis-py's cluster clients on it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.exceptions import MovedError, RedisClusterException

from .cluster import LocalCluster

# Touches both keys, so it only runs when they share a slot (a hash tag).
SPEND = """
local a = redis.call('INCRBY', KEYS[1], ARGV[1])
local b = redis.call('INCRBY', KEYS[2], ARGV[1])
return {a, b}
"""


def _wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_cluster_is_three_primaries_with_a_replica_each(redis_cluster: LocalCluster) -> None:
    assert len(redis_cluster.ports) == 6
    primaries = [port for _, port in redis_cluster.startup_nodes]
    assert len(primaries) == 3
    replicas = {redis_cluster.replica_of(port) for port in primaries}
    assert len(replicas) == 3
    assert set(primaries) | replicas == set(redis_cluster.ports)
    assert redis_cluster.health_problems() == []


@pytest.mark.parametrize("tag", ["{u:alice}", "{org}"])
def test_hash_tagged_keys_land_where_the_harness_says(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, tag: str
) -> None:
    keys = [f"{tag}:spend", f"{tag}:reserved"]
    slot = redis_cluster.keyslot(tag.strip("{}"))  # the slot is the tag's alone
    port = redis_cluster.primary_for_key(keys[0])
    for key in keys:
        assert redis_cluster.keyslot(key) == cluster_client.keyslot(key) == slot
        assert redis_cluster.primary_for_key(key) == port
        cluster_client.set(key, "1")

    assert redis_cluster.client(port).mget(keys) == ["1", "1"]  # there, no redirect
    other = next(p for _, p in redis_cluster.startup_nodes if p != port)
    with pytest.raises(MovedError):  # any other primary redirects to it
        redis_cluster.client(other).get(keys[0])


def test_lua_script_on_two_keys_of_one_hash_tag(cluster_client: RedisCluster) -> None:
    spend = cluster_client.register_script(SPEND)
    assert spend(keys=["{u:alice}:spend", "{u:alice}:day"], args=[5]) == [5, 5]
    assert spend(keys=["{u:alice}:spend", "{u:alice}:day"], args=[2]) == [7, 7]
    # Keys in two slots are refused by the client before anything reaches Redis.
    with pytest.raises(RedisClusterException, match="same key slot"):
        spend(keys=["{u:alice}:spend", "{org}:spend"], args=[1])
    assert cluster_client.get("{org}:spend") is None


def test_writes_survive_a_failover(redis_cluster: LocalCluster, cluster_client: RedisCluster) -> None:
    key = "{u:alice}:spend"
    cluster_client.set(key, "42")
    spend = cluster_client.register_script(SPEND)
    assert spend(keys=[key, "{u:alice}:day"], args=[0]) == [42, 0]
    old = redis_cluster.primary_for_key(key)

    new = redis_cluster.failover(old)

    assert new != old
    assert redis_cluster.primary_for_key(key) == new
    assert redis_cluster.replica_of(new) == old  # the old primary follows the new one
    # The client still has the old slot map: it gets MOVED and follows it.
    assert cluster_client.get(key) == b"42"
    assert cluster_client.incr(key) == 43
    assert redis_cluster.client(new).get(key) == "43"
    # Replicas do not get the script cache, so the new primary may answer NOSCRIPT; redis-py's
    # Script then loads the script again and retries, unseen by the caller.
    assert spend(keys=[key, "{u:alice}:day"], args=[1]) == [44, 1]


def test_killed_replica_rejoins_after_restart(redis_cluster: LocalCluster, cluster_client: RedisCluster) -> None:
    key = "{org}:spend"
    primary = redis_cluster.primary_for_key(key)
    replica = redis_cluster.replica_of(primary)
    redis_cluster.kill(replica)
    cluster_client.set(key, "7")  # written while the replica is down

    redis_cluster.restart(replica)

    assert redis_cluster.replica_of(primary) == replica
    assert redis_cluster.client(replica).info("replication")["master_port"] == primary
    assert redis_cluster.health_problems() == []


async def test_asyncio_cluster_client(redis_cluster: LocalCluster, cluster_client: RedisCluster) -> None:
    client = AsyncRedisCluster.from_url(redis_cluster.url)
    try:
        await client.set("{u:alice}:spend", "1")
        assert await client.incrby("{u:alice}:spend", 2) == 3
        spend = client.register_script(SPEND)
        assert await spend(keys=["{u:alice}:spend", "{u:alice}:day"], args=[1]) == [4, 1]
        assert cluster_client.get("{u:alice}:day") == b"1"  # the sync client sees the same data
    finally:
        await client.aclose()


def test_no_acknowledged_incr_is_lost_in_a_failover(
    redis_cluster: LocalCluster, cluster_client: RedisCluster
) -> None:
    """INCRs from a thread while the key's primary fails over.

    Every INCR that returned is acknowledged; each returns the counter's new value, so the
    acknowledged values must be exactly 1..N and the counter must end at N: nothing
    acknowledged was lost, and nothing that raised was applied anyway (or retried twice).
    redis-py follows the MOVED from the demoted primary by itself; any error it does raise
    is recorded and the loop goes on.
    """
    key = "{budget}:calls"
    acked: list[int] = []
    errors: list[redis.RedisError] = []
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            try:
                acked.append(cluster_client.incr(key))
            except redis.RedisError as e:  # not acknowledged: not counted
                errors.append(e)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: len(acked) >= 50)
        old = redis_cluster.primary_for_key(key)
        new = redis_cluster.failover(old)
        after = len(acked)
        _wait_for(lambda: len(acked) >= after + 50)  # and it keeps working on the new primary
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()

    assert redis_cluster.primary_for_key(key) == new != old
    assert acked == list(range(1, len(acked) + 1)), f"errors seen: {errors!r}"
    assert cluster_client.get(key) == str(len(acked)).encode()
    assert redis_cluster.client(new).get(key) == str(len(acked))
