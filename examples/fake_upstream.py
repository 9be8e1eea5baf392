"""A fake OpenAI-compatible upstream for the examples: no network, no API key.

``POST /v1/chat/completions`` answers with a fixed reply and usage, as JSON or as an SSE
stream (with the final usage chunk when ``stream_options.include_usage`` is on), the
way OpenAI does. Serve it with ``python examples/fake_upstream.py --serve [--port 8081]``
or start it in a thread with :func:`serve_in_thread`; without ``--serve`` the script
answers one request of its own and exits.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

REPLY = ["Budgets ", "are ", "reserved ", "before ", "the ", "call ", "and ", "settled ", "after."]
USAGE = {"prompt_tokens": 1024, "completion_tokens": 9, "total_tokens": 1033}


async def chat(request: Request) -> Response:
    body = await request.json()
    base = {"id": "chatcmpl-fake", "created": int(time.time()), "model": body["model"]}
    if not body.get("stream"):
        return JSONResponse({**base, "object": "chat.completion", "usage": USAGE,
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "".join(REPLY)}}]})
    include_usage = (body.get("stream_options") or {}).get("include_usage") is True

    async def events() -> AsyncIterator[bytes]:
        for i, text in enumerate(REPLY):
            chunk = {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"content": text},
                                  "finish_reason": "stop" if i == len(REPLY) - 1 else None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        if include_usage:
            final = {**base, "object": "chat.completion.chunk", "choices": [], "usage": USAGE}
            yield f"data: {json.dumps(final)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def create_app() -> Starlette:
    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_in_thread(app: object, port: int | None = None) -> tuple[uvicorn.Server, str]:
    """Serve ``app`` on 127.0.0.1 in a daemon thread; return the server and its base URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",  # type: ignore[arg-type]
                                           lifespan="off"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server, f"http://127.0.0.1:{port}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="serve until interrupted")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    if args.serve:
        uvicorn.run(create_app(), host="127.0.0.1", port=args.port)
    else:
        import httpx

        server, url = serve_in_thread(create_app())
        answer = httpx.post(f"{url}/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []}).json()
        print("fake upstream answered:", answer["choices"][0]["message"]["content"], "usage:", answer["usage"])
        server.should_exit = True
