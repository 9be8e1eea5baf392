"""A FastAPI gateway serving an OpenAI-compatible route, with budgets enforced by BudgetMiddleware.

The route forwards each request to an upstream (``$UPSTREAM_URL``) and streams the
answer back untouched; the middleware checks the budget before the route runs and
records the usage after. Offline demo (a fake upstream, the gateway and an OpenAI SDK
client in one process, no network)::

    python examples/fastapi_gateway.py

Or serve it: ``UPSTREAM_URL=http://127.0.0.1:8081 uvicorn examples.fastapi_gateway:app``
(with ``python examples/fake_upstream.py --serve`` running).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from budgetguard import BudgetGuard
from budgetguard.asgi import BudgetMiddleware

ROOT = Path(__file__).resolve().parent
API_KEYS = {"sk-alice": "alice", "sk-bob": "bob"}  # stands in for the app's own auth

guard = BudgetGuard.from_yaml(ROOT.parent / "limits.yaml", redis_url=os.environ.get("REDIS_URL", "memory://gateway"))
upstream = httpx.AsyncClient(base_url=os.environ.get("UPSTREAM_URL", "http://127.0.0.1:8081"), timeout=60)
app = FastAPI()


def identify(request: Request) -> str | None:
    key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    return API_KEYS.get(key)


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    # The body is the one the middleware replays: the routed model and include_usage are in it.
    upstream_request = upstream.build_request("POST", "/v1/chat/completions", content=await request.body(),
                                              headers={"content-type": "application/json"})
    answer = await upstream.send(upstream_request, stream=True)

    async def body() -> AsyncIterator[bytes]:
        async for chunk in answer.aiter_raw():
            yield chunk

    media_type = answer.headers.get("content-type", "application/json")
    return StreamingResponse(body(), status_code=answer.status_code, media_type=media_type,
                             background=BackgroundTask(answer.aclose))


app.add_middleware(BudgetMiddleware, guard=guard, identify=identify)


def demo() -> None:
    import openai

    sys.path.insert(0, str(ROOT))
    from fake_upstream import create_app, serve_in_thread

    _, upstream_url = serve_in_thread(create_app())
    upstream.base_url = httpx.URL(upstream_url)
    _, gateway_url = serve_in_thread(app)
    client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="sk-alice", max_retries=0)
    messages = [{"role": "user", "content": "How does budgetguard keep spend in check?"}]

    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages, max_tokens=200)
    print("JSON:  ", raw.parse().choices[0].message.content)
    print("        remaining:", raw.headers["x-budget-remaining-usd"], "limit:", raw.headers["x-budget-limit"])
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=200, stream=True)
    print("stream:", "".join(c.choices[0].delta.content or "" for c in stream))
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=5000)
    except openai.BadRequestError as exc:
        print("denied:", exc.status_code, exc.body)
    try:
        openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="sk-nobody", max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=messages)
    except openai.AuthenticationError as exc:
        print("unknown key:", exc.status_code)
    day = guard.status("alice").windows["user.daily"]
    print(f"alice today: spent ${day.spent_usd}, reserved ${day.reserved_usd}, cap ${day.limit_usd}")


if __name__ == "__main__":
    demo()
