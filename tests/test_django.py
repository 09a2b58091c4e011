"""Django's own request lifecycle behind DisconnectMiddleware, on a real uvicorn.

Django's ASGIHandler listens for the disconnect itself: it reads the body into a
temporary file, sends ``request_started``, then runs its listener (``receive()``) and
the view as two tasks and cancels the view when ``http.disconnect`` comes. It sends
``request_finished`` (whose receiver ``close_old_connections`` closes the database
connection) from ``response.close()``, or itself when the view was cancelled, and
closes the body file. Promise 6: the middleware never breaks that lifecycle, in
observe mode or in cancel mode; promise 7: never worse than without it. The bare
Django app is the control in every test.

What is checked after each test, once the server side has settled
(``Lifecycle.check``):

- every ``request_started`` has exactly one ``request_finished``;
- every request body's temporary file (``tempfile.SpooledTemporaryFile`` as created by
  ``django.core.handlers.asgi``) is closed;
- every database connection Django opened is closed. Django keeps one connection per
  thread; under ASGI a request's sync code runs in a thread of its own
  (asgiref's ``ThreadSensitiveContext``), and only ``request_finished`` closes the
  connection there. A skipped ``request_finished`` leaves the ``DatabaseWrapper``
  that the ``connection_created`` signal reported holding an open sqlite3
  connection that no one will close (its ``.connection`` is not ``None``);
- Django's ``asyncio.wait`` for its listener and view is never interrupted: a
  cancellation there abandons both tasks, which nobody collects or cancels any more;
- nothing escaped the app and no ERROR record was logged (uvicorn, django, asyncio).

The module runs one uvicorn (httptools, in the tests' loop, tests/servers.py); each
test plugs its app, bare or wrapped, into it. Clients are raw blocking sockets in a
worker thread that leave with a FIN or an RST.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import sqlite3
import tempfile
import threading
import time
import types
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import anyio.to_thread
import pytest

pytest.importorskip("django", reason="the Django lifecycle tests need Django (the [dev] extra)")

import django.core.handlers.asgi  # type: ignore[import-untyped]
from django.core import signals
from django.db.backends.signals import connection_created  # type: ignore[import-untyped]

from asgi_disconnect import DisconnectMiddleware
from asgi_disconnect._request import LISTEN_WINDOW
from asgi_disconnect._types import ASGIApp, Receive, Scope, Send
from asgi_disconnect.pytest_plugin import CapturedEvents

from . import django_app
from .compat import compat
from .django_app import BUSY_LOOKUP, probe
from .helpers import CLOSES, Close, Records, fetch, recording, settled
from .servers import (
    Outermost,
    ServerKind,
    close,
    raw_connection,
    read_then_leave,
    request_bytes,
    run_server,
)

# Every test here checks Django's lifecycle behind the middleware (README's table).
pytestmark = [pytest.mark.anyio, pytest.mark.server, compat("django", "uvicorn-httptools", "lifecycle")]

Mode = Literal["bare", "observe", "cancel"]
MODES: tuple[Mode, ...] = ("bare", "observe", "cancel")
KIND: ServerKind = "uvicorn-httptools"  # what uvicorn runs by default when httptools is installed
LOGGERS = ("uvicorn", "django", "asyncio")
SETTLE_WITHIN = 5.0  # seconds at most for the server side to finish after the clients
QUIET = 0.05  # ...and no request started or ended for this long
LEAVES = 30  # clients that leave right after their request, per test


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Real servers run on asyncio only (Django's handler is asyncio-only anyway)."""
    return "asyncio"


@pytest.fixture(scope="module")
def django_asgi(tmp_path_factory: pytest.TempPathFactory) -> ASGIApp:
    """The Django project's ASGI app, its SQLite database in a temporary directory."""
    return django_app.configure(tmp_path_factory.mktemp("django"))


class Lifecycle:
    """Django's lifecycle as the signals, the body files and the database connections show it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = 0
        self.finished = 0
        self.body_files: list[tempfile.SpooledTemporaryFile[bytes]] = []
        self.connections: list[Any] = []  # django.db.backends.base.base.BaseDatabaseWrapper
        self.errors = Records(logging.ERROR)
        self.recorder: Outermost | None = None
        self.abandoned = 0  # Django's listener and view tasks, abandoned by their handler

    def on_started(self, **kwargs: Any) -> None:
        with self.lock:
            self.started += 1

    def on_finished(self, **kwargs: Any) -> None:
        with self.lock:
            self.finished += 1

    def on_connection(self, connection: Any, **kwargs: Any) -> None:
        with self.lock:
            self.connections.append(connection)

    def spooled(self, *args: Any, **kwargs: Any) -> tempfile.SpooledTemporaryFile[bytes]:
        body_file: tempfile.SpooledTemporaryFile[bytes] = tempfile.SpooledTemporaryFile(*args, **kwargs)
        self.body_files.append(body_file)
        return body_file

    async def wait(self, tasks: Iterable[asyncio.Task[Any]], **kwargs: Any) -> Any:
        """``asyncio.wait`` for django.core.handlers.asgi: count the tasks abandoned when the wait is interrupted."""
        tasks = list(tasks)
        try:
            return await asyncio.wait(tasks, **kwargs)
        except BaseException:
            # Django collects (and cancels) its listener and view only after this wait: now no one will.
            self.abandoned += len(tasks)
            raise

    def snapshot(self) -> tuple[int, ...]:
        assert self.recorder is not None
        counts = sum(probe.counts.values())
        return (self.recorder.started, self.recorder.ended, self.started, self.finished, counts, probe.busy)

    async def settle(self) -> None:
        """Wait (bounded) until every request has returned, no view works in a thread, and nothing moves any more."""
        recorder = self.recorder
        assert recorder is not None
        if not await settled(
            self.snapshot,
            lambda: recorder.started == recorder.ended and not probe.busy,
            within=SETTLE_WITHIN,
            quiet=QUIET,
        ):
            raise AssertionError(
                f"the server side did not settle within {SETTLE_WITHIN} s: {recorder.started} requests "
                f"started, {recorder.ended} returned, {probe.busy} views at work in threads"
            )

    def check(self) -> None:
        """Every request_started paired, every body file and connection closed, nothing escaped or logged."""
        assert self.recorder is not None
        problems = []
        if self.finished != self.started:
            problems.append(f"request_finished sent {self.finished} times for {self.started} request_started")
        open_files = sum(not body_file.closed for body_file in self.body_files)
        if open_files:
            problems.append(f"{open_files} of {len(self.body_files)} request body files left open")
        open_connections = sum(wrapper.connection is not None for wrapper in self.connections)
        if open_connections:
            problems.append(f"{open_connections} of {len(self.connections)} database connections left open")
        if self.abandoned:
            problems.append(f"{self.abandoned} tasks (Django's listener and view) abandoned by their handler")
        if self.recorder.escaped:
            escaped = Counter(repr(exc) for exc in self.recorder.escaped)
            problems.append(f"escaped the app: {dict(escaped)}")
        logged = Counter(f"{record.name}: {record.getMessage()}" for record in self.errors.records)
        problems.extend(f"ERROR logged {count} times by {message}" for message, count in logged.items())
        assert problems == [], f"{self.recorder.started} requests reached the app; " + "; ".join(problems)


@pytest.fixture
def lifecycle(django_asgi: ASGIApp, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lifecycle]:
    """Count Django's signals, body files and connections during one test."""
    probe.reset()
    with contextlib.closing(sqlite3.connect(django_app.database())) as db:
        db.execute(f"DELETE FROM {django_app.TABLE}")
        db.commit()
    life = Lifecycle()
    handler_module = django.core.handlers.asgi
    monkeypatch.setattr(handler_module, "tempfile", types.SimpleNamespace(SpooledTemporaryFile=life.spooled))
    monkeypatch.setattr(handler_module, "asyncio", types.SimpleNamespace(**{**vars(asyncio), "wait": life.wait}))
    signals.request_started.connect(life.on_started, weak=False, dispatch_uid="test_django.started")
    signals.request_finished.connect(life.on_finished, weak=False, dispatch_uid="test_django.finished")
    connection_created.connect(life.on_connection, weak=False, dispatch_uid="test_django.connection")
    try:
        yield life
    finally:
        signals.request_started.disconnect(dispatch_uid="test_django.started")
        signals.request_finished.disconnect(dispatch_uid="test_django.finished")
        connection_created.disconnect(dispatch_uid="test_django.connection")
        # What GC would do later, in another test, with a ResourceWarning: close what leaked.
        for body_file in life.body_files:
            body_file.close()
        for wrapper in life.connections:
            if wrapper.connection is not None:
                wrapper.connection.close()


def wrap(app: ASGIApp, mode: Mode, grace: float = 0.0) -> ASGIApp:
    if mode == "bare":
        return app
    return DisconnectMiddleware(app, cancel=mode == "cancel", grace=grace)


class Switch:
    """What the module's one uvicorn serves: the current test's app (a 503 between tests)."""

    def __init__(self) -> None:
        self.app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is None:
            await send({"type": "http.response.start", "status": 503, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)


@dataclass
class Server:
    port: int
    switch: Switch


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[Server]:
    """One real uvicorn for the module, in the tests' event loop: starting one per test costs 0.2 s."""
    switch = Switch()
    async with run_server(switch, KIND) as port:
        yield Server(port, switch)


@contextlib.asynccontextmanager
async def serve(
    server: Server, django_asgi: ASGIApp, mode: Mode, life: Lifecycle, grace: float = 0.0
) -> AsyncIterator[int]:
    """Serve the Django app (wrapped for ``mode``) for one test; record ERROR logs until its requests settled."""
    life.recorder = Outermost(wrap(django_asgi, mode, grace))
    # uvicorn.Config configured logging when the server started: its dictConfig drops the handlers it finds.
    with recording(life.errors, *LOGGERS):
        server.switch.app = life.recorder
        try:
            yield server.port
            await life.settle()
            gc.collect()  # an orphaned task's unretrieved exception is logged when the task is collected
        finally:
            server.switch.app = None


def leave_at_once(port: int, data: bytes, how: Close, times: int) -> None:
    """Send a request and close at once, ``times`` times in a row."""
    for _ in range(times):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            sock.sendall(data)
        finally:
            close(sock, how)


def order_rows() -> Counter[int]:
    """Parts written per order, read by a connection of our own."""
    with contextlib.closing(sqlite3.connect(django_app.database(), timeout=1)) as db:
        rows = db.execute(f"SELECT order_id FROM {django_app.TABLE}").fetchall()
    return Counter(order for (order,) in rows)


def database_unlocked() -> bool:
    """No connection holds a write lock (a transaction left open would)."""
    with contextlib.closing(sqlite3.connect(django_app.database(), timeout=0, isolation_level=None)) as db:
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return False
        db.execute("ROLLBACK")
    return True


# -- 1. normal requests ----------------------------------------------------------------

NORMAL = [
    ("GET", "/fast", b"", b"fast"),
    ("GET", "/sync", b"", b"rows=0"),
    ("GET", "/db", b"", b"rows=0"),
    ("POST", "/echo", b"x" * 100_000, b"echo:" + b"x" * 100_000),
    ("GET", "/stream?n=3", b"", b"chunk 0000\nchunk 0001\nchunk 0002\n"),
]


@pytest.mark.parametrize("mode", MODES)
async def test_normal_requests_complete_with_lifecycle(
    server: Server, django_asgi: ASGIApp, lifecycle: Lifecycle, mode: Mode
) -> None:
    """Requests whose clients stay get the same status and body as bare Django, and one request_finished each."""
    async with serve(server, django_asgi, mode, lifecycle) as port:

        def client() -> list[tuple[int, bytes]]:
            answers = []
            for method, path, body, _ in NORMAL:
                status, _, received = fetch(port, method, path, body)
                answers.append((status, received))
            return answers

        answers = await anyio.to_thread.run_sync(client)

    assert answers == [(200, expected) for *_, expected in NORMAL]
    assert lifecycle.recorder is not None and lifecycle.recorder.started == len(NORMAL)
    assert lifecycle.started == len(NORMAL)
    lifecycle.check()


# -- 2. clients that leave right after their request -------------------------------------

LEAVE_PATHS = ["/fast", "/tenant/fast", "/slow", "/sync", "/db", "/stream"]


@pytest.mark.parametrize("how", CLOSES)
@pytest.mark.parametrize("path", LEAVE_PATHS)
@pytest.mark.parametrize("mode", MODES)
async def test_client_leaving_right_after_request_keeps_lifecycle(
    server: Server, django_asgi: ASGIApp, lifecycle: Lifecycle, mode: Mode, path: str, how: Close
) -> None:
    """Clients that send a request and leave at once: each request_started is finished, files and connections closed."""
    async with serve(server, django_asgi, mode, lifecycle) as port:
        await anyio.to_thread.run_sync(leave_at_once, port, request_bytes("GET", path), how, LEAVES)

    assert lifecycle.recorder is not None and lifecycle.recorder.started > 0, "no request reached the app"
    lifecycle.check()
    # Cleanup that awaits is cancelled at most once: a second cancellation would interrupt it.
    assert probe.counts["slow.cancelled_again"] == probe.counts["stream.cancelled_again"] == 0, probe.counts
    assert probe.counts["stream.finally"] == probe.counts["stream.started"], probe.counts


@pytest.mark.parametrize("how", CLOSES)
@pytest.mark.parametrize("mode", MODES)
async def test_a_set_up_longer_than_the_listen_window_is_covered_by_the_grace(
    server: Server, django_asgi: ASGIApp, lifecycle: Lifecycle, mode: Mode, how: Close
) -> None:
    """A request_started receiver slower than LISTEN_WINDOW: with a grace that covers it, the lifecycle holds."""
    assert BUSY_LOOKUP > LISTEN_WINDOW  # what this test is about
    async with serve(server, django_asgi, mode, lifecycle, grace=BUSY_LOOKUP * 2) as port:
        await anyio.to_thread.run_sync(leave_at_once, port, request_bytes("GET", "/tenant/busy/fast"), how, LEAVES)

    assert lifecycle.recorder is not None and lifecycle.recorder.started > 0, "no request reached the app"
    lifecycle.check()


# -- 3. a client that leaves mid-stream ---------------------------------------------------

MID_STREAM_TIMES = 5


@pytest.mark.parametrize("how", CLOSES)
@pytest.mark.parametrize(
    "mode",
    [
        "bare",
        pytest.param("observe", marks=compat("django", "uvicorn-httptools", "mid_stream")),
        pytest.param("cancel", marks=compat("django", "uvicorn-httptools", "cancel")),
    ],
)
async def test_client_leaving_mid_stream_stops_generator_once(
    server: Server, django_asgi: ASGIApp, lifecycle: Lifecycle, mode: Mode, how: Close
) -> None:
    """A client that leaves mid-stream: Django cancels the generator once, its cleanup runs, request_finished once."""
    left_at: list[float] = []
    async with serve(server, django_asgi, mode, lifecycle) as port:
        for _ in range(MID_STREAM_TIMES):
            left_at.append(await anyio.to_thread.run_sync(read_then_leave, port, "/stream", b"chunk 0000\n", how))
            await lifecycle.settle()

    assert lifecycle.started == MID_STREAM_TIMES
    lifecycle.check()
    counts = probe.counts
    assert counts["stream.started"] == counts["stream.finally"] == counts["stream.cleaned"] == MID_STREAM_TIMES, counts
    # As bare: Django's listener cancels the view, once; a second cancellation would interrupt the cleanup.
    assert counts["stream.cancelled"] == MID_STREAM_TIMES, counts
    assert counts["stream.cancelled_again"] == 0, counts
    assert counts["stream.chunks"] <= MID_STREAM_TIMES * 2, f"the streams went on after their clients left: {counts}"
    assert max(end - left for end, left in zip(probe.stream_ended_at, left_at, strict=True)) < 1.0


# -- 4. a transaction interrupted by the client leaving ----------------------------------

ORDER_TIMES = 2
# Rows written per order. A sync view runs in its thread to the end whatever happens to
# the await on it: its transaction commits whole. An async view's transaction is rolled
# back: Django cancels the view itself when the client leaves, bare or wrapped alike.
ORDER_PARTS = {"sync": 2, "async": 0}


@pytest.mark.parametrize("how", CLOSES)
@pytest.mark.parametrize("view", ["sync", "async"])
@pytest.mark.parametrize("mode", MODES)
async def test_client_leaving_mid_transaction_leaves_no_half_order(
    server: Server, django_asgi: ASGIApp, lifecycle: Lifecycle, mode: Mode, view: str, how: Close
) -> None:
    """A client that leaves mid-transaction: the order is written whole or not at all, as bare, and no lock is left."""
    async with serve(server, django_asgi, mode, lifecycle) as port:
        for order in range(ORDER_TIMES):
            probe.tx_open.clear()

            def client(order: int = order) -> bool:
                with raw_connection(port) as sock:
                    sock.sendall(request_bytes("GET", f"/order/{view}?order={order}"))
                    opened = probe.tx_open.wait(5)
                    close(sock, how)
                return opened

            assert await anyio.to_thread.run_sync(client), "the view never opened its transaction"
            await lifecycle.settle()

    assert lifecycle.started == ORDER_TIMES
    lifecycle.check()
    assert database_unlocked(), "a transaction was left open"
    rows = order_rows()
    assert [rows[order] for order in range(ORDER_TIMES)] == [ORDER_PARTS[view]] * ORDER_TIMES, rows
    if view == "async":
        assert probe.counts["order.cancelled"] == probe.counts["order.rolled_back"] == ORDER_TIMES, probe.counts


# -- 5. what the middleware adds: the state in the view, the abort's record -----------------


@pytest.mark.parametrize("how", CLOSES)
@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("observe", marks=compat("django", "uvicorn-httptools", "before_response")),
        pytest.param("cancel", marks=compat("django", "uvicorn-httptools", "cancel")),
    ],
)
async def test_a_view_sees_the_departure_and_the_abort_names_its_route(
    server: Server,
    django_asgi: ASGIApp,
    lifecycle: Lifecycle,
    disconnect_events: CapturedEvents,
    mode: Mode,
    how: Close,
) -> None:
    """README's view: Django cancels it once when the client leaves; its state says the client
    left before the response, and the abort is logged once with the Django route."""
    async with serve(server, django_asgi, mode, lifecycle) as port:

        def client() -> None:
            with raw_connection(port) as sock:
                sock.sendall(request_bytes("GET", "/reports/2026/"))
                for _ in range(500):  # until the view runs: at most 5 s
                    if probe.states:
                        break
                    time.sleep(0.01)
                close(sock, how)

        await anyio.to_thread.run_sync(client)

    lifecycle.check()
    [state] = probe.states
    assert (state.disconnected, state.phase, state.route) == (True, "before_response", "reports/<int:year>/")
    # Django stops the view itself, once, in both modes: the middleware does not cancel it again.
    assert probe.counts["report.cancelled"] == 1
    assert state.cancelled is False
    [event] = disconnect_events
    assert {key: event[key] for key in ("event", "path", "route", "phase", "cancelled")} == {
        "event": "request_aborted",
        "path": "/reports/2026/",
        "route": "reports/<int:year>/",
        "phase": "before_response",
        "cancelled": False,
    }
