"""pytest plugin for ``scripts/peer-suites``: a peer suite's test clients get their app behind DisconnectMiddleware.

Loaded with ``-p wrap_plugin`` (its directory on ``PYTHONPATH``). Environment:

- ``ASGI_DISCONNECT_WRAP``: ``bare`` (or unset) wraps nothing; ``observe`` wraps in
  ``DisconnectMiddleware(app)``; ``cancel`` in ``DisconnectMiddleware(app, cancel=True)``;
  ``broken`` (the harness's self-test) puts an app that answers 500 behind the middleware.
- ``ASGI_DISCONNECT_PEER_RESULTS``: a JSON file that receives every test's outcome.
- ``ASGI_DISCONNECT_PEER_SELECT``: a file of node ids, one a line: every other test is deselected.

It patches ``starlette.testclient.TestClient.__init__`` and ``ASGITransport.__init__`` of
``httpx`` and ``httpx2`` (when importable), so every app they receive, at any point of
the session, is wrapped the way a user would wrap it: the middleware instance is passed
to the original ``__init__``, which sees it as the ASGI 3 app it is.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

MODE_ENV = "ASGI_DISCONNECT_WRAP"
RESULTS_ENV = "ASGI_DISCONNECT_PEER_RESULTS"
SELECT_ENV = "ASGI_DISCONNECT_PEER_SELECT"
MODES = ("bare", "observe", "cancel", "broken")
_PATCHED = "_asgi_disconnect_peer_patched"
_DETAIL_CHARS = 6000

_mode = os.environ.get(MODE_ENV) or "bare"
if _mode not in MODES:
    raise RuntimeError(f"{MODE_ENV}={_mode!r}: expected one of {', '.join(MODES)}")

_middleware: type[Any] | None = None  # DisconnectMiddleware, imported by _patch_all()
_wraps: dict[str, int] = {}  # what this process wrapped: patched target -> apps wrapped
_import_warnings: list[str] = []  # warnings raised while importing asgi_disconnect
_nodes: dict[str, dict[str, str]] = {}  # nodeid -> {"outcome", "message", "detail"} (controller only)


class _Broken:
    """Self-test app: answers every HTTP request with a 500 and never calls the app it hides."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-length", b"6")]})
        await send({"type": "http.response.body", "body": b"broken"})


def _wrap(app: Any, target: str) -> Any:
    middleware = _middleware
    assert middleware is not None, "_patch_all() imports the middleware before patching"
    if isinstance(app, middleware) or not callable(app):
        # Already wrapped (a test that wraps by itself), or not an app at all: the test
        # expects the original's own error for it.
        return app
    _wraps[target] = _wraps.get(target, 0) + 1
    if _mode == "broken":
        return middleware(_Broken(app))
    return middleware(app, cancel=_mode == "cancel")


def _patch_init(cls: type[Any], target: str, adapt: Callable[[Any], Any] | None = None) -> None:
    """Replace ``cls.__init__`` by one that wraps its ``app`` argument (``adapt`` runs first)."""
    original = cls.__dict__.get("__init__")
    if original is None or getattr(original, _PATCHED, False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(*args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            original(*args, **kwargs)  # let the original raise its own error
            return
        if "app" in bound.arguments:
            app = bound.arguments["app"]
            if adapt is not None and callable(app):
                app = adapt(app)
            bound.arguments["app"] = _wrap(app, target)
        original(*bound.args, **bound.kwargs)

    setattr(__init__, _PATCHED, True)
    cls.__init__ = __init__


def _optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _patch_all() -> None:
    global _middleware
    # The suites' own filters (filterwarnings = error) apply only once tests run: record what
    # the import warns about here, so that the report can show it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from asgi_disconnect import DisconnectMiddleware
    _import_warnings.extend(f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught)
    _middleware = DisconnectMiddleware
    testclient = _optional("starlette.testclient")
    if testclient is not None:
        is_asgi3: Callable[[Any], bool] = testclient._is_asgi3
        asgi2: Callable[[Any], Any] = testclient._WrapASGI2

        def adapt(app: Any) -> Any:
            # TestClient adapts an ASGI 2 app itself; do it first so the middleware sees ASGI 3.
            return app if is_asgi3(app) else asgi2(app)

        _patch_init(testclient.TestClient, "starlette.testclient.TestClient", adapt)
    for name in ("httpx", "httpx2"):
        module = _optional(name)
        transport = getattr(module, "ASGITransport", None)
        if isinstance(transport, type):
            _patch_init(transport, f"{name}.ASGITransport")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    # Before any conftest or test module runs, so that apps built at import time are wrapped too.
    # The imports happen in bare mode as well: every mode imports the same modules in the same order.
    for name in ("starlette.testclient", "httpx", "httpx2"):
        _optional(name)
    if _mode != "bare":
        _patch_all()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    select = os.environ.get(SELECT_ENV)
    if not select:
        return
    wanted = set(Path(select).read_text(encoding="utf-8").splitlines())
    keep = [item for item in items if item.nodeid in wanted]
    dropped = [item for item in items if item.nodeid not in wanted]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def _controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")  # pytest-xdist workers have it


def _record(report: pytest.TestReport | pytest.CollectReport, outcome: str) -> None:
    entry = _nodes.setdefault(report.nodeid, {"outcome": outcome, "message": "", "detail": ""})
    if entry["outcome"] in ("failed", "error"):
        return  # the first failure is the one to read (a failed call, then a failed teardown)
    entry["outcome"] = outcome
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = getattr(crash, "message", None) or (report.longreprtext.strip().splitlines() or [""])[-1]
        entry["message"] = f"{report.when}: {message}"
        entry["detail"] = report.longreprtext[-_DETAIL_CHARS:]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown" and not report.failed:
        return  # a clean teardown leaves the outcome of setup and call as it is
    if report.failed:
        outcome = "failed" if report.when == "call" else "error"
    elif hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    else:
        outcome = report.outcome  # passed or skipped
    _record(report, outcome)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _record(report, "error")
    elif report.skipped:
        _record(report, "skipped")  # a module that skips itself (pytest.skip(allow_module_level=True))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    results = os.environ.get(RESULTS_ENV)
    if not results:
        return
    path = Path(results)
    # Every process (xdist workers included) writes what it wrapped; the controller the outcomes.
    wraps = {"mode": _mode, "wraps": _wraps, "import_warnings": _import_warnings}
    path.with_name(f"{path.name}.wraps-{os.getpid()}").write_text(json.dumps(wraps), encoding="utf-8")
    if _controller(session.config):
        path.write_text(json.dumps({"exitstatus": int(exitstatus), "nodes": _nodes}), encoding="utf-8")
