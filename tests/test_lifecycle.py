"""The request's lifecycle as the app and its users see it: what a kept state holds, what
happens to calls made after the app returned, and guard_stream on a state made by hand."""

from __future__ import annotations

import asyncio
import gc
import types
import weakref
from collections.abc import AsyncIterator, Generator, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asgi_disconnect import DisconnectMiddleware, DisconnectState, disconnect_state, guard_stream
from asgi_disconnect._types import Message, Receive, Scope, Send

from .peer import Peer, http_scope

pytestmark = pytest.mark.anyio

START: Message = {"type": "http.response.start", "status": 200, "headers": []}


class Server:
    """The server's receive and send as callable objects, so that weak references reach them."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    async def receive(self) -> Message:
        return await self.peer.receive()

    async def send(self, message: Message) -> None:
        await self.peer.send(message)


def assert_released(refs: Sequence[weakref.ref[Any]]) -> None:
    """Once the test's own references are gone, nothing keeps these objects alive: a kept state holds none."""
    gc.collect()
    alive = [ref() for ref in refs if ref() is not None]
    assert alive == [], f"the kept state still reaches {alive}"


class App:
    """An app that keeps its request's state, reads its body, suspends and answers."""

    def __init__(self, kept: list[DisconnectState], *, suspend: bool, leave: Peer | None = None) -> None:
        self.kept = kept
        self.suspend = suspend
        self.leave = leave

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.kept.append(disconnect_state(scope))
        if self.suspend:
            await receive()
            await anyio.sleep(0.01)
        if self.leave is not None:
            self.leave.disconnect()
            await disconnect_state(scope).wait()
        await send(START)
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize(
    ("suspend", "leaves"),
    [
        (False, False),  # the plain path: answered without suspending
        (True, False),  # watched, then complete
        (True, True),  # aborted: the departure recorded, the send refused
    ],
)
async def test_a_state_kept_after_its_request_holds_nothing_of_it(suspend: bool, leaves: bool) -> None:
    """After the request, the state keeps its figures but not the server's callables, the app or the middleware."""
    peer = Peer()
    server = Server(peer)
    kept: list[DisconnectState] = []
    app = App(kept, suspend=suspend, leave=peer if leaves else None)
    middleware = DisconnectMiddleware(app, cancel=leaves)
    await middleware(http_scope(), server.receive, server.send)
    for _ in range(5):
        await anyio.lowlevel.checkpoint()  # what the request left running ends
    refs = [weakref.ref(obj) for obj in (server, app, middleware)]
    del server, app, middleware
    assert_released(refs)
    state = kept[0]
    assert state.disconnected is leaves
    assert state.bytes_sent == (0 if leaves else 2)


async def test_send_and_receive_after_the_app_returned_raise_a_clear_error() -> None:
    """An app that calls send() or receive() after it returned gets a RuntimeError that says so."""
    saved: list[tuple[Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        saved.append((receive, send))
        await send(START)
        await send({"type": "http.response.body", "body": b"ok"})

    peer = Peer()
    await DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
    receive, send = saved[0]
    with pytest.raises(RuntimeError, match="send\\(\\) called after the application returned"):
        await send({"type": "http.response.body", "body": b"late"})
    with pytest.raises(RuntimeError, match="receive\\(\\) called after the application returned"):
        await receive()
    assert peer.body == b"ok"


async def test_guard_stream_on_a_state_made_by_hand_passes_the_body_through() -> None:
    """With no middleware behind the state, guard_stream yields the body, closes it, and sends no heartbeat."""
    closed: list[str] = []

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"a"
            await anyio.sleep(0.05)  # longer than the heartbeat: nothing to send it to
            yield b"b"
        finally:
            closed.append("closed")

    state = DisconnectState(started_at=0.0)
    scope = {"asgi_disconnect": state}
    chunks = [chunk async for chunk in guard_stream(body(), scope, heartbeat=0.01)]
    assert chunks == [b"a", b"b"]
    assert closed == ["closed"]


async def test_guard_stream_on_a_state_made_by_hand_stops_when_it_is_marked() -> None:
    """A state made by hand that records a departure interrupts the body's wait, and the body is closed."""
    closed: list[str] = []

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"a"
            await anyio.sleep_forever()
            yield b"never"
        finally:
            closed.append("closed")

    state = DisconnectState(started_at=0.0)
    stream = guard_stream(body(), {"asgi_disconnect": state})
    chunks: list[bytes] = []
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:

            async def consume() -> None:
                async for chunk in stream:
                    chunks.append(chunk)

            tg.start_soon(consume)
            await anyio.sleep(0.02)
            state._record("mid_body", 1.0)
    assert chunks == [b"a"]
    assert closed == ["closed"]


class RefusingServer(Server):
    """An ASGI 2.4 server whose client left unseen: its send() raises, its receive() never says so."""

    async def receive(self) -> Message:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(self, message: Message) -> None:
        raise ConnectionResetError("the client went away")


async def test_a_state_kept_after_a_refused_send_holds_nothing_of_the_server() -> None:
    """The server's refusal is recorded, and neither its error nor the response start stays on the state."""
    server = RefusingServer(Peer())
    kept: list[DisconnectState] = []
    app = App(kept, suspend=False)
    middleware = DisconnectMiddleware(app)
    scope = http_scope()
    scope["asgi"] = {"version": "3.0", "spec_version": "2.4"}
    await middleware(scope, server.receive, server.send)
    refs = [weakref.ref(obj) for obj in (server, app, middleware)]
    del server, app, middleware
    assert_released(refs)
    state = kept[0]
    assert state.disconnected and state.phase == "before_response"


class FinalRefusingServer(Server):
    """An ASGI 2.4 server that takes the response start and refuses its final body."""

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body":
            raise ConnectionResetError("the client went away")
        await self.peer.send(message)


async def test_cleanup_after_a_refused_final_message_is_never_cancelled() -> None:
    """Cancel mode: a server that refuses the last body records the departure, and the app's cleanup runs to its end."""
    log: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        try:
            await send({"type": "http.response.body", "body": b"ok"})
        except OSError:
            log.append("refused")
        await anyio.sleep(0.05)  # cleanup that awaits, longer than the grace period
        log.append("cleanup done")

    server = FinalRefusingServer(Peer())
    scope = http_scope()
    scope["asgi"] = {"version": "3.0", "spec_version": "2.4"}
    kept: list[DisconnectState] = []

    async def keeping(scope: Scope, receive: Receive, send: Send) -> None:
        kept.append(disconnect_state(scope))
        await app(scope, receive, send)

    with anyio.fail_after(2):
        await DisconnectMiddleware(keeping, cancel=True)(scope, server.receive, server.send)
    assert log == ["refused", "cleanup done"]
    assert kept[0].disconnected and kept[0].phase == "mid_body"
    assert not kept[0].cancelled


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_generator_based_coroutine_is_awaited() -> None:
    """An ASGI callable may return a ``types.coroutine`` generator: it is awaited as any awaitable."""
    peer = Peer()

    @types.coroutine
    def answer(send: Send) -> Generator[Any, Any, None]:
        yield  # a bare suspension, as asyncio.sleep(0)
        yield from send(START).__await__()
        yield from send({"type": "http.response.body", "body": b"ok"}).__await__()

    def app(scope: Scope, receive: Receive, send: Send) -> Any:
        return answer(send)

    with anyio.fail_after(1):
        await DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
    assert peer.body == b"ok"


@pytest.mark.fast_path
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_heartbeats_of_an_abandoned_stream_end_with_the_request() -> None:
    """A guarded stream the app left unclosed stops its heartbeats when the request ends, even by close()."""
    peer = Peer()

    async def ticks() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        stream = guard_stream(ticks(), scope, heartbeat=0.01)
        await send({"type": "http.response.body", "body": await anext(stream), "more_body": True})
        await anyio.sleep_forever()  # the stream is abandoned, never closed

    coro = DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
    coro.send(None)  # the app sleeps; its stream's heartbeats are running
    coro.close()

    def beating() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if "_heartbeats" in repr(t.get_coro()) and not t.done()]

    await anyio.sleep(0.05)  # a few heartbeat periods
    assert beating() == []


class StallingServer(Server):
    """A server whose client stopped reading: every body send blocks."""

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body":
            await anyio.sleep_forever()
        await self.peer.send(message)


async def test_a_stalled_send_of_an_app_that_listens_counts_nothing() -> None:
    """A send that was never counted (the app was told of the departure) is not taken off bytes_sent when it stalls."""
    peer = Peer()
    server = StallingServer(peer)
    kept: list[DisconnectState] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kept.append(disconnect_state(scope))
        await receive()  # the body
        peer.disconnect()
        assert (await receive())["type"] == "http.disconnect"  # told: it handles the departure itself
        await send(START)
        with pytest.raises(OSError):
            await send({"type": "http.response.body", "body": b"late"})

    with anyio.fail_after(2):
        await DisconnectMiddleware(app, send_timeout=0.05)(http_scope(), server.receive, server.send)
    assert kept[0].disconnected
    assert kept[0].bytes_sent == 0
