from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Unit tests run on both anyio backends; real-server tests pin asyncio."""
    return str(request.param)
