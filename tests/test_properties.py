"""Property-based protocol tests: a scripted server and a scripted app around the middleware.

Each example is one request. ``tests.fake_server.FakeServer`` delivers a generated
sequence of request messages (body chunks with random bytes, unknown message types
interleaved) and the client leaves at a generated point: on a ``receive()`` call, during
a ``send()``, at a step of the app's program, a few scheduling rounds after one, or
never. The app runs a generated program (receive, send the next message of a valid
response, pause, wait for the disconnect) and ends by returning or raising one of many
kinds of exception. Every example runs on a fresh event loop (``anyio.run``), on asyncio
and on trio, and then every promise below is checked against what was recorded
(../shared/DESIGN.md, promises 2 to 6):

1. receive: the app gets exactly what the server delivered, in order, message by
   message, whatever the type; a prefix of it, then only ``http.disconnect``, at once.
2. state: ``disconnected`` is set at most once, only for a departure before the response
   was complete; ``phase`` and ``detected_at`` agree with it.
3. send: ``send()`` raises only after an early departure, ``ClientDisconnected`` as soon
   as the middleware knows (unless the app heard of it through ``receive()``, see
   ``check_send``); ``bytes_sent`` counts what the server accepted.
4. exceptions: what the departure did not cause escapes as the very same object, its
   traceback and context intact; what it caused is absorbed (and logged once: promise 8).
5. read-ahead: bounded by ``max_read_ahead``, nothing read for the body while the app
   consumes it, no ``100 Continue`` before the app asks, one reader at a time.
6. liveness: nothing hangs, a departure the middleware can see is seen, no task and no
   server call outlives the request; cancel mode cancels, observe mode never does.

Hypothesis generates whole scripts rather than driving a ``RuleBasedStateMachine``: the
interleaving that matters happens inside one event loop run, between the app's task and
the middleware's watcher, so a script that the app and the server play out is what can
be replayed and shrunk. Examples are derandomized and no database is kept, so CI always
runs the same examples.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import CodeType
from typing import IO, Literal
from unittest import mock

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from asgi_disconnect import (
    ClientDisconnected,
    DisconnectMiddleware,
    DisconnectState,
    _fastpath,
    _middleware,
    disconnect_state,
)
from asgi_disconnect._types import ASGIApp, Message, Receive, Scope, Send
from tests.fake_server import FakeServer, SendMode, ServerSendError, body_bytes, is_disconnect
from tests.peer import http_scope

SCENARIO_TIMEOUT = 5.0  # nothing hangs: a whole example, server and app
RECEIVE_TIMEOUT = 0.5  # a receive() the harness knows cannot block for a reason
DETECT_TIMEOUT = 0.5  # a departure the middleware is able to see
CANCEL_TIMEOUT = 1.0  # cancel mode: the cancellation lands within this after the detection
FILE_PATH = os.path.abspath(__file__)  # what pathsend and zerocopysend messages point at

# -- the script -------------------------------------------------------------------------


@dataclass(frozen=True)
class Recv:
    """The app calls receive() (skipped when it would rightly wait for the client)."""


@dataclass(frozen=True)
class SendNext:
    """The app sends the next message of its response; ``catch``: it catches OSError."""

    catch: bool


@dataclass(frozen=True)
class Leave:
    """The client leaves now, or ``soon`` scheduling rounds later (while the app runs)."""

    soon: int | None


@dataclass(frozen=True)
class Pause:
    """The app awaits ``checkpoints`` scheduling rounds (an await on something else)."""

    checkpoints: int


@dataclass(frozen=True)
class AwaitDisconnect:
    """The app waits for ``state.wait()`` if the middleware is able to see the departure."""


Step = Recv | SendNext | Leave | Pause | AwaitDisconnect


@dataclass(frozen=True)
class Out:
    """One response message the app will send; ``completes``: it ends the response."""

    kind: Literal["start", "body", "trailers", "pathsend", "zerocopysend"]
    body: bytes = b""
    more: bool = False
    trailers: bool = False
    completes: bool = False


EndKind = Literal[
    "return",
    "value",  # ValueError
    "own_oserror",  # the app's own FileNotFoundError (a missing file)
    "own_timeout",  # the app's own TimeoutError (an OSError too)
    "base",  # AppAbort, a BaseException that is not an Exception
    "group",  # ExceptionGroup of the app's own errors
    "base_group",  # BaseExceptionGroup with an AppAbort in it
    "mixed_group",  # ExceptionGroup of a departure error and an own ValueError
    "reraise_departure",  # the departure error the app caught, raised again
    "wrap_departure",  # RuntimeError(...) from the departure error (a framework's wrapper)
    "group_departure",  # ExceptionGroup([departure error]) (a task group's)
    "own_in_handler",  # FileNotFoundError raised while handling the departure error
]
END_KINDS: tuple[EndKind, ...] = (
    "return",
    "value",
    "own_oserror",
    "own_timeout",
    "base",
    "group",
    "base_group",
    "mixed_group",
    "reraise_departure",
    "wrap_departure",
    "group_departure",
    "own_in_handler",
)
NEEDS_DEPARTURE = {"mixed_group", "reraise_departure", "wrap_departure", "group_departure", "own_in_handler"}
ABSORBED_ENDS = {"reraise_departure", "wrap_departure", "group_departure"}


@dataclass(frozen=True)
class End:
    """How the app ends; ``collapse``: raised as ``raise group.exceptions[0]`` from a group
    holding it (Starlette's collapse_excgroups), which makes its context chain a cycle."""

    kind: EndKind
    collapse: bool


@dataclass(frozen=True)
class Scenario:
    """One request: what the server delivers, when the client leaves, what the app does."""

    incoming: tuple[Message, ...]
    method: str
    http_version: str
    headers: tuple[tuple[bytes, bytes], ...]
    bodiless: bool  # the request declares no body: a single empty http.request
    expect_continue: bool
    max_read_ahead: int
    send_mode: SendMode
    leave_at_receive: int | None
    leave_at_send: int | None
    receive_delays: tuple[int, ...]
    send_delay: int
    disconnect_after_response: bool
    response: tuple[Out, ...]
    program: tuple[Step, ...]
    end: End
    cancel: bool


class AppAbort(BaseException):
    """A BaseException that is not an Exception, like KeyboardInterrupt or SystemExit."""


# -- strategies -------------------------------------------------------------------------

chunk_bytes = st.one_of(st.binary(max_size=12), st.binary(min_size=13, max_size=200))


@st.composite
def incoming_messages(draw: st.DrawFn) -> tuple[tuple[Message, ...], bool]:
    """Request body chunks with unknown message types interleaved; and whether bodiless."""
    chunks = draw(st.lists(chunk_bytes, max_size=5))
    bodiless = sum(map(len, chunks)) == 0
    if bodiless:
        chunks = [b""]
    messages: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks)
    ]
    unknown = draw(
        st.lists(
            st.tuples(st.integers(0, len(messages)), st.sampled_from(["x.custom", "http.request.trailers"])),
            max_size=3,
        )
    )
    for n, (position, kind) in enumerate(sorted(unknown, key=lambda u: -u[0])):
        extra: Message = (
            {"type": kind, "n": n}
            if kind == "x.custom"
            else {"type": kind, "headers": [(b"x-sum", str(n).encode())], "more_trailers": False}
        )
        messages.insert(position, extra)
    return tuple(messages), bodiless


@st.composite
def responses(draw: st.DrawFn) -> tuple[Out, ...]:
    """A valid response: a start, then a body, a pathsend or zerocopysends, maybe trailers."""
    if draw(st.integers(0, 9)) == 0:
        return ()  # the app never answers
    style = draw(st.sampled_from(["body", "body", "pathsend", "zerocopysend"]))
    trailers = style == "body" and draw(st.booleans())
    out = [Out("start", trailers=trailers)]
    finished = draw(st.integers(0, 5)) > 0
    if style == "pathsend":
        if finished:
            out.append(Out("pathsend", completes=True))
        return tuple(out)
    kind: Literal["body", "zerocopysend"] = "body" if style == "body" else "zerocopysend"
    for data in draw(st.lists(st.binary(max_size=16), max_size=4)):
        out.append(Out(kind, body=data, more=True))
    if not finished:
        return tuple(out)
    out.append(Out(kind, body=draw(st.binary(max_size=16)), completes=not trailers))
    if trailers:
        for _ in range(draw(st.integers(0, 2))):
            out.append(Out("trailers", more=True))
        out.append(Out("trailers", completes=True))
    return tuple(out)


steps = st.one_of(
    st.just(Recv()),
    st.builds(SendNext, catch=st.booleans()),
    st.builds(Leave, soon=st.none() | st.integers(0, 4)),
    st.builds(Pause, checkpoints=st.integers(1, 4)),
    st.just(AwaitDisconnect()),
)


@st.composite
def programs(draw: st.DrawFn, response_length: int) -> tuple[Step, ...]:
    """The app's steps; most programs send the whole response, at random points.

    One in four starts like a handler that never reads: it works a little, the client
    leaves meanwhile, and it waits for the middleware to notice (promise 3).
    """
    program = draw(st.lists(steps, max_size=16))
    if draw(st.integers(0, 3)) == 0:
        idle: list[Step] = [Pause(draw(st.integers(1, 3)))] if draw(st.booleans()) else []
        idle += [Leave(soon=draw(st.none() | st.integers(0, 4))), AwaitDisconnect()]
        program = idle + program[:6]
    if draw(st.integers(0, 3)) > 0:
        missing = response_length - sum(isinstance(step, SendNext) for step in program)
        for _ in range(missing):
            program.insert(draw(st.integers(0, len(program))), SendNext(catch=draw(st.booleans())))
    return tuple(program)


@st.composite
def scenarios(draw: st.DrawFn, cancel: bool) -> Scenario:
    """A whole request: server script, client departure, app program and ending."""
    incoming, bodiless = draw(incoming_messages())
    http_version = draw(st.sampled_from(["1.1", "2"]))
    total = sum(body_bytes(m) for m in incoming)
    headers: list[tuple[bytes, bytes]] = []
    expect_continue = False
    if bodiless:
        # A GET (h2 clients send no content-length on it), or a POST declaring no body.
        method = draw(st.sampled_from(["GET", "POST"]))
        if method == "POST":
            headers.append((b"content-length", b"0"))
    else:
        method = "POST"
        if http_version == "1.1":
            if draw(st.booleans()):
                headers.append((b"content-length", str(total).encode()))
            else:
                headers.append((b"transfer-encoding", b"chunked"))
        elif draw(st.booleans()):
            headers.append((b"content-length", str(total).encode()))
        expect_continue = draw(st.integers(0, 4)) == 0
        if expect_continue:
            headers.append((b"expect", b"100-continue"))
    response = draw(responses())
    return Scenario(
        incoming=incoming,
        method=method,
        http_version=http_version,
        headers=tuple(headers),
        bodiless=bodiless,
        expect_continue=expect_continue,
        max_read_ahead=draw(st.one_of(st.sampled_from([0, 1, 64 * 1024]), st.integers(0, 64))),
        send_mode=draw(st.sampled_from(["2.3", "2.4"])),
        leave_at_receive=draw(st.none() | st.integers(0, 6)),
        leave_at_send=draw(st.none() | st.integers(0, 5)),
        receive_delays=tuple(draw(st.lists(st.integers(0, 2), max_size=8))),
        send_delay=draw(st.integers(0, 2)),
        disconnect_after_response=draw(st.booleans()),
        response=response,
        program=draw(programs(len(response))),
        end=draw(st.builds(End, kind=st.sampled_from(END_KINDS), collapse=st.booleans())),
        cancel=cancel,
    )


# -- what a run records -----------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The request's DisconnectState at one point of the app's program."""

    where: str
    disconnected: bool
    phase: str | None
    detected_at: float | None
    cancelled: bool


@dataclass
class AppSend:
    """One send() the app made."""

    message: Message
    disconnected_before: bool
    told_before: bool  # the app had received http.disconnect
    gone_before: bool
    complete_before: bool
    server_calls_before: int
    raised: BaseException | None = None
    gone_at_raise: bool = False
    disconnected_after: bool = False
    server_calls_after: int = 0


@dataclass(frozen=True)
class AppReceive:
    """One message the app's receive() returned."""

    message: Message
    disconnected_before: bool  # the middleware already knew of a departure
    told_before: bool  # the app had already received an http.disconnect
    server_closed: bool  # the server answers http.disconnect by now


@dataclass
class Run:
    """Everything one example did, for the invariant checks."""

    sc: Scenario
    server: FakeServer
    tg: anyio.abc.TaskGroup | None = None
    cancelled_class: type[BaseException] = BaseException  # the backend's cancellation exception
    file: IO[bytes] | None = None
    state: DisconnectState | None = None
    snapshots: list[Snapshot] = field(default_factory=list)
    final: Snapshot | None = None
    trace: list[str] = field(default_factory=list)
    sends: list[AppSend] = field(default_factory=list)
    receives: list[AppReceive] = field(default_factory=list)
    departures: list[OSError] = field(default_factory=list)  # errors send() raised
    told: bool = False  # the app received http.disconnect
    start: Literal["not_sent", "refused", "sent", "unclear"] = "not_sent"
    completed: bool = False  # the final message was sent, not refused, with no departure known
    completing_called: bool = False
    raised_from_send: bool = False  # a send() error escaped the app uncaught
    cancelled: bool = False  # a cancellation escaped one of the app's steps
    end_kind: EndKind | None = None  # the ending as played (departure kinds need an error)
    app_raised: BaseException | None = None
    app_raised_links: tuple[BaseException | None, BaseException | None] = (None, None)
    escaped: BaseException | None = None
    live: list[str] = field(default_factory=list)  # liveness violations seen while running
    receive_problems: list[str] = field(default_factory=list)
    leaked_tasks: list[str] = field(default_factory=list)
    server_calls_at_return: tuple[int, int] = (0, 0)
    events: list[str] = field(default_factory=list)  # structlog events

    def snap(self, where: str) -> Snapshot:
        assert self.state is not None
        snapshot = Snapshot(
            where, self.state.disconnected, self.state.phase, self.state.detected_at, self.state.cancelled
        )
        self.snapshots.append(snapshot)
        return snapshot

    def describe(self) -> str:
        """A short account of the run, for a failure message."""
        server = self.server
        lines = [
            "trace: " + " | ".join(self.trace),
            f"server delivered: {server.delivered}",
            f"app received:     {[r.message for r in self.receives]}",
            f"server sends:     {[(c.message['type'], c.outcome) for c in server.send_calls]}",
            f"final state:      {self.final}",
            f"app raised {self.app_raised!r}, escaped {self.escaped!r}",
        ]
        return "\n".join(lines)


# -- the app ----------------------------------------------------------------------------


def _message(out: Out, run: Run) -> Message:
    if out.kind == "start":
        return {"type": "http.response.start", "status": 200, "headers": [], "trailers": out.trailers}
    if out.kind == "body":
        return {"type": "http.response.body", "body": out.body, "more_body": out.more}
    if out.kind == "trailers":
        return {"type": "http.response.trailers", "headers": [(b"x-sum", b"1")], "more_trailers": out.more}
    if out.kind == "pathsend":
        return {"type": "http.response.pathsend", "path": FILE_PATH}
    return {"type": "http.response.zerocopysend", "file": run.file, "count": len(out.body), "more_body": out.more}


def _raise_collapsed(exc: BaseException) -> None:
    """``raise group.exceptions[0]`` inside ``except BaseExceptionGroup``, as Starlette does."""
    try:
        raise BaseExceptionGroup("collapsed", [exc])
    except BaseExceptionGroup as group:
        raise group.exceptions[0]  # noqa: B904 - exactly what collapse_excgroups does


def _raise_ending(kind: EndKind, departure: OSError | None, collapse: bool) -> None:
    exc: BaseException
    if kind == "return":
        return
    if kind == "value":
        exc = ValueError("the app's own bug")
    elif kind == "own_oserror":
        exc = FileNotFoundError(2, "No such file or directory", "/srv/missing.txt")
    elif kind == "own_timeout":
        exc = TimeoutError("the app's upstream timed out")
    elif kind == "base":
        exc = AppAbort("the app's own BaseException")
    elif kind == "group":
        exc = ExceptionGroup("the app's task group", [ValueError("one"), KeyError("two")])
    elif kind == "base_group":
        exc = BaseExceptionGroup("the app's task group", [AppAbort("one"), ValueError("two")])
    else:
        assert departure is not None
        if kind == "mixed_group":
            exc = ExceptionGroup("the app's task group", [departure, ValueError("the app's own bug")])
        elif kind == "reraise_departure":
            exc = departure
        elif kind == "wrap_departure":
            try:
                raise RuntimeError("the framework's wrapper") from departure
            except RuntimeError as wrapper:
                exc = wrapper
        elif kind == "group_departure":
            exc = ExceptionGroup("the app's task group", [departure])
        else:  # own_in_handler
            try:
                raise departure
            except OSError:
                raise FileNotFoundError(2, "No such file or directory", "/srv/fallback.txt")  # noqa: B904
    if collapse and not isinstance(exc, BaseExceptionGroup):
        _raise_collapsed(exc)
    raise exc


RAISE_SITES: frozenset[CodeType] = frozenset({_raise_collapsed.__code__, _raise_ending.__code__})


def make_app(run: Run) -> ASGIApp:
    """The app that plays ``run.sc.program``, recording what it sees."""
    sc, server = run.sc, run.server

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        state = disconnect_state(scope)
        run.state = server.state = state
        response: Iterator[Out] = iter(sc.response)
        run.snap("start")
        try:
            for i, step in enumerate(sc.program):
                await _play(step, run, receive, send, response)
                run.snap(f"{i}:{type(step).__name__}")
            kind: EndKind = sc.end.kind
            if kind in NEEDS_DEPARTURE and not run.departures:
                kind = "return"
            run.end_kind = kind
            run.trace.append(f"end {kind}{' collapsed' if sc.end.collapse else ''}")
            _raise_ending(kind, run.departures[-1] if run.departures else None, sc.end.collapse)
        except BaseException as exc:
            run.app_raised = exc
            run.app_raised_links = (exc.__cause__, exc.__context__)
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                run.cancelled = True
                run.trace.append("cancelled")
            raise

    return app


async def _play(step: Step, run: Run, receive: Receive, send: Send, response: Iterator[Out]) -> None:
    sc, server, state = run.sc, run.server, run.state
    assert state is not None
    if isinstance(step, Recv):
        await _receive(run, receive)
    elif isinstance(step, SendNext):
        out = next(response, None)
        if out is not None:
            await _send(run, send, out, step.catch)
    elif isinstance(step, Leave):
        if step.soon is None:
            run.trace.append("leave")
            server.leave()
        else:
            run.trace.append(f"leave in {step.soon}")
            assert run.tg is not None
            server.leave_soon(run.tg, step.soon)
    elif isinstance(step, Pause):
        for _ in range(step.checkpoints):
            await anyio.lowlevel.checkpoint()
    else:
        while server.leaving_soon and not server.gone:
            await anyio.lowlevel.checkpoint()
        reason = _detection_due(run)
        if reason is None or run.live or run.receive_problems:  # after a violation: no more waiting
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            return
        run.trace.append(f"await disconnect ({reason})")
        with anyio.move_on_after(DETECT_TIMEOUT) as timer:
            await state.wait()
        if timer.cancelled_caught:
            run.live.append(f"the client left ({reason}) and the app waited, but no disconnect was detected")
            return
        if sc.cancel and state.cancel and not run.told:
            await anyio.sleep(CANCEL_TIMEOUT)  # grace=0: the cancellation ends this sleep
            run.live.append(f"cancel mode: the app was not cancelled within {CANCEL_TIMEOUT} s of the detection")


def _detection_due(run: Run) -> str | None:
    """Why the middleware must see the departure by now, or None if it may not be able to.

    It must when the client left before the response was complete and the watcher may
    call the server's receive() (which then answers http.disconnect at once) under any
    reading of promises 3 and 4: the whole body was delivered; the request declares no
    body; or the app has not started to read, no 100 Continue is expected, and the
    declared content-length is below max_read_ahead. (An upload of unknown length, even a
    small one, may be left unread: see check_read_ahead.)
    """
    sc, server, state = run.sc, run.server, run.state
    assert state is not None
    if not server.gone or run.completing_called:
        return None
    if state.disconnected:
        return "already detected"
    if server.body_complete:
        return "the whole body was delivered"
    if server.app_receive_calls or sc.expect_continue:
        return None  # the app reads the body itself: the watcher must not (promise 4)
    if sc.bodiless:
        return "a bodiless request"
    length = dict(sc.headers).get(b"content-length")
    if length is not None and int(length) < sc.max_read_ahead:
        return f"content-length {int(length)} < max_read_ahead={sc.max_read_ahead}"
    return None


async def _receive(run: Run, receive: Receive) -> None:
    server, state = run.server, run.state
    assert state is not None
    disconnected, told = state.disconnected, run.told
    unread_bytes, unread_messages = server.unread()
    if server.next_receive_blocks() and not disconnected and not told and unread_messages == 0:
        run.trace.append("receive skipped (it would wait for the client)")
        return
    if run.receive_problems or run.live:
        return  # one violation is enough: the example must end well before SCENARIO_TIMEOUT
    server.app_in_receive = True
    server.app_receive_calls += 1
    try:
        with anyio.move_on_after(RECEIVE_TIMEOUT) as timer:
            message = await receive()
    finally:
        server.app_in_receive = False
    if timer.cancelled_caught:
        run.receive_problems.append(
            f"receive() blocked {RECEIVE_TIMEOUT} s although it had something to return: "
            f"{unread_messages} delivered messages unread ({unread_bytes} body bytes), "
            f"server closed={server.closed}, disconnected={disconnected}, told before={told}"
        )
        return
    server.record_app_received(message)
    run.receives.append(AppReceive(message, disconnected, told, server.closed))
    run.trace.append(f"received {message['type']}")
    if is_disconnect(message):
        run.told = True


async def _send(run: Run, send: Send, out: Out, catch: bool) -> None:
    server, state = run.server, run.state
    assert state is not None
    message = _message(out, run)
    record = AppSend(message, state.disconnected, run.told, server.gone, run.completed, len(server.send_calls))
    run.sends.append(record)
    if out.completes:
        run.completing_called = True
    try:
        await send(message)
    except BaseException as exc:
        record.raised = exc
        record.gone_at_raise = server.gone
        run.trace.append(f"send {message['type']} raised {type(exc).__name__}")
        if not isinstance(exc, OSError):
            raise
        run.departures.append(exc)
        if not catch:
            run.raised_from_send = True
            raise
    else:
        run.trace.append(f"sent {message['type']}")
        if out.kind == "start":
            run.start = "sent" if not state.disconnected else "unclear"
        if out.completes and not record.disconnected_before:
            run.completed = True
    finally:
        record.disconnected_after = state.disconnected
        record.server_calls_after = len(server.send_calls)
        if out.kind == "start" and record.raised is not None:
            run.start = "refused" if record.disconnected_before else "unclear"


# -- one example ------------------------------------------------------------------------


async def _execute(sc: Scenario, file: IO[bytes], box: list[Run]) -> None:
    server = FakeServer(
        [dict(m) for m in sc.incoming],
        send_mode=sc.send_mode,
        leave_at_receive=sc.leave_at_receive,
        leave_at_send=sc.leave_at_send,
        receive_delays=sc.receive_delays,
        send_delay=sc.send_delay,
        disconnect_after_response=sc.disconnect_after_response,
    )
    run = Run(sc, server, file=file)
    box.append(run)
    run.cancelled_class = anyio.get_cancelled_exc_class()
    mw = DisconnectMiddleware(make_app(run), cancel=sc.cancel, max_read_ahead=sc.max_read_ahead)
    spec = {"version": "3.0", "spec_version": sc.send_mode}  # a 2.4 server says so: it may raise from send()
    scope = http_scope(method=sc.method, headers=sc.headers, http_version=sc.http_version, asgi=spec)
    before = {task.id for task in anyio.get_running_tasks()}
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with anyio.create_task_group() as tg:
            run.tg = tg
            try:
                await mw(scope, server.receive, server.send)
            except BaseException as exc:
                run.escaped = exc
            server.returned = True
            run.server_calls_at_return = (len(server.receive_calls), len(server.send_calls))
            if run.state is not None:
                run.final = run.snap("returned")
        for _ in range(3):  # a task cancelled as the middleware returned ends in a round
            await anyio.lowlevel.checkpoint()
        run.leaked_tasks = [str(task.name) for task in anyio.get_running_tasks() if task.id not in before]


def execute(sc: Scenario, backend: str) -> Run:
    """Play ``sc`` on a fresh event loop of ``backend``; a hang fails here."""
    box: list[Run] = []
    # "asyncio-reference": asyncio on the reference path (see tests/conftest.py).
    reference = (
        mock.patch.object(_middleware, "fast_task", _fastpath._no_task) if backend == "asyncio-reference" else None
    )
    with capture_logs() as logs, open(FILE_PATH, "rb") as file, reference or contextlib.nullcontext():
        try:
            anyio.run(_execute, sc, file, box, backend=backend.removesuffix("-reference"))
        except TimeoutError:
            detail = box[0].describe() if box else ""
            raise LivenessViolation(f"the request did not end within {SCENARIO_TIMEOUT} s\n{detail}") from None
    run = box[0]
    run.events = [str(entry["event"]) for entry in logs]
    return run


# -- the invariants ---------------------------------------------------------------------


class ReceiveViolation(AssertionError):
    """Invariant 1: what the app receives."""


class StateViolation(AssertionError):
    """Invariant 2: disconnected, phase, detected_at, cancelled."""


class SendViolation(AssertionError):
    """Invariant 3: what send() raises and what bytes_sent counts."""


class ExceptionViolation(AssertionError):
    """Invariant 4: what escapes the middleware."""


class ReadAheadViolation(AssertionError):
    """Invariant 5: how the middleware reads the server's receive()."""


class LivenessViolation(AssertionError):
    """Invariant 6: nothing hangs or outlives the request; departures are seen."""


class LoggingViolation(AssertionError):
    """Promise 8: one structlog event per abort."""


def _violation(kind: type[AssertionError], run: Run, problem: str) -> AssertionError:
    """The error to raise, at the line that found it: each line is a distinct bug to Hypothesis."""
    return kind(f"{problem}\n{run.describe()}")


def check_exceptions(run: Run) -> None:
    """What the departure did not cause escapes as the same object; the rest is absorbed."""
    raised, escaped, sc = run.app_raised, run.escaped, run.sc
    if raised is None:
        expected = "absorbed"
    elif run.cancelled:
        if not sc.cancel:
            raise _violation(ExceptionViolation, run, "observe mode: the app was cancelled")
        expected = "absorbed"  # the middleware's own cancellation
    elif run.raised_from_send or run.end_kind in ABSORBED_ENDS:
        expected = "absorbed"  # ClientDisconnected, the server's OSError, a wrapper or a group of them
    elif run.end_kind == "own_in_handler":
        expected = "propagated"  # an own OSError raised while handling a departure error is the app's
    else:
        expected = "propagated"
    if expected == "absorbed" and escaped is not None:
        raise _violation(
            ExceptionViolation, run, f"the middleware raised {escaped!r}; expected it to return (app raised {raised!r})"
        )
    if expected == "propagated" and escaped is None:
        raise _violation(
            ExceptionViolation, run, f"the app raised {raised!r} (not caused by the departure): it was absorbed"
        )
    if isinstance(escaped, BaseExceptionGroup) and escaped is not raised and raised in escaped.exceptions:
        raise _violation(ExceptionViolation, run, f"the app raised {raised!r}; it came out wrapped in {escaped!r}")
    if expected == "propagated" and escaped is not raised:
        raise _violation(
            ExceptionViolation,
            run,
            f"the app raised {raised!r} (not caused by the departure); the middleware raised {escaped!r} instead",
        )
    if expected == "either" and escaped is not None and escaped is not raised:
        raise _violation(
            ExceptionViolation, run, f"the app raised {raised!r}; the middleware raised {escaped!r} instead"
        )
    if escaped is not None:
        if (escaped.__cause__, escaped.__context__) != run.app_raised_links:
            raise _violation(
                ExceptionViolation, run, f"the middleware changed the __cause__/__context__ of {escaped!r}"
            )
        tb = escaped.__traceback__
        codes = set()
        while tb is not None:
            codes.add(tb.tb_frame.f_code)
            tb = tb.tb_next
        if not codes & RAISE_SITES:
            raise _violation(ExceptionViolation, run, f"the traceback of {escaped!r} lost the frame that raised it")
    if expected == "absorbed" and raised is not None and run.final is not None and not run.final.disconnected:
        raise _violation(
            ExceptionViolation, run, f"{raised!r} was absorbed as a departure, but state.disconnected is false"
        )


def check_logging(run: Run) -> None:
    """Promise 8: each abort, whatever the app raised, is logged once; a normal request never."""
    aborts = run.events.count("request_aborted")
    wanted = 1 if run.final is not None and run.final.disconnected else 0
    if aborts != wanted:
        raise _violation(LoggingViolation, run, f"{aborts} 'request_aborted' log events for {wanted} abort")


def check_receive(run: Run) -> None:
    """The app got a prefix of what the server delivered, message by message, then disconnects.

    Once the app got http.disconnect, nothing else follows. Once only the middleware knows
    of the departure, a message it read ahead may still come first (in order) or the
    disconnect may win over it: the contract is ambiguous there, so both are accepted.
    """
    if run.receive_problems:
        raise _violation(ReceiveViolation, run, run.receive_problems[0])
    delivered = [m for m in run.server.delivered if not is_disconnect(m)]
    position = 0
    told = False
    for n, received in enumerate(run.receives):
        message = received.message
        if is_disconnect(message):
            told = True
            if not received.server_closed:
                raise _violation(
                    ReceiveViolation, run, f"receive #{n}: http.disconnect although the client is still there"
                )
            continue
        if told:
            raise _violation(ReceiveViolation, run, f"receive #{n}: {message['type']} after http.disconnect")
        if position >= len(delivered):
            raise _violation(ReceiveViolation, run, f"receive #{n}: {message!r}, which the server never delivered")
        if message != delivered[position]:
            raise _violation(
                ReceiveViolation,
                run,
                f"receive #{n}: the app got {message!r} where the server delivered {delivered[position]!r} "
                f"(delivered message #{position})",
            )
        position += 1


def check_state(run: Run) -> None:
    """disconnected is set once, for an early departure only, with a phase and a time."""
    sc, server, final = run.sc, run.server, run.final
    assert final is not None
    for snapshot in run.snapshots:
        if (snapshot.detected_at is not None) != snapshot.disconnected:
            raise _violation(
                StateViolation, run, f"at {snapshot.where}: detected_at={snapshot.detected_at} but {snapshot}"
            )
        if (snapshot.phase is not None) != snapshot.disconnected:
            raise _violation(StateViolation, run, f"at {snapshot.where}: phase={snapshot.phase!r} but {snapshot}")
    for previous, current in zip(run.snapshots, run.snapshots[1:], strict=False):
        if previous.disconnected and (
            not current.disconnected or (current.phase, current.detected_at) != (previous.phase, previous.detected_at)
        ):
            raise _violation(StateViolation, run, f"the state changed after the disconnect: {previous} then {current}")
    if final.cancelled and not (sc.cancel and final.disconnected):
        raise _violation(StateViolation, run, "state.cancelled without an early disconnect in cancel mode")
    if run.cancelled and not final.cancelled:
        raise _violation(StateViolation, run, "the app was cancelled but state.cancelled is false")
    if not final.disconnected:
        return
    if not server.gone:
        raise _violation(StateViolation, run, "state.disconnected although the client never left")
    assert server.left_at is not None and final.detected_at is not None
    if final.detected_at < server.left_at:
        raise _violation(StateViolation, run, "detected_at is before the client left")
    if run.completed:
        raise _violation(
            StateViolation, run, "state.disconnected although the response was complete before the departure"
        )
    wanted = {
        "not_sent": {"before_response"},
        "refused": {"before_response"},
        "sent": {"mid_body"},
        "unclear": {"before_response", "mid_body"},  # detected while the start was being sent
    }[run.start]
    if final.phase not in wanted:
        raise _violation(
            StateViolation, run, f"phase {final.phase!r}, expected {' or '.join(sorted(wanted))} (start {run.start})"
        )


def check_send(run: Run) -> None:
    """send() raises only after an early departure; bytes_sent counts what the server took.

    Once the middleware knows of the departure, send() raises ClientDisconnected without
    calling the server (promise 5), unless the app was told through receive() (it got
    http.disconnect): a listening framework keeps its lifecycle (promise 6), so its sends
    meet the server as without the middleware.
    """
    sc, server, state = run.sc, run.server, run.state
    assert state is not None
    passed_through: list[Message] = []  # sends after the disconnect that the server got
    for n, record in enumerate(run.sends):
        kind = record.message["type"]
        reached = record.server_calls_after != record.server_calls_before
        if record.disconnected_before:
            if record.told_before:
                if not reached:
                    raise _violation(
                        SendViolation,
                        run,
                        f"send #{n} ({kind}): the app was told, yet its send did not reach the server",
                    )
                passed_through.append(record.message)
            else:
                if not isinstance(record.raised, ClientDisconnected):
                    raise _violation(
                        SendViolation, run, f"send #{n} ({kind}) after the disconnect was known did not raise it"
                    )
                if reached:
                    raise _violation(
                        SendViolation, run, f"send #{n} ({kind}) reached the server after the disconnect was known"
                    )
        raised = record.raised
        if raised is None or isinstance(raised, run.cancelled_class):
            continue
        if not isinstance(raised, OSError):
            raise _violation(SendViolation, run, f"send #{n} ({kind}) raised {raised!r}, not an OSError")
        if not record.gone_at_raise or record.complete_before:
            raise _violation(SendViolation, run, f"send #{n} ({kind}) raised {raised!r} without an early departure")
        if isinstance(raised, ClientDisconnected):
            if not record.disconnected_after:
                raise _violation(
                    SendViolation, run, f"send #{n} ({kind}) raised ClientDisconnected but disconnected is false"
                )
        elif not (isinstance(raised, ServerSendError) and sc.send_mode == "2.4" and reached):
            raise _violation(SendViolation, run, f"send #{n} ({kind}) raised {raised!r}, which nobody should raise")
    reached_messages = [r.message for r in run.sends if r.server_calls_after > r.server_calls_before]
    if [c.message for c in server.send_calls] != reached_messages:
        raise _violation(SendViolation, run, "the server did not get exactly the app's messages, in order")
    if any(c.state_disconnected and c.message not in passed_through for c in server.send_calls):
        raise _violation(SendViolation, run, "a message reached the server after the middleware knew of the disconnect")
    before = [c for c in server.send_calls if not c.state_disconnected and c.outcome != "raised"]
    after = [c for c in server.send_calls if c.state_disconnected and c.outcome != "raised"]
    accepted = sum(body_bytes(c.message) for c in before)
    # Not fixed by the contract, so either way is accepted: whether pathsend and
    # zerocopysend bytes count, and whether sends passed through after the app was told do.
    optional = [
        sum(int(c.message.get("count", 0)) for c in before if c.message["type"] == "http.response.zerocopysend"),
        sum(os.path.getsize(c.message["path"]) for c in before if c.message["type"] == "http.response.pathsend"),
        sum(body_bytes(c.message) for c in after),
    ]
    allowed = {accepted + sum(v for v, on in zip(optional, mask, strict=True) if on) for mask in _masks(len(optional))}
    if state.bytes_sent not in allowed:
        refused = sum(body_bytes(c.message) for c in server.send_calls if c.outcome == "raised")
        raise _violation(
            SendViolation,
            run,
            f"bytes_sent={state.bytes_sent} but the server accepted {accepted} body bytes "
            f"(and refused {refused}: a send that raised sent nothing)",
        )


def _masks(n: int) -> list[tuple[bool, ...]]:
    return [tuple(bool(i >> bit & 1) for bit in range(n)) for i in range(2**n)]


def check_read_ahead(run: Run) -> None:
    """The middleware reads only within max_read_ahead, never for the body while the app reads.

    A read the app did not ask for may happen only before the response is complete and,
    unless the whole body was delivered, only if the app has not started to read the body
    itself, the request does not expect 100 Continue, and it declares no body or
    max_read_ahead > 0. It never holds more than max_read_ahead unread bytes (promise 4):
    it reads a body ahead only when its content-length says all of it fits.
    """
    sc, server = run.sc, run.server
    limit = sc.max_read_ahead
    for call in server.receive_calls:
        where = f"receive() call #{call.index}"
        if call.in_flight:
            raise _violation(ReadAheadViolation, run, f"{where} while another was in progress: two readers")
        if call.after_return:
            raise _violation(ReadAheadViolation, run, f"{where} after the middleware returned")
        if call.app_in_receive:
            continue  # the app asked
        if call.response_complete:
            raise _violation(ReadAheadViolation, run, f"{where} by the watcher after the response was complete")
        if call.body_complete:
            continue  # only what follows the body (a disconnect) can come: it takes nothing from the app
        if call.app_has_received:
            raise _violation(ReadAheadViolation, run, f"{where}: read for the body while the app consumes it")
        if sc.expect_continue:
            raise _violation(ReadAheadViolation, run, f"{where}: read before the app asked, with Expect: 100-continue")
        if sc.bodiless:
            continue
        if limit == 0:
            raise _violation(ReadAheadViolation, run, f"{where}: read ahead with max_read_ahead=0")
        held = server.unread_after.get(call.index, 0)
        if held > limit:
            raise _violation(
                ReadAheadViolation,
                run,
                f"{where}: read ahead while holding {call.unread_bytes} unread bytes, then {held}; "
                f"max_read_ahead={limit}",
            )


def check_liveness(run: Run) -> None:
    """Departures the middleware can see are seen; nothing outlives the request."""
    if run.live:
        raise _violation(LivenessViolation, run, run.live[0])
    if run.leaked_tasks:
        raise _violation(LivenessViolation, run, f"tasks still running after the request: {run.leaked_tasks}")
    counts = (len(run.server.receive_calls), len(run.server.send_calls))
    if counts != run.server_calls_at_return:
        raise _violation(LivenessViolation, run, "the server was called after the middleware returned")


def check_all(run: Run) -> None:
    """Every invariant, the most telling first."""
    _count_events(run)
    check_exceptions(run)
    check_receive(run)
    check_state(run)
    check_send(run)
    check_read_ahead(run)
    check_liveness(run)
    check_logging(run)


def _count_events(run: Run) -> None:
    """What the example exercised, for ``--hypothesis-show-statistics``."""
    final = run.final
    event(f"disconnected: {final.phase if final is not None and final.disconnected else 'no'}")
    event(f"client left: {run.server.gone}")
    event(f"app ended: {'cancelled' if run.cancelled else run.end_kind or 'send error'}")
    event(f"escaped: {type(run.escaped).__name__ if run.escaped is not None else 'nothing'}")
    event(f"app told: {run.told}")
    reads_ahead = sum(not c.app_in_receive for c in run.server.receive_calls)
    event(f"watcher reads: {min(reads_ahead, 3)}{'+' if reads_ahead > 3 else ''}")
    event(f"response: {'complete' if run.completed else 'incomplete'}")


# -- the tests --------------------------------------------------------------------------

backends = pytest.mark.parametrize("backend", ["asyncio", "asyncio-reference", "trio"])
EXAMPLES = int(os.environ.get("ASGI_DISCONNECT_EXAMPLES", "800"))  # observe mode; cancel mode runs half
property_settings = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@backends
@property_settings
@given(sc=scenarios(cancel=False))
def test_observe_mode_keeps_every_protocol_promise(backend: str, sc: Scenario) -> None:
    """Observe mode: random requests, departures, app programs and endings keep invariants 1-6."""
    check_all(execute(sc, backend))


@backends
@settings(property_settings, max_examples=max(1, EXAMPLES // 2))
@given(sc=scenarios(cancel=True))
def test_cancel_mode_keeps_every_protocol_promise(backend: str, sc: Scenario) -> None:
    """Cancel mode: the same invariants, and an app that was not told is cancelled."""
    check_all(execute(sc, backend))
