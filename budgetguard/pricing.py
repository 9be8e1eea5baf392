"""Model prices as integers, and the cost of a request in nano-USD.

Default prices come from the ``genai-prices`` package (a maintained, dated price
database shipped with its data); ``models:`` in limits.yaml overrides or adds on top.
Each model resolves once per process into a :class:`ModelPrice` whose rates are
integer nano-USD per million tokens, so pricing a call is integer arithmetic only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Any

from .usage import Usage

if TYPE_CHECKING:
    from .config import ModelOverride

__all__ = ["NANO_PER_USD", "ModelPrice", "Pricebook", "Rate", "nano_to_usd", "usd_to_nano"]

log = logging.getLogger("budgetguard.pricing")

NANO_PER_USD = 1_000_000_000
_MTOK = 1_000_000


def usd_to_nano(usd: Decimal | int | str) -> int:
    """USD (Decimal, never float) to integer nano-USD, rounded up."""
    return int((Decimal(usd) * NANO_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def nano_to_usd(nano: int) -> Decimal:
    # Exact: a power-of-ten division stays well inside Decimal's 28 digits.
    return Decimal(nano) / NANO_PER_USD


@dataclass(frozen=True, slots=True)
class Rate:
    """A price in nano-USD per million tokens, possibly tiered by the request's input size.

    Tiers follow the providers' "cliff" rule: once the input exceeds a tier's start,
    every token of the request pays that tier's rate.
    """

    base: int
    tiers: tuple[tuple[int, int], ...] = ()  # (start, rate) ascending by start

    def at(self, input_tokens: int) -> int:
        rate = self.base
        for start, tier_rate in self.tiers:
            if input_tokens > start:
                rate = tier_rate
        return rate


@dataclass(frozen=True, slots=True)
class ModelPrice:
    model: str
    input: Rate
    output: Rate
    cached_input: Rate
    cache_write: Rate
    reasoning: Rate
    source: str
    provider: str | None = None

    def estimate_nano(self, input_tokens: int, max_output_tokens: int) -> int:
        """Worst case: every input token uncached, every output token at the dearer output rate."""
        out_rate = max(self.output.at(input_tokens), self.reasoning.at(input_tokens))
        return _ceil_mtok(input_tokens * self.input.at(input_tokens) + max_output_tokens * out_rate)

    def cost_nano(self, usage: Usage) -> int:
        """The actual cost of a call, rounded up to the next nano-USD."""
        return self.cost_parts_nano(usage)[1]

    def cost_parts_nano(self, usage: Usage) -> tuple[int, int]:
        """(the input's cost, the whole cost), each rounded up to the next nano-USD."""
        n = usage.input_tokens
        plain_input = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
        plain_output = usage.output_tokens - usage.reasoning_tokens
        input_part = (plain_input * self.input.at(n) + usage.cached_input_tokens * self.cached_input.at(n)
                      + usage.cache_write_tokens * self.cache_write.at(n))
        output_part = plain_output * self.output.at(n) + usage.reasoning_tokens * self.reasoning.at(n)
        return _ceil_mtok(input_part), _ceil_mtok(input_part + output_part)

    def snapshot(self) -> dict[str, str]:
        """The per-MTok USD prices, for explaining a cost later."""
        return {
            "input_per_mtok": str(nano_to_usd(self.input.base)),
            "output_per_mtok": str(nano_to_usd(self.output.base)),
            "cached_input_per_mtok": str(nano_to_usd(self.cached_input.base)),
            "cache_write_per_mtok": str(nano_to_usd(self.cache_write.base)),
            "reasoning_per_mtok": str(nano_to_usd(self.reasoning.base)),
            "source": self.source,
        }


def _ceil_mtok(nano_times_mtok: int) -> int:
    return -(-nano_times_mtok // _MTOK)


def _rate(value: Any) -> Rate | None:
    """A genai-prices value (Decimal or TieredPrices) or a config Decimal as a :class:`Rate`."""
    if value is None:
        return None
    tiers = getattr(value, "tiers", None)
    if tiers is None:
        return Rate(usd_to_nano(value))
    return Rate(usd_to_nano(value.base), tuple((t.start, usd_to_nano(t.price)) for t in tiers))


def _library_prices(model: str) -> tuple[str, dict[str, Rate | None]] | None:
    from genai_prices import data_snapshot

    try:
        provider, info = data_snapshot.get_snapshot().find_provider_model(model, None, None, None)
    except LookupError:
        return None
    prices = info.get_prices(datetime.now(UTC))
    return f"genai-prices:{provider.id}/{info.id}", {
        "input": _rate(prices.input_mtok),
        "output": _rate(prices.output_mtok),
        "cached_input": _rate(prices.cache_read_mtok),
        "cache_write": _rate(prices.cache_write_mtok),
    }


class Pricebook:
    """Resolves a model name to a :class:`ModelPrice` once, then serves it from memory."""

    def __init__(self, overrides: Mapping[str, ModelOverride] | None = None) -> None:
        self._overrides = dict(overrides or {})
        self._cache: dict[str, ModelPrice | None] = {}
        self._lock = threading.Lock()

    def resolve(self, model: str) -> ModelPrice | None:
        """The model's price, or None when neither limits.yaml nor the library knows it."""
        try:
            return self._cache[model]
        except KeyError:
            pass
        price = self._build(model)
        # Model names can come from clients: remember misses only up to a bound.
        if price is not None or len(self._cache) < 10_000:
            with self._lock:
                self._cache[model] = price
        return price

    def _build(self, model: str) -> ModelPrice | None:
        found = _library_prices(model)
        source, rates = found if found else ("limits.yaml", {})
        provider = source.split(":", 1)[1].split("/", 1)[0] if found else None
        override = self._overrides.get(model)
        if override is not None:
            for field, attr in (
                ("input", "input_per_mtok"),
                ("output", "output_per_mtok"),
                ("cached_input", "cached_input_per_mtok"),
                ("cache_write", "cache_write_per_mtok"),
                ("reasoning", "reasoning_per_mtok"),
            ):
                value = getattr(override, attr)
                if value is not None:
                    rates[field] = Rate(usd_to_nano(value))
            if found:
                source += "+limits.yaml"
        if rates.get("input") is None or rates.get("output") is None:
            return None
        input_rate, output_rate = rates["input"], rates["output"]
        assert input_rate is not None and output_rate is not None
        # Without a published discount, cached and cache-write input cost what input costs,
        # and reasoning tokens are billed as output (every major provider does so).
        return ModelPrice(
            model=model,
            input=input_rate,
            output=output_rate,
            cached_input=rates.get("cached_input") or input_rate,
            cache_write=rates.get("cache_write") or input_rate,
            reasoning=rates.get("reasoning") or output_rate,
            source=source,
            provider=provider,
        )
