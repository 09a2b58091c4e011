"""Cancel mode: cancellation after an early disconnect, grace, per-request policy, shield()."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from asgi_disconnect import DisconnectMiddleware, DisconnectState, disconnect_state, shield
from asgi_disconnect._fastpath import anyio_shielded
from asgi_disconnect._types import Receive, Scope, Send
from tests.peer import Peer, abort_after, http_scope

pytestmark = pytest.mark.anyio


async def test_handler_is_cancelled_when_the_client_leaves() -> None:
    """A handler stuck on a long await is cancelled: its finally runs, nothing escapes."""
    events: list[str] = []
    states: list[DisconnectState] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        states.append(disconnect_state(scope))
        try:
            await anyio.sleep(30)
            events.append("finished")  # pragma: no cover - the point is it never gets here
        finally:
            events.append("finally")

    started = time.monotonic()
    with capture_logs() as logs:
        await abort_after(DisconnectMiddleware(app, cancel=True), Peer())
    assert time.monotonic() - started < 2
    assert events == ["finally"]
    assert states[0].cancelled is True
    assert [(e["event"], e["cancelled"]) for e in logs] == [("request_aborted", True)]


async def test_observe_mode_never_cancels() -> None:
    """Without cancel mode the handler runs to its end and sees the flag."""
    seen: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(0.3)
        seen.append(disconnect_state(scope).disconnected)

    await abort_after(DisconnectMiddleware(app), Peer())
    assert seen == [True]


async def test_grace_lets_cooperative_code_stop_itself() -> None:
    """During the grace period the flag is set and a handler that checks it is not cancelled."""
    states: list[DisconnectState] = []
    steps: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        state = disconnect_state(scope)
        states.append(state)
        for step in range(100):
            if state.disconnected:
                steps.append(step)
                await anyio.sleep(0.05)  # finishing touches, still inside the grace period
                return
            await anyio.sleep(0.01)

    await abort_after(DisconnectMiddleware(app, cancel=True, grace=0.5), Peer())
    assert steps and steps[0] < 50
    assert states[0].disconnected is True and states[0].cancelled is False


async def test_cancellation_lands_after_the_grace_period() -> None:
    """A handler that ignores the flag is cancelled once the grace period is over."""
    timings: list[float] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        state = disconnect_state(scope)
        try:
            await anyio.sleep(30)
        finally:
            assert state.detected_at is not None
            timings.append(time.monotonic() - state.detected_at)

    await abort_after(DisconnectMiddleware(app, cancel=True, grace=0.3), Peer())
    assert 0.25 <= timings[0] < 2


async def test_a_handler_may_switch_cancellation_on() -> None:
    """state.cancel = True in a handler turns cancellation on for that request only."""
    events: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        disconnect_state(scope).cancel = True
        try:
            await anyio.sleep(30)
        finally:
            events.append("cancelled")

    await abort_after(DisconnectMiddleware(app), Peer())
    assert events == ["cancelled"]


async def test_a_handler_may_switch_cancellation_off() -> None:
    """state.cancel = False protects one request; the policy is read at the disconnect."""
    events: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        disconnect_state(scope).cancel = False
        await anyio.sleep(0.3)
        events.append("completed")

    await abort_after(DisconnectMiddleware(app, cancel=True), Peer())
    assert events == ["completed"]


async def test_excluded_paths_are_never_cancelled() -> None:
    """cancel_exclude path prefixes run to completion, other paths are cancelled."""
    events: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await anyio.sleep(0.3)
            events.append(f"completed {scope['path']}")
        finally:
            events.append(f"end {scope['path']}")

    middleware = DisconnectMiddleware(app, cancel=True, cancel_exclude=["/webhooks/"])
    await abort_after(middleware, Peer(), path="/webhooks/stripe")
    await abort_after(middleware, Peer(), path="/report")
    assert events == ["completed /webhooks/stripe", "end /webhooks/stripe", "end /report"]


async def test_shield_finishes_the_section_and_cancellation_lands_right_after() -> None:
    """A commit inside shield() completes; the next await after it is cancelled."""
    events: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with shield():
                await anyio.sleep(0.3)  # COMMIT; the client leaves meanwhile
                events.append("committed")
            await anyio.sleep(30)
            events.append("after")  # pragma: no cover - the point is it never gets here
        finally:
            events.append("finally")

    started = time.monotonic()
    await abort_after(DisconnectMiddleware(app, cancel=True), Peer())
    assert events == ["committed", "finally"]
    assert time.monotonic() - started < 2


async def test_cancellation_is_level_triggered_but_shielded_cleanup_completes() -> None:
    """After the cancel every unshielded await is cancelled too; shielded cleanup runs whole."""
    events: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await anyio.sleep(30)
        finally:
            try:
                await anyio.sleep(1)  # an unshielded rollback: cancelled as well
                events.append("unshielded cleanup done")  # pragma: no cover
            except anyio.get_cancelled_exc_class():
                events.append("unshielded cleanup cancelled")
            with shield():
                await anyio.sleep(0.05)
                events.append("shielded cleanup done")

    await abort_after(DisconnectMiddleware(app, cancel=True), Peer())
    assert events == ["unshielded cleanup cancelled", "shielded cleanup done"]


async def test_competing_completion_paths_run_cleanup_exactly_once() -> None:
    """The handler breaking out on the flag while the middleware cancels: one cleanup, whole."""
    cleanups: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        state = disconnect_state(scope)
        try:
            for _ in range(5000):  # at most 5 s
                if state.disconnected:
                    break
                await anyio.sleep(0.001)
        finally:
            with shield():
                await anyio.sleep(0.05)  # release the connection, close the upstream stream
                cleanups.append("released")

    for _ in range(10):
        await abort_after(DisconnectMiddleware(app, cancel=True), Peer(), delay=0.01)
    assert cleanups == ["released"] * 10


async def test_a_handler_that_cannot_be_stopped_is_reported_once() -> None:
    """A handler that swallows cancellation gets one warning naming its path."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            try:
                await anyio.sleep(0.02)
            except anyio.get_cancelled_exc_class():
                pass  # the library that eats cancellations

    with capture_logs() as logs:
        await abort_after(DisconnectMiddleware(app, cancel=True, cancel_warn_after=0.2), Peer(), path="/stuck")
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["event"] == "handler_still_running"
    assert warnings[0]["path"] == "/stuck"


async def test_a_sync_handler_in_a_thread_is_waited_for_and_reported() -> None:
    """A sync endpoint in the thread pool cannot be cancelled: it is reported, not abandoned."""
    finished: list[str] = []

    def blocking(request: Request) -> PlainTextResponse:
        time.sleep(0.5)
        finished.append("thread done")
        return PlainTextResponse("late")

    app = Starlette(routes=[Route("/sync", blocking)])
    with capture_logs() as logs:
        await abort_after(DisconnectMiddleware(app, cancel=True, cancel_warn_after=0.2), Peer(), path="/sync")
    # The middleware returned only after the thread: the thread limiter's count stays true.
    assert finished == ["thread done"]
    assert [e["path"] for e in logs if e["log_level"] == "warning"] == ["/sync"]


async def test_streaming_background_task_runs_after_an_abort() -> None:
    """Starlette stops the aborted stream itself and still runs its background task."""
    audit: list[str] = []

    async def tokens() -> AsyncIterator[bytes]:
        try:
            for i in range(1000):
                yield f"token {i}\n".encode()
                await anyio.sleep(0.01)
        finally:
            audit.append("stream closed")

    async def record() -> None:
        await anyio.sleep(0.1)
        audit.append("audit logged")

    async def endpoint(request: Request) -> StreamingResponse:
        return StreamingResponse(tokens(), background=BackgroundTask(record))

    app = Starlette(routes=[Route("/", endpoint)])
    await abort_after(DisconnectMiddleware(app, cancel=True), Peer(), delay=0.1)
    assert audit == ["stream closed", "audit logged"]


async def test_background_task_after_a_complete_response_is_never_cancelled() -> None:
    """A disconnect while a background task runs after the response cancels nothing."""
    done: list[str] = []
    peer = Peer()

    async def job() -> None:
        peer.disconnect()
        await anyio.sleep(0.2)
        done.append("background done")

    async def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok", background=BackgroundTask(job))

    app = Starlette(routes=[Route("/", endpoint)])
    states: list[DisconnectState] = []

    async def spy(scope: Scope, receive: Receive, send: Send) -> None:
        states.append(disconnect_state(scope))
        await app(scope, receive, send)

    await DisconnectMiddleware(spy, cancel=True)(http_scope(), peer.receive, peer.send)
    assert done == ["background done"]
    assert states[0].disconnected is False and states[0].cancelled is False


async def test_cancel_options_are_validated() -> None:
    """A bare string for cancel_exclude and a non-positive warning delay are refused."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("never called")

    with pytest.raises(TypeError, match="sequence of path prefixes"):
        DisconnectMiddleware(app, cancel_exclude="/health")
    with pytest.raises(ValueError, match="cancel_warn_after"):
        DisconnectMiddleware(app, cancel_warn_after=0)


# -- asyncio specifics -----------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_request_task_is_left_uncancelled() -> None:
    """After absorbing its own cancellation the middleware leaves task.cancelling() at 0."""
    counts: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(30)

    async def request() -> None:
        await abort_after(DisconnectMiddleware(app, cancel=True), Peer())
        task = asyncio.current_task()
        assert task is not None
        counts.append(task.cancelling())

    await asyncio.create_task(request())
    assert counts == [0]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_outside_cancellation_still_propagates() -> None:
    """A server's own Task.cancel() during an aborted request is not swallowed."""
    peer = Peer()
    entered = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        entered.set()
        try:
            await anyio.sleep(30)
        finally:
            with shield():
                await anyio.sleep(0.1)  # the outside cancel arrives while this runs

    task = asyncio.create_task(DisconnectMiddleware(app, cancel=True)(http_scope(), peer.receive, peer.send))
    await entered.wait()
    peer.disconnect()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.fast_path
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_anyio_shield_detection_reads_anyio_internals() -> None:
    """anyio_shielded() sees shielded scopes, also below unshielded ones (guards anyio upgrades)."""
    task = asyncio.current_task()
    assert task is not None
    assert anyio_shielded(task) is False
    with anyio.CancelScope():  # noqa: ASYNC100 - the scope stack is what is tested
        assert anyio_shielded(task) is False
        with shield():
            assert anyio_shielded(task) is True
            with anyio.CancelScope():  # noqa: ASYNC100
                assert anyio_shielded(task) is True
        assert anyio_shielded(task) is False


@pytest.mark.fast_path
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("how", ["direct", "shield", "gather", "gathered task", "awaited task"])
async def test_a_wait_for_a_worker_thread_is_not_cancelled(how: str) -> None:
    """The cancellation waits while the handler waits for a thread (it cannot stop one), then lands."""
    peer = Peer()
    events: list[object] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()

        def blocking() -> str:
            loop.call_soon_threadsafe(peer.disconnect)
            time.sleep(0.1)
            return "thread done"

        work: Any = loop.run_in_executor(None, blocking)
        if how == "shield":
            work = asyncio.shield(work)  # asgiref's sync_to_async (Django)
        elif how == "gather":
            work = asyncio.gather(work)
        elif how == "gathered task":
            thread = work

            async def in_a_task() -> str:
                return str(await asyncio.shield(thread))

            work = asyncio.gather(in_a_task())  # Django's Signal.asend of a sync_to_async receiver
        elif how == "awaited task":
            work = asyncio.ensure_future(asyncio.shield(work))
        events.append(await work)
        try:
            await anyio.sleep(5)
        except asyncio.CancelledError:
            events.append("cancelled at the next await")
            raise

    with anyio.fail_after(3):
        await DisconnectMiddleware(app, cancel=True)(http_scope(), peer.receive, peer.send)
    done = ["thread done"] if how.startswith("gather") else "thread done"
    assert events == [done, "cancelled at the next await"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_gathered_task_that_only_yields_is_cancelled() -> None:
    """A gathered child busy with bare yields (no thread) does not hold the cancellation back."""
    peer = Peer()
    spins: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def spin() -> None:
            for n in range(5000):  # at most about 5 s
                spins.append(n)
                await asyncio.sleep(0 if n % 2 else 0.001)

        peer.disconnect()
        await asyncio.gather(spin())

    with anyio.fail_after(3):
        await DisconnectMiddleware(app, cancel=True)(http_scope(), peer.receive, peer.send)
    assert len(spins) < 1000
