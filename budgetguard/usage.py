"""Token usage of one LLM call, normalised across providers.

Providers count tokens differently. ``Usage`` follows OpenAI's convention:
``input_tokens`` is the whole input (cache reads and cache writes included) and
``output_tokens`` is the whole output (reasoning included); the other fields are
parts of those totals, never additions to them.

``Usage.from_response`` reads the usage of a provider response, given as an SDK
object (attributes are read, so no SDK needs to be installed) or as parsed JSON:

* OpenAI Chat Completions: ``usage.prompt_tokens`` / ``usage.completion_tokens``.
* OpenAI Responses: ``usage.input_tokens`` / ``usage.output_tokens`` together
  with ``usage.total_tokens`` or ``usage.input_tokens_details``.
  Both OpenAI APIs count ``cached_tokens`` and ``cache_write_tokens`` inside the
  input and ``reasoning_tokens`` inside the output.
* Anthropic Messages: ``usage.input_tokens`` / ``usage.output_tokens`` without
  those two fields. Anthropic leaves cache reads and writes out of
  ``input_tokens``, so they are added back; ``output_tokens_details.thinking_tokens``
  is part of ``output_tokens``.
* Gemini: ``usage_metadata`` (SDK) or ``usageMetadata`` (REST, camelCase).
  ``candidates_token_count`` leaves thoughts out, so they are added back.

Stream events that carry the final usage are accepted too: the last OpenAI chat
chunk (``stream_options.include_usage``), a Responses ``response.completed`` event
(any ``response.*`` event whose ``response`` has its usage), and Anthropic's
``message_delta`` event, whose usage is cumulative.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import InvalidArgument, InvalidArgumentType

__all__ = ["Usage"]

_ABSENT: Any = object()

# The usage part of a response, by provider: OpenAI and Anthropic, Gemini SDK, Gemini REST.
_USAGE_KEYS = ("usage", "usage_metadata", "usageMetadata")

# Gemini's usage fields, as the SDK names them and as the REST API spells them.
_GEMINI_FIELDS = {
    "prompt_token_count": "promptTokenCount",
    "tool_use_prompt_token_count": "toolUsePromptTokenCount",
    "cached_content_token_count": "cachedContentTokenCount",
    "candidates_token_count": "candidatesTokenCount",
    "thoughts_token_count": "thoughtsTokenCount",
}


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one call consumed.

    ``input_tokens`` counts the whole input, ``cached_input_tokens`` (read from a
    prompt cache) and ``cache_write_tokens`` (written to it) included.
    ``output_tokens`` counts the whole output, ``reasoning_tokens`` included.
    """

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0

    def __post_init__(self) -> None:
        for field in fields(self):
            check_token_count(getattr(self, field.name), f"Usage.{field.name}")
        _require_at_most(
            self.cached_input_tokens + self.cache_write_tokens,
            "Usage.cached_input_tokens + Usage.cache_write_tokens",
            self.input_tokens,
            "Usage.input_tokens",
        )
        _require_at_most(
            self.reasoning_tokens,
            "Usage.reasoning_tokens",
            self.output_tokens,
            "Usage.output_tokens",
        )

    @classmethod
    def from_response(cls, obj: object) -> Usage:
        """Read the usage of a provider response, of its usage part, or of a final stream event.

        ``obj`` may be a ``Usage`` (returned as is), an SDK object or a mapping.
        Raises ``InvalidArgument`` when no usage is found, a required field is missing
        or the counts contradict each other, and ``InvalidArgumentType`` when ``obj``
        or a count has the wrong type; each message names the field's path.
        """
        if isinstance(obj, Usage):
            return obj
        part, path = _locate_usage(obj, "")
        if (
            _field(part, "prompt_tokens") is not None
            or _field(part, "completion_tokens") is not None
        ):
            return _openai(part, path, "prompt_tokens", "completion_tokens")
        if _field(part, "input_tokens") is not None or _field(part, "output_tokens") is not None:
            if (
                _field(part, "total_tokens") is not None
                or _field(part, "input_tokens_details") is not None
            ):
                return _openai(part, path, "input_tokens", "output_tokens")
            return _anthropic(part, path)
        if any(_field(part, name) is not None for pair in _GEMINI_FIELDS.items() for name in pair):
            return _gemini(part, path)
        if isinstance(part, Mapping):
            keys = sorted(map(str, part))
            where = "the response" if part is obj else path
            raise InvalidArgument(
                f"no token usage found in {where}: none of its keys {keys} is known"
            )
        if part is obj:
            raise InvalidArgumentType(
                "Usage.from_response expects a Usage, a provider response, its usage part "
                f"or a final stream event (an SDK object or a mapping), got {type(obj).__name__}"
            )
        raise InvalidArgumentType(
            f"{path} must be a usage object or mapping, got {type(part).__name__}"
        )


def _field(obj: object, name: str, default: Any = None) -> Any:
    """``obj[name]`` for a mapping, ``obj.name`` otherwise; ``default`` when there is none."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


# No call bills this many tokens; a larger count is a bug upstream, and it keeps every
# cost far inside Redis' 64-bit counters.
MAX_TOKENS_PER_CALL = 1_000_000_000


def check_token_count(value: object, path: str, *, minimum: int = 0, maximum: int = MAX_TOKENS_PER_CALL) -> int:
    """``value`` as a token count in [minimum, maximum], or an error naming ``path``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentType(f"{path} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise InvalidArgument(f"{path} must be >= {minimum}, got {value}")
    if value > maximum:
        raise InvalidArgument(f"{path}={value} is absurd (more than {maximum:,} tokens in one call)")
    return value


def _count(obj: object, path: str, name: str, default: int | None = None) -> int:
    """The token count ``name`` of ``obj``; ``default`` if it is missing or None, else an error."""
    value = _field(obj, name)
    if value is None:
        if default is None:
            raise InvalidArgument(f"{path}.{name} is missing")
        return default
    return check_token_count(value, f"{path}.{name}")


def _require_at_most(part: int, part_path: str, whole: int, whole_path: str) -> None:
    if part > whole:
        raise InvalidArgument(f"{part_path} ({part}) must be <= {whole_path} ({whole})")


def _locate_usage(obj: object, prefix: str) -> tuple[Any, str]:
    """Find the usage part of ``obj`` and its path; ``obj`` itself when it has no usage field."""
    event_type = _field(obj, "type")
    response = _field(obj, "response")
    if isinstance(event_type, str) and event_type.startswith("response.") and response is not None:
        return _locate_usage(response, f"{prefix}response.")
    for key in _USAGE_KEYS:
        part = _field(obj, key, _ABSENT)
        if part is None:
            raise InvalidArgument(
                f"response carries no usage: {prefix}{key} is None (in a stream, only the final "
                "chunk or event carries it)"
            )
        if part is not _ABSENT:
            return part, prefix + key
    return obj, prefix + "usage"


def _openai(usage: object, path: str, input_name: str, output_name: str) -> Usage:
    """Chat Completions (prompt/completion_tokens) or Responses (input/output_tokens).

    Both count cache reads and writes inside the input and reasoning inside the output,
    with the breakdowns in ``<name>_details``.
    """
    input_tokens = _count(usage, path, input_name)
    output_tokens = _count(usage, path, output_name)
    in_path, out_path = f"{path}.{input_name}_details", f"{path}.{output_name}_details"
    in_details = _field(usage, f"{input_name}_details")
    cached = _count(in_details, in_path, "cached_tokens", default=0)
    written = _count(in_details, in_path, "cache_write_tokens", default=0)
    reasoning = _count(
        _field(usage, f"{output_name}_details"), out_path, "reasoning_tokens", default=0
    )
    _require_at_most(
        cached + written,
        f"{in_path}.cached_tokens + {in_path}.cache_write_tokens",
        input_tokens,
        f"{path}.{input_name}",
    )
    _require_at_most(
        reasoning, f"{out_path}.reasoning_tokens", output_tokens, f"{path}.{output_name}"
    )
    return Usage(input_tokens, output_tokens, cached, reasoning, written)


def _anthropic(usage: object, path: str) -> Usage:
    """Anthropic Messages: ``input_tokens`` leaves out cache reads and cache writes."""
    uncached = _count(usage, path, "input_tokens")
    read = _count(usage, path, "cache_read_input_tokens", default=0)
    written = _count(usage, path, "cache_creation_input_tokens", default=0)
    output_tokens = _count(usage, path, "output_tokens")
    details_path = f"{path}.output_tokens_details"
    thinking = _count(
        _field(usage, "output_tokens_details"), details_path, "thinking_tokens", default=0
    )
    _require_at_most(
        thinking, f"{details_path}.thinking_tokens", output_tokens, f"{path}.output_tokens"
    )
    return Usage(uncached + read + written, output_tokens, read, thinking, written)


def _gemini(metadata: object, path: str) -> Usage:
    """Gemini: the prompt count includes cached content; the candidates count leaves out thoughts.

    The REST API omits counts that are zero (a blocked prompt has no candidates count),
    so only ``prompt_token_count`` is required.
    """
    camel = isinstance(metadata, Mapping) and any(
        name in metadata for name in _GEMINI_FIELDS.values()
    )

    def name(snake: str) -> str:
        return _GEMINI_FIELDS[snake] if camel else snake

    def count(snake: str, default: int | None = None) -> int:
        return _count(metadata, path, name(snake), default)

    prompt = count("prompt_token_count")
    tool_prompt = count("tool_use_prompt_token_count", 0)
    cached = count("cached_content_token_count", 0)
    candidates = count("candidates_token_count", 0)
    thoughts = count("thoughts_token_count", 0)
    _require_at_most(
        cached,
        f"{path}.{name('cached_content_token_count')}",
        prompt,
        f"{path}.{name('prompt_token_count')}",
    )
    return Usage(prompt + tool_prompt, candidates + thoughts, cached, thoughts)
