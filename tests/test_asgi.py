"""BudgetMiddleware end to end: the real openai and anthropic SDKs against a middleware-wrapped
Starlette app served by uvicorn on 127.0.0.1, whose routes play the upstream LLM; on
embedded fakeredis and on a real Redis."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest

from budgetguard import BudgetGuard, Usage
from budgetguard.asgi import BudgetMiddleware
from budgetguard.tokens import count_text_tokens, estimate_input_tokens

from .helpers import config
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
)

KEYS = {"sk-alice": "alice", "sk-bob": "bob"}
WINDOWS = ("user.hourly", "user.daily", "user.monthly", "org.daily", "org.monthly")




def identify(request: Any) -> str | None:
    key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    return KEYS.get(key or request.headers.get("x-api-key", ""))


async def aidentify(request: Any) -> str | None:
    await asyncio.sleep(0)
    return identify(request)


class Env:
    def __init__(self, srv: Server, switch: Switch, url: str, clock: Any) -> None:
        self.srv, self.switch, self.url, self.clock = srv, switch, url, clock
        self.up = Upstream()
        self.events: list[dict[str, Any]] = []
        self.guards: list[BudgetGuard] = []
        self.guard = self.make_guard()

    def make_guard(self, **overrides: Any) -> BudgetGuard:
        overrides.setdefault("models", MODELS)
        g = BudgetGuard(config(**overrides), redis_url=self.url, clock=self.clock, on_event=self.events.append)
        self.guards.append(g)
        return g

    def close(self) -> None:
        """Close every guard on the server's loop, where their async clients and tasks live."""
        for g in self.guards:
            if self.switch.loop is not None:
                asyncio.run_coroutine_threadsafe(g.aclose(), self.switch.loop).result(10)
            g.close()

    def outcomes(self, n: int, timeout: float = 10.0) -> list[str]:
        """The outcomes of the first ``n`` usage events (delivered in the background)."""
        deadline = time.monotonic() + timeout
        while len(self.events) < n:
            assert time.monotonic() < deadline, f"only {len(self.events)} of {n} usage events arrived"
            time.sleep(0.01)
        return [e["outcome"] for e in self.events]

    def plug(self, guard: BudgetGuard | None = None, **kwargs: Any) -> BudgetMiddleware:
        if guard is not None:
            self.guard = guard
        kwargs.setdefault("identify", identify)
        mw = BudgetMiddleware(create_upstream(self.up), guard=self.guard, **kwargs)
        self.switch.app = mw
        return mw

    def openai(self, key: str = "sk-alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.srv.url}/v1", api_key=key, max_retries=0)

    def aopenai(self, key: str = "sk-alice") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.srv.url}/v1", api_key=key, max_retries=0)

    def anthropic(self, key: str = "sk-alice") -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.srv.url, api_key=key, max_retries=0)

    def spent(self, user: str = "alice") -> Decimal:
        return self.guard.status(user).windows["user.daily"].spent_usd

    def reserved(self, user: str = "alice") -> Decimal:
        return self.guard.status(user).windows["user.daily"].reserved_usd

    def assert_ledger(self, spent: Decimal, user: str = "alice", windows: tuple[str, ...] = WINDOWS) -> None:
        st = self.guard.status(user)
        for name in windows:
            w = st.windows[name]
            assert (w.spent_usd, w.reserved_usd) == (spent, 0), name

    def settled(self, user: str = "alice", timeout: float = 10.0) -> Decimal:
        """Wait until the server side has settled (nothing reserved); the spend then."""
        deadline = time.monotonic() + timeout
        while self.reserved(user) != 0:
            assert time.monotonic() < deadline, f"reservation of {user} still held: {self.reserved(user)}"
            time.sleep(0.01)
        return self.spent(user)


@pytest.fixture
def env(upstream_server: tuple[Server, Switch], backend_url: str, clock: Any) -> Iterator[Env]:
    e = Env(*upstream_server, backend_url, clock)
    e.plug()
    yield e
    upstream_server[1].app = None
    e.close()






# ----------------------------------------------------------------------------- JSON


def test_chat_json_records_the_reported_usage_exactly(env):
    raw = env.openai().chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, max_tokens=300)
    resp = raw.parse()
    assert resp.choices[0].message.content == "".join(TEXT)
    env.assert_ledger(chat_cost(env.up))
    assert raw.headers["x-budget-remaining-usd"] == "unlimited"
    assert raw.headers["x-budget-limit"] == "none"
    assert "x-budget-model-routed" not in raw.headers
    assert json.loads(env.up.received[0][1])["max_tokens"] == 300
    assert env.outcomes(1) == ["ok"]


def test_events_carry_the_endpoint_streamed_and_finish_reason(env):
    env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300)
    list(env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300, stream=True))
    assert env.outcomes(2) == ["ok", "ok"]
    json_event, stream_event = env.events
    assert (json_event["endpoint"], json_event["streamed"]) == ("chat", False)
    assert json_event["finish_reason"] is not None and json_event["raw_usage"]["prompt_tokens"] == env.up.prompt_tokens
    assert (stream_event["endpoint"], stream_event["streamed"]) == ("chat", True)


def test_remaining_header_is_the_headroom_after_the_reservation(env):
    env.plug(env.make_guard(tiers={"default": {"hourly_usd": "1.00"}}))
    raw = env.openai().chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, max_tokens=300)
    raw.parse()
    estimate = cost("gpt-4o", estimate_input_tokens("gpt-4o", MESSAGES), 300)
    assert Decimal(raw.headers["x-budget-remaining-usd"]) == Decimal("1.00") - estimate


def test_responses_json_and_stream(env):
    client = env.openai()
    resp = client.responses.create(model="gpt-4o", input="Why budget?", instructions="Be terse.",
                                   max_output_tokens=200)
    assert resp.usage.input_tokens == env.up.prompt_tokens
    env.assert_ledger(chat_cost(env.up))
    events = list(client.responses.create(model="gpt-4o", input=MESSAGES[1:], max_output_tokens=200, stream=True))
    assert events[-1].type == "response.completed"
    env.assert_ledger(2 * chat_cost(env.up))


def test_anthropic_messages_json_and_stream(env):
    client = env.anthropic()
    msg = client.messages.create(model="claude-test-1", system="Be terse.", messages=MESSAGES[1:],
                                 max_tokens=256)
    assert msg.usage.output_tokens == env.up.a_output
    env.assert_ledger(anthropic_cost(env.up))
    events = list(client.messages.create(model="claude-test-1", messages=MESSAGES[1:], max_tokens=256,
                                         stream=True))
    assert [e.type for e in events][-2:] == ["message_delta", "message_stop"]
    env.assert_ledger(2 * anthropic_cost(env.up))


def test_embeddings_and_legacy_completions(env):
    client = env.openai()
    client.embeddings.create(model="text-embedding-3-small", input=["first text", "second text"])
    embedding = cost("text-embedding-3-small", env.up.prompt_tokens, 0)
    env.assert_ledger(embedding)
    client.completions.create(model="gpt-4o", prompt="Say hi", max_tokens=20)
    env.assert_ledger(embedding + chat_cost(env.up))


# ----------------------------------------------------------------------------- streaming


def test_chat_stream_gets_usage_switched_on_and_hidden_from_the_client(env):
    chunks = list(env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300,
                                                       stream=True))
    # The client did not ask for usage: it never sees the usage-only chunk.
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(TEXT)
    assert json.loads(env.up.received[0][1])["stream_options"] == {"include_usage": True}
    env.assert_ledger(chat_cost(env.up))  # settled before the stream's end reached the client


def test_chat_stream_with_usage_asked_for_passes_it_through(env):
    chunks = list(env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300,
                                                       stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == env.up.completion_tokens
    env.assert_ledger(chat_cost(env.up))




def test_client_disconnect_mid_stream_charges_input_and_streamed_output(env):
    env.up.mode = "hang"
    stream = env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300, stream=True)
    for chunk in stream:
        if chunk.choices[0].finish_reason == "stop":
            break
    assert env.reserved() > 0  # the upstream is still streaming keep-alives
    stream.close()
    assert env.up.disconnected.wait(10), "the upstream never saw the client leave"
    assert env.settled() == fallback_cost("gpt-4o", "".join(TEXT))
    env.assert_ledger(fallback_cost("gpt-4o", "".join(TEXT)))
    assert env.outcomes(1) == ["stream_incomplete"]


def test_anthropic_disconnect_uses_the_reported_input(env):
    env.up.mode = "hang"
    stream = env.anthropic().messages.create(model="claude-test-1", messages=MESSAGES[1:], max_tokens=256,
                                             stream=True)
    for event in stream:
        if event.type == "content_block_stop":
            break
    stream.close()
    assert env.up.disconnected.wait(10)
    counted = count_text_tokens("claude-test-1", "".join(TEXT))
    assert counted > 1
    assert env.settled() == anthropic_cost(env.up, output=counted)


@pytest.mark.parametrize("mode", ["cut", "raise"])
def test_stream_ending_without_usage_is_charged_input_plus_counted_output(env, mode):
    env.up.mode = mode
    text = ""
    try:
        for chunk in env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300,
                                                          stream=True):
            text += chunk.choices[0].delta.content or ""
    except openai.APIError:
        assert mode == "raise"
    assert text == "".join(TEXT)
    assert env.settled() == fallback_cost("gpt-4o", text)


def test_concurrent_streams_settle_exactly(env):
    client = env.aopenai()

    async def one() -> str:
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100,
                                                      stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def many() -> list[str]:
        try:
            return await asyncio.gather(*(one() for _ in range(20)))
        finally:
            await client.close()

    assert asyncio.run(many()) == ["".join(TEXT)] * 20
    env.assert_ledger(20 * chat_cost(env.up))


# ----------------------------------------------------------------------------- errors and denials


@pytest.mark.parametrize("status", [400, 429, 500, 503])
def test_upstream_error_releases_the_reservation(env, status):
    env.up.status = status
    with pytest.raises(openai.APIStatusError) as info:
        env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300)
    assert info.value.status_code == status
    env.assert_ledger(Decimal(0))


def test_app_exception_before_answering_releases(env):
    env.up.raise_before_start = True
    with pytest.raises(openai.InternalServerError):
        env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=300)
    env.assert_ledger(Decimal(0))


def test_window_denial_is_429_with_openai_body_and_retry_after(env):
    env.plug(env.make_guard(tiers={"default": {"hourly_usd": "0.01"}}))
    held = env.guard.check("alice", "gpt-4o", MESSAGES, max_tokens=500)  # ~$0.005 of $0.01
    assert held.allowed
    with pytest.raises(openai.RateLimitError) as info:
        env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=700)
    resp = info.value.response
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "60"  # only the held call blocks: reservation_ttl_s
    assert resp.headers["x-budget-limit"] == "user.hourly"
    error = resp.json()["error"]
    assert error["type"] == "budget_exceeded" and error["code"] == "user.hourly"
    assert "user.hourly" in error["message"]
    assert env.up.received == []
    assert env.reserved() == held.estimated_cost_usd


def test_anthropic_denial_has_anthropic_shape(env):
    env.plug(env.make_guard(tiers={"default": {"hourly_usd": "0.000001"}}))
    with pytest.raises(anthropic.RateLimitError) as info:
        env.anthropic().messages.create(model="claude-test-1", messages=MESSAGES[1:], max_tokens=256)
    body = info.value.response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "budget_exceeded" and body["error"]["code"] == "user.hourly"
    assert env.up.received == []


def test_per_request_cap_is_400(env):
    env.plug(env.make_guard(tiers={"default": {"per_request": {"max_output_tokens": 100}}}))
    with pytest.raises(openai.BadRequestError) as info:
        env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=500)
    assert info.value.response.json()["error"]["code"] == "request.max_output_tokens"
    assert "retry-after" not in info.value.response.headers
    assert env.up.received == []


def test_closed_fail_mode_with_redis_down_is_503(env):
    down = BudgetGuard(config(models=MODELS, fail_mode="closed", redis_timeout_ms=100),
                       redis_url="redis://127.0.0.1:1/0", clock=env.clock)
    env.guards.append(down)
    env.plug(down)
    with pytest.raises(openai.InternalServerError) as info:
        env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    assert info.value.status_code == 503
    assert info.value.response.json()["error"]["code"] == "store.unavailable"
    assert info.value.response.headers["retry-after"] == "1"
    assert env.up.received == []


def test_routed_model_goes_downstream_and_is_charged_at_its_price(env):
    env.plug(env.make_guard(tiers={"default": {"hourly_usd": "1.00",
                                               "downgrade": {"at": 0.5, "routes": {"gpt-4o": "gpt-4o-mini"}}}}))
    first = env.guard.check("alice", "gpt-4o", MESSAGES, max_tokens=10)
    env.guard.record(first, Usage(input_tokens=100_000, output_tokens=40_000))  # $0.65 of $1.00
    before = env.spent()
    raw = env.openai().chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, max_tokens=300,
                                                                 stream=True)
    list(raw.parse())
    assert raw.headers["x-budget-model-routed"] == "gpt-4o-mini"
    assert raw.headers["x-budget-limit"] == "user.hourly"
    assert json.loads(env.up.received[0][1])["model"] == "gpt-4o-mini"
    env.assert_ledger(before + chat_cost(env.up, "gpt-4o-mini"))


def test_unidentified_request_is_401_unless_a_default_user_is_set(env):
    with pytest.raises(openai.AuthenticationError):
        env.openai(key="sk-nobody").chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=10)
    assert env.up.received == []
    env.plug(identify=aidentify, default_user="anonymous")
    env.openai(key="sk-nobody").chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=10)
    env.assert_ledger(chat_cost(env.up), user="anonymous")
    env.openai(key="sk-bob").chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=10)
    env.assert_ledger(chat_cost(env.up), user="bob", windows=WINDOWS[:3])


# ----------------------------------------------------------------------------- request bodies

BIG = b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + b"a" * 20_000_000 + b'"}]}'


@pytest.mark.parametrize(("body", "needle"), [
    (b"this is not json", "not valid JSON"),
    (b"", "empty"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[1, 2]", "must be an object"),
    (b'{"messages": []}', "model is required"),
    (b'{"model": 42, "messages": []}', "model must be a non-empty string"),
    (b'{"model": "gpt-4o", "messages": "hello"}', "messages must be an array"),
    (b'{"model": "gpt-4o", "messages": [42]}', "messages[0] must be a dict"),
    (b'{"model": "gpt-4o", "messages": [], "max_tokens": -5}', "max_tokens must be at least 1, got -5"),
    (b'{"model": "gpt-4o", "messages": [], "max_tokens": 1.5}', "max_tokens must be an integer"),
    (b'{"model": "gpt-4o", "model": "gpt-4o-mini", "messages": []}', "'model' more than once"),
    (b'{"model": "gpt-4o", "messages": [], "temperature": NaN}', "NaN"),
    (b'{"model": "gpt-4o", "messages": [], "stream": "yes"}', "stream must be a boolean"),
    (BIG, "exceeds the budget middleware's limit of 16777216 bytes"),
], ids=["not-json", "empty", "bad-utf8", "array", "no-model", "model-type", "messages-type", "message-type",
        "max-tokens-negative", "max-tokens-float", "duplicate-key", "nan", "stream-type", "20MB"])
def test_bad_bodies_are_400_and_reach_nothing(env, body, needle):
    resp = httpx.post(f"{env.srv.url}/v1/chat/completions", content=body,
                      headers={"authorization": "Bearer sk-alice", "content-type": "application/json"}, timeout=30)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert needle in error["message"]
    assert env.up.received == []
    env.assert_ledger(Decimal(0))


def test_bad_anthropic_body_gets_anthropic_error_shape(env):
    resp = httpx.post(f"{env.srv.url}/v1/messages", content=b'{"model": "claude-test-1", "messages": {}}',
                      headers={"x-api-key": "sk-alice"})
    assert resp.status_code == 400
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "messages must be an array" in body["error"]["message"]


def test_body_limit_is_configurable_and_counts_chunked_bodies(env):
    env.plug(max_body_bytes=400)
    small = json.dumps({"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 10}).encode()
    large = json.dumps({"model": "gpt-4o", "messages": MESSAGES * 10, "max_tokens": 10}).encode()
    assert len(small) < 400 < len(large)

    def chunked(data: bytes) -> Iterator[bytes]:  # no content-length: the limit is counted while reading
        for i in range(0, len(data), 50):
            yield data[i:i + 50]

    headers = {"authorization": "Bearer sk-alice"}
    resp = httpx.post(f"{env.srv.url}/v1/chat/completions", content=chunked(large), headers=headers)
    assert resp.status_code == 400 and "400 bytes" in resp.json()["error"]["message"]
    assert env.up.received == []
    resp = httpx.post(f"{env.srv.url}/v1/chat/completions", content=chunked(small), headers=headers)
    assert resp.status_code == 200
    assert env.up.received[0][1] == small  # reassembled from its chunks, byte for byte


def test_body_reaches_the_app_byte_for_byte(env):
    body = '{ "messages" : [ {"role":"user", "content":"héllo \\u00e9"} ],\n "model":"gpt-4o", "max_tokens":9 }'
    resp = httpx.post(f"{env.srv.url}/v1/chat/completions", content=body.encode(),
                      headers={"authorization": "Bearer sk-alice"})
    assert resp.status_code == 200
    _path, received, headers = env.up.received[0]
    assert received == body.encode() and headers["content-length"] == str(len(body.encode()))


def test_other_routes_and_methods_pass_through_untouched(env):
    resp = httpx.get(f"{env.srv.url}/v1/models")
    assert resp.status_code == 200 and not any(h.startswith("x-budget") for h in resp.headers)
    resp = httpx.post(f"{env.srv.url}/v1/models", content=b"not json at all")  # no auth, not guarded
    assert resp.json() == {"echo": "not json at all"}
    env.assert_ledger(Decimal(0))


def test_routes_are_configurable(env):
    env.plug(routes={"/v1/models": "chat"})
    resp = httpx.post(f"{env.srv.url}/v1/models", content=b"not json", headers={"authorization": "Bearer sk-alice"})
    assert resp.status_code == 400
    resp = httpx.post(f"{env.srv.url}/v1/chat/completions", content=b"not json",
                      headers={"authorization": "Bearer sk-alice"})
    assert resp.status_code == 500  # no longer guarded: the app itself got (and choked on) the bad body
    assert len(env.up.received) == 1


def test_constructor_validates(env):
    with pytest.raises(ValueError, match="routes"):
        BudgetMiddleware(create_upstream(env.up), guard=env.guard, identify=identify, routes={"/x": "chatty"})
    with pytest.raises(ValueError, match="max_body_bytes"):
        BudgetMiddleware(create_upstream(env.up), guard=env.guard, identify=identify, max_body_bytes=0)
    with pytest.raises(TypeError):
        BudgetMiddleware(create_upstream(env.up), guard=object(), identify=identify)  # type: ignore[arg-type]


def test_client_gone_while_sending_the_body_reserves_nothing(env):
    mw = BudgetMiddleware(create_upstream(env.up), guard=env.guard, identify=identify)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": [(b"authorization", b"Bearer sk-alice")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    messages = [{"type": "http.request", "body": b'{"model": "gpt-4o", "mess', "more_body": True},
                {"type": "http.disconnect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(mw(scope, receive, send))
    assert sent == [] and messages == []
    assert env.up.received == []
    env.assert_ledger(Decimal(0))


def test_responses_stream_disconnect_charges_the_streamed_deltas(env):
    env.up.mode = "hang"
    stream = env.openai().responses.create(model="gpt-4o", input=MESSAGES, max_output_tokens=200, stream=True)
    deltas = []
    for event in stream:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
            if len(deltas) == len(TEXT):
                break
    stream.close()
    assert env.up.disconnected.wait(10)
    assert env.settled() == fallback_cost("gpt-4o", "".join(deltas))


def test_a_rewritten_body_with_a_lone_surrogate_escape_goes_downstream(env):
    # A streaming chat body is rewritten (include_usage is switched on); JSON allows "\ud800",
    # which UTF-8 cannot encode, so the rewrite must escape it rather than fail with a held reservation.
    body = '{"model":"gpt-4o","max_tokens":9,"stream":true,"messages":[{"role":"user","content":"x \\ud800"}]}'
    resp = httpx.post(f"{env.srv.url}/v1/chat/completions", content=body.encode(),
                      headers={"authorization": "Bearer sk-alice"})
    assert resp.status_code == 200
    received = json.loads(env.up.received[0][1])
    assert received["messages"][0]["content"] == "x \ud800"
    assert received["stream_options"] == {"include_usage": True}
    assert env.settled() == chat_cost(env.up)
