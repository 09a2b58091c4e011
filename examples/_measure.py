"""Shared by the streaming examples: what a run is served by, when its client left,
bounded waits for an outcome, and the report of two runs side by side.

Each example serves its app with ``asgi_disconnect.testing.serve`` (a real uvicorn on a
free port of 127.0.0.1, in the example's event loop) and sends its request with
``live.request(leave=...)``: a raw socket that leaves with a TCP RST.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager

from starlette.types import ASGIApp

from asgi_disconnect.testing import Live, Outcome

#: Serves an app for one run: ``asgi_disconnect.testing.serve`` (uvicorn), or a test's server.
Serve = Callable[[ASGIApp], AbstractAsyncContextManager[Live]]


def left_at(outcome: Outcome) -> float:
    """``time.monotonic()`` when the client left; a run whose client never left says why."""
    if outcome.left_at is None:
        raise RuntimeError(f"the client did not leave: {outcome.summary()}")
    return outcome.left_at


async def wait_until(done: Callable[[], bool], within: float) -> float | None:
    """Poll ``done`` every 5 ms for at most ``within`` seconds; return ``time.monotonic()`` once true, else None."""
    deadline = time.monotonic() + within
    for _ in range(int(within / 0.005) + 1):
        if done():
            return time.monotonic()
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.005)
    return time.monotonic() if done() else None


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value * 1000:.1f} ms"


def at_most(value: float | None, limit: float) -> bool:
    """Was ``value`` measured, and is it ``limit`` or less?"""
    return value is not None and value <= limit


def report(title: str, rows: Sequence[tuple[str, str, str]], checks: Sequence[tuple[bool, str]], ok: str) -> int:
    """Print ``rows`` (label, with asgi-disconnect, bare), then what each failed check says, or ``ok``.

    ``checks``: (passed, what went wrong otherwise). Returns the exit code: 1 if a check failed.
    """
    print(title)
    print(f"{'':34}{'asgi-disconnect':>18}{'bare Starlette':>18}")
    for label, guarded, bare in rows:
        print(f"{label:34}{guarded:>18}{bare:>18}")
    failures = [failure for passed, failure in checks if not passed]
    for failure in failures:
        print(f"FAILED: {failure}")
    if not failures:
        print(f"OK: {ok}")
    return 1 if failures else 0
