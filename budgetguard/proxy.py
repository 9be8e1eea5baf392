"""``budgetguard proxy``: an OpenAI- and Anthropic-compatible HTTP proxy that enforces budgets.

Callers point their SDK's base URL at the proxy and use a key listed (as its SHA-256)
under ``api_keys:``; the proxy names the user from it, lets ``BudgetMiddleware``
reserve and settle, and forwards the request upstream (:mod:`budgetguard.forward`).

Layers, outside in: the Starlette app (``/healthz``, ``/metrics``, 404 elsewhere) ->
the gate (names the caller, 401 otherwise; refuses unmetered requests the
``passthrough`` setting excludes; picks the upstream) -> ``BudgetMiddleware`` (guarded
POST routes) -> the forwarder.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .asgi import BudgetMiddleware
from .config import ApiKey, credential, upstream_url
from .errors import ConfigError
from .forward import SCOPE_KEY, Forwarder, Target, error_body, send_error
from .forward import Route as Forwarding
from .guard import BudgetGuard
from .metrics import metrics_app
from .redact import printable
from .routes import DEFAULT_ROUTES, BadRoute, normal_method, normal_path, route_key
from .stats import aorg_status
from .store import StoreUnavailable

__all__ = ["fingerprint", "hash_key", "proxy_app"]

log = logging.getLogger("budgetguard.proxy")

Passthrough = Literal["models", "read", "all", "none"]
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Free requests (token counts) that pass wherever unbudgeted requests may pass at all.
_FREE_ROUTES = frozenset({"/v1/messages/count_tokens", "/v1/responses/input_tokens"})
# Requests that start LLM work no reservation can bound (a batch runs many calls later,
# images and audio are priced per image or second): never forwarded, whatever passthrough says.
_UNBUDGETABLE = ("/v1/messages/batches", "/v1/batches", "/v1/images", "/v1/audio", "/v1/realtime",
                 "/v1/fine_tuning", "/v1/videos", "/v1/threads")
_USER_KEY = "budgetguard.user"
_LABEL_KEY = "budgetguard.key_label"
_ENTRY_KEY = "budgetguard.key_entry"


def hash_key(key: str) -> str:
    """The SHA-256 (lowercase hex) under which ``api_keys`` lists a key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def fingerprint(key_hash: str) -> str:
    """What logs show of a key: the first 8 hex characters of its SHA-256."""
    return key_hash[:8]


def _caller_key(headers: Headers) -> str | None:
    # OpenAI clients send "Authorization: Bearer <key>", Anthropic's "x-api-key: <key>".
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = headers.get("x-api-key", "").strip()
    return key or None


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _is_anthropic(path: str, headers: Headers) -> bool:
    # The Anthropic SDK sends anthropic-version on every call, /v1/models included.
    return path == "/v1/messages" or path.startswith("/v1/messages/") or "anthropic-version" in headers


class _Gate:
    """Names the caller and picks the upstream for every /v1 request, then hands it on."""

    def __init__(self, app: ASGIApp, *, keys: Mapping[str, ApiKey], user_header: str | None,
                 passthrough: Passthrough, openai: Target, anthropic: Target, guard: BudgetGuard) -> None:
        self.app = app
        self.keys = keys
        self.user_header = user_header.lower() if user_header else None
        self.passthrough = passthrough
        self.openai = openai
        self.anthropic = anthropic
        self.metrics = guard.metrics
        self.drop = frozenset({self.user_header.encode()}) if self.user_header else frozenset()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})  # not proxied (e.g. the Realtime API)
            return
        scope = _api_scope(scope)
        # One normal form of the method and path, matched and forwarded (budgetguard.routes).
        try:
            method = normal_method(scope["method"])
            path = normal_path(scope["path"], scope.get("raw_path"))
        except BadRoute as exc:
            self.metrics.observe_proxy("other", 400)
            await send_error(send, 400, error_body("invalid_path", f"invalid request line: {exc}",
                                                   kind="invalid_request_error", anthropic=False))
            return
        key = route_key(path)
        endpoint = DEFAULT_ROUTES.get(key) if method == "POST" else None
        if endpoint is not None:
            path = key  # the route's own spelling
        # From here on the path is the API's whole path: no root_path for the middleware to strip.
        scope = {**scope, "method": method, "path": path, "raw_path": path.encode(), "root_path": ""}
        status = 0

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.handle(scope, receive, counted, path, method, endpoint is not None)
        except Exception:
            status = status or 500  # the server answers 500 when nothing was sent yet
            raise
        finally:
            self.metrics.observe_proxy(endpoint or "other", status or 499)  # 499: no answer (the client left)

    async def handle(self, scope: Scope, receive: Receive, send: Send, path: str, method: str,
                     guarded: bool) -> None:
        headers = Headers(scope=scope)
        anthropic = _is_anthropic(route_key(path), headers)
        user, label, entry = self.identify(headers, method, path)
        if user is None:
            await send_error(send, 401, error_body(
                "invalid_api_key", "the API key is missing or not known to the budget proxy",
                kind="authentication_error", anthropic=anthropic))
            return
        if not guarded and method not in _READ_METHODS and _under(route_key(path), _UNBUDGETABLE):
            await send_error(send, 403, error_body(
                "route_not_budgetable", f"{method} {path} starts LLM work that the budget proxy cannot budget "
                "before it runs; it is never forwarded", kind="permission_error", anthropic=anthropic))
            return
        if not guarded and not self.passes(method, path):
            await send_error(send, 403, error_body(
                "route_not_allowed", f"{method} {path} is not budgeted, and the budget proxy forwards "
                f"unbudgeted requests only when proxy.passthrough allows it (now {self.passthrough!r})",
                kind="permission_error", anthropic=anthropic))
            return
        target = self.anthropic if anthropic else self.openai
        scope = {**scope, _USER_KEY: user, _LABEL_KEY: label, _ENTRY_KEY: entry,
                 SCOPE_KEY: Forwarding(target=target, drop_headers=self.drop)}
        await self.app(scope, receive, send)

    def identify(self, headers: Headers, method: str, path: str) -> tuple[str | None, str | None, ApiKey | None]:
        """(user, label for the usage log, the key's entry) of a request; user None when it names nobody."""
        if self.user_header is not None:
            user = headers.get(self.user_header, "").strip()
            if user:
                return user, None, None
        key = _caller_key(headers)
        if key is None:
            log.info("%s %s: no API key; refused with 401", method, printable(path))
            return None, None, None
        digest = hash_key(key)
        entry = self.keys.get(digest)
        if entry is None:
            # The fingerprint only: the key itself never reaches a log.
            log.warning("%s %s: unknown API key (fingerprint %s); refused with 401", method, printable(path),
                        fingerprint(digest))
            return None, None, None
        return entry.user, entry.name or fingerprint(digest), entry

    def passes(self, method: str, path: str) -> bool:
        """Whether an unbudgeted request may go upstream.

        Not budgeted means not limited: some such routes spend (images, audio, batches),
        and with a shared upstream key every caller could read what the others stored
        (files, stored responses), so by default only the model list passes.
        """
        if self.passthrough == "all":
            return True
        if self.passthrough == "none":
            return False
        key = route_key(path)
        if method == "POST" and key in _FREE_ROUTES:
            return True
        if method not in _READ_METHODS:
            return False
        return self.passthrough == "read" or key == "/v1/models" or key.startswith("/v1/models/")


def _api_scope(scope: Scope) -> Scope:
    """The request as the API sees it: ``/v1/...`` whatever prefix the proxy is mounted under.

    The gate is mounted at ``/v1``, so ``root_path`` ends with it; Starlette leaves
    ``path`` whole. Stripping what comes before ``/v1`` lets the middleware match its
    routes and the upstream receive the API path when the app is mounted at a prefix.
    """
    root: str = scope.get("root_path", "")
    path: str = scope["path"]
    if not root.endswith("/v1") or not path.startswith(root):
        return scope
    prefix = root[: -len("/v1")]
    if not prefix:
        return scope
    raw: bytes | None = scope.get("raw_path")
    encoded = prefix.encode()
    return {**scope, "path": path[len(prefix):], "root_path": "",
            "raw_path": raw[len(encoded):] if raw is not None and raw.startswith(encoded) else None}


def _scope_user(request: Request) -> str | tuple[str, Mapping[str, str]] | None:
    user: str | None = request.scope.get(_USER_KEY)
    entry: ApiKey | None = request.scope.get(_ENTRY_KEY)
    if user is not None and entry is not None and entry.plans:
        return user, entry.plans  # the key's plans for its calls (api_keys.<n>.plans)
    return user


def _scope_tags(request: Request, body: Mapping[str, Any]) -> dict[str, str] | None:
    entry: ApiKey | None = request.scope.get(_ENTRY_KEY)
    tags = dict(entry.tags) if entry is not None else {}
    label = request.scope.get(_LABEL_KEY)
    if label:
        tags["api_key"] = label
    return tags or None


def _key(name: str, given: str | None, configured: str | None) -> str | None:
    """An upstream key passed in, checked as the config checks its own (it goes into a header)."""
    if given is None:
        return configured
    try:
        return credential(given)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _upstream(name: str, value: str) -> str:
    try:
        return upstream_url(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def proxy_app(
    guard: BudgetGuard,
    *,
    upstream: str | None = None,
    anthropic_upstream: str | None = None,
    timeout: float | None = None,
    connect_timeout: float | None = None,
    upstream_api_key: str | None = None,
    anthropic_api_key: str | None = None,
    user_header: str | None = None,
    passthrough: Passthrough | None = None,
    max_body_bytes: int | None = None,
    max_connections: int | None = None,
    close_guard: bool = False,
) -> Starlette:
    """The budget proxy as an ASGI (Starlette) app.

    Every argument left at None comes from ``guard.config.proxy`` (the ``proxy:``
    section of limits.yaml); callers are named by ``guard.config.api_keys`` and, when
    set, ``user_header``. ``close_guard`` closes the guard at the app's shutdown.
    Raises :class:`ConfigError` for a missing or malformed upstream, and when no caller
    could ever be named (no ``api_keys`` and no ``user_header``).
    """
    settings = guard.config.proxy
    upstream = upstream if upstream is not None else settings.upstream
    if not upstream:
        raise ConfigError("proxy.upstream: no upstream given (set proxy.upstream or pass --upstream)")
    upstream = _upstream("upstream", upstream)
    anthropic_upstream = _upstream("anthropic_upstream",
                                   anthropic_upstream or settings.anthropic_upstream or upstream)
    user_header = user_header if user_header is not None else settings.user_header
    keys = {entry.sha256: entry for entry in guard.config.api_keys}
    if not keys and not user_header:
        raise ConfigError("api_keys: no keys and no proxy.user_header, so every request would be refused "
                          "(add keys with `budgetguard hash-key`)")
    openai_target = Target(upstream, _key("upstream_api_key", upstream_api_key, settings.upstream_api_key))
    anthropic_target = Target(anthropic_upstream, _key("anthropic_api_key", anthropic_api_key,
                                                       settings.anthropic_api_key), anthropic=True)
    forwarder = Forwarder(timeout_s=timeout if timeout is not None else settings.timeout_s,
                          connect_timeout_s=connect_timeout if connect_timeout is not None
                          else settings.connect_timeout_s,
                          max_connections=max_connections if max_connections is not None
                          else settings.max_connections,
                          on_upstream_error=guard.metrics.observe_upstream_error)
    guarded = BudgetMiddleware(forwarder, guard=guard, identify=_scope_user, tags=_scope_tags,
                               max_body_bytes=max_body_bytes if max_body_bytes is not None
                               else settings.max_body_bytes)
    gate = _Gate(guarded, keys=keys, user_header=user_header,
                 passthrough=passthrough if passthrough is not None else settings.passthrough,
                 openai=openai_target, anthropic=anthropic_target, guard=guard)

    async def healthz(request: Request) -> Response:
        # One status script against the budget store, bounded by redis_timeout_ms.
        try:
            await aorg_status(guard)
        except StoreUnavailable:
            return JSONResponse({"status": "unavailable", "store": "unreachable",
                                 "fail_mode": guard.config.fail_mode}, status_code=503,
                                headers={"cache-control": "no-store"})
        return JSONResponse({"status": "ok"}, headers={"cache-control": "no-store"})

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        if status == 405:
            doc = error_body("method_not_allowed", f"{request.method} {request.url.path}: method not allowed",
                             kind="invalid_request_error", anthropic=False)
        else:
            doc = error_body("not_found", f"{request.method} {request.url.path}: the budget proxy serves /v1/..., "
                             "/healthz and /metrics", kind="not_found_error", anthropic=False)
        return Response(doc, status_code=status, media_type="application/json")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        forwarder.start()
        log.info("budget proxy: /v1 -> %s, /v1/messages -> %s, %d api keys, user header %s, passthrough %s",
                 upstream, anthropic_upstream, len(keys), user_header or "off", gate.passthrough)
        try:
            yield
        finally:
            await forwarder.aclose()
            if close_guard:
                await guard.aclose()

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/metrics", metrics_app(guard.metrics)),
            Mount("/v1", app=gate),
        ],
        exception_handlers={404: not_found, 405: not_found},
        lifespan=lifespan,
    )
