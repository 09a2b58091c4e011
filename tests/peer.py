"""A hand-made server side for one ASGI HTTP request, on any anyio backend."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import anyio

from asgi_disconnect._types import ASGIApp, Message, Scope


def http_scope(
    path: str = "/", method: str = "GET", headers: Iterable[tuple[bytes, bytes]] = (), **extra: Any
) -> Scope:
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    scope.update(extra)
    return scope


class Peer:
    """The server: delivers ``body`` chunks in order, then blocks until ``disconnect()``.

    It counts ``receive()`` calls and keeps every message the app sent. ``send_error``
    makes ``send()`` raise, like an ASGI 2.4 server after the client left.
    """

    def __init__(self, chunks: Iterable[bytes] = (b"",)) -> None:
        chunks = list(chunks)
        self.pending: list[Message] = [
            {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks)
        ]
        self.receive_calls = 0
        self.sent: list[Message] = []
        self.send_error: BaseException | None = None
        self.gone = anyio.Event()
        self.body_sent = anyio.Event()  # set once a non-empty body chunk was sent
        self._more = anyio.Event()
        self.held = False  # body messages wait for release() when True

    async def receive(self) -> Message:
        self.receive_calls += 1
        while self.held and self.pending and not self.gone.is_set():
            await self._more.wait()
        if self.pending and not self.gone.is_set():
            return self.pending.pop(0)
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.send_error is not None:
            raise self.send_error
        self.sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            self.body_sent.set()

    def disconnect(self) -> None:
        self.gone.set()
        self._more.set()

    def release(self) -> None:
        self.held = False
        self._more.set()

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


async def abort_after(app: ASGIApp, peer: Peer, delay: float = 0.05, path: str = "/") -> None:
    """Run ``app`` for one request on ``peer``, whose client leaves after ``delay`` seconds (5 s at most in all)."""

    async def leave() -> None:
        await anyio.sleep(delay)
        peer.disconnect()

    async with anyio.create_task_group() as tg:
        tg.start_soon(leave)
        with anyio.fail_after(5):
            await app(http_scope(path=path), peer.receive, peer.send)
