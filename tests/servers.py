"""Real servers and raw sockets for the byte-exact disconnect tests: the toolkit's engine
(``asgi_disconnect._loopback``) under the names the tests use, and the test-only helpers.

A test whose client sends one request and leaves at a point (before the response, after
some chunks) uses ``asgi_disconnect.testing``'s ``serve()`` and ``live.request(leave=...)``.
What is here is for the rest: hostile or hand-made bytes, several requests on one
connection, a client that stops reading, servers in processes of their own. Servers run
in the test's own asyncio loop on 127.0.0.1 with an ephemeral port; the raw-socket clients
run in a worker thread so that a blocking socket never stalls the server they talk to.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Literal

import anyio

from asgi_disconnect._loopback import (
    CloseKind,
    close,
    free_port,
    read_response,
    read_until,
    request_bytes,
    request_then_leave,
    run_process,
    serve,
)
from asgi_disconnect._loopback import connect as raw_connection
from asgi_disconnect._types import ASGIApp, Receive, Scope, Send

__all__ = [
    "SERVERS",
    "Outermost",
    "ServerKind",
    "close",
    "free_port",
    "raw_connection",
    "read_response",
    "read_then_leave",
    "read_until",
    "request_bytes",
    "run_process",
    "run_server",
    "wait_for",
]

ServerKind = Literal["uvicorn-h11", "uvicorn-httptools", "hypercorn"]
SERVERS: tuple[ServerKind, ...] = ("uvicorn-h11", "uvicorn-httptools", "hypercorn")


@contextlib.asynccontextmanager
async def run_server(app: ASGIApp, kind: ServerKind) -> AsyncIterator[int]:
    """Serve ``app`` with a real server in this event loop; yield its port."""
    async with serve(app, server=kind) as live:
        yield live.port


class Outermost:
    """The app the server calls: counts the HTTP requests that started and ended, keeps what
    escaped to the server and when the last request returned.

    Other scopes reach ``app`` too, unless ``pass_other_scopes`` is false: then lifespan is
    answered by returning at once (hypercorn goes on without lifespan support, quietly).
    """

    def __init__(self, app: ASGIApp, *, pass_other_scopes: bool = True) -> None:
        self.app = app
        self.pass_other_scopes = pass_other_scopes
        self.started = 0
        self.ended = 0
        self.escaped: list[BaseException] = []
        self.returned = anyio.Event()
        self.returned_at: float | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if self.pass_other_scopes:
                await self.app(scope, receive, send)
            return
        self.started += 1
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            self.escaped.append(exc)
            raise
        finally:
            self.ended += 1
            self.returned_at = time.monotonic()
            self.returned.set()


async def wait_for(event: anyio.Event, what: str, within: float = 5.0) -> None:
    """Wait for ``event`` at most ``within`` seconds; fail saying ``what`` did not happen."""
    with anyio.move_on_after(within) as timeout:
        await event.wait()
    assert not timeout.cancel_called, f"{what}: not within {within} s"


def read_then_leave(port: int, path: str, marker: bytes, how: CloseKind = "rst") -> float:
    """Request ``path``, read until ``marker``, leave; return ``time.monotonic()`` as it closes."""
    return request_then_leave(port, path, until=marker, how=how)
