"""``BudgetMiddleware``: budgets in front of an OpenAI- or Anthropic-compatible ASGI app.

Pure ASGI, in the manner of Starlette's own middlewares: it wraps ``receive`` and
``send`` and never buffers a response. For each guarded ``POST`` it

1. names the user with ``identify(request)`` (401 when it cannot and no
   ``default_user`` is set);
2. reads the JSON body once (bounded by ``max_body_bytes``), validates it (400 on a
   bad body, and on work no reservation can bound: per-call tools, audio, background
   responses; the app not called, nothing reserved), estimates and reserves;
3. answers a denial itself (429, or 400 for per-request caps, 403 for a model the
   tier may not use, 503 when the store is down under ``fail_mode: closed``), or
   replays the body downstream, identical unless the model was routed, the output cap
   the reservation was priced on had to be set, or OpenAI's
   ``stream_options.include_usage`` had to be switched on; while the answer is in
   flight the reservation's lease is renewed;
4. reads the usage from the JSON answer or from the SSE events as they pass, and
   settles the reservation before the usage event (or the answer's last byte) goes
   out, so a client that has the whole answer sees its spend counted. Error answers (status >= 400)
   release it; a stream that ends without usage (cut upstream, client gone, app
   exception) is charged the estimated input plus the streamed output, counted.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .decision import Decision
from .details import CallDetails, details_from_response
from .errors import InvalidArgument, InvalidArgumentType
from .guard import BudgetGuard
from .redact import printable
from .routes import DEFAULT_ROUTES, ENDPOINTS, BadRoute, Endpoint, lenient_key, normal_path, route_key
from .streams import SSEParser, StreamUsage, usage_from_body
from .usage import Usage

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_ROUTES", "BudgetMiddleware", "Endpoint"]

log = logging.getLogger("budgetguard")

#: Request bodies above this are refused with a 400 before any JSON is parsed.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024

#: A cap denial whose Retry-After is longer than this tells SDKs not to retry (x-should-retry).
CLIENT_RETRY_MAX_S = 60

# A JSON answer is copied (not held back) up to this size to read its usage.
_MAX_JSON_RESPONSE_BYTES = 64 * 1024 * 1024

# A user id, or (user id, plans: budget name -> plan, e.g. {"user": "pro"}), or None.
Identified = str | tuple[str, Mapping[str, str]] | None
Identify = Callable[[Request], "Identified | Awaitable[Identified]"]
Tags = Callable[[Request, Mapping[str, Any]], "Mapping[str, str] | None"]


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _BadRequest(f"the JSON body has the key {key!r} more than once", code="duplicate_key")
            seen.add(key)
    return obj


def _no_constant(name: str) -> Any:
    raise _BadRequest(f"the JSON body contains {name}, which is not JSON", code="invalid_json")


def parse_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; duplicate keys, NaN and non-objects are refused."""
    if not body:
        raise _BadRequest("the request body is empty; a JSON object is expected", code="invalid_json")
    try:
        obj = json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _BadRequest:
        raise
    except RecursionError:
        raise _BadRequest("the JSON body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _BadRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise _BadRequest(f"the JSON body must be an object, got {type(obj).__name__}", code="invalid_json")
    return obj


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadRequest(f"{name} must be an integer, got {_type_name(value)}", name)
    if value < 1:
        raise _BadRequest(f"{name} must be at least 1, got {value}", name)
    return value


def _list(body: Mapping[str, Any], name: str, *, required: bool) -> list[Any] | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _BadRequest(f"{name} is required", name)
        return None
    if not isinstance(value, list):
        raise _BadRequest(f"{name} must be an array, got {_type_name(value)}", name)
    return value


# Token ids index a vocabulary; none has 2**32 entries.
_MAX_TOKEN_ID = 2**32


def _token_ids(value: list[Any]) -> bool:
    return all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < _MAX_TOKEN_ID for i in value)


def _texts(body: Mapping[str, Any], name: str, *, required: bool) -> Any:
    """A prompt: a string, strings, token ids (LangChain sends them) or lists of token ids."""
    value = body.get(name)
    if value is None:
        if required:
            raise _BadRequest(f"{name} is required", name)
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    if isinstance(value, list) and (_token_ids(value) or all(isinstance(item, list) and item and _token_ids(item)
                                                             for item in value)):
        return value  # counted as the tokens they are
    raise _BadRequest(f"{name} must be a string, an array of strings, an array of token ids or an array of "
                      f"arrays of token ids, got {_type_name(value)}", name)


# OpenAI's reasoning models refuse max_tokens; they are bounded by max_completion_tokens.
_COMPLETION_TOKENS_MODELS = re.compile(r"(?:.*/)?(?:o\d|gpt-5)", re.IGNORECASE)


# Work a reservation cannot bound: priced per call or per second rather than per token
# (built-in tools, audio, search models), adding to the input whatever the provider fetches
# (remote tools), or running on after the connection ends (background responses).
_FEE_TOOLS = ("web_search", "image_generation", "code_interpreter", "file_search", "code_execution", "web_fetch",
              "mcp")
_FEE_MODELS = re.compile(r".*-search-(?:preview|api)", re.IGNORECASE)  # a web search on every call
# Body fields billed as input besides messages, system, tools and prompt (a JSON schema's
# descriptions, a prediction, a suffix): counted with the rest.
_BILLED_FIELDS = ("response_format", "text", "output_format", "output_config", "prediction", "suffix")


def _refuse_unbounded(body: Mapping[str, Any], model: str, parts: list[dict[str, Any]]) -> None:
    def refuse(what: str, param: str) -> None:
        raise _BadRequest(f"{what} cannot be bounded by a budget reservation; the budget refuses it", param,
                          "not_budgetable")

    if body.get("background") is True:
        refuse("a background response runs on after the connection ends, so it", "background")
    modalities = body.get("modalities")
    if body.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        refuse("audio output, priced per audio token,", "modalities")
    if body.get("web_search_options") is not None:
        refuse("web search, priced per call,", "web_search_options")
    if _FEE_MODELS.match(model):
        refuse(f"the search model {printable(model, 60)!r}, priced per call,", "model")
    if body.get("mcp_servers"):
        refuse("a remote MCP server, whose results add to the input,", "mcp_servers")
    tools = body.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind.startswith(_FEE_TOOLS):
            refuse(f"the built-in tool {printable(kind, 60)!r}", f"tools[{i}]")
    for part in parts:
        if part.get("type") == "input_audio" or (part.get("role") == "assistant" and part.get("audio") is not None):
            refuse("audio input, priced per audio token,", "messages")


def _parts(items: Any) -> list[dict[str, Any]]:
    """Every mapping in a request's messages (or Responses input), at any depth: the items,
    their content parts, the parts of tool results and tool outputs."""
    found: list[dict[str, Any]] = []
    stack = [items]
    while stack and len(found) < 100_000:  # bounded: a body is at most max_body_bytes anyway
        node = stack.pop()
        if isinstance(node, dict):
            found.append(node)
            stack.extend(v for k, v in node.items() if k in ("content", "output") and isinstance(v, list))
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _fetches_input(body: Mapping[str, Any]) -> bool:
    """Whether the body points at stored input it does not hold (files in the messages
    are the engine's to see: :func:`budgetguard.tokens.uncountable_input`)."""
    if any(body.get(k) is not None for k in ("previous_response_id", "conversation")):
        return True
    return isinstance(body.get("prompt"), dict)  # a stored prompt (Responses), not a completions prompt


def _billed_extra(body: Mapping[str, Any]) -> str | None:
    """The fields billed as input besides the ones estimated on their own, as one JSON text."""
    extra = {k: body[k] for k in _BILLED_FIELDS if body.get(k) is not None}
    return json.dumps(extra, ensure_ascii=False, separators=(",", ":")) if extra else None


class _Call:
    """What one request asks for, as ``guard.check`` wants it, and what bounds its output.

    ``max_tokens`` is the whole output the request may produce (its cap times the
    choices it asks for), or None when it sets no cap; ``choices`` is that multiplier and
    ``cap_fields`` the body fields that cap one choice's output.
    """

    __slots__ = ("cap_fields", "choices", "fetched_input", "max_tokens", "messages", "model", "prompt", "stream",
                 "system", "tools")

    def __init__(self, endpoint: Endpoint, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is None:
            raise _BadRequest("model is required", "model")
        if not isinstance(model, str) or not model.strip():
            raise _BadRequest(f"model must be a non-empty string, got {_type_name(model)}", "model")
        self.model: str = model
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise _BadRequest(f"stream must be a boolean, got {_type_name(stream)}", "stream")
        self.stream = bool(stream)
        self.messages: list[Any] | None = None
        self.prompt: str | list[str] | None = None
        self.system: Any = None
        self.tools: list[Any] | None = None
        self.max_tokens: int | None = None
        self.choices = 1
        self.cap_fields: tuple[str, ...] = ()
        getattr(self, f"_{endpoint}")(body)
        parts = _parts(self.messages)
        _refuse_unbounded(body, self.model, parts)
        # Input the provider fetches itself (a file, a URL, a stored conversation or prompt)
        # is reserved at the tier's input cap: its size is not in the body.
        self.fetched_input = _fetches_input(body)
        extra = _billed_extra(body)
        if extra is not None:
            if self.prompt is None:
                self.prompt = extra
            elif isinstance(self.prompt, str):
                self.prompt = [self.prompt, extra]
            elif all(isinstance(p, str) for p in self.prompt):
                self.prompt = [*self.prompt, extra]
            else:  # token ids: a text cannot join them
                raise _BadRequest("a suffix with a prompt of token ids cannot be estimated; send the prompt as text",
                                  "suffix", "not_budgetable")

    def _chat(self, body: dict[str, Any]) -> None:
        self.messages = _list(body, "messages", required=True)
        tools = _list(body, "tools", required=False) or []
        functions = _list(body, "functions", required=False) or []  # the legacy spelling of tools
        self.tools = (tools + functions) or None
        caps = [c for c in (_positive_int(body, "max_completion_tokens"), _positive_int(body, "max_tokens")) if c]
        # Both given: the worst case is the larger one.
        self.max_tokens = max(caps) if caps else None
        self.cap_fields = ("max_completion_tokens", "max_tokens")
        self._times(body, "n")

    def _completions(self, body: dict[str, Any]) -> None:
        self.prompt = _texts(body, "prompt", required=True)
        self.max_tokens = _positive_int(body, "max_tokens")
        self.cap_fields = ("max_tokens",)
        self._times(body, "n")
        self._times(body, "best_of")

    def _times(self, body: dict[str, Any], name: str) -> None:
        # n choices (or best_of candidates) each produce up to max_tokens of output.
        n = _positive_int(body, name)
        if n is not None and n > 1:
            self.choices *= n
            if self.max_tokens is not None:
                self.max_tokens *= n

    def _responses(self, body: dict[str, Any]) -> None:
        value = body.get("input")
        if isinstance(value, str):
            self.messages = [{"role": "user", "content": value}]
        elif value is None or isinstance(value, list):
            self.messages = value
        else:
            raise _BadRequest(f"input must be a string or an array, got {_type_name(value)}", "input")
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise _BadRequest(f"instructions must be a string, got {_type_name(instructions)}", "instructions")
        self.system = instructions
        self.tools = _list(body, "tools", required=False)
        self.max_tokens = _positive_int(body, "max_output_tokens")
        self.cap_fields = ("max_output_tokens",)

    def _embeddings(self, body: dict[str, Any]) -> None:
        self.prompt = _texts(body, "input", required=True)
        # No output: the engine wants at least one output token, which embedding models price at zero.
        self.max_tokens = 1

    def bound_output(self, body: dict[str, Any], model: str, reserved: int) -> bool:
        """Make ``body`` cap its output at what was reserved; whether it changed.

        The reservation was priced on ``reserved`` output tokens over all choices: a request
        that sets no cap (or, through a routed model, a larger one) would let the upstream
        spend past it. :class:`_BadRequest` when a choice cannot get even one token.
        """
        if not self.cap_fields:
            return False  # embeddings produce no output
        per_choice = reserved // self.choices
        if per_choice < 1:
            raise _BadRequest(f"the {self.choices} choices asked for cannot share the {reserved} output tokens this "
                              f"request may use; ask for fewer or set {self.cap_fields[0]}", self.cap_fields[0])
        given = [f for f in self.cap_fields if body.get(f) is not None]
        if not given:
            field = self.cap_fields[0]
            if field == "max_completion_tokens" and not _COMPLETION_TOKENS_MODELS.match(model):
                field = "max_tokens"  # what every OpenAI-compatible server knows
            body[field] = per_choice
            return True
        changed = False
        for f in given:
            if body[f] > per_choice:
                body[f] = per_choice
                changed = True
        return changed

    def _messages(self, body: dict[str, Any]) -> None:
        self.messages = _list(body, "messages", required=True)
        system = body.get("system")
        if system is not None and not isinstance(system, str | list):
            raise _BadRequest(f"system must be a string or an array, got {_type_name(system)}", "system")
        self.system = system
        self.tools = _list(body, "tools", required=False)
        self.max_tokens = _positive_int(body, "max_tokens")
        self.cap_fields = ("max_tokens",)


def _route_path(scope: Scope) -> tuple[str, str]:
    """(root_path, the path below it) as a router matches it.

    Behind ``--root-path`` or under a ``Mount``, ``path`` includes ``root_path`` (ASGI 3),
    and routers strip it before matching: so must the budget, or every guarded route would
    pass unbudgeted.
    """
    root: str = scope.get("root_path", "")
    path: str = scope["path"]
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return root, path[len(root):] or "/"
    return "", path


def _status_for(limit: str | None) -> int:
    if limit == "store.unavailable":
        return 503
    if limit == "model.not_allowed":
        return 403
    if limit is not None and (limit.startswith("request.") or limit.startswith("model.")):
        return 400
    return 429


def _usd(value: Decimal) -> str:
    return format(value, "f")


class BudgetMiddleware:
    """Budget enforcement for the OpenAI and Anthropic routes of an ASGI app.

    ``identify(request)`` (sync or async) returns the user id from the app's own auth,
    or ``(user id, plans)`` when the app decides the user's plan at run time (``plans``
    as for ``guard.check``: ``{"user": "pro"}``), or None; the request it sees has no
    body access (the body has not been read yet).
    ``routes`` maps paths to the API they speak (:data:`DEFAULT_ROUTES`); every other
    path, and every method but POST, passes through untouched. ``default_user`` is
    charged for requests ``identify`` cannot name (otherwise they get 401).
    ``max_body_bytes`` bounds the request body (a larger one gets 400).
    ``tags(request, body)`` may return tags for the usage records.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        guard: BudgetGuard,
        identify: Identify,
        routes: Mapping[str, Endpoint] | None = None,
        default_user: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        tags: Tags | None = None,
    ) -> None:
        if not isinstance(guard, BudgetGuard):
            raise InvalidArgumentType(f"guard must be a BudgetGuard, got {type(guard).__name__}")
        if not callable(identify):
            raise InvalidArgumentType("identify must be a callable taking a starlette Request")
        routes = dict(DEFAULT_ROUTES if routes is None else routes)
        # Matched on the normal form of the path (see budgetguard.routes); each keeps its spelling.
        self._routes: dict[str, tuple[str, Endpoint]] = {}
        for path, endpoint in routes.items():
            if endpoint not in ENDPOINTS:
                raise InvalidArgument(f"routes[{path!r}] = {endpoint!r}; expected one of {sorted(ENDPOINTS)}")
            try:
                normal = normal_path(path)
            except BadRoute as exc:
                raise InvalidArgument(f"routes[{path!r}]: {exc}") from None
            self._routes[route_key(normal)] = (normal, endpoint)
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise InvalidArgument(f"max_body_bytes must be a positive int, got {max_body_bytes!r}")
        if default_user is not None and (not isinstance(default_user, str) or not default_user.strip()):
            raise InvalidArgument("default_user must be a non-empty string or None")
        self.app = app
        self.guard = guard
        self.identify = identify
        self.routes = routes
        self.default_user = default_user
        self.max_body_bytes = max_body_bytes
        self.tags = tags

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Any spelling of POST and of a guarded path is guarded (budgetguard.routes).
        if scope["type"] != "http" or str(scope.get("method", "")).upper() != "POST":
            await self.app(scope, receive, send)
            return
        root, path = _route_path(scope)
        try:
            route = self._routes.get(route_key(normal_path(path, scope.get("raw_path"))))
        except BadRoute as exc:
            near = self._routes.get(lenient_key(path))
            if near is not None:
                # It would likely reach a guarded route unbudgeted: refuse rather than guess.
                await _Exchange(self, near[1], scope, receive, send).error(
                    400, "invalid_request_error", f"invalid path: {exc}", "invalid_path")
                return
            route = None
        if route is None:
            await self.app(scope, receive, send)
            return
        normal, endpoint = route
        # Downstream sees the route as it was budgeted.
        scope = {**scope, "method": "POST", "path": root + normal, "raw_path": (root + normal).encode()}
        await _Exchange(self, endpoint, scope, receive, send).run()


class _Exchange:
    """One guarded request and its answer."""

    def __init__(self, mw: BudgetMiddleware, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        self.mw = mw
        self.endpoint = endpoint
        self.anthropic = endpoint == "messages"
        self.scope = scope
        self.receive = receive
        self.send = send
        self.decision: Decision | None = None
        self.renewal: asyncio.TimerHandle | None = None
        self.renewing: asyncio.Future[None] | None = None
        self.body = b""
        self.body_sent = False
        # The answer.
        self.started = False
        self.finished = False
        self.status = 0
        self.settled = False
        self.sse: SSEParser | None = None
        self.tracker: StreamUsage | None = None
        self.strip_usage_chunk = False
        self.json_body: bytearray | None = None
        self.details = CallDetails()  # finish reason and usage object of a JSON answer

    # -- request -----------------------------------------------------------------------

    async def run(self) -> None:
        request = Request(self.scope)
        user = self.mw.identify(request)
        if inspect.isawaitable(user):
            user = await user
        plans = None
        if isinstance(user, tuple) and len(user) == 2:
            user, plans = user
        if user is None or (isinstance(user, str) and not user.strip()):
            user = self.mw.default_user
        if user is None:
            await self.error(401, "authentication_error", "the request could not be identified for budgeting",
                             "unidentified")
            return
        body = await self.read_body()
        if body is None:
            return
        try:
            parsed = parse_body(body)
            call = _Call(self.endpoint, parsed)
            tags = self.mw.tags(request, parsed) if self.mw.tags is not None else None
            decision = await self.mw.guard.acheck(
                user, call.model, call.messages, max_tokens=call.max_tokens, tags=tags, tools=call.tools,
                prompt=call.prompt, system=call.system, fetched_input=call.fetched_input, plans=plans)
        except _BadRequest as exc:
            await self.error(400, "invalid_request_error", exc.message, exc.code, param=exc.param)
            return
        except (InvalidArgument, InvalidArgumentType) as exc:
            await self.error(400, "invalid_request_error", str(exc), "invalid_request")
            return
        if not decision.allowed:
            await self.deny(decision)
            return
        try:
            self.body = self.downstream_body(body, parsed, call, decision)
        except _BadRequest as exc:
            await self.mw.guard.arelease(decision, error=exc.message)
            await self.error(400, "invalid_request_error", exc.message, exc.code, param=exc.param)
            return
        self.decision = decision
        # While the answer is in flight its lease is renewed, a third of its ttl at a time. A
        # timer, not a task: most answers end long before the first renewal is due.
        self.renewal = asyncio.get_running_loop().call_later(self.renew_every, self.renew_due, decision)
        try:
            await self.mw.app(self.downstream_scope(), self.replay, self.send_wrapper)
        finally:
            self.renewal.cancel()
            if self.renewing is not None:
                self.renewing.cancel()
            if not self.settled:
                await self.settle()

    @property
    def renew_every(self) -> float:
        return self.mw.guard.config.reservation_ttl_s / 3

    def renew_due(self, decision: Decision) -> None:
        if not self.settled:
            self.renewing = asyncio.ensure_future(self.renew(decision))

    async def renew(self, decision: Decision) -> None:
        if await self.mw.guard.arenew(decision) and not self.settled:
            self.renewal = asyncio.get_running_loop().call_later(self.renew_every, self.renew_due, decision)

    async def read_body(self) -> bytes | None:
        """The whole request body, or None once an answer (or nothing, for a gone client) is due."""
        limit = self.mw.max_body_bytes
        declared = Headers(scope=self.scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self.too_large()
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return None  # nobody to answer; nothing was reserved
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self.too_large()
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def too_large(self) -> None:
        await self.error(400, "invalid_request_error",
                         f"the request body exceeds the budget middleware's limit of {self.mw.max_body_bytes} bytes",
                         "request_too_large")

    def downstream_body(self, body: bytes, parsed: dict[str, Any], call: _Call, decision: Decision) -> bytes:
        changed = call.bound_output(parsed, decision.model, decision.max_output_tokens)
        if decision.model != call.model:
            parsed["model"] = decision.model
            changed = True
        if call.stream and self.endpoint in ("chat", "completions"):
            options = parsed.get("stream_options")
            if not isinstance(options, dict) or options.get("include_usage") is not True:
                # The usage comes in a final chunk only when asked for; that chunk (no
                # choices) is taken out again before the client, which did not ask, sees it.
                parsed["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                self.strip_usage_chunk = True
                changed = True
        if not changed:
            return body
        # ASCII escapes keep any JSON string (a lone surrogate included) encodable.
        return json.dumps(parsed, ensure_ascii=True, separators=(",", ":")).encode()

    def downstream_scope(self) -> Scope:
        headers = [(k, v) for k, v in self.scope["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(self.body)).encode()))
        return {**self.scope, "headers": headers}

    async def replay(self) -> Message:
        if not self.body_sent:
            self.body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        return await self.receive()  # http.disconnect, for apps that listen for it

    # -- answer ------------------------------------------------------------------------

    async def send_wrapper(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            message = self.start(message)
        elif kind == "http.response.body" and self.started:
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if self.status < 400:
                if self.sse is not None:
                    body = self.read_sse(body, more)
                    message = {**message, "body": body}
                    if self.tracker is not None and self.tracker.final:
                        # Settled before the usage event goes out: a client that stops
                        # reading there (SDKs stop at [DONE]) finds its spend counted.
                        await self.settle()
                elif self.json_body is not None:
                    if len(self.json_body) + len(body) <= _MAX_JSON_RESPONSE_BYTES:
                        self.json_body += body
                    else:
                        self.json_body = None
            if not more:
                self.finished = True
                # Settled before the last byte goes out: a client holding the whole
                # answer finds its spend counted.
                await self.settle()
        await self.send(message)

    def start(self, message: Message) -> Message:
        self.started = True
        self.status = message["status"]
        # The budget headers are ours alone: an app's (or an upstream's) own are dropped.
        headers = MutableHeaders(raw=[(k, v) for k, v in message.get("headers", [])
                                      if not k.lower().startswith(b"x-budget-")])
        self.budget_headers(headers, self.decision)
        if self.status < 400:
            if headers.get("content-encoding", "identity") != "identity":
                log.warning("%s answered with content-encoding %s: its usage cannot be read; put BudgetMiddleware "
                            "inside compression", self.scope["path"], printable(headers.get("content-encoding")))
            elif headers.get("content-type", "").partition(";")[0].strip().lower() == "text/event-stream":
                assert self.decision is not None
                self.sse = SSEParser()
                self.tracker = StreamUsage(self.decision.model)
                if self.strip_usage_chunk and "content-length" in headers:
                    del headers["content-length"]  # the stream is rewritten: its length changes
            else:
                self.json_body = bytearray()
        return {**message, "headers": headers.raw}

    def read_sse(self, body: bytes, more: bool) -> bytes:
        assert self.sse is not None and self.tracker is not None
        events = self.sse.feed(body)
        if not self.strip_usage_chunk:
            for event in events:
                self.tracker.feed_sse(event)
            return body
        kept: list[bytes] = []
        for event in events:
            obj = self.tracker.feed_sse(event)
            if isinstance(obj, dict) and "usage" in obj:
                if obj.get("choices") == [] and obj["usage"] is not None:
                    continue  # the usage chunk this middleware asked for on the client's behalf
                if obj["usage"] is None:
                    # include_usage adds "usage": null to every other chunk: the client gets the
                    # stream it asked for, without it.
                    del obj["usage"]
                    name = f"event: {event.event}\n".encode() if event.event else b""
                    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
                    kept.append(name + b"data: " + data + b"\n\n")
                    continue
            kept.append(event.raw)
        if not more:
            kept.append(self.sse.pending())
        return b"".join(kept)

    def budget_headers(self, headers: MutableHeaders, decision: Decision | None) -> None:
        if decision is None:
            return
        if not decision.enforced:
            headers["X-Budget-Enforced"] = "false"
        elif decision.remaining_usd is not None:
            headers["X-Budget-Remaining-USD"] = _usd(decision.remaining_usd)
        elif decision.allowed:
            headers["X-Budget-Remaining-USD"] = "unlimited"
        headers["X-Budget-Limit"] = decision.limit or "none"
        if decision.downgraded:
            headers["X-Budget-Model-Routed"] = decision.model

    # -- settling ----------------------------------------------------------------------

    def outcome(self) -> tuple[Usage | None, bool, str | None]:
        """(usage to record or None to release, whether the answer was incomplete, why released)."""
        d = self.decision
        assert d is not None
        if not self.started:
            return None, False, "the app raised or returned before answering"
        if self.status >= 400:
            return None, False, f"the app answered {self.status}"
        if self.tracker is not None:
            if self.tracker.usage is not None:
                return self.tracker.usage, False, None
            log.warning("stream for user %s (%s) ended without usage (%s after %d events); charging the estimated "
                        "input plus the streamed output", printable(d.user), printable(d.model),
                        "complete" if self.finished else "cut short", self.tracker.events)
            return self.tracker.fallback(d.estimated_input_tokens), True, None
        if self.json_body is not None and self.finished:
            try:
                answer = json.loads(self.json_body)
                self.details = details_from_response(answer)
                return usage_from_body(answer), False, None
            except (ValueError, TypeError) as exc:
                reason = str(exc)
        else:
            reason = "the answer was cut short" if not self.finished else "the answer could not be read"
        log.warning("no usage in the answer to user %s (%s): %s; charging the reserved worst case", printable(d.user),
                    printable(d.model), printable(reason))
        return Usage(d.estimated_input_tokens, d.max_output_tokens), not self.finished, None

    async def settle(self) -> None:
        if self.settled or self.decision is None:
            return
        self.settled = True
        d = self.decision
        try:
            usage, incomplete, why = self.outcome()
        except Exception:
            # Whatever failed in reading the answer, the reservation must not stay behind.
            log.exception("reading the usage of the answer to user %s failed; charging the reserved worst case",
                          printable(d.user))
            usage, incomplete, why = Usage(d.estimated_input_tokens, d.max_output_tokens), not self.finished, None
        task = asyncio.ensure_future(self._settle(d, usage, incomplete, why))
        # Shielded and tracked: a cancelled request must not leave its reservation behind.
        self.mw.guard._track(task)
        await asyncio.shield(task)

    async def _settle(self, decision: Decision, usage: Usage | None, incomplete: bool, why: str | None) -> None:
        guard = self.mw.guard
        try:
            if usage is None:
                await guard.arelease(decision, error=why)
                return
            details = self.details.merged(CallDetails(
                streamed=self.tracker is not None, endpoint=self.endpoint,
                finish_reason=self.tracker.finish_reason if self.tracker is not None else None))
            try:
                await guard.arecord(decision, usage, incomplete=incomplete, details=details)
            except (InvalidArgument, InvalidArgumentType) as exc:
                log.warning("usage %s of user %s is not recordable (%s); charging the reserved worst case", usage,
                            printable(decision.user), printable(exc))
                await guard.arecord(decision, Usage(decision.estimated_input_tokens, decision.max_output_tokens),
                                    incomplete=incomplete, details=details)
        except Exception:
            log.exception("settling reservation %s of user %s failed", decision.reservation_id,
                          printable(decision.user))

    # -- errors ------------------------------------------------------------------------

    async def deny(self, decision: Decision) -> None:
        status = _status_for(decision.limit)
        headers = MutableHeaders()
        self.budget_headers(headers, decision)
        if decision.retry_after is not None:
            headers["Retry-After"] = str(decision.retry_after)
        elif status == 503:
            headers["Retry-After"] = "1"
        if status == 429 and (decision.retry_after is None or decision.retry_after > CLIENT_RETRY_MAX_S):
            # The OpenAI and Anthropic SDKs retry a 429 after sleeping its Retry-After, however
            # long (a month's reset overflows some); this tells them not to.
            headers["x-should-retry"] = "false"
        await self.error(status, "budget_exceeded", decision.reason, decision.limit, headers=headers)

    async def error(self, status: int, kind: str, message: str, code: str | None, *, param: str | None = None,
                    headers: MutableHeaders | None = None) -> None:
        if self.anthropic:
            payload: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
            if code is not None:
                payload["error"]["code"] = code
        else:
            payload = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        content = json.dumps(payload, ensure_ascii=True).encode()
        raw = headers.raw if headers is not None else []
        await self.send({"type": "http.response.start", "status": status,
                         "headers": [(b"content-type", b"application/json"),
                                     (b"content-length", str(len(content)).encode()), *raw]})
        await self.send({"type": "http.response.body", "body": content, "more_body": False})
