"""Aborted requests on the OpenTelemetry server span: ``AbortTracing``.

Needs ``opentelemetry-api`` only (the ``[opentelemetry]`` extra), imported when this
module is. The span is the one opentelemetry-instrumentation-asgi's
``OpenTelemetryMiddleware`` (or ``FastAPIInstrumentor``, ``StarletteInstrumentor``)
starts; it may sit outside ``DisconnectMiddleware`` or inside it, and ``AbortTracing``
has an entry point for each order.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Collection
from functools import partial
from typing import Any, get_args

from ._events import emit
from ._state import SCOPE_KEY, DisconnectState, Phase
from ._types import Scope

try:
    from opentelemetry import trace
    from opentelemetry.trace import Span, Status, StatusCode
except ImportError as exc:
    raise ImportError(
        "asgi_disconnect.opentelemetry needs opentelemetry-api: pip install 'asgi-disconnect[opentelemetry]'"
    ) from exc

__all__ = ["ERROR_TYPE", "AbortTracing"]

#: ``error.type`` of an aborted request: one low-cardinality value, whatever the phase.
ERROR_TYPE = "client_disconnected"

_PHASES: tuple[str, ...] = get_args(Phase)
_MID_BODY: tuple[Phase, ...] = ("mid_body",)
_StateRef = Callable[[], DisconnectState | None]


class AbortTracing:
    """Record each aborted request on its OpenTelemetry server span.

    The span gets ``error.type="client_disconnected"``, ``http.response.body.size`` (the
    body bytes the server accepted) and ``asgi_disconnect.phase``,
    ``asgi_disconnect.detected_by`` and ``asgi_disconnect.cancelled``; its status is
    Error for the phases in ``error_phases``: by default ``mid_body`` alone, whose
    response was cut short (a client that left before any response is no server error;
    ``stalled`` may be either, so it is the app's to add). A request that is not aborted
    gets nothing. Use it where the span is still open:

    - OpenTelemetry outside (``OpenTelemetryMiddleware(DisconnectMiddleware(app, ...))``):
      as the middleware's hook, ``on_disconnect=tracing``. It runs while the server
      span is current.
    - OpenTelemetry inside (``DisconnectMiddleware(OpenTelemetryMiddleware(app, ...))``):
      as OpenTelemetry's ``server_request_hook=tracing.server_request_hook``. The span
      ends before the middleware's hook runs, so the abort is written at the departure,
      while the app (and the span) still runs.

    Installed in both places it works in either order and writes each abort once.
    Inside, OpenTelemetry's own middleware records the ``ClientDisconnected`` that a
    ``send()`` after the departure raises through it as an exception, with status Error
    (the SDK never lets a status go back to unset): put it outside where that matters.

    References:
    - OpenTelemetry semantic conventions, HTTP server spans (``error.type``, status):
      https://opentelemetry.io/docs/specs/semconv/http/http-spans/#status
    """

    def __init__(self, *, error_phases: Collection[Phase] = _MID_BODY) -> None:
        if isinstance(error_phases, str):
            raise TypeError(f"error_phases takes a collection of phases, got the string {error_phases!r}")
        unknown = set(error_phases) - set(_PHASES)
        if unknown:
            raise ValueError(f"error_phases takes phases among {', '.join(_PHASES)}; got {sorted(unknown)!r}")
        self.error_phases = frozenset(error_phases)
        self._written: weakref.WeakSet[DisconnectState] = weakref.WeakSet()  # by server_request_hook's path

    def __call__(self, scope: Scope, state: DisconnectState) -> None:
        """The ``on_disconnect`` hook: write the abort on the current span (OpenTelemetry outside)."""
        if state in self._written:
            return  # written at the departure (OpenTelemetry inside): the current span is not its own
        span = trace.get_current_span()
        if span.is_recording():
            self._write(span, state)

    def server_request_hook(self, span: Span, scope: Scope) -> None:
        """``OpenTelemetryMiddleware``'s hook: write the abort at the departure (OpenTelemetry inside).

        Called by OpenTelemetry for every request; it costs a dict lookup where the
        middleware is outside OpenTelemetry (no state in the scope yet), and registers one
        callback with the request's state where it is inside.
        """
        state = scope.get(SCOPE_KEY)
        if state is None or not span.is_recording():
            return
        # A weak reference: a callback holding the state would make every request a cycle.
        state._on_departure(partial(self._departed, span, weakref.ref(state)))

    def _departed(self, span: Span, state_ref: _StateRef) -> None:
        # Called by the core from whichever task saw the departure: it must never raise.
        try:
            state = state_ref()
            if state is None or not span.is_recording():
                return
            self._written.add(state)
            self._write(span, state)
            if state.cancel:  # a cancellation may follow: it is told before it lands, the span still open
                state._on_cancel(partial(span.set_attribute, "asgi_disconnect.cancelled", True))
        except Exception:
            emit(logging.ERROR, "opentelemetry_write_failed", {"span": repr(span)}, exc_info=True)

    def _write(self, span: Span, state: DisconnectState) -> None:
        # The record once the handler has returned (the hook); the live state at the departure.
        figures: Any = state.record if state.record is not None else state
        phase: Phase | None = figures.phase
        attributes = {
            "error.type": ERROR_TYPE,
            "http.response.body.size": figures.bytes_sent,
            "asgi_disconnect.phase": phase,
            "asgi_disconnect.detected_by": figures.detected_by,
            "asgi_disconnect.cancelled": figures.cancelled,
        }
        span.set_attributes({name: value for name, value in attributes.items() if value is not None})
        if phase in self.error_phases:
            span.set_status(Status(StatusCode.ERROR, f"client disconnected ({phase}): the response was incomplete"))

    def __repr__(self) -> str:
        return f"AbortTracing(error_phases={sorted(self.error_phases)!r})"
