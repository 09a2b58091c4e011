"""Three real scenarios over real servers: an LLM proxy, a child process's output, NDJSON rows.

Each scenario is a runnable example, imported here: ``examples/llm_proxy.py``,
``examples/subprocess_stream.py``, ``examples/ndjson_rows.py``. A test runs the
example's own ``run()``, its app served by a real server (uvicorn h11/httptools,
hypercorn) in the test's asyncio loop on 127.0.0.1 (``asgi_disconnect.testing.serve``):
its client reads a little of the stream, then aborts with a TCP RST, and the run
measures what follows. The tests assert what the examples only print or check loosely.

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

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import llm_proxy
import ndjson_rows
import pytest
import subprocess_stream
from _measure import wait_until
from llm_proxy import MAX_TOKENS_AFTER_DETECTION, TOKENS, UPSTREAM_CLOSED_WITHIN, upstream_process
from ndjson_rows import BATCH, CLOSED_WITHIN, ROWS, create_table, database_is_free
from subprocess_stream import Trace, child_output, wait_gone

from asgi_disconnect import DisconnectMiddleware, guard_stream
from asgi_disconnect._types import Receive, Scope, Send
from asgi_disconnect.testing import leave, serve
from tests.helpers import served_by
from tests.servers import SERVERS, ServerKind

pytestmark = [pytest.mark.anyio, pytest.mark.server]


@pytest.fixture
def anyio_backend() -> str:
    """Real servers run on asyncio only."""
    return "asyncio"


# -- 1. an LLM proxy ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """The fake LLM upstream as a separate process on a free loopback port; its base URL."""
    with upstream_process(max_seconds=300) as url:
        yield url


@pytest.mark.parametrize("kind", SERVERS)
async def test_llm_proxy_stops_the_upstream_when_the_client_aborts(upstream: str, kind: ServerKind) -> None:
    """The relay's finally closes the upstream response at once; the upstream stops generating."""
    run = await llm_proxy.run(upstream, guarded=True, server=served_by(kind))
    print(f"asgi-disconnect on {kind}: {run}")
    assert run.trace.state is not None and run.trace.state.disconnected, run
    assert run.finally_after is not None and run.finally_after < llm_proxy.FINALLY_WITHIN, run
    assert run.trace.closed_at is not None, run
    assert run.upstream_closed_after is not None and run.upstream_closed_after < UPSTREAM_CLOSED_WITHIN, run
    assert run.tokens_after_detection is not None and run.tokens_after_detection <= MAX_TOKENS_AFTER_DETECTION, run
    assert run.produced < TOKENS // 4, run


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
    run = await llm_proxy.run(upstream, guarded=False, server=served_by(kind))
    print(f"bare Starlette on {kind}: {run}")
    assert run.finally_after is not None and run.finally_after < llm_proxy.FINALLY_WITHIN, run
    assert run.trace.closed_at is not None, run
    assert run.upstream_closed_after is not None and run.upstream_closed_after < UPSTREAM_CLOSED_WITHIN, run


# -- 2. a child process's output ---------------------------------------------------------


@pytest.mark.parametrize("kind", SERVERS)
async def test_child_process_is_terminated_and_reaped_when_the_client_aborts(kind: ServerKind) -> None:
    """The streamed child process is gone within 2 s of the abort: no orphan, no zombie."""
    run = await subprocess_stream.run(guarded=True, server=served_by(kind))
    assert run.trace.state is not None and run.trace.state.detected_at is not None
    assert run.finally_after is not None and run.finally_after < subprocess_stream.FINALLY_WITHIN
    assert run.last_seen == "gone", (
        f"child {run.trace.pid} is {run.last_seen} {subprocess_stream.GONE_WITHIN} s after the abort"
    )
    returncode = run.trace.returncode
    assert returncode is not None and returncode != 0, returncode  # stopped by a signal
    assert run.lines_after_detection is not None and run.lines_after_detection <= 1


async def test_guarded_body_cleanup_awaits_complete_without_shield() -> None:
    """With no framework listener involved, guard_stream lets the body's unshielded cleanup awaits complete."""
    trace = Trace()

    async def raw(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        async for chunk in guard_stream(child_output(trace, shielded=False), scope):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async with serve(DisconnectMiddleware(raw), server="uvicorn-h11") as live:
        outcome = await live.request(leave=leave.after_chunks(5, how="rst"))
        assert trace.pid is not None
        state, _ = await wait_gone(trace.pid)
        await wait_until(lambda: trace.returncode is not None, subprocess_stream.FINALLY_WITHIN)
    outcome.assert_aborted(phase="mid_body")
    assert state == "gone"
    assert trace.returncode is not None, "the finally's wait for the child was cancelled: it never reaped it"


# -- 3. NDJSON rows from a SQLite cursor -------------------------------------------------


@pytest.fixture(scope="module")
def rows_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file with a table of 100,000 rows."""
    path = tmp_path_factory.mktemp("scenarios") / "rows.sqlite3"
    create_table(path)
    return path


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
    run = await ndjson_rows.run(rows_db, guarded=True, server=served_by(kind))
    assert run.trace.state is not None and run.trace.state.detected_at is not None
    assert run.cursor_closed_after is not None and run.cursor_closed_after < CLOSED_WITHIN
    assert run.connection_closed_after is not None and run.connection_closed_after < CLOSED_WITHIN
    assert run.database_free, "another connection still holds a lock on the database"
    assert run.worker_thread_ended, "aiosqlite's worker thread is still running"
    assert run.batches_after_detection is not None and run.batches_after_detection <= 1
    assert len(run.trace.batches_at) < ROWS // BATCH // 4
