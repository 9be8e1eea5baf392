"""Usage: its invariants, and reading it from each provider's response shapes.

The payloads follow the shapes in the providers' API references; the SDK tests feed
the same payloads through the real SDK types to prove attribute access works.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from types import SimpleNamespace
from typing import Any

import pytest

from budgetguard.errors import InvalidArgument, InvalidArgumentType
from budgetguard.usage import Usage

# --- realistic payloads ---------------------------------------------------------------

# OpenAI Chat Completions, a reasoning model with a prompt-cache hit.
CHAT_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "o3-mini-2025-01-31",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "The capital of France is Paris.",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 192,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}
CHAT_USAGE = Usage(
    input_tokens=2006, output_tokens=300, cached_input_tokens=1920, reasoning_tokens=192
)

# The last chunk of a chat stream with stream_options={"include_usage": true}.
CHAT_FINAL_CHUNK: dict[str, Any] = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion.chunk",
    "created": 1741570283,
    "model": "o3-mini-2025-01-31",
    "system_fingerprint": "fp_fc9f1d7035",
    "choices": [],
    "usage": copy.deepcopy(CHAT_COMPLETION["usage"]),
}
CHAT_MIDDLE_CHUNK: dict[str, Any] = {
    **CHAT_FINAL_CHUNK,
    "choices": [
        {"index": 0, "delta": {"content": "Paris"}, "logprobs": None, "finish_reason": None}
    ],
    "usage": None,
}

# OpenAI Responses API: 2000 tokens read from the cache, 400 written to it.
RESPONSE: dict[str, Any] = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
    "object": "response",
    "created_at": 1741476777,
    "status": "completed",
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "max_output_tokens": None,
    "model": "o4-mini-2025-04-16",
    "output": [
        {
            "type": "message",
            "id": "msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Paris.", "annotations": []}],
        }
    ],
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": {"effort": "medium", "summary": None},
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
    "usage": {
        "input_tokens": 2600,
        "input_tokens_details": {"cached_tokens": 2000, "cache_write_tokens": 400},
        "output_tokens": 1186,
        "output_tokens_details": {"reasoning_tokens": 1024},
        "total_tokens": 3786,
    },
    "user": None,
    "metadata": {},
}
RESPONSE_USAGE = Usage(
    input_tokens=2600,
    output_tokens=1186,
    cached_input_tokens=2000,
    reasoning_tokens=1024,
    cache_write_tokens=400,
)
RESPONSE_COMPLETED_EVENT: dict[str, Any] = {
    "type": "response.completed",
    "sequence_number": 57,
    "response": copy.deepcopy(RESPONSE),
}

# Anthropic Messages: input_tokens leaves out the 10000 cache reads and 1200 cache writes.
MESSAGE: dict[str, Any] = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-20250514",
    "content": [{"type": "text", "text": "Paris is the capital of France."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 50,
        "cache_creation_input_tokens": 1200,
        "cache_read_input_tokens": 10000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1200, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 503,
        "service_tier": "standard",
    },
}
MESSAGE_USAGE = Usage(
    input_tokens=11250, output_tokens=503, cached_input_tokens=10000, cache_write_tokens=1200
)

# The message_delta event of an Anthropic stream: its usage is cumulative.
MESSAGE_DELTA_EVENT: dict[str, Any] = {
    "type": "message_delta",
    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
    "usage": {
        "input_tokens": 50,
        "cache_creation_input_tokens": 1200,
        "cache_read_input_tokens": 10000,
        "output_tokens": 503,
    },
}

# Gemini REST (camelCase): promptTokenCount includes the cached content,
# candidatesTokenCount leaves out the thoughts; total = prompt + candidates + thoughts.
GEMINI_REST: dict[str, Any] = {
    "candidates": [
        {
            "content": {"parts": [{"text": "Paris."}], "role": "model"},
            "finishReason": "STOP",
            "index": 0,
        }
    ],
    "usageMetadata": {
        "promptTokenCount": 4210,
        "candidatesTokenCount": 312,
        "totalTokenCount": 5470,
        "cachedContentTokenCount": 4096,
        "thoughtsTokenCount": 948,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 4210}],
        "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 4096}],
    },
    "modelVersion": "gemini-2.5-flash",
    "responseId": "mAitaLmkHPPlz7IPvtfUqQ4",
}
GEMINI_USAGE = Usage(
    input_tokens=4210, output_tokens=1260, cached_input_tokens=4096, reasoning_tokens=948
)


def gemini_sdk_response(**counts: int | None) -> SimpleNamespace:
    """Stands in for google-genai's GenerateContentResponse: snake_case, None when unset."""
    names = (
        "prompt_token_count",
        "candidates_token_count",
        "thoughts_token_count",
        "cached_content_token_count",
        "tool_use_prompt_token_count",
        "total_token_count",
    )
    unknown = set(counts) - set(names)
    assert not unknown, unknown
    metadata = SimpleNamespace(**{name: counts.get(name) for name in names})
    return SimpleNamespace(candidates=[], usage_metadata=metadata, model_version="gemini-2.5-flash")


def raises(exc: type[Exception], message: str) -> Any:
    return pytest.raises(exc, match=re.escape(message))


# --- Usage itself -----------------------------------------------------------------------


def test_usage_defaults_and_fields() -> None:
    usage = Usage(input_tokens=10, output_tokens=5)
    assert (usage.cached_input_tokens, usage.reasoning_tokens, usage.cache_write_tokens) == (
        0,
        0,
        0,
    )
    assert Usage(10, 5, 3, 2, 7) == Usage(
        input_tokens=10,
        output_tokens=5,
        cached_input_tokens=3,
        reasoning_tokens=2,
        cache_write_tokens=7,
    )


def test_usage_is_frozen() -> None:
    usage = Usage(10, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        usage.input_tokens = 11  # type: ignore[misc]


def test_usage_accepts_the_limits() -> None:
    assert Usage(0, 0).input_tokens == 0
    assert (
        Usage(10, 5, cached_input_tokens=4, cache_write_tokens=6, reasoning_tokens=5).input_tokens
        == 10
    )


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        (
            {"input_tokens": True},
            InvalidArgumentType,
            "Usage.input_tokens must be an int, got bool True",
        ),
        (
            {"output_tokens": 5.0},
            InvalidArgumentType,
            "Usage.output_tokens must be an int, got float 5.0",
        ),
        (
            {"reasoning_tokens": "1"},
            InvalidArgumentType,
            "Usage.reasoning_tokens must be an int, got str '1'",
        ),
        (
            {"cache_write_tokens": None},
            InvalidArgumentType,
            "Usage.cache_write_tokens must be an int",
        ),
        ({"input_tokens": -1}, InvalidArgument, "Usage.input_tokens must be >= 0, got -1"),
        (
            {"cached_input_tokens": -3},
            InvalidArgument,
            "Usage.cached_input_tokens must be >= 0, got -3",
        ),
        (
            {"cached_input_tokens": 8, "cache_write_tokens": 3},
            InvalidArgument,
            "Usage.cached_input_tokens + Usage.cache_write_tokens (11) "
            "must be <= Usage.input_tokens (10)",
        ),
        (
            {"reasoning_tokens": 6},
            InvalidArgument,
            "Usage.reasoning_tokens (6) must be <= Usage.output_tokens (5)",
        ),
    ],
)
def test_usage_rejects_bad_values(
    kwargs: dict[str, Any], exc: type[Exception], message: str
) -> None:
    with raises(exc, message):
        Usage(**{"input_tokens": 10, "output_tokens": 5, **kwargs})


def test_errors_are_value_errors() -> None:
    # The public contract promises ValueError for malformed input.
    for bad in ({"input_tokens": "10"}, {"input_tokens": -10}):
        with pytest.raises(ValueError):
            Usage(**{"input_tokens": 10, "output_tokens": 5, **bad})


def test_from_response_returns_a_usage_as_is() -> None:
    usage = Usage(10, 5)
    assert Usage.from_response(usage) is usage


# --- provider shapes as parsed JSON ------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (CHAT_COMPLETION, CHAT_USAGE),
        (CHAT_COMPLETION["usage"], CHAT_USAGE),
        (CHAT_FINAL_CHUNK, CHAT_USAGE),
        (RESPONSE, RESPONSE_USAGE),
        (RESPONSE["usage"], RESPONSE_USAGE),
        (RESPONSE_COMPLETED_EVENT, RESPONSE_USAGE),
        (MESSAGE, MESSAGE_USAGE),
        (MESSAGE["usage"], MESSAGE_USAGE),
        (MESSAGE_DELTA_EVENT, MESSAGE_USAGE),
        (GEMINI_REST, GEMINI_USAGE),
        (GEMINI_REST["usageMetadata"], GEMINI_USAGE),
    ],
    ids=[
        "chat",
        "chat-usage-part",
        "chat-final-chunk",
        "responses",
        "responses-usage-part",
        "responses-completed-event",
        "anthropic",
        "anthropic-usage-part",
        "anthropic-message-delta",
        "gemini-rest",
        "gemini-rest-usage-part",
    ],
)
def test_from_response_dicts(payload: dict[str, Any], expected: Usage) -> None:
    assert Usage.from_response(payload) == expected


def test_chat_without_details() -> None:
    # Older models and compatible servers send no details, or null ones.
    assert Usage.from_response(
        {"usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}}
    ) == Usage(9, 12)
    usage = {
        "prompt_tokens": 9,
        "completion_tokens": 12,
        "total_tokens": 21,
        "prompt_tokens_details": None,
        "completion_tokens_details": {"reasoning_tokens": None},
    }
    assert Usage.from_response({"usage": usage}) == Usage(9, 12)


def test_chat_cache_write_tokens() -> None:
    usage = copy.deepcopy(CHAT_COMPLETION["usage"])
    usage["prompt_tokens_details"] = {"cached_tokens": 1500, "cache_write_tokens": 400}
    assert Usage.from_response(usage) == Usage(2006, 300, 1500, 192, 400)


def test_responses_told_apart_by_total_tokens_alone() -> None:
    # No details at all: total_tokens still marks the Responses shape.
    assert Usage.from_response(
        {"input_tokens": 328, "output_tokens": 52, "total_tokens": 380}
    ) == Usage(328, 52)


def test_anthropic_without_cache_fields() -> None:
    # Neither cache field: the same numbers under either reading.
    assert Usage.from_response({"usage": {"input_tokens": 21, "output_tokens": 393}}) == Usage(
        21, 393
    )
    usage = {
        "input_tokens": 21,
        "output_tokens": 393,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": None,
    }
    assert Usage.from_response({"usage": usage}) == Usage(21, 393)


def test_anthropic_thinking_tokens_are_not_mistaken_for_responses() -> None:
    # Anthropic now reports output_tokens_details too; without total_tokens it stays Anthropic,
    # so the cache read is still added to the input.
    usage = {
        "input_tokens": 50,
        "cache_read_input_tokens": 10000,
        "output_tokens": 2820,
        "output_tokens_details": {"thinking_tokens": 1240},
    }
    assert Usage.from_response({"usage": usage}) == Usage(10050, 2820, 10000, 1240)


def test_gemini_with_tool_use_prompt() -> None:
    metadata = {
        **GEMINI_REST["usageMetadata"],
        "toolUsePromptTokenCount": 150,
        "totalTokenCount": 5620,
    }
    assert Usage.from_response({"usageMetadata": metadata}) == Usage(4360, 1260, 4096, 948)


def test_gemini_blocked_prompt_has_no_candidates_count() -> None:
    payload = {
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
    }
    assert Usage.from_response(payload) == Usage(8, 0)


def test_gemini_sdk_object_snake_case() -> None:
    response = gemini_sdk_response(
        prompt_token_count=4210,
        candidates_token_count=312,
        thoughts_token_count=948,
        cached_content_token_count=4096,
        total_token_count=5470,
    )
    assert Usage.from_response(response) == GEMINI_USAGE
    assert Usage.from_response(response.usage_metadata) == GEMINI_USAGE


def test_gemini_sdk_object_without_thinking_or_cache() -> None:
    response = gemini_sdk_response(
        prompt_token_count=12, candidates_token_count=40, total_token_count=52
    )
    assert Usage.from_response(response) == Usage(12, 40)


def test_gemini_snake_case_dict() -> None:
    # GenerateContentResponse.model_dump() keeps the snake_case names.
    dumped = {
        "usage_metadata": {
            "prompt_token_count": 4210,
            "candidates_token_count": 312,
            "thoughts_token_count": 948,
            "cached_content_token_count": 4096,
            "tool_use_prompt_token_count": None,
        }
    }
    assert Usage.from_response(dumped) == GEMINI_USAGE


# --- bad input ----------------------------------------------------------------------------


def with_usage(usage: Any, base: dict[str, Any] = CHAT_COMPLETION) -> dict[str, Any]:
    return {**base, "usage": usage}


@pytest.mark.parametrize(
    ("payload", "exc", "message"),
    [
        (
            with_usage({"prompt_tokens": 10, "total_tokens": 10}),
            InvalidArgument,
            "usage.completion_tokens is missing",
        ),
        (
            with_usage({"prompt_tokens": None, "completion_tokens": 3}),
            InvalidArgument,
            "usage.prompt_tokens is missing",
        ),
        (
            with_usage(
                {
                    "prompt_tokens": 10,
                    "completion_tokens": 3,
                    "prompt_tokens_details": {"cached_tokens": -3},
                }
            ),
            InvalidArgument,
            "usage.prompt_tokens_details.cached_tokens must be >= 0, got -3",
        ),
        (
            with_usage({"prompt_tokens": "12", "completion_tokens": 3}),
            InvalidArgumentType,
            "usage.prompt_tokens must be an int, got str '12'",
        ),
        (
            with_usage({"prompt_tokens": 12, "completion_tokens": True}),
            InvalidArgumentType,
            "usage.completion_tokens must be an int, got bool True",
        ),
        (
            with_usage({"prompt_tokens": 12.0, "completion_tokens": 3}),
            InvalidArgumentType,
            "usage.prompt_tokens must be an int, got float 12.0",
        ),
        (
            with_usage(
                {
                    "prompt_tokens": 100,
                    "completion_tokens": 3,
                    "prompt_tokens_details": {"cached_tokens": 150},
                }
            ),
            InvalidArgument,
            "usage.prompt_tokens_details.cached_tokens + "
            "usage.prompt_tokens_details.cache_write_tokens (150) "
            "must be <= usage.prompt_tokens (100)",
        ),
        (
            with_usage(
                {
                    "prompt_tokens": 10,
                    "completion_tokens": 3,
                    "completion_tokens_details": {"reasoning_tokens": 4},
                }
            ),
            InvalidArgument,
            "usage.completion_tokens_details.reasoning_tokens (4) "
            "must be <= usage.completion_tokens (3)",
        ),
        (with_usage(None), InvalidArgument, "response carries no usage: usage is None"),
        (CHAT_MIDDLE_CHUNK, InvalidArgument, "response carries no usage: usage is None"),
        (
            with_usage(
                {
                    "input_tokens": 10,
                    "output_tokens": 5,
                    "output_tokens_details": {"reasoning_tokens": 9},
                    "total_tokens": 15,
                },
                RESPONSE,
            ),
            InvalidArgument,
            "usage.output_tokens_details.reasoning_tokens (9) must be <= usage.output_tokens (5)",
        ),
        (
            with_usage(
                {
                    "input_tokens": 10,
                    "input_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 4},
                    "output_tokens": 5,
                },
                RESPONSE,
            ),
            InvalidArgument,
            "usage.input_tokens_details.cached_tokens + "
            "usage.input_tokens_details.cache_write_tokens (12) "
            "must be <= usage.input_tokens (10)",
        ),
        (
            {
                "type": "response.completed",
                "response": {"usage": {"input_tokens": 5, "total_tokens": 5}},
            },
            InvalidArgument,
            "response.usage.output_tokens is missing",
        ),
        (
            {
                "type": "response.created",
                "response": {**RESPONSE, "status": "in_progress", "usage": None},
            },
            InvalidArgument,
            "response carries no usage: response.usage is None",
        ),
        (
            with_usage(
                {"input_tokens": 5, "cache_read_input_tokens": -1, "output_tokens": 2}, MESSAGE
            ),
            InvalidArgument,
            "usage.cache_read_input_tokens must be >= 0, got -1",
        ),
        (
            with_usage(
                {
                    "input_tokens": 5,
                    "output_tokens": 2,
                    "output_tokens_details": {"thinking_tokens": 3},
                },
                MESSAGE,
            ),
            InvalidArgument,
            "usage.output_tokens_details.thinking_tokens (3) must be <= usage.output_tokens (2)",
        ),
        (
            # An older message_delta carries only the output count.
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 15},
            },
            InvalidArgument,
            "usage.input_tokens is missing",
        ),
        (
            # message_start holds a provisional output count, so it is not read.
            {"type": "message_start", "message": MESSAGE},
            InvalidArgument,
            "no token usage found in the response: none of its keys ['message', 'type'] is known",
        ),
        (
            {"usageMetadata": {"candidatesTokenCount": 5, "totalTokenCount": 5}},
            InvalidArgument,
            "usageMetadata.promptTokenCount is missing",
        ),
        (
            {
                "usageMetadata": {
                    "promptTokenCount": 5,
                    "candidatesTokenCount": 5,
                    "thoughtsTokenCount": -1,
                }
            },
            InvalidArgument,
            "usageMetadata.thoughtsTokenCount must be >= 0, got -1",
        ),
        (
            {"usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": "5"}},
            InvalidArgumentType,
            "usageMetadata.candidatesTokenCount must be an int, got str '5'",
        ),
        (
            {"usageMetadata": {"promptTokenCount": 100, "cachedContentTokenCount": 120}},
            InvalidArgument,
            "usageMetadata.cachedContentTokenCount (120) "
            "must be <= usageMetadata.promptTokenCount (100)",
        ),
        (
            {"usageMetadata": None},
            InvalidArgument,
            "response carries no usage: usageMetadata is None",
        ),
        (
            {"id": "chatcmpl-1", "choices": []},
            InvalidArgument,
            "no token usage found in the response: none of its keys ['choices', 'id'] is known",
        ),
        (
            with_usage({"tokens": 12}),
            InvalidArgument,
            "no token usage found in usage: none of its keys ['tokens'] is known",
        ),
        (
            with_usage("lots"),
            InvalidArgumentType,
            "usage must be a usage object or mapping, got str",
        ),
        (with_usage(42), InvalidArgumentType, "usage must be a usage object or mapping, got int"),
    ],
)
def test_from_response_rejects_bad_input(payload: Any, exc: type[Exception], message: str) -> None:
    with raises(exc, message):
        Usage.from_response(payload)


@pytest.mark.parametrize("obj", [None, 42, "usage", [1, 2], object(), SimpleNamespace(tokens=3)])
def test_from_response_rejects_random_objects(obj: object) -> None:
    with raises(InvalidArgumentType, f"got {type(obj).__name__}"):
        Usage.from_response(obj)


def test_gemini_sdk_object_errors_name_the_snake_case_path() -> None:
    with raises(InvalidArgument, "usage_metadata.prompt_token_count is missing"):
        Usage.from_response(gemini_sdk_response(candidates_token_count=5))
    with raises(
        InvalidArgumentType, "usage_metadata.thoughts_token_count must be an int, got bool False"
    ):
        Usage.from_response(gemini_sdk_response(prompt_token_count=5, thoughts_token_count=False))


# --- the real SDK types -------------------------------------------------------------------


def test_openai_chat_completion_sdk_object() -> None:
    chat = pytest.importorskip("openai.types.chat")
    completion = chat.ChatCompletion.model_validate(CHAT_COMPLETION)
    assert Usage.from_response(completion) == CHAT_USAGE
    assert Usage.from_response(completion.usage) == CHAT_USAGE


def test_openai_chat_completion_sdk_object_without_usage() -> None:
    chat = pytest.importorskip("openai.types.chat")
    completion = chat.ChatCompletion.model_validate({**CHAT_COMPLETION, "usage": None})
    with raises(InvalidArgument, "response carries no usage: usage is None"):
        Usage.from_response(completion)


def test_openai_chat_chunk_sdk_objects() -> None:
    chat = pytest.importorskip("openai.types.chat")
    assert (
        Usage.from_response(chat.ChatCompletionChunk.model_validate(CHAT_FINAL_CHUNK)) == CHAT_USAGE
    )
    with raises(InvalidArgument, "response carries no usage"):
        Usage.from_response(chat.ChatCompletionChunk.model_validate(CHAT_MIDDLE_CHUNK))


def test_openai_chat_sdk_object_bad_counts() -> None:
    chat = pytest.importorskip("openai.types.chat")
    usage = {**CHAT_COMPLETION["usage"], "prompt_tokens_details": {"cached_tokens": -3}}
    completion = chat.ChatCompletion.model_validate(with_usage(usage))
    with raises(InvalidArgument, "usage.prompt_tokens_details.cached_tokens must be >= 0, got -3"):
        Usage.from_response(completion)


def test_openai_responses_sdk_objects() -> None:
    responses = pytest.importorskip("openai.types.responses")
    response = responses.Response.model_validate(RESPONSE)
    assert Usage.from_response(response) == RESPONSE_USAGE
    assert Usage.from_response(response.usage) == RESPONSE_USAGE
    event = responses.ResponseCompletedEvent.model_validate(RESPONSE_COMPLETED_EVENT)
    assert Usage.from_response(event) == RESPONSE_USAGE


def test_openai_responses_created_event_sdk_object() -> None:
    responses = pytest.importorskip("openai.types.responses")
    event = responses.ResponseCreatedEvent.model_validate(
        {"type": "response.created", "sequence_number": 0, "response": {**RESPONSE, "usage": None}}
    )
    with raises(InvalidArgument, "response carries no usage: response.usage is None"):
        Usage.from_response(event)


def test_anthropic_message_sdk_object() -> None:
    types = pytest.importorskip("anthropic.types")
    message = types.Message.model_validate(MESSAGE)
    assert Usage.from_response(message) == MESSAGE_USAGE
    assert Usage.from_response(message.usage) == MESSAGE_USAGE


def test_anthropic_message_sdk_object_without_cache_fields() -> None:
    types = pytest.importorskip("anthropic.types")
    message = types.Message.model_validate(
        with_usage({"input_tokens": 21, "output_tokens": 393}, MESSAGE)
    )
    assert Usage.from_response(message) == Usage(21, 393)


def test_anthropic_message_delta_sdk_objects() -> None:
    types = pytest.importorskip("anthropic.types")
    event = types.RawMessageDeltaEvent.model_validate(MESSAGE_DELTA_EVENT)
    assert Usage.from_response(event) == MESSAGE_USAGE
    partial = types.RawMessageDeltaEvent.model_validate(
        {**MESSAGE_DELTA_EVENT, "usage": {"output_tokens": 15}}
    )
    with raises(InvalidArgument, "usage.input_tokens is missing"):
        Usage.from_response(partial)
