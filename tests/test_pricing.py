"""Prices resolve once per model into integer nano-USD rates; costs round up."""

from __future__ import annotations

import random
import string
import tracemalloc
from decimal import Decimal

from genai_prices import data_snapshot

from budgetguard import Usage
from budgetguard.config import parse_config
from budgetguard.pricing import PRICE_CACHE_SIZE, Pricebook, library_model_names, nano_to_usd, usd_to_nano


def book(**models) -> Pricebook:
    return Pricebook(parse_config({"models": models}, env={}).models)


def test_library_prices_are_used_by_default():
    p = Pricebook().resolve("gpt-4o-mini")
    assert p is not None and p.source.startswith("genai-prices")
    # gpt-4o-mini lists at $0.15 / $0.60 per MTok, cached input $0.075.
    assert (p.input.base, p.output.base, p.cached_input.base) == (150_000_000, 600_000_000, 75_000_000)
    assert p.reasoning == p.output  # billed as output


def test_overrides_and_additions():
    b = book(**{"gpt-4o-mini": {"input_per_mtok": "0.2"}, "house-model": {"input_per_mtok": 1, "output_per_mtok": 3}})
    mini = b.resolve("gpt-4o-mini")
    assert mini.input.base == 200_000_000 and mini.output.base == 600_000_000
    assert mini.source.endswith("+limits.yaml")
    house = b.resolve("house-model")
    assert house.source == "limits.yaml" and house.cached_input == house.input
    assert b.resolve("definitely-not-a-model") is None


def test_resolves_once():
    b = Pricebook()
    assert b.resolve("gpt-4o") is b.resolve("gpt-4o")


def test_cost_of_each_token_kind_rounds_up():
    b = book(m={"input_per_mtok": 3, "output_per_mtok": 15, "cached_input_per_mtok": "0.3",
                "cache_write_per_mtok": "3.75", "reasoning_per_mtok": 20})
    p = b.resolve("m")
    u = Usage(input_tokens=1000, cached_input_tokens=600, cache_write_tokens=100, output_tokens=50, reasoning_tokens=20)
    # 300*3 + 600*0.3 + 100*3.75 + 30*15 + 20*20 = 900 + 180 + 375 + 450 + 400 = 2305 USD per MTok-token
    assert p.cost_nano(u) == 2_305_000
    assert p.cost_nano(Usage(input_tokens=1, output_tokens=0)) == 3_000
    tiny = book(t={"input_per_mtok": "0.0000001", "output_per_mtok": 0}).resolve("t")
    assert tiny.cost_nano(Usage(input_tokens=1, output_tokens=0)) == 1  # 1e-13 USD rounds up to 1 nano


def test_tiered_prices_switch_above_the_threshold():
    p = Pricebook().resolve("claude-sonnet-4-5")
    assert p is not None and p.input.tiers  # the library carries the >200k-token tier
    small = p.cost_nano(Usage(input_tokens=200_000, output_tokens=0))
    large = p.cost_nano(Usage(input_tokens=200_001, output_tokens=0))
    assert large > 2 * small * 0.99
    assert p.estimate_nano(200_001, 10) > p.estimate_nano(200_000, 10)


def test_estimate_is_worst_case():
    p = book(m={"input_per_mtok": 2, "output_per_mtok": 8, "reasoning_per_mtok": 12}).resolve("m")
    assert p.estimate_nano(1000, 100) == 1000 * 2000 + 100 * 12000


def test_usd_conversion_is_exact():
    assert usd_to_nano(Decimal("0.000000001")) == 1
    assert usd_to_nano(Decimal("0.0000000011")) == 2
    assert nano_to_usd(1_500_000_000) == Decimal("1.5")


# -- bounded caches ------------------------------------------------------------------------


def test_the_cache_of_caller_given_names_is_bounded():
    b = book(**{"house-model": {"input_per_mtok": 1, "output_per_mtok": 3}})
    house, mini = b.resolve("house-model"), b.resolve("gpt-4o-mini")
    rng = random.Random(3)
    tracemalloc.start()
    try:
        for i in range(20_000):
            # Half match a library pattern (priced, each a distinct name), half match nothing.
            stem = "claude-v2-" if i % 2 else "no-such-model-"
            b.resolve(stem + "".join(rng.choices(string.ascii_lowercase, k=200)))
            if i == 4_999:
                filled = tracemalloc.get_traced_memory()[0]
        grown = tracemalloc.get_traced_memory()[0] - filled
    finally:
        tracemalloc.stop()
    info = b.cache_info()
    assert info.maxsize == PRICE_CACHE_SIZE and info.currsize <= PRICE_CACHE_SIZE
    # Once the cache is full, 15,000 more names (3 MB of text) cost no memory: neither here
    # nor in the library's own lookup caches.
    assert grown < 1_000_000, grown
    assert b.resolve("house-model") is house  # configured models are kept for good
    assert b.resolve("gpt-4o-mini") == mini  # evicted by the flood, resolved again the same


def test_the_cache_evicts_the_least_recently_used():
    b = Pricebook(cache_size=2)
    first = b.resolve("gpt-4o")
    b.resolve("gpt-4o-mini")
    assert b.resolve("gpt-4o") is first  # a hit: gpt-4o is now the most recent
    b.resolve("nothing-1")
    assert b.cache_info().currsize == 2
    assert b.resolve("gpt-4o") is first  # gpt-4o-mini went, not gpt-4o


def test_library_lookup_finds_what_the_library_finds():
    snapshot = data_snapshot.get_snapshot()
    fresh = data_snapshot.DataSnapshot(providers=snapshot.providers, from_auto_update=False)
    names = sorted(library_model_names())
    assert 1000 < len(names) < 20_000 and all(n == n.lower() for n in names)
    names += ["GPT-4o", "gpt-4o-20240806", "claude-v2-anything", "anthropic/claude-3-5-haiku", "no-such-model"]
    b = Pricebook()
    for name in names:
        try:
            provider, info = fresh.find_provider_model(name, None, None, None)
        except LookupError:
            want = None
        else:
            want = f"genai-prices:{provider.id}/{info.id}"
        price = b.resolve(name)
        # A library model without input and output prices resolves to None either way.
        assert price is None or price.source == want, name
        assert want is not None or price is None, name
