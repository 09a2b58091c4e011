"""ASGI type aliases.

Scope, Message, Receive and Send have the shape of Starlette's (``starlette.types``).
The middleware's own signature takes ``Any`` where frameworks disagree (Litestar's
scopes are TypedDicts), so it type-checks in ``app.add_middleware(...)`` and in
Litestar's ``middleware=[...]`` without casts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# The wrapped app takes whatever its framework's types say (TypedDict scopes in Litestar).
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
