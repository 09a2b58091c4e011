"""An LLM proxy whose client leaves mid-answer: the upstream stream must stop at once.

Run: ``python examples/llm_proxy.py``. It starts ``fake_llm_upstream.py`` (next to this
file) as a separate process on a free loopback port, then serves a Starlette proxy with
uvicorn: ``GET /chat`` relays the upstream's token stream through an
``httpx.AsyncClient`` stream. A raw-socket client (``asgi_disconnect.testing``'s
``live.request()``) reads a few tokens and aborts (TCP RST). The run is done twice and reported side by side:

- **asgi-disconnect**: ``DisconnectMiddleware`` in front of the app, the relay generator
  wrapped in ``guard_stream``. Checked: the relay's ``finally`` (which closes the httpx
  response) runs within 1 s of the abort, the upstream has no stream open within 2 s,
  and it produced at most 5 tokens after the proxy detected the abort.
- **bare Starlette** (no middleware, no ``guard_stream``): the same relay generator in a
  plain ``StreamingResponse``. Measured and printed, not checked. On servers that
  advertise ASGI spec < 2.4 (uvicorn, hypercorn) Starlette's ``StreamingResponse`` runs
  its own disconnect listener and cancels the stream task, so this proxy stops too; the
  row shows what that costs. Servers that advertise 2.4 get no listener from Starlette:
  there only the failing ``send()`` (the next token) stops the stream.

Exits 0 when every check passes, 1 otherwise. Needs asgi-disconnect, starlette, uvicorn
and httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from _measure import Serve, at_most, left_at, report, seconds, wait_until
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from asgi_disconnect import DisconnectMiddleware, DisconnectState, disconnect_state, guard_stream
from asgi_disconnect.testing import leave, serve

UPSTREAM_SCRIPT = Path(__file__).with_name("fake_llm_upstream.py")
TOKENS = 2000  # the upstream would take ~10 s to produce them all
READ_TOKENS = 3  # the client leaves after reading this many
FINALLY_WITHIN = 1.0  # seconds from the abort to the relay's finally
UPSTREAM_CLOSED_WITHIN = 2.0  # seconds from the abort to "no stream open" upstream
MAX_TOKENS_AFTER_DETECTION = 5


# -- the proxy -------------------------------------------------------------------------


@dataclass
class Trace:
    """What one relayed stream did, for the report."""

    received: int = 0  # tokens the proxy got from the upstream
    finally_at: float | None = None  # time.monotonic() when the relay's finally began
    closed_at: float | None = None  # ... and when the upstream response was closed
    state: DisconnectState | None = None  # with the middleware only


async def relay(client: httpx.AsyncClient, url: str, trace: Trace) -> AsyncIterator[bytes]:
    """Relay the upstream's SSE tokens; close the upstream response however this ends."""
    async with client.stream("GET", url) as response:
        try:
            async for line in response.aiter_lines():  # bounded: the upstream sends at most TOKENS
                if line.startswith("data: "):
                    trace.received += 1
                    yield f"{line}\n\n".encode()
        finally:
            trace.finally_at = time.monotonic()
            await response.aclose()  # closes the connection: the upstream stops generating
            trace.closed_at = time.monotonic()


def build_proxy(client: httpx.AsyncClient, upstream: str, traces: dict[str, Trace], guarded: bool) -> ASGIApp:
    async def chat(request: Request) -> StreamingResponse:
        stream_id = request.query_params["id"]
        trace = traces[stream_id] = Trace()
        body = relay(client, f"{upstream}/v1/stream?tokens={TOKENS}&id={stream_id}", trace)
        if not guarded:
            return StreamingResponse(body, media_type="text/event-stream")
        trace.state = disconnect_state(request.scope)
        return StreamingResponse(guard_stream(body, request.scope), media_type="text/event-stream")

    app = Starlette(routes=[Route("/chat", chat)])
    return DisconnectMiddleware(app) if guarded else app


# -- the upstream process, the proxy's server and the client -----------------------------


@contextlib.contextmanager
def upstream_process(max_seconds: float = 120) -> Iterator[str]:
    """Start the fake upstream on a free loopback port; yield its base URL; stop it."""
    proc = subprocess.Popen(
        [sys.executable, str(UPSTREAM_SCRIPT), "--port", "0", "--exit-on-stdin-eof", "--max-seconds", str(max_seconds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)  # one line, within 15 s
        line = proc.stdout.readline().decode() if ready else ""
        if not line.startswith("listening on "):
            raise RuntimeError(f"upstream did not start (exit code {proc.poll()}): {line!r}")
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


# -- one run -----------------------------------------------------------------------------


@dataclass
class Result:
    finally_after: float | None  # seconds from the abort to the relay's finally
    upstream_closed_after: float | None  # seconds from the abort to "stream closed" upstream
    tokens_after_abort: int  # produced upstream after the client left
    tokens_after_detection: int | None  # ... after the proxy detected it (middleware only)
    produced: int  # by the upstream for this stream, in all
    trace: Trace  # what the relay recorded


async def upstream_stats(client: httpx.AsyncClient, upstream: str, stream_id: str, since: float) -> dict[str, Any]:
    response = await client.get(f"{upstream}/stats", params={"id": stream_id, "since": repr(since)})
    stream: dict[str, Any] = response.json()["stream"]
    return stream


async def run(upstream: str, guarded: bool, server: Serve = serve) -> Result:
    """Serve the proxy on ``server``; a client reads a few tokens and aborts; measure what follows."""
    traces: dict[str, Trace] = {}
    stream_id = uuid.uuid4().hex
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        async with server(build_proxy(client, upstream, traces, guarded)) as live:
            outcome = await live.request(path=f"/chat?id={stream_id}", leave=leave.after_chunks(READ_TOKENS, how="rst"))
            abort = left_at(outcome)
            trace = traces[stream_id]
            await wait_until(lambda: trace.finally_at is not None, FINALLY_WITHIN)
            deadline = abort + UPSTREAM_CLOSED_WITHIN
            stats = await upstream_stats(client, upstream, stream_id, abort)
            for _ in range(200):  # each poll is a request: bounded by count and by time
                if not stats["open"] or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.005)
                stats = await upstream_stats(client, upstream, stream_id, abort)
            after_detection = None
            if trace.state is not None and trace.state.detected_at is not None:
                detected = await upstream_stats(client, upstream, stream_id, trace.state.detected_at)
                after_detection = detected["produced_since"]
    # closed_at is the upstream's time.monotonic(): the same clock as ours on one machine.
    closed_at: float | None = stats["closed_at"]
    return Result(
        finally_after=None if trace.finally_at is None else trace.finally_at - abort,
        upstream_closed_after=None if closed_at is None else closed_at - abort,
        tokens_after_abort=stats["produced_since"],
        tokens_after_detection=after_detection,
        produced=stats["produced"],
        trace=trace,
    )


def main() -> int:
    with upstream_process() as upstream:
        guarded = asyncio.run(run(upstream, guarded=True))
        bare = asyncio.run(run(upstream, guarded=False))
    rows = [
        ("relay finally after the abort", seconds(guarded.finally_after), seconds(bare.finally_after)),
        ("upstream stream closed after", seconds(guarded.upstream_closed_after), seconds(bare.upstream_closed_after)),
        ("upstream tokens after the abort", str(guarded.tokens_after_abort), str(bare.tokens_after_abort)),
        ("... after detection", str(guarded.tokens_after_detection), "n/a"),
        ("upstream tokens produced", str(guarded.produced), str(bare.produced)),
        ("tokens the proxy received", str(guarded.trace.received), str(bare.trace.received)),
    ]
    checks = [
        (at_most(guarded.finally_after, FINALLY_WITHIN), f"the relay's finally did not run within {FINALLY_WITHIN} s"),
        (
            at_most(guarded.upstream_closed_after, UPSTREAM_CLOSED_WITHIN),
            f"the upstream still had the stream open {UPSTREAM_CLOSED_WITHIN} s after the abort",
        ),
        (
            at_most(guarded.tokens_after_detection, MAX_TOKENS_AFTER_DETECTION),
            f"the upstream produced {guarded.tokens_after_detection} tokens after detection",
        ),
    ]
    title = f"the client reads {READ_TOKENS} tokens of {TOKENS} (one every 5 ms), then aborts (RST)"
    return report(title, rows, checks, "with asgi-disconnect the upstream stream stopped at once")


if __name__ == "__main__":
    sys.exit(main())
