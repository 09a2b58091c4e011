"""Shared by the streaming examples: a real uvicorn on a free loopback port, and a
raw-socket client that reads until a marker and then leaves with a TCP RST."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator

import uvicorn
from starlette.types import ASGIApp


@contextlib.asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[int]:
    """Serve ``app`` with uvicorn on a free port of 127.0.0.1; yield the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):  # at most 5 s to start
            if server.started or serving.done():
                break
            await asyncio.sleep(0.01)
        if not server.started:
            raise RuntimeError("the server did not start")
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        sock.close()


def read_then_abort(port: int, path: str, marker: bytes) -> float:
    """Request ``path``, read until ``marker``, then leave with a TCP RST; return when."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + 5
        while marker not in data:
            if time.monotonic() > deadline or len(data) > 1 << 20:
                raise RuntimeError(f"{marker!r} not received: {data[:200]!r}")
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"connection closed before {marker!r}")
            data += chunk
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        left_at = time.monotonic()
    return left_at  # the with block closed the socket: an abortive close (RST)
