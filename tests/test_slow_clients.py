"""Slow and silent clients against the proxy's server (budgetguard.serving): real uvicorn on
127.0.0.1, raw sockets. Each test waits on its socket for the server to close it, with a
socket timeout far above the deadline under test: a test fails by hanging until that bound."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from starlette.types import Receive, Scope, Send

from budgetguard import BudgetGuard
from budgetguard.config import parse_config
from budgetguard.proxy import proxy_app
from budgetguard.serving import ReadTimeouts, ServingConfig, raise_open_file_limit

from .upstream import MESSAGES, MODELS, Server, Switch, Upstream, create_upstream, free_port, wait_for_proxy

ROOT = Path(__file__).resolve().parent.parent
KEY = "bg-slow-client-test-key-0001"
API_KEYS = [{"sha256": hashlib.sha256(KEY.encode()).hexdigest(), "user": "alice"}]

SHORT = 0.5  # the deadline under test
PATIENCE = 20.0  # how long a test waits for the server to act: a bound, never a delay


@contextmanager
def serve(app: Any, timeouts: ReadTimeouts, keep_alive: float = 60.0) -> Iterator[int]:
    """``app`` served as ``budgetguard proxy`` serves it, on a free port (yielded).

    The keep-alive timeout is long, so a connection closed sooner was closed by a read deadline.
    """
    port = free_port()
    server = uvicorn.Server(ServingConfig(app, timeouts=timeouts, timeout_keep_alive=keep_alive, host="127.0.0.1",
                                          port=port, lifespan="on", log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="uvicorn-slow-clients", daemon=True)
    thread.start()
    deadline = time.monotonic() + PATIENCE
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(PATIENCE)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE)
    sock.settimeout(PATIENCE)
    return sock


def until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body, leaving the connection open."""
    data = bytearray()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {bytes(data)!r}"
        data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return head + b"\r\n\r\n" + body


def chat_head(length: int) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


@pytest.fixture
def proxy(upstream_server: tuple[Server, Switch], real_redis: Any, real_redis_url: str
          ) -> Iterator[tuple[int, Upstream]]:
    """The budget proxy with 0.5 s read deadlines, in front of the fake upstream; its port."""
    srv, switch = upstream_server
    up = Upstream()
    switch.app = create_upstream(up)
    guard = BudgetGuard(parse_config({"models": MODELS, "api_keys": API_KEYS}, env={}), redis_url=real_redis_url)
    app = proxy_app(guard, upstream=srv.url, close_guard=True)
    with serve(app, ReadTimeouts(header=SHORT, body_idle=SHORT, body_total=30)) as port:
        yield port, up


# ----------------------------------------------------------------------------- the request head


def test_a_silent_connection_is_closed_after_the_header_timeout(proxy):
    port, _ = proxy
    with connect(port) as sock:
        assert until_closed(sock) == b""  # nothing was asked, so nothing is answered


def test_half_a_request_head_gets_408_and_is_closed(proxy):
    port, up = proxy
    with connect(port) as sock:
        sock.sendall(chat_head(100)[:60])
        answer = until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert b"connection: close" in answer.lower()
    assert up.received == []


def test_the_header_deadline_restarts_with_each_request_on_a_kept_alive_connection(proxy):
    port, _ = proxy
    with connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        # uvicorn's keep-alive timer (60 s here) stops at the next request's first byte;
        # the rest of that head is then due within the header timeout.
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0")
        assert until_closed(sock).startswith(b"HTTP/1.1 408 ")


# ----------------------------------------------------------------------------- the request body


def test_a_stalled_body_gets_408_and_is_closed(proxy):
    port, up = proxy
    with connect(port) as sock:
        sock.sendall(chat_head(1000) + b'{"model": "gpt-4o", "messages": ')
        answer = until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert up.received == []  # the proxy never forwarded a half-read request


def test_a_body_dripping_past_its_deadline_is_closed(caplog):
    """A client sending a byte now and then dodges the idle timeout, not the whole body's deadline."""
    timeouts = ReadTimeouts(header=PATIENCE, body_idle=PATIENCE, body_total=1.0)
    caplog.set_level(logging.INFO, logger="budgetguard.serving")
    with serve(echo_app, timeouts) as port, connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n")
        sent = 0
        sock.settimeout(0.05)  # the drip's pace: each wait for an answer is also the pause between bytes
        answer = b""
        while sent < 100000:
            try:
                sock.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            break
        sock.settimeout(PATIENCE)
        answer += until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert sent < 100000
    assert "request body not complete within 1 s (408)" in caplog.text


def test_a_stall_after_the_answer_started_closes_without_a_408():
    """An application that answers before reading the body: the connection just ends."""
    with serve(early_answer_app, ReadTimeouts(header=PATIENCE, body_idle=SHORT)) as port, connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n0123456789")
        answer = until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert b"408" not in answer


def test_an_answer_longer_than_the_deadlines_is_not_cut():
    """The deadlines bound how long a request takes to arrive, not how long its answer takes."""
    with serve(slow_answer_app, ReadTimeouts(header=SHORT, body_idle=SHORT, body_total=SHORT)) as port, \
            connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello")
        answer = read_response(sock)  # at least 100 pauses of 20 ms: four times every deadline
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"." * 100)


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def early_answer_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
    await send({"type": "http.response.body", "body": b"started", "more_body": True})
    while (await receive())["type"] != "http.disconnect":
        pass


async def slow_answer_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
    for _ in range(100):
        await asyncio.sleep(0.02)
        await send({"type": "http.response.body", "body": b".", "more_body": True})
    await send({"type": "http.response.body", "body": b""})


# ----------------------------------------------------------------------------- `budgetguard proxy`


@contextmanager
def proxy_command(tmp_path: Path, upstream_url: str, *flags: str, nofile: int | None = None
                  ) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """``budgetguard proxy`` in a subprocess (embedded store), once it answers /healthz."""
    config = tmp_path / "limits.yaml"
    config.write_text(yaml.safe_dump({"redis_url": "memory://", "models": MODELS, "api_keys": API_KEYS}))
    port = free_port()

    def limit_files() -> None:  # in the child: the soft limit a default shell would give it
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    proc = subprocess.Popen([sys.executable, "-m", "budgetguard", "proxy", "--config", str(config), "--upstream",
                             upstream_url, "--port", str(port), "--no-access-log", *flags],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "REDIS_URL": ""}, preexec_fn=limit_files)
    try:
        wait_for_proxy(proc, port, 60)
        yield port, proc
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_the_proxy_command_applies_its_header_timeout(tmp_path, upstream_server):
    srv, switch = upstream_server
    switch.app = create_upstream(Upstream())
    with proxy_command(tmp_path, srv.url, "--header-timeout", "0.5") as (port, _), connect(port) as sock:
        sock.sendall(chat_head(100)[:60])
        assert until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_many_slow_connections_do_not_keep_a_normal_caller_waiting(tmp_path, upstream_server):
    """300 half-sent requests against a proxy started with a soft limit of 256 open files.

    The command raises that limit to the hard one; before it did, accept() failed once the
    slow connections had used up the descriptors, and the normal caller was never answered.
    """
    slow, soft = 300, 256
    needed = slow + 256  # this process's sockets, and its usual files
    ours, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * needed:
        pytest.skip(f"the hard open-file limit ({hard}) is too low for {slow} connections on each side")
    if ours < needed:
        raise_open_file_limit()
    srv, switch = upstream_server
    up = Upstream()
    switch.app = create_upstream(up)
    # The slow connections must outlast the normal call: a long header timeout.
    with proxy_command(tmp_path, srv.url, "--header-timeout", "300", nofile=soft) as (port, proc), \
            ExitStack() as stack:
        for _ in range(slow):
            sock = stack.enter_context(connect(port))
            sock.sendall(chat_head(100)[:60])
        # Every slow one is accepted and waiting on its head: /healthz on each would not tell,
        # so ask for a real guarded call.
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=PATIENCE,
                            headers={"authorization": f"Bearer {KEY}"},
                            json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50})
        assert answer.status_code == 200, answer.text
        assert len(up.received) == 1
        assert proc.poll() is None
