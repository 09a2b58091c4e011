"""Cancel mode against real servers: uvicorn (h11, httptools) and hypercorn on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Literal

import anyio
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from asgi_disconnect import DisconnectMiddleware, disconnect_state, shield
from tests.servers import SERVERS, ServerKind, close, raw_connection, read_until, request_bytes, run_server

pytestmark = [pytest.mark.anyio, pytest.mark.server]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def leave_after(port: int, path: str, how: Literal["fin", "rst"], delay: float, wait_for: bytes = b"") -> None:
    with raw_connection(port) as sock:
        sock.sendall(request_bytes(path=path))
        if wait_for:
            read_until(sock, wait_for)
        time.sleep(delay)
        close(sock, how)


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("kind", SERVERS)
async def test_slow_handler_is_cancelled_when_the_client_leaves(kind: ServerKind, how: Literal["fin", "rst"]) -> None:
    """The handler's finally runs within a second of the client leaving; its commit is whole."""
    events: list[str] = []
    ended = anyio.Event()
    left_at: list[float] = []

    async def slow(request: Request) -> PlainTextResponse:
        try:
            with shield():
                await anyio.sleep(0.2)  # the client leaves while this "commit" runs
                events.append("committed")
            await anyio.sleep(30)
            events.append("finished")  # pragma: no cover - the point is it never gets here
            return PlainTextResponse("late")  # pragma: no cover
        finally:
            events.append(f"cancelled={disconnect_state(request.scope).cancelled}")
            ended.set()

    app = DisconnectMiddleware(Starlette(routes=[Route("/slow", slow)]), cancel=True)
    async with run_server(app, kind) as port:

        def client() -> None:
            leave_after(port, "/slow", how, 0.1)
            left_at.append(time.monotonic())

        await anyio.to_thread.run_sync(client)
        with anyio.move_on_after(2) as timeout:
            await ended.wait()
        assert not timeout.cancel_called, f"handler still running 2 s after the client left: {events}"
    assert events == ["committed", "cancelled=True"]


@pytest.mark.parametrize("kind", SERVERS)
async def test_aborted_stream_still_runs_its_background_task(kind: ServerKind) -> None:
    """In cancel mode an aborted StreamingResponse closes its generator and runs its background task."""
    audit: list[str] = []
    done = anyio.Event()

    async def tokens() -> AsyncIterator[bytes]:
        try:
            for i in range(1000):
                yield f"data: token {i}\n\n".encode()
                await anyio.sleep(0.01)
        finally:
            audit.append("stream closed")

    async def record() -> None:
        await anyio.sleep(0.05)
        audit.append("audit logged")
        done.set()

    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(tokens(), media_type="text/event-stream", background=BackgroundTask(record))

    app = DisconnectMiddleware(Starlette(routes=[Route("/stream", stream)]), cancel=True)
    async with run_server(app, kind) as port:
        await anyio.to_thread.run_sync(lambda: leave_after(port, "/stream", "rst", 0.05, wait_for=b"token 2"))
        with anyio.move_on_after(2) as timeout:
            await done.wait()
        assert not timeout.cancel_called, f"background task did not run: {audit}"
    assert audit == ["stream closed", "audit logged"]
