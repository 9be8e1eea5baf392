"""The SSE parser and stream usage tracker, and ``@guard.limit`` around the real openai and
anthropic SDKs (sync and async, streaming and not) talking to a fake upstream on uvicorn."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest

from budgetguard import BudgetExceeded, BudgetGuard, Usage
from budgetguard.streams import AsyncGuardedStream, GuardedStream, SSEParser, StreamUsage, usage_from_body
from budgetguard.tokens import count_text_tokens, estimate_input_tokens

from .helpers import config
from .test_asgi import MESSAGES, MODELS, WINDOWS, anthropic_cost, chat_cost, cost
from .upstream import TEXT, Server, Switch, Upstream, create_upstream

# ----------------------------------------------------------------------------- SSE parser

WIRE = (b": keep-alive\r\n\r\n"
        b"event: message_start\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n"
        b"data: plain\n\n"
        b"data:no-space\rid: 7\r\r"
        b"retry: 10\ndata: [DONE]\n\n")
EXPECTED = [("", ""), ("message_start", '{"a":\n1}'), ("", "plain"), ("", "no-space"), ("", "[DONE]")]


def parse(chunks: list[bytes]) -> tuple[list[tuple[str, str]], bytes, bytes]:
    parser = SSEParser()
    events = [e for chunk in chunks for e in parser.feed(chunk)]
    return [(e.event, e.data) for e in events], b"".join(e.raw for e in events), parser.pending()


def test_sse_parser_gives_the_same_events_whatever_the_chunking():
    assert parse([WIRE]) == (EXPECTED, WIRE, b"")
    for cut in range(1, len(WIRE)):
        assert parse([WIRE[:cut], WIRE[cut:]]) == (EXPECTED, WIRE, b""), cut
    assert parse([bytes([b]) for b in WIRE]) == (EXPECTED, WIRE, b"")


def test_sse_parser_keeps_a_cut_event_pending():
    events, raw, pending = parse([b"data: one\n\ndata: tw"])
    assert events == [("", "one")] and raw == b"data: one\n\n" and pending == b"data: tw"


def test_stream_usage_reads_each_provider_and_falls_back_to_counting():
    tracker = StreamUsage("gpt-4o")
    for text in TEXT:
        tracker.feed({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]})
    assert tracker.usage is None
    assert tracker.fallback(123) == Usage(123, count_text_tokens("gpt-4o", "".join(TEXT)))
    tracker.feed({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5}})
    assert tracker.usage == Usage(10, 5)

    anth = StreamUsage("claude-test-1")
    anth.feed({"type": "message_start", "message": {"usage": {"input_tokens": 9, "cache_read_input_tokens": 3,
                                                              "output_tokens": 1}}})
    anth.feed({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hello there"}})
    assert anth.usage is None
    assert anth.fallback(500) == Usage(12, max(1, count_text_tokens("claude-test-1", "hello there")), 3)
    anth.feed({"type": "message_delta", "usage": {"output_tokens": 30}})
    assert anth.usage == Usage(12, 30, 3)

    resp = StreamUsage("gpt-4o")
    resp.feed({"type": "response.output_text.delta", "delta": "x"})
    resp.feed({"type": "response.completed", "response": {"usage": {"input_tokens": 4, "output_tokens": 2,
                                                                    "total_tokens": 6}}})
    assert resp.usage == Usage(4, 2)


@pytest.mark.parametrize(("model", "delta", "per_token"), [
    ("gpt-4o", " " * 1000, 128),  # o200k_base: tiktoken raises on 1M spaces counted whole
    ("gpt-4o", "\t" * 1000, 20),
    ("gpt-4", "\n" * 1000, 32),
])
def test_stream_fallback_counts_a_megabyte_of_whitespace_without_raising(model: str, delta: str, per_token: int):
    # per_token: the longest run of that character that is one token, so 1 MB of it is at
    # least 1 MB / per_token tokens, and at most one token per byte.
    tracker = StreamUsage(model)
    for _ in range(1000):
        tracker.feed({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": delta}}]})
    usage = tracker.fallback(123)
    assert usage.input_tokens == 123
    assert 1_000_000 // per_token <= usage.output_tokens <= 1_000_000

    anth = StreamUsage("claude-test-1")
    anth.feed({"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1}}})
    for _ in range(1000):
        anth.feed({"type": "content_block_delta", "delta": {"type": "text_delta", "text": delta}})
    assert anth.fallback(500).output_tokens >= 1_000_000 // per_token


def test_embedding_body_usage_has_no_output():
    assert usage_from_body({"usage": {"prompt_tokens": 8, "total_tokens": 8}}) == Usage(8, 0)


# ----------------------------------------------------------------------------- @limit with the SDKs


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[Server, Upstream]]:
    switch = Switch()
    up = Upstream()
    switch.app = create_upstream(up)
    with Server(switch) as srv:
        yield srv, up


@pytest.fixture
def g(backend_url: str, clock: Any, upstream: tuple[Server, Upstream]) -> Iterator[BudgetGuard]:
    upstream[1].__init__()  # type: ignore[misc]  # a fresh upstream state per test
    guard = BudgetGuard(config(models=MODELS), redis_url=backend_url, clock=clock)
    yield guard
    guard.close()


def ledger(g: BudgetGuard, user: str = "alice") -> list[tuple[Decimal, Decimal]]:
    st = g.status(user)
    return [(st.windows[n].spent_usd, st.windows[n].reserved_usd) for n in WINDOWS]


def settled(spent: Decimal) -> list[tuple[Decimal, Decimal]]:
    return [(spent, Decimal(0))] * len(WINDOWS)


def test_limit_sync_openai_json_and_stream(g, upstream):
    srv, up = upstream
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sk", max_retries=0)

    @g.limit(user=lambda a: a["user"])
    def ask(*, user: str, model: str, messages: list, max_tokens: int, stream: bool = False) -> Any:
        return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=stream,
                                              **({"stream_options": {"include_usage": True}} if stream else {}))

    ask(user="alice", model="gpt-4o", messages=MESSAGES, max_tokens=300)
    assert ledger(g) == settled(chat_cost(up))

    stream = ask(user="alice", model="gpt-4o", messages=MESSAGES, max_tokens=300, stream=True)
    assert isinstance(stream, GuardedStream)
    assert ledger(g)[0][1] > 0  # returned, not finished: still reserved
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "".join(TEXT)
    assert stream.usage is not None and stream.usage.output_tokens == up.completion_tokens
    assert ledger(g) == settled(2 * chat_cost(up))


def test_limit_stream_closed_early_charges_what_was_streamed(g, upstream):
    srv, _ = upstream
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sk", max_retries=0)

    @g.limit(user=lambda a: a["user"])
    def ask(*, user: str, model: str, messages: list, max_tokens: int) -> Any:
        return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True)

    with ask(user="alice", model="gpt-4o", messages=MESSAGES, max_tokens=300) as stream:
        seen = ""
        for chunk in stream:
            seen += chunk.choices[0].delta.content or ""
            if seen:
                break
    assert seen == TEXT[0]
    expected = cost("gpt-4o", estimate_input_tokens("gpt-4o", MESSAGES), count_text_tokens("gpt-4o", TEXT[0]))
    assert ledger(g) == settled(expected)


def test_limit_async_openai_stream_and_anthropic(g, upstream):
    srv, up = upstream
    oai = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="sk", max_retries=0)
    claude = anthropic.AsyncAnthropic(base_url=srv.url, api_key="sk", max_retries=0)

    @g.limit(user=lambda a: a["user"])
    async def ask(*, user: str, model: str, messages: list, max_tokens: int) -> Any:
        return await oai.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True,
                                                 stream_options={"include_usage": True})

    @g.limit(user=lambda a: a["user"])
    async def ask_claude(*, user: str, model: str, messages: list, max_tokens: int, stream: bool) -> Any:
        return await claude.messages.create(model=model, messages=messages, max_tokens=max_tokens, stream=stream)

    async def main() -> None:
        try:
            stream = await ask(user="alice", model="gpt-4o", messages=MESSAGES, max_tokens=300)
            assert isinstance(stream, AsyncGuardedStream)
            chunks = [c async for c in stream]
            assert chunks[-1].usage is not None
            await ask_claude(user="alice", model="claude-test-1", messages=MESSAGES[1:], max_tokens=200, stream=False)
            events = await ask_claude(user="alice", model="claude-test-1", messages=MESSAGES[1:], max_tokens=200,
                                      stream=True)
            async with events:
                assert [e.type async for e in events][-1] == "message_stop"
            assert ledger(g) == settled(chat_cost(up) + 2 * anthropic_cost(up))
        finally:
            await oai.close()
            await claude.close()
            await g.aclose()

    asyncio.run(main())


def test_limit_sync_anthropic_stream(g, upstream):
    srv, up = upstream
    claude = anthropic.Anthropic(base_url=srv.url, api_key="sk", max_retries=0)

    @g.limit(user=lambda a: a["user"])
    def ask(*, user: str, model: str, messages: list, max_tokens: int) -> Any:
        return claude.messages.create(model=model, messages=messages, max_tokens=max_tokens, stream=True)

    events = list(ask(user="alice", model="claude-test-1", messages=MESSAGES[1:], max_tokens=200))
    assert events[0].type == "message_start"
    assert ledger(g) == settled(anthropic_cost(up))


def test_limit_denial_raises_before_the_call(backend_url, clock, upstream):
    srv, up = upstream
    up.__init__()  # type: ignore[misc]
    g = BudgetGuard(config(models=MODELS, tiers={"default": {"hourly_usd": "0.000001"}}), redis_url=backend_url,
                    clock=clock)
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sk", max_retries=0)

    @g.limit(user=lambda a: a["user"])
    def ask(*, user: str, model: str, messages: list, max_tokens: int) -> Any:
        return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True)

    with pytest.raises(BudgetExceeded):
        ask(user="alice", model="gpt-4o", messages=MESSAGES, max_tokens=300)
    assert up.received == []
    g.close()


def test_a_generator_result_is_settled_when_garbage_collected(g):
    def events() -> Iterator[dict[str, Any]]:
        yield {"choices": [{"index": 0, "delta": {"content": "partial answer"}}]}
        yield {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}

    @g.limit(user=lambda a: a["user"])
    def ask(*, user: str, model: str, messages: list, max_tokens: int) -> Any:
        return events()

    stream = ask(user="alice", model="gpt-4o", messages=MESSAGES, max_tokens=50)
    next(stream)
    del stream  # dropped mid-way, never closed
    gc.collect()  # frames kept by a reference cycle elsewhere may hold it until a collection
    expected = cost("gpt-4o", estimate_input_tokens("gpt-4o", MESSAGES), count_text_tokens("gpt-4o",
                                                                                           "partial answer"))
    assert ledger(g) == settled(expected)
