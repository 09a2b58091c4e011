"""DisconnectMiddleware against real servers: uvicorn (h11, httptools) and hypercorn.

The servers run in the test's own asyncio loop and the clients leave with an orderly FIN
or an abortive RST: ``asgi_disconnect.testing``'s ``serve()`` and ``live.request()``.
The keep-alive test drives one raw blocking socket in a worker thread; the traceback
checks read a server subprocess's output.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
import structlog.testing
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_disconnect import ClientDisconnected, DisconnectMiddleware, DisconnectState, disconnect_state
from asgi_disconnect._types import Receive, Scope, Send
from asgi_disconnect.testing import leave, serve

from . import apps
from .helpers import CLOSES, Close
from .servers import (
    SERVERS,
    ServerKind,
    close,
    free_port,
    raw_connection,
    read_response,
    read_until,
    request_bytes,
    run_process,
)

pytestmark = [pytest.mark.anyio, pytest.mark.server]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Real servers run on asyncio only."""
    return "asyncio"


async def send_text(send: Send, body: bytes, status: int = 200) -> None:
    headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- 1. a handler that never calls receive() ---------------------------------------------


@pytest.mark.parametrize("how", CLOSES)
@pytest.mark.parametrize("kind", SERVERS)
async def test_handler_that_never_receives_sees_disconnect_before_response(kind: ServerKind, how: Close) -> None:
    """A handler that never calls receive() learns that the client left, and its send() raises ClientDisconnected."""
    send_errors: list[BaseException] = []

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await disconnect_state(scope).wait()
        try:
            await send_text(send, b"too late")
        except ClientDisconnected as exc:
            send_errors.append(exc)
            raise  # the middleware absorbs it: no traceback for a client that left

    with structlog.testing.capture_logs() as logs:
        async with serve(DisconnectMiddleware(handler), server=kind, lifespan="off") as live:
            outcome = await live.request(path="/report", leave=leave.before_response(how=how))

    # disconnect_state(scope).wait() returned once the client left: the handler did not run to the timeout
    outcome.assert_aborted(phase="before_response", within_ms=1000)
    assert [type(exc) for exc in send_errors] == [ClientDisconnected]
    assert [(log["event"], log["phase"], log["path"]) for log in logs] == [
        ("request_aborted", "before_response", "/report")
    ]


# -- 2. a streaming handler stops producing ------------------------------------------------

CHUNK_INTERVAL = 0.02
MAX_CHUNKS = 250  # 5 s of stream at most: the test fails long before, if nothing stops it


@pytest.mark.parametrize("how", CLOSES)
@pytest.mark.parametrize("kind", SERVERS)
async def test_streaming_handler_send_raises_mid_body(kind: ServerKind, how: Close) -> None:
    """A raw ASGI stream's send() raises ClientDisconnected soon after the client leaves, so it stops producing."""
    produced_after_detection = 0
    raised: list[ClientDisconnected] = []

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal produced_after_detection
        state = disconnect_state(scope)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        try:
            for index in range(MAX_CHUNKS):
                if state.disconnected:
                    produced_after_detection += 1
                await send({"type": "http.response.body", "body": b"chunk %04d\n" % index, "more_body": True})
                await anyio.sleep(CHUNK_INTERVAL)
            await send({"type": "http.response.body", "body": b""})
        except ClientDisconnected as exc:
            raised.append(exc)
            raise

    async with serve(DisconnectMiddleware(handler), server=kind, lifespan="off") as live:
        outcome = await live.request(path="/stream", leave=leave.after_chunks(1, how=how))

    assert raised, "send() should raise ClientDisconnected once the client has gone"
    outcome.assert_aborted(phase="mid_body", within_ms=2000)  # it raised, and the stream stopped
    assert outcome.state is not None and outcome.state.bytes_sent > 0
    assert 1 <= produced_after_detection <= 2


# -- 3. request bodies reach the app intact --------------------------------------------------

BODY = random.Random(20240601).randbytes(1 << 20)
PIECE = 64 * 1024


def upload(encoding: str) -> tuple[list[tuple[str, str]], bytes]:
    """The framing header and the wire bytes of a 1 MiB upload (chunked: in 64 KiB chunks)."""
    if encoding == "content-length":
        return [("content-length", str(len(BODY)))], BODY
    pieces = [BODY[offset : offset + PIECE] for offset in range(0, len(BODY), PIECE)]
    return [("transfer-encoding", "chunked")], b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


@pytest.mark.parametrize("pause", [0.0, 0.05], ids=["reads-at-once", "reads-late"])
@pytest.mark.parametrize("encoding", ["chunked", "content-length"])
@pytest.mark.parametrize("kind", SERVERS)
async def test_upload_reaches_app_byte_exact(kind: ServerKind, encoding: str, pause: float) -> None:
    """A 1 MiB upload reaches the app byte for byte and in order, and the request is never marked disconnected.

    ``reads-late`` lets the middleware's watcher read ahead before the app asks for the body.
    """

    async def echo(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(pause)
        chunks: list[bytes] = []
        for _ in range(len(BODY)):  # bounded: at least one byte per message but the last
            message = await receive()
            assert message["type"] == "http.request"
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await send_text(send, b"".join(chunks))

    headers, wire = upload(encoding)
    async with serve(DisconnectMiddleware(echo), server=kind, lifespan="off") as live:
        outcome = await live.request(method="POST", path="/echo", headers=headers, body=wire)

    outcome.assert_completed()  # never marked disconnected
    assert outcome.status == 200
    assert len(outcome.body) == len(BODY)
    assert outcome.body == BODY


# -- 4. keep-alive: a normal close is not an abort --------------------------------------------

KEEPALIVE_REQUESTS = 100


@pytest.mark.parametrize("kind", SERVERS)
async def test_keepalive_requests_are_never_marked_disconnected(kind: ServerKind) -> None:
    """100 requests on one keep-alive connection all succeed and none, not even the last, is marked disconnected."""
    states: list[DisconnectState] = []

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        states.append(disconnect_state(scope))
        await anyio.sleep(0.001)  # suspend, so that the middleware starts watching
        await send_text(send, scope["path"].encode())

    async with serve(DisconnectMiddleware(handler), server=kind, lifespan="off") as live:

        def client() -> list[tuple[int, bytes]]:
            responses = []
            with raw_connection(live.port) as sock:
                for index in range(KEEPALIVE_REQUESTS):
                    sock.sendall(request_bytes("GET", f"/{index}"))
                    status, _, body = read_response(sock)
                    responses.append((status, body))
                close(sock, "fin")
            return responses

        with structlog.testing.capture_logs() as logs:
            responses = await anyio.to_thread.run_sync(client)
            await anyio.sleep(0.1)  # the server sees the close

    assert responses == [(200, f"/{index}".encode()) for index in range(KEEPALIVE_REQUESTS)]
    assert len(states) == KEEPALIVE_REQUESTS
    assert [state.disconnected for state in states] == [False] * KEEPALIVE_REQUESTS
    assert logs == []


# -- 5. Starlette's BaseHTTPMiddleware inside DisconnectMiddleware ---------------------------


class NoOpMiddleware(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


POLL_INTERVAL = 0.01
MAX_POLLS = 200  # 2 s
EXTRA_POLLS = 20  # Starlette's chance to notice too, once ours has


@pytest.mark.parametrize("how", CLOSES)
@pytest.mark.parametrize("kind", SERVERS)
async def test_flag_set_under_base_http_middleware(kind: ServerKind, how: Close) -> None:
    """Under Starlette's BaseHTTPMiddleware, disconnect_state(scope).disconnected becomes True after the client leaves.

    Starlette's own ``await request.is_disconnected()``, polled alongside, returned False
    on every poll, on every server, with FIN and with RST (Starlette 1.10; the same without
    DisconnectMiddleware, while it works without BaseHTTPMiddleware). Not a race: it
    cancels its receive() at once, and BaseHTTPMiddleware's receive enters a task group,
    a checkpoint where that cancellation always lands before a message comes out.
    """
    polls: list[tuple[bool, bool]] = []  # (ours, Starlette's)

    async def endpoint(request: Request) -> Response:
        state = disconnect_state(request.scope)
        polls_after_ours = 0
        for _ in range(MAX_POLLS):
            polls.append((state.disconnected, await request.is_disconnected()))
            if state.disconnected:
                polls_after_ours += 1
                if polls[-1][1] or polls_after_ours > EXTRA_POLLS:
                    break
            await anyio.sleep(POLL_INTERVAL)
        return PlainTextResponse("too late")

    app = Starlette(routes=[Route("/poll", endpoint)], middleware=[Middleware(NoOpMiddleware)])
    async with serve(DisconnectMiddleware(app), server=kind) as live:
        outcome = await live.request(path="/poll", leave=leave.before_response(how=how))

    assert polls[-1][0] is True, "disconnect_state(scope).disconnected should become True"
    assert [starlette for _, starlette in polls] == [False] * len(polls), (
        "Starlette's is_disconnected() now works under BaseHTTPMiddleware: update this test and the README"
    )
    outcome.assert_aborted(phase="before_response")


# -- 6. Starlette's StreamingResponse still stops promptly -----------------------------------


@pytest.mark.parametrize("how", CLOSES)
@pytest.mark.parametrize("kind", SERVERS)
async def test_starlette_streaming_generator_closed_promptly(kind: ServerKind, how: Close) -> None:
    """A StreamingResponse generator blocked on an upstream await runs its finally soon after the client leaves."""
    finally_ran = anyio.Event()

    async def tokens() -> AsyncIterator[bytes]:
        try:
            yield b"first token\n"
            await anyio.sleep(30)  # an upstream that never answers
            yield b"never\n"
        finally:
            finally_ran.set()

    async def endpoint(request: Request) -> Response:
        return StreamingResponse(tokens(), media_type="text/plain")

    app = DisconnectMiddleware(Starlette(routes=[Route("/tokens", endpoint)]))
    async with serve(app, server=kind) as live:
        outcome = await live.request(path="/tokens", leave=leave.after_chunks(1, how=how))

    assert finally_ran.is_set(), "the generator's finally should have run before the response ended"
    outcome.assert_aborted(phase="mid_body", within_ms=2000)


# -- 7. no traceback in the server's output -------------------------------------------------


def server_command(kind: ServerKind, target: str, port: int) -> list[str]:
    if kind == "hypercorn":
        # --workers 0: serve in this very process, so that its PID is the server's.
        # --graceful-timeout 1: on shutdown, cancel still-running handlers after 1 s, not 3.
        return [
            *(sys.executable, "-m", "hypercorn", target, "--bind", f"127.0.0.1:{port}"),
            *("--workers", "0", "--graceful-timeout", "1"),
        ]
    http = kind.removeprefix("uvicorn-")
    return [sys.executable, "-m", "uvicorn", target, "--http", http, "--host", "127.0.0.1", "--port", str(port)]


def read(path: Path) -> str:
    return path.read_text(errors="replace")


def abort_requests(kind: ServerKind, target: str, how: Close, output: Path, events: int) -> str:
    """Serve ``target`` in a subprocess, abort a stream and a slow handler, stop it; return its output."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    env.pop("FORCE_COLOR", None)
    with run_process(server_command(kind, target, port), port, output=output, env=env, cwd=ROOT, stop_timeout=10):
        with raw_connection(port) as sock:
            sock.sendall(request_bytes("GET", "/stream"))
            read_until(sock, b"chunk 0000\n")
            close(sock, how)

        with raw_connection(port) as sock:
            sock.sendall(request_bytes("GET", "/slow"))
            deadline = time.monotonic() + 5
            while apps.SLOW_STARTED not in read(output):
                assert time.monotonic() < deadline, "the slow handler did not start"
                time.sleep(0.01)
            close(sock, how)

        if events:
            deadline = time.monotonic() + 5
            while read(output).count("request_aborted") < events:
                assert time.monotonic() < deadline, f"no {events} abort events: {read(output)}"
                time.sleep(0.02)
        else:
            time.sleep(apps.SLOW_SECONDS + 0.2)  # the slow handler sends into the void
    return read(output)


@pytest.mark.parametrize("how", CLOSES)
@pytest.mark.parametrize("kind", SERVERS)
def test_server_prints_no_traceback_for_aborts(kind: ServerKind, how: Close, tmp_path: Path) -> None:
    """A server subprocess prints no traceback for aborted requests, only the "request_aborted" events."""
    text = abort_requests(kind, "tests.apps:app", how, tmp_path / "server.log", events=2)
    assert "Traceback" not in text
    assert "Exception in ASGI application" not in text
    assert "socket.send() raised exception." not in text  # nothing writes to a dead socket
    assert text.count("request_aborted") == 2
    assert "phase=mid_body" in text and "phase=before_response" in text


# uvicorn (h11 and httptools) prints nothing for the bare app: it drops the sends of a
# request whose client has gone, and on shutdown it waits for the stream to finish.
# So only hypercorn has a control.
@pytest.mark.parametrize("how", CLOSES)
def test_hypercorn_without_middleware_prints_tracebacks(how: Close, tmp_path: Path) -> None:
    """Control: without the middleware, hypercorn prints a traceback for the same aborted stream.

    The bare stream never learns that its client left and keeps writing (asyncio warns
    "socket.send() raised exception." for each write), until the shutdown cancels it
    after the graceful timeout and the cancelled connection task's traceback is printed.
    """
    text = abort_requests("hypercorn", "tests.apps:bare_app", how, tmp_path / "server.log", events=0)
    assert "Traceback" in text
    assert "socket.send() raised exception." in text
    assert "request_aborted" not in text
