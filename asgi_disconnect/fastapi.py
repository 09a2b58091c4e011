"""FastAPI dependency for the request's ``DisconnectState``: ``Disconnect``.

::

    from fastapi import FastAPI

    from asgi_disconnect import DisconnectMiddleware
    from asgi_disconnect.fastapi import Disconnect

    app = FastAPI()
    app.add_middleware(DisconnectMiddleware)


    @app.get("/report")
    async def report(state: Disconnect) -> list[int]:
        rows = []
        async for row in expensive_query():
            if state.disconnected:
                break
            rows.append(row)
        return rows

A path operation and any dependency that declare ``state: Disconnect`` get the same
``DisconnectState`` (``disconnect_state(request.scope)``). Without ``DisconnectMiddleware``
in front of the app, the request fails with the ``LookupError`` that says how to install
it: FastAPI answers 500 and the server logs it. HTTP requests only: a WebSocket route gets
the same ``LookupError`` (the middleware passes ``websocket`` scopes through untouched).
This module imports FastAPI; the rest of the package never does.
"""

from __future__ import annotations

from typing import Annotated

from ._state import DisconnectState, disconnect_state

try:
    from fastapi import Depends
    from fastapi.requests import HTTPConnection
except ImportError as exc:
    raise ImportError("asgi_disconnect.fastapi needs FastAPI: pip install fastapi") from exc

__all__ = ["Disconnect"]


async def _state(connection: HTTPConnection) -> DisconnectState:
    # async: FastAPI would run a plain def in its thread pool, a thread hop per request.
    # HTTPConnection, not Request: on a WebSocket route FastAPI would fail on a missing
    # argument instead of raising disconnect_state's LookupError, which says why.
    return disconnect_state(connection.scope)


#: ``Annotated[DisconnectState, Depends(...)]``: declare ``state: Disconnect`` in a path
#: operation or a dependency to get the request's ``DisconnectState``.
Disconnect = Annotated[DisconnectState, Depends(_state)]
