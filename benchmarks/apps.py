"""The apps the benchmarks measure: the same Starlette apps, bare or wrapped.

Variants (``VARIANTS``), each a way to put something in front of a Starlette app:

- ``bare``: nothing;
- ``observe``: ``DisconnectMiddleware(app)``, the default mode;
- ``cancel``: ``DisconnectMiddleware(app, cancel=True)``;
- ``guard_stream``: ``observe``, with the streaming bodies wrapped in ``guard_stream``;
- ``basehttp``: a no-op ``BaseHTTPMiddleware``, the usual way people write middleware;
- ``fastapi-disconnect`` and ``aiofence``: the two peers, each installed the way its
  README says (``app.add_middleware(CancelOnDisconnectMiddleware)``, and
  ``Middleware(DisconnectMiddleware)`` from ``aiofence.contrib.starlette``, outermost).
  They need Python 3.12+ and are imported only when used: ``unavailable()`` says why a
  peer cannot run here, and every benchmark reports that instead of failing.

Each factory builds a fresh app, so variants never share a Starlette instance (and its
lazily built middleware stack). The uvicorn subprocesses of ``overhead.py``,
``throughput.py`` and ``memory.py`` build theirs with ``uvicorn --factory apps:from_env``, the variant and
app named by ``BENCH_VARIANT`` and ``BENCH_APP``.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import platform
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from asgi_disconnect import DisconnectMiddleware, guard_stream

BODY = b"Hello, world!"
#: The streaming app's chunk and the most chunks one response sends (64 GiB: the
#: client always leaves first).
STREAM_CHUNK = 64 * 1024
STREAM_MAX_CHUNKS = 1 << 20
WORK_S = 0.01  # the stream app's GET /work: how long it works before it answers
TOKEN_GAP_S = 0.001  # and its GET /tokens: the pause between two tokens

VARIANTS = ("bare", "observe", "cancel", "guard_stream", "basehttp", "fastapi-disconnect", "aiofence")
#: peer variant -> (module, middleware class)
PEERS = {
    "fastapi-disconnect": ("fastapi_disconnect", "CancelOnDisconnectMiddleware"),
    "aiofence": ("aiofence.contrib.starlette", "DisconnectMiddleware"),
}


def unavailable(variant: str) -> str | None:
    """Why ``variant`` cannot run in this interpreter (a table's note), or None."""
    if variant not in PEERS:
        return None
    module = PEERS[variant][0]
    if sys.version_info < (3, 12):
        # scripts/bench sets BENCH_PY312=missing when it looked for one and found none.
        found = "not found" if os.environ.get("BENCH_PY312") == "missing" else f"ran on {platform.python_version()}"
        return f"skipped: needs Python 3.12+ ({found})"
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"skipped: {module} is not installed ({exc})"
    return None


def available(variants: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The variants that can run here, and a skip note for each one that cannot."""
    notes = {name: reason for name in variants if (reason := unavailable(name)) is not None}
    return [name for name in variants if name not in notes], notes


class NoOpHTTPMiddleware(BaseHTTPMiddleware):
    """A ``BaseHTTPMiddleware`` that does nothing: the usual way people write middleware."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


def wrap(variant: str, app: Starlette) -> ASGIApp:
    """Put ``variant``'s middleware in front of ``app`` (a fresh Starlette app)."""
    if variant == "bare":
        return app
    if variant in ("observe", "guard_stream"):
        return DisconnectMiddleware(app)
    if variant == "cancel":
        return DisconnectMiddleware(app, cancel=True)
    if variant == "basehttp":
        return NoOpHTTPMiddleware(app)
    if variant in PEERS:
        module, name = PEERS[variant]
        app.add_middleware(getattr(importlib.import_module(module), name))
        return app
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")


def aiofence_fence() -> AbstractContextManager[Any]:
    """aiofence's cancellable block, as its README shows it: the request's ambient
    fencing (bound by its middleware), ``get_current_fencing().move_on_cancel()``."""
    aiofence = importlib.import_module("aiofence")
    fence: AbstractContextManager[Any] = aiofence.get_current_fencing().move_on_cancel()
    return fence


async def hello(request: Request) -> Response:
    return PlainTextResponse("Hello, world!")


def hello_app() -> Starlette:
    """The Starlette hello world: ``GET /`` answers ``Hello, world!``."""
    return Starlette(routes=[Route("/", hello)])


_CHUNK = b"x" * STREAM_CHUNK


async def chunks() -> AsyncIterator[bytes]:
    for _ in range(STREAM_MAX_CHUNKS):
        yield _CHUNK
        # The loop runs once per chunk, as it does for a body that reads an upstream: a
        # body that never suspends cannot be stopped at all (uvicorn's send() on a closed
        # connection returns without suspending, so nothing else, not even the server's
        # connection_lost, runs until the body ends).
        await asyncio.sleep(0)


async def tokens() -> AsyncIterator[bytes]:
    for _ in range(STREAM_MAX_CHUNKS):
        yield b"data: token\n\n"
        await asyncio.sleep(TOKEN_GAP_S)


async def work(request: Request) -> Response:
    await asyncio.sleep(WORK_S)
    return PlainTextResponse("done")


def stream_app(variant: str) -> ASGIApp:
    """Starlette app behind ``variant``: ``GET /`` the hello world; ``GET /stream`` 64 KiB
    chunks and ``GET /tokens`` an SSE token every millisecond, both until the client leaves
    (through ``guard_stream`` for the ``guard_stream`` variant); ``GET /work`` a handler
    that works 10 ms without reading, then answers."""
    guarded = variant == "guard_stream"

    def respond(request: Request, body: AsyncIterator[bytes], media_type: str) -> Response:
        return StreamingResponse(guard_stream(body, request.scope) if guarded else body, media_type=media_type)

    async def stream(request: Request) -> Response:
        return respond(request, chunks(), "application/octet-stream")

    async def sse(request: Request) -> Response:
        return respond(request, tokens(), "text/event-stream")

    routes = [Route("/", hello), Route("/stream", stream), Route("/tokens", sse), Route("/work", work)]
    return wrap(variant, Starlette(routes=routes))


def make(variant: str) -> ASGIApp:
    """The hello world behind ``variant``."""
    return wrap(variant, hello_app())


APPS: dict[str, Callable[[str], ASGIApp]] = {"hello": make, "stream": stream_app}


def from_env() -> ASGIApp:
    """The factory uvicorn subprocesses call: ``BENCH_APP`` (hello, stream) behind
    ``BENCH_VARIANT``."""
    return APPS[os.environ.get("BENCH_APP", "hello")](os.environ["BENCH_VARIANT"])
