"""Detection latency: from a client's close to the handler hearing of it.

Run: ``.venv/bin/python benchmarks/latency.py [--requests N]``

A real uvicorn (httptools) serves, in this process, on 127.0.0.1; raw-socket clients in
a worker thread send a request, wait until the handler is busy, note
``time.monotonic()`` and close (FIN or RST). The server side notes when it heard:

- observe, non-streaming: a handler that never reads; when ``disconnected`` turned true;
- cancel, non-streaming: the same handler in cancel mode; when its ``finally`` ran;
- stream: ``guard_stream`` over a source yielding a token every 5 ms; when the source's
  ``finally`` ran, and how many tokens it produced after the detection;
- bare stream (for scale): Starlette's ``StreamingResponse`` over the same source
  without the package; when the source's ``finally`` ran.

Budgets (DESIGN.md): p99 under 5 ms; at most one chunk produced after the detection.
Results go to stdout and ``benchmarks/results/latency.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import statistics
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from asgi_disconnect import DisconnectMiddleware, disconnect_state, guard_stream

RESULTS = Path(__file__).resolve().parent / "results"


class Probe:
    """What the server side saw for the current request."""

    def __init__(self) -> None:
        self.heard: float | None = None
        self.detected: float | None = None
        self.produced: list[float] = []
        self.done = asyncio.Event()

    def hear(self, detected: float | None = None) -> None:
        self.heard = time.monotonic()
        self.detected = detected
        self.done.set()


probe = Probe()


async def source() -> AsyncIterator[bytes]:
    try:
        for i in range(2000):
            probe.produced.append(time.monotonic())
            yield f"data: token {i}\n\n".encode()
            await anyio.sleep(0.005)
    finally:
        probe.hear()


async def observe(request: Request) -> PlainTextResponse:
    state = disconnect_state(request.scope)
    await state.wait()
    probe.hear(state.detected_at)
    return PlainTextResponse("late")


async def cancelled(request: Request) -> PlainTextResponse:
    try:
        await anyio.sleep(30)
        return PlainTextResponse("late")
    finally:
        probe.hear(disconnect_state(request.scope).detected_at)


async def stream(request: Request) -> StreamingResponse:
    return StreamingResponse(guard_stream(source(), request.scope), media_type="text/event-stream")


async def bare_stream(request: Request) -> StreamingResponse:
    return StreamingResponse(source(), media_type="text/event-stream")


def apps() -> dict[str, Any]:
    routes = [Route("/observe", observe), Route("/cancel", cancelled), Route("/stream", stream)]
    return {
        "observe": DisconnectMiddleware(Starlette(routes=routes)),
        "cancel": DisconnectMiddleware(Starlette(routes=routes), cancel=True),
        "bare": Starlette(routes=[Route("/stream", bare_stream)]),
    }


CASES: list[tuple[str, str, str]] = [
    # (name, app, path)
    ("observe, non-streaming", "observe", "/observe"),
    ("cancel, non-streaming", "cancel", "/cancel"),
    ("guard_stream", "observe", "/stream"),
    ("bare Starlette stream", "bare", "/stream"),
]


def client(port: int, path: str, how: str, streaming: bool) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        if streaming:
            data = b""
            for _ in range(100):  # bounded: a few tokens, then leave
                data += sock.recv(4096)
                if data.count(b"token") >= 3:
                    break
        else:
            time.sleep(0.02)  # the handler is waiting by now
        if how == "rst":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
        closed = time.monotonic()
    return closed


async def measure(requests: int) -> list[dict[str, Any]]:
    global probe
    results = []
    for name, app_name, path in CASES:
        app = apps()[app_name]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, http="httptools", lifespan="off", log_level="error"))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        for how in ("fin", "rst"):
            latencies: list[float] = []
            after: list[int] = []
            for _ in range(requests):
                probe = Probe()
                closed = await asyncio.to_thread(client, port, path, how, path == "/stream")
                try:
                    await asyncio.wait_for(probe.done.wait(), 5)
                except TimeoutError:
                    continue
                assert probe.heard is not None
                latencies.append((probe.heard - closed) * 1000)
                if probe.produced:
                    detected = probe.detected or probe.heard
                    after.append(len([t for t in probe.produced if t > detected]))
            latencies.sort()
            row = {
                "case": name,
                "close": how,
                "n": len(latencies),
                "lost": requests - len(latencies),
                "p50_ms": round(statistics.median(latencies), 3) if latencies else None,
                "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3)
                if latencies
                else None,
                "max_chunks_after": max(after) if after else None,
            }
            results.append(row)
            print(_format_row(row), flush=True)
        server.should_exit = True
        await serving
    return results


def _format_row(row: dict[str, Any]) -> str:
    after = "" if row["max_chunks_after"] is None else str(row["max_chunks_after"])
    return f"| {row['case']} | {row['close']} | {row['n']} | {row['p50_ms']} | {row['p99_ms']} | {after} |" + (
        f" {row['lost']} never heard |" if row["lost"] else " |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=100, help="aborted requests per case and close kind")
    args = parser.parse_args()
    # This script, not the library, decides what is printed: the abort events are noise here.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    header = (
        "| case | close | n | p50 ms | p99 ms | max chunks produced after detection | notes |\n"
        "|---|---|---|---|---|---|---|"
    )
    print(header)
    results = asyncio.run(measure(args.requests))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latency.json").write_text(json.dumps(results, indent=2) + "\n")
    command = f"benchmarks/latency.py --requests {args.requests}"
    lines = ["# Disconnect detection latency", "", f"Command: `{command}`", "", header]
    lines += [_format_row(row) for row in results]
    lines += ["", "Budgets (DESIGN.md): p99 under 5 ms; at most one chunk produced after the detection."]
    (RESULTS / "latency.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
