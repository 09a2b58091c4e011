"""Three real scenarios over real servers: an LLM proxy, a child process's output, NDJSON rows.

Each app is served by a real server (uvicorn h11/httptools, hypercorn) in the test's
asyncio loop on 127.0.0.1; a raw-socket client in a worker thread reads a little of the
stream, then aborts with a TCP RST. The same scenarios are runnable examples:
``examples/llm_proxy.py``, ``examples/subprocess_stream.py``, ``examples/ndjson_rows.py``.

- LLM proxy: the upstream is a separate process (``examples/fake_llm_upstream.py``),
  reached through an ``httpx.AsyncClient`` stream; the upstream counts the tokens it
  makes and the streams it has open (``/stats``).
- Child process: ``python -c`` printing a line every 10 ms; the generator's ``finally``
  terminates, waits (bounded), kills if need be, and reaps it.
- NDJSON rows: an aiosqlite cursor over 100,000 rows in a temporary SQLite file.

The cleanup awaits in each generator's ``finally`` run inside ``shield()``: whatever ends
the stream (``guard_stream``'s interruption, Starlette's own disconnect listener) keeps
cancelling every unshielded ``await`` until the generator is done (see
``test_guarded_body_cleanup_awaits_complete_without_shield``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import anyio.to_thread
import httpx
import pytest

# The helpers the runnable examples use to check their own outcome, shared rather than copied.
from ndjson_rows import database_is_free
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from subprocess_stream import kill_leftover, pid_state, stop_child

from asgi_disconnect import DisconnectMiddleware, DisconnectState, disconnect_state, guard_stream, shield
from asgi_disconnect._types import ASGIApp, Receive, Scope, Send
from tests.servers import (
    SERVERS,
    ServerKind,
    read_then_leave,
    run_server,
)

pytestmark = [pytest.mark.anyio, pytest.mark.server]

UPSTREAM_SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "fake_llm_upstream.py"
FINALLY_WITHIN = 1.0  # seconds from the client's abort to the generator's finally
GONE_WITHIN = 2.0  # seconds from the client's abort to the upstream stream / child process being gone
TOKENS = 2000  # ~10 s of upstream stream at 5 ms a token: every test ends long before
MAX_TOKENS_AFTER_DETECTION = 5
CHILD = "import time\nfor i in range(100_000):\n    print(f'line {i}', flush=True)\n    time.sleep(0.01)\n"
ROWS = 100_000
BATCH = 1000


@pytest.fixture
def anyio_backend() -> str:
    """Real servers run on asyncio only."""
    return "asyncio"


async def wait_until(done: Callable[[], bool], within: float) -> float | None:
    """Poll ``done`` every 5 ms for at most ``within`` seconds; return when it became true."""
    deadline = time.monotonic() + within
    for _ in range(int(within / 0.005) + 1):
        if done():
            return time.monotonic()
        if time.monotonic() > deadline:
            break
        await anyio.sleep(0.005)
    return time.monotonic() if done() else None


# -- 1. an LLM proxy ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """The fake LLM upstream as a separate process on a free loopback port; its base URL."""
    proc = subprocess.Popen(
        [sys.executable, str(UPSTREAM_SCRIPT), "--port", "0", "--exit-on-stdin-eof", "--max-seconds", "300"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline().decode() if ready else ""
        assert line.startswith("listening on "), f"upstream did not start (exit code {proc.poll()}): {line!r}"
        yield line.removeprefix("listening on ").strip()
    finally:
        proc.terminate()  # our own child, by its PID
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


@dataclass
class RelayTrace:
    received: int = 0  # tokens the proxy got from the upstream
    finally_at: float | None = None
    closed_at: float | None = None  # the upstream response was closed
    state: DisconnectState | None = None


async def relay(client: httpx.AsyncClient, url: str, trace: RelayTrace) -> AsyncIterator[bytes]:
    async with client.stream("GET", url) as response:
        try:
            async for line in response.aiter_lines():  # bounded: the upstream sends at most TOKENS
                if line.startswith("data: "):
                    trace.received += 1
                    yield f"{line}\n\n".encode()
        finally:
            trace.finally_at = time.monotonic()
            await response.aclose()  # httpcore shields its own connection close
            trace.closed_at = time.monotonic()


def proxy_app(client: httpx.AsyncClient, upstream: str, trace: RelayTrace, guarded: bool) -> ASGIApp:
    async def chat(request: Request) -> StreamingResponse:
        stream_id = request.query_params["id"]
        body = relay(client, f"{upstream}/v1/stream?tokens={TOKENS}&id={stream_id}", trace)
        if not guarded:
            return StreamingResponse(body, media_type="text/event-stream")
        trace.state = disconnect_state(request.scope)
        return StreamingResponse(guard_stream(body, request.scope), media_type="text/event-stream")

    app = Starlette(routes=[Route("/chat", chat)])
    return DisconnectMiddleware(app) if guarded else app


@dataclass
class ProxyRun:
    trace: RelayTrace
    left_at: float
    upstream_closed_at: float | None  # the upstream stream's generator finished (its clock = ours)
    produced: int  # by the upstream for this stream, in all
    after_abort: int  # produced upstream after the client's abort
    after_detection: int | None  # ... after the proxy detected it (middleware only)

    def report(self) -> str:
        def ms(at: float | None) -> str:
            return "never" if at is None else f"{(at - self.left_at) * 1000:.1f} ms"

        return (
            f"relay finally after {ms(self.trace.finally_at)}, upstream response closed after "
            f"{ms(self.trace.closed_at)}, upstream stream closed after {ms(self.upstream_closed_at)}; "
            f"upstream produced {self.produced} tokens, {self.after_abort} after the abort, "
            f"{self.after_detection} after detection; the proxy received {self.trace.received}"
        )


async def run_proxy(upstream: str, kind: ServerKind, guarded: bool) -> ProxyRun:
    trace = RelayTrace()
    stream_id = uuid.uuid4().hex

    async def stats(since: float) -> dict[str, Any]:
        response = await client.get(f"{upstream}/stats", params={"id": stream_id, "since": repr(since)})
        stream: dict[str, Any] = response.json()["stream"]
        return stream

    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        async with run_server(proxy_app(client, upstream, trace, guarded), kind) as port:
            left_at = await anyio.to_thread.run_sync(read_then_leave, port, f"/chat?id={stream_id}", b"tok2\n")
            await wait_until(lambda: trace.finally_at is not None, FINALLY_WITHIN)
            deadline = left_at + GONE_WITHIN
            final = await stats(left_at)
            for _ in range(200):  # each poll is a request: bounded by count and by time
                if not final["open"] or time.monotonic() > deadline:
                    break
                await anyio.sleep(0.005)
                final = await stats(left_at)
            after_detection = None
            if trace.state is not None and trace.state.detected_at is not None:
                after_detection = (await stats(trace.state.detected_at))["produced_since"]
    # closed_at is the upstream process's time.monotonic(): one clock for every process on the machine.
    return ProxyRun(trace, left_at, final["closed_at"], final["produced"], final["produced_since"], after_detection)


@pytest.mark.parametrize("kind", SERVERS)
async def test_llm_proxy_stops_the_upstream_when_the_client_aborts(upstream: str, kind: ServerKind) -> None:
    """The relay's finally closes the upstream response at once; the upstream stops generating."""
    run = await run_proxy(upstream, kind, guarded=True)
    print(f"asgi-disconnect on {kind}: {run.report()}")
    assert run.trace.state is not None and run.trace.state.disconnected, run.report()
    assert run.trace.finally_at is not None and run.trace.finally_at - run.left_at < FINALLY_WITHIN, run.report()
    assert run.trace.closed_at is not None, run.report()
    assert run.upstream_closed_at is not None and run.upstream_closed_at - run.left_at < GONE_WITHIN, run.report()
    assert run.after_detection is not None and run.after_detection <= MAX_TOKENS_AFTER_DETECTION, run.report()
    assert run.produced < TOKENS // 4, run.report()


@pytest.mark.parametrize("kind", SERVERS)
async def test_llm_proxy_control_without_the_package(upstream: str, kind: ServerKind) -> None:
    """Control: a bare Starlette StreamingResponse over the same relay also stops, by Starlette's own listener.

    uvicorn (ASGI spec 2.3) and hypercorn (2.1) advertise a spec below 2.4, so Starlette's
    StreamingResponse runs a disconnect listener beside the stream and cancels the stream
    task when ``http.disconnect`` arrives: the cancellation lands in the relay at its
    ``await`` on the upstream, and httpx's close, which httpcore shields, completes. That
    is deterministic, so it is asserted; on a server advertising 2.4 Starlette has no
    listener and only a failing ``send()`` would stop it. The measurements are printed.
    """
    run = await run_proxy(upstream, kind, guarded=False)
    print(f"bare Starlette on {kind}: {run.report()}")
    assert run.trace.finally_at is not None and run.trace.finally_at - run.left_at < FINALLY_WITHIN, run.report()
    assert run.trace.closed_at is not None, run.report()
    assert run.upstream_closed_at is not None and run.upstream_closed_at - run.left_at < GONE_WITHIN, run.report()


# -- 2. a child process's output ---------------------------------------------------------


@dataclass
class ChildTrace:
    pid: int | None = None
    lines_at: list[float] = field(default_factory=list)  # time.monotonic() of each line passed on
    finally_at: float | None = None
    returncode: int | None = None  # set once the finally has reaped the child
    state: DisconnectState | None = None


async def child_output(trace: ChildTrace, shielded: bool = True) -> AsyncIterator[bytes]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-u", "-c", CHILD, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
    )
    trace.pid = proc.pid
    try:
        assert proc.stdout is not None
        for _ in range(100_000):
            line = await proc.stdout.readline()
            if not line:
                break
            trace.lines_at.append(time.monotonic())
            yield line
    finally:
        trace.finally_at = time.monotonic()
        with shield() if shielded else contextlib.nullcontext():
            trace.returncode = await stop_child(proc)


async def wait_child_gone(trace: ChildTrace) -> str:
    """Wait (bounded) for the child's PID to be gone; kill a leftover; return its last state."""
    assert trace.pid is not None
    pid = trace.pid
    await wait_until(lambda: pid_state(pid) == "gone", GONE_WITHIN)
    state = pid_state(pid)
    if state == "running":
        kill_leftover(pid)  # a leak: fail the test, but leave no process behind
    return state


@pytest.mark.parametrize("kind", SERVERS)
async def test_child_process_is_terminated_and_reaped_when_the_client_aborts(kind: ServerKind) -> None:
    """The streamed child process is gone within 2 s of the abort: no orphan, no zombie."""
    trace = ChildTrace()

    async def tail(request: Request) -> StreamingResponse:
        trace.state = disconnect_state(request.scope)
        return StreamingResponse(guard_stream(child_output(trace), request.scope), media_type="text/plain")

    app = DisconnectMiddleware(Starlette(routes=[Route("/tail", tail)]))
    async with run_server(app, kind) as port:
        left_at = await anyio.to_thread.run_sync(read_then_leave, port, "/tail", b"line 4\n")
        state = await wait_child_gone(trace)
        await wait_until(lambda: trace.returncode is not None, FINALLY_WITHIN)
    assert trace.state is not None and trace.state.detected_at is not None
    detected_at = trace.state.detected_at
    assert trace.finally_at is not None and trace.finally_at - left_at < FINALLY_WITHIN
    assert state == "gone", f"child {trace.pid} is {state} {GONE_WITHIN} s after the abort"
    assert trace.returncode is not None and trace.returncode != 0, trace.returncode  # stopped by a signal
    assert sum(1 for t in trace.lines_at if t > detected_at) <= 1


async def test_guarded_body_cleanup_awaits_complete_without_shield() -> None:
    """With no framework listener involved, guard_stream lets the body's unshielded cleanup awaits complete."""
    trace = ChildTrace()

    async def raw(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        async for chunk in guard_stream(child_output(trace, shielded=False), scope):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async with run_server(DisconnectMiddleware(raw), "uvicorn-h11") as port:
        await anyio.to_thread.run_sync(read_then_leave, port, "/", b"line 4\n")
        state = await wait_child_gone(trace)
        await wait_until(lambda: trace.returncode is not None, FINALLY_WITHIN)
    assert state == "gone"
    assert trace.returncode is not None, "the finally's wait for the child was cancelled: it never reaped it"


# -- 3. NDJSON rows from a SQLite cursor -------------------------------------------------


@pytest.fixture(scope="module")
def rows_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file with a table of 100,000 rows."""
    path = tmp_path_factory.mktemp("scenarios") / "rows.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, amount REAL NOT NULL)")
        db.executemany(
            "INSERT INTO items (id, name, amount) VALUES (?, ?, ?)",
            ((i, f"item-{i}", i * 0.25) for i in range(1, ROWS + 1)),
        )
    return path


@dataclass
class RowsTrace:
    batches_at: list[float] = field(default_factory=list)  # time.monotonic() of each batch produced
    cursor_closed_at: float | None = None
    connection_closed_at: float | None = None
    connection: aiosqlite.Connection | None = None
    state: DisconnectState | None = None


async def ndjson_rows(path: Path, trace: RowsTrace) -> AsyncIterator[bytes]:
    db = await aiosqlite.connect(path)
    trace.connection = db
    try:
        cursor = await db.execute("SELECT id, name, amount FROM items ORDER BY id")
        try:
            for _ in range(ROWS // BATCH + 1):
                await asyncio.sleep(0.01)  # a slow query
                rows = await cursor.fetchmany(BATCH)
                if not rows:
                    break
                trace.batches_at.append(time.monotonic())
                yield "".join(json.dumps({"id": r[0], "name": r[1], "amount": r[2]}) + "\n" for r in rows).encode()
        finally:
            with shield():
                await cursor.close()
            trace.cursor_closed_at = time.monotonic()
    finally:
        with shield():
            await db.close()
        trace.connection_closed_at = time.monotonic()


def aiosqlite_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name}


def test_a_cursor_mid_read_blocks_the_exclusive_lock_probe(rows_db: Path) -> None:
    """The probe is sound: an open cursor mid-read makes database_is_free() false, closing it frees it."""
    with contextlib.closing(sqlite3.connect(rows_db)) as db:
        cursor = db.execute("SELECT id FROM items")
        cursor.fetchmany(BATCH)
        assert not database_is_free(rows_db)
        cursor.close()
        assert database_is_free(rows_db)


@pytest.mark.parametrize("kind", SERVERS)
async def test_ndjson_rows_close_cursor_and_connection_when_the_client_aborts(kind: ServerKind, rows_db: Path) -> None:
    """The cursor and the connection close at once; the file is free; at most one batch follows detection."""
    trace = RowsTrace()
    threads_before = aiosqlite_threads()

    async def rows(request: Request) -> StreamingResponse:
        trace.state = disconnect_state(request.scope)
        body = guard_stream(ndjson_rows(rows_db, trace), request.scope)
        return StreamingResponse(body, media_type="application/x-ndjson")

    app = DisconnectMiddleware(Starlette(routes=[Route("/rows", rows)]))
    try:
        async with run_server(app, kind) as port:
            left_at = await anyio.to_thread.run_sync(read_then_leave, port, "/rows", b'{"id": 2500,')
            await wait_until(lambda: trace.connection_closed_at is not None, FINALLY_WITHIN)
            free = await wait_until(lambda: database_is_free(rows_db), GONE_WITHIN)
            ended = await wait_until(lambda: not aiosqlite_threads() - threads_before, GONE_WITHIN)
    finally:
        if trace.connection is not None and trace.connection_closed_at is None:
            await trace.connection.close()  # a leak: fail below, but leave no thread behind
    assert trace.state is not None and trace.state.detected_at is not None
    detected_at = trace.state.detected_at
    assert trace.cursor_closed_at is not None and trace.cursor_closed_at - left_at < FINALLY_WITHIN
    assert trace.connection_closed_at is not None and trace.connection_closed_at - left_at < FINALLY_WITHIN
    assert free is not None, "another connection still holds a lock on the database"
    assert ended is not None, "aiosqlite's worker thread is still running"
    assert sum(1 for t in trace.batches_at if t > detected_at) <= 1
    assert len(trace.batches_at) < ROWS // BATCH // 4
