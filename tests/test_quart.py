"""Quart's own request lifecycle behind DisconnectMiddleware, on a real uvicorn and hypercorn.

Quart listens for the disconnect itself: ``ASGIHTTPConnection`` runs a receiver task
(``receive()`` in a loop) and a handler task side by side, waits for the first to end
(``asyncio.wait``) and cancels the other (``cancel_tasks``). When ``http.disconnect``
comes, the receiver returns and the handler task is cancelled, once: the view (or the
streaming body, which Quart iterates after it has torn the request context down) meets
one ``CancelledError``, the request context's exit runs the ``teardown_request``
functions and ``request_tearing_down``, and the app context's ``teardown_appcontext``.
``after_request`` and ``request_finished`` belong to building the response: a request
aborted before its response never has them, bare or wrapped. Promise 6: the middleware
never breaks that lifecycle, in observe mode or in cancel mode; promise 7: never worse
than without it. The bare Quart app is the control in every test.

What is checked after each test, once the server side has settled (``Lifecycle.check``):

- every request context pushed (``quart.ctx.RequestContext``) was popped, its context
  variable reset, and its teardown (``do_teardown_request``) begun exactly once; a
  teardown that ran to its end sent one ``request_tearing_down`` and called each
  ``teardown_request`` function once (the async one, and the sync one Quart runs in a
  thread). Bare Quart does not promise more for an aborted request: when the disconnect
  comes while the teardown awaits (the sync function's thread), Quart's one cancellation
  lands there and the rest of the teardown is skipped (a sync function still queued for a
  thread never runs). A teardown may end so only with that ``CancelledError``, and the
  tests whose clients leave at a known point (the view awaiting its upstream, mid-stream)
  require that no teardown was cut short, bare or wrapped;
- no task of Quart's was cancelled more than once (``Task.cancelling()``);
- every app context pushed was popped, with one ``teardown_appcontext``, and left no
  request or app context behind in its task;
- each request that sent ``request_started`` got a request context torn down, and
  ``after_request`` ran exactly for the requests that sent ``request_finished``;
- Quart's ``asyncio.wait`` and ``cancel_tasks`` were never interrupted and every receiver
  and handler task Quart started has ended: an interrupted wait abandons both tasks;
- no cleanup that awaits met a second cancellation;
- nothing escaped the app, nothing was logged at WARNING or above (uvicorn, hypercorn,
  quart, the app's logger, asyncio, asgi_disconnect);
- behind the middleware, each aborted request was reported once (``on_disconnect``).

The module runs one server of each kind in the tests' loop (``asgi_disconnect.testing``'s
``serve()``); each test plugs its app, bare or wrapped, into it. Clients are raw blocking
sockets in a worker thread that leave with a FIN or an RST.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.to_thread
import pytest

pytest.importorskip("quart", reason="the Quart lifecycle tests need Quart (the [dev] extra)")

import quart.asgi
import quart.utils
from quart import Quart
from quart.ctx import RequestContext
from werkzeug.exceptions import NotFound

from asgi_disconnect import DisconnectMiddleware, DisconnectState, RequestRecord
from asgi_disconnect._types import ASGIApp, Message, Receive, Scope, Send
from asgi_disconnect.testing import Live, leave, serve

from . import quart_app
from .compat import compat
from .helpers import CLOSES, Close, Records, fetch, recording, settled
from .quart_app import chunk, probe
from .servers import Outermost, ServerKind, close, raw_connection, request_bytes

pytestmark = [pytest.mark.anyio, pytest.mark.server]

Mode = Literal["bare", "observe", "cancel"]
MODES: tuple[Mode, ...] = ("bare", "observe", "cancel")
KINDS: tuple[ServerKind, ...] = ("uvicorn-httptools", "hypercorn")
COMPAT_SERVER = {"uvicorn-httptools": "uvicorn-httptools", "hypercorn": "hypercorn-asyncio"}
LOGGERS = ("uvicorn", "hypercorn", "quart", quart_app.app.name, "asyncio", "asgi_disconnect")
SETTLE_WITHIN = 5.0  # seconds at most for the server side to finish after the clients
QUIET = 0.05  # ...and nothing moved for this long
LEAVES = 30  # clients that leave right after their request, per test
UPSTREAM_TIMES = 3  # clients that leave while the slow view awaits its upstream, per test
MID_STREAM_TIMES = 3  # clients that leave mid-stream, per test
QUART: ASGIApp = quart_app.app  # Quart types its ASGI messages as TypedDicts


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Real servers run on asyncio only (Quart's ASGI handler is asyncio-only anyway)."""
    return "asyncio"


def cases(*features: str, variants: Mapping[ServerKind, Sequence[tuple[str, ...]]] | None = None) -> list[Any]:
    """(kind, mode, *variant) for every server, mode and variant, each marked as proof of its compat cells.

    ``variants`` gives each server its own list (the cheap ones only, on hypercorn); by
    default there is none: (kind, mode).
    """
    params = []
    for kind in KINDS:
        for mode in MODES:
            cells = [*features, "lifecycle"] + (["cancel"] if mode == "cancel" else [])
            marks = [compat("quart", COMPAT_SERVER[kind], feature) for feature in cells]
            for variant in variants[kind] if variants is not None else [()]:
                params.append(pytest.param(kind, mode, *variant, marks=marks, id="-".join((kind, mode, *variant))))
    return params


# -- the module's servers, and what each test plugs into them ---------------------------


class Switch:
    """What a module's server serves: the current test's app (a 503 between tests).

    Lifespan goes to the Quart app itself, as a server would send it. Each
    ``http.disconnect`` the server hands over is timed: the moment the departure was
    known, bare or wrapped (the middleware reads the same ``receive()``).
    """

    def __init__(self) -> None:
        self.app: ASGIApp | None = None
        self.disconnects: list[float] = []
        self.called = threading.Event()  # set at each HTTP request, for a client in a thread

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await QUART(scope, receive, send)
            return
        if self.app is None:
            await send({"type": "http.response.start", "status": 503, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        self.called.set()

        async def timed_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects.append(time.monotonic())
            return message

        await self.app(scope, timed_receive, send)


@dataclass
class Server:
    kind: ServerKind
    live: Live
    switch: Switch

    @property
    def port(self) -> int:
        return self.live.port


@pytest.fixture(scope="module")
async def servers() -> AsyncIterator[dict[ServerKind, Server]]:
    """One real server of each kind for the module, in the tests' loop: starting one per test costs 0.2 s."""
    async with contextlib.AsyncExitStack() as stack:
        started = {}
        for kind in KINDS:
            switch = Switch()
            live = await stack.enter_async_context(serve(switch, server=kind))
            started[kind] = Server(kind, live, switch)
        yield started


@pytest.fixture
def server(servers: dict[ServerKind, Server], kind: ServerKind) -> Server:
    """The module's server of the test's kind."""
    return servers[kind]


class Lifecycle:
    """Quart's lifecycle as its hooks, its contexts and its tasks show it, during one test."""

    def __init__(self) -> None:
        self.errors = Records(logging.WARNING)
        self.recorder: Outermost | None = None
        self.contexts: list[RequestContext] = []  # every request context pushed
        self.pushes = 0
        self.pops = 0
        self.tasks: list[asyncio.Task[Any]] = []  # Quart's receiver and handler tasks
        self.abandoned = 0  # of those, left running by an interrupted wait
        self.aborted: list[DisconnectState] = []  # what on_disconnect was given
        self.teardowns = 0  # do_teardown_request calls begun
        self.torn_down = 0  # ...and ended normally
        self.cut_short: Counter[str] = Counter()  # ...and ended by an exception, by type
        self.records: list[RequestRecord] = []

    # Stand-ins for what quart.asgi and quart.ctx call.

    def ensure_future(self, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro, **kwargs)
        self.tasks.append(task)
        return task

    async def wait(self, tasks: Iterable[asyncio.Task[Any]], **kwargs: Any) -> Any:
        """``asyncio.wait`` for quart.asgi: count the tasks abandoned when the wait is interrupted."""
        tasks = list(tasks)
        try:
            return await asyncio.wait(tasks, **kwargs)
        except BaseException:
            # Quart cancels and collects its receiver and handler only after this wait: now no one will.
            self.abandoned += sum(not task.done() for task in tasks)
            raise

    async def cancel_tasks(self, tasks: set[asyncio.Task[Any]]) -> None:
        try:
            await quart.utils.cancel_tasks(tasks)
        except BaseException:
            self.abandoned += sum(not task.done() for task in tasks)
            raise

    def push(self, original: Callable[[RequestContext], Awaitable[None]]) -> Callable[[RequestContext], Any]:
        async def push(context: RequestContext) -> None:
            self.contexts.append(context)
            self.pushes += 1
            await original(context)

        return push

    def pop(self, original: Callable[..., Awaitable[None]]) -> Callable[..., Any]:
        async def pop(context: RequestContext, *args: Any) -> None:
            self.pops += 1
            await original(context, *args)

        return pop

    def teardown(self, original: Callable[..., Awaitable[None]]) -> Callable[..., Any]:
        async def do_teardown_request(*args: Any, **kwargs: Any) -> None:
            self.teardowns += 1
            try:
                await original(*args, **kwargs)
            except BaseException as exc:
                self.cut_short[type(exc).__name__] += 1
                raise
            self.torn_down += 1

        return do_teardown_request

    def on_disconnect(self, scope: Scope, state: DisconnectState) -> None:
        self.aborted.append(state)
        assert state.record is not None
        self.records.append(state.record)

    # Settling, and the checks.

    def snapshot(self) -> tuple[int, ...]:
        assert self.recorder is not None
        running = sum(not task.done() for task in self.tasks)
        return (self.recorder.started, self.recorder.ended, sum(probe.counts.values()), self.pushes, self.pops, running)

    async def settle(self) -> None:
        """Wait (bounded) until every request has returned, every Quart task ended, and nothing moves any more."""
        recorder = self.recorder
        assert recorder is not None

        def idle() -> bool:
            return recorder.started == recorder.ended and not any(not task.done() for task in self.tasks)

        if not await settled(self.snapshot, idle, within=SETTLE_WITHIN, quiet=QUIET):
            running = sum(not task.done() for task in self.tasks)
            raise AssertionError(
                f"the server side did not settle within {SETTLE_WITHIN} s: {recorder.started} requests "
                f"started, {recorder.ended} returned, {running} of Quart's tasks still running"
            )

    def check(self) -> None:
        """Every context torn down once, no task abandoned, nothing escaped or logged."""
        assert self.recorder is not None
        counts = probe.counts
        problems = []
        left = sum(bool(context._cv_tokens) for context in self.contexts)
        if left or self.pops != self.pushes:
            problems.append(f"{left} request contexts never popped ({self.pushes} pushes, {self.pops} pops)")
        if self.teardowns != len(self.contexts):
            problems.append(f"{self.teardowns} teardowns begun for {len(self.contexts)} request contexts")
        if self.torn_down + sum(self.cut_short.values()) != self.teardowns or set(self.cut_short) - {"CancelledError"}:
            problems.append(f"{self.teardowns} teardowns: {self.torn_down} ended, cut short: {dict(self.cut_short)}")
        # The sync function comes first (reversed order of registration), in a thread: what follows it
        # runs exactly for the teardowns that ended.
        ended = {name: counts[name] for name in ("request_tearing_down", "teardown_request.async")}
        if set(ended.values()) != {self.torn_down} or not self.torn_down <= counts["teardown_request.sync"]:
            problems.append(f"{self.torn_down} teardowns ended: {ended}, sync {counts['teardown_request.sync']}")
        app_contexts = {
            name: counts[name] for name in ("appcontext_pushed", "appcontext_popped", "teardown_appcontext")
        }
        if len(set(app_contexts.values())) != 1:
            problems.append(f"app contexts: {app_contexts}")
        if counts["context_left_behind"]:
            problems.append(f"{counts['context_left_behind']} popped app contexts left a context behind")
        if counts["request_started"] + counts["stream.in_context"] != len(self.contexts):
            problems.append(
                f"{counts['request_started']} request_started (+ {counts['stream.in_context']} streamed contexts) "
                f"for {len(self.contexts)} request contexts"
            )
        if counts["after_request"] != counts["request_finished"]:
            problems.append(f"after_request ran {counts['after_request']} times, {counts['request_finished']} finished")
        again = {name: count for name, count in counts.items() if name.endswith(".cancelled_again")}
        if again:
            problems.append(f"cleanups cancelled a second time: {again}")
        running = sum(not task.done() for task in self.tasks)
        if self.abandoned or running:
            problems.append(f"{self.abandoned} of Quart's tasks abandoned, {running} still running")
        twice = sum(task.cancelling() > 1 for task in self.tasks)
        if twice:
            problems.append(f"{twice} of Quart's tasks cancelled more than once")
        if self.recorder.escaped:
            escaped = Counter(repr(exc) for exc in self.recorder.escaped)
            problems.append(f"escaped the app: {dict(escaped)}")
        logged = Counter(f"{record.levelname} {record.name}: {record.getMessage()}" for record in self.errors.records)
        problems.extend(f"logged {count} times: {message}" for message, count in logged.items())
        if len({id(state) for state in self.aborted}) != len(self.aborted):
            problems.append("a request was reported aborted more than once")
        assert problems == [], f"{self.recorder.started} requests reached the app; " + "; ".join(problems)

    def states(self) -> list[DisconnectState]:
        """The states the requests carried (before_request), none when bare."""
        return [state for state in probe.states if state is not None]


@pytest.fixture
def lifecycle(server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lifecycle]:
    """Count Quart's hooks, contexts and tasks during one test (after the server's lifespan ran)."""
    probe.reset()
    server.switch.disconnects.clear()
    life = Lifecycle()
    namespace = type("asyncio", (), {**vars(asyncio), "ensure_future": life.ensure_future, "wait": life.wait})
    monkeypatch.setattr(quart.asgi, "asyncio", namespace)
    monkeypatch.setattr(quart.asgi, "cancel_tasks", life.cancel_tasks)
    monkeypatch.setattr(RequestContext, "push", life.push(RequestContext.push))
    monkeypatch.setattr(RequestContext, "pop", life.pop(RequestContext.pop))
    app = quart_app.app
    monkeypatch.setattr(app, "do_teardown_request", life.teardown(app.do_teardown_request))
    yield life


def wrapped(mode: Mode, life: Lifecycle) -> Quart:
    """The Quart app for ``mode``: bare, or its ``asgi_app`` behind the middleware, as Quart recommends."""
    app = quart_app.app
    if mode != "bare":
        app.asgi_app = DisconnectMiddleware(  # type: ignore[method-assign]
            app.asgi_app, cancel=mode == "cancel", on_disconnect=life.on_disconnect
        )
    return app


@contextlib.asynccontextmanager
async def serving(server: Server, mode: Mode, life: Lifecycle) -> AsyncIterator[int]:
    """Serve the Quart app (wrapped for ``mode``) for one test; record the logs until its requests settled."""
    life.recorder = Outermost(wrapped(mode, life))
    with recording(life.errors, *LOGGERS):
        server.switch.app = life.recorder
        try:
            yield server.port
            await life.settle()
            gc.collect()  # an orphaned task's unretrieved exception is logged when the task is collected
        finally:
            server.switch.app = None
            vars(quart_app.app).pop("asgi_app", None)


def leave_at_once(port: int, data: bytes, how: Close, times: int, switch: Switch) -> None:
    """Send a request and close, ``times`` times in a row: at once, or once the app was called.

    A departure that the server sees with the request discards it: on hypercorn most of the
    clients that leave at once with an RST never reach the app, and on a loaded machine
    neither may those that leave with a FIN. So every other one leaves the moment its
    request reached the app, while Quart sets it up (at most 1 s later).
    """
    for index in range(times):
        switch.called.clear()
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            sock.sendall(data)
            if index % 2:
                switch.called.wait(1)
        finally:
            close(sock, how)


def leave_while_upstream(port: int, how: Close) -> bool:
    """Request /slow, leave once the view awaits its upstream; False if it never did."""
    probe.upstream_waiting.clear()
    with raw_connection(port) as sock:
        sock.sendall(request_bytes("GET", "/slow"))
        waiting = probe.upstream_waiting.wait(5)
        close(sock, how)
    return waiting


# -- 1. normal requests ----------------------------------------------------------------

NORMAL = [
    ("GET", "/fast", b"", 200, b"fast"),
    ("GET", "/slow?t=0.01", b"", 200, b"slow"),
    ("POST", "/echo", b"x" * 100_000, 200, b"echo:" + b"x" * 100_000),
    ("GET", "/stream?n=3", b"", 200, chunk(0) + chunk(1) + chunk(2)),
    ("GET", "/stream/context?n=3", b"", 200, chunk(0) + chunk(1) + chunk(2)),
    ("GET", "/missing", b"", 404, NotFound().get_body().encode()),  # Quart's own 404 page
]


@pytest.mark.parametrize(("kind", "mode"), cases())
async def test_normal_requests_complete_with_lifecycle(server: Server, lifecycle: Lifecycle, mode: Mode) -> None:
    """Requests whose clients stay get bare Quart's status and body, and the whole lifecycle once each."""
    async with serving(server, mode, lifecycle) as port:

        def client() -> list[tuple[int, bytes]]:
            return [fetch(port, method, path, body)[::2] for method, path, body, *_ in NORMAL]

        answers = await anyio.to_thread.run_sync(client)

    assert answers == [(status, expected) for *_, status, expected in NORMAL]
    lifecycle.check()
    counts = probe.counts
    # Every request is finished and torn down; the streamed context is pushed and torn down once more.
    assert counts["request_started"] == counts["request_finished"] == counts["after_request"] == len(NORMAL)
    assert lifecycle.pushes == len(NORMAL) + 1
    assert lifecycle.cut_short == {}
    assert probe.teardown_errors == {"NoneType": len(NORMAL) + 1}
    assert counts["stream.completed"] == counts["stream.finally"] == counts["stream.cleaned"] == 2, counts
    assert counts["slow.completed"] == 1, counts
    states = lifecycle.states()
    assert len(states) == (0 if mode == "bare" else len(NORMAL))
    assert not any(state.disconnected for state in states)
    assert lifecycle.aborted == []


# -- 2. clients that leave right after their request -------------------------------------

LEAVE_PATHS: dict[ServerKind, list[tuple[str, ...]]] = {
    "uvicorn-httptools": [(path, how) for path in ("/fast", "/slow", "/stream", "/stream/context") for how in CLOSES],
    "hypercorn": [(path, how) for path in ("/slow", "/stream") for how in CLOSES],
}


@pytest.mark.parametrize(("kind", "mode", "path", "how"), cases("before_response", variants=LEAVE_PATHS))
async def test_client_leaving_right_after_request_keeps_lifecycle(
    server: Server, lifecycle: Lifecycle, mode: Mode, path: str, how: Close
) -> None:
    """Clients that send a request and leave at once: each request context is torn down once, nothing escapes."""
    async with serving(server, mode, lifecycle) as port:
        await anyio.to_thread.run_sync(leave_at_once, port, request_bytes("GET", path), how, LEAVES, server.switch)

    assert lifecycle.recorder is not None and lifecycle.recorder.started > 0, "no request reached the app"
    lifecycle.check()
    counts = probe.counts
    # A view cut short meets one cancellation, by Quart, and its cleanup completes.
    assert counts["slow.completed"] == 0, counts
    assert counts["slow.started"] == counts["slow.cancelled"] == counts["slow.cleaned"], counts
    assert counts["stream.started"] == counts["stream.finally"] == counts["stream.cleaned"], counts
    if mode == "bare":
        assert lifecycle.aborted == []
        return
    # Each request that lost its client is reported once, as Quart saw it: Quart cancelled it, not the middleware.
    assert all(state.disconnected and state.detected_by == "http.disconnect" for state in lifecycle.aborted)
    assert not any(state.cancelled for state in lifecycle.aborted)
    assert [record.cancelled for record in lifecycle.records] == [False] * len(lifecycle.records)
    phases = Counter(state.phase for state in lifecycle.aborted)
    assert set(phases) <= {"before_response", "mid_body"}, phases
    if path == "/slow":
        # The view never answers before its client leaves: every request is an abort before the response.
        assert phases == {"before_response": lifecycle.recorder.started}, phases


# -- 3. a client that leaves while the view awaits its upstream ------------------------


@pytest.mark.parametrize("how", CLOSES)
@pytest.mark.parametrize(("kind", "mode"), cases("before_response"))
async def test_client_leaving_while_view_awaits_upstream_stops_it_once(
    server: Server, lifecycle: Lifecycle, mode: Mode, how: Close
) -> None:
    """The slow view is cancelled once, by Quart, as bare; its teardown runs, its response is never built."""
    async with serving(server, mode, lifecycle) as port:
        for _ in range(UPSTREAM_TIMES):
            assert await anyio.to_thread.run_sync(leave_while_upstream, port, how), "the view never awaited"

    lifecycle.check()
    counts = probe.counts
    expected = {"slow.started": 3, "slow.cancelled": 3, "slow.cleaned": 3, "slow.completed": 0}
    assert {name: counts[name] for name in expected} == expected
    # What bare Quart does for a request aborted before its response, and the wrapped app as well:
    # torn down with the CancelledError, never finalized (no after_request, no request_finished).
    assert counts["request_started"] == UPSTREAM_TIMES
    assert counts["request_finished"] == counts["after_request"] == 0
    assert probe.teardown_errors == {"CancelledError": UPSTREAM_TIMES}
    assert lifecycle.cut_short == {}
    if mode == "bare":
        assert probe.teardown_saw == {"bare": UPSTREAM_TIMES}
        assert lifecycle.aborted == []
        return
    # teardown_request already sees the departure: an abort, told from an error of the app's own.
    assert probe.teardown_saw == {"before_response": UPSTREAM_TIMES}
    states = lifecycle.states()
    assert states == lifecycle.aborted and len(states) == UPSTREAM_TIMES
    for state in states:
        assert (state.disconnected, state.phase, state.detected_by) == (True, "before_response", "http.disconnect")
        assert state.bytes_sent == 0
        # Quart heard the disconnect in its own receive() and cancelled the view itself: the middleware
        # stood down in cancel mode too, and says so (cancelled is about its own cancellation).
        assert state.cancelled is False
    for record in lifecycle.records:
        assert (record.route, record.phase, record.status, record.cancelled) == (
            "/slow",
            "before_response",
            None,
            False,
        )


# -- 4. a client that leaves mid-stream ---------------------------------------------------


STREAMS: list[tuple[str, ...]] = [("/stream", "fin"), ("/stream", "rst"), ("/stream/until-gone", "rst")]
MID_STREAM_PATHS: dict[ServerKind, list[tuple[str, ...]]] = {
    "uvicorn-httptools": [*STREAMS, ("/stream/context", "fin"), ("/stream/context", "rst")],
    "hypercorn": STREAMS,
}


@pytest.mark.parametrize(("kind", "mode", "path", "how"), cases("mid_stream", variants=MID_STREAM_PATHS))
async def test_client_leaving_mid_stream_stops_generator_once(
    server: Server, lifecycle: Lifecycle, mode: Mode, how: Close, path: str
) -> None:
    """A client that leaves after 2 chunks: the generator stops once, its finally runs once, at most one chunk more."""
    after_departure = []
    async with serving(server, mode, lifecycle):
        for _ in range(MID_STREAM_TIMES):
            with probe.lock:
                probe.produced.clear()
            # It returns once the handler has: the generator has been closed by then.
            outcome = await server.live.request(path=path, leave=leave.after_chunks(2, how=how))
            assert outcome.status == 200
            assert outcome.chunks[:2] == [chunk(0), chunk(1)], outcome.summary()
            assert outcome.left and not outcome.complete and not outcome.timed_out, outcome.summary()
            assert outcome.exception is None and outcome.tracebacks == [], outcome.summary()
            detected = server.switch.disconnects[-1]
            with probe.lock:
                after_departure.append(sum(produced > detected for produced in probe.produced))

    lifecycle.check()
    counts = probe.counts
    assert counts["stream.started"] == counts["stream.finally"] == counts["stream.cleaned"] == MID_STREAM_TIMES
    assert counts["stream.completed"] == 0, counts
    # Stopped once each, by Quart's cancellation (in the generator's sleep, or in send() then aclose()):
    # never by a ClientDisconnected, since Quart listens itself and its sends go to the server as bare.
    stopped = {name: count for name, count in counts.items() if name.startswith("stream.stopped.")}
    assert sum(stopped.values()) == MID_STREAM_TIMES, stopped
    assert set(stopped) <= {"stream.stopped.CancelledError", "stream.stopped.GeneratorExit"}, stopped
    assert max(after_departure) <= 1, f"chunks produced after the departure was known: {after_departure}"
    # Quart finalizes the response (after_request, request_finished) and tears the request down before it
    # streams; under stream_with_context the body's own copy of the context is torn down when it stops.
    assert counts["request_started"] == counts["request_finished"] == MID_STREAM_TIMES
    if path == "/stream/context":
        assert counts["stream.in_context"] == MID_STREAM_TIMES
        assert probe.teardown_errors == {"NoneType": MID_STREAM_TIMES, "CancelledError": MID_STREAM_TIMES}
    else:
        assert probe.teardown_errors == {"NoneType": MID_STREAM_TIMES}
    assert lifecycle.cut_short == {}
    # The last word goes to the server as it would bare, not as a ClientDisconnected (see above).
    assert counts["stream.last_word"] == (MID_STREAM_TIMES if path == "/stream/until-gone" and mode != "bare" else 0)
    if mode == "bare":
        assert lifecycle.aborted == []
        return
    assert lifecycle.states() == lifecycle.aborted and len(lifecycle.aborted) == MID_STREAM_TIMES
    for state in lifecycle.aborted:
        assert (state.disconnected, state.phase, state.cancelled) == (True, "mid_body", False)
        assert state.bytes_sent >= len(chunk(0) + chunk(1))
    assert all(record.status == 200 and record.route == path for record in lifecycle.records)


# -- 5. the two ways of wrapping a Quart app ---------------------------------------------

Wrapping = Literal["asgi_app", "app"]


@dataclass
class Seen:
    """What the on_disconnect hook was given; ``reported`` is set at the first."""

    aborted: list[DisconnectState] = field(default_factory=list)
    reported: anyio.Event = field(default_factory=anyio.Event)

    def on_disconnect(self, scope: Scope, state: DisconnectState) -> None:
        self.aborted.append(state)
        self.reported.set()


def deploy(wrapping: Wrapping, mode: Mode, seen: Seen) -> ASGIApp:
    """The app a server is given, wrapped as a user would."""
    app = quart_app.app
    options: dict[str, Any] = {"cancel": mode == "cancel", "on_disconnect": seen.on_disconnect}
    if wrapping == "asgi_app":
        # Quart's advice for middleware: the server still gets the Quart object (its CLI, app.run, tests).
        app.asgi_app = DisconnectMiddleware(app.asgi_app, **options)  # type: ignore[method-assign]
        return app
    return DisconnectMiddleware(app, **options)


@pytest.mark.parametrize("wrapping", ["asgi_app", "app"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["observe", "cancel"])
async def test_both_ways_of_wrapping_serve_lifespan_and_report_aborts(
    kind: ServerKind, wrapping: Wrapping, mode: Mode
) -> None:
    """``app.asgi_app = DisconnectMiddleware(app.asgi_app)`` and ``DisconnectMiddleware(app)`` both work as served."""
    probe.reset()
    seen = Seen()
    errors = Records(logging.WARNING)
    try:
        async with serve(deploy(wrapping, mode, seen), server=kind, lifespan="on") as live:
            with recording(errors, *LOGGERS):
                assert probe.counts["before_serving"] == 1  # the lifespan reached Quart through the wrapper
                status, _, body = await anyio.to_thread.run_sync(fetch, live.port, "GET", "/fast")
                assert (status, body) == (200, b"fast")
                assert await anyio.to_thread.run_sync(leave_while_upstream, live.port, "rst")
                with anyio.fail_after(SETTLE_WITHIN):
                    await seen.reported.wait()  # once the handler returned: its cleanup is done
    finally:
        vars(quart_app.app).pop("asgi_app", None)
    assert probe.counts["after_serving"] == 1
    assert errors.records == []
    assert probe.counts["slow.cancelled"] == 1 and probe.counts["slow.cancelled_again"] == 0
    [fast_state, slow_state] = probe.states
    assert fast_state is not None and not fast_state.disconnected
    assert slow_state is not None
    assert seen.aborted == [slow_state]
    assert slow_state.phase == "before_response" and slow_state.cancelled is False
    assert slow_state.record is not None and slow_state.record.route == "/slow"


# -- the harness itself ---------------------------------------------------------------


async def test_the_checks_see_an_interrupted_quart_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """The abandoned-task check is not vacuous: cancelling the task that runs Quart's wait abandons both tasks."""
    life = Lifecycle()
    namespace = type("asyncio", (), {**vars(asyncio), "ensure_future": life.ensure_future, "wait": life.wait})
    monkeypatch.setattr(quart.asgi, "asyncio", namespace)

    async def receive() -> Message:
        await anyio.sleep(5)  # a client that stays
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/slow",
        "raw_path": b"/slow",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    probe.reset()
    task = asyncio.ensure_future(QUART(scope, receive, send))
    assert await anyio.to_thread.run_sync(probe.upstream_waiting.wait, 5), "the view never awaited"
    task.cancel()  # what a middleware that cancelled Quart from outside would do
    with pytest.raises(asyncio.CancelledError):
        await task
    assert life.abandoned == 2
    for orphan in life.tasks:
        orphan.cancel()
    await asyncio.gather(*life.tasks, return_exceptions=True)
