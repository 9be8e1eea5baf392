"""What was reserved bounds what a decorated call may produce: ``@guard.limit`` hands the
function the output cap its reservation was priced on."""

from __future__ import annotations

from typing import Any

import pytest

from budgetguard import BudgetExceeded, InvalidArgumentType

from .helpers import MSG, guard

TIER = {"default": {"per_request": {"max_output_tokens": 300}, "hourly_usd": 1}}


def test_the_function_gets_the_reserved_output_cap(backend_url, clock):
    g = guard(backend_url, clock, tiers=TIER)
    seen: list[Any] = []

    @g.limit(user=lambda a: a["user"])
    def ask(*, user: str, model: str, messages: list[Any], max_tokens: int | None = None) -> dict[str, Any]:
        seen.append(max_tokens)
        return {"usage": {"prompt_tokens": 10, "completion_tokens": 5}}

    ask(user="alice", model="gpt-4o", messages=MSG)  # no cap: the tier's, which was reserved
    ask(user="alice", model="gpt-4o", messages=MSG, max_tokens=50)  # its own, which was reserved
    assert seen == [300, 50]
    g.close()


async def test_kwargs_carry_the_cap_to_an_async_function(backend_url, clock):
    g = guard(backend_url, clock, tiers=TIER)
    seen: list[Any] = []

    @g.limit(user=lambda a: a["user"])
    async def ask(*, user: str, model: str, messages: list[Any], **kwargs: Any) -> dict[str, Any]:
        seen.append(kwargs.get("max_tokens"))
        return {"usage": {"prompt_tokens": 10, "completion_tokens": 5}}

    await ask(user="alice", model="gpt-4o", messages=MSG)
    await ask(user="alice", model="gpt-4o", messages=MSG, max_tokens=20)
    assert seen == [300, 20]
    await g.aclose()


def test_a_function_whose_output_cannot_be_bounded_is_refused(backend_url, clock):
    g = guard(backend_url, clock, tiers=TIER)
    with pytest.raises(InvalidArgumentType, match="could not be bounded"):
        @g.limit(user=lambda a: a["user"])
        def ask(*, user: str, model: str, messages: list[Any]) -> None:
            return None
    g.close()


def test_choices_and_completion_caps_are_counted_and_bounded(backend_url, clock):
    g = guard(backend_url, clock, tiers=TIER)
    seen: list[Any] = []

    @g.limit(user=lambda a: a["user"])
    def ask(*, user: str, model: str, messages: list[Any], **kwargs: Any) -> dict[str, Any]:
        seen.append({k: kwargs.get(k) for k in ("max_tokens", "max_completion_tokens", "n")})
        return {"usage": {"prompt_tokens": 10, "completion_tokens": 5}}

    ask(user="alice", model="gpt-4o", messages=MSG, n=4)  # the tier's 300, shared by 4 choices
    ask(user="alice", model="gpt-4o", messages=MSG, n=2, max_completion_tokens=100)
    assert seen == [{"max_tokens": 75, "max_completion_tokens": None, "n": 4},
                    {"max_tokens": None, "max_completion_tokens": 100, "n": 2}]
    with pytest.raises(BudgetExceeded) as caught:  # 8 choices of 100: more than the tier's 300
        ask(user="alice", model="gpt-4o", messages=MSG, n=8, max_tokens=100)
    assert caught.value.decision.limit == "request.max_output_tokens"
    assert len(seen) == 2
    g.close()
