"""DisconnectMiddleware in observe mode, driven with a hand-made server on asyncio and trio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from asgi_disconnect import (
    SCOPE_KEY,
    ClientDisconnected,
    DisconnectMiddleware,
    DisconnectState,
    disconnect_state,
)
from asgi_disconnect._types import ASGIApp, Message, Receive, Scope, Send
from tests.peer import Peer, http_scope

pytestmark = pytest.mark.anyio

START: Message = {"type": "http.response.start", "status": 200, "headers": []}


def body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


async def wait_until_suspended() -> None:
    """Let the middleware's watcher start: it does once the app has suspended."""
    for _ in range(5):
        await anyio.lowlevel.checkpoint()


# -- pass-through and scope handling ----------------------------------------------


@pytest.mark.parametrize("scope_type", ["lifespan", "websocket"])
async def test_non_http_scopes_pass_through_untouched(scope_type: str) -> None:
    """lifespan and websocket scopes reach the app as the very same objects."""
    seen: list[tuple[Scope, Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send))

    peer = Peer()
    scope: Scope = {"type": scope_type}
    await DisconnectMiddleware(app)(scope, peer.receive, peer.send)
    assert seen == [(scope, peer.receive, peer.send)]
    assert SCOPE_KEY not in scope


async def test_scope_is_copied_and_state_is_shared_by_copies() -> None:
    """The server's scope is not mutated; every copy the app makes holds the same state."""
    states: list[DisconnectState] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        states.append(disconnect_state(scope))
        states.append(disconnect_state(dict(scope)))
        await send(START)
        await send(body(b"ok"))

    peer = Peer()
    scope = http_scope()
    original = dict(scope)
    await DisconnectMiddleware(app)(scope, peer.receive, peer.send)
    assert scope == original
    assert states[0] is states[1]
    assert isinstance(states[0], DisconnectState)
    assert states[0].disconnected is False
    assert states[0].bytes_sent == 2


async def test_nested_instances_share_one_state() -> None:
    """An inner middleware that finds a state in scope passes straight through."""
    seen: list[tuple[DisconnectState, Receive]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((disconnect_state(scope), receive))
        await send(START)
        await send(body(b""))

    inner = DisconnectMiddleware(app)
    outer_seen: list[DisconnectState] = []

    async def between(scope: Scope, receive: Receive, send: Send) -> None:
        outer_seen.append(disconnect_state(scope))
        await inner(scope, receive, send)

    peer = Peer()
    await DisconnectMiddleware(between)(http_scope(), peer.receive, peer.send)
    assert seen[0][0] is outer_seen[0]
    assert seen[0][1] != peer.receive  # the outer instance owns the channel


async def test_disconnect_state_without_middleware_says_how_to_install() -> None:
    """A missing middleware is a LookupError whose message says how to install it."""
    with pytest.raises(LookupError, match=r"app.add_middleware\(DisconnectMiddleware\)"):
        disconnect_state(http_scope())


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_read_ahead", -1), ("grace", -0.5)],
)
async def test_invalid_options_are_rejected(option: str, value: float) -> None:
    """Nonsense options fail at construction with a message naming the option."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("never called")

    options: dict[str, Any] = {option: value}
    with pytest.raises(ValueError, match=option):
        DisconnectMiddleware(app, **options)


# -- the receive channel -------------------------------------------------------------


async def test_body_reaches_the_app_in_order_byte_for_byte() -> None:
    """Every http.request message reaches the app unchanged and in order."""
    chunks = [bytes([i]) * (1000 + i) for i in range(20)]
    received: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            received.append(message)
            await anyio.lowlevel.checkpoint()  # suspends: the watcher is up while the app reads
            if not message.get("more_body"):
                break
        await send(START)
        await send(body(b"done"))

    peer = Peer(chunks)
    await DisconnectMiddleware(app)(http_scope(method="POST"), peer.receive, peer.send)
    assert [m["body"] for m in received] == chunks
    assert [m["more_body"] for m in received] == [True] * 19 + [False]
    assert peer.body == b"done"


async def test_disconnect_seen_while_the_app_never_receives() -> None:
    """A handler that never calls receive() still learns the client left, and when."""
    states: list[DisconnectState] = []
    peer = Peer()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        state = disconnect_state(scope)
        states.append(state)
        with anyio.move_on_after(2) as timeout:
            await state.wait()
        assert not timeout.cancel_called, "wait() should return once the client is gone"

    async with anyio.create_task_group() as tg:
        tg.start_soon(DisconnectMiddleware(app), http_scope(), peer.receive, peer.send)
        await wait_until_suspended()
        assert states[0].disconnected is False
        peer.disconnect()

    state = states[0]
    assert state.disconnected is True
    assert state.phase == "before_response"
    assert state.detected_at is not None and state.detected_at >= state.started_at


async def test_every_receive_after_a_disconnect_returns_disconnect_at_once() -> None:
    """After the disconnect, receive() answers http.disconnect without waiting."""
    peer = Peer([b"a", b"b", b"c"])
    peer.held = True
    replies: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        replies.append(await receive())
        peer.disconnect()
        with anyio.fail_after(1):
            for _ in range(3):
                replies.append(await receive())

    peer.release()
    peer.held = False
    await DisconnectMiddleware(app)(http_scope(method="POST"), peer.receive, peer.send)
    assert replies[0]["body"] == b"a"
    assert [m["type"] for m in replies[1:]] == ["http.disconnect"] * 3


async def test_read_ahead_is_bounded_for_an_app_that_does_not_read() -> None:
    """A running app that does not read has at most max_read_ahead bytes read for it."""
    chunks = [b"x" * 16_384 for _ in range(10)]
    peer = Peer(chunks)
    calls_while_idle: list[int] = []
    received: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(0.05)
        calls_while_idle.append(peer.receive_calls)
        while True:
            message = await receive()
            received.append(message["body"])
            if not message["more_body"]:
                break
        await send(START)
        await send(body(b""))

    await DisconnectMiddleware(app, max_read_ahead=32_768)(http_scope(method="POST"), peer.receive, peer.send)
    assert calls_while_idle == [2]  # 32 KiB: two 16 KiB chunks, and no more
    assert received == chunks  # nothing lost, nothing reordered


async def test_no_read_ahead_when_the_request_expects_100_continue() -> None:
    """With Expect: 100-continue, nothing is read before the app asks for the body."""
    peer = Peer([b"payload"])
    calls: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(0.05)
        calls.append(peer.receive_calls)
        message = await receive()
        calls.append(peer.receive_calls)
        assert message["body"] == b"payload"
        await send(START)
        await send(body(b""))

    headers = [(b"expect", b"100-continue"), (b"content-length", b"7")]
    await DisconnectMiddleware(app)(http_scope(method="POST", headers=headers), peer.receive, peer.send)
    assert calls == [0, 1]


async def test_an_app_that_stops_reading_early_sees_exactly_what_it_read() -> None:
    """A body-size limit that stops after two chunks has exactly two chunks consumed."""
    peer = Peer([b"1" * 100, b"2" * 100, b"3" * 100, b"4" * 100])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        size = 0
        while size < 200:
            size += len((await receive())["body"])
            await anyio.sleep(0.01)
        await anyio.sleep(0.05)  # the app keeps running, about to answer
        await send({"type": "http.response.start", "status": 413, "headers": []})
        await send(body(b"too large"))

    await DisconnectMiddleware(app)(http_scope(method="POST"), peer.receive, peer.send)
    assert peer.receive_calls == 2
    assert peer.sent[0]["status"] == 413


@pytest.mark.parametrize(
    ("http_version", "method"),
    [
        ("1.1", "GET"),
        ("2", "GET"),  # HTTP/2 and 3 send no content-length for a bodiless request
        ("2", "HEAD"),
        ("3", "OPTIONS"),
    ],
)
async def test_bodiless_request_is_watched_even_with_read_ahead_disabled(http_version: str, method: str) -> None:
    """max_read_ahead=0 still watches a bodiless request on every HTTP version: one empty message holds no bytes."""
    peer = Peer()
    states: list[DisconnectState] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        states.append(disconnect_state(scope))
        with anyio.move_on_after(2):
            await disconnect_state(scope).wait()

    scope = http_scope(method=method, http_version=http_version)
    async with anyio.create_task_group() as tg:
        tg.start_soon(DisconnectMiddleware(app, max_read_ahead=0), scope, peer.receive, peer.send)
        await wait_until_suspended()
        peer.disconnect()
    assert states[0].disconnected is True


async def test_read_ahead_disabled_keeps_an_unread_body_unread() -> None:
    """max_read_ahead=0 never reads a body the app did not ask for."""
    peer = Peer([b"abc"])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(0.05)
        await send(START)
        await send(body(b""))

    headers = [(b"content-length", b"3")]
    await DisconnectMiddleware(app, max_read_ahead=0)(
        http_scope(method="POST", headers=headers), peer.receive, peer.send
    )
    assert peer.receive_calls == 0


async def test_app_and_watcher_share_one_read() -> None:
    """When the app calls receive() while the watcher is reading, both see one message."""
    peer = Peer([b"only"])
    peer.held = True
    got: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(0.02)  # the watcher is now blocked in the server's receive()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_append, got, receive)
            await anyio.sleep(0.02)
            peer.release()
        await send(START)
        await send(body(b""))

    await DisconnectMiddleware(app)(
        http_scope(method="POST", headers=[(b"content-length", b"4")]), peer.receive, peer.send
    )
    assert [m["body"] for m in got] == [b"only"]
    assert peer.receive_calls == 2  # the body once, then the watch for http.disconnect


async def _append(into: list[Message], receive: Receive) -> None:
    into.append(await receive())


async def test_server_receive_error_in_the_watcher_reaches_the_app() -> None:
    """If the server's receive() fails while the watcher reads, the app gets that error."""

    class Broken(Exception):
        pass

    async def failing_receive() -> Message:
        raise Broken("transport gone mad")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(0.02)
        await receive()

    with pytest.raises(Broken, match="transport gone mad"):
        await DisconnectMiddleware(app)(http_scope(), failing_receive, Peer().send)


# -- send after a disconnect -----------------------------------------------------------


async def test_send_after_disconnect_raises_and_is_absorbed_and_logged_once() -> None:
    """send() raises ClientDisconnected; the middleware absorbs it and logs one event."""
    peer = Peer()
    raised: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await disconnect_state(scope).wait()
        try:
            await send(START)
        except ClientDisconnected as exc:
            raised.append(exc)
            raise

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(DisconnectMiddleware(app), http_scope(path="/slow"), peer.receive, peer.send)
            await wait_until_suspended()
            peer.disconnect()

    assert len(raised) == 1 and isinstance(raised[0], OSError)
    assert peer.sent == []
    assert len(logs) == 1
    event = logs[0]
    assert event["event"] == "request_aborted"
    assert event["log_level"] == "info"
    assert event["logger"] == "asgi_disconnect"
    assert event["method"] == "GET" and event["path"] == "/slow"
    assert event["phase"] == "before_response"
    assert event["bytes_sent"] == 0 and event["cancelled"] is False
    assert event["detected_after_ms"] >= 0


async def test_mid_body_disconnect_records_phase_and_bytes() -> None:
    """A stream cut mid-body reports phase mid_body and the bytes the server took."""
    peer = Peer()
    states: list[DisconnectState] = []
    sends_after: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        states.append(disconnect_state(scope))
        await send(START)
        for i in range(100):
            try:
                await send(body(b"chunk", more=True))
            except ClientDisconnected:
                sends_after.append(i)
                raise
            if i == 2:
                peer.disconnect()
            await anyio.sleep(0.01)

    with capture_logs() as logs:
        await DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)

    assert states[0].phase == "mid_body"
    assert states[0].bytes_sent == 15
    assert sends_after and sends_after[0] <= 4
    assert [e["phase"] for e in logs] == ["mid_body"]


async def test_server_oserror_from_send_is_recorded_and_absorbed() -> None:
    """An ASGI 2.4 server's own OSError from send() reaches the app; escaping, it is an abort."""
    peer = Peer()
    caught: list[BaseException] = []
    states: list[DisconnectState] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        states.append(disconnect_state(scope))
        await send(START)
        peer.send_error = BrokenPipeError("peer closed")
        try:
            await send(body(b"chunk", more=True))
        except OSError as exc:
            caught.append(exc)
            raise

    with capture_logs() as logs:
        await DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
    assert isinstance(caught[0], BrokenPipeError)
    assert states[0].disconnected is True
    assert [e["phase"] for e in logs] == ["mid_body"]


async def test_starlette_wrapping_a_server_oserror_is_absorbed() -> None:
    """Starlette's 2.4 path re-raises the server's OSError as ClientDisconnect: absorbed too."""
    peer = Peer()
    peer.send_error = ConnectionResetError("reset")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(START)
        except OSError:
            raise ClientDisconnect() from None

    with capture_logs() as logs:
        await DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
    assert [e["event"] for e in logs] == ["request_aborted"]


async def test_an_oserror_that_did_not_come_from_send_propagates() -> None:
    """The app's own OSError while sending normally is not mistaken for the server's."""
    peer = Peer()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        raise ConnectionRefusedError("the app's upstream is down")

    with pytest.raises(ConnectionRefusedError):
        await DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)


def _raise_starlette() -> None:
    raise ClientDisconnect()


def _raise_wrapped() -> None:
    try:
        raise ClientDisconnected("gone")
    except ClientDisconnected as exc:
        raise RuntimeError("framework error") from exc


def _raise_group() -> None:
    raise ExceptionGroup("tasks", [ClientDisconnected("gone"), ClientDisconnect()])


@pytest.mark.parametrize(
    "raiser",
    [
        pytest.param(_raise_starlette, id="starlette-ClientDisconnect"),
        pytest.param(_raise_wrapped, id="wrapped-by-framework"),
        pytest.param(_raise_group, id="exception-group"),
    ],
)
async def test_disconnect_errors_escaping_after_an_abort_are_absorbed(raiser: Any) -> None:
    """Starlette's ClientDisconnect, wrapped errors and groups of them are absorbed."""
    peer = Peer()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await disconnect_state(scope).wait()
        raiser()

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(DisconnectMiddleware(app), http_scope(), peer.receive, peer.send)
            await wait_until_suspended()
            peer.disconnect()
    assert len(logs) == 1


async def test_other_exceptions_propagate_unchanged_even_after_an_abort() -> None:
    """A real bug in the app is never hidden, disconnect or not."""
    peer = Peer()
    error = ValueError("a real bug")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await disconnect_state(scope).wait()
        raise error

    async def disconnect_later() -> None:
        await wait_until_suspended()
        peer.disconnect()

    caught: list[BaseException] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(disconnect_later)
        try:
            await DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
        except ValueError as exc:
            caught.append(exc)
    assert caught == [error]
    assert error.__context__ is None  # no noise from the middleware in the traceback


async def test_app_oserror_without_a_disconnect_propagates() -> None:
    """An OSError of the app's own (a missing file) is not mistaken for a client leaving."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise FileNotFoundError("missing.txt")

    with pytest.raises(FileNotFoundError):
        await DisconnectMiddleware(app)(http_scope(), Peer().receive, Peer().send)


# -- a disconnect after the response is a normal close ------------------------------------


async def _complete_then_disconnect(peer: Peer, messages: list[Message]) -> tuple[DisconnectState, list[str]]:
    states: list[DisconnectState] = []
    after: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        states.append(disconnect_state(scope))
        for message in messages:
            await send(message)
        peer.disconnect()
        after.append((await receive())["type"])
        await anyio.sleep(0.02)  # a background task, still running after the response
        after.append("background done")

    with capture_logs() as logs:
        await DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
    assert logs == []
    return states[0], after


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param([START, body(b"done")], id="body"),
        pytest.param(
            [{**START, "trailers": True}, body(b"done"), {"type": "http.response.trailers", "headers": []}],
            id="trailers",
        ),
        pytest.param([START, {"type": "http.response.pathsend", "path": "/etc/hostname"}], id="pathsend"),
        pytest.param([START, {"type": "http.response.zerocopysend", "file": 0}], id="zerocopysend"),
    ],
)
async def test_disconnect_after_the_response_is_a_normal_close(messages: list[Message]) -> None:
    """Nothing is set, raised or logged when the client leaves after the response."""
    state, after = await _complete_then_disconnect(Peer(), messages)
    assert state.disconnected is False and state.phase is None
    assert after == ["http.disconnect", "background done"]


async def test_trailers_pending_means_the_response_is_not_complete() -> None:
    """A disconnect between the last body chunk and the trailers is an abort."""
    peer = Peer()
    states: list[DisconnectState] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        states.append(disconnect_state(scope))
        await send({**START, "trailers": True})
        await send(body(b"done"))
        peer.disconnect()
        await disconnect_state(scope).wait()
        await send({"type": "http.response.trailers", "headers": []})

    await DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
    assert states[0].phase == "mid_body"
    assert [m["type"] for m in peer.sent] == ["http.response.start", "http.response.body"]


# -- detection is never worse than without the middleware ----------------------------------


async def test_starlette_streaming_response_blocked_generator_still_stops() -> None:
    """A StreamingResponse stuck on a long await is stopped promptly after the client leaves."""
    peer = Peer()
    closed = anyio.Event()

    async def tokens() -> AsyncIterator[bytes]:
        try:
            yield b"first"
            await anyio.sleep(60)
            yield b"never"
        finally:
            closed.set()

    async def endpoint(request: Request) -> StreamingResponse:
        return StreamingResponse(tokens())

    app = Starlette(routes=[Route("/", endpoint)])
    async with anyio.create_task_group() as tg:
        tg.start_soon(DisconnectMiddleware(app), http_scope(), peer.receive, peer.send)
        with anyio.fail_after(2):
            await peer.body_sent.wait()
        peer.disconnect()
        with anyio.move_on_after(1) as timeout:
            await closed.wait()
        assert not timeout.cancel_called, "the generator should be closed promptly"
    assert peer.body == b"first"


# -- the on_disconnect hook ------------------------------------------------------------


async def _abort_with_hook(hook: Any) -> list[MutableMapping[str, Any]]:
    peer = Peer()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await disconnect_state(scope).wait()

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(DisconnectMiddleware(app, on_disconnect=hook), http_scope(), peer.receive, peer.send)
            await wait_until_suspended()
            peer.disconnect()
    return logs


async def test_sync_and_async_hooks_run_once_per_abort() -> None:
    """on_disconnect runs once with the scope and state, sync or async."""
    calls: list[tuple[str, bool]] = []

    def sync_hook(scope: Scope, state: DisconnectState) -> None:
        calls.append(("sync", state.disconnected))

    async def async_hook(scope: Scope, state: DisconnectState) -> None:
        await anyio.lowlevel.checkpoint()
        calls.append(("async", state.disconnected))

    await _abort_with_hook(sync_hook)
    await _abort_with_hook(async_hook)
    assert calls == [("sync", True), ("async", True)]


async def test_a_failing_hook_is_logged_not_raised() -> None:
    """A hook's exception is logged with its traceback and never reaches the server."""

    def hook(scope: Scope, state: DisconnectState) -> None:
        raise RuntimeError("hook bug")

    logs = await _abort_with_hook(hook)
    assert [e["event"] for e in logs] == ["request_aborted", "on_disconnect_hook_failed"]
    assert logs[1]["log_level"] == "error"
    assert logs[1]["exc_info"] is True


async def test_state_reads_well_and_wait_returns_at_once_after_the_disconnect() -> None:
    """A state made by hand (for a user's own tests) waits, wakes, and says what happened."""
    state = DisconnectState(started_at=0.0, cancel=True)
    assert state.cancel is True and repr(state) == "<DisconnectState connected bytes_sent=0>"
    async with anyio.create_task_group() as tg:
        tg.start_soon(state.wait)
        await anyio.lowlevel.checkpoint()
        state._record("mid_body", 1.0)
    with anyio.fail_after(1):
        await state.wait()  # already disconnected: returns at once
    state.cancelled = True
    assert repr(state) == "<DisconnectState disconnected phase=mid_body bytes_sent=0 cancelled>"


# -- how the middleware drives the app (on asyncio it runs the app's first step by hand) --


class _OneStep:
    """An awaitable that is not a coroutine: it suspends once, then returns what it was sent."""

    def __init__(self) -> None:
        self.sent: Any = None

    def __await__(self) -> Any:
        self.sent = yield
        return self.sent


def _app_with_steps(log: list[str], suspend: Any) -> ASGIApp:
    """An app that suspends once at ``suspend()``, answers, and cleans up with an await."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        log.append("start")
        try:
            await suspend()
            log.append("resumed")
            await send(START)
            await send(body(b"ok"))
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.lowlevel.checkpoint()  # cleanup that suspends again
            log.append("finally")

    return app


async def test_an_app_that_answers_without_suspending_is_never_watched() -> None:
    """A plain answer: nothing reads the channel for it, and the response goes out whole."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        await send(body(b"ok"))

    peer = Peer()
    await DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
    await wait_until_suspended()
    assert [m["type"] for m in peer.sent] == ["http.response.start", "http.response.body"]
    assert peer.receive_calls == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_awaitable_that_is_not_a_coroutine_is_awaited() -> None:
    """An ASGI callable may return any awaitable: here a Future that another task resolves."""
    peer = Peer()
    tasks: list[asyncio.Task[None]] = []

    def future_app(scope: Scope, receive: Receive, send: Send) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()

        async def answer() -> None:
            await send(START)
            await send(body(b"ok"))
            future.set_result(None)

        tasks.append(asyncio.ensure_future(answer()))
        return future

    with anyio.fail_after(1):
        await DisconnectMiddleware(future_app)(http_scope(), peer.receive, peer.send)
    assert b"".join(m.get("body", b"") for m in peer.sent) == b"ok"
    assert tasks[0].done()


async def test_a_cancellation_at_the_apps_first_await_reaches_the_app() -> None:
    """Cancelled while waiting at its first await, the app's cleanup runs to its end."""
    log: list[str] = []
    peer = Peer()
    app = DisconnectMiddleware(_app_with_steps(log, anyio.sleep_forever))
    with anyio.move_on_after(0.05) as timer:
        await app(http_scope(), peer.receive, peer.send)
    assert timer.cancelled_caught
    assert log == ["start", "finally"]
    assert peer.sent == []


@pytest.mark.fast_path
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_app_gets_what_the_driver_sends_and_is_closed_with_the_middleware() -> None:
    """Driven by hand inside a task, the app receives exactly the values its driver sends,
    and closing the middleware's coroutine at the app's first await closes the app."""
    log: list[str] = []
    peer = Peer()
    step = _OneStep()
    coro = DisconnectMiddleware(_app_with_steps(log, lambda: step))(http_scope(), peer.receive, peer.send)
    assert coro.send(None) is None  # the app's bare yield reaches the driver
    assert coro.send("from the driver") is None  # the cleanup's checkpoint
    with pytest.raises(StopIteration):
        coro.send(None)
    assert step.sent == "from the driver"
    assert log == ["start", "resumed", "finally"]
    assert b"".join(m.get("body", b"") for m in peer.sent) == b"ok"

    closing: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await _OneStep()
        finally:
            closing.append("finally")

    coro = DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
    coro.send(None)
    coro.close()
    assert closing == ["finally"]


@pytest.mark.fast_path
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_app_that_ends_on_what_its_driver_sends_or_throws_ends_the_middleware() -> None:
    """The app's last step may be a sent value or a thrown error it handles: either way the
    middleware's coroutine ends with it, as the app's own would."""
    peer = Peer()
    log: list[str] = []
    step = _OneStep()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            log.append(await step)
        except ValueError as exc:
            log.append(f"handled {exc}")

    coro = DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
    coro.send(None)
    with pytest.raises(StopIteration):
        coro.send("sent")
    coro = DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
    coro.send(None)
    with pytest.raises(StopIteration):
        coro.throw(ValueError("thrown"))
    assert log == ["sent", "handled thrown"]
