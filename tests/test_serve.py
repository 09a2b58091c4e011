"""asgi_disconnect.testing.serve(): the app on a real server, a raw-socket client that leaves.

Each test serves an app with ``serve()`` on uvicorn (h11, httptools) or hypercorn (asyncio,
trio) and asserts what a user of ``live.request()`` sees in the ``Outcome``: what the
client received, where it left, what the middleware recorded, how long the handler ran on,
what escaped the app and what the server logged. The app runs in the test's own loop, so
``Handler`` records what it did where the test reads it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import anyio
import pytest
import sniffio

from asgi_disconnect import DisconnectMiddleware, _loopback, disconnect_state
from asgi_disconnect._loopback import Lifespan, ServerName
from asgi_disconnect._types import ASGIApp, Message, Receive, Scope, Send
from asgi_disconnect.testing import Departure, How, Live, Outcome, ServerStartError, leave, serve

from . import test_loopback
from .test_loopback import assert_refused

pytestmark = [pytest.mark.anyio, pytest.mark.server]

# Every server, with the backend it runs on.
ON_EVERY_SERVER = pytest.mark.parametrize(
    ("server", "anyio_backend"),
    [
        pytest.param("uvicorn-h11", "asyncio", id="uvicorn-h11"),
        pytest.param("uvicorn-httptools", "asyncio", id="uvicorn-httptools"),
        pytest.param("hypercorn", "asyncio", id="hypercorn-asyncio"),
        pytest.param("hypercorn", "trio", id="hypercorn-trio"),
    ],
)
# One uvicorn and hypercorn on both backends: where the HTTP parser does not matter.
ON_EACH_KIND = pytest.mark.parametrize(
    ("server", "anyio_backend"),
    [
        pytest.param("uvicorn-h11", "asyncio", id="uvicorn"),
        pytest.param("hypercorn", "asyncio", id="hypercorn-asyncio"),
        pytest.param("hypercorn", "trio", id="hypercorn-trio"),
    ],
)
HOWS = pytest.mark.parametrize("how", ["fin", "rst"])

CHUNK = b"0123456789"  # every streamed chunk: 10 bytes
EVERY = 0.005  # seconds between chunks
CHUNKS = 20  # a whole stream: 100 ms
THINK = 0.05  # seconds a slow handler thinks before it answers
TIMEOUT = 2.0  # each request's; what ends before it is not timed out
WITHIN_MS = 500  # a handler that stops at its next send has returned by then (it takes ~5 ms)
# What each server logs, with the traceback, for an exception that escaped the app.
LOGGED = {
    "uvicorn-h11": "Exception in ASGI application",
    "uvicorn-httptools": "Exception in ASGI application",
    "hypercorn": "Error in ASGI Framework",
}


class Handler:
    """What the app did, as the test sees it: it runs in the test's own event loop."""

    def __init__(self) -> None:
        self.calls = 0  # HTTP requests the app was called for
        self.cleaned_up = 0  # HTTP handlers whose ``finally`` ran
        self.sent = 0  # body chunks sent
        self.uploaded = b""  # request body bytes read
        self.lifespan: list[str] = []  # "startup", "shutdown": the lifespan steps it answered
        self.scope_types: list[str] = []
        self.release = anyio.Event()  # what /wait waits for: set by the test
        self.error = ValueError("the app's own error")  # what /raise raises


def app_of(handler: Handler) -> ASGIApp:
    """A raw ASGI app whose paths do what the tests need, recording it in ``handler``.

    - ``/stream/NAME``: ``CHUNKS`` chunks of 10 bytes ``EVERY`` seconds apart (NAME's first
      letter, ``CHUNK`` without a name); it ignores the client: it stops when send() raises.
    - ``/slow/NAME``: thinks ``THINK`` seconds first, then streams.
    - ``/upload``: reads its body to the end (or the disconnect), then answers its size.
    - ``/hang``: never returns. ``/wait``: returns once the test sets ``handler.release``.
    - ``/raise``: raises ``handler.error`` at once; ``/raise-after-departure``: sends a
      chunk, waits for the middleware to record the departure, then raises it.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        handler.scope_types.append(scope["type"])
        if scope["type"] == "lifespan":
            await answer_lifespan(handler, receive, send)
            return
        handler.calls += 1
        path: str = scope["path"]
        try:
            if path == "/upload":
                await upload(handler, receive, send)
                return
            if path == "/hang":
                await anyio.sleep_forever()
            if path == "/wait":
                await handler.release.wait()
            if path == "/raise":
                raise handler.error
            if path.startswith("/slow"):
                await anyio.sleep(THINK)
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            if path == "/raise-after-departure":
                await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
                await disconnect_state(scope).wait()
                raise handler.error
            name = path[1:].partition("/")[2].encode()
            chunk = name[:1] * len(CHUNK) if name else CHUNK
            for _ in range(CHUNKS):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                handler.sent += 1
                await anyio.sleep(EVERY)
            await send({"type": "http.response.body", "body": b""})
        finally:
            handler.cleaned_up += 1

    return app


async def answer_lifespan(handler: Handler, receive: Receive, send: Send) -> None:
    """Completes the startup and the shutdown, recording each."""
    for _ in range(2):  # startup, then shutdown
        message = await receive()
        if message["type"] == "lifespan.startup":
            handler.lifespan.append("startup")
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            handler.lifespan.append("shutdown")
            await send({"type": "lifespan.shutdown.complete"})
            return


async def upload(handler: Handler, receive: Receive, send: Send) -> None:
    """Reads the body into ``handler.uploaded`` until its end (then answers its size) or the disconnect."""
    for _ in range(1000):  # body messages: more than any test sends
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        handler.uploaded += message.get("body", b"")
        if not message.get("more_body", False):
            break
    size = str(len(handler.uploaded)).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(size))]})
    await send({"type": "http.response.body", "body": size})


def trio_tasks() -> set[object]:
    """Every task of the running trio loop."""
    import trio

    found: set[object] = set()
    todo = [trio.lowlevel.current_root_task()]
    for _ in range(10_000):  # tasks: far more than a test runs
        if not todo:
            break
        task = todo.pop()
        if task is not None:
            found.add(task)
            todo += [child for nursery in task.child_nurseries for child in nursery.child_tasks]
    return found


class Leftovers(test_loopback.Leftovers):
    """test_loopback's tasks, threads and descriptors; on trio, trio's tasks."""

    def __init__(self) -> None:
        self.on_trio = sniffio.current_async_library() == "trio"
        if not self.on_trio:
            super().__init__()
            return
        self.tasks = set()
        self.trio_tasks = trio_tasks()
        self.threads = set(threading.enumerate())
        self.fds = self._fds()

    def assert_none_new(self) -> None:
        if not self.on_trio:
            super().assert_none_new()
            return
        assert trio_tasks() - self.trio_tasks == set()
        # anyio runs trio in guest mode: its I/O waits take a thread of trio's cache, kept idle.
        threads = {thread for thread in threading.enumerate() if not thread.name.startswith("Trio thread")}
        assert threads - self.threads == set()
        assert self._fds() == self.fds


# -- 1. every departure point, on every server, with a FIN and with an RST -------------------------


class Case(NamedTuple):
    """A departure point, the request that reaches it, and what the client then has."""

    leave: Callable[[How], Departure]
    path: str
    status: int | None
    chunks: list[bytes]
    phase: str  # where the middleware records the departure
    body: bytes = b""


CASES = {
    # the handler thinks for THINK s: the client leaves 10 ms into it
    "before_response": Case(
        lambda how: leave.before_response(after=0.01, how=how), "/slow", None, [], "before_response"
    ),
    # the client reads the head, then leaves before any body
    "after_chunks(0)": Case(lambda how: leave.after_chunks(0, how=how), "/stream", 200, [], "mid_body"),
    "after_chunks(2)": Case(lambda how: leave.after_chunks(2, how=how), "/stream", 200, [CHUNK] * 2, "mid_body"),
    # 15 bytes: the second chunk arrives cut
    "after_bytes(15)": Case(lambda how: leave.after_bytes(15, how=how), "/stream", 200, [CHUNK, CHUNK[:5]], "mid_body"),
    # 40 of 100 bytes uploaded; the app reads them, then hears the disconnect
    "mid_upload(40)": Case(
        lambda how: leave.mid_upload(40, how=how), "/upload", None, [], "before_response", b"x" * 100
    ),
}
ON_EVERY_CASE = pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())


async def request(live: Live, case: Case, how: How) -> Outcome:
    """The case's request, leaving with ``how``."""
    method = "POST" if case.body else "GET"
    return await live.request(method=method, path=case.path, body=case.body, leave=case.leave(how), timeout=TIMEOUT)


def assert_received(outcome: Outcome, case: Case, how: How) -> None:
    """The client got what the case says, and left before the end."""
    assert outcome.status == case.status
    assert outcome.chunks == case.chunks
    assert outcome.body == b"".join(case.chunks)
    assert outcome.left and not outcome.complete
    assert outcome.departure.how == how
    assert not outcome.timed_out
    assert outcome.exception is None
    assert outcome.tracebacks == []


@ON_EVERY_CASE
@HOWS
@ON_EVERY_SERVER
async def test_each_departure_behind_the_middleware(server: ServerName, how: How, case: Case) -> None:
    """Behind the middleware the departure is recorded in its phase and the handler stops at once, its finally run."""
    handler = Handler()
    async with serve(DisconnectMiddleware(app_of(handler)), server=server) as live:
        outcome = await request(live, case, how)
        assert live.running == 0
        assert (handler.calls, handler.cleaned_up) == (1, 1)  # before the end of the block cancels anything
    assert_received(outcome, case, how)
    assert outcome.state is not None and outcome.state.phase == case.phase
    assert outcome.app_returned_after_ms is not None and outcome.app_returned_after_ms < WITHIN_MS
    assert handler.sent < CHUNKS  # it stopped at its next send, before the end of its stream
    if case.body:
        assert handler.uploaded == case.body[: case.leave(how).amount]
    outcome.assert_aborted(phase=case.phase, within_ms=WITHIN_MS)


@ON_EVERY_CASE
@HOWS
@ON_EVERY_SERVER
async def test_each_departure_without_the_middleware(server: ServerName, how: How, case: Case) -> None:
    """Without the middleware the client sees the same, the state is None and the handler runs its course."""
    handler = Handler()
    async with serve(app_of(handler), server=server) as live:
        outcome = await request(live, case, how)
        assert (handler.calls, handler.cleaned_up) == (1, 1)
    assert_received(outcome, case, how)
    assert outcome.state is None
    assert outcome.app_returned_after_ms is not None  # it returned, on its own, before the timeout
    assert handler.sent == (0 if case.body else CHUNKS)  # every send after the departure was dropped
    with pytest.raises(AssertionError, match="install DisconnectMiddleware"):
        outcome.assert_aborted()


@pytest.mark.parametrize("middleware", [True, False], ids=["middleware", "bare"])
@ON_EVERY_SERVER
async def test_a_client_that_never_leaves_reads_everything(server: ServerName, middleware: bool) -> None:
    """leave.never(): the whole stream arrives, nobody left, and the handler's run is timed."""
    handler = Handler()
    app = app_of(handler)
    async with serve(DisconnectMiddleware(app) if middleware else app, server=server) as live:
        outcome = await live.request(path="/stream", timeout=TIMEOUT)
    assert outcome.status == 200
    assert outcome.chunks == [CHUNK] * CHUNKS
    assert outcome.complete and not outcome.left
    assert outcome.app_returned_after_ms is None
    assert outcome.duration_ms is not None and outcome.duration_ms >= CHUNKS * EVERY * 1000 * 0.9
    if middleware:
        assert outcome.state is not None and not outcome.state.disconnected and outcome.state.phase is None
    else:
        assert outcome.state is None
    assert handler.cleaned_up == 1
    outcome.assert_completed()
    with pytest.raises(AssertionError, match="the client never left"):
        outcome.assert_aborted()


# -- 2. a chunk is one http.response.body message ----------------------------------------------------

# Sent back to back, so that they arrive together, a big one in many pieces; the empty one
# is no chunk.
PIECES = [b"a", b"b" * 70_000, b"", b"cc", b"ddd"]


def pieces_app(framing: str) -> ASGIApp:
    """Sends ``PIECES`` in one message each, with a Content-Length (``"length"``) or chunked."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-length", b"%d" % sum(map(len, PIECES)))] if framing == "length" else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for piece in PIECES:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


@pytest.mark.parametrize("framing", ["length", "chunked"])
@ON_EVERY_SERVER
async def test_chunks_are_the_messages_the_app_sent(server: ServerName, framing: str) -> None:
    """Each non-empty body message is one chunk, however the bytes arrive, with a Content-Length or chunked."""
    async with serve(pieces_app(framing), server=server, lifespan="off") as live:
        outcome = await live.request(timeout=TIMEOUT)
    assert outcome.chunks == [piece for piece in PIECES if piece]
    assert outcome.body == b"".join(PIECES)
    assert ((b"content-length", b"70006") in outcome.headers) == (framing == "length")
    outcome.assert_completed()


@pytest.mark.parametrize("framing", ["length", "chunked"])
@ON_EVERY_SERVER
async def test_after_bytes_cuts_the_chunk_it_leaves_in(server: ServerName, framing: str) -> None:
    """after_bytes(n) keeps exactly n bytes: the chunk the client left in is the last one, cut."""
    async with serve(pieces_app(framing), server=server, lifespan="off") as live:
        outcome = await live.request(leave=leave.after_bytes(50_001, how="rst"), timeout=TIMEOUT)
    assert outcome.chunks == [b"a", b"b" * 50_000]
    assert outcome.left and not outcome.complete


# -- 3. what escaped the app, and the server's traceback ------------------------------------------------


@ON_EVERY_SERVER
async def test_an_exception_escaping_the_app_is_the_outcomes(server: ServerName) -> None:
    """What the app raised is outcome.exception, the same object; the server's traceback is in outcome.tracebacks."""
    handler = Handler()
    async with serve(app_of(handler), server=server) as live:
        outcome = await live.request(path="/raise", timeout=TIMEOUT)
    assert outcome.exception is handler.error
    assert outcome.status == 500  # the server's own answer
    (line,) = outcome.tracebacks
    assert line.message == LOGGED[server]
    assert line.traceback is not None and line.traceback.endswith("ValueError: the app's own error")
    with pytest.raises(AssertionError, match=rf"the server logged a traceback \('{LOGGED[server]}'\)"):
        outcome.assert_completed()


@ON_EVERY_SERVER
async def test_an_error_after_the_departure_makes_assert_aborted_fail(server: ServerName) -> None:
    """The app's own error after the client left gets through the middleware: assert_aborted names the traceback."""
    handler = Handler()
    async with serve(DisconnectMiddleware(app_of(handler)), server=server) as live:
        outcome = await live.request(path="/raise-after-departure", leave=leave.after_chunks(1), timeout=TIMEOUT)
    assert outcome.exception is handler.error
    assert outcome.state is not None and outcome.state.phase == "mid_body"
    assert [line.message for line in outcome.tracebacks] == [LOGGED[server]]
    with pytest.raises(AssertionError, match=rf"escaped the app; the server logged a traceback \('{LOGGED[server]}'\)"):
        outcome.assert_aborted(phase="mid_body")


# -- 4. a hung handler ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "departure", [leave.never(), leave.before_response(0.05, how="rst")], ids=["never", "before_response"]
)
@ON_EVERY_SERVER
async def test_a_hung_handler_is_reported_then_cancelled(server: ServerName, departure: Departure) -> None:
    """A handler still running at the timeout is reported as timed out, about then, and is cancelled afterwards."""
    handler = Handler()
    timeout = 0.3
    async with serve(DisconnectMiddleware(app_of(handler)), server=server) as live:
        began = time.monotonic()
        outcome = await live.request(path="/hang", leave=departure, timeout=timeout)
        took = time.monotonic() - began
        assert live.running == 0
        assert handler.cleaned_up == 1
    assert timeout * 0.9 <= took < timeout + 2
    assert outcome.timed_out
    assert outcome.app_returned_after_ms is None and outcome.duration_ms is None
    assert outcome.left == (departure.kind != "never")
    with pytest.raises(AssertionError, match=r"the handler was still running at the timeout \(0.3 s\)"):
        outcome.assert_completed()


# -- 5. a server that cannot start -----------------------------------------------------------------------


async def fails_at_startup(scope: Scope, receive: Receive, send: Send) -> None:
    """Reports a failed lifespan startup, as an app whose database is down does."""
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "the database is down"})


async def raises_at_startup(scope: Scope, receive: Receive, send: Send) -> None:
    """Raises on the lifespan scope; answers HTTP requests with ``ok``."""
    if scope["type"] == "lifespan":
        raise RuntimeError("no lifespan here")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def assert_does_not_start(app: ASGIApp, server: ServerName, lifespan: Lifespan) -> ServerStartError:
    """serve() raises ServerStartError at once, the block never runs, and nothing is left running."""
    before = Leftovers()
    began = time.monotonic()
    with pytest.raises(ServerStartError) as caught:
        async with serve(app, server=server, lifespan=lifespan):
            pytest.fail("the block should not run")
    assert time.monotonic() - began < 2
    before.assert_none_new()
    return caught.value


@pytest.mark.parametrize("lifespan", ["auto", "on"])
@ON_EACH_KIND
async def test_a_failed_lifespan_startup_is_reported(server: ServerName, lifespan: Lifespan) -> None:
    """lifespan.startup.failed: ServerStartError says so, with the app's message."""
    error = await assert_does_not_start(fails_at_startup, server, lifespan)
    assert str(error).startswith(f"{server.partition('-')[0]} did not start: ")
    assert "the database is down" in str(error)


@ON_EACH_KIND
async def test_an_app_that_raises_at_a_required_lifespan_is_reported(server: ServerName) -> None:
    """With lifespan="on", an app that raises there: ServerStartError with the error and what the server logged."""
    error = await assert_does_not_start(raises_at_startup, server, "on")
    assert "no lifespan here" in str(error)
    logged = {"uvicorn-h11": "Exception in 'lifespan' protocol", "hypercorn": "ASGI Framework Lifespan error"}
    assert logged[server] in str(error)
    assert logged[server] in error.output


@ON_EACH_KIND
async def test_an_app_that_raises_at_an_optional_lifespan_is_served(server: ServerName) -> None:
    """With lifespan="auto", an app that raises there is served without it."""
    async with serve(raises_at_startup, server=server, lifespan="auto") as live:
        outcome = await live.request(timeout=TIMEOUT)
    assert outcome.body == b"ok"
    outcome.assert_completed()


async def hangs_at_startup(scope: Scope, receive: Receive, send: Send) -> None:
    """Never finishes its lifespan startup, as an app whose database never answers."""
    if scope["type"] == "lifespan":
        await receive()
        await anyio.sleep_forever()


# uvicorn and hypercorn on asyncio run the lifespan in a task of their own, outside the task
# that serve() cancels: an app's startup still running at start_timeout is cancelled apart.
@pytest.mark.parametrize(
    ("server", "anyio_backend"),
    [
        pytest.param("uvicorn-h11", "asyncio", id="uvicorn"),
        pytest.param("hypercorn", "asyncio", id="hypercorn-asyncio"),
        pytest.param("hypercorn", "trio", id="hypercorn-trio"),
    ],
)
async def test_a_startup_longer_than_start_timeout_is_reported(server: ServerName) -> None:
    """A lifespan startup that does not end within start_timeout: ServerStartError saying so, nothing left running."""
    before = Leftovers()
    with pytest.raises(ServerStartError, match=r"did not start within 0\.3 s"):
        async with serve(hangs_at_startup, server=server, start_timeout=0.3):
            pytest.fail("the block should not run")
    before.assert_none_new()


@pytest.mark.parametrize("server", _loopback.SERVERS)
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_server_that_is_not_installed_is_named(server: ServerName, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server whose module is missing: ServerStartError naming it and the pip install that brings it."""
    install = _loopback._NEEDS[server][1]
    monkeypatch.setitem(_loopback._NEEDS, server, (("asgi_disconnect_no_such_module",), install))
    error = await assert_does_not_start(app_of(Handler()), server, "auto")
    assert str(error) == f"{server} needs asgi_disconnect_no_such_module, which is not installed ({install})"


@pytest.mark.parametrize("server", ["uvicorn", "uvicorn-h11", "uvicorn-httptools"])
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_uvicorn_on_trio_says_to_use_hypercorn(server: ServerName) -> None:
    """uvicorn runs on asyncio only: on trio serve() raises RuntimeError pointing to hypercorn."""
    before = Leftovers()
    with pytest.raises(RuntimeError, match=f"{server} runs on asyncio only: on trio, serve with server='hypercorn'"):
        async with serve(app_of(Handler()), server=server):
            pytest.fail("the block should not run")
    before.assert_none_new()


# -- 6. lifespan ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("lifespan", ["auto", "on"])
@ON_EACH_KIND
async def test_the_lifespan_runs_around_the_block(server: ServerName, lifespan: Lifespan) -> None:
    """The app's startup has run when the block starts; its shutdown runs when the block ends."""
    handler = Handler()
    async with serve(app_of(handler), server=server, lifespan=lifespan) as live:
        assert handler.lifespan == ["startup"]
        outcome = await live.request(path="/stream", timeout=TIMEOUT)
        assert handler.lifespan == ["startup"]
    assert handler.lifespan == ["startup", "shutdown"]
    outcome.assert_completed()


@ON_EACH_KIND
async def test_lifespan_off_hides_the_lifespan_scope(server: ServerName) -> None:
    """With lifespan="off" the app never sees the lifespan scope, only its requests."""
    handler = Handler()
    async with serve(app_of(handler), server=server, lifespan="off") as live:
        outcome = await live.request(path="/stream", timeout=TIMEOUT)
    assert handler.scope_types == ["http"]
    assert handler.lifespan == []
    outcome.assert_completed()


def returns_from_lifespan(after: int) -> ASGIApp:
    """Returns from the lifespan scope after ``after`` steps (0: at once, 1: after its startup)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            for _ in range(after):
                message: Message = await receive()
                await send({"type": message["type"] + ".complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


@pytest.mark.parametrize("after", [0, 1], ids=["at-once", "after-startup"])
@pytest.mark.parametrize("lifespan", ["auto", "on"])
@ON_EACH_KIND
async def test_an_app_that_returns_from_lifespan_is_served(server: ServerName, lifespan: Lifespan, after: int) -> None:
    """An app that returns from lifespan early (many raw ASGI apps do) is served, and the server stops cleanly."""
    async with serve(returns_from_lifespan(after), server=server, lifespan=lifespan) as live:
        outcome = await live.request(timeout=TIMEOUT)
    assert outcome.body == b"ok"
    outcome.assert_completed()


# -- 7. nothing left behind; the state is the test's ------------------------------------------------------


@ON_EVERY_SERVER
async def test_nothing_is_left_behind(server: ServerName) -> None:
    """After several requests (aborted, timed out, refused, one the test releases) nothing is left, not the port."""
    handler = Handler()
    before = Leftovers()
    async with serve(DisconnectMiddleware(app_of(handler)), server=server) as live:
        whole = await live.request(path="/stream", timeout=TIMEOUT)
        aborted = await live.request(path="/stream", leave=leave.after_chunks(1, how="rst"), timeout=TIMEOUT)
        hung = await live.request(path="/hang", leave=leave.before_response(0.01), timeout=0.2)
        refused = await live.request(path="/a b", timeout=TIMEOUT)
        waited: list[Outcome] = []

        async def wait() -> None:
            waited.append(await live.request(path="/wait", timeout=TIMEOUT))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            for _ in range(200):  # at most 2 s: the handler waits for the test
                if live.running:
                    break
                await anyio.sleep(0.01)
            assert live.running == 1
            handler.release.set()
    whole.assert_completed()
    aborted.assert_aborted(phase="mid_body", within_ms=WITHIN_MS)
    assert hung.timed_out
    assert refused.status == 400
    (waiting,) = waited
    waiting.assert_completed()
    assert (handler.calls, handler.cleaned_up) == (4, 4)
    before.assert_none_new()
    assert_refused(live.port)


@ON_EVERY_SERVER
async def test_a_handler_still_running_at_the_end_of_the_block_is_cancelled(server: ServerName) -> None:
    """Another client's request still running when the block ends is cancelled: its finally runs, the server stops."""
    handler = Handler()
    before = Leftovers()
    with contextlib.ExitStack() as stack:  # the client stays until the server has stopped
        async with serve(app_of(handler), server=server) as live:
            sock = stack.enter_context(_loopback.connect(live.port))
            sock.sendall(_loopback.request_bytes("GET", "/hang"))
            for _ in range(200):  # at most 2 s
                if live.running:
                    break
                await anyio.sleep(0.01)
            assert live.running == 1
            began = time.monotonic()
        took = time.monotonic() - began
    assert took < 2
    assert (handler.calls, handler.cleaned_up) == (1, 1)
    before.assert_none_new()


# -- 8. concurrent requests ----------------------------------------------------------------------------------


@ON_EVERY_SERVER
async def test_concurrent_requests_get_their_own_outcomes(server: ServerName) -> None:
    """Requests sent at once on one server each get the outcome of their own handler."""
    requests = {
        "a": ("/stream/a", leave.never()),
        "b": ("/stream/b", leave.after_chunks(2, how="rst")),
        "c": ("/slow/c", leave.before_response(0.01)),
        "d": ("/stream/d", leave.after_bytes(25)),
    }
    outcomes: dict[str, Outcome] = {}
    async with serve(DisconnectMiddleware(app_of(Handler())), server=server) as live:

        async def one(name: str) -> None:
            path, departure = requests[name]
            outcomes[name] = await live.request(path=path, leave=departure, timeout=TIMEOUT)

        async with anyio.create_task_group() as tg:
            for name in requests:
                tg.start_soon(one, name)
    assert outcomes["a"].chunks == [b"a" * 10] * CHUNKS
    outcomes["a"].assert_completed()
    assert outcomes["b"].chunks == [b"b" * 10] * 2
    outcomes["b"].assert_aborted(phase="mid_body", within_ms=WITHIN_MS)
    assert outcomes["c"].status is None
    outcomes["c"].assert_aborted(phase="before_response", within_ms=WITHIN_MS)
    assert outcomes["d"].chunks == [b"d" * 10, b"d" * 10, b"d" * 5]
    outcomes["d"].assert_aborted(phase="mid_body", within_ms=WITHIN_MS)
    states = [outcome.state for outcome in outcomes.values()]
    assert len({id(state) for state in states}) == 4


# -- 9. what the server answers itself -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "departure",
    [leave.never(), leave.before_response(1.0), leave.after_chunks(2), leave.mid_upload(3)],
    ids=["never", "before_response", "after_chunks", "mid_upload"],
)
@ON_EVERY_SERVER
async def test_a_request_the_server_refuses_returns_at_once(server: ServerName, departure: Departure) -> None:
    """A path with a space is answered 400 by the server itself: the request returns without waiting for the app."""
    handler = Handler()
    async with serve(DisconnectMiddleware(app_of(handler)), server=server) as live:
        began = time.monotonic()
        outcome = await live.request(method="POST", path="/a b", body=b"x" * 10, leave=departure, timeout=5)
        took = time.monotonic() - began
    assert outcome.status == 400
    assert took < 1
    assert not outcome.timed_out and not outcome.left
    assert outcome.state is None and outcome.duration_ms is None
    assert handler.calls == 0
    assert "the server never called the app" in outcome.summary()


@ON_EVERY_SERVER
async def test_a_head_response_has_no_body(server: ServerName) -> None:
    """A HEAD response is complete at the end of its head, whatever its Content-Length says."""
    async with serve(app_of(Handler()), server=server) as live:
        began = time.monotonic()
        outcome = await live.request(method="HEAD", path="/upload", timeout=TIMEOUT)
        took = time.monotonic() - began
    assert outcome.status == 200
    assert (b"content-length", b"1") in outcome.headers
    assert outcome.body == b""
    assert took < 1
    outcome.assert_completed()
