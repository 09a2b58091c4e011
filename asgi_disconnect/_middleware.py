from __future__ import annotations

import asyncio
import inspect
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog

from ._exceptions import ClientDisconnected
from ._state import DisconnectState, Phase
from ._types import ASGIApp, Message, Receive, Scope, Send

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup

SCOPE_KEY = "asgi_disconnect"

#: ``on_disconnect(scope, state)``: a sync or async callable run once per aborted request.
DisconnectHook = Callable[[Scope, DisconnectState], "Awaitable[None] | None"]

logger = structlog.get_logger("asgi_disconnect")

_DISCONNECT: Message = {"type": "http.disconnect"}
_INSTALL_HINT = (
    "install DisconnectMiddleware in front of your app: `app = DisconnectMiddleware(app)`, "
    "`app.add_middleware(DisconnectMiddleware)` (Starlette, FastAPI) or "
    "`middleware=[DisconnectMiddleware]` (Litestar)"
)


def disconnect_state(scope: Scope) -> DisconnectState:
    """Return the request's ``DisconnectState``.

    Raises ``LookupError`` when ``DisconnectMiddleware`` is not installed in front of
    the app that received ``scope``.
    """
    try:
        return scope[SCOPE_KEY]  # type: ignore[no-any-return]
    except KeyError:
        raise LookupError(
            f"no DisconnectState in the ASGI scope (key {SCOPE_KEY!r}): {_INSTALL_HINT}. "
            "Only 'http' scopes carry one; 'websocket' and 'lifespan' pass through untouched."
        ) from None


def _is_disconnect_error(exc: BaseException) -> bool:
    """True for the errors a client that left produces, however a framework wraps them."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_disconnect_error(e) for e in exc.exceptions)
    seen = 0
    current: BaseException | None = exc
    # Litestar and others re-raise as their own error: follow the chain, a bounded walk.
    while current is not None and seen < 16:
        if isinstance(current, OSError):
            return True
        if any(
            cls.__name__ == "ClientDisconnect" and cls.__module__ == "starlette.requests"
            for cls in type(current).__mro__
        ):
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


class _Cycle(DisconnectState):
    """One request's side of the middleware: the receive channel and the send wrapper.

    It is the request's ``DisconnectState`` too: one object per request, not two.

    The channel has one reader at a time: whichever of the app and the watcher calls
    the server's ``receive()`` first; the other waits for that read to finish. The
    watcher exists only if the app suspends (see ``DisconnectMiddleware.__call__``).
    """

    __slots__ = (
        "_app_read",
        "_body_complete",
        "_buffer",
        "_buffered",
        "_closed",
        "_complete",
        "_error",
        "_max_read_ahead",
        "_read_ahead_ok",
        "_reading",
        "_receive",
        "_scope",
        "_send",
        "_started",
        "_stopped",
        "_tick",
        "_trailers",
        "_watcher",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send, max_read_ahead: int, cancel: bool) -> None:
        # DisconnectState.__init__ inlined: a call costs a quarter of this constructor.
        self.disconnected = False
        self.phase: Phase | None = None
        self.detected_at: float | None = None
        self.started_at = time.monotonic()
        self.bytes_sent = 0
        self.cancel = cancel
        self._event = None
        self._scope = scope  # the server's scope, never the copy that holds the state
        self._receive = receive
        self._send = send
        self._max_read_ahead = max_read_ahead
        self._app_read = False  # the app has called receive() itself
        self._body_complete = False  # the server delivered the last http.request
        self._reading = False  # a server receive() is in flight
        self._buffer: deque[Message] | None = None  # read ahead, not yet handed to the app
        self._buffered = 0
        self._tick: anyio.Event | None = None  # set when a read ends or the app takes a message
        self._started = False  # http.response.start was sent
        self._trailers = False  # the response announced trailers
        self._complete = False  # the app sent its final message: a later disconnect is a normal close
        self._closed = False  # the server said http.disconnect (normal close or abort)
        self._stopped = False  # the app returned: the watcher must not start
        self._watcher: asyncio.Task[None] | anyio.CancelScope | None = None
        self._read_ahead_ok: bool | None = None  # computed from the headers on first need
        self._error: Exception | None = None

    # -- receive side ------------------------------------------------------------

    async def _app_receive(self) -> Message:
        self._app_read = True
        while True:
            if self.disconnected:
                return _DISCONNECT  # a truncated body is of no use: the disconnect wins
            if self._buffer:
                message = self._buffer.popleft()
                self._buffered -= len(message.get("body", b""))
                self._notify()
                return message
            if self._error is not None:
                raise self._error  # the server's receive() failed in the watcher
            if self._closed:
                return _DISCONNECT
            if not self._reading:
                return await self._read()
            await self._wait_tick()

    async def _read(self) -> Message:
        self._reading = True
        try:
            message = await self._receive()
        finally:
            self._reading = False
            self._notify()
        if message["type"] == "http.request":
            if not message.get("more_body", False):
                self._body_complete = True
        elif message["type"] == "http.disconnect":
            self._closed = True
            self._disconnected()
        return message

    def _notify(self) -> None:
        if self._tick is not None:
            self._tick.set()
            self._tick = None

    async def _wait_tick(self) -> None:
        if self._tick is None:
            self._tick = anyio.Event()
        await self._tick.wait()

    def _may_read(self) -> bool:
        """May the watcher call the server's receive() now?"""
        if self._body_complete:
            return True  # only http.disconnect can come now: reading takes nothing from the app
        if self._app_read:
            return False  # the app is consuming the body: it alone decides how much is read
        if self._read_ahead_ok is None:
            self._read_ahead_ok = self._may_read_ahead()
        return self._read_ahead_ok and (self._buffered < self._max_read_ahead or not self._buffer)

    def _may_read_ahead(self) -> bool:
        has_body = self._scope.get("http_version", "1.1") not in ("1.0", "1.1")  # h2/h3: unknown
        for name, value in self._scope.get("headers", ()):
            if name == b"expect" and value.lower() == b"100-continue":
                return False  # a read would make the server send 100 Continue for the app
            if name == b"content-length":
                has_body = value.strip() != b"0"
            elif name == b"transfer-encoding":
                has_body = True
        # A bodiless request's one empty message costs nothing to hold, whatever the limit.
        return self._max_read_ahead > 0 or not has_body

    async def _watch(self) -> None:
        """Read the channel while the app runs, until the disconnect or the response ends."""
        while not self._stopped and not self._complete and not self._closed:
            if self._reading or not self._may_read():
                await self._wait_tick()
                continue
            try:
                message = await self._read()
            except Exception as exc:
                self._error = exc  # the app gets it from its next receive(), as without us
                return
            if message["type"] == "http.request":
                if self._buffer is None:
                    self._buffer = deque()
                self._buffer.append(message)
                self._buffered += len(message.get("body", b""))

    async def _watch_in_scope(self) -> None:
        with anyio.CancelScope() as scope:
            self._watcher = scope
            await self._watch()

    def _start_watcher(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._stopped:
            self._watcher = loop.create_task(self._watch())

    def _stop_watcher(self) -> None:
        self._stopped = True
        if self._watcher is not None:
            self._watcher.cancel()

    # -- send side ---------------------------------------------------------------

    async def _app_send(self, message: Message) -> None:
        if self.disconnected:
            raise ClientDisconnected(f"client disconnected ({self.phase}); the response was not delivered")
        kind = message["type"]
        if kind == "http.response.body":
            if not self._trailers and not message.get("more_body", False):
                self._end_response()
        elif kind == "http.response.start":
            self._started = True
            self._trailers = message.get("trailers", False)
        elif (
            kind == "http.response.pathsend"
            or (kind == "http.response.trailers" and not message.get("more_trailers", False))
            or (kind == "http.response.zerocopysend" and not message.get("more_body", False))
        ):
            self._end_response()
        try:
            await self._send(message)
        except OSError as exc:
            # An ASGI 2.4 server (or a broken transport) says the client is gone.
            self._complete = False
            self._started = self._started and kind != "http.response.start"
            self._disconnected()
            raise ClientDisconnected(f"client disconnected ({self.phase}): {exc}") from exc
        if kind == "http.response.body":
            self.bytes_sent += len(message.get("body", b""))

    def _end_response(self) -> None:
        # Complete before the server's send returns: a server that sees the client
        # close while flushing the last bytes must not turn it into an abort. And
        # nothing is watched after this: background tasks must never be disturbed.
        self._complete = True
        self._stopped = True
        if self._watcher is not None:
            self._watcher.cancel()

    def _disconnected(self) -> None:
        if self._complete or self.disconnected:
            return  # after the whole response: a normal close, not an abort
        phase: Phase = "mid_body" if self._started else "before_response"
        self._mark(phase, time.monotonic())


class DisconnectMiddleware:
    """Make HTTP client disconnects visible to any ASGI 3 app.

    The middleware owns the request's receive channel: it notices ``http.disconnect``
    while the app runs even if the app never calls ``receive()``, records it in the
    request's ``DisconnectState`` (``scope[SCOPE_KEY]``, see ``disconnect_state()``),
    makes ``send()`` raise ``ClientDisconnected`` afterwards (the ASGI 2.4 rule, on any
    server), absorbs that error at its edge and logs each abort once through structlog
    (logger ``asgi_disconnect``). Only ``http`` scopes are handled.

    References:
    - ASGI HTTP spec 2.4, "Disconnected Client - send exception":
      https://asgi.readthedocs.io/en/latest/specs/www.html
    - Starlette's ``Request.is_disconnected()`` under ``BaseHTTPMiddleware``:
      https://github.com/encode/starlette/discussions/2094
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        cancel: bool = False,
        grace: float = 0.0,
        on_disconnect: DisconnectHook | None = None,
        max_read_ahead: int = 64 * 1024,
    ) -> None:
        if max_read_ahead < 0:
            raise ValueError(f"max_read_ahead must be >= 0 bytes, got {max_read_ahead!r}")
        if grace < 0:
            raise ValueError(f"grace must be >= 0 seconds, got {grace!r}")
        self.app = app
        self.cancel = cancel
        self.grace = grace
        self.on_disconnect = on_disconnect
        self.max_read_ahead = max_read_ahead
        # Requests that started in the current event loop iteration, per loop: see
        # _watch_if_suspended. Scheduling state, not request state.
        self._batches: dict[asyncio.AbstractEventLoop, list[_Cycle]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or SCOPE_KEY in scope:
            await self.app(scope, receive, send)
            return

        cycle = _Cycle(scope, receive, send, self.max_read_ahead, self.cancel)
        app_scope = {**scope, SCOPE_KEY: cycle}
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # not asyncio (trio); handled outside this block to keep tracebacks clean
        if loop is None:
            await self._call_in_task_group(cycle, app_scope)
        else:
            # A task per request costs more than this middleware's whole budget, so
            # watchers start from one callback per loop iteration, for the requests
            # still running by then: an app that answers without suspending never
            # needs one, and one that suspends gets it within one loop iteration.
            batch = self._batches.get(loop)
            if batch is None:
                batch = self._batches[loop] = []
                loop.call_soon(self._start_watchers, loop)
            batch.append(cycle)
            try:
                await self.app(app_scope, cycle._app_receive, cycle._app_send)
            except BaseException as exc:
                if not (cycle.disconnected and _is_disconnect_error(exc)):
                    raise
            finally:
                cycle._stopped = True
                if cycle._watcher is not None:
                    cycle._watcher.cancel()
        if cycle.disconnected:
            await self._report(scope, cycle)

    def _start_watchers(self, loop: asyncio.AbstractEventLoop) -> None:
        for cycle in self._batches.pop(loop):
            cycle._start_watcher(loop)
        for stale in [other for other in self._batches if other.is_closed()]:
            del self._batches[stale]  # a loop that closed before its callback ran

    async def _call_in_task_group(self, cycle: _Cycle, app_scope: Scope) -> None:
        # Other event loops (trio): structured concurrency the plain way.
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(cycle._watch_in_scope)
            try:
                await self.app(app_scope, cycle._app_receive, cycle._app_send)
            except Exception as exc:
                # Raised outside the task group, so it is not wrapped in an ExceptionGroup.
                error = exc
            finally:
                cycle._stop_watcher()
        if error is not None and not (cycle.disconnected and _is_disconnect_error(error)):
            try:
                raise error
            finally:
                del error

    async def _report(self, scope: Scope, state: DisconnectState) -> None:
        detected = state.detected_at if state.detected_at is not None else time.monotonic()
        logger.info(
            "client disconnected",
            method=scope.get("method"),
            path=scope.get("path"),
            phase=state.phase,
            elapsed_ms=round((detected - state.started_at) * 1000, 3),
            bytes_sent=state.bytes_sent,
            cancelled=False,
        )
        if self.on_disconnect is None:
            return
        try:
            result: Any = self.on_disconnect(scope, state)
            if inspect.isawaitable(result):
                await result
        except Exception:
            # A hook's bug must not turn a client's departure into a server error.
            logger.exception("on_disconnect hook failed", method=scope.get("method"), path=scope.get("path"))
