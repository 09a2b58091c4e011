"""The loopback harness itself (``asgi_disconnect._loopback``): its clients' framing and
error paths, its closes, and servers that start, fail and stop cleanly.

The clients' framing is checked against a canned server: a socket on 127.0.0.1, in a
thread, that sends exact bytes and then closes (FIN or RST) or holds the connection.
The rest runs real servers: uvicorn and hypercorn in the test's asyncio loop, and
server processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import anyio
import anyio.to_thread
import pytest

from asgi_disconnect._loopback import (
    HOST,
    CloseKind,
    ServerName,
    ServerStartError,
    _Running,
    close,
    connect,
    free_port,
    get,
    read_until,
    request_bytes,
    request_then_leave,
    run_process,
    serve,
)
from asgi_disconnect._types import Message, Receive, Scope, Send

from .helpers import CLOSES, fetch
from .servers import wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.server]

SERVE: tuple[ServerName, ...] = ("uvicorn-h11", "uvicorn-httptools", "hypercorn")
Then = Literal["fin", "rst", "hold"]


# -- a canned server ---------------------------------------------------------------------


@contextlib.contextmanager
def canned(*parts: bytes, pause: float = 0.0, then: Then = "fin") -> Iterator[int]:
    """A server for one connection, in a thread: it reads the request head, sends ``parts``
    (``pause`` seconds apart), then closes with a FIN or a RST, or holds the connection
    until the client leaves; yields its port."""
    listener = socket.create_server((HOST, 0))
    listener.settimeout(5)
    errors: list[BaseException] = []

    def answer() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                read_until(conn, b"\r\n\r\n")
                for index, part in enumerate(parts):
                    if index and pause:
                        time.sleep(pause)
                    conn.sendall(part)
                if then == "hold":
                    conn.settimeout(5)
                    with contextlib.suppress(OSError):
                        conn.recv(1)  # returns once the client has left
                else:
                    close(conn, then)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with listener:
            yield listener.getsockname()[1]
    finally:
        thread.join(10)
    assert not thread.is_alive(), "the canned server should stop itself"
    assert errors == []


# -- 1. reads: bounded, and saying what arrived -------------------------------------------


def test_read_until_times_out_with_what_was_received() -> None:
    """A marker that never comes raises TimeoutError within the timeout, naming the bytes that came."""
    with canned(b"HTTP/1.1 200 OK\r\n", then="hold") as port, connect(port) as sock:
        sock.sendall(request_bytes())
        began = time.monotonic()
        with pytest.raises(TimeoutError, match=r"not within 0\.2 s: 17 bytes received, b'HTTP/1\.1 200 OK\\r\\n'"):
            read_until(sock, b"never", timeout=0.2)
    assert time.monotonic() - began < 2


def test_read_until_reports_a_close_before_the_marker() -> None:
    """A server that closes before the marker raises ConnectionError with what it sent."""
    with canned(b"partial") as port, connect(port) as sock:
        sock.sendall(request_bytes())
        with pytest.raises(
            ConnectionError, match=r"b'marker': the connection closed first: 7 bytes received, b'partial'"
        ):
            read_until(sock, b"marker")


def test_read_until_stops_at_its_byte_limit() -> None:
    """A marker not in the first ``limit`` bytes raises ValueError instead of reading on."""
    with canned(b"x" * 1000, then="hold") as port, connect(port) as sock:
        sock.sendall(request_bytes())
        with pytest.raises(ValueError, match="not in the first 100 bytes"):
            read_until(sock, b"marker", limit=100)


def test_a_body_cut_short_raises_with_what_was_received() -> None:
    """A server that closes before its Content-Length is complete raises ConnectionError, showing the body so far."""
    with canned(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc") as port:
        with pytest.raises(ConnectionError, match=r"the body: the connection closed first: .*b'abc'"):
            fetch(port)


def test_a_reset_raises_connection_reset_error() -> None:
    """A server that resets the connection mid-body raises ConnectionResetError saying what was being read."""
    with canned(b"HTTP/1.1 200 OK\r\n\r\nsome", pause=0.05, then="rst") as port:
        with pytest.raises(ConnectionResetError, match="the connection was reset"):
            fetch(port)


def test_a_non_http_answer_is_rejected() -> None:
    """An answer that is not HTTP raises ValueError quoting it."""
    with canned(b"SSH-2.0-OpenSSH_9.6\r\n\r\n") as port:
        with pytest.raises(ValueError, match="not an HTTP response: 'SSH-2.0"):
            fetch(port)


# -- 2. read_response's framing ------------------------------------------------------------


def test_a_body_without_length_ends_at_the_close() -> None:
    """With neither Content-Length nor chunked, the body is all that comes until the server's FIN."""
    parts = (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nfirst ", b"second")
    with canned(*parts, pause=0.05) as port:
        assert fetch(port) == (200, {"connection": "close"}, b"first second")


# Each of these heads has no body, whatever it says: the server then holds the connection,
# so waiting for the close would time out.
BODYLESS = {
    "204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "304 with the Content-Length of what it stands for": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    "101 Switching Protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
}


@pytest.mark.parametrize("head", BODYLESS.values(), ids=BODYLESS.keys())
def test_bodyless_statuses_return_without_waiting(head: bytes) -> None:
    """204, 304 and 101 have no body: read_response returns at the end of the head, the connection still open."""
    with canned(head, then="hold") as port:
        began = time.monotonic()
        status, _, body = fetch(port)
    assert status == int(head[9:12])
    assert body == b""
    assert time.monotonic() - began < 1


@pytest.mark.parametrize("pause", [0.0, 0.05], ids=["one-packet", "apart"])
def test_interim_responses_are_skipped(pause: float) -> None:
    """100 Continue and 103 Early Hints are skipped, together with the final response or apart from it."""
    parts = (
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )
    with canned(*(parts if pause else (b"".join(parts),)), pause=pause, then="hold") as port:
        assert fetch(port) == (200, {"content-length": "2"}, b"ok")


def test_chunks_are_decoded() -> None:
    """Chunks are joined, their extensions and the trailers dropped, however the bytes are split."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = b"5;name=value\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Checksum: 1\r\n\r\n"
    parts = [head, *(chunks[i : i + 7] for i in range(0, len(chunks), 7))]
    with canned(*parts, pause=0.005, then="hold") as port:
        status, headers, body = fetch(port)
    assert (status, headers["transfer-encoding"], body) == (200, "chunked", b"hello 0123456789")


# Chunked bodies read_response refuses, with what it says.
MALFORMED = {
    "a size that is not hex": (b"zz\r\nhello\r\n0\r\n\r\n", "not a chunk size: b'zz'"),
    "a chunk longer than its size": (b"3\r\nhello\r\n0\r\n\r\n", "a chunk of 3 bytes does not end with CRLF"),
}


@pytest.mark.parametrize(("chunks", "error"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_chunks_are_rejected(chunks: bytes, error: str) -> None:
    """A malformed chunked body raises ValueError saying what is wrong."""
    with canned(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks, then="hold") as port:
        with pytest.raises(ValueError, match=error):
            fetch(port)


# -- 3. close(): FIN or RST, as the server sees it ------------------------------------------


@pytest.mark.parametrize("how", CLOSES)
def test_close_sends_a_fin_or_a_reset(how: CloseKind) -> None:
    """close(how="fin") ends the stream (recv returns b""); close(how="rst") resets it (ECONNRESET)."""
    with socket.create_server((HOST, 0)) as listener:
        listener.settimeout(5)
        client = connect(listener.getsockname()[1])
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            close(client, how)
            if how == "rst":
                with pytest.raises(ConnectionResetError):
                    conn.recv(1)
            else:
                assert conn.recv(1) == b""


@pytest.mark.parametrize("how", CLOSES)
@pytest.mark.parametrize("server", SERVE)
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_app_hears_the_client_leave(server: ServerName, how: CloseKind) -> None:
    """After request_then_leave, with a FIN or a RST, the app's receive() returns http.disconnect."""
    heard: list[Message] = []
    done = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ready\n", "more_body": True})
        heard.append(await receive())
        done.set()

    async with serve(app, server=server) as live:
        left_at = await anyio.to_thread.run_sync(lambda: request_then_leave(live.port, until=b"ready\n", how=how))
        await wait_for(done, "the app heard the client leave")

    assert [message["type"] for message in heard] == ["http.disconnect"]
    assert left_at <= time.monotonic()


# -- 4. serve(): started, stopped, nothing left behind ---------------------------------------


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers every request with ``ok``; returns at once from lifespan."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


class Leftovers:
    """What the process holds now, to compare with what it holds later: tasks, threads, files."""

    def __init__(self) -> None:
        self.tasks = asyncio.all_tasks()
        self.threads = set(threading.enumerate())
        self.fds = self._fds()

    @staticmethod
    def _fds() -> set[str]:
        return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()

    def assert_none_new(self) -> None:
        assert asyncio.all_tasks() - self.tasks == set()
        assert set(threading.enumerate()) - self.threads == set()
        assert self._fds() == self.fds


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_start_failure_raised_as_serve_gives_up_is_still_a_start_failure() -> None:
    """A server that fails its start in a group while serve() cancels it (hypercorn on trio,
    a lifespan.startup.failed seen by serve() first): the failure is recorded, not raised,
    and the cancellation still ends the task."""
    entered = anyio.Event()

    async def fails_as_it_is_cancelled() -> None:
        async def startup() -> None:
            try:
                entered.set()
                await anyio.sleep_forever()
            finally:
                raise LookupError("the database is down")  # the server's own startup failure

        async with anyio.create_task_group() as tg:  # the server's own nursery
            tg.start_soon(startup)
            await anyio.sleep_forever()

    running = _Running("server", fails_as_it_is_cancelled, lambda: False, lambda: None)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(running.run)
            await entered.wait()
            tg.cancel_scope.cancel()
    assert running.ended
    assert isinstance(running.error, LookupError)
    failure = await running.wait_started(1.0)
    assert failure is not None
    assert str(failure) == "server did not start: LookupError: the database is down"


def assert_refused(port: int) -> None:
    """Nothing listens on ``port`` any more."""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, port), timeout=1).close()


@pytest.mark.parametrize("server", SERVE)
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_serve_leaves_no_task_thread_file_or_port(server: ServerName) -> None:
    """After serve() the server's tasks, threads, descriptors and listening port are all gone."""
    await anyio.to_thread.run_sync(lambda: None)  # the worker thread the client uses: there before
    before = Leftovers()
    async with serve(hello, server=server) as live:
        response = await anyio.to_thread.run_sync(get, live.port)
    assert response.body == b"ok"
    before.assert_none_new()
    assert_refused(live.port)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_error_in_the_block_comes_out_as_it_is() -> None:
    """An exception raised inside ``async with serve()`` is not wrapped in a group, and the server stops."""
    before = Leftovers()
    with pytest.raises(LookupError, match="the test's own error"):
        async with serve(hello) as live:
            raise LookupError("the test's own error")
    before.assert_none_new()
    assert_refused(live.port)


async def fails_at_startup(scope: Scope, receive: Receive, send: Send) -> None:
    """Reports a failed lifespan startup, as an app whose database is down does."""
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "the database is down"})
        return
    await hello(scope, receive, send)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_failed_lifespan_startup_is_reported() -> None:
    """An app that reports lifespan.startup.failed makes serve() raise ServerStartError at once, with its message."""
    ports: list[int] = []
    before = Leftovers()
    began = time.monotonic()
    with pytest.raises(ServerStartError, match="hypercorn did not start: LifespanFailureError: .*the database is down"):
        async with serve(fails_at_startup, server="hypercorn", lifespan="auto") as live:
            ports.append(live.port)
    assert ports == [], "the block should not run"
    assert time.monotonic() - began < 2
    before.assert_none_new()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_app_that_raises_at_lifespan_is_served_without_it(caplog: pytest.LogCaptureFixture) -> None:
    """An app that raises in lifespan is served all the same, as hypercorn does, with its warning."""

    async def raises_at_startup(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan here")
        await hello(scope, receive, send)

    with caplog.at_level(logging.WARNING, logger="hypercorn.error"):
        async with serve(raises_at_startup, server="hypercorn", lifespan="auto") as live:
            response = await anyio.to_thread.run_sync(get, live.port)
    assert response.body == b"ok"
    assert "continuing without Lifespan support" in caplog.text


# -- 5. run_process(): a server in a process of its own --------------------------------------


def python(code: str) -> list[str]:
    """This interpreter running ``code``."""
    return [sys.executable, "-c", code]


def http_server(port: int) -> list[str]:
    """The standard library's HTTP server on 127.0.0.1:``port``."""
    return [sys.executable, "-m", "http.server", "--bind", HOST, str(port)]


def gone(pid: int) -> bool:
    """No such process, or only its zombie (Linux)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def wait_gone(pid: int, within: float = 5.0) -> bool:
    """Whether ``pid`` is gone within ``within`` seconds."""
    deadline = time.monotonic() + within
    for _ in range(int(within / 0.02) + 1):
        if gone(pid) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return gone(pid)


def test_run_process_waits_for_the_server_and_stops_it(tmp_path: Path) -> None:
    """run_process yields once GET ready answers 200, and on exit the process has ended and the port is free."""
    port = free_port()
    with run_process(http_server(port), port, ready="/", cwd=tmp_path) as proc:
        assert get(port).status == 200
    assert proc.returncode is not None
    assert_refused(port)


def test_a_process_that_exits_at_start_is_reported(tmp_path: Path) -> None:
    """A process that exits before it listens raises ServerStartError with its status and its last line."""
    port = free_port()
    code = "import sys; print('starting'); print('the config is broken'); sys.exit(3)"
    with pytest.raises(ServerStartError, match="exited with status 3 at start: the config is broken") as caught:
        with run_process(python(code), port, output=tmp_path / "out.log"):
            pytest.fail("the block should not run")
    assert "starting" in caught.value.output


def test_a_process_that_never_listens_is_stopped(tmp_path: Path) -> None:
    """A process not listening within start_timeout raises ServerStartError and is stopped."""
    port = free_port()
    output = tmp_path / "out.log"
    code = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    began = time.monotonic()
    with pytest.raises(ServerStartError, match=rf"did not listen on 127\.0\.0\.1:{port} within 1\.5 s: \d+"):
        with run_process(python(code), port, output=output, start_timeout=1.5):
            pytest.fail("the block should not run")
    assert time.monotonic() - began < 5
    assert wait_gone(int(output.read_text().split()[0]))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_a_stubborn_server_and_its_worker_are_killed(tmp_path: Path) -> None:
    """A server that ignores SIGTERM is killed after stop_timeout, and so is the worker it spawned."""
    port = free_port()
    output = tmp_path / "out.log"
    code = (
        "import http.server, signal, subprocess, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(worker.pid, flush=True); "
        f"http.server.ThreadingHTTPServer(('{HOST}', {port}), http.server.SimpleHTTPRequestHandler).serve_forever()"
    )
    began = time.monotonic()
    with run_process(python(code), port, output=output, cwd=tmp_path, stop_timeout=0.5) as proc:
        worker = int(output.read_text().split()[0])
        assert not gone(worker)
    assert proc.returncode == -signal.SIGKILL  # the SIGTERM was ignored
    assert time.monotonic() - began < 5
    assert wait_gone(worker), "the worker should be killed with its server"
