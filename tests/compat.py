"""The compatibility table's vocabulary: a test that proves one cell carries ``compat(...)``.

``scripts/compat-table`` renders README's table from the outcomes of the tests so marked
(``pytest --compat-report FILE`` writes them; tests/conftest.py). A cell is a framework,
a server (or a server behind a proxy, or a browser in front of one) and a feature; a cell
passes when every test marked with it passed.
"""

from __future__ import annotations

import pytest

FRAMEWORKS = {
    "asgi": "raw ASGI",
    "starlette": "Starlette",
    "fastapi": "FastAPI",
    "litestar": "Litestar",
    "django": "Django",
    "quart": "Quart",
}
SERVERS = {
    "uvicorn-h11": "uvicorn (h11)",
    "uvicorn-httptools": "uvicorn (httptools)",
    "hypercorn-asyncio": "hypercorn (asyncio)",
    "hypercorn-trio": "hypercorn (trio)",
    "hypercorn-h2c": "hypercorn, HTTP/2 (h2c)",
    "hypercorn-h2-tls": "hypercorn, HTTP/2 (TLS)",
    "granian": "granian",
    "daphne": "daphne",
    "gunicorn-uvicorn": "gunicorn -w 4, uvicorn workers",
    "nginx-buffered": "uvicorn behind nginx (default buffering)",
    "nginx-unbuffered": "uvicorn behind nginx (proxy_buffering off)",
    "nginx-keepalive": "uvicorn behind nginx (upstream keepalive)",
    "chromium": "uvicorn, headless Chromium as the client",
}
FEATURES = {
    "before_response": "leaves before the response",
    "mid_stream": "leaves mid-stream",
    "cancel": "cancel mode",
    "lifecycle": "framework lifecycle kept",
}


def compat(framework: str, server: str, feature: str) -> pytest.MarkDecorator:
    """Mark a test (or a ``pytest.param``) as proof of one cell of the table."""
    for key, known in ((framework, FRAMEWORKS), (server, SERVERS), (feature, FEATURES)):
        if key not in known:
            raise ValueError(f"compat(): {key!r} is not one of {sorted(known)}")
    return pytest.mark.compat(framework=framework, server=server, feature=feature)
