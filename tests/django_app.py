"""A minimal Django project configured in code, served by tests/test_django.py.

``configure(directory)`` sets Django up once per process (``settings.configure()``, an
SQLite database file in ``directory``, no installed apps, no middleware) and returns
the ASGI application from ``get_asgi_application()``. The views count what happened to
them in ``probe``; they run in worker threads as well as in the event loop, so the
counts are taken under a lock.

- ``/fast``: an async view that answers at once.
- ``/slow``: an async view that sleeps ``SLOW`` seconds first.
- ``/sync``: a sync view that queries the database.
- ``/db``: an async view that queries the database through ``sync_to_async``.
- ``/echo``: a sync view that answers with the request body.
- ``/stream?n=N``: a ``StreamingHttpResponse`` over an async generator: ``N`` chunks
  (default ``STREAM_CHUNKS``), one every ``STREAM_INTERVAL`` seconds.
- ``/order/sync?order=N``: a sync view that writes both parts of order ``N`` in one
  ``transaction.atomic()`` block, with ``WORK`` seconds of slow work between them.
- ``/tenant/fast``: ``/fast``, but a ``request_started`` receiver (a tenant lookup, say)
  queries the database first, in the request's thread.
- ``/tenant/busy/fast``: the same, the lookup taking ``BUSY_LOOKUP`` seconds (a busy
  database; a server under load delays the thread hop to ``request_started`` as much).
- ``/report/<year>``: README's async view: it names its route for the abort's record and
  awaits an upstream for ``REPORT`` seconds, which Django cancels when the client leaves.
- ``/order/async?order=N``: the same transaction in an async view, entered and left
  through ``sync_to_async`` so that the slow work is an ``await`` inside the block.

Every cleanup that awaits counts whether it completed or met a second cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import django  # type: ignore[import-untyped]
from asgiref.sync import sync_to_async
from django.conf import settings  # type: ignore[import-untyped]
from django.core import signals  # type: ignore[import-untyped]
from django.core.asgi import get_asgi_application  # type: ignore[import-untyped]
from django.db import connection, transaction  # type: ignore[import-untyped]
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse  # type: ignore[import-untyped]
from django.urls import path  # type: ignore[import-untyped]

from asgi_disconnect import DisconnectState, disconnect_state
from asgi_disconnect._types import ASGIApp
from tests.helpers import Counts

SLOW = 0.05
STREAM_CHUNKS = 300  # 3 s of stream at most: a test fails long before, if nothing stops it
STREAM_INTERVAL = 0.01
WORK = 0.1  # the slow work inside the order transaction
BUSY_LOOKUP = 0.2  # seconds a busy tenant lookup takes
REPORT = 5.0  # the report's upstream: a test fails long before, if nothing stops it
TABLE = "order_parts"


class Probe(Counts):
    """What the views did: counters, the moments streams ended, an open transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.stream_ended_at: list[float] = []
        self.tx_open = threading.Event()  # an order view holds its transaction open
        self.busy = 0  # sync work in progress in worker threads: a cancelled await does not stop it
        self.states: list[DisconnectState] = []  # what the report views saw

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        with self.lock:
            self.busy += 1
        try:
            yield
        finally:
            with self.lock:
                self.busy -= 1

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.stream_ended_at.clear()
            self.states.clear()
        self.tx_open.clear()


probe = Probe()


def count_rows() -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {TABLE}")
        return int(cursor.fetchone()[0])


def insert_part(order: int, part: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {TABLE} (order_id, part) VALUES (%s, %s)", [order, part])


async def fast(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"fast", content_type="text/plain")


async def slow(request: HttpRequest) -> HttpResponse:
    try:
        await asyncio.sleep(SLOW)
    except asyncio.CancelledError:
        probe.add("slow.cancelled")
        await probe.cleanup("slow")
        raise
    return HttpResponse(b"slow", content_type="text/plain")


def sync(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"rows=%d" % count_rows(), content_type="text/plain")


async def db(request: HttpRequest) -> HttpResponse:
    rows = await sync_to_async(count_rows)()
    return HttpResponse(b"rows=%d" % rows, content_type="text/plain")


def echo(request: HttpRequest) -> HttpResponse:
    body: bytes = request.body
    return HttpResponse(b"echo:" + body, content_type="application/octet-stream")


async def chunks(count: int) -> AsyncIterator[bytes]:
    probe.add("stream.started")
    try:
        for index in range(count):
            yield b"chunk %04d\n" % index
            probe.add("stream.chunks")
            await asyncio.sleep(STREAM_INTERVAL)
    except asyncio.CancelledError:
        probe.add("stream.cancelled")
        raise
    finally:
        probe.add("stream.finally")
        with probe.lock:
            probe.stream_ended_at.append(time.monotonic())
        await probe.cleanup("stream")


async def stream(request: HttpRequest) -> StreamingHttpResponse:
    count = int(request.GET.get("n", STREAM_CHUNKS))
    return StreamingHttpResponse(chunks(count), content_type="text/plain")


def order_sync(request: HttpRequest) -> HttpResponse:
    order = int(request.GET["order"])
    with probe.working(), transaction.atomic():
        insert_part(order, 1)
        probe.tx_open.set()
        time.sleep(WORK)
        insert_part(order, 2)
    probe.add("order.committed")
    return HttpResponse(b"ordered", content_type="text/plain")


async def order_async(request: HttpRequest) -> HttpResponse:
    order = int(request.GET["order"])
    atomic: Any = transaction.atomic()
    await sync_to_async(atomic.__enter__)()
    try:
        await sync_to_async(insert_part)(order, 1)
        probe.tx_open.set()
        await asyncio.sleep(WORK)
        await sync_to_async(insert_part)(order, 2)
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            probe.add("order.cancelled")
        await sync_to_async(atomic.__exit__)(type(exc), exc, exc.__traceback__)
        probe.add("order.rolled_back")
        raise
    await sync_to_async(atomic.__exit__)(None, None, None)
    probe.add("order.committed")
    return HttpResponse(b"ordered", content_type="text/plain")


async def report(request: HttpRequest, year: int) -> HttpResponse:
    state = disconnect_state(request.scope)
    state.route = request.resolver_match.route  # Django puts no route template in the scope
    probe.states.append(state)
    try:
        await asyncio.sleep(REPORT)  # the upstream
    except asyncio.CancelledError:
        probe.add("report.cancelled")
        raise
    return HttpResponse(b"report %d" % year, content_type="text/plain")


def tenant_lookup(sender: Any, scope: Any = None, **kwargs: Any) -> None:
    """A ``request_started`` receiver that queries the database for ``/tenant/`` paths."""
    if scope is not None and scope["path"].startswith("/tenant/"):
        with probe.working():
            count_rows()
            if scope["path"].startswith("/tenant/busy/"):
                time.sleep(BUSY_LOOKUP)


urlpatterns = [
    path("fast", fast),
    path("tenant/fast", fast),
    path("tenant/busy/fast", fast),
    path("slow", slow),
    path("sync", sync),
    path("db", db),
    path("echo", echo),
    path("stream", stream),
    path("order/sync", order_sync),
    path("order/async", order_async),
    path("reports/<int:year>/", report),
]

_application: ASGIApp | None = None


def configure(directory: Path) -> ASGIApp:
    """Configure Django once per process (its database in ``directory``); return its ASGI app."""
    global _application
    if _application is None:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="asgi-disconnect tests",
            ALLOWED_HOSTS=["127.0.0.1"],
            ROOT_URLCONF=__name__,
            INSTALLED_APPS=[],
            MIDDLEWARE=[],
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(directory / "django.db")}},
            USE_TZ=True,
            LOGGING_CONFIG=None,  # leave logging alone: the tests capture django's records
        )
        _application = get_asgi_application()
        signals.request_started.connect(tenant_lookup, dispatch_uid="django_app.tenant_lookup")
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE TABLE {TABLE} (order_id INTEGER, part INTEGER, PRIMARY KEY (order_id, part))")
        connection.close()
    assert django.VERSION >= (5, 0)
    return _application


def database() -> Path:
    """The SQLite database file of the configured project."""
    return Path(settings.DATABASES["default"]["NAME"])
