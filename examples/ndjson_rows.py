"""Stream database rows as NDJSON; when the client leaves, the cursor and connection must close.

Run: ``python examples/ndjson_rows.py``. It writes a SQLite table of 100,000 rows to a
temporary file, then serves a Starlette app with uvicorn on a free loopback port.
``GET /rows`` reads the table through an ``aiosqlite`` cursor, 1000 rows per batch with
10 ms between batches (a slow query), and streams one JSON object per line. A raw-socket
client (``asgi_disconnect.testing``'s ``live.request()``) reads a few batches and aborts
(TCP RST). The run is done twice:

- **asgi-disconnect**: ``DisconnectMiddleware`` and ``guard_stream``. Checked: the
  generator closed its cursor and its connection (their cleanup runs inside
  ``shield()``, which any interruption respects) within 1 s of the abort; nobody holds
  the database any more, seen from outside: a second connection takes an EXCLUSIVE lock
  at once (an open cursor mid-read holds a SHARED lock, which blocks it); aiosqlite's
  worker thread for the connection has ended; and the stream produced at most one batch
  after the middleware detected the abort.
- **bare Starlette**: the same generator in a plain ``StreamingResponse``. Measured and
  printed, not checked. On servers that advertise ASGI spec < 2.4 (uvicorn, hypercorn)
  Starlette's ``StreamingResponse`` runs its own disconnect listener and cancels the
  stream task, so the cursor is closed here too (thanks to the shielded cleanup).

Exits 0 when every check passes, 1 otherwise. Needs asgi-disconnect, starlette, uvicorn
and aiosqlite.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiosqlite
from _measure import Serve, at_most, left_at, report, seconds, wait_until
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from asgi_disconnect import DisconnectMiddleware, DisconnectState, disconnect_state, guard_stream, shield
from asgi_disconnect.testing import leave, serve

ROWS = 100_000
BATCH = 1000  # rows per fetch, one chunk of the response
BATCH_DELAY = 0.01  # seconds before each fetch: a slow query
READ_BATCHES = 3  # the client leaves once it has received this many
CLOSED_WITHIN = 1.0  # seconds from the abort to the cursor and connection being closed
RELEASED_WITHIN = 2.0  # seconds more for each effect to be seen from outside: the lock, the thread
WORKER = "_connection_worker_thread"  # aiosqlite's thread target, part of the thread's name


@dataclass
class Trace:
    batches_at: list[float] = field(default_factory=list)  # time.monotonic() of each batch produced
    cursor_closed_at: float | None = None
    connection_closed_at: float | None = None
    connection: aiosqlite.Connection | None = None  # kept only to clean up after a failed run
    state: DisconnectState | None = None  # with the middleware only


def create_table(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, amount REAL NOT NULL)")
        db.executemany(
            "INSERT INTO items (id, name, amount) VALUES (?, ?, ?)",
            ((i, f"item-{i}", i * 0.25) for i in range(1, ROWS + 1)),
        )


async def ndjson_rows(path: Path, trace: Trace) -> AsyncIterator[bytes]:
    db = await aiosqlite.connect(path)
    trace.connection = db
    try:
        cursor = await db.execute("SELECT id, name, amount FROM items ORDER BY id")
        try:
            for _ in range(ROWS // BATCH + 1):
                await asyncio.sleep(BATCH_DELAY)
                rows = await cursor.fetchmany(BATCH)
                if not rows:
                    break
                trace.batches_at.append(time.monotonic())
                yield "".join(
                    json.dumps({"id": row[0], "name": row[1], "amount": row[2]}) + "\n" for row in rows
                ).encode()
        finally:
            # shield(): the interruption that ended the loop (guard_stream's, or
            # Starlette's own disconnect listener) lands at every await until the
            # generator is done. Unshielded, this close would be cancelled and the
            # connection below never closed: a reader holding its lock, and a thread.
            with shield():
                await cursor.close()
            trace.cursor_closed_at = time.monotonic()
    finally:
        with shield():
            await db.close()
        trace.connection_closed_at = time.monotonic()


def build_app(path: Path, traces: list[Trace], guarded: bool) -> ASGIApp:
    async def rows(request: Request) -> StreamingResponse:
        trace = Trace()
        traces.append(trace)
        if not guarded:
            return StreamingResponse(ndjson_rows(path, trace), media_type="application/x-ndjson")
        trace.state = disconnect_state(request.scope)
        return StreamingResponse(
            guard_stream(ndjson_rows(path, trace), request.scope), media_type="application/x-ndjson"
        )

    app = Starlette(routes=[Route("/rows", rows)])
    return DisconnectMiddleware(app) if guarded else app


def database_is_free(path: Path) -> bool:
    """True if a second connection can take an EXCLUSIVE lock now: no reader holds the file."""
    with contextlib.closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as db:
        try:
            db.execute("BEGIN EXCLUSIVE")
        except sqlite3.OperationalError:  # "database is locked"
            return False
        db.execute("ROLLBACK")
        return True


def worker_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if WORKER in thread.name}


@dataclass
class Result:
    cursor_closed_after: float | None  # seconds from the abort
    connection_closed_after: float | None
    database_free: bool  # a second connection could take an EXCLUSIVE lock
    worker_thread_ended: bool
    batches_after_detection: int | None
    trace: Trace  # what the generator recorded


async def run(path: Path, guarded: bool, server: Serve = serve) -> Result:
    """Serve the app on ``server``; a client reads a few batches and aborts; measure what follows."""
    traces: list[Trace] = []
    threads_before = worker_threads()
    async with server(build_app(path, traces, guarded)) as live:
        outcome = await live.request(path="/rows", leave=leave.after_chunks(READ_BATCHES, how="rst"))
        abort = left_at(outcome)
        trace = traces[0]
        await wait_until(lambda: trace.connection_closed_at is not None, CLOSED_WITHIN)
        free = await wait_until(lambda: database_is_free(path), RELEASED_WITHIN)
        ended = await wait_until(lambda: not worker_threads() - threads_before, RELEASED_WITHIN)
        after_detection = None
        if trace.state is not None and trace.state.detected_at is not None:
            detected_at = trace.state.detected_at
            after_detection = sum(1 for t in trace.batches_at if t > detected_at)
    if trace.connection is not None and trace.connection_closed_at is None:
        await trace.connection.close()  # a leaked connection: report it, then do not leave it open
    return Result(
        cursor_closed_after=None if trace.cursor_closed_at is None else trace.cursor_closed_at - abort,
        connection_closed_after=None if trace.connection_closed_at is None else trace.connection_closed_at - abort,
        database_free=free is not None,
        worker_thread_ended=ended is not None,
        batches_after_detection=after_detection,
        trace=trace,
    )


async def main() -> int:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rows.sqlite3"
        await asyncio.to_thread(create_table, path)
        guarded = await run(path, guarded=True)
        bare = await run(path, guarded=False)
    rows = [
        ("cursor closed after the abort", seconds(guarded.cursor_closed_after), seconds(bare.cursor_closed_after)),
        ("connection closed after", seconds(guarded.connection_closed_after), seconds(bare.connection_closed_after)),
        ("EXCLUSIVE lock available", str(guarded.database_free), str(bare.database_free)),
        ("aiosqlite thread ended", str(guarded.worker_thread_ended), str(bare.worker_thread_ended)),
        ("batches produced", str(len(guarded.trace.batches_at)), str(len(bare.trace.batches_at))),
        ("batches after detection", str(guarded.batches_after_detection), "n/a"),
    ]
    checks = [
        (at_most(guarded.cursor_closed_after, CLOSED_WITHIN), f"the cursor was not closed within {CLOSED_WITHIN} s"),
        (
            at_most(guarded.connection_closed_after, CLOSED_WITHIN),
            f"the connection was not closed within {CLOSED_WITHIN} s",
        ),
        (guarded.database_free, "another connection still holds a lock on the database"),
        (guarded.worker_thread_ended, "aiosqlite's worker thread is still running"),
        (
            at_most(guarded.batches_after_detection, 1),
            f"{guarded.batches_after_detection} batches produced after detection",
        ),
    ]
    title = f"the client reads {READ_BATCHES} batches of {BATCH} rows, of {ROWS}, one every 10 ms+, then aborts (RST)"
    return report(title, rows, checks, "with asgi-disconnect the cursor and the connection were closed at once")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
