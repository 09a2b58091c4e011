"""The middleware does no harm: what the app raises, what it receives and what it sends
stay as they are without it. Driven in process with a hand-made server, asyncio and trio.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from asgi_disconnect import ClientDisconnected, DisconnectMiddleware, DisconnectState, disconnect_state
from asgi_disconnect._types import ASGIApp, Message, Receive, Scope, Send
from tests.peer import Peer, http_scope

pytestmark = pytest.mark.anyio

START: Message = {"type": "http.response.start", "status": 200, "headers": []}


class AppError(ValueError):
    """The user's own error."""


class Fatal(BaseException):
    """A BaseException that is not an Exception (KeyboardInterrupt-like)."""


async def settle() -> None:
    """A few loop iterations: the watcher starts once the app has suspended."""
    for _ in range(5):
        await anyio.lowlevel.checkpoint()


async def raised_by(app: ASGIApp, peer: Peer, scope: Scope | None = None, **options: Any) -> BaseException | None:
    """Run ``app`` behind the middleware; return what escaped it (None if nothing)."""
    try:
        await DisconnectMiddleware(app, **options)(scope or http_scope(), peer.receive, peer.send)
    except BaseException as exc:
        return exc
    return None


# -- what the app raises propagates, the same object -----------------------------------


def streaming_app(error: BaseException) -> ASGIApp:
    async def numbers() -> AsyncIterator[bytes]:
        yield b"1"
        raise error

    async def endpoint(request: Request) -> Response:
        return StreamingResponse(numbers())

    return Starlette(routes=[Route("/", endpoint)])


def base_http_middleware_app(error: BaseException) -> ASGIApp:
    async def endpoint(request: Request) -> Response:
        raise error

    class Passthrough(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            return await call_next(request)

    return Starlette(routes=[Route("/", endpoint)], middleware=[Middleware(Passthrough)])


def yield_dependency_app(error: BaseException) -> ASGIApp:
    app = FastAPI()

    async def session() -> AsyncIterator[str]:
        yield "session"
        raise error

    @app.get("/")
    async def endpoint(db: str = Depends(session)) -> str:
        return db

    return app


@pytest.mark.parametrize(
    "make",
    [
        streaming_app,  # the stream's error passes through Starlette's collapse_excgroups
        base_http_middleware_app,  # call_next's task group re-raises the endpoint's error
        yield_dependency_app,  # FastAPI's exit stack around a yield dependency
    ],
)
async def test_an_error_through_a_task_group_reaches_the_server_unchanged(make: Any) -> None:
    """The user's ValueError escapes as the same object, not as a RecursionError."""
    error = AppError("the user's bug")
    escaped = await raised_by(make(error), Peer())
    assert escaped is error
    assert escaped.__traceback__ is not None


async def test_a_looping_exception_chain_is_walked_safely_after_a_disconnect() -> None:
    """A chain that contains itself (raise eg.exceptions[0] in except*) is not a disconnect."""
    peer = Peer()
    error = AppError("inside a group")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        peer.disconnect()
        await disconnect_state(scope).wait()
        try:
            raise ExceptionGroup("group", [error])
        except ExceptionGroup as group:
            raise group.exceptions[0]  # noqa: B904 - the pattern under test

    assert await raised_by(app, peer) is error
    assert isinstance(error.__context__, ExceptionGroup) and error in error.__context__.exceptions


async def test_a_base_exception_is_not_wrapped_in_a_group() -> None:
    """A BaseException that is not an Exception escapes as itself, also on trio."""
    fatal = Fatal("stop")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.lowlevel.checkpoint()
        raise fatal

    with pytest.raises(Fatal) as caught:
        await DisconnectMiddleware(app)(http_scope(), Peer().receive, Peer().send)
    assert caught.value is fatal


def own_os_errors() -> list[OSError]:
    return [
        FileNotFoundError(errno.ENOENT, "No such file or directory", "/srv/report.pdf"),
        ConnectionRefusedError(errno.ECONNREFUSED, "database refused the connection"),
        TimeoutError("upstream took too long"),
    ]


@pytest.mark.parametrize("error", own_os_errors(), ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("cancel", [False, True], ids=["observe", "cancel"])
async def test_the_apps_own_os_error_propagates_after_the_client_left(error: OSError, cancel: bool) -> None:
    """An OSError the app raised itself is not absorbed as a disconnect, even after one."""
    peer = Peer()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        state = disconnect_state(scope)
        state.cancel = False  # the handler runs on, as one in a shield() would
        peer.disconnect()
        await state.wait()
        raise error

    with capture_logs() as logs:
        assert await raised_by(app, peer, cancel=cancel) is error
    assert [log["event"] for log in logs] == ["request_aborted"]  # the abort is still reported


async def test_an_own_os_error_raised_while_handling_a_disconnect_propagates() -> None:
    """A FileNotFoundError raised in ``except ClientDisconnected`` is the app's, not the departure's."""
    peer = Peer()
    error = FileNotFoundError("/var/spool/partial")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        peer.disconnect()
        await disconnect_state(scope).wait()
        try:
            await send(START)
        except ClientDisconnected:
            raise error  # noqa: B904 - its __context__ is the disconnect, on purpose

    assert await raised_by(app, peer) is error


async def test_a_timeout_whose_context_is_a_cancelled_server_send_propagates() -> None:
    """sse-starlette's SendTimeoutError: a TimeoutError around a stuck send() is the app's own."""
    blocked = anyio.Event()

    class StuckPeer(Peer):
        async def send(self, message: Message) -> None:
            blocked.set()
            await anyio.sleep_forever()

    peer = StuckPeer()
    error = TimeoutError("send timed out")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with anyio.fail_after(0.02):
                await send(START)
        except TimeoutError as exc:
            peer.disconnect()
            await disconnect_state(scope).wait()
            raise error from exc.__context__

    assert await raised_by(app, peer) is error


async def test_our_client_disconnected_and_starlettes_client_disconnect_are_absorbed() -> None:
    """What the departure caused still ends quietly: no traceback for a client that left."""
    peer = Peer()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        peer.disconnect()
        await disconnect_state(scope).wait()
        await send(START)

    with capture_logs() as logs:
        assert await raised_by(app, peer) is None
    assert [log["event"] for log in logs] == ["request_aborted"]


async def test_a_server_os_error_from_send_is_absorbed_and_recorded() -> None:
    """An ASGI 2.4 server's own OSError from send() is the departure: absorbed, recorded, nothing counted."""
    peer = Peer()
    peer.send_error = BrokenPipeError(errno.EPIPE, "Broken pipe")
    states: list[DisconnectState] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        states.append(disconnect_state(scope))
        await send(START)

    assert await raised_by(app, peer, http_scope(asgi={"version": "3.0", "spec_version": "2.4"})) is None
    assert states[0].disconnected and states[0].phase == "before_response"


async def test_an_os_error_that_only_passed_near_the_servers_send_propagates() -> None:
    """An OSError raised by the app whose context is the server's send error is the app's."""
    peer = Peer()
    peer.send_error = BrokenPipeError(errno.EPIPE, "Broken pipe")
    error = PermissionError("cannot write the audit log")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(START)
        except OSError:
            raise error  # noqa: B904

    assert await raised_by(app, peer) is error


# -- every message reaches the app, in order -------------------------------------------


async def test_unknown_messages_read_ahead_reach_the_app_in_order() -> None:
    """Messages of a type the middleware does not know are kept for the app, in order."""
    sequence: list[Message] = [
        {"type": "http.request", "body": b"a", "more_body": True},
        {"type": "x.custom", "n": 1},
        {"type": "http.request", "body": b"b", "more_body": False},
        {"type": "x.custom", "n": 2},
    ]
    delivered = list(sequence)
    gone = anyio.Event()

    async def receive() -> Message:
        if delivered:
            return delivered.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    got: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(0.05)  # busy: the watcher reads everything ahead meanwhile
        for _ in range(len(sequence)):
            got.append(await receive())
        await send(START)
        await send({"type": "http.response.body", "body": b""})

    await DisconnectMiddleware(app)(http_scope(method="POST"), receive, Peer().send)
    assert got == sequence


async def test_body_read_ahead_comes_before_the_disconnect() -> None:
    """Chunks the watcher read before the client left still reach the app, then the disconnect."""
    peer = Peer([b"x" * 10, b"y" * 10])
    peer.held = False
    got: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        state = disconnect_state(scope)
        await settle()
        peer.disconnect()
        await state.wait()
        with anyio.fail_after(1):
            for _ in range(4):
                got.append(await receive())

    await DisconnectMiddleware(app)(http_scope(method="POST"), peer.receive, peer.send)
    assert [m.get("body") for m in got[:2]] == [b"x" * 10, b"y" * 10]
    assert [m["type"] for m in got[2:]] == ["http.disconnect"] * 2


async def test_an_http2_post_without_length_is_not_read_ahead_with_read_ahead_disabled() -> None:
    """An HTTP/2 POST may stream a body without content-length: with max_read_ahead=0 it stays unread."""
    peer = Peer([b"upload"])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(0.05)
        await send(START)
        await send({"type": "http.response.body", "body": b""})

    await DisconnectMiddleware(app, max_read_ahead=0)(
        http_scope(method="POST", http_version="2"), peer.receive, peer.send
    )
    assert peer.receive_calls == 0


# -- an app that hears the disconnect itself keeps its own lifecycle -------------------


async def test_an_app_waiting_in_receive_sends_as_without_the_middleware() -> None:
    """A listener in receive() is told; the app's sends then meet the server, not an error."""
    peer = Peer()
    outcome: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the (empty) body

        async def listen() -> None:
            assert (await receive())["type"] == "http.disconnect"
            outcome.append("told")

        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            await settle()
            peer.disconnect()
            await disconnect_state(scope).wait()
            await send(START)  # the listener has not run yet: it is waiting in receive()
            await send({"type": "http.response.body", "body": b"late"})
            outcome.append("sent")

    assert await raised_by(app, peer) is None
    assert sorted(outcome) == ["sent", "told"]
    assert [m["type"] for m in peer.sent] == ["http.response.start", "http.response.body"]


async def test_an_app_told_through_receive_is_not_cancelled() -> None:
    """Cancel mode leaves an app that received http.disconnect to stop by itself."""
    peer = Peer()
    finished: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        peer.disconnect()
        assert (await receive())["type"] == "http.disconnect"
        await anyio.sleep(0.02)  # its own cleanup
        finished.append("cleanup")

    await DisconnectMiddleware(app, cancel=True)(http_scope(), peer.receive, peer.send)
    assert finished == ["cleanup"]


async def test_cancel_mode_waits_for_an_app_about_to_listen() -> None:
    """An app that read its body and listens soon after is told, not cancelled (Django's pattern)."""
    peer = Peer()
    lifecycle: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the whole body
        lifecycle.append("started")
        peer.disconnect()
        await disconnect_state(scope).wait()
        await anyio.sleep(0.02)  # request_started receivers, building the request
        message = await receive()  # the framework's own disconnect listener
        lifecycle.append(f"finished after {message['type']}")

    await DisconnectMiddleware(app, cancel=True)(http_scope(), peer.receive, peer.send)
    assert lifecycle == ["started", "finished after http.disconnect"]


async def test_cancel_mode_still_cancels_an_app_that_read_its_body_and_never_listens() -> None:
    """A handler that read its body and then only works is cancelled once the listen window passes."""
    peer = Peer()
    states: list[DisconnectState] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        states.append(disconnect_state(scope))
        await receive()
        peer.disconnect()
        await anyio.sleep(5)  # an upstream call that would keep running

    with anyio.fail_after(2):
        await DisconnectMiddleware(app, cancel=True)(http_scope(method="POST"), peer.receive, peer.send)
    assert states[0].cancelled is True


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # Task.cancel() is asyncio's
async def test_asyncio_task_cancellation_by_others_still_propagates() -> None:
    """A cancellation that is not ours (the server shutting down) escapes the middleware."""
    peer = Peer()
    entered = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        entered.set()
        await anyio.sleep(5)

    task = asyncio.ensure_future(DisconnectMiddleware(app, cancel=True)(http_scope(), peer.receive, peer.send))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_plain_response_is_unchanged() -> None:
    """A Starlette response passes through byte for byte."""
    peer = Peer()

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("hello")

    assert await raised_by(Starlette(routes=[Route("/", endpoint)]), peer) is None
    assert peer.sent[0]["status"] == 200 and peer.body == b"hello"


async def test_an_app_that_cancels_its_caller_still_has_its_error_escape() -> None:
    """The app cancels a scope around the request, then raises: its error escapes, as bare."""
    error = RuntimeError("cleanup failed")

    with pytest.raises(RuntimeError) as caught:
        with anyio.CancelScope() as outer:

            async def app(scope: Scope, receive: Receive, send: Send) -> None:
                await settle()  # the watcher waits in the server's receive()
                outer.cancel()
                raise error

            await DisconnectMiddleware(app)(http_scope(), Peer().receive, Peer().send)
    assert caught.value is error


async def test_an_app_that_cancels_its_caller_and_answers_keeps_its_response() -> None:
    """The app cancels a scope around the request and answers without a checkpoint: the response stands."""
    peer = Peer()
    returned: list[str] = []

    with anyio.CancelScope() as outer:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await settle()
            outer.cancel()
            await send(START)
            await send({"type": "http.response.body", "body": b"done"})

        await DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
        returned.append("returned")
    assert returned == ["returned"]
    assert peer.body == b"done"


async def test_a_refused_send_on_a_2_4_server_is_recorded_even_if_the_app_goes_on() -> None:
    """A 2.4 server's send() raises and the app swallows it: the abort is still recorded, nothing counted."""
    peer = Peer()
    states: list[DisconnectState] = []
    scope = http_scope(asgi={"version": "3.0", "spec_version": "2.4"})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        states.append(disconnect_state(scope))
        await send(START)
        peer.send_error = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        try:
            await send({"type": "http.response.body", "body": b"lost", "more_body": True})
        except OSError:
            pass  # a 2.4-aware app that simply stops

    with capture_logs() as logs:
        assert await raised_by(app, peer, scope) is None
    state = states[0]
    assert (state.disconnected, state.phase, state.bytes_sent) == (True, "mid_body", 0)
    assert [log["event"] for log in logs] == ["request_aborted"]


async def test_a_server_send_that_is_a_callable_object_is_recognised() -> None:
    """A server (or outer middleware) whose send is an object with async __call__: its OSError is the departure."""

    class ServerSend:
        async def __call__(self, message: Message) -> None:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    states: list[DisconnectState] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        states.append(disconnect_state(scope))
        await send(START)

    await DisconnectMiddleware(app)(http_scope(), Peer().receive, ServerSend())
    assert states[0].disconnected is True


async def test_a_refused_send_of_a_server_send_without_code_is_absorbed() -> None:
    """A 2.4 server whose send is a functools.partial: its error is still recognised, by identity."""
    import functools

    async def server_send(message: Message, *, error: OSError) -> None:
        raise error

    error = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    send = functools.partial(server_send, error=error)
    scope = http_scope(asgi={"version": "3.0", "spec_version": "2.4"})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)

    await DisconnectMiddleware(app)(scope, Peer().receive, send)


async def test_the_send_wrapper_is_chosen_from_a_request_that_names_its_spec() -> None:
    """A first scope without spec_version (a test transport) does not fix the wrapper for a 2.4 server."""
    states: list[DisconnectState] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        states.append(disconnect_state(scope))
        await send(START)
        try:
            await send({"type": "http.response.body", "body": b"x" * 100, "more_body": True})
        except OSError:
            pass

    wrapped = DisconnectMiddleware(app)
    await wrapped(http_scope(asgi={"version": "3.0"}), Peer().receive, Peer().send)

    class Refusing(Peer):
        async def send(self, message: Message) -> None:
            if message["type"] == "http.response.body":
                raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    peer = Refusing()
    await wrapped(http_scope(asgi={"version": "3.0", "spec_version": "2.4"}), peer.receive, peer.send)
    assert (states[1].disconnected, states[1].bytes_sent) == (True, 0)
