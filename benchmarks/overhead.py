"""Per-request overhead of ``DisconnectMiddleware`` and its peers on a Starlette hello world.

Run from the repository root (``scripts/bench`` runs it with every other benchmark, in a
Python 3.12+ venv where the peers install)::

    .venv/bin/python benchmarks/overhead.py            # full run, about 4 minutes
    .venv/bin/python benchmarks/overhead.py --quick    # smoke run, about 40 seconds

Other options: ``--no-inprocess``, ``--no-server``, ``--server-method``, ``--python-loadgen``
(skip ``wrk``), ``--no-pin``, round counts and durations; see ``--help``. Results go to stdout
and to ``benchmarks/results/overhead.{json,md}``. The script reports against the budgets
of ``DESIGN.md`` but never fails on them: it exits 0 whenever the measurement ran.

Variants (``benchmarks/apps.py``): ``bare`` (``Starlette(routes=[Route("/", hello)])``),
``passthrough`` (``PassthroughMiddleware(app)``: the floor that any correct pure ASGI
middleware pays, shown right after bare as ``passthrough (floor)``; it has no budget),
``observe`` (``DisconnectMiddleware(app)``), ``cancel`` (``DisconnectMiddleware(app,
cancel=True)``), ``basehttp`` (a no-op ``BaseHTTPMiddleware``, for scale) and the peers
``fastapi-disconnect`` (``CancelOnDisconnectMiddleware``) and ``aiofence`` (its
``DisconnectMiddleware``), each added with ``app.add_middleware`` as its README says. The
peers need Python 3.12+: on an older interpreter their rows say so and the rest runs.

Method
------
The machine this runs on is assumed to be noisy (shared VM, a single timing may be off
by 30%), so no number is ever compared with one taken at another time: every variant is
measured in many short rounds, the variants alternate inside each round (their order
rotates from round to round), and each variant is compared with the bare app *of the
same round*. The reported ratio is the median of those per-round ratios, which cancels
slow drifts (another tenant, CPU frequency) and ignores the rounds a burst hit.

A. In process, no server. Each variant is awaited directly in one asyncio loop with a
   fresh copy of a fixed uvicorn-like HTTP scope, a receive that returns the request
   once and then blocks forever, and a no-op send. A round is ``--requests`` requests
   back to back per variant, timed with ``perf_counter_ns`` after a ``gc.collect()``;
   between variants the loop runs once (``await asyncio.sleep(0)``) so callbacks a
   variant deferred run, outside the timing, as they would in a server.

   A second table ("one loop iteration per request") yields to the loop after *every*
   request, inside the timing, as a server does between requests. It charges each
   request with any deferred callback it schedules, which the first table amortizes
   over a whole round. The in-process budget (DESIGN.md: at most 1.15x bare by wall
   clock, with one loop iteration per request) judges this second table; the first has
   no budget. (The same budget by instructions, 1.10x, is ``instructions.py``'s.)

   Columns: median and minimum µs per request over the rounds, "delta": the median of
   the per-round differences to bare, the median per-round ratio to bare with its
   interquartile range, and "py calls/req": Python-level function calls per request
   counted by cProfile in a separate, untimed pass (deterministic, so it shows a change
   in the code path that the noise hides; it weighs every call alike).

B. Real server. One ``uvicorn`` subprocess per variant (``--http httptools
   --no-access-log --workers 1 --lifespan off``, ``--factory apps:from_env``), all on
   127.0.0.1, started once up front and killed by PID at the end. With two or more
   CPUs the servers share one CPU and the load generator gets another (``--no-pin``
   turns this off). The load generator is ``wrk`` (one thread, ``--connections``
   keep-alive connections per server) or, when ``wrk`` is not on PATH, a pure-Python
   asyncio one (keep-alive connections sending ``GET / HTTP/1.1`` and reading
   Content-Length responses). Two methods, each in rounds of ``--duration`` seconds:

   B1. Concurrent: every server is loaded at the same time, so they share their CPU
       (the scheduler gives each an equal slice) and any slowdown of the machine hits
       all variants alike; the start order rotates each round.
   B2. Alternating: one server at a time, variants in rotated order each round, as a
       classic benchmark does. On a noisy VM its per-round ratios scatter widely: the
       A/A row shows by how much.

   Each method reports per variant the median requests/s and median per-round ratio to
   bare, and the server process's CPU time per request (from ``/proc``). A CPU-bound
   server's throughput is 1 / (CPU per request), so "loss by CPU" (1 - 1/CPU ratio) is
   the throughput budget measured without the time the VM did not run the server or the
   server sat idle waiting for the load generator (the "server CPU" column shows how
   busy it was); it is the steadier of the two.

Noise control: ``bare2`` is a second, identical bare app measured like the others (an
A/A test). Its ratio to bare would be exactly 1 without noise, so its spread is the
resolution of this run: a difference smaller than that is not a finding.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import apps
from common import (
    Series,
    begin_report,
    command_line,
    cpu_delta,
    http_scope,
    pinned,
    ratio_cell,
    rotated,
    servers,
    skipped_rows,
    table,
    write_results,
)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

# DESIGN.md's budgets. In process (one loop iteration per request): at most 1.15x the bare
# app by wall clock (this script) and 1.10x by instructions (instructions.py).
INPROCESS_BUDGET = 1.15
INSTRUCTIONS_BUDGET = 1.10
SERVER_BUDGET_LOSS = 0.05  # uvicorn, both methods: at most 5% fewer requests/s than the bare app
# "bare2" is a second, identical bare app: an A/A control whose ratio to bare shows how
# much of a difference the noise alone produces in this run. "passthrough" is the floor
# (apps.PassthroughMiddleware): what any correct pure ASGI middleware pays.
VARIANTS = apps.with_before(
    ("bare", "bare2", "passthrough", "observe", "cancel", "basehttp", "fastapi-disconnect", "aiofence")
)
VARIANT_OF = {"bare2": "bare"}  # name -> variant in benchmarks/apps.py
SERVER_METHODS = {
    "concurrent": "B1. Concurrent: every server loaded at once, sharing one CPU (noise hits all variants alike)",
    "alternate": "B2. Alternating: one server loaded at a time, variants in rotated order each round",
}
BUDGETED = ("observe", "cancel")

SCOPE = http_scope("/", [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"overhead.py"), (b"accept", b"*/*")])
REQUEST_MESSAGE: dict[str, Any] = {"type": "http.request", "body": b"", "more_body": False}


# -- A. in process -------------------------------------------------------------------


class FakeReceive:
    """Returns the (bodiless) request once, then blocks forever, like a quiet client."""

    __slots__ = ("_never", "_sent")

    def __init__(self, never: asyncio.Event) -> None:
        self._never = never
        self._sent = False

    async def __call__(self) -> Message:
        if not self._sent:
            self._sent = True
            return dict(REQUEST_MESSAGE)
        await self._never.wait()  # never set: only a cancellation ends this
        raise AssertionError("the never-set event was set")


async def noop_send(message: Message) -> None:
    return None


async def check_app(name: str, app: App, never: asyncio.Event) -> None:
    """One request with a recording send: the variant must answer the hello world."""
    sent: list[Message] = []

    async def record(message: Message) -> None:
        sent.append(message)

    await app({**SCOPE, "state": {}}, FakeReceive(never), record)
    await asyncio.sleep(0)
    status = sent[0].get("status") if sent else None
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    if status != 200 or body != apps.BODY:
        raise RuntimeError(f"in-process variant {name!r} answered {status} {body!r}, not 200 {apps.BODY!r}")


async def time_round(app: App, requests: int, never: asyncio.Event, yield_each: bool) -> float:
    """Run ``requests`` requests back to back; return microseconds per request."""
    scope = SCOPE
    send = noop_send
    sleep = asyncio.sleep
    start = time.perf_counter_ns()
    if yield_each:
        for _ in range(requests):
            await app({**scope, "state": {}}, FakeReceive(never), send)
            await sleep(0)
    else:
        for _ in range(requests):
            await app({**scope, "state": {}}, FakeReceive(never), send)
    elapsed = time.perf_counter_ns() - start
    return elapsed / requests / 1000


async def count_calls(app: App, requests: int, never: asyncio.Event, yield_each: bool) -> float:
    """Python-level function calls per request (cProfile): a deterministic cost proxy that
    no noise affects, though it weighs a cheap call like an expensive one."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        await time_round(app, requests, never, yield_each)
    finally:
        profiler.disable()
    calls: int = pstats.Stats(profiler).total_calls  # type: ignore[attr-defined]
    return calls / requests


async def run_inprocess_async(
    names: Sequence[str], rounds: int, warmup: int, requests: int, yield_each: bool
) -> tuple[dict[str, Series], dict[str, float]]:
    never = asyncio.Event()
    variants: dict[str, App] = {name: apps.make(VARIANT_OF.get(name, name)) for name in names}
    for name, app in variants.items():
        await check_app(name, app, never)
    series = {name: Series() for name in variants}
    for index in range(warmup + rounds):
        times: dict[str, float] = {}
        for name in rotated(names, index):
            gc.collect()
            await asyncio.sleep(0)  # deferred callbacks of the previous variant run here, untimed
            times[name] = await time_round(variants[name], requests, never, yield_each)
        await asyncio.sleep(0)
        if index < warmup:
            continue
        for name, value in times.items():
            series[name].values.append(value)
            if name != "bare":
                series[name].ratios.append(value / times["bare"])
                series[name].deltas.append(value - times["bare"])
    calls = {}
    for name, app in variants.items():
        calls[name] = await count_calls(app, 200, never, yield_each)
        await asyncio.sleep(0)
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return series, calls


def run_inprocess(
    names: Sequence[str], rounds: int, warmup: int, requests: int, yield_each: bool
) -> tuple[dict[str, Series], dict[str, float]]:
    return asyncio.run(run_inprocess_async(names, rounds, warmup, requests, yield_each))


# -- B. real server ------------------------------------------------------------------


# -- B. real server ------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    seconds: float
    errors: int = 0
    notes: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


_WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b")
_WRK_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _wrk_result(out: str, returncode: int) -> Load:
    match = _WRK_TOTAL.search(out)
    if returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({returncode}): {out}")
    errors = _WRK_ERRORS.search(out)
    non2xx = _WRK_NON2XX.search(out)
    failed = (sum(int(n) for n in errors.groups()) if errors else 0) + (int(non2xx.group(1)) if non2xx else 0)
    return Load(int(match.group(1)), float(match.group(2)) * _UNITS[match.group(3)], failed)


def run_wrk(wrk: str, ports: Sequence[int], duration: float, connections: int) -> list[Load]:
    """One ``wrk`` per port, all at once; every wait bounded, stragglers killed by PID."""
    seconds = max(1, round(duration))  # wrk takes whole seconds
    procs: list[subprocess.Popen[str]] = []
    try:
        for port in ports:
            cmd = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", f"http://127.0.0.1:{port}/"]
            procs.append(
                subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True
                )
            )
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 30)
            results.append(_wrk_result(out, proc.returncode))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.communicate(timeout=5)


async def _python_connection(port: int, start: asyncio.Event, deadline: list[float], counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    try:
        await start.wait()
        while time.perf_counter() < deadline[0]:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = -1
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                    break
            if length < 0:
                raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
            await reader.readexactly(length)
            if head.startswith(b"HTTP/1.1 200 "):
                counts[0] += 1
            else:
                counts[1] += 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _python_load(ports: Sequence[int], duration: float, connections: int) -> list[Load]:
    start = asyncio.Event()
    deadline = [float("inf")]
    counts = [[0, 0] for _ in ports]  # per port: 200 responses, other responses
    tasks = [
        [asyncio.create_task(_python_connection(port, start, deadline, count)) for _ in range(connections)]
        for port, count in zip(ports, counts, strict=True)
    ]
    await asyncio.sleep(0.1)  # let the connections open before the clock starts
    begin = time.perf_counter()
    deadline[0] = begin + duration
    start.set()
    _, pending = await asyncio.wait([t for group in tasks for t in group], timeout=duration + 10)
    seconds = time.perf_counter() - begin
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    loads = []
    for group, count in zip(tasks, counts, strict=True):
        failures = [t.exception() for t in group if not t.cancelled() and t.exception() is not None]
        timed_out = sum(1 for t in group if t.cancelled())
        notes = f"{len(failures)} connections failed: {failures[0]!r}" if failures else ""
        if timed_out:
            notes += f" {timed_out} connections timed out"
        loads.append(Load(count[0], seconds, count[1] + len(failures) + timed_out, notes.strip()))
    return loads


def run_python_load(ports: Sequence[int], duration: float, connections: int) -> list[Load]:
    """The fallback load generator: ``connections`` keep-alive connections per port, all at once."""
    return asyncio.run(_python_load(ports, duration, connections))


@dataclass
class ServerSeries:
    """Per-round results of one server method, per variant."""

    names: Sequence[str]
    rps: dict[str, Series] = field(init=False)
    cpu_us: dict[str, Series] = field(init=False)
    utilization: dict[str, Series] = field(init=False)

    def __post_init__(self) -> None:
        self.rps = {name: Series() for name in self.names}
        self.cpu_us = {name: Series() for name in self.names}
        self.utilization = {name: Series() for name in self.names}

    def record(self, loads: dict[str, Load], cpu_s: dict[str, float | None]) -> None:
        for name, load in loads.items():
            self.rps[name].values.append(load.rps)
            seconds = cpu_s[name]
            if seconds is not None and load.requests:
                self.cpu_us[name].values.append(seconds / load.requests * 1e6)
                self.utilization[name].values.append(seconds / load.seconds)
        for name in loads:
            if name == "bare":
                continue
            self.rps[name].ratios.append(self.rps[name].values[-1] / self.rps["bare"].values[-1])
            if cpu_s[name] is not None and cpu_s["bare"] is not None and loads[name].requests:
                self.cpu_us[name].ratios.append(self.cpu_us[name].values[-1] / self.cpu_us["bare"].values[-1])


def run_server_bench(
    names: Sequence[str],
    modes: Sequence[str],
    rounds: dict[str, int],
    duration: float,
    warmup: float,
    connections: int,
    use_wrk: bool,
    pin: bool,
) -> tuple[dict[str, ServerSeries], str, list[str]]:
    """Run the server methods; return their series per mode, the load generator's name, notes."""
    wrk = shutil.which("wrk") if use_wrk else None
    notes: list[str] = []
    if wrk is None:
        reason = "wrk is not on PATH" if shutil.which("wrk") is None else "--python-loadgen given"
        message = (
            f"{reason}: using the pure-Python asyncio load generator, which is slower than wrk and "
            "may saturate before the server does (see the server CPU column; install wrk with "
            "`apt-get install wrk`)"
        )
        print(f"note: {message}", flush=True)
        notes.append(message)

    def load(ports: Sequence[int], seconds: float) -> list[Load]:
        if wrk is not None:
            return run_wrk(wrk, ports, seconds, connections)
        return run_python_load(ports, seconds, connections)

    results: dict[str, ServerSeries] = {}
    # All servers on one CPU, this process and the load generator (its children) on
    # another: client and server never compete, and in the concurrent method the
    # servers share their CPU fairly.
    with pinned(pin, notes) as server_cpus, servers(names, "hello", server_cpus, VARIANT_OF) as running:
        if warmup > 0:
            for name in names:
                load([running[name].port], warmup)
        for mode in modes:
            series = results[mode] = ServerSeries(names)
            for index in range(rounds[mode]):
                order = rotated(names, index)
                loads: dict[str, Load] = {}
                cpu_s: dict[str, float | None] = {}
                time.sleep(0.2)  # let the previous round's connections close
                if mode == "alternate":
                    for name in order:
                        before = running[name].cpu_seconds()
                        loads[name] = load([running[name].port], duration)[0]
                        cpu_s[name] = cpu_delta(before, running[name].cpu_seconds())
                        time.sleep(0.2)
                else:  # concurrent: every variant loaded at once, the start order rotated
                    befores = {name: running[name].cpu_seconds() for name in order}
                    for name, result in zip(order, load([running[n].port for n in order], duration), strict=True):
                        loads[name] = result
                    cpu_s = {name: cpu_delta(befores[name], running[name].cpu_seconds()) for name in order}
                for name, result in loads.items():
                    if result.errors:
                        notes.append(f"{mode} round {index + 1} {name}: {result.errors} errors {result.notes}")
                series.record(loads, cpu_s)
                parts = ", ".join(f"{name} {loads[name].rps:,.0f}/s" for name in order)
                print(f"  {mode} round {index + 1}/{rounds[mode]}: {parts}", flush=True)
    return results, ("wrk" if wrk else "python"), notes


# -- reporting -----------------------------------------------------------------------


def budget_note(name: str) -> str:
    """The budget column of a variant that no budget applies to."""
    if name == "bare2":
        return "(A/A control: noise)"
    if name == apps.FLOOR:
        return apps.FLOOR_NOTE
    return "(peer)" if name in apps.PEERS else "(scale)"


def inprocess_table(
    series: dict[str, Series], calls: dict[str, float], skipped: dict[str, str], budgeted: bool
) -> tuple[str, str, dict[str, Any]]:
    """One in-process table; ``budgeted``: the budget judges it (one loop iteration per
    request), else its budget column says there is none."""
    rows = []
    data: dict[str, Any] = {}
    for name, s in series.items():
        summary = s.summary()
        data[name] = {
            "summary": summary,
            "python_calls_per_request": calls[name],
            "us_per_request": s.values,
            "ratios": s.ratios,
            "deltas_us": s.deltas,
        }
        ratio = summary.get("ratio_median", 1.0)
        if name == "bare":
            budget = ""
        elif name in BUDGETED:
            verdict = "OK" if ratio <= INPROCESS_BUDGET else "OVER"
            budget = f"<= {INPROCESS_BUDGET:.2f}: {verdict}" if budgeted else "(no budget for this table)"
        else:
            budget = budget_note(name)
        rows.append(
            [
                apps.label(name),
                f"{summary['median']:.2f}",
                f"{summary['min']:.2f}",
                f"{summary['delta_median']:+.2f}" if name != "bare" else "",
                ratio_cell(summary),
                f"{calls[name]:.0f}",
                budget,
            ]
        )
    data |= {name: {"skipped": reason} for name, reason in skipped.items()}
    headers = [
        "variant",
        "median us/req",
        "min us/req",
        "delta us",
        "ratio vs bare [p25-p75]",
        "py calls/req",
        "budget",
    ]
    text, md = table(headers, rows + skipped_rows(skipped, len(headers)))
    return text, md, data


def server_table(series: ServerSeries, skipped: dict[str, str]) -> tuple[str, str, dict[str, Any]]:
    rows = []
    data: dict[str, Any] = {}
    for name in series.rps:
        r, c, u = series.rps[name], series.cpu_us[name], series.utilization[name]
        rs = r.summary()
        cs = c.summary() if c.values else None
        rps_loss = 1 - rs.get("ratio_median", 1.0)
        # A CPU-bound server's throughput is 1 / (CPU per request): the same budget, measured
        # without the time the VM did not run the server (steal) or the server sat idle.
        cpu_loss = 1 - 1 / cs["ratio_median"] if cs and "ratio_median" in cs else None
        data[name] = {
            "rps": {"summary": rs, "per_round": r.values, "ratios": r.ratios},
            "server_cpu_us_per_request": {"summary": cs, "per_round": c.values, "ratios": c.ratios} if cs else None,
            "server_cpu_utilization": {"per_round": u.values} if u.values else None,
            "loss": rps_loss if name != "bare" else None,
            "loss_by_cpu": cpu_loss,
        }
        if name == "bare":
            budget = ""
        elif name in BUDGETED:
            marks = ["OK" if rps_loss <= SERVER_BUDGET_LOSS else "OVER"]
            if cpu_loss is not None:
                marks.append("OK" if cpu_loss <= SERVER_BUDGET_LOSS else "OVER")
            budget = " / ".join(marks)
        else:
            budget = budget_note(name)
        rows.append(
            [
                apps.label(name),
                f"{rs['median']:,.0f}",
                ratio_cell(rs),
                f"{rps_loss:+.1%}" if name != "bare" else "",
                f"{cs['median']:.1f}" if cs else "n/a",
                ratio_cell(cs) if cs else "n/a",
                f"{cpu_loss:+.1%}" if cpu_loss is not None else "",
                f"{statistics.median(u.values):.0%}" if u.values else "n/a",
                budget,
            ]
        )
    data |= {name: {"skipped": reason} for name, reason in skipped.items()}
    headers = [
        "variant",
        "req/s",
        "req/s ratio [p25-p75]",
        "loss",
        "CPU us/req",
        "CPU ratio [p25-p75]",
        "loss by CPU",
        "server CPU",
        f"<= {SERVER_BUDGET_LOSS:.0%} loss (req/s / CPU)",
    ]
    text, md = table(headers, rows + skipped_rows(skipped, len(headers)))
    return text, md, data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds: a smoke run")
    parser.add_argument("--no-inprocess", action="store_true", help="skip part A")
    parser.add_argument("--no-server", action="store_true", help="skip part B")
    parser.add_argument("--python-loadgen", action="store_true", help="use the Python load generator, not wrk")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and load generator to CPUs")
    parser.add_argument(
        "--server-method",
        choices=("both", "concurrent", "alternate"),
        default="both",
        help="server measurement method(s) (default both)",
    )
    parser.add_argument("--rounds", type=int, help="alternating server rounds (default 8, quick 2)")
    parser.add_argument("--concurrent-rounds", type=int, help="concurrent server rounds (default 15, quick 3)")
    parser.add_argument("--duration", type=float, help="seconds per server round (whole seconds with wrk; default 2)")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections per server (default 32)")
    parser.add_argument("--inprocess-rounds", type=int, help="in-process rounds (default 100, quick 15)")
    parser.add_argument("--requests", type=int, help="requests per in-process round (default 300, quick 200)")
    args = parser.parse_args(argv)

    q = args.quick
    ip_rounds = args.inprocess_rounds or (15 if q else 100)
    ip_requests = args.requests or (200 if q else 300)
    ip_warmup = 2 if q else 5
    sv_rounds = {
        "alternate": args.rounds or (2 if q else 8),
        "concurrent": args.concurrent_rounds or (3 if q else 15),
    }
    sv_modes = ("concurrent", "alternate") if args.server_method == "both" else (args.server_method,)
    sv_duration = args.duration or (1.0 if q else 2.0)
    sv_warmup = 0.5 if q else 1.0
    names, skipped, report, header = begin_report(VARIANTS, q)
    began = time.perf_counter()
    report["budgets"] = {
        "in_process_yield_each_ratio_max": INPROCESS_BUDGET,
        "in_process_instructions_ratio_max": INSTRUCTIONS_BUDGET,
        "server_throughput_loss_max": SERVER_BUDGET_LOSS,
    }
    md: list[str] = ["# Overhead: DisconnectMiddleware and its peers", "", header, ""]
    md += [f"Command: `{command_line('benchmarks/overhead.py')}`", ""]

    if not args.no_inprocess:
        for key, yield_each, title in (
            ("in_process", False, "one loop iteration per round (no budget)"),
            ("in_process_yield_each", True, f"one loop iteration per request (budget {INPROCESS_BUDGET:.2f}x)"),
        ):
            heading = (
                f"A. In process, {title}: {ip_rounds} rounds x {ip_requests} requests per variant "
                f"(+{ip_warmup} warm-up rounds), order rotated each round"
            )
            print(f"\n{heading}", flush=True)
            series, calls = run_inprocess(names, ip_rounds, ip_warmup, ip_requests, yield_each)
            text, table_md, data = inprocess_table(series, calls, skipped, budgeted=yield_each)
            print(text, flush=True)
            report[key] = {
                "rounds": ip_rounds,
                "requests_per_round": ip_requests,
                "warmup_rounds": ip_warmup,
                "yield_each_request": yield_each,
                "variants": data,
            }
            md += [f"## {heading}", "", table_md, ""]

    if not args.no_server:
        heading = (
            f"B. uvicorn (httptools, 1 worker) on 127.0.0.1, {args.connections} keep-alive connections per "
            f"server, {sv_duration:g} s per round, {' and '.join(f'{sv_rounds[m]} {m}' for m in sv_modes)} rounds"
        )
        print(f"\n{heading}", flush=True)
        results, loadgen, notes = run_server_bench(
            names,
            sv_modes,
            sv_rounds,
            sv_duration,
            sv_warmup,
            args.connections,
            not args.python_loadgen,
            not args.no_pin,
        )
        report["server"] = {
            "duration_s": sv_duration,
            "connections_per_server": args.connections,
            "load_generator": loadgen,
            "notes": notes,
        }
        md += [f"## {heading}", "", f"Load generator: {loadgen}.", ""]
        print(f"load generator: {loadgen}")
        for mode in sv_modes:
            text, table_md, data = server_table(results[mode], skipped)
            title = SERVER_METHODS[mode]
            print(f"\n{title}\n{text}")
            report["server"][mode] = {"rounds": sv_rounds[mode], "description": title, "variants": data}
            md += [f"### {title}", "", table_md, ""]
        for note in notes:
            print(f"note: {note}")
        md += [f"- note: {n}" for n in notes]

    total = time.perf_counter() - began
    report["total_seconds"] = round(total, 1)
    budgets = (
        f"Budgets (DESIGN.md), observe and cancel: in process, one loop iteration per request, at most "
        f"{INPROCESS_BUDGET:.2f}x bare by wall clock (the second A table; the first has no budget) and "
        f"{INSTRUCTIONS_BUDGET:.2f}x by instructions (instructions.py); uvicorn + Starlette, both methods, at "
        f"most {SERVER_BUDGET_LOSS:.0%} fewer requests/s than bare. Ratios are medians of per-round ratios, "
        "[p25-p75] their spread; the bare2 (A/A) row is the noise floor of the run; the passthrough (floor) row "
        "is what any correct pure ASGI middleware pays (copy the scope, add a key, wrap send with a flag check, "
        "a byte count and end detection), not a peer. This script reports; it does not fail on budgets."
    )
    print(f"\n{budgets}\ntotal time: {total:.1f} s")
    md += ["", budgets, "", f"Total time: {total:.1f} s."]
    write_results("overhead", report, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
