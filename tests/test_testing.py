"""asgi_disconnect.testing: simulate() and its departure points, on asyncio and trio."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
import pytest
import sniffio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from asgi_disconnect import DisconnectMiddleware
from asgi_disconnect._types import ASGIApp, Receive, Scope, Send
from asgi_disconnect.testing import Departure, Outcome, leave, simulate

pytestmark = pytest.mark.anyio

CHUNK = b"0123456789"  # every streamed chunk: 10 bytes
EVERY = 0.01  # seconds between chunks
CHUNKS = 200  # at most: 2 s of streaming, longer than any timeout below


class Handler:
    """What a handler did: chunks it produced, whether its ``finally`` ran, what it received."""

    def __init__(self) -> None:
        self.produced = 0
        self.cleaned_up = False
        self.received: list[dict[str, Any]] = []
        self.streams: list[AsyncGenerator[bytes]] = []  # the Starlette bodies made


def raw_stream(handler: Handler) -> ASGIApp:
    """A raw ASGI streaming handler that ignores the client: it stops only when send() fails."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            for _ in range(CHUNKS):
                await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
                handler.produced += 1
                await anyio.sleep(EVERY)
            await send({"type": "http.response.body", "body": b""})
        finally:
            handler.cleaned_up = True

    return app


def raw_short(handler: Handler, chunks: int = 3) -> ASGIApp:
    """A raw ASGI handler that streams ``chunks`` chunks at once and ends its response."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(chunks):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
            handler.produced += 1
        await send({"type": "http.response.body", "body": b""})
        handler.cleaned_up = True

    return app


def raw_slow(handler: Handler, seconds: float = 0.3) -> ASGIApp:
    """A raw ASGI handler that thinks for ``seconds`` before it answers in one piece."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await anyio.sleep(seconds)
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
            await send({"type": "http.response.body", "body": b"done"})
        finally:
            handler.cleaned_up = True

    return app


def raw_upload(handler: Handler) -> ASGIApp:
    """A raw ASGI handler that reads its whole body (or until the disconnect), then answers."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            handler.received.append(dict(message))
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                break
        if handler.received[-1]["type"] == "http.disconnect":
            handler.cleaned_up = True
            return
        size = str(sum(len(m.get("body", b"")) for m in handler.received)).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": size})
        handler.cleaned_up = True

    return app


def starlette_stream(handler: Handler, middleware: list[Middleware] | None = None) -> Starlette:
    """A Starlette StreamingResponse endpoint whose generator's ``finally`` is the cleanup."""

    async def tokens() -> AsyncGenerator[bytes]:
        try:
            for _ in range(CHUNKS):
                handler.produced += 1
                yield CHUNK
                await anyio.sleep(EVERY)
        finally:
            handler.cleaned_up = True

    async def endpoint(request: Request) -> StreamingResponse:
        stream = tokens()
        handler.streams.append(stream)
        return StreamingResponse(stream, media_type="text/plain")

    return Starlette(routes=[Route("/stream", endpoint)], middleware=middleware or [])


# -- the departure points ------------------------------------------------------------------


def test_leave_builds_frozen_departures() -> None:
    """Each departure point records its kind, amount, delay and how the socket closes."""
    assert leave.before_response(0.5) == Departure("before_response", after=0.5)
    assert leave.after_chunks(2, how="rst") == Departure("after_chunks", amount=2, how="rst")
    assert leave.after_bytes(7) == Departure("after_bytes", amount=7)
    assert leave.mid_upload(3) == Departure("mid_upload", amount=3)
    assert leave.never().kind == "never"
    with pytest.raises(AttributeError):
        leave.never().how = "rst"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: leave.after_chunks(-1), ValueError, ">= 0"),
        (lambda: leave.after_bytes(1.5), TypeError, "whole number"),  # type: ignore[arg-type]
        (lambda: leave.after_chunks(True), TypeError, "whole number"),  # a bool is no count
        (lambda: leave.before_response(-0.1), ValueError, "seconds >= 0"),
        (lambda: leave.before_response("1"), TypeError, "seconds as a number"),  # type: ignore[arg-type]
        (lambda: leave.mid_upload(2, how="close"), ValueError, "'fin'.*'rst'"),  # type: ignore[arg-type]
    ],
)
def test_leave_rejects_bad_input(make: Any, error: type[Exception], match: str) -> None:
    """A wrong type or a negative number is refused with a message that says what it takes."""
    with pytest.raises(error, match=match):
        make()


# -- raw ASGI apps, bare and behind the middleware ----------------------------------------------


async def test_cancel_mode_stops_a_stream_mid_body() -> None:
    """Behind the middleware in cancel mode a streaming handler is cancelled and its finally runs."""
    handler = Handler()
    outcome = await simulate(DisconnectMiddleware(raw_stream(handler), cancel=True), leave=leave.after_chunks(2))
    assert outcome.status == 200
    assert outcome.chunks == [CHUNK, CHUNK]
    assert outcome.body == CHUNK * 2
    assert outcome.left and not outcome.complete
    assert handler.cleaned_up
    assert handler.produced < 10
    assert outcome.state is not None and outcome.state.cancelled
    outcome.assert_aborted(phase="mid_body", within_ms=500)


async def test_observe_mode_stops_a_stream_at_its_next_send() -> None:
    """In observe mode the handler's next send() raises: it ends, and nothing escapes the app."""
    handler = Handler()
    outcome = await simulate(DisconnectMiddleware(raw_stream(handler)), leave=leave.after_chunks(3))
    assert outcome.chunks == [CHUNK] * 3
    assert outcome.state is not None and not outcome.state.cancelled
    assert outcome.exception is None
    assert handler.cleaned_up
    outcome.assert_aborted(phase="mid_body", within_ms=500)


async def test_a_bare_stream_runs_until_the_timeout() -> None:
    """Without the middleware a 2.3 server drops the sends: the handler runs on until the timeout."""
    handler = Handler()
    started = time.monotonic()
    outcome = await simulate(raw_stream(handler), leave=leave.after_chunks(2), timeout=0.3)
    assert time.monotonic() - started < 2
    assert outcome.timed_out
    assert outcome.app_returned_after_ms is None
    assert outcome.state is None
    assert outcome.chunks == [CHUNK, CHUNK]
    assert handler.produced > 5  # it kept producing for nobody
    assert handler.cleaned_up  # cancelled at the timeout, its finally ran
    with pytest.raises(AssertionError, match="still running at the timeout"):
        outcome.assert_aborted(within_ms=100)
    with pytest.raises(AssertionError, match="install DisconnectMiddleware"):
        outcome.assert_aborted()


async def test_raise_mode_send_raises_an_oserror() -> None:
    """With send_after_disconnect="raise" (spec 2.4) a bare handler's send raises an OSError."""
    handler = Handler()
    outcome = await simulate(raw_stream(handler), leave=leave.after_chunks(1), send_after_disconnect="raise")
    assert isinstance(outcome.exception, OSError)
    assert not outcome.timed_out
    assert outcome.app_returned_after_ms is not None
    assert handler.cleaned_up
    with pytest.raises(AssertionError, match="escaped the app"):
        outcome.assert_aborted()


async def test_raise_mode_behind_the_middleware_is_absorbed() -> None:
    """Behind the middleware the server's OSError is absorbed: the abort is recorded, nothing escapes."""
    handler = Handler()
    app = DisconnectMiddleware(raw_stream(handler))
    outcome = await simulate(app, leave=leave.after_chunks(1), send_after_disconnect="raise")
    assert outcome.exception is None
    outcome.assert_aborted(phase="mid_body", within_ms=500)


async def test_the_spec_version_follows_send_after_disconnect() -> None:
    """The scope says spec 2.3 for "drop" and 2.4 for "raise", like the servers that behave so."""
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["asgi"]["spec_version"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    for mode in ("drop", "raise"):
        outcome = await simulate(app, send_after_disconnect=mode)
        outcome.assert_completed()
    assert seen == ["2.3", "2.4"]


async def test_after_bytes_cuts_the_chunk_that_crosses_the_limit() -> None:
    """The client keeps exactly ``n`` bytes: a chunk across the limit arrives cut."""
    handler = Handler()
    outcome = await simulate(DisconnectMiddleware(raw_stream(handler), cancel=True), leave=leave.after_bytes(15))
    assert outcome.body == (CHUNK * 2)[:15]
    assert outcome.chunks == [CHUNK, CHUNK[:5]]
    assert handler.cleaned_up
    outcome.assert_aborted(phase="mid_body", within_ms=500)


async def test_after_chunks_zero_leaves_right_after_the_start() -> None:
    """after_chunks(0): the client reads the status and headers, then leaves before any body."""
    handler = Handler()
    outcome = await simulate(DisconnectMiddleware(raw_stream(handler), cancel=True), leave=leave.after_chunks(0))
    assert outcome.status == 200
    assert outcome.headers == [(b"content-type", b"text/plain")]
    assert outcome.chunks == []
    outcome.assert_aborted(phase="mid_body", within_ms=500)


@pytest.mark.parametrize("after", [0.0, 0.05])
async def test_cancel_mode_stops_a_slow_handler_before_its_response(after: float) -> None:
    """before_response: a handler still thinking is cancelled in cancel mode; nothing reached the client."""
    handler = Handler()
    app = DisconnectMiddleware(raw_slow(handler), cancel=True)
    outcome = await simulate(app, leave=leave.before_response(after))
    assert outcome.status is None
    assert outcome.body == b""
    assert handler.cleaned_up
    outcome.assert_aborted(phase="before_response", within_ms=200)


async def test_observe_mode_lets_a_slow_handler_finish_its_work() -> None:
    """In observe mode the slow handler runs its course: assert_aborted(within_ms) says how long."""
    handler = Handler()
    outcome = await simulate(DisconnectMiddleware(raw_slow(handler)), leave=leave.before_response(0.0))
    assert outcome.app_returned_after_ms is not None and outcome.app_returned_after_ms >= 200
    outcome.assert_aborted(phase="before_response")
    with pytest.raises(AssertionError, match=r"returned \d+\.\d ms after the departure, more than 50 ms"):
        outcome.assert_aborted(within_ms=50)


async def test_a_response_done_before_the_departure_point_is_complete() -> None:
    """A response shorter than the departure point is read in full: the client never left."""
    handler = Handler()
    outcome = await simulate(DisconnectMiddleware(raw_short(handler)), leave=leave.after_chunks(10))
    assert outcome.chunks == [CHUNK] * 3
    assert not outcome.left
    assert outcome.app_returned_after_ms is None
    assert outcome.duration_ms is not None
    outcome.assert_completed()


# -- the upload ------------------------------------------------------------------------------


async def test_mid_upload_delivers_part_of_the_body_then_disconnects() -> None:
    """mid_upload: the app reads the first bytes in a few chunks, then http.disconnect."""
    handler = Handler()
    outcome = await simulate(raw_upload(handler), method="POST", body=b"x" * 100, leave=leave.mid_upload(40))
    kinds = [m["type"] for m in handler.received]
    assert kinds == ["http.request", "http.request", "http.disconnect"]
    assert b"".join(m.get("body", b"") for m in handler.received) == b"x" * 40
    assert all(m["more_body"] for m in handler.received[:-1])
    assert outcome.status is None
    assert outcome.left and outcome.app_returned_after_ms is not None


@pytest.mark.parametrize("cancel", [False, True])
async def test_mid_upload_behind_the_middleware_is_before_response(cancel: bool) -> None:
    """Behind the middleware (observe or cancel) a departure during the upload is before_response."""
    handler = Handler()
    app = DisconnectMiddleware(raw_upload(handler), cancel=cancel)
    outcome = await simulate(app, method="POST", body=b"y" * 10, leave=leave.mid_upload(0))
    assert handler.cleaned_up
    outcome.assert_aborted(phase="before_response", within_ms=500)


async def test_never_reads_the_whole_upload_and_response() -> None:
    """leave.never(): the whole body goes in, the whole response comes out, content-length added."""
    handler = Handler()
    outcome = await simulate(DisconnectMiddleware(raw_upload(handler)), method="POST", body=b"z" * 30)
    assert handler.received == [{"type": "http.request", "body": b"z" * 30, "more_body": False}]
    assert outcome.body == b"30"
    outcome.assert_completed()
    with pytest.raises(AssertionError, match="the client never left"):
        outcome.assert_aborted()


# -- Starlette -------------------------------------------------------------------------------


@pytest.mark.parametrize("cancel", [False, True])
async def test_starlette_stream_behind_the_middleware(cancel: bool) -> None:
    """A StreamingResponse behind the middleware stops after the departure and its generator's finally runs."""
    handler = Handler()
    app = starlette_stream(handler, [Middleware(DisconnectMiddleware, cancel=cancel)])
    outcome = await simulate(app, path="/stream", leave=leave.after_chunks(2))
    assert outcome.status == 200
    assert outcome.headers[0] == (b"content-type", b"text/plain; charset=utf-8")
    assert outcome.chunks == [CHUNK, CHUNK]
    assert handler.cleaned_up
    assert handler.produced < 10
    outcome.assert_aborted(phase="mid_body", within_ms=500)


async def test_bare_starlette_stream_on_a_dropping_server_has_no_state() -> None:
    """Bare on a 2.3 server, Starlette stops its own stream, but assert_aborted says the middleware is missing."""
    handler = Handler()
    outcome = await simulate(starlette_stream(handler), path="/stream", leave=leave.after_chunks(2), timeout=1.0)
    assert outcome.state is None
    assert not outcome.timed_out and outcome.exception is None
    assert handler.cleaned_up
    with pytest.raises(AssertionError, match="no DisconnectState"):
        outcome.assert_aborted()


async def test_bare_starlette_stream_on_a_raising_server_leaks_its_error() -> None:
    """Bare on a 2.4 server, Starlette turns the send's OSError into ClientDisconnect, which escapes."""
    handler = Handler()
    outcome = await simulate(
        starlette_stream(handler), path="/stream", leave=leave.after_chunks(2), send_after_disconnect="raise"
    )
    assert type(outcome.exception).__name__ == "ClientDisconnect"
    assert not outcome.timed_out
    with pytest.raises(AssertionError, match="ClientDisconnect.*escaped the app"):
        outcome.assert_aborted()
    # Behind the middleware the same departure is absorbed.
    guarded = Handler()
    app = starlette_stream(guarded, [Middleware(DisconnectMiddleware)])
    outcome = await simulate(app, path="/stream", leave=leave.after_chunks(2), send_after_disconnect="raise")
    outcome.assert_aborted(phase="mid_body", within_ms=500)
    # Starlette abandons its body iterator when send() raises: close it here, not at garbage collection.
    for stream in handler.streams + guarded.streams:
        await stream.aclose()
    assert handler.cleaned_up and guarded.cleaned_up


async def test_starlette_stream_read_in_full() -> None:
    """leave.never() on a finite Starlette stream: every chunk arrives and assert_completed passes."""
    handler = Handler()

    async def three() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield CHUNK

    async def endpoint(request: Request) -> StreamingResponse:
        return StreamingResponse(three())

    app = Starlette(routes=[Route("/", endpoint)], middleware=[Middleware(DisconnectMiddleware, cancel=True)])
    outcome = await simulate(app)
    assert outcome.body == CHUNK * 3
    assert outcome.state is not None and not outcome.state.disconnected
    outcome.assert_completed()
    assert not handler.cleaned_up  # unused: the endpoint has no cleanup of its own


# -- hung handlers, exceptions, bad input ---------------------------------------------------------


async def test_a_hung_handler_is_reported_as_timed_out() -> None:
    """A handler that never returns is cancelled at the timeout and reported, not a hanging test."""
    handler = Handler()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            handler.cleaned_up = True

    started = time.monotonic()
    outcome = await simulate(app, leave=leave.before_response(0.05), timeout=0.2)
    assert time.monotonic() - started < 2
    assert outcome.timed_out and outcome.left
    assert outcome.app_returned_after_ms is None and outcome.duration_ms is None
    assert handler.cleaned_up
    with pytest.raises(AssertionError, match=r"not completed: the handler was still running at the timeout \(0.2 s\)"):
        outcome.assert_completed()


async def test_an_exception_escaping_the_app_is_captured() -> None:
    """What the app raises is returned in ``exception``, the same object, never raised."""
    error = ValueError("boom")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise error

    outcome = await simulate(app)
    assert outcome.exception is error
    with pytest.raises(AssertionError, match=r"ValueError\('boom'\) escaped the app"):
        outcome.assert_completed()


async def test_assert_completed_says_the_client_left() -> None:
    """assert_completed on an aborted request names the departure and what was received."""
    outcome = await simulate(DisconnectMiddleware(raw_stream(Handler()), cancel=True), leave=leave.after_chunks(1))
    with pytest.raises(AssertionError, match=r"the client left.*recorded a departure \(mid_body\)") as info:
        outcome.assert_completed()
    assert "1 chunk(s) / 10 byte(s) received" in str(info.value)


async def test_assert_aborted_names_the_wrong_phase() -> None:
    """assert_aborted with the wrong phase says which phase was recorded."""
    outcome = await simulate(DisconnectMiddleware(raw_stream(Handler()), cancel=True), leave=leave.after_chunks(1))
    with pytest.raises(AssertionError, match="recorded in phase 'mid_body', not 'before_response'"):
        outcome.assert_aborted(phase="before_response")


async def test_scope_carries_method_path_query_and_headers() -> None:
    """The http scope has the method, path, query string and headers given (str or bytes)."""
    scopes: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scopes.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    await simulate(app, method="put", path="/items?id=3", headers=[("X-Token", "t"), (b"host", b"h")], body=b"ab")
    (scope,) = scopes
    assert (scope["type"], scope["method"], scope["path"], scope["query_string"]) == ("http", "PUT", "/items", b"id=3")
    assert scope["headers"] == [(b"x-token", b"t"), (b"host", b"h"), (b"content-length", b"2")]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"send_after_disconnect": "ignore"}, ValueError, "'drop'.*'raise'"),
        ({"timeout": -1}, ValueError, "timeout must be"),
        ({"timeout": 0}, ValueError, "timeout must be"),
        ({"leave": "after_chunks"}, TypeError, "departure point"),
        ({"body": "text"}, TypeError, "body must be bytes"),
        ({"path": "items"}, ValueError, "starts with '/'"),
        ({"body": b"ab", "leave": leave.mid_upload(2)}, ValueError, "body longer than 2 bytes"),
    ],
)
async def test_simulate_rejects_bad_input(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    """Wrong options are refused before the app runs, with a message that says what is expected."""
    with pytest.raises(error, match=match):
        await simulate(raw_short(Handler()), **kwargs)


async def test_simulate_rejects_what_is_not_an_asgi3_app() -> None:
    """A non-callable, an ASGI 2 app and a sync function are refused with a clear TypeError."""

    def asgi2(scope: Scope) -> Any:
        return None

    def sync(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    with pytest.raises(TypeError, match="takes an ASGI 3 app"):
        await simulate(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="an ASGI 2 app"):
        await simulate(asgi2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not an awaitable"):
        await simulate(sync)  # type: ignore[arg-type]


def test_outcome_is_a_dataclass_with_defaults() -> None:
    """An Outcome made by hand is a client that never left and no response."""
    outcome = Outcome()
    assert (outcome.status, outcome.body, outcome.chunks, outcome.state) == (None, b"", [], None)
    assert "no response started" in outcome.summary()


async def test_no_task_is_left_behind() -> None:
    """After a hung handler timed out, no task of the request is still alive (checked on asyncio)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await anyio.sleep_forever()

    on_asyncio = sniffio.current_async_library() == "asyncio"
    before = asyncio.all_tasks() if on_asyncio else set()
    outcome = await simulate(DisconnectMiddleware(app), leave=leave.before_response(0.01, how="rst"), timeout=0.1)
    assert outcome.timed_out and outcome.departure.how == "rst"
    if on_asyncio:
        assert asyncio.all_tasks() == before


async def test_protocol_errors_of_the_app_are_reported() -> None:
    """A body before the start, or a second start, is an ASGI protocol error that the server raises."""

    async def body_first(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.body", "body": b"x"})

    async def two_starts(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.start", "status": 500, "headers": []})

    outcome = await simulate(body_first)
    assert isinstance(outcome.exception, RuntimeError) and "before http.response.start" in str(outcome.exception)
    outcome = await simulate(two_starts)
    assert isinstance(outcome.exception, RuntimeError) and "second http.response.start" in str(outcome.exception)
    assert outcome.status == 200


async def test_trailers_end_the_response_and_later_sends_are_ignored() -> None:
    """A response with trailers is complete after its last trailers; what the app sends later is ignored."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
        await send({"type": "http.response.body", "body": b"data"})
        await send({"type": "http.response.trailers", "headers": [(b"x-checksum", b"1")], "more_trailers": False})
        await send({"type": "http.response.body", "body": b"late"})

    outcome = await simulate(app)
    assert outcome.body == b"data"
    outcome.assert_completed()


@pytest.mark.parametrize(
    ("departure", "words"),
    [
        (leave.before_response(0.5), "leaves 0.5 s after the start, before the response (how=fin)"),
        (leave.after_chunks(2, how="rst"), "leaves after 2 body chunk(s) (how=rst)"),
        (leave.after_bytes(7), "leaves after 7 body byte(s) (how=fin)"),
        (leave.mid_upload(3), "leaves after uploading 3 body byte(s) (how=fin)"),
        (leave.never(), "never leaves: it reads the whole response"),
    ],
)
def test_departures_describe_themselves(departure: Departure, words: str) -> None:
    """Each departure point says in words where the client leaves, for the failure messages."""
    assert departure.describe() == words
    assert words in Outcome(departure=departure).summary()


async def test_a_callable_without_a_readable_signature_is_called() -> None:
    """A callable whose signature cannot be read is called anyway: what it raises is reported."""
    outcome = await simulate(dict)  # type: ignore[arg-type]
    assert isinstance(outcome.exception, TypeError)
