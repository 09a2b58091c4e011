"""``ClientDisconnected``, and which errors escaping an app a client's departure caused."""

from __future__ import annotations

import asyncio
from types import CodeType
from typing import Any


class ClientDisconnected(OSError):
    """The client closed the connection before the response was complete.

    Raised by the ``send()`` that ``DisconnectMiddleware`` hands to the app, as the ASGI
    HTTP spec 2.4 asks of servers ("send() on a closed connection raises an OSError
    subclass"), whatever spec version the server itself implements. It is an
    ``OSError``, so code written for 2.4 servers catches it unchanged. When it escapes
    the app, the middleware absorbs it: the server logs no traceback.
    """


#: How many exceptions one walk of a chain or group examines at most: frameworks wrap a
#: few levels deep, and a chain can loop (``raise eg.exceptions[0]`` inside ``except*``).
WALK_LIMIT = 64


def code_of(func: Any) -> CodeType | None:
    """The code object a server callable runs, to find its frames in a traceback."""
    code = getattr(getattr(func, "__func__", func), "__code__", None)
    if code is None:  # a callable object: its __call__ method
        code = getattr(getattr(type(func), "__call__", None), "__code__", None)  # noqa: B004 - not a callable() test
    return code if isinstance(code, CodeType) else None


def _raised_in(exc: BaseException, codes: tuple[CodeType, ...]) -> bool:
    """Was ``exc`` raised inside one of ``codes`` (its own traceback, not its chain)?"""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in codes:
            return True
        tb = tb.tb_next
    return False


def _is_starlette_disconnect(exc: BaseException) -> bool:
    # By name, so that Starlette is never imported: it raises this when receive() says
    # http.disconnect.
    return any(
        cls.__name__ == "ClientDisconnect" and cls.__module__ == "starlette.requests" for cls in type(exc).__mro__
    )


def caused_by_departure(
    exc: BaseException, server: tuple[CodeType, ...], *, ours_cancelled: bool, server_only: bool
) -> bool:
    """True if ``exc`` is what a client's departure causes, however a framework wrapped it.

    The causes: an ``OSError`` raised inside the server's own ``send``/``receive``
    (``server`` holds their code objects) and, unless ``server_only``, our
    ``ClientDisconnected``, Starlette's ``ClientDisconnect`` and, if ``ours_cancelled``,
    the middleware's own cancellation. An ``Exception`` that is none of these is
    followed through ``__cause__``/``__context__`` (a framework's wrapper); any other
    ``OSError`` or ``BaseException`` is the app's own. An exception group is caused by
    the departure when every member is. The walk is bounded and stops at a loop.
    """
    budget = WALK_LIMIT

    def walk(current: BaseException | None, path: frozenset[int]) -> bool:
        nonlocal budget
        while current is not None:
            budget -= 1
            if budget < 0 or id(current) in path:
                return False
            path = path | {id(current)}
            if isinstance(current, BaseExceptionGroup):
                return bool(current.exceptions) and all(walk(member, path) for member in current.exceptions)
            if isinstance(current, OSError):
                if _raised_in(current, server):
                    return True
                return not server_only and isinstance(current, ClientDisconnected)
            if isinstance(current, asyncio.CancelledError):
                return ours_cancelled
            if not isinstance(current, Exception):
                return False  # KeyboardInterrupt, SystemExit, GeneratorExit, trio.Cancelled
            if not server_only and _is_starlette_disconnect(current):
                return True
            current = current.__cause__ or current.__context__
        return False

    return walk(exc, frozenset())
