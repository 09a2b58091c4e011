"""A real browser as the client: headless Chromium leaves, the middleware sees it.

Raw sockets (the rest of the suite) close where a test says; a browser closes when a user
closes a tab or a page aborts a ``fetch()``, and what reaches the server then is up to
Chromium's network stack. Each test serves a raw ASGI app with a real uvicorn (httptools)
in the test's loop, behind ``DisconnectMiddleware`` in observe and in cancel mode, opens a
tab on it over the DevTools protocol (tests/browser.py) and leaves the way a page does:

- a tab with an ``EventSource`` is closed mid-stream;
- a ``fetch()`` is aborted while the handler waits, before any response;
- a ``fetch()`` whose body has been read for two chunks is aborted.

Each checks what a user of the middleware relies on: the departure is flagged with its
phase, the handler stops (it is cancelled in cancel mode), a stream's ``finally`` runs,
at most one item is produced after the departure was detected, and the browser sent no
request the test did not make (an ``EventSource`` reconnects by itself). The delay from
the close or abort to the detection is recorded as the property ``detected_after_ms``
(``-o junit_family=xunit1 --junitxml=FILE``), never asserted.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field

import anyio
import pytest

from asgi_disconnect import DisconnectMiddleware, DisconnectState, disconnect_state
from asgi_disconnect._types import Receive, Scope, Send
from asgi_disconnect.testing import LogLine, serve

from .browser import CDP, chromium, connect
from .compat import compat
from .servers import wait_for

CHROMIUM = shutil.which("chromium")

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.server,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)"),
]

EVERY = 0.05  # seconds between two events or chunks
MAX_ITEMS = 200  # 10 s of stream at most: every test ends long before, if anything stops it
SLOW = 10.0  # what the slow handler waits unless its client leaves
WAIT = 10.0  # the bound on every wait for the server or the page
#: The ``retry:`` the event stream asks for (ms), so that a reconnect, if the browser made
#: one, would come within ``RECONNECT_WINDOW`` (s): the request counts would show it.
RETRY_MS = 100
RECONNECT_WINDOW = 0.5

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>asgi-disconnect</title></head>
<body><script>
// What the tests start in the page; each keeps what the page saw in a global for CDP to read.
window.until = (check, ms) => new Promise((resolve, reject) => {
  const start = Date.now();
  const tick = () => {
    if (check()) resolve(true);
    else if (Date.now() - start > ms) reject(new Error("timed out"));
    else setTimeout(tick, 10);
  };
  tick();
});
window.listen = () => {
  window.received = [];
  window.source = new EventSource("/events");
  source.onmessage = (event) => { received.push(event.data); document.title = `${received.length} events`; };
};
window.slow = () => {
  window.controller = new AbortController();
  window.result = fetch("/slow", {signal: controller.signal}).then((r) => `status ${r.status}`, (e) => e.name);
};
window.readTwo = async () => {
  window.controller = new AbortController();
  const response = await fetch("/stream", {signal: controller.signal});
  window.reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  for (let reads = 0; reads < 50 && text.split("\\n").length < 3; reads++) {
    const {value, done} = await reader.read();
    if (done) break;
    text += decoder.decode(value, {stream: true});
  }
  return text;
};
</script></body></html>
"""


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """A real uvicorn in the test's loop: asyncio only."""
    return "asyncio"


@pytest.fixture(scope="module")
def browser() -> Iterator[str]:
    """One headless Chromium for the module; its CDP websocket URL."""
    assert CHROMIUM is not None
    with chromium(CHROMIUM) as url:
        yield url


@pytest.fixture
async def cdp(browser: str) -> AsyncIterator[CDP]:
    """A CDP connection of the test's own (each test opens its own tab on it)."""
    async with connect(browser) as connection:
        yield connection


@dataclass
class Call:
    """One request as its handler lived it."""

    state: DisconnectState
    returned: anyio.Event = field(default_factory=anyio.Event)
    produced: list[float] = field(default_factory=list)  # ``time.monotonic()`` of each event or chunk
    closed: bool = False  # the event source's ``finally`` ran
    closed_on_return: bool = False  # ... before the handler returned (not later, at garbage collection)
    woke: bool = False  # the slow handler's wait or sleep ended (it was not cancelled in it)


class App:
    """The raw ASGI app the browser talks to; it counts the requests of each path."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.calls: dict[str, list[Call]] = {}
        self.three_sent = anyio.Event()
        self.slow_started = anyio.Event()

    def only(self, path: str) -> Call:
        """The one call of ``path``; fails if the browser made another."""
        calls = self.calls.get(path, [])
        assert len(calls) == 1, f"{len(calls)} requests for {path}, expected one: {dict(self.requests)}"
        return calls[0]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan: nothing to start
        path = scope["path"]
        self.requests[path] += 1
        call = Call(disconnect_state(scope))
        self.calls.setdefault(path, []).append(call)
        try:
            if path == "/":
                await _respond(send, 200, "text/html; charset=utf-8", PAGE.encode())
            elif path == "/events":
                await self.events(call, send)
            elif path == "/slow":
                await self.slow(call, send)
            elif path == "/stream":
                await self.stream(call, send)
            else:
                await _respond(send, 404, "text/plain", b"not found")
        finally:
            call.closed_on_return = call.closed
            call.returned.set()

    async def events(self, call: Call, send: Send) -> None:
        await _start(send, "text/event-stream")
        await send({"type": "http.response.body", "body": b"retry: %d\n\n" % RETRY_MS, "more_body": True})
        # aclosing: the source's finally runs here, when a send() raises, not at garbage collection
        async with contextlib.aclosing(self._ticks(call)) as ticks:
            async for n in ticks:
                await send({"type": "http.response.body", "body": b"data: %d\n\n" % n, "more_body": True})
                if n == 2:
                    self.three_sent.set()
        await send({"type": "http.response.body", "body": b""})

    async def _ticks(self, call: Call) -> AsyncGenerator[int]:
        """The event source: stands for an upstream that produces an item every ``EVERY`` s."""
        try:
            for n in range(MAX_ITEMS):
                await anyio.sleep(EVERY)
                call.produced.append(time.monotonic())
                yield n
        finally:
            call.closed = True

    async def slow(self, call: Call, send: Send) -> None:
        self.slow_started.set()
        if call.state.cancel:
            # It leaves the stopping to the middleware, as a handler written for cancel mode
            # does (a cooperative one would return at the wait() below, before any cancel).
            await anyio.sleep(SLOW)
        else:
            with anyio.move_on_after(SLOW):
                await call.state.wait()  # it stops by itself when its client leaves
        call.woke = True
        if not call.state.disconnected:
            await _respond(send, 200, "text/plain", b"done")

    async def stream(self, call: Call, send: Send) -> None:
        await _start(send, "text/plain; charset=utf-8")
        for n in range(MAX_ITEMS):
            call.produced.append(time.monotonic())
            await send({"type": "http.response.body", "body": b"chunk %d\n" % n, "more_body": True})
            await anyio.sleep(EVERY)
        await send({"type": "http.response.body", "body": b""})


async def _start(send: Send, content_type: str, status: int = 200) -> None:
    headers = [(b"content-type", content_type.encode()), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _respond(send: Send, status: int, content_type: str, body: bytes) -> None:
    await _start(send, content_type, status)
    await send({"type": "http.response.body", "body": body})


def _modes(feature: str) -> list[object]:
    """Observe mode proves ``feature``'s cell, cancel mode the cancel cell."""
    return [
        pytest.param(False, id="observe", marks=compat("asgi", "chromium", feature)),
        pytest.param(True, id="cancel", marks=compat("asgi", "chromium", "cancel")),
    ]


def _check_stopped(call: Call, *, phase: str, cancel: bool) -> None:
    """What every test expects of the handler once its client has left."""
    state = call.state
    assert state.disconnected, "the middleware did not flag the departure"
    assert state.phase == phase
    assert state.detected_by == "http.disconnect"  # uvicorn said so: nothing needed a failed send
    assert state.cancelled is cancel, "cancelled in cancel mode, and only there"
    assert state.record is not None and state.record.phase == phase, "the abort was recorded"


def _record(request: pytest.FixtureRequest, seconds: float) -> None:
    """Keep the delay from the browser's close or abort to the detection, for reports only.

    A user property, not ``record_property``: that one warns under junit's default family
    (xunit2), and the suite turns warnings into errors. ``-o junit_family=xunit1
    --junitxml=FILE`` writes it.
    """
    request.node.user_properties.append(("detected_after_ms", round(seconds * 1000, 1)))


def _troubles(server_log: list[LogLine]) -> list[LogLine]:
    """What uvicorn logged (its warnings and errors), and asyncio's errors: asyncio's debug
    mode (``python -X dev``) also warns of any slow step of the loop, the test's own included."""
    return [line for line in server_log if line.logger != "asyncio" or line.level in ("ERROR", "CRITICAL")]


async def _settle() -> None:
    """Give a reconnect or retry of the browser, if it made one, the time to show in the counts."""
    await anyio.sleep(RECONNECT_WINDOW)


@pytest.mark.parametrize("cancel", _modes("mid_stream"))
async def test_closing_the_tab_stops_its_event_stream(cdp: CDP, cancel: bool, request: pytest.FixtureRequest) -> None:
    app = App()
    async with serve(DisconnectMiddleware(app, cancel=cancel), server="uvicorn-httptools") as live:
        async with cdp.page(f"{live.url}/") as page:
            await page.evaluate("listen()")
            await wait_for(app.three_sent, "the server sent three events", WAIT)
            received = await page.evaluate(f"until(() => received.length >= 3, {WAIT * 1000:.0f}).then(() => received)")
            title = await page.evaluate("document.title")
            closed_at = time.monotonic()
            await page.close()
        call = app.only("/events")
        await wait_for(call.returned, "the stream's handler returned after its tab was closed", WAIT)
        await _settle()
        server_log = live.server_log

    assert received[:3] == ["0", "1", "2"] and title.endswith(" events")
    _check_stopped(call, phase="mid_body", cancel=cancel)
    assert call.closed_on_return, "the event source's finally ran before the handler returned"
    assert call.state.detected_at is not None
    after = [at for at in call.produced if at > call.state.detected_at]
    assert len(after) <= 1, f"{len(after)} events produced after the departure was detected"
    assert len(call.produced) < MAX_ITEMS, "the stream ran to its end: nothing stopped it"
    assert app.requests == {"/": 1, "/events": 1}, "the EventSource did not reconnect"
    assert _troubles(server_log) == []
    _record(request, call.state.detected_at - closed_at)


@pytest.mark.parametrize("cancel", _modes("before_response"))
async def test_an_aborted_fetch_stops_the_slow_handler(cdp: CDP, cancel: bool, request: pytest.FixtureRequest) -> None:
    app = App()
    async with serve(DisconnectMiddleware(app, cancel=cancel), server="uvicorn-httptools") as live:
        async with cdp.page(f"{live.url}/") as page:
            await page.evaluate("slow()")
            await wait_for(app.slow_started, "the slow handler was called", WAIT)
            aborted_at = time.monotonic()
            seen = await page.evaluate("controller.abort(), result")
            call = app.only("/slow")
            await wait_for(call.returned, "the slow handler returned after the fetch was aborted", WAIT)
        await _settle()
        server_log = live.server_log

    assert seen == "AbortError"  # what the page saw: its fetch() rejected, no response
    _check_stopped(call, phase="before_response", cancel=cancel)
    assert call.state.record is not None and call.state.record.status is None, "no response was started"
    # Observe mode: its wait() returned. Cancel mode: its sleep was cancelled, never ended.
    assert call.woke is not cancel
    assert app.requests == {"/": 1, "/slow": 1}, "the browser did not retry the request"
    assert _troubles(server_log) == []
    assert call.state.detected_at is not None
    _record(request, call.state.detected_at - aborted_at)


@pytest.mark.parametrize("cancel", _modes("mid_stream"))
async def test_a_fetch_aborted_mid_body_stops_the_stream(
    cdp: CDP, cancel: bool, request: pytest.FixtureRequest
) -> None:
    app = App()
    async with serve(DisconnectMiddleware(app, cancel=cancel), server="uvicorn-httptools") as live:
        async with cdp.page(f"{live.url}/") as page:
            text = await page.evaluate("readTwo()")
            aborted_at = time.monotonic()
            # The read after the abort is what the page sees of it.
            seen = await page.evaluate("controller.abort(), reader.read().then(() => 'read on', (e) => e.name)")
            call = app.only("/stream")
            await wait_for(call.returned, "the stream's handler returned after the fetch was aborted", WAIT)
        await _settle()
        server_log = live.server_log

    assert text.startswith("chunk 0\nchunk 1\n")
    assert seen == "AbortError"
    _check_stopped(call, phase="mid_body", cancel=cancel)
    assert call.state.detected_at is not None
    after = [at for at in call.produced if at > call.state.detected_at]
    assert len(after) <= 1, f"{len(after)} chunks produced after the departure was detected"
    assert len(call.produced) < MAX_ITEMS, "the stream ran to its end: nothing stopped it"
    assert app.requests == {"/": 1, "/stream": 1}, "the browser did not retry the request"
    assert _troubles(server_log) == []
    _record(request, call.state.detected_at - aborted_at)
