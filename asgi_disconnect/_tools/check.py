"""``asgi-disconnect check MODULE:APP --path P``: the doctor for the user's own app.

The app is imported as uvicorn imports it and served three times on a real uvicorn on
127.0.0.1, in this process (``asgi_disconnect.testing.serve``): bare (as given), behind
``DisconnectMiddleware`` in observe mode, and in cancel mode. For each path one client
leaves ``LEAVE_AFTER`` seconds after the handler was called, before the response is
complete, and one leaves after the first body chunk (both with a FIN); each result says
how long the handler kept running after its client left and whether it was told.

Whether the handler was told is seen by a probe, a thin ASGI layer right in front of the
app (under the middleware, when there is one): it records ``receive()`` returning
``http.disconnect`` before the app finished its response, a ``send()`` that raised an
``OSError`` (``ClientDisconnected`` is one), and a cancellation that came through it
(not the harness's own at the timeout). An app that installs ``DisconnectMiddleware``
itself has the probe outside its middleware: there, the app's own ``DisconnectState``
says it (the middleware recorded the departure, or cancelled the handler).

Requests run one at a time, so that the timings and the server's log lines belong to one
request. The harness cancels a handler still running at the timeout; a watchdog thread
ends the process if the event loop makes no progress at all (a handler that blocks it,
or that ignores cancellation), so the command always ends.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import os
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import anyio
import structlog

from asgi_disconnect import DisconnectMiddleware
from asgi_disconnect._types import ASGIApp, Message, Receive, Scope, Send
from asgi_disconnect.testing import CANCEL_WAIT, Departure, Outcome, ServerStartError, _wrong_signature, leave, serve

#: Seconds after the handler was called at which the first client leaves: long enough for
#: uvicorn and the framework to route the request and the handler to be inside its work,
#: short enough that anything slower than a quick lookup (a query, an upstream call, the
#: first LLM token) is still running. A handler that answers within it has nothing to stop.
LEAVE_AFTER = 0.05
#: The default of ``--timeout``: a handler still running this long after its client left
#: is reported as still running. Any figure past the budget fails; the timeout decides only
#: between a figure and "still running" (2 s tells a slow query or upstream call from a
#: handler that never stops) and bounds the run: a hung path costs about 4 timeouts.
DEFAULT_TIMEOUT = 2.0
DEFAULT_BUDGET_MS = 100.0
#: How long the server may take to start (the app's lifespan startup included).
START_TIMEOUT = 10.0
#: How long the server gives the requests still running when it stops (all were cancelled).
STOP_TIMEOUT = 2
#: Slack the watchdog gives each step beyond its own timeouts before it ends the process.
_WATCHDOG_SLACK = 3.0

Variant = Literal["bare", "observe", "cancel"]
Mode = Literal["observe", "cancel"]
DepartureName = Literal["before_response", "mid_body"]
#: Whether the client could leave: ``left`` before the app finished its response;
#: ``answered``: the app finished it first; ``not_reached``: no body chunk came within the
#: timeout, so the mid-body client never reached its departure point.
Client = Literal["left", "answered", "not_reached"]
#: How the handler was told: ``receive`` (``http.disconnect``), ``send`` (an ``OSError``),
#: ``cancel`` (a cancellation), ``middleware`` (the app's own middleware recorded it).
Signal = Literal["receive", "send", "cancel", "middleware"]

VARIANTS: tuple[Variant, ...] = ("bare", "observe", "cancel")
DEPARTURES: tuple[DepartureName, ...] = ("before_response", "mid_body")
_DEPARTURE_LABELS = {"before_response": "before response", "mid_body": "mid-body"}

DESCRIPTION = (
    "Serve your app on a real uvicorn on 127.0.0.1 three times: bare, behind DisconnectMiddleware in "
    "observe mode and in cancel mode. For each path, a client leaves before the response and one "
    "leaves mid-body; report how long the handler kept running after its client left."
)
EPILOG = f"""\
what each result says:
  ran_after_ms    from the client's departure to the handler's return; null: still
                  running at the timeout (--timeout S after the first client left; the
                  mid-body request gets S in all, its client leaving at the first chunk)
  saw_disconnect  the handler was told, whatever it then did: receive() returned
                  http.disconnect before it finished its response, a send() raised an
                  OSError (ClientDisconnected is one), or it was cancelled. With an app
                  that installs DisconnectMiddleware itself: its middleware recorded the
                  departure (the handler's next send() raises) or cancelled the handler.
  client          left; answered (the response was complete before the client could
                  leave: nothing to judge, ran_after_ms 0); not_reached (no body chunk
                  within the timeout: the mid-body client never left)

The first client leaves {LEAVE_AFTER * 1000:g} ms after the handler was called, the second after the
first body chunk. A result's ran_after_ms is the worse of the two departures where the
client left, its saw_disconnect true only if the handler saw both.

exit status: 1 if, in --mode, a handler ran longer than --budget-ms after its client left
(or was still running at the timeout); 0 otherwise; 2 on a usage error, an app that cannot
be imported or a server that cannot start. An app that installs DisconnectMiddleware itself
is judged as configured: the bare run is its configured run, and --mode does not apply.
"""


class UsageError(Exception):
    """The command line or the app it names is not usable; the message says why (exit 2)."""


# --------------------------------------------------------------------------- the app
def load_app(target: str, *, app_dir: str = ".", factory: bool = False) -> ASGIApp:
    """Import ``module:attribute`` as uvicorn does (``app_dir`` first on ``sys.path``).

    The attribute may be dotted; with ``factory`` it is called without arguments and
    returns the app. Raises ``UsageError`` with a one-line message for a bad string, a
    missing module or attribute, or something that is not an ASGI app; an exception raised
    by the user's module (or factory) propagates as it is.
    """
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f'import string "{target}" must be in format "<module>:<attribute>"')
    sys.path.insert(0, app_dir)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name and not module_name.startswith(f"{exc.name}."):
            raise  # the module exists: something it imports is missing
        raise UsageError(
            f'could not import module "{module_name}" (looked in {os.path.abspath(app_dir)} and sys.path; '
            "--app-dir sets the directory)"
        ) from None
    value: Any = module
    for name in attribute.split("."):
        try:
            value = getattr(value, name)
        except AttributeError:
            raise UsageError(f'attribute "{attribute}" not found in module "{module_name}"') from None
    if factory:
        if not callable(value):
            raise UsageError(f'--factory: "{target}" is {type(value).__name__}, not a callable that returns the app')
        try:
            value = value()
        except TypeError as exc:  # as uvicorn: a factory that takes arguments
            raise UsageError(f'--factory: "{target}" cannot be called without arguments: {exc}') from None
    _check_asgi(target, value, factory)
    app: ASGIApp = value
    return app


def _check_asgi(target: str, value: Any, factory: bool) -> None:
    """Raise ``UsageError`` unless ``value`` can be called as ``app(scope, receive, send)``."""
    if not callable(value):
        raise UsageError(f'"{target}" is {type(value).__name__}, not an ASGI app')
    signature = _wrong_signature(value)
    if signature is not None:
        if not factory and not signature.parameters:
            hint = ": a factory? add --factory"
        else:
            hint = " (an ASGI 2 app? wrap it with asgiref.compatibility.guarantee_single_callable)"
        raise UsageError(
            f'"{target}"{" returned something that" if factory else ""} is not an ASGI 3 app, called as '
            f"app(scope, receive, send): its signature is {signature}{hint}"
        )


# --------------------------------------------------------------------------- the probe
@dataclasses.dataclass
class _Record:
    """What the probe saw of one request."""

    started_at: float
    #: when the app sent the last message of its response
    finished_at: float | None = None
    #: how the handler was told, in order, each once
    signals: list[Signal] = dataclasses.field(default_factory=list)

    def told(self, signal: Signal) -> None:
        if signal not in self.signals:
            self.signals.append(signal)


class _Probe:
    """The ASGI layer right in front of the app: it records, per HTTP request, what the
    app was told of its client's departure. It passes the scope, the messages and what
    the app raises through untouched; the records are read one request at a time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.records: list[_Record] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = _Record(time.monotonic())
        self.records.append(record)
        trailers = False

        async def probed_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and record.finished_at is None:
                record.told("receive")
            return message

        async def probed_send(message: Message) -> None:
            nonlocal trailers
            try:
                await send(message)
            except OSError:
                record.told("send")
                raise
            if message["type"] == "http.response.start":
                trailers = bool(message.get("trailers", False))
            elif _ends_response(message, trailers):
                record.finished_at = time.monotonic()

        try:
            await self.app(scope, probed_receive, probed_send)
        except anyio.get_cancelled_exc_class():
            record.told("cancel")
            raise


def _ends_response(message: Message, trailers: bool) -> bool:
    """Whether ``message`` is the last of the response (trailers, when announced, come last)."""
    kind = message["type"]
    if kind in ("http.response.body", "http.response.zerocopysend"):
        return not trailers and not message.get("more_body", False)
    if kind == "http.response.trailers":
        return not message.get("more_trailers", False)
    return bool(kind == "http.response.pathsend")


# --------------------------------------------------------------------------- results
@dataclasses.dataclass
class DepartureResult:
    """One request of one run: where its client left and what the handler did then."""

    client: Client
    #: departure -> the handler's return; None: still running at the timeout
    ran_after_ms: float | None
    #: None where the client did not leave: there was nothing to see
    saw_disconnect: bool | None
    told_by: list[Signal]
    over_budget: bool
    status: int | None
    #: the middleware's phase of the departure (None without a middleware)
    phase: str | None
    tracebacks: int
    #: the exception line of the first traceback the server logged
    first_traceback: str | None
    #: what escaped the app to the server
    exception: str | None


@dataclasses.dataclass
class RunResult:
    """One run (bare, observe or cancel) of one path: its two departures, summed up."""

    #: the mode the middleware ran in; for bare, the app's own middleware's (None: none)
    middleware: Mode | None
    #: True for the bare run of an app that installs DisconnectMiddleware itself
    configured: bool
    #: True for the run that decides the exit status
    judged: bool
    #: the worse of the departures where the client left (None: still running; 0: none left)
    ran_after_ms: float | None
    #: True only if the handler saw every departure where the client left (None: none left)
    saw_disconnect: bool | None
    client_left: bool
    over_budget: bool
    tracebacks: int
    departures: dict[DepartureName, DepartureResult]


@dataclasses.dataclass
class PathReport:
    path: str
    results: dict[Variant, RunResult]

    @property
    def configured(self) -> Mode | None:
        """The mode of the DisconnectMiddleware the app installs itself on this path, if any."""
        bare = self.results["bare"]
        return bare.middleware if bare.configured else None


@dataclasses.dataclass(frozen=True)
class Options:
    """What the command line asks for."""

    paths: tuple[str, ...]
    mode: Mode = "observe"
    budget_ms: float = DEFAULT_BUDGET_MS
    timeout: float = DEFAULT_TIMEOUT
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()


def _departure(outcome: Outcome, record: _Record | None, *, variant: Variant, budget_ms: float) -> DepartureResult:
    """One ``Outcome`` (and the probe's record of it) as a result."""
    state = outcome.state
    client: Client
    if not outcome.left:
        client = "not_reached" if outcome.timed_out else "answered"
    elif record is not None and record.finished_at is not None and _finished_first(outcome, record):
        client = "answered"  # e.g. a whole response in one chunk, received before the client closed
    else:
        client = "left"
    if client == "left":
        ran_after_ms = None if outcome.timed_out else outcome.app_returned_after_ms
    elif client == "answered":
        ran_after_ms = 0.0
    else:
        ran_after_ms = None
    signals: list[Signal] = []
    if client == "left":
        if variant == "bare" and state is not None:
            # The probe is outside the app's own middleware: its state says what happened.
            if state.cancelled:
                signals = ["cancel"]
            elif state.disconnected:
                signals = ["middleware"]
        elif record is not None:
            signals = [s for s in record.signals if s != "cancel" or not outcome.timed_out]
    tracebacks = outcome.tracebacks
    first = None
    if tracebacks:
        text = (tracebacks[0].traceback or "").strip().splitlines()
        first = text[-1].strip() if text else tracebacks[0].message
    exception = outcome.exception
    return DepartureResult(
        client=client,
        ran_after_ms=None if ran_after_ms is None else round(ran_after_ms, 1),
        saw_disconnect=bool(signals) if client == "left" else None,
        told_by=signals,
        over_budget=client == "left" and (ran_after_ms is None or ran_after_ms > budget_ms),
        status=outcome.status,
        phase=None if state is None or not state.disconnected else state.phase,
        tracebacks=len(tracebacks),
        first_traceback=first,
        exception=None if exception is None else f"{type(exception).__name__}: {exception}",
    )


def _finished_first(outcome: Outcome, record: _Record) -> bool:
    """Whether the app finished its response before the client left (both times are
    ``time.monotonic()`` in this process)."""
    assert record.finished_at is not None
    return outcome.left_at is None or record.finished_at <= outcome.left_at


def _run_result(
    departures: dict[DepartureName, DepartureResult], *, variant: Variant, configured: Mode | None
) -> RunResult:
    left = [d for d in departures.values() if d.client == "left"]
    ran: float | None = 0.0
    for result in left:
        ran = None if ran is None or result.ran_after_ms is None else max(ran, result.ran_after_ms)
    return RunResult(
        middleware=configured if variant == "bare" else variant,
        configured=variant == "bare" and configured is not None,
        judged=False,
        ran_after_ms=ran,
        saw_disconnect=all(d.saw_disconnect for d in left) if left else None,
        client_left=bool(left),
        over_budget=any(d.over_budget for d in left),
        tracebacks=sum(d.tracebacks for d in departures.values()),
        departures=departures,
    )


# --------------------------------------------------------------------------- running
class _Watchdog:
    """A thread that ends the process when the event loop makes no progress.

    Each step of the run says how long it may take (``expect()``); when a deadline passes
    without the next step, a handler blocks the event loop (a sync call inside
    ``async def``) or ignores cancellation, and nothing in the loop can end it: the
    watchdog prints where the main thread is and exits with status 1.
    """

    def __init__(self, limit: float) -> None:
        self._deadline = time.monotonic() + START_TIMEOUT + _WATCHDOG_SLACK
        self._step = "starting"
        self._stopped = threading.Event()
        self._limit = limit  # the whole run, in seconds: the thread's own bound
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._watch, name="asgi-disconnect check watchdog", daemon=True)

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._thread.join(1.0)

    def expect(self, seconds: float, step: str) -> None:
        self._step = step
        self._deadline = time.monotonic() + seconds + _WATCHDOG_SLACK

    def _watch(self) -> None:
        for _ in range(math.ceil(self._limit / 0.1) + 1):
            if self._stopped.wait(0.1):
                return
            if time.monotonic() > self._deadline:
                break
        if self._stopped.is_set():
            return
        frame = sys._current_frames().get(self._main) if self._main is not None else None
        stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
        stderr = sys.__stderr__  # not sys.stderr: _quiet() may have swapped sys.stdout for it
        if stderr is not None:
            stderr.write(
                f"asgi-disconnect check: no progress while {self._step}: a handler blocks the event loop (a "
                "sync call such as time.sleep() or a blocking driver inside `async def`?) or ignores "
                f"cancellation. Where the main thread is:\n{stack}"
            )
            stderr.flush()
        os._exit(1)


def _request_timeout(departure: DepartureName, timeout: float) -> float:
    # The harness counts from the request: the first client leaves LEAVE_AFTER into it; the
    # mid-body one at the first chunk, which a streaming handler sends within milliseconds.
    return LEAVE_AFTER + timeout if departure == "before_response" else timeout


def run_bound(options: Options) -> float:
    """The longest the run can take, in seconds, if no handler blocks the event loop."""
    per_request = sum(_request_timeout(d, options.timeout) + CANCEL_WAIT for d in DEPARTURES)
    per_server = START_TIMEOUT + STOP_TIMEOUT
    return len(VARIANTS) * (per_server + len(options.paths) * per_request)


async def check_app(
    app: ASGIApp, options: Options, *, progress: Callable[[str], None] | None = None, watchdog: _Watchdog | None = None
) -> list[PathReport]:
    """Serve ``app`` bare, in observe and in cancel mode; return one report per path."""
    departures: dict[DepartureName, Departure] = {
        "before_response": leave.before_response(after=LEAVE_AFTER),
        "mid_body": leave.after_chunks(1),
    }
    found: dict[str, dict[Variant, dict[DepartureName, DepartureResult]]] = {p: {} for p in options.paths}
    modes: dict[str, Mode] = {}
    for variant in VARIANTS:
        probe = _Probe(app)
        served: ASGIApp = probe if variant == "bare" else DisconnectMiddleware(probe, cancel=variant == "cancel")
        if watchdog is not None:
            watchdog.expect(START_TIMEOUT, f"starting uvicorn ({variant})")
        async with serve(served, server="uvicorn", start_timeout=START_TIMEOUT, stop_timeout=STOP_TIMEOUT) as live:
            for path in options.paths:
                results: dict[DepartureName, DepartureResult] = {}
                for name, departure in departures.items():
                    if progress is not None:
                        progress(f"{variant}: {path}, the client leaves {_DEPARTURE_LABELS[name]}")
                    timeout = _request_timeout(name, options.timeout)
                    if watchdog is not None:
                        watchdog.expect(
                            timeout + CANCEL_WAIT, f"requesting {path} ({variant}, {_DEPARTURE_LABELS[name]})"
                        )
                    mark = len(probe.records)
                    outcome = await live.request(
                        method=options.method, path=path, headers=options.headers, leave=departure, timeout=timeout
                    )
                    records = probe.records[mark:]
                    if variant == "bare" and outcome.state is not None and path not in modes:
                        modes[path] = "cancel" if outcome.state.cancel else "observe"
                    results[name] = _departure(
                        outcome, records[0] if records else None, variant=variant, budget_ms=options.budget_ms
                    )
                found[path][variant] = results
            if watchdog is not None:
                watchdog.expect(STOP_TIMEOUT + 1.0, f"stopping uvicorn ({variant})")
    reports: list[PathReport] = []
    for path in options.paths:
        mode = modes.get(path)
        results_by_variant = {
            variant: _run_result(found[path][variant], variant=variant, configured=mode) for variant in VARIANTS
        }
        judged: Variant = "bare" if mode is not None else options.mode
        results_by_variant[judged].judged = True
        reports.append(PathReport(path, results_by_variant))
    return reports


def failed(reports: Sequence[PathReport]) -> bool:
    """Whether a judged run let a handler run past the budget after its client left."""
    return any(result.judged and result.over_budget for report in reports for result in report.results.values())


# --------------------------------------------------------------------------- output
def to_json(reports: Sequence[PathReport]) -> dict[str, Any]:
    """``{"paths": [{"path": P, "results": {"bare": {...}, "observe": {...}, "cancel": {...}}}]}``."""
    return {
        "paths": [
            {"path": report.path, "results": {variant: dataclasses.asdict(r) for variant, r in report.results.items()}}
            for report in reports
        ]
    }


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def _cell(result: DepartureResult, timeout: float) -> str:
    if result.client == "answered":
        text = "answered first"
    elif result.client == "not_reached":
        text = f"no body in {timeout:g} s"
    else:
        ran = f"still running > {timeout:g} s" if result.ran_after_ms is None else _ms(result.ran_after_ms)
        told = "told: " + "+".join(result.told_by) if result.told_by else "not told"
        text = f"{'! ' if result.over_budget else ''}{ran}, {told}"
    if result.tracebacks:
        text += f", {result.tracebacks} traceback{'s' if result.tracebacks > 1 else ''}"
    return text


def format_table(target: str, reports: Sequence[PathReport], options: Options) -> str:
    """The text output: a note per configured path, the table, the legend and the verdict."""
    configured = [report for report in reports if report.configured is not None]
    if not configured:
        first = "bare"
    elif len(configured) == len(reports):
        first = "configured"
    else:
        first = "as given"
    header = ["path", "client leaves", first, "observe", "cancel"]
    rows = [header]
    for report in reports:
        for name in DEPARTURES:
            row = [report.path, _DEPARTURE_LABELS[name]]
            row += [_cell(report.results[variant].departures[name], options.timeout) for variant in VARIANTS]
            rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        f"asgi-disconnect check {target}: how long each handler ran after its client left (uvicorn, "
        f"{options.method} requests, budget {options.budget_ms:g} ms)",
        "",
    ]
    for mode in ("observe", "cancel"):
        paths = [report.path for report in configured if report.configured == mode]
        if paths:
            where = "" if len(configured) == len(reports) else f" on {', '.join(paths)}"
            lines.append(f"the app installs DisconnectMiddleware itself ({mode} mode){where}: reported as configured")
    if configured:
        lines.append("")
    lines += ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    lines.append("")
    legend = (
        f"The first client leaves {LEAVE_AFTER * 1000:g} ms after the handler was called, the second after the "
        "first body chunk. '!': longer than the budget. told: how the handler learnt that its client left "
        "(receive: http.disconnect; send: send() raised; cancel: it was cancelled; middleware: the app's own "
        "DisconnectMiddleware recorded it). answered first: the response was complete before the client could "
        "leave, nothing to judge."
    )
    if configured:
        legend += (
            " observe and cancel: DisconnectMiddleware added in front of the app in that mode (the app's own "
            "then passes the requests through); the configured run decides the verdict."
        )
    lines.append(textwrap.fill(legend, width=100))
    noted = [
        f"{report.path} ({variant}, {_DEPARTURE_LABELS[name]}): {d.first_traceback}"
        for report in reports
        for variant, result in report.results.items()
        for name, d in result.departures.items()
        if d.first_traceback
    ]
    if noted:
        lines += ["", "tracebacks the server logged (first of each request):", *(f"  {line}" for line in noted)]
    lines += ["", verdict(reports, options)]
    return "\n".join(lines)


def verdict(reports: Sequence[PathReport], options: Options) -> str:
    """The one-line verdict."""
    if all(r.configured for r in reports):
        how = "as configured"
    elif any(r.configured for r in reports):
        how = f"in {options.mode} mode, as configured where the app installs the middleware"
    else:
        how = f"in {options.mode} mode"
    late: list[str] = []
    for report in reports:
        judged = next(result for result in report.results.values() if result.judged)
        if judged.over_budget:
            ran = "still running" if judged.ran_after_ms is None else _ms(judged.ran_after_ms)
            late.append(f"{report.path} ({ran})")
    untested = [r.path for r in reports if not any(result.client_left for result in r.results.values())]
    if late:
        text = f"FAIL ({how}): ran longer than {options.budget_ms:g} ms after the client left: {', '.join(late)}"
        others = {"cancel" if (r.configured or options.mode) == "observe" else "observe" for r in reports}
        if len(others) == 1:
            other: Variant = "cancel" if "cancel" in others else "observe"
            if not any(r.results[other].over_budget for r in reports):
                text += f"; every handler stops within the budget in {other} mode"
        return text + "."
    text = f"PASS ({how}): every handler stopped within {options.budget_ms:g} ms of its client leaving"
    if untested:
        text += f" ({', '.join(untested)} answered before the client could leave)"
    return text + "."


# --------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``check`` sub-command's description and arguments (``--json`` is every command's)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = textwrap.fill(DESCRIPTION, width=88)
    parser.epilog = EPILOG
    parser.add_argument("app", metavar="MODULE:APP", help='the app, as uvicorn takes it: "package.module:app"')
    parser.add_argument(
        "--path",
        dest="paths",
        action="append",
        required=True,
        type=_path,
        metavar="P",
        help="a path to request (repeat for more), with its query string if any",
    )
    parser.add_argument(
        "--mode",
        choices=("observe", "cancel"),
        default="observe",
        help="the mode that decides the exit status (default: observe)",
    )
    parser.add_argument(
        "--budget-ms",
        type=_positive,
        default=DEFAULT_BUDGET_MS,
        metavar="N",
        help=f"how long a handler may run after its client left (default: {DEFAULT_BUDGET_MS:g})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds after its client left at which a handler is reported as still running (default: "
        f"{DEFAULT_TIMEOUT:g}); the mid-body request, whose client leaves at the first chunk, gets S in all",
    )
    parser.add_argument("--method", default="GET", type=_method, help="the request method (default: GET)")
    parser.add_argument(
        "--header",
        dest="headers",
        action="append",
        default=[],
        type=_header,
        metavar="'NAME: VALUE'",
        help="a request header (repeat for more), such as an authorization",
    )
    parser.add_argument(
        "--app-dir", default=".", help="the directory put first on sys.path to import the app (default: .)"
    )
    parser.add_argument("--factory", action="store_true", help="MODULE:APP is a factory: call it to get the app")


def _path(value: str) -> str:
    if not value.startswith("/"):
        raise argparse.ArgumentTypeError(f"a path starts with '/', got {value!r}")
    return value


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0 or math.isinf(number):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value!r}")
    return number


def _method(value: str) -> str:
    if not value.isalpha():
        raise argparse.ArgumentTypeError(f"not an HTTP method: {value!r}")
    return value.upper()


def _header(value: str) -> tuple[str, str]:
    name, sep, content = value.partition(":")
    name = name.strip()
    if not sep or not name or any(c.isspace() for c in name):
        raise argparse.ArgumentTypeError(f"a header is 'NAME: VALUE', got {value!r}")
    return name, content.strip()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """While the app runs: what it prints goes to stderr (stdout carries only the output),
    and the middleware's structlog events are collected, not printed."""
    with contextlib.redirect_stdout(sys.stderr), structlog.testing.capture_logs():
        yield


def run_check(args: argparse.Namespace) -> int:
    """Run ``asgi-disconnect check`` as parsed by the command line; return the exit status."""
    options = Options(
        paths=tuple(dict.fromkeys(args.paths)),
        mode=args.mode,
        budget_ms=args.budget_ms,
        timeout=args.timeout,
        method=args.method,
        headers=tuple(args.headers),
    )
    tty = sys.stderr.isatty() and not args.json

    def progress(step: str) -> None:
        print(f"\rchecking {step} ...".ljust(79)[:79], end="", file=sys.stderr, flush=True)

    try:
        with _quiet():
            try:
                app = load_app(args.app, app_dir=args.app_dir, factory=args.factory)
            except UsageError:
                raise
            except Exception as exc:  # the app's own code failed: its traceback is what helps
                traceback.print_exc()
                raise UsageError(f'importing "{args.app}" raised {type(exc).__name__}: {exc}') from exc
            with _Watchdog(run_bound(options) + 60) as watchdog:
                reports = anyio.run(
                    lambda: check_app(app, options, progress=progress if tty else None, watchdog=watchdog),
                    backend="asyncio",
                )
    except UsageError as exc:
        print(f"asgi-disconnect check: error: {exc}", file=sys.stderr)
        return 2
    except ServerStartError as exc:
        reason = str(exc)
        if exc.output:  # what the server logged holds the app's own reason: shown once, in full
            print(textwrap.indent(exc.output, "  "), file=sys.stderr)
            reason = reason.partition("; the server logged")[0] + "; the server's log is above"
        print(f"asgi-disconnect check: error: uvicorn could not serve {args.app}: {reason}", file=sys.stderr)
        return 2
    finally:
        if tty:
            print("\r" + " " * 79 + "\r", end="", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(to_json(reports), indent=2))
    else:
        print(format_table(args.app, reports, options))
    return 1 if failed(reports) else 0
