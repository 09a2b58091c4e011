"""guard_stream: a response body that stops, and closes its source, when the client goes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any, Generic, TypeVar

import anyio

from ._cancel import shield
from ._state import Cancellable, DisconnectState, Interruption, disconnect_state

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
      collection and never in another task. On the asyncio fast path the interruption
      is a single cancellation, so the ``finally`` may await its cleanup; on trio, on
      the reference path (docs/design.md) and whenever a framework cancels the stream
      itself, cancellation is level-triggered: put cleanup awaits inside ``shield()``
      to be safe everywhere.
    - With ``heartbeat`` (seconds), ``heartbeat_frame`` is sent to the client whenever
      the body has produced nothing for that long (an SSE comment by default), which
      keeps proxies from closing an idle stream and finds dead clients sooner. The
      frame goes straight to the server, past any middleware inside
      ``DisconnectMiddleware``: do not compress a stream that uses it.

    ``scope`` is the request's scope (``request.scope``); ``DisconnectMiddleware`` must
    be installed.
    """
    if heartbeat is not None and not heartbeat > 0:
        raise ValueError(f"heartbeat must be a positive number of seconds, got {heartbeat!r}")
    return GuardedStream(body, disconnect_state(scope), heartbeat, heartbeat_frame)


class GuardedStream(Generic[T]):
    """What ``guard_stream()`` returns. It talks to the request only through the state's
    small interface (``DisconnectState._on_departure``, ``_adopt``, ``_beside``,
    ``_send_frame``, ``_interruption``), which does nothing on a state made by hand."""

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
        self._stop: Interruption | None = None  # interrupts the current wait for the body
        self._waiting = False
        self._last = time.monotonic()  # when the client last got something
        self._beats: Cancellable | None = None  # the heartbeat helper
        self._sending_beat: anyio.Event | None = None
        state._on_departure(self._interrupt)
        state._adopt(self)  # the middleware closes it if the app abandons it

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        if self._closed or self._state.disconnected:
            await self.aclose()  # the disconnect may win before the body was ever entered
            raise StopAsyncIteration
        if self._iterator is None:
            self._iterator = aiter(self._source)
            if self._heartbeat is not None:
                self._beats = self._state._beside(self._heartbeats)
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
        self._waiting = True
        try:
            with self._state._interruption() as stop:
                self._stop = stop
                return await anext(iterator)
            raise StopAsyncIteration  # our interruption: the body is finished, the stream ends
        finally:
            self._waiting = False
            self._stop = None

    def _interrupt(self) -> None:
        # Called by the state when the departure is recorded, from whichever task saw it.
        if self._stop is not None:
            self._stop.cancel()

    async def aclose(self) -> None:
        """Close the body (shielded, so that its cleanup always completes)."""
        if self._closed:
            return
        self._closed = True
        if self._beats is not None:
            self._beats.cancel()
        self._state._forget(self._interrupt)
        close = getattr(self._iterator if self._iterator is not None else self._source, "aclose", None)
        if close is not None:
            with shield():
                await close()

    async def _heartbeats(self) -> None:
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
                    if not await self._state._send_frame(self._frame):
                        return  # the response is over, or takes no frames
                finally:
                    self._sending_beat.set()
                    self._sending_beat = None
            self._last = time.monotonic()
