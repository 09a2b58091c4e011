"""The apps the benchmarks measure: the same Starlette apps, bare or wrapped.

Variants (``VARIANTS``), each a way to put something in front of a Starlette app:

- ``bare``: nothing;
- ``passthrough``: ``PassthroughMiddleware(app)``, the floor that any correct pure ASGI
  middleware pays: not a peer and with no budget of its own, it shows how much of the
  cost of ``observe`` and ``cancel`` over bare no pure ASGI middleware could avoid
  (every report shows it right after bare, labelled ``passthrough (floor)``);
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
import importlib.util
import os
import platform
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_disconnect import DisconnectMiddleware, guard_stream

BODY = b"Hello, world!"
#: The streaming app's chunk and the most chunks one response sends (64 GiB: the
#: client always leaves first).
STREAM_CHUNK = 64 * 1024
STREAM_MAX_CHUNKS = 1 << 20
WORK_S = 0.01  # the stream app's GET /work: how long it works before it answers
TOKEN_GAP_S = 0.001  # and its GET /tokens: the pause between two tokens

VARIANTS = ("bare", "passthrough", "observe", "cancel", "guard_stream", "basehttp", "fastapi-disconnect", "aiofence")
#: peer variant -> (module, middleware class)
PEERS = {
    "fastapi-disconnect": ("fastapi_disconnect", "CancelOnDisconnectMiddleware"),
    "aiofence": ("aiofence.contrib.starlette", "DisconnectMiddleware"),
}
#: The variant that measures the floor, and what every report says of its row.
FLOOR = "passthrough"
FLOOR_NOTE = "(floor: any pure ASGI middleware)"
PASSTHROUGH_KEY = "bench.passthrough"  # the scope key of PassthroughMiddleware's state


#: Where an earlier checkout of the package lives (``scripts/bench --before REV`` sets it):
#: its observe and cancel modes then run as the variants ``observe-before`` and
#: ``cancel-before``, alternated with today's in the same run.
BEFORE_ENV = "BENCH_BEFORE"
BEFORE_VARIANTS = ("observe-before", "cancel-before")


def with_before(variants: Sequence[str]) -> tuple[str, ...]:
    """``variants``, followed by the before-variants when ``BENCH_BEFORE`` names a checkout."""
    return (*variants, *BEFORE_VARIANTS) if os.environ.get(BEFORE_ENV) else tuple(variants)


def _before_package() -> Any:
    """The package of the ``BENCH_BEFORE`` checkout, imported as ``asgi_disconnect_before``."""
    name = "asgi_disconnect_before"
    if name in sys.modules:
        return sys.modules[name]
    root = Path(os.environ[BEFORE_ENV]) / "asgi_disconnect"
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    if spec is None or spec.loader is None:
        raise RuntimeError(f"{BEFORE_ENV}={os.environ[BEFORE_ENV]!r}: no asgi_disconnect package there")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its relative imports resolve under this name
    spec.loader.exec_module(module)
    return module


def label(name: str) -> str:
    """A variant's name as a report's row shows it: the floor says it is the floor."""
    if name in BEFORE_VARIANTS:
        return f"{name} ({os.environ.get('BENCH_BEFORE_REV', 'earlier checkout')})"
    return f"{name} (floor)" if name == FLOOR else name


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


class PassthroughState:
    """What ``PassthroughMiddleware`` keeps per request: the least a middleware that
    watches the response needs (has it ended, how much body went out)."""

    __slots__ = ("bytes_sent", "done")

    def __init__(self) -> None:
        self.done = False
        self.bytes_sent = 0


class PassthroughMiddleware:
    """The floor that any correct pure ASGI middleware pays, measured as its own row.

    It does what every middleware that watches a response must do, and nothing more:
    for an ``http`` scope it copies the scope (a middleware must not change the
    server's), adds one key (``PASSTHROUGH_KEY``) holding a small per-request object
    (``PassthroughState``), and wraps ``send`` with an ``async def`` that refuses a
    message once the response has ended (``OSError``, as a server does), counts the
    response body bytes and notes the end of the response (the last
    ``http.response.body``, without ``more_body``), then awaits the server's ``send``.
    Any other scope (``websocket``, ``lifespan``) passes straight through.

    It detects nothing: the gap between this row and ``observe`` / ``cancel`` is what
    disconnect detection costs, and the gap between ``bare`` and this row is what no
    pure ASGI middleware can avoid (an extra coroutine per request and per message).
    """

    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = PassthroughState()
        scope = {**scope, PASSTHROUGH_KEY: state}

        async def send_wrapper(message: Message) -> None:
            if state.done:
                raise OSError("the response has already ended")
            if message["type"] == "http.response.body":
                state.bytes_sent += len(message.get("body", b""))
                if not message.get("more_body", False):
                    state.done = True
            await send(message)

        await self.app(scope, receive, send_wrapper)


def wrap(variant: str, app: Starlette) -> ASGIApp:
    """Put ``variant``'s middleware in front of ``app`` (a fresh Starlette app)."""
    if variant == "bare":
        return app
    if variant == "passthrough":
        return PassthroughMiddleware(app)
    if variant in ("observe", "guard_stream"):
        return DisconnectMiddleware(app)
    if variant == "cancel":
        return DisconnectMiddleware(app, cancel=True)
    if variant in BEFORE_VARIANTS:
        return _before_package().DisconnectMiddleware(app, cancel=variant == "cancel-before")  # type: ignore[no-any-return]
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
