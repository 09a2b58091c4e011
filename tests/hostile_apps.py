"""Broken and hostile ASGI apps for tests/test_hostile.py and tests/test_hostile_inprocess.py.

Each app is built by a factory from a ``Recorder``, which keeps every exception the app
raised (or let pass after catching it) and the code object of the frame it passed
through, so that a test can check that what reached the server is that very object,
its traceback intact.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from types import CodeType, TracebackType

import anyio
import anyio.lowlevel
import pytest
from _pytest.mark import ParameterSet
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_disconnect import SCOPE_KEY, disconnect_state
from asgi_disconnect._types import ASGIApp, Message, Receive, Scope, Send

#: Bounds of every loop in these apps.
MAX_CHUNKS = 2000  # a send that never blocks gives up after 2000 chunks of 64 KiB
MAX_RECEIVES = 10


class AppAbort(BaseException):
    """An app's own ``BaseException`` that is not an ``Exception`` (like a worker's abort signal)."""


class Recorder:
    """What one request's app did: what it raised and where, and when it got to its checkpoints."""

    def __init__(self) -> None:
        self.raised: list[BaseException] = []
        self.codes: list[CodeType] = []  # the frame each one passed through, in the app
        self.started = anyio.Event()  # the handler runs (or sent its first chunk)
        self.client_left = anyio.Event()  # set by a test's client once it has closed
        self.messages: list[Message] = []  # what the app's receive() returned

    def keep(self, exc: BaseException) -> BaseException:
        """Record ``exc`` as raised by the caller's frame and return it, for ``raise rec.keep(exc)``."""
        self.raised.append(exc)
        self.codes.append(sys._getframe(1).f_code)
        return exc


Factory = Callable[[Recorder], ASGIApp]
ErrorFactory = Callable[[], BaseException]

START: Message = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
BODY: Message = {"type": "http.response.body", "body": b"complete\n"}
FIRST_CHUNK: Message = {"type": "http.response.body", "body": b"first chunk\n", "more_body": True}


MAX_FRAMES = 10_000  # a traceback walk gives up beyond this depth


def codes_of(exc: BaseException) -> list[CodeType]:
    """The code objects of the frames ``exc`` passed through, outermost first."""
    codes: list[CodeType] = []
    tb: TracebackType | None = exc.__traceback__
    for _ in range(MAX_FRAMES):
        if tb is None:
            break
        codes.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    return codes


def in_traceback(exc: BaseException, code: CodeType) -> bool:
    """Did ``exc`` pass through a frame running ``code``?"""
    return code in codes_of(exc)


# -- app errors of every kind ----------------------------------------------------------------


def value_error() -> BaseException:
    return ValueError("the app's own bug")


def file_not_found() -> BaseException:
    return FileNotFoundError(2, "No such file or directory", "/srv/reports/missing.csv")


def connection_refused() -> BaseException:
    return ConnectionRefusedError(111, "Connection refused: the app's database is down")


def timeout_error() -> BaseException:
    return TimeoutError("the app's upstream did not answer in time")


def app_abort() -> BaseException:
    return AppAbort("the app's own BaseException")


def exception_group() -> BaseException:
    return ExceptionGroup("the app's task group failed", [ValueError("one task"), KeyError("another")])


def oserror_group() -> BaseException:
    return ExceptionGroup("the app's task group failed", [FileNotFoundError(2, "No such file", "/srv/missing.csv")])


def base_exception_group() -> BaseException:
    return BaseExceptionGroup("the app's group", [app_abort()])


#: Every kind of error, by the name the test ids give it.
ERRORS: dict[str, ErrorFactory] = {
    # A plain bug.
    "ValueError": value_error,
    # The app's own OSErrors, which no departure caused: a missing file, a refused upstream,
    # a timeout of its own.
    "FileNotFoundError": file_not_found,
    "ConnectionRefusedError": connection_refused,
    "TimeoutError": timeout_error,
    # Not an Exception: servers catch it all the same; trio's task group must not wrap it
    # in a BaseExceptionGroup.
    "BaseException": app_abort,
    # The app's own task group failed.
    "ExceptionGroup": exception_group,
    # A group of one: all its members are OSErrors, none caused by a departure.
    "ExceptionGroup-of-OSError": oserror_group,
    # A group of BaseExceptions: not an Exception either.
    "BaseExceptionGroup": base_exception_group,
}


#: The app's own errors that every test of them raises, before or after its response start.
OWN_ERRORS = "ValueError FileNotFoundError ConnectionRefusedError TimeoutError BaseException ExceptionGroup".split()


def error_params(
    names: Iterable[str], raising: Callable[[ErrorFactory], Factory] | None = None, prefix: str = ""
) -> list[ParameterSet]:
    """A ``pytest.param`` per named error: its factory, or the app ``raising(factory)``; its id ``prefix + name``."""
    return [
        pytest.param(ERRORS[name] if raising is None else raising(ERRORS[name]), id=prefix + name) for name in names
    ]


# -- raw ASGI apps that break the protocol -----------------------------------------------------


def sends(*messages: Message) -> Factory:
    """An app that sends ``messages`` in turn and lets out the server's error about the last one."""
    *first, last = messages

    def factory(rec: Recorder) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            for message in first:
                await send(message)
            try:
                await send(last)
            except BaseException as exc:  # the server's own error about the message
                rec.keep(exc)
                raise

        return app

    return factory


second_start = sends(START, START)
body_before_start = sends(BODY)
send_after_complete = sends(START, BODY, BODY)


def return_without_response(rec: Recorder) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.lowlevel.checkpoint()  # suspend once: the middleware starts watching

    return app


def return_mid_body(rec: Recorder) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        await send(FIRST_CHUNK)

    return app


def raise_before_start(error: ErrorFactory) -> Factory:
    def factory(rec: Recorder) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await anyio.lowlevel.checkpoint()
            raise rec.keep(error())

        return app

    return factory


def raise_after_start(error: ErrorFactory) -> Factory:
    def factory(rec: Recorder) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await send(START)
            await send(FIRST_CHUNK)
            await anyio.lowlevel.checkpoint()
            raise rec.keep(error())

        return app

    return factory


# -- an app's own error after its client left ---------------------------------------------------


def raise_after_client_left(error: ErrorFactory, *, reads: bool = False, mid_body: bool = False) -> Factory:
    """A slow handler that raises ``error`` once its client has gone (the test sets ``client_left``).

    ``reads``: it waits in ``receive()`` for ``http.disconnect`` instead of sleeping (so
    cancel mode, which never cancels an app that was told, lets it raise too).
    ``mid_body``: it has sent the response start and a first chunk before.
    """

    def factory(rec: Recorder) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if mid_body:
                await send(START)
                await send(FIRST_CHUNK)
            rec.started.set()
            if reads:
                for _ in range(MAX_RECEIVES):
                    message = await receive()
                    rec.messages.append(message)
                    if message["type"] == "http.disconnect":
                        break
            else:
                with anyio.fail_after(5):
                    await rec.client_left.wait()
                if SCOPE_KEY in scope:  # wrapped: raise once the middleware knows, as the bug needs
                    with anyio.move_on_after(2):
                        await disconnect_state(scope).wait()
                await anyio.sleep(0.02)  # bare: the server sees the close too
            raise rec.keep(error())

        return app

    return factory


# -- a TimeoutError whose context is a cancellation inside the server's send ----------------------

BIG_CHUNK = b"x" * 65536
SEND_TIMEOUT = 0.2


def timeout_around_blocked_send(how: str) -> Factory:
    """Stream 64 KiB chunks to a client that does not read, each send within a 0.2 s timeout.

    The send that blocks (the server waits for the socket to drain) is cancelled by the
    timeout, and the app lets the resulting ``TimeoutError`` out, like sse-starlette's
    ``SendTimeoutError``: its ``__context__`` is the ``CancelledError`` raised inside the
    server's ``send()``. ``how``: ``"asyncio.timeout"`` or ``"anyio.fail_after"``.
    """

    def factory(rec: Recorder) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await send(START)
            try:
                for _ in range(MAX_CHUNKS):
                    chunk: Message = {"type": "http.response.body", "body": BIG_CHUNK, "more_body": True}
                    if how == "asyncio.timeout":
                        async with asyncio.timeout(SEND_TIMEOUT):
                            await send(chunk)
                    else:
                        with anyio.fail_after(SEND_TIMEOUT):
                            await send(chunk)
            except TimeoutError as exc:
                rec.keep(exc)
                raise
            raise AssertionError(f"no send blocked in {MAX_CHUNKS} chunks of 64 KiB")

        return app

    return factory


# -- framework apps -------------------------------------------------------------------------------


def starlette_streaming_error(rec: Recorder) -> ASGIApp:
    """A ``StreamingResponse`` whose body iterator raises after its first chunk."""

    async def rows() -> AsyncIterator[bytes]:
        yield b"first row\n"
        await anyio.lowlevel.checkpoint()
        raise rec.keep(ValueError("the body iterator's own bug"))

    async def endpoint(request: Request) -> Response:
        return StreamingResponse(rows(), media_type="text/plain")

    return Starlette(routes=[Route("/", endpoint)])


class NoOpMiddleware(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


def base_http_middleware_error(rec: Recorder) -> ASGIApp:
    """A Starlette endpoint that raises behind a ``BaseHTTPMiddleware``."""

    async def endpoint(request: Request) -> Response:
        await anyio.lowlevel.checkpoint()
        raise rec.keep(ValueError("the endpoint's own bug"))

    return Starlette(routes=[Route("/", endpoint)], middleware=[Middleware(NoOpMiddleware)])


def fastapi_yield_dependency_error(*, http_middleware: bool) -> Factory:
    """A FastAPI yield dependency that fails as it sets up (before its ``yield``): FastAPI answers 500.

    ``http_middleware``: the app also has an ``@app.middleware("http")`` (a
    ``BaseHTTPMiddleware``), as most FastAPI apps do: the error then passes through
    its task group.
    """

    def factory(rec: Recorder) -> ASGIApp:
        app = FastAPI()

        async def session() -> AsyncIterator[str]:
            await anyio.lowlevel.checkpoint()
            raise rec.keep(ValueError("the dependency could not open its session"))
            yield "session"  # a yield dependency

        @app.get("/", response_class=PlainTextResponse)
        async def endpoint(db: str = Depends(session)) -> str:
            return "complete\n"

        if http_middleware:

            @app.middleware("http")
            async def passthrough(request: Request, call_next: RequestResponseEndpoint) -> Response:
                return await call_next(request)

        return app

    return factory
