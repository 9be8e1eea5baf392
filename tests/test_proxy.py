"""The budget proxy end to end: the real openai and anthropic SDKs against ``proxy_app`` served by
uvicorn on 127.0.0.1 (lifespan on), forwarding to the fake upstream of tests/upstream.py on
another port; the budget store is a real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml
from starlette.applications import Starlette
from starlette.routing import Mount

from budgetguard import BudgetGuard, ConfigError
from budgetguard.config import parse_config
from budgetguard.proxy import fingerprint, hash_key, proxy_app
from budgetguard.tokens import count_text_tokens, estimate_input_tokens

from .upstream import (
    MESSAGES,
    MODELS,
    TEXT,
    Server,
    Switch,
    Upstream,
    anthropic_cost,
    chat_cost,
    cost,
    create_upstream,
    fallback_cost,
    free_port,
    wait_for_proxy,
)

ROOT = Path(__file__).resolve().parent.parent

ALICE_KEY = "bg-alice-virtual-key-0001"
BOB_KEY = "bg-bob-virtual-key-0002"
API_KEYS = [{"sha256": hashlib.sha256(ALICE_KEY.encode()).hexdigest(), "user": "alice", "name": "alice-laptop"},
            {"sha256": hashlib.sha256(BOB_KEY.encode()).hexdigest(), "user": "bob"}]
WINDOWS = ("user.hourly", "user.daily", "user.monthly")










class Env:
    """A guard on the test Redis, the fake upstream, and proxies started on demand."""

    def __init__(self, upstream: tuple[Server, Switch], redis_url: str, clock: Any) -> None:
        self.upstream_srv, switch = upstream
        self.redis_url, self.clock = redis_url, clock
        self.up = Upstream()
        switch.app = create_upstream(self.up)
        self.events: list[dict[str, Any]] = []
        self.servers: list[Server] = []
        self.guard: BudgetGuard | None = None
        self.url = ""

    def start(self, *, guard_overrides: dict[str, Any] | None = None, redis_url: str | None = None,
              **kwargs: Any) -> Env:
        """Serve a proxy (its own guard, closed by the app's shutdown) in front of the fake upstream."""
        data: dict[str, Any] = {"models": MODELS, "reservation_ttl_s": 60, "api_keys": API_KEYS}
        data.update(guard_overrides or {})
        self.guard = BudgetGuard(parse_config(data, env={}), redis_url=redis_url or self.redis_url,
                                 clock=self.clock, on_event=self.events.append)
        kwargs.setdefault("upstream", self.upstream_srv.url)
        server = Server(proxy_app(self.guard, close_guard=True, **kwargs), lifespan="on")
        server.__enter__()
        self.servers.append(server)
        self.url = server.url
        return self

    def close(self) -> None:
        while self.servers:
            self.servers.pop().__exit__()

    def openai(self, key: str = ALICE_KEY, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kwargs)

    def aopenai(self, key: str = ALICE_KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def anthropic(self, key: str = ALICE_KEY) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0)

    def window(self, user: str = "alice", name: str = "user.daily") -> tuple[Decimal, Decimal]:
        assert self.guard is not None
        w = self.guard.status(user).windows[name]
        return w.spent_usd, w.reserved_usd

    def assert_ledger(self, spent: Decimal, user: str = "alice") -> None:
        for name in WINDOWS:
            assert self.window(user, name) == (spent, Decimal(0)), name

    def settled(self, user: str = "alice", timeout: float = 10.0) -> Decimal:
        """Poll until the proxy has settled (nothing reserved); the spend then."""
        deadline = time.monotonic() + timeout
        while (window := self.window(user))[1] != 0:
            assert time.monotonic() < deadline, f"reservation of {user} still held: {window[1]}"
            time.sleep(0.01)
        return window[0]


@pytest.fixture
def env(upstream_server: tuple[Server, Switch], real_redis: Any, real_redis_url: str, clock: Any) -> Iterator[Env]:
    e = Env(upstream_server, real_redis_url, clock)
    yield e
    e.close()


# ----------------------------------------------------------------------------- the SDKs


def test_openai_chat_json_and_stream_are_charged_the_reported_usage(env):
    env.start()
    raw = env.openai().chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, max_tokens=300)
    assert raw.parse().choices[0].message.content == "".join(TEXT)
    assert raw.headers["x-budget-limit"] == "none"
    env.assert_ledger(chat_cost(env.up))
    chunks = list(env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300,
                                                       stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(TEXT)
    assert all(c.choices for c in chunks)  # the usage chunk the proxy asked for is not shown
    env.assert_ledger(2 * chat_cost(env.up))
    # What reached the upstream: the body, identity encoding, the caller's key (no upstream key set).
    path, body, headers = env.up.received[1]
    assert path == "/v1/chat/completions"
    assert json.loads(body)["stream_options"] == {"include_usage": True}
    assert headers["accept-encoding"] == "identity"
    assert headers["authorization"] == f"Bearer {ALICE_KEY}"


def test_async_openai_responses_and_embeddings(env):
    env.start()

    async def calls() -> None:
        client = env.aopenai()
        try:
            resp = await client.responses.create(model="gpt-4o", input="Why budget?", max_output_tokens=200)
            assert resp.usage.input_tokens == env.up.prompt_tokens
            stream = await client.responses.create(model="gpt-4o", input="Why budget?", max_output_tokens=200,
                                                   stream=True)
            events = [event async for event in stream]
            assert events[-1].type == "response.completed"
            emb = await client.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
            assert len(emb.data) == 2
        finally:
            await client.close()

    asyncio.run(calls())
    env.assert_ledger(2 * chat_cost(env.up) + cost("text-embedding-3-small", env.up.prompt_tokens, 0))


def test_anthropic_messages_json_and_stream(env):
    env.start()
    client = env.anthropic()
    msg = client.messages.create(model="claude-test-1", system="Be terse.", messages=MESSAGES[1:], max_tokens=256)
    assert msg.usage.output_tokens == env.up.a_output
    env.assert_ledger(anthropic_cost(env.up))
    events = list(client.messages.create(model="claude-test-1", messages=MESSAGES[1:], max_tokens=256,
                                         stream=True))
    assert [e.type for e in events][-2:] == ["message_delta", "message_stop"]
    env.assert_ledger(2 * anthropic_cost(env.up))
    # No upstream key configured: the caller's credentials go upstream unchanged (this SDK
    # version sends the key as a bearer token; older ones as x-api-key).
    sent = env.up.received[0][2]
    assert ALICE_KEY in (sent.get("x-api-key"), sent.get("authorization", "").removeprefix("Bearer "))


def test_concurrent_streams_settle_exactly(env):
    env.start()

    async def many() -> list[str]:
        client = env.aopenai()

        async def one() -> str:
            stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100,
                                                          stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        try:
            return await asyncio.gather(*(one() for _ in range(30)))
        finally:
            await client.close()

    assert asyncio.run(many()) == ["".join(TEXT)] * 30
    env.assert_ledger(30 * chat_cost(env.up))


# ----------------------------------------------------------------------------- keys and users


def test_two_keys_charge_their_own_users(env):
    env.start()
    env.openai(ALICE_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    env.openai(BOB_KEY).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
    env.openai(BOB_KEY).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
    env.assert_ledger(chat_cost(env.up), user="alice")
    env.assert_ledger(2 * chat_cost(env.up, "gpt-4o-mini"), user="bob")
    # Anthropic's x-api-key header names the caller as well.
    resp = httpx.post(f"{env.url}/v1/messages", headers={"x-api-key": BOB_KEY, "anthropic-version": "2023-06-01"},
                      json={"model": "claude-test-1", "max_tokens": 20, "messages": MESSAGES[1:]})
    assert resp.status_code == 200 and env.up.received[-1][2]["x-api-key"] == BOB_KEY
    env.assert_ledger(2 * chat_cost(env.up, "gpt-4o-mini") + anthropic_cost(env.up), user="bob")
    deadline = time.monotonic() + 10
    while len(env.events) < 4:  # usage events are written in the background
        assert time.monotonic() < deadline
        time.sleep(0.01)
    tags = sorted((e["user"], e["tags"].get("api_key")) for e in env.events)
    # The key's name when it has one, else its fingerprint.
    assert tags == [("alice", "alice-laptop")] + [("bob", fingerprint(hash_key(BOB_KEY)))] * 3


def test_unknown_or_missing_key_is_401_and_never_logged(env, caplog):
    caplog.set_level(logging.DEBUG)
    env.start()
    stranger = "sk-proj-this-key-is-not-listed-anywhere"
    with pytest.raises(openai.AuthenticationError) as info:
        env.openai(stranger).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    error = info.value.response.json()["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    with pytest.raises(anthropic.AuthenticationError) as ainfo:
        env.anthropic(stranger).messages.create(model="claude-test-1", messages=MESSAGES[1:], max_tokens=50)
    body = ainfo.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    resp = httpx.post(f"{env.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
    assert resp.status_code == 401
    resp = httpx.get(f"{env.url}/v1/models", headers={"authorization": f"Bearer {stranger}"})
    assert resp.status_code == 401  # unbudgeted routes need a known key too
    assert env.up.received == []
    env.assert_ledger(Decimal(0))
    # A known key works, and neither key is ever logged; the unknown one's fingerprint is.
    env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    logged = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert any(fingerprint(hash_key(stranger)) in line for line in logged)
    for secret in (stranger, ALICE_KEY):
        assert not any(secret in line for line in logged)
    assert not any(secret in json.dumps(e) for e in env.events for secret in (stranger, ALICE_KEY))


def test_virtual_keys_are_replaced_by_the_upstream_keys(env):
    env.start(upstream_api_key="sk-real-openai", anthropic_api_key="sk-ant-real")
    env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    env.anthropic().messages.create(model="claude-test-1", messages=MESSAGES[1:], max_tokens=50)
    (_, _, openai_headers), (_, _, anthropic_headers) = env.up.received
    assert openai_headers["authorization"] == "Bearer sk-real-openai" and "x-api-key" not in openai_headers
    assert anthropic_headers["x-api-key"] == "sk-ant-real" and "authorization" not in anthropic_headers
    assert not any(ALICE_KEY in value for h in (openai_headers, anthropic_headers) for value in h.values())
    env.assert_ledger(chat_cost(env.up) + anthropic_cost(env.up))


def test_anthropic_requests_go_to_the_anthropic_upstream(env):
    other = Upstream()
    with Server(create_upstream(other)) as anthropic_srv:
        env.start(anthropic_upstream=anthropic_srv.url, passthrough="all")
        env.anthropic().messages.create(model="claude-test-1", messages=MESSAGES[1:], max_tokens=50)
        auth = {"authorization": f"Bearer {ALICE_KEY}"}
        httpx.get(f"{env.url}/v1/models", headers={**auth, "anthropic-version": "2023-06-01"})
        env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
        httpx.get(f"{env.url}/v1/models", headers=auth)
        env.close()
    assert [r[0] for r in other.received] == ["/v1/messages", "/v1/models"]
    assert [r[0] for r in env.up.received] == ["/v1/chat/completions", "/v1/models"]
    # Paths below /v1/messages are Anthropic's too: here its upstream is down, the other one up.
    env.start(anthropic_upstream=f"http://127.0.0.1:{free_port()}", passthrough="all")
    resp = httpx.post(f"{env.url}/v1/messages/count_tokens", headers=auth, json={})
    assert resp.status_code == 502 and resp.json()["type"] == "error"
    assert httpx.get(f"{env.url}/v1/models", headers=auth).status_code == 200


def test_upstream_keys_come_from_the_config(env):
    env.start(guard_overrides={"proxy": {"upstream_api_key": "sk-from-config", "upstream": "http://192.0.2.1:9"}})
    env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    assert env.up.received[0][2]["authorization"] == "Bearer sk-from-config"  # and the argument's upstream won


def test_trusted_user_header_names_the_user_and_is_not_forwarded(env):
    env.start(user_header="X-Budget-User")
    client = env.openai(key="sk-provider-key", default_headers={"X-Budget-User": "carol@example.com"})
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    env.assert_ledger(chat_cost(env.up), user="carol@example.com")
    headers = env.up.received[0][2]
    assert "x-budget-user" not in headers
    assert headers["authorization"] == "Bearer sk-provider-key"  # pass-through: no upstream key configured
    # The header wins over a listed key; without it, the api_keys still name the caller.
    env.openai(default_headers={"X-Budget-User": "carol@example.com"}).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=50)
    env.assert_ledger(2 * chat_cost(env.up), user="carol@example.com")
    env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    env.assert_ledger(chat_cost(env.up), user="alice")


def test_unbudgeted_requests_follow_passthrough(env):
    env.start()  # passthrough: models (the default)
    auth = {"authorization": f"Bearer {ALICE_KEY}"}
    resp = httpx.get(f"{env.url}/v1/models?limit=2&after=m%201", headers=auth)
    assert resp.status_code == 200 and resp.json() == {"echo": ""}
    assert resp.headers["x-echo-query"] == "limit=2&after=m%201"  # the query string, as sent
    assert httpx.head(f"{env.url}/v1/models", headers=auth).status_code == 200
    assert httpx.options(f"{env.url}/v1/models", headers=auth).status_code == 405  # the upstream's answer
    assert len(env.up.received) == 2
    env.up.received.clear()
    resp = httpx.post(f"{env.url}/v1/models", headers=auth, content=b"payload")
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "route_not_allowed"
    resp = httpx.get(f"{env.url}/v1/files", headers=auth)
    assert resp.status_code == 403
    resp = httpx.get(f"{env.url}/v1/chat/completions", headers=auth)  # stored completions: not budgeted
    assert resp.status_code == 403
    assert env.up.received == []
    env.start(passthrough="read")
    assert httpx.get(f"{env.url}/v1/files", headers=auth).status_code == 404  # forwarded; the fake has no route
    assert httpx.post(f"{env.url}/v1/models", headers=auth, content=b"payload").status_code == 403
    env.start(passthrough="all")
    resp = httpx.post(f"{env.url}/v1/models", headers=auth, content=b"payload")
    assert resp.json() == {"echo": "payload"}
    env.start(passthrough="none")
    assert httpx.get(f"{env.url}/v1/models", headers=auth).status_code == 403
    env.assert_ledger(Decimal(0))


def test_headers_hop_by_hop_dropped_both_ways(env):
    env.start()
    resp = httpx.post(f"{env.url}/v1/chat/completions",
                      json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20},
                      headers={"authorization": f"Bearer {ALICE_KEY}", "connection": "keep-alive, x-hop",
                               "x-hop": "1", "x-kept": "2", "proxy-authorization": "Basic abc",
                               "accept-encoding": "gzip", "te": "trailers", "keep-alive": "timeout=5",
                               "trailer": "x-checksum"})
    assert resp.status_code == 200
    headers = env.up.received[0][2]
    assert headers["x-kept"] == "2" and headers["accept-encoding"] == "identity"
    for name in ("x-hop", "proxy-authorization", "te", "keep-alive", "trailer"):
        assert name not in headers
    assert resp.headers["content-type"] == "application/json"
    # The upstream's Content-Length is not relayed: the answer is streamed as it comes.
    assert "content-length" not in resp.headers and resp.headers["transfer-encoding"] == "chunked"
    assert resp.headers.get("x-budget-remaining-usd") == "unlimited"
    # A chunked request body reaches the upstream whole, with its length.
    body = json.dumps({"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20}).encode()
    resp = httpx.post(f"{env.url}/v1/chat/completions", content=iter([body[:10], body[10:]]),
                      headers={"authorization": f"Bearer {ALICE_KEY}"})
    assert resp.status_code == 200
    _, received, headers = env.up.received[1]
    assert received == body and headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in headers


def test_not_found_outside_v1_and_dot_segments_refused(env):
    env.start()
    resp = httpx.get(f"{env.url}/admin")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    resp = httpx.get(f"{env.url}/v1/%2e%2e/admin", headers={"authorization": f"Bearer {ALICE_KEY}"})
    assert resp.status_code == 400
    resp = httpx.post(f"{env.url}/healthz")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"
    assert env.up.received == []


# ----------------------------------------------------------------------------- budget answers


def test_denials_through_the_proxy(env):
    env.start(guard_overrides={"tiers": {"default": {"hourly_usd": "0.01", "models": ["gpt-4o", "gpt-4o-mini"],
                                                     "per_request": {"max_output_tokens": 1000}}}})
    assert env.guard is not None
    held = env.guard.check("alice", "gpt-4o", MESSAGES, max_tokens=500)  # about half the hourly cap
    client = env.openai()
    with pytest.raises(openai.RateLimitError) as info:  # the hourly cap
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=700)
    assert info.value.response.json()["error"]["code"] == "user.hourly"
    # Only the held call blocks: reservation_ttl_s, not the reset.
    assert info.value.response.headers["retry-after"] == "60"
    env.guard.release(held)
    with pytest.raises(openai.BadRequestError) as info:  # a per-request cap
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5000)
    assert info.value.response.json()["error"]["code"] == "request.max_output_tokens"
    with pytest.raises(openai.PermissionDeniedError) as info:  # the tier's allow-list
        client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert info.value.response.json()["error"]["code"] == "model.not_allowed"
    with pytest.raises(openai.BadRequestError):  # a bad body
        client.chat.completions.create(model="gpt-4o", messages="not a list", max_tokens=5)  # type: ignore[arg-type]
    assert env.up.received == []
    env.assert_ledger(Decimal(0))


def test_store_down_under_closed_fail_mode_is_503(env):
    env.start(guard_overrides={"fail_mode": "closed", "redis_timeout_ms": 100},
              redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(openai.InternalServerError) as info:
        env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
    assert info.value.status_code == 503
    assert info.value.response.json()["error"]["code"] == "store.unavailable"
    assert info.value.response.headers["retry-after"] == "1"
    assert env.up.received == []


@pytest.mark.parametrize("status", [429, 500])
def test_upstream_error_status_passes_through_and_releases(env, status):
    env.start()
    env.up.status = status
    with pytest.raises(openai.APIStatusError) as info:
        env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    assert info.value.status_code == status
    assert info.value.response.json()["error"]["message"] == "upstream says no"
    env.assert_ledger(Decimal(0))


# ----------------------------------------------------------------------------- upstream failures


def test_unreachable_upstream_is_502_and_releases(env):
    env.start(upstream=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(openai.APIStatusError) as info:
        env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    assert info.value.status_code == 502
    error = info.value.response.json()["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_unreachable")
    with pytest.raises(anthropic.APIStatusError) as ainfo:
        env.anthropic().messages.create(model="claude-test-1", messages=MESSAGES[1:], max_tokens=50)
    assert ainfo.value.status_code == 502 and ainfo.value.response.json()["type"] == "error"
    env.assert_ledger(Decimal(0))
    metrics = httpx.get(f"{env.url}/metrics").text
    assert 'budgetguard_proxy_upstream_errors_total{code="upstream_unreachable"} 2.0' in metrics
    assert 'budgetguard_proxy_requests_total{endpoint="chat",status="502"} 1.0' in metrics
    assert httpx.get(f"{env.url}/healthz").status_code == 200  # the store's health, not the upstream's


@pytest.fixture
def silent_upstream() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_upstream_past_the_timeout_is_504_and_releases(env, silent_upstream):
    env.start(upstream=silent_upstream, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    assert time.monotonic() - started < 5
    assert info.value.status_code == 504
    assert info.value.response.json()["error"]["code"] == "upstream_timeout"
    env.assert_ledger(Decimal(0))


def test_no_free_upstream_connection_is_504(env):
    env.start(max_connections=1, connect_timeout=0.3)
    env.up.mode = "hang"  # the first stream holds the only connection
    stream = env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300, stream=True)
    next(iter(stream))
    with pytest.raises(openai.APIStatusError) as info:
        env.openai(BOB_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    assert info.value.status_code == 504
    assert "no upstream connection became free" in info.value.response.json()["error"]["message"]
    env.assert_ledger(Decimal(0), user="bob")
    stream.close()
    assert env.up.disconnected.wait(10)
    env.openai(BOB_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)  # free again


def test_upstream_dying_mid_stream_ends_it_with_an_error_and_charges_what_was_counted(env):
    env.start()
    env.up.mode = "raise"  # the upstream's connection breaks after the text, before the usage
    text = ""
    with pytest.raises(openai.APIError) as info:
        for chunk in env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300,
                                                          stream=True):
            text += chunk.choices[0].delta.content or ""
    assert info.value.body["code"] == "upstream_interrupted"
    assert text == "".join(TEXT)
    assert env.settled() == fallback_cost("gpt-4o", text)
    env.assert_ledger(fallback_cost("gpt-4o", text))


@pytest.fixture
def breaking_upstream() -> Iterator[str]:
    """An upstream that starts a JSON answer of 1000 bytes, sends 20, and closes the connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"
                             b'{"id": "chatcmpl-1",')

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    thread.join(10)


def test_json_answer_breaking_off_is_aborted_and_charged_the_worst_case(env, breaking_upstream):
    env.start(upstream=breaking_upstream)
    with pytest.raises(httpx.RemoteProtocolError):  # an incomplete transfer, not a truncated document
        httpx.post(f"{env.url}/v1/chat/completions", headers={"authorization": f"Bearer {ALICE_KEY}"},
                   json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 300})
    worst_case = cost("gpt-4o", estimate_input_tokens("gpt-4o", MESSAGES), 300)
    assert env.settled() == worst_case


def test_upstream_stalling_mid_stream_times_out_with_an_error_event(env):
    env.start(timeout=0.5)
    env.up.mode = "stall"
    events = []
    with pytest.raises(anthropic.APIStatusError) as info:
        for event in env.anthropic().messages.create(model="claude-test-1", messages=MESSAGES[1:], max_tokens=256,
                                                     stream=True):
            events.append(event.type)
    assert "upstream_timeout" in str(info.value)
    assert events[-1] == "content_block_stop"
    assert env.up.disconnected.wait(10), "the upstream connection was not closed"
    counted = count_text_tokens("claude-test-1", "".join(TEXT))
    total_in = env.up.a_input + env.up.a_cache_read + env.up.a_cache_write
    expected = cost("claude-test-1", total_in, counted, cached=env.up.a_cache_read, written=env.up.a_cache_write)
    assert env.settled() == expected


def test_upstream_ending_a_stream_early_is_charged_what_was_counted(env):
    env.start()
    env.up.mode = "cut"
    text = "".join(c.choices[0].delta.content or "" for c in env.openai().chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=300, stream=True))
    assert text == "".join(TEXT)
    assert env.settled() == fallback_cost("gpt-4o", text)


def test_client_leaving_mid_stream_closes_the_upstream_stream(env):
    env.start()
    env.up.mode = "hang"  # keep-alives after the text, until its client leaves
    stream = env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300, stream=True)
    for chunk in stream:
        if chunk.choices[0].finish_reason == "stop":
            break
    assert env.window()[1] > 0  # still streaming, still reserved
    stream.close()
    assert env.up.disconnected.wait(10), "the proxy kept the upstream stream open"
    assert env.settled() == fallback_cost("gpt-4o", "".join(TEXT))


# ----------------------------------------------------------------------------- health and metrics


def test_healthz_and_metrics(env):
    env.start()
    resp = httpx.get(f"{env.url}/healthz")
    assert (resp.status_code, resp.json()) == (200, {"status": "ok"})
    env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    metrics = httpx.get(f"{env.url}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert 'budgetguard_decisions_total{limit="none",outcome="allowed"} 1.0' in metrics.text
    assert 'budgetguard_proxy_requests_total{endpoint="chat",status="200"} 1.0' in metrics.text
    assert len(env.up.received) == 1  # neither path was forwarded


def test_healthz_is_503_when_the_store_is_unreachable(env):
    env.start(guard_overrides={"redis_timeout_ms": 100}, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    resp = httpx.get(f"{env.url}/healthz")
    assert resp.status_code == 503
    assert resp.json() == {"status": "unavailable", "store": "unreachable", "fail_mode": "open"}


# ----------------------------------------------------------------------------- configuration


def test_proxy_app_refuses_bad_setups(env):
    env.start()
    assert env.guard is not None
    with pytest.raises(ConfigError, match="upstream: must be an http"):
        proxy_app(env.guard, upstream="api.openai.com")
    with pytest.raises(ConfigError, match="no upstream given"):
        proxy_app(env.guard)
    keyless = BudgetGuard(parse_config({}, env={}), redis_url="memory://proxy-keyless")
    with pytest.raises(ConfigError, match=r"api_keys: no keys and no proxy\.user_header"):
        proxy_app(keyless, upstream="http://127.0.0.1:9")
    proxy_app(keyless, upstream="http://127.0.0.1:9", user_header="X-Budget-User")  # a gateway names users
    # A key read from a secret file with its newline would go into a header, and into an error.
    with pytest.raises(ConfigError, match="upstream_api_key: contains whitespace") as info:
        proxy_app(env.guard, upstream="http://127.0.0.1:9", upstream_api_key="sk-live-SECRET\n")
    assert "SECRET" not in str(info.value)
    keyless.close()


BAD = [
    ({"api_keys": [API_KEYS[0], {"sha256": "sk-plaintext-key-pasted-by-mistake", "user": "x"}]},
     "api_keys.1.sha256", "64 lowercase hex"),
    ({"api_keys": [{"sha256": API_KEYS[0]["sha256"].upper(), "user": "x"}]}, "api_keys.0.sha256", "lowercase"),
    ({"api_keys": [API_KEYS[0], API_KEYS[1], {**API_KEYS[0], "user": "mallory"}]}, "api_keys.2.sha256",
     "same key as api_keys.0.sha256"),
    ({"api_keys": [{"sha256": API_KEYS[0]["sha256"], "user": "  "}]}, "api_keys.0.user", "non-empty"),
    ({"api_keys": [{"sha256": API_KEYS[0]["sha256"]}]}, "api_keys.0.user", "required"),
    ({"api_keys": [{**API_KEYS[0], "team": "x"}]}, "api_keys.0.team", "Extra inputs"),
    ({"proxy": {"upstreams": "https://api.openai.com"}}, "proxy.upstreams", "Extra inputs"),
    ({"proxy": {"upstream": "api.openai.com"}}, "proxy.upstream", "http(s) URL"),
    ({"proxy": {"upstream": "https://api.openai.com/v1"}}, "proxy.upstream", "without /v1"),
    ({"proxy": {"anthropic_upstream": "https://x.example/?a=1"}}, "proxy.anthropic_upstream", "query"),
    ({"proxy": {"upstream": "https://svc:sk-plaintext-key-pasted-by-mistake@gw.example"}}, "proxy.upstream",
     "must not carry credentials"),
    ({"proxy": {"upstream_api_key": "${OPENAI_API_KEY}"}}, "proxy.upstream_api_key", "is empty"),
    ({"proxy": {"anthropic_api_key": "sk ant"}}, "proxy.anthropic_api_key", "whitespace"),
    ({"proxy": {"user_header": "Authorization"}}, "proxy.user_header", "rewrites itself"),
    ({"proxy": {"user_header": "X User"}}, "proxy.user_header", "not a valid HTTP header name"),
    ({"proxy": {"timeout_s": 0}}, "proxy.timeout_s", "greater than 0"),
    ({"proxy": {"passthrough": "some"}}, "proxy.passthrough", "'models', 'read', 'all' or 'none'"),
    ({"proxy": {"max_body_bytes": True}}, "proxy.max_body_bytes", "boolean"),
]


@pytest.mark.parametrize(("data", "path", "needle"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_proxy_config_names_the_field(data, path, needle):
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    message = str(info.value)
    assert message.startswith(f"{path}:"), message
    assert needle in message
    assert "sk-plaintext-key-pasted-by-mistake" not in message  # a pasted key is never repeated


def test_proxy_config_defaults_and_env():
    c = parse_config({"proxy": {"upstream": "${UP}/", "upstream_api_key": "${KEY}", "user_header": ""}},
                     env={"UP": "https://gateway.example/openai", "KEY": "sk-real"})
    p = c.proxy
    assert (p.upstream, p.upstream_api_key, p.user_header) == ("https://gateway.example/openai", "sk-real", None)
    assert (p.timeout_s, p.connect_timeout_s, p.max_body_bytes, p.passthrough) == (600, 10, 16 * 1024 * 1024,
                                                                                  "models")
    assert parse_config({"proxy": {"upstream": "${UNSET}"}}, env={}).proxy.upstream is None


def test_the_app_mounted_at_a_prefix(env):
    env.start()  # a guard to build the app with
    assert env.guard is not None
    outer = Starlette(routes=[Mount("/llm", app=proxy_app(env.guard, upstream=env.upstream_srv.url))])
    with Server(outer, lifespan="on") as srv:  # Starlette runs no lifespan of a mounted app
        client = openai.OpenAI(base_url=f"{srv.url}/llm/v1", api_key=ALICE_KEY, max_retries=0)
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
        assert httpx.get(f"{srv.url}/llm/healthz").json() == {"status": "ok"}
    assert env.up.received[0][0] == "/v1/chat/completions"
    env.assert_ledger(chat_cost(env.up))


def test_upstream_path_prefix_is_kept(env):
    # A gateway mounted under a path: the request's /v1/... path goes below it.
    env.start(upstream=f"{env.upstream_srv.url}/prefix")
    with pytest.raises(openai.NotFoundError):
        env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
    env.assert_ledger(Decimal(0))  # the upstream's 404 released the reservation


# ----------------------------------------------------------------------------- the command


def cli(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "budgetguard", *args], cwd=ROOT, capture_output=True, text=True,
                          input=stdin, timeout=timeout)


def test_hash_key_prints_the_entry():
    out = cli("hash-key", "--user", "alice", "--name", "alice laptop", stdin="sk-some-key\n")
    assert out.returncode == 0, out.stderr
    entry = yaml.safe_load(out.stdout)[0]
    assert entry == {"sha256": hashlib.sha256(b"sk-some-key").hexdigest(), "user": "alice", "name": "alice laptop"}
    out = cli("hash-key", "--key", "sk-other")
    assert yaml.safe_load(out.stdout)[0]["sha256"] == hashlib.sha256(b"sk-other").hexdigest()
    parse_config({"api_keys": yaml.safe_load(out.stdout)}, env={})  # pastes as is
    out = cli("hash-key", "--generate", "--user", "bob")
    key = out.stdout.split("it is not stored anywhere): ")[1].split("\n")[0]
    assert yaml.safe_load(out.stdout)[0]["sha256"] == hashlib.sha256(key.encode()).hexdigest()
    out = cli("hash-key", stdin="")
    assert (out.returncode, out.stderr.count("\n")) == (2, 1)


@pytest.mark.parametrize(("args", "needle"), [
    (["--upstream", "api.openai.com"], "--upstream: must be an http(s) URL"),
    (["--upstream", "https://svc:gw-token-123@gw.example"], "--upstream: must not carry credentials"),
    (["--upstream", "https://api.openai.com/v1"], "without /v1"),
    (["--upstream", "http://127.0.0.1:9", "--config", "no-such-limits.yaml"], "cannot read no-such-limits.yaml"),
    (["--upstream", "http://127.0.0.1:9", "--port", "70000"], "--port 70000"),
    (["--port", "eighty"], "invalid int value"),
])
def test_proxy_command_bad_flags_exit_2_with_one_line(args, needle):
    out = cli("proxy", *args)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and needle in out.stderr, out.stderr
    assert "gw-token-123" not in out.stderr  # a URL's credentials are never repeated


def test_check_config_summarises_the_proxy(tmp_path):
    config = tmp_path / "limits.yaml"
    config.write_text(yaml.safe_dump({"api_keys": API_KEYS, "proxy": {"upstream": "https://api.openai.com",
                                                                      "upstream_api_key": "sk-real-upstream"}}))
    out = cli("check-config", str(config))
    assert out.returncode == 0, out.stderr
    assert ("proxy      upstream https://api.openai.com, anthropic same; 2 api keys, user header off, "
            "upstream keys set, passthrough models") in out.stdout
    assert "sk-real-upstream" not in out.stdout


def test_proxy_command_needs_keys_or_a_user_header_and_a_free_port(tmp_path):
    config = tmp_path / "limits.yaml"
    config.write_text("redis_url: memory://\n")
    out = cli("proxy", "--config", str(config), "--upstream", "http://127.0.0.1:9")
    assert out.returncode == 2 and out.stderr.startswith("budgetguard: api_keys: no keys")
    config.write_text(yaml.safe_dump({"redis_url": "memory://", "api_keys": API_KEYS}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = cli("proxy", "--config", str(config), "--upstream", "http://127.0.0.1:9", "--port", str(port))
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1] == f"budgetguard: cannot listen on 127.0.0.1:{port} (see the error above)"


def _proxy_process(env: Env, config: Path, *flags: str) -> tuple[subprocess.Popen[str], openai.OpenAI]:
    """`budgetguard proxy` in a process of its own, listening; and a client of it (bob's key)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "budgetguard", "proxy", "--config", str(config),
                             "--upstream", env.upstream_srv.url, "--port", str(port), *flags],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "REDIS_URL": ""})
    try:
        wait_for_proxy(proc, port, 30)
    except BaseException:
        proc.kill()
        proc.communicate(timeout=30)
        raise
    return proc, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=BOB_KEY, max_retries=0)


def test_proxy_command_serves_a_guarded_call(env, tmp_path):
    config = tmp_path / "limits.yaml"
    config.write_text(yaml.safe_dump({"redis_url": env.redis_url, "models": MODELS, "api_keys": API_KEYS,
                                      "proxy": {"timeout_s": 30}}))
    proc, client = _proxy_process(env, config)
    port = client.base_url.port
    try:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert proc.returncode in (0, -signal.SIGTERM), stderr
    assert "Application shutdown complete" in stderr
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in stderr  # the access log
    assert f"budgetguard proxy on http://127.0.0.1:{port}" in stderr
    assert "Traceback" not in stderr and BOB_KEY not in stderr
    # The command's guard runs on the real clock: read the ledger with one too.
    with BudgetGuard(parse_config({"models": MODELS}, env={}), redis_url=env.redis_url) as reader:
        st = reader.status("bob").windows["user.monthly"]
    assert (st.spent_usd, st.reserved_usd) == (chat_cost(env.up), 0)


# ----------------------------------------------------------------------------- on a Redis Cluster


@pytest.mark.parametrize("slices", [False, True], ids=["cluster", "cluster-slices"])
def test_the_proxy_on_a_redis_cluster(upstream_server, cluster_url, clock, slices):
    """JSON and streaming through the proxy with the budget store on a real cluster (and org slices)."""
    e = Env(upstream_server, cluster_url, clock)
    org = {"daily_usd": "100", **({"slice_usd": "1"} if slices else {})}
    try:
        e.start(guard_overrides={"org": org})
        assert e.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300)
        chunks = list(e.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300,
                                                         stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(TEXT)
        assert e.settled() == 2 * chat_cost(e.up)  # the user's windows
    finally:
        e.close()  # the proxy's shutdown closes its guard: slices hand their spend in
    g = BudgetGuard(parse_config({"models": MODELS}, env={}), redis_url=cluster_url, clock=clock)
    org_day = g.status("alice").windows["org.daily"]
    assert (org_day.spent_usd, org_day.reserved_usd) == (2 * chat_cost(e.up), 0)
    g.close()


def test_budgets_per_api_key_and_per_tenant_through_the_proxy(env):
    keys = [{**API_KEYS[0], "tags": {"tenant": "acme"}, "plans": {"tenant": "small"}},
            {**API_KEYS[1], "tags": {"tenant": "globex"}}]
    env.start(guard_overrides={"api_keys": keys, "budgets": {
        "key": {"per": "api_key", "requests_per_minute": 2},
        "tenant": {"per": "tenant", "default_plan": "big",
                   "plans": {"small": {"max_concurrent": 5, "daily_usd": 100}, "big": {"daily_usd": 1000}}}}})
    client = env.openai()
    for _ in range(2):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    with pytest.raises(openai.RateLimitError) as denied:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    assert denied.value.response.headers["x-budget-limit"] == "key.rpm"
    assert denied.value.response.headers["retry-after"] == "34"  # 15:09:26: the minute ends in 34 s
    # bob's key has its own rpm; his calls go to his key's tenant, on the default plan.
    env.openai(BOB_KEY).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    assert env.guard is not None
    assert env.guard.budget_status("key", "alice-laptop").windows["key.rpm"].used == 2
    acme = env.guard.budget_status("tenant", "acme", plan="small").windows
    assert acme["tenant.daily"].spent_usd == 2 * chat_cost(env.up) and acme["tenant.daily"].limit_usd == 100
    assert env.guard.budget_status("tenant", "globex").windows["tenant.daily"].limit_usd == 1000


def test_the_proxy_command_reloads_its_limits_on_sighup(env, tmp_path):
    config = tmp_path / "limits.yaml"
    data = {"redis_url": env.redis_url, "models": MODELS, "api_keys": API_KEYS,
            "budgets": {"key": {"per": "api_key", "requests_per_minute": 100}}}
    config.write_text(yaml.safe_dump(data))
    proc, client = _proxy_process(env, config, "--no-access-log")
    try:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
        config.write_text(yaml.safe_dump({**data, "budgets": {"key": {"requests_per_minute": -1}}}))  # refused
        proc.send_signal(signal.SIGHUP)
        data["budgets"]["key"]["requests_per_minute"] = 1
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
        config.write_text(yaml.safe_dump(data))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while True:  # the handler runs between requests; the cap it sets is 1 a minute
            try:
                client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
            except openai.RateLimitError as denied:
                assert denied.response.headers["x-budget-limit"] == "key.rpm"
                break
            assert time.monotonic() < deadline, "the reload never took effect"
            time.sleep(0.1)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "limits not reloaded, the running ones are kept: budgets.key.requests_per_minute" in stderr
    assert f"limits reloaded from {config}" in stderr and "Traceback" not in stderr
