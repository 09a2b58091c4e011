"""Disconnect detection: from a client's close to the handler hearing of it, per variant.

Run from the repository root (``scripts/bench`` runs it with the other benchmarks)::

    .venv/bin/python benchmarks/latency.py            # full run, about 1.5 minutes
    .venv/bin/python benchmarks/latency.py --quick    # smoke run

A real uvicorn (httptools) serves each variant's app in this process, on 127.0.0.1. A
client in a separate process (no GIL shared with the server; its own CPU when there
are two) sends a request, waits until the handler is busy, closes the connection (FIN:
``shutdown()`` then ``close()``; RST: ``SO_LINGER`` 0 then ``close()``; the loopback
harness's ``request_then_leave``) and reports the ``time.monotonic()`` just before the
close, a clock the two processes share. The server side notes when the handler
heard. Handlers, per variant (``apps.py`` installs the middleware):

- non-streaming, a handler that never reads and would work for 1 s:
  ``bare``, ``cancel``, ``fastapi-disconnect``: ``await anyio.sleep(1)``, heard when
  its ``finally`` runs because it was cancelled (bare Starlette never cancels: the
  handler runs to its end, reported as "never");
  ``observe``: ``await disconnect_state(scope).wait()``, heard when it returns;
  ``aiofence``: the sleep inside ``get_current_fencing().move_on_cancel()``, as its
  README shows, heard when the fence reports the disconnect;
- streaming, Starlette's ``StreamingResponse`` over a generator that yields a token
  then awaits its "upstream" (``anyio.sleep(gap)``): every 5 ms ("tokens"), or
  ``sleep(0)``, a busy producer ("busy"); heard when the generator's ``finally`` runs.
  ``bare``, ``observe``, ``cancel`` and ``fastapi-disconnect`` pass the generator as it
  is (what stops it: Starlette's own disconnect listener, or the peer's cancel scope);
  ``guard_stream`` wraps it in ``guard_stream``; ``aiofence`` runs each upstream await
  inside a fence (a fence must not span a ``yield``).

Columns: latency p50 / p99 over the requests heard; "never" counts handlers that ran
to their end without hearing; "chunks after close" the most tokens one request
produced after the client's close; "after detection" the same counted from the
middleware's ``detected_at`` (this package only: the peers do not expose the moment).

Budgets (DESIGN.md): p99 under 5 ms for this package, streaming and non-streaming; at
most one chunk produced after the detection. Results go to stdout and
``benchmarks/results/latency.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import apps
from common import begin_report, command_line, quantile, quiet_logs, table, write_results
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_disconnect import DisconnectState, disconnect_state, guard_stream
from asgi_disconnect import _loopback as loopback
from asgi_disconnect._loopback import CloseKind

BUDGET_P99_MS = 5.0
BUDGET_CHUNKS = 1
BUDGETED = ("observe", "cancel", "guard_stream")
WORK_S = 1.0  # how long the non-streaming handler would work if nobody stopped it
TOKEN_GAP_S = 0.005
MAX_TOKENS = 20_000  # a bound on every stream: 100 s of tokens, or a second of busy work

HANDLERS = {
    # (variant, handler) -> what stops it
    ("bare", "non-streaming"): "nothing: it runs to its end",
    ("observe", "non-streaming"): "await disconnect_state(scope).wait()",
    ("cancel", "non-streaming"): "the middleware's cancellation",
    ("fastapi-disconnect", "non-streaming"): "its cancel scope",
    ("aiofence", "non-streaming"): "move_on_cancel() fence",
    ("bare", "stream"): "StreamingResponse's listener",
    ("observe", "stream"): "StreamingResponse's listener",
    ("cancel", "stream"): "StreamingResponse's listener (told, so not cancelled)",
    ("guard_stream", "stream"): "guard_stream",
    ("fastapi-disconnect", "stream"): "its cancel scope or the listener",
    ("aiofence", "stream"): "a fence per upstream await, or the listener",
}
VARIANTS = ("bare", "observe", "cancel", "guard_stream", "fastapi-disconnect", "aiofence")
CLOSES: tuple[CloseKind, ...] = ("fin", "rst")
CASES = (
    # (label, handler, path, streaming)
    ("non-streaming", "non-streaming", "/work", False),
    ("stream, tokens every 5 ms", "stream", f"/stream?gap={TOKEN_GAP_S}", True),
    ("stream, busy producer", "stream", "/stream?gap=0", True),
)


# -- the server side -----------------------------------------------------------------


@dataclass
class Probe:
    """What the server side saw for one request."""

    heard: float | None = None
    completed: bool = False  # the handler ran to its end without hearing
    state: DisconnectState | None = None  # this package's state, for detected_at
    produced: list[float] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def hear(self) -> None:
        if self.heard is None and not self.completed:
            self.heard = time.monotonic()
        self.done.set()

    def complete(self) -> None:
        self.completed = True
        self.done.set()


class Current:
    """The probe of the request in flight (requests are sequential)."""

    probe = Probe()

    @classmethod
    def take(cls, request: Request) -> Probe:
        probe = cls.probe
        if probe.state is None and "asgi_disconnect" in request.scope:
            probe.state = disconnect_state(request.scope)
        return probe


async def sleeper(request: Request) -> Response:
    probe = Current.take(request)
    try:
        await anyio.sleep(WORK_S)
    except BaseException:
        probe.hear()
        raise
    probe.complete()
    return PlainTextResponse("done")


async def waiter(request: Request) -> Response:
    probe = Current.take(request)
    with anyio.move_on_after(WORK_S):
        await disconnect_state(request.scope).wait()
        probe.hear()
    probe.complete()
    return PlainTextResponse("done")


async def fenced(request: Request) -> Response:
    probe = Current.take(request)
    with apps.aiofence_fence() as fence:
        await anyio.sleep(WORK_S)
    if fence.cancelled:
        probe.hear()
    probe.complete()
    return PlainTextResponse("done")


async def source(probe: Probe, gap: float, fence: bool) -> AsyncIterator[bytes]:
    try:
        for i in range(MAX_TOKENS):
            probe.produced.append(time.monotonic())
            yield f"data: token {i}\n\n".encode()
            if fence:
                with apps.aiofence_fence() as guard:
                    await anyio.sleep(gap)
                if guard.cancelled:
                    return
            else:
                await anyio.sleep(gap)
        probe.complete()
    finally:
        probe.hear()


def streamer(variant: str) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        probe = Current.take(request)
        body = source(probe, float(request.query_params["gap"]), fence=variant == "aiofence")
        if variant == "guard_stream":
            body = guard_stream(body, request.scope)
        return StreamingResponse(body, media_type="text/event-stream")

    return endpoint


def make_app(variant: str) -> Any:
    work = {"observe": waiter, "aiofence": fenced}.get(variant, sleeper)
    routes = [Route("/", apps.hello), Route("/work", work), Route("/stream", streamer(variant))]
    return apps.wrap(variant, Starlette(routes=routes))


# -- the client, in its own process --------------------------------------------------


def client_request(port: int, path: str, how: CloseKind, streaming: bool) -> float:
    """One request that leaves early (after three tokens of a stream; else once the
    handler is working, 20 ms in); returns the monotonic time of the close."""
    if streaming:
        return loopback.request_then_leave(port, path, until=b"token 2\n", how=how)
    return loopback.request_then_leave(port, path, wait=0.02, how=how)


def client_main() -> int:
    """``latency.py --client``: one line per request on stdin (``port path how
    streaming``), the close time (or ``error ...``) per line on stdout."""
    for line in sys.stdin:
        port, path, how, streaming = line.split()
        try:
            closed = client_request(int(port), path, "rst" if how == "rst" else "fin", streaming == "1")
        except (OSError, ValueError) as exc:
            print(f"error {exc!r}", flush=True)
            continue
        print(f"{closed!r}", flush=True)
    return 0


class Client:
    """The client process, spoken to line by line."""

    def __init__(self, cpus: set[int] | None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--client"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        if cpus is not None:
            os.sched_setaffinity(self.proc.pid, cpus)

    async def request(self, port: int, path: str, how: str, streaming: bool) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{port} {path} {how} {int(streaming)}\n")
        self.proc.stdin.flush()
        stdout = self.proc.stdout
        line = await asyncio.wait_for(asyncio.to_thread(stdout.readline), 10)
        if not line or line.startswith("error"):
            raise OSError(f"client: {line.strip() or 'exited'}")
        return float(line)

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


# -- measurement ---------------------------------------------------------------------


@dataclass
class Row:
    variant: str
    case: str
    close: str
    latencies_ms: list[float] = field(default_factory=list)
    never: int = 0
    lost: int = 0
    after_close: list[int] = field(default_factory=list)
    after_detection: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "variant": self.variant,
            "case": self.case,
            "close": self.close,
            "stopped_by": HANDLERS[(self.variant, "stream" if self.case.startswith("stream") else "non-streaming")],
            "n": len(lat) + self.never + self.lost,
            "heard": len(lat),
            "never": self.never,
            "lost": self.lost,
            "p50_ms": round(statistics.median(lat), 3) if lat else None,
            "p99_ms": round(quantile(lat, 0.99), 3) if lat else None,
            "max_ms": round(max(lat), 3) if lat else None,
            "max_chunks_after_close": max(self.after_close) if self.after_close else None,
            "max_chunks_after_detection": max(self.after_detection) if self.after_detection else None,
        }


async def measure_one(client: Client, port: int, path: str, how: str, streaming: bool, row: Row) -> None:
    probe = Current.probe = Probe()
    closed = await client.request(port, path, how, streaming)
    try:
        await asyncio.wait_for(probe.done.wait(), WORK_S + 2)
    except TimeoutError:
        row.lost += 1
        return
    if probe.heard is None:
        row.never += 1
        return
    row.latencies_ms.append((probe.heard - closed) * 1000)
    if streaming:
        row.after_close.append(sum(1 for t in probe.produced if t > closed))
        detected = probe.state.detected_at if probe.state is not None else None
        if detected is not None:
            row.after_detection.append(sum(1 for t in probe.produced if t > detected))


async def measure(names: Sequence[str], requests: int, never_requests: int, cpus: set[int] | None) -> list[Row]:
    rows: list[Row] = []
    client = Client(cpus)
    try:
        for variant in names:
            async with loopback.serve(make_app(variant), server="uvicorn-httptools", stop_timeout=2) as live:
                for label, handler, path, streaming in CASES:
                    if (variant, handler) not in HANDLERS:
                        continue
                    # A handler nothing stops costs WORK_S a request: a few show it.
                    count = never_requests if (variant, handler) == ("bare", "non-streaming") else requests
                    for how in CLOSES:
                        row = Row(variant, label, how)
                        for _ in range(count):
                            await measure_one(client, live.port, path, how, streaming, row)
                        rows.append(row)
                        print(format_row(row.summary(), text=True), flush=True)
    finally:
        client.stop()
    return rows


# -- reporting -----------------------------------------------------------------------

HEADERS = [
    "variant",
    "case",
    "close",
    "n",
    "p50 ms",
    "p99 ms",
    "max chunks after close",
    "after detection",
    "stopped by",
    "budget",
]


def verdict(row: dict[str, Any]) -> str:
    if row["variant"] not in BUDGETED:
        return "(peer)" if row["variant"] in apps.PEERS else ""
    marks = []
    if row["never"] or row["lost"] or row["p99_ms"] is None:
        marks.append("OVER (not heard)")
    else:
        marks.append("OK" if row["p99_ms"] < BUDGET_P99_MS else "OVER")
    if row["max_chunks_after_detection"] is not None:
        marks.append("OK" if row["max_chunks_after_detection"] <= BUDGET_CHUNKS else "OVER")
    return " / ".join(marks)


def cells(row: dict[str, Any]) -> list[str]:
    def ms(key: str) -> str:
        if row["heard"] == 0 and row["never"]:
            return "never"
        return "" if row[key] is None else f"{row[key]:.2f}"

    n = str(row["n"])
    if row["never"]:
        n += f" ({row['never']} never heard)" if row["heard"] else " (ran to the end)"
    if row["lost"]:
        n += f" ({row['lost']} lost)"

    def count(key: str) -> str:
        return "" if row[key] is None else str(row[key])

    return [
        row["variant"],
        row["case"],
        row["close"],
        n,
        ms("p50_ms"),
        ms("p99_ms"),
        count("max_chunks_after_close"),
        count("max_chunks_after_detection"),
        row["stopped_by"],
        verdict(row),
    ]


def format_row(row: dict[str, Any], text: bool = False) -> str:
    return "  ".join(cells(row)) if text else "| " + " | ".join(cells(row)) + " |"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a few requests per case: a smoke run")
    parser.add_argument("--requests", type=int, help="aborted requests per case and close kind (default 200, quick 20)")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and client to different CPUs")
    args = parser.parse_args(argv)
    if args.client:
        return client_main()
    requests = args.requests or (20 if args.quick else 200)
    never_requests = 2 if args.quick else 3
    quiet_logs()

    names, skipped, report, header = begin_report(VARIANTS, args.quick)

    notes: list[str] = []
    original = os.sched_getaffinity(0)
    client_cpus: set[int] | None = None
    if not args.no_pin and len(original) >= 2:
        client_cpus = {min(original)}
        os.sched_setaffinity(0, {max(original)})
        notes.append(f"server (this process) pinned to CPU {max(original)}, client process to CPU {min(original)}")
    began = time.perf_counter()
    try:
        rows = [row.summary() for row in asyncio.run(measure(names, requests, never_requests, client_cpus))]
    finally:
        os.sched_setaffinity(0, original)
    total = time.perf_counter() - began

    report |= {
        "requests_per_case": requests,
        "budgets": {"p99_ms_max": BUDGET_P99_MS, "chunks_after_detection_max": BUDGET_CHUNKS},
        "rows": rows,
        "notes": notes,
        "total_seconds": round(total, 1),
    }
    skipped_table = [[name, reason, *([""] * (len(HEADERS) - 2))] for name, reason in skipped.items()]
    text, md_table = table(HEADERS, [cells(row) for row in rows] + skipped_table)
    print(f"\n{text}")
    budgets = (
        f"Budgets (DESIGN.md), for this package's rows: detection p99 under {BUDGET_P99_MS:g} ms; "
        f"at most {BUDGET_CHUNKS} chunk produced after the detection."
    )
    print(f"\n{budgets}\ntotal time: {total:.1f} s")
    md = ["# Disconnect detection latency", "", header, "", f"Command: `{command_line('benchmarks/latency.py')}`", ""]
    md += [
        f"{requests} aborted requests per row (bare non-streaming: {never_requests}, each runs its {WORK_S:g} s); "
        "latency from the client's close to the handler hearing of it; see the docstring of "
        "benchmarks/latency.py for the handlers.",
        "",
        md_table,
        "",
        budgets,
        "",
        *(f"- note: {n}" for n in notes),
        "",
        f"Total time: {total:.1f} s.",
    ]
    write_results("latency", report, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
