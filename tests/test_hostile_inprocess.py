"""Hostile apps and a hostile server, in process, on asyncio and trio: wrapped, everything as bare.

The server is hand-made (tests/peer.py), so that its ``receive()`` and ``send()`` can
misbehave in ways a real server cannot be made to, and so that trio runs too. Each test
runs the app bare and behind ``DisconnectMiddleware`` (observe or cancel mode) and
compares what escaped (the very same object), what the app got and what the server got.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.lowlevel
import pytest
import structlog.testing

from asgi_disconnect import SCOPE_KEY, DisconnectMiddleware, disconnect_state
from asgi_disconnect._types import ASGIApp, Message, Receive, Scope, Send

from . import hostile_apps as h
from .peer import Peer, http_scope

pytestmark = pytest.mark.anyio

Mode = Literal["bare", "observe", "cancel"]
MODES: tuple[Mode, ...] = ("observe", "cancel")
WAIT = 2.0  # the longest any step of these tests may take


class Hostile(Peer):
    """A server whose ``receive()`` raises, or whose ``send()`` raises or blocks, on demand.

    Every error it raises is a new ``RuntimeError`` (not an ``OSError``), kept in ``raised``.
    """

    def __init__(
        self,
        *,
        receive_raises: bool = False,
        send_raises_on: str | None = None,
        send_blocks: bool = False,
    ) -> None:
        super().__init__()
        self.receive_raises = receive_raises
        self.send_raises_on = send_raises_on
        self.send_blocks = send_blocks
        self.raised: list[BaseException] = []
        self.receive_called = anyio.Event()

    async def receive(self) -> Message:
        self.receive_called.set()
        if self.receive_raises:
            error = RuntimeError("the server's receive() failed")
            self.raised.append(error)
            raise error
        return await super().receive()

    async def send(self, message: Message) -> None:
        if message["type"] == self.send_raises_on:
            error = RuntimeError(f"the server's send() failed on {message['type']}")
            self.raised.append(error)
            raise error
        if self.send_blocks and message["type"] == "http.response.body":
            await anyio.sleep_forever()  # a peer that never drains
        await super().send(message)


@dataclass
class Outcome:
    """What one run produced."""

    escaped: BaseException | None
    sent: list[Message]
    rec: h.Recorder
    logs: list[MutableMapping[str, Any]] = field(default_factory=list)
    state_disconnected: bool | None = None


def wrap(app: ASGIApp, mode: Mode) -> ASGIApp:
    return app if mode == "bare" else DisconnectMiddleware(app, cancel=mode == "cancel")


async def drive(
    factory: h.Factory,
    mode: Mode,
    peer: Peer,
    *,
    leave_after: Callable[[h.Recorder], anyio.Event] | None = None,
) -> Outcome:
    """Run the app once against ``peer``; the client leaves once ``leave_after(rec)`` is set, if given."""
    rec = h.Recorder()
    states: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await factory(rec)(scope, receive, send)
        finally:
            if SCOPE_KEY in scope:
                states.append(disconnect_state(scope).disconnected)

    async def leave(event: anyio.Event) -> None:
        with anyio.fail_after(WAIT):
            await event.wait()
        peer.disconnect()

    escaped: BaseException | None = None
    with structlog.testing.capture_logs() as logs, anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            if leave_after is not None:
                tg.start_soon(leave, leave_after(rec))
            try:
                await wrap(app, mode)(http_scope(), peer.receive, peer.send)
            except BaseException as exc:  # what reaches the server, whatever it is
                escaped = exc
    return Outcome(escaped, peer.sent, rec, logs, states[0] if states else None)


def assert_escaped_as_raised(outcome: Outcome, mode: Mode) -> None:
    """What the app raised last escaped, the same object, the app's frame still in its traceback."""
    raised = outcome.rec.raised[-1]
    assert outcome.escaped is raised, f"{mode}: {outcome.escaped!r} escaped, not the app's {raised!r}"
    assert h.in_traceback(raised, outcome.rec.codes[-1]), f"{mode}: the app's frame left the traceback"


def assert_as_bare(bare: Outcome, wrapped: Outcome, mode: Mode) -> None:
    assert_escaped_as_raised(bare, "bare")  # the control
    assert_escaped_as_raised(wrapped, mode)
    assert type(wrapped.escaped) is type(bare.escaped)
    assert wrapped.sent == bare.sent, f"{mode}: the server got other messages than bare"


# -- 1. the app's own exceptions of every kind -----------------------------------------------------

#: The app's own errors of every kind (tests/hostile_apps.py: ERRORS says why each is there).
ERRORS = h.error_params([*h.OWN_ERRORS, "BaseExceptionGroup"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("after_start", [False, True], ids=["before-start", "after-start"])
@pytest.mark.parametrize("error", ERRORS)
async def test_app_exception_escapes_as_the_same_object(error: h.ErrorFactory, after_start: bool, mode: Mode) -> None:
    """An exception the app raises, before or after its response start, escapes wrapped as bare: the same object."""
    factory = h.raise_after_start(error) if after_start else h.raise_before_start(error)
    bare = await drive(factory, "bare", Peer())
    wrapped = await drive(factory, mode, Peer())
    assert_as_bare(bare, wrapped, mode)
    assert wrapped.logs == []


# -- 2. frameworks whose errors pass through a task group ---------------------------------------------

FRAMEWORKS = [
    # Each error passes through a task group and comes out of Starlette's collapse_excgroups,
    # its __context__ the group that held it.
    pytest.param(h.starlette_streaming_error, id="starlette-StreamingResponse-body-error"),
    pytest.param(h.base_http_middleware_error, id="starlette-BaseHTTPMiddleware-endpoint-error"),
    pytest.param(h.fastapi_yield_dependency_error(http_middleware=True), id="fastapi-yield-dependency-error"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factory", FRAMEWORKS)
async def test_framework_error_escapes_as_the_same_object(factory: h.Factory, mode: Mode) -> None:
    """A Starlette or FastAPI app's error (collapsed out of a task group) escapes wrapped as bare, the same object."""
    bare = await drive(factory, "bare", Peer())
    wrapped = await drive(factory, mode, Peer())
    assert_as_bare(bare, wrapped, mode)


# -- 3. the app's own error after its client left --------------------------------------------------------

#: Errors the departure did not cause: OSErrors of the app's own, a group of them, a BaseException.
LEFT_ERRORS = h.error_params(
    ("FileNotFoundError", "ConnectionRefusedError", "TimeoutError", "ExceptionGroup-of-OSError", "BaseException")
)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("error", LEFT_ERRORS)
async def test_app_error_after_client_left_escapes(error: h.ErrorFactory, mode: Mode) -> None:
    """A handler told of the departure by receive() raises its own error: it escapes wrapped as bare, not absorbed."""
    factory = h.raise_after_client_left(error, reads=True)
    bare = await drive(factory, "bare", Peer(), leave_after=lambda rec: rec.started)
    wrapped = await drive(factory, mode, Peer(), leave_after=lambda rec: rec.started)
    assert [m["type"] for m in wrapped.rec.messages] == [m["type"] for m in bare.rec.messages]
    assert bare.rec.messages[-1] == {"type": "http.disconnect"}  # the control: it was told
    assert_as_bare(bare, wrapped, mode)


# -- 4. a server whose receive() raises ------------------------------------------------------------------


def reads_once(watched: Hostile | None) -> h.Factory:
    """Call receive() once and let its error out; first, wrapped, wait until the watcher read ``watched``."""

    def factory(rec: h.Recorder) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if watched is not None and SCOPE_KEY in scope:  # bare: no watcher, the app reads first
                with anyio.fail_after(WAIT):
                    await watched.receive_called.wait()
            try:
                rec.messages.append(await receive())
            except BaseException as exc:
                rec.keep(exc)
                raise

        return app

    return factory


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("first", ["app", "watcher"], ids=["app-reads-first", "watcher-reads-first"])
async def test_server_receive_error_reaches_the_app(first: str, mode: Mode) -> None:
    """The server's receive() raises: the app's receive() raises that very error, whoever read first."""
    outcomes: dict[Mode, tuple[Outcome, Hostile]] = {}
    for run in ("bare", mode):
        peer = Hostile(receive_raises=True)
        factory = reads_once(peer if first == "watcher" else None)
        outcomes[run] = await drive(factory, run, peer), peer
    for run, (outcome, peer) in outcomes.items():
        assert peer.raised, f"{run}: the server's receive() was never called"
        assert outcome.rec.raised == [peer.raised[0]], f"{run}: the app's receive() raised another error"
        assert outcome.escaped is peer.raised[0]
        assert any(code.co_name == "receive" and code.co_filename == __file__ for code in h.codes_of(peer.raised[0])), (
            f"{run}: the server's frame left the traceback"
        )
    assert outcomes[mode][0].logs == []


# -- 5. a server whose send() raises something other than an OSError --------------------------------------


def sends_response(rec: h.Recorder) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(h.START)
            await anyio.lowlevel.checkpoint()  # suspend: the middleware watches
            await send(h.BODY)
        except BaseException as exc:
            rec.keep(exc)
            raise

    return app


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("on", ["http.response.start", "http.response.body"])
async def test_server_send_error_propagates_and_is_no_disconnect(on: str, mode: Mode) -> None:
    """The server's send() raises a RuntimeError: it escapes unchanged, and no disconnect is recorded or logged."""
    outcomes: dict[Mode, tuple[Outcome, Hostile]] = {}
    for run in ("bare", mode):
        peer = Hostile(send_raises_on=on)
        outcomes[run] = await drive(sends_response, run, peer), peer
    for run, (outcome, peer) in outcomes.items():
        assert outcome.escaped is peer.raised[0], f"{run}: {outcome.escaped!r} escaped, not the server's error"
        assert outcome.rec.raised == [peer.raised[0]]
    wrapped = outcomes[mode][0]
    assert wrapped.sent == outcomes["bare"][0].sent
    assert wrapped.state_disconnected is False
    assert wrapped.logs == [], f"{mode}: logged {wrapped.logs}"


# -- 6. a TimeoutError whose context is a cancellation inside the server's send --------------------------------


#: sse-starlette's SendTimeoutError, in short: a timeout around a send() that never returns.
times_out_sending = h.timeout_around_blocked_send("anyio.fail_after")


@pytest.mark.parametrize("mode", MODES)
async def test_timeout_around_a_blocked_server_send_propagates(mode: Mode) -> None:
    """A TimeoutError whose __context__ is the cancellation inside the server's send() escapes wrapped as bare."""
    bare = await drive(times_out_sending, "bare", Hostile(send_blocks=True))
    context = bare.rec.raised[0].__context__
    assert context is not None and any(
        code.co_name == "send" and code.co_filename == __file__ for code in h.codes_of(context)
    ), "the control: the cancellation should have landed in the server's send()"
    wrapped = await drive(times_out_sending, mode, Hostile(send_blocks=True))
    assert_as_bare(bare, wrapped, mode)
    assert wrapped.logs == [], f"{mode}: logged {wrapped.logs}"
