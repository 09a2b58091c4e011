"""Helpers shared by the real-server tests, on top of tests/servers.py.

The clients here are blocking: run them in a worker thread (``anyio.to_thread.run_sync``).
A request whose client leaves is ``asgi_disconnect.testing``'s ``live.request(leave=...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Literal

import anyio
from _measure import Serve

from asgi_disconnect.testing import serve
from tests.servers import ServerKind, raw_connection, read_response, request_bytes

Close = Literal["fin", "rst"]  # how a client leaves: an orderly FIN, or an abortive RST
CLOSES: tuple[Close, ...] = ("fin", "rst")


def served_by(kind: ServerKind) -> Serve:
    """What an example's run is served by: ``kind``, in the test's own event loop."""
    return functools.partial(serve, server=kind)


def fetch(port: int, method: str = "GET", path: str = "/", body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request on a connection of its own, read to the end: status, headers, body."""
    with raw_connection(port) as sock:
        sock.sendall(request_bytes(method, path, body=body))
        return read_response(sock)


class Records(logging.Handler):
    """Keeps every record of its level or above, from the loggers it is installed on."""

    def __init__(self, level: int = logging.DEBUG) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def recording(handler: Records, *names: str) -> Iterator[None]:
    """Install ``handler`` on the loggers ``names`` for the block.

    Only once the server runs: uvicorn's logging setup removes the handlers of
    "uvicorn.error" when it starts.
    """
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


async def settled(
    snapshot: Callable[[], tuple[int, ...]], idle: Callable[[], bool], *, within: float, quiet: float
) -> bool:
    """Wait until ``snapshot()`` has not changed for ``quiet`` seconds while ``idle()`` holds:
    the server side of a test has settled. False if it did not within ``within`` seconds."""
    deadline = time.monotonic() + within
    last, since = snapshot(), time.monotonic()
    for _ in range(int(within / 0.005) + 1):  # and at most ``within`` seconds
        await anyio.sleep(0.005)
        now, current = time.monotonic(), snapshot()
        if current != last:
            last, since = current, now
        elif idle() and now - since >= quiet:
            return True
        if now > deadline:
            break
    return False


class Counts:
    """What a test project's views did, counted under a lock (they run in worker threads too)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def add(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    async def cleanup(self, name: str) -> None:
        """An async cleanup step (closing an upstream, say): did it complete, or was it cancelled again?"""
        try:
            await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            self.add(f"{name}.cancelled_again")
            raise
        self.add(f"{name}.cleaned")
