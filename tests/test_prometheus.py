"""asgi_disconnect.prometheus: AbortMetrics counts aborted requests and times them.

The unit tests call the hook with a hand-made ``DisconnectState`` carrying a
``RequestRecord`` and read the registry; the end-to-end tests serve Starlette and FastAPI
apps on a real uvicorn, let real clients leave, then scrape the app's own ``/metrics``
over HTTP and parse the exposition the way Prometheus would.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, Literal

import anyio
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Histogram,
    generate_latest,
    make_asgi_app,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import PlainTextResponse as StarlettePlainTextResponse
from starlette.responses import Response
from starlette.responses import StreamingResponse as StarletteStreamingResponse
from starlette.routing import Route

from asgi_disconnect import DisconnectMiddleware, DisconnectState, RequestRecord, disconnect_state
from asgi_disconnect._types import ASGIApp, Receive, Scope, Send
from asgi_disconnect.prometheus import DEFAULT_BUCKETS, AbortMetrics
from asgi_disconnect.testing import Live, leave, serve, simulate

pytestmark = pytest.mark.anyio

COUNTER = "http_requests_aborted_total"
HISTOGRAM = "http_request_aborted_duration_seconds"
CHUNK = b"token\n"
EVERY = 0.01  # seconds between streamed chunks
MAX_CHUNKS = 500  # 5 s of stream at most: every client below leaves long before

Labels = frozenset[tuple[str, str]]


def labels(method: str, route: str, phase: str, cancelled: str) -> Labels:
    """A series' label set, as the samples below key it."""
    return frozenset({"method": method, "route": route, "phase": phase, "cancelled": cancelled}.items())


def record(**fields: Any) -> RequestRecord:
    """A record of a GET to ``/items/42`` whose client left mid-body after 250 ms; ``fields`` override."""
    made = RequestRecord(
        method="GET",
        path="/items/42",
        route="/items/{item_id}",
        phase="mid_body",
        detected_by="http.disconnect",
        status=200,
        bytes_sent=60,
        chunks_sent=10,
        bytes_received=0,
        detected_after_ms=240.0,
        cleanup_ms=10.0,
        duration_ms=250.0,
        cancelled=False,
        request_id=None,
    )
    return dataclasses.replace(made, **fields)


def aborted(made: RequestRecord | None = None) -> DisconnectState:
    """The state the hook receives for an aborted request: disconnected, with its record."""
    state = DisconnectState(started_at=0.0)
    state.record = record() if made is None else made
    if state.record.phase is not None:
        state._record(state.record.phase, 0.25)
    return state


SCOPE: Scope = {"type": "http", "method": "GET", "path": "/items/42"}


def samples(families: Iterable[Metric], name: str) -> dict[Labels, float]:
    """Every sample named ``name`` in ``families``, by label set."""
    return {
        frozenset(sample.labels.items()): sample.value
        for family in families
        for sample in family.samples
        if sample.name == name
    }


def series(registry: CollectorRegistry, name: str) -> dict[Labels, float]:
    """Every sample named ``name`` in ``registry``, by label set."""
    return samples(registry.collect(), name)


def scraped(text: str, name: str) -> dict[Labels, float]:
    """Every sample named ``name`` in a Prometheus text exposition, parsed as Prometheus would, by label set."""
    return samples(text_string_to_metric_families(text), name)


# ---- the hook, called by hand


def test_counts_the_aborted_request_in_exactly_its_series() -> None:
    """One call adds 1 to one counter series and one observation of its duration, nothing else."""
    registry = CollectorRegistry()
    metrics = AbortMetrics(registry)
    metrics(SCOPE, aborted())
    series_labels = labels("GET", "/items/{item_id}", "mid_body", "false")
    assert series(registry, COUNTER) == {series_labels: 1.0}
    assert series(registry, f"{HISTOGRAM}_count") == {series_labels: 1.0}
    assert series(registry, f"{HISTOGRAM}_sum") == {series_labels: 0.25}
    buckets = {dict(key)["le"]: value for key, value in series(registry, f"{HISTOGRAM}_bucket").items()}
    assert buckets["0.1"] == 0.0
    assert buckets["0.25"] == 1.0  # le is inclusive
    assert buckets["+Inf"] == 1.0
    assert len(buckets) == len(DEFAULT_BUCKETS) + 1
    metrics(SCOPE, aborted())
    assert series(registry, COUNTER) == {series_labels: 2.0}


# Each case: what the record says, and the series it lands in.
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # no route template matched: a fixed value, never the raw path
        ({"route": None}, labels("GET", "unmatched", "mid_body", "false")),
        ({"phase": "before_response", "cancelled": True}, labels("GET", "/items/{item_id}", "before_response", "true")),
        ({"phase": "stalled"}, labels("GET", "/items/{item_id}", "stalled", "false")),
        ({"method": "POST"}, labels("POST", "/items/{item_id}", "mid_body", "false")),
        ({"method": "PATCH"}, labels("PATCH", "/items/{item_id}", "mid_body", "false")),
        # methods outside the standard ones, which a client may invent at will: one value
        ({"method": "PROPFIND"}, labels("other", "/items/{item_id}", "mid_body", "false")),
        ({"method": "get"}, labels("other", "/items/{item_id}", "mid_body", "false")),  # methods are case-sensitive
        ({"method": "X" * 1000}, labels("other", "/items/{item_id}", "mid_body", "false")),
        ({"method": ""}, labels("other", "/items/{item_id}", "mid_body", "false")),
    ],
)
def test_labels(fields: dict[str, Any], expected: Labels) -> None:
    """Method, route, phase and cancelled land in the labels, with odd methods and no route mapped to fixed values."""
    registry = CollectorRegistry()
    AbortMetrics(registry)(SCOPE, aborted(record(**fields)))
    assert series(registry, COUNTER) == {expected: 1.0}
    assert series(registry, f"{HISTOGRAM}_count") == {expected: 1.0}


def test_many_odd_methods_make_one_series() -> None:
    """A thousand invented methods add one series, not a thousand."""
    registry = CollectorRegistry()
    metrics = AbortMetrics(registry)
    for index in range(1000):
        metrics(SCOPE, aborted(record(method=f"M{index}")))
    assert series(registry, COUNTER) == {labels("other", "/items/{item_id}", "mid_body", "false"): 1000.0}


@pytest.mark.parametrize(
    "state",
    [
        DisconnectState(started_at=0.0),  # no record at all
        aborted(record(phase=None, detected_by=None)),  # a record of a completed request
    ],
    ids=["no-record", "completed-record"],
)
def test_a_state_without_a_departure_counts_nothing(state: DisconnectState) -> None:
    """A state whose record shows no departure adds no series."""
    registry = CollectorRegistry()
    AbortMetrics(registry)(SCOPE, state)
    assert series(registry, COUNTER) == {}
    assert series(registry, f"{HISTOGRAM}_count") == {}


def test_namespace_prefixes_both_names() -> None:
    """``namespace="myapp"`` exports ``myapp_http_requests_aborted_total`` and ``myapp_http_request_aborted_...``."""
    registry = CollectorRegistry()
    metrics = AbortMetrics(registry, namespace="myapp")
    metrics(SCOPE, aborted())
    series_labels = labels("GET", "/items/{item_id}", "mid_body", "false")
    assert series(registry, f"myapp_{COUNTER}") == {series_labels: 1.0}
    assert series(registry, f"myapp_{HISTOGRAM}_count") == {series_labels: 1.0}
    assert series(registry, COUNTER) == {}
    assert repr(metrics) == f"<AbortMetrics myapp_{COUNTER}, myapp_{HISTOGRAM}>"


def test_custom_buckets() -> None:
    """``buckets=`` replaces the default upper bounds (Prometheus adds +Inf)."""
    registry = CollectorRegistry()
    AbortMetrics(registry, buckets=[1, 10])(SCOPE, aborted())
    buckets = {dict(key)["le"]: value for key, value in series(registry, f"{HISTOGRAM}_bucket").items()}
    assert buckets == {"1.0": 1.0, "10.0": 1.0, "+Inf": 1.0}


def test_registries_are_isolated() -> None:
    """Two AbortMetrics on two registries coexist, and each counts only its own calls."""
    first, second = CollectorRegistry(), CollectorRegistry()
    metrics_one, metrics_two = AbortMetrics(first), AbortMetrics(second)
    metrics_one(SCOPE, aborted())
    metrics_two(SCOPE, aborted(record(route="/other")))
    metrics_two(SCOPE, aborted(record(route="/other")))
    assert series(first, COUNTER) == {labels("GET", "/items/{item_id}", "mid_body", "false"): 1.0}
    assert series(second, COUNTER) == {labels("GET", "/other", "mid_body", "false"): 2.0}


def test_the_default_registry() -> None:
    """Without ``registry`` the metrics go to prometheus_client's default REGISTRY."""
    metrics = AbortMetrics()
    try:
        assert metrics.registry is REGISTRY
        metrics(SCOPE, aborted())
        assert series(REGISTRY, COUNTER) == {labels("GET", "/items/{item_id}", "mid_body", "false"): 1.0}
    finally:
        REGISTRY.unregister(metrics.aborted)
        REGISTRY.unregister(metrics.duration)


def test_a_second_one_on_the_same_registry_says_what_to_do() -> None:
    """A second AbortMetrics on a registry raises a ValueError that names the clash and the ways out."""
    registry = CollectorRegistry()
    first = AbortMetrics(registry)
    with pytest.raises(ValueError, match=r"one AbortMetrics per registry.*namespace=.*registry=CollectorRegistry\(\)"):
        AbortMetrics(registry)
    first(SCOPE, aborted())  # the first one still works
    assert series(registry, COUNTER) == {labels("GET", "/items/{item_id}", "mid_body", "false"): 1.0}
    AbortMetrics(registry, namespace="other")  # another namespace does not clash


def test_a_clash_leaves_nothing_half_registered() -> None:
    """When only the histogram's name is taken, the counter is not left behind in the registry."""
    registry = CollectorRegistry()
    theirs = Histogram(HISTOGRAM, "the user's own", registry=registry)
    with pytest.raises(ValueError, match=re.escape(HISTOGRAM)):
        AbortMetrics(registry)
    assert [family.name for family in registry.collect()] == [HISTOGRAM]
    registry.unregister(theirs)  # once the user drops theirs, it works
    AbortMetrics(registry)


# Each case: the options, the error and what its message says.
@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"registry": "default"}, TypeError, "registry takes a prometheus_client.CollectorRegistry"),
        ({"registry": object()}, TypeError, "registry takes a prometheus_client.CollectorRegistry"),
        ({"namespace": None}, TypeError, "namespace takes a string"),
        ({"namespace": b"myapp"}, TypeError, "namespace takes a string"),
        ({"namespace": "my-app"}, ValueError, "namespace must be a metric name prefix"),
        ({"namespace": "1app"}, ValueError, "namespace must be a metric name prefix"),
        ({"buckets": "1,2"}, TypeError, "buckets takes an iterable"),
        ({"buckets": 5}, TypeError, "buckets takes an iterable"),
        ({"buckets": [1, "2"]}, TypeError, "buckets takes numbers"),
        ({"buckets": [True]}, TypeError, "buckets takes numbers"),
        ({"buckets": []}, ValueError, "at least one finite upper bound"),
        ({"buckets": [float("inf")]}, ValueError, "at least one finite upper bound"),
        ({"buckets": [0, 1]}, ValueError, "upper bounds > 0"),
        ({"buckets": [float("nan")]}, ValueError, "upper bounds > 0"),
        ({"buckets": [1, 0.5]}, ValueError, "strictly increasing"),
        ({"buckets": [1, 1]}, ValueError, "strictly increasing"),
    ],
)
def test_bad_options(options: dict[str, Any], error: type[Exception], match: str) -> None:
    """Wrong option types and values raise a TypeError or ValueError saying what is expected."""
    options.setdefault("registry", CollectorRegistry())
    with pytest.raises(error, match=re.escape(match)):
        AbortMetrics(**options)


def test_missing_prometheus_client_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without prometheus_client, importing the module raises an ImportError naming the extra."""
    monkeypatch.delitem(sys.modules, "asgi_disconnect.prometheus")
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # what an uninstalled package imports as
    with pytest.raises(ImportError, match=re.escape("pip install 'asgi-disconnect[prometheus]'")):
        importlib.import_module("asgi_disconnect.prometheus")


def test_the_package_does_not_import_prometheus_client() -> None:
    """``import asgi_disconnect`` leaves prometheus_client unimported: only the sub-module imports it."""
    code = "import sys, asgi_disconnect; print('prometheus_client' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "False"


# ---- behind the middleware, in process (asyncio, the reference path and trio)


async def raw_stream(scope: Scope, receive: Receive, send: Send) -> None:
    """A raw ASGI token stream that ignores its client: it stops only when send() raises or it is
    cancelled. A path ending in ``/short`` sends two chunks and ends its response."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    for _ in range(2 if scope["path"].endswith("/short") else MAX_CHUNKS):
        await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await anyio.sleep(EVERY)
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize("cancel", [False, True], ids=["observe", "cancel"])
async def test_the_middleware_runs_it_for_an_aborted_stream(cancel: bool) -> None:
    """Behind DisconnectMiddleware, a client that leaves mid-body is counted once, under the route the app set."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        disconnect_state(scope).route = "/stream/{name}"  # what an app whose framework has no templates does
        await raw_stream(scope, receive, send)

    registry = CollectorRegistry()
    wrapped = DisconnectMiddleware(app, cancel=cancel, on_disconnect=[AbortMetrics(registry)])
    outcome = await simulate(wrapped, path="/stream/x", leave=leave.after_chunks(1))
    outcome.assert_aborted(phase="mid_body")
    expected = {labels("GET", "/stream/{name}", "mid_body", str(cancel).lower()): 1.0}
    assert series(registry, COUNTER) == expected
    assert series(registry, f"{HISTOGRAM}_count") == expected
    completed = await simulate(wrapped, path="/stream/short", leave=leave.never())
    completed.assert_completed()
    assert series(registry, COUNTER) == expected


# ---- end to end: real apps on a real uvicorn, scraped over HTTP

Framework = Literal["starlette", "fastapi"]
Mode = Literal["observe", "cancel"]


async def wait_for_departure(scope: Scope) -> str:
    """A handler's slow work: it ends when the client leaves (observe mode) or is cancelled (cancel mode)."""
    state = disconnect_state(scope)
    await state.wait()
    if state.cancel:
        await anyio.sleep_forever()  # the middleware's cancellation ends it
    return "too late"


class DeafStreamResponse(Response):
    """A response that streams ``raw_stream`` and, unlike Starlette's ``StreamingResponse``,
    never listens for the disconnect (as many hand-written responses do)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await raw_stream(scope, receive, send)


async def tokens() -> AsyncIterator[bytes]:
    """An endless-looking token stream (bounded: ``MAX_CHUNKS``)."""
    for _ in range(MAX_CHUNKS):
        yield CHUNK
        await anyio.sleep(EVERY)


def starlette_app(registry: CollectorRegistry) -> ASGIApp:
    """``/items/{item_id}`` (slow), its ``/stream`` (Starlette's), ``/raw`` (a stream deaf to the client) and
    ``/name`` (quick), and ``/metrics`` answering ``generate_latest()``."""

    async def item(request: StarletteRequest) -> Response:
        return StarlettePlainTextResponse(await wait_for_departure(request.scope))

    async def stream(request: StarletteRequest) -> Response:
        return StarletteStreamingResponse(tokens(), media_type="text/plain")

    async def raw(request: StarletteRequest) -> Response:
        return DeafStreamResponse()

    async def name(request: StarletteRequest) -> Response:
        return StarlettePlainTextResponse(f"item {request.path_params['item_id']}")

    async def metrics(request: StarletteRequest) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/items/{item_id}", item),
            Route("/items/{item_id}/stream", stream),
            Route("/items/{item_id}/raw", raw),
            Route("/items/{item_id}/name", name),
            Route("/metrics", metrics),
        ]
    )


def fastapi_app(registry: CollectorRegistry) -> ASGIApp:
    """The same paths in FastAPI, with prometheus_client's own ASGI app mounted at ``/metrics``."""
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int, request: Request) -> PlainTextResponse:
        return PlainTextResponse(await wait_for_departure(request.scope))

    @app.get("/items/{item_id}/stream")
    async def stream(item_id: int) -> StreamingResponse:
        return StreamingResponse(tokens(), media_type="text/plain")

    @app.get("/items/{item_id}/raw")
    async def raw(item_id: int) -> DeafStreamResponse:
        return DeafStreamResponse()

    @app.get("/items/{item_id}/name")
    async def name(item_id: int) -> PlainTextResponse:
        return PlainTextResponse(f"item {item_id}")

    app.mount("/metrics", make_asgi_app(registry=registry))
    return app


APPS: Mapping[Framework, tuple[Callable[[CollectorRegistry], ASGIApp], str]] = {
    # each framework's app, and the path its metrics are scraped at
    "starlette": (starlette_app, "/metrics"),
    "fastapi": (fastapi_app, "/metrics/"),  # a Mount: the trailing slash avoids the redirect
}


async def scrape(live: Live, path: str) -> str:
    """What the app's metrics endpoint answers a real client."""
    outcome = await live.request(path=path)
    outcome.assert_completed()
    assert outcome.status == 200, outcome.summary()
    return outcome.body.decode()


@pytest.mark.server
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn runs on asyncio only
@pytest.mark.parametrize("mode", ["observe", "cancel"])
@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_scraped_metrics_count_real_aborts(framework: Framework, mode: Mode) -> None:
    """On uvicorn, clients that leave before the response and mid-body show up in /metrics under the
    route template, with the phase and whether the handler was cancelled; completed requests add nothing."""
    build, metrics_path = APPS[framework]
    registry = CollectorRegistry()
    cancel = mode == "cancel"
    app = DisconnectMiddleware(build(registry), cancel=cancel, on_disconnect=[AbortMetrics(registry)])
    async with serve(app, server="uvicorn") as live:
        quick = await live.request(path="/items/1/name")
        quick.assert_completed()
        assert quick.body == b"item 1"
        before = await scrape(live, metrics_path)
        assert scraped(before, COUNTER) == {}  # the completed request and the scrape itself count nothing

        for path, departure, phase in [
            ("/items/42", leave.before_response(), "before_response"),
            ("/items/7/stream", leave.after_chunks(1), "mid_body"),
            ("/items/8/raw", leave.after_chunks(1), "mid_body"),
        ]:
            outcome = await live.request(path=path, leave=departure)
            outcome.assert_aborted(phase=phase)
        text = await scrape(live, metrics_path)

        again = await live.request(path="/items/2/name")
        again.assert_completed()
        after = await scrape(live, metrics_path)

    cancelled = str(cancel).lower()
    expected = {
        labels("GET", "/items/{item_id}", "before_response", cancelled): 1.0,
        # Starlette's StreamingResponse listens for the disconnect and stops by itself, so
        # the middleware stands down in cancel mode too: never cancelled
        labels("GET", "/items/{item_id}/stream", "mid_body", "false"): 1.0,
        labels("GET", "/items/{item_id}/raw", "mid_body", cancelled): 1.0,
    }
    assert scraped(text, COUNTER) == expected, text
    assert scraped(text, f"{HISTOGRAM}_count") == expected, text
    buckets = scraped(text, f"{HISTOGRAM}_bucket")
    assert {key - {("le", "+Inf")}: value for key, value in buckets.items() if ("le", "+Inf") in key} == expected
    assert scraped(text, f"{HISTOGRAM}_sum").keys() == expected.keys()
    assert all(value > 0 for value in scraped(text, f"{HISTOGRAM}_sum").values())
    for raw in ("/items/42", "/items/7", "/items/8"):
        assert raw not in text  # route templates, never raw paths
    assert scraped(after, COUNTER) == expected  # a completed request adds nothing
    assert scraped(after, f"{HISTOGRAM}_count") == expected
