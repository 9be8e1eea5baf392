"""Guard LLM calls with the context manager, the decorator and the async API.

Runs offline: `fake_llm` stands in for a provider and answers in OpenAI's response
shape (a dict here; an SDK response object works the same way).

    python examples/reserve_and_record.py
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from budgetguard import BudgetExceeded, BudgetGuard

guard = BudgetGuard.from_yaml(Path(__file__).resolve().parent.parent / "limits.yaml", redis_url="memory://examples")


def fake_llm(model: str, messages: list[dict], max_tokens: int) -> dict:
    return {"model": model, "choices": [{"message": {"role": "assistant", "content": "..."}}],
            "usage": {"prompt_tokens": 1200, "completion_tokens": max_tokens // 2,
                      "prompt_tokens_details": {"cached_tokens": 1024}}}


def with_block() -> None:
    messages = [{"role": "user", "content": "Draft a reply to this customer email."}]
    try:
        with guard.reserve("alice", "gpt-4o", messages, max_tokens=400, tags={"feature": "email"}) as d:
            d.record(fake_llm(d.model, messages, 400))
        print(f"context manager: {d.model}, reserved ${d.estimated_cost_usd}")
    except BudgetExceeded as exc:
        print(f"denied by {exc.decision.limit}; retry in {exc.decision.retry_after} s")


@guard.limit(user=lambda kw: kw["user"], tags=lambda kw: {"feature": "search"})
def answer(*, user: str, model: str, messages: list[dict], max_tokens: int = 300) -> dict:
    return fake_llm(model, messages, max_tokens)


async def concurrently() -> None:
    async def one(i: int) -> bool:
        async with guard.reserve("bob", "gpt-4o", [{"role": "user", "content": f"question {i}"}],
                                 max_tokens=200) as d:
            d.record(fake_llm(d.model, [], 200))
        return d.allowed

    results = await asyncio.gather(*(one(i) for i in range(20)), return_exceptions=True)
    print(f"async: {sum(r is True for r in results)} of {len(results)} calls allowed")
    await guard.aclose()


if __name__ == "__main__":
    with_block()
    print(f"decorator: {answer(user='alice', model='gpt-4o', messages=[{'role': 'user', 'content': 'hi'}])['model']}")
    asyncio.run(concurrently())
    for name, w in guard.status("alice").windows.items():
        print(f"alice {name}: spent ${w.spent_usd} of {w.limit_usd or 'no cap'}")
