"""asgi_disconnect.opentelemetry: aborted requests on opentelemetry-instrumentation-asgi's server span.

A Starlette app with a handler that thinks before it answers and a streaming one, behind
``OpenTelemetryMiddleware`` and ``DisconnectMiddleware`` in both orders, served by a real
uvicorn; a raw-socket client leaves before the response or after the first chunk. Spans
go to an SDK ``TracerProvider`` of the test's own (never the global one) and an
``InMemorySpanExporter``; the assertions read the finished server span.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Literal, NamedTuple

import anyio
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import INVALID_SPAN_CONTEXT, NonRecordingSpan, StatusCode
from opentelemetry.util.types import AttributeValue
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_disconnect import SCOPE_KEY, ClientDisconnected, DisconnectMiddleware, DisconnectState, _fastpath, _middleware
from asgi_disconnect._loopback import ServerName
from asgi_disconnect._types import ASGIApp, Receive, Scope, Send
from asgi_disconnect.opentelemetry import AbortTracing
from asgi_disconnect.pytest_plugin import CapturedEvents
from asgi_disconnect.testing import Departure, Outcome, leave, serve

pytestmark = [pytest.mark.anyio, pytest.mark.server]

THINK = 0.3  # seconds /slow thinks before it answers: the client leaves 10 ms into it
CHUNK = b"0123456789"
EVERY = 0.02  # seconds between the chunks of /stream
CHUNKS = 20
TIMEOUT = 3.0  # each request's; what ends before it is not timed out
ABORT_ATTRIBUTES = (
    "error.type",
    "http.response.body.size",
    "asgi_disconnect.phase",
    "asgi_disconnect.detected_by",
    "asgi_disconnect.cancelled",
)


@pytest.fixture
def anyio_backend() -> str:
    """Real-server tests pin asyncio (uvicorn runs on it alone); the hypercorn test adds trio."""
    return "asyncio"


Order = Literal["otel-outside", "otel-inside"]
ORDERS = pytest.mark.parametrize("order", ["otel-outside", "otel-inside"])
MODES = pytest.mark.parametrize("cancel", [False, True], ids=["observe", "cancel"])


async def slow(request: Request) -> Response:
    await anyio.sleep(THINK)
    return PlainTextResponse("done")


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(CHUNKS):
            yield CHUNK
            await anyio.sleep(EVERY)

    return StreamingResponse(chunks(), media_type="text/plain")


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


STARLETTE = Starlette(routes=[Route("/slow", slow), Route("/stream", stream), Route("/hello", hello)])


class Case(NamedTuple):
    """Where the client leaves, the path that gets it there, and what the span then says."""

    path: str
    leave: Departure
    phase: str


CASES = {
    "before_response": Case("/slow", leave.before_response(after=0.01), "before_response"),
    "mid_body": Case("/stream", leave.after_chunks(1), "mid_body"),
}
ON_EVERY_CASE = pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())


class Traced(NamedTuple):
    """The app as served, and where its spans go."""

    app: ASGIApp
    provider: TracerProvider
    exporter: InMemorySpanExporter


def traced(order: Order, *, cancel: bool = False, tracing: AbortTracing | None = None, both: bool = False) -> Traced:
    """STARLETTE behind both middlewares in ``order``; ``tracing`` where that order needs it, or ``both`` places."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    hook = tracing if tracing is not None and (both or order == "otel-outside") else None
    request_hook = tracing.server_request_hook if tracing is not None and (both or order == "otel-inside") else None

    def otel(app: ASGIApp) -> ASGIApp:
        return OpenTelemetryMiddleware(
            app, server_request_hook=request_hook, tracer_provider=provider, meter_provider=NoOpMeterProvider()
        )

    if order == "otel-outside":
        app = otel(DisconnectMiddleware(STARLETTE, cancel=cancel, on_disconnect=hook))
    else:
        app = DisconnectMiddleware(otel(STARLETTE), cancel=cancel, on_disconnect=hook)
    return Traced(app, provider, exporter)


async def request(
    traced: Traced, path: str, departure: Departure, server: ServerName = "uvicorn"
) -> tuple[Outcome, ReadableSpan]:
    """One request on a real server; its outcome and its finished server span."""
    async with serve(traced.app, server=server) as live:
        outcome = await live.request(path=path, leave=departure, timeout=TIMEOUT)
    assert not outcome.timed_out and outcome.tracebacks == []
    spans = [span for span in traced.exporter.get_finished_spans() if span.name == f"GET {path}"]
    assert len(spans) == 1, traced.exporter.get_finished_spans()
    return outcome, spans[0]


def status_code(span: ReadableSpan) -> object:
    """The response status OpenTelemetry recorded, under the old or the new semconv name."""
    attributes = span.attributes or {}
    return attributes.get("http.response.status_code", attributes.get("http.status_code"))


@ON_EVERY_CASE
@MODES
@ORDERS
async def test_an_abort_is_on_the_server_span(
    order: Order, cancel: bool, case: Case, caplog: pytest.LogCaptureFixture
) -> None:
    """In either order and mode, the aborted request's server span says where, how and what was sent."""
    outcome, span = await request(traced(order, cancel=cancel, tracing=AbortTracing()), case.path, case.leave)
    # Nothing was set on an ended span (the SDK drops it with a warning), nothing failed.
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
    state = outcome.state
    assert state is not None and state.phase == case.phase
    assert span.attributes is not None
    assert {name: span.attributes.get(name) for name in ABORT_ATTRIBUTES} == {
        "error.type": "client_disconnected",
        "http.response.body.size": state.bytes_sent,
        "asgi_disconnect.phase": case.phase,
        "asgi_disconnect.detected_by": "http.disconnect",  # uvicorn drops a send to a closed connection
        "asgi_disconnect.cancelled": state.cancelled,
    }
    if case.phase == "mid_body":
        assert state.bytes_sent >= len(outcome.body) == len(CHUNK)
        # Starlette's StreamingResponse listens for the disconnect and stops itself: never cancelled.
        assert not state.cancelled
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "client disconnected (mid_body): the response was incomplete"
        return
    assert state.bytes_sent == 0
    assert state.cancelled is cancel  # cancelled while it thinks, before the span ended
    if order == "otel-inside" and not cancel:
        # The handler's send raised our ClientDisconnected through OpenTelemetry's middleware, which
        # made the span Error; the SDK never sets a status back to Unset (only OK, which is final).
        assert span.status.status_code is StatusCode.ERROR
        assert (span.status.description or "").startswith("ClientDisconnected:")
    else:
        assert span.status.status_code is StatusCode.UNSET


@ORDERS
async def test_a_completed_request_has_none_of_it(order: Order) -> None:
    """A request whose client stayed gets no abort attribute and keeps its status Unset."""
    outcome, span = await request(traced(order, cancel=True, tracing=AbortTracing()), "/hello", leave.never())
    assert outcome.complete and outcome.body == b"hello"
    assert span.attributes is not None
    assert set(ABORT_ATTRIBUTES) & set(span.attributes) == set()
    assert status_code(span) == 200
    assert span.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize(
    ("error_phases", "status"),
    [
        ((), StatusCode.UNSET),  # no abort is an error
        (("before_response", "mid_body"), StatusCode.ERROR),  # every abort is one
    ],
)
@ORDERS
async def test_which_phases_are_errors_is_configurable(
    order: Order, error_phases: Collection[Literal["before_response", "mid_body"]], status: StatusCode
) -> None:
    """error_phases decides which aborts set the span's status to Error."""
    tracing = AbortTracing(error_phases=error_phases)
    for case in CASES.values():
        _, span = await request(traced(order, cancel=True, tracing=tracing), case.path, case.leave)
        assert span.attributes is not None and span.attributes["asgi_disconnect.phase"] == case.phase
        assert span.status.status_code is status


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@ON_EVERY_CASE
@ORDERS
async def test_on_hypercorn_and_trio(order: Order, case: Case) -> None:
    """On hypercorn, asyncio and trio alike, the abort and its cancellation are on the span."""
    outcome, span = await request(
        traced(order, cancel=True, tracing=AbortTracing()), case.path, case.leave, "hypercorn"
    )
    assert outcome.state is not None and outcome.state.phase == case.phase
    assert span.attributes is not None
    assert span.attributes["asgi_disconnect.phase"] == case.phase
    assert span.attributes["asgi_disconnect.cancelled"] is outcome.state.cancelled is (case.phase == "before_response")
    assert span.status.status_code is (StatusCode.ERROR if case.phase == "mid_body" else StatusCode.UNSET)


@ORDERS
async def test_the_reference_path_marks_the_cancellation_too(order: Order, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the plain anyio path (no fast path) the cancellation is on the span as well."""
    monkeypatch.setattr(_middleware, "fast_task", _fastpath._no_task)
    case = CASES["before_response"]
    outcome, span = await request(traced(order, cancel=True, tracing=AbortTracing()), case.path, case.leave)
    assert outcome.state is not None and outcome.state.cancelled
    assert span.attributes is not None and span.attributes["asgi_disconnect.cancelled"] is True


class Alone(NamedTuple):
    """What OpenTelemetry alone records on the server span of an abort."""

    status_code: int | None
    status: StatusCode
    exception: str | None  # the type of the exception event, if any


# Measured: without AbortTracing nothing says the client left. Outside, our middleware absorbs what
# the departure caused: the span looks like a success (a 200 for a cut stream). Inside, a send that
# raised our ClientDisconnected is an Error with the 200 the server never took; a cancellation
# (a BaseException, which use_span does not record) leaves nothing at all.
OUR_ERROR = f"{ClientDisconnected.__module__}.{ClientDisconnected.__qualname__}"
ALONE = {
    ("otel-outside", False, "before_response"): Alone(None, StatusCode.UNSET, None),
    ("otel-outside", False, "mid_body"): Alone(200, StatusCode.UNSET, None),
    ("otel-outside", True, "before_response"): Alone(None, StatusCode.UNSET, None),
    ("otel-outside", True, "mid_body"): Alone(200, StatusCode.UNSET, None),
    ("otel-inside", False, "before_response"): Alone(200, StatusCode.ERROR, OUR_ERROR),
    ("otel-inside", False, "mid_body"): Alone(200, StatusCode.UNSET, None),
    ("otel-inside", True, "before_response"): Alone(None, StatusCode.UNSET, None),
    ("otel-inside", True, "mid_body"): Alone(200, StatusCode.UNSET, None),
}


@ON_EVERY_CASE
@MODES
@ORDERS
async def test_what_opentelemetry_alone_records(order: Order, cancel: bool, case: Case) -> None:
    """Without AbortTracing, the server span of an abort is a success or an anonymous error."""
    outcome, span = await request(traced(order, cancel=cancel), case.path, case.leave)
    assert outcome.state is not None and outcome.state.phase == case.phase
    assert span.attributes is not None
    assert set(ABORT_ATTRIBUTES) & set(span.attributes) == set()
    exceptions = [event for event in span.events if event.name == "exception"]
    exception = str(exceptions[0].attributes["exception.type"]) if exceptions and exceptions[0].attributes else None
    assert Alone(status_code(span), span.status.status_code, exception) == ALONE[order, cancel, case.phase]  # type: ignore[arg-type]


@ORDERS
async def test_installed_in_both_places_each_abort_is_written_once(order: Order) -> None:
    """As both hooks, in either order, the abort is on OpenTelemetry's span alone, not on a span around it."""
    app = traced(order, cancel=True, tracing=AbortTracing(), both=True)
    tracer = app.provider.get_tracer(__name__)

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        # Some span around the whole app (another instrumentation): OpenTelemetry's is then INTERNAL.
        if scope["type"] != "http":
            await app.app(scope, receive, send)
            return
        with tracer.start_as_current_span("outer"):
            await app.app(scope, receive, send)

    case = CASES["before_response"]
    _, span = await request(app._replace(app=outer), case.path, case.leave)
    assert span.attributes is not None and span.attributes["asgi_disconnect.cancelled"] is True
    (around,) = [span for span in app.exporter.get_finished_spans() if span.name == "outer"]
    assert around.attributes is not None and set(ABORT_ATTRIBUTES) & set(around.attributes) == set()
    assert around.status.status_code is StatusCode.UNSET


def test_error_phases_are_checked() -> None:
    """A single phase given as a string is refused, not read as its letters; so is a misspelt phase."""
    with pytest.raises(TypeError, match="collection of phases"):
        AbortTracing(error_phases="mid_body")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"before_response, mid_body, stalled; got \['midbody'\]"):
        AbortTracing(error_phases=["midbody"])  # type: ignore[list-item]
    assert repr(AbortTracing()) == "AbortTracing(error_phases=['mid_body'])"


class BrokenSpan(NonRecordingSpan):
    """A span that says it records, and fails to take any attribute."""

    def is_recording(self) -> bool:
        return True

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        raise RuntimeError("broken exporter")


def test_a_span_that_fails_costs_the_departure_nothing(disconnect_events: CapturedEvents) -> None:
    """A failure to write the abort at the departure is logged, never raised into the middleware."""
    state = DisconnectState(started_at=0.0)
    AbortTracing().server_request_hook(BrokenSpan(INVALID_SPAN_CONTEXT), {SCOPE_KEY: state})
    state._record("mid_body", 0.0)
    assert state.disconnected
    assert [event["event"] for event in disconnect_events] == ["opentelemetry_write_failed"]


def test_nothing_is_written_without_an_open_span(disconnect_events: CapturedEvents) -> None:
    """No current span for the hook, a span that ended before the departure: nothing written, nothing logged."""
    tracing = AbortTracing()
    state = DisconnectState(started_at=0.0)
    state._record("mid_body", 0.0)
    tracing({}, state)  # no span is current here
    span = TracerProvider().get_tracer(__name__).start_span("GET /")
    later = DisconnectState(started_at=0.0)
    tracing.server_request_hook(span, {SCOPE_KEY: later})
    span.end()
    later._record("mid_body", 0.0)
    assert isinstance(span, ReadableSpan) and span.attributes == {}
    assert list(disconnect_events) == []


def test_the_cancellation_is_written_when_the_middleware_delivers_it() -> None:
    """The span, still open, learns of the cancellation when the middleware marks it, once."""
    span = TracerProvider().get_tracer(__name__).start_span("GET /")
    state = DisconnectState(started_at=0.0, cancel=True)
    AbortTracing().server_request_hook(span, {SCOPE_KEY: state})
    state._record("before_response", 0.0)
    assert isinstance(span, ReadableSpan) and span.attributes is not None
    assert span.attributes["asgi_disconnect.cancelled"] is False
    state._mark_cancelled()
    state._mark_cancelled()  # the fast path repeats its cancel: told once
    span.end()
    assert span.attributes["asgi_disconnect.cancelled"] is True


def test_without_opentelemetry_the_import_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing the module without opentelemetry-api names the extra to install."""
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "asgi_disconnect.opentelemetry")
    with pytest.raises(ImportError, match=r"pip install 'asgi-disconnect\[opentelemetry\]'"):
        importlib.import_module("asgi_disconnect.opentelemetry")
