"""``DisconnectMiddleware``: the pure ASGI middleware in front of the app."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import structlog.contextvars

from ._events import emit, level_number
from ._fastpath import FastRequest, fast_task
from ._request import Options, Request
from ._state import SCOPE_KEY, DisconnectState, RequestRecord
from ._types import ASGIApp, Scope, Send

#: ``on_disconnect(scope, state)``: a sync or async callable run once per aborted request.
DisconnectHook = Callable[[Scope, DisconnectState], "Awaitable[None] | None"]

#: The longest request id the event carries: a header is the client's to fill.
_MAX_REQUEST_ID = 200

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
    server) and absorbs that error at its edge. Each abort is logged once
    (``request_aborted``, logger ``asgi_disconnect``, through structlog or the standard
    library's ``logging``, whichever the app configured) and handed to the
    ``on_disconnect`` hooks, its ``RequestRecord`` in ``state.record``. Only ``http``
    scopes are handled.

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
        on_disconnect: DisconnectHook | Sequence[DisconnectHook] | None = None,
        max_read_ahead: int = 64 * 1024,
        cancel_exclude: Sequence[str] = (),
        cancel_warn_after: float = 5.0,
        send_timeout: float | None = None,
        log_level: int | str = "info",
        log_completed: bool = False,
        request_id_header: str | None = "x-request-id",
        log_client: bool = False,
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
        if request_id_header is not None and not isinstance(request_id_header, str):
            raise TypeError(f"request_id_header takes a header name or None, got {request_id_header!r}")
        for name, flag in (("log_completed", log_completed), ("log_client", log_client)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} takes True or False, got {flag!r}")
        self.app = app
        self.on_disconnect = on_disconnect
        self.log_level = level_number(log_level)
        self.log_client = log_client
        self._request_id_header = None if request_id_header is None else request_id_header.lower().encode("latin-1")
        self.options = Options(
            cancel=cancel,
            grace=grace,
            max_read_ahead=max_read_ahead,
            cancel_exclude=tuple(cancel_exclude),
            cancel_warn_after=cancel_warn_after,
            send_timeout=send_timeout,
            log_completed=log_completed,
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
                await self._after(scope, app_scope, request)
            if not absorbed:
                raise  # the app's own: the same object, after the abort was reported
            return
        if request.finish():
            await self._after(scope, app_scope, request)

    @property
    def on_disconnect(self) -> DisconnectHook | Sequence[DisconnectHook] | None:
        """The hooks run once per aborted request (checked when set)."""
        return self._on_disconnect

    @on_disconnect.setter
    def on_disconnect(self, hooks: DisconnectHook | Sequence[DisconnectHook] | None) -> None:
        self._hooks = _hooks(hooks)
        self._on_disconnect = hooks

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

    async def _after(self, scope: Scope, app_scope: Scope, request: Request) -> None:
        """What a request that left a stream open, lost its client or is logged ends with."""
        if request._streams:
            await request._close_streams()
        if not (request.disconnected or self.options.log_completed):
            return
        record = request.record = self._record_of(scope, app_scope, request)
        if not request.disconnected:
            emit(logging.DEBUG, "request_completed", record.as_dict())
            return
        emit(self.log_level, "request_aborted", record.as_dict())
        await self._run_hooks(scope, request, record)

    def _record_of(self, scope: Scope, app_scope: Scope, request: Request) -> RequestRecord:
        now = time.monotonic()
        started = request.started_at
        detected = request.detected_at
        client = scope.get("client") if self.log_client else None
        return RequestRecord(
            method=scope.get("method", ""),
            path=scope.get("path", ""),
            route=request.route if request.route is not None else route_template(app_scope, scope, self.app),
            phase=request.phase,
            detected_by=request.detected_by,
            status=request._status,
            bytes_sent=request.bytes_sent,
            chunks_sent=request._chunks,
            bytes_received=request._received,
            detected_after_ms=None if detected is None else _ms(detected - started),
            cleanup_ms=None if detected is None else _ms(now - detected),
            duration_ms=_ms(now - started),
            cancelled=request.cancelled,
            request_id=self._request_id(scope),
            client=f"{client[0]}:{client[1]}" if isinstance(client, list | tuple) and len(client) == 2 else None,
        )

    def _request_id(self, scope: Scope) -> str | None:
        """The app's own request id, as its log lines carry it, else the configured header's."""
        bound = structlog.contextvars.get_contextvars().get("request_id")
        if bound is not None:
            return _printable(str(bound))
        wanted = self._request_id_header
        if wanted is None:
            return None
        for name, value in scope.get("headers", ()):
            if name.lower() == wanted:
                return _printable(bytes(value).decode("latin-1"))
        return None

    async def _run_hooks(self, scope: Scope, state: DisconnectState, record: RequestRecord) -> None:
        for hook in self._hooks:
            try:
                result: Any = hook(scope, state)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                # A hook's bug must not turn a client's departure into a server error, nor
                # keep the next hook from running.
                fields = {"hook": _name_of(hook), "method": record.method, "path": record.path}
                emit(logging.ERROR, "on_disconnect_hook_failed", fields, exc_info=True)


def route_template(app_scope: Mapping[str, Any], scope: Mapping[str, Any], app: object) -> str | None:
    """The route template the framework matched, if any (only for a request that is logged).

    Litestar writes the whole template (``path_template``), FastAPI its effective route's
    (``scope["fastapi"]["effective_route_context"]``, with the prefixes of the routers it
    was included by). Starlette writes the route it matched into ``scope["route"]``: the
    innermost one, below any ``Mount``, whose templates are found by matching the
    request again from the top (the app whose scope reached us, or the wrapped one).
    """
    template = app_scope.get("path_template")
    if isinstance(template, str):
        return template
    fastapi = app_scope.get("fastapi")
    if isinstance(fastapi, dict):
        template = getattr(fastapi.get("effective_route_context"), "path", None)
        if isinstance(template, str):
            return template
    template = getattr(app_scope.get("route"), "path", None)
    if not isinstance(template, str):
        return None
    if app_scope.get("root_path", "") == scope.get("root_path", ""):
        return template  # matched at the top: no Mount above it
    routes = getattr(scope.get("app", app), "routes", None)
    mounted = _mounted_template(routes, dict(scope)) if routes else None
    return mounted if mounted is not None else template


def _mounted_template(routes: Any, scope: dict[str, Any], depth: int = 0) -> str | None:
    """Match ``scope`` against Starlette ``routes`` again, joining the templates of its Mounts."""
    routing = sys.modules.get("starlette.routing")
    if routing is None or depth > 8:
        return None
    try:
        for route in routes:
            match, child = route.matches(scope)
            if match is not routing.Match.FULL:
                continue
            if not isinstance(route, routing.Mount):
                return str(route.path)
            inner = _mounted_template(route.routes, {**scope, **child}, depth + 1)
            return None if inner is None else route.path + inner
    except Exception:  # a route of the app's own that cannot match outside its request
        return None
    return None


def _printable(request_id: str) -> str | None:
    """A request id as logged: printable ASCII only (a client fills the header), bounded."""
    request_id = request_id[:_MAX_REQUEST_ID]
    if request_id and request_id.isascii() and request_id.isprintable():
        return request_id
    return None


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _hooks(on_disconnect: object) -> tuple[DisconnectHook, ...]:
    if on_disconnect is None:
        return ()
    if callable(on_disconnect):
        return (on_disconnect,)
    if isinstance(on_disconnect, str | bytes) or not isinstance(on_disconnect, Sequence):
        # A sequence, not any iterable: hooks run in the order given.
        raise TypeError(f"on_disconnect takes a callable or a sequence of callables, got {on_disconnect!r}")
    hooks = tuple(on_disconnect)
    for hook in hooks:
        if not callable(hook):
            raise TypeError(f"on_disconnect takes callables (hook(scope, state)), got {hook!r} in {on_disconnect!r}")
    return hooks


def _name_of(hook: object) -> str:
    name = getattr(hook, "__qualname__", None) or type(hook).__qualname__
    return f"{getattr(hook, '__module__', None) or type(hook).__module__}.{name}"
