"""Hostile request bodies through the budget proxy and the middleware (uvicorn on
127.0.0.1, a real Redis): whatever a caller sends, the answer is never a 5xx of ours,
and nothing stays reserved once it has been answered.

The app behind them answers every request as the provider would, with a usage, so that
any 5xx is budgetguard's own. Each request runs under the HTTP client's timeout: one
that hangs fails the test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from budgetguard import BudgetGuard
from budgetguard.asgi import BudgetMiddleware
from budgetguard.config import parse_config
from budgetguard.proxy import proxy_app

from .test_proxy import ALICE_KEY, API_KEYS
from .upstream import MODELS, Server, Switch

USAGE = {"prompt_tokens": 12, "completion_tokens": 7, "input_tokens": 12, "output_tokens": 7}
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/messages"]
CONFIG: dict[str, Any] = {
    "models": MODELS, "reservation_ttl_s": 60, "api_keys": API_KEYS, "unknown_model": "gpt-4o-mini",
    "tiers": {"default": {"per_request": {"max_input_tokens": 200_000, "max_output_tokens": 4096},
                          "hourly_usd": 50}},
}


async def provider(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers any request: an SSE stream with a usage chunk when asked to stream, else JSON."""
    request = Request(scope, receive)
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    response: Response
    if isinstance(body, dict) and body.get("stream") is True:
        async def events() -> Any:
            yield b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}\n\n'
            yield b'data: {"choices":[],"usage":' + json.dumps(USAGE).encode() + b"}\n\n"
            yield b"data: [DONE]\n\n"

        response = StreamingResponse(events(), media_type="text/event-stream")
    else:
        response = JSONResponse({"usage": USAGE})
    await response(scope, receive, send)


text = st.text(max_size=40) | st.sampled_from(["", " " * 3000, "\t\n" * 2000, "<|endoftext|>", "\ud800", "a\nb"])
scalar = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | text
json_value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.sampled_from(["role", "content", "type", "text", "name", "x"]) | text,
                                            inner, max_size=4), max_leaves=20)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | json_value,
                                 "content": text | json_value})
count = st.none() | st.integers(min_value=-5, max_value=10**9) | st.sampled_from([0, 1, 8, 2000, True, 1.5, "9"])
model = st.sampled_from(["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "text-embedding-3-small", "nope\nmodel",
                         "x" * 5000, " ", ""]) | json_value
body = st.fixed_dictionaries({}, optional={
    "model": model, "messages": st.lists(message | json_value, max_size=4) | json_value,
    "prompt": text | st.lists(st.integers(min_value=-3, max_value=2**40), max_size=5) | json_value,
    "input": text | st.lists(st.lists(st.integers(0, 10**6), max_size=4), max_size=3) | json_value,
    "system": text | json_value, "tools": st.lists(json_value, max_size=3) | json_value,
    "max_tokens": count, "max_completion_tokens": count, "max_output_tokens": count, "n": count,
    "best_of": count, "stream": st.booleans() | json_value, "stream_options": json_value,
})
raw_body = body.map(lambda b: json.dumps(b).encode()) | st.sampled_from([
    b"", b"{", b"[]", b"null", b'{"model": NaN}', b'{"a": 1, "a": 2}', b"[" * 100_000, b"\xff\xfe",
    b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "' + b" " * 1_000_000 + b'"}]}',
])
HEADERS = {"authorization": f"Bearer {ALICE_KEY}", "content-type": "application/json"}
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def nothing_reserved(guard: BudgetGuard) -> None:
    windows = guard.status("alice").windows
    assert {name: w.reserved_usd for name, w in windows.items()} == dict.fromkeys(windows, 0)


@pytest.fixture
def proxied(upstream_server: tuple[Server, Switch], real_redis: Any, real_redis_url: str
            ) -> Iterator[tuple[str, BudgetGuard]]:
    srv, switch = upstream_server
    switch.app = provider
    guard = BudgetGuard(parse_config(CONFIG, env={}), redis_url=real_redis_url)
    with Server(proxy_app(guard, upstream=srv.url, close_guard=True), lifespan="on") as proxy:
        yield proxy.url, guard


@pytest.fixture
def wrapped(upstream_server: tuple[Server, Switch], real_redis: Any, real_redis_url: str
            ) -> Iterator[tuple[str, BudgetGuard]]:
    srv, switch = upstream_server
    guard = BudgetGuard(parse_config(CONFIG, env={}), redis_url=real_redis_url)
    switch.app = BudgetMiddleware(provider, guard=guard, identify=lambda request: "alice")
    yield srv.url, guard
    switch.close_guard(guard)


@pytest.mark.parametrize("target", ["proxied", "wrapped"])
def test_no_body_gets_a_5xx_or_leaves_a_reservation(request: pytest.FixtureRequest, target: str) -> None:
    url, guard = request.getfixturevalue(target)
    with httpx.Client(timeout=60) as client:

        @FUZZ
        @given(path=st.sampled_from(ROUTES), content=raw_body)
        def one(path: str, content: bytes) -> None:
            response = client.post(f"{url}{path}", content=content, headers=HEADERS)
            assert response.status_code < 500, (response.status_code, response.text[:300])
            nothing_reserved(guard)

        one()
