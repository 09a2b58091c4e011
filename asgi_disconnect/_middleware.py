"""``DisconnectMiddleware``: the pure ASGI middleware in front of the app."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from ._fastpath import FastRequest, fast_task
from ._request import LOGGER_NAME, Options, Request, logger
from ._state import SCOPE_KEY, DisconnectState
from ._types import ASGIApp, Scope, Send

#: ``on_disconnect(scope, state)``: a sync or async callable run once per aborted request.
DisconnectHook = Callable[[Scope, DisconnectState], "Awaitable[None] | None"]

#: ASGI HTTP spec versions before "send() raises on a closed connection" (2.4).
_DROPPING_SPECS = frozenset({"2.0", "2.1", "2.2", "2.3"})
_NO_ASGI: Mapping[str, str] = {}
_get_running_loop = asyncio._get_running_loop  # None, not an exception, under trio: cheaper


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
        self.on_disconnect = on_disconnect
        self.options = Options(
            cancel=cancel,
            grace=grace,
            max_read_ahead=max_read_ahead,
            cancel_exclude=tuple(cancel_exclude),
            cancel_warn_after=cancel_warn_after,
            send_timeout=send_timeout,
        )
        self._plain_sends: bool | None = None  # see _send_for()

    # Any, not the Scope alias: Litestar types its scopes as TypedDicts, Starlette as
    # MutableMapping; a parameter typed Any lets both pass the middleware under mypy.
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or SCOPE_KEY in scope:
            await self.app(scope, receive, send)
            return
        loop = _get_running_loop()
        task = None if loop is None else fast_task(loop)
        if task is None:  # trio, no fast path, or a coroutine driven outside a task
            request = Request(self.options, scope, receive, send)
        else:
            request = FastRequest(self.options, scope, receive, send)
        app_scope = scope.copy()  # an ASGI scope is a dict: its keys table is cloned, not rebuilt
        app_scope[SCOPE_KEY] = request
        plain = self._plain_sends
        app_send: Send
        if plain:
            app_send = request.app_send
        elif plain is False:
            app_send = request.app_send_checked
        else:
            app_send = self._send_for(request, scope)
        try:
            pending = request.start(self.app(app_scope, request.app_receive, app_send))
            if pending is not None:
                await pending
        except BaseException as exc:
            closing = isinstance(exc, GeneratorExit)  # the coroutine is closed: it must not await again
            absorbed = not closing and request.absorbs(exc)
            if request.finish() and not closing:
                await self._after(scope, request)
            if not absorbed:
                raise  # the app's own: the same object, after the abort was reported
            return
        if request.finish():
            await self._after(scope, request)

    def _send_for(self, request: Request, scope: Scope) -> Send:
        """The send() the app gets, when it is not the plain one (decided at the first request).

        A server before ASGI 2.4 drops a send to a closed connection and never raises, so
        the plain wrapper (no coroutine frame of ours per message) sees all there is; a
        server's spec version does not change between its requests.
        """
        if self.options.send_timeout is not None:
            return request.app_send_timed
        spec = scope.get("asgi", _NO_ASGI).get("spec_version")
        if spec is None:
            return request.app_send  # 2.0 (no key): it drops; not cached, a later scope may say more
        self._plain_sends = spec in _DROPPING_SPECS
        return request.app_send if self._plain_sends else request.app_send_checked

    async def _after(self, scope: Scope, request: Request) -> None:
        """What a request that left a stream open or lost its client ends with."""
        if request._streams:
            await request._close_streams()
        if request.disconnected:
            await self._report(scope, request)

    async def _report(self, scope: Scope, state: DisconnectState) -> None:
        detected = state.detected_at if state.detected_at is not None else time.monotonic()
        logger.info(
            "client disconnected",
            logger=LOGGER_NAME,
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
            logger.exception(
                "on_disconnect hook failed", logger=LOGGER_NAME, method=scope.get("method"), path=scope.get("path")
            )
