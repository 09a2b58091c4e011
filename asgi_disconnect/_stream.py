"""guard_stream: a response body that stops, and closes its source, when the client goes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from ._cancel import NativeCanceller, asyncio_task, shield

if TYPE_CHECKING:
    from ._state import DisconnectState

T = TypeVar("T")


def guard_stream(
    body: AsyncIterable[T],
    scope: Mapping[str, Any],
    *,
    heartbeat: float | None = None,
    heartbeat_frame: bytes = b": ping\n\n",
) -> AsyncIterator[T]:
    """Wrap a response body so that it stops when the client goes away.

    - It ends as soon as the client is gone, interrupting the body while it waits on
      an upstream (an LLM, a database cursor, a subprocess), not only between chunks;
      no chunk produced after the disconnect is detected is passed on.
    - It always closes ``body`` (``aclose()``) in the task that iterates it, before the
      response returns: the generator's ``finally`` runs then, never at garbage
      collection and never in another task. On asyncio the interruption is a single
      cancellation, so the ``finally`` may await its cleanup; on trio, and whenever a
      framework cancels the stream itself, cancellation is level-triggered: put
      cleanup awaits inside ``shield()`` to be safe everywhere.
    - With ``heartbeat`` (seconds), ``heartbeat_frame`` is sent to the client whenever
      the body has produced nothing for that long (an SSE comment by default), which
      keeps proxies from closing an idle stream and finds dead clients sooner. The
      frame goes straight to the server, past any middleware inside
      ``DisconnectMiddleware``: do not compress a stream that uses it.

    ``scope`` is the request's scope (``request.scope``); ``DisconnectMiddleware`` must
    be installed.
    """
    from ._middleware import disconnect_state

    if heartbeat is not None and not heartbeat > 0:
        raise ValueError(f"heartbeat must be a positive number of seconds, got {heartbeat!r}")
    return _GuardedStream(body, disconnect_state(scope), heartbeat, heartbeat_frame)


class _GuardedStream(Generic[T]):
    __slots__ = (
        "_beats",
        "_closed",
        "_frame",
        "_heartbeat",
        "_iterator",
        "_last",
        "_sending_beat",
        "_source",
        "_state",
        "_stop",
        "_waiting",
    )

    def __init__(self, body: AsyncIterable[T], state: DisconnectState, heartbeat: float | None, frame: bytes) -> None:
        self._source = body
        self._iterator: AsyncIterator[T] | None = None
        self._state = state
        self._heartbeat = heartbeat
        self._frame = frame
        self._closed = False
        # How the current wait for the body is interrupted: a NativeCanceller of the
        # iterating task (asyncio) or a cancel scope (trio); None between chunks.
        self._stop: NativeCanceller | anyio.CancelScope | None = None
        self._waiting = False
        self._last = time.monotonic()  # when the client last got something
        self._beats: Any = None  # the heartbeat task (asyncio) or cancel scope (trio)
        self._sending_beat: anyio.Event | None = None
        callbacks = state._on_disconnect
        if callbacks is None:
            callbacks = state._on_disconnect = []
        callbacks.append(self._interrupt)
        register = getattr(state, "_register_stream", None)
        if register is not None:
            register(self)  # the middleware closes it if the app abandons it

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        if self._closed or self._state.disconnected:
            await self.aclose()  # the disconnect may win before the body was ever entered
            raise StopAsyncIteration
        if self._iterator is None:
            self._iterator = aiter(self._source)
            if self._heartbeat is not None:
                self._start_heartbeats()
        try:
            chunk = await self._next(self._iterator)
        except BaseException:
            # StopAsyncIteration, the body's own error, or a cancellation from outside
            # (Starlette's disconnect listener): close the body here and now.
            await self.aclose()
            raise
        if self._sending_beat is not None:
            await self._sending_beat.wait()  # never two sends at once
        if self._state.disconnected:
            await self.aclose()
            raise StopAsyncIteration
        self._last = time.monotonic()
        return chunk

    async def _next(self, iterator: AsyncIterator[T]) -> T:
        task = asyncio_task()
        self._waiting = True
        try:
            if task is not None:
                # Once: the wait is interrupted, and the body's own cleanup (its finally,
                # which runs inside this anext) is not cancelled again.
                self._stop = NativeCanceller(task, once=True)
                try:
                    return await anext(iterator)
                except asyncio.CancelledError:
                    if not self._stop.count or self._stop.external():
                        raise
                    # Our interruption: the body is finished, the stream ends normally.
                    raise StopAsyncIteration from None
                finally:
                    self._stop.stop()
                    self._stop.uncancel()
            with anyio.CancelScope() as scope:
                self._stop = scope
                return await anext(iterator)
            raise StopAsyncIteration  # the scope caught our cancellation
        finally:
            self._waiting = False
            self._stop = None

    def _interrupt(self) -> None:
        # Called by the state when the disconnect is recorded, from whichever task saw it.
        if self._stop is not None:
            if isinstance(self._stop, NativeCanceller):
                self._stop.start()
            else:
                self._stop.cancel()

    async def aclose(self) -> None:
        """Close the body (shielded, so that its cleanup always completes)."""
        if self._closed:
            return
        self._closed = True
        if self._beats is not None:
            self._beats.cancel()
        callbacks = self._state._on_disconnect
        if callbacks is not None and self._interrupt in callbacks:
            callbacks.remove(self._interrupt)
        close = getattr(self._iterator if self._iterator is not None else self._source, "aclose", None)
        if close is not None:
            with shield():
                await close()

    # -- heartbeats ----------------------------------------------------------------

    def _start_heartbeats(self) -> None:
        task = asyncio_task()
        if task is not None:
            self._beats = task.get_loop().create_task(self._heartbeats())
            return
        spawn = getattr(self._state, "_spawn", None)
        if spawn is not None:
            self._beats = spawn(self._heartbeats)

    async def _heartbeats(self) -> None:
        send_frame = getattr(self._state, "_send_heartbeat", None)
        if send_frame is None:
            return  # a DisconnectState made by hand: there is no server to send to
        assert self._heartbeat is not None
        while not self._closed and not self._state.disconnected:
            due = self._last + self._heartbeat
            now = time.monotonic()
            if now < due:
                await anyio.sleep(due - now)
                continue
            if self._waiting:
                # The consumer waits for the body, so it is not sending: the frame can go.
                self._sending_beat = anyio.Event()
                try:
                    await send_frame(self._frame)
                finally:
                    self._sending_beat.set()
                    self._sending_beat = None
            self._last = time.monotonic()
