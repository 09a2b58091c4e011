from __future__ import annotations

import asyncio
import inspect
import time
import types
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping, Sequence
from types import CodeType, CoroutineType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import structlog

from ._cancel import NativeCanceller, current_task
from ._exceptions import ClientDisconnected
from ._state import DisconnectState, Phase
from ._types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from ._stream import _GuardedStream

SCOPE_KEY = "asgi_disconnect"

#: ``on_disconnect(scope, state)``: a sync or async callable run once per aborted request.
DisconnectHook = Callable[[Scope, DisconnectState], "Awaitable[None] | None"]

logger = structlog.get_logger("asgi_disconnect")

_DISCONNECT: Message = {"type": "http.disconnect"}
#: ASGI HTTP spec versions before "send() raises on a closed connection" (2.4).
_DROPPING_SPECS = frozenset({"2.0", "2.1", "2.2", "2.3"})
_NO_ASGI: Mapping[str, str] = {}
#: Methods whose requests carry no body by convention (RFC 9110, 9.3).
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: How long after an app read its whole body itself a cancellation waits for it to listen
#: (Django and Quart wait in receive() for the disconnect and stop their views themselves).
LISTEN_WINDOW = 0.1
_INSTALL_HINT = (
    "install DisconnectMiddleware in front of your app: `app = DisconnectMiddleware(app)`, "
    "`app.add_middleware(DisconnectMiddleware)` (Starlette, FastAPI) or "
    "`middleware=[DisconnectMiddleware]` (Litestar)"
)


def disconnect_state(scope: Mapping[str, Any]) -> DisconnectState:
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


#: How many exceptions one walk of a chain or group examines at most: frameworks wrap a
#: few levels deep, and a chain can loop (``raise eg.exceptions[0]`` inside ``except*``).
_WALK_LIMIT = 64


def _code_of(func: Any) -> CodeType | None:
    """The code object a server callable runs, to find its frames in a traceback."""
    code = getattr(getattr(func, "__func__", func), "__code__", None)
    if code is None:  # a callable object: its __call__ method
        code = getattr(getattr(type(func), "__call__", None), "__code__", None)  # noqa: B004 - not a callable() test
    return code if isinstance(code, CodeType) else None


def _raised_in(exc: BaseException, codes: tuple[CodeType, ...]) -> bool:
    """Was ``exc`` raised inside one of ``codes`` (its own traceback, not its chain)?"""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in codes:
            return True
        tb = tb.tb_next
    return False


def _is_starlette_disconnect(exc: BaseException) -> bool:
    # By name, so that Starlette is never imported: it raises this when receive() says
    # http.disconnect.
    return any(
        cls.__name__ == "ClientDisconnect" and cls.__module__ == "starlette.requests" for cls in type(exc).__mro__
    )


def _caused_by_departure(
    exc: BaseException, server: tuple[CodeType, ...], *, ours_cancelled: bool, server_only: bool
) -> bool:
    """True if ``exc`` is what a client's departure causes, however a framework wrapped it.

    The causes: an ``OSError`` raised inside the server's own ``send``/``receive``
    (``server`` holds their code objects) and, unless ``server_only``, our
    ``ClientDisconnected``, Starlette's ``ClientDisconnect`` and, if ``ours_cancelled``
    (never with ``server_only``), the middleware's own cancellation. An ``Exception`` that is none of these is followed
    through ``__cause__``/``__context__`` (a framework's wrapper); any other ``OSError``
    or ``BaseException`` is the app's own. An exception group is caused by the departure
    when every member is. The walk is bounded and stops at a loop.
    """
    budget = _WALK_LIMIT

    def walk(current: BaseException | None, path: frozenset[int]) -> bool:
        nonlocal budget
        while current is not None:
            budget -= 1
            if budget < 0 or id(current) in path:
                return False
            path = path | {id(current)}
            if isinstance(current, BaseExceptionGroup):
                return bool(current.exceptions) and all(walk(member, path) for member in current.exceptions)
            if isinstance(current, OSError):
                if _raised_in(current, server):
                    return True
                return not server_only and isinstance(current, ClientDisconnected)
            if isinstance(current, asyncio.CancelledError):
                return ours_cancelled
            if not isinstance(current, Exception):
                return False  # KeyboardInterrupt, SystemExit, GeneratorExit, trio.Cancelled
            if not server_only and _is_starlette_disconnect(current):
                return True
            current = current.__cause__ or current.__context__
        return False

    return walk(exc, frozenset())


async def _as_coroutine(awaitable: Awaitable[None]) -> None:
    await awaitable


@types.coroutine
def _resume(app: Coroutine[Any, Any, None], suspended: Any) -> Generator[Any, Any, None]:
    """Await ``app``, a coroutine whose first step yielded ``suspended``, as ``await app``
    would have: the task gets ``suspended``, and every later step is delegated natively."""
    while True:
        try:
            sent = yield suspended
        except GeneratorExit:
            app.close()
            raise
        except BaseException as exc:  # a cancellation, thrown in where the app waits
            try:
                suspended = app.throw(exc)
            except StopIteration:
                return
            continue
        if sent is None:  # what an asyncio task always sends: plain delegation from here
            # types.coroutine lets a generator delegate to a coroutine object directly.
            yield from app
            return
        try:
            suspended = app.send(sent)
        except StopIteration:
            return


class _Cycle(DisconnectState):
    """One request's side of the middleware: the receive channel and the send wrapper.

    It is the request's ``DisconnectState`` too: one object per request, not two.

    The channel has one reader at a time: whichever of the app and the watcher calls
    the server's ``receive()`` first; the other waits for that read to finish. The
    watcher exists only if the app suspends (see ``DisconnectMiddleware.__call__``).
    """

    # What every request reads or writes lives in slots, set by __init__: on Python 3.12
    # a slot is read and written faster than an instance dict entry, and a plain request
    # never creates the instance dict at all. The rest, needed only by a request that
    # suspends, aborts or streams, are class-level defaults that such a request overrides
    # in its instance dict.
    __slots__ = (
        "started_at",
        "disconnected",
        "bytes_sent",
        "cancel",
        "_mw",
        "_task",
        "_scope",
        "_receive",
        "_send",
        "_slow",  # anything beyond the plain request: a watcher, an abort, a stream
        "_started",  # the http.response.start message, once sent
        "_trailers",  # the response announced trailers
        "_complete",  # the app sent its final message: a later disconnect is a normal close
        "_stopped",  # the app returned: the watcher must not start
    )
    _app_read = False  # the app has called receive() itself
    _body_complete = False  # the server delivered the last http.request
    _reading = False  # a server receive() is in flight
    _buffer: deque[Message] | None = None  # read ahead, not yet handed to the app
    _buffered = 0
    _tick: anyio.Event | None = None  # set when a read ends or the app takes a message
    _closed = False  # the server said http.disconnect (normal close or abort)
    _watcher: asyncio.Task[None] | anyio.CancelScope | None = None
    _error: Exception | None = None
    _app_told = False  # the app itself received http.disconnect: it was told
    _app_waiting = 0  # app calls blocked in receive(): they are told at once
    _cancel_handle: asyncio.Handle | None = None  # the grace timer
    _canceller: NativeCanceller | None = None  # asyncio: delivers the cancellation
    _streams: list[_GuardedStream[Any]] | None = None  # guard_stream bodies, closed if abandoned
    _read_ahead_ok: bool | None = None  # from the request headers, on a watcher's first need
    _body_read_at: float | None = None  # when the app itself received the end of the body
    _refused: OSError | None = None  # the server's error from a send it refused (ASGI 2.4)
    # Set only where they are used: _warn_handle (when a cancellation begins), _tg and
    # _app_scope (trio).
    _warn_handle: asyncio.TimerHandle
    _tg: anyio.abc.TaskGroup
    _helpers: list[anyio.CancelScope] | None = None  # what _spawn() started
    _running = 0  # helpers not yet ended
    _idle: anyio.Event | None = None  # set when the last helper ends
    _app_scope: anyio.CancelScope

    def __init__(self, mw: DisconnectMiddleware, scope: Scope, receive: Receive, send: Send, task: Any) -> None:
        # No DisconnectState.__init__ call: this constructor runs once per request.
        self.started_at = time.monotonic()
        self.disconnected = False
        self.bytes_sent = 0
        self.cancel = mw.cancel and not (mw.cancel_exclude and scope["path"].startswith(mw.cancel_exclude))
        self._mw = mw
        self._task: asyncio.Task[Any] | None = task  # asyncio: the target of a cancellation
        self._scope = scope  # the server's scope, never the copy that holds the state
        self._receive = receive
        self._send = send
        self._slow = False
        self._started: Message | None = None
        self._trailers = False
        self._complete = False
        self._stopped = False

    # -- receive side ------------------------------------------------------------

    async def _app_receive(self) -> Message:
        self._app_read = True
        while True:
            if self._buffer:
                # Read ahead by the watcher: handed over in order, whatever its type.
                message = self._buffer.popleft()
                self._buffered -= len(message.get("body", b""))
                self._notify()
                break
            if self.disconnected or self._closed:
                message = _DISCONNECT  # at once: nothing more will come
                break
            if self._error is not None:
                error, self._error = self._error, None
                raise error  # the server's receive() failed in the watcher
            self._app_waiting += 1
            try:
                if not self._reading:
                    message = await self._read()
                    break
                await self._wait_tick()
            finally:
                self._app_waiting -= 1
        kind = message["type"]
        if kind == "http.disconnect":
            self._app_told = True
        elif self.cancel and kind == "http.request" and not message.get("more_body", False):
            self._body_read_at = time.monotonic()  # see _cancel_delay()
        return message

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
        return self._read_ahead_ok and (self._buffered < self._mw.max_read_ahead or not self._buffered)

    def _may_read_ahead(self) -> bool:
        """May the watcher read a body the app has not asked for? Decided from the headers.

        Only when all of it fits in ``max_read_ahead``: a server hands over what it has
        buffered in one message, so a body of unknown or larger size is left unread.
        """
        length: bytes | None = None
        for name, value in self._scope.get("headers", ()):
            if name == b"expect" and value.lower() == b"100-continue":
                return False  # a read would make the server send 100 Continue for the app
            if name == b"content-length":
                length = value.strip()
            elif name == b"transfer-encoding":
                return False  # chunked: of unknown size
        if length is not None:
            return length.isdigit() and int(length) <= self._mw.max_read_ahead
        # No framing header: HTTP/1 has no body then. HTTP/2 and 3 send none for a bodiless
        # request either, and may stream a body without one: trust the method.
        return self._scope.get("http_version", "1.1") in ("1.0", "1.1") or self._scope.get("method") in _BODILESS

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
            if message["type"] != "http.disconnect":
                # Kept for the app, whatever its type: every message reaches it, in order.
                if self._buffer is None:
                    self._buffer = deque()
                self._buffer.append(message)
                self._buffered += len(message.get("body", b""))

    def _spawn(self, func: Callable[..., Awaitable[None]], *args: Any) -> anyio.CancelScope:
        """Run ``func`` beside the app (the anyio path) until ``_finish()`` or its scope stops it.

        Shielded: an outer cancellation is the app's to receive. Reaching a helper, it
        would escape the task group in place of what the app itself raised or returned.
        """
        scope = anyio.CancelScope(shield=True)
        if self._helpers is None:
            self._helpers = []
        self._helpers.append(scope)
        self._running += 1

        async def run() -> None:
            try:
                with scope:
                    await func(*args)
            except Exception:
                # Ours, not the app's: logged, never raised into the task group in its place.
                logger.exception("asgi-disconnect helper failed", method=self._scope.get("method"))
            finally:
                self._running -= 1
                if not self._running and self._idle is not None:
                    self._idle.set()

        self._tg.start_soon(run)
        return scope

    async def _join_helpers(self) -> None:
        while self._running:
            self._idle = anyio.Event()
            await self._idle.wait()

    def _start_watcher(self, loop: asyncio.AbstractEventLoop) -> None:
        self._slow = True
        self._watcher = loop.create_task(self._watch())

    # -- send side ---------------------------------------------------------------

    def _app_send(self, message: Message) -> Awaitable[None]:
        # A plain function returning the server's own awaitable: no coroutine frame of
        # ours per message, which is most of what a wrapper costs a streaming response.
        # A server's OSError therefore reaches the app as it is; __call__ recognises it.
        if self.disconnected:
            if self._app_told or self._app_waiting:
                # The app hears of the departure through receive() and handles it itself
                # (Django, Quart, Starlette's streams): its sends meet the server as they
                # would without the middleware.
                return self._send(message)
            if self._streams:
                return self._close_streams(raise_after=True)
            raise self._gone()
        kind = message["type"]
        if kind == "http.response.body":
            self.bytes_sent += len(message.get("body", b""))
            ends = not message.get("more_body", False) and not self._trailers
        elif kind == "http.response.start":
            self._started = message
            if message.get("trailers", False):
                self._trailers = True
            ends = False
        else:
            ends = (
                kind == "http.response.pathsend"
                or (kind == "http.response.trailers" and not message.get("more_trailers", False))
                or (kind == "http.response.zerocopysend" and not message.get("more_body", False))
            )
        if ends:
            # Complete before the server's send returns: a server that sees the client
            # close while flushing the last bytes must not turn it into an abort. And
            # nothing is watched after this: background tasks must never be disturbed.
            self._complete = self._stopped = True
            if self._slow and self._watcher is not None:
                self._watcher.cancel()
        return self._send(message)

    async def _app_send_checked(self, message: Message) -> None:
        """``_app_send`` for a server that may raise (ASGI 2.4): a refused send is recorded."""
        disconnected = self.disconnected
        try:
            await self._app_send(message)
        except OSError as exc:
            if not disconnected:
                # Only the server's send() can have raised: the client is gone, and the
                # message was not delivered, even if the app goes on.
                self._refused = exc
                self._unsend(message)
                self._disconnected()
            raise

    def _app_send_timed(self, message: Message) -> Awaitable[None]:
        return self._within_send_timeout(message)

    async def _within_send_timeout(self, message: Message) -> None:
        assert self._mw.send_timeout is not None
        with anyio.move_on_after(self._mw.send_timeout) as timer:
            await self._app_send_checked(message)
        if timer.cancelled_caught:
            # A peer that stopped reading (half-open TCP, a stuck client): it is gone, and
            # the message it did not take was not delivered.
            self._unsend(message)
            self._disconnected("stalled")
            raise ClientDisconnected(f"client stalled: one send blocked more than {self._mw.send_timeout} s")

    def _unsend(self, message: Message | None) -> None:
        """The server did not take ``message`` (None: unknown): its send() raised or stalled."""
        self._complete = False
        if message is None:
            return
        kind = message["type"]
        if kind == "http.response.start":
            self._started = None
            if self.phase == "mid_body":  # recorded meanwhile, from the refused start
                self.phase = "before_response"
        elif kind == "http.response.body":
            self.bytes_sent -= len(message.get("body", b""))

    def _register_stream(self, stream: _GuardedStream[Any]) -> None:
        self._slow = True
        if self._streams is None:
            self._streams = []
        self._streams.append(stream)

    async def _close_streams(self, raise_after: bool = False) -> None:
        # The app abandoned a guard_stream body (its send failed mid-iteration): close
        # it now, in this task, rather than at garbage collection in another one.
        streams, self._streams = self._streams or [], []
        for stream in streams:
            await stream.aclose()
        if raise_after:
            raise self._gone()

    def _gone(self) -> ClientDisconnected:
        return ClientDisconnected(f"client disconnected ({self.phase}); the response was not delivered")

    async def _send_heartbeat(self, frame: bytes) -> None:
        """Send a heartbeat frame for guard_stream, if the response is an open stream."""
        start = self._started
        if not start or self._complete or self.disconnected:
            return
        if any(name.lower() == b"content-length" for name, _ in start.get("headers", ())):
            return  # a framed body: extra bytes would corrupt it
        try:
            await self._send({"type": "http.response.body", "body": frame, "more_body": True})
        except OSError:
            self._disconnected()
            return
        self.bytes_sent += len(frame)

    def _disconnected(self, phase: Phase | None = None) -> None:
        if self._complete or self.disconnected:
            return  # after the whole response: a normal close, not an abort
        if phase is None:
            phase = "mid_body" if self._started else "before_response"
        self._slow = True
        self._mark(phase, time.monotonic())
        if self.cancel and not self._stopped:  # the policy as it stands at the moment of the disconnect
            delay = self._cancel_delay()
            if self._task is not None:
                self._cancel_handle = self._task.get_loop().call_later(delay, self._begin_cancel)
            else:
                self._spawn(self._cancel_after, delay)

    # -- cancellation ------------------------------------------------------------

    def _cancel_delay(self) -> float:
        """The grace period, or longer for an app that may be about to listen itself.

        An app that read its whole body through receive() hears the disconnect from its
        next receive(); frameworks that listen (Django) make that call right after
        building the request. A cancellation in between would kill them outside their
        own lifecycle, so it waits until ``LISTEN_WINDOW`` after the end of the body.
        """
        grace = self._mw.grace
        if self._body_read_at is None or self._started is not None:
            return grace  # it never read its body, or it is answering: not about to listen
        return max(grace, self._body_read_at + LISTEN_WINDOW - time.monotonic())

    def _should_cancel(self) -> bool:
        # An app that was told through the protocol (it received http.disconnect, or is
        # waiting in receive() for it) stops by itself, and its own cleanup must run:
        # Starlette's StreamingResponse stops the stream, then runs its background task.
        return not self._stopped and not self._app_told and not self._app_waiting

    def _begin_cancel(self) -> None:
        self._cancel_handle = None
        if self._should_cancel():
            assert self._task is not None
            self._warn_handle = self._task.get_loop().call_later(self._mw.cancel_warn_after, self._warn_stuck)
            # Level-triggered like anyio's own cancel scopes: the handler is cancelled at
            # every await until it returns, except inside a shielded anyio scope
            # (shield(), thread pool calls), where it waits for the scope to end.
            self._canceller = NativeCanceller(self._task, wanted=self._should_cancel, on_cancel=self._cancelled)
            self._canceller.start()

    def _cancelled(self) -> None:
        self.cancelled = True

    async def _cancel_after(self, delay: float) -> None:
        # trio, or the public anyio path: an anyio cancel scope around the app does it all.
        await anyio.sleep(delay)
        if self._should_cancel():
            self.cancelled = True
            self._app_scope.cancel()
            await anyio.sleep(self._mw.cancel_warn_after)
            self._warn_stuck()

    def _warn_stuck(self) -> None:
        # Not for an app that has since begun to listen itself: the cancellation stood down.
        if self._should_cancel():
            logger.warning(
                "handler still running after cancellation",
                method=self._scope.get("method"),
                path=self._scope.get("path"),
                seconds=self._mw.cancel_warn_after,
                hint=(
                    "it swallows cancellation (catches CancelledError or BaseException), "
                    "runs blocking or CPU-bound code in the event loop, or waits for a thread"
                ),
            )

    def _settle(self) -> None:
        """The app returned (asyncio fast path): stop everything, take our cancellation back."""
        self._finish()
        if self._canceller is not None:
            self._canceller.uncancel()

    def _finish(self) -> None:
        """The app returned: stop the watcher and every pending timer."""
        self._stopped = True
        if self._watcher is not None:
            self._watcher.cancel()
        if self._helpers is not None:
            for helper in self._helpers:
                helper.cancel()
        if self._cancel_handle is not None:
            self._cancel_handle.cancel()
        if self._canceller is not None:
            self._canceller.stop()
            self._warn_handle.cancel()


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
        cancel_exclude: Sequence[str] = (),
        cancel_warn_after: float = 5.0,
        send_timeout: float | None = None,
    ) -> None:
        if max_read_ahead < 0:
            raise ValueError(f"max_read_ahead must be >= 0 bytes, got {max_read_ahead!r}")
        if grace < 0:
            raise ValueError(f"grace must be >= 0 seconds, got {grace!r}")
        if cancel_warn_after <= 0:
            raise ValueError(f"cancel_warn_after must be > 0 seconds, got {cancel_warn_after!r}")
        if send_timeout is not None and not send_timeout > 0:
            raise ValueError(f"send_timeout must be > 0 seconds or None, got {send_timeout!r}")
        if isinstance(cancel_exclude, str):
            raise TypeError(f"cancel_exclude takes a sequence of path prefixes, got the string {cancel_exclude!r}")
        self.app = app
        self.cancel = cancel
        self.grace = grace
        self.on_disconnect = on_disconnect
        self.max_read_ahead = max_read_ahead
        self.cancel_exclude = tuple(cancel_exclude)
        self.cancel_warn_after = cancel_warn_after
        self.send_timeout = send_timeout
        # Requests that started in the current event loop iteration, per loop (see
        # __call__): scheduling state, not request state.
        self._batches: dict[asyncio.AbstractEventLoop, list[_Cycle]] = {}
        self._plain_sends: bool | None = None  # see _send_wrapper()

    # Any, not the Scope alias: Litestar types its scopes as TypedDicts, Starlette as
    # MutableMapping; a parameter typed Any lets both pass the middleware under mypy.
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or SCOPE_KEY in scope:
            await self.app(scope, receive, send)
            return

        loop = asyncio._get_running_loop()  # None, not an exception, under trio: cheaper
        task = None if loop is None else current_task(loop)
        cycle = _Cycle(self, scope, receive, send, task)
        app_scope = scope.copy()  # an ASGI scope is a dict: its keys table is cloned, not rebuilt
        app_scope[SCOPE_KEY] = cycle
        send_wrapper = cycle._app_send if self._plain_sends else self._send_wrapper(cycle, scope)
        if loop is None or task is None:
            # trio, the public anyio path, or a coroutine driven by hand outside a task
            error = await self._call_in_task_group(cycle, app_scope, send_wrapper)
            if cycle._slow:
                await self._after(scope, cycle)
            if error is not None:
                try:
                    raise error  # the app's own: the same object, after the abort was reported
                finally:
                    del error
            return
        # A task per request costs more than this middleware's whole budget, so the app's
        # first step runs here, by hand: an app that answers without suspending (a hello
        # world, a cached answer) needs no watcher and costs no callback. One that
        # suspends joins the requests whose watchers start from one callback in the next
        # loop iteration. (A periodic timer instead costs more: it wakes a busy server
        # 1000 times/s.)
        try:
            app = self.app(app_scope, cycle._app_receive, send_wrapper)
            if type(app) is not CoroutineType:
                app = _as_coroutine(app)  # any other awaitable an ASGI callable returns
            try:
                suspended = app.send(None)
            except StopIteration:
                pass
            else:
                batch = self._batches.get(loop)
                if batch is None:
                    batch = self._new_batch(loop)
                batch.append(cycle)
                await _resume(app, suspended)
        except BaseException as exc:
            closing = isinstance(exc, GeneratorExit)  # the coroutine is closed: it must not await again
            absorbed = not closing and self._absorbs(cycle, exc)
            cycle._stopped = True
            if cycle._slow:
                cycle._settle()
                if not closing:
                    await self._after(scope, cycle)
            if not absorbed:
                raise  # the app's own: the same object, after the abort was reported
            return
        cycle._stopped = True
        if cycle._slow:
            cycle._settle()
            await self._after(scope, cycle)

    async def _after(self, scope: Scope, cycle: _Cycle) -> None:
        """What a request that needed more than the plain path ends with."""
        if cycle._streams:
            await cycle._close_streams()
        if cycle.disconnected:
            await self._report(scope, cycle)

    def _send_wrapper(self, cycle: _Cycle, scope: Scope) -> Send:
        """The send() the app gets, when it is not the plain one (decided at the first request).

        A server before ASGI 2.4 drops a send to a closed connection and never raises, so
        the plain wrapper (no coroutine frame of ours per message) sees all there is; a
        server's spec version does not change between its requests.
        """
        if self.send_timeout is not None:
            return cycle._app_send_timed
        spec = scope.get("asgi", _NO_ASGI).get("spec_version")
        if spec is None:
            return cycle._app_send  # 2.0 (no key): it drops; not cached, a later scope may say more
        self._plain_sends = spec in _DROPPING_SPECS
        return cycle._app_send if self._plain_sends else cycle._app_send_checked

    @staticmethod
    def _absorbs(cycle: _Cycle, exc: BaseException) -> bool:
        """Is ``exc``, escaping the app, what the client's departure caused (and only that)?"""
        server = tuple(code for code in map(_code_of, (cycle._send, cycle._receive)) if code is not None)
        if not cycle.disconnected:
            # Only the server can know first: one that raises from send() or receive()
            # (ASGI 2.4) told the app, not us.
            if not _caused_by_departure(exc, server, ours_cancelled=False, server_only=True):
                return False
            cycle._unsend(None)  # a server that said it never raises (ASGI 2.3 or older)
            cycle._disconnected()
            return True
        if exc is cycle._refused:
            return True  # the server's own error, seen leaving its send() (any kind of callable)
        canceller = cycle._canceller
        if canceller is not None and canceller.count and canceller.external():
            return False  # someone else cancelled too (the server shutting down): it must propagate
        ours = canceller is not None and canceller.count > 0
        return _caused_by_departure(exc, server, ours_cancelled=ours, server_only=False)

    def _new_batch(self, loop: asyncio.AbstractEventLoop) -> list[_Cycle]:
        for stale in [other for other in self._batches if other.is_closed()]:
            del self._batches[stale]  # its loop closed before its callback ran
        batch: list[_Cycle] = []
        self._batches[loop] = batch
        loop.call_soon(self._start_watchers, loop)
        return batch

    def _start_watchers(self, loop: asyncio.AbstractEventLoop) -> None:
        for cycle in self._batches.pop(loop):
            if not cycle._stopped:
                cycle._start_watcher(loop)

    async def _call_in_task_group(self, cycle: _Cycle, app_scope: Scope, send: Send) -> BaseException | None:
        """Run the app; return what escaped it and is not absorbed."""
        # Other event loops (trio): structured concurrency the plain way, with the app
        # in a cancel scope of its own.
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            cycle._tg = tg
            cycle._slow = True
            cycle._watcher = cycle._spawn(cycle._watch)
            try:
                with anyio.CancelScope() as cycle._app_scope:
                    await self.app(app_scope, cycle._app_receive, send)
            except BaseException as exc:
                # Raised again outside the task group: never wrapped in an exception group.
                error = exc
            finally:
                cycle._finish()
                # Every helper ends before the task group does: with none left, leaving it
                # waits for nothing, so an outer cancellation cannot replace the app's outcome.
                with anyio.CancelScope(shield=True):
                    await cycle._join_helpers()
        if error is not None and not self._absorbs(cycle, error):
            return error
        return None

    async def _report(self, scope: Scope, state: DisconnectState) -> None:
        detected = state.detected_at if state.detected_at is not None else time.monotonic()
        logger.info(
            "client disconnected",
            method=scope.get("method"),
            path=scope.get("path"),
            phase=state.phase,
            elapsed_ms=round((detected - state.started_at) * 1000, 3),
            bytes_sent=state.bytes_sent,
            cancelled=state.cancelled,
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
