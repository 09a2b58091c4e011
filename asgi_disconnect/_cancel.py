"""Cancellation helpers: ``shield()`` and the anyio-aware check behind native cancels."""

from __future__ import annotations

import asyncio
from typing import Any

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


def anyio_shielded(task: asyncio.Task[Any]) -> bool:
    """True when ``task`` is inside an anyio cancel scope that is shielded.

    The middleware cancels a handler on asyncio with ``Task.cancel()`` because an anyio
    cancel scope per request costs more than the middleware's whole budget; this check
    keeps that cancellation out of every shielded scope (``shield()``, Starlette's
    thread pool calls, httpcore's connection cleanup), as anyio's own would. It reads
    anyio's per-task scope stack; tests/test_cancel.py fails if anyio changes it.
    """
    from anyio._backends._asyncio import _task_states

    state = _task_states.get(task)
    scope = state.cancel_scope if state is not None else None
    while scope is not None:
        if scope.shield:
            return True
        scope = scope._parent_scope
    return False
