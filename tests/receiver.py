"""A real HTTP server on 127.0.0.1 standing in for Slack, PagerDuty and webhooks."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


class Receiver:
    """Records every POST; answers per path from a script of statuses (default 200).

    ``hold`` makes the server keep requests waiting (a hanging sink) until released.
    """

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.lock = threading.Condition()
        self.scripts: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.hold = threading.Event()
        self.hold.set()  # set: answer at once
        self.waiting = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                with receiver.lock:
                    receiver.requests.append(Received(self.path, dict(self.headers), json.loads(raw)))
                    script = receiver.scripts.get(self.path)
                    status, headers = script.pop(0) if script else (200, {})
                    receiver.waiting += 1
                    receiver.lock.notify_all()
                receiver.hold.wait(30)
                with receiver.lock:
                    receiver.waiting -= 1
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def bodies(self, path: str) -> list[Any]:
        with self.lock:
            return [r.body for r in self.requests if r.path == path]

    def wait_for(self, path: str, count: int, timeout: float = 10) -> list[Any]:
        with self.lock:
            self.lock.wait_for(lambda: len([r for r in self.requests if r.path == path]) >= count, timeout)
        return self.bodies(path)


@contextmanager
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    thread = threading.Thread(target=r.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield r
    finally:
        r.hold.set()
        r.server.shutdown()
        r.server.server_close()
