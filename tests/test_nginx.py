"""uvicorn behind a real nginx: does a client's departure reach the app through the proxy?

nginx (/usr/sbin/nginx, Debian's 1.22) runs in a process of its own, one worker and no
master, with a configuration written into ``tmp_path``, in front of one uvicorn
(httptools) in the tests' event loop. Three ways to proxy, one nginx each:

- ``nginx-buffered``: nginx's defaults (``proxy_buffering on``, HTTP/1.0 to the upstream,
  a new upstream connection per request);
- ``nginx-unbuffered``: ``proxy_buffering off``;
- ``nginx-keepalive``: HTTP/1.1 to an ``upstream`` block with ``keepalive 8``.

A raw-socket client (blocking, in a worker thread) talks to nginx, which talks to uvicorn,
which calls a small raw ASGI app behind ``DisconnectMiddleware``: ``/observe/...`` in
observe mode, ``/cancel/...`` in cancel mode. The app records each request under its
``run`` query parameter, so a test reads what its own handler did, and when. nginx closes
the upstream connection when its client leaves (it logs "client prematurely closed
connection" at [info]), uvicorn turns that into ``http.disconnect``: the tests check the
handler learnt of it and stopped, then that a normal request still goes through whole.
The last four tests show where nginx does not pass the departure on, or passes it on
late: ``proxy_ignore_client_abort on`` (a response is not cut, a stream only on a failed
write), a response that nginx caches, and a request body that nginx buffers. Each test
prints its detection delay (from the client's close to the middleware's detection, both
``time.monotonic()`` in this process): ``pytest -s`` shows them.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs

import anyio
import anyio.to_thread
import pytest

from asgi_disconnect import DisconnectMiddleware, DisconnectState, disconnect_state
from asgi_disconnect._types import Receive, Scope, Send
from asgi_disconnect.testing import serve
from tests.compat import compat
from tests.helpers import CLOSES, Close, fetch
from tests.servers import close, free_port, raw_connection, request_bytes, run_process, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.server]

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
if not Path(NGINX).is_file():
    pytest.skip(f"nginx is not installed ({NGINX} is missing: apt-get install nginx-light)", allow_module_level=True)

Proxy = Literal["nginx-buffered", "nginx-unbuffered", "nginx-keepalive"]
PROXIES: tuple[Proxy, ...] = ("nginx-buffered", "nginx-unbuffered", "nginx-keepalive")
Mode = Literal["observe", "cancel"]
MODES: tuple[Mode, ...] = ("observe", "cancel")

SLOW = 5.0  # seconds the slow upstream takes: every abort test ends long before, or fails
TICK = 0.02  # seconds between two chunks of the stream
MAX_CHUNKS = 250  # the stream's bound: 5 s of chunks
READ_CHUNKS = 2  # the streaming client leaves once it has received this many chunks
WITHIN = 5.0  # seconds from the client's close to the request's end, at most
PAGE = bytes(range(256)) * 800  # 200 KiB: more than nginx's in-memory proxy buffers (36 KiB)
UPLOAD = 512 * 1024  # under nginx's default client_max_body_size (1 MiB)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """uvicorn runs on asyncio only."""
    return "asyncio"


# --------------------------------------------------------------------------- the upstream app
@dataclass
class Run:
    """One request as the app saw it, from the router in front of the middleware to the handler."""

    called: anyio.Event = field(default_factory=anyio.Event)  # the handler was called
    returned: anyio.Event = field(default_factory=anyio.Event)  # the middleware returned to uvicorn
    state: DisconnectState | None = None
    produced: list[float] = field(default_factory=list)  # when each chunk was produced, before its send
    upstream_finished: bool = False  # the slow upstream ran its whole time
    responded: bool = False  # the handler's last send went through
    finally_ran: bool = False  # the stream's generator ran its finally
    received: bytes = b""  # the request body the upload handler read
    escaped: BaseException | None = None  # what escaped the middleware to uvicorn


runs: dict[str, Run] = {}


def run_id(scope: Scope) -> str:
    values: list[str] = parse_qs(scope["query_string"].decode()).get("run", [""])
    return values[0]


def seconds(scope: Scope, default: float) -> float:
    return float(parse_qs(scope["query_string"].decode()).get("seconds", [str(default)])[0])


async def start(send: Send, status: int = 200, length: int | None = None) -> None:
    headers = [(b"content-type", b"text/plain")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def chunks(run: Run, count: int) -> AsyncGenerator[bytes]:
    """An SSE-like feed: ``count`` frames (``MAX_CHUNKS`` at most), one every ``TICK`` seconds."""
    try:
        for i in range(min(count, MAX_CHUNKS)):
            run.produced.append(time.monotonic())
            yield b"data: %d\n\n" % i
            await anyio.sleep(TICK)
    finally:
        run.finally_ran = True


async def handler(scope: Scope, receive: Receive, send: Send) -> None:
    """The raw ASGI app behind the middleware: ``/slow``, ``/stream``, ``/page``, ``/upload``."""
    if scope["type"] != "http":
        return  # uvicorn's lifespan="auto": an app that returns at once is served without it
    run = runs[run_id(scope)]
    state = run.state = disconnect_state(scope)
    run.called.set()
    path = scope["path"].split("/", 2)[-1]
    if path == "slow":
        if state.cancel:  # cancel mode: a plain await of the slow upstream, which the middleware cuts
            await anyio.sleep(seconds(scope, SLOW))
        else:  # observe mode: the handler stops waiting for its upstream once the client has left
            with anyio.move_on_after(seconds(scope, SLOW)):
                await state.wait()
        run.upstream_finished = not state.disconnected
        await start(send, length=5)
        await send({"type": "http.response.body", "body": b"done\n"})
    elif path == "stream":
        await start(send)
        # aclosing: the generator's finally runs here, when a send raises or the task is cancelled.
        count = int(parse_qs(scope["query_string"].decode()).get("chunks", [str(MAX_CHUNKS)])[0])
        async with contextlib.aclosing(chunks(run, count)) as feed:
            async for chunk in feed:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "page":
        await start(send, length=len(PAGE))
        await send({"type": "http.response.body", "body": PAGE})
    elif path == "upload":
        body = bytearray()
        for _ in range(UPLOAD + 1):  # each message carries a byte at least, or ends the body
            message = await receive()
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        run.received = bytes(body)
        digest = hashlib.sha256(body).hexdigest().encode()
        await start(send, length=len(digest))
        await send({"type": "http.response.body", "body": digest})
    else:
        await start(send, status=404, length=0)
        await send({"type": "http.response.body", "body": b""})
    run.responded = True


class Router:
    """What uvicorn calls: ``/observe/...`` to the middleware in observe mode, ``/cancel/...`` in
    cancel mode; it creates each request's ``Run`` and records when the middleware returned."""

    def __init__(self) -> None:
        self.observe = DisconnectMiddleware(handler)
        self.cancel = DisconnectMiddleware(handler, cancel=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await handler(scope, receive, send)
            return
        run = runs.setdefault(run_id(scope), Run())
        app = self.cancel if scope["path"].startswith("/cancel/") else self.observe
        try:
            await app(scope, receive, send)
        except BaseException as exc:
            run.escaped = exc
            raise
        finally:
            run.returned.set()


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[int]:
    """One uvicorn (httptools) for the module, in the tests' event loop: its port."""
    async with serve(Router(), server="uvicorn-httptools") as live:
        yield live.port


# --------------------------------------------------------------------------- nginx
CONFIG = """\
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body_temp;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    proxy_cache_path {prefix}/cache keys_zone=responses:1m;
    upstream app {{
        server 127.0.0.1:{upstream};
{upstream_extra}    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
{location_extra}        }}
        # The documented exception: nginx keeps the upstream request going after its client left.
        location /ignore/ {{
            proxy_ignore_client_abort on;
            proxy_pass http://app/observe/;
{location_extra}        }}
        # The other one: a response being cached is fetched whole, whoever is still there.
        location /cached/ {{
            proxy_cache responses;
            proxy_cache_valid 200 1m;
            proxy_pass http://app/observe/;
{location_extra}        }}
    }}
}}
"""
EXTRA: dict[Proxy, tuple[str, str]] = {
    "nginx-buffered": ("", ""),
    "nginx-unbuffered": ("", "            proxy_buffering off;\n"),
    "nginx-keepalive": (
        "        keepalive 8;\n",
        '            proxy_http_version 1.1;\n            proxy_set_header Connection "";\n',
    ),
}


@dataclass
class Nginx:
    """A running nginx: its configuration's name, its port and its error log."""

    proxy: Proxy
    port: int
    error_log: Path

    def log_size(self) -> int:
        return self.error_log.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.error_log.open("rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", "replace")


class Pool:
    """The module's nginx processes, one per configuration, each started on first use."""

    def __init__(self, upstream: int, tmp_path_factory: pytest.TempPathFactory, stack: contextlib.ExitStack) -> None:
        self.upstream = upstream
        self.tmp_path_factory = tmp_path_factory
        self.stack = stack
        self.running: dict[Proxy, Nginx] = {}
        self.failed: dict[Proxy, Exception] = {}

    def get(self, proxy: Proxy) -> Nginx:
        if proxy in self.failed:  # started once only: every later test reports the same reason
            raise self.failed[proxy]
        if proxy not in self.running:
            try:
                self.running[proxy] = self.start(proxy)
            except Exception as exc:
                self.failed[proxy] = exc
                raise
        return self.running[proxy]

    def start(self, proxy: Proxy) -> Nginx:
        prefix = self.tmp_path_factory.mktemp(proxy)
        port = free_port()
        upstream_extra, location_extra = EXTRA[proxy]
        conf = prefix / "nginx.conf"
        conf.write_text(
            CONFIG.format(
                prefix=prefix,
                upstream=self.upstream,
                port=port,
                upstream_extra=upstream_extra,
                location_extra=location_extra,
            )
        )
        argv = [NGINX, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
        # Stopped by PID at the module's end: SIGTERM (nginx's fast shutdown), then SIGKILL.
        self.stack.enter_context(run_process(argv, port, output=prefix / "nginx.out", cwd=prefix))
        return Nginx(proxy, port, prefix / "error.log")


@pytest.fixture(scope="module")
def pool(upstream: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """nginx in front of the module's uvicorn: each configuration started once, all stopped at the end."""
    with contextlib.ExitStack() as stack:
        yield Pool(upstream, tmp_path_factory, stack)


@pytest.fixture
def nginx(pool: Pool, proxy: Proxy) -> Nginx:
    """The nginx of the test's ``proxy`` configuration."""
    return pool.get(proxy)


def problems(log: str) -> list[str]:
    """The lines of an nginx error log that say something went wrong in nginx itself."""
    return [line for line in log.splitlines() if any(level in line for level in ("[alert]", "[emerg]", "[crit]"))]


# --------------------------------------------------------------------------- clients (blocking)
def send_request(port: int, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> socket.socket:
    """Connect to nginx and send a request (or the start of one); the caller closes the socket."""
    sock = raw_connection(port)
    try:
        sock.sendall(request_bytes("GET" if not body else "POST", path, headers, body))
    except BaseException:
        sock.close()
        raise
    return sock


def leave(sock: socket.socket, how: Close) -> float:
    """Close the client's socket; return ``time.monotonic()`` just before."""
    left_at = time.monotonic()
    close(sock, how)
    return left_at


def read_frames_then_leave(port: int, path: str, frames: int, how: Close, timeout: float = 5.0) -> tuple[float, bytes]:
    """GET ``path``, read the chunked body until ``frames`` SSE frames have arrived, leave with
    ``how``; return when it closed and the body it had read."""
    raw = bytearray()
    deadline = time.monotonic() + timeout
    with send_request(port, path) as sock:
        for _ in range(1 << 16):  # each round receives a byte at least
            body_start = raw.find(b"\r\n\r\n")
            if body_start >= 0:
                head = bytes(raw[:body_start]).lower()
                assert b" 200 " in head.split(b"\r\n")[0], head
                assert b"transfer-encoding: chunked" in head, head
                body = dechunk(bytes(raw[body_start + 4 :]))
                if body.count(b"\n\n") >= frames:
                    return leave(sock, how), bytes(body)
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{frames} frames not within {timeout} s: {bytes(raw)!r}"
            sock.settimeout(remaining)
            data = sock.recv(65536)
            assert data, f"the connection closed after {bytes(raw)!r}"
            raw += data
    raise AssertionError(f"more than 64 Ki reads for {frames} frames")  # pragma: no cover


def dechunk(data: bytes) -> bytearray:
    """The body carried by the complete chunks at the start of chunked ``data``."""
    body = bytearray()
    at = 0
    for _ in range(len(data)):  # each chunk takes 5 bytes at least
        end = data.find(b"\r\n", at)
        if end < 0:
            break
        size = int(data[at:end].split(b";")[0], 16)
        if size == 0 or len(data) < end + 2 + size + 2:
            break
        body += data[end + 2 : end + 2 + size]
        at = end + 2 + size + 2
    return body


# --------------------------------------------------------------------------- helpers
counter = iter(range(1 << 30))


def new_run() -> tuple[str, Run]:
    """A fresh run id, and the ``Run`` the app will fill for it."""
    name = f"r{next(counter)}"
    run = runs[name] = Run()
    return name, run


async def settled(nginx: Nginx, mark: int) -> str:
    """After an abort: a normal request through the same nginx completes byte-exact, and
    nginx logged no trouble of its own; return what it logged since ``mark``."""
    name, run = new_run()
    status, _, body = await anyio.to_thread.run_sync(fetch, nginx.port, "GET", f"/observe/page?run={name}")
    assert (status, len(body)) == (200, len(PAGE))
    assert body == PAGE
    assert run.state is not None and not run.state.disconnected
    log = nginx.log_since(mark)
    assert problems(log) == []
    return log


def report(nginx: Nginx, mode: Mode, what: str, how: Close, left_at: float, state: DisconnectState) -> None:
    """Print the detection delay: from the client's close to the middleware's detection."""
    assert state.detected_at is not None
    delay = (state.detected_at - left_at) * 1000
    print(f"{nginx.proxy} {mode} {what} {how}: detected {delay:.2f} ms after the client closed")


def cells(feature: Literal["before_response", "mid_stream"]) -> list[object]:
    """Every (nginx, mode, how), each marked with the compatibility cell it proves."""
    return [
        pytest.param(
            proxy,
            mode,
            how,
            marks=compat("asgi", proxy, feature if mode == "observe" else "cancel"),
            id=f"{proxy}-{mode}-{how}",
        )
        for proxy in PROXIES
        for mode in MODES
        for how in CLOSES
    ]


# --------------------------------------------------------------------------- the tests
@pytest.mark.parametrize(("proxy", "mode", "how"), cells("before_response"))
async def test_client_leaves_before_the_response(nginx: Nginx, mode: Mode, how: Close) -> None:
    """The client leaves while the handler awaits a 5 s upstream: the handler learns of it and stops."""
    mark = nginx.log_size()
    name, run = new_run()
    sock = await anyio.to_thread.run_sync(send_request, nginx.port, f"/{mode}/slow?run={name}")
    try:
        await wait_for(run.called, "the handler was called through nginx", WITHIN)
    finally:
        left_at = await anyio.to_thread.run_sync(leave, sock, how)
    await wait_for(run.returned, "the request ended after the client left", WITHIN)

    state = run.state
    assert state is not None
    assert (state.disconnected, state.phase) == (True, "before_response")
    assert state.detected_at is not None and state.detected_at >= left_at
    assert not run.upstream_finished  # the 5 s wait was cut short
    assert state.cancelled is (mode == "cancel")
    assert not run.responded  # observe mode: the response's send raised ClientDisconnected
    assert run.escaped is None  # ...which the middleware absorbed
    report(nginx, mode, "before the response", how, left_at, state)

    log = await settled(nginx, mark)
    # nginx saw the departure and closed the upstream connection, which uvicorn reported.
    assert "client prematurely closed connection, so upstream connection is closed too" in log


@pytest.mark.parametrize(("proxy", "mode", "how"), cells("mid_stream"))
async def test_client_leaves_mid_stream(nginx: Nginx, mode: Mode, how: Close) -> None:
    """The client leaves after two chunks: the stream stops, at most one chunk after detection."""
    mark = nginx.log_size()
    name, run = new_run()
    left_at, body = await anyio.to_thread.run_sync(
        read_frames_then_leave, nginx.port, f"/{mode}/stream?run={name}", READ_CHUNKS, how
    )
    await wait_for(run.returned, "the stream ended after the client left", WITHIN)

    assert body.startswith(b"data: 0\n\ndata: 1\n\n")  # the chunks arrive as the app produced them
    state = run.state
    assert state is not None
    assert (state.disconnected, state.phase) == (True, "mid_body")
    assert state.detected_at is not None and state.detected_at >= left_at
    assert run.finally_ran  # the generator was closed, in its own task
    assert state.cancelled is (mode == "cancel")
    assert run.escaped is None
    after = sum(1 for at in run.produced if at > state.detected_at)
    assert after <= 1, f"{after} chunks produced after the disconnect was detected"
    assert len(run.produced) < MAX_CHUNKS
    # What nginx held back when the client closed (its buffers, with buffering on): printed only.
    unseen = sum(1 for at in run.produced if at <= left_at) - body.count(b"\n\n")
    report(nginx, mode, f"mid-stream ({after} produced after detection, {unseen} unseen)", how, left_at, state)

    log = await settled(nginx, mark)
    # Learnt from the client socket's own event (EPOLLRDHUP), not from a failed write on its
    # next chunk: so also with proxy_buffering on, where nginx reads the upstream ahead.
    assert (
        "epoll_wait() reported that client prematurely closed connection, so upstream connection is closed too" in log
    )


@pytest.mark.parametrize("proxy", ["nginx-buffered"])
async def test_proxy_ignore_client_abort_hides_the_departure(nginx: Nginx) -> None:
    """With ``proxy_ignore_client_abort on`` nginx keeps the upstream request going: the handler
    runs to completion and the middleware sees no disconnect."""
    mark = nginx.log_size()
    name, run = new_run()
    sock = await anyio.to_thread.run_sync(send_request, nginx.port, f"/ignore/slow?run={name}&seconds=0.3")
    try:
        await wait_for(run.called, "the handler was called through nginx", WITHIN)
    finally:
        await anyio.to_thread.run_sync(leave, sock, "fin")
    await wait_for(run.returned, "the request ended", WITHIN)

    assert run.state is not None and not run.state.disconnected
    assert run.upstream_finished and run.responded  # the whole 0.3 s, and the response sent
    await settled(nginx, mark)


@pytest.mark.parametrize("proxy", ["nginx-buffered"])
async def test_proxy_ignore_client_abort_ends_a_stream_on_a_failed_write(nginx: Nginx) -> None:
    """With ``proxy_ignore_client_abort on`` a stream is still cut, later: nginx learns that
    its client left only when a write to it fails, so the app produces chunks after the close."""
    mark = nginx.log_size()
    name, run = new_run()
    path = f"/ignore/stream?run={name}&chunks=50"  # 1 s of stream at most
    left_at, _ = await anyio.to_thread.run_sync(read_frames_then_leave, nginx.port, path, READ_CHUNKS, "fin")
    await wait_for(run.returned, "the stream ended", WITHIN)

    state = run.state
    assert state is not None
    assert (state.disconnected, state.phase) == (True, "mid_body")
    assert run.finally_ran and len(run.produced) < 50
    # After a FIN the first write still succeeds (the client's kernel answers it with an RST):
    # nginx needs the chunks the app produced after the close to find out.
    assert sum(1 for at in run.produced if at > left_at) >= 1
    report(nginx, "observe", "mid-stream, proxy_ignore_client_abort on,", "fin", left_at, state)
    log = await settled(nginx, mark)
    # Not from an event on the client socket, which nginx no longer watches, but from the write.
    assert "client prematurely closed connection" not in log
    assert "while sending to client" in log


@pytest.mark.parametrize("proxy", ["nginx-buffered"])
async def test_a_response_being_cached_is_fetched_whole(nginx: Nginx) -> None:
    """With ``proxy_cache`` nginx reads a cacheable response to its end for the cache: the
    client leaves after two chunks, the stream runs to its last chunk and the middleware
    sees no disconnect."""
    mark = nginx.log_size()
    name, run = new_run()
    path = f"/cached/stream?run={name}&chunks=15"  # 0.3 s of stream
    await anyio.to_thread.run_sync(read_frames_then_leave, nginx.port, path, READ_CHUNKS, "fin")
    await wait_for(run.returned, "the stream ended", WITHIN)

    assert run.state is not None and not run.state.disconnected
    assert len(run.produced) == 15 and run.responded  # every chunk, and the end of the body
    log = await settled(nginx, mark)
    assert "client prematurely closed connection" in log  # nginx saw the client go...
    assert "so upstream connection is closed too" not in log  # ...and kept the upstream request


@pytest.mark.parametrize("proxy", ["nginx-buffered"])
async def test_buffered_upload_never_reaches_the_app(nginx: Nginx) -> None:
    """With ``proxy_request_buffering on`` (the default) nginx reads the whole body before it
    calls the upstream: a client that leaves mid-upload never reaches the app; a whole upload
    does, byte-exact."""
    mark = nginx.log_size()
    name, run = new_run()
    headers = {"Content-Length": str(UPLOAD)}
    sock = await anyio.to_thread.run_sync(
        send_request, nginx.port, f"/observe/upload?run={name}", headers, b"x" * 65536
    )
    await anyio.to_thread.run_sync(leave, sock, "fin")
    # Bounded wait until nginx has seen the client go: then it will never call the upstream.
    for _ in range(250):
        if "client prematurely closed connection" in nginx.log_since(mark):
            break
        await anyio.sleep(0.02)
    assert "client prematurely closed connection" in nginx.log_since(mark)
    assert not run.called.is_set() and run.state is None  # the app was never called

    name, run = new_run()
    upload = bytes(range(256)) * (UPLOAD // 256)
    status, _, body = await anyio.to_thread.run_sync(fetch, nginx.port, "POST", f"/observe/upload?run={name}", upload)
    assert (status, body) == (200, hashlib.sha256(upload).hexdigest().encode())
    assert run.received == upload
    assert problems(nginx.log_since(mark)) == []
