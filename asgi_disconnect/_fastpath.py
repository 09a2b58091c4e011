"""The asyncio fast path: ``FastRequest``, the same request run without a task group.

``_request.Request`` runs every request in an anyio task group with the app in a cancel
scope: that is the reference, and the fallback. On asyncio, a task group and a task per
request cost more than the whole budget of the middleware (docs/design.md, "The fast
path"), so ``FastRequest`` replaces the few methods that decide *how* a request runs;
*what* happens (the stages, the channel, send(), the cancel policy) is ``Request``'s.
The unit suite runs against both (``tests/conftest.py``), so each fast-path behaviour
has the reference as its oracle.

Invariants (each is a test in the suite):

1. The app runs in the request's own task. Its first step is driven here, by hand: an
   app that answers without suspending gets no watcher, no callback and no timer.
2. An app that suspends is awaited as ``await app`` would be: the task sees what the
   app yields, the app gets what the task sends or throws, ``close()`` closes it.
3. Its watcher is a task started in the next loop iteration, together with the watchers
   of every request that suspended in the same iteration (one callback per iteration).
   It is cancelled the moment the response is complete or the app returns.
4. The cancellation is ``Task.cancel()`` repeated at every ``await`` until the app
   returns (level-triggered, as anyio's scopes are), never inside an anyio-shielded
   scope (``shield()``, thread-pool calls) nor while the task waits for a thread, and
   only on a wait the task has kept for a whole loop iteration. Every cancel it made is
   taken back (``uncancel()``) when the request ends; a cancel of someone else's is
   never taken for ours.
5. Private fields of asyncio and anyio are read only here, and only if ``_probe()``
   found them as expected at import; otherwise ``ENABLED`` is false and every request
   takes the reference path.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, cast

import anyio

from ._request import COMPLETE, FINISHED, Request
from ._state import Cancellable, Interruption

_task_states: Any = None


def _no_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
    return None


#: ``fast_task(loop)``: the running task of ``loop``, in which a request may take the fast
#: path; always None when the fast path is off.
fast_task: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None] = _no_task


def _probe() -> bool:
    """Are the private internals the fast path reads what it expects? Decided once."""
    global fast_task, _task_states
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
    # A dict lookup, not the Python-level call asyncio.current_task is on 3.11.
    fast_task = table.get if isinstance(table, dict) else asyncio.current_task
    _task_states = states
    return True


#: True when the fast path may run; false: the reference path everywhere.
ENABLED = _probe()

_DONE = object()  # what next() returns for an app that ended at its first step


class FastRequest(Request):
    """``Request`` on asyncio, in the request's own task (see the module's invariants)."""

    __slots__ = ()
    _cancel_handle: asyncio.Handle | None = None  # the grace timer
    _canceller: NativeCanceller | None = None
    _warn_handle: asyncio.TimerHandle | None = None
    _besides: list[asyncio.Task[None]] | None = None  # what _beside() started

    def start(self, awaitable: Awaitable[None]) -> Awaitable[None] | None:
        if type(awaitable) is not types.CoroutineType:
            awaitable = _as_coroutine(awaitable)  # any other awaitable an ASGI callable returns
        # The first step, by hand (invariant 1). next() on the coroutine's iterator returns
        # _DONE, raising nothing, for an app that answered without suspending.
        app = cast("Coroutine[Any, Any, None]", awaitable)
        suspended = next(app.__await__(), _DONE)
        if suspended is _DONE:
            return None
        _batch_for(self._own_task().get_loop()).append(self)
        return _resume(app, suspended)  # natively delegated to from its second step (invariant 2)

    def _own_task(self) -> asyncio.Task[Any]:
        # Looked up at the first need, which always comes in the request's own task: its
        # first step runs there, and other tasks run only once it has suspended (and set this).
        task = self._task
        if task is None:
            task = self._task = fast_task(asyncio.get_running_loop())
            assert task is not None, "the fast path runs only in a task"
        return task

    def _start_watcher(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._stage < COMPLETE:
            self._watcher = loop.create_task(self._open_channel().watch())

    def _cancel_soon(self, delay: float) -> None:
        self._cancel_handle = self._own_task().get_loop().call_later(delay, self._begin_cancel)

    def _begin_cancel(self) -> None:
        self._cancel_handle = None
        task = self._task
        if self._should_cancel() and task is not None:
            self._warn_handle = task.get_loop().call_later(self._options.cancel_warn_after, self._warn_stuck)
            self._canceller = NativeCanceller(task, wanted=self._should_cancel, on_cancel=self._cancelled)
            self._canceller.start()

    def _cancelled(self) -> None:
        self._mark_cancelled()

    def _cancellation(self) -> str | None:
        canceller = self._canceller
        if canceller is None or not canceller.count:
            return None
        return "external" if canceller.external() else "ours"

    def _beside(self, func: Callable[[], Coroutine[Any, Any, None]]) -> Cancellable | None:
        if self._stage == FINISHED:
            return None
        task = self._own_task().get_loop().create_task(func())
        if self._besides is None:
            self._besides = []
        self._besides.append(task)  # stopped with the request, whatever became of its stream
        return task

    def _awaiting(self) -> Any:
        # The task's own coroutine: the server's, which awaits the middleware, which
        # awaits the app (_resume delegates to it with yield from).
        task = self._task
        return task.get_coro() if task is not None else None

    def _interruption(self) -> Interruption:
        loop = asyncio._get_running_loop()
        task = None if loop is None else fast_task(loop)
        return NativeInterruption(task) if task is not None else anyio.CancelScope()

    def _stop(self) -> None:
        # Only for a request that ever needed its task (_own_task): one that suspended or
        # was aborted in its first step. Nothing runs beside the others.
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._cancel_handle is not None:
            self._cancel_handle.cancel()
            self._cancel_handle = None
        if self._canceller is not None:
            self._canceller.stop()
            self._canceller.uncancel()  # ours, absorbed: the task goes on as if never cancelled
            self._canceller = None
            if self._warn_handle is not None:
                self._warn_handle.cancel()
                self._warn_handle = None
        if self._besides is not None:
            for helper in self._besides:
                helper.cancel()
            self._besides = None
        self._task = None


async def _as_coroutine(awaitable: Awaitable[None]) -> None:
    await awaitable


@types.coroutine
def _resume(app: Coroutine[Any, Any, None], suspended: Any) -> Generator[Any, Any, None]:
    """Await ``app``, whose first step yielded ``suspended``, as ``await app`` would have:
    the task gets ``suspended``, and every later step is delegated natively."""
    while True:
        try:
            sent = yield suspended
        except GeneratorExit:
            app.close()
            raise
        except BaseException as exc:  # a cancellation, thrown in where the app waits
            try:
                suspended = app.throw(exc)
            except StopIteration:
                return
            continue
        if sent is None:  # what an asyncio task always sends: plain delegation from here
            yield from app  # types.coroutine lets a generator delegate to a coroutine
            return
        try:
            suspended = app.send(sent)
        except StopIteration:
            return


# -- the watchers of one loop iteration (invariant 3) ---------------------------------------

# Per event loop, like asyncio's own table of current tasks, and shared by every middleware
# instance: one callback per loop iteration, however many instances a server stacks.
_batches: dict[asyncio.AbstractEventLoop, list[FastRequest]] = {}


def _batch_for(loop: asyncio.AbstractEventLoop) -> list[FastRequest]:
    batch = _batches.get(loop)
    if batch is None:
        for stale in [other for other in list(_batches) if other.is_closed()]:
            del _batches[stale]  # its loop closed before its callback ran
        batch = _batches[loop] = []
        loop.call_soon(_start_watchers, loop)
    return batch


def _start_watchers(loop: asyncio.AbstractEventLoop) -> None:
    for request in _batches.pop(loop, ()):
        request._start_watcher(loop)  # which checks that it is still needed


# -- native cancellation (invariant 4) -----------------------------------------------------


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
    Anything unexpected in asyncio's private future fields reads as "no".
    """
    try:
        return _waits_on_thread(task._fut_waiter)  # type: ignore[attr-defined]
    except (AttributeError, IndexError, TypeError, ValueError):
        return False


class NativeCanceller:
    """Cancels an asyncio task at every ``await`` until stopped (or once, ``once=True``).

    Never while the task is inside an anyio-shielded scope or waits for a thread (it
    retries a millisecond later); only on a wait the task has kept for a whole loop
    iteration, so that tasks it has just started (a framework's own disconnect
    listener) run their first step first; and only while ``wanted()`` says so.
    ``count`` is how many ``Task.cancel()`` calls it made, which ``uncancel()`` takes back.
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
        self.once = once
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


class NativeInterruption:
    """``DisconnectState._interruption()`` on asyncio: one ``Task.cancel()`` of the waiting task.

    Once, not level-triggered: the wait is interrupted, and the cleanup that then runs
    (a generator's ``finally``) is not cancelled again. The interruption is swallowed on
    exit and taken back; anyone else's cancellation propagates.
    """

    __slots__ = ("_canceller", "cancelled_caught")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self._canceller = NativeCanceller(task, once=True)
        self.cancelled_caught = False

    def cancel(self) -> None:
        self._canceller.start()

    def __enter__(self) -> NativeInterruption:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        canceller = self._canceller
        canceller.stop()
        ours = canceller.count > 0 and not canceller.external()
        canceller.uncancel()
        if ours and isinstance(exc, asyncio.CancelledError):
            self.cancelled_caught = True
            return True
        return False
