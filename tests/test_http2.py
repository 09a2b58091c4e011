"""HTTP/2 on a real hypercorn, h2c (prior knowledge) and TLS (ALPN "h2"), with the ``h2``
client library: a stream reset (RST_STREAM) is one request's departure, and only its own.

The clients run in a worker thread on a blocking socket; every read is bounded in time
and in count. The handlers' slow upstreams end after ``LIMIT`` seconds at most, so a
departure the middleware missed fails a test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.lowlevel
import anyio.to_thread
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest
import trustme

from asgi_disconnect import ClientDisconnected, DisconnectMiddleware, DisconnectState, disconnect_state
from asgi_disconnect._loopback import HOST, _close_duplicate, _listening_socket
from asgi_disconnect._types import ASGIApp, Receive, Scope, Send

from .compat import compat
from .helpers import Records, recording
from .servers import raw_connection, run_server, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.server]

Transport = Literal["h2c", "tls"]
TRANSPORTS: tuple[Transport, ...] = ("h2c", "tls")
COMPAT_SERVER = {"h2c": "hypercorn-h2c", "tls": "hypercorn-h2-tls"}
When = Literal["before_response", "mid_stream"]

#: The longest a handler's slow upstream takes, and a client waits for one thing.
LIMIT = 5.0
#: Stream B's body: 16 chunks of 4 KiB, the same bytes every run (more than one stream
#: window: the client's WINDOW_UPDATEs are part of what B needs to complete).
CHUNK = 4096
CHUNKS = 16
HALF = CHUNKS // 2
B_BODY = random.Random(2).randbytes(CHUNK * CHUNKS)
#: Stream A's first chunk, mid-stream.
A_FIRST = b"a" * 1024
#: A flooding handler's chunks: up to 16 MiB, far more than the socket buffers between a
#: client that stops reading and hypercorn hold (about 4 MiB with Linux's default
#: tcp_wmem), so that the handler ends up blocked inside a send. An exhausted stream
#: window would not do it: hypercorn 0.18 keeps buffering a stream's body past it.
FLOOD_CHUNK = 16 * 1024
FLOOD_CHUNKS = 1024
#: Added to the connection's window at once: a stream whose own window the client holds
#: shut must not stall the others through the connection's.
CONNECTION_WINDOW = 1 << 24
#: The loggers a crash or a traceback of the server would reach: hypercorn's own, and
#: asyncio's ("Unhandled exception in client_connected_cb", "Task exception was never
#: retrieved"), and the middleware's troubles (helper_failed and the like).
LOGGERS = ("hypercorn.error", "asyncio", "asgi_disconnect")


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Real servers run on asyncio only."""
    return "asyncio"


# --------------------------------------------------------------------------- the server
@dataclass(frozen=True)
class Endpoint:
    """Where a test's hypercorn listens, and the client's TLS context (None: h2c)."""

    port: int
    tls: ssl.SSLContext | None


@contextlib.asynccontextmanager
async def served(app: ASGIApp, transport: Transport, tmp_path: Path) -> AsyncIterator[Endpoint]:
    """Serve ``app`` with hypercorn in this event loop, h2c or TLS."""
    if transport == "h2c":
        async with run_server(app, "hypercorn") as port:
            yield Endpoint(port, None)
        return
    ca = trustme.CA()
    cert = ca.issue_cert(HOST)  # an IP address SAN: the client checks it as a host name
    certfile, keyfile = tmp_path / "server.pem", tmp_path / "server.key"
    for pem in cert.cert_chain_pems:
        pem.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["h2"])
    async with hypercorn_tls(app, certfile, keyfile) as port:
        yield Endpoint(port, context)


@contextlib.asynccontextmanager
async def hypercorn_tls(app: ASGIApp, certfile: Path, keyfile: Path) -> AsyncIterator[int]:
    """hypercorn with TLS in this event loop, on an ephemeral port; yield the port.

    ``asgi_disconnect._loopback.serve`` builds hypercorn's Config itself and takes no
    certificate: this is its hypercorn start, with ``certfile``/``keyfile`` added.
    """
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    sock = _listening_socket()  # listening before hypercorn starts: a client may connect at once
    fd = os.dup(sock.fileno())  # hypercorn closes the socket object it wraps around this one
    config = Config()
    config.bind = [f"fd://{fd}"]
    config.certfile = str(certfile)
    config.keyfile = str(keyfile)
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 2
    stopping = anyio.Event()
    stopped = anyio.Event()
    served_app: Any = app  # hypercorn's types of an app are narrower than the package's

    async def run() -> None:
        try:
            await hypercorn_serve(served_app, config, shutdown_trigger=stopping.wait, mode="asgi")
        finally:
            stopped.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            try:
                yield sock.getsockname()[1]
            finally:
                stopping.set()
                with anyio.move_on_after(LIMIT):
                    await stopped.wait()
                tg.cancel_scope.cancel()  # bounded: a server that did not stop in time is stopped
    finally:
        _close_duplicate(fd, sock)
        sock.close()


def server_troubles(records: Records) -> list[str]:
    """What the server and the middleware logged that a healthy run never logs."""
    return [
        f"{record.name} {record.levelname}: {record.getMessage()}"
        for record in records.records
        if record.levelno >= logging.WARNING or record.exc_info
    ]


# --------------------------------------------------------------------------- the app
@dataclass
class Call:
    """What one handler saw and did."""

    path: str
    state: DisconnectState
    #: "running", then "completed", "ClientDisconnected" (a send raised it) or "cancelled".
    outcome: str = "running"
    sends: int = 0  # the sends it started
    in_send: bool = False  # inside the server's send() now
    cancelled_in_send: bool = False  # the cancellation landed inside the server's send()
    ended: threading.Event = field(default_factory=threading.Event)


class Streams:
    """The raw ASGI app behind the middleware: stream A's handlers and stream B's.

    - ``/a-before``: waits for its slow upstream, then starts its response;
    - ``/a-mid``: sends its start and ``A_FIRST``, then waits for its upstream;
    - ``/a-flood``: streams ``FLOOD_CHUNK`` chunks as fast as its upstream gives them;
    - ``/b``: streams ``B_BODY``; ``/b-gated`` waits after its first half until an A
      handler has returned, so that B is in progress while A is reset.

    The slow upstream is what each mode's user writes: in observe mode the handler
    watches ``state.wait()``; in cancel mode it knows nothing of disconnects (the
    middleware's cancellation ends it).
    """

    def __init__(self, cancel: bool) -> None:
        self.cancel = cancel
        self.calls: dict[str, list[Call]] = defaultdict(list)
        self.a_started = threading.Event()
        self.a_returned = anyio.Event()

    def only(self, path: str) -> Call:
        """The one call of ``path``."""
        calls = self.calls[path]
        assert len(calls) == 1, f"{path}: {len(calls)} calls"
        return calls[0]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan: hypercorn goes on without it, quietly
        path = scope["path"]
        call = Call(path, disconnect_state(scope))
        self.calls[path].append(call)

        async def tracked(message: dict[str, Any]) -> None:
            call.sends += 1
            call.in_send = True
            try:
                await send(message)
            except anyio.get_cancelled_exc_class():
                call.cancelled_in_send = True
                raise
            finally:
                call.in_send = False

        handlers = {"/a-before": self.a_before, "/a-mid": self.a_mid, "/a-flood": self.a_flood}
        try:
            if path.startswith("/b"):
                await self.b(tracked, gated=path == "/b-gated")
            else:
                await handlers[path](call.state, tracked)
            call.outcome = "completed"
        except ClientDisconnected:
            call.outcome = "ClientDisconnected"
            raise  # as a user's handler lets it go: the middleware absorbs it
        except anyio.get_cancelled_exc_class():
            call.outcome = "cancelled"
            raise
        finally:
            call.ended.set()
            if path.startswith("/a"):
                self.a_returned.set()

    async def upstream(self, state: DisconnectState) -> None:
        """A slow upstream: its next chunk would come only after ``LIMIT`` seconds."""
        if self.cancel:
            await anyio.sleep(LIMIT)
        else:
            with anyio.move_on_after(LIMIT):
                await state.wait()

    async def a_before(self, state: DisconnectState, send: Callable[[dict[str, Any]], Any]) -> None:
        self.a_started.set()
        await self.upstream(state)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    async def a_mid(self, state: DisconnectState, send: Callable[[dict[str, Any]], Any]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": A_FIRST, "more_body": True})
        await self.upstream(state)
        await send({"type": "http.response.body", "body": b"late"})

    async def a_flood(self, state: DisconnectState, send: Callable[[dict[str, Any]], Any]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(FLOOD_CHUNKS):
            await anyio.lowlevel.checkpoint()  # the upstream's next chunk, at once
            await send({"type": "http.response.body", "body": b"f" * FLOOD_CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def b(self, send: Callable[[dict[str, Any]], Any], *, gated: bool) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x")]})
        for index in range(CHUNKS):
            if gated and index == HALF:
                with anyio.move_on_after(LIMIT):  # bounded: A's test fails, B goes on
                    await self.a_returned.wait()
            chunk = B_BODY[index * CHUNK : (index + 1) * CHUNK]
            await send({"type": "http.response.body", "body": chunk, "more_body": index < CHUNKS - 1})


# --------------------------------------------------------------------------- the client
class H2Client:
    """One HTTP/2 connection of a blocking client: h2's state machine over a socket.

    ``with H2Client(endpoint) as client:`` sends the connection preface; leaving the
    block sends GOAWAY and closes the socket.
    """

    def __init__(self, endpoint: Endpoint, *, rcvbuf: int | None = None) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:  # before connecting: it sets the TCP window the server sees
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            raw.settimeout(LIMIT)
            raw.connect((HOST, endpoint.port))
            self.sock = raw if endpoint.tls is None else endpoint.tls.wrap_socket(raw, server_hostname=HOST)
        except BaseException:
            raw.close()
            raise
        if isinstance(self.sock, ssl.SSLSocket):
            assert self.sock.selected_alpn_protocol() == "h2", "the server did not pick h2 by ALPN"
        self.conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        self.status: dict[int, int] = {}
        self.data: defaultdict[int, bytearray] = defaultdict(bytearray)
        self.ended: set[int] = set()
        self.reset_by_server: dict[int, int] = {}
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW)
        self.flush()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        with contextlib.suppress(OSError, h2.exceptions.ProtocolError):
            self.conn.close_connection()
            self.flush()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def get(self, path: str) -> int:
        """Send ``GET path`` (END_STREAM on its HEADERS) on a new stream; return its id."""
        stream = self.conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":path", path), (":scheme", "https" if self._tls else "http")]
        self.conn.send_headers(stream, [*headers, (":authority", HOST)], end_stream=True)
        self.flush()
        return stream

    def open_window(self, stream: int, increment: int) -> None:
        """Let the server send ``increment`` more bytes on ``stream`` than it has (WINDOW_UPDATE)."""
        self.conn.increment_flow_control_window(increment, stream_id=stream)
        self.flush()

    def reset(self, stream: int) -> None:
        """Reset ``stream`` as a browser does when its tab no longer wants it: RST_STREAM, CANCEL."""
        self.conn.reset_stream(stream, error_code=h2.errors.ErrorCodes.CANCEL)
        self.flush()

    def pump(self, done: Callable[[], bool], what: str, within: float = LIMIT) -> None:
        """Read and answer the server until ``done()``; fail once ``within`` seconds are over."""
        deadline = time.monotonic() + within
        for _ in range(10_000):  # each round reads bytes or ends the loop
            if done():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                raise ConnectionError(f"{what}: the server closed the connection first: {self.summary()}")
            self._handle(self.conn.receive_data(chunk))
            self.flush()
        raise AssertionError(f"{what}: not within {within:g} s: {self.summary()}")

    def _handle(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                for name, value in event.headers or ():
                    if name == b":status":
                        self.status[event.stream_id] = int(value)
            elif isinstance(event, h2.events.DataReceived):
                self.data[event.stream_id] += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.reset_by_server[event.stream_id] = event.error_code

    @property
    def _tls(self) -> bool:
        return isinstance(self.sock, ssl.SSLSocket)

    def summary(self) -> str:
        received = {stream: len(data) for stream, data in self.data.items()}
        return f"status {self.status}, bytes {received}, ended {sorted(self.ended)}, reset {self.reset_by_server}"


async def returned_all(*calls: Call) -> None:
    """Wait, bounded, until each of ``calls`` has returned (a client may see a stream end first)."""
    for call in calls:
        assert await anyio.to_thread.run_sync(call.ended.wait, LIMIT), f"{call.path}: the handler did not return"


def fetch(endpoint: Endpoint, path: str = "/b") -> tuple[int | None, bytes]:
    """``GET path`` on a new connection of its own, read to its end: status and body."""
    with H2Client(endpoint) as client:
        stream = client.get(path)
        client.pump(lambda: stream in client.ended, f"GET {path} on a new connection")
        return client.status.get(stream), bytes(client.data[stream])


@dataclass
class Seen:
    """What the client of the two streams received on each."""

    a_status: int | None
    a_data: bytes
    b_status: int | None
    b_data: bytes


def reset_a_during_b(endpoint: Endpoint, when: When, app: Streams) -> Seen:
    """Streams A and B on one connection; reset A while B is half sent; read B to its end."""
    with H2Client(endpoint) as client:
        a = client.get("/a-before" if when == "before_response" else "/a-mid")
        b = client.get("/b-gated")
        if when == "before_response":
            assert app.a_started.wait(LIMIT), "A's handler did not start"
            client.pump(lambda: len(client.data[b]) >= HALF * CHUNK, "B's first half")
        else:
            client.pump(
                lambda: len(client.data[a]) >= len(A_FIRST) and len(client.data[b]) >= HALF * CHUNK,
                "A's first chunk and B's first half",
            )
        assert b not in client.ended, "B ended before A was reset"
        client.reset(a)
        client.pump(lambda: b in client.ended, "the rest of B")
        return Seen(client.status.get(a), bytes(client.data[a]), client.status.get(b), bytes(client.data[b]))


# --------------------------------------------------------------------------- the tests
def two_stream_cases() -> list[Any]:
    """(transport, when, cancel), each marked as proof of its compat cells."""
    params = []
    for transport in TRANSPORTS:
        server = COMPAT_SERVER[transport]
        for when in ("before_response", "mid_stream"):
            for cancel in (False, True):
                marks = [compat("asgi", server, when)] + ([compat("asgi", server, "cancel")] if cancel else [])
                mode = "cancel" if cancel else "observe"
                params.append(pytest.param(transport, when, cancel, marks=marks, id=f"{transport}-{when}-{mode}"))
    return params


@pytest.mark.parametrize(("transport", "when", "cancel"), two_stream_cases())
async def test_a_reset_stream_is_detected_and_its_sibling_completes(
    transport: Transport, when: When, cancel: bool, tmp_path: Path
) -> None:
    """RST_STREAM on A, B mid-body on the same connection: A is seen gone (and cancelled in
    cancel mode), B is untouched and complete to the byte, the server stays healthy."""
    app = Streams(cancel)
    records = Records()
    with recording(records, *LOGGERS):
        async with served(DisconnectMiddleware(app, cancel=cancel), transport, tmp_path) as endpoint:
            seen = await anyio.to_thread.run_sync(reset_a_during_b, endpoint, when, app)
            a = app.only("/a-before" if when == "before_response" else "/a-mid")
            b = app.only("/b-gated")
            await returned_all(a, b)
            # The connection is closed (GOAWAY, FIN): a new one is served in full.
            after = await anyio.to_thread.run_sync(fetch, endpoint)

    assert a.state.disconnected is True
    assert a.state.phase == ("before_response" if when == "before_response" else "mid_body")
    assert a.state.cancelled is cancel
    # Observe mode: the handler's send after the departure raised; cancel mode: its upstream wait was cut.
    assert a.outcome == ("cancelled" if cancel else "ClientDisconnected")
    if when == "before_response":
        assert seen.a_status is None, "A had a response"
    else:
        assert (seen.a_status, seen.a_data) == (200, A_FIRST)

    assert (b.state.disconnected, b.state.phase, b.state.cancelled, b.outcome) == (False, None, False, "completed")
    assert seen.b_status == 200
    assert seen.b_data == B_BODY
    assert after == (200, B_BODY)
    assert server_troubles(records) == []


def blocked_in_send(calls: list[Call], within: float = LIMIT) -> bool:
    """True once the one call in ``calls`` has stayed inside the same send for 20 polls in a row."""
    steady, last = 0, -1
    for _ in range(int(within / 0.01)):
        call = calls[0] if calls else None
        if call is not None and call.in_send and call.sends == last:
            steady += 1
            if steady >= 20:
                return True
        else:
            steady = 0
        last = call.sends if call is not None else -1
        time.sleep(0.01)
    return False


@pytest.mark.parametrize(
    "transport", [pytest.param(t, marks=compat("asgi", COMPAT_SERVER[t], "cancel"), id=t) for t in TRANSPORTS]
)
async def test_a_handler_cancelled_on_a_reset_leaves_the_connection_serving(
    transport: Transport, tmp_path: Path
) -> None:
    """hypercorn #376: a handler cancelled after its stream's reset must not crash hypercorn.

    The client opens stream A's window wide and stops reading: hypercorn's writer waits
    on the full socket, and A's handler ends up waiting inside hypercorn's send. A is
    reset then: the middleware cancels the handler inside that send while hypercorn
    cannot finish tearing the stream down, and hypercorn's task then closes the ASGI
    stream of a reset h2 stream. The client reads again, and the same connection serves
    three more streams in full.
    """
    app = Streams(cancel=True)
    records = Records()

    def scenario(endpoint: Endpoint) -> tuple[bool, bool, list[tuple[int | None, bytes]]]:
        # A small receive buffer: the socket between the two fills after little data.
        with H2Client(endpoint, rcvbuf=64 * 1024) as client:
            a = client.get("/a-flood")
            client.open_window(a, CONNECTION_WINDOW)
            blocked = blocked_in_send(app.calls["/a-flood"])
            client.reset(a)
            returned = app.calls["/a-flood"][0].ended.wait(LIMIT)  # still without reading
            streams = [client.get("/b") for _ in range(3)]
            client.pump(lambda: all(b in client.ended for b in streams), "three streams after the reset")
            return blocked, returned, [(client.status.get(b), bytes(client.data[b])) for b in streams]

    with recording(records, *LOGGERS):
        async with served(DisconnectMiddleware(app, cancel=True), transport, tmp_path) as endpoint:
            blocked, returned, more = await anyio.to_thread.run_sync(scenario, endpoint)
            after = await anyio.to_thread.run_sync(fetch, endpoint)
            await returned_all(*app.calls["/b"])

    a = app.only("/a-flood")
    assert blocked, f"A's handler did not end up waiting in a send: {a}"
    assert returned, "A's handler did not return once cancelled"
    assert a.sends < FLOOD_CHUNKS  # it stopped at the block, far before its end
    assert (a.state.disconnected, a.state.phase, a.state.cancelled, a.outcome) == (True, "mid_body", True, "cancelled")
    assert a.cancelled_in_send, "the cancellation did not land inside hypercorn's send"
    assert more == [(200, B_BODY)] * 3
    assert [call.outcome for call in app.calls["/b"]] == ["completed"] * 4
    assert after == (200, B_BODY)
    assert server_troubles(records) == []


def get_then_reset(port: int, path: str, started: threading.Event) -> None:
    """Open an h2c connection, GET ``path`` (END_STREAM on the headers), reset the stream once the app runs."""
    with raw_connection(port) as sock:
        conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "127.0.0.1")]
        conn.send_headers(stream, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
        assert started.wait(5), "the handler did not start"
        conn.reset_stream(stream)
        sock.sendall(conn.data_to_send())
        sock.settimeout(0.2)
        try:
            for _ in range(20):  # read what the server answers until it goes quiet (bounded)
                if not sock.recv(65536):
                    break
        except TimeoutError:
            pass


@pytest.mark.parametrize(
    "cancel",
    [
        pytest.param(False, id="observe", marks=compat("asgi", "hypercorn-h2c", "before_response")),
        pytest.param(True, id="cancel", marks=compat("asgi", "hypercorn-h2c", "cancel")),
    ],
)
async def test_a_reset_bodiless_http2_get_is_detected_with_read_ahead_disabled(cancel: bool) -> None:
    """An HTTP/2 GET has no content-length: with max_read_ahead=0 its RST_STREAM is still seen."""
    states: list[DisconnectState] = []
    versions: list[str] = []
    started = threading.Event()
    ended = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        state = disconnect_state(scope)
        states.append(state)
        versions.append(scope["http_version"])
        try:
            started.set()
            with anyio.move_on_after(3):
                await state.wait()
                if cancel:
                    await anyio.sleep(3)  # an upstream call: the cancellation ends it at once
        finally:
            ended.set()

    wrapped = DisconnectMiddleware(app, cancel=cancel, max_read_ahead=0)
    async with run_server(wrapped, "hypercorn") as port:
        await anyio.to_thread.run_sync(get_then_reset, port, "/watch", started)
        await wait_for(ended, "the handler ended")
    assert versions == ["2"]
    assert states[0].disconnected is True
    assert states[0].phase == "before_response"
    assert states[0].cancelled is cancel
