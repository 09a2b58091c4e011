"""Real servers and raw sockets for the disconnect tests.

Servers run in the test's own asyncio loop on 127.0.0.1 with an ephemeral port; the
raw-socket clients run in a worker thread so that a blocking socket never stalls the
server they talk to.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Literal

import anyio

from asgi_disconnect._types import ASGIApp, Receive, Scope, Send

ServerKind = Literal["uvicorn-h11", "uvicorn-httptools", "hypercorn"]
SERVERS: tuple[ServerKind, ...] = ("uvicorn-h11", "uvicorn-httptools", "hypercorn")


def _bound_socket() -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets, and without it
    # every keep-alive response after the first waits ~40 ms for Nagle.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def run_server(app: ASGIApp, kind: ServerKind) -> AsyncIterator[int]:
    """Serve ``app`` with a real server in this event loop; yield its port."""
    sock = _bound_socket()
    port: int = sock.getsockname()[1]
    async with anyio.create_task_group() as tg:
        if kind.startswith("uvicorn"):
            import uvicorn

            config = uvicorn.Config(
                app,
                http=kind.removeprefix("uvicorn-"),
                lifespan="off",
                log_level="warning",
                access_log=False,
            )
            server = uvicorn.Server(config)
            tg.start_soon(lambda: server.serve(sockets=[sock]))
            try:
                await wait_for_port(port)
                yield port
            finally:
                server.should_exit = True
        else:
            from hypercorn.asyncio import serve
            from hypercorn.config import Config

            hconfig = Config()
            hconfig.bind = [f"fd://{sock.fileno()}"]
            hconfig.accesslog = None
            hconfig.errorlog = logging.getLogger("hypercorn.error")
            hconfig.graceful_timeout = 1
            stop = anyio.Event()
            tg.start_soon(lambda: serve(app, hconfig, shutdown_trigger=stop.wait, mode="asgi"))
            try:
                await wait_for_port(port)
                yield port
            finally:
                stop.set()
    with contextlib.suppress(OSError):
        sock.close()  # the server may have closed its listening socket already


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


async def wait_for_port(port: int) -> None:
    with anyio.fail_after(5):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.01)
            else:
                await stream.aclose()
                return


def request_bytes(
    method: str = "GET", path: str = "/", headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body and not any(name.lower() in ("content-length", "transfer-encoding") for name in headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@contextlib.contextmanager
def raw_connection(port: int, timeout: float = 5.0) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        yield sock
    finally:
        sock.close()


def close(sock: socket.socket, how: Literal["fin", "rst"]) -> None:
    """Close like a client that leaves: an orderly FIN, or an abortive RST."""
    if how == "rst":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()  # the server may have closed its listening socket already


def read_until(sock: socket.socket, marker: bytes, limit: int = 1 << 22, timeout: float = 5.0) -> bytes:
    """Read until ``marker`` has been seen (bounded in size and time)."""
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        if len(data) > limit or time.monotonic() > deadline:
            raise AssertionError(f"{marker!r} not seen in {len(data)} bytes: {data[:200]!r}")
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before {marker!r}: {data[:200]!r}")
        data += chunk
    return data


def read_then_leave(port: int, path: str, marker: bytes, how: Literal["fin", "rst"] = "rst") -> float:
    """Request ``path``, read until ``marker``, leave; return ``time.monotonic()`` as it closes."""
    with raw_connection(port) as sock:
        sock.sendall(request_bytes(path=path))
        read_until(sock, marker, limit=1 << 24)
        left_at = time.monotonic()
        close(sock, how)
    return left_at


async def wait_for(event: anyio.Event, what: str, within: float = 5.0) -> None:
    """Wait for ``event`` at most ``within`` seconds; fail saying ``what`` did not happen."""
    with anyio.move_on_after(within) as timeout:
        await event.wait()
    assert not timeout.cancel_called, f"{what}: not within {within} s"


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (Content-Length or chunked); return status, headers, body."""
    deadline = time.monotonic() + timeout
    data = b""

    def more() -> None:
        nonlocal data
        if time.monotonic() > deadline or len(data) > 1 << 24:
            raise AssertionError(f"incomplete response after {len(data)} bytes: {data[:200]!r}")
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed mid-response: {data[:200]!r}")
        data += chunk

    while b"\r\n\r\n" not in data:
        more()
    head, _, data = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            while b"\r\n" not in data:
                more()
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line, 16)
            while len(data) < size + 2:
                more()
            body += data[:size]
            data = data[size + 2 :]
            if size == 0:
                return int(status_line.split()[1]), headers, body
    length = int(headers.get("content-length", "0"))
    while len(data) < length:
        more()
    return int(status_line.split()[1]), headers, data[:length]
