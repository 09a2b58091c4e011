"""``asgi_disconnect.fastapi.Disconnect`` in the FastAPI patterns users write, on a real uvicorn.

Each app is served by ``asgi_disconnect.testing``'s ``serve()`` (uvicorn, asyncio) and its
client is a raw socket that leaves where a real one would (``live.request(leave=...)``):
a streaming LLM proxy, FastAPI's own ``EventSourceResponse``, a ``yield`` dependency that
holds a SQLAlchemy session (aiosqlite, a file in tmp_path) and ``BackgroundTasks``. Each
test asserts what the user sees: what the client got, what the handler did after its
client left, what the database holds afterwards, the events logged. No time is asserted
except as a generous bound. README.md's "FastAPI" section quotes these apps.

No ``from __future__ import annotations``: FastAPI reads the annotations of the path
operations and dependencies defined inside the tests, which a string cannot name.
"""

import contextlib
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import pytest
from db_transactions import QUIET, create_table, order_parts, parts_per_order, place_order
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from fastapi.sse import EventSourceResponse
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import QueuePool

from asgi_disconnect import DisconnectMiddleware, DisconnectState, disconnect_state, guard_stream, shield
from asgi_disconnect.fastapi import Disconnect
from asgi_disconnect.pytest_plugin import CapturedEvents
from asgi_disconnect.testing import leave, serve

pytestmark = pytest.mark.anyio

MODES = pytest.mark.parametrize("cancel", [False, True], ids=["observe", "cancel"])
TOKEN_EVERY = 0.005  # the fake model makes a token every 5 ms
MAX_TOKENS = 2000  # 10 s of tokens: every test fails long before, if nothing stops them
WITHIN_MS = 1000  # a generous bound on the handler's return after the client left
TIMEOUT = 5.0  # live.request()'s bound on a handler that never stops


@pytest.fixture
def anyio_backend() -> str:
    """Real servers run on asyncio only (uvicorn)."""
    return "asyncio"


def fastapi_app(*, cancel: bool = False, middleware: bool = True) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    if middleware:
        app.add_middleware(DisconnectMiddleware, cancel=cancel)
    return app


def aborts(events: CapturedEvents) -> list[dict[str, Any]]:
    return [dict(event) for event in events if event["event"] == "request_aborted"]


# -- a streaming LLM proxy ----------------------------------------------------------------


class FakeLLM:
    """An upstream model: a token every TOKEN_EVERY seconds, each one billed when it is made."""

    def __init__(self) -> None:
        self.generated: list[float] = []  # time.monotonic() of each token made
        self.closed_at: float | None = None  # when its finally ran (the upstream call closed)
        self.state: DisconnectState | None = None  # what the path operation was given

    async def tokens(self) -> AsyncGenerator[bytes]:
        try:
            for i in range(MAX_TOKENS):
                await anyio.sleep(TOKEN_EVERY)  # the model computes the next token
                self.generated.append(time.monotonic())
                yield f"data: tok{i}\n\n".encode()
        finally:
            self.closed_at = time.monotonic()

    def made_after(self, moment: float) -> int:
        return sum(1 for t in self.generated if t > moment)


@pytest.mark.server
@MODES
async def test_llm_proxy_stops_the_upstream_when_the_client_leaves(
    cancel: bool, disconnect_events: CapturedEvents
) -> None:
    """A client that leaves after two tokens: the upstream is closed, and made at most one token more."""
    llm = FakeLLM()
    app = fastapi_app(cancel=cancel)

    @app.get("/chat")
    async def chat(request: Request, state: Disconnect) -> StreamingResponse:
        llm.state = state
        return StreamingResponse(guard_stream(llm.tokens(), request.scope), media_type="text/event-stream")

    async with serve(app, server="uvicorn") as live:
        outcome = await live.request(path="/chat", leave=leave.after_chunks(2))

    outcome.assert_aborted(phase="mid_body", within_ms=WITHIN_MS)
    assert outcome.status == 200
    assert outcome.chunks[:2] == [b"data: tok0\n\n", b"data: tok1\n\n"]
    assert outcome.state is llm.state and llm.state is not None
    assert llm.state.phase == "mid_body"
    assert outcome.left_at is not None and llm.closed_at is not None, "the upstream was never closed"
    assert llm.made_after(outcome.left_at) <= 1, f"{llm.made_after(outcome.left_at)} tokens made for nobody"
    assert len(llm.generated) < 20  # of MAX_TOKENS
    (event,) = aborts(disconnect_events)
    assert event["phase"] == "mid_body" and event["route"] == "/chat"
    assert outcome.app_returned_after_ms is not None
    print(
        f"llm proxy ({'cancel' if cancel else 'observe'}): {len(llm.generated)} tokens made, "
        f"{llm.made_after(outcome.left_at)} after the client left, upstream closed "
        f"{(llm.closed_at - outcome.left_at) * 1000:.1f} ms after it, handler returned "
        f"{outcome.app_returned_after_ms:.1f} ms after it"
    )


# -- FastAPI's EventSourceResponse ----------------------------------------------------------


@pytest.mark.server
@MODES
@pytest.mark.parametrize("feed", ["guard_stream", "checks-state"])
async def test_event_source_response_stops_after_the_client_leaves(
    cancel: bool, feed: str, disconnect_events: CapturedEvents
) -> None:
    """FastAPI's SSE path operation, over guard_stream or checking state.disconnected: it stops, its finally runs."""
    llm = FakeLLM()
    app = fastapi_app(cancel=cancel)
    finished: list[str] = []

    @app.get("/events", response_class=EventSourceResponse)
    async def events(request: Request, state: Disconnect) -> AsyncIterator[dict[str, int]]:
        llm.state = state
        try:
            if feed == "guard_stream":
                async for token in guard_stream(llm.tokens(), request.scope):
                    yield {"token": int(token[len(b"data: tok") :])}
            else:
                async with contextlib.aclosing(llm.tokens()) as tokens:
                    async for token in tokens:
                        if state.disconnected:
                            break
                        yield {"token": int(token[len(b"data: tok") :])}
        finally:
            # Once the response is over FastAPI cancels the task that runs this generator,
            # level-triggered: an await here (saving the partial answer) needs shield().
            with shield():
                await anyio.sleep(0.01)
                finished.append("partial answer saved")

    async with serve(app, server="uvicorn") as live:
        outcome = await live.request(path="/events", leave=leave.after_chunks(2))

    outcome.assert_aborted(phase="mid_body", within_ms=WITHIN_MS)
    assert outcome.status == 200
    assert outcome.chunks[:2] == [b'data: {"token":0}\n\n', b'data: {"token":1}\n\n']
    assert outcome.state is llm.state and llm.state is not None
    assert finished == ["partial answer saved"]
    assert outcome.left_at is not None and llm.closed_at is not None, "the upstream was never closed"
    # FastAPI runs the generator in a producer task one event ahead of the response: one
    # token made before the departure may be waiting there, and at most one more is made.
    assert llm.made_after(outcome.left_at) <= 1, f"{llm.made_after(outcome.left_at)} tokens made for nobody"
    assert len(llm.generated) < 20
    (event,) = aborts(disconnect_events)
    assert event["phase"] == "mid_body" and event["route"] == "/events"
    print(
        f"sse {feed} ({'cancel' if cancel else 'observe'}): {len(llm.generated)} tokens made, "
        f"{llm.made_after(outcome.left_at)} after the client left, closed "
        f"{(llm.closed_at - outcome.left_at) * 1000:.1f} ms after it"
    )


# -- a yield dependency that holds a database session -----------------------------------------

PARTS = 5  # rows per order, each followed by slow work
WORK = 0.05  # seconds of slow work after each row: the order takes 0.25 s
LEAVE_AFTER = 0.08  # the client gives up during the second row's work


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'orders.db'}")
    try:
        await create_table(engine)
        yield engine
    finally:
        await engine.dispose()


def orders_app(engine: AsyncEngine, *, cancel: bool, log: list[str]) -> FastAPI:
    """POST /orders/{id} writes PARTS rows slowly in one transaction of a session from a yield dependency."""
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def get_session() -> AsyncIterator[AsyncSession]:
        session = sessions()
        try:
            yield session
        except BaseException as exc:
            # In cancel mode the middleware's cancellation arrives here, and it is
            # level-triggered: an unshielded ROLLBACK or close would be cancelled too.
            with shield():
                await session.rollback()
            log.append(f"rolled back: {type(exc).__name__}")
            raise
        finally:
            with shield():
                await session.close()
            log.append("session closed")

    Session = Annotated[AsyncSession, Depends(get_session)]
    app = fastapi_app(cancel=cancel)

    @app.post("/orders/{order_id}", status_code=201)
    async def create_order(order_id: int, session: Session, state: Disconnect) -> dict[str, int]:
        for part in range(PARTS):
            await session.execute(order_parts.insert().values(order_id=order_id, part=part))
            await anyio.sleep(WORK)  # a payment check, an upstream call...
            if state.disconnected:  # observe mode: nobody will read the answer, undo the order
                raise HTTPException(status_code=499, detail="client closed request")
        with shield():
            await session.commit()
        return {"order": order_id, "parts": PARTS}

    return app


@pytest.mark.server
@MODES
async def test_yield_dependency_session_rolls_back_when_the_client_leaves(
    engine: AsyncEngine, cancel: bool, disconnect_events: CapturedEvents
) -> None:
    """The client leaves mid-transaction: no row committed, the session closed, the pool whole and unlocked."""
    log: list[str] = []
    async with serve(orders_app(engine, cancel=cancel, log=log), server="uvicorn") as live:
        aborted = await live.request(
            method="POST", path="/orders/1", leave=leave.before_response(after=LEAVE_AFTER), timeout=TIMEOUT
        )
        stayed = await live.request(method="POST", path="/orders/2", timeout=TIMEOUT)
        # SQLAlchemy closes a connection that a cancellation cut off mid-statement in a task
        # of its own; aiosqlite's loop shutdown hangs on it without this pause (db_transactions.py).
        await anyio.sleep(QUIET)

    aborted.assert_aborted(phase="before_response", within_ms=WITHIN_MS)
    assert aborted.state is not None and aborted.state.cancelled is cancel
    stayed.assert_completed()
    assert stayed.status == 201 and stayed.body == b'{"order":2,"parts":5}'
    why = "CancelledError" if cancel else "HTTPException"
    assert log == [f"rolled back: {why}", "session closed", "session closed"]
    assert await parts_per_order(engine) == {2: PARTS}  # nothing of order 1
    pool = engine.pool
    assert isinstance(pool, QueuePool) and pool.checkedout() == 0
    # No lock left behind: an open transaction would block this write ("database is locked").
    with anyio.fail_after(10):
        await place_order(engine, 3, [])
    assert (await parts_per_order(engine))[3] == 2
    (event,) = aborts(disconnect_events)
    assert event["route"] == "/orders/{order_id}" and event["cancelled"] is cancel
    assert aborted.app_returned_after_ms is not None
    print(
        f"db session ({'cancel' if cancel else 'observe'}): {log[0]}, handler returned "
        f"{aborted.app_returned_after_ms:.1f} ms after the client left"
    )


# -- BackgroundTasks ---------------------------------------------------------------------------

STEPS = 10  # the background job's awaits
STEP = 0.02


@pytest.mark.server
@MODES
async def test_background_task_runs_to_the_end_after_the_client_left(
    cancel: bool, disconnect_events: CapturedEvents
) -> None:
    """A client that leaves right after the whole response: the background task finishes, nothing is aborted."""
    job: dict[str, Any] = {"steps": 0, "cancelled": False, "finished_at": None}
    states: list[DisconnectState] = []

    async def send_receipt(order_id: int) -> None:
        try:
            for _ in range(STEPS):
                await anyio.sleep(STEP)  # an email, an audit write: awaits after the response
                job["steps"] += 1
        except BaseException:
            job["cancelled"] = True
            raise
        job["finished_at"] = time.monotonic()

    app = fastapi_app(cancel=cancel)

    @app.post("/orders/{order_id}")
    async def create_order(order_id: int, background_tasks: BackgroundTasks, state: Disconnect) -> PlainTextResponse:
        states.append(state)
        background_tasks.add_task(send_receipt, order_id)
        return PlainTextResponse(f"order {order_id} placed")

    body = b"order 7 placed"
    async with serve(app, server="uvicorn") as live:
        # The client closes its socket the moment it has the whole body, while the job runs.
        outcome = await live.request(method="POST", path="/orders/7", leave=leave.after_bytes(len(body)))

    assert outcome.status == 200 and outcome.body == body
    assert outcome.left_at is not None and job["finished_at"] is not None
    assert outcome.left_at < job["finished_at"], "the client left only after the job: nothing proven"
    assert job == {"steps": STEPS, "cancelled": False, "finished_at": job["finished_at"]}
    assert outcome.state is states[0]
    assert not outcome.state.disconnected and not outcome.state.cancelled
    assert outcome.exception is None and outcome.tracebacks == []
    assert aborts(disconnect_events) == []
    print(
        f"background task ({'cancel' if cancel else 'observe'}): client left, then the job ran "
        f"{(job['finished_at'] - outcome.left_at) * 1000:.0f} ms more, {job['steps']}/{STEPS} steps"
    )


# -- the dependency itself --------------------------------------------------------------------


@pytest.mark.server
async def test_a_dependency_gets_the_same_state_and_can_switch_the_request_to_cancel_mode(
    disconnect_events: CapturedEvents,
) -> None:
    """``state: Disconnect`` in a dependency is the path operation's state: setting ``cancel`` there takes effect."""
    seen: list[tuple[str, DisconnectState]] = []
    ran: list[int] = []

    async def cancellable(state: Disconnect) -> None:
        seen.append(("dependency", state))
        state.cancel = True  # this route is safe to cancel; the app observes elsewhere

    app = fastapi_app(cancel=False)

    @app.get("/report", dependencies=[Depends(cancellable)])
    async def report(request: Request, state: Disconnect) -> dict[str, int]:
        seen.append(("path operation", state))
        seen.append(("disconnect_state", disconnect_state(request.scope)))
        for step in range(100):  # 5 s of work that never looks at the state
            await anyio.sleep(0.05)
            ran.append(step)
        return {"steps": len(ran)}

    async with serve(app, server="uvicorn") as live:
        outcome = await live.request(path="/report", leave=leave.before_response(after=0.1))

    outcome.assert_aborted(phase="before_response", within_ms=WITHIN_MS)
    assert [where for where, _ in seen] == ["dependency", "path operation", "disconnect_state"]
    assert all(state is outcome.state for _, state in seen)
    assert outcome.state is not None and outcome.state.cancelled
    assert len(ran) < 50  # cancelled, not run to the end
    (event,) = aborts(disconnect_events)
    assert event["cancelled"] is True and event["route"] == "/report"


@pytest.mark.server
async def test_without_the_middleware_the_request_fails_with_a_500_that_says_how_to_install_it() -> None:
    """No DisconnectMiddleware: the client gets FastAPI's 500, the server logs the LookupError naming the fix."""
    app = fastapi_app(middleware=False)

    @app.get("/report")
    async def report(state: Disconnect) -> dict[str, bool]:
        raise AssertionError("never called")

    async with serve(app, server="uvicorn") as live:
        outcome = await live.request(path="/report")

    assert outcome.status == 500 and outcome.body == b"Internal Server Error"
    assert outcome.state is None
    assert isinstance(outcome.exception, LookupError)
    assert "install DisconnectMiddleware in front of your app" in str(outcome.exception)
    assert "app.add_middleware(DisconnectMiddleware)" in str(outcome.exception)
    (line,) = outcome.tracebacks
    assert line.logger == "uvicorn.error" and line.traceback is not None
    assert "LookupError: no DisconnectState in the ASGI scope" in line.traceback
    assert "DisconnectMiddleware" in line.traceback


def test_disconnect_is_not_a_parameter_of_the_openapi_schema() -> None:
    """``state: Disconnect`` adds no query or body parameter to the route's OpenAPI operation."""
    app = FastAPI()
    app.add_middleware(DisconnectMiddleware)

    @app.get("/items/{item_id}")
    async def item(item_id: int, state: Disconnect) -> dict[str, int]:
        return {"item_id": item_id}

    operation = app.openapi()["paths"]["/items/{item_id}"]["get"]
    assert [parameter["name"] for parameter in operation["parameters"]] == ["item_id"]
    assert "requestBody" not in operation


def test_importing_it_without_fastapi_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without FastAPI, importing asgi_disconnect.fastapi raises an ImportError naming ``pip install fastapi``."""
    monkeypatch.delitem(sys.modules, "asgi_disconnect.fastapi")
    monkeypatch.setitem(sys.modules, "fastapi", None)  # what an uninstalled package imports as
    with pytest.raises(ImportError, match="pip install fastapi"):
        import asgi_disconnect.fastapi  # noqa: F401
