"""See a client disconnect with and without DisconnectMiddleware, on a real uvicorn.

Run: ``python examples/quickstart.py``. It serves a Starlette app on a free loopback
port, sends one request whose client leaves after 0.3 s while the handler does 2 s of
"slow work" in ten steps, and prints what the handler could tell, twice: once bare,
once wrapped in DisconnectMiddleware. The server and the client that leaves are
``asgi_disconnect.testing``'s, the same you test your own app with.
"""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from asgi_disconnect import DisconnectMiddleware, disconnect_state
from asgi_disconnect.testing import leave, serve

steps_done: dict[str, int] = {}


async def slow(request: Request) -> PlainTextResponse:
    steps = 0
    while steps < 10:
        await asyncio.sleep(0.2)  # an upstream call, a query, a model step...
        steps += 1
        try:
            if disconnect_state(request.scope).disconnected:
                break  # stop paying for work nobody will read
        except LookupError:
            pass  # bare app: no way to know
    steps_done["steps"] = steps
    return PlainTextResponse("done")


async def run(label: str, app: ASGIApp) -> None:
    async with serve(app) as live:
        outcome = await live.request(leave=leave.before_response(after=0.3, how="rst"))  # leave abruptly
    ran = outcome.app_returned_after_ms  # None: still running at the timeout (5 s)
    after = "still running 5 s" if ran is None else f"returned {ran / 1000:.2f} s"
    print(f"{label:<28} handler ran {steps_done.pop('steps', '?')} of 10 steps, {after} after the client left")


async def main() -> None:
    app = Starlette(routes=[Route("/", slow)])
    print("client leaves after 0.3 s; each step costs 0.2 s")
    await run("bare Starlette:", app)
    await run("with DisconnectMiddleware:", DisconnectMiddleware(app))


if __name__ == "__main__":
    asyncio.run(main())
