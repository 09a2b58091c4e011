"""The per-request state that every layer of the app reads: ``DisconnectState``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import anyio

from ._events import emit

#: The scope key that holds the request's ``DisconnectState``.
SCOPE_KEY = "asgi_disconnect"

#: Where a disconnect happened: before the app started its response, mid-body, or a
#: client that stopped reading ("stalled": one send blocked longer than ``send_timeout``).
Phase = Literal["before_response", "mid_body", "stalled"]

#: How the middleware learnt of the departure: the server's ``http.disconnect``, a send the
#: server refused (an ``OSError``, ASGI 2.4), or a send blocked past ``send_timeout``.
Detection = Literal["http.disconnect", "send_failed", "send_stalled"]

_INSTALL_HINT = (
    "install DisconnectMiddleware in front of your app: `app = DisconnectMiddleware(app)`, "
    "`app.add_middleware(DisconnectMiddleware)` (Starlette, FastAPI) or "
    "`middleware=[DisconnectMiddleware]` (Litestar)"
)


class Cancellable(Protocol):
    """What ``DisconnectState._beside()`` returns: something that can be stopped."""

    def cancel(self) -> Any: ...


class Interruption(Protocol):
    """What ``DisconnectState._interruption()`` returns: a scope whose wait ``cancel()`` ends.

    Used as ``with state._interruption() as scope:``; the interruption it delivers is
    swallowed when the block exits, and ``cancelled_caught`` then says so.
    """

    @property
    def cancelled_caught(self) -> bool: ...

    def cancel(self) -> Any: ...

    def __enter__(self) -> Interruption: ...

    def __exit__(self, *exc_info: Any) -> bool | None: ...


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What one request amounted to: the fields of its log event, for hooks and exporters.

    Built once the handler has returned, for every aborted request (``state.record``) and,
    with ``log_completed=True``, for completed ones too (whose departure fields are None).
    Nothing from the bodies, no header but the request id, no query string; the client's
    address only with ``log_client=True``.
    """

    #: The request method, as the client sent it.
    method: str
    #: The request path, without the query string.
    path: str
    #: The route template the framework matched (``"/items/{item_id}"``), None when none did.
    route: str | None
    #: Where the client left (None: it did not).
    phase: Phase | None
    #: How the departure was noticed (None: it was not one).
    detected_by: Detection | None
    #: The response status, if the server took ``http.response.start``.
    status: int | None
    #: Response body bytes, and ``http.response.body`` messages, the server accepted.
    bytes_sent: int
    chunks_sent: int
    #: Request body bytes the server delivered.
    bytes_received: int
    #: Milliseconds from the request's arrival to the detection of the departure.
    detected_after_ms: float | None
    #: Milliseconds from the detection to the handler's return (its cleanup).
    cleanup_ms: float | None
    #: Milliseconds from the request's arrival to the handler's return.
    duration_ms: float
    #: Whether the middleware cancelled the handler.
    cancelled: bool
    #: The request id, from the configured header or structlog's context (``request_id``).
    request_id: str | None
    #: ``"host:port"`` of the client, only with ``log_client=True``.
    client: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as the log event carries them (``client`` only when recorded)."""
        fields = asdict(self)
        if fields["client"] is None:
            del fields["client"]
        return fields


class DisconnectState:
    """Disconnect state of one HTTP request, shared through ``scope[SCOPE_KEY]``.

    Frameworks copy the scope dict, so this object (not a bool) is what every copy
    holds: a flag set by the middleware is seen by every layer of the app. Once the
    request has ended it holds only these figures, nothing of the request itself.
    """

    #: True once the client went away before the response was complete.
    disconnected: bool = False
    #: ``"before_response"``, ``"mid_body"`` or ``"stalled"`` once ``disconnected`` is true.
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
    #: How the departure was noticed, once ``disconnected`` is true.
    detected_by: Detection | None = None
    #: The route template for the record, where the framework records none (Django):
    #: an app may set it; otherwise it is read from the scope when the request ends.
    route: str | None = None
    #: What the request amounted to, once it ended aborted (before the hooks run).
    record: RequestRecord | None = None
    _event: anyio.Event | None = None  # made by the first wait(): most requests never wait
    _callbacks: list[Callable[[], None]] | None = None  # see _on_departure()
    _cancel_callbacks: list[Callable[[], None]] | None = None  # see _on_cancel()

    def __init__(self, started_at: float, cancel: bool = False) -> None:
        #: ``time.monotonic()`` when the middleware received the request.
        self.started_at = started_at
        self.cancel = cancel

    async def wait(self) -> None:
        """Return once the client has gone away (at once if it already has)."""
        if self.disconnected:
            return
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()

    def _record(self, phase: Phase, now: float, detected_by: Detection = "http.disconnect") -> None:
        self.disconnected = True
        self.phase = phase
        self.detected_by = detected_by
        self.detected_at = now
        if self._event is not None:
            self._event.set()
        if self._callbacks is not None:
            for callback in self._callbacks:
                callback()

    # -- what guard_stream uses (a state made by hand has no request behind it) ----------

    def _on_departure(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when the departure is recorded, from whichever task sees it."""
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(callback)

    def _forget(self, callback: Callable[[], None]) -> None:
        if self._callbacks is not None and callback in self._callbacks:
            self._callbacks.remove(callback)

    def _on_cancel(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when the middleware cancels the handler, before it lands."""
        if self._cancel_callbacks is None:
            self._cancel_callbacks = []
        self._cancel_callbacks.append(callback)

    def _mark_cancelled(self) -> None:
        if self.cancelled:
            return  # the fast path repeats its cancel at every await: the news is told once
        self.cancelled = True
        if self._cancel_callbacks is not None:
            for callback in self._cancel_callbacks:
                try:
                    callback()
                except Exception:
                    # Told from inside the cancellation: it must be delivered all the same.
                    emit(logging.ERROR, "cancel_callback_failed", {"callback": repr(callback)}, exc_info=True)

    def _adopt(self, stream: Any) -> None:
        """The request closes ``stream`` (its ``aclose()``) if the app abandons it."""

    def _beside(self, func: Callable[[], Coroutine[Any, Any, None]]) -> Cancellable | None:
        """Run ``func`` beside the app until the request ends; None: it cannot here."""
        return None

    async def _send_frame(self, frame: bytes) -> bool:
        """Send ``frame`` as body bytes if the response is an open, unframed stream.

        False once no frame can ever be sent: the heartbeats stop.
        """
        return False

    def _interruption(self) -> Interruption:
        """A scope for one wait that ``cancel()`` interrupts (anyio's, on every backend)."""
        return anyio.CancelScope()

    def __repr__(self) -> str:
        if not self.disconnected:
            return f"<DisconnectState connected bytes_sent={self.bytes_sent}>"
        return (
            f"<DisconnectState disconnected phase={self.phase} bytes_sent={self.bytes_sent}"
            f"{' cancelled' if self.cancelled else ''}>"
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
