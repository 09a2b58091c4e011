"""``asgi-disconnect doctor``: how do the ASGI servers installed here report a client that leaves?

For each server (and each of uvicorn's HTTP implementations) found with
``importlib.util.find_spec``, the doctor starts ``sys.executable -m <server>`` on a free
port of 127.0.0.1, serving ``probe_app`` from this module, and drives it with a raw
stdlib-socket client: request ``/probe``, read the first body chunk, close (an orderly
FIN, then an abortive RST on a second request). The probe app records, in the server's
process, the ``scope["asgi"]`` it was given, when ``receive()`` returned
``http.disconnect`` and what ``send()`` did afterwards; the client fetches that record
from ``/results``. ``/probe-wrapped`` repeats the probe behind ``DisconnectMiddleware``
with an app that never calls ``receive()``.

Timing compares ``time.monotonic()`` across the two processes: on Linux (and macOS and
Windows) that clock is system-wide, so the client's value just before ``close()`` and
the server's value when the disconnect reached the app are on one time line.

Only the standard library and this package are imported here: the servers are looked
up, never imported, and run in their own processes, which the doctor always stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs

import anyio
import anyio.lowlevel

import asgi_disconnect
from asgi_disconnect import ClientDisconnected, DisconnectMiddleware, disconnect_state
from asgi_disconnect._loopback import HOST, CloseKind, ServerStartError, free_port, get, request_then_leave, run_process
from asgi_disconnect._types import Message, Receive, Scope, Send

# --------------------------------------------------------------------------- limits
#: How long the probe app waits for ``http.disconnect`` after the client's close.
DISCONNECT_WAIT = 1.0
#: Body messages the probe app sends after the disconnect (the last one ends the body):
#: more than one, as a server may notice the closed socket only at a later write.
_SENDS_AFTER = 3
#: How long one of those ``send()`` calls may block before it counts as "blocked".
_SEND_TIMEOUT = 1.0
#: How long a server may take to start answering on its port.
_START_TIMEOUT = 15.0
#: Socket timeout of every client operation.
_IO_TIMEOUT = 5.0
#: How long a server may take to stop after SIGTERM before it (and its workers) get SIGKILL.
_STOP_TIMEOUT = 3.0
#: Probes per app and close: the delay reported is their median, as one sample on a busy
#: machine can be an outlier. A probe that saw no disconnect at all is not repeated.
_REPEAT = 3
#: Pause after each group of probes so that the server has logged what it logs about them.
_LOG_SETTLE = 0.1

FIRST_CHUNK = b"asgi-disconnect probe: first chunk\n"
_LATER_CHUNK = b"." * 1024 + b"\n"

AppKind = Literal["bare", "wrapped"]
SendOutcome = Literal["raised", "dropped", "blocked", "unfinished"]
Status = Literal["ok", "not installed", "error"]

_APP_TARGET = f"{__name__}:probe_app"


# --------------------------------------------------------------------------- servers
@dataclasses.dataclass(frozen=True)
class ServerSpec:
    """How to find and start one server (or one implementation of a server)."""

    key: str
    name: str
    #: the distribution whose version is reported
    package: str
    #: modules that must be importable, checked in order (a dotted name imports its
    #: parents, so it goes after the plain names that guard it)
    requires: tuple[str, ...]
    #: ``python -m`` arguments for a port
    argv: Callable[[int], list[str]]
    #: the distribution of the implementation, reported next to the server's version
    implementation: str | None = None


def _uvicorn(http: str) -> Callable[[int], list[str]]:
    return lambda port: ["uvicorn", "--host", HOST, "--port", str(port), "--http", http, _APP_TARGET]


def _hypercorn(worker_class: str) -> Callable[[int], list[str]]:
    # --workers 0 serves from the process we start (no multiprocessing spawn): quicker,
    # and the probe records live in the one process that answers /results.
    return lambda port: ["hypercorn", "--bind", f"{HOST}:{port}", "--workers", "0", "-k", worker_class, _APP_TARGET]


def _granian(port: int) -> list[str]:
    # One worker (a process granian spawns): the records of the probes live in one process.
    return ["granian", "--interface", "asgi", "--host", HOST, "--port", str(port), "--workers", "1", _APP_TARGET]


def _daphne(port: int) -> list[str]:
    return ["daphne", "-b", HOST, "-p", str(port), _APP_TARGET]


SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("uvicorn-h11", "uvicorn (h11)", "uvicorn", ("uvicorn", "h11"), _uvicorn("h11"), "h11"),
    ServerSpec(
        "uvicorn-httptools",
        "uvicorn (httptools)",
        "uvicorn",
        ("uvicorn", "httptools"),
        _uvicorn("httptools"),
        "httptools",
    ),
    ServerSpec(
        "uvicorn-zttp",
        "uvicorn (zttp)",
        "uvicorn",
        ("uvicorn", "zttp", "uvicorn.protocols.http.zttp_impl"),
        _uvicorn("zttp"),
        "zttp",
    ),
    ServerSpec("hypercorn-asyncio", "hypercorn (asyncio)", "hypercorn", ("hypercorn",), _hypercorn("asyncio")),
    ServerSpec("hypercorn-trio", "hypercorn (trio)", "hypercorn", ("hypercorn", "trio"), _hypercorn("trio"), "trio"),
    ServerSpec("granian", "granian", "granian", ("granian",), _granian),
    ServerSpec("daphne", "daphne", "daphne", ("daphne",), _daphne),
)


# --------------------------------------------------------------------------- results
@dataclasses.dataclass
class ProbeResult:
    """What one probe saw: one app (plain or wrapped) and one way of closing."""

    app: AppKind
    close: CloseKind
    #: client's close -> ``receive()`` returned ``http.disconnect`` (plain app) or the
    #: middleware detected it (wrapped app), median of the samples; ``None``: not within
    #: ``DISCONNECT_WAIT`` in one of them
    disconnect_ms: float | None
    send_after_disconnect: SendOutcome
    #: ``module.QualName`` of what ``send()`` raised, if it raised
    send_error: str | None
    send_error_is_oserror: bool | None
    samples_ms: list[float | None] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ServerReport:
    """One row of the doctor's table."""

    key: str
    name: str
    status: Status
    package: str
    version: str | None
    implementation: str | None = None
    missing: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    command: list[str] = dataclasses.field(default_factory=list)
    port: int | None = None
    asgi_version: str | None = None
    #: ``scope["asgi"]["spec_version"]`` as given; ``None`` when absent (the spec then means 2.0)
    spec_version: str | None = None
    event_loop: str | None = None
    probes: list[ProbeResult] = dataclasses.field(default_factory=list)
    #: tracebacks the server printed while each app was probed
    tracebacks: dict[str, int] = dataclasses.field(default_factory=dict)
    #: the exception line of each of those tracebacks
    logged_exceptions: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def probe(self, app: AppKind, close: CloseKind) -> ProbeResult | None:
        """The probe of ``app`` closed with ``close``, if it ran."""
        return next((p for p in self.probes if p.app == app and p.close == close), None)


class _ProbeError(Exception):
    """A server could not be probed; the message goes into its row."""


# --------------------------------------------------------------------------- the probe app
# Records of the probes, by id, in the server's process: written by the probe, read (and
# removed) by /results. The client asks for each record once, so this stays small.
_PROBES: dict[str, dict[str, Any]] = {}
_MAX_RECORDS = 64


async def probe_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI app each server serves: ``/probe``, ``/probe-wrapped``, ``/results``, ``/ready``."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return  # websocket: the server closes it
    path = scope["path"]
    if path == "/probe":
        await _plain_probe(scope, receive, send)
    elif path == "/probe-wrapped":
        await _WRAPPED_PROBE(scope, receive, send)
    elif path == "/results":
        await _results(send, _probe_id(scope))
    elif path == "/ready":
        # Load anyio's backend now: imported during the first probe, it would delay that
        # probe's receive() and show up as a slow disconnect.
        with anyio.move_on_after(1.0):
            await anyio.lowlevel.checkpoint()
        await _respond(send, 200, b"ready\n", b"text/plain")
    else:
        await _respond(send, 404, b"not found\n", b"text/plain")


async def _lifespan(receive: Receive, send: Send) -> None:
    # Supported, so that no server logs "lifespan unsupported" into the output we scan.
    for _ in range(2):  # startup, then shutdown
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _probe_id(scope: Scope) -> str:
    return parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1")).get("id", ["probe"])[0]


def _new_record(scope: Scope) -> dict[str, Any]:
    asgi = scope.get("asgi") or {}
    record: dict[str, Any] = {
        "asgi_version": asgi.get("version"),
        "spec_version": asgi.get("spec_version"),
        "event_loop": _event_loop(),
        "disconnect_at": None,
        "send_after_disconnect": "unfinished",
        "send_error": None,
        "send_error_is_oserror": None,
        "done": False,
    }
    if len(_PROBES) >= _MAX_RECORDS:  # records nobody fetched: drop the oldest
        del _PROBES[next(iter(_PROBES))]
    _PROBES[_probe_id(scope)] = record
    return record


def _event_loop() -> str:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "trio" if "trio" in sys.modules else "unknown"
    return f"{type(loop).__module__}.{type(loop).__qualname__}"


async def _start_stream(send: Send) -> None:
    # No content-length: a streaming (chunked) response, like SSE or an LLM proxy.
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": FIRST_CHUNK, "more_body": True})


async def _plain_probe(scope: Scope, receive: Receive, send: Send) -> None:
    """A streaming app without the middleware: it waits in ``receive()``, then sends on."""
    record = _new_record(scope)
    try:
        await _start_stream(send)
        with anyio.move_on_after(DISCONNECT_WAIT):
            for _ in range(100):  # a bodiless request: one http.request, then the disconnect
                message = await receive()
                if message["type"] == "http.disconnect":
                    record["disconnect_at"] = time.monotonic()
                    break
        await _send_after_disconnect(send, record)
    finally:
        record["done"] = True


async def _wrapped_inner(scope: Scope, receive: Receive, send: Send) -> None:
    """The same streaming app behind ``DisconnectMiddleware``; it never calls ``receive()``."""
    record = _new_record(scope)
    try:
        state = disconnect_state(scope)
        await _start_stream(send)
        with anyio.move_on_after(DISCONNECT_WAIT):
            await state.wait()
        record["disconnect_at"] = state.detected_at
        await _send_after_disconnect(send, record)
    finally:
        record["done"] = True


_WRAPPED_PROBE = DisconnectMiddleware(_wrapped_inner)


async def _send_after_disconnect(send: Send, record: dict[str, Any]) -> None:
    """Send the rest of the body; record whether ``send()`` raised, returned, or hung."""
    for i in range(_SENDS_AFTER):
        last = i == _SENDS_AFTER - 1
        message: Message = {"type": "http.response.body", "body": _LATER_CHUNK, "more_body": not last}
        with anyio.move_on_after(_SEND_TIMEOUT) as timeout:
            try:
                await send(message)
            except Exception as exc:
                record["send_after_disconnect"] = "raised"
                record["send_error"] = f"{type(exc).__module__}.{type(exc).__qualname__}"
                record["send_error_is_oserror"] = isinstance(exc, OSError)
                # Let it escape as an app would (Starlette's StreamingResponse does): the
                # traceback column shows whether the server then logs one.
                raise
        if timeout.cancelled_caught:
            record["send_after_disconnect"] = "blocked"
            return
        if not last:
            await anyio.sleep(0.01)  # time for the server to notice the closed socket
    record["send_after_disconnect"] = "dropped"


async def _results(send: Send, probe_id: str) -> None:
    # The client asks right after its close: wait (bounded) for the probe to finish.
    deadline = time.monotonic() + DISCONNECT_WAIT + _SENDS_AFTER * _SEND_TIMEOUT + 1.0
    for _ in range(2000):
        record = _PROBES.get(probe_id)
        if record is None or record["done"] or time.monotonic() > deadline:
            break
        await anyio.sleep(0.005)
    body = json.dumps(_PROBES.pop(probe_id, None)).encode()
    await _respond(send, 200, body, b"application/json")


# --------------------------------------------------------------------------- one server
def _missing(spec: ServerSpec) -> list[str]:
    for module in spec.requires:
        try:
            found = importlib.util.find_spec(module) is not None
        except Exception:  # a dotted name whose parent is missing, or fails to import
            found = False
        if not found:
            return [module]  # the first one: later names may depend on it
    return []


def _version(distribution: str | None) -> str | None:
    if distribution is None:
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_server(spec: ServerSpec) -> ServerReport:
    """Start ``spec``'s server, probe it, stop it; never raises for a server that misbehaves."""
    report = ServerReport(key=spec.key, name=spec.name, status="ok", package=spec.package, version=None)
    report.missing = _missing(spec)
    if report.missing:
        report.status = "not installed"
        return report
    report.version = _version(spec.package)
    if spec.implementation is not None:
        report.implementation = f"{spec.implementation} {_version(spec.implementation) or '?'}"
    started = time.monotonic()
    port = free_port()  # another process taking it fails only this server's row
    report.port = port
    report.command = [sys.executable, "-m", *spec.argv(port)]
    with tempfile.TemporaryDirectory(prefix="asgi-disconnect-doctor-") as tmp:
        log_path = Path(tmp) / "server.log"
        try:
            _run_probes(report, port, log_path)
        except (_ProbeError, ServerStartError) as exc:
            report.status = "error"
            report.error = str(exc)
        except Exception as exc:  # timeouts, refused connections, odd answers: one row fails, not the table
            report.status = "error"
            report.error = f"{type(exc).__name__}: {exc}"
    report.seconds = round(time.monotonic() - started, 2)
    return report


_SERVER_ENV_PREFIXES = ("UVICORN_", "GRANIAN_", "HYPERCORN_", "DAPHNE_")
# Each app is probed with both closes; the log is scanned per app, so that a traceback
# the server prints for the plain app is never counted against the wrapped one.
_PLAN: tuple[tuple[AppKind, str], ...] = (("bare", "/probe"), ("wrapped", "/probe-wrapped"))
_CLOSES: tuple[CloseKind, ...] = ("fin", "rst")


def _run_probes(report: ServerReport, port: int, log_path: Path) -> None:
    # The servers' own defaults, not a deployment's: UVICORN_WORKERS=4 or GRANIAN_WORKERS
    # would spread the probes over processes that do not share their records.
    env = {name: value for name, value in os.environ.items() if not name.startswith(_SERVER_ENV_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"  # the log is complete when we read it
    # run_process stops the server's whole process group: the workers it spawned (granian) too.
    with run_process(
        report.command,
        port,
        ready="/ready",
        output=log_path,
        env=env,
        start_timeout=_START_TIMEOUT,
        stop_timeout=_STOP_TIMEOUT,
    ):
        for app, path in _PLAN:
            logged_before = log_path.stat().st_size
            for close in _CLOSES:
                results: list[ProbeResult] = []
                for i in range(_REPEAT):
                    result, record = _probe_once(port, app, path, close, f"{app}-{close}-{i}")
                    results.append(result)
                    if report.asgi_version is None:
                        report.asgi_version = record["asgi_version"]
                        report.spec_version = record["spec_version"]
                        report.event_loop = record["event_loop"]
                    if result.disconnect_ms is None:
                        break  # no disconnect within the wait: repeating would only repeat the wait
                report.probes.append(_merge(results))
            time.sleep(_LOG_SETTLE)
            tracebacks, exceptions = _scan_log(log_path.read_bytes()[logged_before:])
            report.tracebacks[app] = tracebacks
            report.logged_exceptions += exceptions


def _merge(results: list[ProbeResult]) -> ProbeResult:
    """One result for repeated probes: the median delay; a send() that raised, if one did."""
    samples = [result.disconnect_ms for result in results]
    delivered = [ms for ms in samples if ms is not None]
    first = next((result for result in results if result.send_after_disconnect != "dropped"), results[0])
    return dataclasses.replace(
        first,
        disconnect_ms=statistics.median(delivered) if len(delivered) == len(samples) else None,
        samples_ms=samples,
    )


def _probe_once(
    port: int, app: AppKind, path: str, close: CloseKind, probe_id: str
) -> tuple[ProbeResult, dict[str, Any]]:
    left_at = request_then_leave(port, f"{path}?id={probe_id}", until=FIRST_CHUNK, how=close, timeout=_IO_TIMEOUT)
    response = get(port, f"/results?id={probe_id}", timeout=DISCONNECT_WAIT + _SENDS_AFTER * _SEND_TIMEOUT + 3)
    record = json.loads(response.body) if response.status == 200 else None
    if not isinstance(record, dict):
        raise _ProbeError(f"no result for {path} ({close.upper()}): HTTP {response.status} {response.body[:120]!r}")
    disconnect_at = record["disconnect_at"]
    result = ProbeResult(
        app=app,
        close=close,
        disconnect_ms=None if disconnect_at is None else round((disconnect_at - left_at) * 1000, 3),
        send_after_disconnect=record["send_after_disconnect"],
        send_error=record["send_error"],
        send_error_is_oserror=record["send_error_is_oserror"],
    )
    return result, record


_TRACEBACK = re.compile(r"^(?:\s*\+ Exception Group )?Traceback \(most recent call last\):", re.MULTILINE)
_CHAINED = re.compile(
    r"^\s*(?:During handling of the above exception|The above exception was the direct cause)", re.MULTILINE
)


def _scan_log(data: bytes) -> tuple[int, list[str]]:
    """Count the tracebacks in a server's output (a chain counts once); list their exceptions."""
    text = data.decode("utf-8", "replace")
    count = max(len(_TRACEBACK.findall(text)) - len(_CHAINED.findall(text)), 0)
    exceptions: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not _TRACEBACK.match(line):
            continue
        for follow in lines[i + 1 : i + 400]:
            # The exception line is the first one after the frames that is not indented.
            if follow and not follow[0].isspace() and not follow.startswith("Traceback"):
                exceptions.append(follow.strip()[:200])
                break
    return count, exceptions


# --------------------------------------------------------------------------- the report
def run_doctor(as_json: bool) -> int:
    """Probe every known server, print the table (or JSON), return 0 once probing ran."""
    progress = sys.stderr.isatty() and not as_json
    reports: list[ServerReport] = []
    for spec in SERVERS:
        if progress:
            print(f"\rprobing {spec.name} ...".ljust(60), end="", file=sys.stderr, flush=True)
        reports.append(probe_server(spec))
    if progress:
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
    if as_json:
        document = {
            "asgi_disconnect": asgi_disconnect.__version__,
            "python": platform.python_version(),
            "platform": sys.platform,
            "disconnect_wait_s": DISCONNECT_WAIT,
            "servers": [dataclasses.asdict(report) for report in reports],
            "summary": interpret(reports),
        }
        print(json.dumps(document, indent=2))
    else:
        print(format_report(reports))
    return 0


_CLIENT_DISCONNECTED = f"{ClientDisconnected.__module__}.{ClientDisconnected.__qualname__}"
_GROUPS = (
    (3, 6, "plain app, waits in receive()"),
    (6, 9, "DisconnectMiddleware, app never reads"),
)
_HEADER = [
    "server",
    "version",
    "ASGI/spec",
    "disconnect",
    "send() after",
    "traceback",
    "detected",
    "send() after",
    "traceback",
]


def format_report(reports: Sequence[ServerReport]) -> str:
    """The doctor's text output: a table, a legend and what it means."""
    rows: list[list[str]] = []
    for report in reports:
        if report.status == "not installed":
            rows.append([report.name, "-", f"not installed (needs {', '.join(report.missing)})"])
        elif report.status == "error":
            rows.append([report.name, report.version or "-", f"error: {report.error}"])
        else:
            spec = report.spec_version or "none"
            row = [report.name, report.version or "?", f"{report.asgi_version or '?'}/{spec}"]
            for app in ("bare", "wrapped"):
                row += [_delays(report, app), _sends(report, app), _tracebacks(report, app)]
            rows.append(row)
    full = [_HEADER] + [row for row in rows if len(row) == len(_HEADER)]
    widths = [max(len(row[i]) for row in full) for i in range(len(_HEADER))]

    def line(cells: Sequence[str]) -> str:
        # A short row (not installed, error) lets its last cell run across the rest.
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(cells[:-1])] + [cells[-1]]
        return "  ".join(padded).rstrip()

    groups = ""
    for start, end, title in _GROUPS:
        column = sum(widths[:start]) + 2 * start
        span = sum(widths[start:end]) + 2 * (end - start - 1)
        groups = groups.ljust(column) + f"-- {title} ".ljust(span, "-")
    groups = groups.rstrip()
    out = [
        "asgi-disconnect doctor: what the ASGI servers installed here do when a client leaves mid-response",
        "",
        groups,
        line(_HEADER),
        *(line(row) for row in rows),
        "",
        _fill(
            f"disconnect: from the client's close (FIN/RST) to receive() returning http.disconnect, median of "
            f"{_REPEAT}; detected: to the middleware knowing it; '-': not within "
            f"{DISCONNECT_WAIT:g} s. send() after: what the next send() did (dropped: returned as if "
            "delivered). traceback: the server logged one. ASGI/spec: scope['asgi'] version/spec_version."
        ),
        "",
        *(_fill(sentence) for sentence in interpret(reports)),
    ]
    return "\n".join(out)


def _fill(text: str) -> str:
    return textwrap.fill(text, width=100)


def _delays(report: ServerReport, app: AppKind) -> str:
    values = [report.probe(app, close) for close in _CLOSES]
    delays = [None if p is None else p.disconnect_ms for p in values]
    if all(d is None for d in delays):
        return f"not in {DISCONNECT_WAIT:g} s"
    return "/".join("-" if d is None else f"{d:.1f}" for d in delays) + " ms"


def _sends(report: ServerReport, app: AppKind) -> str:
    outcomes: list[str] = []
    for close in _CLOSES:
        probe = report.probe(app, close)
        if probe is None:
            outcome = "-"
        elif probe.send_after_disconnect == "raised" and probe.send_error:
            outcome = "raises " + probe.send_error.rpartition(".")[2]
        else:
            outcome = probe.send_after_disconnect
        if outcome not in outcomes:
            outcomes.append(outcome)
    return " / ".join(outcomes)


def _tracebacks(report: ServerReport, app: AppKind) -> str:
    count = report.tracebacks.get(app, 0)
    return f"yes ({count})" if count else "no"


def _names(reports: Sequence[ServerReport]) -> str:
    names = [report.name for report in reports]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def interpret(reports: Sequence[ServerReport]) -> list[str]:
    """What the results mean for an app on these servers, in a few sentences."""
    ok = [r for r in reports if r.status == "ok"]
    failed = [r for r in reports if r.status == "error"]
    sentences: list[str] = []
    if not ok:
        if not failed:
            return ["No ASGI server is installed here: install uvicorn, hypercorn, granian or daphne."]
        return [f"Not probed, see the error: {_names(failed)} (`--json` also shows the command)."]

    def plain(r: ServerReport) -> list[ProbeResult]:
        return [p for p in r.probes if p.app == "bare"]

    raising = [r for r in ok if any(p.send_error_is_oserror for p in plain(r))]
    other = [r for r in ok if r not in raising and any(p.send_after_disconnect == "raised" for p in plain(r))]
    if not raising:
        sentences.append(
            "No server here raises an OSError from send() after a disconnect (ASGI 2.4 asks for one), so a "
            "handler learns that its client left only if it calls receive(), which most never do: wrap the app "
            "in DisconnectMiddleware, whose send() raises ClientDisconnected on every server."
        )
    else:
        quiet = [r for r in ok if r not in raising]
        sentences.append(
            f"send() raises an OSError after a disconnect (ASGI 2.4) on {_names(raising)}"
            + (f", not on {_names(quiet)}; DisconnectMiddleware's send() raises on all of them." if quiet else ".")
        )
    if other:
        sentences.append(
            f"On {_names(other)}, send() raises something other than an OSError: code written for ASGI 2.4 misses it."
        )
    late = [r for r in ok if any(p.disconnect_ms is None for p in plain(r))]
    if late:
        sentences.append(f"No http.disconnect within {DISCONNECT_WAIT:g} s of the close from {_names(late)}.")
    noisy = [r for r in ok if r.tracebacks.get("bare")]
    if noisy:
        quiet_wrapped = all(not r.tracebacks.get("wrapped") for r in noisy)
        sentences.append(
            f"A traceback in the log of {_names(noisy)} for a client that simply left"
            + ("; behind DisconnectMiddleware, none." if quiet_wrapped else ".")
        )
    missed = [
        r
        for r in ok
        if any(p.disconnect_ms is None or p.send_error != _CLIENT_DISCONNECTED for p in r.probes if p.app == "wrapped")
    ]
    if missed:
        sentences.append(
            f"DisconnectMiddleware missed a disconnect on {_names(missed)}: please report it with the output of "
            "`asgi-disconnect doctor --json`."
        )
    unversioned = [r for r in ok if r.spec_version is None]
    if unversioned:
        sentences.append(f"No spec_version from {_names(unversioned)}: the ASGI spec reads that as 2.0.")
    if failed:
        sentences.append(f"Not probed, see the error: {_names(failed)} (`--json` also shows the command).")
    return sentences
