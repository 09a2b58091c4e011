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
parts or none, that no session is left "idle in transaction" (PostgreSQL), that every
pooled connection still works, and that a connection was discarded only where a
cancellation cut a statement off (never for a cancelled ROLLBACK or close).

Needs asgi-disconnect, uvicorn, starlette, sqlalchemy[asyncio] and aiosqlite (asyncpg
for PostgreSQL). It creates the table ``asgi_disconnect_demo_order_parts`` and drops it
at the end.

A cancellation that cuts a statement off mid-flight makes SQLAlchemy discard that
connection (it cannot know the driver's state); the report counts them, and the
handlers cancelled mid-statement (each handler records the step it has reached). On
SQLite, SQLAlchemy 2.1 with aiosqlite 0.22 may then print "Task was destroyed but it
is pending! ... _terminate_graceful_close()": an abandoned close task inside those two
libraries, not a connection or a transaction left open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import structlog
from _measure import Serve
from sqlalchemy import Column, Integer, MetaData, Table, event, func, make_url, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_disconnect import DisconnectMiddleware, disconnect_state, shield
from asgi_disconnect.testing import Live, leave, serve

ORDERS = 50  # requests, each abandoned at a random moment
CONCURRENCY = 10  # clients at a time
POOL_SIZE = 5  # fewer than CONCURRENCY: handlers also queue for a connection
WORK = 0.04  # seconds of slow work after each INSERT
MAX_LEAVE_AFTER = 0.12  # a client leaves 0-120 ms after sending its order
Close = Literal["fin", "rst"]
CLOSES: tuple[Close, ...] = ("fin", "rst")  # how a client leaves, chosen at random
SEED = 20240611
SETTLE_WITHIN = 5.0  # at most this long for a handler to end after its order was sent
QUIET = 0.2  # then this long for SQLAlchemy's own tasks that close discarded connections

metadata = MetaData()
order_parts = Table(
    "asgi_disconnect_demo_order_parts",
    metadata,
    Column("order_id", Integer, primary_key=True),
    Column("part", Integer, primary_key=True),
)

#: Where a handler can be when its client leaves; ``place_order`` records each step it reaches.
CHECKOUT, INSERT_1, WORK_1, INSERT_2, WORK_2, COMMIT = (
    "waiting for a connection",
    "INSERT part 1",
    "slow work 1",
    "INSERT part 2",
    "slow work 2",
    "COMMIT",
)
MID_STATEMENT = {INSERT_1, INSERT_2}  # a cancellation here cuts a statement off mid-flight


async def place_order(engine: AsyncEngine, order_id: int, steps: list[str]) -> None:
    """Write both parts of order ``order_id`` in one transaction: both rows or none.

    ``steps`` gets each step as the handler reaches it: where a cancellation landed.
    """
    # Waiting for a pooled connection may be cancelled: nothing is held yet, nothing to undo.
    steps.append(CHECKOUT)
    conn = await engine.connect()
    try:
        await conn.begin()
        steps.append(INSERT_1)
        await conn.execute(order_parts.insert().values(order_id=order_id, part=1))
        steps.append(WORK_1)
        await asyncio.sleep(WORK)  # slow work: a payment check, an upstream call...
        steps.append(INSERT_2)
        await conn.execute(order_parts.insert().values(order_id=order_id, part=2))
        steps.append(WORK_2)
        await asyncio.sleep(WORK)
        steps.append(COMMIT)
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
class Tally:
    """What the handlers saw."""

    in_flight: int = 0
    started: int = 0
    completed: int = 0  # committed and answered
    cancelled_at: Counter[str] = field(default_factory=Counter)  # step -> handlers cancelled there
    marked_cancelled: int = 0  # DisconnectState.cancelled was true when the handler ended
    invalidated: int = 0  # pooled connections SQLAlchemy threw away (a statement was cut off)
    errors: list[str] = field(default_factory=list)

    @property
    def interrupted(self) -> int:
        """Handlers that caught the middleware's cancellation."""
        return self.cancelled_at.total()

    @property
    def cut_mid_statement(self) -> int:
        return sum(self.cancelled_at[step] for step in MID_STATEMENT)

    def summary(self) -> str:
        return (
            f"started={self.started} completed={self.completed} in_flight={self.in_flight} "
            f"marked_cancelled={self.marked_cancelled} cancelled_at={dict(self.cancelled_at)} "
            f"invalidated_connections={self.invalidated} errors={self.errors[:5]}"
        )


def build_app(engine: AsyncEngine, tally: Tally) -> DisconnectMiddleware:
    async def create_order(request: Request) -> PlainTextResponse:
        state = disconnect_state(request.scope)
        order_id = int(request.path_params["order_id"])
        steps: list[str] = []
        tally.in_flight += 1
        tally.started += 1
        try:
            await place_order(engine, order_id, steps)
        except asyncio.CancelledError:
            tally.cancelled_at[steps[-1]] += 1  # place_order records its first step before any await
            raise
        except Exception as exc:
            tally.errors.append(f"order {order_id}: {exc!r}")
            raise
        finally:
            tally.in_flight -= 1
            tally.marked_cancelled += state.cancelled
        tally.completed += 1
        return PlainTextResponse(f"order {order_id} placed\n", status_code=201)

    app = Starlette(routes=[Route("/orders/{order_id:int}", create_order, methods=["POST"])])
    return DisconnectMiddleware(app, cancel=True)


def count_invalidations(engine: AsyncEngine, tally: Tally) -> None:
    """Count in ``tally`` the pooled connections SQLAlchemy throws away."""

    @event.listens_for(engine.sync_engine.pool, "invalidate")
    def count_invalidation(*args: object) -> None:
        tally.invalidated += 1


# -- the clients, and what is left behind ---------------------------------------------------


async def abandon_orders(live: Live, tally: Tally) -> None:
    """ORDERS clients, CONCURRENCY at a time, each leaving at a random (seeded) moment.

    A client sends its order and leaves (FIN: a closed tab, a client timeout; RST: a killed
    process, a dropped network) ``delay`` seconds after its handler started, unless the
    answer came first. Each request returns once its handler has: one still running
    SETTLE_WITHIN seconds after its order was sent is an error (then it is cancelled).
    """
    rng = random.Random(SEED)
    plans = [(n, rng.uniform(0, MAX_LEAVE_AFTER), rng.choice(CLOSES)) for n in range(ORDERS)]
    slots = asyncio.Semaphore(CONCURRENCY)

    async def client(order_id: int, delay: float, how: Close) -> None:
        async with slots:
            outcome = await live.request(
                method="POST",
                path=f"/orders/{order_id}",
                headers=[("content-length", "0")],
                leave=leave.before_response(after=delay, how=how),
                timeout=SETTLE_WITHIN,
            )
        if outcome.timed_out:
            tally.errors.append(f"order {order_id}: its handler still ran {SETTLE_WITHIN:g} s after it was sent")

    await asyncio.gather(*(client(*plan) for plan in plans))


async def serve_and_abandon(engine: AsyncEngine, tally: Tally, server: Serve = serve) -> None:
    """Serve the app on ``server`` while the clients abandon their orders, until each handler has ended."""
    async with server(build_app(engine, tally)) as live:
        await abandon_orders(live, tally)
        # SQLAlchemy closes each discarded connection in a shielded task of its own that
        # outlives the cancelled handler. Without this pause, an event loop that went on at
        # once often hung at its close, cancelling those tasks (aiosqlite).
        await asyncio.sleep(QUIET)


async def create_table(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)
        await conn.run_sync(metadata.create_all)


async def parts_per_order(engine: AsyncEngine) -> dict[int, int]:
    async with engine.connect() as conn:
        result = await conn.execute(select(order_parts.c.order_id, func.count()).group_by(order_parts.c.order_id))
        return {order: parts for order, parts in result}


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
    await create_table(engine)
    tally = Tally()
    count_invalidations(engine, tally)
    try:
        await serve_and_abandon(engine, tally)
        parts = await parts_per_order(engine)
        half_written = sum(1 for count in parts.values() if count != 2)
        idle = await idle_in_transaction(engine)
        pool_ok = await asyncio.wait_for(pool_connections_ok(engine), timeout=10)
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.drop_all)

    print(f"DisconnectMiddleware(cancel=True) on uvicorn, database {make_url(url)!r}")
    print(f"  requests sent:          {ORDERS} (each client left 0-{MAX_LEAVE_AFTER * 1000:.0f} ms later)")
    print(f"  orders aborted:         {ORDERS - len(parts)} (no rows written)")
    print(f"  orders committed:       {len(parts)}")
    print(f"  handlers cancelled:     {tally.interrupted} ({tally.cut_mid_statement} mid-statement)")
    print(f"  rows half-written:      {half_written}")
    print(f"  connections discarded:  {tally.invalidated} (cancelled mid-statement; the pool opened new ones)")
    print(f"  idle in transaction:    {'n/a (PostgreSQL only)' if idle is None else idle}")
    print(f"  pooled connections OK:  {pool_ok}/{POOL_SIZE} (all checked out at once, SELECT 1 on each)")
    if tally.in_flight or tally.errors:
        print(f"  still running: {tally.in_flight}; errors: {tally.errors[:5]}")
    if "DATABASE_URL" not in os.environ:
        print(
            "Against PostgreSQL: DATABASE_URL=postgresql+asyncpg://USER:PASSWORD@127.0.0.1:5432/DB "
            "python examples/db_transactions.py"
        )
    ok = not tally.in_flight and not tally.errors and half_written == 0 and not idle and pool_ok == POOL_SIZE
    # Shielded, a ROLLBACK or a close is never cut off: only a statement cut off discards a connection.
    ok = ok and tally.invalidated <= tally.cut_mid_statement
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
