"""guard_stream and stalled clients, driven with a hand-made server on asyncio and trio."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from asgi_disconnect import ClientDisconnected, DisconnectMiddleware, DisconnectState, disconnect_state, guard_stream
from asgi_disconnect._types import Message, Receive, Scope, Send
from tests.peer import Peer, abort_after, http_scope

pytestmark = pytest.mark.anyio

START: Message = {"type": "http.response.start", "status": 200, "headers": []}


def chunk(data: bytes, more: bool = True) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


class Source:
    """A body that records what it produced, where it was closed, and when."""

    def __init__(self, tokens: int = 1000, every: float = 0.01, stall_after: int | None = None) -> None:
        self.tokens, self.every, self.stall_after = tokens, every, stall_after
        self.produced: list[float] = []
        self.started = False
        self.closed_in: object = None
        self.closed_at: float | None = None

    async def __call__(self) -> AsyncIterator[bytes]:
        self.started = True
        try:
            for i in range(self.tokens):
                if self.stall_after is not None and i == self.stall_after:
                    await anyio.sleep(30)  # an upstream that stopped answering
                self.produced.append(time.monotonic())
                yield f"token {i}\n".encode()
                await anyio.sleep(self.every)
        finally:
            self.closed_in = anyio.get_current_task().id
            self.closed_at = time.monotonic()


def raw_app(source: Source, iterated_in: list[object]) -> DisconnectMiddleware:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        iterated_in.append(anyio.get_current_task().id)
        await send({**START, "headers": [(b"content-type", b"text/event-stream")]})
        async for data in guard_stream(source(), scope):
            await send(chunk(data))
        await send(chunk(b"", more=False))

    return DisconnectMiddleware(app)


@pytest.mark.parametrize("stall_after", [None, 3], ids=["producing", "stalled-upstream"])
async def test_stream_stops_and_closes_its_source_in_the_iterating_task(stall_after: int | None) -> None:
    """The source's finally runs in the task that iterated it, before the app returns."""
    source = Source(stall_after=stall_after)
    iterated_in: list[object] = []
    peer = Peer()
    with capture_logs() as logs:
        await abort_after(raw_app(source, iterated_in), peer, delay=0.1)
    assert source.closed_in == iterated_in[0]
    assert source.closed_at is not None
    assert [e["phase"] for e in logs] == ["mid_body"]


async def test_no_chunk_produced_after_detection_reaches_the_client() -> None:
    """At most one token is produced after the disconnect is detected, and none is sent."""
    source = Source(every=0.005)
    states: list[DisconnectState] = []
    peer = Peer()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        states.append(disconnect_state(scope))
        await send(START)
        async for data in guard_stream(source(), scope):
            await send(chunk(data))

    await abort_after(DisconnectMiddleware(app), peer, delay=0.1)
    detected = states[0].detected_at
    assert detected is not None
    assert len([t for t in source.produced if t > detected]) <= 1
    sent = [m for m in peer.sent if m.get("body")]
    assert len(sent) <= len([t for t in source.produced if t <= detected])


async def test_disconnect_before_the_body_starts_never_enters_it() -> None:
    """A client gone before the first chunk: the body is closed without ever running."""
    source = Source()
    peer = Peer()
    peer.disconnect()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await disconnect_state(scope).wait()
        async for _ in guard_stream(source(), scope):
            raise AssertionError("no chunk after the client left")  # pragma: no cover

    await DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
    assert source.started is False


async def test_source_abandoned_by_a_failing_send_is_closed_before_the_app_ends() -> None:
    """An app whose send raises mid-iteration still gets the source closed in its own task."""
    source = Source(every=0.02)
    iterated_in: list[object] = []
    order: list[str] = []
    peer = Peer()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        iterated_in.append(anyio.get_current_task().id)
        await send(START)
        stream = guard_stream(source(), scope)
        try:
            async for data in stream:
                if len(source.produced) == 3:
                    await disconnect_state(scope).wait()  # the client leaves while we hold a chunk
                await send(chunk(data))  # raises once the client is gone
        except ClientDisconnected:
            order.append(f"send raised, source closed: {source.closed_at is not None}")
            raise

    async def leave() -> None:
        for _ in range(200):  # at most 2 s
            if len(source.produced) >= 3:
                break
            await anyio.sleep(0.01)
        peer.disconnect()

    async with anyio.create_task_group() as tg:
        tg.start_soon(leave)
        await DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
    assert order == ["send raised, source closed: True"]
    assert source.closed_in == iterated_in[0]


async def test_body_errors_propagate_and_the_source_is_closed() -> None:
    """An error of the body's own is not swallowed; the body is closed all the same."""
    closed: list[bool] = []

    async def failing() -> AsyncIterator[bytes]:
        try:
            yield b"one"
            raise RuntimeError("upstream said 500")
        finally:
            closed.append(True)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        async for data in guard_stream(failing(), scope):
            await send(chunk(data))

    with pytest.raises(RuntimeError, match="upstream said 500"):
        await DisconnectMiddleware(app)(http_scope(), Peer().receive, Peer().send)
    assert closed == [True]


async def test_a_complete_stream_ends_normally() -> None:
    """Without a disconnect every chunk arrives, in order, and the source is closed."""
    source = Source(tokens=5, every=0)
    peer = Peer()
    await raw_app(source, [])(http_scope(), peer.receive, peer.send)
    assert peer.body == b"".join(f"token {i}\n".encode() for i in range(5))
    assert source.closed_at is not None


async def test_heartbeats_fill_an_idle_stream() -> None:
    """With heartbeat set, ping frames are sent while the source is idle, between real chunks."""
    peer = Peer()

    async def slow() -> AsyncIterator[bytes]:
        await anyio.sleep(0.35)
        yield b"data: late\n\n"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        async for data in guard_stream(slow(), scope, heartbeat=0.1):
            await send(chunk(data))
        await send(chunk(b"", more=False))

    await DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
    bodies = [m["body"] for m in peer.sent if m["type"] == "http.response.body" and m["body"]]
    assert bodies[-1] == b"data: late\n\n"
    assert 2 <= bodies.count(b": ping\n\n") <= 4
    assert set(bodies[:-1]) == {b": ping\n\n"}


async def test_no_heartbeat_into_a_content_length_response() -> None:
    """A response framed by Content-Length never gets extra heartbeat bytes."""
    peer = Peer()

    async def slow() -> AsyncIterator[bytes]:
        await anyio.sleep(0.25)
        yield b"12345"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({**START, "headers": [(b"content-length", b"5")]})
        async for data in guard_stream(slow(), scope, heartbeat=0.05):
            await send(chunk(data))
        await send(chunk(b"", more=False))

    await DisconnectMiddleware(app)(http_scope(), peer.receive, peer.send)
    assert peer.body == b"12345"


async def test_guard_stream_needs_the_middleware_and_a_positive_heartbeat() -> None:
    """Misuse fails at once with a message that says what to do."""

    async def empty() -> AsyncIterator[bytes]:
        yield b""  # pragma: no cover

    with pytest.raises(LookupError, match="install DisconnectMiddleware"):
        guard_stream(empty(), http_scope())
    with pytest.raises(ValueError, match="heartbeat"):
        guard_stream(empty(), {**http_scope(), "asgi_disconnect": DisconnectState(0.0)}, heartbeat=0)


async def test_starlette_streaming_response_with_a_stalled_upstream() -> None:
    """Inside Starlette's StreamingResponse, a source stuck upstream is closed promptly."""
    source = Source(stall_after=2)
    peer = Peer()

    async def endpoint(request: Request) -> StreamingResponse:
        return StreamingResponse(guard_stream(source(), request.scope))

    app = DisconnectMiddleware(Starlette(routes=[Route("/", endpoint)]))
    started = time.monotonic()
    await abort_after(app, peer, delay=0.1)
    assert source.closed_at is not None and source.closed_at - started < 1


# -- stalled clients -----------------------------------------------------------------


async def test_a_client_that_stops_reading_is_treated_as_gone() -> None:
    """A send blocked longer than send_timeout raises ClientDisconnected, phase 'stalled'."""
    states: list[DisconnectState] = []
    raised: list[BaseException] = []
    sends = 0

    async def stuck_send(message: Message) -> None:
        nonlocal sends
        sends += 1
        if sends == 3:
            await anyio.sleep(30)  # the peer stopped reading: the socket buffer is full

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        states.append(disconnect_state(scope))
        await send(START)
        try:
            for _ in range(10):
                await send(chunk(b"x" * 65536))
        except ClientDisconnected as exc:
            raised.append(exc)
            raise

    started = time.monotonic()
    with capture_logs() as logs:
        await DisconnectMiddleware(app, send_timeout=0.2)(http_scope(), Peer().receive, stuck_send)
    assert 0.15 < time.monotonic() - started < 2
    assert states[0].phase == "stalled" and "stalled" in str(raised[0])
    assert [e["phase"] for e in logs] == ["stalled"]


async def test_send_timeout_must_be_positive() -> None:
    """A zero or negative send_timeout is refused at construction."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("never called")  # pragma: no cover

    with pytest.raises(ValueError, match="send_timeout"):
        DisconnectMiddleware(app, send_timeout=0)
