"""Every unit test runs three times: asyncio (the fast path), asyncio on the reference path
(the plain anyio task group that the fast path must match), and trio."""

from __future__ import annotations

import pytest

from asgi_disconnect import _fastpath, _middleware


@pytest.fixture(params=["asyncio", "asyncio-reference", "trio"])
def anyio_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Unit tests run on both anyio backends and both paths; real-server tests pin asyncio."""
    if request.param == "asyncio-reference":
        # No request finds a task to take the fast path in: each one runs in a task group.
        monkeypatch.setattr(_middleware, "fast_task", _fastpath._no_task)
        return "asyncio"
    return str(request.param)
