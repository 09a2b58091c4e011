"""Headless Chromium as an HTTP client, driven over the Chrome DevTools Protocol (CDP).

The least machinery that is reliable: Chromium is started as a process of its own on an
ephemeral debugging port (read from ``DevToolsActivePort``), and the tests talk CDP to it
over one websocket, framed by wsproto (already installed: hypercorn depends on it) on an
anyio TCP stream. Pages are CDP targets in "flattened" sessions on that one connection.
Every wait is bounded in time and every loop in count.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

#: Chromium's own calls home (updates, sync, safe browsing...) stay off: this machine's
#: network is closed, and a test must only ever reach 127.0.0.1.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--remote-debugging-port=0",
)
#: Seconds to wait for one CDP answer, for Chromium to start, and for it to exit.
CALL_TIMEOUT = 10.0
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_MAX_MESSAGE = 16 * 1024 * 1024  # a bound on one CDP message, far above what the tests get


class CDPError(Exception):
    """Chromium answered a CDP call with an error, or the connection failed."""


@contextlib.contextmanager
def chromium(executable: str) -> Iterator[str]:
    """Run headless Chromium with a new profile; yield its browser websocket URL.

    It is stopped on the way out by its PID: SIGTERM, at most ``STOP_TIMEOUT`` s to exit,
    then SIGKILL to the process group it leads (it was started in a session of its own, so
    the group holds its own helpers and nothing else), each wait bounded.
    """
    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as tmp:
        profile, log = Path(tmp, "profile"), Path(tmp, "chromium.log")
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            yield _wait_for_devtools(proc, profile / "DevToolsActivePort", log)
        finally:
            _stop(proc)


def _wait_for_devtools(proc: subprocess.Popen[bytes], port_file: Path, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    for _ in range(int(START_TIMEOUT / 0.02) + 1):
        if proc.poll() is not None:
            raise CDPError(f"chromium exited with status {proc.returncode} at start: {_tail(log)}")
        with contextlib.suppress(OSError):
            # Chromium writes the file whole once it listens: "PORT\n/devtools/browser/ID".
            lines = port_file.read_text().split()
            if len(lines) == 2 and lines[0].isdigit():
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    raise CDPError(f"chromium wrote no DevToolsActivePort within {START_TIMEOUT:g} s: {_tail(log)}")


def _tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(log.read_text(errors="replace").splitlines()[-5:])
    return "(no output)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.returncode is not None:
        return  # reaped already (it exited at start): its PID may belong to another process now
    proc.send_signal(signal.SIGTERM)  # Chromium closes its tabs and helpers, then exits
    _wait_unreaped(proc.pid, STOP_TIMEOUT)
    # Still unreaped, its PID (the group's id) cannot have been reused: the group holds
    # only what it started, and a helper that outlived it (or a chromium that ignored
    # SIGTERM) is killed with it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_TIMEOUT)


def _wait_unreaped(pid: int, timeout: float) -> None:
    """Wait at most ``timeout`` s for ``pid`` to exit, leaving it a zombie (not reaped)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.01) + 1):
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)


class _Pending:
    """One CDP call waiting for its answer."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.answer: dict[str, Any] = {}


class CDP:
    """One CDP connection to the browser endpoint; pages are flattened sessions on it."""

    def __init__(self, stream: anyio.abc.SocketStream, ws: WSConnection) -> None:
        self._stream = stream
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = anyio.Lock()
        self._broken: str | None = None

    async def call(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None) -> Any:
        """Send one command, return its ``result``; raise ``CDPError`` on an error or after ``CALL_TIMEOUT``."""
        if self._broken is not None:
            raise CDPError(f"{method}: the CDP connection is gone ({self._broken})")
        ident = next(self._ids)
        command: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            command["sessionId"] = session
        pending = self._pending[ident] = _Pending()
        try:
            await self._send(self._ws.send(Message(data=json.dumps(command))))
            with anyio.move_on_after(CALL_TIMEOUT):
                await pending.done.wait()
        finally:
            self._pending.pop(ident, None)
        if not pending.done.is_set():
            raise CDPError(f"{method}: no answer within {CALL_TIMEOUT:g} s")
        if "error" in pending.answer:
            raise CDPError(f"{method}: {pending.answer['error']}")
        if "result" not in pending.answer:
            raise CDPError(f"{method}: the CDP connection is gone ({self._broken})")
        return pending.answer["result"]

    async def _send(self, data: bytes) -> None:
        async with self._lock:
            await self._stream.send(data)

    async def _read(self) -> None:
        """Hand each answer to its caller; events are not used by the tests and are dropped."""
        text: list[str] = []
        try:
            for _ in range(10_000_000):  # bounded: a test makes a few hundred calls at most
                try:
                    data = await self._stream.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                    self._broken = "closed by chromium"
                    return
                self._ws.receive_data(data)
                for event in self._ws.events():
                    if isinstance(event, TextMessage):
                        text.append(event.data)
                        if sum(map(len, text)) > _MAX_MESSAGE:
                            raise CDPError("a CDP message larger than 16 MiB")
                        if event.message_finished:
                            self._answer(json.loads("".join(text)))
                            text.clear()
                    elif isinstance(event, Ping):
                        await self._send(self._ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        self._broken = f"closed by chromium ({event.code})"
                        return
        finally:
            if self._broken is None:
                self._broken = "the reader stopped"
            for pending in self._pending.values():  # nobody waits out CALL_TIMEOUT for a dead connection
                pending.done.set()

    def _answer(self, message: dict[str, Any]) -> None:
        pending = self._pending.get(message.get("id", -1))
        if pending is not None:
            pending.answer = message
            pending.done.set()

    @contextlib.asynccontextmanager
    async def page(self, url: str) -> AsyncIterator[Page]:
        """A new target (tab) showing ``url`` once loaded; closed on the way out unless it was."""
        target = (await self.call("Target.createTarget", {"url": "about:blank"}))["targetId"]
        page = Page(self, target)
        try:
            page.session = (await self.call("Target.attachToTarget", {"targetId": target, "flatten": True}))[
                "sessionId"
            ]
            await page.goto(url)
            yield page
        finally:
            if not page.closed:
                with anyio.CancelScope(shield=True), contextlib.suppress(CDPError):
                    await page.close()


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[CDP]:
    """Open a CDP connection to ``url`` (``ws://127.0.0.1:PORT/devtools/browser/ID``)."""
    address, _, target = url.removeprefix("ws://").partition("/")
    host, _, port = address.rpartition(":")
    with anyio.fail_after(CALL_TIMEOUT):
        stream = await anyio.connect_tcp(host, int(port))
    async with stream:
        # No Origin header: Chromium accepts a websocket without one from any local client.
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send(ws.send(Request(host=address, target="/" + target)))
        with anyio.fail_after(CALL_TIMEOUT):
            for _ in range(100):
                ws.receive_data(await stream.receive())
                events = list(ws.events())
                if any(isinstance(event, RejectConnection) for event in events):
                    raise CDPError(f"chromium refused the CDP websocket at {url}")
                if any(isinstance(event, AcceptConnection) for event in events):
                    break
            else:
                raise CDPError(f"no websocket handshake from {url}")
        cdp = CDP(stream, ws)
        async with anyio.create_task_group() as tg:
            tg.start_soon(cdp._read)
            try:
                yield cdp
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(1), contextlib.suppress(Exception):
                    await cdp._send(ws.send(CloseConnection(code=1000)))  # a clean close: Chromium logs none
                tg.cancel_scope.cancel()


class Page:
    """One tab: evaluate JavaScript in it, close it."""

    def __init__(self, cdp: CDP, target: str) -> None:
        self.cdp = cdp
        self.target = target
        self.session: str | None = None
        self.closed = False

    async def goto(self, url: str) -> None:
        """Navigate and wait (bounded) until the document has loaded."""
        result = await self.cdp.call("Page.navigate", {"url": url}, session=self.session)
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")
        deadline = time.monotonic() + CALL_TIMEOUT
        for _ in range(500):
            with contextlib.suppress(CDPError):  # the old document's context may be going away
                if await self.evaluate(f"location.href === {json.dumps(url)} && document.readyState === 'complete'"):
                    return
            if time.monotonic() > deadline:
                break
            await anyio.sleep(0.02)
        raise CDPError(f"{url} did not load within {CALL_TIMEOUT:g} s")

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` (a promise is awaited), or ``CDPError`` if it threw."""
        result = await self.cdp.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session=self.session,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CDPError(f"{expression!r} threw: {details.get('exception', {}).get('description', details)}")
        return result["result"].get("value")

    async def close(self) -> None:
        """Close the tab, as a user closing it would: its requests end with it."""
        self.closed = True
        await self.cdp.call("Target.closeTarget", {"targetId": self.target})
