"""Test the disconnect paths of an ASGI app: where the client leaves, and what the app did.

``leave`` says where a client leaves (``leave.after_chunks(2)``), ``simulate()`` runs the
app in process behind a spec-exact fake HTTP server whose client leaves there, and the
``Outcome`` it returns says what the client received, what the middleware recorded and
how long the handler kept running after the client left::

    outcome = await simulate(app, path="/stream", leave=leave.after_chunks(2))
    outcome.assert_aborted(phase="mid_body", within_ms=50)

It runs in the caller's event loop (asyncio or trio, through anyio) and imports no server
or framework. Starlette's TestClient and httpx's ASGITransport never deliver a mid-request
disconnect; this module does nothing else.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from ._state import SCOPE_KEY, DisconnectState
from ._types import ASGIApp, Message

__all__ = ["Departure", "Outcome", "leave", "simulate"]

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
    #: The response headers, as the app sent them.
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
    #: True if the client received the whole response.
    complete: bool = False
    #: Milliseconds from the start of the handler to its return; None if it timed out.
    duration_ms: float | None = None
    #: The timeout the request ran with, in seconds.
    timeout: float = 5.0

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
        else:
            handler = f"the handler returned after {self.duration_ms or 0.0:.1f} ms"
        if self.exception is not None:
            handler += f", raising {self.exception!r}"
        if self.state is None:
            middleware = "no DisconnectState (DisconnectMiddleware is not installed)"
        else:
            middleware = f"state {self.state!r}"
        return f"{client}; {response}; {handler}; {middleware}."

    def assert_aborted(self, *, phase: str | None = None, within_ms: float | None = None) -> None:
        """Assert that the middleware recorded the departure (in ``phase``) and the handler
        returned within ``within_ms`` of it, with nothing escaping the app."""
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
        if problems:
            raise AssertionError(f"not aborted cleanly: {'; '.join(problems)}. What happened: {self.summary()}")

    def assert_completed(self) -> None:
        """Assert that the client received the whole response and no departure was recorded."""
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
        if problems:
            raise AssertionError(f"not completed: {'; '.join(problems)}. What happened: {self.summary()}")


class _Scope(dict[str, Any]):
    """The scope the fake server hands over: it notices the ``DisconnectState`` stored in a copy.

    The middleware copies the scope before it adds its state (the server's scope never
    holds it); ``copy()`` here keeps the copies linked to the server, which is how the
    ``Outcome`` gets the request's state without reaching into the app.
    """

    def __init__(self, server: _FakeServer, *args: Any) -> None:
        super().__init__(*args)
        self._server = server

    def copy(self) -> _Scope:
        return _Scope(self._server, self)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if key == SCOPE_KEY and isinstance(value, DisconnectState) and self._server.state is None:
            self._server.state = value


class _FakeServer:
    """The server side of one request, with the client that leaves at its departure point."""

    def __init__(self, departure: Departure, body: bytes, drop: bool) -> None:
        self.departure = departure
        self.drop = drop
        self.state: DisconnectState | None = None
        # the client
        self.left_at: float | None = None
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
        return self.left_at is not None

    def leave(self) -> None:
        """The client closes the connection (once; never after the whole response)."""
        if not self.gone and not self.outcome.complete:
            self.left_at = time.monotonic()
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


def _check_app(app: Any) -> None:
    if not callable(app):
        raise TypeError(f"simulate() takes an ASGI 3 app, `async def app(scope, receive, send)`; got {app!r}")
    try:
        signature = inspect.signature(app)
    except (TypeError, ValueError):
        return  # a builtin or an odd callable: calling it will tell
    try:
        signature.bind({}, None, None)
    except TypeError:
        raise TypeError(
            f"simulate() takes an ASGI 3 app, called as app(scope, receive, send); {app!r} has the "
            f"signature {signature} (an ASGI 2 app? wrap it with asgiref.compatibility.guarantee_single_callable)"
        ) from None


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
    if not isinstance(leave, Departure):
        raise TypeError(f"leave= takes a departure point such as leave.after_chunks(2), got {leave!r}")
    if send_after_disconnect not in _SPEC_VERSIONS:
        raise ValueError(
            f"send_after_disconnect must be 'drop' (an ASGI 2.3 server) or 'raise' (2.4), got {send_after_disconnect!r}"
        )
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"path must be a string that starts with '/', got {path!r}")
    if not isinstance(body, bytes | bytearray):
        raise TypeError(f"body must be bytes, got {type(body).__name__}")
    body = bytes(body)
    if leave.kind == "mid_upload" and leave.amount >= len(body):
        raise ValueError(
            f"leave.mid_upload({leave.amount}) leaves during the upload: it needs a body longer than "
            f"{leave.amount} bytes, got {len(body)}"
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
    if not outcome.timed_out and server.left_at is not None and returned_at is not None:
        outcome.app_returned_after_ms = max(0.0, (returned_at - server.left_at) * 1000)
    return outcome
