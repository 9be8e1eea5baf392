"""Ways past a cap over HTTP, through the budget proxy and the middleware (uvicorn on
127.0.0.1, the fake upstream of tests/upstream.py, a real Redis, the real SDKs).

- What was reserved bounds what can be spent: a request without an output cap reaches
  the upstream with the one its reservation was priced on.
- Spelled-differently methods and paths are budgeted or refused, never forwarded unbudgeted.
- Clients that nobody here wrote: token-id inputs, Anthropic's free token count, SDKs that
  would sleep a month-long Retry-After, streams that gain ``"usage": null``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from budgetguard import BudgetGuard
from budgetguard.asgi import BudgetMiddleware

from .helpers import config
from .test_proxy import ALICE_KEY, API_KEYS, BOB_KEY, Env
from .upstream import MESSAGES, MODELS, Server, Switch, cost

TIER = {"per_request": {"max_output_tokens": 1024, "max_cost_usd": "0.02"}, "hourly_usd": "0.05"}


@pytest.fixture
def env(upstream_server: tuple[Server, Switch], real_redis: Any, real_redis_url: str, clock: Any) -> Iterator[Env]:
    e = Env(upstream_server, real_redis_url, clock)
    yield e
    e.close()


def raw(url: str, method: str, target: str, body: dict[str, Any] | None = None,
        key: str = ALICE_KEY) -> tuple[int, dict[str, str], bytes]:
    """One request sent as given (http.client keeps the method's case and the target's bytes)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        conn.request(method, target, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# ------------------------------------------------------------------------- output bound


@pytest.mark.parametrize(("path", "body", "field", "expected"), [
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES, "n": 8}, "max_tokens", 128),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}, "max_tokens", 1024),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES, "n": 2, "max_completion_tokens": 100},
     "max_completion_tokens", 100),
    ("/v1/completions", {"model": "gpt-4o", "prompt": "Say hi", "n": 4}, "max_tokens", 256),
    ("/v1/responses", {"model": "gpt-4o", "input": "Say hi"}, "max_output_tokens", 1024),
    ("/v1/messages", {"model": "claude-sonnet-4-5", "messages": MESSAGES}, "max_tokens", 1024),
])
def test_a_request_without_an_output_cap_gets_the_one_it_was_reserved_on(env, path, body, field, expected):
    env.start(guard_overrides={"tiers": {"default": TIER}})
    status, _, _ = raw(env.url, "POST", path, body)
    assert status == 200
    sent = json.loads(env.up.received[-1][1])
    assert sent[field] == expected
    assert env.settled() > 0


def test_choices_that_cannot_share_the_reserved_output_are_refused(env):
    env.start(guard_overrides={"tiers": {"default": TIER}})
    status, _, answer = raw(env.url, "POST", "/v1/chat/completions",
                            {"model": "gpt-4o", "messages": MESSAGES, "n": 2000})
    assert status == 400
    assert json.loads(answer)["error"]["param"] == "max_completion_tokens"
    assert env.up.received == []
    assert env.window() == (0, 0)


# ------------------------------------------------------------------------- routes


BUDGETED = [
    ("post", "/v1/chat/completions"),
    ("PoSt", "/v1/chat/completions"),
    ("POST", "/v1//chat/completions"),
    ("POST", "/v1/chat/completions/"),
    ("POST", "/v1/CHAT/Completions"),
    ("POST", "/v1/chat//completions//"),
]
REFUSED = [
    ("POST", "/v1/chat/completions;x", 400),
    ("POST", "/v1/chat/completions%00", 400),
    ("POST", "/v1/chat/completions%20", 400),
    ("POST", "/v1/chat%2Fcompletions", 400),
    ("POST", "/v1/chat/completions%2500", 400),
    ("POST", "/v1/./chat/completions", 400),
    ("BREW", "/v1/chat/completions", 400),
    ("POST", "/v1/messages/batches", 403),
    ("post", "/v1/Messages/Batches/", 403),
    ("POST", "/v1/batches", 403),
    ("POST", "/v1/images/generations", 403),
]


@pytest.mark.parametrize(("method", "target"), BUDGETED)
def test_spellings_of_a_budgeted_route_are_budgeted(env, method, target):
    env.start(passthrough="all")
    status, headers, _ = raw(env.url, method, target, {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20})
    assert status == 200
    assert headers["x-budget-limit"] == "none"  # the middleware answered it
    assert [r[0] for r in env.up.received] == ["/v1/chat/completions"]
    assert env.settled() > 0


@pytest.mark.parametrize(("method", "target", "status"), REFUSED)
def test_unbudgetable_spellings_are_refused_and_never_forwarded(env, method, target, status):
    env.start(passthrough="all")
    got, _, answer = raw(env.url, method, target, {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20})
    assert got == status, answer
    assert env.up.received == []
    assert env.window() == (0, 0)


def _catch_all(seen: list[tuple[str, str]]) -> Any:
    """An app that answers every request as a chat completion and notes what reached it."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        await request.body()
        seen.append((scope["method"], scope["path"]))
        response: Response = JSONResponse({"usage": {"prompt_tokens": 10, "completion_tokens": 5}})
        await response(scope, receive, send)

    return app


@pytest.fixture
def middleware_app(upstream_server, real_redis, real_redis_url, clock) -> Iterator[tuple[str, list[Any], BudgetGuard]]:
    srv, switch = upstream_server
    seen: list[tuple[str, str]] = []
    g = BudgetGuard(config(models=MODELS), redis_url=real_redis_url, clock=clock)
    switch.app = BudgetMiddleware(_catch_all(seen), guard=g, identify=lambda r: "alice")
    yield srv.url, seen, g
    switch.close_guard(g)


@pytest.mark.parametrize(("method", "target"), BUDGETED)
def test_the_middleware_budgets_every_spelling_of_its_routes(middleware_app, method, target):
    url, seen, g = middleware_app
    status, headers, _ = raw(url, method, target, {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20})
    assert status == 200
    assert "x-budget-limit" in headers
    assert seen == [("POST", "/v1/chat/completions")]  # the app sees the route as budgeted
    assert g.status("alice").windows["user.daily"].spent_usd > 0


@pytest.mark.parametrize(("method", "target", "status"), [r for r in REFUSED if r[2] == 400 and r[0] == "POST"])
def test_the_middleware_refuses_what_would_reach_its_routes_unbudgeted(middleware_app, method, target, status):
    url, seen, g = middleware_app
    got, _, _ = raw(url, method, target, {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20})
    assert got == 400
    assert seen == []
    w = g.status("alice").windows["user.daily"]
    assert (w.spent_usd, w.reserved_usd) == (0, 0)


def test_the_middleware_leaves_other_paths_alone(middleware_app):
    url, seen, _ = middleware_app
    status, _, _ = raw(url, "POST", "/v2/other;x", {"hello": 1})
    assert status == 200
    assert seen == [("POST", "/v2/other;x")]


# ------------------------------------------------------------------------- real clients


def test_token_id_inputs_are_counted_as_tokens(env):
    # LangChain's OpenAIEmbeddings sends token ids by default.
    env.start()
    client = env.openai()
    client.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3], [4, 5]])
    client.embeddings.create(model="text-embedding-3-small", input=[7] * 40)
    client.completions.create(model="gpt-4o", prompt=[101, 102, 103], max_tokens=5)
    env.settled()
    deadline = time.monotonic() + 10
    while len(env.events) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    estimated = [Decimal(e["estimated_cost_usd"]) for e in env.events]
    assert estimated == [cost("text-embedding-3-small", 5, 1), cost("text-embedding-3-small", 40, 1),
                         cost("gpt-4o", 3, 5)]


def test_anthropic_count_tokens_passes_by_default(env):
    env.start()
    count = env.anthropic().messages.count_tokens(model="claude-sonnet-4-5", messages=MESSAGES)
    assert count.input_tokens == env.up.prompt_tokens
    assert [r[0] for r in env.up.received] == ["/v1/messages/count_tokens"]
    assert env.window() == (0, 0)


def test_a_long_retry_after_tells_sdks_not_to_retry(env):
    env.start(guard_overrides={"tiers": {"default": {"hourly_usd": "0.001"}}})
    # The SDK would sleep the whole Retry-After between tries.
    client = openai.OpenAI(base_url=f"{env.url}/v1", api_key=ALICE_KEY, max_retries=2)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=20)  # spends the hour's cap
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=20)
    headers = caught.value.response.headers
    assert int(headers["retry-after"]) > 60  # the hour's reset
    assert headers["x-should-retry"] == "false"
    deadline = time.monotonic() + 10  # the events are written in the background, on the proxy's loop
    while len(env.events) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [e["kind"] for e in env.events] == ["usage", "denied"]  # asked once, not three times


def test_a_short_retry_after_lets_sdks_retry(env):
    # Only another call in flight holds the cap: waiting for it to settle helps.
    env.start(guard_overrides={"tiers": {"default": {"hourly_usd": "0.004"}}, "reservation_ttl_s": 5})
    assert env.guard is not None
    held = env.guard.check("alice", "gpt-4o", MESSAGES, max_tokens=300)
    assert held.allowed
    status, headers, _ = raw(env.url, "POST", "/v1/chat/completions",
                             {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 300})
    assert status == 429
    assert int(headers["retry-after"]) <= 5
    assert "x-should-retry" not in headers
    env.guard.release(held)


def test_a_stream_whose_client_did_not_ask_for_usage_gets_no_usage_field(env):
    env.start()
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{env.url}/v1/chat/completions",
                     headers={"authorization": f"Bearer {ALICE_KEY}"},
                     json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    chunks = [json.loads(line[6:]) for line in lines]
    assert chunks and all("usage" not in c for c in chunks)
    assert all(c["choices"] for c in chunks)
    assert json.loads(env.up.received[-1][1])["stream_options"] == {"include_usage": True}
    assert env.settled() > 0


def test_anthropic_sdk_stream_is_unchanged(env):
    env.start()
    with env.anthropic().messages.stream(model="claude-sonnet-4-5", messages=MESSAGES, max_tokens=50) as stream:
        text = "".join(stream.text_stream)
    assert text
    assert env.settled() > 0


# ------------------------------------------------------------------------- large bodies


CAROL_KEY = "bg-carol-virtual-key-0003"
API_KEYS_WITH_CAROL = [*API_KEYS, {"sha256": hashlib.sha256(CAROL_KEY.encode()).hexdigest(), "user": "carol"}]


def test_large_bodies_do_not_turn_other_callers_unenforced(env):
    # One caller sends megabyte bodies (whitespace runs and prose) that take long to count,
    # while a capped caller and a normal one keep asking. With a 100 ms Redis timeout and
    # fail_mode open, a loop kept busy counting would let the capped caller through unenforced.
    env.start(guard_overrides={
        "api_keys": API_KEYS_WITH_CAROL, "fail_mode": "open", "redis_timeout_ms": 100,
        "tiers": {"default": {"per_request": {"max_input_tokens": 50_000_000}, "hourly_usd": 1000}},
        "users": {"alice": {"hourly_usd": "0.0000001"}},
    })
    big = [" " * 1_000_000, "\t" * 1_000_000, "lorem ipsum dolor sit amet " * 40_000]

    def flood() -> list[int]:
        statuses = []
        with httpx.Client(timeout=120) as http:
            for text in big * 2:
                r = http.post(f"{env.url}/v1/chat/completions", headers={"authorization": f"Bearer {BOB_KEY}"},
                              json={"model": "gpt-4o", "max_tokens": 5,
                                    "messages": [{"role": "user", "content": text}]})
                statuses.append(r.status_code)
        return statuses

    def ask(key: str) -> list[tuple[int, str | None]]:
        answers = []
        with httpx.Client(timeout=120) as http:
            for _ in range(30):
                r = http.post(f"{env.url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                              json={"model": "gpt-4o", "max_tokens": 5, "messages": MESSAGES})
                answers.append((r.status_code, r.headers.get("x-budget-enforced")))
        return answers

    with ThreadPoolExecutor(4) as pool:
        floods = [pool.submit(flood), pool.submit(flood)]
        capped, normal = pool.submit(ask, ALICE_KEY), pool.submit(ask, CAROL_KEY)
        assert capped.result() == [(429, None)] * 30
        assert normal.result() == [(200, None)] * 30
        assert all(s < 500 for f in floods for s in f.result())
    assert env.guard is not None and env.guard.healthy


# ------------------------------------------------------------------------- what no reservation bounds


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/responses", {"model": "gpt-4o", "input": "hi", "tools": [{"type": "web_search_preview"}]}, "tools[0]"),
    ("/v1/responses", {"model": "gpt-4o", "input": "hi", "tools": [{"type": "image_generation"}]}, "tools[0]"),
    ("/v1/responses", {"model": "gpt-4o", "input": "hi", "background": True, "stream": True}, "background"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES, "modalities": ["text", "audio"],
                              "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES, "web_search_options": {}},
     "web_search_options"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, "messages"),
    ("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": MESSAGES,
                      "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 50}]}, "tools[0]"),
    ("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": MESSAGES,
                      "mcp_servers": [{"type": "url", "url": "https://example.invalid/mcp", "name": "x"}]},
     "mcp_servers"),
])
def test_work_no_reservation_bounds_is_refused(env, path, body, param):
    env.start()
    status, _, answer = raw(env.url, "POST", path, body)
    assert status == 400
    error = json.loads(answer)["error"]
    assert (error["code"], error.get("param", param)) == ("not_budgetable", param)
    assert env.up.received == []
    assert env.window() == (0, 0)


FETCHED = [
    ("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "url", "url": "https://example.invalid/big.pdf"}},
        {"type": "text", "text": "Summarise."}]}]}),
    ("/v1/responses", {"model": "gpt-4o", "max_output_tokens": 100, "input": [{"type": "item_reference", "id": "x"}]}),
    ("/v1/responses", {"model": "gpt-4o", "max_output_tokens": 100, "input": "Go on.", "previous_response_id": "r"}),
    ("/v1/responses", {"model": "gpt-4o", "max_output_tokens": 100, "input": [{"role": "user", "content": [
        {"type": "input_file", "file_id": "file-1"}]}]}),
]


@pytest.mark.parametrize(("path", "body"), FETCHED)
def test_input_the_provider_fetches_is_reserved_at_the_tier_input_cap(env, path, body):
    env.start(guard_overrides={"tiers": {"default": {"per_request": {"max_input_tokens": 40_000},
                                                     "hourly_usd": 1}}})
    status, _, _ = raw(env.url, "POST", path, body)
    assert status == 200
    deadline = time.monotonic() + 10
    while not env.events and time.monotonic() < deadline:
        time.sleep(0.01)
    assert env.events[0]["estimated_input_tokens"] == 40_000  # not the few tokens of the reference


@pytest.mark.parametrize(("path", "body"), FETCHED[:2])
def test_fetched_input_without_a_tier_input_cap_is_refused(env, path, body):
    env.start()
    status, _, answer = raw(env.url, "POST", path, body)
    assert status == 400
    assert "request.max_input_tokens" in answer.decode()
    assert env.up.received == []


# ------------------------------------------------------------------------- the middleware's own answer


def test_the_middleware_budgets_an_app_mounted_under_a_prefix(upstream_server, real_redis, real_redis_url, clock):
    from starlette.applications import Starlette
    from starlette.routing import Mount, Route

    srv, switch = upstream_server
    seen: list[str] = []

    async def chat(request: Request) -> Response:
        seen.append(request.url.path)
        return JSONResponse({"usage": {"prompt_tokens": 10, "completion_tokens": 5}})

    g = BudgetGuard(config(models=MODELS), redis_url=real_redis_url, clock=clock)
    inner = BudgetMiddleware(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]), guard=g,
                             identify=lambda r: "alice")
    switch.app = Starlette(routes=[Mount("/llm", app=inner)])
    status, headers, _ = raw(srv.url, "POST", "/llm/v1//chat/completions",
                             {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20})
    assert status == 200 and headers["x-budget-limit"] == "none"
    assert seen == ["/llm/v1/chat/completions"]
    assert g.status("alice").windows["user.daily"].spent_usd > 0
    switch.close_guard(g)


def test_the_apps_budget_headers_and_length_are_not_passed_on(upstream_server, real_redis, real_redis_url, clock):
    srv, switch = upstream_server
    stream = (b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}\n\n'
              b'data: {"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5}}\n\ndata: [DONE]\n\n')

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await Request(scope, receive).body()
        # A buffered stream, with its length, and budget headers of its own.
        response = Response(stream, media_type="text/event-stream",
                            headers={"x-budget-enforced": "false", "x-budget-model-routed": "gpt-4o-mini"})
        await response(scope, receive, send)

    g = BudgetGuard(config(models=MODELS), redis_url=real_redis_url, clock=clock)
    switch.app = BudgetMiddleware(app, guard=g, identify=lambda r: "alice")
    with httpx.Client(timeout=30) as http:
        r = http.post(f"{srv.url}/v1/chat/completions",
                      json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20, "stream": True})
    assert r.status_code == 200
    assert "x-budget-enforced" not in r.headers and "x-budget-model-routed" not in r.headers
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert chunks == [{"choices": [{"index": 0, "delta": {"content": "hi"}}]}]
    assert g.status("alice").windows["user.daily"].spent_usd > 0
    switch.close_guard(g)


def test_a_long_answer_keeps_its_reservation(upstream_server, real_redis, real_redis_url):
    # A 2 s lease and an answer that streams for 4 s: without renewals its lease would lapse
    # mid-answer and hand the cap to a second request while the first goes on spending it.
    import asyncio

    srv, switch = upstream_server

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        await Request(scope, receive).body()

        async def events() -> Any:
            for _ in range(8):
                yield b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
                await asyncio.sleep(0.5)
            yield b'data: {"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5}}\n\ndata: [DONE]\n\n'

        await StreamingResponse(events(), media_type="text/event-stream")(scope, receive, send)

    g = BudgetGuard(config(models=MODELS, reservation_ttl_s=2, tiers={"default": {"hourly_usd": "0.004"}}),
                    redis_url=real_redis_url)  # the real clock: leases lapse as time passes
    switch.app = BudgetMiddleware(slow, guard=g, identify=lambda r: "alice")
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 300, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{srv.url}/v1/chat/completions", json=body) as first:
        lines = first.iter_lines()
        seen = 0
        while seen < 7:  # 3 s into the answer, a second past its first lease's deadline
            seen += next(lines).startswith("data:")
        second = http.post(f"{srv.url}/v1/chat/completions", json={**body, "stream": False})
        rest = list(lines)
    assert first.status_code == 200 and "data: [DONE]" in rest
    assert second.status_code == 429
    switch.close_guard(g)


# ------------------------------------------------------------------------- a second review


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "gpt-4o", "max_tokens": 10, "messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                       "description": "word " * 5000}}}}),
    ("/v1/responses", {"model": "gpt-4o", "max_output_tokens": 10, "input": "hi", "text": {
        "format": {"type": "json_schema", "name": "x", "schema": {"description": "word " * 5000}}}}),
    ("/v1/completions", {"model": "gpt-4o", "max_tokens": 10, "prompt": "hi", "suffix": "word " * 5000}),
])
def test_body_fields_billed_as_input_count_against_the_input_cap(env, path, body):
    env.start(guard_overrides={"tiers": {"default": {"per_request": {"max_input_tokens": 1000}}}})
    status, _, answer = raw(env.url, "POST", path, body)
    assert status == 400 and "request.max_input_tokens" in answer.decode()
    assert env.up.received == []


@pytest.mark.parametrize("body", [
    # A tool's output holding a stored file.
    {"model": "gpt-4o", "max_output_tokens": 10, "input": [
        {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_file", "file_id": "f-1"}]}]},
    # A stray "messages" key must not hide the input items.
    {"model": "gpt-4o", "max_output_tokens": 10, "messages": None, "input": [
        {"role": "user", "content": [{"type": "input_file", "file_url": "https://example.invalid/a.pdf"}]}]},
    # An inline PDF is billed by its pages, not by the length of its base64.
    {"model": "gpt-4o", "max_output_tokens": 10, "input": [
        {"role": "user", "content": [{"type": "input_file", "filename": "a.pdf", "file_data": "JVBERi0="}]}]},
])
def test_files_anywhere_in_the_input_are_reserved_at_the_input_cap(env, body):
    env.start(guard_overrides={"tiers": {"default": {"per_request": {"max_input_tokens": 40_000},
                                                     "hourly_usd": 1}}})
    status, _, _ = raw(env.url, "POST", "/v1/responses", body)
    assert status == 200
    deadline = time.monotonic() + 10
    while not env.events and time.monotonic() < deadline:
        time.sleep(0.01)
    assert env.events[0]["estimated_input_tokens"] == 40_000


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "gpt-4o-mini-search-preview", "messages": MESSAGES, "max_tokens": 10}, "model"),
    ({"model": "gpt-4o", "max_tokens": 10, "messages": [*MESSAGES, {"role": "assistant", "audio": {"id": "a1"}}]},
     "messages"),
])
def test_search_models_and_stored_audio_are_refused(env, body, param):
    env.start()
    status, _, answer = raw(env.url, "POST", "/v1/chat/completions", body)
    assert status == 400
    assert (json.loads(answer)["error"]["code"], json.loads(answer)["error"]["param"]) == ("not_budgetable", param)
    assert env.up.received == []


@pytest.mark.parametrize("kind", [["input_file"], {"a": 1}, 7])
def test_a_part_whose_type_is_not_a_string_is_no_5xx(env, kind):
    env.start()
    status, _, _ = raw(env.url, "POST", "/v1/chat/completions", {
        "model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": [{"type": kind, "x": 1}]}]})
    assert status < 500
    assert env.window()[1] == 0
