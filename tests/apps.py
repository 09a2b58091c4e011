"""Raw ASGI apps that tests/test_servers.py serves with real server subprocesses.

``app`` is ``bare_app`` wrapped in ``DisconnectMiddleware``. Neither endpoint catches
anything: whatever the server or the middleware raises escapes the app, as it would
from a handler written without disconnects in mind.

- ``/stream``: a chunk every 20 ms (at most ``STREAM_CHUNKS``), then the end of the body.
- ``/slow``: prints ``SLOW_STARTED`` (so that the client knows when to leave), sleeps
  ``SLOW_SECONDS``, then sends a whole response: after the client has gone.
"""

from __future__ import annotations

import anyio

from asgi_disconnect import DisconnectMiddleware
from asgi_disconnect._tools.doctor import _lifespan  # the doctor's probe app answers lifespan the same way
from asgi_disconnect._types import Receive, Scope, Send

STREAM_CHUNKS = 250
SLOW_SECONDS = 0.3
SLOW_STARTED = "slow handler started"


async def bare_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The app without the middleware: the control for the traceback checks."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for index in range(STREAM_CHUNKS):
            await send({"type": "http.response.body", "body": b"chunk %04d\n" % index, "more_body": True})
            await anyio.sleep(0.02)
        await send({"type": "http.response.body", "body": b""})
    elif scope["path"] == "/slow":
        print(SLOW_STARTED, flush=True)
        await anyio.sleep(SLOW_SECONDS)
        body = b"too late\n"
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    else:
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


app = DisconnectMiddleware(bare_app)
