"""Cancellation helpers: ``shield()``, and the asyncio fast path's native cancellation.

The fast path reads private fields of anyio (its per-task cancel-scope stack) and of
asyncio (``Task._fut_waiter``, ``Task._must_cancel``, the current-task table, future
callbacks). Whether the first are what it expects is decided once, at import, by
``_probe()``; ``waits_on_thread()`` reads anything unexpected as "no". If any is missing,
``FAST`` is false and the middleware and ``guard_stream`` take the public anyio path
(an anyio task group and cancel scope per request), slower and equally correct.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio

#: ``current_task(loop)``: the running task of ``loop`` (the fast path's lookup).
current_task: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None] = asyncio.current_task
_task_states: Any = None


def _probe() -> bool:
    """Are the private internals the fast path reads what it expects? Decided once."""
    global current_task, _task_states
    try:
        # Imported here, not at the first cancel: anyio loads its asyncio backend lazily,
        # and that first import (about 20 ms) would otherwise delay the first cancellation.
        from anyio._backends import _asyncio as backend

        states = backend._task_states
        if not callable(getattr(states, "get", None)):
            return False
        if not hasattr(backend.TaskState(None, None), "cancel_scope"):
            return False
        scope = backend.CancelScope()
        if not (hasattr(scope, "_parent_scope") and isinstance(scope.shield, bool)):
            return False
        if not all(hasattr(asyncio.Task, name) for name in ("_fut_waiter", "_must_cancel", "cancelling", "uncancel")):
            return False
    except Exception:  # an ImportError, a renamed class, a changed signature
        return False
    table = getattr(asyncio.tasks, "_current_tasks", None)
    if isinstance(table, dict):
        # A dict lookup, without the Python-level call asyncio.current_task is on 3.11.
        current_task = table.get
    _task_states = states
    return True


#: True when the asyncio fast path may run; false: the public anyio path everywhere.
FAST = _probe()


def _no_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
    return None


if not FAST:
    # No task to cancel natively: the middleware then runs every request in a task group.
    current_task = _no_task


def asyncio_task() -> asyncio.Task[Any] | None:
    """The current task for a native cancellation: None under trio, or without the fast path."""
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

    The fast path cancels a handler with ``Task.cancel()``; this check keeps that
    cancellation out of every shielded scope (``shield()``, Starlette's thread pool
    calls, httpcore's connection cleanup), as anyio's own would.
    """
    state = _task_states.get(task)
    scope = state.cancel_scope if state is not None else None
    while scope is not None:
        if scope.shield:
            return True
        scope = scope._parent_scope
    return False


def _waits_on_thread(waiter: Any, depth: int = 0) -> bool:
    if waiter is None or depth > 4 or waiter.done():
        return False
    if isinstance(waiter, asyncio.Task):  # await task
        return _child_busy(waiter, depth + 1)
    children = getattr(waiter, "_children", None)  # asyncio.gather()
    if children is not None:
        return any(_child_busy(child, depth + 1) for child in children)
    for callback, _context in waiter._callbacks or ():
        name = getattr(callback, "__qualname__", "")
        if name == "_chain_future.<locals>._call_check_cancel":
            return True  # wrap_future(): the result of a concurrent.futures.Future
        if name == "shield.<locals>._outer_done_callback":
            inner = callback.__closure__[callback.__code__.co_freevars.index("inner")].cell_contents
            return _waits_on_thread(inner, depth + 1)
    return False


def _child_busy(child: Any, depth: int) -> bool:
    if not isinstance(child, asyncio.Task):
        return _waits_on_thread(child, depth)
    if child.done():
        return False
    waiter = child._fut_waiter  # type: ignore[attr-defined]
    if waiter is None:
        return False  # runnable after a bare yield: not waiting for anything
    # A child whose wait just ended (its thread answered) is busy until it runs.
    return bool(waiter.done()) or _waits_on_thread(waiter, depth)


def waits_on_thread(task: asyncio.Task[Any]) -> bool:
    """True when ``task`` waits for work in another thread (``run_in_executor``, any wrapped
    ``concurrent.futures.Future``), directly, through ``asyncio.shield()``, an awaited task
    or ``gather()`` (until the task that waited for it has run on).

    Cancelling that wait stops nothing: the thread runs on. anyio's ``to_thread`` and
    asgiref's ``sync_to_async`` (Django) both wait for the thread when cancelled, so the
    fast path holds its cancellation until the thread is done, as it does for a shield.
    It reads asyncio's private future fields; anything unexpected reads as "no".
    """
    try:
        return _waits_on_thread(task._fut_waiter)  # type: ignore[attr-defined]
    except (AttributeError, IndexError, TypeError, ValueError):
        return False


class NativeCanceller:
    """Cancels an asyncio task at every ``await`` until stopped, like an anyio scope would
    (or once, with ``once=True``).

    It never cancels the task while it is inside an anyio-shielded scope or waits for a
    thread (it retries a millisecond later), and counts its ``Task.cancel()`` calls so that they can be taken
    back with ``uncancel()`` once the cancellation has been absorbed. A cancel lands only
    on a wait the task has kept for a whole loop iteration, so that tasks it has just
    started (a framework's own disconnect listener) run their first step before it; and
    only while ``wanted()`` (when given) still says so; ``on_cancel()`` is told of each.
    """

    __slots__ = ("_handle", "_waiter", "count", "on_cancel", "once", "task", "wanted")

    def __init__(
        self,
        task: asyncio.Task[Any],
        once: bool = False,
        wanted: Callable[[], bool] | None = None,
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        self.task = task
        self.once = once  # stop after the first cancel that is delivered (edge-triggered)
        self.wanted = wanted
        self.on_cancel = on_cancel
        self.count = 0
        self._handle: asyncio.Handle | None = None
        self._waiter: Any = self  # the wait seen at the previous check (self: none yet)

    def start(self) -> None:
        if self._handle is None:
            self._deliver()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def uncancel(self) -> None:
        """Take back every cancellation this object requested."""
        for _ in range(self.count):
            self.task.uncancel()
        self.count = 0

    def external(self) -> bool:
        """Did someone else request a cancellation of the task as well?"""
        return self.task.cancelling() > self.count

    def _deliver(self) -> None:
        task = self.task
        loop = task.get_loop()
        if task.done() or (self.wanted is not None and not self.wanted()):
            self._handle = None
            return
        if anyio_shielded(task) or waits_on_thread(task):
            self._waiter = self
            self._handle = loop.call_later(0.001, self._deliver)
            return
        # The same private fields anyio's own cancel scopes read: cancel only a task that
        # waits on something not yet done, so that each cancel lands at an await.
        waiter = task._fut_waiter  # type: ignore[attr-defined]
        if not task._must_cancel and (waiter is None or not waiter.done()):  # type: ignore[attr-defined]
            if waiter is self._waiter:
                self._waiter = self
                task.cancel("client disconnected")
                self.count += 1
                if self.on_cancel is not None:
                    self.on_cancel()
                if self.once:
                    self._handle = None
                    return
            else:
                self._waiter = waiter  # a new wait: give the loop one turn first
        self._handle = loop.call_soon(self._deliver)
