"""Usage of streamed LLM responses, shared by the ASGI middleware and the ``@limit`` wrappers.

Streams are where spend goes missing: the usage arrives only with the last event (OpenAI
chat's final chunk with ``stream_options.include_usage``, a Responses
``response.completed`` event, Anthropic's ``message_delta``), and a stream that is cut
or abandoned never delivers it. This module is sans-IO:

* :class:`SSEParser` turns bytes into server-sent events, incrementally, chunk
  boundaries anywhere (the middleware reads the HTTP body with it);
* :class:`StreamUsage` takes each event (parsed JSON or an SDK object) and keeps the
  reported usage, or, when none arrives, counts the streamed text so that the call can
  be charged the estimated input plus the output actually produced;
* :class:`GuardedStream` / :class:`AsyncGuardedStream` wrap the OpenAI and Anthropic
  SDK streams (any iterator of events) and settle a reservation exactly once, when the
  stream is exhausted, closed, fails, or is garbage-collected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .details import CallDetails, details_from_response
from .errors import InvalidArgument, InvalidArgumentType
from .redact import printable
from .tokens import count_text_tokens
from .usage import Usage

if TYPE_CHECKING:
    from .decision import Decision
    from .guard import BudgetGuard

__all__ = [
    "AsyncGuardedStream",
    "GuardedStream",
    "SSEEvent",
    "SSEParser",
    "StreamUsage",
    "is_stream",
    "usage_from_body",
    "wrap_stream",
]

log = logging.getLogger("budgetguard")


#: An SSE event larger than this has its data dropped (it is still passed on untouched);
#: usage events are a few kB, and even a ``response.completed`` with the whole output is
#: far below it.
MAX_EVENT_BYTES = 8 * 1024 * 1024

# Event types whose ``response`` carries the final usage of an OpenAI Responses stream.
_RESPONSES_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_ANTHROPIC_USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
_ANTHROPIC_DELTA_TEXT = ("text", "partial_json", "thinking")
_OPENAI_DELTA_TEXT = ("content", "refusal", "reasoning_content")


def _get(obj: object, name: str) -> Any:
    """``obj[name]`` of a mapping or ``obj.name`` of an SDK object; None when absent."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched server-sent event. ``raw`` is its exact bytes on the wire."""

    event: str
    data: str
    raw: bytes
    truncated: bool = False


class SSEParser:
    """Incremental server-sent-events parser (the WHATWG rules: CRLF, LF or CR line ends,
    ``:`` comments, multi-line ``data``), fed bytes in chunks of any size.

    Every byte fed is accounted for in exactly one event's ``raw`` or in :meth:`pending`,
    so a caller can re-emit the stream event by event.
    """

    __slots__ = ("_buf", "_data", "_data_bytes", "_event", "_pos", "_start", "_truncated")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # where the next unread line starts
        self._start = 0  # where the current event's raw bytes start
        self._data: list[bytes] = []
        self._data_bytes = 0
        self._event = b""
        self._truncated = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add ``chunk``; return the events it completed."""
        buf = self._buf
        buf += chunk
        events: list[SSEEvent] = []
        pos = self._pos
        size = len(buf)
        while pos < size:
            nl = buf.find(b"\n", pos)
            cr = buf.find(b"\r", pos, nl if nl >= 0 else size)
            if cr >= 0:
                if cr + 1 == size:
                    break  # a CR at the end may be the first half of a CRLF
                end, nxt = cr, cr + 2 if buf[cr + 1] == 0x0A else cr + 1
            elif nl >= 0:
                end, nxt = nl, nl + 1
            else:
                break
            line = bytes(buf[pos:end])
            pos = nxt
            if not line:
                events.append(self._dispatch(bytes(buf[self._start:pos])))
                self._start = pos
            else:
                self._field(line)
        if self._start:
            del buf[:self._start]
            pos -= self._start
            self._start = 0
        self._pos = pos
        return events

    def pending(self) -> bytes:
        """Bytes fed but not yet part of a dispatched event (a stream cut mid-event)."""
        return bytes(self._buf)

    def _field(self, line: bytes) -> None:
        if line[0] == 0x3A:  # ":" comment (keep-alives)
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data_bytes += len(value) + 1
            if self._data_bytes > MAX_EVENT_BYTES:
                self._truncated = True
                self._data.clear()
            elif not self._truncated:
                self._data.append(value)
        elif name == b"event":
            self._event = value

    def _dispatch(self, raw: bytes) -> SSEEvent:
        data = b"\n".join(self._data).decode("utf-8", "replace")
        event = SSEEvent(self._event.decode("utf-8", "replace"), data, raw, self._truncated)
        self._data = []
        self._data_bytes = 0
        self._event = b""
        self._truncated = False
        return event


class StreamUsage:
    """What one streamed response consumed, event by event.

    :attr:`usage` is the usage the provider reported, once it has (None before, and
    forever for a stream cut short). :meth:`fallback` is what to charge otherwise.
    """

    __slots__ = ("_anthropic", "_model", "_texts", "events", "final", "finish_reason", "usage")

    def __init__(self, model: str) -> None:
        self._model = model
        self._texts: list[str] = []
        self._anthropic: dict[str, int] = {}
        self.usage: Usage | None = None
        # The usage came in the event that closes the accounting (OpenAI's usage-only
        # chunk, a terminal Responses event, Anthropic's message_delta): it can be
        # settled at once rather than at the end of the body.
        self.final = False
        self.events = 0
        # Why the answer ended, as a usage event records it ("length" when the output cap cut
        # it, whatever the provider's spelling); None until an event says.
        self.finish_reason: str | None = None

    def feed_sse(self, event: SSEEvent) -> Any:
        """Read one SSE event; return its parsed JSON (None for ``[DONE]``, comments, junk)."""
        data = event.data
        if not data or event.truncated or data == "[DONE]":
            return None
        try:
            obj = json.loads(data)
        except ValueError:
            return None
        self.feed(obj)
        return obj

    def feed(self, obj: object) -> None:
        """Read one stream event: a parsed JSON mapping or an SDK event object."""
        self.events += 1
        try:
            self._read(obj)
        except (InvalidArgument, InvalidArgumentType) as exc:
            # A malformed usage must not break the stream; it is charged like a missing one.
            log.warning("unreadable usage in a stream event (%s); ignoring it", exc)

    def _read(self, obj: object) -> None:
        kind = _get(obj, "type")
        if isinstance(kind, str):
            if kind == "message_start":  # Anthropic: input counts, output so far
                self._merge_anthropic(_get(_get(obj, "message"), "usage"), final=False)
                return
            if kind == "message_delta":  # Anthropic: cumulative usage, the last word on it
                self._finished({"stop_reason": _get(_get(obj, "delta"), "stop_reason")})
                self._merge_anthropic(_get(obj, "usage"), final=True)
                return
            if kind == "content_block_delta":
                delta = _get(obj, "delta")
                for name in _ANTHROPIC_DELTA_TEXT:
                    self._text(_get(delta, name))
                return
            if kind.startswith("response."):  # OpenAI Responses
                if kind.endswith(".delta"):
                    self._text(_get(obj, "delta"))
                elif kind in _RESPONSES_FINAL:
                    self._finished(_get(obj, "response"))
                    if _get(_get(obj, "response"), "usage") is not None:
                        self.usage = Usage.from_response(obj)
                        self.final = True
                return
        choices = _get(obj, "choices")  # OpenAI chat and completions chunks
        if choices:
            if any(_get(choice, "finish_reason") for choice in choices):
                self._finished(obj)
            for choice in choices:
                delta = _get(choice, "delta")
                if delta is None:
                    self._text(_get(choice, "text"))
                    continue
                for name in _OPENAI_DELTA_TEXT:
                    self._text(_get(delta, name))
                for call in _get(delta, "tool_calls") or ():
                    function = _get(call, "function")
                    self._text(_get(function, "name"))
                    self._text(_get(function, "arguments"))
        if _get(obj, "usage") is not None:
            self.usage = Usage.from_response(obj)
            # Some servers repeat a running usage on every chunk; only the usage-only
            # chunk (no choices) is known to be the last word.
            self.final = choices is not None and len(choices) == 0

    def _text(self, value: object) -> None:
        if isinstance(value, str) and value:
            self._texts.append(value)

    def _merge_anthropic(self, usage: object, *, final: bool) -> None:
        if usage is None:
            return
        for name in _ANTHROPIC_USAGE_FIELDS:
            value = _get(usage, name)
            if value is not None:
                self._anthropic[name] = value
        if final:
            self.usage = Usage.from_response(dict(self._anthropic))
            self.final = True

    @property
    def text(self) -> str:
        return "".join(self._texts)

    def _finished(self, answer: object) -> None:
        reason = details_from_response(answer).finish_reason
        if reason is not None and self.finish_reason != "length":  # with several choices, a cut one wins
            self.finish_reason = reason

    def fallback(self, estimated_input_tokens: int) -> Usage:
        """The usage to charge for a stream that ended without reporting one.

        Input: what the provider reported at the start (Anthropic's ``message_start``)
        or else the pre-call estimate. Output: the streamed text counted with the
        model's tokenizer (with its safety factor), or the provider's partial count if
        that is larger.
        """
        counted = count_text_tokens(self._model, self.text) if self._texts else 0
        if "input_tokens" in self._anthropic:
            try:
                partial = Usage.from_response({"output_tokens": 0, **self._anthropic})
            except (InvalidArgument, InvalidArgumentType):
                partial = None
            if partial is not None:
                return Usage(partial.input_tokens, max(partial.output_tokens, counted), partial.cached_input_tokens,
                             0, partial.cache_write_tokens)
        return Usage(estimated_input_tokens, counted)


def usage_from_body(obj: object) -> Usage:
    """Usage of a whole (non-streamed) response body, embeddings included.

    Embeddings report ``prompt_tokens`` and ``total_tokens`` only: they have no output.
    """
    usage = _get(obj, "usage")
    if usage is not None and _get(usage, "prompt_tokens") is not None and _get(usage, "completion_tokens") is None:
        return Usage.from_response({"prompt_tokens": _get(usage, "prompt_tokens"), "completion_tokens": 0,
                                    "prompt_tokens_details": _get(usage, "prompt_tokens_details")})
    return Usage.from_response(obj)


# --------------------------------------------------------------------------- SDK streams


def is_stream(result: object) -> bool:
    """Whether a guarded function returned a stream of events rather than a response.

    SDK streams (``openai.Stream``, ``anthropic.AsyncStream``, ...) and generators are
    iterators; response objects are not (a pydantic model iterates but has no ``__next__``).
    """
    return hasattr(result, "__next__") or hasattr(result, "__anext__")


class _Settler:
    """Settles one reservation once from a stream's :class:`StreamUsage`."""

    def __init__(self, guard: BudgetGuard, decision: Decision) -> None:
        self.guard = guard
        self.decision = decision
        self.tracker = StreamUsage(decision.model)
        self.settled = False
        # A stream read for longer than its lease renews it, a third of its ttl at a time.
        self._renew_every = guard.config.reservation_ttl_s / 3
        self._renewed = time.monotonic()

    def renew_due(self) -> bool:
        now = time.monotonic()
        if self.settled or now - self._renewed < self._renew_every:
            return False
        self._renewed = now
        return True

    def details(self) -> CallDetails:
        return CallDetails(streamed=True, finish_reason=self.tracker.finish_reason)

    def usage(self) -> tuple[Usage, bool]:
        """The usage to record and whether the stream was incomplete."""
        if self.tracker.usage is not None:
            return self.tracker.usage, False
        d = self.decision
        log.warning("stream of user %s (%s) ended without usage after %d events; charging the estimated input "
                    "plus the streamed output", printable(d.user), printable(d.model), self.tracker.events)
        try:
            return self.tracker.fallback(d.estimated_input_tokens), True
        except Exception:
            # Whatever failed in counting, the reservation must not stay behind.
            log.exception("counting a stream's output failed; charging the reserved worst case")
            return Usage(d.estimated_input_tokens, d.max_output_tokens), True

    def settle(self) -> None:
        if self.settled:
            return
        self.settled = True
        usage, incomplete = self.usage()
        try:
            self.guard.record(self.decision, usage, incomplete=incomplete, details=self.details())
        except (InvalidArgument, InvalidArgumentType):
            log.exception("recording a stream's usage for user %s failed", printable(self.decision.user))

    async def asettle(self) -> None:
        if self.settled:
            return
        self.settled = True
        usage, incomplete = self.usage()
        task = asyncio.ensure_future(_arecord(self.guard, self.decision, usage, incomplete, self.details()))
        # A cancelled consumer must not leave the reservation behind; aclose() waits for it.
        self.guard._track(task)
        await asyncio.shield(task)

    def settle_from_finalizer(self) -> None:
        """A stream dropped without being closed: settle from ``__del__``, never raising."""
        if self.settled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        try:
            if loop is None:
                self.settle()
            else:
                self.guard._track(loop.create_task(self.asettle()))
        except Exception:
            log.exception("settling an abandoned stream of user %s failed", printable(self.decision.user))


async def _arecord(guard: BudgetGuard, decision: Decision, usage: Usage, incomplete: bool,
                   details: CallDetails) -> None:
    try:
        await guard.arecord(decision, usage, incomplete=incomplete, details=details)
    except (InvalidArgument, InvalidArgumentType):
        log.exception("recording a stream's usage for user %s failed", printable(decision.user))


class GuardedStream:
    """An SDK stream (or any iterator of events) that records its usage when it ends.

    Iterates like the stream it wraps; every other attribute (``response``, ...) is the
    wrapped stream's. The reservation is settled once: when iteration ends, when it
    raises, on ``close()`` / ``with`` exit, or when the object is garbage-collected.
    """

    def __init__(self, stream: Any, guard: BudgetGuard, decision: Decision) -> None:
        self._stream = stream
        self._iterator: Iterator[Any] = iter(stream)
        self._settler = _Settler(guard, decision)

    @property
    def usage(self) -> Usage | None:
        """The usage reported so far (final once the stream has ended)."""
        return self._settler.tracker.usage

    def __iter__(self) -> GuardedStream:
        return self

    def __next__(self) -> Any:
        try:
            item = next(self._iterator)
        except BaseException:  # StopIteration included: the stream is over either way
            self._settler.settle()
            raise
        self._settler.tracker.feed(item)
        if self._settler.tracker.final:
            self._settler.settle()  # a consumer may stop reading right after the usage event
        elif self._settler.renew_due():
            self._settler.guard.renew(self._settler.decision)
        return item

    def close(self) -> None:
        try:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
        finally:
            self._settler.settle()

    def __enter__(self) -> GuardedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __del__(self) -> None:
        settler = self.__dict__.get("_settler")
        if settler is not None and not settler.settled:
            settler.settle_from_finalizer()


class AsyncGuardedStream:
    """The async twin of :class:`GuardedStream` (``openai.AsyncStream``, async generators)."""

    def __init__(self, stream: Any, guard: BudgetGuard, decision: Decision) -> None:
        self._stream = stream
        self._iterator: AsyncIterator[Any] = stream.__aiter__() if hasattr(stream, "__aiter__") else stream
        self._settler = _Settler(guard, decision)

    @property
    def usage(self) -> Usage | None:
        return self._settler.tracker.usage

    def __aiter__(self) -> AsyncGuardedStream:
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self._iterator.__anext__()
        except BaseException:  # StopAsyncIteration, errors and cancellation alike end the stream
            await self._settler.asettle()
            raise
        self._settler.tracker.feed(item)
        if self._settler.tracker.final:
            await self._settler.asettle()  # a consumer may stop reading right after the usage event
        elif self._settler.renew_due():
            await self._settler.guard.arenew(self._settler.decision)
        return item

    async def close(self) -> None:
        try:
            close = getattr(self._stream, "close", None) or getattr(self._stream, "aclose", None)
            if close is not None:
                result = close()
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    await result
        finally:
            await self._settler.asettle()

    async def aclose(self) -> None:
        await self.close()

    async def __aenter__(self) -> AsyncGuardedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __del__(self) -> None:
        settler = self.__dict__.get("_settler")
        if settler is not None and not settler.settled:
            settler.settle_from_finalizer()


def wrap_stream(result: Any, guard: BudgetGuard, decision: Decision) -> GuardedStream | AsyncGuardedStream:
    """Wrap a stream returned by a guarded call so that its usage settles ``decision``."""
    if hasattr(result, "__anext__"):
        return AsyncGuardedStream(result, guard, decision)
    return GuardedStream(result, guard, decision)
