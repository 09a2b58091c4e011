from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import anyio

#: Where a disconnect happened: before the app started its response, mid-body, or a
#: client that stopped reading ("stalled": one send blocked longer than allowed).
Phase = Literal["before_response", "mid_body", "stalled"]


class DisconnectState:
    """Disconnect state of one HTTP request, shared through ``scope[SCOPE_KEY]``.

    Frameworks copy the scope dict, so this object (not a bool) is what every copy
    holds: a flag set by the middleware is seen by every layer of the app.
    """

    # Class-level defaults, not __slots__: a request sets only what differs from them,
    # which halves the cost of creating the state on the per-request hot path.
    #: True once the client went away before the response was complete.
    disconnected: bool = False
    #: ``"before_response"`` or ``"mid_body"`` once ``disconnected`` is true.
    phase: Phase | None = None
    #: ``time.monotonic()`` when the middleware learnt of the disconnect.
    detected_at: float | None = None
    #: Response body bytes the server accepted from the app.
    bytes_sent: int = 0
    #: Whether the handler should be cancelled on an early disconnect; read at the
    #: moment of the disconnect, so a handler may change it while it runs.
    cancel: bool = False
    #: True once the middleware cancelled the handler.
    cancelled: bool = False
    _event: anyio.Event | None = None
    _on_disconnect: list[Callable[[], None]] | None = None  # run by _mark (guard_stream)

    def __init__(self, started_at: float, cancel: bool = False) -> None:
        #: ``time.monotonic()`` when the middleware received the request.
        self.started_at = started_at
        self.cancel = cancel

    async def wait(self) -> None:
        """Return once the client has gone away (at once if it already has)."""
        if self.disconnected:
            return
        if self._event is None:
            # Created on first use only: most requests never wait.
            self._event = anyio.Event()
        await self._event.wait()

    def _mark(self, phase: Phase, now: float) -> None:
        self.disconnected = True
        self.phase = phase
        self.detected_at = now
        if self._event is not None:
            self._event.set()
        if self._on_disconnect is not None:
            for callback in self._on_disconnect:
                callback()

    def __repr__(self) -> str:
        if not self.disconnected:
            return f"<DisconnectState connected bytes_sent={self.bytes_sent}>"
        return (
            f"<DisconnectState disconnected phase={self.phase} bytes_sent={self.bytes_sent}"
            f"{' cancelled' if self.cancelled else ''}>"
        )
