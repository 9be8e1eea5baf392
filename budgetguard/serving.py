"""How ``budgetguard proxy`` serves: uvicorn with read deadlines for slow or silent clients.

uvicorn's h11 protocol times out only the idle gap *between* requests
(``timeout_keep_alive``). A client that opens a connection and stays silent, sends half
a request head, or starts a body and stops, holds its socket (and, once the head is in,
an application task) for as long as it likes; enough of them exhaust the process's file
descriptors and nobody else gets an answer. :class:`ReadDeadlineProtocol` adds:

- a **header deadline**: the request head must be complete within ``header`` seconds of
  the connection opening, or of the first byte of the next request on a kept-alive one;
- a **body deadline**: a request body must make progress at least every ``body_idle``
  seconds and be complete within ``body_total`` seconds of its head.

A client that misses one gets ``408 Request Timeout`` when it sent part of a request and
no answer has started, and is disconnected in any case. :func:`raise_open_file_limit`
lifts the soft limit on open files, which is what the socket count runs into first.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from .proxy_defaults import (  # defined apart so that `budgetguard --help` need not import uvicorn
    DEFAULT_BODY_IDLE_TIMEOUT,
    DEFAULT_BODY_TOTAL_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEP_ALIVE_TIMEOUT,
)

__all__ = [
    "DEFAULT_BODY_IDLE_TIMEOUT",
    "DEFAULT_BODY_TOTAL_TIMEOUT",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_KEEP_ALIVE_TIMEOUT",
    "ReadDeadlineProtocol",
    "ReadTimeouts",
    "ServingConfig",
    "raise_open_file_limit",
]

log = logging.getLogger(__name__)


# Tried in turn when the hard limit is "unlimited", which the soft limit may not be
# (macOS refuses values above kern.maxfilesperproc).
_UNLIMITED_FALLBACKS = (1_048_576, 65_536, 10_240)

_Phase = Literal["head", "body"] | None


@dataclass(frozen=True)
class ReadTimeouts:
    """How long a client may take to send a request, in seconds."""

    header: float = DEFAULT_HEADER_TIMEOUT
    body_idle: float = DEFAULT_BODY_IDLE_TIMEOUT
    body_total: float = DEFAULT_BODY_TOTAL_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("header", "body_idle", "body_total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"{name} timeout must be a finite number of seconds above 0, got {value!r}")


class ServingConfig(uvicorn.Config):
    """A ``uvicorn.Config`` serving HTTP/1.1 with :class:`ReadDeadlineProtocol` under ``timeouts``.

    Every other keyword goes to ``uvicorn.Config`` as is (``timeout_keep_alive`` bounds
    the idle gap between requests, as in plain uvicorn).
    """

    def __init__(self, app: Any, *, timeouts: ReadTimeouts | None = None, **kwargs: Any) -> None:
        if "http" in kwargs:
            raise TypeError("ServingConfig chooses the HTTP protocol itself; do not pass http=")
        self.read_timeouts = timeouts or ReadTimeouts()
        super().__init__(app, http=ReadDeadlineProtocol, **kwargs)


class ReadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, with the header and body deadlines of :class:`ReadTimeouts`.

    uvicorn accepts a protocol class as ``Config(http=...)``. Besides the public hooks
    (``connection_made``, ``data_received``, ``connection_lost``, ``on_response_complete``)
    this relies on these uvicorn internals, all present since 0.30: ``self.conn`` (the
    h11 connection), ``self.transport``, ``self.loop``, ``self.client``, ``self.cycle``
    with its ``response_started``, ``disconnected`` and ``waiting_for_100_continue``,
    ``self.flow.read_paused``, and ``self.timeout_keep_alive_task`` (set while uvicorn's
    own keep-alive timer runs, which then owns the connection).
    """

    def __init__(self, config: uvicorn.Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._timeouts = config.read_timeouts if isinstance(config, ServingConfig) else ReadTimeouts()
        self._phase: _Phase = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # of the head, or of the whole body
        # When body bytes last came: the timer compares it when it fires instead of being
        # rescheduled for every chunk.
        self._last_progress = 0.0

    # -- uvicorn's hooks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn
        super().connection_made(transport)
        self._watch()  # a client that never says anything is held to the header deadline too

    def data_received(self, data: bytes) -> None:
        if self._phase == "body":
            self._last_progress = self.loop.time()
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()  # pipelined requests may have been read meanwhile

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_phase(None)
        super().connection_lost(exc)

    # -- the deadlines ---------------------------------------------------------------------

    def _watch(self) -> None:
        """Start, keep or stop the deadline that fits where the client is in its request."""
        if self.transport.is_closing():
            self._set_phase(None)
            return
        state = self.conn.their_state
        if state is h11.IDLE and self.timeout_keep_alive_task is None:
            # Awaiting a head: on a new connection, or since the next request's first byte
            # cancelled uvicorn's keep-alive timer.
            self._set_phase("head")
        elif state is h11.SEND_BODY:
            # Also after an early answer (a 401, a 413) while the rest of the body trickles in.
            self._set_phase("body")
        else:
            # Between requests (uvicorn's keep-alive timer), or the request is in and the
            # application is answering: its own timeouts apply.
            self._set_phase(None)

    def _set_phase(self, phase: _Phase) -> None:
        if phase == self._phase:
            return  # the running deadline stands: trickling bytes do not extend the head's
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase
        now = self.loop.time()
        if phase == "head":
            self._deadline = now + self._timeouts.header
            self._timer = self.loop.call_at(self._deadline, self._expired)
        elif phase == "body":
            self._deadline = now + self._timeouts.body_total
            self._last_progress = now
            self._timer = self.loop.call_at(min(self._deadline, now + self._timeouts.body_idle), self._expired)

    def _server_holds_body(self) -> bool:
        # The client cannot be blamed for silence while uvicorn has paused reading (the
        # application has not consumed what came) or has not yet sent 100 Continue.
        return self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue)

    def _expired(self) -> None:
        self._timer = None
        now = self.loop.time()
        if self._phase == "body" and now < self._deadline:
            if self._server_holds_body():
                self._last_progress = now
            idle_until = self._last_progress + self._timeouts.body_idle
            if now < idle_until:
                self._timer = self.loop.call_at(min(idle_until, self._deadline), self._expired)
                return
        phase, self._phase = self._phase, None
        if phase is None or self.transport.is_closing():
            return
        self._drop(phase, now >= self._deadline)

    def _drop(self, phase: Literal["head", "body"], total: bool) -> None:
        """Close a connection that missed its deadline, with a 408 where one can still be sent."""
        if phase == "head":
            partial = bool(self.conn.trailing_data[0])
            why = f"request head not complete within {self._timeouts.header:g} s"
        else:
            partial = self.cycle is not None and not self.cycle.response_started
            why = (f"request body not complete within {self._timeouts.body_total:g} s" if total
                   else f"request body stalled for {self._timeouts.body_idle:g} s")
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        if phase == "head" and not partial:
            # Nothing sent at all: a port scan, a load balancer's spare connection.
            log.debug("closing a silent connection from %s: %s", peer, why)
        else:
            log.info("closing the connection from %s: %s%s", peer, why, " (408)" if partial else "")
        if self.cycle is not None and not self.cycle.response_complete:
            # The application's answer, if it still comes, must not follow the 408 on the wire;
            # its receive() reports http.disconnect once the connection is lost.
            self.cycle.disconnected = True
        if partial:
            self._send_408()
        self.transport.close()

    def _send_408(self) -> None:
        body = b"request timeout: the request was not received in time\n"
        events: list[h11.Event] = [
            h11.Response(status_code=408, reason=b"Request Timeout", headers=[
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ]
        try:
            wire = b"".join(self.conn.send(event) or b"" for event in events)
        except h11.LocalProtocolError:
            return  # h11 cannot answer in this state: closing is answer enough
        self.transport.write(wire)


def raise_open_file_limit() -> int | None:
    """Raise this process's soft limit on open files to its hard limit; the soft limit then.

    Every connection is a file descriptor, and the common default soft limit (1,024) is
    reached by a thousand slow clients: accept() then fails and every new caller waits.
    None where there is no limit: on Windows, or when it is unlimited already.
    """
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    targets = [t for t in (_UNLIMITED_FALLBACKS if hard == resource.RLIM_INFINITY else (hard,)) if t > soft]
    for target in targets:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        log.info("open-file limit raised from %d to %d (each connection holds one)", soft, target)
        return target
    if targets:
        log.warning("could not raise the open-file limit above %d: fewer connections than that can be "
                    "open at once", soft)
    return soft
