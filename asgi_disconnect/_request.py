"""One request as the middleware sees it: its stages, its receive channel, its send().

Read top to bottom: the stages of a request, the receive channel (``Channel``), then
``Request``: what its send() does, how a departure is recorded and acted on, how it
ends, and last the plain anyio way of running it (a task group and a cancel scope per
request), which is the reference for ``_fastpath.FastRequest`` and its fallback. The
lifecycle table and the reasons behind each choice are in docs/design.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from ._events import emit
from ._exceptions import ClientDisconnected, caused_by_departure, code_of
from ._state import Cancellable, Detection, DisconnectState, Phase
from ._types import Message, Receive, Scope, Send

if TYPE_CHECKING:
    from ._stream import GuardedStream

# The stages of a request (``Request._stage``), in order. ABORTED is reached from OPEN or
# RESPONDING, or from COMPLETE when the server refused the final message; FINISHED from
# any stage. docs/design.md has the table of what each stage allows.
OPEN = 0  # the app has not started its response
RESPONDING = 1  # the server took http.response.start: the body is under way
COMPLETE = 2  # the final message went to the server: a later close is a normal one
ABORTED = 3  # the client left before the response was complete (``disconnected``)
FINISHED = 4  # the app returned: nothing is watched, cancelled or sent any more

DISCONNECT: Message = {"type": "http.disconnect"}
#: How deep the chain of awaits from the app to the server's send is searched.
_AWAIT_DEPTH = 64
#: Methods whose requests carry no body by convention (RFC 9110, 9.3).
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: How long after an app read its whole body itself a cancellation waits for it to listen
#: (Django and Quart wait in receive() for the disconnect and stop their views themselves).
LISTEN_WINDOW = 0.1


@dataclass(frozen=True, slots=True)
class Options:
    """A middleware's configuration, as its requests read it (shared, never changed)."""

    cancel: bool
    grace: float
    max_read_ahead: int
    cancel_exclude: tuple[str, ...]
    cancel_warn_after: float
    send_timeout: float | None
    log_completed: bool = False  # the figures of a completed request are kept for its event


async def released_receive() -> Message:
    raise RuntimeError("ASGI receive() called after the application returned")


async def released_send(message: Message) -> None:
    raise RuntimeError(f"ASGI send() called after the application returned: {message.get('type')!r}")


RELEASED_SCOPE: Mapping[str, Any] = MappingProxyType({})


class Channel:
    """The request's receive channel: the app and the watcher share the server's receive().

    It has one reader at a time, whichever of the two calls the server's ``receive()``
    first; the other waits for that read to end. What the watcher reads ahead is kept,
    whatever its type, and handed to the app first, in order. Created for a request
    whose app calls ``receive()`` or that gets a watcher, never for the others.
    """

    def __init__(self, request: Request, receive: Receive, scope: Mapping[str, Any], max_read_ahead: int) -> None:
        self._request = request
        self._receive = receive
        self._scope = scope
        self._limit = max_read_ahead
        # What the app did.
        self.app_read = False  # it called receive() itself
        self.app_waiting = 0  # its receive() calls blocked now: they are told at once
        self.app_told = False  # it was handed http.disconnect
        self.body_read_at: float | None = None  # when it received the end of its body
        # What the server did.
        self.body_complete = False  # the last http.request came
        self.received = 0  # request body bytes the server delivered
        self.ended = False  # http.disconnect came: a normal close or an abort
        self._error: Exception | None = None  # the watcher's receive() failed: the app's to get
        # The reads.
        self._reading = False  # a server receive() is in flight
        self._buffer: deque[Message] | None = None  # read ahead, not yet handed to the app
        self._buffered = 0  # body bytes in _buffer
        self._tick: anyio.Event | None = None  # set when a read ends or the app takes a message
        self._read_ahead: bool | None = None  # see _may_read_ahead(), decided at first need

    @property
    def listening(self) -> bool:
        """The app hears of the departure through receive(): it handles it itself."""
        return self.app_told or self.app_waiting > 0

    async def receive(self) -> Message:
        """The ``receive()`` the app calls."""
        self.app_read = True
        while True:
            if self._buffer:
                message = self._buffer.popleft()
                self._buffered -= len(message.get("body", b""))
                self._notify()
                break
            if self.ended or self._request.disconnected:
                message = DISCONNECT  # at once: nothing more will come
                break
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            self.app_waiting += 1
            try:
                if not self._reading:
                    message = await self._read()
                    break
                await self._wait_tick()
            finally:
                self.app_waiting -= 1
        kind = message["type"]
        if kind == "http.disconnect":
            self.app_told = True
        elif kind == "http.request" and not message.get("more_body", False) and self._request.cancel:
            self.body_read_at = time.monotonic()  # see Request._cancel_delay()
        return message

    async def watch(self) -> None:
        """Read the channel while the app runs, until the disconnect or the response ends."""
        request = self._request
        while request._stage < COMPLETE and not self.ended:
            if self._reading or not self._may_read():
                await self._wait_tick()
                continue
            try:
                message = await self._read()
            except Exception as exc:
                self._error = exc  # the app gets it from its next receive(), as without us
                return
            if message["type"] != "http.disconnect":
                if self._buffer is None:
                    self._buffer = deque()
                self._buffer.append(message)
                self._buffered += len(message.get("body", b""))

    async def _read(self) -> Message:
        self._reading = True
        try:
            message = await self._receive()
        finally:
            self._reading = False
            self._notify()
        kind = message["type"]
        if kind == "http.request":
            self.received += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.body_complete = True
        elif kind == "http.disconnect":
            self.ended = True
            self._request._client_left()
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
        if self.body_complete:
            return True  # only http.disconnect can come now: reading takes nothing from the app
        if self.app_read:
            return False  # the app is consuming the body: it alone decides how much is read
        if self._read_ahead is None:
            self._read_ahead = self._may_read_ahead()
        return self._read_ahead and (self._buffered < self._limit or not self._buffered)

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
            return length.isdigit() and int(length) <= self._limit
        # No framing header: HTTP/1 has no body then. HTTP/2 and 3 send none for a bodiless
        # request either, and may stream a body without one: trust the method.
        return self._scope.get("http_version", "1.1") in ("1.0", "1.1") or self._scope.get("method") in _BODILESS


class Request(DisconnectState):
    """One request: its ``DisconnectState``, its send() and, when needed, its ``Channel``.

    It is the state the app reads (one object per request, not two); ``finish()`` lets
    go of the server's callables and the scope when the app returns, so that a state
    kept after its request holds nothing of it (``_options`` is the shared configuration).
    """

    # What every request writes: slots. The rest are class-level defaults that only a
    # request that needs them overrides (docs/design.md, "The plain path").
    __slots__ = (
        "_options",
        "_receive",
        "_scope",
        "_send",
        "_stage",
        "_start",
        "bytes_sent",
        "cancel",
        "started_at",
    )
    _options: Options
    _scope: Mapping[str, Any]
    _receive: Receive
    _send: Send
    _stage: int
    _start: Message | None
    # The receive side, once needed.
    _channel: Channel | None = None
    # The response.
    _trailers = False  # http.response.start announced trailers
    _chunks = 0  # body messages before the final one that the server accepted
    _more_sent = False  # a message that is neither a start nor a body went after the start
    _status: int | None = None  # the figures settle() keeps for the record
    _received = 0
    _refused: OSError | None = None  # the server's error from a send it refused (ASGI 2.4)
    _streams: list[GuardedStream[Any]] | None = None  # guard_stream bodies to close if abandoned
    # The way the request runs: what is watching and what will cancel it.
    _watcher: Cancellable | None = None
    _task: asyncio.Task[Any] | None = None  # the task a native cancellation targets (fast path)
    _tg: anyio.abc.TaskGroup | None = None
    _app_scope: anyio.CancelScope | None = None
    _helpers: list[anyio.CancelScope] | None = None
    _running = 0  # helpers not yet ended
    _idle: anyio.Event | None = None  # set when the last helper ends
    _app_coro: Any = None  # the app's awaitable while _run awaits it (see _start_in_flight)

    def __init__(self, options: Options, scope: Scope, receive: Receive, send: Send) -> None:
        # Not DisconnectState.__init__: this runs once per request, every write counts.
        self.started_at = time.monotonic()
        self.bytes_sent = 0
        self.cancel = options.cancel and not (
            options.cancel_exclude and scope["path"].startswith(options.cancel_exclude)
        )
        self._options = options
        self._scope = scope  # the server's, never the copy that holds the state
        self._receive = receive
        self._send = send
        self._stage = OPEN
        self._start = None  # the http.response.start the server took

    # -- receive --------------------------------------------------------------------------

    def app_receive(self) -> Awaitable[Message]:
        """The ``receive()`` the app gets."""
        channel = self._channel
        return (channel if channel is not None else self._open_channel()).receive()

    def _open_channel(self) -> Channel:
        """The request's channel, created at the first need of the app or a watcher."""
        channel = self._channel
        if channel is None:
            self._channel = channel = Channel(self, self._receive, self._scope, self._options.max_read_ahead)
        return channel

    # -- send -----------------------------------------------------------------------------

    def app_send(self, message: Message) -> Awaitable[None]:
        """The ``send()`` the app gets: the server's own awaitable, no frame of ours.

        A server's ``OSError`` therefore reaches the app as it is; ``absorbs()`` knows it.
        """
        if self._stage > RESPONDING:
            return self._send_late(message)
        kind = message["type"]
        if kind == "http.response.body":
            self.bytes_sent += len(message.get("body", b""))
            if message.get("more_body", False) or self._trailers:
                self._chunks += 1
                return self._send(message)
        elif kind == "http.response.start":
            self._stage = RESPONDING
            self._start = message
            if message.get("trailers", False):
                self._trailers = True
            return self._send(message)
        elif not (
            kind == "http.response.pathsend"
            or (kind == "http.response.trailers" and not message.get("more_trailers", False))
            or (kind == "http.response.zerocopysend" and not message.get("more_body", False))
        ):
            if self._start is not None:
                self._more_sent = True  # trailers, zerocopysend, a type of its own: the start went
            return self._send(message)
        # The final message. Complete before the server's send returns: a server that sees
        # the client close while flushing the last bytes must not turn it into an abort.
        # And nothing is watched after it: background tasks must never be disturbed.
        self._stage = COMPLETE
        if self._watcher is not None:
            self._watcher.cancel()
        return self._send(message)

    def _send_late(self, message: Message) -> Awaitable[None]:
        """A send once the response is complete, the client gone, or the app returned."""
        stage = self._stage
        if stage != ABORTED:
            return self._send(message)  # complete (the server answers as without us), or returned
        channel = self._channel
        if channel is not None and channel.listening:
            # The app hears of the departure through receive() and handles it itself
            # (Django, Quart, Starlette's streams): its sends meet the server as they would
            # without the middleware.
            return self._send(message)
        if self._streams:
            return self._close_streams(raise_after=True)
        raise self._departure_error()

    async def app_send_checked(self, message: Message) -> None:
        """``app_send`` for a server that may raise (ASGI 2.4): a refused send is recorded."""
        gone = self._stage >= COMPLETE  # after the response, a server's error is no departure
        try:
            await self.app_send(message)
        except OSError as exc:
            if not gone and self._stage != FINISHED:
                # Only the server's send() can have raised: the client is gone, and the
                # message was not delivered, even if the app goes on.
                self._refused = exc
                self._client_left(self._undo(message), "send_failed")
            raise

    def app_send_timed(self, message: Message) -> Awaitable[None]:
        """``app_send_checked`` within ``send_timeout``: a stalled client counts as gone."""
        return self._within_send_timeout(message)

    async def _within_send_timeout(self, message: Message) -> None:
        timeout = self._options.send_timeout
        counted = self._stage <= RESPONDING  # app_send() counts it in the figures
        with anyio.move_on_after(timeout) as timer:
            await self.app_send_checked(message)
        if timer.cancelled_caught:
            # A peer that stopped reading (half-open TCP, a stuck client): it is gone, and
            # the message it did not take was not delivered.
            if counted:
                self._undo(message)
            self._client_left("stalled", "send_stalled")
            raise ClientDisconnected(f"client stalled: one send blocked more than {timeout} s")

    def _undo(self, message: Message | None) -> Phase:
        """The server did not take ``message`` (None: unknown); return the phase it leaves.

        Unknown, a refusal right after the start, before any body, is taken for one of the
        start (a server that raises without saying so: it cannot have taken the start and
        refused nothing after it). Otherwise the figures may count the message it refused.
        """
        if message is None:
            if self._stage == RESPONDING and not self.bytes_sent and not self._chunks:
                self._start = None
        else:
            kind = message["type"]
            if kind == "http.response.start":
                self._start = None
                if self.phase == "mid_body":  # recorded meanwhile, from the start it refused
                    self.phase = "before_response"
            elif kind == "http.response.body":
                self.bytes_sent -= len(message.get("body", b""))
                if message.get("more_body", False) or self._trailers:
                    self._chunks -= 1
        return self._phase_now()

    def _phase_now(self) -> Phase:
        """Where a departure now stands: did the server take the response's start?

        Not while the server's send of it is still under way (a client that stopped
        reading blocks it): the client has had no response.
        """
        if self._start is None or self._start_in_flight():
            return "before_response"
        return "mid_body"

    def _start_in_flight(self) -> bool:
        """Is the app waiting in the server's send of the start, now, with nothing sent after?

        Read from the chain of awaits of what runs the app, only when a departure is
        recorded: nothing on the way of a request (docs/design.md). A send that is not a
        coroutine (none of the servers') counts as taken once called.
        """
        if self.bytes_sent or self._chunks or self._more_sent:
            return False  # a message went after the start: the server had taken it
        code = code_of(self._send)
        awaited = self._awaiting()
        for _ in range(_AWAIT_DEPTH):
            if awaited is None or code is None:
                return False
            if getattr(awaited, "cr_code", None) is code:
                return True
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        return False

    def _awaiting(self) -> Any:
        """The outermost coroutine of the app's await chain while it runs (None: unknown)."""
        return self._app_coro

    def _departure_error(self) -> ClientDisconnected:
        return ClientDisconnected(f"client disconnected ({self.phase}); the response was not delivered")

    # -- what guard_stream uses -----------------------------------------------------------

    def _adopt(self, stream: Any) -> None:
        if self._streams is None:
            self._streams = []
        self._streams.append(stream)

    async def _close_streams(self, raise_after: bool = False) -> None:
        # The app abandoned a guard_stream body (its send failed mid-iteration): close it
        # now, in this task, rather than at garbage collection in another one.
        streams, self._streams = self._streams or [], []
        for stream in streams:
            await stream.aclose()
        if raise_after:
            raise self._departure_error()

    async def _send_frame(self, frame: bytes) -> bool:
        if self._stage == OPEN:
            return True  # no response yet: a frame may go once it has started
        start = self._start
        if start is None or self._stage != RESPONDING:
            return False  # complete, aborted or returned: never again
        if any(name.lower() == b"content-length" for name, _ in start.get("headers", ())):
            return False  # a framed body: extra bytes would corrupt it
        try:
            await self._send({"type": "http.response.body", "body": frame, "more_body": True})
        except OSError:
            self._client_left(None, "send_failed")
            return False
        self.bytes_sent += len(frame)
        self._chunks += 1
        return True

    # -- the departure --------------------------------------------------------------------

    def _record_departure(self, phase: Phase | None = None, detected_by: Detection = "http.disconnect") -> bool:
        """Record that the client left before the response was complete; True if it is news.

        A server's refusal (any ``detected_by`` but its ``http.disconnect``) of the final
        message counts too: that message was not delivered.
        """
        stage = self._stage
        if stage >= ABORTED or (stage == COMPLETE and detected_by == "http.disconnect"):
            return False  # recorded already, after the whole response, or after the app
        self._stage = ABORTED
        self._record(phase or self._phase_now(), time.monotonic(), detected_by)
        return True

    def _client_left(self, phase: Phase | None = None, detected_by: Detection = "http.disconnect") -> None:
        """The client is gone while the app runs: record it, and cancel if the policy says so.

        Never a cancellation once the app has sent its final message, even one the server
        refused: what the app does after its response (its cleanup, background tasks) is
        never disturbed.
        """
        complete = self._stage == COMPLETE
        if self._record_departure(phase, detected_by) and self.cancel and not complete:
            self._cancel_soon(self._cancel_delay())  # the policy as it stands now

    def _cancel_delay(self) -> float:
        """The grace period, or longer for an app that may be about to listen itself.

        An app that read its whole body through receive() hears the disconnect from its
        next receive(); frameworks that listen (Django) make that call right after
        building the request. A cancellation in between would kill them outside their
        own lifecycle, so it waits until ``LISTEN_WINDOW`` after the end of the body.
        """
        grace = self._options.grace
        read_at = self._channel.body_read_at if self._channel is not None else None
        if read_at is None or self._start is not None:
            return grace  # it never read its body, or it is answering: not about to listen
        return max(grace, read_at + LISTEN_WINDOW - time.monotonic())

    def _should_cancel(self) -> bool:
        # An app that was told through the protocol (it received http.disconnect, or waits
        # in receive() for it) stops by itself, and its own cleanup must run: Starlette's
        # StreamingResponse stops the stream, then runs its background task.
        channel = self._channel
        return self._stage == ABORTED and (channel is None or not channel.listening)

    def _warn_stuck(self) -> None:
        # Not for an app that has since begun to listen itself: the cancellation stood down.
        if self._should_cancel():
            fields = {
                "method": self._scope.get("method"),
                "path": self._scope.get("path"),
                "seconds": self._options.cancel_warn_after,
                "hint": (
                    "it swallows cancellation (catches CancelledError or BaseException), "
                    "runs blocking or CPU-bound code in the event loop, or waits for a thread"
                ),
            }
            emit(logging.WARNING, "handler_still_running", fields)

    # -- the end --------------------------------------------------------------------------

    def absorbs(self, exc: BaseException) -> bool:
        """Is ``exc``, escaping the app, what the client's departure caused (and only that)?"""
        server = tuple(code for code in map(code_of, (self._send, self._receive)) if code is not None)
        if not self.disconnected:
            # Only the server can know first: one that raises from send() or receive()
            # (ASGI 2.4) told the app, not us.
            if not caused_by_departure(exc, server, ours_cancelled=False, server_only=True):
                return False
            self._record_departure(self._undo(None), "send_failed")  # one that said it never raises
            return True
        if exc is self._refused:
            return True  # the server's own error, seen leaving its send() (any kind of callable)
        ours = self._cancellation()
        if ours == "external":
            return False  # someone else cancelled too (the server shutting down): it must propagate
        return caused_by_departure(exc, server, ours_cancelled=ours == "ours", server_only=False)

    def finish(self) -> bool:
        """The app returned: stop what runs beside it and let go of the request.

        True if the request needs ``after()``: a stream to close or a departure to report
        (or, with ``log_completed``, a completion).
        """
        needed = self.disconnected or self._streams is not None or self._options.log_completed
        if needed:
            self._settle()
        self._stage = FINISHED
        if self._task is not None:
            self._stop()
        self._send = released_send
        self._receive = released_receive
        self._scope = RELEASED_SCOPE
        self._start = None
        if self._refused is not None:
            self._refused = None  # its traceback holds the server's frames
        if self._channel is not None:
            self._channel = None
        return needed

    def _settle(self) -> None:
        """Keep the figures of the record from what ``finish()`` lets go of."""
        start = self._start
        # Not the status of a start the client never had (its send was under way when it left).
        self._status = start.get("status") if start is not None and self.phase != "before_response" else None
        channel = self._channel
        self._received = channel.received if channel is not None else 0
        if self._stage == COMPLETE and not self._trailers:
            self._chunks += 1  # the final body message (or a pathsend), not counted when sent

    def _stop(self) -> None:
        """Stop what runs beside the app in its task (the fast path; never called here)."""

    # -- the plain anyio way to run it (the reference; _fastpath.FastRequest on asyncio) --

    def start(self, awaitable: Awaitable[None]) -> Awaitable[None] | None:
        """Run the app's ``awaitable``: what to await until it ends (None: it has ended)."""
        return self._run(awaitable)

    async def _run(self, awaitable: Awaitable[None]) -> None:
        # Structured concurrency the plain way: a task group, the app in a cancel scope.
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._watcher = self._spawn(self._open_channel().watch)
            try:
                with anyio.CancelScope() as scope:
                    self._app_scope = scope
                    self._app_coro = awaitable
                    await awaitable
            except BaseException as exc:
                error = exc  # raised again outside the task group: never wrapped in a group
            finally:
                self._tg = None  # the app has returned: nothing new starts beside it
                self._stop_helpers()
                # Every helper ends before the task group does: with none left, leaving it
                # waits for nothing, so an outer cancellation cannot replace the app's outcome.
                with anyio.CancelScope(shield=True):
                    await self._join_helpers()
                self._helpers = None
                self._watcher = self._app_scope = self._app_coro = None
        if error is not None:
            try:
                raise error
            finally:
                del error

    def _cancel_soon(self, delay: float) -> None:
        if self._tg is not None:  # None once the app has returned
            self._spawn(self._cancel_after, delay)

    async def _cancel_after(self, delay: float) -> None:
        await anyio.sleep(delay)
        if self._should_cancel() and self._app_scope is not None:
            self._mark_cancelled()
            self._app_scope.cancel()
            await anyio.sleep(self._options.cancel_warn_after)
            self._warn_stuck()

    def _cancellation(self) -> str | None:
        """Whose cancellation reached the app: ``"ours"``, ``"external"`` or None.

        Here always None: the app's cancel scope catches ours, and anyio's own rules
        decide what an outer one does.
        """
        return None

    def _beside(self, func: Callable[[], Coroutine[Any, Any, None]]) -> Cancellable | None:
        return self._spawn(func) if self._tg is not None else None  # None once the app has returned

    def _spawn(self, func: Callable[..., Awaitable[None]], *args: Any) -> anyio.CancelScope:
        """Run ``func`` beside the app until ``_stop_helpers()`` or its scope stops it.

        Shielded: an outer cancellation is the app's to receive. Reaching a helper, it
        would escape the task group in place of what the app itself raised or returned.
        """
        assert self._tg is not None
        scope = anyio.CancelScope(shield=True)
        if self._helpers is None:
            self._helpers = []
        self._helpers.append(scope)
        self._running += 1
        method = self._scope.get("method")

        async def run() -> None:
            try:
                with scope:
                    await func(*args)
            except Exception:
                # Ours, not the app's: logged, never raised into the task group in its place.
                emit(logging.ERROR, "helper_failed", {"method": method}, exc_info=True)
            finally:
                self._running -= 1
                if not self._running and self._idle is not None:
                    self._idle.set()

        self._tg.start_soon(run)
        return scope

    def _stop_helpers(self) -> None:
        if self._helpers is not None:
            for helper in self._helpers:
                helper.cancel()

    async def _join_helpers(self) -> None:
        while self._running:
            self._idle = anyio.Event()
            await self._idle.wait()
