"""``shield()``: a critical section the middleware's cancellation never interrupts."""

from __future__ import annotations

import anyio


def shield() -> anyio.CancelScope:
    """A critical section the middleware's cancellation never interrupts.

    Use it around a commit, a rollback or returning a connection to its pool::

        with shield():
            await session.commit()

    If the client leaves while the section runs, the cancellation lands at the first
    ``await`` after it. It is an anyio shielded cancel scope, so it also holds against
    every anyio or trio cancellation (timeouts, task groups). A plain
    ``asyncio.Task.cancel()`` issued by other code (a server, Django, a test harness)
    is not anyio's and not ours to stop.
    """
    return anyio.CancelScope(shield=True)
