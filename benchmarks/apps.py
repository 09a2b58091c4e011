"""The apps that ``benchmarks/overhead.py`` measures: one Starlette hello world, wrapped or not.

Each factory builds a fresh app, so that variants never share a Starlette instance (and
its lazily built middleware stack). The module-level names are what the uvicorn
subprocesses import (``uvicorn --app-dir benchmarks apps:observe``).
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from asgi_disconnect import DisconnectMiddleware

BODY = b"Hello, world!"


async def hello(request: Request) -> Response:
    return PlainTextResponse("Hello, world!")


def make_bare() -> ASGIApp:
    """The Starlette hello world with nothing in front of it."""
    return Starlette(routes=[Route("/", hello)])


def make_observe() -> ASGIApp:
    """``DisconnectMiddleware`` in its default (observe) mode."""
    return DisconnectMiddleware(make_bare())


def make_cancel() -> ASGIApp:
    """``DisconnectMiddleware`` in cancel mode."""
    return DisconnectMiddleware(make_bare(), cancel=True)


class NoOpHTTPMiddleware(BaseHTTPMiddleware):
    """A ``BaseHTTPMiddleware`` that does nothing: the usual way people write middleware."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


def make_basehttp() -> ASGIApp:
    """A no-op ``BaseHTTPMiddleware`` in front of the hello world, for scale."""
    return NoOpHTTPMiddleware(make_bare())


FACTORIES: dict[str, Callable[[], ASGIApp]] = {
    "bare": make_bare,
    "observe": make_observe,
    "cancel": make_cancel,
    "basehttp": make_basehttp,
}

bare = make_bare()
observe = make_observe()
cancel = make_cancel()
basehttp = make_basehttp()
