"""What a usage event says about a call besides its tokens: finish reason, streamed,
endpoint and the provider's usage object as reported. Pure functions, no I/O.

:func:`details_from_response` reads an OpenAI (chat, completions, Responses), Anthropic
or Gemini response, as an SDK object or a mapping. Nothing here is required: a shape it
does not know gives empty details, never an error.

* ``finish_reason``: the provider's reason, except that every spelling of "the output
  cap cut it short" (OpenAI ``length``, Anthropic ``max_tokens``, Gemini ``MAX_TOKENS``,
  Responses ``incomplete`` for ``max_output_tokens``) is ``length``, so one value counts
  truncations across providers. With several choices, ``length`` if any was cut.
* ``raw_usage``: the response's usage object (``usage``, or Gemini's ``usageMetadata``)
  as plain JSON: numbers, booleans, short strings and nested objects of them, at most
  :data:`MAX_RAW_USAGE` characters (else left out). Usage objects carry counts, never
  prompt or completion text; strings are cut to 64 characters all the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_RAW_USAGE", "CallDetails", "details_from_response"]

MAX_RAW_USAGE = 4096
_MAX_TEXT = 64
_MAX_DEPTH = 4
_MAX_ITEMS = 64
_TRUNCATED = frozenset({"length", "max_tokens", "MAX_TOKENS", "max_output_tokens"})


@dataclass(frozen=True, slots=True)
class CallDetails:
    finish_reason: str | None = None
    streamed: bool | None = None
    endpoint: str | None = None
    raw_usage: dict[str, Any] | None = None

    def merged(self, given: CallDetails | None) -> CallDetails:
        """These details with the set (non-None) values of ``given`` in their place, bounded:
        texts cut to 64 characters, a finish reason spelled as :func:`details_from_response`
        spells it, a usage object made plain JSON (or dropped when too large)."""
        if given is None:
            return self
        if given.streamed is not None and not isinstance(given.streamed, bool):
            raise TypeError("CallDetails.streamed must be a bool or None")
        endpoint = given.endpoint if given.endpoint is None else str(given.endpoint)[:_MAX_TEXT]
        raw = None if given.raw_usage is None else _bounded(_plain(given.raw_usage))
        return CallDetails(
            finish_reason=_reason(given.finish_reason) or self.finish_reason,
            streamed=self.streamed if given.streamed is None else given.streamed,
            endpoint=endpoint or self.endpoint,
            raw_usage=raw if raw is not None else self.raw_usage,
        )


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _reason(value: Any) -> str | None:
    if value is None:
        return None
    text = getattr(value, "name", value) if not isinstance(value, str) else value  # Gemini enums
    if not isinstance(text, str) or not text:
        return None
    return "length" if text in _TRUNCATED else text[:_MAX_TEXT]


def _finish_reason(obj: Any) -> str | None:
    choices = _get(obj, "choices")
    if isinstance(choices, list | tuple) and choices:
        reasons = [_reason(_get(c, "finish_reason")) for c in choices[:_MAX_ITEMS]]
        return "length" if "length" in reasons else reasons[0]
    candidates = _get(obj, "candidates")
    if isinstance(candidates, list | tuple) and candidates:
        first = candidates[0]
        return _reason(_get(first, "finishReason") or _get(first, "finish_reason"))
    stop = _get(obj, "stop_reason")  # Anthropic
    if stop is not None:
        return _reason(stop)
    status = _get(obj, "status")  # Responses
    if status == "incomplete":
        return _reason(_get(_get(obj, "incomplete_details"), "reason")) or "incomplete"
    if status == "completed" and _get(obj, "output") is not None:
        return "stop"
    return None


def _plain(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value[:_MAX_TEXT]
    if depth >= _MAX_DEPTH:
        return None
    if hasattr(value, "model_dump") and not isinstance(value, Mapping):
        try:
            value = value.model_dump()
        except Exception:
            return None
    if isinstance(value, Mapping):
        return {str(k)[:_MAX_TEXT]: _plain(v, depth + 1) for k, v in list(value.items())[:_MAX_ITEMS]}
    if isinstance(value, list | tuple):
        return [_plain(v, depth + 1) for v in value[:_MAX_ITEMS]]
    return None


def _raw_usage(obj: Any) -> dict[str, Any] | None:
    usage = _get(obj, "usage")
    if usage is None:
        usage = _get(obj, "usageMetadata") or _get(obj, "usage_metadata")
    if usage is None:
        return None
    return _bounded(_plain(usage))


def _bounded(plain: Any) -> dict[str, Any] | None:
    if not isinstance(plain, dict):
        return None
    return plain if len(json.dumps(plain, separators=(",", ":"))) <= MAX_RAW_USAGE else None


def details_from_response(obj: Any) -> CallDetails:
    """The finish reason and raw usage of a provider response; empty details for other objects."""
    if obj is None or isinstance(obj, str | bytes | int | float):
        return CallDetails()
    try:
        return CallDetails(finish_reason=_finish_reason(obj), raw_usage=_raw_usage(obj))
    except Exception:  # a foreign object whose attributes raise: the details are optional
        return CallDetails()
