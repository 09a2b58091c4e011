"""A fake LLM server: streams one token every few milliseconds, and counts what it made.

Run: ``python examples/fake_llm_upstream.py [--port 8001]`` (``--port 0``: a free port).
It prints ``listening on http://127.0.0.1:PORT`` on stdout once it accepts connections,
then logs only to stderr. It serves on 127.0.0.1 only:

- ``GET /v1/stream?tokens=2000&id=ID``: an SSE stream, ``data: tok<i>`` every
  ``--interval`` seconds (5 ms by default), up to ``tokens`` tokens. Each token is
  counted when it is produced, as a GPU or a billing meter would.
- ``GET /stats[?id=ID][&since=T]``: JSON, ``{"produced": N, "open": N}`` over all
  streams, plus ``"stream": {"produced", "open", "closed_at", "produced_since"}`` for
  stream ``ID``: ``produced_since`` counts the tokens it produced after
  ``time.monotonic()`` value ``T``, and ``closed_at`` is the ``time.monotonic()`` value
  when the stream's generator finished. The monotonic clock is shared by every process
  on the machine, so a client can compare these with its own.

It notices its own client leaving: ``DisconnectMiddleware`` watches the connection and
``guard_stream`` interrupts the generator while it "generates", so an abandoned stream
is closed (``open`` drops) within milliseconds. It exits on SIGTERM/SIGINT, when its
stdin reaches end of file (``--exit-on-stdin-eof``: the parent that started it with a
pipe has gone, so no orphan is left behind), or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from asgi_disconnect import DisconnectMiddleware, guard_stream

MAX_TOKENS = 100_000  # per stream: a bound on every loop
MAX_TRACKED = 256  # streams whose per-stream stats are kept


@dataclass
class StreamStats:
    produced_at: list[float] = field(default_factory=list)  # time.monotonic() of each token
    open: bool = True
    closed_at: float | None = None  # time.monotonic() when the generator's finally ran


@dataclass
class Stats:
    produced: int = 0
    open: int = 0
    streams: OrderedDict[str, StreamStats] = field(default_factory=OrderedDict)

    def track(self, stream_id: str) -> StreamStats:
        record = self.streams[stream_id] = StreamStats()
        while len(self.streams) > MAX_TRACKED:
            self.streams.popitem(last=False)
        return record


def build_app(interval: float) -> DisconnectMiddleware:
    stats = Stats()

    async def generate(count: int, record: StreamStats) -> AsyncIterator[bytes]:
        stats.open += 1
        try:
            for i in range(count):
                await asyncio.sleep(interval)  # the model computes the next token
                stats.produced += 1
                record.produced_at.append(time.monotonic())
                yield f"data: tok{i}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            stats.open -= 1
            record.open = False
            record.closed_at = time.monotonic()

    async def stream(request: Request) -> StreamingResponse:
        count = min(int(request.query_params.get("tokens", "2000")), MAX_TOKENS)
        record = stats.track(request.query_params.get("id", f"anonymous-{id(request)}"))
        # guard_stream: the generator is interrupted mid-"generation" when the client goes,
        # and closed (its finally run) before this response returns.
        body = guard_stream(generate(count, record), request.scope)
        return StreamingResponse(body, media_type="text/event-stream")

    async def report(request: Request) -> JSONResponse:
        answer: dict[str, object] = {"produced": stats.produced, "open": stats.open}
        stream_id = request.query_params.get("id")
        if stream_id is not None:
            record = stats.streams.get(stream_id)
            if record is None:
                answer["stream"] = None
            else:
                since = float(request.query_params.get("since", "0"))
                answer["stream"] = {
                    "produced": len(record.produced_at),
                    "open": record.open,
                    "closed_at": record.closed_at,
                    "produced_since": sum(1 for t in record.produced_at if t > since),
                }
        return JSONResponse(answer)

    app = Starlette(routes=[Route("/v1/stream", stream), Route("/stats", report)])
    return DisconnectMiddleware(app)


def _exit_on_eof(server: uvicorn.Server, loop: asyncio.AbstractEventLoop) -> None:
    # A daemon thread: it blocks on stdin until the parent closes it (or dies).
    try:
        sys.stdin.buffer.read()
    except (OSError, ValueError):
        pass
    loop.call_soon_threadsafe(setattr, server, "should_exit", True)


async def serve(port: int, interval: float, max_seconds: float, exit_on_stdin_eof: bool) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    config = uvicorn.Config(
        build_app(interval),
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    loop = asyncio.get_running_loop()
    if exit_on_stdin_eof:
        threading.Thread(target=_exit_on_eof, args=(server, loop), daemon=True).start()
    loop.call_later(max_seconds, setattr, server, "should_exit", True)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(1000):  # at most 10 s to start
        if server.started or serving.done():
            break
        await asyncio.sleep(0.01)
    if server.started:
        print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    await serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=8001, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--interval", type=float, default=0.005, help="seconds per token")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="exit after this long")
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help="exit when stdin closes")
    args = parser.parse_args()
    # This program's own logging goes to stderr, at warning level: stdout carries only the
    # "listening on" line. (An application may configure structlog; the library never does.)
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    asyncio.run(serve(args.port, args.interval, args.max_seconds, args.exit_on_stdin_eof))


if __name__ == "__main__":
    main()
