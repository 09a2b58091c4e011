"""Shared by the streaming examples: the package's loopback harness, as they use it.

``serve`` runs uvicorn on a free port of 127.0.0.1 in the example's event loop;
``read_then_abort`` is a raw-socket client that reads until a marker, then leaves with
a TCP RST.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.types import ASGIApp

from asgi_disconnect import _loopback


@contextlib.asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[int]:
    """Serve ``app`` with uvicorn on a free port of 127.0.0.1; yield the port."""
    async with _loopback.serve(app) as live:
        yield live.port


def read_then_abort(port: int, path: str, marker: bytes) -> float:
    """Request ``path``, read until ``marker``, then leave with a TCP RST; return when."""
    return _loopback.request_then_leave(port, path, until=marker, how="rst")
