"""Test the disconnect paths of an ASGI app: where the client leaves, and what the app did.

``leave`` says where a client leaves (``leave.after_chunks(2)``), ``simulate()`` runs the
app in process behind a spec-exact fake HTTP server whose client leaves there, and the
``Outcome`` it returns says what the client received, what the middleware recorded and
how long the handler kept running after the client left::

    outcome = await simulate(app, path="/stream", leave=leave.after_chunks(2))
    outcome.assert_aborted(phase="mid_body", within_ms=50)

``serve()`` runs the app on a real server (uvicorn or hypercorn) on 127.0.0.1 instead, and
``live.request()`` sends a request from a raw socket that leaves with a FIN or an RST::

    async with serve(app, server="uvicorn") as live:
        outcome = await live.request(path="/stream", leave=leave.after_chunks(2, how="rst"))
    outcome.assert_aborted(phase="mid_body", within_ms=50)

Both run in the caller's event loop (asyncio or trio, through anyio), so the test and the
app share their state; a server is imported when it starts, never with this module.
Starlette's TestClient and httpx's ASGITransport never deliver a mid-request disconnect;
this module does nothing else. Its pytest plugin (``asgi_disconnect.pytest_plugin``) runs a
test in process and on each server in turn.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import math
import socket
import time
import traceback
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from . import _loopback
from ._loopback import Lifespan, ServerName, ServerStartError
from ._state import SCOPE_KEY, DisconnectState
from ._types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Departure", "Live", "LogLine", "Outcome", "ServerStartError", "leave", "serve", "simulate"]

#: How the client closes its socket: a FIN (a normal close) or an RST (an abortive one).
How = Literal["fin", "rst"]
#: Where the client leaves, as ``Departure.kind``.
Kind = Literal["before_response", "after_chunks", "after_bytes", "mid_upload", "never"]
#: What the fake server's ``send()`` does after the client left: drop the message (ASGI 2.3)
#: or raise an ``OSError`` (ASGI 2.4).
SendAfterDisconnect = Literal["drop", "raise"]

_SPEC_VERSIONS = {"drop": "2.3", "raise": "2.4"}


@dataclass(frozen=True)
class Departure:
    """Where and how the client leaves; made by the ``leave`` functions, not by hand.

    ``amount`` is the number of body chunks (``after_chunks``) or bytes (``after_bytes``,
    ``mid_upload``); ``after`` the seconds after the app started (``before_response``);
    ``how`` matters only where a real socket is used (``serve``): ``simulate`` records it.
    """

    kind: Kind
    amount: int = 0
    after: float = 0.0
    how: How = "fin"

    def __post_init__(self) -> None:
        if self.how not in ("fin", "rst"):
            raise ValueError(f"how must be 'fin' (a normal close) or 'rst' (an abortive one), got {self.how!r}")
        if isinstance(self.amount, bool) or not isinstance(self.amount, int):
            raise TypeError(f"{self.kind}() takes a whole number of chunks or bytes, got {self.amount!r}")
        if self.amount < 0:
            raise ValueError(f"{self.kind}() takes a number >= 0, got {self.amount!r}")
        if isinstance(self.after, bool) or not isinstance(self.after, int | float):
            raise TypeError(f"{self.kind}(after=...) takes seconds as a number, got {self.after!r}")
        if not self.after >= 0 or math.isinf(self.after):
            raise ValueError(f"{self.kind}(after=...) takes a finite number of seconds >= 0, got {self.after!r}")

    def describe(self) -> str:
        """Where the client leaves, in words (used in failure messages)."""
        if self.kind == "before_response":
            return f"leaves {self.after:g} s after the start, before the response (how={self.how})"
        if self.kind == "after_chunks":
            return f"leaves after {self.amount} body chunk(s) (how={self.how})"
        if self.kind == "after_bytes":
            return f"leaves after {self.amount} body byte(s) (how={self.how})"
        if self.kind == "mid_upload":
            return f"leaves after uploading {self.amount} body byte(s) (how={self.how})"
        return "never leaves: it reads the whole response"


class leave:
    """Where the client leaves: each function returns a ``Departure`` for ``simulate()``."""

    @staticmethod
    def before_response(after: float = 0.0, *, how: How = "fin") -> Departure:
        """The client leaves ``after`` seconds after the app started, if the response is not complete."""
        return Departure("before_response", after=after, how=how)

    @staticmethod
    def after_chunks(n: int, *, how: How = "fin") -> Departure:
        """The client leaves once it received ``n`` non-empty body chunks (0: right after the start)."""
        return Departure("after_chunks", amount=n, how=how)

    @staticmethod
    def after_bytes(n: int, *, how: How = "fin") -> Departure:
        """The client leaves once it received ``n`` body bytes (a chunk across the limit is cut)."""
        return Departure("after_bytes", amount=n, how=how)

    @staticmethod
    def mid_upload(after_bytes: int, *, how: How = "fin") -> Departure:
        """The client leaves once ``after_bytes`` bytes of its request body were read from it."""
        return Departure("mid_upload", amount=after_bytes, how=how)

    @staticmethod
    def never() -> Departure:
        """The client stays and reads the whole response."""
        return Departure("never")


_NEVER = leave.never()


@dataclass(frozen=True)
class LogLine:
    """A line a server logged while a request ran: its logger, level and message, and the
    traceback it printed (None if it printed none)."""

    logger: str
    level: str
    message: str
    traceback: str | None = None
    #: ``time.monotonic()`` when it was logged.
    at: float = 0.0

    def __str__(self) -> str:
        text = f"{self.level} {self.logger}: {self.message}"
        return text if self.traceback is None else f"{text}\n{self.traceback}"


@dataclass
class Outcome:
    """What one simulated request did, seen from the client and from the app.

    ``app_returned_after_ms`` is the time from the client's departure to the handler's
    return (or raise). It is None when the handler was still running at the timeout
    (``timed_out``), and also when the client never left (``left`` is False: a
    ``leave.never()`` request, or a response that ended before its departure point); then
    ``duration_ms`` is the whole run of the handler.
    """

    #: The response status; None if no response started.
    status: int | None = None
    #: The response headers: as the app sent them (``simulate``), as received (``serve``:
    #: with the server's own, names in lower case).
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: The body bytes the client received before it left.
    body: bytes = b""
    #: The non-empty body chunks the client received, in order.
    chunks: list[bytes] = field(default_factory=list)
    #: The request's ``DisconnectState`` when ``DisconnectMiddleware`` is installed, else None.
    state: DisconnectState | None = None
    #: Milliseconds from the departure to the handler's return (see the class docstring).
    app_returned_after_ms: float | None = None
    #: What escaped the app, else None.
    exception: BaseException | None = None
    #: True if the handler was still running at the timeout (it was cancelled then).
    timed_out: bool = False
    #: Where the client was to leave.
    departure: Departure = field(default_factory=leave.never)
    #: True once the client left (at its departure point).
    left: bool = False
    #: ``time.monotonic()`` when the client left; None if it did not.
    left_at: float | None = None
    #: True if the client received the whole response.
    complete: bool = False
    #: Milliseconds from the start of the handler to its return; None if it timed out, or
    #: if the server answered without calling the app (``serve`` only).
    duration_ms: float | None = None
    #: The timeout the request ran with, in seconds.
    timeout: float = 5.0
    #: Where the app ran: ``"in-process"`` (``simulate``) or the server's name (``serve``).
    server: str = "in-process"
    #: What the server logged while the request ran (``serve`` only: warnings and errors).
    server_log: list[LogLine] = field(default_factory=list)

    @property
    def tracebacks(self) -> list[LogLine]:
        """The lines of ``server_log`` that printed a traceback."""
        return [line for line in self.server_log if line.traceback is not None]

    def summary(self) -> str:
        """What happened, in one paragraph (every failure message ends with it)."""
        client = f"the client {self.departure.describe()}"
        client += "; it left" if self.left else "; it did not leave"
        if self.status is None:
            response = "no response started"
        else:
            response = f"response {self.status}, {len(self.chunks)} chunk(s) / {len(self.body)} byte(s) received"
            response += ", complete" if self.complete else ", incomplete"
        if self.timed_out:
            handler = f"the handler was still running at the timeout ({self.timeout:g} s) and was cancelled"
        elif self.app_returned_after_ms is not None:
            handler = f"the handler returned {self.app_returned_after_ms:.1f} ms after the client left"
        elif self.duration_ms is None:
            handler = "the server never called the app"
        else:
            handler = f"the handler returned after {self.duration_ms:.1f} ms"
        if self.exception is not None:
            handler += f", raising {self.exception!r}"
        if self.state is None:
            middleware = "no DisconnectState (DisconnectMiddleware is not installed)"
        else:
            middleware = f"state {self.state!r}"
        text = f"{self.server}: {client}; {response}; {handler}; {middleware}."
        if self.server_log:
            text += f" The server logged {len(self.server_log)} line(s), {len(self.tracebacks)} with a traceback:"
            text += "".join(f"\n  {line.level} {line.logger}: {line.message}" for line in self.server_log)
        return text

    def _log_problems(self) -> list[str]:
        return [f"the server logged a traceback ({line.message!r})" for line in self.tracebacks]

    def assert_aborted(self, *, phase: str | None = None, within_ms: float | None = None) -> None:
        """Assert that the middleware recorded the departure (in ``phase``) and the handler
        returned within ``within_ms`` of it, with nothing escaping the app and no traceback
        in the server's log."""
        problems: list[str] = []
        if not self.left:
            problems.append("the client never left")
        if self.state is None:
            problems.append("no DisconnectState: install DisconnectMiddleware in front of the app")
        elif not self.state.disconnected:
            problems.append("the middleware recorded no departure")
        elif phase is not None and self.state.phase != phase:
            problems.append(f"the departure was recorded in phase {self.state.phase!r}, not {phase!r}")
        if within_ms is not None and self.left:
            if self.timed_out:
                problems.append(
                    f"the handler was still running at the timeout ({self.timeout:g} s), "
                    f"not done within {within_ms:g} ms of the departure"
                )
            elif self.app_returned_after_ms is not None and self.app_returned_after_ms > within_ms:
                problems.append(
                    f"the handler returned {self.app_returned_after_ms:.1f} ms after the departure, "
                    f"more than {within_ms:g} ms"
                )
        if self.exception is not None:
            problems.append(f"{self.exception!r} escaped the app")
        problems += self._log_problems()
        if problems:
            raise AssertionError(f"not aborted cleanly: {'; '.join(problems)}. What happened: {self.summary()}")

    def assert_completed(self) -> None:
        """Assert that the client received the whole response, no departure was recorded,
        nothing escaped the app and the server logged no traceback."""
        problems: list[str] = []
        if self.timed_out:
            problems.append(f"the handler was still running at the timeout ({self.timeout:g} s)")
        if self.status is None:
            problems.append("no response started")
        elif not self.complete:
            problems.append("the response was not complete")
        if self.left:
            problems.append("the client left")
        if self.state is not None and self.state.disconnected:
            problems.append(f"the middleware recorded a departure ({self.state.phase})")
        if self.exception is not None:
            problems.append(f"{self.exception!r} escaped the app")
        problems += self._log_problems()
        if problems:
            raise AssertionError(f"not completed: {'; '.join(problems)}. What happened: {self.summary()}")


class _Scope(dict[str, Any]):
    """The scope the fake server hands over: it notices the ``DisconnectState`` stored in a copy.

    The middleware copies the scope before it adds its state (the server's scope never
    holds it); ``copy()`` here keeps the copies linked to the server, which is how the
    ``Outcome`` gets the request's state without reaching into the app.
    """

    def __init__(self, seen: _Seen, *args: Any) -> None:
        super().__init__(*args)
        self._seen = seen

    def copy(self) -> _Scope:
        return _Scope(self._seen, self)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if key == SCOPE_KEY and isinstance(value, DisconnectState) and self._seen.state is None:
            self._seen.state = value


class _Seen:
    """What a request's ``_Scope`` reports to: the ``DisconnectState`` the middleware stored."""

    state: DisconnectState | None = None


class _FakeServer(_Seen):
    """The server side of one request, with the client that leaves at its departure point."""

    def __init__(self, departure: Departure, body: bytes, drop: bool) -> None:
        self.departure = departure
        self.drop = drop
        # the client (when it left: outcome.left_at)
        self._gone = anyio.Event()
        # the request body
        self._incoming = self._split(body)
        self._uploaded = 0
        # the response
        self.outcome = Outcome(departure=departure)
        self._trailers = False

    def _split(self, body: bytes) -> list[Message]:
        if self.departure.kind != "mid_upload":
            return [{"type": "http.request", "body": body, "more_body": False}]
        # What is sent before the client leaves, in a few chunks; the rest never comes.
        cut = self.departure.amount
        half = cut // 2
        pieces = [piece for piece in (body[:half], body[half:cut]) if piece]
        return [{"type": "http.request", "body": piece, "more_body": True} for piece in pieces]

    @property
    def gone(self) -> bool:
        return self.outcome.left

    def leave(self) -> None:
        """The client closes the connection (once; never after the whole response)."""
        if not self.gone and not self.outcome.complete:
            self.outcome.left_at = time.monotonic()
            self.outcome.left = True
            self._gone.set()

    async def receive(self) -> Message:
        await anyio.lowlevel.checkpoint()
        if self._incoming and not self.gone:
            message = self._incoming.pop(0)
            self._uploaded += len(message["body"])
            if not self._incoming and self.departure.kind == "mid_upload":
                self.leave()  # the upload stops here
            return message
        if not self.gone and not self.outcome.complete:
            await self._gone.wait()
        # The spec: sent when receive() is called after the response or after the close.
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        await anyio.lowlevel.checkpoint()
        outcome = self.outcome
        kind = message["type"]
        if self.gone:
            if self.drop:
                return
            raise ConnectionResetError(f"the client closed the connection ({self.departure.how}); {kind} not sent")
        if outcome.complete:
            return  # after the whole response: nothing more goes to the client
        if kind == "http.response.start":
            if outcome.status is not None:
                raise RuntimeError("ASGI protocol error: a second http.response.start")
            outcome.status = int(message["status"])
            outcome.headers = [(bytes(name), bytes(value)) for name, value in message.get("headers", ())]
            self._trailers = bool(message.get("trailers", False))
            if self.departure.kind in ("after_chunks", "after_bytes") and self.departure.amount == 0:
                self.leave()
        elif kind == "http.response.body":
            if outcome.status is None:
                raise RuntimeError("ASGI protocol error: http.response.body before http.response.start")
            self._received(bytes(message.get("body", b"")))
            if not message.get("more_body", False) and not self._trailers and not self.gone:
                outcome.complete = True
        elif kind == "http.response.trailers":
            if not message.get("more_trailers", False):
                outcome.complete = True

    def _received(self, data: bytes) -> None:
        outcome, departure = self.outcome, self.departure
        if departure.kind == "after_bytes":
            data = data[: departure.amount - len(outcome.body)]
        if data:
            outcome.chunks.append(data)
            outcome.body += data
        if (departure.kind == "after_chunks" and len(outcome.chunks) >= departure.amount) or (
            departure.kind == "after_bytes" and len(outcome.body) >= departure.amount
        ):
            self.leave()


def _wrong_signature(app: Any) -> inspect.Signature | None:
    """The signature of a callable that cannot be called as ``app(scope, receive, send)``,
    else None (also when it has no signature to read: calling it will tell)."""
    try:
        signature = inspect.signature(app)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind({}, None, None)
    except TypeError:
        return signature
    return None


def _check_app(app: Any) -> None:
    if not callable(app):
        raise TypeError(f"simulate() takes an ASGI 3 app, `async def app(scope, receive, send)`; got {app!r}")
    signature = _wrong_signature(app)
    if signature is not None:
        raise TypeError(
            f"simulate() takes an ASGI 3 app, called as app(scope, receive, send); {app!r} has the "
            f"signature {signature} (an ASGI 2 app? wrap it with asgiref.compatibility.guarantee_single_callable)"
        )


def _check_request(path: str, body: bytes, leave: Departure, timeout: float) -> bytes:
    """The request's arguments checked, with a message that says what is wrong; the body as bytes."""
    if not isinstance(leave, Departure):
        raise TypeError(f"leave= takes a departure point such as leave.after_chunks(2), got {leave!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"path must be a string that starts with '/', got {path!r}")
    if not isinstance(body, bytes | bytearray):
        raise TypeError(f"body must be bytes, got {type(body).__name__}")
    if leave.kind == "mid_upload" and leave.amount >= len(body):
        raise ValueError(
            f"leave.mid_upload({leave.amount}) leaves during the upload: it needs a body longer than "
            f"{leave.amount} bytes, got {len(body)}"
        )
    return bytes(body)


def _encode(value: bytes | str) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else bytes(value)


def _scope(server: _FakeServer, method: str, path: str, headers: Iterable[tuple[Any, Any]], body: bytes) -> _Scope:
    raw_path, _, query = path.partition("?")
    header_list = [(_encode(name).lower(), _encode(value)) for name, value in headers]
    names = {name for name, _ in header_list}
    if b"host" not in names:
        header_list.insert(0, (b"host", b"testserver"))
    if body and b"content-length" not in names and b"transfer-encoding" not in names:
        header_list.append((b"content-length", str(len(body)).encode()))
    spec = "2.3" if server.drop else "2.4"
    return _Scope(
        server,
        {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": spec},
            "http_version": "1.1",
            "method": method.upper(),
            "scheme": "http",
            "path": raw_path,
            "raw_path": raw_path.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": header_list,
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
            "state": {},
        },
    )


async def simulate(
    app: ASGIApp,
    *,
    method: str = "GET",
    path: str = "/",
    headers: Iterable[tuple[bytes | str, bytes | str]] = (),
    body: bytes = b"",
    leave: Departure = _NEVER,
    send_after_disconnect: SendAfterDisconnect = "drop",
    timeout: float = 5.0,  # noqa: ASYNC109 - the app's budget, not this call's: it never raises TimeoutError
) -> Outcome:
    """Run ``app`` for one HTTP request whose client leaves at ``leave``; return the ``Outcome``.

    The app runs in process, in the caller's event loop, behind a fake server that follows
    the ASGI HTTP spec: ``receive()`` gives the body, then blocks until the client leaves
    or the response is complete and returns ``http.disconnect``; after the departure
    ``send()`` drops each message (``"drop"``, spec 2.3, what uvicorn does) or raises an
    ``OSError`` (``"raise"``, spec 2.4). A handler still running ``timeout`` seconds after
    it started is cancelled (``Outcome.timed_out``) and has ended when this returns (only
    a handler that swallows every cancellation, or blocks the event loop, can outlast it);
    an ``Exception`` escaping the app is returned in ``Outcome.exception``, never raised.
    """
    _check_app(app)
    body = _check_request(path, body, leave, timeout)
    if send_after_disconnect not in _SPEC_VERSIONS:
        raise ValueError(
            f"send_after_disconnect must be 'drop' (an ASGI 2.3 server) or 'raise' (2.4), got {send_after_disconnect!r}"
        )

    server = _FakeServer(leave, body, drop=send_after_disconnect == "drop")
    outcome = server.outcome
    outcome.timeout = timeout
    scope = _scope(server, method, path, headers, body)
    if (leave.kind == "before_response" and leave.after == 0) or (leave.kind == "mid_upload" and leave.amount == 0):
        server.leave()  # before the app runs at all: nothing can have been sent or read yet
    returned_at: float | None = None
    not_awaitable: list[object] = []  # what a sync callable returned

    async def run_app(timer: anyio.CancelScope) -> None:
        nonlocal returned_at
        started = time.monotonic()
        with anyio.move_on_after(timeout) as deadline:
            try:
                result = app(scope, server.receive, server.send)
                if inspect.isawaitable(result):
                    await result
                else:
                    not_awaitable.append(result)
            except Exception as exc:
                outcome.exception = exc
            finally:
                returned_at = ended = time.monotonic()
                timer.cancel()
        outcome.timed_out = deadline.cancel_called
        if not outcome.timed_out:
            outcome.duration_ms = (ended - started) * 1000

    async def leave_later(timer: anyio.CancelScope) -> None:
        with timer:
            await anyio.sleep(leave.after)
            server.leave()

    timer = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        if leave.kind == "before_response" and leave.after > 0:
            tg.start_soon(leave_later, timer)
        tg.start_soon(run_app, timer)

    if not_awaitable:
        raise TypeError(f"{app!r} returned {not_awaitable[0]!r}, not an awaitable: it is not an ASGI 3 app")
    outcome.state = server.state if server.state is not None else scope.get(SCOPE_KEY)
    if not outcome.timed_out and outcome.left_at is not None and returned_at is not None:
        outcome.app_returned_after_ms = max(0.0, (returned_at - outcome.left_at) * 1000)
    return outcome


# --------------------------------------------------------------------------- real servers
#: The loggers whose lines ``serve()`` keeps (warnings and errors): the servers' and asyncio's.
SERVER_LOGGERS = ("uvicorn.error", "hypercorn.error", "asyncio")
#: How long a client leaving ``mid_upload`` waits, once the app was called, for the app to
#: read what was uploaded (an app that never reads its body is left that much later).
UPLOAD_SETTLE = 0.1
#: How long a handler cancelled at the timeout is given to return.
CANCEL_WAIT = 1.0


class _Watch(_Seen):
    """One request as the outermost app saw it: when it was called and returned, what it
    sent and read, and the cancel scope that ends it at the timeout."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.started_at = 0.0
        self.returned = anyio.Event()
        self.returned_at = 0.0
        self.exception: Exception | None = None
        self.sizes: list[int] = []  # the non-empty body messages the app sent, in order
        self.received = 0  # request body bytes the app read
        self.wants = 0  # request body bytes after which ``enough`` is set
        self.enough = anyio.Event()  # the app read ``wants`` bytes, responded or returned
        self.cancel_scope = anyio.CancelScope()


class _Observer:
    """The app the server calls: it watches each HTTP request of a ``live.request()`` client,
    found by the client's port, and passes everything else through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.expected: dict[int, _Watch] = {}
        self.running: set[_Watch] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        watch = self.expected.pop(client[1], None) if client else None
        if watch is None:
            watch = _Watch()  # another client's request: watched so that it can be stopped

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                watch.received += len(message.get("body", b""))
                if watch.received >= watch.wants:
                    watch.enough.set()
            return message

        async def watched_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                watch.enough.set()
            elif kind == "http.response.body" and message.get("body"):
                watch.sizes.append(len(message["body"]))  # before the bytes can reach the client
            await send(message)

        self.running.add(watch)
        watch.started_at = time.monotonic()
        watch.started.set()
        if watch.wants == 0:
            watch.enough.set()
        try:
            with watch.cancel_scope:
                await self.app(_Scope(watch, scope), watched_receive, watched_send)
        except Exception as exc:
            watch.exception = exc
            raise  # to the server, which logs it as it would
        finally:
            watch.returned_at = time.monotonic()
            self.running.discard(watch)
            watch.returned.set()
            watch.enough.set()

    def cancel_all(self) -> None:
        for watch in self.running:
            watch.cancel_scope.cancel()


class _LogCapture(logging.Handler):
    """Keeps the lines of the loggers it is installed on, tracebacks included."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[LogLine] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = None
        if record.exc_info and record.exc_info[1] is not None:
            text = "".join(traceback.format_exception(record.exc_info[1])).rstrip()
        elif record.exc_text:
            text = record.exc_text
        try:
            message = record.getMessage()
        except Exception:  # a bad format string in somebody's log call
            message = str(record.msg)
        self.lines.append(LogLine(record.name, record.levelname, message.strip(), text, time.monotonic()))


@contextlib.contextmanager
def _capturing(names: Iterable[str]) -> Iterator[_LogCapture]:
    capture = _LogCapture()
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(capture)
    try:
        yield capture
    finally:
        for logger in loggers:
            logger.removeHandler(capture)


class Live:
    """A server that ``serve()`` started: where it listens, and the client that talks to it."""

    def __init__(self, server: ServerName, port: int, observer: _Observer, log: _LogCapture) -> None:
        #: Which server: ``"uvicorn"``, ``"uvicorn-h11"``, ``"uvicorn-httptools"`` or ``"hypercorn"``.
        self.server = server
        #: Where it listens: 127.0.0.1 and an ephemeral port.
        self.host = _loopback.HOST
        self.port = port
        self._observer = observer
        self._log = log

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> int:
        """How many HTTP handlers are running now."""
        return len(self._observer.running)

    @property
    def server_log(self) -> list[LogLine]:
        """All the server logged (warnings and errors) since it started."""
        return list(self._log.lines)

    async def request(
        self,
        *,
        method: str = "GET",
        path: str = "/",
        headers: Iterable[tuple[bytes | str, bytes | str]] = (),
        body: bytes = b"",
        leave: Departure = _NEVER,
        timeout: float = 5.0,  # noqa: ASYNC109 - the handler's budget: it never raises TimeoutError
    ) -> Outcome:
        """Send one HTTP/1.1 request from a raw socket that leaves at ``leave``; return the ``Outcome``.

        The client leaves by closing its socket with a FIN or an RST (``leave``'s ``how``).
        ``before_response`` counts from the moment the server called the app; ``mid_upload``
        sends the head and the first bytes of the body, and leaves once the app has read
        them (or ``UPLOAD_SETTLE`` seconds after it was called, for an app that does not
        read). A body chunk is what one ``http.response.body`` message of the app carried.
        A handler still running ``timeout`` seconds after the request was sent is reported
        (``Outcome.timed_out``), then cancelled; ``server_log`` holds what the server
        logged meanwhile (with concurrent requests, their lines are mixed).
        """
        body = _check_request(path, body, leave, timeout)
        outcome = Outcome(departure=leave, timeout=timeout, server=self.server)
        sock = await _connect(self.host, self.port)
        watch = _Watch()
        if leave.kind == "mid_upload":
            watch.wants = leave.amount
        local_port: int = sock.getsockname()[1]
        self._observer.expected[local_port] = watch
        client = _Client(sock, outcome, watch, head=method.upper() == "HEAD")
        mark = len(self._log.lines)
        try:
            with anyio.move_on_after(timeout) as deadline:
                await client.run(_request_head(method, path, headers, body, self.port), body, leave)
                if watch.started.is_set():
                    await watch.returned.wait()
            ended = time.monotonic()
            if deadline.cancel_called and watch.started.is_set() and not watch.returned.is_set():
                outcome.timed_out = True
                watch.cancel_scope.cancel()
                with anyio.move_on_after(CANCEL_WAIT):
                    await watch.returned.wait()
            else:
                for _ in range(5):  # the server logs what escaped right after the app returned
                    await anyio.lowlevel.checkpoint()
                ended = time.monotonic()
        finally:
            self._observer.expected.pop(local_port, None)
            client.close()
        outcome.server_log = [line for line in self._log.lines[mark:] if line.at <= ended]
        outcome.state = watch.state
        outcome.exception = watch.exception
        if watch.started.is_set() and not outcome.timed_out:
            outcome.duration_ms = (watch.returned_at - watch.started_at) * 1000
            if outcome.left_at is not None:
                outcome.app_returned_after_ms = max(0.0, (watch.returned_at - outcome.left_at) * 1000)
        return outcome


def _request_head(
    method: str, path: str, headers: Iterable[tuple[bytes | str, bytes | str]], body: bytes, port: int
) -> bytes:
    pairs = [(_encode(name), _encode(value)) for name, value in headers]
    names = {name.lower() for name, _ in pairs}
    lines = [f"{method.upper()} {path} HTTP/1.1".encode("latin-1")]
    if b"host" not in names:
        lines.append(f"host: {_loopback.HOST}:{port}".encode())
    lines += [name + b": " + value for name, value in pairs]
    if body and b"content-length" not in names and b"transfer-encoding" not in names:
        lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _connect(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (see _loopback).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        error = sock.connect_ex((host, port))
        if error not in (0, errno.EINPROGRESS):
            raise ConnectionRefusedError(error, f"cannot connect to {host}:{port}")
        await anyio.wait_writable(sock)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise ConnectionRefusedError(error, f"cannot connect to {host}:{port}")
    except BaseException:
        sock.close()
        raise
    return sock


class _Client:
    """One raw-socket client: it sends the request, reads the response as it comes and
    leaves at its departure point. Every read is bounded in bytes; the caller bounds time."""

    def __init__(self, sock: socket.socket, outcome: Outcome, watch: _Watch, *, head: bool = False) -> None:
        self.sock = sock
        self.outcome = outcome
        self.watch = watch
        self.head = head  # a HEAD request: the response has no body
        self.buffer = bytearray()
        self.eof = False
        self.received = 0
        self.closed = False
        self._pending = bytearray()  # body bytes not yet a whole chunk
        self._chunk = 0  # index in watch.sizes of the chunk being received
        self._done = False  # the body has ended as its framing says

    # ---- what the client does
    async def run(self, head: bytes, body: bytes, departure: Departure) -> None:
        kind = departure.kind
        if kind == "mid_upload":
            await self._send(head + body[: departure.amount])
            await self._race(self._uploaded)
        elif kind == "before_response":
            await self._send(head + body)
            await self._race(self._waited)
        else:
            await self._send(head + body)
            if await self._read_response():
                self.leave()
        self._flush()

    async def _uploaded(self) -> None:
        await self.watch.started.wait()
        with anyio.move_on_after(UPLOAD_SETTLE):
            await self.watch.enough.wait()

    async def _waited(self) -> None:
        await self.watch.started.wait()
        await anyio.sleep(max(0.0, self.watch.started_at + self.outcome.departure.after - time.monotonic()))

    async def _race(self, departure_point: Callable[[], Awaitable[None]]) -> None:
        """Read the response until ``departure_point()`` returns, then leave (unless the
        response was complete first, or the server closed the connection)."""
        reached = False
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                await self._read_response()
                tg.cancel_scope.cancel()

            async def wait() -> None:
                nonlocal reached
                await departure_point()
                reached = True
                tg.cancel_scope.cancel()

            tg.start_soon(read)
            tg.start_soon(wait)
        if reached and not self.outcome.complete and not self.eof:
            self.leave()

    def leave(self) -> None:
        """Close the socket at the departure point, with a FIN or an RST."""
        self.outcome.left_at = time.monotonic()
        self.outcome.left = True
        self.closed = True
        with contextlib.suppress(OSError):
            _loopback.close(self.sock, self.outcome.departure.how)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                _loopback.close(self.sock, "fin")

    # ---- reading the response
    async def _read_response(self) -> bool:
        """Read the response; True once the departure point is reached, False at its end
        (``outcome.complete``) or when the server closed the connection first."""
        outcome, departure = self.outcome, self.outcome.departure
        status = None
        headers: list[tuple[bytes, bytes]] = []
        for _ in range(100):  # interim responses (100 Continue, 103 Early Hints) first
            head = await self._until(b"\r\n\r\n")
            if head is None:
                return False
            status, headers = _loopback.parse_head(head)
            if not 100 <= status < 200 or status == 101:
                break
        outcome.status, outcome.headers = status, headers
        if departure.kind in ("after_chunks", "after_bytes") and departure.amount == 0:
            return True
        fields = {name.lower(): value for name, value in headers}
        if self.head or status is None or status < 200 or status in (204, 304):
            pieces = _nothing()  # whatever its Content-Length says (RFC 9112, 6.3)
            self._done = True
        elif fields.get(b"transfer-encoding", b"").lower().endswith(b"chunked"):
            pieces = self._chunked()
        elif b"content-length" in fields:
            pieces = self._sized(int(fields[b"content-length"]))
        else:
            pieces = self._sized(None)
        async with contextlib.aclosing(pieces):  # closed here, not by trio's garbage collection
            async for piece in pieces:
                if self._received(piece):
                    return True
        outcome.complete = self._done
        return False

    def _received(self, piece: bytes) -> bool:
        """Take body bytes; True once the departure point is reached."""
        outcome, departure = self.outcome, self.outcome.departure
        if departure.kind == "after_bytes":
            piece = piece[: departure.amount - len(outcome.body)]
        outcome.body += piece
        self._pending += piece
        sizes = self.watch.sizes
        for _ in range(len(sizes)):  # at most every chunk the app sent
            if self._chunk >= len(sizes) or len(self._pending) < sizes[self._chunk]:
                break
            size = sizes[self._chunk]
            outcome.chunks.append(bytes(self._pending[:size]))
            del self._pending[:size]
            self._chunk += 1
        if departure.kind == "after_chunks":
            return len(outcome.chunks) >= departure.amount
        return departure.kind == "after_bytes" and len(outcome.body) >= departure.amount

    def _flush(self) -> None:
        """What arrived of a chunk that the client did not wait for counts as one."""
        if self._pending:
            self.outcome.chunks.append(bytes(self._pending))
            self._pending.clear()

    async def _chunked(self) -> AsyncGenerator[bytes]:
        for _ in range(_loopback.MAX_READ):  # a chunk takes 5 bytes at least
            line = await self._until(b"\r\n")
            if line is None:
                return
            try:
                size = int(line.partition(b";")[0], 16)
            except ValueError:
                raise ValueError(f"{self.outcome.server} sent a bad chunk size: {line[:80]!r}") from None
            if size == 0:
                for _ in range(_loopback.MAX_READ):  # trailers, up to the empty line
                    trailer = await self._until(b"\r\n")
                    if not trailer:
                        break
                self._done = True
                return
            async with contextlib.aclosing(self._sized(size)) as sized:
                async for piece in sized:
                    yield piece
            if await self._until(b"\r\n") is None:
                return

    async def _sized(self, size: int | None) -> AsyncGenerator[bytes]:
        """``size`` bytes (None: until the end of the stream) as they arrive."""
        remaining = _loopback.MAX_READ if size is None else size
        for _ in range(_loopback.MAX_READ):
            if remaining <= 0:
                self._done = True
                return
            if not self.buffer and not await self._fill():
                self._done = size is None
                return
            piece = bytes(self.buffer[:remaining])
            del self.buffer[: len(piece)]
            remaining -= len(piece)
            yield piece

    # ---- the socket
    async def _until(self, separator: bytes) -> bytes | None:
        """Consume up to and including ``separator``; what came before it, None at the end."""
        for _ in range(_loopback.MAX_READ):
            index = self.buffer.find(separator)
            if index >= 0:
                found = bytes(self.buffer[:index])
                del self.buffer[: index + len(separator)]
                return found
            if not await self._fill():
                return None
        return None

    async def _fill(self) -> bool:
        """Receive what the server sent; False at the end of the stream (or a reset)."""
        if self.eof:
            return False
        for _ in range(_loopback.MAX_READ):
            await anyio.wait_readable(self.sock)
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                return False
            self.received += len(data)
            if self.received > _loopback.MAX_READ:
                raise ValueError(f"{self.outcome.server} sent more than {_loopback.MAX_READ} bytes")
            self.buffer += data
            return True
        return False

    async def _send(self, data: bytes) -> None:
        view = memoryview(data)
        for _ in range(2 * len(data) + 2):  # each round sends a byte at least, or waits once
            if not view:
                return
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                await anyio.wait_writable(self.sock)
                continue
            except (BrokenPipeError, ConnectionResetError):
                return  # the server closed the connection: its response says why
            view = view[sent:]


async def _nothing() -> AsyncGenerator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


@contextlib.asynccontextmanager
async def serve(
    app: ASGIApp,
    *,
    server: ServerName = "uvicorn",
    lifespan: Lifespan = "auto",
    start_timeout: float = 5.0,
    stop_timeout: int = 5,
) -> AsyncIterator[Live]:
    """Serve ``app`` on a real server on 127.0.0.1 (an ephemeral port) in this event loop.

    ``server`` is ``"uvicorn"`` (httptools where installed, else h11), ``"uvicorn-h11"``,
    ``"uvicorn-httptools"`` or ``"hypercorn"``; uvicorn runs on asyncio only, hypercorn on
    asyncio and trio. ``lifespan`` is uvicorn's setting (``"auto"``, ``"on"``, ``"off"``),
    followed by hypercorn too: the app's startup has run when the block starts, and its
    shutdown runs at the end. A server that is not installed, does not start within
    ``start_timeout`` or whose app fails its lifespan startup raises ``ServerStartError``,
    saying why, with what the server logged; nothing is left running. At the end of the
    block the handlers still running are cancelled and the server stops, at most
    ``stop_timeout`` seconds later.
    """
    _check_app(app)
    observer = _Observer(app)
    started = False
    with _capturing(SERVER_LOGGERS) as log:
        try:
            async with _loopback.serve(
                observer, server=server, lifespan=lifespan, start_timeout=start_timeout, stop_timeout=stop_timeout
            ) as base:
                started = True
                try:
                    yield Live(server, base.port, observer, log)
                finally:
                    observer.cancel_all()
        except ServerStartError as exc:
            if started:
                raise
            logged = "\n".join(str(line) for line in log.lines)
            # Every line (the last few): uvicorn logs the app's reason first, then "Exiting".
            said = " | ".join(_said(line) for line in log.lines[-5:])
            message = f"{exc}; the server logged: {said}" if said else str(exc)
            raise ServerStartError(message, logged) from exc.__cause__


def _said(line: LogLine) -> str:
    """A log line's message, with the exception its traceback ends with."""
    if not line.traceback:
        return line.message
    return f"{line.message} ({line.traceback.splitlines()[-1]})"
