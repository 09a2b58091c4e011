"""Memory: per in-flight request, and what is left after 10,000 aborted requests.

Run from the repository root (``scripts/bench`` runs it with the other benchmarks)::

    .venv/bin/python benchmarks/memory.py            # full run, about 1.5 minutes
    .venv/bin/python benchmarks/memory.py --quick    # smoke run

A. In flight (in process, one fresh subprocess per variant, ``tracemalloc`` on): 1,000
   requests parked in a Starlette handler (``await release.wait()``), driven by a
   hand-made server like uvicorn's (the request, then a ``receive()`` that waits for the
   response to end or the client to leave). Memory traced and objects tracked by the
   garbage collector while they are parked, minus before they started, per request;
   then again after they were released and finished ("left": no object may be left;
   the bytes left are mostly hash tables, such as asyncio's set of tasks, that grew to
   hold 1,000 requests at once and keep their size).
B. Aborted requests (same subprocess, the same hand-made server): 10,000 requests, half
   ``GET /work`` (works 10 ms without reading, then answers) and half ``GET /stream``
   (64 KiB chunks until the client leaves), 200 at a time, each client leaving at a
   random moment in its first 4 ms (the same seeded sequence for every variant), after
   1,000 such requests as a warm-up. Growth of traced memory, of allocated blocks
   (``sys.getallocatedblocks()``) and of tracked objects over the 10,000.
C. Aborted requests on a real uvicorn (httptools, one subprocess per variant, the
   ``apps.stream_app`` routes): the same 10,000 requests from 16 client threads (raw
   sockets, ``_loopback.request_then_leave``) that leave after a random 0-4 ms with FIN
   or RST, after 1,000 as a warm-up; growth of the server's resident set size
   (``VmRSS``), read 0.5 s after the last request.

Budget (DESIGN.md): bounded per in-flight request; after 10,000 requests with random
aborts, no more growth than the bare app shows under the same load. The
``passthrough (floor)`` row (``apps.PassthroughMiddleware``, right after bare) is what
any correct pure ASGI middleware holds per request (a copied scope with one small object
in it, a ``send`` wrapper): a reference with no budget, not a peer.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import subprocess
import sys
import time
import tracemalloc
from collections.abc import MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import apps
from common import (
    begin_report,
    command_line,
    http_scope,
    pinned,
    quiet_logs,
    servers,
    table,
    write_results,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_disconnect import _loopback as loopback
from asgi_disconnect._loopback import CloseKind

VARIANTS = ("bare", "passthrough", "observe", "cancel", "guard_stream", "fastapi-disconnect", "aiofence")
INFLIGHT_VARIANTS = (
    "bare",
    "passthrough",
    "observe",
    "cancel",
    "fastapi-disconnect",
    "aiofence",
)  # no stream is parked
SEED = 20240601
MAX_ABORT_DELAY_S = 0.004
PATHS = ("/work", "/tokens")
Message = MutableMapping[str, Any]


def scope_for(path: str) -> dict[str, Any]:
    return {**http_scope(path), "state": {}}


class Connection:
    """The server side of one request, as uvicorn (ASGI 2.3) behaves: the request, then a
    ``receive()`` that returns ``http.disconnect`` once the response ended or the client
    left; ``send()`` after the client left drops the message silently."""

    __slots__ = ("complete", "ended", "gone", "received")

    def __init__(self) -> None:
        self.received = False
        self.complete = False
        self.gone = False
        self.ended = asyncio.Event()

    async def receive(self) -> Message:
        if not self.received:
            self.received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if not self.ended.is_set():
            await self.ended.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.gone:
            return
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
            self.ended.set()

    def abort(self) -> None:
        self.gone = True
        self.ended.set()


def measure() -> dict[str, int]:
    gc.collect()
    gc.collect()
    return {
        "traced_bytes": tracemalloc.get_traced_memory()[0],
        "allocated_blocks": sys.getallocatedblocks(),
        "gc_objects": len(gc.get_objects()),
    }


def growth(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in before}


# -- A. in flight --------------------------------------------------------------------


async def inflight(variant: str, requests: int) -> dict[str, Any]:
    release = asyncio.Event()

    async def park(request: Request) -> Response:
        await release.wait()
        return PlainTextResponse("done")

    app = apps.wrap(variant, Starlette(routes=[Route("/park", park)]))

    async def parked(count: int) -> tuple[list[asyncio.Future[None]], list[Connection]]:
        conns = [Connection() for _ in range(count)]
        tasks: list[asyncio.Future[None]] = [
            asyncio.ensure_future(app(scope_for("/park"), c.receive, c.send)) for c in conns
        ]
        for _ in range(5):  # every handler parked, every watcher started
            await asyncio.sleep(0)
        return tasks, conns

    async def finish(tasks: list[asyncio.Future[None]], conns: list[Connection]) -> None:
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        release.clear()
        if not all(c.complete for c in conns):
            raise RuntimeError(f"{variant}: a parked request did not complete")

    await finish(*await parked(100))  # warm-up: Starlette builds its stack, caches fill
    # One more loop iteration before each measure: the callback that resumed this task
    # (the gather's wake-up, holding every finished task) is still running until then.
    await asyncio.sleep(0)
    before = measure()
    tasks, conns = await parked(requests)
    during = measure()
    await finish(tasks, conns)
    del tasks, conns
    await asyncio.sleep(0)
    after = measure()
    held = growth(before, during)
    return {
        "requests": requests,
        "per_request": {key: value / requests for key, value in held.items()},
        "left_after": growth(before, after),
    }


# -- B. aborted requests, in process -------------------------------------------------


async def abort_batch(app: Any, rng: random.Random, count: int) -> tuple[int, int]:
    """``count`` requests whose clients leave at random moments; (aborted early, errors)."""
    loop = asyncio.get_running_loop()
    conns = [Connection() for _ in range(count)]
    paths = [PATHS[rng.randrange(2)] for _ in range(count)]
    early = 0

    def leave(conn: Connection) -> None:
        nonlocal early
        early += not conn.complete
        conn.abort()

    tasks = [asyncio.ensure_future(app(scope_for(p), c.receive, c.send)) for c, p in zip(conns, paths, strict=True)]
    for conn in conns:
        loop.call_later(rng.uniform(0, MAX_ABORT_DELAY_S), leave, conn)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    return early, sum(1 for r in results if isinstance(r, BaseException))


async def aborted(variant: str, requests: int, warmup: int, batch: int) -> dict[str, Any]:
    app = apps.stream_app(variant)
    rng = random.Random(SEED)

    async def run(count: int) -> tuple[int, int]:
        early = errors = 0
        for start in range(0, count, batch):
            e, x = await abort_batch(app, rng, min(batch, count - start))
            early += e
            errors += x
        await asyncio.sleep(0.05)  # timers and callbacks of the last batch run out
        return early, errors

    await run(warmup)
    before = measure()
    early, errors = await run(requests)
    after = measure()
    return {"requests": requests, "aborted_early": early, "errors": errors, "growth": growth(before, after)}


def child(variant: str, inflight_requests: int, requests: int, warmup: int, batch: int) -> dict[str, Any]:
    """One variant, in this fresh process: parts A and B."""
    quiet_logs()
    tracemalloc.start()
    out: dict[str, Any] = {"variant": variant}
    if variant in INFLIGHT_VARIANTS:
        out["inflight"] = asyncio.run(inflight(variant, inflight_requests))
    out["aborted"] = asyncio.run(aborted(variant, requests, warmup, batch))
    return out


def run_children(names: Sequence[str], inflight_requests: int, requests: int, warmup: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for variant in names:
        cmd = [sys.executable, __file__, "--child", variant, "--inflight", str(inflight_requests)]
        cmd += ["--requests", str(requests), "--warmup", str(warmup)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            results[variant] = {"error": done.stderr[-2000:]}
            print(f"  {variant}: failed\n{done.stderr[-2000:]}", flush=True)
            continue
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {variant}: {json.dumps(results[variant])}", flush=True)
    return results


# -- C. aborted requests, real server ------------------------------------------------


def hammer(port: int, count: int, rng: random.Random, clients: int = 16) -> int:
    """``count`` requests from ``clients`` concurrent clients (threads) that leave early,
    half with a FIN, half with a RST; return the errors."""
    plan: list[tuple[str, float, CloseKind]] = [
        (PATHS[rng.randrange(2)], rng.uniform(0, MAX_ABORT_DELAY_S), "rst" if rng.random() < 0.5 else "fin")
        for _ in range(count)
    ]

    def worker(jobs: list[tuple[str, float, CloseKind]]) -> int:
        errors = 0
        for path, delay, how in jobs:
            # On /tokens, the first bytes of the answer: the stream has begun, the server
            # is not lagging behind.
            until = b"HTTP/" if path == "/tokens" else None
            try:
                loopback.request_then_leave(port, path, until=until, wait=delay, how=how, timeout=10)
            except (OSError, ValueError):
                errors += 1
        return errors

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return sum(pool.map(worker, [plan[i::clients] for i in range(clients)]))


def run_server(names: Sequence[str], requests: int, warmup: int, pin: bool) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    results: dict[str, Any] = {}
    with pinned(pin, notes) as cpus, servers(names, "stream", cpus, {}) as running:
        for name in names:
            server = running[name]
            rng = random.Random(SEED)
            began = time.perf_counter()
            hammer(server.port, warmup, rng)
            time.sleep(0.5)
            before = server.rss_kib()
            errors = hammer(server.port, requests, rng)
            time.sleep(0.5)
            after = server.rss_kib()
            results[name] = {
                "requests": requests,
                "errors": errors,
                "rss_kib_before": before,
                "rss_kib_after": after,
                "rss_growth_kib": None if before is None or after is None else after - before,
                "seconds": round(time.perf_counter() - began, 1),
            }
            print(f"  {name}: {json.dumps(results[name])}", flush=True)
    return results, notes


# -- reporting -----------------------------------------------------------------------


def flat(grown: dict[str, int], bare: dict[str, int], requests: int) -> bool:
    """No more growth than bare: traced memory within 8 bytes per request of bare's (a
    leak of even one small object per request is 50 bytes or more), and at most 10 more
    objects tracked by the garbage collector."""
    return (
        grown["traced_bytes"] <= max(bare["traced_bytes"], 0) + 8 * requests
        and grown["gc_objects"] <= max(bare["gc_objects"], 0) + 10
    )


def kib(n: float) -> str:
    return f"{n / 1024:+,.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer requests: a smoke run")
    parser.add_argument("--inflight", type=int, help="parked requests in part A (default 1000, quick 200)")
    parser.add_argument("--requests", type=int, help="aborted requests in parts B and C (default 10000, quick 1000)")
    parser.add_argument("--warmup", type=int, help="aborted requests before measuring B (default 5000, quick 500)")
    parser.add_argument("--server-warmup", type=int, help="the same for C (default 2000, quick 300)")
    parser.add_argument("--no-server", action="store_true", help="skip part C")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and clients to different CPUs")
    parser.add_argument("--child", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    inflight_requests = args.inflight or (200 if args.quick else 1000)
    requests = args.requests or (1000 if args.quick else 10_000)
    warmup = args.warmup or (500 if args.quick else 5000)
    server_warmup = args.server_warmup or (300 if args.quick else 2000)
    if args.child:
        print(json.dumps(child(args.child, inflight_requests, requests, warmup, batch=200)))
        return 0

    names, skipped, report, header = begin_report(VARIANTS, args.quick)
    began = time.perf_counter()
    print(f"\nA and B. In process, one subprocess per variant: {inflight_requests} parked, {requests} aborted")
    in_process = run_children(names, inflight_requests, requests, warmup)
    server: dict[str, Any] = {}
    notes: list[str] = []
    if not args.no_server:
        print(f"\nC. uvicorn: {requests} aborted requests per variant")
        server, notes = run_server(names, requests, server_warmup, not args.no_pin)
    total = time.perf_counter() - began

    md = ["# Memory", "", header, "", f"Command: `{command_line('benchmarks/memory.py')}`", ""]
    inflight_rows = []
    bare_a = in_process.get("bare", {}).get("inflight", {}).get("per_request")
    for name in names:
        part = in_process.get(name, {}).get("inflight")
        if part is None:
            continue
        per, left = part["per_request"], part["left_after"]
        extra = f"{per['traced_bytes'] - bare_a['traced_bytes']:+,.0f}" if bare_a and name != "bare" else ""
        inflight_rows.append(
            [
                apps.label(name),
                f"{per['traced_bytes']:,.0f}",
                extra,
                f"{per['gc_objects']:.1f}",
                f"{left['traced_bytes']:+,}",
                f"{left['gc_objects']:+,}",
            ]
        )
    skipped_a = [[n, r, "", "", "", ""] for n, r in skipped.items() if n in INFLIGHT_VARIANTS]
    headers_a = ["variant", "bytes/request", "vs bare", "objects/request", "left after (bytes)", "left (objects)"]
    text_a, md_a = table(headers_a, inflight_rows + skipped_a)
    title_a = f"A. In flight: {inflight_requests} requests parked in a handler (in process, tracemalloc)"

    bare_b = in_process.get("bare", {}).get("aborted", {}).get("growth")
    aborted_rows = []
    for name in names:
        part = in_process.get(name, {}).get("aborted")
        if part is None:
            continue
        g = part["growth"]
        if name in apps.PEERS:
            verdict = "(peer)"
        elif name == apps.FLOOR:
            verdict = apps.FLOOR_NOTE
        elif name == "bare" or bare_b is None:
            verdict = ""
        else:
            verdict = "OK" if flat(g, bare_b, requests) else "OVER"
        aborted_rows.append(
            [
                apps.label(name),
                f"{part['aborted_early']:,}",
                kib(g["traced_bytes"]),
                f"{g['allocated_blocks']:+,}",
                f"{g['gc_objects']:+,}",
                str(part["errors"]),
                verdict,
            ]
        )
    headers_b = ["variant", "aborted early", "traced KiB", "blocks", "objects", "errors", "budget: flat"]
    text_b, md_b = table(headers_b, aborted_rows + [[n, r, "", "", "", "", ""] for n, r in skipped.items()])
    title_b = f"B. Growth over {requests:,} aborted requests (in process, after {warmup:,} to warm up)"

    sections = [(title_a, text_a, md_a), (title_b, text_b, md_b)]
    if server:
        server_rows = []
        bare_c = server.get("bare", {}).get("rss_growth_kib")
        for name, part in server.items():
            grown = part["rss_growth_kib"]
            server_rows.append(
                [
                    apps.label(name),
                    f"{part['rss_kib_before']:,}" if part["rss_kib_before"] is not None else "n/a",
                    f"{grown:+,}" if grown is not None else "n/a",
                    f"{grown - bare_c:+,}" if grown is not None and bare_c is not None and name != "bare" else "",
                    str(part["errors"]),
                    "(peer)" if name in apps.PEERS else apps.FLOOR_NOTE if name == apps.FLOOR else "",
                ]
            )
        headers_c = ["variant", "RSS before KiB", "RSS growth KiB", "vs bare", "client errors", ""]
        text_c, md_c = table(headers_c, server_rows + [[n, r, "", "", "", ""] for n, r in skipped.items()])
        title_c = f"C. uvicorn RSS growth over {requests:,} aborted requests (after {server_warmup:,})"
        sections.append((title_c, text_c, md_c))
    for title, text, md_table in sections:
        print(f"\n{title}\n{text}")
        md += [f"## {title}", "", md_table, ""]
    budget = (
        "Budget (DESIGN.md): bounded memory per in-flight request; after 10,000 requests with random aborts, no "
        "more growth than the bare app (B's verdict: within 8 bytes per request and 10 objects of bare's growth)."
    )
    print(f"\n{budget}\ntotal time: {total:.1f} s")
    md += [budget, "", *(f"- note: {n}" for n in notes), "", f"Total time: {total:.1f} s."]
    report |= {
        "inflight_requests": inflight_requests,
        "aborted_requests": requests,
        "warmup_requests": warmup,
        "server_warmup_requests": server_warmup,
        "in_process": in_process,
        "server": server,
        "notes": notes,
        "total_seconds": round(total, 1),
    }
    write_results("memory", report, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
