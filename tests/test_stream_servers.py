"""guard_stream inside real frameworks over real servers, with raw-socket clients that abort.

Each framework's streaming response is served by a real uvicorn (httptools; the cheap
cases on every server in ``SERVERS``) in the test's asyncio loop, and its client reads a
few tokens and leaves with an RST or a FIN: ``asgi_disconnect.testing``'s ``serve()`` and
``live.request()``. The source generator records which task iterated it, which task ran
its ``finally`` and when each token was produced, so each test checks what a user of that
framework relies on: the source is closed promptly, in its own task, before the response
returns, and it does no work for a client that is gone.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Literal, cast

import anyio
import anyio.to_thread
import pytest
import structlog.testing
from fastapi import FastAPI
from fastapi.responses import StreamingResponse as FastAPIStreamingResponse
from fastapi.sse import EventSourceResponse
from litestar import Litestar, get
from litestar import Request as LitestarRequest
from litestar.response import Stream
from sse_starlette import EventSourceResponse as SseStarletteResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from asgi_disconnect import ClientDisconnected, DisconnectMiddleware, DisconnectState, disconnect_state, guard_stream
from asgi_disconnect._types import ASGIApp, Receive, Scope, Send
from asgi_disconnect.testing import leave, serve
from tests.helpers import Close
from tests.servers import SERVERS, Outermost, ServerKind, close, request_bytes, run_server, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.server]

Framework = Literal["raw", "starlette", "fastapi", "fastapi-sse", "sse-starlette", "litestar"]
FRAMEWORKS: tuple[Framework, ...] = ("raw", "starlette", "fastapi", "fastapi-sse", "sse-starlette", "litestar")
#: The frameworks that frame SSE events themselves: the source yields the bare payload.
SELF_FRAMING: tuple[Framework, ...] = ("fastapi-sse", "sse-starlette")

TOKEN_EVERY = 0.01
MAX_TOKENS = 1000  # 10 s of stream at most: every test fails long before, if nothing stops it
STALL_AFTER = 3  # the stalled-upstream variant blocks before token 3
READ_TOKENS = 3  # the client leaves once it has received tokens 0, 1 and 2
WITHIN = 2.0  # seconds from the client's close to the source's finally and the response's end


@pytest.fixture
def anyio_backend() -> str:
    """Real servers run on asyncio only."""
    return "asyncio"


class Source:
    """A token generator that records where it ran, where and when it was closed, and each token's time."""

    def __init__(
        self, *, framed: bool, stall_after: int | None = None, first_after: float = 0.0, tokens: int = MAX_TOKENS
    ) -> None:
        self.framed, self.stall_after, self.first_after, self.tokens = framed, stall_after, first_after, tokens
        self.produced: list[float] = []  # time.monotonic() of each token produced
        self.iterated_in: set[int] = set()  # anyio task ids seen inside the generator body
        self.closed_in: int | None = None
        self.closed_at: float | None = None
        self.closed = anyio.Event()
        self.state: DisconnectState | None = None  # set by the handler that serves it

    async def __call__(self) -> AsyncIterator[str]:
        try:
            if self.first_after:
                await anyio.sleep(self.first_after)
            for i in range(self.tokens):
                self.iterated_in.add(anyio.get_current_task().id)
                if i == self.stall_after:
                    await anyio.sleep(30)  # an upstream (an LLM, a database) that stopped answering
                self.produced.append(time.monotonic())
                yield f"data: token {i}\n\n" if self.framed else f"token {i}"
                await anyio.sleep(TOKEN_EVERY)
        finally:
            self.closed_in = anyio.get_current_task().id
            self.closed_at = time.monotonic()
            self.closed.set()


def build_app(framework: Framework, source: Source, heartbeat: float | None = None) -> ASGIApp:
    """The framework's own streaming response over ``guard_stream(source(), scope)`` at ``/stream``."""
    if framework == "raw":

        async def raw(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return  # lifespan: hypercorn goes on without it
            source.state = disconnect_state(scope)
            headers = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for token in guard_stream(source(), scope, heartbeat=heartbeat):
                await send({"type": "http.response.body", "body": token.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        return DisconnectMiddleware(raw)

    if framework in ("starlette", "sse-starlette"):

        async def starlette_stream(request: Request) -> Response:
            source.state = disconnect_state(request.scope)
            body = guard_stream(source(), request.scope, heartbeat=heartbeat)
            if framework == "sse-starlette":
                return SseStarletteResponse(body)
            return StreamingResponse(body, media_type="text/event-stream")

        starlette_app = Starlette(routes=[Route("/stream", starlette_stream)])
        starlette_app.add_middleware(DisconnectMiddleware)
        return starlette_app

    if framework in ("fastapi", "fastapi-sse"):
        fastapi_app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        fastapi_app.add_middleware(DisconnectMiddleware)
        if framework == "fastapi":

            @fastapi_app.get("/stream")
            async def fastapi_stream(request: Request) -> FastAPIStreamingResponse:
                source.state = disconnect_state(request.scope)
                body = guard_stream(source(), request.scope, heartbeat=heartbeat)
                return FastAPIStreamingResponse(body, media_type="text/event-stream")

        else:

            @fastapi_app.get("/stream", response_class=EventSourceResponse)
            async def fastapi_sse(request: Request) -> AsyncIterator[str]:
                source.state = disconnect_state(request.scope)
                async for item in guard_stream(source(), request.scope, heartbeat=heartbeat):
                    yield item

        return fastapi_app

    @get("/stream")
    async def litestar_stream(request: LitestarRequest[Any, Any, Any]) -> Stream:
        source.state = disconnect_state(request.scope)
        return Stream(guard_stream(source(), request.scope, heartbeat=heartbeat), media_type="text/event-stream")

    # Litestar builds each route's stack with `middleware(app=next_app)`: the class itself
    # works as the factory, no DefineMiddleware needed.
    litestar_app = Litestar(
        route_handlers=[litestar_stream],
        middleware=[DisconnectMiddleware],
        logging_config=None,  # Litestar would otherwise configure the process's logging
    )
    return cast(ASGIApp, litestar_app)


# -- the source stops, in its own task, before the response ends ------------------------------

Variant = Literal["producing", "stalled-upstream"]
CASES = [
    *(
        pytest.param(framework, "uvicorn-httptools", how, variant, id=f"{framework}-uvicorn-httptools-{how}-{variant}")
        for framework in FRAMEWORKS
        for how in ("rst", "fin")
        for variant in ("producing", "stalled-upstream")
    ),
    *(
        pytest.param(framework, kind, how, "stalled-upstream", id=f"{framework}-{kind}-{how}-stalled-upstream")
        for framework in ("raw", "starlette")
        for kind in SERVERS
        if kind != "uvicorn-httptools"
        for how in ("rst", "fin")
    ),
]


@pytest.mark.parametrize(("framework", "kind", "how", "variant"), CASES)
async def test_aborted_stream_closes_its_source_in_the_iterating_task(
    framework: Framework, kind: ServerKind, how: Close, variant: Variant
) -> None:
    """After a mid-stream abort the source's finally runs promptly, in its own task, and no token follows detection."""
    source = Source(framed=framework not in SELF_FRAMING, stall_after=STALL_AFTER if variant != "producing" else None)
    async with serve(build_app(framework, source), server=kind) as live:
        outcome = await live.request(path="/stream", leave=leave.after_chunks(READ_TOKENS, how=how))

    outcome.assert_aborted(phase="mid_body", within_ms=WITHIN * 1000)
    state, left_at = outcome.state, outcome.left_at
    assert state is source.state and state is not None and left_at is not None
    assert state.detected_at is not None and state.detected_at >= left_at
    # The source was closed before the response returned to the server (live.request() waits for that),
    assert source.closed_at is not None, "the source's finally did not run before the response returned"
    # by the one task that iterated it (not the GC, not another task).
    assert len(source.iterated_in) == 1
    assert source.closed_in in source.iterated_in
    after = [t for t in source.produced if t > state.detected_at]
    assert len(after) <= 1, f"{len(after)} tokens produced after the disconnect was detected"
    if variant == "stalled-upstream":
        assert len(source.produced) == STALL_AFTER  # interrupted while blocked on the upstream


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_aborted_stream_is_a_quiet_close_for_the_server(framework: Framework) -> None:
    """A guarded stream aborted mid-body lets nothing escape to the server and is logged once, phase mid_body."""
    source = Source(framed=framework not in SELF_FRAMING)
    with structlog.testing.capture_logs() as logs:
        async with serve(build_app(framework, source), server="uvicorn-httptools") as live:
            outcome = await live.request(path="/stream", leave=leave.after_chunks(READ_TOKENS, how="rst"))

    outcome.assert_aborted(phase="mid_body")  # nothing escaped, no traceback in the server's log
    assert [(log["event"], log["phase"], log["path"]) for log in logs] == [("request_aborted", "mid_body", "/stream")]


# -- heartbeats reach the client while the source is idle ----------------------------------------

HEARTBEAT_FRAMEWORKS: tuple[Framework, ...] = ("starlette", "sse-starlette")


@pytest.mark.parametrize("kind", SERVERS)
@pytest.mark.parametrize("framework", HEARTBEAT_FRAMEWORKS)
async def test_heartbeats_reach_the_client_before_the_first_token(framework: Framework, kind: ServerKind) -> None:
    """With heartbeat=0.05 and a source idle for 0.3 s, the client reads ': ping' frames before the first token."""
    source = Source(framed=framework not in SELF_FRAMING, first_after=0.3, tokens=3)
    async with serve(build_app(framework, source, heartbeat=0.05), server=kind) as live:
        outcome = await live.request(path="/stream")

    outcome.assert_completed()
    assert outcome.status == 200 and dict(outcome.headers)[b"content-type"].startswith(b"text/event-stream")
    body = outcome.body
    first = body.index(b"token 0")
    assert body[:first].count(b": ping\n\n") >= 2, body[:200]
    # The frames never split an event: every token arrives whole and in order.
    assert [line for line in body.splitlines() if line.startswith(b"data:")] == [
        b"data: token 0",
        b"data: token 1",
        b"data: token 2",
    ]
    assert source.closed_in in source.iterated_in


# -- a client that stops reading is treated as gone ---------------------------------------------

FLOOD_CHUNK = b"x" * (64 * 1024)
MAX_FLOOD_CHUNKS = 2000  # 125 MiB: the kernel and transport buffers fill long before


@pytest.mark.parametrize("kind", SERVERS)
async def test_client_that_stops_reading_is_treated_as_gone(kind: ServerKind) -> None:
    """A client that never reads blocks one send past send_timeout: send raises ClientDisconnected, phase 'stalled'."""
    raised: list[BaseException] = []
    states: list[DisconnectState] = []
    sent_chunks = 0
    stopped = anyio.Event()

    async def flood(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal sent_chunks
        if scope["type"] != "http":
            return
        states.append(disconnect_state(scope))
        try:
            headers = [(b"content-type", b"application/octet-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for _ in range(MAX_FLOOD_CHUNKS):
                await send({"type": "http.response.body", "body": FLOOD_CHUNK, "more_body": True})
                sent_chunks += 1
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ClientDisconnected as exc:
            raised.append(exc)
            raise  # the middleware absorbs it
        finally:
            stopped.set()

    probe = Outermost(DisconnectMiddleware(flood, send_timeout=0.5))
    leave = threading.Event()

    def stuck_client(port: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            sock.sendall(request_bytes(path="/flood"))
            leave.wait(15)  # connected, never reading
        finally:
            close(sock, "rst")

    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        async with run_server(probe, kind) as port, anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, stuck_client, port)
            try:
                await wait_for(stopped, "the flooding app stopped", 10)
            finally:
                leave.set()
            await wait_for(probe.returned, "the response returned", WITHIN)

    assert len(raised) == 1 and isinstance(raised[0], ClientDisconnected), raised
    assert "stalled" in str(raised[0])
    [state] = states
    assert state.disconnected and state.phase == "stalled"
    assert state.detected_at is not None and state.detected_at - started < 10
    assert state.detected_at - state.started_at >= 0.5  # one send really blocked for send_timeout
    assert 0 < sent_chunks < MAX_FLOOD_CHUNKS
    assert probe.escaped == []
    assert [(log["event"], log["phase"]) for log in logs] == [("request_aborted", "stalled")]
