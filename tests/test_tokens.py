"""Tests for budgetguard.tokens.

Expected numbers come from published sources wherever one exists:

* OpenAI cookbook, "How to count tokens with tiktoken"
  (https://github.com/openai/openai-cookbook/blob/main/examples/How_to_count_tokens_with_tiktoken.ipynb):
  the per-encoding examples of section 5, the 6-message chat example of section 6 (129
  prompt tokens reported by the API for gpt-3.5-turbo, gpt-4-0613 and gpt-4, 124 for
  gpt-4o and gpt-4o-mini) and the weather-tool example of section 7 (105 prompt tokens for
  gpt-3.5-turbo and gpt-4, 101 for gpt-4o and gpt-4o-mini).
* The same notebook's "tiktoken is great!" example: 6 tokens.

Elsewhere the expected value is derived by hand from the documented rules, with the
tokens of individual strings taken from tiktoken directly, never from the module.
"""

from __future__ import annotations

import json
import logging
import math
from fractions import Fraction

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from budgetguard import tokens
from budgetguard.errors import InvalidArgument, InvalidArgumentType
from budgetguard.tokens import (
    IMAGE_TOKENS,
    Tokenizer,
    count_text_tokens,
    estimate_input_tokens,
    tokenizer_for,
)

O200K = tiktoken.get_encoding("o200k_base")
CL100K = tiktoken.get_encoding("cl100k_base")


def o200k(text: str) -> int:
    return len(O200K.encode_ordinary(text))


COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on "
        "opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]

WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]

WEATHER_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


# --------------------------------------------------------------------------- published counts


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-3.5-turbo", 129),
        ("gpt-4-0613", 129),
        ("gpt-4", 129),
        ("gpt-4o", 124),
        ("gpt-4o-mini", 124),
    ],
)
def test_cookbook_chat_example(model: str, expected: int) -> None:
    # Cookbook section 6: prompt_tokens reported by the OpenAI API for this conversation.
    assert estimate_input_tokens(model, COOKBOOK_MESSAGES) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)],
)
def test_cookbook_function_calling_example(model: str, expected: int) -> None:
    # Cookbook section 7 ("Counting tokens for chat completions with tool calls"):
    # prompt_tokens reported by the OpenAI API with the get_current_weather tool.
    assert estimate_input_tokens(model, WEATHER_MESSAGES, tools=WEATHER_TOOLS) == expected


def test_responses_style_flat_function_tool_counts_like_the_nested_one() -> None:
    flat = [{"type": "function", **WEATHER_TOOLS[0]["function"]}]
    assert estimate_input_tokens("gpt-4o", WEATHER_MESSAGES, tools=flat) == 101


@pytest.mark.parametrize(
    ("text", "cl100k", "o200k_count"),
    [
        # Cookbook section 4/5 outputs.
        ("tiktoken is great!", 6, 6),
        ("antidisestablishmentarianism", 6, 6),
        ("2 + 2 = 4", 7, 7),
        ("お誕生日おめでとう", 9, 8),
    ],
)
def test_published_encoding_examples(text: str, cl100k: int, o200k_count: int) -> None:
    assert count_text_tokens("gpt-4", text) == cl100k
    assert count_text_tokens("gpt-3.5-turbo", text) == cl100k
    assert count_text_tokens("gpt-4o", text) == o200k_count
    assert tokenizer_for("gpt-4o").count(text) == o200k_count


def test_prompt_is_plain_text_without_chat_overhead() -> None:
    assert estimate_input_tokens("gpt-4", prompt="tiktoken is great!") == 6
    assert estimate_input_tokens("gpt-4", prompt=["tiktoken is great!", "2 + 2 = 4"]) == 13


def test_nothing_to_count_and_empty_conversation() -> None:
    assert estimate_input_tokens("gpt-4o") == 0
    assert estimate_input_tokens("gpt-4o", []) == 3  # only the reply priming


# --------------------------------------------------------------------------- encoding choice


@pytest.mark.parametrize(
    ("model", "encoding", "factor", "family"),
    [
        ("gpt-4o", "o200k_base", Fraction(1), "openai"),
        ("gpt-4o-mini-2024-07-18", "o200k_base", Fraction(1), "openai"),
        ("gpt-4.1", "o200k_base", Fraction(1), "openai"),
        ("gpt-4.1-nano", "o200k_base", Fraction(1), "openai"),
        ("gpt-5", "o200k_base", Fraction(1), "openai"),
        ("gpt-5-mini", "o200k_base", Fraction(1), "openai"),
        ("o1", "o200k_base", Fraction(1), "openai"),
        ("o3-mini", "o200k_base", Fraction(1), "openai"),
        ("o4-mini", "o200k_base", Fraction(1), "openai"),
        ("gpt-4", "cl100k_base", Fraction(1), "openai"),
        ("gpt-4-turbo", "cl100k_base", Fraction(1), "openai"),
        ("gpt-3.5-turbo", "cl100k_base", Fraction(1), "openai"),
        ("openai/gpt-4o", "o200k_base", Fraction(1), "openai"),
        ("azure/gpt-35-turbo", "cl100k_base", Fraction(1), "openai"),
        ("GPT-4o", "o200k_base", Fraction(1), "openai"),
        ("claude-3-5-sonnet-20241022", "o200k_base", Fraction(5, 4), "claude"),
        ("anthropic/claude-sonnet-4-5", "o200k_base", Fraction(5, 4), "claude"),
        ("us.anthropic.claude-3-haiku-20240307-v1:0", "o200k_base", Fraction(5, 4), "claude"),
        ("gemini-2.5-pro", "o200k_base", Fraction(23, 20), "gemini"),
        ("vertex_ai/gemini-1.5-flash", "o200k_base", Fraction(23, 20), "gemini"),
        ("llama3.1:8b", "o200k_base", Fraction(23, 20), "llama"),
        ("meta-llama/Llama-3.3-70B-Instruct", "o200k_base", Fraction(23, 20), "llama"),
        ("meta-llama-3-8b", "o200k_base", Fraction(23, 20), "llama"),
        ("mistral-large-latest", "o200k_base", Fraction(5, 4), "mistral"),
        ("mixtral-8x7b-instruct", "o200k_base", Fraction(5, 4), "mistral"),
        ("codestral-latest", "o200k_base", Fraction(5, 4), "mistral"),
        ("ministral-8b-latest", "o200k_base", Fraction(5, 4), "mistral"),
        ("qwen2.5-72b-instruct", "o200k_base", Fraction(5, 4), "unknown"),
    ],
)
def test_encoding_and_factor_per_family(
    model: str, encoding: str, factor: Fraction, family: str
) -> None:
    tok = tokenizer_for(model)
    assert isinstance(tok, Tokenizer)
    assert (tok.encoding_name, tok.factor, tok.family) == (encoding, factor, family)


def test_newer_openai_models_unknown_to_an_older_tiktoken(monkeypatch) -> None:
    def too_old(name: str) -> str:
        raise KeyError(name)

    monkeypatch.setattr(tiktoken, "encoding_name_for_model", too_old)
    tokens._clear_caches()
    try:
        for model in ("gpt-4.1-mini", "gpt-5.1", "o3", "o4-mini", "openai/gpt-4o"):
            tok = tokenizer_for(model)
            assert (tok.encoding_name, tok.factor, tok.family) == (
                "o200k_base",
                Fraction(1),
                "openai",
            ), model
        assert tokenizer_for("gpt-4").factor == Fraction(5, 4)  # unknown to it: margin applies
    finally:
        tokens._clear_caches()


def test_tokenizer_is_cached_per_model() -> None:
    assert tokenizer_for("gpt-4o") is tokenizer_for("gpt-4o")
    assert tokenizer_for("claude-3-opus") is tokenizer_for("claude-3-opus")


@pytest.mark.parametrize(
    ("model", "factor"),
    [
        ("claude-3-opus", Fraction(5, 4)),
        ("gemini-2.0-flash", Fraction(23, 20)),
        ("llama-3.1-405b", Fraction(23, 20)),
        ("mistral-small", Fraction(5, 4)),
        ("some-new-model", Fraction(5, 4)),
    ],
)
def test_safety_factor_on_text(model: str, factor: Fraction) -> None:
    text = (
        "Budgets are reserved before the call and settled afterwards; the estimate must "
        "err on the high side. Ünïcödé, 数字 123456789, and code: def f(x): return x**2"
    )
    for sample in (text, "お誕生日おめでとう", "antidisestablishmentarianism"):
        assert count_text_tokens(model, sample) == math.ceil(o200k(sample) * factor)
    # Anchored on published o200k counts: 8 tokens and 6 tokens.
    assert count_text_tokens(model, "お誕生日おめでとう") == math.ceil(8 * factor)
    assert count_text_tokens(model, "antidisestablishmentarianism") == math.ceil(6 * factor)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        # The conversation is 124 tokens in o200k units (published); scaled and rounded up.
        ("claude-3-5-haiku", 155),  # ceil(124 * 1.25)
        ("gemini-1.5-pro", 143),  # ceil(124 * 1.15)
        ("llama-3-70b", 143),
        ("mistral-medium", 155),
        ("totally-unknown", 155),
    ],
)
def test_safety_factor_on_chat(model: str, expected: int) -> None:
    assert estimate_input_tokens(model, COOKBOOK_MESSAGES) == expected


def test_pinned_encoding_overrides_lookup_with_factor_one() -> None:
    tok = tokenizer_for("my-finetune", encoding="cl100k_base")
    assert (tok.encoding_name, tok.factor) == ("cl100k_base", Fraction(1))
    assert tok.count("お誕生日おめでとう") == 9  # published cl100k count
    pinned = tokenizer_for("claude-custom", encoding="o200k_base")
    assert (pinned.encoding_name, pinned.factor) == ("o200k_base", Fraction(1))
    assert pinned.count("お誕生日おめでとう") == 8  # no 1.25 margin any more


def test_pinned_encoding_must_exist() -> None:
    with pytest.raises(InvalidArgument, match="nope_base"):
        tokenizer_for("my-finetune", encoding="nope_base")
    with pytest.raises(InvalidArgumentType, match="encoding must be a string"):
        tokenizer_for("my-finetune", encoding=200)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fallback


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """No cached rank files and no network: every encoding load fails."""

    def no_network(blobpath: str) -> bytes:
        raise ConnectionError(f"offline: {blobpath}")

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    tokens._clear_caches()
    yield
    tokens._clear_caches()


def utf8(text: str) -> int:
    return len(text.encode("utf-8"))


def test_fallback_counts_bytes_warns_once_and_never_raises(offline, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="budgetguard.tokens")
    texts = ["tiktoken is great!", "お誕生日おめでとう", "2 + 2 = 4"]
    for model in ("gpt-4o", "gpt-4", "claude-3-opus", "gemini-pro", "gpt-4o"):
        tok = tokenizer_for(model)
        assert tok.encoding_name is None
        assert tok.factor == 1
        for text in texts:
            n = count_text_tokens(model, text)
            assert n == utf8(text)
            assert n >= len(O200K.encode_ordinary(text))
            assert n >= len(CL100K.encode_ordinary(text))

    expected = (
        sum(
            3 + utf8(m["role"]) + utf8(m["content"]) + (utf8(m["name"]) + 1 if "name" in m else 0)
            for m in COOKBOOK_MESSAGES
        )
        + 3
    )
    for model in ("gpt-4o", "gpt-4", "claude-3-opus"):
        estimate = estimate_input_tokens(model, COOKBOOK_MESSAGES)
        assert estimate == expected
        assert estimate >= 155  # above even the scaled Claude estimate with real encodings

    warnings = [r for r in caplog.records if r.name == "budgetguard.tokens"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "UTF-8 byte" in warnings[0].getMessage()
    assert "conservative" in warnings[0].getMessage()


def test_fallback_with_tools_and_images_stays_conservative(offline) -> None:
    assert estimate_input_tokens("gpt-4o", WEATHER_MESSAGES, tools=WEATHER_TOOLS) >= 105
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert estimate_input_tokens("gpt-4o", msg) == 3 + 4 + IMAGE_TOKENS + 3


def test_encodings_load_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    real = tiktoken.get_encoding
    calls: list[str] = []

    def spy(name: str):
        calls.append(name)
        return real(name)

    tokens._clear_caches()
    monkeypatch.setattr(tiktoken, "get_encoding", spy)
    try:
        for _ in range(5):
            estimate_input_tokens("gpt-4o", COOKBOOK_MESSAGES)
            estimate_input_tokens("claude-3-opus", COOKBOOK_MESSAGES)
            count_text_tokens("gpt-4", "hello")
        assert sorted(calls) == ["cl100k_base", "o200k_base"]
    finally:
        tokens._clear_caches()


# --------------------------------------------------------------------------- message shapes


def test_list_of_text_parts_counts_like_string_content() -> None:
    # 3 (message) + 1 ("user") + 6 ("tiktoken is great!") + 3 (priming)
    as_string = [{"role": "user", "content": "tiktoken is great!"}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "tiktoken is great!"}]}]
    as_input_text = [
        {"role": "user", "content": [{"type": "input_text", "text": "tiktoken is great!"}]}
    ]
    assert estimate_input_tokens("gpt-4o", as_string) == 13
    assert estimate_input_tokens("gpt-4o", as_parts) == 13
    assert estimate_input_tokens("gpt-4o", as_input_text) == 13
    split = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "tiktoken"},
                {"type": "text", "text": " is great!"},
            ],
        }
    ]
    assert (
        estimate_input_tokens("gpt-4o", split)
        == 3 + 1 + o200k("tiktoken") + o200k(" is great!") + 3
    )


def test_null_content_and_none_values_are_free() -> None:
    assert estimate_input_tokens("gpt-4o", [{"role": "assistant", "content": None}]) == (
        3 + o200k("assistant") + 3
    )


IMAGE_PARTS = [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 50_000}},
    {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "high"},
    {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "B" * 50_000},
    },
]


@pytest.mark.parametrize("image", IMAGE_PARTS, ids=["openai", "responses", "anthropic"])
def test_images_cost_a_fixed_amount_not_their_payload(image: dict) -> None:
    msg = [{"role": "user", "content": [{"type": "text", "text": "tiktoken is great!"}, image]}]
    assert estimate_input_tokens("gpt-4o", msg) == 13 + IMAGE_TOKENS
    # Image tokens are in the target model's own units: the text margin does not apply.
    assert estimate_input_tokens("claude-3-opus", msg) == math.ceil(13 * 1.25) + IMAGE_TOKENS


def test_image_constant_covers_documented_maxima() -> None:
    # gpt-4o high detail: 85 + 170 * 8 tiles; gpt-4.1: 1536 patches; Claude 1092x1092: ~1590.
    assert max(85 + 170 * 8, 1536, 1092 * 1092 // 750) <= IMAGE_TOKENS


def test_openai_tool_calls_count_name_and_arguments() -> None:
    args = '{"location": "Paris, France", "unit": "celsius"}'
    msgs = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc123",
                    "type": "function",
                    "function": {"name": "get_current_weather", "arguments": args},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc123", "content": "18 degrees"},
    ]
    expected = (
        3
        + o200k("assistant")
        + o200k("get_current_weather")
        + o200k(args)
        + 3
        + o200k("tool")
        + o200k("call_abc123")
        + o200k("18 degrees")
        + 3
    )
    assert estimate_input_tokens("gpt-4o", msgs) == expected


def test_anthropic_blocks_and_system_prompt() -> None:
    tool_input = {"city": "Paris", "days": 3}
    msgs = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": tool_input},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01",
                    "content": [{"type": "text", "text": "18C and sunny"}],
                },
                {"type": "tool_result", "tool_use_id": "toolu_02", "content": "no rain"},
            ],
        },
    ]
    system = "You are terse."
    units = (
        (3 + o200k("user") + o200k("What's the weather in Paris?"))
        + (
            3
            + o200k("assistant")
            + o200k("Let me check.")
            + o200k("get_weather")
            + o200k(json.dumps(tool_input, ensure_ascii=False))
        )
        + (3 + o200k("user") + o200k("18C and sunny") + o200k("no rain"))
        + (3 + o200k("system") + o200k(system))
        + 3
    )
    assert estimate_input_tokens("claude-sonnet-4-5", msgs, system=system) == math.ceil(
        units * Fraction(5, 4)
    )
    blocks = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
    assert estimate_input_tokens("claude-sonnet-4-5", msgs, system=blocks) == math.ceil(
        units * Fraction(5, 4)
    )


def test_system_counts_as_one_extra_message() -> None:
    # 3 (message) + 1 ("system") + 6 + 3 (priming)
    assert estimate_input_tokens("gpt-4o", system="tiktoken is great!") == 13
    assert (
        estimate_input_tokens(
            "gpt-4o", [{"role": "user", "content": "2 + 2 = 4"}], system="tiktoken is great!"
        )
        == (3 + 1 + 6) + (3 + o200k("user") + 7) + 3
    )


def test_tool_result_with_image_is_counted_recursively() -> None:
    msgs = [
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "content": [IMAGE_PARTS[2], {"type": "text", "text": "tiktoken is great!"}],
                }
            ],
        }
    ]
    assert estimate_input_tokens("gpt-4o", msgs) == 13 + IMAGE_TOKENS


def test_unknown_part_types_count_their_json() -> None:
    part = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    msgs = [{"role": "user", "content": [part]}]
    expected = 3 + o200k("user") + o200k(json.dumps(part, ensure_ascii=False)) + 3
    assert estimate_input_tokens("gpt-4o", msgs) == expected
    assert expected > 3 + o200k("user") + 3


def test_anthropic_tool_definition_counts_its_json() -> None:
    tool = {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "input_schema": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    }
    base = estimate_input_tokens("gpt-4o", WEATHER_MESSAGES)
    with_tool = estimate_input_tokens("gpt-4o", WEATHER_MESSAGES, tools=[tool])
    assert with_tool - base == o200k(json.dumps(tool, ensure_ascii=False))


def test_trailing_period_of_descriptions_is_not_counted() -> None:
    # The cookbook formula strips one trailing "." from function and property descriptions.
    dotted = json.loads(json.dumps(WEATHER_TOOLS))
    dotted[0]["function"]["description"] += "."
    dotted[0]["function"]["parameters"]["properties"]["unit"]["description"] += "."
    assert estimate_input_tokens("gpt-4o", WEATHER_MESSAGES, tools=dotted) == 101
    assert estimate_input_tokens("gpt-4", WEATHER_MESSAGES, tools=dotted) == 105


def test_schema_parts_outside_the_formula_are_not_dropped() -> None:
    nested = json.loads(json.dumps(WEATHER_TOOLS))
    items = {"type": "object", "properties": {"day": {"type": "string"}}}
    nested[0]["function"]["parameters"]["properties"]["days"] = {
        "type": "array",
        "description": "Days to forecast",
        "items": items,
    }
    # prop_key (3) + "days:array:Days to forecast" + the JSON of what the formula ignores.
    added = (
        3
        + o200k("days:array:Days to forecast")
        + o200k(json.dumps({"items": items}, ensure_ascii=False))
    )
    assert estimate_input_tokens("gpt-4o", WEATHER_MESSAGES, tools=nested) == 101 + added


@pytest.mark.parametrize(
    "text", ["<|endoftext|>", "<|im_start|>system<|im_end|>", "<|fim_prefix|>"]
)
def test_special_token_text_is_counted_as_plain_text(text: str) -> None:
    assert count_text_tokens("gpt-4", text) == len(CL100K.encode_ordinary(text)) > 1
    assert count_text_tokens("gpt-4o", text) == len(O200K.encode_ordinary(text)) > 1
    msgs = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    assert estimate_input_tokens("gpt-4o", msgs, prompt=text) > 0


def test_responses_api_items_without_role() -> None:
    items = [
        {"role": "user", "content": "2 + 2 = 4"},
        {"type": "function_call", "call_id": "c1", "name": "add", "arguments": '{"a": 2}'},
        {"type": "function_call_output", "call_id": "c1", "output": "4"},
    ]
    expected = (
        (3 + o200k("user") + 7)
        + (3 + o200k("function_call") + o200k("c1") + o200k("add") + 1 + o200k('{"a": 2}'))
        + (3 + o200k("function_call_output") + o200k("c1") + o200k("4"))
        + 3
    )
    assert estimate_input_tokens("gpt-4o", items) == expected


# --------------------------------------------------------------------------- bad input


def test_messages_must_be_a_list() -> None:
    with pytest.raises(InvalidArgumentType, match=r"messages must be a list.*got str"):
        estimate_input_tokens("gpt-4o", "hello")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentType, match=r"messages must be a list.*got dict"):
        estimate_input_tokens("gpt-4o", {"role": "user", "content": "hi"})  # type: ignore[arg-type]


def test_message_must_be_a_dict() -> None:
    with pytest.raises(InvalidArgumentType, match=r"messages\[1\] must be a dict, got str"):
        estimate_input_tokens("gpt-4o", [{"role": "user", "content": "hi"}, "oops"])


def test_int_content_names_its_place() -> None:
    msgs = [{"role": "user", "content": "hi"}] * 3 + [{"role": "user", "content": 42}]
    with pytest.raises(InvalidArgumentType) as info:
        estimate_input_tokens("gpt-4o", msgs)
    assert str(info.value) == (
        "messages[3].content must be a string, a list of parts or null, got int"
    )
    # Usable by callers that only know the ValueError/TypeError contract.
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    ("messages", "exc", "pattern"),
    [
        ([{"content": "hi"}], InvalidArgument, r"messages\[0\] has no role"),
        (
            [{"role": 1, "content": "hi"}],
            InvalidArgumentType,
            r"messages\[0\]\.role must be a string",
        ),
        (
            [{"role": "", "content": "hi"}],
            InvalidArgument,
            r"messages\[0\]\.role must not be empty",
        ),
        (
            [{"role": "user", "name": 7}],
            InvalidArgumentType,
            r"messages\[0\]\.name must be a string",
        ),
        (
            [{"role": "user", "content": ["hi"]}],
            InvalidArgumentType,
            r"messages\[0\]\.content\[0\] must be a dict, got str",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            InvalidArgumentType,
            r"messages\[0\]\.content\[0\]\.text must be a string, got int",
        ),
        (
            [{"role": "assistant", "tool_calls": {"id": "x"}}],
            InvalidArgumentType,
            r"messages\[0\]\.tool_calls must be a list, got dict",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": "f"}]}],
            InvalidArgumentType,
            r"messages\[0\]\.tool_calls\[0\]\.function must be a dict, got str",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "content": [{"type": "text", "text": None}]}
                    ],
                }
            ],
            InvalidArgumentType,
            r"messages\[0\]\.content\[0\]\.content\[0\]\.text must be a string, got null",
        ),
    ],
)
def test_bad_messages(messages: list, exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        estimate_input_tokens("gpt-4o", messages)


@pytest.mark.parametrize(
    ("model", "exc"),
    [
        ("", InvalidArgument),
        ("   ", InvalidArgument),
        ("openai/", InvalidArgument),
        (None, InvalidArgumentType),
        (4, InvalidArgumentType),
    ],
)
def test_bad_model(model: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="model"):
        estimate_input_tokens(model, [{"role": "user", "content": "hi"}])  # type: ignore[arg-type]
    with pytest.raises(exc, match="model"):
        count_text_tokens(model, "hi")  # type: ignore[arg-type]
    with pytest.raises(exc, match="model"):
        tokenizer_for(model)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tools", "pattern"),
    [
        ("get_weather", r"tools must be a list of dicts or None, got str"),
        (["get_weather"], r"tools\[0\] must be a dict, got str"),
        ([{"type": "function", "function": "f"}], r"tools\[0\]\.function must be a dict"),
        ([{"type": "function", "function": {"description": "x"}}], r"tools\[0\]\.function\.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"properties": []}}}],
            r"tools\[0\]\.function\.parameters\.properties must be a dict, got list",
        ),
        (
            [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"properties": {"a": 1}}},
                }
            ],
            r"tools\[0\]\.function\.parameters\.properties\.a must be a dict, got int",
        ),
    ],
)
def test_bad_tools(tools: object, pattern: str) -> None:
    with pytest.raises(InvalidArgumentType, match=pattern):
        estimate_input_tokens("gpt-4o", WEATHER_MESSAGES, tools=tools)  # type: ignore[arg-type]


def test_bad_prompt_system_and_text() -> None:
    with pytest.raises(InvalidArgumentType, match="prompt must be a string"):
        estimate_input_tokens("gpt-4o", prompt=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentType, match=r"prompt\[1\] must be a string, got int"):
        estimate_input_tokens("gpt-4o", prompt=["a", 3])  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentType, match="system must be a string"):
        estimate_input_tokens("gpt-4o", system=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentType, match=r"system\[0\] must be a dict"):
        estimate_input_tokens("gpt-4o", system=["be terse"])
    with pytest.raises(InvalidArgumentType, match="text must be a string, got bytes"):
        count_text_tokens("gpt-4o", b"hi")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentType, match="text must be a string"):
        tokenizer_for("gpt-4o").count(None)  # type: ignore[arg-type]
