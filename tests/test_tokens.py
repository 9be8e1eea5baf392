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
import random
from fractions import Fraction

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
from hypothesis import event, given, settings
from hypothesis import strategies as st

from budgetguard import tokens
from budgetguard.errors import InvalidArgument, InvalidArgumentType
from budgetguard.tokens import (
    CHUNK_CHARS,
    HARD_CUT_MARGIN,
    IMAGE_TOKENS,
    SOFT_CUT_MARGIN,
    Tokenizer,
    count_text_tokens,
    estimate_input_tokens,
    input_size,
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
    monkeypatch.setattr(tokens, "_BUNDLED", {})  # as if the shipped rank files were gone
    tokens._clear_caches()
    yield
    tokens._clear_caches()


@pytest.fixture
def no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """No tiktoken cache and no network, but the rank files shipped in the package."""

    def no_network(blobpath: str) -> bytes:
        raise ConnectionError(f"offline: {blobpath}")

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    tokens._clear_caches()
    yield
    tokens._clear_caches()


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_shipped_encodings_are_tiktokens_own(name: str) -> None:
    # Regex, special tokens and ranks must be exactly what tiktoken builds (from the test
    # cache), or the shipped copy would count differently from the real tokenizer.
    shipped = tokens._bundled_encoding(name)
    real = tiktoken.get_encoding(name)
    assert shipped is not None
    assert shipped._pat_str == real._pat_str
    assert shipped._special_tokens == real._special_tokens
    assert shipped._mergeable_ranks == real._mergeable_ranks
    assert shipped.encode(COOKBOOK_TEXT, disallowed_special=()) == real.encode(COOKBOOK_TEXT, disallowed_special=())


COOKBOOK_TEXT = "tiktoken is great! お誕生日おめでとう 2 + 2 = 4 <|endoftext|>"


def test_estimates_are_right_without_cache_or_network(no_cache, caplog) -> None:
    # A 9,000-character prompt is about 1,700 tokens; counted as bytes it would be ~9,000
    # and trip an 8,000-token input cap.
    caplog.set_level(logging.WARNING, logger="budgetguard.tokens")
    text = " ".join(random.Random(1).choice(["budget", "reserved", "before", "the", "call"]) for _ in range(1500))
    for model in ("gpt-4o-mini", "gpt-4"):
        tok = tokenizer_for(model)
        assert tok.encoding_name in ("o200k_base", "cl100k_base")
        assert count_text_tokens(model, text) < len(text) / 3
    assert tokens.load_problems([("gpt-4o", None), ("claude-3-opus", None), ("gpt-4", None)]) == []
    assert not [r for r in caplog.records if r.name == "budgetguard.tokens"]


def test_load_problems_names_what_fell_back_in_one_line(no_cache, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="budgetguard.tokens")
    assert tokens.load_problems([("my-finetune", "p50k_base"), ("other", "p50k_base"), ("gpt-4o", None)]) == [
        "p50k_base"
    ]
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "budgetguard.tokens"]
    assert "\n" not in warning and len(warning) < 300
    assert "p50k_base" in warning and "TIKTOKEN_CACHE_DIR" in warning and "offline:" not in warning


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
    real = tokens._bundled_encoding  # the shipped encodings come first, then tiktoken's
    calls: list[str] = []

    def spy(name: str):
        calls.append(name)
        return real(name)

    tokens._clear_caches()
    monkeypatch.setattr(tokens, "_bundled_encoding", spy)
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


# --------------------------------------------------------------------------- long texts

MB = 1_000_000
ENCODINGS = {"gpt-4o": O200K, "gpt-4": CL100K}


def whole(enc: tiktoken.Encoding, text: str) -> int:
    return len(enc.encode(text, disallowed_special=()))


def longest_run_token(enc: tiktoken.Encoding, char: str) -> int:
    """The longest run of ``char`` that is a single token of ``enc`` (lengths have gaps)."""
    longest = 0
    for k in range(1, 1025):
        try:
            enc.encode_single_token(char * k)
        except KeyError:
            continue
        longest = k
    return longest


def whole_or_lower_bound(enc: tiktoken.Encoding, text: str) -> int:
    """tiktoken's count of the whole text or, where tiktoken raises on it (a run of ~1M
    spaces or tabs), a lower bound of the count it would give: a run of one character
    splits into tokens of that character, none longer than the longest such token."""
    try:
        return whole(enc, text)
    except ValueError:
        run = text.removesuffix("end")
        assert len(set(run)) == 1, "the bound holds for a run of one character"
        return len(run) // longest_run_token(enc, run[0])


def _mixed_whitespace(n: int) -> str:
    rng = random.Random(7)
    return "".join(rng.choice(" \t\n\r\xa0\u3000") for _ in range(n))


BIG_WHITESPACE = {
    "spaces": " " * MB,
    "tabs": "\t" * MB,
    "newlines": "\n" * MB,
    "mixed": _mixed_whitespace(MB),
    "spaces then a word": " " * MB + "end",
}


@pytest.mark.parametrize("model", list(ENCODINGS))
@pytest.mark.parametrize("kind", list(BIG_WHITESPACE))
def test_a_megabyte_of_whitespace_is_estimated_not_raised(model: str, kind: str) -> None:
    # Counted whole, tiktoken raises on spaces and tabs (o200k_base) and on spaces then a
    # word (both): "ValueError: Regex error ... Max stack size exceeded for backtracking".
    text = BIG_WHITESPACE[kind]
    floor = whole_or_lower_bound(ENCODINGS[model], text)
    overhead = estimate_input_tokens(model, [{"role": "user", "content": ""}])
    as_chat = estimate_input_tokens(model, [{"role": "user", "content": text}])
    as_prompt = estimate_input_tokens(model, prompt=text)
    assert isinstance(as_chat, int) and isinstance(as_prompt, int)
    assert floor <= as_prompt <= len(text.encode("utf-8"))
    assert as_chat == overhead + as_prompt


def test_a_megabyte_of_whitespace_for_other_families_and_system_prompts() -> None:
    text = BIG_WHITESPACE["tabs"]
    counted = count_text_tokens("gpt-4o", text)
    assert count_text_tokens("claude-3-5-sonnet", text) == math.ceil(counted * 1.25)
    system = [{"type": "text", "text": text}]
    assert estimate_input_tokens("claude-3-5-sonnet", system=system) >= counted
    assert tokenizer_for("gpt-4o").count(" " * MB) >= whole_or_lower_bound(O200K, " " * MB)


def test_texts_up_to_the_chunk_size_are_counted_whole() -> None:
    rng = random.Random(3)
    words = ["budget", "token", "guard", "reserve", "settle", "over", "under", "count", "call"]
    prose = " ".join(rng.choice(words) for _ in range(CHUNK_CHARS))[:CHUNK_CHARS]
    for text in (prose, "a" * CHUNK_CHARS, " " * CHUNK_CHARS):
        assert len(text) == CHUNK_CHARS
        assert count_text_tokens("gpt-4o", text) == whole(O200K, text)
        assert count_text_tokens("gpt-4", text) == whole(CL100K, text)


def test_prose_is_cut_only_at_piece_boundaries_and_counted_exactly() -> None:
    rng = random.Random(4)
    words = ["The", "guard", "reserves,", "settles", "and", "(sometimes)", "denies:", "42", "calls\nper", "minute."]
    text = " ".join(rng.choice(words) for _ in range(20_000))
    cuts = tokens._cuts(text, CHUNK_CHARS)
    assert len(cuts) > 10 and not any(hard for _, hard in cuts)
    for model, enc in ENCODINGS.items():
        assert count_text_tokens(model, text) == whole(enc, text) + SOFT_CUT_MARGIN * len(cuts)


def _sample_texts(n: int) -> dict[str, str]:
    """Texts of about ``n`` characters of very different shapes, reproducibly."""
    rng = random.Random(n)
    words = ["the", "budget", "Guard", "reserves", "tokens,", "42", "(ok)", "naïve", "日本語", "😀"]
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    runs: list[str] = []
    while sum(map(len, runs)) < n:
        runs.append(rng.choice([" ", "\t", "\n", "a", "x1", "~", "\u3000"]) * rng.randint(1, 3 * CHUNK_CHARS // 4))
        runs.append(rng.choice(words))
    code = "".join(
        "    " * rng.randint(0, 4) + f"value_{i} = compute(items[{i}], key='{rng.choice(words)}')\n"
        for i in range(n // 40)
    )
    texts = {
        "prose": " ".join(rng.choice(words) for _ in range(n // 5)),
        "code": code,
        "base64": "".join(rng.choice(b64) for _ in range(n)),
        "base64 lines": "\n".join("".join(rng.choice(b64) for _ in range(76)) for _ in range(n // 77)),
        "one word": "a" * n,
        "runs of whitespace and words": "".join(runs),
        "unicode": "".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(n)),
        "cjk": "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(n)),
        "json": json.dumps([{"id": i, "v": rng.random()} for i in range(n // 30)], separators=(",", ":")),
    }
    return {k: v[:n] for k, v in texts.items()}


# A hard cut merges the halves of one regex piece separately; that can cost a few tokens
# more than the whole piece (up to 5 measured for a single cut, in runs of "~" or "/").
HARD_CUT_SLACK = 8


def assert_chunked_close(enc: tiktoken.Encoding, text: str, size: int, counted: int, label: str = "") -> None:
    reference = whole(enc, text)
    cuts = tokens._cuts(text, size)
    hard = sum(1 for _, is_hard in cuts if is_hard)
    margins = SOFT_CUT_MARGIN * (len(cuts) - hard) + HARD_CUT_MARGIN * hard
    assert counted >= reference, f"{label}: below the whole text's count"
    if hard:
        assert counted <= reference + margins + HARD_CUT_SLACK * hard, label
    else:  # soft cuts are exact: only the margins come on top
        assert counted == reference + margins, label


@pytest.mark.parametrize(
    "length",
    [CHUNK_CHARS - 1, CHUNK_CHARS + 1, CHUNK_CHARS + CHUNK_CHARS // 2, 2 * CHUNK_CHARS + 7, 5 * CHUNK_CHARS + 3],
)
def test_chunked_count_is_close_to_and_never_below_the_whole_count(length: int) -> None:
    for kind, text in _sample_texts(length).items():
        for model, enc in ENCODINGS.items():
            counted = tokenizer_for(model)._raw(text)
            assert_chunked_close(enc, text, CHUNK_CHARS, counted, f"{kind} on {model}")


def test_cuts_make_bounded_pieces_and_soft_cuts_fall_between_text_and_whitespace() -> None:
    for length in (CHUNK_CHARS + 1, 7 * CHUNK_CHARS + 5):
        for kind, text in _sample_texts(length).items():
            cuts = tokens._cuts(text, CHUNK_CHARS)
            start = 0
            for pos, hard in cuts:
                if hard:
                    assert pos - start == CHUNK_CHARS, kind
                else:  # in the piece's second half, after non-whitespace, before whitespace
                    assert CHUNK_CHARS // 2 < pos - start <= CHUNK_CHARS, kind
                    assert not text[pos - 1].isspace() and text[pos].isspace(), kind
                start = pos
            assert 0 < len(text) - start <= CHUNK_CHARS, kind


# Runs of characters whose tokenization is easy to disturb: every kind of whitespace
# (including \x1c, which str.isspace() accepts but tiktoken does not), letters, marks,
# digits, punctuation runs, contractions, CJK, emoji, a lone surrogate, special-token text.
ATOMS = [
    " ", "  ", "\t", "\n", "\r\n", "\r", "\xa0", "\u3000", "\u2028", "\x1c", "\x0b",
    "a", "Z", "word", " the", "Hello", "e\u0301", "7", "12345", "²", "!", "...", "/", "~~",
    "'s", "'", "漢字", "😀", "👍🏽", "\ud800", "<|endoftext|>", "_", "-=",
]
runs_of_atoms = st.lists(
    st.tuples(st.sampled_from(ATOMS), st.integers(1, 40)), max_size=30
).map(lambda runs: "".join(atom * k for atom, k in runs))
# Words between whitespace, as in prose and code: mostly soft cuts.
WORDS = ["a", "the", "Token", "naïve", "it's", "42", "3.14", "(x)", "foo_bar", "日本", "😀", "e\u0301", "--"]
SEPARATORS = [" ", "  ", "\t", "\n", " \n", "\n\n    ", "\r\n", "\u3000", "\xa0"]
words_and_whitespace = st.lists(
    st.tuples(st.lists(st.sampled_from(WORDS), min_size=1, max_size=4), st.sampled_from(SEPARATORS)),
    max_size=80,
).map(lambda items: "".join("".join(word) + sep for word, sep in items))


@settings(max_examples=400, deadline=None)
@given(
    text=st.one_of(runs_of_atoms, words_and_whitespace, st.text(max_size=600)),
    size=st.sampled_from([16, 24, 32, 64, 128, 256]),
    model=st.sampled_from(list(ENCODINGS)),
)
def test_chunking_never_under_counts(text: str, size: int, model: str) -> None:
    enc = ENCODINGS[model]
    kinds = {"hard" if hard else "soft" for _, hard in tokens._cuts(text, size)}
    event("cuts: " + (" and ".join(sorted(kinds)) or "none"))
    assert_chunked_close(enc, text, size, tokens._count_chunked(enc, text, size))


@pytest.fixture
def broken_tiktoken(monkeypatch: pytest.MonkeyPatch):
    """Make tiktoken raise ``exc`` on every encode, with the warning not given yet."""

    def install(exc: BaseException) -> None:
        def encode(self, text, **kwargs):
            raise exc

        monkeypatch.setattr(tiktoken.Encoding, "encode", encode)
        monkeypatch.setattr(tokens, "_encode_warned", False)

    return install


# pyo3 reports a Rust panic as pyo3_runtime.PanicException, a BaseException only.
PanicException = type("PanicException", (BaseException,), {"__module__": "pyo3_runtime"})


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("Regex error while tokenizing: Max stack size exceeded for backtracking"),
        RuntimeError("unexpected"),
        PanicException("called `Result::unwrap()` on an `Err` value"),
    ],
    ids=["ValueError", "RuntimeError", "PanicException"],
)
def test_a_tokenizer_failure_counts_bytes_warns_once_and_never_raises(
    broken_tiktoken, caplog, exc: BaseException
) -> None:
    broken_tiktoken(exc)
    caplog.set_level(logging.WARNING, logger="budgetguard.tokens")
    short, long = "héllo wörld", "héllo wörld " * CHUNK_CHARS
    assert count_text_tokens("gpt-4o", short) == utf8(short)
    assert count_text_tokens("gpt-4", long) >= utf8(long)
    assert count_text_tokens("claude-3-opus", short) == math.ceil(utf8(short) * 1.25)
    messages = [{"role": "user", "content": short}]
    # "user" may already be remembered with its real count (1) from an earlier estimate.
    assert estimate_input_tokens("gpt-4o", messages) >= 3 + 1 + utf8(short) + 3
    warnings = [r for r in caplog.records if r.name == "budgetguard.tokens"]
    assert len(warnings) == 1
    assert type(exc).__name__ in warnings[0].getMessage()
    assert "UTF-8 byte" in warnings[0].getMessage()


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(1)])
def test_interrupts_are_not_swallowed(broken_tiktoken, exc: BaseException) -> None:
    broken_tiktoken(exc)
    with pytest.raises(type(exc)):
        count_text_tokens("gpt-4o", "hello")
    with pytest.raises(type(exc)):
        count_text_tokens("gpt-4o", "hello " * CHUNK_CHARS)


# --------------------------------------------------------------------------- input_size


def test_input_size_of_typical_requests() -> None:
    assert input_size() == 0
    # list 1 + dict 1 + "role" 4 + "user" 4 + "content" 7 + "hello" 5
    assert input_size([{"role": "user", "content": "hello"}]) == 22
    assert input_size(prompt="tiktoken is great!") == 18
    assert input_size(prompt=["ab", "cde"]) == 1 + 2 + 3
    assert input_size(system="be terse") == 8

    texts = [m["content"] for m in COOKBOOK_MESSAGES] + [m.get("name", "") for m in COOKBOOK_MESSAGES]
    size = input_size(COOKBOOK_MESSAGES, WEATHER_TOOLS, system="be terse")
    assert sum(map(len, texts)) + len("be terse") < size < 2 * len(json.dumps(COOKBOOK_MESSAGES + WEATHER_TOOLS))

    big = "word " * 50_000
    assert input_size([{"role": "user", "content": [{"type": "text", "text": big}]}]) >= len(big)
    assert input_size(system=[{"type": "text", "text": big}]) >= len(big)
    assert input_size(tools=[{"name": "t", "input_schema": {"description": big}}]) >= len(big)


def test_input_size_skips_image_payloads_but_not_other_blobs() -> None:
    url = "data:image/png;base64," + "A" * MB
    image_parts = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "input_image", "image_url": url},
        {"type": "image", "source": {"type": "base64", "data": url}},
    ]
    messages = [{"role": "user", "content": image_parts}]
    assert input_size(messages) < 100
    assert input_size(system=image_parts) < 100
    tool_result = [{"type": "tool_result", "tool_use_id": "t", "content": image_parts}]
    assert input_size([{"role": "user", "content": tool_result}]) < 200
    # Counted as JSON by the estimate, so tokenized: a document, an image outside a part list.
    document = {"type": "document", "source": {"type": "base64", "data": url}}
    assert input_size([{"role": "user", "content": [document]}]) > MB
    assert input_size([{"role": "user", "content": "x", "extra": image_parts[0]}]) > MB


class ExplodingDict(dict):
    def get(self, *args):
        raise RuntimeError("no")


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_input_size_never_raises_and_stays_bounded() -> None:
    deep: list = []
    node = deep
    for _ in range(200_000):  # far deeper than any recursion limit
        node.append([])
        node = node[0]
    cycle: dict = {"role": "user"}
    cycle["content"] = [cycle, cycle]
    gen = (c for c in "abc")
    odd = [
        5, 3.5, True, None, b"bytes", bytearray(b"xy"), object(), Unprintable(), gen,
        {1: "int key", (1, 2): "tuple key", None: [1, 2]}, {"type": ["unhashable"]},
        ExplodingDict(role="user"), 10**5000, "x" * 10,
    ]
    for value in (5, "text", object(), gen, deep, cycle, [cycle], odd, {"not": "a list"}):
        for where in ("messages", "tools", "prompt", "system"):
            assert isinstance(input_size(**{where: value}), int)
    assert next(gen) == "a"  # iterators are not consumed
    assert input_size(prompt=[10**5000]) > 5000  # digits, without building the string
    # More values than the walk looks at: reported as big, whatever the text.
    assert input_size(prompt=list(range(100_000))) >= 320_000
    assert input_size([cycle]) >= 320_000
    many = [{"role": "user", "content": "hi"}] * 20_000
    assert input_size(many) >= 320_000
    assert input_size(many, limit=10**7) >= 10**7


def test_input_size_stops_at_the_limit() -> None:
    messages = [{"role": "user", "content": "x" * 1000} for _ in range(100)]
    full = input_size(messages)
    assert full > 100_000
    assert 5_000 <= input_size(messages, limit=5_000) < full
    assert input_size(messages, limit=10 * full) == full


def test_a_burst_on_a_cold_process_loads_an_encoding_once(monkeypatch):
    import threading

    from budgetguard import tokens

    tokens._clear_caches()
    loads = []
    real = tokens._bundled_encoding

    def counted(name):
        loads.append(name)
        return real(name)

    monkeypatch.setattr(tokens, "_bundled_encoding", counted)
    gate = threading.Barrier(16)

    def call():
        gate.wait()
        tokens.estimate_input_tokens("gpt-4o", [{"role": "user", "content": "hello"}])

    workers = [threading.Thread(target=call) for _ in range(16)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert loads == ["o200k_base"]
    tokens._clear_caches()
