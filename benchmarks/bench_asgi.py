"""What does BudgetMiddleware add to a request? Bare app vs guarded app, in one run.

Run by hand against a real Redis::

    python benchmarks/bench_asgi.py [--redis-url redis://127.0.0.1:6379/14] [--n 2000]

The app is a Starlette app whose ``/v1/chat/completions`` answers at once, as JSON or
as an SSE stream (20 content chunks, the usage chunk, ``[DONE]``), like an OpenAI
upstream with zero latency. Each request is a chat request of about 1,000 input tokens.
Requests are driven in-process through the ASGI interface (no HTTP server, no sockets
besides Redis), so the figures are the middleware's own cost: reading and parsing the
body, tokenizing, the reserve script, the response headers, reading the usage from the
answer and the settle script. Bare and guarded requests alternate, so the machine's
noise hits both alike. Keys live under a fresh prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import benchutil  # noqa: F401  (sets the offline tokenizer cache before budgetguard loads one)
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from budgetguard import BudgetGuard
from budgetguard.asgi import BudgetMiddleware
from budgetguard.config import parse_config
from budgetguard.tokens import estimate_input_tokens

USAGE = {"prompt_tokens": 1000, "completion_tokens": 60, "total_tokens": 1060}
WORDS = [
    "budget", "spend", "token", "model", "request", "stream", "usage", "reserve", "settle", "cap", "window",
    "user", "org", "price", "latency", "redis", "script", "chunk", "answer", "client",
]


def one_k_messages() -> list[dict[str, str]]:
    text, n = [], 0
    while estimate_input_tokens("gpt-4o", [{"role": "user", "content": " ".join(text)}]) < 1000:
        text.append(WORDS[n % len(WORDS)])
        n += 1
    return [{"role": "user", "content": " ".join(text)}]


async def chat(request: Request) -> Response:
    body = await request.json()
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
    if not body.get("stream"):
        return JSONResponse({**base, "object": "chat.completion", "usage": USAGE,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok " * 60}}]})
    include = (body.get("stream_options") or {}).get("include_usage") is True

    async def events() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield ("data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"content": "ok ok ok "}}]})
                   + "\n\n").encode()
        if include:
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': USAGE})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def drive(app: Any, body: bytes, headers: list[tuple[bytes, bytes]]) -> float:
    """One request through ``app``; seconds until the last body message was sent."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    sent = False
    done = asyncio.Event()
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    start = time.perf_counter()
    await app(scope, receive, send)
    elapsed = time.perf_counter() - start
    assert status == 200 and done.is_set(), status
    return elapsed


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    if args.redis_url.startswith("memory://"):
        sys.exit("use a real Redis")
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    config = parse_config({"key_prefix": prefix, "models": {"gpt-4o": {"input_per_mtok": "2.50",
                                                                       "output_per_mtok": "10.00"}},
                           "tiers": {"default": {"hourly_usd": "100000", "daily_usd": "100000"}},
                           "org": {"daily_usd": "1000000"}}, env={})
    guard = BudgetGuard(config, redis_url=args.redis_url)
    bare = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    guarded = BudgetMiddleware(bare, guard=guard, identify=lambda request: "bench-user")
    messages = one_k_messages()
    headers = [(b"content-type", b"application/json"), (b"authorization", b"Bearer x")]
    bodies = {"json": json.dumps({"model": "gpt-4o", "messages": messages, "max_tokens": 256}).encode(),
              "stream": json.dumps({"model": "gpt-4o", "messages": messages, "max_tokens": 256,
                                    "stream": True}).encode()}
    print(f"python {platform.python_version()}, redis {redis.Redis.from_url(args.redis_url).info()['redis_version']},"
          f" {args.n} requests per cell, input {estimate_input_tokens('gpt-4o', messages)} tokens (estimated)")
    try:
        for kind, body in bodies.items():
            for _ in range(100):  # warm up: connections, scripts, tokenizer, JIT-free caches
                await drive(bare, body, headers)
                await drive(guarded, body, headers)
            times: dict[str, list[float]] = {"bare": [], "guarded": []}
            for i in range(args.n):
                order = ("bare", "guarded") if i % 2 else ("guarded", "bare")
                for name in order:
                    app = bare if name == "bare" else guarded
                    times[name].append(await drive(app, body, headers))
            b50, b99 = pct(times["bare"], 0.5) * 1e6, pct(times["bare"], 0.99) * 1e6
            g50, g99 = pct(times["guarded"], 0.5) * 1e6, pct(times["guarded"], 0.99) * 1e6
            means = statistics.fmean(times["guarded"]) * 1e6, statistics.fmean(times["bare"]) * 1e6
            print(f"{kind:6}  bare p50 {b50:7.0f} µs  p99 {b99:7.0f} µs | guarded p50 {g50:7.0f} µs  p99 {g99:7.0f} µs"
                  f" | added p50 {g50 - b50:6.0f} µs  p99 {g99 - b99:6.0f} µs | ratio p50 {g50 / b50:.2f}x"
                  f"  (means {means[0]:.0f} / {means[1]:.0f} µs)")
        spent = guard.status("bench-user").windows["user.daily"]
        print(f"ledger check: spent ${spent.spent_usd}, reserved ${spent.reserved_usd}")
    finally:
        await guard.aclose()
        client = redis.Redis.from_url(args.redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


if __name__ == "__main__":
    asyncio.run(main())
