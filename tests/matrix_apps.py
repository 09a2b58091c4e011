"""The apps that tests/test_matrix.py serves from real server processes.

``app`` is what every server imports (``tests.matrix_apps:app``). The framework comes
from the environment (``MATRIX_FRAMEWORK``: asgi, starlette, fastapi, litestar, django or
quart); a tiny raw ASGI dispatcher sends ``/observe/...`` to the framework's app behind
``DisconnectMiddleware(app)`` and ``/cancel/...`` to the same app behind
``DisconnectMiddleware(app, cancel=True)``. Every framework serves the same three routes
(``{mode}`` is ``observe`` or ``cancel``), each taking an ``id`` in its query string:

- ``/{mode}/slow``: an upstream call of ``UPSTREAM`` seconds. In observe mode the handler
  races it against ``state.wait()`` and gives up when the client leaves; in cancel mode
  it never looks (cancelling it is the middleware's job).
- ``/{mode}/stream?n=N``: a streaming response of ``N`` chunks (``b"chunk 0000\\n"``...),
  one every ``TICK`` seconds, from a plain async generator.
- ``/{mode}/fast``: ``FAST_BODY`` with a ``Content-Length``.

The handlers report through a sideband, since they run in another process: a JSON-lines
file whose path is in ``MATRIX_SIDEBAND``, each line one ``os.write`` on an ``O_APPEND``
descriptor (atomic for lines this small, from any worker process). ``slow`` and
``stream`` write a ``started`` line when they begin (so that a client leaves only once the
handler runs) and an ``ended`` line from their ``finally`` (so its presence says that the
``finally`` ran): what the handler saw (``disconnected``, ``phase``, ``cancelled``), how it
ended (``exit``: returned, complete, cancelled, or closed by ``aclose()``) and, for a
stream, the chunks it produced once the departure was detected. The raw ASGI app adds a
``send_raised`` line when its ``send()`` raises ``ClientDisconnected``, and every process
a ``lifespan`` line when the server starts its lifespan (gunicorn's workers are counted so).
"""

# No ``from __future__ import annotations``: FastAPI and Litestar read the handlers'
# annotations at run time, and these name classes imported inside the factories.
import json
import os
import types
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

import anyio

from asgi_disconnect import ClientDisconnected, DisconnectMiddleware, disconnect_state
from asgi_disconnect._tools.doctor import _lifespan  # answers lifespan for apps that have none
from asgi_disconnect._types import ASGIApp, Receive, Scope, Send

FRAMEWORK_ENV = "MATRIX_FRAMEWORK"
SIDEBAND_ENV = "MATRIX_SIDEBAND"
#: What the handlers read of a scope: read-only, as Litestar's and Quart's TypedDict scopes allow.
HTTPScope = Mapping[str, object]

UPSTREAM = 5.0  # seconds the slow handler's upstream takes: the disconnect must end it long before
TICK = 0.02  # seconds between two chunks of a stream
STREAM_CHUNKS = 150  # a stream nobody stops ends after 3 s: the test has failed by then
FAST_BODY = bytes(range(256)) * 16  # 4 KiB, every byte value: a normal response must come back exact
SLOW_BODY = b"upstream answered\n"


def chunk(index: int) -> bytes:
    """The stream's chunk ``index``."""
    return b"chunk %04d\n" % index


# --------------------------------------------------------------------------- the sideband
def report(record: dict[str, Any]) -> None:
    """Append one JSON line to the sideband file, in one ``os.write``."""
    path = os.environ.get(SIDEBAND_ENV)
    if not path:
        return  # not served by the matrix (an import in the test process)
    line = (json.dumps({"pid": os.getpid(), **record}, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _query(scope: HTTPScope) -> dict[str, list[str]]:
    raw = scope.get("query_string", b"")
    return parse_qs(raw.decode("latin-1") if isinstance(raw, bytes) else "")


def _request_id(scope: HTTPScope) -> str:
    return _query(scope).get("id", ["-"])[0]


def _mode(scope: HTTPScope) -> str:
    return str(scope["path"]).split("/")[1]


def _stream_length(scope: HTTPScope) -> int:
    return min(int(_query(scope).get("n", [str(STREAM_CHUNKS)])[0]), STREAM_CHUNKS)


def _ended(record: dict[str, Any], scope: HTTPScope) -> None:
    state = disconnect_state(scope)
    record.update(
        event="ended",
        disconnected=state.disconnected,
        phase=state.phase,
        cancelled=state.cancelled,
        detected_by=state.detected_by,
    )
    report(record)


# --------------------------------------------------------------------------- the handlers' work
async def slow(scope: HTTPScope) -> bytes:
    """The upstream call; observe mode gives it up when the client leaves, cancel mode never looks."""
    record: dict[str, Any] = {"id": _request_id(scope), "kind": "slow", "mode": _mode(scope), "exit": "returned"}
    report({"id": record["id"], "event": "started"})
    try:
        if record["mode"] == "observe":
            with anyio.move_on_after(UPSTREAM) as upstream:
                await disconnect_state(scope).wait()
            record["early"] = not upstream.cancelled_caught  # the client left before the upstream answered
        else:
            await anyio.sleep(UPSTREAM)
            record["early"] = False
    except anyio.get_cancelled_exc_class():
        record["exit"] = "cancelled"
        raise
    except BaseException as exc:
        record["exit"] = f"error: {type(exc).__name__}"
        raise
    finally:
        _ended(record, scope)
    return SLOW_BODY


async def ticks(scope: HTTPScope) -> AsyncGenerator[bytes, None]:
    """A stream of chunks; records how many it produced once the departure was detected."""
    state = disconnect_state(scope)
    count = _stream_length(scope)
    record: dict[str, Any] = {
        "id": _request_id(scope),
        "kind": "stream",
        "mode": _mode(scope),
        "produced": 0,
        "after_detection": 0,
        "exit": "complete",
    }
    report({"id": record["id"], "event": "started"})
    try:
        for index in range(count):
            if state.disconnected:
                record["after_detection"] += 1
            record["produced"] += 1
            yield chunk(index)
            await anyio.sleep(TICK)
    except anyio.get_cancelled_exc_class():
        record["exit"] = "cancelled"
        raise
    except GeneratorExit:
        record["exit"] = "closed"  # aclose(): by the framework, or by the garbage collector
        raise
    except BaseException as exc:
        record["exit"] = f"error: {type(exc).__name__}"
        raise
    finally:
        _ended(record, scope)


# --------------------------------------------------------------------------- the frameworks
async def _start(send: Send, content_type: bytes, length: int | None = None) -> None:
    headers = [(b"content-type", content_type)]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})


async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Raw ASGI: the three routes by hand. A ``send()`` that raises ``ClientDisconnected``
    is reported (``send_raised``) and let through, as an app that does not catch it."""
    route = str(scope["path"]).partition("/")[2].partition("/")[2]
    try:
        if route == "slow":
            body = await slow(scope)
            await _start(send, b"text/plain", len(body))
            await send({"type": "http.response.body", "body": body})
        elif route == "stream":
            await _start(send, b"text/plain")
            stream = ticks(scope)
            try:  # a raw app closes the generator it iterates, as contextlib.aclosing would
                async for part in stream:
                    await send({"type": "http.response.body", "body": part, "more_body": True})
            finally:
                await stream.aclose()
            await send({"type": "http.response.body", "body": b""})
        elif route == "fast":
            await _start(send, b"application/octet-stream", len(FAST_BODY))
            await send({"type": "http.response.body", "body": FAST_BODY})
        else:
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
    except ClientDisconnected:
        report({"id": _request_id(scope), "event": "send_raised"})
        raise


def starlette_app() -> ASGIApp:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    async def slow_view(request: Request) -> Response:
        return Response(await slow(request.scope), media_type="text/plain")

    async def stream_view(request: Request) -> StreamingResponse:
        return StreamingResponse(ticks(request.scope), media_type="text/plain")

    async def fast_view(request: Request) -> Response:
        return Response(FAST_BODY, media_type="application/octet-stream")

    routes = [Route("/{mode}/slow", slow_view), Route("/{mode}/stream", stream_view), Route("/{mode}/fast", fast_view)]
    return Starlette(routes=routes)


def fastapi_app() -> ASGIApp:
    from fastapi import FastAPI, Request
    from fastapi.responses import Response, StreamingResponse

    api = FastAPI(openapi_url=None)

    @api.get("/{mode}/slow")
    async def slow_view(request: Request) -> Response:
        return Response(await slow(request.scope), media_type="text/plain")

    @api.get("/{mode}/stream")
    async def stream_view(request: Request) -> StreamingResponse:
        return StreamingResponse(ticks(request.scope), media_type="text/plain")

    @api.get("/{mode}/fast")
    async def fast_view() -> Response:
        return Response(FAST_BODY, media_type="application/octet-stream")

    return api


def litestar_app() -> ASGIApp:
    from litestar import Litestar, Request, Response, get
    from litestar.response import Stream

    @get("/{mode:str}/slow")
    async def slow_view(request: Request[Any, Any, Any], mode: str) -> Response[bytes]:
        return Response(await slow(request.scope), media_type="text/plain")

    @get("/{mode:str}/stream")
    async def stream_view(request: Request[Any, Any, Any], mode: str) -> Stream:
        return Stream(ticks(request.scope), media_type="text/plain")

    @get("/{mode:str}/fast")
    async def fast_view(mode: str) -> Response[bytes]:
        return Response(FAST_BODY, media_type="application/octet-stream")

    return Litestar(route_handlers=[slow_view, stream_view, fast_view], openapi_config=None)


def django_app() -> ASGIApp:
    """Django, configured in code: async views, a ``StreamingHttpResponse``, errors logged to stderr."""
    import logging

    from django.conf import settings  # type: ignore[import-untyped]
    from django.core.asgi import get_asgi_application  # type: ignore[import-untyped]
    from django.http import HttpRequest, HttpResponse, StreamingHttpResponse  # type: ignore[import-untyped]
    from django.urls import path  # type: ignore[import-untyped]

    async def slow_view(request: HttpRequest, mode: str) -> HttpResponse:
        return HttpResponse(await slow(request.scope), content_type="text/plain")

    async def stream_view(request: HttpRequest, mode: str) -> StreamingHttpResponse:
        return StreamingHttpResponse(ticks(request.scope), content_type="text/plain")

    async def fast_view(request: HttpRequest, mode: str) -> HttpResponse:
        return HttpResponse(FAST_BODY, content_type="application/octet-stream")

    # A urlconf module made in code: Django takes a module object as ROOT_URLCONF.
    urls = types.ModuleType("matrix_django_urls")
    urls.urlpatterns = [  # type: ignore[attr-defined]
        path("<str:mode>/slow", slow_view),
        path("<str:mode>/stream", stream_view),
        path("<str:mode>/fast", fast_view),
    ]
    settings.configure(
        DEBUG=False,
        SECRET_KEY="asgi-disconnect matrix",
        ALLOWED_HOSTS=["127.0.0.1"],
        ROOT_URLCONF=urls,
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        DATABASES={},
        USE_TZ=True,
        # Django's own config prints errors only with DEBUG: let them reach the root logger,
        # and the root logger the process's output, where the test looks for them.
        LOGGING_CONFIG=None,
    )
    logging.basicConfig(level=logging.WARNING)
    # The package's events then go to the standard library's logging: keep its info level.
    logging.getLogger("asgi_disconnect").setLevel(logging.INFO)
    application: ASGIApp = get_asgi_application()
    return application


def quart_app() -> ASGIApp:
    from quart import Quart, Response, request

    quart = Quart(__name__)

    @quart.get("/<mode>/slow")
    async def slow_view(mode: str) -> Response:
        return Response(await slow(request.scope), mimetype="text/plain")

    @quart.get("/<mode>/stream")
    async def stream_view(mode: str) -> Response:
        return Response(ticks(request.scope), mimetype="text/plain")

    @quart.get("/<mode>/fast")
    async def fast_view(mode: str) -> Response:
        return Response(FAST_BODY, mimetype="application/octet-stream")

    return quart


#: Each framework's factory, and whether its app runs the lifespan itself.
FRAMEWORKS: dict[str, tuple[Callable[[], ASGIApp], bool]] = {
    "asgi": (lambda: raw_app, False),
    "starlette": (starlette_app, True),
    "fastapi": (fastapi_app, True),
    "litestar": (litestar_app, True),
    "django": (django_app, False),  # Django's ASGIHandler refuses the lifespan scope
    "quart": (quart_app, True),
}


class Dispatcher:
    """``/observe/...`` to the app behind ``DisconnectMiddleware(app)``, ``/cancel/...`` behind
    ``cancel=True``; the lifespan to the framework's app, or answered here."""

    def __init__(self, framework: str) -> None:
        factory, self.runs_lifespan = FRAMEWORKS[framework]
        self.app = factory()
        self.observe = DisconnectMiddleware(self.app)
        self.cancel = DisconnectMiddleware(self.app, cancel=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            report({"id": "-", "event": "lifespan"})  # this process (a gunicorn worker, say) is up
            if self.runs_lifespan:
                await self.app(scope, receive, send)
            else:
                await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websocket: the server closes it
        path = str(scope["path"])
        if path == "/whoami":  # which process answers: the tests check that the port is their server's
            pid = str(os.getpid()).encode()
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(pid))]}
            )
            await send({"type": "http.response.body", "body": pid})
        elif path.startswith("/observe/"):
            await self.observe(scope, receive, send)
        elif path.startswith("/cancel/"):
            await self.cancel(scope, receive, send)
        else:
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})


async def _unconfigured(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError(f"set {FRAMEWORK_ENV} to one of {', '.join(FRAMEWORKS)} to serve tests.matrix_apps:app")


# Built at import, in the server's process, so that a broken app stops the server at start.
app: ASGIApp = Dispatcher(os.environ[FRAMEWORK_ENV]) if FRAMEWORK_ENV in os.environ else _unconfigured
