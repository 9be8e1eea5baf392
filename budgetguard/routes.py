"""Which HTTP requests are budgeted, matched on one normal form of their method and path.

A budget that a caller can skip by spelling a route differently is no budget: ``post``
for ``POST``, ``//v1/chat/completions``, a trailing ``/``, ``;x``, ``%00``, ``%20`` or
upper-case segments all reach the same handler on many servers. So the method and path
are normalised once, budgeted routes are matched on the normal form only, and what
cannot be normalised is refused rather than guessed at:

- the method is upper-cased, and must be one of :data:`METHODS`;
- the path (as the server decoded it) must be printable ASCII without white space,
  ``;``, ``\\``, ``%`` (a double encoding) or dot segments, and its raw form must not
  encode a ``/`` or ``\\`` (``%2F``, ``%5C``);
- empty segments are dropped (``//`` and a trailing ``/``);
- routes are matched case-insensitively, and a matched request goes on with the
  route's own spelling, so what runs is what was budgeted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

__all__ = ["DEFAULT_ROUTES", "METHODS", "BadRoute", "Endpoint", "normal_method", "normal_path"]

Endpoint = Literal["chat", "completions", "responses", "embeddings", "messages"]

#: The routes guarded by default: path -> the API it speaks.
DEFAULT_ROUTES: Mapping[str, Endpoint] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
    "/v1/embeddings": "embeddings",
    "/v1/messages": "messages",
}
ENDPOINTS: frozenset[str] = frozenset(DEFAULT_ROUTES.values())

#: The methods an API request may use; anything else is refused.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_FORBIDDEN = frozenset(";\\%")
_ENCODED_SEPARATORS = (b"%2f", b"%5c")


class BadRoute(ValueError):
    """A method or path that has no normal form; the message says what is wrong with it."""


def normal_method(method: str) -> str:
    """``method`` upper-cased; :class:`BadRoute` unless it is one of :data:`METHODS`."""
    upper = method.upper()
    if upper not in METHODS:
        raise BadRoute(f"the method {method[:20]!r} is not one of {', '.join(sorted(METHODS))}")
    return upper


def normal_path(path: str, raw_path: bytes | None = None) -> str:
    """``path`` with empty segments dropped; :class:`BadRoute` when it cannot be normalised.

    ``path`` is the decoded path an ASGI server puts in ``scope["path"]``, ``raw_path``
    the bytes it received (``scope["raw_path"]``), checked for encoded separators.
    """
    if raw_path is not None and any(sep in raw_path.lower() for sep in _ENCODED_SEPARATORS):
        raise BadRoute("the path encodes a '/' or '\\' (%2F, %5C)")
    for ch in path:
        if not "!" <= ch <= "~":
            raise BadRoute(f"the path contains {ch!r}, which is not printable ASCII")
        if ch in _FORBIDDEN:
            raise BadRoute(f"the path contains {ch!r}")
    segments = [s for s in path.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise BadRoute("dot segments are not allowed in the path")
    return "/" + "/".join(segments)


def route_key(normal: str) -> str:
    """What a normal path is matched on: routes are case-insensitive."""
    return normal.lower()


def lenient_key(path: str) -> str:
    """The route a path that :func:`normal_path` refuses would most likely reach.

    Cut at the first character a normal path may not hold, with empty and dot segments resolved:
    ``/v1/chat/completions;x`` and ``/V1//chat/completions%00`` give
    ``/v1/chat/completions``. Used to refuse such a path where it would reach a budgeted
    route, rather than let it by unbudgeted.
    """
    end = next((i for i, ch in enumerate(path) if not "!" <= ch <= "~" or ch in _FORBIDDEN), len(path))
    segments: list[str] = []
    for s in path[:end].split("/"):
        if s == "..":  # as a server resolving dot segments would
            if segments:
                segments.pop()
        elif s and s != ".":
            segments.append(s)
    return route_key("/" + "/".join(segments))
