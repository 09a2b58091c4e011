"""pytest plugin (``-p tests.fallback_plugin``): the suite on the public anyio path.

It hides anyio's private per-task table from ``asgi_disconnect`` as if anyio had renamed
it: ``from anyio._backends import _asyncio`` then finds a copy of that module without
``_task_states``, while anyio itself keeps using the real module from ``sys.modules``.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import anyio._backends
import anyio._backends._asyncio as real

assert "asgi_disconnect" not in sys.modules, "load this plugin before asgi_disconnect is imported"
renamed = types.ModuleType(real.__name__)
renamed.__dict__.update({name: value for name, value in vars(real).items() if name != "_task_states"})
anyio._backends._asyncio = renamed

import asgi_disconnect._fastpath  # noqa: E402 - after the internals are hidden

assert not asgi_disconnect._fastpath.ENABLED, "the fast path should have been turned off"


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Leave out the tests that drive the fast path's coroutine by hand: it is off here."""
    items[:] = [item for item in items if item.get_closest_marker("fast_path") is None]
