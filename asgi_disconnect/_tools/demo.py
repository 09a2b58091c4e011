"""``asgi-disconnect demo``: the problem and the fix, on a real uvicorn, in under a minute.

One uvicorn serves, on a free port of 127.0.0.1, the same small apps three times: bare
(``/bare/...``), wrapped in ``DisconnectMiddleware`` (``/observe/...``) and wrapped in
``DisconnectMiddleware(cancel=True)`` (``/cancel/...``). The server and the clients that
leave each request mid-flight are ``asgi_disconnect.testing``'s (``serve()``,
``live.request()``): each ``Outcome`` says when the handler returned and what the server
logged, and the apps record the work they did after the client left. The app code is
the same for all three: it uses the package only where a handler would, through
``scope.get(SCOPE_KEY)``, which is ``None`` when the middleware is absent. Both wrapped
modes count their aborts with ``asgi_disconnect.prometheus.AbortMetrics``; the demo ends
by scraping the server's ``/metrics``, as Prometheus would.

Needs uvicorn, Starlette and prometheus_client (``pip install 'asgi-disconnect[demo]'``);
SQLite is the standard library's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from asgi_disconnect import SCOPE_KEY, DisconnectMiddleware, DisconnectState, guard_stream, shield
from asgi_disconnect._loopback import HOST, request_bytes
from asgi_disconnect._types import ASGIApp, Receive, Scope, Send
from asgi_disconnect.prometheus import AbortMetrics
from asgi_disconnect.testing import Departure, Live, leave, serve

MODES = ("bare", "observe", "cancel")


@dataclass(frozen=True)
class Timing:
    """How long each scenario runs; ``--quick`` shortens the retry storm only."""

    tokens: int = 60  # LLM tokens per answer
    token_every: float = 0.015
    events: int = 40  # SSE events per feed (a real feed never ends; this one must, for the bare run)
    event_every: float = 0.025
    rows: int = 20  # rows per order
    row_every: float = 0.03
    steps: int = 8  # upstream calls in the slow handler
    step_every: float = 0.1
    storm_seconds: float = 8.0
    storm_clients: int = 64
    storm_slots: int = 32
    storm_timeout: float = 1.0  # the clients' timeout
    storm_fast: tuple[float, float] = (0.1, 0.3)  # most requests take this long...
    storm_slow_share: float = 0.2  # ...this share takes longer than the clients wait
    storm_slow: float = 3.0


@dataclass
class Trace:
    """What one request's handler did, with ``time.monotonic()`` stamps."""

    work: list[float] = field(default_factory=list)
    transaction_ended_at: float | None = None
    committed: bool | None = None


class Recorder:
    """The apps write here; the demo reads after each client has left."""

    def __init__(self) -> None:
        self.trace = Trace()
        # retry storm: request id -> holds a slot; ids whose client gave up
        self.holders: set[str] = set()
        self.abandoned: dict[str, float] = {}  # id -> when its client closed
        self.abandoned_lock = threading.Lock()

    def fresh(self) -> Trace:
        self.trace = Trace()
        return self.trace


def _state(scope: Scope) -> DisconnectState | None:
    state = scope.get(SCOPE_KEY)
    return state if isinstance(state, DisconnectState) else None


class _AsgiEndpoint:
    """Lets a plain ASGI function be a Starlette ``Route`` endpoint (functions are taken as handlers)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def build_apps(rec: Recorder, timing: Timing, db_path: Path, registry: CollectorRegistry) -> ASGIApp:
    """The demo's server app: every scenario, bare and behind the middleware in both modes,
    whose aborts ``registry`` counts (``GET /metrics``)."""

    async def llm_tokens(scope: Scope, receive: Receive, send: Send) -> None:
        # An LLM-style token stream as plain ASGI (as inference servers and small
        # frameworks write it): nothing here listens for the disconnect, and uvicorn
        # drops the data sent after it without a word.
        trace = rec.trace
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for n in range(1, timing.tokens + 1):
            await asyncio.sleep(timing.token_every)  # the model computes a token (GPU time, billed)
            trace.work.append(time.monotonic())
            await send({"type": "http.response.body", "body": f"tok{n} ".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def sse_feed(request: Request) -> Response:
        trace = rec.trace

        async def events() -> AsyncIterator[bytes]:
            for n in range(1, timing.events + 1):
                await asyncio.sleep(timing.event_every)  # wait for the next update
                trace.work.append(time.monotonic())
                yield f"data: update {n}\n\n".encode()

        body: AsyncIterator[bytes] = events()
        if _state(request.scope) is not None:
            body = guard_stream(body, request.scope, heartbeat=15.0)
        return StreamingResponse(body, media_type="text/event-stream")

    async def order(request: Request) -> Response:
        # One order in one transaction, a row at a time with slow work in between
        # (pricing, stock checks). The driver is sync, so every statement runs in a
        # worker thread, as sync drivers are used from async code. With the package the
        # handler checks the flag between rows, and its COMMIT and ROLLBACK are shielded:
        # a cancellation that cut one off would leave the statement running in its
        # thread while the handler moved on.
        trace = rec.trace
        state = _state(request.scope)
        db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)

        async def sql(statement: str, *args: object) -> None:
            await asyncio.to_thread(db.execute, statement, args)

        try:
            await sql("BEGIN IMMEDIATE")
            try:
                for n in range(timing.rows):
                    await asyncio.sleep(timing.row_every)
                    if state is not None and state.disconnected:
                        break  # nobody will see the confirmation: do not place the order
                    await sql("INSERT INTO order_rows (line) VALUES (?)", n)
                    trace.work.append(time.monotonic())
                else:
                    with shield():
                        await sql("COMMIT")
                        trace.committed = True
                    return PlainTextResponse("order placed")
                with shield():
                    await sql("ROLLBACK")
                    trace.committed = False
                return PlainTextResponse("order dropped", status_code=499)
            except BaseException:
                with shield():
                    await sql("ROLLBACK")
                    trace.committed = False
                raise
            finally:
                trace.transaction_ended_at = time.monotonic()
        finally:
            db.close()

    async def slow(request: Request) -> Response:
        # A handler written without the package in mind: it never looks at the flag.
        trace = rec.trace
        for _ in range(timing.steps):
            await asyncio.sleep(timing.step_every)  # an upstream call
            trace.work.append(time.monotonic())
        return PlainTextResponse("report ready")

    slots = asyncio.Semaphore(timing.storm_slots)

    async def storm(request: Request) -> Response:
        request_id = request.headers["x-request-id"]
        rng = random.Random(request_id)
        if rng.random() < timing.storm_slow_share:
            seconds = timing.storm_slow
        else:
            seconds = rng.uniform(*timing.storm_fast)
        async with slots:  # a concurrency limit: 32 requests at a time, the rest queue
            rec.holders.add(request_id)
            try:
                await asyncio.sleep(seconds)
            finally:
                rec.holders.discard(request_id)
        return PlainTextResponse("ok")

    scenarios = Starlette(
        routes=[
            Route("/tokens", _AsgiEndpoint(llm_tokens)),
            Route("/sse", sse_feed),
            Route("/order", order, methods=["POST"]),
            Route("/slow", slow),
            Route("/storm", storm),
        ]
    )

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    observed = AbortMetrics(registry, namespace="observe")
    cancelled = AbortMetrics(registry, namespace="cancel")
    return Starlette(
        routes=[
            Route("/metrics", metrics),
            Mount("/bare", app=scenarios),
            Mount("/observe", app=DisconnectMiddleware(scenarios, on_disconnect=[observed])),
            Mount("/cancel", app=DisconnectMiddleware(scenarios, cancel=True, on_disconnect=[cancelled])),
        ]
    )


# -- the run ----------------------------------------------------------------------------


@dataclass
class Result:
    """What one scenario did in one mode after its client left."""

    work_after: int
    returned_after_ms: float | None  # None: the handler still ran at the timeout (5 s)
    transaction_open_ms: float | None = None  # how long the transaction stayed open after the client left
    committed: bool | None = None
    logged: int = 0
    tracebacks: int = 0


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    unit: str  # what "work" counts
    path: str  # under /bare, /observe and /cancel
    leave: Departure  # where the client leaves
    method: str = "GET"


def _scenarios(timing: Timing) -> list[Scenario]:
    return [
        Scenario("tokens", "LLM token stream (plain ASGI)", "tokens generated", "/tokens", leave.after_chunks(5)),
        Scenario("sse", "SSE feed (Starlette StreamingResponse)", "events generated", "/sse", leave.after_chunks(3)),
        Scenario(
            "order",
            "DB transaction (Starlette + SQLite)",
            "rows written",
            "/order",
            leave.before_response(after=timing.row_every * 3.5),
            method="POST",
        ),
        Scenario(
            "slow",
            "slow handler (Starlette, never checks)",
            "upstream calls made",
            "/slow",
            leave.before_response(after=timing.step_every * 1.5),
        ),
    ]


async def _run_one(
    scenario: Scenario, mode: str, live: Live, rec: Recorder, events: list[MutableMapping[str, Any]]
) -> Result:
    trace = rec.fresh()
    logged_before = len(events)
    headers = [("content-length", "0")] if scenario.method == "POST" else []
    outcome = await live.request(
        method=scenario.method, path=f"/{mode}{scenario.path}", headers=headers, leave=scenario.leave
    )
    left_at = time.monotonic() if outcome.left_at is None else outcome.left_at  # None: the response came first
    ended = trace.transaction_ended_at
    return Result(
        work_after=sum(1 for t in trace.work if t > left_at),
        returned_after_ms=outcome.app_returned_after_ms,
        transaction_open_ms=None if ended is None else max(0.0, ended - left_at) * 1000,
        committed=trace.committed,
        logged=len(events) - logged_before,
        tracebacks=len(outcome.tracebacks),
    )


# -- retry storm ------------------------------------------------------------------------


@dataclass
class StormResult:
    """One mode's retry storm."""

    seconds: float
    useful: int  # responses a client received within its timeout
    timed_out: int
    abandoned_slots_mean: float
    abandoned_slots_peak: int

    @property
    def useful_per_second(self) -> float:
        return self.useful / self.seconds


async def _storm_client(
    port: int, mode: str, timing: Timing, rec: Recorder, deadline: float, ids: Iterator[str], counts: list[int]
) -> None:
    while time.monotonic() < deadline:
        request_id = next(ids)
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(request_bytes("GET", f"/{mode}/storm", {"X-Request-Id": request_id, "Connection": "close"}))
            try:
                status = await asyncio.wait_for(reader.readline(), timing.storm_timeout)
                await asyncio.wait_for(reader.read(), timing.storm_timeout)
            except TimeoutError:
                writer.close()  # the client gives up, closes and retries at once
                with rec.abandoned_lock:
                    rec.abandoned[request_id] = time.monotonic()
                counts[1] += 1
                continue
            if status.startswith(b"HTTP/1.1 200"):
                counts[0] += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _storm_clients(port: int, mode: str, timing: Timing, rec: Recorder, seconds: float) -> tuple[int, int]:
    """The clients, in their own thread and event loop so they never wait on the server's."""

    async def main() -> tuple[int, int]:
        deadline = time.monotonic() + seconds
        ids = (f"{mode}-{n}" for n in range(10**9))
        counts = [0, 0]  # useful, timed out
        clients = [_storm_client(port, mode, timing, rec, deadline, ids, counts) for _ in range(timing.storm_clients)]
        await asyncio.gather(*clients)
        return counts[0], counts[1]

    return asyncio.run(main())


async def _storm(port: int, mode: str, timing: Timing, rec: Recorder) -> StormResult:
    rec.holders.clear()
    with rec.abandoned_lock:
        rec.abandoned.clear()
    samples: list[int] = []

    async def sample() -> None:
        while True:  # cancelled when the clients are done
            await asyncio.sleep(0.05)
            # a slot counts once its client has been gone 10 ms: the server needs a moment
            # to see a close, and a snapshot must not count that moment
            gone_before = time.monotonic() - 0.01
            with rec.abandoned_lock:
                samples.append(sum(1 for r in list(rec.holders) if rec.abandoned.get(r, gone_before) < gone_before))

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    try:
        useful, timed_out = await asyncio.to_thread(_storm_clients, port, mode, timing, rec, timing.storm_seconds)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    elapsed = time.monotonic() - started
    for _ in range(int(timing.storm_slow * 100) + 100):  # let the abandoned handlers drain (bounded)
        if not rec.holders:
            break
        await asyncio.sleep(0.01)
    return StormResult(
        seconds=elapsed,
        useful=useful,
        timed_out=timed_out,
        abandoned_slots_mean=sum(samples) / len(samples) if samples else 0.0,
        abandoned_slots_peak=max(samples, default=0),
    )


# -- report -----------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "never"
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        first, *rest = row
        lines.append(
            "  ".join([first.ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(rest, widths[1:], strict=True))])
        )
    return "\n".join(lines)


def report(
    results: dict[str, dict[str, Result]], scenarios: Sequence[Scenario], storm: dict[str, StormResult], timing: Timing
) -> str:
    """The side-by-side text tables."""
    rows: list[list[str]] = [["", "bare app", "observe", "cancel"]]
    for scenario in scenarios:
        by_mode = [results[scenario.key][mode] for mode in MODES]
        rows.append([scenario.title, "", "", ""])
        rows.append([f"  {scenario.unit} after the client left", *(str(o.work_after) for o in by_mode)])
        rows.append(["  the handler returned after", *(_ms(o.returned_after_ms) for o in by_mode)])
        if by_mode[0].transaction_open_ms is not None:
            rows.append(["  transaction open after the client left", *(_ms(o.transaction_open_ms) for o in by_mode)])
            rows.append(
                [
                    "  order committed for a gone client",
                    *("yes" if o.committed else "no" for o in by_mode),
                ]
            )
        rows.append(["  abort logged / tracebacks", *(f"{o.logged} / {o.tracebacks}" for o in by_mode)])
    bare, cancel = storm["bare"], storm["cancel"]
    storm_rows = [
        ["", "bare app", "cancel"],
        ["useful responses per second", f"{bare.useful_per_second:.1f}", f"{cancel.useful_per_second:.1f}"],
        ["client timeouts (then a retry)", str(bare.timed_out), str(cancel.timed_out)],
        [
            f"slots held for gone clients (mean, of {timing.storm_slots})",
            f"{bare.abandoned_slots_mean:.1f}",
            f"{cancel.abandoned_slots_mean:.1f}",
        ],
        ["slots held for gone clients (peak)", str(bare.abandoned_slots_peak), str(cancel.abandoned_slots_peak)],
    ]
    return "\n".join(
        [
            "Each client leaves mid-flight (TCP close). Work done after that is wasted.",
            "",
            _table(rows),
            "",
            "observe: the middleware records the disconnect; send() raises ClientDisconnected, handlers",
            "         that check disconnect_state() stop at their next check. cancel: the handler is",
            "         cancelled at once; shield() keeps the ROLLBACK whole.",
            "Starlette's StreamingResponse already listens for the disconnect itself; the middleware keeps",
            "that and adds the log event, the state and guard_stream().",
            "",
            f"Retry storm: {timing.storm_slots} slots, {timing.storm_clients} clients that give up after "
            f"{timing.storm_timeout:g} s and retry,",
            f"{timing.storm_slow_share:.0%} of requests need {timing.storm_slow:g} s, "
            f"{timing.storm_seconds:g} s per mode (a client is gone 10 ms after it closed):",
            "",
            _table(storm_rows),
        ]
    )


def _as_json(results: dict[str, dict[str, Result]], storm: dict[str, StormResult], metrics: str) -> dict[str, Any]:
    return {
        "scenarios": {
            key: {mode: vars(result) for mode, result in by_mode.items()} for key, by_mode in results.items()
        },
        "storm": {mode: {**vars(r), "useful_per_second": r.useful_per_second} for mode, r in storm.items()},
        "metrics": metrics,
    }


def abort_counters(exposition: str) -> str:
    """The abort counters of a ``/metrics`` page (its histograms left out: one line per bucket)."""
    return "\n".join(line for line in exposition.splitlines() if "http_requests_aborted_total" in line)


async def _demo(timing: Timing, out: Callable[[str], None], tables: bool) -> dict[str, Any]:
    rec = Recorder()
    scenarios = _scenarios(timing)
    results: dict[str, dict[str, Result]] = {s.key: {} for s in scenarios}
    storm: dict[str, StormResult] = {}
    with tempfile.TemporaryDirectory(prefix="asgi-disconnect-demo-") as tmp:
        db_path = Path(tmp) / "orders.sqlite"
        with sqlite3.connect(db_path) as db:
            db.execute("CREATE TABLE order_rows (id INTEGER PRIMARY KEY, line INTEGER)")
        # serve() keeps the server's log lines; the middleware's structlog events are kept
        # here, counted instead of printed. A bare handler whose client has gone may still
        # run at the end.
        registry = CollectorRegistry()
        with structlog.testing.capture_logs() as events:
            async with serve(build_apps(rec, timing, db_path, registry), stop_timeout=2) as live:
                out(f"uvicorn {uvicorn.__version__} on {live.url}")
                for scenario in scenarios:
                    out(f"  {scenario.title}:")
                    for mode in MODES:
                        result = results[scenario.key][mode] = await _run_one(scenario, mode, live, rec, events)
                        out(
                            f"    {mode:<8} {result.work_after:>3} {scenario.unit} after the client left, "
                            f"the handler returned after {_ms(result.returned_after_ms)}"
                        )
                for mode in ("bare", "cancel"):
                    out(f"  retry storm, {mode} ({timing.storm_seconds:g} s)...")
                    storm[mode] = await _storm(live.port, mode, timing, rec)
                    out(f"    {storm[mode].useful_per_second:.1f} useful responses/s")
                scraped = await live.request(path="/metrics")
                tracebacks = [line.message for line in live.server_log if line.traceback is not None]
        if tracebacks:
            out("the server logged: " + "; ".join(tracebacks[:3]))
    metrics = abort_counters(scraped.body.decode())
    if tables:
        out("")
        out(report(results, scenarios, storm, timing))
        out("")
        out("GET /metrics, the abort counters (asgi_disconnect.prometheus.AbortMetrics, one per mode):")
        out("")
        out(metrics)
    return _as_json(results, storm, metrics)


def run_demo(*, quick: bool = False, as_json: bool = False) -> int:
    """Run the showcase; print progress and the tables (or JSON); return the exit status."""
    timing = Timing(storm_seconds=3.0) if quick else Timing()

    def out(line: str) -> None:
        # with --json, stdout carries only the JSON; the progress goes to stderr
        print(line, file=sys.stderr if as_json else sys.stdout, flush=True)

    started = time.monotonic()
    out("asgi-disconnect demo: what happens when clients leave mid-request")
    data = asyncio.run(_demo(timing, out, tables=not as_json))
    out(f"\nfinished in {time.monotonic() - started:.0f} s")
    if as_json:
        json.dump(data, sys.stdout, indent=2)
        print()
    return 0
