"""Clients that leave mid-transaction: no half-written orders, no session left "idle in transaction".

Run: ``python examples/db_transactions.py`` (SQLite, a file in a temporary directory),
or against PostgreSQL::

    DATABASE_URL=postgresql+asyncpg://USER:PASSWORD@127.0.0.1:5432/DB python examples/db_transactions.py

It serves a Starlette app wrapped in ``DisconnectMiddleware(cancel=True)`` with uvicorn
on a free loopback port. ``POST /orders/{n}`` writes order n in two parts, with slow
work after each INSERT, in one transaction. 50 clients send an order and leave 0-120 ms
later, 10 at a time; the middleware cancels each abandoned handler. The handler's
COMMIT, ROLLBACK and the return of its connection to the pool run inside ``shield()``,
so the cancellation never cuts them off. Then it checks that every order has both
parts or none, that no session is left "idle in transaction" (PostgreSQL), and that
every pooled connection still works.

Needs asgi-disconnect, uvicorn, starlette, sqlalchemy[asyncio] and aiosqlite (asyncpg
for PostgreSQL). It creates the table ``asgi_disconnect_demo_order_parts`` and drops it
at the end.

A cancellation that cuts a statement off mid-flight makes SQLAlchemy discard that
connection (it cannot know the driver's state); the report counts them. On SQLite,
SQLAlchemy 2.1 with aiosqlite 0.22 may then print "Task was destroyed but it is
pending! ... _terminate_graceful_close()": an abandoned close task inside those two
libraries, not a connection or a transaction left open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field

import structlog
import uvicorn
from sqlalchemy import Column, Integer, MetaData, Table, event, func, make_url, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_disconnect import DisconnectMiddleware, disconnect_state, shield

ORDERS = 50  # requests, each abandoned at a random moment
CONCURRENCY = 10  # clients at a time
POOL_SIZE = 5  # fewer than CONCURRENCY: handlers also queue for a connection
WORK = 0.04  # seconds of slow work after each INSERT
MAX_LEAVE_AFTER = 0.12  # a client leaves 0-120 ms after sending its order
SEED = 7

metadata = MetaData()
order_parts = Table(
    "asgi_disconnect_demo_order_parts",
    metadata,
    Column("order_id", Integer, primary_key=True),
    Column("part", Integer, primary_key=True),
)


async def place_order(engine: AsyncEngine, order_id: int) -> None:
    """Write both parts of order ``order_id`` in one transaction: both rows or none."""
    # Waiting for a pooled connection may be cancelled: nothing is held yet, nothing to undo.
    conn = await engine.connect()
    try:
        await conn.begin()
        await conn.execute(order_parts.insert().values(order_id=order_id, part=1))
        await asyncio.sleep(WORK)  # slow work: a payment check, an upstream call...
        await conn.execute(order_parts.insert().values(order_id=order_id, part=2))
        await asyncio.sleep(WORK)
        # A COMMIT cut off while the driver waits for the server's answer leaves us not
        # knowing whether the order exists. Inside shield() the middleware's cancellation
        # waits; it lands at the first await after the block.
        with shield():
            await conn.commit()
    except BaseException:
        # Cancellation is level-triggered: once the client has gone, every unshielded
        # await in this task is cancelled again, including the ones in cleanup code. An
        # unshielded ROLLBACK would itself be cancelled: SQLAlchemy would then throw the
        # connection away (or, with older versions and drivers, leave the session "idle
        # in transaction", holding its locks).
        with shield():
            await conn.rollback()
        raise
    finally:
        # Returning the connection awaits too (the pool's reset-on-return, or closing a
        # connection SQLAlchemy invalidated because a statement was cancelled midway).
        # Unshielded it would be cancelled as well, and the connection would be lost to
        # the pool until garbage collection.
        with shield():
            await conn.close()


@dataclass
class Stats:
    running: int = 0
    completed: int = 0
    cancelled: int = 0  # handlers the middleware cancelled
    discarded: int = 0  # pooled connections SQLAlchemy invalidated: a statement was cut off
    errors: list[str] = field(default_factory=list)
    last_change: float = field(default_factory=time.monotonic)


def build_app(engine: AsyncEngine, stats: Stats) -> DisconnectMiddleware:
    async def create_order(request: Request) -> PlainTextResponse:
        order_id = int(request.path_params["order_id"])
        stats.running += 1
        stats.last_change = time.monotonic()
        try:
            await place_order(engine, order_id)
        except asyncio.CancelledError:
            if disconnect_state(request.scope).cancelled:
                stats.cancelled += 1
            raise
        except Exception as exc:
            stats.errors.append(f"order {order_id}: {exc!r}")
            raise
        finally:
            stats.running -= 1
            stats.last_change = time.monotonic()
        stats.completed += 1
        return PlainTextResponse(f"order {order_id} placed\n", status_code=201)

    app = Starlette(routes=[Route("/orders/{order_id:int}", create_order, methods=["POST"])])
    return DisconnectMiddleware(app, cancel=True)


def leave_mid_request(port: int, order_id: int, delay: float, reset: bool) -> None:
    """Send the order, then leave after ``delay`` seconds without reading the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"POST /orders/{order_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode())
        time.sleep(delay)
        if reset:  # an abortive close (RST), like a killed process or a dropped network
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:  # an orderly close (FIN), like a browser tab closed or a client timeout
            sock.shutdown(socket.SHUT_RDWR)


async def abandon_orders(port: int) -> None:
    rng = random.Random(SEED)
    plans = [(n, rng.uniform(0, MAX_LEAVE_AFTER), rng.random() < 0.5) for n in range(ORDERS)]
    slots = asyncio.Semaphore(CONCURRENCY)

    async def client(order_id: int, delay: float, reset: bool) -> None:
        async with slots:
            await asyncio.to_thread(leave_mid_request, port, order_id, delay, reset)

    await asyncio.wait_for(asyncio.gather(*(client(*plan) for plan in plans)), timeout=30)


async def wait_for_handlers(stats: Stats, within: float = 5.0, quiet: float = 0.2) -> None:
    """Until no handler runs and none started or ended for ``quiet`` seconds (bounded)."""
    for _ in range(int(within / 0.01)):
        if not stats.running and time.monotonic() - stats.last_change >= quiet:
            return
        await asyncio.sleep(0.01)


async def idle_in_transaction(engine: AsyncEngine) -> int | None:
    """PostgreSQL sessions "idle in transaction" (None for other databases)."""
    if engine.dialect.name != "postgresql":
        return None
    async with engine.connect() as conn:
        count = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"
            )
        )
    return int(count or 0)


async def pool_connections_ok(engine: AsyncEngine) -> int:
    """Hold every pooled connection at once; how many answer SELECT 1."""
    async with contextlib.AsyncExitStack() as stack:
        conns: list[AsyncConnection] = []
        for _ in range(POOL_SIZE):
            conns.append(await stack.enter_async_context(engine.connect()))
        return sum([await conn.scalar(text("SELECT 1")) == 1 for conn in conns])


async def serve_and_abandon(engine: AsyncEngine, stats: Stats) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(engine, stats), lifespan="off", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):  # at most 5 s to start
            if server.started or serving.done():
                break
            await asyncio.sleep(0.01)
        if not server.started:
            raise RuntimeError("uvicorn did not start within 5 s")
        await abandon_orders(port)
        await wait_for_handlers(stats)
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=10)
        sock.close()


async def main() -> int:
    # The middleware logs one structlog event per abort; 50 of them would bury the report.
    # A real app routes them to its logs; the library itself never configures structlog.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="asgi-disconnect-demo-") as tmp:
        url = os.environ.get("DATABASE_URL") or f"sqlite+aiosqlite:///{tmp}/orders.db"
        engine = create_async_engine(url, pool_size=POOL_SIZE, max_overflow=0, pool_timeout=5)
        try:
            return await run(engine, url)
        finally:
            await engine.dispose()


async def run(engine: AsyncEngine, url: str) -> int:
    async with engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)
        await conn.run_sync(metadata.create_all)
    stats = Stats()

    @event.listens_for(engine.sync_engine.pool, "invalidate")
    def count_discarded(*args: object) -> None:
        stats.discarded += 1

    try:
        await serve_and_abandon(engine, stats)
        async with engine.connect() as conn:
            result = await conn.execute(select(order_parts.c.order_id, func.count()).group_by(order_parts.c.order_id))
            parts_per_order = {order: parts for order, parts in result}
        half_written = sum(1 for parts in parts_per_order.values() if parts != 2)
        idle = await idle_in_transaction(engine)
        pool_ok = await asyncio.wait_for(pool_connections_ok(engine), timeout=10)
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.drop_all)

    print(f"DisconnectMiddleware(cancel=True) on uvicorn, database {make_url(url)!r}")
    print(f"  requests sent:          {ORDERS} (each client left 0-{MAX_LEAVE_AFTER * 1000:.0f} ms later)")
    print(f"  orders aborted:         {ORDERS - len(parts_per_order)} (no rows written)")
    print(f"  orders committed:       {len(parts_per_order)}")
    print(f"  handlers cancelled:     {stats.cancelled}")
    print(f"  rows half-written:      {half_written}")
    print(f"  connections discarded:  {stats.discarded} (cancelled mid-statement; the pool opened new ones)")
    print(f"  idle in transaction:    {'n/a (PostgreSQL only)' if idle is None else idle}")
    print(f"  pooled connections OK:  {pool_ok}/{POOL_SIZE} (all checked out at once, SELECT 1 on each)")
    if stats.running or stats.errors:
        print(f"  still running: {stats.running}; errors: {stats.errors[:5]}")
    if "DATABASE_URL" not in os.environ:
        print(
            "Against PostgreSQL: DATABASE_URL=postgresql+asyncpg://USER:PASSWORD@127.0.0.1:5432/DB "
            "python examples/db_transactions.py"
        )
    ok = not stats.running and not stats.errors and half_written == 0 and not idle and pool_ok == POOL_SIZE
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
