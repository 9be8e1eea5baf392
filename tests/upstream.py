"""A fake LLM upstream (OpenAI and Anthropic shapes, JSON and SSE) and a uvicorn server for it.

Each route answers with the usage the test put in ``Upstream`` and records what it
received, so tests can assert what reached the app (or that nothing did).
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

TEXT = ["Budgets ", "keep ", "spend ", "in ", "check, ", "one ", "token ", "at ", "a ", "time."]


@dataclass
class Upstream:
    """What the fake upstream answers; tests change the fields."""

    prompt_tokens: int = 1000
    cached_tokens: int = 200
    completion_tokens: int = 50
    reasoning_tokens: int = 0
    # Anthropic: uncached input, cache reads, cache writes, output.
    a_input: int = 700
    a_cache_read: int = 100
    a_cache_write: int = 50
    a_output: int = 42
    status: int = 200  # answer with this error status instead (>= 400)
    # normal | cut (end without usage) | hang (keep-alives until the client leaves) | raise |
    # stall (send nothing more until the client leaves)
    mode: str = "normal"
    raise_before_start: bool = False
    chunks: list[str] = field(default_factory=lambda: list(TEXT))
    received: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)

    def sse(self, objs: list[Any], *, done: bool, anthropic: bool = False) -> Callable[[], AsyncIterator[bytes]]:
        """A body generator: ``objs`` as SSE events, then the ending ``mode`` asks for."""
        mode = self.mode

        async def gen() -> AsyncIterator[bytes]:
            for obj in objs:
                if obj is None:  # the usage position: what happens there depends on the mode
                    if mode == "cut":
                        return
                    if mode == "raise":
                        raise RuntimeError("upstream blew up mid-stream")
                    if mode == "stall":
                        try:
                            await asyncio.Event().wait()
                        finally:
                            self.disconnected.set()
                    if mode == "hang":
                        try:
                            while True:  # keep-alives until the client leaves
                                yield b": keep-alive\n\n"
                                await asyncio.sleep(0.02)
                        finally:
                            self.disconnected.set()
                    continue
                name = f"event: {obj['type']}\n" if anthropic else ""
                yield f"{name}data: {json.dumps(obj)}\n\n".encode()
            if done:
                yield b"data: [DONE]\n\n"

        return gen

    def record(self, request: Request, body: bytes) -> None:
        self.received.append((request.url.path, body, dict(request.headers)))


def create_upstream(up: Upstream) -> Starlette:
    def error(status: int) -> Response:
        return JSONResponse({"error": {"message": "upstream says no", "type": "server_error"}}, status_code=status)

    async def common(request: Request) -> tuple[dict[str, Any], Response | None]:
        body = await request.body()
        up.record(request, body)
        if up.raise_before_start:
            raise RuntimeError("upstream failed before answering")
        if up.status >= 400:
            return {}, error(up.status)
        return json.loads(body), None

    def openai_usage() -> dict[str, Any]:
        return {"prompt_tokens": up.prompt_tokens, "completion_tokens": up.completion_tokens,
                "total_tokens": up.prompt_tokens + up.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": up.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": up.reasoning_tokens}}

    async def chat(request: Request) -> Response:
        body, err = await common(request)
        if err:
            return err
        model = body["model"]
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
        if not body.get("stream"):
            return JSONResponse({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": "".join(up.chunks)}}],
                                 "usage": openai_usage()})
        include = (body.get("stream_options") or {}).get("include_usage") is True
        extra = {"usage": None} if include else {}
        objs: list[Any] = [{**base, **extra, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                          "finish_reason": None}]}]
        objs += [{**base, **extra, "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}
                 for t in up.chunks]
        objs.append({**base, **extra, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        objs.append(None)
        if include and up.mode == "normal":
            objs.append({**base, "choices": [], "usage": openai_usage()})
        return StreamingResponse(up.sse(objs, done=True)(), media_type="text/event-stream")

    async def completions(request: Request) -> Response:
        body, err = await common(request)
        if err:
            return err
        return JSONResponse({"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                             "choices": [{"index": 0, "text": "".join(up.chunks), "finish_reason": "stop"}],
                             "usage": openai_usage()})

    async def embeddings(request: Request) -> Response:
        body, err = await common(request)
        if err:
            return err
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return JSONResponse({"object": "list", "model": body["model"],
                             "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2]}
                                      for i in range(len(texts))],
                             "usage": {"prompt_tokens": up.prompt_tokens, "total_tokens": up.prompt_tokens}})

    def responses_usage() -> dict[str, Any]:
        return {"input_tokens": up.prompt_tokens, "output_tokens": up.completion_tokens,
                "total_tokens": up.prompt_tokens + up.completion_tokens,
                "input_tokens_details": {"cached_tokens": up.cached_tokens},
                "output_tokens_details": {"reasoning_tokens": up.reasoning_tokens}}

    def response_obj(model: str, status: str, usage: Any) -> dict[str, Any]:
        text = "".join(up.chunks) if status == "completed" else ""
        return {"id": "resp_1", "object": "response", "created_at": 1, "model": model, "status": status,
                "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "text": text, "annotations": []}]}] if text else [],
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "usage": usage}

    async def responses(request: Request) -> Response:
        body, err = await common(request)
        if err:
            return err
        model = body["model"]
        if not body.get("stream"):
            return JSONResponse(response_obj(model, "completed", responses_usage()))
        objs: list[Any] = [{"type": "response.created", "sequence_number": 0,
                            "response": response_obj(model, "in_progress", None)}]
        objs += [{"type": "response.output_text.delta", "sequence_number": i + 1, "item_id": "msg_1",
                  "output_index": 0, "content_index": 0, "delta": t, "logprobs": []} for i, t in enumerate(up.chunks)]
        objs.append(None)
        objs.append({"type": "response.completed", "sequence_number": 99,
                     "response": response_obj(model, "completed", responses_usage())})
        return StreamingResponse(up.sse(objs, done=False)(), media_type="text/event-stream")

    def anthropic_usage(output: int) -> dict[str, Any]:
        return {"input_tokens": up.a_input, "cache_read_input_tokens": up.a_cache_read,
                "cache_creation_input_tokens": up.a_cache_write, "output_tokens": output}

    async def messages(request: Request) -> Response:
        body, err = await common(request)
        if err:
            return err
        model = body["model"]
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "stop_sequence": None}
        if not body.get("stream"):
            return JSONResponse({**message, "content": [{"type": "text", "text": "".join(up.chunks)}],
                                 "stop_reason": "end_turn", "usage": anthropic_usage(up.a_output)})
        objs: list[Any] = [{"type": "message_start", "message": {**message, "content": [], "stop_reason": None,
                                                                 "usage": anthropic_usage(1)}},
                           {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                           {"type": "ping"}]
        objs += [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}
                 for t in up.chunks]
        objs.append({"type": "content_block_stop", "index": 0})
        objs.append(None)
        objs.append({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                     "usage": {"output_tokens": up.a_output}})
        objs.append({"type": "message_stop"})
        return StreamingResponse(up.sse(objs, done=False, anthropic=True)(), media_type="text/event-stream")

    async def other(request: Request) -> Response:
        body = await request.body()
        up.record(request, body)
        return JSONResponse({"echo": body.decode()}, headers={"x-echo-query": request.url.query})

    async def count_tokens(request: Request) -> Response:
        body = await request.body()
        up.record(request, body)
        return JSONResponse({"input_tokens": up.prompt_tokens})

    return Starlette(routes=[
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/models", other, methods=["GET", "POST"]),
    ])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Switch:
    """An ASGI app that forwards to whichever app a test plugs in (one server, many apps)."""

    def __init__(self) -> None:
        self.app: ASGIApp | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, to close guards on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.app is not None, "no app plugged in"
        self.loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)

    def close_guard(self, guard: Any) -> None:
        """Close a guard the plugged-in app used: on the server's loop, where its async
        clients and background tasks live, then its sync side."""
        if self.loop is not None and self.loop.is_running():
            asyncio.run_coroutine_threadsafe(guard.aclose(), self.loop).result(10)
        guard.close()


class Server:
    """uvicorn serving ``app`` on 127.0.0.1 in a background thread."""

    def __init__(self, app: ASGIApp, *, lifespan: str = "off") -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan=lifespan,
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


# -- what the fake upstream's answers cost, priced independently of the library ---------

MODELS = {
    "gpt-4o": {"input_per_mtok": "2.50", "output_per_mtok": "10.00", "cached_input_per_mtok": "1.25"},
    "gpt-4o-mini": {"input_per_mtok": "0.15", "output_per_mtok": "0.60", "cached_input_per_mtok": "0.075"},
    "claude-test-1": {"input_per_mtok": "3.00", "output_per_mtok": "15.00", "cached_input_per_mtok": "0.30",
                      "cache_write_per_mtok": "3.75"},
    "text-embedding-3-small": {"input_per_mtok": "0.02", "output_per_mtok": "0"},
}
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why budget LLM calls?"}]


def cost(model: str, input_tokens: int, output_tokens: int, cached: int = 0, written: int = 0) -> Decimal:
    """Price arithmetic done independently of the library, rounded up to the nano-dollar."""
    p = {k: Decimal(v) for k, v in MODELS[model].items()}
    exact = ((input_tokens - cached - written) * p["input_per_mtok"]
             + cached * p.get("cached_input_per_mtok", p["input_per_mtok"])
             + written * p.get("cache_write_per_mtok", p["input_per_mtok"]) + output_tokens * p["output_per_mtok"])
    return Decimal(math.ceil(exact * 1000)) / 10**9


def chat_cost(up: Upstream, model: str = "gpt-4o") -> Decimal:
    return cost(model, up.prompt_tokens, up.completion_tokens, cached=up.cached_tokens)


def anthropic_cost(up: Upstream, output: int | None = None) -> Decimal:
    total = up.a_input + up.a_cache_read + up.a_cache_write
    return cost("claude-test-1", total, up.a_output if output is None else output, cached=up.a_cache_read,
                written=up.a_cache_write)


def fallback_cost(model: str, text: str) -> Decimal:
    """What a stream without usage is charged: the estimated input plus the streamed output, counted."""
    from budgetguard.tokens import count_text_tokens, estimate_input_tokens

    return cost(model, estimate_input_tokens(model, MESSAGES), count_text_tokens(model, text))


def wait_for_proxy(proc: Any, port: int, timeout: float = 60.0) -> None:
    """Wait until a ``budgetguard proxy`` subprocess answers /healthz (its stderr if it died)."""
    import subprocess
    import time

    import httpx

    assert isinstance(proc, subprocess.Popen)
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the proxy did not answer /healthz"
        time.sleep(0.05)
