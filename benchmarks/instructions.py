"""Instructions per request, counted by valgrind's callgrind: a cost figure no noise moves.

Run from the repository root (``scripts/bench`` runs it when ``valgrind`` is on PATH)::

    .venv/bin/python benchmarks/instructions.py           # about 6 minutes
    .venv/bin/python benchmarks/instructions.py --quick   # fewer requests, about 4 minutes

Wall-clock ratios on a shared VM move by several percent from run to run; instruction
counts do not (the same binary, inputs and hash seed give the same count, whatever else
the machine does). They weigh a cache miss like a cached load, so they are a floor under
the wall-clock cost, not a replacement for ``overhead.py``: they show where a budget
stands without noise and what a change to the hot path saved.

Each figure is the difference of two runs of one variant under ``valgrind
--tool=callgrind``, one with N requests and one with none (start-up, imports and a
warm-up of 300 requests are in both and cancel out), divided by N:

- in process: the Starlette hello world awaited directly, as in part A of
  ``overhead.py`` (a round of N requests in one loop iteration, and one loop iteration
  per request);
- server: a uvicorn (httptools) process serving the hello world, under callgrind, and one
  keep-alive client sending N requests one after the other (each one its own loop
  iteration in the server).

Variants: ``bare``, ``passthrough`` (the floor that any correct pure ASGI middleware pays,
``apps.PassthroughMiddleware``: shown right after bare as ``passthrough (floor)``, with no
budget), ``observe``, ``cancel`` and the peers. Budgets (DESIGN.md), for observe and
cancel: in process with one loop iteration per request, at most 1.10x bare by
instructions (the "budget" column judges that column; the "a round per iteration"
column has no budget); over the server, the 5% throughput budget read as instructions
(at most 5% fewer requests/s if the server were bound by instructions alone: a floor
under the wall-clock figure of ``overhead.py``, which is the one that counts).

Results: ``benchmarks/results/instructions.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import apps
from common import (
    BENCH_DIR,
    ROOT,
    begin_report,
    command_line,
    free_port,
    table,
    uvicorn_command,
    write_results,
)
from overhead import INSTRUCTIONS_BUDGET, SERVER_BUDGET_LOSS

from asgi_disconnect import _loopback as loopback

VARIANTS = apps.with_before(("bare", "passthrough", "observe", "cancel", "fastapi-disconnect", "aiofence"))
BUDGETED = ("observe", "cancel")
WARMUP = 300
_TOTALS = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.MULTILINE)
_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
#: Bounds on every wait: valgrind makes Python about 50 times slower.
_START_TIMEOUT = 120.0
_RUN_TIMEOUT = 600.0


def _callgrind(argv: list[str], out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv]


def _total(out: Path) -> int:
    match = _TOTALS.search(out.read_bytes())
    if match is None:
        raise RuntimeError(f"no instruction total in {out}")
    return int(match.group(1))


def _env() -> dict[str, str]:
    # One hash seed: dict and set layouts, hence instruction counts, repeat run to run.
    path = os.pathsep.join(filter(None, [str(ROOT), str(BENCH_DIR), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": path}


# -- in process ------------------------------------------------------------------------


async def _child(variant: str, requests: int, yield_each: bool) -> None:
    from overhead import check_app, time_round

    never = asyncio.Event()
    app = apps.make(variant)
    await check_app(variant, app, never)
    await time_round(app, WARMUP, never, yield_each)
    await asyncio.sleep(0)
    if requests:  # the run with none measures everything but the requests
        await time_round(app, requests, never, yield_each)
    await asyncio.sleep(0)


def inprocess(variant: str, requests: int, yield_each: bool, work: Path) -> float:
    totals = []
    for count in (0, requests):
        out = work / f"inprocess-{variant}-{yield_each}-{count}.out"
        argv = [sys.executable, str(Path(__file__)), "--child", variant, str(count), "iter" if yield_each else "round"]
        done = subprocess.run(_callgrind(argv, out), env=_env(), capture_output=True, timeout=_RUN_TIMEOUT)
        if done.returncode != 0:
            raise RuntimeError(f"{variant}: the counted run failed:\n{done.stderr.decode(errors='replace')[-2000:]}")
        totals.append(_total(out))
    return (totals[1] - totals[0]) / requests


# -- server ----------------------------------------------------------------------------


def _client(port: int, requests: int) -> None:
    """WARMUP + ``requests`` keep-alive requests, one after the other."""
    with loopback.connect(port, timeout=30) as sock:
        for _ in range(WARMUP + requests):
            sock.sendall(_REQUEST)
            response = loopback.read_response(sock, timeout=30)
            if response.status != 200 or response.body != apps.BODY:
                raise RuntimeError(f"the server answered {response.status} {response.body[:80]!r}")


def server(variant: str, requests: int, work: Path) -> float:
    totals = []
    for count in (0, requests):
        out = work / f"server-{variant}-{count}.out"
        port = free_port()
        env = {**_env(), "BENCH_VARIANT": variant, "BENCH_APP": "hello"}
        log = work / f"server-{variant}-{count}.log"
        # SIGINT: uvicorn exits cleanly and callgrind writes its totals. The readiness probe's
        # connection is in both runs, and cancels out.
        with loopback.run_process(
            _callgrind(uvicorn_command(port), out),
            port,
            output=log,
            env=env,
            start_timeout=_START_TIMEOUT,
            stop_signal=signal.SIGINT,
            stop_timeout=_START_TIMEOUT,
        ):
            _client(port, count)
        totals.append(_total(out))
    return (totals[1] - totals[0]) / requests


# -- report ----------------------------------------------------------------------------


def _cells(values: dict[str, float], name: str) -> list[str]:
    value, bare = values.get(name), values.get("bare")
    if value is None:
        return ["", ""]
    if bare is None or name == "bare":
        return [f"{value:,.0f}", ""]
    return [f"{value:,.0f}", f"{value / bare:.3f}x ({value - bare:+,.0f})"]


def _budget(results: dict[str, dict[str, float]], name: str) -> str:
    """The budget column: the per-request in-process ratio against 1.10x, and the server's
    instructions read as a throughput loss against 5%."""
    if name == "bare":
        return ""
    if name == apps.FLOOR:
        return apps.FLOOR_NOTE
    if name not in BUDGETED:
        return "(peer)" if name in apps.PEERS else ""
    marks = []
    value, bare = results["iteration"].get(name), results["iteration"].get("bare")
    if value is not None and bare:
        marks.append(f"{INSTRUCTIONS_BUDGET:.2f}x: " + ("OK" if value / bare <= INSTRUCTIONS_BUDGET else "OVER"))
    value, bare = results["server"].get(name), results["server"].get("bare")
    if value is not None and bare:
        marks.append(
            f"server {SERVER_BUDGET_LOSS:.0%}: " + ("OK" if 1 - bare / value <= SERVER_BUDGET_LOSS else "OVER")
        )
    return " / ".join(marks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer requests: a smoke run")
    parser.add_argument("--requests", type=int, help="requests counted per variant (default 1000, quick 200)")
    parser.add_argument("--no-server", action="store_true", help="skip the uvicorn part")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        variant, count, mode = args.child
        asyncio.run(_child(variant, int(count), mode == "iter"))
        return 0
    if shutil.which("valgrind") is None:
        print("instructions.py: valgrind is not on PATH (apt-get install valgrind): nothing measured", file=sys.stderr)
        return 0
    requests = args.requests or (200 if args.quick else 1000)
    names, skipped, report, header = begin_report(VARIANTS, args.quick)
    began = time.perf_counter()
    results: dict[str, dict[str, float]] = {"round": {}, "iteration": {}, "server": {}}
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp:
        work = Path(tmp)
        for name in names:
            results["round"][name] = inprocess(name, requests, False, work)
            results["iteration"][name] = inprocess(name, requests, True, work)
            if not args.no_server:
                results["server"][name] = server(name, requests, work)
            print(f"  {name}: " + ", ".join(f"{k} {v.get(name, 0):,.0f}" for k, v in results.items()), flush=True)
    report["requests"] = requests
    report["budgets"] = {"iteration_ratio_max": INSTRUCTIONS_BUDGET, "server_loss_max": SERVER_BUDGET_LOSS}
    report["instructions_per_request"] = results
    total = time.perf_counter() - began

    headers = [
        "variant",
        "in process, a round per iteration (no budget)",
        "vs bare",
        "in process, an iteration per request",
        "vs bare",
        "uvicorn server process",
        "vs bare",
        f"budget: <= {INSTRUCTIONS_BUDGET:.2f}x per request / server <= {SERVER_BUDGET_LOSS:.0%} loss",
    ]
    rows = [
        [
            apps.label(name),
            *_cells(results["round"], name),
            *_cells(results["iteration"], name),
            *_cells(results["server"], name),
            _budget(results, name),
        ]
        for name in names
    ]
    rows += [[name, reason, *([""] * (len(headers) - 2))] for name, reason in skipped.items()]
    text, md_table = table(headers, rows)
    print(text)
    md = [
        "# Instructions per request (callgrind)",
        "",
        header,
        "",
        f"Command: `{command_line('benchmarks/instructions.py')}`",
        "",
        f"Starlette hello world; {requests} requests counted per variant after {WARMUP} to warm up; "
        f"PYTHONHASHSEED=0. Budgets (DESIGN.md), observe and cancel: in process with one loop iteration per "
        f'request, at most {INSTRUCTIONS_BUDGET:.2f}x bare by instructions (the "a round per iteration" '
        f"column has no budget); over uvicorn, at most {SERVER_BUDGET_LOSS:.0%} fewer requests/s than bare, "
        "read here as instructions (1 - bare/variant; a floor under the wall-clock cost, which overhead.md "
        "measures). The passthrough (floor) row is what any correct pure ASGI middleware pays (copy the scope, "
        "add a key, wrap send with a flag check, a byte count and end detection): a reference, not a peer.",
        "",
        md_table,
        "",
        f"Total time: {total:.1f} s.",
    ]
    write_results("instructions", report, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
