"""The pytest plugin of ``asgi_disconnect.testing``: its fixtures need no setup.

It is registered under the ``pytest11`` entry point ``asgi_disconnect``, so pytest loads
it wherever the package is installed::

    @pytest.mark.anyio
    async def test_stream_stops(disconnect_runner: Runner, disconnect_events: CapturedEvents) -> None:
        outcome = await disconnect_runner.request(app, path="/stream", leave=leave.after_chunks(2))
        outcome.assert_aborted(phase="mid_body", within_ms=100)
        assert [event["event"] for event in disconnect_events] == ["request_aborted"]

- ``disconnect_runner`` runs the test once in process (``simulate``), once on uvicorn and
  once on hypercorn (``serve``). A server that is not installed is skipped, saying why, and
  so is uvicorn on trio. The test fails at teardown if a handler did not stop: a request
  still running at its timeout, or a handler still running once its server had stopped.
  Pick runners with ``@pytest.mark.parametrize("disconnect_runner", ["in-process"],
  indirect=True)`` (also ``"uvicorn-h11"`` and ``"uvicorn-httptools"``).
- ``disconnect_events`` holds the events of the ``asgi_disconnect`` structlog logger
  logged during the test (one per aborted request).

The backend is the anyio plugin's ``anyio_backend`` where the test uses it, else asyncio.
Importing this module imports no server or framework: a runner imports its server when it
starts it. No pytest-asyncio: the tests run under the anyio plugin.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import overload

import pytest
import structlog.testing
from structlog.typing import EventDict

from . import _loopback
from ._events import LOGGER_NAME
from ._loopback import ServerName
from ._types import ASGIApp, Receive, Scope, Send
from .testing import Departure, Live, Outcome, leave, serve, simulate

__all__ = ["RUNNERS", "CapturedEvents", "Runner", "RunningApp", "disconnect_events", "disconnect_runner"]

#: The runners of ``disconnect_runner``, in order: its parameters and their test ids.
RUNNERS = ("in-process", "uvicorn", "hypercorn")
#: How long a runner's server waits, once it has cancelled the handlers still running at the
#: end of a ``serve()`` block, for those that ignore the cancellation (uvicorn and hypercorn
#: on asyncio then abandon them; a handler that shields itself on trio is waited for).
STOP_TIMEOUT = 1

_NEVER = leave.never()
Headers = Iterable[tuple[bytes | str, bytes | str]]


class Runner:
    """Where a ``disconnect_runner`` test runs its app: in process or on a real server.

    ``server`` is the runner's id: ``"in-process"`` (``simulate()``), ``"uvicorn"`` or
    ``"hypercorn"`` (``serve()``); ``backend`` is ``"asyncio"`` or ``"trio"``. Every request
    is kept (``outcomes``) for the check at the test's teardown (``problems()``).
    """

    def __init__(self, server: str = "in-process", backend: str = "asyncio") -> None:
        served = [name for name in _loopback.SERVERS if name == server]
        if server != "in-process" and not served:
            runners = ", ".join(map(repr, ("in-process", *_loopback.SERVERS)))
            raise ValueError(f"disconnect_runner takes one of {runners}, got {server!r}")
        self.server = server
        self._served: ServerName | None = served[0] if served else None
        self.backend = backend
        #: Every Outcome this runner produced, in order.
        self.outcomes: list[Outcome] = []
        self._problems: list[str] = []

    async def request(
        self,
        app: ASGIApp,
        *,
        method: str = "GET",
        path: str = "/",
        headers: Headers = (),
        body: bytes = b"",
        leave: Departure = _NEVER,
        timeout: float = 5.0,  # noqa: ASYNC109 - the handler's budget: it never raises TimeoutError
    ) -> Outcome:
        """Send one request to ``app`` whose client leaves at ``leave``; return its ``Outcome``.

        In process it is ``simulate()``; on a server the app is served for this request
        alone (``serve()``, then ``live.request()``), and the server stops before it returns.
        """
        async with self.serve(app) as running:
            return await running.request(
                method=method, path=path, headers=headers, body=body, leave=leave, timeout=timeout
            )

    @contextlib.asynccontextmanager
    async def serve(self, app: ASGIApp) -> AsyncIterator[RunningApp]:
        """Serve ``app`` for the block: ``running.request()`` sends it one request at a time.

        In process each request is simulated; on a server the app is served (lifespan
        ``"auto"``) until the end of the block, which cancels the handlers still running.
        A handler still running once the server has stopped fails the test at teardown.
        """
        if self._served is None:
            yield RunningApp(self, app, None)
            return
        tracked = _Tracked(app)
        try:
            async with serve(tracked, server=self._served, stop_timeout=STOP_TIMEOUT) as live:
                yield RunningApp(self, app, live)
        finally:
            # What ``live.running`` counts, by name: it outlived the server's stop.
            self._problems += [
                f"{request} on {self.server}: still running after the server stopped, "
                f"{STOP_TIMEOUT} s after it was cancelled: it ignores cancellation"
                for request in tracked.running
            ]

    def _record(self, method: str, path: str, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if outcome.timed_out:
            self._problems.append(
                f"{method.upper()} {path} on {outcome.server}: still running at its timeout "
                f"({outcome.timeout:g} s). What happened: {outcome.summary()}"
            )

    def problems(self) -> list[str]:
        """The handlers that did not stop, one line each: what fails the test at teardown."""
        return list(self._problems)


class RunningApp:
    """An app that ``Runner.serve()`` serves: send it as many requests as the test needs."""

    def __init__(self, runner: Runner, app: ASGIApp, live: Live | None) -> None:
        self._runner = runner
        self._app = app
        #: The real server (its ``url``, ``running``, ``server_log``); None in process.
        self.live = live

    @property
    def server(self) -> str:
        """The runner's id: ``"in-process"``, ``"uvicorn"`` or ``"hypercorn"``."""
        return self._runner.server

    async def request(
        self,
        *,
        method: str = "GET",
        path: str = "/",
        headers: Headers = (),
        body: bytes = b"",
        leave: Departure = _NEVER,
        timeout: float = 5.0,  # noqa: ASYNC109 - the handler's budget: it never raises TimeoutError
    ) -> Outcome:
        """Send one request whose client leaves at ``leave``; return its ``Outcome``."""
        if self.live is None:
            outcome = await simulate(
                self._app, method=method, path=path, headers=headers, body=body, leave=leave, timeout=timeout
            )
        else:
            outcome = await self.live.request(
                method=method, path=path, headers=headers, body=body, leave=leave, timeout=timeout
            )
        self._runner._record(method, path, outcome)
        return outcome


class _Tracked:
    """The app, and the HTTP requests it is running now: what names a handler that outlives
    its server (``Live.running`` only counts them)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.running: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = f"{scope['method']} {scope['path']}"
        self.running.append(request)
        try:
            await self.app(scope, receive, send)
        finally:
            self.running.remove(request)


class CapturedEvents(Sequence[EventDict]):
    """The events of the ``asgi_disconnect`` logger captured so far, oldest first: a live,
    read-only view of a ``structlog.testing.capture_logs()`` list (its other events left out)."""

    def __init__(self, entries: list[EventDict]) -> None:
        self._entries = entries

    def _ours(self) -> list[EventDict]:
        return [entry for entry in self._entries if entry.get("logger") == LOGGER_NAME]

    @overload
    def __getitem__(self, index: int) -> EventDict: ...
    @overload
    def __getitem__(self, index: slice) -> list[EventDict]: ...
    def __getitem__(self, index: int | slice) -> EventDict | list[EventDict]:
        return self._ours()[index]

    def __len__(self) -> int:
        return len(self._ours())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CapturedEvents):
            return self._ours() == other._ours()
        if isinstance(other, list):
            return self._ours() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CapturedEvents({self._ours()!r})"


def _backend(request: pytest.FixtureRequest) -> str:
    """The anyio backend the test runs on: ``anyio_backend`` (a name, or a (name, options)
    tuple) where the test uses it, else asyncio."""
    if "anyio_backend" not in request.fixturenames:
        return "asyncio"
    backend = request.getfixturevalue("anyio_backend")
    return str(backend if isinstance(backend, str) else backend[0])


def _why_not(runner: Runner) -> str | None:
    """Why ``runner`` cannot run the test, or None."""
    server = runner._served
    if server is None:
        return None
    if server.startswith("uvicorn") and runner.backend != "asyncio":
        return "uvicorn runs on asyncio only"
    return _loopback.missing(server)


@pytest.fixture(params=RUNNERS)
def disconnect_runner(request: pytest.FixtureRequest) -> Iterator[Runner]:
    """A ``Runner``: the test runs in process, on uvicorn and on hypercorn.

    A server that is not installed (or uvicorn on trio) is skipped with the reason. At
    teardown the test fails if a request was still running at its timeout, or a handler
    was still running once its server had stopped, naming each one.
    """
    runner = Runner(str(request.param), _backend(request))
    why = _why_not(runner)
    if why is not None:
        pytest.skip(why)
    yield runner
    problems = runner.problems()
    if problems:
        lines = "".join(f"\n- {problem}" for problem in problems)
        pytest.fail(
            f"disconnect_runner ({runner.server}): handler(s) that did not stop by themselves:{lines}\n"
            "A handler still running at its timeout never returned (DisconnectMiddleware(cancel=True) cancels "
            "one whose client left); one still running after its server stopped ignores cancellation.",
            pytrace=False,
        )


@pytest.fixture
def disconnect_events() -> Iterator[CapturedEvents]:
    """The events of the ``asgi_disconnect`` logger during the test (one per aborted request).

    It is ``structlog.testing.capture_logs()``: while the test runs, structlog's processors
    are replaced by the capture (nothing is printed), and the app's configuration is
    restored afterwards.
    """
    with structlog.testing.capture_logs() as entries:
        yield CapturedEvents(entries)
