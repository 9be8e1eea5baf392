"""Model prices as integers, and the cost of a request in nano-USD.

Default prices come from the ``genai-prices`` package (a maintained, dated price
database shipped with its data); ``models:`` in limits.yaml overrides or adds on top.
Each model resolves into a :class:`ModelPrice` whose rates are integer nano-USD per
million tokens, so pricing a call is integer arithmetic only.

Model names come from callers, so nothing keyed by a name grows without bound: the
models named in limits.yaml are kept for good, every other name (known to the library
or not) in a least-recently-used cache of :data:`PRICE_CACHE_SIZE` entries, and the
library is searched without its own per-name caches.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

from .usage import Usage

if TYPE_CHECKING:
    from genai_prices.types import ModelInfo, Provider

    from .config import ModelOverride

__all__ = ["NANO_PER_USD", "PRICE_CACHE_SIZE", "CacheInfo", "ModelPrice", "Pricebook", "Rate",
           "library_model_names", "nano_to_usd", "usd_to_nano"]

log = logging.getLogger("budgetguard.pricing")

NANO_PER_USD = 1_000_000_000
_MTOK = 1_000_000

#: How many names outside limits.yaml a :class:`Pricebook` remembers (hits and misses
#: alike). A deployment calls a few dozen models; the bound only matters when callers
#: send many distinct names, and then each costs one library search (about 0.1 ms).
PRICE_CACHE_SIZE = 4096


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


def _find_library_model(providers: list[Provider], ref: str) -> tuple[Provider, ModelInfo] | None:
    """What ``DataSnapshot.find_provider_model(ref, None, None, None)`` finds, without its caches.

    The snapshot memoizes every name it is asked about (hits and misses) in dicts that
    never shrink, so asking it about caller-given names would grow memory without bound.
    """
    ref = ref.lower()
    provider = next((p for p in providers if p.model_match is not None and p.model_match.is_match(ref)), None)
    if provider is None:
        return None
    model = provider.find_model(ref, all_providers=providers)
    return None if model is None else (provider, model)


def _library_prices(model: str) -> tuple[str, dict[str, Rate | None]] | None:
    from genai_prices import data_snapshot

    found = _find_library_model(data_snapshot.get_snapshot().providers, model)
    if found is None:
        return None
    provider, info = found
    prices = info.get_prices(datetime.now(UTC))
    return f"genai-prices:{provider.id}/{info.id}", {
        "input": _rate(prices.input_mtok),
        "output": _rate(prices.output_mtok),
        "cached_input": _rate(prices.cache_read_mtok),
        "cache_write": _rate(prices.cache_write_mtok),
    }


def _literals(clause: Any) -> Iterator[str]:
    """The exact names a library match clause accepts on its own. Patterns (starts_with,
    contains, regex) accept infinitely many names and contribute none; neither does an
    "and" clause, whose equals parts are narrowed by the others."""
    from genai_prices.types import ClauseEquals, ClauseOr

    if isinstance(clause, ClauseEquals):
        yield clause.equals
    elif isinstance(clause, ClauseOr):
        for child in clause.or_:
            yield from _literals(child)


# (the snapshot, its names). Two threads may compute it at once; both get the same set.
_names: tuple[object, frozenset[str]] | None = None


def library_model_names() -> frozenset[str]:
    """Every model name the pricing library lists by name, lowercased: model ids and the
    exact names their match rules accept. A finite set (a few thousand), computed once
    per price snapshot."""
    global _names
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    known = _names
    if known is not None and known[0] is snapshot:
        return known[1]
    names = frozenset(
        name.lower()
        for provider in snapshot.providers
        for info in provider.models
        for name in (info.id, *_literals(info.match))
    )
    _names = (snapshot, names)
    return names


class CacheInfo(NamedTuple):
    """The size of a :class:`Pricebook`'s cache of names outside limits.yaml."""

    maxsize: int
    currsize: int


class Pricebook:
    """Resolves a model name to a :class:`ModelPrice`, then serves it from memory.

    Names in limits.yaml (a finite set) are kept for good; any other name, which may come
    from a caller, lives in an LRU cache of ``cache_size`` entries, so that a stream of
    distinct names costs a bounded amount of memory.
    """

    def __init__(self, overrides: Mapping[str, ModelOverride] | None = None, *,
                 cache_size: int = PRICE_CACHE_SIZE) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._overrides = dict(overrides or {})
        self._configured: dict[str, ModelPrice | None] = {}
        self._cache: OrderedDict[str, ModelPrice | None] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def resolve(self, model: str) -> ModelPrice | None:
        """The model's price, or None when neither limits.yaml nor the library knows it."""
        try:
            return self._configured[model]  # read without the lock: entries are only ever added
        except KeyError:
            pass
        if model in self._overrides:
            price = self._build(model)
            with self._lock:
                return self._configured.setdefault(model, price)
        with self._lock:
            if model in self._cache:
                self._cache.move_to_end(model)
                return self._cache[model]
        price = self._build(model)  # outside the lock: a library search takes a while
        with self._lock:
            # Another thread may have resolved it meanwhile: keep one object per name.
            price = self._cache.setdefault(model, price)
            self._cache.move_to_end(model)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return price

    def cache_info(self) -> CacheInfo:
        """The bound and the current size of the cache of names outside limits.yaml."""
        with self._lock:
            return CacheInfo(self._cache_size, len(self._cache))

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
