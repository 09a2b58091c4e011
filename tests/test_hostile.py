"""Broken and hostile apps on a real server: wrapped, the server logs and answers as bare.

Every test serves the same app twice on one real server, bare and behind
``DisconnectMiddleware`` (observe or cancel mode), chosen per request by an
``x-mode`` header, and compares what the server logged (logger ``uvicorn.error`` or
``hypercorn.error``: level, message, exception type) and what the client received
(status line, headers but ``date``, body, whether the connection was closed). What the
app raised must reach the server as the very same object, its traceback intact.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest

from asgi_disconnect import DisconnectMiddleware
from asgi_disconnect._types import ASGIApp, Message, Receive, Scope, Send

from . import hostile_apps as h
from .helpers import Close, Records, recording
from .servers import Outermost, ServerKind, close, raw_connection, request_bytes, run_server, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.server]

Mode = Literal["bare", "observe", "cancel"]
Wrapped = Literal["observe", "cancel"]
UVICORNS: tuple[ServerKind, ...] = ("uvicorn-h11", "uvicorn-httptools")
WRAPPED: tuple[Wrapped, ...] = ("observe", "cancel")
# The server's own logger, and asyncio's: a connection task that dies is logged there.
LOGGERS = {"uvicorn-h11": "uvicorn.error", "uvicorn-httptools": "uvicorn.error", "hypercorn": "hypercorn.error"}
READ_TIMEOUT = 5.0
UPLOAD_READ_TIMEOUT = 20.0
POLL = 0.01
PROBE = request_bytes("GET", "/probe", {"x-mode": "probe"})


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Real servers run on asyncio only."""
    return "asyncio"


# -- what the server logged ------------------------------------------------------------------


def logged_error(record: logging.LogRecord) -> BaseException | None:
    return record.exc_info[1] if record.exc_info else None


LogLine = tuple[str, str, str | None]  # level, message, exception type


def summary(record: logging.LogRecord) -> LogLine:
    error = logged_error(record)
    message = re.sub(r"fd=\d+", "fd=?", record.getMessage())  # asyncio names the socket
    return (record.levelname, message, None if error is None else type(error).__qualname__)


# -- what the client received ------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    status: str | None  # the status line
    headers: tuple[str, ...]  # lower-cased, ``date`` left out (it differs by the second)
    body: bytes  # decoded (chunked) as far as it came
    complete: bool  # the response ended as its framing says
    closed: bool  # the server closed the connection (otherwise a second request was answered)


def parse(data: bytes | bytearray) -> tuple[str | None, tuple[str, ...], bytes, bool]:
    """Status line, headers, body so far and completeness of the response ``data`` starts with."""
    data = bytes(data)
    if b"\r\n\r\n" not in data:
        return None, (), b"", False
    head, _, rest = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = tuple(line.lower() for line in lines if not line.lower().startswith("date:"))
    values = dict(line.partition(":")[::2] for line in headers)
    if values.get("transfer-encoding", "").strip() == "chunked":
        parts: list[bytes] = []
        at = 0
        for _ in range(len(rest) + 1):  # bounded: every chunk consumes bytes
            end = rest.find(b"\r\n", at)
            if end < 0:
                return status, headers, b"".join(parts), False
            size = int(rest[at:end].split(b";")[0], 16)
            parts.append(rest[end + 2 : end + 2 + size])
            if len(rest) < end + 4 + size:
                return status, headers, b"".join(parts), False
            at = end + 4 + size
            if size == 0:
                return status, headers, b"".join(parts), True
        raise AssertionError("unreachable: the chunk walk is bounded by the data")
    if "content-length" in values:
        length = int(values["content-length"])
        return status, headers, rest[:length], len(rest) >= length
    return status, headers, rest, False  # delimited by the close


def recv(sock: socket.socket, deadline: float) -> bytes | None:
    """One read: bytes, ``b""`` at the close (or a reset), ``None`` if nothing came in ``POLL`` s."""
    sock.settimeout(max(min(POLL, deadline - time.monotonic()), 0.001))
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None
    except ConnectionResetError:
        return b""


def read_first_response(sock: socket.socket, done: anyio.Event, timeout: float = READ_TIMEOUT) -> tuple[bytes, bool]:
    """Read until the app has returned and the response is complete, or the server closed; and whether it did."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(data) < 1 << 26:
        chunk = recv(sock, deadline)
        if chunk == b"":
            return bytes(data), True
        data += chunk or b""
        # A big body is parsed only once the socket is idle: parsing is linear in its size.
        if (chunk is None or len(data) < 1 << 20) and anyio.from_thread.run_sync(done.is_set) and parse(data)[3]:
            return bytes(data), False
    raise AssertionError(f"no complete response nor close in {timeout} s after {len(data)} bytes: {data[:300]!r}")


def probe_closed(sock: socket.socket, timeout: float = READ_TIMEOUT) -> bool:
    """Is the connection closed? A second request on it tells: answered, or not."""
    try:
        sock.sendall(PROBE)
    except OSError:
        return True
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = recv(sock, deadline)
        if chunk == b"":
            return True
        data += chunk or b""
        if parse(data)[3]:
            return False
    raise AssertionError(f"the probe got neither an answer nor a close: {data[:300]!r}")


def received(data: bytes, eof: bool, sock: socket.socket, timeout: float = READ_TIMEOUT) -> Received:
    status, headers, body, complete = parse(data)
    return Received(status, headers, body, complete, eof or probe_closed(sock, timeout))


# -- one server, the app bare and wrapped ---------------------------------------------------------


@dataclass
class Served:
    """One variant of the app on the server: what it raised, what escaped to the server, when it returned."""

    mode: Mode
    outer: Outermost  # the variant as the server calls it
    rec: h.Recorder

    @property
    def escaped(self) -> list[BaseException]:
        return self.outer.escaped

    @property
    def done(self) -> anyio.Event:
        return self.outer.returned


def variant(factory: h.Factory, mode: Mode) -> Served:
    rec = h.Recorder()
    app = factory(rec)
    if mode != "bare":
        app = DisconnectMiddleware(app, cancel=mode == "cancel")
    return Served(mode, Outermost(app), rec)


@dataclass(frozen=True)
class Seen:
    """What one request produced: what the client received, what the server logged."""

    received: Received
    logs: tuple[LogLine, ...]
    records: tuple[logging.LogRecord, ...] = field(compare=False)


Client = Callable[[int, Served], Received]


class Live:
    """A real server for the whole module, whose app each test sets: ``variants`` by ``x-mode``."""

    def __init__(self, kind: ServerKind) -> None:
        self.kind = kind
        self.port = 0
        self.variants: dict[str, Served] = {}
        self.handler = Records()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan: hypercorn goes on without, quietly
        mode = dict(scope["headers"]).get(b"x-mode", b"").decode()
        if mode == "probe":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
            await send({"type": "http.response.body", "body": b"probe"})
            return
        await self.variants[mode].outer(scope, receive, send)

    async def run(self, factory: h.Factory, modes: tuple[Mode, ...], client: Client) -> dict[Mode, tuple[Served, Seen]]:
        """Serve ``factory``'s app in each mode; run ``client`` once per mode, in turn."""
        self.variants = {mode: variant(factory, mode) for mode in modes}
        results: dict[Mode, tuple[Served, Seen]] = {}
        for mode in modes:
            served = self.variants[mode]
            self.handler.records.clear()
            got = await anyio.to_thread.run_sync(client, self.port, served)
            await wait_for(served.done, f"{mode}: the app returned")
            for _ in range(20):  # the server logs right after the app returns, asyncio a little later
                await anyio.lowlevel.checkpoint()
            records = tuple(self.handler.records)
            results[mode] = served, Seen(got, tuple(summary(r) for r in records), records)
        return results


async def serve(kind: ServerKind) -> AsyncIterator[Live]:
    live = Live(kind)
    async with run_server(live, kind) as live.port:
        with recording(live.handler, LOGGERS[kind], "asyncio"):
            yield live


@pytest.fixture(scope="module", params=[*UVICORNS, "hypercorn"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Live]:
    """uvicorn (h11, httptools) or hypercorn, one per module."""
    async for live in serve(request.param):
        yield live


@pytest.fixture(scope="module", params=UVICORNS)
async def uvicorn(request: pytest.FixtureRequest) -> AsyncIterator[Live]:
    """uvicorn (h11, httptools), one per module."""
    async for live in serve(request.param):
        yield live


def request_for(served: Served) -> bytes:
    return request_bytes("GET", "/", {"x-mode": served.mode})


def plain_client(port: int, served: Served) -> Received:
    """Send the request, read the response, then tell whether the connection stayed open."""
    with raw_connection(port) as sock:
        sock.sendall(request_for(served))
        data, eof = read_first_response(sock, served.done)
        return received(data, eof, sock)


def leaving_client(how: Close, *, mid_body: bool = False) -> Client:
    """Send the request, leave (FIN or RST) once the handler runs (or sent a first chunk)."""

    def client(port: int, served: Served) -> Received:
        with raw_connection(port) as sock:
            sock.sendall(request_for(served))
            anyio.from_thread.run(wait_for, served.rec.started, "the handler started")
            data = b""
            if mid_body:
                deadline = time.monotonic() + READ_TIMEOUT
                while b"first chunk" not in data and time.monotonic() < deadline:
                    data += recv(sock, deadline) or b""
            close(sock, how)
        anyio.from_thread.run_sync(served.rec.client_left.set)
        status, headers, body, complete = parse(data)
        return Received(status, headers, body, complete, closed=True)

    return client


def late_reader(port: int, served: Served) -> Received:
    """A client that reads nothing until the app has returned (a tiny receive buffer), then everything."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    try:
        sock.settimeout(READ_TIMEOUT)
        sock.connect(("127.0.0.1", port))
        sock.sendall(request_for(served))
        anyio.from_thread.run(wait_for, served.done, "the app returned")
        data, eof = read_first_response(sock, served.done)
        return received(data, eof, sock)
    finally:
        sock.close()


def check_same_object(served: Served, seen: Seen) -> None:
    """What the app raised reached the server as the same object, the app's frame in its traceback."""
    errors = [e for e in map(logged_error, seen.records) if e is not None]
    if not served.rec.raised:
        assert errors == [], f"{served.mode}: the server logged {errors!r}, the app raised nothing"
        return
    raised = served.rec.raised[-1]
    assert len(errors) == 1, f"{served.mode}: the server logged {seen.logs}"
    [error] = errors
    if error is not raised and isinstance(error, BaseExceptionGroup) and error.exceptions[0] is raised:
        # hypercorn does not catch a BaseException: its connection's task group dies of it
        # and asyncio logs the group. The app's exception must be the one in it.
        error = error.exceptions[0]
    assert error is raised, f"{served.mode}: the server logged {error!r}, not the app's {raised!r}"
    assert h.in_traceback(error, served.rec.codes[-1]), f"{served.mode}: the app's frame left the traceback"
    assert served.escaped == [raised], f"{served.mode}: {served.escaped!r} escaped, not the app's {raised!r}"


def compare(results: dict[Mode, tuple[Served, Seen]], mode: Wrapped, *, exact_body: bool = True) -> None:
    bare_served, bare = results["bare"]
    served, wrapped = results[mode]
    check_same_object(bare_served, bare)  # the control: the test sees what it means to see
    if exact_body:
        assert wrapped.received == bare.received, f"{mode}: the client received otherwise than bare"
    else:
        assert replace(wrapped.received, body=b"") == replace(bare.received, body=b"")
        assert wrapped.received.body and bare.received.body
    assert wrapped.logs == bare.logs, f"{mode}: the server logged otherwise than bare"
    check_same_object(served, wrapped)


# -- 1. apps that break the protocol or raise -------------------------------------------------------

CASES = [
    # A second http.response.start: the server's send() raises, the app lets it out.
    pytest.param(h.second_start, id="second-start"),
    # A body before the start: the server's send() raises.
    pytest.param(h.body_before_start, id="body-before-start"),
    # A send after the response completed: the server's send() raises.
    pytest.param(h.send_after_complete, id="send-after-complete"),
    # A return without any response: uvicorn answers 500 and logs it.
    pytest.param(h.return_without_response, id="return-without-response"),
    # A return after the start and a first chunk: uvicorn logs it and closes.
    pytest.param(h.return_mid_body, id="return-mid-body"),
    # The app's own errors before the start: uvicorn answers 500 (to a BaseException too:
    # it catches BaseException, and logs it).
    *h.error_params(h.OWN_ERRORS, h.raise_before_start, prefix="before-start-"),
    # ... and after the start and a first chunk: uvicorn closes the connection.
    *h.error_params(h.OWN_ERRORS, h.raise_after_start, prefix="after-start-"),
    # Frameworks whose errors pass through a task group (Starlette's collapse_excgroups).
    pytest.param(h.starlette_streaming_error, id="starlette-StreamingResponse-body-error"),
    pytest.param(h.base_http_middleware_error, id="starlette-BaseHTTPMiddleware-endpoint-error"),
    pytest.param(h.fastapi_yield_dependency_error(http_middleware=True), id="fastapi-yield-dependency-error"),
    # Control: the same dependency without @app.middleware("http") (no task group on the way).
    pytest.param(h.fastapi_yield_dependency_error(http_middleware=False), id="fastapi-yield-dependency-plain"),
]


@pytest.mark.parametrize("mode", WRAPPED)
@pytest.mark.parametrize("factory", CASES)
async def test_broken_app_is_served_as_bare(server: Live, factory: h.Factory, mode: Wrapped) -> None:
    """A broken or raising app: the server logs and answers wrapped exactly as bare, the same exception object."""
    results = await server.run(factory, ("bare", mode), plain_client)
    compare(results, mode)


# -- 2. the app's own error after its client left ------------------------------------------------

LEFT_CASES = [
    # A slow handler (it sleeps) raises its own OSError once the client has gone.
    pytest.param(h.file_not_found, "rst", False, False, id="sleeps-FileNotFoundError-rst"),
    pytest.param(h.file_not_found, "fin", False, False, id="sleeps-FileNotFoundError-fin"),
    pytest.param(h.connection_refused, "rst", False, False, id="sleeps-ConnectionRefusedError"),
    pytest.param(h.timeout_error, "rst", False, False, id="sleeps-TimeoutError"),
    pytest.param(h.oserror_group, "rst", False, False, id="sleeps-ExceptionGroup-of-OSError"),
    # The same after the response start and a first chunk.
    pytest.param(h.file_not_found, "rst", True, False, id="mid-body-FileNotFoundError"),
    # A handler told through receive() raises its own OSError: in cancel mode too, which
    # never cancels an app that was told (a sleeping one is cancelled: what cancel mode is for).
    pytest.param(h.file_not_found, "rst", False, True, id="reads-FileNotFoundError"),
]


@pytest.mark.parametrize(("error", "how", "mid_body", "reads"), LEFT_CASES)
async def test_app_oserror_after_client_left_propagates(
    uvicorn: Live, error: h.ErrorFactory, how: Close, mid_body: bool, reads: bool
) -> None:
    """An app's own OSError raised after its client left reaches the server wrapped as bare: it is not absorbed."""
    modes: tuple[Wrapped, ...] = WRAPPED if reads else ("observe",)
    factory = h.raise_after_client_left(error, reads=reads, mid_body=mid_body)
    results = await uvicorn.run(factory, ("bare", *modes), leaving_client(how, mid_body=mid_body))
    for mode in modes:
        compare(results, mode)


# -- 3. a TimeoutError whose context is a cancellation inside the server's send --------------------


@pytest.mark.parametrize("mode", WRAPPED)
@pytest.mark.parametrize("how", ["asyncio.timeout", "anyio.fail_after"])
async def test_send_timeout_error_propagates(uvicorn: Live, how: str, mode: Wrapped) -> None:
    """A TimeoutError from a timeout around a blocked send() (sse-starlette's SendTimeoutError) propagates as bare."""
    results = await uvicorn.run(h.timeout_around_blocked_send(how), ("bare", mode), late_reader)
    for served, _ in results.values():
        [error] = served.rec.raised
        context = error.__context__
        assert isinstance(context, BaseException) and type(context).__name__ == "CancelledError"
        assert any(code.co_name == "send" and "uvicorn" in code.co_filename for code in h.codes_of(context)), (
            "the cancellation should have landed inside uvicorn's send()"
        )
    compare(results, mode, exact_body=False)  # how much got through depends on the socket buffers


# -- 4. an upload of 100,000 one-byte chunks to an app that does not read ----------------------------

UPLOAD_CHUNKS = 100_000
BATCH = 10_000  # chunks per sendall
READ_AHEAD = 1024
UPLOAD_SLEEP = 1.0


class Counting:
    """Between the server and what it serves: counts the ``http.request`` messages its receive() delivered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.sizes: list[int] = []  # body bytes of each, in order

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self.sizes.append(len(message.get("body", b"")))
            return message

        await self.app(scope, counted, send)


def never_reads(rec: h.Recorder) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        rec.started.set()
        await anyio.sleep(UPLOAD_SLEEP)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"done\n"})

    return app


def uploader(port: int, served: Served) -> Received:
    """Upload 100,000 one-byte chunks (chunked encoding, in batches) until the server stops reading; read the answer."""
    with raw_connection(port) as sock:
        sock.sendall(request_bytes("POST", "/", {"x-mode": served.mode, "Transfer-Encoding": "chunked"}))
        batch = b"1\r\nx\r\n" * BATCH
        sock.settimeout(UPLOAD_SLEEP / 4)
        try:
            for _ in range(UPLOAD_CHUNKS // BATCH):
                sock.sendall(batch)
            sock.sendall(b"0\r\n\r\n")
        except TimeoutError:
            pass  # the server stopped reading: its buffers and the sockets' are full
        # The server parses 100,000 chunks of each of two uploads in the test's own loop,
        # and the rest of the upload before it answers the probe: seconds on a busy
        # machine, so bounds of their own.
        data, eof = read_first_response(sock, served.done, UPLOAD_READ_TIMEOUT)
        return received(data, eof, sock, UPLOAD_READ_TIMEOUT)


@pytest.mark.parametrize("mode", WRAPPED)
async def test_unread_upload_of_one_byte_chunks_stays_bounded(uvicorn: Live, mode: Wrapped) -> None:
    """An upload of 100,000 one-byte chunks to an app that never reads: at most max_read_ahead bytes are read ahead."""
    bare_rec, wrapped_rec = h.Recorder(), h.Recorder()
    bare = Counting(never_reads(bare_rec))
    wrapped = Counting(
        DisconnectMiddleware(never_reads(wrapped_rec), cancel=mode == "cancel", max_read_ahead=READ_AHEAD)
    )
    uvicorn.variants = {
        "bare": Served("bare", Outermost(bare), bare_rec),
        mode: Served(mode, Outermost(wrapped), wrapped_rec),
    }
    uvicorn.handler.records.clear()
    got: dict[str, Received] = {}

    async def upload(name: str) -> None:
        got[name] = await anyio.to_thread.run_sync(uploader, uvicorn.port, uvicorn.variants[name])

    with anyio.fail_after(2 * UPLOAD_READ_TIMEOUT + 5):
        async with anyio.create_task_group() as tg:  # side by side: the app sleeps 1 s in each
            for name in uvicorn.variants:
                tg.start_soon(upload, name)

    assert got["bare"] == Received("HTTP/1.1 200 OK", got["bare"].headers, b"done\n", complete=True, closed=False)
    assert got[mode] == got["bare"], f"{mode}: the client received otherwise than bare"
    assert [summary(r) for r in uvicorn.handler.records] == [], "the server logged something"
    assert bare.sizes == []  # the control: nobody read the body
    assert sum(wrapped.sizes) <= READ_AHEAD, (
        f"{mode}: the middleware read {sum(wrapped.sizes)} body bytes ahead in {len(wrapped.sizes)} messages"
        f" ({wrapped.sizes[:5]}...) for an app that never read, max_read_ahead={READ_AHEAD}"
    )
