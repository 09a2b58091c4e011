"""The pytest plugin (``asgi_disconnect.pytest_plugin``) as a user gets it.

Each test writes a user's test file into a pytester directory and runs pytest on it in a
subprocess, which loads the plugin through its ``pytest11`` entry point (never ``-p``)
and the anyio plugin, without pytest-asyncio; the assertions are on what pytest reports.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from structlog.typing import EventDict

from asgi_disconnect.pytest_plugin import RUNNERS, CapturedEvents, Runner

pytest_plugins = ["pytester"]

# The user's app: a raw ASGI app behind DisconnectMiddleware that answers the lifespan.
APP = """
import anyio
import pytest
import structlog

from asgi_disconnect import DisconnectMiddleware
from asgi_disconnect.testing import leave


async def bare(scope, receive, send):
    if scope["type"] == "lifespan":
        for _ in range(2):  # startup, then shutdown
            message = await receive()
            await send({"type": message["type"] + ".complete"})
        return
    if scope["path"] == "/stream":  # a chunk every 10 ms, for 1 s at most
        structlog.get_logger("app").info("stream started", logger="app")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for index in range(100):
            await send({"type": "http.response.body", "body": b"chunk %d\\n" % index, "more_body": True})
            await anyio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})
    elif scope["path"] == "/hang":  # never answers, and sleeps on when first cancelled
        try:
            await anyio.sleep(3600)
        except anyio.get_cancelled_exc_class():
            await anyio.sleep(3600)
            raise
    else:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


app = DisconnectMiddleware(bare)
"""

# Every backend the plugin runs on; the tuple is how anyio_backend carries options.
BOTH_BACKENDS = """
@pytest.fixture(params=["asyncio", pytest.param(("trio", {}), id="trio")])
def anyio_backend(request):
    return request.param
"""
ASYNCIO_ONLY = """
@pytest.fixture
def anyio_backend():
    return "asyncio"
"""

# The user's pytest configuration: every warning is an error.
INI = "[pytest]\nfilterwarnings = error\n"
UVICORN_ON_TRIO = "uvicorn runs on asyncio only"
#: The most a pytester run may take; each one below takes a few seconds.
RUN_TIMEOUT = 60.0


def run(pytester: pytest.Pytester, source: str, *args: str) -> tuple[pytest.RunResult, float]:
    """Run pytest on ``source`` (a user's test file) as a user does; the result and its seconds."""
    pytester.makeini(INI)
    pytester.makepyfile(test_user=source)
    started = time.monotonic()
    result = pytester.runpytest_subprocess(
        "-p", "no:asyncio", "-p", "no:cacheprovider", "-v", "-rs", *args, timeout=RUN_TIMEOUT
    )
    return result, time.monotonic() - started


@pytest.mark.server
def test_stream_aborted_after_two_chunks_passes_on_every_runner(pytester: pytest.Pytester) -> None:
    """A stream the client leaves after 2 chunks is aborted in process, on uvicorn and on
    hypercorn; on trio uvicorn is skipped, saying why; the plugin comes from its entry point."""
    source = (
        APP
        + BOTH_BACKENDS
        + """
def test_plugin_comes_from_its_entry_point(pytestconfig):
    plugins = {plugin.__name__: dist.project_name for plugin, dist in pytestconfig.pluginmanager.list_plugin_distinfo()}
    assert plugins["asgi_disconnect.pytest_plugin"] == "asgi-disconnect"
    assert not pytestconfig.pluginmanager.has_plugin("asyncio")


@pytest.mark.anyio
async def test_stream(disconnect_runner):
    outcome = await disconnect_runner.request(app, path="/stream", leave=leave.after_chunks(2))
    outcome.assert_aborted(phase="mid_body", within_ms=500)
    assert outcome.chunks == [b"chunk 0\\n", b"chunk 1\\n"]
    assert outcome.server == disconnect_runner.server


@pytest.mark.anyio
async def test_several_requests_to_one_app(disconnect_runner):
    async with disconnect_runner.serve(app) as running:
        first = await running.request(path="/")
        second = await running.request(path="/stream", leave=leave.after_bytes(3, how="rst"))
    first.assert_completed()
    second.assert_aborted(phase="mid_body", within_ms=500)
    assert (running.live is None) == (disconnect_runner.server == "in-process")
    assert disconnect_runner.outcomes == [first, second]
"""
    )
    result, _ = run(pytester, source)
    result.assert_outcomes(passed=11, skipped=2)
    for backend, runner in [("asyncio", "in-process"), ("asyncio", "uvicorn"), ("asyncio", "hypercorn")]:
        result.stdout.fnmatch_lines([f"*::test_stream?{backend}-{runner}? PASSED*"])
    result.stdout.fnmatch_lines(["*::test_stream?trio-in-process? PASSED*", "*::test_stream?trio-hypercorn? PASSED*"])
    result.stdout.fnmatch_lines(["*::test_stream?trio-uvicorn? SKIPPED*"])
    result.stdout.fnmatch_lines([f"SKIPPED [[]1[]] test_user.py:*: {UVICORN_ON_TRIO}"] * 2)


@pytest.mark.server
def test_hung_handler_fails_the_test_at_teardown(pytester: pytest.Pytester) -> None:
    """A request still running at its timeout fails the test at teardown, naming it and
    saying what happened, on every runner and backend; the run ends in bounded time."""
    source = (
        APP
        + BOTH_BACKENDS
        + """
@pytest.mark.anyio
async def test_hang(disconnect_runner):
    async with disconnect_runner.serve(app) as running:
        (await running.request(path="/")).assert_completed()
        outcome = await running.request(method="post", path="/hang", body=b"x", timeout=0.3)
    assert outcome.timed_out
"""
    )
    result, seconds = run(pytester, source)
    result.assert_outcomes(passed=5, errors=5, skipped=1)
    for test_id in ["asyncio-in-process", "asyncio-uvicorn", "asyncio-hypercorn", "trio-in-process", "trio-hypercorn"]:
        server = test_id.partition("-")[2]
        result.stdout.fnmatch_lines(
            [
                f"*ERROR at teardown of test_hang[[]{test_id}[]]*",
                f"disconnect_runner ({server}): handler(s) that did not stop by themselves:",
                f"- POST /hang on {server}: still running at its timeout (0.3 s). What happened: {server}: "
                "the client never leaves*; it did not leave; no response started; "
                "the handler was still running at the timeout (0.3 s) and was cancelled; state *",
                "A handler still running at its timeout never returned*",
            ]
        )
    assert "- GET / on" not in result.stdout.str()
    assert seconds < 30, f"the run took {seconds:.1f} s"


@pytest.mark.server
def test_handler_that_outlives_its_server_fails_the_test(pytester: pytest.Pytester) -> None:
    """A handler that swallows the cancellation and runs on after uvicorn stopped (uvicorn
    abandons it) fails the test at teardown, named; the run ends in bounded time."""
    source = (
        """
import asyncio

import anyio
import pytest
"""
        + ASYNCIO_ONLY
        + """

async def stubborn(scope, receive, send):
    if scope["type"] != "http":
        raise RuntimeError("no lifespan")
    for _ in range(30):  # 3 s at most
        try:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.1)
        except asyncio.CancelledError:
            pass


@pytest.mark.anyio
@pytest.mark.parametrize("disconnect_runner", ["uvicorn"], indirect=True)
async def test_stubborn(disconnect_runner):
    await disconnect_runner.request(stubborn, path="/stubborn", timeout=0.2)
"""
    )
    result, seconds = run(pytester, source)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_stubborn[[]uvicorn[]]*",
            "disconnect_runner (uvicorn): handler(s) that did not stop by themselves:",
            "- GET /stubborn on uvicorn: still running at its timeout (0.2 s). What happened: *",
            "- GET /stubborn on uvicorn: still running after the server stopped, "
            "1 s after it was cancelled: it ignores cancellation",
        ]
    )
    assert seconds < 30, f"the run took {seconds:.1f} s"


def test_server_not_installed_is_skipped_with_its_reason(pytester: pytest.Pytester) -> None:
    """A server that is not installed is skipped with the reason ``_loopback.missing`` gives;
    the test still runs in process."""
    pytester.makeconftest(
        """
import pytest

from asgi_disconnect import _loopback


@pytest.fixture(autouse=True)
def no_servers(monkeypatch):
    monkeypatch.setattr(_loopback, "missing", lambda server: f"{server} is not here (pip install {server})")
"""
    )
    source = (
        APP
        + ASYNCIO_ONLY
        + """
@pytest.mark.anyio
async def test_stream(disconnect_runner):
    outcome = await disconnect_runner.request(app, path="/stream", leave=leave.after_chunks(2))
    outcome.assert_aborted(phase="mid_body")
"""
    )
    result, _ = run(pytester, source)
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(
        [
            "SKIPPED [[]1[]] test_user.py:*: uvicorn is not here (pip install uvicorn)",
            "SKIPPED [[]1[]] test_user.py:*: hypercorn is not here (pip install hypercorn)",
        ]
    )


@pytest.mark.server
def test_disconnect_events_captures_the_abort_event(pytester: pytest.Pytester) -> None:
    """``disconnect_events`` holds the middleware's abort event and none of the app's, on
    every runner, and the app's own structlog configuration is back after the test."""
    pytester.makeconftest(
        """
import structlog


def app_processor(logger, method_name, event_dict):
    return event_dict


structlog.configure(processors=[app_processor, structlog.processors.KeyValueRenderer()])
"""
    )
    source = (
        APP
        + ASYNCIO_ONLY
        + """
from conftest import app_processor


@pytest.mark.anyio
async def test_events(disconnect_runner, disconnect_events):
    await disconnect_runner.request(app, path="/stream", leave=leave.after_chunks(2))
    [event] = disconnect_events
    assert event["event"] == "request_aborted"
    assert (event["logger"], event["path"], event["phase"]) == ("asgi_disconnect", "/stream", "mid_body")
    assert disconnect_events == [event]


def test_zz_structlog_configuration_restored():
    assert structlog.get_config()["processors"][0] is app_processor
"""
    )
    result, _ = run(pytester, source)
    result.assert_outcomes(passed=4)


def test_importing_the_plugin_imports_no_server_or_framework() -> None:
    """The plugin is imported by every pytest run: it must not import a server or framework."""
    heavy = ["uvicorn", "hypercorn", "h11", "httptools", "starlette", "fastapi", "django", "litestar", "httpx"]
    code = (
        "import sys, asgi_disconnect.pytest_plugin\n"
        f"print(sorted({{name.partition('.')[0] for name in sys.modules}} & set({heavy!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_runner_refuses_an_unknown_server() -> None:
    """An indirect parameter names a runner the plugin has, or says which ones it has."""
    assert [Runner(name).server for name in RUNNERS] == list(RUNNERS)
    with pytest.raises(ValueError, match=r"takes one of 'in-process', 'uvicorn', .*, got 'gunicorn'"):
        Runner("gunicorn")


def test_captured_events_keep_only_the_asgi_disconnect_logger() -> None:
    """The events view shows the package's events only, live, as a read-only sequence."""
    entries: list[EventDict] = [{"event": "app", "logger": "app"}]
    events = CapturedEvents(entries)
    assert len(events) == 0
    ours: EventDict = {"event": "request_aborted", "logger": "asgi_disconnect"}
    entries += [ours, {"event": "no logger"}]
    assert (len(events), events[0], events[:], list(events)) == (1, ours, [ours], [ours])
    assert events == [ours] and events == CapturedEvents([ours])
    assert events != (ours,)
    assert repr(events) == f"CapturedEvents([{ours!r}])"
