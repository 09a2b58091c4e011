"""See a client disconnect with and without DisconnectMiddleware, on a real uvicorn.

Run: ``python examples/quickstart.py``. It serves a Starlette app on a free loopback
port, sends one request whose client leaves after 0.3 s while the handler does 2 s of
"slow work" in ten steps, and prints what the handler could tell, twice: once bare,
once wrapped in DisconnectMiddleware.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_disconnect import DisconnectMiddleware, disconnect_state

report: dict[str, object] = {}


async def slow(request: Request) -> PlainTextResponse:
    steps = 0
    started = time.monotonic()
    while steps < 10:
        await asyncio.sleep(0.2)  # an upstream call, a query, a model step...
        steps += 1
        try:
            if disconnect_state(request.scope).disconnected:
                break  # stop paying for work nobody will read
        except LookupError:
            pass  # bare app: no way to know
    report.update(steps=steps, seconds=round(time.monotonic() - started, 2))
    return PlainTextResponse("done")


def client(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        time.sleep(0.3)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # leave abruptly


async def run(label: str, app: object) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))  # type: ignore[arg-type]
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(500):  # at most 5 s to start
        if server.started:
            break
        await asyncio.sleep(0.01)
    report.clear()
    await asyncio.to_thread(client, port)
    for _ in range(300):  # at most 3 s for the handler to finish
        if report:
            break
        await asyncio.sleep(0.01)
    print(f"{label:<28} handler ran {report['steps']} of 10 steps, {report['seconds']} s")
    server.should_exit = True
    await serving


async def main() -> None:
    app = Starlette(routes=[Route("/", slow)])
    print("client leaves after 0.3 s; each step costs 0.2 s")
    await run("bare Starlette:", app)
    await run("with DisconnectMiddleware:", DisconnectMiddleware(app))


if __name__ == "__main__":
    asyncio.run(main())
