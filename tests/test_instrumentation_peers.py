"""What the instrumentation libraries record for aborted requests: the README's table, kept true.

Each test runs ``benchmarks/instrumentation.py``'s measurement for one library (a real
uvicorn, the same three requests, the library alone and behind ``DisconnectMiddleware``
in observe and cancel mode) and asserts what the README says that library records. A new
version that changes its record fails here, and the README's table is rerun
(``.venv/bin/python benchmarks/instrumentation.py``) and rewritten.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import instrumentation  # noqa: E402  (a benchmark script: benchmarks/ is not a package)
from instrumentation import CHUNK_EVERY_S, OURS, SLOW_S, STREAM_CHUNKS, Measured, PeerRecord  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.server]

INSTRUMENTATOR = "prometheus-fastapi-instrumentator"
EXPORTER = "starlette_exporter"
OTEL = "opentelemetry-instrumentation-asgi"
BEFORE, MID, DONE = "before response", "mid-stream", "completed"

FULL_RUN_MS = SLOW_S * 1000 * 0.9  # /slow's handler ran (about) to its end
FULL_STREAM_MS = STREAM_CHUNKS * CHUNK_EVERY_S * 1000
# The status each Prometheus library counted, per (mode, request); None: not counted at all.
STATUS: dict[str, dict[tuple[str, str], str | None]] = {
    INSTRUMENTATOR: {
        ("alone", BEFORE): "2xx",  # the handler's 200, which uvicorn dropped
        ("alone", MID): "2xx",
        ("alone", DONE): "2xx",
        ("observe", BEFORE): "2xx",  # its send wrapper takes the status before send() raises
        ("observe", MID): "2xx",
        ("cancel", BEFORE): "5xx",  # cancelled before http.response.start: its initial 500
        ("cancel", MID): "2xx",
    },
    EXPORTER: {
        ("alone", BEFORE): "200",
        ("alone", MID): "200",
        ("alone", DONE): "200",
        ("observe", BEFORE): "500",  # ClientDisconnected escaped the app: an Exception, so 500
        ("observe", MID): "200",
        ("cancel", BEFORE): None,  # CancelledError is no Exception: it skips the counting
        ("cancel", MID): "200",
    },
}


@pytest.fixture
def anyio_backend() -> str:
    """uvicorn runs on asyncio only."""
    return "asyncio"


async def measure(library: str) -> dict[tuple[str, str], Measured]:
    results = await instrumentation.measure_all([library])
    return {(mode, request): row for (_, mode), run in results.items() for request, row in run.items()}


def record(row: Measured) -> PeerRecord:
    assert row.peer is not None
    return row.peer


def assert_full_run_recorded(rows: dict[tuple[str, str], Measured]) -> None:
    """Alone, a client that left /slow early is timed as the handler's full run, not its stay."""
    row = rows["alone", BEFORE]
    duration = record(row).duration_ms
    assert row.left and row.stayed_ms < SLOW_S * 1000 / 2, row
    assert duration is not None and duration > FULL_RUN_MS, row


def assert_cut_stream_not_full(rows: dict[tuple[str, str], Measured]) -> None:
    """A stream cut off after its first chunk is timed to the cut (Starlette stops it), not to its full length."""
    for mode in ("alone", "observe", "cancel"):
        duration = record(rows[mode, MID]).duration_ms
        assert duration is not None and duration < FULL_STREAM_MS / 4, rows[mode, MID]


@pytest.mark.parametrize("library", [INSTRUMENTATOR, EXPORTER])
async def test_prometheus_peer_counts(library: str) -> None:
    """Each Prometheus library's status label for each abort, alone and behind DisconnectMiddleware."""
    rows = await measure(library)
    counted = {key: record(rows[key]).status if record(rows[key]).counted else None for key in STATUS[library]}
    assert counted == STATUS[library]
    assert_full_run_recorded(rows)
    assert_cut_stream_not_full(rows)


async def test_opentelemetry_spans() -> None:
    """OpenTelemetry's server span: a success alone, an ERROR under observe, no status at all when cancelled."""
    rows = await measure(OTEL)
    normal = record(rows["alone", DONE])
    assert (normal.span_status, normal.status, normal.events) == ("UNSET", "200", ())
    for key in [("alone", BEFORE), ("alone", MID), ("observe", MID), ("cancel", MID)]:
        assert record(rows[key]).same_as(normal), (key, rows[key])
    # observe: the handler's send() raised ClientDisconnected, an Exception that use_span records
    observed = record(rows["observe", BEFORE])
    assert observed.span_status is not None and observed.span_status.startswith("ERROR (ClientDisconnected")
    assert observed.events == ("exception: asgi_disconnect._exceptions.ClientDisconnected",)
    # cancel: CancelledError is a BaseException, which use_span does not record
    cancelled = record(rows["cancel", BEFORE])
    assert (cancelled.span_status, cancelled.status, cancelled.error_type, cancelled.events) == (
        "UNSET",
        None,
        None,
        (),
    )
    assert_full_run_recorded(rows)
    assert_cut_stream_not_full(rows)


async def test_asgi_disconnect_records_each_abort() -> None:
    """This package's event for the same requests: the phase, the detection at the departure, the cancellation."""
    rows = await measure(OURS)
    for mode in ("observe", "cancel"):
        before, mid, done = (rows[mode, request] for request in (BEFORE, MID, DONE))
        assert done.events == []
        assert [row.event and row.event["phase"] for row in (before, mid)] == ["before_response", "mid_body"]
        # Detected while the handler still had work to do (not when it ended): the slow
        # handler's run, the whole stream's length.
        for row, whole_ms in ((before, SLOW_S * 1000), (mid, FULL_STREAM_MS)):
            assert row.event is not None and len(row.events) == 1
            assert row.event["detected_after_ms"] < whole_ms / 2, row
    observed = rows["observe", BEFORE]
    assert observed.event is not None and observed.event["cancelled"] is False
    cancelled = rows["cancel", BEFORE]
    assert cancelled.event is not None and cancelled.event["cancelled"] is True
    assert cancelled.ran_on_ms is not None and cancelled.ran_on_ms < SLOW_S * 1000 / 2, cancelled  # stopped early
