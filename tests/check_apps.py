"""User apps for ``asgi-disconnect check`` (tests/test_check.py runs the command on them).

A Starlette app written without disconnects in mind, as most are:

- ``/stream``: a hand-written streaming response (a proxy, an LLM token relay) that sends
  a chunk every 20 ms for 5 s and never looks at the client: on uvicorn (ASGI 2.3) its
  sends to a closed connection are dropped silently, so it keeps producing.
- ``/sse``: Starlette's own ``StreamingResponse``, which listens for the disconnect
  itself on servers before ASGI 2.4: it stops without the middleware.
- ``/slow``: sleeps ``SLOW_SECONDS`` (a slow query, an upstream call), then answers.
- ``/fast``: answers at once, before any client can leave.
- ``/hang``: never returns (an await on something that never comes).
- ``/block``: blocks the event loop for ``BLOCK_SECONDS`` (a sync call in ``async def``).

``app`` is the app as its author wrote it; ``configured`` is the same app with
``DisconnectMiddleware(cancel=True)`` installed by its author; ``create_app`` is a factory
(``--factory``); ``failing_startup`` cannot start (its lifespan startup raises).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from asgi_disconnect import DisconnectMiddleware

CHUNK_INTERVAL = 0.02
STREAM_CHUNKS = 250
SLOW_SECONDS = 0.5
BLOCK_SECONDS = 60.0


class ProducerResponse(Response):
    """A streaming response that produces its chunks whether or not anybody reads them."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.status_code = 200
        self.raw_headers = [(b"content-type", b"text/plain; charset=utf-8")]  # no length: chunked

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for index in range(self.chunks):
            await send({"type": "http.response.body", "body": b"token %04d\n" % index, "more_body": True})
            await anyio.sleep(CHUNK_INTERVAL)
        await send({"type": "http.response.body", "body": b""})


async def stream(request: Request) -> Response:
    return ProducerResponse(STREAM_CHUNKS)


async def sse(request: Request) -> Response:
    async def events() -> AsyncIterator[str]:
        for index in range(STREAM_CHUNKS):
            yield f"data: {index}\n\n"
            await anyio.sleep(CHUNK_INTERVAL)

    return StreamingResponse(events(), media_type="text/event-stream")


async def slow(request: Request) -> Response:
    await anyio.sleep(SLOW_SECONDS)
    return PlainTextResponse("report ready\n")


async def fast(request: Request) -> Response:
    return PlainTextResponse("ok\n")


async def hang(request: Request) -> Response:
    await anyio.sleep_forever()
    raise AssertionError("sleep_forever() returned")


async def block(request: Request) -> Response:
    time.sleep(BLOCK_SECONDS)  # noqa: ASYNC251 - the bug this endpoint shows
    return PlainTextResponse("unblocked\n")


ROUTES = [
    Route("/stream", stream),
    Route("/sse", sse),
    Route("/slow", slow),
    Route("/fast", fast),
    Route("/hang", hang),
    Route("/block", block),
]

app = Starlette(routes=ROUTES)

configured = Starlette(routes=ROUTES, middleware=[Middleware(DisconnectMiddleware, cancel=True)])


def create_app() -> Starlette:
    """The same app from a factory (``asgi-disconnect check --factory tests.check_apps:create_app``)."""
    return Starlette(routes=ROUTES)


@asynccontextmanager
async def _unreachable_database(app: Starlette) -> AsyncIterator[None]:
    raise ConnectionRefusedError("cannot reach the database at 127.0.0.1:1")
    yield


failing_startup = Starlette(routes=ROUTES, lifespan=_unreachable_database)

not_an_app = "a string, not an ASGI app"
