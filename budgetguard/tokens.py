"""Local estimates of how many input tokens an LLM call will consume.

A budget has to be reserved *before* the call goes out, so the input side is counted
locally with tiktoken instead of asking the provider. Every choice below leans towards
over-estimating: reserving a few tokens too many costs nothing once the call settles with
the real usage, while reserving too few lets a call slip past its budget.

Encodings
---------
OpenAI models get the encoding tiktoken assigns to them (``gpt-4o``, ``gpt-4.1``,
``gpt-5``, ``o1``/``o3``/``o4-mini`` -> ``o200k_base``; ``gpt-4``, ``gpt-3.5-turbo`` ->
``cl100k_base``) and no safety factor, because tiktoken *is* their tokenizer.

Other vendors' tokenizers are not available offline, so their text is counted with
``o200k_base`` and the count is multiplied by a per-family safety factor (rounded up):

==========================  ==========================================  ======
family                      model name starts with                      factor
==========================  ==========================================  ======
claude                      ``claude``                                  1.25
gemini                      ``gemini``                                  1.15
llama                       ``llama``, ``meta-llama``                   1.15
mistral                     ``mistral``, ``mixtral``, ``codestral``,    1.25
                            ``ministral``
unknown                     anything else tiktoken does not know        1.25
==========================  ==========================================  ======

The factors are deliberate margins, not measured ratios. Claude's tokenizer is not
published, and older Mistral models use a 32k-entry SentencePiece vocabulary that splits
text into more pieces than ``o200k_base`` does, so they get the wide margin. Llama 3's
tokenizer is itself a tiktoken-style BPE with a 128k vocabulary and Gemini's has a 256k
vocabulary; both stay close to ``o200k_base`` and get the narrower one.

A provider prefix (``openai/gpt-4o``, ``anthropic/claude-...``) is dropped before the
lookup, as is a Bedrock-style vendor prefix (``anthropic.claude-...``) for the families.
A configuration may pin an encoding for a model tiktoken cannot know (a fine-tune behind
a custom name, say): ``tokenizer_for(model, encoding="o200k_base")`` uses it as is, with
factor 1.

The rank files of ``cl100k_base`` and ``o200k_base``, which cover every model above, ship
inside the package (``budgetguard/encodings``, MIT like tiktoken itself: see the NOTICE
there) and are checked against the SHA-256 tiktoken expects, so estimates are right
offline and never wait on a download. Other encodings (one pinned by configuration, such
as ``p50k_base``) load through tiktoken: its cache (``TIKTOKEN_CACHE_DIR``), else a
download.

When an encoding still cannot be loaded (no network and no cache) the estimate falls back
to the text's UTF-8 byte length. Every token of a byte-level BPE covers at least one byte,
so this over-counts but never under-counts (English prose by about 5x, enough to trip an
input cap); a single warning per process says so and how to fix it, and nothing raises.
``load_problems`` lets a command report it at start rather than at the first request.

Long texts
----------
tiktoken splits text with a regex before merging bytes. That regex gives up on a run of
about a million horizontal whitespace characters (``ValueError: Regex error ... Max stack
size exceeded for backtracking``), and its cost per character grows with the length of a
run of whitespace or of a word: 0.1-0.25 us at 8k characters, 0.25-0.6 us at 1M (prose
stays at 0.02-0.04 us whatever its length). A text longer than ``CHUNK_CHARS`` (8192)
characters is therefore counted in pieces of at most that many characters:

* a piece ends, where its second half offers one, at a *soft* cut: between a
  non-whitespace character and the horizontal whitespace after it, or between a letter or
  digit and a line break. The encodings' regexes always end a piece of their own there
  (see ``_SOFT_CUT``), so the two sides count exactly what the whole text would; each soft
  cut still adds ``SOFT_CUT_MARGIN`` (1) token, as a spare;
* otherwise (a long word, a long whitespace run) the piece is cut *hard* after
  ``CHUNK_CHARS`` characters, splitting one of the regex's pieces, and the cut adds
  ``HARD_CUT_MARGIN`` (3) tokens: merged separately, the two halves of a split piece never
  came out more than 2 tokens below the whole piece in measurements.

The count thus does not fall below the whole text's count (exactly so at soft cuts; with
a token to spare over the worst case measured at hard cuts) and exceeds it by little (the
margins add at most 1 token per 4096 characters, or 3 per 8192 where the text is cut
hard), and its cost grows linearly with the text: 0.15-0.35 s for 1 MB of whitespace or
of one long word, 20-40 ms for 1 MB of prose. That is still too long for an event loop:
``input_size`` says cheaply how much text an estimate would count, so that a caller can
run big estimates in a worker thread. Should tiktoken still raise on some piece, that
piece counts as its UTF-8 byte length, with a single warning per process: an estimate
never raises because of the text it is given.

Chat format
-----------
Messages follow the accounting of OpenAI's cookbook "How to count tokens with tiktoken"
(valid for gpt-3.5-turbo-0613 and later, gpt-4, gpt-4o): 3 tokens per message, 1 more
when the message has a ``name``, and 3 for priming the reply. Tool definitions follow the
same cookbook's function-calling formula. Each image is counted as ``IMAGE_TOKENS``
tokens whatever its size, because its pixels are not at hand (see the constant).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from importlib import resources
from typing import Any

import tiktoken

from .errors import InvalidArgument, InvalidArgumentType

__all__ = [
    "CHUNK_CHARS",
    "IMAGE_TOKENS",
    "Tokenizer",
    "bundled_encodings",
    "count_text_tokens",
    "estimate_input_tokens",
    "input_size",
    "load_problems",
    "tokenizer_for",
    "uncountable_input",
]

logger = logging.getLogger("budgetguard.tokens")

#: Every chat message is wrapped in ``<|start|>{role}<|message|>...<|end|>``.
TOKENS_PER_MESSAGE = 3
#: A ``name`` on a message costs one token on top of its text.
TOKENS_PER_NAME = 1
#: Every reply is primed with ``<|start|>assistant<|message|>``.
REPLY_PRIMING_TOKENS = 3

#: Tokens charged for one image, whatever its size or detail setting.
#:
#: The largest per-image costs the providers document for their current tiling are:
#: OpenAI gpt-4o high detail, 85 + 170 per 512 px tile with at most 8 tiles (an image
#: fitted to 768 x 2048) = 1445; OpenAI gpt-4.1, one token per 32 px patch capped at
#: 1536 patches = 1536; Anthropic, (width x height) / 750 after downscaling to about
#: 1.15 megapixels, which the vision docs put at ~1590 for 1092 x 1092. 1600 covers all
#: three. It does not cover models that multiply their image tokens (gpt-4o-mini,
#: gpt-4.1-mini/nano, o4-mini) or very large images on models with a higher resolution
#: cap; the settled usage corrects those.
IMAGE_TOKENS = 1600

#: Texts longer than this many characters are counted in pieces of at most this size.
#:
#: tiktoken's cost per character grows with the length of a run of whitespace or of a word
#: (o200k_base, ns per character, 256 / 4k / 8k / 64k / 900k characters: spaces 108 / 191
#: / 243 / 276 / 582, the letter "a" 78 / 110 / 121 / 153 / 262; prose stays at ~20), and a
#: horizontal whitespace run of ~1M characters makes its regex fail. 8192 keeps a piece's
#: cost within ~2.5x of the cheapest rate and about 2 ms, stays far below the regex limit,
#: and leaves a prompt of a thousand or so tokens (5-7k characters of prose) on the
#: single-call path, counted exactly and as fast as ever.
CHUNK_CHARS = 8192

#: Tokens added per cut at a piece boundary of the encodings' regex (see ``_SOFT_CUT``).
#: The pieces then count exactly what the whole would, so this is a spare, there for an
#: encoding pinned by configuration whose regex might not end a piece at those places.
SOFT_CUT_MARGIN = 1

#: Tokens added per hard cut, one that splits a piece of tiktoken's regex in two.
#:
#: BPE merges byte pairs in rank order. Merged on their own, the two halves of a split piece
#: lose the tokens that would have crossed the cut (an over-count), but the bytes freed that
#: way can also merge with their neighbours on each side into a segmentation the whole
#: piece would not reach, and that can save tokens. In practice little is saved: over
#: 240,000 random cuts in runs of letters, digits, punctuation, marks, emoji, CJK and every
#: kind of whitespace (o200k_base and cl100k_base), the two halves never came out more than
#: 2 tokens below the whole. 3 covers that with one to spare.
HARD_CUT_MARGIN = 3

_FALLBACK_ENCODING = "o200k_base"
_MAX_MEMO = 1024  # short strings (roles, names) whose counts each Tokenizer remembers
_MEMO_MAX_LEN = 64

# Family rules for models tiktoken does not know: (family, name prefixes, factor).
_FAMILIES: tuple[tuple[str, tuple[str, ...], Fraction], ...] = (
    ("claude", ("claude",), Fraction(5, 4)),
    ("gemini", ("gemini",), Fraction(23, 20)),
    ("llama", ("llama", "meta-llama"), Fraction(23, 20)),
    ("mistral", ("mistral", "mixtral", "codestral", "ministral"), Fraction(5, 4)),
)
_UNKNOWN_FAMILY = "unknown"
_UNKNOWN_FACTOR = Fraction(5, 4)

# OpenAI o200k models that an older tiktoken (the floor is 0.7) may not know yet. Without
# this they would still be estimated, only with the 1.25 margin for unknown models.
_OPENAI_O200K = re.compile(r"(?:gpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|chatgpt-4o|o[1-9])(?:$|[-.:@])")


@dataclass(frozen=True, slots=True)
class _ToolOverheads:
    """Constants of the cookbook's function-calling formula (fitted per encoding)."""

    func_init: int
    prop_init: int
    prop_key: int
    enum_init: int
    enum_item: int
    func_end: int


_TOOLS_O200K = _ToolOverheads(7, 3, 3, -3, 3, 12)
# Also used whenever the encoding is not o200k (or is missing): 10 > 7 keeps it conservative.
_TOOLS_CL100K = _ToolOverheads(10, 3, 3, -3, 3, 12)

_SHORT_KEYS = frozenset({"role", "type"})  # message keys whose values repeat call after call
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})
_TOOL_USE_PARTS = frozenset({"tool_use", "server_tool_use"})
# Keys the function-calling formula accounts for; anything else in a schema is added as JSON.
_FORMULA_PROPERTY_KEYS = frozenset({"type", "description", "enum"})
_FORMULA_PARAMETER_KEYS = frozenset({"type", "properties", "required", "additionalProperties"})


@dataclass(frozen=True)
class Tokenizer:
    """How one model's text is counted.

    ``factor`` scales tiktoken counts up for models whose real tokenizer is not
    available; it is 1 for OpenAI models, for pinned encodings, and when counting bytes
    (``encoding_name`` is None), since a byte count already bounds any byte-level BPE.
    """

    encoding_name: str | None
    factor: Fraction
    family: str
    _encoding: tiktoken.Encoding | None = field(default=None, repr=False, compare=False)
    _memo: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def count(self, text: str) -> int:
        """Tokens ``text`` is expected to cost on this model, rounded up after scaling."""
        if not isinstance(text, str):
            raise InvalidArgumentType(f"text must be a string, got {_type_name(text)}")
        return self._scale(self._raw(text))

    def _raw(self, text: str) -> int:
        # Unscaled count. disallowed_special=() lets user text mention "<|endoftext|>"
        # without tiktoken raising: it is counted as the plain text it is.
        if not text:
            return 0
        enc = self._encoding
        if enc is None:
            return _utf8_len(text)
        if len(text) > CHUNK_CHARS:
            return _count_chunked(enc, text, CHUNK_CHARS)
        # _count_piece, inlined: every call of every estimate goes through here.
        try:
            return len(enc.encode(text, disallowed_special=()))
        except BaseException as exc:
            if not _recoverable(exc):
                raise
            return _unencodable(text, exc)

    def _raw_short(self, text: str) -> int:
        # Roles and names repeat on every message of every call; remember their counts.
        n = self._memo.get(text)
        if n is None:
            n = self._raw(text)
            if len(text) <= _MEMO_MAX_LEN and len(self._memo) < _MAX_MEMO:
                self._memo[text] = n
        return n

    def _scale(self, n: int) -> int:
        f = self.factor
        if f.denominator == 1 and f.numerator == 1:
            return n
        return -(-n * f.numerator // f.denominator)

    @property
    def _tool_overheads(self) -> _ToolOverheads:
        name = self.encoding_name
        if name is not None and name.startswith("o200k"):
            return _TOOLS_O200K
        return _TOOLS_CL100K


# --------------------------------------------------------------------------- long texts

# Unicode White_Space, which is what ``\s`` means to tiktoken's (Rust) regexes. Python's
# str.isspace() and re's \s also accept \x1c-\x1f, which tiktoken treats as punctuation.
_HSPACE = r"\t\x0b\x0c \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_SPACE = _HSPACE + r"\n\r"

# Places where every tiktoken encoding's regex ends a piece, searched in the reversed text
# (so that the first match is the last such place): the character after the cut comes first
# in the match, the one before it in the lookahead.
#
# * non-whitespace, then horizontal whitespace: the only pieces that hold whitespace after
#   their first character are whitespace pieces and punctuation followed by line breaks
#   (o200k ``[^\s\p{L}\p{N}]+[\r\n/]*``), so no piece runs from the one into the other;
# * a letter or digit, then a line break: letters, digits and contractions never take a
#   line break, and the punctuation pieces that do cannot hold a letter or digit.
#
# Either way the text before the cut ends with non-whitespace, so the only parts of the
# regexes that see the end of a text differently from a following character (``\s+(?!\S)``,
# ``\s++$``) cannot reach it; and the text after the cut starts where one of the whole
# text's matches starts, and the regexes look ahead, never behind. So both sides split into
# exactly the whole text's pieces, and BPE merges each piece on its own. Python's ``[^\W_]``
# (str.isalnum()) only takes characters of Unicode categories L and N.
_SOFT_CUT = re.compile(rf"[{_HSPACE}](?=[^{_SPACE}])|[\r\n](?=[^\W_])")


def _utf8_len(text: str) -> int:
    # surrogatepass: a lone surrogate must not make an estimate raise (tiktoken counts it
    # as U+FFFD, 3 bytes too).
    return len(text.encode("utf-8", "surrogatepass"))


def _next_cut(text: str, start: int, size: int) -> tuple[int, bool]:
    """Where the piece of ``text`` from ``start`` ends, given ``len(text) - start > size``:
    the last soft cut in the second half of its ``size`` characters, or else a hard cut
    after them (the flag says which)."""
    end = start + size
    # Reversed from text[end] (the first character past the piece) down to the middle:
    # window[j] is text[end - j], so a match at j is a cut at end - j.
    window = text[end : start + size // 2 : -1]
    match = _SOFT_CUT.search(window)
    if match is None:
        return end, True
    return end - match.start(), False


def _cuts(text: str, size: int) -> list[tuple[int, bool]]:
    """Positions where ``_count_chunked`` cuts ``text``, each with whether it is hard."""
    cuts: list[tuple[int, bool]] = []
    start = 0
    while len(text) - start > size:
        cut = _next_cut(text, start, size)
        cuts.append(cut)
        start = cut[0]
    return cuts


def _count_chunked(enc: tiktoken.Encoding, text: str, size: int) -> int:
    """Tokens of ``text`` counted in pieces of at most ``size`` characters, plus the cuts'
    margins: never below counting the whole text at once (see the module docstring)."""
    total = 0
    start = 0
    while len(text) - start > size:
        end, hard = _next_cut(text, start, size)
        total += _count_piece(enc, text[start:end])
        total += HARD_CUT_MARGIN if hard else SOFT_CUT_MARGIN
        start = end
    return total + _count_piece(enc, text[start:])


def _count_piece(enc: tiktoken.Encoding, text: str) -> int:
    # encode(), not encode_ordinary(): on the regex's backtracking limit the latter panics
    # in Rust (a BaseException), the former raises ValueError.
    try:
        return len(enc.encode(text, disallowed_special=()))
    except BaseException as exc:
        if not _recoverable(exc):
            raise
        return _unencodable(text, exc)


def _recoverable(exc: BaseException) -> bool:
    # A Rust panic inside tiktoken surfaces as pyo3's PanicException, which derives from
    # BaseException only; it is a failure of the tokenizer on this text, not a reason to
    # stop the caller. KeyboardInterrupt, SystemExit and the like are not swallowed.
    if isinstance(exc, Exception):
        return True
    kind = type(exc)
    return kind.__name__ == "PanicException" and kind.__module__ == "pyo3_runtime"


_encode_warn_lock = threading.Lock()
_encode_warned = False


def _unencodable(text: str, exc: BaseException) -> int:
    """Count for a text tiktoken raised on: its UTF-8 byte length, which no byte-level BPE
    exceeds. Warns once per process: one bad input must not flood the log."""
    global _encode_warned
    with _encode_warn_lock:
        warn, _encode_warned = not _encode_warned, True
    if warn:
        logger.warning(
            "tiktoken failed on a text of %d characters (%s: %s); such texts are counted as "
            "their UTF-8 byte length, which over-estimates (conservative)",
            len(text),
            type(exc).__name__,
            str(exc)[:200],
        )
    return _utf8_len(text)


# --------------------------------------------------------------------------- lookup

_warn_lock = threading.Lock()
_warned = False


def _warn_fallback(encoding_name: str, exc: BaseException) -> None:
    global _warned
    with _warn_lock:
        if _warned:
            return
        _warned = True
    # One short line: what failed, what it costs, how to fix it. The exception's own text
    # (a long network error) is left out; its type is enough to tell offline from corrupt.
    logger.warning(
        "tiktoken encoding %s unavailable (%s): estimates count UTF-8 bytes, several times "
        "too many (conservative), so input caps may refuse prompts that fit; fix: point "
        "TIKTOKEN_CACHE_DIR at a cache holding it (`budgetguard doctor --fetch-encodings` fills one)",
        encoding_name,
        type(exc).__name__,
    )


# The encodings shipped in the package: the regex and special tokens tiktoken_ext's
# openai_public defines for them (an encoding never changes once published) and the
# SHA-256 of the rank file tiktoken checks its downloads against.
_O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_BUNDLED: dict[str, tuple[str, str, dict[str, int]]] = {
    "o200k_base": (
        _O200K_PAT,
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    "cl100k_base": (
        _CL100K_PAT,
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}


def bundled_encodings() -> frozenset[str]:
    """Names of the encodings whose rank files ship with the package."""
    return frozenset(_BUNDLED)


def _bundled_encoding(name: str) -> tiktoken.Encoding | None:
    """The shipped encoding ``name``, or None when it is not shipped, missing or altered."""
    spec = _BUNDLED.get(name)
    if spec is None:
        return None
    pat_str, sha256, special_tokens = spec
    try:
        data = resources.files(__package__).joinpath("encodings", f"{name}.tiktoken").read_bytes()
    except OSError:
        return None  # a trimmed install: tiktoken's own loading comes next
    if hashlib.sha256(data).hexdigest() != sha256:
        logger.warning("the shipped rank file of %s does not match its SHA-256; loading it through tiktoken", name)
        return None
    # The format tiktoken's load_tiktoken_bpe reads: "<base64 token> <rank>" per line.
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens)


_loaded: dict[str, tiktoken.Encoding | None] = {}
_load_lock = threading.Lock()


def _load_encoding(name: str) -> tiktoken.Encoding | None:
    """The encoding ``name``, loaded once per process. Under a lock: a cold process hit by a
    burst would otherwise parse the rank file once per concurrent caller (each a third of a
    second of CPU and tens of MB), and the burst's first checks would wait for all of them."""
    if name in _loaded:
        return _loaded[name]
    with _load_lock:
        if name not in _loaded:
            # A failure is remembered too: retrying a download on every LLM call would put
            # network timeouts on the hot path, and the byte fallback is safe.
            try:
                _loaded[name] = _bundled_encoding(name) or tiktoken.get_encoding(name)
            except Exception as exc:
                _warn_fallback(name, exc)
                _loaded[name] = None
        return _loaded[name]


def load_problems(models: Iterable[tuple[str, str | None]]) -> list[str]:
    """Load the tokenizers of ``(model, pinned encoding)`` pairs now; return the encodings
    that could not be loaded (their estimates count bytes), each named once.

    Commands call this at start so that a missing encoding is reported before the first
    request rather than in the middle of it; the warning is logged as usual.
    """
    missing: list[str] = []
    for model, encoding in models:
        try:
            tok = tokenizer_for(model, encoding)
        except (InvalidArgument, InvalidArgumentType):
            continue  # the configuration's validation reports bad names
        if tok.encoding_name is None:
            wanted = encoding or _openai_encoding_name(_normalise(model)) or _FALLBACK_ENCODING
            if wanted not in missing:
                missing.append(wanted)
    return missing


@lru_cache(maxsize=1)
def _known_encodings() -> frozenset[str] | None:
    try:
        return frozenset(tiktoken.list_encoding_names())
    except Exception:
        return None


def _normalise(model: str) -> str:
    return model.strip().lower().rsplit("/", 1)[-1]


def _family(name: str) -> tuple[str, Fraction]:
    for family, prefixes, factor in _FAMILIES:
        for prefix in prefixes:
            if name.startswith(prefix) or f".{prefix}" in name:
                return family, factor
    return _UNKNOWN_FAMILY, _UNKNOWN_FACTOR


def _openai_encoding_name(name: str) -> str | None:
    try:
        return tiktoken.encoding_name_for_model(name)
    except KeyError:
        return _FALLBACK_ENCODING if _OPENAI_O200K.match(name) else None


def _build(encoding_name: str, factor: Fraction, family: str) -> Tokenizer:
    enc = _load_encoding(encoding_name)
    if enc is None:
        return Tokenizer(None, Fraction(1), family)
    return Tokenizer(encoding_name, factor, family, enc)


@lru_cache(maxsize=512)
def _tokenizer_cached(model: str, encoding: str | None) -> Tokenizer:
    name = _normalise(model)
    if not name:
        raise InvalidArgument(f"model must name a model, got {model!r}")
    if encoding is not None:
        known = _known_encodings()
        if known is not None and encoding not in known:
            raise InvalidArgument(
                f"encoding {encoding!r} pinned for model {model!r} is not a tiktoken "
                f"encoding (known: {', '.join(sorted(known))})"
            )
        openai_encoding = _openai_encoding_name(name)
        family = "openai" if openai_encoding else _family(name)[0]
        return _build(encoding, Fraction(1), family)
    openai_encoding = _openai_encoding_name(name)
    if openai_encoding is not None:
        return _build(openai_encoding, Fraction(1), "openai")
    family, factor = _family(name)
    return _build(_FALLBACK_ENCODING, factor, family)


def _check_model(model: object) -> None:
    if not isinstance(model, str):
        raise InvalidArgumentType(f"model must be a string, got {_type_name(model)}")
    if not model or model.isspace():
        raise InvalidArgument("model must be a non-empty string")


def tokenizer_for(model: str, encoding: str | None = None) -> Tokenizer:
    """The tokenizer to count ``model``'s input with, built once per (model, encoding).

    ``encoding`` comes from configuration (``models: {name: {tokenizer: ...}}``) and wins
    over the name-based lookup, for models whose real encoding the name cannot reveal.
    """
    _check_model(model)
    if encoding is not None:
        if not isinstance(encoding, str):
            raise InvalidArgumentType(
                f"encoding must be a string or None, got {_type_name(encoding)}"
            )
        if not encoding:
            raise InvalidArgument("encoding must be a non-empty string or None")
    return _tokenizer_cached(model, encoding)


def _clear_caches() -> None:
    """Forget loaded encodings, tokenizers and the warning flags (tests use this)."""
    global _warned, _encode_warned
    _tokenizer_cached.cache_clear()
    with _load_lock:
        _loaded.clear()
    _known_encodings.cache_clear()
    with _warn_lock:
        _warned = False
    with _encode_warn_lock:
        _encode_warned = False


# --------------------------------------------------------------------------- counting


# Parts whose tokens the provider decides, not their text: a file is billed by what the
# provider makes of it (pages as text and images), fetched by URL or id or sent inline;
# an item reference stands for a stored item the body does not hold.
_UNCOUNTABLE_PARTS = frozenset({"input_file", "file", "document", "container_upload", "item_reference"})


def uncountable_input(messages: object) -> bool:
    """Whether ``messages`` hold input no local estimate can count (see ``_UNCOUNTABLE_PARTS``),
    at any depth: content parts, tool results, tool outputs. Bounded, never raises."""
    stack = [messages]
    seen = 0
    while stack and seen < 100_000:
        node = stack.pop()
        seen += 1
        if isinstance(node, dict):
            kind = node.get("type")
            if isinstance(kind, str) and kind in _UNCOUNTABLE_PARTS:
                return True
            stack.extend(v for k, v in node.items() if k in ("content", "output") and isinstance(v, list))
        elif isinstance(node, list):
            stack.extend(node)
    return False


def count_text_tokens(model: str, text: str) -> int:
    """Tokens of plain ``text`` on ``model``, with the same margin as chat estimates.

    For text that is not wrapped in messages: completion prompts, embeddings input.
    """
    tok = tokenizer_for(model)
    if not isinstance(text, str):
        raise InvalidArgumentType(f"text must be a string, got {_type_name(text)}")
    return tok._scale(tok._raw(text))


#: How many values (strings, numbers, lists, dicts...) ``input_size`` looks at, at most.
_SIZE_MAX_VALUES = 10_000
#: Characters a value stands for when ``input_size`` stops at ``_SIZE_MAX_VALUES``: the
#: estimate spends about 1 us per value (a message, a key, a schema property), as long as
#: tokenizing 25-50 characters of prose.
_SIZE_CHARS_PER_VALUE = 32


def input_size(
    messages: object = None,
    tools: object = None,
    prompt: object = None,
    system: object = None,
    *,
    limit: int | None = None,
) -> int:
    """About how many characters of text ``estimate_input_tokens`` would tokenize for these
    arguments, found without tokenizing anything.

    For deciding before an estimate whether it is big enough to run in a worker thread
    rather than on an event loop: the estimate costs 0.02-0.35 us per character (see the
    module docstring). The walk follows the arguments' structure without checking it: a
    string counts its length, every other value at least 1 (a dict its keys' lengths, an
    int its digits, a float 24), standing for the JSON punctuation and keys that some parts
    are counted with; an image part counts 1, since its payload is never tokenized. A
    prompt given as token ids counts its ints, though it is not tokenized.

    Cost is bounded and nothing raises, whatever the arguments hold: wrong types, cycles
    and deep nesting are walked like anything else (no recursion), other objects count 1,
    iterators are not consumed. The walk stops

    * once the size reaches ``limit`` (the caller's threshold): the result is then at
      least ``limit``;
    * after 10,000 values: the result is then at least ``limit`` and at least 320,000, the
      text that takes as long to count as that many values take to walk in the estimate.

    So ``input_size(..., limit=t) >= t`` says whether an estimate has at least ``t``
    characters of text to count, or as much work as that, at the cost of a few
    milliseconds at most (about 0.5 us per value walked).
    """
    total = 0
    budget = _SIZE_MAX_VALUES
    cut_short = False
    # Values still to look at, and for each a flag: for a list, whether its items are content
    # parts; for a dict, whether it is one (where estimate_input_tokens charges images a
    # constant). Two parallel lists: no tuple to allocate per value.
    values: list[object] = []
    parts: list[bool] = []
    for value, part in ((messages, False), (tools, False), (prompt, False), (system, True)):
        if value is not None:
            values.append(value)
            parts.append(part)
    try:
        while values:
            if limit is not None and total >= limit:
                break
            value = values.pop()
            part = parts.pop()
            if isinstance(value, str):
                total += len(value) or 1
            elif isinstance(value, dict):
                total += 1
                kind = value.get("type")
                if part and isinstance(kind, str) and kind in _IMAGE_PARTS:
                    continue
                for key, item in value.items():
                    if budget <= 0:
                        cut_short = True
                        break
                    budget -= 1
                    if isinstance(key, str):
                        total += len(key)
                    values.append(item)
                    # content and output lists hold parts (messages, tool results,
                    # Responses items); anything else is counted as JSON, images too.
                    parts.append(key == "content" or key == "output")
            elif isinstance(value, (list, tuple)):
                total += 1
                if len(value) > budget:
                    cut_short = True
                items = value[:budget]
                budget -= len(items)
                values.extend(items)
                parts.extend([part] * len(items))
            elif isinstance(value, (bytes, bytearray)):
                total += len(value) or 1  # dumped through str(), longer still
            elif isinstance(value, bool) or value is None:
                total += 1
            elif isinstance(value, int):
                total += value.bit_length() // 3 + 1  # decimal digits, rounded up
            elif isinstance(value, float):
                total += 24  # the longest repr of a float
            else:
                total += 1
    except Exception:
        # A dict or str subclass whose methods raise: the estimate will say what is wrong
        # with it; the size of what was walked is the best answer here.
        pass
    if cut_short:  # some values were never looked at
        total = max(total, limit or 0, _SIZE_MAX_VALUES * _SIZE_CHARS_PER_VALUE)
    return total


class _Tally:
    """Running totals of one estimate: tokenizer units (scaled at the end) and images."""

    __slots__ = ("images", "tok", "units")

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.units = 0
        self.images = 0


def estimate_input_tokens(
    model: str,
    messages: list | None = None,
    *,
    tools: list | None = None,
    prompt: str | list[str] | None = None,
    system: str | list | None = None,
    encoding: str | None = None,
) -> int:
    """Upper-leaning estimate of the input tokens a call will be billed for.

    Runs before anything is reserved, so malformed arguments raise
    ``InvalidArgumentType``/``InvalidArgument`` naming the offending place rather than
    being guessed at; neither a tokenizer that cannot be loaded nor text tiktoken fails on
    makes it raise, and long texts are counted in bounded pieces (see the module
    docstring). Its cost grows with the text: ``input_size`` tells beforehand whether it is
    worth running in a worker thread. Message overheads and tool formulas are in OpenAI's token units, so for
    other families they are scaled by the family factor along with the text; image
    tokens are already in the target model's units and are added unscaled. ``encoding``
    pins a tiktoken encoding (limits.yaml ``models.<name>.tokenizer``).
    """
    tok = tokenizer_for(model, encoding)
    tally = _Tally(tok)

    if messages is not None:
        if not isinstance(messages, list):
            raise InvalidArgumentType(
                f"messages must be a list of dicts or None, got {_type_name(messages)}"
            )
        for i, message in enumerate(messages):
            _count_message(tally, message, i)

    if system is not None:
        tally.units += TOKENS_PER_MESSAGE + tok._raw_short("system")
        if isinstance(system, str):
            tally.units += tok._raw(system)
        elif isinstance(system, list):
            for j, block in enumerate(system):
                _count_part(tally, block, "system", j)
        else:
            raise InvalidArgumentType(
                f"system must be a string, a list of text blocks or null, got {_type_name(system)}"
            )

    if messages is not None or system is not None:
        tally.units += REPLY_PRIMING_TOKENS

    if tools is not None:
        _count_tools(tally, tools)

    if prompt is not None:
        if isinstance(prompt, str):
            tally.units += tok._raw(prompt)
        elif isinstance(prompt, list):
            for i, item in enumerate(prompt):
                if not isinstance(item, str):
                    raise InvalidArgumentType(
                        f"prompt[{i}] must be a string, got {_type_name(item)}"
                    )
                tally.units += tok._raw(item)
        else:
            raise InvalidArgumentType(
                f"prompt must be a string, a list of strings or null, got {_type_name(prompt)}"
            )

    return tok._scale(tally.units) + tally.images * IMAGE_TOKENS


def _count_message(tally: _Tally, message: object, i: int) -> None:
    if not isinstance(message, dict):
        raise InvalidArgumentType(f"messages[{i}] must be a dict, got {_type_name(message)}")
    role = message.get("role")
    if role is None:
        # Responses API input items (function_call, function_call_output, ...) have a
        # type instead of a role; anything with neither is not a message.
        if not isinstance(message.get("type"), str):
            raise InvalidArgument(f"messages[{i}] has no role")
    elif not isinstance(role, str):
        raise InvalidArgumentType(f"messages[{i}].role must be a string, got {_type_name(role)}")
    elif not role:
        raise InvalidArgument(f"messages[{i}].role must not be empty")

    tok = tally.tok
    tally.units += TOKENS_PER_MESSAGE
    for key, value in message.items():
        if value is None:
            continue
        if key == "content":
            _count_content(tally, value, f"messages[{i}].content")
        elif key == "name":
            if not isinstance(value, str):
                raise InvalidArgumentType(
                    f"messages[{i}].name must be a string, got {_type_name(value)}"
                )
            tally.units += tok._raw_short(value) + TOKENS_PER_NAME
        elif key == "tool_calls":
            _count_tool_calls(tally, value, f"messages[{i}].tool_calls")
        elif key == "function_call":
            _count_function_call(tally, value, f"messages[{i}].function_call")
        elif isinstance(value, str):
            tally.units += tok._raw_short(value) if key in _SHORT_KEYS else tok._raw(value)
        elif key == "output" and isinstance(value, list):
            _count_content(tally, value, f"messages[{i}].output")
        else:
            tally.units += tok._raw(_dumps(value, f"messages[{i}].{key}"))


def _count_content(tally: _Tally, content: object, where: str) -> None:
    if isinstance(content, str):
        tally.units += tally.tok._raw(content)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            _count_part(tally, part, where, j)
    elif content is not None:
        raise InvalidArgumentType(
            f"{where} must be a string, a list of parts or null, got {_type_name(content)}"
        )


def _count_part(tally: _Tally, part: object, parent: str, j: int) -> None:
    if not isinstance(part, dict):
        raise InvalidArgumentType(f"{parent}[{j}] must be a dict, got {_type_name(part)}")
    tok = tally.tok
    kind = part.get("type")
    if not isinstance(kind, str):
        kind = None  # counted as the JSON it is, below (a list or a dict cannot be looked up)
    if kind in _TEXT_PARTS:
        tally.units += tok._raw(_required_str(part, "text", f"{parent}[{j}]"))
    elif kind in _IMAGE_PARTS:
        tally.images += 1
    elif kind in _TOOL_USE_PARTS:
        name = part.get("name")
        if isinstance(name, str):
            tally.units += tok._raw_short(name)
        tool_input = part.get("input")
        if tool_input is not None:
            tally.units += tok._raw(_dumps(tool_input, f"{parent}[{j}].input"))
    elif kind == "tool_result":
        _count_content(tally, part.get("content"), f"{parent}[{j}].content")
    elif kind == "refusal":
        tally.units += tok._raw(_required_str(part, "refusal", f"{parent}[{j}]"))
    elif kind == "thinking":
        tally.units += tok._raw(_required_str(part, "thinking", f"{parent}[{j}]"))
    else:
        # Audio, files, documents, blocks added after this was written: their JSON is
        # longer than what the model sees, which errs on the safe side and is never zero.
        tally.units += tok._raw(_dumps(part, f"{parent}[{j}]"))


def _count_tool_calls(tally: _Tally, calls: object, where: str) -> None:
    if not isinstance(calls, list):
        raise InvalidArgumentType(f"{where} must be a list, got {_type_name(calls)}")
    for k, call in enumerate(calls):
        if not isinstance(call, dict):
            raise InvalidArgumentType(f"{where}[{k}] must be a dict, got {_type_name(call)}")
        function = call.get("function")
        if function is None:
            tally.units += tally.tok._raw(_dumps(call, f"{where}[{k}]"))
        else:
            _count_function_call(tally, function, f"{where}[{k}].function")


def _count_function_call(tally: _Tally, function: object, where: str) -> None:
    if not isinstance(function, dict):
        raise InvalidArgumentType(f"{where} must be a dict, got {_type_name(function)}")
    tok = tally.tok
    name = function.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise InvalidArgumentType(f"{where}.name must be a string, got {_type_name(name)}")
        tally.units += tok._raw_short(name)
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        tally.units += tok._raw(arguments)
    elif arguments is not None:
        # The API wants a JSON string; some clients hand over the decoded object.
        tally.units += tok._raw(_dumps(arguments, f"{where}.arguments"))


# --------------------------------------------------------------------------- tools


def _count_tools(tally: _Tally, tools: object) -> None:
    if not isinstance(tools, list):
        raise InvalidArgumentType(f"tools must be a list of dicts or None, got {_type_name(tools)}")
    tok = tally.tok
    consts = tok._tool_overheads
    functions = 0
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidArgumentType(f"{where} must be a dict, got {_type_name(tool)}")
        spec, spec_where = _function_spec(tool, where)
        if spec is None:
            # Anthropic {"name", "description", "input_schema"}, built-in tools, ...
            tally.units += tok._raw(_dumps(tool, where))
            continue
        functions += 1
        tally.units += consts.func_init + _function_definition_units(tok, consts, spec, spec_where)
    if functions:
        tally.units += consts.func_end


def _function_spec(tool: dict, where: str) -> tuple[dict | None, str]:
    if tool.get("type") == "function":
        if "function" in tool:  # Chat Completions: {"type": "function", "function": {...}}
            spec = tool["function"]
            if not isinstance(spec, dict):
                raise InvalidArgumentType(
                    f"{where}.function must be a dict, got {_type_name(spec)}"
                )
            return spec, f"{where}.function"
        return tool, where  # Responses API: the definition sits on the tool itself
    if "type" not in tool and "parameters" in tool and "name" in tool:
        return tool, where  # legacy `functions=[...]` entry
    return None, where


def _function_definition_units(
    tok: Tokenizer, consts: _ToolOverheads, spec: dict, where: str
) -> int:
    name = spec.get("name")
    if not isinstance(name, str):
        raise InvalidArgumentType(f"{where}.name must be a string, got {_type_name(name)}")
    if not name:
        raise InvalidArgument(f"{where}.name must not be empty")
    description = _optional_str(spec, "description", where)
    units = tok._raw(f"{name}:{description.removesuffix('.')}")

    parameters = spec.get("parameters")
    if parameters is None:
        return units
    if not isinstance(parameters, dict):
        raise InvalidArgumentType(
            f"{where}.parameters must be a dict, got {_type_name(parameters)}"
        )
    properties = parameters.get("properties")
    if properties is not None and not isinstance(properties, dict):
        raise InvalidArgumentType(
            f"{where}.parameters.properties must be a dict, got {_type_name(properties)}"
        )
    if properties:
        units += consts.prop_init
        for key, prop in properties.items():
            units += consts.prop_key + _property_units(
                tok, consts, key, prop, f"{where}.parameters.properties.{key}"
            )
    extra = {k: v for k, v in parameters.items() if k not in _FORMULA_PARAMETER_KEYS}
    if extra:  # $defs, anyOf, ...: the formula has no term for them, so add their JSON
        units += tok._raw(_dumps(extra, f"{where}.parameters"))
    return units


def _property_units(
    tok: Tokenizer, consts: _ToolOverheads, key: object, prop: object, where: str
) -> int:
    if not isinstance(prop, dict):
        raise InvalidArgumentType(f"{where} must be a dict, got {_type_name(prop)}")
    units = 0
    ptype = prop.get("type", "")
    if isinstance(ptype, list):
        ptype = " | ".join(str(t) for t in ptype)
    elif not isinstance(ptype, str):
        ptype = _dumps(ptype, f"{where}.type")
    description = _optional_str(prop, "description", where)
    enum = prop.get("enum")
    if enum is not None:
        if not isinstance(enum, list):
            raise InvalidArgumentType(f"{where}.enum must be a list, got {_type_name(enum)}")
        units += consts.enum_init
        for item in enum:
            text = item if isinstance(item, str) else _dumps(item, f"{where}.enum")
            units += consts.enum_item + tok._raw(text)
    units += tok._raw(f"{key}:{ptype}:{description.removesuffix('.')}")
    extra = {k: v for k, v in prop.items() if k not in _FORMULA_PROPERTY_KEYS}
    if extra:  # nested objects, items, defaults, ...: not in the formula, add their JSON
        units += tok._raw(_dumps(extra, where))
    return units


# --------------------------------------------------------------------------- helpers


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _required_str(part: dict, key: str, where: str) -> str:
    value = part.get(key)
    if not isinstance(value, str):
        raise InvalidArgumentType(f"{where}.{key} must be a string, got {_type_name(value)}")
    return value


def _optional_str(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgumentType(f"{where}.{key} must be a string, got {_type_name(value)}")
    return value


def _dumps(value: Any, where: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidArgument(f"{where} cannot be serialised to JSON: {exc}") from None
