"""Cancel mode against real servers: uvicorn (h11, httptools) and hypercorn on 127.0.0.1."""

from __future__ import annotations

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
from asgi_disconnect.testing import leave, serve
from tests.servers import SERVERS, ServerKind

pytestmark = [pytest.mark.anyio, pytest.mark.server]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("kind", SERVERS)
async def test_slow_handler_is_cancelled_when_the_client_leaves(kind: ServerKind, how: Literal["fin", "rst"]) -> None:
    """The handler's finally runs within a second of the client leaving; its commit is whole."""
    events: list[str] = []

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

    app = DisconnectMiddleware(Starlette(routes=[Route("/slow", slow)]), cancel=True)
    async with serve(app, server=kind) as live:
        outcome = await live.request(path="/slow", leave=leave.before_response(after=0.1, how=how))
    outcome.assert_aborted(phase="before_response", within_ms=1000)
    assert events == ["committed", "cancelled=True"]


@pytest.mark.parametrize("kind", SERVERS)
async def test_aborted_stream_still_runs_its_background_task(kind: ServerKind) -> None:
    """In cancel mode an aborted StreamingResponse closes its generator and runs its background task."""
    audit: list[str] = []

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

    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(tokens(), media_type="text/event-stream", background=BackgroundTask(record))

    app = DisconnectMiddleware(Starlette(routes=[Route("/stream", stream)]), cancel=True)
    async with serve(app, server=kind) as live:
        outcome = await live.request(path="/stream", leave=leave.after_chunks(3, how="rst"))
    outcome.assert_aborted(phase="mid_body", within_ms=2000)  # the background task ran before the response ended
    assert audit == ["stream closed", "audit logged"]
