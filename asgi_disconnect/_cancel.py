"""Cancellation helpers: ``shield()`` and the anyio-aware check behind native cancels."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import anyio

# Imported here, not at the first cancel: anyio loads its asyncio backend lazily, and
# that first import (about 20 ms) would otherwise delay the first cancelled request.
from anyio._backends._asyncio import _task_states

if sys.version_info >= (3, 12):
    current_task = asyncio.current_task
else:  # pragma: no cover - 3.10 and 3.11: the same lookup without a Python-level call
    current_task = asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]


def asyncio_task() -> asyncio.Task[Any] | None:
    """The current asyncio task, or None under another event loop (trio)."""
    loop = asyncio._get_running_loop()
    return None if loop is None else current_task(loop)


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
    state = _task_states.get(task)
    scope = state.cancel_scope if state is not None else None
    while scope is not None:
        if scope.shield:
            return True
        scope = scope._parent_scope
    return False


class NativeCanceller:
    """Cancels an asyncio task at every ``await`` until stopped, like an anyio scope would
    (or once, with ``once=True``).

    It never cancels the task while it is inside an anyio-shielded scope (it retries a
    millisecond later), and counts its ``Task.cancel()`` calls so that they can be taken
    back with ``uncancel()`` once the cancellation has been absorbed.
    """

    __slots__ = ("_handle", "count", "once", "task")

    def __init__(self, task: asyncio.Task[Any], once: bool = False) -> None:
        self.task = task
        self.once = once  # stop after the first cancel that is delivered (edge-triggered)
        self.count = 0
        self._handle: asyncio.Handle | None = None

    def start(self) -> None:
        if self._handle is None:
            self._deliver()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def uncancel(self) -> None:
        """Take back every cancellation this object requested (Python 3.11+)."""
        if sys.version_info >= (3, 11):
            for _ in range(self.count):
                self.task.uncancel()
        self.count = 0

    def external(self) -> bool:
        """Did someone else request a cancellation of the task as well?"""
        return sys.version_info >= (3, 11) and self.task.cancelling() > self.count

    def _deliver(self) -> None:
        task = self.task
        loop = task.get_loop()
        if task.done():
            self._handle = None
            return
        if anyio_shielded(task):
            self._handle = loop.call_later(0.001, self._deliver)
            return
        # The same private fields anyio's own cancel scopes read: cancel only a task that
        # waits on something not yet done, so that each cancel lands at an await.
        waiter = task._fut_waiter  # type: ignore[attr-defined]
        if not task._must_cancel and (waiter is None or not waiter.done()):  # type: ignore[attr-defined]
            task.cancel("client disconnected")
            self.count += 1
            if self.once:
                self._handle = None
                return
        self._handle = loop.call_soon(self._deliver)
