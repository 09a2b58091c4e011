"""Aborted requests as data: the ``request_aborted`` event, ``state.record``, the hooks.

The fields are checked on a real uvicorn with clients that leave from raw sockets, in
Starlette, FastAPI and Litestar apps (their route templates); what needs a server that
misbehaves on purpose (a send that blocks, one that raises) runs in process. How the
event reaches an app that configured structlog, only the standard library's logging, or
neither, is checked in fresh interpreters, where nothing of pytest's logging is set up.
"""

from __future__ import annotations

import errno
import json
import logging
import subprocess
import sys
import textwrap
from typing import Any

import anyio
import pytest
import structlog
from litestar import Litestar, get
from litestar import Request as LitestarRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from structlog.testing import capture_logs
from structlog.typing import EventDict

from asgi_disconnect import ClientDisconnected, DisconnectMiddleware, DisconnectState, RequestRecord, disconnect_state
from asgi_disconnect._types import Message, Receive, Scope, Send
from asgi_disconnect.testing import leave, serve, simulate

from .peer import Peer, abort_after, http_scope

pytestmark = pytest.mark.anyio

CHUNK = b"x" * 100
START: Message = {"type": "http.response.start", "status": 200, "headers": []}
# What the event carries, always and only (``client`` only with log_client=True).
FIELDS = {
    "method",
    "path",
    "route",
    "phase",
    "detected_by",
    "status",
    "bytes_sent",
    "chunks_sent",
    "bytes_received",
    "detected_after_ms",
    "cleanup_ms",
    "duration_ms",
    "cancelled",
    "request_id",
}


async def wait_for_departure(request: Request) -> PlainTextResponse:
    await disconnect_state(request.scope).wait()
    return PlainTextResponse("too late")


async def upload(request: Request) -> PlainTextResponse:
    await request.body()
    await disconnect_state(request.scope).wait()
    return PlainTextResponse("too late")


class TwoChunksThenWait:
    """A raw ASGI endpoint: two chunks, then it waits for the client to go."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        for _ in range(2):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await disconnect_state(scope).wait()


def starlette_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/items/{item_id}", wait_for_departure),
            Route("/upload/{name}", upload, methods=["POST"]),
            Route("/stream/{n:int}", TwoChunksThenWait()),
            Route("/done", lambda request: PlainTextResponse("done")),
        ]
    )


def events_named(logs: list[EventDict], name: str) -> list[EventDict]:
    return [log for log in logs if log["event"] == name]


def fields_of(event: EventDict) -> dict[str, Any]:
    return {key: value for key, value in event.items() if key not in ("event", "logger", "log_level")}


# uvicorn runs on asyncio only; the in-process tests run on every backend.
ON_UVICORN = [pytest.mark.server, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


def on_uvicorn(test: Any) -> Any:
    for mark in reversed(ON_UVICORN):
        test = mark(test)
    return test


@on_uvicorn
@pytest.mark.parametrize("cancel", [False, True], ids=["observe", "cancel"])
async def test_a_departure_before_the_response_is_one_event_with_every_field(cancel: bool) -> None:
    """The event names the route template, never the query string or the client; the record is the same."""
    records: list[RequestRecord] = []

    def hook(scope: Scope, state: DisconnectState) -> None:
        assert state.record is not None
        records.append(state.record)

    app = DisconnectMiddleware(starlette_app(), cancel=cancel, on_disconnect=hook)
    with capture_logs() as logs:
        async with serve(app) as live:
            outcome = await live.request(
                path="/items/42?token=secret",
                headers=[("x-request-id", "req-7"), ("authorization", "Bearer hidden")],
                leave=leave.before_response(after=0.05),
            )
    outcome.assert_aborted(phase="before_response")
    (event,) = events_named(logs, "request_aborted")
    assert event["log_level"] == "info" and event["logger"] == "asgi_disconnect"
    assert set(fields_of(event)) == FIELDS
    assert fields_of(event) == records[0].as_dict()  # the hook's record is the event
    assert {key: event[key] for key in ("method", "path", "route", "phase", "detected_by", "status")} == {
        "method": "GET",
        "path": "/items/42",
        "route": "/items/{item_id}",
        "phase": "before_response",
        "detected_by": "http.disconnect",
        "status": None,
    }
    assert (event["bytes_sent"], event["chunks_sent"], event["bytes_received"]) == (0, 0, 0)
    assert event["request_id"] == "req-7"
    # The client left 50 ms after the toolkit called the app; the middleware inside it took
    # its arrival time a moment later (about a millisecond on a loaded machine).
    assert 40 <= event["detected_after_ms"] <= event["duration_ms"]
    assert event["cleanup_ms"] >= 0
    assert event["duration_ms"] >= event["detected_after_ms"] + event["cleanup_ms"] - 0.01
    assert event["cancelled"] is False  # it returned at once: there was nothing to cancel
    text = json.dumps(event)
    assert "secret" not in text and "hidden" not in text and "127.0.0.1" not in text


@on_uvicorn
async def test_a_departure_mid_body_counts_what_the_server_took() -> None:
    """Status, bytes and chunks the server accepted; a raw ASGI endpoint still has its route template."""
    with capture_logs() as logs:
        async with serve(DisconnectMiddleware(starlette_app())) as live:
            outcome = await live.request(path="/stream/3", leave=leave.after_chunks(2))
    outcome.assert_aborted(phase="mid_body")
    (event,) = events_named(logs, "request_aborted")
    assert (event["route"], event["phase"], event["status"]) == ("/stream/{n:int}", "mid_body", 200)
    assert (event["bytes_sent"], event["chunks_sent"]) == (2 * len(CHUNK), 2)
    assert outcome.body == 2 * CHUNK


@on_uvicorn
async def test_a_departure_after_an_upload_counts_the_request_bytes() -> None:
    """The request body bytes the server delivered are in the event."""
    body = b"u" * 1000
    with capture_logs() as logs:
        async with serve(DisconnectMiddleware(starlette_app())) as live:
            outcome = await live.request(method="POST", path="/upload/a", body=body, leave=leave.before_response(0.05))
    outcome.assert_aborted(phase="before_response")
    (event,) = events_named(logs, "request_aborted")
    assert (event["method"], event["route"], event["bytes_received"]) == ("POST", "/upload/{name}", 1000)


@on_uvicorn
async def test_litestar_and_fastapi_record_their_route_templates() -> None:
    """Litestar's path template and FastAPI's path operation template are the event's route."""
    from fastapi import FastAPI

    @get("/users/{user_id:int}")
    async def user(request: LitestarRequest[Any, Any, Any]) -> str:
        await disconnect_state(request.scope).wait()
        return "too late"

    fastapi = FastAPI()

    @fastapi.get("/orders/{order_id}")
    async def order(order_id: str, request: Request) -> str:
        await disconnect_state(request.scope).wait()
        return "too late"

    routes = []
    for app, path in ((Litestar([user], middleware=[DisconnectMiddleware]), "/users/5"), (fastapi, "/orders/9")):
        wrapped = app if isinstance(app, Litestar) else DisconnectMiddleware(app)
        with capture_logs() as logs:
            async with serve(wrapped) as live:
                (await live.request(path=path, leave=leave.before_response(0.05))).assert_aborted()
        routes += [event["route"] for event in events_named(logs, "request_aborted")]
    assert routes == ["/users/{user_id}", "/orders/{order_id}"]


@on_uvicorn
@pytest.mark.parametrize("installed", ["around", "add_middleware"])
async def test_route_templates_keep_the_prefixes_of_mounts_and_routers(installed: str) -> None:
    """Starlette Mounts (two with the same inner routes, a mounted app) and FastAPI routers
    included with prefixes, nested: the whole template, so that no two routes share a label."""
    from fastapi import APIRouter, FastAPI

    async def waits(request: Request) -> str:
        await disconnect_state(request.scope).wait()
        return "too late"

    inner = [Route("/items/{item_id}", wait_for_departure)]
    starlette = Starlette(
        routes=[
            Mount("/v1", routes=inner),
            Mount("/v2", routes=inner),
            Mount("/sub", app=Starlette(routes=[Route("/deep/{k}", wait_for_departure)])),
            Route("/top/{t}", wait_for_departure),
        ]
    )
    fastapi = FastAPI()
    users, outer, nested = APIRouter(), APIRouter(), APIRouter()
    users.add_api_route("/users/{uid}", waits)
    nested.add_api_route("/leaf/{z}", waits)
    outer.include_router(nested, prefix="/nested")
    fastapi.include_router(users, prefix="/v3")
    fastapi.include_router(outer, prefix="/outer")
    fastapi.mount("/st", Starlette(routes=[Route("/deep/{k}", wait_for_departure)]))
    cases = {
        starlette: {
            "/v1/items/1": "/v1/items/{item_id}",
            "/v2/items/2": "/v2/items/{item_id}",
            "/sub/deep/3": "/sub/deep/{k}",
            "/top/4": "/top/{t}",
        },
        fastapi: {
            "/v3/users/7": "/v3/users/{uid}",
            "/outer/nested/leaf/8": "/outer/nested/leaf/{z}",
            "/st/deep/9": "/st/deep/{k}",
        },
    }
    for app, expected in cases.items():
        if installed == "add_middleware":
            app.add_middleware(DisconnectMiddleware)
        wrapped = app if installed == "add_middleware" else DisconnectMiddleware(app)
        with capture_logs() as logs:
            async with serve(wrapped) as live:
                for path in expected:
                    (await live.request(path=path, leave=leave.before_response(0.02))).assert_aborted()
        assert {event["path"]: event["route"] for event in events_named(logs, "request_aborted")} == expected


@on_uvicorn
async def test_an_app_can_name_the_route_and_bind_the_request_id() -> None:
    """``state.route`` where no framework records one; structlog's bound ``request_id`` before the header."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        state = disconnect_state(scope)
        state.route = "/reports/{report}"
        structlog.contextvars.bind_contextvars(request_id="bound-1")
        await state.wait()

    with capture_logs() as logs:
        async with serve(DisconnectMiddleware(app, log_client=True)) as live:
            outcome = await live.request(
                path="/reports/9", headers=[("x-request-id", "header-1")], leave=leave.before_response(0.05)
            )
    outcome.assert_aborted()
    (event,) = events_named(logs, "request_aborted")
    assert (event["route"], event["request_id"]) == ("/reports/{report}", "bound-1")
    host, port = event["client"].split(":")
    assert host == "127.0.0.1" and 0 < int(port) < 65536


@on_uvicorn
async def test_completions_are_logged_at_debug_only_when_asked() -> None:
    """``log_completed=True``: one ``request_completed`` debug event, without departure fields."""
    for log_completed in (False, True):
        with capture_logs() as logs:
            async with serve(DisconnectMiddleware(starlette_app(), log_completed=log_completed)) as live:
                (await live.request(path="/done")).assert_completed()
        if not log_completed:
            assert logs == []
            continue
        (event,) = logs
        assert (event["event"], event["log_level"]) == ("request_completed", "debug")
        assert set(fields_of(event)) == FIELDS
        assert (event["status"], event["bytes_sent"], event["chunks_sent"]) == (200, 4, 1)
        assert (event["phase"], event["detected_by"], event["detected_after_ms"], event["cleanup_ms"]) == (
            None,
            None,
            None,
            None,
        )


async def test_the_request_id_the_app_bound_is_seen_on_every_path() -> None:
    """structlog's bound ``request_id``, bound by the handler or by a middleware around ours, reaches the
    event on asyncio's fast path, the reference path and trio (``simulate`` runs each request in a task
    of its own, as a server does, so nothing bound here outlives it)."""

    async def binds(scope: Scope, receive: Receive, send: Send) -> None:
        structlog.contextvars.bind_contextvars(request_id="bound-2")
        await disconnect_state(scope).wait()

    async def waits(scope: Scope, receive: Receive, send: Send) -> None:
        await disconnect_state(scope).wait()

    async def binding_middleware(scope: Scope, receive: Receive, send: Send) -> None:
        with structlog.contextvars.bound_contextvars(request_id="outer-3"):
            await DisconnectMiddleware(waits)(scope, receive, send)

    ids = []
    for app in (DisconnectMiddleware(binds), binding_middleware, DisconnectMiddleware(waits)):
        with capture_logs() as logs:
            (await simulate(app, leave=leave.before_response(0.01))).assert_aborted()
        ids += [log["request_id"] for log in logs]
    assert ids == ["bound-2", "outer-3", None]
    assert structlog.contextvars.get_contextvars() == {}


BODY = "http.response.body"
TRAILERS: Message = {"type": "http.response.start", "status": 200, "headers": [], "trailers": True}


@pytest.mark.parametrize(
    ("messages", "refuse_last", "expected"),
    [
        pytest.param(
            [START, {"type": BODY, "body": b"ab", "more_body": True}, {"type": BODY, "body": b"c", "more_body": True}]
            + [{"type": BODY, "body": b""}],
            False,
            ("request_completed", 3, 3),
            id="stream",
        ),
        pytest.param(
            [TRAILERS, {"type": BODY, "body": b"abc"}, {"type": "http.response.trailers", "headers": []}],
            False,
            ("request_completed", 3, 1),
            id="trailers",
        ),
        pytest.param(
            [START, {"type": "http.response.pathsend", "path": "/etc/hostname"}],
            False,
            ("request_completed", 0, 1),
            id="pathsend",
        ),
        pytest.param(
            [START, {"type": BODY, "body": b"ab", "more_body": True}, {"type": BODY, "body": b"cd"}],
            True,
            ("request_aborted", 2, 1),
            id="refused-final",
        ),
        pytest.param(
            [START, {"type": BODY, "body": b"ab", "more_body": True}, {"type": BODY, "body": b"cd", "more_body": True}],
            True,
            ("request_aborted", 2, 1),
            id="refused-chunk",
        ),
    ],
)
async def test_bytes_and_chunks_count_what_the_server_accepted(
    messages: list[Message], refuse_last: bool, expected: tuple[str, int, int]
) -> None:
    """Body messages, the final one included, a pathsend as one; a message an ASGI 2.4 server refused counts nothing."""
    peer = Peer()
    scope = http_scope(asgi={"version": "3.0", "spec_version": "2.4"})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for n, message in enumerate(messages):
            if refuse_last and n == len(messages) - 1:
                peer.send_error = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
            try:
                await send(message)
            except OSError:
                return  # a 2.4-aware app that stops

    with capture_logs() as logs, anyio.fail_after(5):
        await DisconnectMiddleware(app, log_completed=True)(scope, peer.receive, peer.send)
    (event,) = logs
    assert (event["event"], event["bytes_sent"], event["chunks_sent"]) == expected


async def test_the_level_is_configurable() -> None:
    """``log_level`` by name or number; a bad one is refused at construction."""
    for level, name in (("warning", "warning"), (logging.ERROR, "error")):
        with capture_logs() as logs:
            outcome = await simulate(
                DisconnectMiddleware(TwoChunksThenWait(), log_level=level), leave=leave.after_chunks(1)
            )
        outcome.assert_aborted(phase="mid_body")
        assert [(log["event"], log["log_level"]) for log in logs] == [("request_aborted", name)]
    for bad in ("loud", 25):
        with pytest.raises(ValueError, match="log_level takes one of debug, info, warning, error, critical"):
            DisconnectMiddleware(TwoChunksThenWait(), log_level=bad)
    with pytest.raises(TypeError, match="log_level takes a logging level name or number"):
        DisconnectMiddleware(TwoChunksThenWait(), log_level=2.5)  # type: ignore[arg-type]


async def test_wrong_option_types_are_refused() -> None:
    """Each new option says what it takes."""
    app = TwoChunksThenWait()
    with pytest.raises(TypeError, match="request_id_header takes a header name or None"):
        DisconnectMiddleware(app, request_id_header=b"x-id")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="log_completed takes True or False"):
        DisconnectMiddleware(app, log_completed="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_disconnect takes a callable or a sequence of callables"):
        DisconnectMiddleware(app, on_disconnect="hook")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"on_disconnect takes callables \(hook\(scope, state\)\), got 3"):
        DisconnectMiddleware(app, on_disconnect=[print, 3])  # type: ignore[list-item]


async def test_a_sequence_of_hooks_runs_in_order_and_a_failing_one_stops_none() -> None:
    """Each hook once, in order, sync or async; one that raises is logged with its name."""
    calls: list[str] = []

    def first(scope: Scope, state: DisconnectState) -> None:
        calls.append("first")
        raise RuntimeError("hook bug")

    async def second(scope: Scope, state: DisconnectState) -> None:
        await anyio.lowlevel.checkpoint()
        assert state.record is not None
        calls.append(f"second {state.record.phase}")

    with capture_logs() as logs:
        outcome = await simulate(
            DisconnectMiddleware(TwoChunksThenWait(), on_disconnect=[first, second]), leave=leave.after_chunks(1)
        )
    outcome.assert_aborted()
    assert calls == ["first", "second mid_body"]
    failed = events_named(logs, "on_disconnect_hook_failed")
    assert len(failed) == 1 and failed[0]["hook"].endswith("first")
    assert failed[0]["exc_info"] is True


class BlocksUntilGone(Peer):
    """A server whose send of one type of message blocks (a client that stopped reading)
    until it has delivered the client's departure; then it drops the message, as a server
    before ASGI 2.4 does."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    async def send(self, message: Message) -> None:
        if message["type"] == self.kind:
            await self.gone.wait()
            await anyio.sleep(0.02)  # the disconnect, delivered at once, is read meanwhile
            return
        await super().send(message)


@pytest.mark.parametrize("send_timeout", [None, 5.0], ids=["plain", "timed"])
async def test_a_start_still_being_sent_when_the_client_leaves_is_before_the_response(
    send_timeout: float | None,
) -> None:
    """The client never had the start: phase ``before_response`` and no status, not ``mid_body``."""
    peer = BlocksUntilGone("http.response.start")
    raised: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        try:
            await send({"type": "http.response.body", "body": b"late"})
        except ClientDisconnected as exc:
            raised.append(exc)
            raise

    with capture_logs() as logs:
        await abort_after(DisconnectMiddleware(app, send_timeout=send_timeout), peer)
    (event,) = events_named(logs, "request_aborted")
    assert (event["phase"], event["status"], event["detected_by"]) == ("before_response", None, "http.disconnect")
    assert "(before_response)" in str(raised[0])


async def test_a_send_after_the_start_still_under_way_is_mid_body() -> None:
    """The start was taken: a departure while a later message (a non-final zerocopysend,
    counted in no figure) is being sent is ``mid_body``, with the status."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        await send({"type": "http.response.zerocopysend", "file": 0, "more_body": True})

    with capture_logs() as logs:
        await abort_after(DisconnectMiddleware(app), BlocksUntilGone("http.response.zerocopysend"))
    (event,) = events_named(logs, "request_aborted")
    assert (event["phase"], event["status"]) == ("mid_body", 200)


async def test_a_stalled_send_and_a_refused_one_say_how_they_were_detected() -> None:
    """``send_stalled`` for a send blocked past ``send_timeout``; ``send_failed`` for an ASGI 2.4 refusal."""

    class Stalls(Peer):
        async def send(self, message: Message) -> None:
            if message["type"] == "http.response.body":
                await anyio.sleep_forever()
            await super().send(message)

    peer = Peer()
    peer.send_error = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    spec_2_4 = http_scope(asgi={"version": "3.0", "spec_version": "2.4"})
    seen = []
    timeout: float | None
    for server, scope, timeout in ((Stalls(), http_scope(), 0.05), (peer, spec_2_4, None)):
        with capture_logs() as logs, anyio.fail_after(5):
            await DisconnectMiddleware(TwoChunksThenWait(), send_timeout=timeout)(scope, server.receive, server.send)
        (event,) = events_named(logs, "request_aborted")
        seen.append((event["phase"], event["detected_by"], event["status"], event["bytes_sent"]))
    assert seen == [("stalled", "send_stalled", 200, 0), ("before_response", "send_failed", None, 0)]


async def test_a_server_that_raises_without_saying_so_refused_the_start() -> None:
    """A server that claims ASGI 2.3 but raises from send(): its refused start is no response."""
    peer = Peer()
    peer.send_error = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    with capture_logs() as logs, anyio.fail_after(5):
        await DisconnectMiddleware(TwoChunksThenWait())(http_scope(), peer.receive, peer.send)
    (event,) = events_named(logs, "request_aborted")
    assert (event["phase"], event["detected_by"], event["status"], event["chunks_sent"]) == (
        "before_response",
        "send_failed",
        None,
        0,
    )


async def test_hooks_set_later_are_checked_and_used() -> None:
    """``middleware.on_disconnect = ...`` takes effect, and is checked as at construction."""
    calls: list[str] = []
    middleware = DisconnectMiddleware(TwoChunksThenWait())
    middleware.on_disconnect = [lambda scope, state: calls.append(str(state.phase))]
    (await simulate(middleware, leave=leave.after_chunks(1))).assert_aborted()
    assert calls == ["mid_body"]
    with pytest.raises(TypeError, match="on_disconnect takes a callable or a sequence of callables"):
        middleware.on_disconnect = 3  # type: ignore[assignment]


# -- where the event goes, in a fresh interpreter -------------------------------------------

ABORT = """
import anyio
from asgi_disconnect import DisconnectMiddleware, disconnect_state
from asgi_disconnect.testing import leave, simulate

async def app(scope, receive, send):
    await disconnect_state(scope).wait()

async def main():
    outcome = await simulate(DisconnectMiddleware(app), path="/gone", leave=leave.before_response(0.01))
    outcome.assert_aborted()

anyio.run(main)
"""


def run_code(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter, where nothing of pytest's logging is set up."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)


def run_python(setup: str) -> subprocess.CompletedProcess[str]:
    """``setup``, then one request whose client leaves before the response (``ABORT``)."""
    return run_code(textwrap.dedent(setup) + ABORT)


def test_without_any_logging_configured_structlog_prints_the_event() -> None:
    """Neither structlog nor logging configured: structlog's default output, as for any library."""
    done = run_python("")
    assert "request_aborted" in done.stdout and "path=/gone" in done.stdout
    assert done.stderr == ""


def test_the_standard_librarys_configuration_routes_the_event() -> None:
    """Only ``logging`` configured: ``asgi_disconnect`` records, fields in the message and as attributes."""
    done = run_python(
        """
        import logging, sys
        class Fields(logging.Handler):
            def emit(self, record):
                print("phase attribute:", record.phase, record.route, record.event)
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
        logging.getLogger("asgi_disconnect").addHandler(Fields())
        """
    )
    assert "asgi_disconnect INFO request_aborted method=GET path=/gone route=- phase=before_response" in done.stderr
    assert "phase attribute: before_response None request_aborted" in done.stdout
    assert "request_aborted" not in done.stdout.replace("phase attribute: before_response None request_aborted", "")


def test_a_user_who_sets_the_logger_to_warning_sees_nothing() -> None:
    """``logging.getLogger("asgi_disconnect").setLevel(WARNING)`` silences the info event, whatever else is set."""
    for setup in (
        'import logging; logging.getLogger("asgi_disconnect").setLevel(logging.WARNING)',
        "import logging; logging.basicConfig(level=logging.DEBUG); "
        'logging.getLogger("asgi_disconnect").setLevel("WARNING")',
    ):
        done = run_python(setup)
        assert "request_aborted" not in done.stdout + done.stderr


def test_a_level_on_our_logger_filters_structlogs_output_too() -> None:
    """No handler anywhere: structlog prints, but a level set on ``asgi_disconnect`` still decides."""
    shown = run_python('import logging; logging.getLogger("asgi_disconnect").setLevel(logging.DEBUG)')
    assert "request_aborted" in shown.stdout
    hidden = run_python("import logging; logging.disable(logging.CRITICAL)")
    assert "request_aborted" not in hidden.stdout + hidden.stderr


def test_a_logging_pipeline_that_fails_costs_the_abort_nothing() -> None:
    """A structlog processor that raises: the failure is printed by the standard library, the
    request ends as it would have (no exception into the server) and the hooks still run."""
    code = """
import anyio, structlog
from asgi_disconnect import DisconnectMiddleware, disconnect_state
from asgi_disconnect.testing import leave, simulate

def broken(logger, name, event):
    raise RuntimeError("processor bug")

structlog.configure(processors=[broken])

async def app(scope, receive, send):
    await disconnect_state(scope).wait()

async def main():
    middleware = DisconnectMiddleware(app, on_disconnect=lambda scope, state: print("hook ran", state.phase))
    outcome = await simulate(middleware, leave=leave.before_response(0.01))
    outcome.assert_aborted()
    print("exception:", outcome.exception)

anyio.run(main)
"""
    done = run_code(code)
    assert done.stdout.splitlines() == ["hook ran before_response", "exception: None"]
    assert "asgi_disconnect could not log 'request_aborted'" in done.stderr
    assert "RuntimeError: processor bug" in done.stderr


def test_a_path_or_a_header_cannot_forge_log_lines() -> None:
    """Control characters in the path are escaped; a request id that is not printable ASCII is dropped."""
    code = r"""
import anyio, logging, sys
from asgi_disconnect import DisconnectMiddleware, disconnect_state
from asgi_disconnect.testing import leave, simulate

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")

async def app(scope, receive, send):
    await disconnect_state(scope).wait()

async def main():
    outcome = await simulate(
        DisconnectMiddleware(app),
        path="/x\nERROR forged line\x1b[2J",
        headers=[("x-request-id", b"id\x85next")],
        leave=leave.before_response(0.01),
    )
    outcome.assert_aborted()

anyio.run(main)
"""
    done = run_code(code)
    (line,) = done.stdout.splitlines()
    assert 'path="/x\\nERROR forged line\\u001b[2J"' in line
    assert "request_id=-" in line


def test_an_app_that_configured_structlog_gets_the_event_through_its_processors() -> None:
    """structlog configured (here onto the standard library): its processors see the event, with its logger name."""
    done = run_python(
        """
        import logging, sys, structlog
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s|%(message)s")
        structlog.configure(
            processors=[structlog.processors.JSONRenderer()],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
        )
        """
    )
    name, _, payload = done.stdout.strip().partition("|")
    event = json.loads(payload)
    assert name == "asgi_disconnect"
    assert (event["event"], event["logger"], event["phase"], event["path"]) == (
        "request_aborted",
        "asgi_disconnect",
        "before_response",
        "/gone",
    )
