"""ASGI type aliases.

They are structural and identical in shape to Starlette's (``starlette.types``), so the
middleware type-checks when it is passed to ``app.add_middleware`` or Litestar's
``middleware=[...]`` without casts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
