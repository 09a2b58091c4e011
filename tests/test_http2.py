"""HTTP/2 on a real hypercorn (h2c, prior knowledge) with the ``h2`` client library."""

from __future__ import annotations

import threading

import anyio
import anyio.to_thread
import h2.config
import h2.connection
import h2.events
import pytest

from asgi_disconnect import DisconnectMiddleware, DisconnectState, disconnect_state
from asgi_disconnect._types import Receive, Scope, Send

from .servers import raw_connection, run_server, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.server]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Real servers run on asyncio only."""
    return "asyncio"


def get_then_reset(port: int, path: str, started: threading.Event) -> None:
    """Open an h2c connection, GET ``path`` (END_STREAM on the headers), reset the stream once the app runs."""
    with raw_connection(port) as sock:
        conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "127.0.0.1")]
        conn.send_headers(stream, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
        assert started.wait(5), "the handler did not start"
        conn.reset_stream(stream)
        sock.sendall(conn.data_to_send())
        sock.settimeout(0.2)
        try:
            for _ in range(20):  # read what the server answers until it goes quiet (bounded)
                if not sock.recv(65536):
                    break
        except TimeoutError:
            pass


@pytest.mark.parametrize("cancel", [False, True], ids=["observe", "cancel"])
async def test_a_reset_bodiless_http2_get_is_detected_with_read_ahead_disabled(cancel: bool) -> None:
    """An HTTP/2 GET has no content-length: with max_read_ahead=0 its RST_STREAM is still seen."""
    states: list[DisconnectState] = []
    versions: list[str] = []
    started = threading.Event()
    ended = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        state = disconnect_state(scope)
        states.append(state)
        versions.append(scope["http_version"])
        try:
            started.set()
            with anyio.move_on_after(3):
                await state.wait()
                if cancel:
                    await anyio.sleep(3)  # an upstream call: the cancellation ends it at once
        finally:
            ended.set()

    wrapped = DisconnectMiddleware(app, cancel=cancel, max_read_ahead=0)
    async with run_server(wrapped, "hypercorn") as port:
        await anyio.to_thread.run_sync(get_then_reset, port, "/watch", started)
        await wait_for(ended, "the handler ended")
    assert versions == ["2"]
    assert states[0].disconnected is True
    assert states[0].phase == "before_response"
    assert states[0].cancelled is cancel
