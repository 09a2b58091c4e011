"""``asgi-disconnect check``: the command runs as a user runs it, on the apps of tests/check_apps.py.

Each run starts ``.venv/bin/asgi-disconnect check tests.check_apps:...`` in the project's
directory, as a user starts it next to their code, and reads its JSON (or its table) and
its exit status. The apps' endpoints are described in tests/check_apps.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from asgi_disconnect._tools.check import LEAVE_AFTER, _ends_response
from tests.check_apps import SLOW_SECONDS

ROOT = Path(__file__).resolve().parent.parent
COMMAND = Path(sys.executable).with_name("asgi-disconnect")  # the venv's console script
BUDGET_MS = 100


def check(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(COMMAND), "check", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def check_json(*args: str, status: int) -> dict[str, Any]:
    """The command's JSON, after checking its exit status and the document's shape."""
    done = check(*args, "--json")
    assert done.returncode == status, done.stdout + done.stderr
    data: dict[str, Any] = json.loads(done.stdout)  # stdout holds the JSON and nothing else
    assert list(data) == ["paths"]
    for entry in data["paths"]:
        assert list(entry) == ["path", "results"]
        assert list(entry["results"]) == ["bare", "observe", "cancel"]
        for result in entry["results"].values():
            assert list(result["departures"]) == ["before_response", "mid_body"]
    return data


def results(data: dict[str, Any], path: str) -> dict[str, Any]:
    entry = next(entry for entry in data["paths"] if entry["path"] == path)
    found: dict[str, Any] = entry["results"]
    return found


@pytest.mark.server
def test_a_streaming_handler_runs_on_bare_and_stops_at_its_next_send_behind_the_middleware() -> None:
    """uvicorn drops the sends of a gone client: bare, the stream runs on; observed, send() raises."""
    data = check_json("tests.check_apps:app", "--path", "/stream", "--timeout", "1", status=0)
    found = results(data, "/stream")
    bare, observe, cancel = found["bare"], found["observe"], found["cancel"]
    assert bare["middleware"] is None and not bare["configured"]
    assert bare["ran_after_ms"] is None  # still running a second after the client left
    assert bare["saw_disconnect"] is False and bare["over_budget"] is True
    for departure in bare["departures"].values():
        assert departure["client"] == "left" and departure["told_by"] == []
        assert departure["status"] == 200
    assert observe["judged"] is True and observe["over_budget"] is False
    assert observe["ran_after_ms"] <= BUDGET_MS and observe["saw_disconnect"] is True
    for departure in observe["departures"].values():
        assert departure["told_by"] == ["send"]
        assert departure["phase"] == "mid_body"  # a stream has started by the first departure too
        assert departure["tracebacks"] == 0
    assert cancel["judged"] is False
    assert cancel["ran_after_ms"] < BUDGET_MS
    for departure in cancel["departures"].values():
        assert departure["told_by"] == ["cancel"]


@pytest.mark.server
def test_a_slow_handler_runs_on_in_observe_mode_and_is_cancelled_in_cancel_mode() -> None:
    """A handler that sleeps then answers learns of the departure only at its late send()."""
    observed = results(check_json("tests.check_apps:app", "--path", "/slow", "--timeout", "1", status=1), "/slow")
    late = observed["observe"]["departures"]["before_response"]
    assert late["client"] == "left"
    assert late["ran_after_ms"] == pytest.approx((SLOW_SECONDS - LEAVE_AFTER) * 1000, abs=80)
    assert late["told_by"] == ["send"] and late["over_budget"] is True  # told, too late
    assert observed["bare"]["departures"]["before_response"]["told_by"] == []
    for variant in ("bare", "observe", "cancel"):
        # one whole response in one chunk: no client can leave mid-body
        answered = observed[variant]["departures"]["mid_body"]
        assert answered["client"] == "answered" and answered["ran_after_ms"] == 0.0
        assert answered["saw_disconnect"] is None and answered["over_budget"] is False

    cancelled = results(
        check_json("tests.check_apps:app", "--path", "/slow", "--timeout", "1", "--mode", "cancel", status=0), "/slow"
    )
    assert cancelled["cancel"]["judged"] is True and cancelled["observe"]["judged"] is False
    assert cancelled["cancel"]["ran_after_ms"] < BUDGET_MS
    assert cancelled["cancel"]["departures"]["before_response"]["told_by"] == ["cancel"]


@pytest.mark.server
def test_a_hung_handler_is_reported_still_running_and_the_command_ends() -> None:
    """A handler that never returns: still running at the timeout, cancelled by the harness."""
    started = time.monotonic()
    data = check_json("tests.check_apps:app", "--path", "/hang", "--timeout", "0.5", status=1)
    # bare and observe: 0.55 s before the response and 0.5 s mid-body each; cancel, 0.5 s
    assert time.monotonic() - started < 15
    found = results(data, "/hang")
    for variant in ("bare", "observe"):
        assert found[variant]["ran_after_ms"] is None and found[variant]["over_budget"] is True
        first = found[variant]["departures"]["before_response"]
        assert first["client"] == "left" and first["ran_after_ms"] is None and first["status"] is None
        assert first["saw_disconnect"] is False  # the harness's own cancellation does not count
    assert found["cancel"]["ran_after_ms"] < BUDGET_MS
    for variant in ("bare", "observe", "cancel"):
        # no body chunk ever: the mid-body client never reached its departure point
        never = found[variant]["departures"]["mid_body"]
        assert never["client"] == "not_reached" and never["ran_after_ms"] is None
        assert never["over_budget"] is False


@pytest.mark.server
def test_an_app_that_installs_the_middleware_is_judged_as_configured() -> None:
    """``configured`` installs DisconnectMiddleware(cancel=True): the bare run is its configured run."""
    data = check_json("tests.check_apps:configured", "--path", "/slow", "--timeout", "1", status=0)
    found = results(data, "/slow")
    configured = found["bare"]
    assert configured["configured"] is True and configured["middleware"] == "cancel"
    assert configured["judged"] is True and configured["over_budget"] is False
    assert configured["departures"]["before_response"]["told_by"] == ["cancel"]
    # observe mode, added in front, lets the slow handler run on: shown, not judged
    assert found["observe"]["judged"] is False and found["observe"]["over_budget"] is True

    done = check("tests.check_apps:configured", "--path", "/slow", "--timeout", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "the app installs DisconnectMiddleware itself (cancel mode): reported as configured" in lines
    assert re.match(r"path\s+client leaves\s+configured\s+observe\s+cancel$", lines[4]), lines
    assert lines[-1].startswith("PASS (as configured): ")


@pytest.mark.server
def test_the_table_has_a_row_per_path_and_departure_and_a_verdict() -> None:
    """The text output: the header, the rows, the legend and the one-line verdict."""
    done = check("tests.check_apps:app", "--path", "/stream", "--path", "/sse", "--path", "/fast", "--timeout", "0.5")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("asgi-disconnect check tests.check_apps:app: ")
    assert re.match(r"path\s+client leaves\s+bare\s+observe\s+cancel$", lines[2]), lines
    rows = [re.split(r"\s{2,}", line) for line in lines[3:9]]
    expected = [
        ("/stream", "before response", r"! still running > 0\.5 s, not told", "told: send", "told: cancel"),
        ("/stream", "mid-body", r"! still running > 0\.5 s, not told", "told: send", "told: cancel"),
        # Starlette's StreamingResponse listens for the disconnect itself
        ("/sse", "before response", "told: receive", "told: receive", "told: receive"),
        ("/sse", "mid-body", "told: receive", "told: receive", "told: receive"),
        ("/fast", "before response", "answered first", "answered first", "answered first"),
        ("/fast", "mid-body", "answered first", "answered first", "answered first"),
    ]
    for row, (path, departure, *cells) in zip(rows, expected, strict=True):
        assert row[:2] == [path, departure], row
        for cell, pattern in zip(row[2:], cells, strict=True):
            assert re.search(pattern, cell), (cell, pattern)
    for row in rows[:4]:
        assert not row[3].startswith("!") and not row[4].startswith("!"), row
    assert lines[-1] == (
        "PASS (in observe mode): every handler stopped within 100 ms of its client leaving "
        "(/fast answered before the client could leave)."
    )
    assert "request_aborted" not in done.stdout + done.stderr  # the middleware's events are collected


@pytest.mark.server
def test_a_factory_is_called_for_the_app() -> None:
    """``--factory`` calls MODULE:APP to get the app, as uvicorn's does."""
    data = check_json("--factory", "tests.check_apps:create_app", "--path", "/fast", status=0)
    assert results(data, "/fast")["bare"]["departures"]["before_response"]["client"] == "answered"


@pytest.mark.server
def test_a_handler_that_blocks_the_event_loop_ends_the_command() -> None:
    """No cancellation reaches a handler that blocks the loop: the watchdog ends the process."""
    started = time.monotonic()
    done = check("tests.check_apps:app", "--path", "/block", "--timeout", "0.5", timeout=30)
    assert time.monotonic() - started < 15  # the handler blocks for a minute
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no progress while requesting /block (bare, before response)" in done.stderr
    assert "in block" in done.stderr and "time.sleep(BLOCK_SECONDS)" in done.stderr  # where it blocks


@pytest.mark.server
def test_an_app_whose_startup_fails_gives_exit_status_2() -> None:
    """A server that cannot start: the app's own reason, then one error line."""
    done = check("tests.check_apps:failing_startup", "--path", "/fast")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert "ConnectionRefusedError: cannot reach the database" in done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("asgi-disconnect check: error: uvicorn could not serve tests.check_apps:failing_startup")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        # no attribute
        ("tests.check_apps", 'import string "tests.check_apps" must be in format "<module>:<attribute>"'),
        # a module that is not there
        ("tests.no_such_module:app", 'could not import module "tests.no_such_module"'),
        # an attribute that is not there, plain and dotted
        ("tests.check_apps:nothing", 'attribute "nothing" not found in module "tests.check_apps"'),
        ("tests.check_apps:app.nothing", 'attribute "app.nothing" not found in module "tests.check_apps"'),
        # not an app at all
        ("tests.check_apps:not_an_app", '"tests.check_apps:not_an_app" is str, not an ASGI app'),
        # a factory named without --factory
        ("tests.check_apps:create_app", "a factory? add --factory"),
    ],
)
def test_a_bad_import_gives_one_clear_line_and_exit_status_2(target: str, message: str) -> None:
    """What cannot be imported as an app is said in one line; nothing is served."""
    done = check(target, "--path", "/fast")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("asgi-disconnect check: error: ") and message in line


@pytest.mark.parametrize(
    "args",
    [
        ["tests.check_apps:app"],  # no --path
        ["tests.check_apps:app", "--path", "fast"],  # a path without its slash
        ["tests.check_apps:app", "--path", "/fast", "--budget-ms", "-1"],
        ["tests.check_apps:app", "--path", "/fast", "--header", "no colon"],
    ],
)
def test_a_bad_command_line_gives_exit_status_2(args: list[str]) -> None:
    """argparse's usage errors: exit status 2, the usage on stderr."""
    done = check(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "usage: asgi-disconnect check" in done.stderr


@pytest.mark.parametrize(
    ("message", "trailers", "last"),
    [
        ({"type": "http.response.body", "body": b"x", "more_body": True}, False, False),
        ({"type": "http.response.body", "body": b"x"}, False, True),
        ({"type": "http.response.body", "body": b"x"}, True, False),
        ({"type": "http.response.trailers", "headers": [], "more_trailers": False}, True, True),
        ({"type": "http.response.zerocopysend", "file": 3, "more_body": True}, False, False),
        ({"type": "http.response.zerocopysend", "file": 3}, False, True),
        ({"type": "http.response.pathsend", "path": "/etc/hosts"}, False, True),
    ],
)
def test_the_probe_knows_the_last_message_of_a_response(message: dict[str, Any], trailers: bool, last: bool) -> None:
    """What ends a response, for "answered first": each final message of the ASGI HTTP spec, and no other."""
    assert _ends_response(message, trailers) is last
