"""``@guard.limit`` around the OpenAI SDK: sync and async, JSON and streaming.

Offline: the SDK talks to the fake upstream of ``fake_upstream.py``, started here on
127.0.0.1 (no network, no API key)::

    python examples/decorator_openai.py
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import openai

from budgetguard import BudgetExceeded, BudgetGuard

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from fake_upstream import create_app, serve_in_thread  # noqa: E402

guard = BudgetGuard.from_yaml(ROOT.parent / "limits.yaml", redis_url=os.environ.get("REDIS_URL", "memory://decorator"))
_, base_url = serve_in_thread(create_app())
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-fake", max_retries=0)
aclient = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sk-fake", max_retries=0)


@guard.limit(user=lambda a: a["user"], tags=lambda a: {"feature": "faq"})
def ask(*, user: str, model: str, messages: list[dict[str, Any]], max_tokens: int = 256, stream: bool = False) -> Any:
    # With stream=True the decorator returns the SDK stream wrapped: the usage is recorded
    # when it ends or is closed. Ask for the usage chunk, or the output is counted instead.
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if stream else {}
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=stream,
                                          **extra)


@guard.limit(user=lambda a: a["user"])
async def aask(*, user: str, model: str, messages: list[dict[str, Any]], max_tokens: int = 256) -> Any:
    return await aclient.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True,
                                                 stream_options={"include_usage": True})


def spent(user: str) -> str:
    day = guard.status(user).windows["user.daily"]
    return f"spent ${day.spent_usd}, reserved ${day.reserved_usd}"


async def async_part(messages: list[dict[str, Any]]) -> None:
    stream = await aask(user="alice", model="gpt-4o-mini", messages=messages)
    print("async stream:", "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]))
    await aclient.close()
    await guard.aclose()


def main() -> None:
    messages = [{"role": "user", "content": "What does a budget guard do?"}]
    resp = ask(user="alice", model="gpt-4o-mini", messages=messages)
    print("JSON:        ", resp.choices[0].message.content, "|", spent("alice"))
    stream = ask(user="alice", model="gpt-4o-mini", messages=messages, stream=True)
    print("while open:  ", spent("alice"))
    print("stream:      ", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    print("after it:    ", spent("alice"))
    with ask(user="alice", model="gpt-4o-mini", messages=messages, stream=True) as stream:
        first = next(iter(stream))  # stop after one chunk: charged input + the output streamed so far
    print("closed early:", first.choices[0].delta.content, "|", spent("alice"))
    try:
        ask(user="carol", model="gpt-4o", messages=messages)  # the free tier may not use gpt-4o
    except BudgetExceeded as exc:
        print("denied:      ", exc.decision.limit, "-", exc.decision.reason)
    asyncio.run(async_part(messages))
    print("total:       ", spent("alice"))


if __name__ == "__main__":
    main()
