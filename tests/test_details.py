"""Usage events carry the finish reason, streamed, endpoint and the provider's usage object."""

from __future__ import annotations

import json
from typing import Any

import pytest

from budgetguard.details import MAX_RAW_USAGE, CallDetails, details_from_response
from budgetguard.guard import BudgetGuard

from .helpers import MSG, config


@pytest.mark.parametrize(("response", "reason"), [
    ({"choices": [{"finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}, "stop"),
    ({"choices": [{"finish_reason": "stop"}, {"finish_reason": "length"}],
      "usage": {"prompt_tokens": 5, "completion_tokens": 2}}, "length"),
    ({"stop_reason": "max_tokens", "usage": {"input_tokens": 5, "output_tokens": 2}}, "length"),
    ({"stop_reason": "end_turn", "usage": {"input_tokens": 5, "output_tokens": 2}}, "end_turn"),
    ({"candidates": [{"finishReason": "MAX_TOKENS"}],
      "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2}}, "length"),
    ({"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}, "output": [],
      "usage": {"input_tokens": 5, "output_tokens": 2}}, "length"),
    ({"status": "completed", "output": [], "usage": {"input_tokens": 5, "output_tokens": 2}}, "stop"),
])
def test_finish_reasons_of_each_provider(response, reason):
    details = details_from_response(response)
    assert details.finish_reason == reason
    assert details.raw_usage == response.get("usage", response.get("usageMetadata"))


def test_raw_usage_is_bounded_plain_json():
    big = {"usage": {"prompt_tokens": 1, "note": "x" * 1000, "nested": {"a": {"b": {"c": {"d": {"e": 1}}}}}}}
    raw = details_from_response(big).raw_usage
    assert raw is not None and raw["note"] == "x" * 64 and raw["nested"]["a"]["b"]["c"] is None
    huge = {"usage": {f"k{i}": i for i in range(60)} | {"list": [{"x": "y" * 64}] * 64}}
    assert details_from_response(huge).raw_usage is None  # over MAX_RAW_USAGE characters: left out
    assert len(json.dumps(details_from_response({"usage": {"a": 1}}).raw_usage)) < MAX_RAW_USAGE
    assert details_from_response(None) == CallDetails() == details_from_response("text")

    class Hostile:
        @property
        def choices(self) -> Any:
            raise RuntimeError("boom")

    assert details_from_response(Hostile()) == CallDetails()


def test_given_details_override_and_are_bounded():
    found = CallDetails(finish_reason="stop", raw_usage={"a": 1})
    merged = found.merged(CallDetails(streamed=True, endpoint="e" * 100, finish_reason="max_tokens"))
    assert merged == CallDetails(finish_reason="length", streamed=True, endpoint="e" * 64, raw_usage={"a": 1})
    with pytest.raises(TypeError):
        found.merged(CallDetails(streamed="yes"))  # type: ignore[arg-type]


def test_record_puts_them_in_the_usage_event(backend_url):
    events: list[dict[str, Any]] = []
    g = BudgetGuard(config(), redis_url=backend_url, on_event=events.append)
    d = g.check("alice", "gpt-4o-mini", MSG, max_tokens=50)
    g.record(d, {"choices": [{"finish_reason": "length", "message": {"content": "SECRET"}}],
                 "usage": {"prompt_tokens": 10, "completion_tokens": 50}}, details=CallDetails(endpoint="chat"))
    d = g.check("alice", "gpt-4o-mini", MSG, max_tokens=50)
    g.record(d, {"prompt_tokens": 10, "completion_tokens": 5})
    g.flush()
    g.close()
    first, second = events
    assert (first["finish_reason"], first["endpoint"], first["streamed"]) == ("length", "chat", None)
    assert first["raw_usage"] == {"prompt_tokens": 10, "completion_tokens": 50}
    assert "SECRET" not in json.dumps(first)
    assert (second["finish_reason"], second["raw_usage"]) == (None, None)


@pytest.mark.parametrize(("events", "reason"), [
    ([{"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
      {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}], "length"),
    ([{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
      {"choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]},
      {"choices": [{"index": 2, "delta": {}, "finish_reason": "stop"}]}], "length"),
    ([{"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1}}},
      {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 9}}], "length"),
    ([{"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}], "end_turn"),
    ([{"type": "response.incomplete", "response": {"status": "incomplete",
                                                   "incomplete_details": {"reason": "max_output_tokens"},
                                                   "usage": {"input_tokens": 5, "output_tokens": 9}}}], "length"),
    ([{"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}], None),
])
def test_a_streams_finish_reason_is_read_from_its_events(events, reason):
    from budgetguard.streams import StreamUsage

    tracker = StreamUsage("gpt-4o")
    for event in events:
        tracker.feed(event)
    assert tracker.finish_reason == reason


def test_a_proxied_stream_records_its_finish_reason(upstream_server, real_redis, real_redis_url, clock):
    import time

    from .test_proxy import Env
    from .upstream import MESSAGES

    env = Env(upstream_server, real_redis_url, clock)
    try:
        env.start()
        chunks = list(env.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=30,
                                                           stream=True))
        assert chunks[-1].choices[0].finish_reason == "stop"
        env.settled()
        deadline = time.monotonic() + 10
        while not env.events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (env.events[0]["finish_reason"], env.events[0]["streamed"]) == ("stop", True)
    finally:
        env.close()
