"""What the common instrumentation libraries record for aborted requests, next to this package.

Run from the repository root::

    .venv/bin/python benchmarks/instrumentation.py

(about 15 s). With ``OTEL_SEMCONV_STABILITY_OPT_IN=http`` the OpenTelemetry rows show the
stable attribute names (``http.response.status_code``, ``error.type``) instead of the
default ones (``http.status_code``).

One FastAPI app, two routes: ``GET /slow`` sleeps ``SLOW_S`` then answers JSON (it never
reads its request, so nothing tells it the client left), ``GET /stream/{n}`` is a
``StreamingResponse`` of ``n`` chunks ``CHUNK_EVERY_S`` apart (``STREAM_CHUNKS`` of them:
about 2 s). Each peer instruments a fresh app in a fresh registry or tracer provider, the
way its README says: prometheus-fastapi-instrumentator (``Instrumentator(registry=...)
.instrument(app)``, default settings: status codes grouped as ``2xx``), starlette_exporter
(``app.add_middleware(PrometheusMiddleware)``: it registers in the global registry, so each
run takes a prefix of its own and unregisters it after) and
opentelemetry-instrumentation-asgi (``OpenTelemetryMiddleware(app, tracer_provider=...)``
with an ``InMemorySpanExporter``). The app is served by a real uvicorn in this process
(``asgi_disconnect.testing.serve``), alone, then behind ``DisconnectMiddleware`` in front of
the instrumented app (observe mode, cancel mode); ``DisconnectMiddleware`` also runs alone
on the bare app. Each served app gets the same three requests from a raw socket:

- ``before response``: ``/slow``, the client leaves (FIN) 0.1 s after the handler started;
- ``mid-stream``: ``/stream/40``, the client leaves after the first chunk;
- ``completed``: ``/slow``, the client reads the whole response (the control).

What each library recorded for each request is read from its own output: the Prometheus
libraries' registries are scraped (``generate_latest``) and parsed
(``prometheus_client.parser``) before and after each request, and the difference is the
request's sample (the request counter's status label, the duration histogram's sum); the
OpenTelemetry server span is read from the exporter (its status, status code and
``error.type`` attributes, events, start to end). This package's record is its structlog
event (``structlog.testing.capture_logs()``). "client stayed" is from sending the request
to the client's close (or to the end of the response); "handler ran" from the handler's
start to its return, as ``serve()`` measures it. Results go to stdout and
``benchmarks/results/instrumentation.md``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import anyio
import structlog
from common import RESULTS_DIR, command_line, environment, environment_line, package_version, table
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from asgi_disconnect import DisconnectMiddleware
from asgi_disconnect._types import ASGIApp
from asgi_disconnect.testing import Departure, Outcome, leave, serve

SLOW_S = 0.5  # how long GET /slow works before it answers
CHUNK_EVERY_S = 0.05
STREAM_CHUNKS = 40  # GET /stream/40: about 2 s of chunks
LEAVE_AFTER_S = 0.1  # the before-response client leaves this long after the handler started
TIMEOUT_S = 5.0  # each request's; every handler here ends well before it

#: The peers, in the tables' order, and the packages whose versions the header gives.
PEERS = ("prometheus-fastapi-instrumentator", "starlette_exporter", "opentelemetry-instrumentation-asgi")
VERSIONED = (*PEERS, "prometheus_client", "opentelemetry-sdk", "fastapi", "structlog")
#: How the instrumented app is served: alone, or behind DisconnectMiddleware in each mode.
MODES = ("alone", "observe", "cancel")
OURS = "asgi-disconnect"
#: This package's log event.
EVENTS = ("request_aborted",)


@dataclass(frozen=True)
class Request:
    """One of the three requests every served app gets."""

    name: str
    path: str
    leave: Departure


REQUESTS = (
    Request("before response", "/slow", leave.before_response(after=LEAVE_AFTER_S)),
    Request("mid-stream", f"/stream/{STREAM_CHUNKS}", leave.after_chunks(1)),
    Request("completed", "/slow", leave.never()),
)
CONTROL = "completed"


def make_app() -> FastAPI:
    """A fresh FastAPI app with the two routes (instrumentation is added per run)."""
    app = FastAPI()

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        await anyio.sleep(SLOW_S)
        return {"status": "done"}

    @app.get("/stream/{n}")
    async def stream(n: int) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(n):
                yield b"chunk %d\n" % i
                await anyio.sleep(CHUNK_EVERY_S)

        return StreamingResponse(chunks(), media_type="text/plain")

    return app


# -- what a peer recorded --------------------------------------------------------------


@dataclass(frozen=True)
class PeerRecord:
    """What one peer recorded for one request, read from its own output."""

    counted: bool  # a sample (Prometheus) or a server span (OpenTelemetry) exists
    status: str | None = None  # the status label, or the span's status code attribute
    duration_ms: float | None = None
    span_status: str | None = None  # OpenTelemetry: UNSET, OK or ERROR (with its description)
    error_type: str | None = None  # OpenTelemetry: the ``error.type`` attribute
    events: tuple[str, ...] = ()  # OpenTelemetry: the span's events (``exception: ClientDisconnected``)

    @property
    def error(self) -> bool:
        """The record says something went wrong (a 5xx, an ERROR span, an exception event)."""
        return (
            (self.status or "").startswith("5")
            or (self.span_status or "").startswith("ERROR")
            or self.error_type is not None
            or bool(self.events)
        )

    def same_as(self, other: PeerRecord) -> bool:
        """Nothing but the duration tells this record from ``other``."""
        return replace(self, duration_ms=None) == replace(other, duration_ms=None)


class Peer(Protocol):
    """An instrumentation library, installed on a fresh app, read request by request."""

    def instrument(self, app: FastAPI) -> ASGIApp: ...

    def mark(self) -> None:
        """Note what is recorded so far: ``read()`` returns what came after."""

    def read(self) -> PeerRecord | None:
        """What was recorded since ``mark()`` (None: this is not a peer)."""

    def close(self) -> None: ...


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(registry: CollectorRegistry, prefix: str) -> Samples:
    """The registry's samples whose family starts with ``prefix``, as a scrape returns them."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith(prefix)
        for sample in family.samples
    }


class PrometheusPeer:
    """A Prometheus library: its request counter's status label, its duration histogram."""

    prefix = ""
    counter = ""  # the request counter's sample name
    histogram = ""  # the duration histogram's name
    status_label = ""

    def __init__(self) -> None:
        self.registry: CollectorRegistry = CollectorRegistry()
        self.before: Samples = {}

    def instrument(self, app: FastAPI) -> ASGIApp:
        raise NotImplementedError

    def mark(self) -> None:
        self.before = scrape(self.registry, self.prefix)

    def read(self) -> PeerRecord:
        after = scrape(self.registry, self.prefix)
        delta = {key: value - self.before.get(key, 0.0) for key, value in after.items()}
        counted = [dict(labels) for (name, labels), d in delta.items() if name == self.counter and d > 0]
        durations = [d for (name, _), d in delta.items() if name == f"{self.histogram}_sum" and d > 0]
        if not counted:
            return PeerRecord(counted=False)
        return PeerRecord(
            counted=True,
            status="/".join(labels[self.status_label] for labels in counted),
            duration_ms=sum(durations) * 1000 if durations else None,
        )

    def close(self) -> None:
        pass


class Instrumentator(PrometheusPeer):
    """prometheus-fastapi-instrumentator with its defaults, in a registry of its own."""

    prefix = "http_"
    counter = "http_requests_total"
    histogram = "http_request_duration_seconds"
    status_label = "status"

    def instrument(self, app: FastAPI) -> ASGIApp:
        from prometheus_fastapi_instrumentator import Instrumentator

        Instrumentator(registry=self.registry).instrument(app)
        return app


class StarletteExporter(PrometheusPeer):
    """starlette_exporter: its metrics live on the middleware class, in the global registry,
    so each run takes a prefix of its own and unregisters its metrics at the end."""

    runs = itertools.count()
    status_label = "status_code"

    def __init__(self) -> None:
        super().__init__()
        self.registry = REGISTRY
        self.prefix = f"abort_probe{next(self.runs)}"
        self.counter = f"{self.prefix}_requests_total"
        self.histogram = f"{self.prefix}_request_duration_seconds"

    def instrument(self, app: FastAPI) -> ASGIApp:
        from starlette_exporter import PrometheusMiddleware

        app.add_middleware(PrometheusMiddleware, prefix=self.prefix)
        return app

    def close(self) -> None:
        from starlette_exporter import PrometheusMiddleware

        metrics = PrometheusMiddleware._metrics
        for name in [name for name in metrics if name.startswith(f"{self.prefix}_")]:
            REGISTRY.unregister(metrics.pop(name))


class OpenTelemetry:
    """opentelemetry-instrumentation-asgi with a tracer provider of its own."""

    def __init__(self) -> None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def instrument(self, app: FastAPI) -> ASGIApp:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
        from opentelemetry.metrics import NoOpMeterProvider

        middleware: ASGIApp = OpenTelemetryMiddleware(
            app, tracer_provider=self.provider, meter_provider=NoOpMeterProvider()
        )
        return middleware

    def mark(self) -> None:
        self.exporter.clear()

    def read(self) -> PeerRecord:
        from opentelemetry.trace import SpanKind, StatusCode

        servers = [span for span in self.exporter.get_finished_spans() if span.kind is SpanKind.SERVER]
        if not servers:
            return PeerRecord(counted=False)
        span = servers[-1]
        attributes = span.attributes or {}
        code = attributes.get("http.response.status_code", attributes.get("http.status_code"))
        status = span.status.status_code.name
        if span.status.status_code is StatusCode.ERROR and span.status.description:
            status += f" ({span.status.description})"
        events = tuple(
            f"{event.name}: {(event.attributes or {}).get('exception.type', '')}".rstrip(": ") for event in span.events
        )
        error_type = attributes.get("error.type")
        duration = (span.end_time - span.start_time) / 1e6 if span.end_time and span.start_time else None
        return PeerRecord(
            counted=True,
            status=None if code is None else str(code),
            duration_ms=duration,
            span_status=status,
            error_type=None if error_type is None else str(error_type),
            events=events,
        )

    def close(self) -> None:
        self.provider.shutdown()


class NoPeer:
    """No instrumentation: DisconnectMiddleware alone on the bare app."""

    def instrument(self, app: FastAPI) -> ASGIApp:
        return app

    def mark(self) -> None:
        pass

    def read(self) -> None:
        return None

    def close(self) -> None:
        pass


FACTORIES: dict[str, Callable[[], Peer]] = {
    "prometheus-fastapi-instrumentator": Instrumentator,
    "starlette_exporter": StarletteExporter,
    "opentelemetry-instrumentation-asgi": OpenTelemetry,
    OURS: NoPeer,
}


# -- one measured request ----------------------------------------------------------------


@dataclass
class Measured:
    """One request of one run: what the client and the handler did, what was recorded."""

    library: str  # the peer, or OURS for DisconnectMiddleware alone
    mode: str  # "alone", "observe" or "cancel" (DisconnectMiddleware in front)
    request: str
    client_status: int | None
    left: bool
    stayed_ms: float  # from sending the request to the client's close (or the response's end)
    handler_ms: float | None  # the handler's run, start to return
    ran_on_ms: float | None  # from the client's close to the handler's return
    peer: PeerRecord | None  # None for OURS
    events: list[dict[str, Any]] = field(default_factory=list)  # this package's abort events

    @property
    def event(self) -> dict[str, Any] | None:
        return self.events[0] if self.events else None


async def measure_run(library: str, mode: str, logs: Sequence[Mapping[str, Any]]) -> list[Measured]:
    """Serve a fresh app instrumented by ``library`` (``mode``: DisconnectMiddleware in
    front or not) on uvicorn and measure the three requests; ``logs`` is the list that
    ``capture_logs()`` fills."""
    peer = FACTORIES[library]()
    rows: list[Measured] = []
    try:
        app = peer.instrument(make_app())
        if mode != "alone":
            app = DisconnectMiddleware(app, cancel=mode == "cancel")
        async with serve(app, server="uvicorn") as live:
            for request in REQUESTS:
                peer.mark()
                mark = len(logs)
                sent = time.monotonic()
                outcome = await live.request(path=request.path, leave=request.leave, timeout=TIMEOUT_S)
                rows.append(measured(library, mode, request, outcome, sent, peer.read(), logs[mark:]))
    finally:
        peer.close()
    return rows


def measured(
    library: str,
    mode: str,
    request: Request,
    outcome: Outcome,
    sent: float,
    record: PeerRecord | None,
    logs: Sequence[Mapping[str, Any]],
) -> Measured:
    if outcome.timed_out:
        raise RuntimeError(f"{library} ({mode}), {request.name}: {outcome.summary()}")
    stayed = (outcome.left_at if outcome.left_at is not None else time.monotonic()) - sent
    return Measured(
        library=library,
        mode=mode,
        request=request.name,
        client_status=outcome.status,
        left=outcome.left,
        stayed_ms=stayed * 1000,
        handler_ms=outcome.duration_ms,
        ran_on_ms=outcome.app_returned_after_ms,
        peer=record,
        events=[dict(entry) for entry in logs if entry.get("event") in EVENTS],
    )


async def measure_all(
    libraries: Sequence[str] = (*PEERS, OURS), modes: Sequence[str] = MODES
) -> dict[tuple[str, str], dict[str, Measured]]:
    """Every run: (library, mode) -> request name -> what was measured (OURS runs only
    behind DisconnectMiddleware: alone it is the bare app)."""
    results: dict[tuple[str, str], dict[str, Measured]] = {}
    with structlog.testing.capture_logs() as logs:
        for library in libraries:
            for mode in modes:
                if library == OURS and mode == "alone":
                    continue
                rows = await measure_run(library, mode, logs)
                results[library, mode] = {row.request: row for row in rows}
    return results


# -- the tables --------------------------------------------------------------------------


def ms(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def client_cell(row: Measured) -> str:
    if not row.left:
        return f"read it all ({ms(row.stayed_ms)} ms)"
    response = "no response" if row.client_status is None else f"{row.client_status} started"
    return f"left at {ms(row.stayed_ms)} ms ({response})"


def handler_cell(row: Measured) -> str:
    if row.handler_ms is None:
        return "never called"
    if row.ran_on_ms is None:
        return f"{ms(row.handler_ms)} ms"
    return f"{ms(row.handler_ms)} ms ({ms(row.ran_on_ms)} after the close)"


def recorded_cell(record: PeerRecord | None) -> str:
    if record is None:
        return ""
    if not record.counted:
        return "nothing (not counted)"
    if record.span_status is not None:
        code = "no status code" if record.status is None else f"status code {record.status}"
        parts = [f"span {record.span_status}", code]
        if record.error_type is not None:
            parts.append(f"error.type={record.error_type}")
        parts += [f"event {event}" for event in record.events]
        return ", ".join(parts)
    return f'status "{record.status}"'


def visible_cell(row: Measured, control: Measured) -> str:
    """Does anything in the peer's record tell this abort from the completed request?"""
    record, normal = row.peer, control.peer
    if record is None or normal is None:
        return ""
    if row.request == CONTROL:
        return "(the control)"
    if not record.counted:
        return "no: the request is missing"
    if record.same_as(normal):
        return "no: recorded as a success"
    if record.error:
        return "as a server error"
    if record.status is None and normal.status is not None:
        return "only by the missing status code"
    return "yes"


def ours_cell(row: Measured) -> str:
    """This package's abort event, in short: phase, when detected, how long the cleanup took."""
    if row.mode == "alone":
        return "(not installed)"
    event = row.event
    if event is None:
        return "no event" if row.request == CONTROL else "no event (missed)"
    detected = event.get("detected_after_ms")
    cleanup = event.get("cleanup_ms")
    parts = [f"{event.get('phase')}", f"detected after {ms(detected)} ms"]
    if cleanup is not None:
        parts.append(f"cleanup {ms(cleanup)} ms")
    elif row.ran_on_ms is not None:
        parts.append(f"handler ran on {ms(row.ran_on_ms)} ms")
    if event.get("status") is not None:
        parts.append(f"status {event['status']}")
    parts.append("cancelled" if event.get("cancelled") else "not cancelled")
    if len(row.events) > 1:
        parts.append(f"{len(row.events)} events")
    return ", ".join(parts)


HEADERS = (
    "library",
    "DisconnectMiddleware",
    "request",
    "client",
    "handler ran",
    "recorded status",
    "recorded duration ms",
    "abort visible?",
    "asgi-disconnect records",
)


def rows_of(results: Mapping[tuple[str, str], Mapping[str, Measured]]) -> list[list[str]]:
    rows: list[list[str]] = []
    for (library, mode), run in results.items():
        control = run[CONTROL]
        for row in run.values():
            duration = row.peer.duration_ms if row.peer is not None else None
            if library == OURS:
                duration = row.event.get("duration_ms") if row.event is not None else None
            rows.append(
                [
                    library,
                    "—" if mode == "alone" else mode,
                    row.request,
                    client_cell(row),
                    handler_cell(row),
                    recorded_cell(row.peer),
                    ms(duration),
                    visible_cell(row, control),
                    ours_cell(row),
                ]
            )
    return rows


SUMMARY_HEADERS = ("library", "request", "client stayed ms", "recorded", "recorded duration ms", "abort visible?")


def summary_rows(results: Mapping[tuple[str, str], Mapping[str, Measured]]) -> list[list[str]]:
    """The short table: each peer alone, then this package in observe mode, for the same requests."""
    rows: list[list[str]] = []
    for (library, mode), run in results.items():
        if mode != ("observe" if library == OURS else "alone"):
            continue
        control = run[CONTROL]
        for row in run.values():
            if library != OURS:
                duration = row.peer.duration_ms if row.peer is not None else None
                recorded, visible = recorded_cell(row.peer), visible_cell(row, control)
            elif row.event is None:
                duration, recorded, visible = None, "no event", "(the control)"
            else:
                duration = row.event.get("duration_ms")
                recorded = f"{row.event['event']}, phase {row.event['phase']}"
                detected = row.event.get("detected_after_ms")
                visible = f"yes: detected after {ms(detected)} ms"
            rows.append([library, row.request, ms(row.stayed_ms), recorded, ms(duration), visible])
    return rows


def versions() -> dict[str, str]:
    return {name: package_version(name) for name in VERSIONED}


def header_line() -> str:
    env = environment()
    names = ("asgi-disconnect", "starlette", "uvicorn", "httptools", "anyio")
    env["versions"] = {name: env["versions"][name] for name in names} | versions()
    return environment_line(env)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.parse_args(argv)
    header = header_line()
    print(header, flush=True)
    began = time.perf_counter()
    results = anyio.run(measure_all, backend="asyncio")
    total = time.perf_counter() - began
    text, md_table = table(HEADERS, rows_of(results))
    summary_text, summary_md = table(SUMMARY_HEADERS, summary_rows(results))
    print(f"\n{summary_text}\n\n{text}\n\ntotal time: {total:.1f} s")
    md = [
        "# What instrumentation libraries record for aborted requests",
        "",
        header,
        "",
        f"Command: `{command_line('benchmarks/instrumentation.py')}`",
        "",
        f"One FastAPI app on uvicorn: `GET /slow` works {SLOW_S:g} s then answers JSON; "
        f"`GET /stream/{STREAM_CHUNKS}` streams {STREAM_CHUNKS} chunks {CHUNK_EVERY_S * 1000:.0f} ms apart. "
        f"Requests: the client leaves {LEAVE_AFTER_S:g} s into /slow (before the response), leaves after "
        "the stream's first chunk (mid-stream), or reads /slow to the end (completed, the control). "
        "Each peer alone, then behind DisconnectMiddleware (observe, cancel) in front of the instrumented "
        "app; asgi-disconnect alone on the bare app last. Status and duration as each library recorded "
        "them (Prometheus: the request counter's status label and the duration histogram's sum, scraped "
        "before and after each request; OpenTelemetry: the server span). Abort visible: whether anything "
        "in the record tells the abort from the completed request. See the docstring of "
        "benchmarks/instrumentation.py.",
        "",
        "## Each library alone, and asgi-disconnect (observe mode), for the same requests",
        "",
        summary_md,
        "",
        "## Every run: each library alone and behind DisconnectMiddleware, with what asgi-disconnect records",
        "",
        md_table,
        "",
        f"Total time: {total:.1f} s.",
    ]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "instrumentation.md"
    path.write_text("\n".join(md) + "\n")
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
