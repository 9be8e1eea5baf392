"""A real Redis Cluster on 127.0.0.1, started from the ``redis-server`` binary, for tests.

    with LocalCluster() as cluster:          # 3 primaries + 3 replicas, ready to use
        client = redis.cluster.RedisCluster.from_url(cluster.url)
        new_primary = cluster.failover(cluster.primary_for_key("{u:alice}"))

The cluster is built with plain cluster commands (ADDSLOTSRANGE, SET-CONFIG-EPOCH, MEET,
REPLICATE) rather than ``redis-cli --cluster create``: that tool sleeps a whole second per
poll while it waits for the nodes to join, and every step here is followed by a poll with a
deadline instead. Every wait checks the same thing (``health_problems``), so "ready" means the
same after start, failover and restart.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
TOTAL_SLOTS = 16384
# Small so that a killed primary is failed over in about two seconds; a node must stall for a
# whole second before the others suspect it, which loopback pings on a busy CI box do not.
NODE_TIMEOUT_MS = 1000
# Redis 7.0 keeps a replica's election state (votes counted, election epoch) after it wins and
# only drops it auth_retry_time = 2 * max(2 * node timeout, 2 s) after that election. Asked to
# fail over again before then, it "wins" at once with the old, lower epoch: it acts as a primary
# for a moment until the cluster overrules it (writes it acknowledged meanwhile are lost), and
# the real primary keeps writes paused until the manual failover times out after 5 s.
# Valkey later resets that state (valkey-io/valkey#782, #1711); here ``failover`` waits it out.
ELECTION_STATE_S = 2 * max(2 * NODE_TIMEOUT_MS, 2000) / 1000
# A manual failover the cluster did not carry out is abandoned by Redis after 5 s
# (CLUSTER_MF_TIMEOUT); after that long without a promotion the request is sent again.
MANUAL_FAILOVER_RETRY_S = 6.0
POLL_S = 0.02

# (first slot, last slot) -> (primary port, live replica ports)
SlotMap = dict[tuple[int, int], tuple[int, frozenset[int]]]

_LIVE: set[LocalCluster] = set()  # clusters not yet stopped, for the atexit net


@atexit.register
def _stop_leftovers() -> None:
    for cluster in list(_LIVE):
        cluster.stop()


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """Runs in the child before exec: a SIGKILLed pytest (no atexit) still takes its nodes along."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


_claimed: set[int] = set()  # ports handed out in this process, so two clusters never pick the same


def _free_port() -> int:
    """A port P with P and its cluster bus port P+10000 both free.

    Picked from 20000-29999 rather than asking the OS for an ephemeral port: those start at
    32768, so P+10000 could pass 65535 or land on someone's outgoing connection.
    """
    for _ in range(1000):
        port = random.randint(20000, 29999)
        if port not in _claimed and _bindable(port) and _bindable(port + 10000):
            _claimed.add(port)
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _wait(what: str, check: Callable[[], list[str]], timeout: float) -> None:
    """Poll ``check`` (which returns what is still wrong) until it returns nothing."""
    deadline = time.monotonic() + timeout
    problems: list[str] = []
    while time.monotonic() < deadline:
        try:
            problems = check()
        except (redis.RedisError, OSError) as e:  # a node restarting or switching roles
            problems = [f"{type(e).__name__}: {e}"]
        if not problems:
            return
        time.sleep(POLL_S)
    raise TimeoutError(f"{what} not reached within {timeout:.0f}s: {problems[:5]}")


@dataclass
class _Node:
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    client: redis.Redis = field(init=False)

    def __post_init__(self) -> None:
        # No retries: a poll must fail fast on a node that is down, not back off and retry.
        self.client = redis.Redis(
            host=HOST, port=self.port, decode_responses=True, socket_timeout=2, socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )
        # The raw replies: redis-py's parsed CLUSTER NODES is keyed by address, which folds
        # together the duplicate entries a handshake in progress shows.
        for command in ("CLUSTER INFO", "CLUSTER NODES", "CLUSTER SLOTS"):
            self.client.response_callbacks.pop(command, None)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.dir / "redis.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalCluster:
    """``primaries`` primaries, each with ``replicas_per_primary`` replicas, one process per node.

    Ports are tracked, not roles: after ``failover`` a former replica is a primary, so every
    role question (``startup_nodes``, ``primary_for_key``, ``replica_of``) asks the cluster.
    """

    def __init__(self, primaries: int = 3, replicas_per_primary: int = 1, start_timeout: float = 30) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not on PATH")
        self._binary = binary
        self._root = Path(tempfile.mkdtemp(prefix="budgetguard-cluster-"))
        self._nodes: dict[int, _Node] = {}
        self._lock = threading.Lock()  # stop() runs once even if a finalizer and atexit race
        self._stopped = False
        self._roles: dict[int, str] = {}  # last role seen per port: "master" or "slave"
        self._promoted_at: dict[int, float] = {}  # when a port was last seen turning primary
        self.timings: dict[str, list[float]] = {"start": [], "failover": [], "restart": []}
        _LIVE.add(self)
        try:
            started = time.monotonic()
            self._create(primaries, replicas_per_primary, start_timeout)
            self.timings["start"].append(time.monotonic() - started)
        except BaseException:
            self.stop()
            raise

    # -- building ---------------------------------------------------------------------------

    def _create(self, primaries: int, replicas_per_primary: int, timeout: float) -> None:
        count = primaries * (1 + replicas_per_primary)
        nodes = [self._launch_new_node() for _ in range(count)]  # all start at once
        for i, node in enumerate(nodes):
            nodes[i] = self._ensure_started(node, timeout)
        primary_nodes, replica_nodes = nodes[:primaries], nodes[primaries:]

        # Even slot ranges; distinct config epochs so the nodes need not settle collisions.
        for i, node in enumerate(primary_nodes):
            first, last = i * TOTAL_SLOTS // primaries, (i + 1) * TOTAL_SLOTS // primaries - 1
            node.client.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
        for epoch, node in enumerate(nodes, start=1):
            node.client.execute_command("CLUSTER SET-CONFIG-EPOCH", epoch)

        # Every pair meets once (i meets j > i): all handshakes start at once instead of
        # waiting for gossip to spread, and no pair has two handshakes racing each other.
        for i, node in enumerate(nodes):
            for other in nodes[i + 1:]:
                node.client.execute_command("CLUSTER MEET", HOST, other.port)
        _wait("all nodes know each other", lambda: self._join_problems(count), timeout)

        ids = {node.port: node.client.execute_command("CLUSTER MYID") for node in primary_nodes}
        for i, node in enumerate(replica_nodes):
            node.client.execute_command("CLUSTER REPLICATE", ids[primary_nodes[i % primaries].port])
        self.wait_healthy(timeout)

    def _join_problems(self, count: int) -> list[str]:
        problems = []
        for node in self._nodes.values():
            lines = node.client.execute_command("CLUSTER NODES").splitlines()
            pending = [line for line in lines if "handshake" in line or "noaddr" in line]
            if len(lines) != count or pending:
                problems.append(f"{node.port} knows {len(lines)} nodes, {len(pending)} pending")
        return problems

    def _launch_new_node(self) -> _Node:
        port = _free_port()
        node = _Node(port, self._root / f"node-{port}")
        node.dir.mkdir()
        self._nodes[port] = node
        self._spawn(node)
        return node

    def _ensure_started(self, node: _Node, timeout: float) -> _Node:
        """Wait for a new node; if it died (someone took its port after our check), use another port."""
        for _ in range(5):
            try:
                self._wait_answers(node, timeout)
                return node
            except RuntimeError:
                if "Address already in use" not in node.log_tail():
                    raise
                del self._nodes[node.port]
                node.client.close()
                shutil.rmtree(node.dir, ignore_errors=True)
                node = self._launch_new_node()
        raise RuntimeError("could not start a cluster node on a free port")

    def _spawn(self, node: _Node) -> None:
        args = [
            self._binary, "--port", str(node.port), "--bind", HOST, "--dir", str(node.dir),
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            # Keep the topology exactly as built: no replica wanders off to an orphaned primary.
            "--cluster-allow-replica-migration", "no",
            "--save", "", "--appendonly", "no",
            # A replica's full sync would otherwise wait 5 s for more replicas to share the transfer.
            "--repl-diskless-sync-delay", "0",
            # CLUSTER SLOTS lists a replica only once its replication offset is past 0; on an idle
            # primary that takes the first replication ping, by default 10 s away.
            "--repl-ping-replica-period", "1",
        ]
        with open(node.dir / "redis.log", "ab") as log:  # the child keeps its own copy of the fd
            node.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                # PDEATHSIG fires when the *thread* that forked exits, so only the main thread may ask.
                preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
            )

    def _wait_answers(self, node: _Node, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not node.alive:
                raise RuntimeError(f"redis-server on port {node.port} exited:\n{node.log_tail()}")
            try:
                if node.client.ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {node.port} did not answer:\n{node.log_tail()}")
            time.sleep(POLL_S)

    # -- looking at the cluster ---------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        """Every node's port, primaries and replicas, in start order."""
        return list(self._nodes)

    def client(self, port: int) -> redis.Redis:
        """A plain (non-cluster) client for one node, ``decode_responses=True``."""
        return self._nodes[port].client

    def _any_live(self) -> _Node:
        for node in self._nodes.values():
            if node.alive:
                return node
        raise RuntimeError("no cluster node is running")

    def slot_map(self, port: int | None = None) -> SlotMap:
        """CLUSTER SLOTS as one node (default: any running one) sees it; dead replicas left out."""
        node = self._nodes[port] if port is not None else self._any_live()
        live = {p for p, n in self._nodes.items() if n.alive}
        result: SlotMap = {}
        for entry in node.client.execute_command("CLUSTER SLOTS"):
            first, last, primary, *replicas = entry
            result[(int(first), int(last))] = (
                int(primary[1]), frozenset(int(r[1]) for r in replicas if int(r[1]) in live),
            )
        return result

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of the current primaries."""
        return sorted({(HOST, primary) for primary, _ in self.slot_map().values()})

    @property
    def url(self) -> str:
        """A URL for ``RedisCluster.from_url``: any node would do, a current primary is used."""
        return f"redis://{HOST}:{self.startup_nodes[0][1]}"

    def keyslot(self, key: str) -> int:
        return int(self._any_live().client.execute_command("CLUSTER KEYSLOT", key))

    def primary_for_key(self, key: str) -> int:
        """Port of the primary that currently serves ``key``'s slot."""
        slot = self.keyslot(key)
        for (first, last), (primary, _) in self.slot_map().items():
            if first <= slot <= last:
                return primary
        raise LookupError(f"slot {slot} is not served")

    def replica_of(self, primary_port: int) -> int:
        """Port of a running replica of ``primary_port``."""
        for primary, replicas in self.slot_map().values():
            if primary == primary_port and replicas:
                return min(replicas)
        raise LookupError(f"{primary_port} is not a primary with a running replica")

    def health_problems(self) -> list[str]:
        """What keeps the cluster from being fully ready; empty when it is.

        Ready: every running node says cluster_state:ok with all slots ok, every running
        replica has its replication link up, every node reports the same slot map, that map
        covers all slots with running primaries and lists every running replica.
        """
        problems: list[str] = []
        maps: dict[int, SlotMap] = {}
        replicas: set[int] = set()
        for port, node in self._nodes.items():
            if not node.alive:
                continue
            info = node.client.execute_command("CLUSTER INFO")
            state = dict(line.split(":", 1) for line in info.split() if ":" in line)
            if state.get("cluster_state") != "ok" or state.get("cluster_slots_ok") != str(TOTAL_SLOTS):
                problems.append(f"{port}: state {state.get('cluster_state')}, slots ok {state.get('cluster_slots_ok')}")
            repl = node.client.info("replication")
            self._note_role(port, repl["role"])
            if repl["role"] == "slave":
                replicas.add(port)
                if repl.get("master_link_status") != "up":
                    problems.append(f"{port}: replica link {repl.get('master_link_status')}")
            maps[port] = self.slot_map(port)
        if problems:
            return problems
        distinct = {tuple(sorted(m.items())) for m in maps.values()}
        if len(distinct) > 1:
            return [f"nodes disagree on the slot map: {maps}"]
        slot_map = next(iter(maps.values()))
        if sum(last - first + 1 for first, last in slot_map) != TOTAL_SLOTS:
            problems.append("slots not all covered")
        for primary, _ in slot_map.values():
            if not self._nodes[primary].alive:
                problems.append(f"slots still on stopped primary {primary}")
        listed = set().union(*(r for _, r in slot_map.values()))
        if missing := replicas - listed:
            problems.append(f"replicas not in the slot map yet: {sorted(missing)}")
        return problems

    def _note_role(self, port: int, role: str) -> None:
        if role == "master" and self._roles.get(port) == "slave":
            self._promoted_at[port] = time.monotonic()
        self._roles[port] = role

    def wait_healthy(self, timeout: float = 30) -> None:
        _wait("cluster ready", self.health_problems, timeout)

    # -- changing the cluster ---------------------------------------------------------------

    def failover(self, primary_port: int, timeout: float = 30) -> int:
        """Coordinated manual failover of ``primary_port`` to its replica; returns the new primary.

        CLUSTER FAILOVER (no FORCE) makes the primary pause writes until the replica has caught
        up, so no acknowledged write is lost. Returns once the roles have swapped, the old
        primary replicates from the new one and every node agrees on the slot map.
        """
        started = time.monotonic()
        replica_port = self.replica_of(primary_port)
        replica, old = self._nodes[replica_port].client, self._nodes[primary_port].client
        # The one wait that cannot be a poll: Redis does not show the election state (see
        # ELECTION_STATE_S), so a replica that won an election lately is given the time it needs.
        since = time.monotonic() - self._promoted_at.get(replica_port, float("-inf"))
        if since < ELECTION_STATE_S:
            time.sleep(ELECTION_STATE_S - since + 0.1)
        asked = time.monotonic()
        replica.execute_command("CLUSTER FAILOVER")

        def problems() -> list[str]:
            nonlocal asked
            role = replica.info("replication")["role"]
            self._note_role(replica_port, role)
            if role != "master":
                if time.monotonic() - asked > MANUAL_FAILOVER_RETRY_S:  # Redis gave up on it; ask again
                    asked = time.monotonic()
                    replica.execute_command("CLUSTER FAILOVER")
                return [f"{replica_port} not promoted yet"]
            repl = old.info("replication")
            if repl["role"] != "slave" or repl.get("master_port") != replica_port:
                return [f"{primary_port} does not follow {replica_port} yet"]
            return self.health_problems()

        _wait(f"failover of {primary_port} to {replica_port}", problems, timeout)
        self.timings["failover"].append(time.monotonic() - started)
        return replica_port

    def kill(self, port: int) -> None:
        """SIGKILL one node (a crash: no shutdown, nothing saved). Does not wait for the cluster."""
        node = self._nodes[port]
        if node.proc is not None:
            node.proc.kill()
            node.proc.wait(10)
        node.client.connection_pool.disconnect()

    def restart(self, port: int, timeout: float = 30) -> None:
        """Start a killed node again in its own dir, so its nodes.conf makes it rejoin; wait until ready.

        Data is not persisted: a restarted replica resyncs from its primary, but a primary
        restarted before its replica took over comes back empty.
        """
        node = self._nodes[port]
        if node.alive:
            raise RuntimeError(f"node {port} is running")
        started = time.monotonic()
        self._promoted_at.pop(port, None)  # a new process starts with no election state
        self._spawn(node)
        self._wait_answers(node, timeout)
        self.wait_healthy(timeout)
        self.timings["restart"].append(time.monotonic() - started)

    def ensure_healthy(self, timeout: float = 30) -> None:
        """Restart any node a test left killed, then wait until ready (quick when nothing is wrong)."""
        for port, node in self._nodes.items():
            if not node.alive:
                self.restart(port, timeout)
        self.wait_healthy(timeout)

    def flushall(self) -> None:
        """FLUSHALL on every primary (replicas follow through replication)."""
        for _, port in self.startup_nodes:
            self._nodes[port].client.flushall()

    def stop(self) -> None:
        """Kill every node and remove the temp dirs. Safe to call twice."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            for node in self._nodes.values():
                if node.alive:
                    node.proc.kill()  # type: ignore[union-attr]
            for node in self._nodes.values():
                if node.proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        node.proc.wait(10)
                node.client.close()
            shutil.rmtree(self._root, ignore_errors=True)
            _LIVE.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalCluster(ports={self.ports})"
