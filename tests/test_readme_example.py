"""A FastAPI stream whose client leaves after two chunks: is its upstream closed?

The test file of README.md's "Testing your disconnect paths", as a user would write it: the
``disconnect_runner`` fixture of asgi-disconnect's pytest plugin runs each test in process,
on uvicorn and on hypercorn, and fails it if a handler is still running at the end.
"""

from collections.abc import AsyncIterator

import anyio
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from asgi_disconnect import DisconnectMiddleware
from asgi_disconnect.pytest_plugin import Runner
from asgi_disconnect.testing import Departure, leave

pytestmark = pytest.mark.anyio


class Upstream:
    """Stands for an LLM or a database cursor: it bills for every token until it is closed."""

    def __init__(self) -> None:
        self.tokens = 0
        self.closed = False

    async def next_token(self) -> str:
        await anyio.sleep(0.01)
        self.tokens += 1
        return f"token {self.tokens}"

    async def aclose(self) -> None:
        self.closed = True


upstreams: list[Upstream] = []
app = FastAPI()
app.add_middleware(DisconnectMiddleware)


@app.get("/stream")
async def stream() -> StreamingResponse:
    upstream = Upstream()
    upstreams.append(upstream)

    async def events() -> AsyncIterator[str]:
        try:
            for _ in range(1000):
                yield f"data: {await upstream.next_token()}\n\n"
        finally:
            await upstream.aclose()

    return StreamingResponse(events(), media_type="text/event-stream")


# The client reads two chunks, then closes its socket: with a FIN (a closed tab), or with an
# RST (a killed client, a proxy dropping the connection). In process, `how` is only recorded.
@pytest.mark.parametrize(
    "departure", [leave.after_chunks(2, how="fin"), leave.after_chunks(2, how="rst")], ids=["fin", "rst"]
)
async def test_the_upstream_is_closed_when_the_client_leaves(disconnect_runner: Runner, departure: Departure) -> None:
    upstreams.clear()
    outcome = await disconnect_runner.request(app, path="/stream", leave=departure)

    assert outcome.status == 200
    assert outcome.chunks[:2] == [b"data: token 1\n\n", b"data: token 2\n\n"]
    outcome.assert_aborted(phase="mid_body", within_ms=250)  # the handler returned, nothing escaped
    assert upstreams[0].closed
    assert upstreams[0].tokens < 50  # it stopped billing: 1000 tokens if it had run on
