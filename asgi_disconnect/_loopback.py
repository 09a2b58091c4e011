"""Real ASGI servers on 127.0.0.1 in the caller's event loop, and raw-socket clients that leave.

One harness for the demo, the doctor, the tests, the examples and the benchmarks (and
the seed of ``asgi_disconnect.testing``). A server is imported when it starts, never
with this module. The clients are blocking stdlib sockets: next to a server in the same
event loop, run them in a worker thread (``anyio.to_thread.run_sync``) so that they never
stall the server they talk to. Every read is bounded in bytes and in time.
:func:`run_process` runs a server in a process of its own instead, and always stops it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import anyio
import sniffio

from asgi_disconnect._types import ASGIApp, Message, Receive, Scope, Send

HOST = "127.0.0.1"
#: The most a client reads from one connection.
MAX_READ = 1 << 24

ServerName = Literal["uvicorn", "uvicorn-h11", "uvicorn-httptools", "hypercorn"]
SERVERS: tuple[ServerName, ...] = ("uvicorn", "uvicorn-h11", "uvicorn-httptools", "hypercorn")
#: Whether the server runs the app's lifespan: uvicorn's setting of the same name.
Lifespan = Literal["auto", "on", "off"]
CloseKind = Literal["fin", "rst"]


# --------------------------------------------------------------------------- servers
class ServerStartError(Exception):
    """A server that :func:`serve` or :func:`run_process` started did not come up.

    The message says why: it stopped (or its process exited) before it was ready, with
    the error or the last line it printed, or it was not ready within the start timeout.
    ``output`` holds the end of a process's output ("" for a server in this process).
    """

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


@dataclass(frozen=True)
class LiveServer:
    """A server that :func:`serve` started: which one, and where it listens."""

    server: ServerName
    port: int
    host: str = HOST


@contextlib.asynccontextmanager
async def serve(
    app: ASGIApp,
    *,
    server: ServerName = "uvicorn",
    lifespan: Lifespan = "off",
    start_timeout: float = 5.0,
    stop_timeout: int = 10,
) -> AsyncIterator[LiveServer]:
    """Serve ``app`` with a real server on 127.0.0.1 in this event loop.

    uvicorn runs on asyncio only; hypercorn on asyncio and on trio. The socket listens on
    an ephemeral port before the server starts, so no other process can take the port and
    a client may connect at once. It yields once the server has started, after the app's
    lifespan startup where there is one: ``lifespan`` is uvicorn's setting (``"auto"``: an
    app that raises on the lifespan scope is served without it; ``"on"``; ``"off"``: the
    app never sees the lifespan scope), and hypercorn is made to follow it. A server that
    stops first (an app that reports ``lifespan.startup.failed``), is not installed, or
    takes longer than ``start_timeout`` raises :class:`ServerStartError`, with nothing
    left running. On exit the server stops, giving the requests still running
    ``stop_timeout`` seconds; an exception of the ``async with`` block comes out as it is,
    after the server has stopped. The servers log to their stdlib loggers
    (``uvicorn.error``, ``hypercorn.error``), warnings and errors only, and never
    configure logging.
    """
    if server not in SERVERS:
        raise ValueError(f"server must be one of {', '.join(map(repr, SERVERS))}, got {server!r}")
    if lifespan not in ("auto", "on", "off"):
        raise ValueError(f"lifespan must be 'auto', 'on' or 'off', got {lifespan!r}")
    on_trio = sniffio.current_async_library() == "trio"
    if on_trio and server != "hypercorn":
        raise RuntimeError(f"{server} runs on asyncio only: on trio, serve with server='hypercorn'")
    _require(server)
    sock = _listening_socket()
    live = LiveServer(server, sock.getsockname()[1])
    failure: ServerStartError | None = None
    raised: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            if server == "hypercorn":
                running = _hypercorn(app, sock, lifespan, stop_timeout, on_trio)
            else:
                running = _uvicorn(app, _UVICORN_HTTP[server], sock, lifespan, stop_timeout)
            tg.start_soon(running.run)
            failure = await running.wait_started(start_timeout)
            if failure is None:
                try:
                    yield live
                except Exception as exc:
                    raised = exc
                finally:
                    running.stop()
            else:
                tg.cancel_scope.cancel()
        if failure is not None and running.lifespan is not None:
            # Once the server's task is gone (it can no longer go on to open its sockets):
            # its lifespan task, outside our group on asyncio, is stopped apart.
            await running.lifespan.abandon()
    finally:
        with contextlib.suppress(OSError):
            sock.close()  # uvicorn has closed it already; hypercorn only its duplicate
    # Raised here, out of the task group: the caller gets them as they are, not in a group.
    if failure is not None:
        raise failure
    if raised is not None:
        raise raised


_UVICORN_HTTP = {"uvicorn": "auto", "uvicorn-h11": "h11", "uvicorn-httptools": "httptools"}
#: What each server needs installed, and the command that installs it.
_NEEDS = {
    "uvicorn": (("uvicorn",), "pip install uvicorn"),
    "uvicorn-h11": (("uvicorn", "h11"), "pip install uvicorn h11"),
    "uvicorn-httptools": (("uvicorn", "httptools"), "pip install uvicorn httptools"),
    "hypercorn": (("hypercorn",), "pip install hypercorn"),
}


def missing(server: ServerName) -> str | None:
    """Why ``server`` cannot run here (a module it needs is not installed), or None."""
    modules, install = _NEEDS[server]
    absent = [name for name in modules if importlib.util.find_spec(name) is None]
    if not absent:
        return None
    return f"{server} needs {' and '.join(absent)}, which is not installed ({install})"


def _require(server: ServerName) -> None:
    why = missing(server)
    if why is not None:
        raise ServerStartError(why)


def _listening_socket() -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets, and without it
    # every keep-alive response after the first waits ~40 ms for Nagle.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Running:
    """A server's task in :func:`serve`: whether it has started, how it ended, how to stop it."""

    def __init__(
        self,
        name: str,
        serve: Callable[[], Awaitable[None]],
        started: Callable[[], bool],
        stop: Callable[[], None],
        lifespan: _LifespanTask | None = None,
    ) -> None:
        self.name = name
        self.lifespan = lifespan  # what runs the app's lifespan, where the server runs one
        self.serve = serve
        self.started = started
        self.stop = stop
        self.ended = False
        self.error: BaseException | None = None

    async def run(self) -> None:
        try:
            await self.serve()
        except BaseExceptionGroup as group:
            # hypercorn on trio raises a failed startup in a nursery's group; if serve() is
            # giving up at that moment, the group also holds the cancellation of our task.
            cancelled, failed = group.split(anyio.get_cancelled_exc_class())
            if not isinstance(failed, Exception) or self.started():
                raise
            self.error = _sole(failed)
            if cancelled is not None:
                raise cancelled from None
        except (Exception, SystemExit) as exc:  # uvicorn exits when the lifespan startup fails
            if self.started():
                raise
            self.error = _sole(exc)  # wait_started() reports it
        finally:
            self.ended = True

    async def wait_started(self, within: float) -> ServerStartError | None:
        """None once the server has started; the error if it stopped first or took too long."""
        with anyio.move_on_after(within):
            for _ in range(int(within * 100) + 1):
                if self.started():
                    return None
                refused = None if self.lifespan is None else self.lifespan.error
                if refused is not None:  # the server would go on running: it is unfit all the same
                    failure = ServerStartError(
                        f"{self.name} did not start: the app raised {refused!r} in its lifespan startup"
                    )
                    failure.__cause__ = refused
                    return failure
                if self.ended:
                    why = _why_stopped(self.error)
                    failure = ServerStartError(f"{self.name} did not start: {why}")
                    failure.__cause__ = self.error
                    return failure
                await anyio.sleep(0.01)
        return ServerStartError(f"{self.name} did not start within {within:g} s")


def _sole(error: BaseException) -> BaseException:
    """The one error inside nested groups of one (hypercorn's trio nurseries wrap what it raises)."""
    for _ in range(10):  # nurseries deep: more than hypercorn nests
        if not isinstance(error, BaseExceptionGroup) or len(error.exceptions) != 1:
            break
        error = error.exceptions[0]
    return error


def _why_stopped(error: BaseException | None) -> str:
    if error is None:
        return "it stopped"
    if isinstance(error, SystemExit):
        return f"it exited with status {error.code} (the app's lifespan startup failed)"
    return f"{type(error).__name__}: {error}"


def _uvicorn(app: ASGIApp, http: str, sock: socket.socket, lifespan: Lifespan, stop_timeout: int) -> _Running:
    import uvicorn

    task = None if lifespan == "off" else _LifespanTask(app)
    config = uvicorn.Config(
        app if task is None else task,
        http=http,
        lifespan=lifespan,
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=stop_timeout,
    )
    server = uvicorn.Server(config)

    def stop() -> None:
        server.should_exit = True

    return _Running(
        "uvicorn", functools.partial(server.serve, sockets=[sock]), lambda: server.started, stop, lifespan=task
    )


def _hypercorn(app: ASGIApp, sock: socket.socket, lifespan: Lifespan, stop_timeout: int, on_trio: bool) -> _Running:
    from hypercorn.config import Config

    hypercorn_serve: Callable[..., Awaitable[None]]
    if on_trio:
        from hypercorn.trio import serve as hypercorn_serve
    else:
        from hypercorn.asyncio import serve as hypercorn_serve

    startup = _LifespanStartup(app, lifespan)
    served: Any = startup  # hypercorn's types of an app are narrower than the package's
    stopping = anyio.Event()

    async def run() -> None:
        # hypercorn wraps the descriptor in a socket object of its own and closes that: it
        # gets a duplicate, so that each side closes only what it owns.
        fd = os.dup(sock.fileno())
        try:
            config = Config()
            config.bind = [f"fd://{fd}"]
            config.accesslog = None
            config.errorlog = logging.getLogger("hypercorn.error")
            config.graceful_timeout = stop_timeout
            await hypercorn_serve(served, config, shutdown_trigger=stopping.wait, mode="asgi")
        finally:
            _close_duplicate(fd, sock)

    return _Running("hypercorn", run, lambda: startup.over, stopping.set, startup)


class _LifespanTask:
    """``app``, with its lifespan call in a cancel scope of ours.

    uvicorn and hypercorn on asyncio run the lifespan in a task of their own, outside the
    task group of :func:`serve`: a startup still running when ``serve()`` gives up would be
    left running. ``abandon()`` cancels it and waits, bounded, for it to end.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        #: What the app raised in a lifespan startup that had to succeed (see _LifespanStartup).
        self.error: Exception | None = None
        self._scope = anyio.CancelScope()
        self._running = False
        self._ended = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        self._running = True
        try:
            with self._scope:
                await self._lifespan(scope, receive, send)
        finally:
            self._running = False
            self._ended.set()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    async def abandon(self, within: float = 1.0) -> None:
        """Cancel the lifespan call if it is running, and wait up to ``within`` seconds for it."""
        if self._running:
            self._scope.cancel()
            with anyio.move_on_after(within):
                await self._ended.wait()


class _LifespanStartup(_LifespanTask):
    """``app``, and whether hypercorn is past the lifespan startup: over once the app has
    sent ``lifespan.startup.complete``, or has returned or raised without reporting a
    failed startup (hypercorn then serves without lifespan).

    hypercorn always runs the lifespan: with ``"off"`` it is answered here and the app
    never sees it, and with ``"on"`` an app that raises there stops the server, as
    uvicorn does. The steps an app leaves when it returns early (raw apps often return at
    once) are answered here too: hypercorn's trio worker would send them to a closed channel.
    """

    def __init__(self, app: ASGIApp, lifespan: Lifespan) -> None:
        super().__init__(app)
        self.lifespan = lifespan
        self.over = False

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.lifespan == "off":
            await self._answer_alone(receive, send)
            return
        received: set[str] = set()  # the types of the messages the app received, and sent
        sent: set[str] = set()

        async def watched_receive() -> Message:
            message = await receive()
            received.add(message["type"])
            return message

        async def watched_send(message: Message) -> None:
            sent.add(message["type"])
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                self.over = True

        try:
            await self.app(scope, watched_receive, watched_send)
        except Exception as exc:
            if self.lifespan == "on" and not self.over:
                self.error = exc  # as uvicorn with lifespan="on": the server does not start
            raise
        finally:
            self.over = self.over or not ("lifespan.startup.failed" in sent or self.error is not None)
        if not sent & {"lifespan.startup.failed", "lifespan.shutdown.failed"}:
            await self._answer_alone(receive, send, received, sent)

    async def _answer_alone(
        self, receive: Receive, send: Send, received: Set[str] = frozenset(), sent: Set[str] = frozenset()
    ) -> None:
        """Answer each lifespan step that the app did not (with ``"off"``: every step)."""
        for step in ("lifespan.startup", "lifespan.shutdown"):
            if step not in received and (await receive())["type"] != step:
                return  # not the lifespan protocol: nothing more to answer
            if f"{step}.complete" not in sent:
                await send({"type": f"{step}.complete"})
            self.over = True


def _close_duplicate(fd: int, sock: socket.socket) -> None:
    # hypercorn opens its socket only after the lifespan startup: if that failed, the
    # duplicate is still open. Closed only while it names our socket (the same inode):
    # once hypercorn has closed it, the number may belong to another file.
    with contextlib.suppress(OSError):
        if os.fstat(fd).st_ino == os.fstat(sock.fileno()).st_ino:
            os.close(fd)


def free_port() -> int:
    """A port of 127.0.0.1 that is free now, for a server in another process.

    Another process may take it before that server binds it: where the server runs in
    this process, :func:`serve` binds first and has no such race.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


# --------------------------------------------------------------------------- processes
@contextlib.contextmanager
def run_process(
    argv: Sequence[str],
    port: int,
    *,
    ready: str | None = None,
    output: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    cpus: Set[int] | None = None,
    start_timeout: float = 15.0,
    stop_signal: signal.Signals = signal.SIGTERM,
    stop_timeout: float = 5.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process that listens on 127.0.0.1:``port``; stop it on the way out.

    It yields the process once the port accepts a connection or, with ``ready`` (a path),
    once ``GET ready`` answers 200. Its stdout and stderr are appended to ``output``, or
    dropped. ``cpus`` pins it as soon as it starts, before it has started a thread, so
    its threads inherit the mask (Linux). A process that exits first, or is not ready
    within ``start_timeout`` seconds, raises :class:`ServerStartError` with the end of
    its output, and is stopped all the same.

    Stopping goes by PID, each wait bounded: ``stop_signal`` (SIGINT lets a program such
    as valgrind write its results), up to ``stop_timeout`` seconds to exit, then SIGKILL.
    On POSIX the process leads a process group of its own and both signals go to that
    group: the workers it spawned stop with it, and nothing else is reached.
    """
    with contextlib.ExitStack() as files:
        sink = files.enter_context(output.open("ab")) if output is not None else subprocess.DEVNULL
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=os.name == "posix",
        )
    try:
        if cpus is not None:
            os.sched_setaffinity(proc.pid, cpus)
        _wait_ready(proc, port, ready, output, start_timeout)
        yield proc
    finally:
        _signal(proc, stop_signal)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=stop_timeout)
        # Also after a clean exit: a worker may outlive its leader. The group id cannot be
        # reused while any of its members lives, so this reaches only what we started.
        _signal(proc, None)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=stop_timeout)


def _wait_ready(
    proc: subprocess.Popen[bytes], port: int, ready: str | None, output: Path | None, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.02) + 1):  # and at most ``timeout`` seconds
        if proc.poll() is not None:
            raise _start_error(f"exited with status {proc.returncode} at start", output)
        if _answers(port, ready):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    what = "did not listen" if ready is None else f"did not answer GET {ready}"
    raise _start_error(f"{what} on {HOST}:{port} within {timeout:g} s", output)


def _answers(port: int, path: str | None) -> bool:
    try:
        if path is None:
            connect(port, timeout=1.0).close()
            return True
        return get(port, path, timeout=1.0).status == 200
    except (OSError, ValueError):  # not listening yet, or not answering yet
        return False


def _start_error(why: str, output: Path | None) -> ServerStartError:
    try:
        tail = output.read_bytes()[-4000:].decode("utf-8", "replace") if output is not None else ""
    except OSError:
        tail = ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return ServerStartError(f"{why}: {lines[-1][:300] if lines else '(no output)'}", tail)


def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals | None) -> None:
    """Send ``sig`` (None: kill) to the process's group, or on Windows to the process."""
    if os.name == "posix":
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the whole group is gone
            os.killpg(proc.pid, signal.SIGKILL if sig is None else sig)
    elif proc.poll() is None:  # pragma: no cover - Windows
        if sig is None:
            proc.kill()
        else:
            proc.send_signal(sig)


# --------------------------------------------------------------------------- clients
class Response(NamedTuple):
    """One HTTP/1.1 response: the status, the headers (names in lower case) and the body."""

    status: int
    headers: dict[str, str]
    body: bytes


def request_bytes(
    method: str = "GET", path: str = "/", headers: Mapping[str, str] | None = None, body: bytes = b""
) -> bytes:
    """An HTTP/1.1 request; a ``Content-Length`` is added for a body the headers do not frame."""
    headers = headers or {}
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", *(f"{name}: {value}" for name, value in headers.items())]
    if body and not any(name.lower() in ("content-length", "transfer-encoding") for name in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    """A blocking connection to 127.0.0.1:``port``; ``with connect(port) as sock:`` closes it."""
    return socket.create_connection((HOST, port), timeout=timeout)


def close(sock: socket.socket, how: CloseKind = "fin") -> None:
    """Leave as a client does: an orderly FIN (a closed tab, curl), or an abortive RST."""
    if how == "rst":
        # SO_LINGER with a zero timeout: close() sends a RST, as a killed client or a
        # proxy dropping the connection does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def read_until(sock: socket.socket, marker: bytes, *, limit: int = MAX_READ, timeout: float = 5.0) -> bytes:
    """Read until ``marker`` has arrived; return all that was read."""
    reader = _Reader(sock, limit, timeout)
    reader.fill(lambda: marker in reader.data, repr(marker))
    return bytes(reader.data)


def read_response(sock: socket.socket, *, limit: int = MAX_READ, timeout: float = 5.0) -> Response:
    """Read one final response, framed by its ``Content-Length``, chunked, or by the close.

    Interim responses (``100 Continue``, ``103 Early Hints``) are read and skipped. A 204
    or a 304 has no body, nor has ``101 Switching Protocols``, after which the connection
    speaks the other protocol. Chunked trailers are read and dropped. Bytes that arrive
    after the response (a pipelined one) are not kept: on a keep-alive connection, send
    the next request once this response is read.
    """
    reader = _Reader(sock, limit, timeout)
    for _ in range(limit):  # each interim response takes bytes, which the limit bounds
        status, headers = _response_head(reader)
        if not 100 <= status < 200 or status == 101:
            break
    if headers.get("transfer-encoding", "").lower().endswith("chunked"):
        body = _chunked_body(reader)
    elif status < 200 or status in (204, 304):
        body = b""
    elif "content-length" in headers:
        body = reader.take(int(headers["content-length"]), "the body")
    else:
        body = reader.rest("the body")
    return Response(status, headers, body)


def _response_head(reader: _Reader) -> tuple[int, dict[str, str]]:
    status, headers = parse_head(reader.until(b"\r\n\r\n", "the response head"))
    return status, {name.decode("latin-1"): value.decode("latin-1") for name, value in headers}


def parse_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """A response head (without its final empty line): the status, and the headers in
    order, names in lower case."""
    status_line, *lines = head.split(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    if not version.startswith(b"HTTP/") or not rest[:3].isdigit():
        raise ValueError(f"not an HTTP response: {head[:200].decode('latin-1')!r}")
    headers = [(name.strip().lower(), value.strip()) for name, _, value in (line.partition(b":") for line in lines)]
    return int(rest[:3]), headers


def get(port: int, path: str = "/", *, timeout: float = 5.0) -> Response:
    """``GET path`` on a connection of its own, which the server closes after the response."""
    with connect(port, timeout) as sock:
        sock.sendall(request_bytes("GET", path, {"Connection": "close"}))
        return read_response(sock, timeout=timeout)


def request_then_leave(
    port: int,
    path: str = "/",
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    until: bytes | None = None,
    wait: float = 0.0,
    how: CloseKind = "fin",
    timeout: float = 5.0,
) -> float:
    """Send a request, read until ``until`` (if given), wait ``wait`` seconds, then leave
    with ``how``; return ``time.monotonic()`` just before the close."""
    with connect(port, timeout) as sock:
        sock.sendall(request_bytes(method, path, headers, body))
        if until is not None:
            read_until(sock, until, timeout=timeout)
        if wait > 0:
            time.sleep(wait)
        left_at = time.monotonic()
        close(sock, how)
    return left_at


class _Reader:
    """What one socket has sent and nobody consumed yet, received within bounds."""

    def __init__(self, sock: socket.socket, limit: int, timeout: float) -> None:
        self.sock = sock
        self.data = bytearray()
        self.limit = limit
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.received = 0

    def fill(self, done: Callable[[], bool], what: str, *, eof: bool = False) -> None:
        """Receive until ``done()``; at the end of the stream return if ``eof``, else raise."""
        # Each round receives one byte at least, so the byte limit bounds the rounds too.
        for _ in range(self.limit + 2):
            if done():
                return
            if self.received > self.limit:
                raise ValueError(f"{what}: not in the first {self.limit} bytes: {self._seen()}")
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise self._late(what)
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise self._late(what) from None
            except ConnectionResetError as exc:
                raise ConnectionResetError(f"{what}: the connection was reset: {self._seen()}") from exc
            if not chunk:
                if eof:
                    return
                raise ConnectionError(f"{what}: the connection closed first: {self._seen()}")
            self.data += chunk
            self.received += len(chunk)

    def until(self, separator: bytes, what: str) -> bytes:
        """Consume up to and including ``separator``; return what came before it."""
        self.fill(lambda: separator in self.data, what)
        before, _, after = self.data.partition(separator)
        self.data = after
        return bytes(before)

    def take(self, size: int, what: str) -> bytes:
        """Consume ``size`` bytes."""
        self.fill(lambda: len(self.data) >= size, what)
        taken = bytes(self.data[:size])
        del self.data[:size]
        return taken

    def rest(self, what: str) -> bytes:
        """Consume all until the end of the stream."""
        self.fill(lambda: False, what, eof=True)
        taken = bytes(self.data)
        self.data.clear()
        return taken

    def _late(self, what: str) -> TimeoutError:
        return TimeoutError(f"{what}: not within {self.timeout:g} s: {self._seen()}")

    def _seen(self) -> str:
        return f"{self.received} bytes received, {bytes(self.data[:200])!r}"


def _chunked_body(reader: _Reader) -> bytes:
    body = bytearray()
    for _ in range(reader.limit):  # a chunk takes 5 bytes at least
        line = reader.until(b"\r\n", "a chunk size")
        try:
            size = int(line.partition(b";")[0], 16)  # a chunk extension is dropped
        except ValueError:
            raise ValueError(f"not a chunk size: {line[:80]!r}") from None
        if size == 0:
            for _ in range(reader.limit):  # the trailers, dropped, up to the empty line
                if not reader.until(b"\r\n", "the trailers"):
                    break
            return bytes(body)
        chunk = reader.take(size + 2, "a chunk")
        if chunk[size:] != b"\r\n":
            raise ValueError(f"a chunk of {size} bytes does not end with CRLF: {chunk[-40:]!r}")
        body += chunk[:size]
    raise ValueError(f"more than {reader.limit} chunks")
